"""scikit-learn estimators over calib's replays: rows are experiments (synchronous) or load stages (loaded).

:class:`RooflineRegressor` is imported with the package; the loaded and joint
estimators (and the loaded-server replay they need) on first use, so a
synchronous calibration such as ``calib hg1`` does not import them.
"""

from importlib import import_module

from calib.estimators.roofline import RooflineRegressor, clear_cache

__all__ = ["RooflineRegressor", "LoadedRegressor", "JointRegressor", "load_stages", "stack", "clear_cache"]

#: name -> module, imported on first access (PEP 562)
_LAZY = {
    "JointRegressor": "calib.estimators.joint",
    "stack": "calib.estimators.joint",
    "LoadedRegressor": "calib.estimators.loaded",
    "load_stages": "calib.estimators.loaded",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
