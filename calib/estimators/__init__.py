"""scikit-learn estimators over calib's replays: rows are experiments (synchronous) or load stages (loaded)."""

from calib.estimators.joint import JointRegressor, stack
from calib.estimators.loaded import LoadedRegressor, load_stages
from calib.estimators.roofline import RooflineRegressor, clear_cache

__all__ = ["RooflineRegressor", "LoadedRegressor", "JointRegressor", "load_stages", "stack", "clear_cache"]
