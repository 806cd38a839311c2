"""Study kinds: each module defines ``KIND``, ``schema`` (a pydantic model) and ``run(spec, ctx) -> dict``.

The registry is lazy: a kind's module is imported when a study of that kind
is read, so one kind's dependencies never slow down (or break) another's.
An unknown kind, or a module that does not define what a kind must, fails
loudly with a one-line :class:`~calib.errors.StudyError`.

>>> "hg1" in KINDS, sorted(KINDS)[:2]
(True, ['batched_calibration', 'batched_validation'])
>>> KINDS["hg1"].KIND
'hg1'
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType

from calib.errors import StudyError

__all__ = ["KINDS"]

#: kind -> module under calib.studies.kinds
_MODULES = {
    "hg1": "hg1",
    "split_sensitivity": "split_sensitivity",
    "per_group": "per_group",
    "per_family": "per_family",
    "overhead_models": "overhead_models",
    "seeds": "seeds",
    "physics": "physics",
    "batched_validation": "batched_validation",
    "batched_calibration": "batched_calibration",
    "joint": "joint",
}


class _Registry(Mapping):
    """kind -> module, imported on first use and checked."""

    def __init__(self, modules: dict[str, str]) -> None:
        self._modules = dict(modules)
        self._loaded: dict[str, ModuleType] = {}

    def __getitem__(self, kind: str) -> ModuleType:
        if kind not in self._modules:
            raise KeyError(kind)
        if kind not in self._loaded:
            module = importlib.import_module(f"calib.studies.kinds.{self._modules[kind]}")
            missing = [a for a in ("KIND", "schema", "run") if not hasattr(module, a)]
            if missing or module.KIND != kind:
                raise StudyError(f"study kind module {module.__name__} is broken: it lacks "
                                 f"{', '.join(missing) or 'KIND = ' + repr(kind)}", field="kind")
            self._loaded[kind] = module
        return self._loaded[kind]

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __contains__(self, kind) -> bool:
        return kind in self._modules


KINDS = _Registry(_MODULES)
