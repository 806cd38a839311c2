"""Study kinds: each module defines ``schema`` (a pydantic model) and ``run(spec, ctx) -> dict``."""

from __future__ import annotations

import importlib

_NAMES = ("hg1",)
_OPTIONAL = ("split_sensitivity", "per_group", "per_family", "overhead_models", "seeds", "physics",
             "batched_validation", "batched_calibration", "tpe")


def _load() -> dict:
    kinds = {}
    for name in _NAMES + _OPTIONAL:
        try:
            module = importlib.import_module(f"calib.studies.kinds.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"calib.studies.kinds.{name}" and name in _OPTIONAL:
                continue
            raise
        kinds[module.KIND] = module
    return kinds


KINDS = _load()
