"""calib: calibrate analytical roofline models of LLM inference serving, and test whether they generalize.

The public API, re-exported from the layers (descriptions -> physics -> replay
-> estimator -> studies -> reports):

>>> from calib import RooflineRegressor, load_experiments
>>> X = load_experiments()
>>> est = RooflineRegressor(per_layer_overhead_us=80).fit(X, X.tpot_mean_ms)
>>> round(-est.score(X, X.tpot_mean_ms), 3) < 1
True
"""

from calib.data import load_experiments, load_guidellm_run, load_trace
from calib.errors import CalibError, ConfigError, DataError, StudyError
from calib.estimator import RooflineRegressor
from calib.physics import PhysicsOptions, StepBatch, StepModel, hardware_time, step_time_us
from calib.physics.overhead import OVERHEAD_MODELS, make_overhead
from calib.specs import load_hardware, load_mfu, load_model
from calib.studies.runner import run_study

__version__ = "0.1.0"

__all__ = [
    "CalibError",
    "ConfigError",
    "DataError",
    "OVERHEAD_MODELS",
    "PhysicsOptions",
    "RooflineRegressor",
    "StepBatch",
    "StepModel",
    "StudyError",
    "hardware_time",
    "load_experiments",
    "load_guidellm_run",
    "load_hardware",
    "load_mfu",
    "load_model",
    "load_trace",
    "make_overhead",
    "run_study",
    "step_time_us",
]
