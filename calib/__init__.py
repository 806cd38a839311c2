"""calib: calibrate analytical roofline models of LLM inference serving, and test whether they generalize.

The public API, re-exported from the layers (descriptions -> physics -> replay
-> estimator -> studies -> reports):

>>> from calib import RooflineRegressor, load_experiments
>>> X = load_experiments()
>>> est = RooflineRegressor(per_layer_us=80).fit(X, X.tpot_mean_ms)
>>> round(-est.score(X, X.tpot_mean_ms), 3) < 1
True

Importing ``calib`` imports nothing else: each name is imported from its
module on first use (PEP 562), so the command line starts fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Public name -> the module it is imported from on first use.
_EXPORTS = {
    "CalibError": "calib.errors",
    "Calibration": "calib.calibration",
    "Calibrator": "calib.calibrate",
    "ConfigError": "calib.errors",
    "DataError": "calib.errors",
    "JointRegressor": "calib.estimators",
    "LoadedRegressor": "calib.estimators",
    "OVERHEAD_MODELS": "calib.physics.overhead",
    "PhysicsOptions": "calib.physics",
    "RooflineRegressor": "calib.estimators",
    "SelectBest": "calib.calibrate",
    "Settings": "calib.settings",
    "StepBatch": "calib.physics",
    "StepModel": "calib.physics",
    "StudyError": "calib.errors",
    "hardware_time": "calib.physics",
    "load_experiments": "calib.data",
    "load_guidellm_run": "calib.data",
    "load_hardware": "calib.specs",
    "load_mfu": "calib.specs",
    "load_model": "calib.specs",
    "load_trace": "calib.data",
    "make_overhead": "calib.physics.overhead",
    "run_study": "calib.studies.runner",
    "step_time_us": "calib.physics",
}

__all__ = sorted(_EXPORTS, key=lambda name: (name[0].islower(), name))


def __getattr__(name: str):
    """Import a public name from its module on first access (and keep it)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'calib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
