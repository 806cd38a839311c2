"""scikit-learn estimators over calib's replays: rows are experiments (synchronous) or load stages (loaded)."""

from calib.estimators.loaded import LoadedRegressor, load_stages
from calib.estimators.roofline import RooflineRegressor, clear_cache

__all__ = ["RooflineRegressor", "LoadedRegressor", "load_stages", "clear_cache"]
