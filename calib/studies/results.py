"""The results envelope every study's ``results.json`` carries, and the check of a kind's typed results.

The runner fills the envelope once for every kind: ``results_version``,
``study``, ``kind``, ``mode``, ``seeds`` (request seed and search seeds),
``settings`` (the study file's settings, resolved) and ``software`` (package
versions).  A kind may declare a pydantic model ``Results`` for its own keys;
the runner validates the kind's output against it before anything is written,
so a report never reads a key the kind did not promise.

Examples
--------
>>> sorted(software_versions())[:3]
['calib', 'numpy', 'optuna']
>>> Envelope(study="hg1", kind="hg1", mode="reference").results_version == RESULTS_VERSION
True
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from calib.errors import StudyError

__all__ = ["RESULTS_VERSION", "Envelope", "software_versions", "check_results", "Typed"]

#: Version of the results.json layout (2: calib 0.2, the envelope and typed results).
RESULTS_VERSION = 2

_PACKAGES = ("calib", "numpy", "pandas", "scikit-learn", "optuna", "pydantic", "scipy")


def software_versions() -> dict[str, str]:
    """Installed versions of calib and the libraries its numbers depend on, and Python's."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "calib":
                from calib import __version__

                out[name] = __version__
    return dict(sorted(out.items()))


class Envelope(BaseModel):
    """What every results.json states about itself."""

    model_config = ConfigDict(extra="forbid")

    results_version: int = RESULTS_VERSION
    study: str
    kind: str
    mode: str | None = None
    seeds: dict[str, Any] = Field(default_factory=dict)
    software: dict[str, str] = Field(default_factory=dict)


class Typed(BaseModel):
    """Base of a kind's ``Results`` model: extra keys are errors, so the schema lists every key."""

    model_config = ConfigDict(extra="forbid")


def check_results(kind_module, results: dict) -> dict:
    """Validate ``results`` against ``kind_module.Results`` (when the kind declares one); returns ``results``."""
    model = getattr(kind_module, "Results", None)
    if model is None:
        return results
    try:
        model.model_validate(results)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise StudyError(f"study kind {kind_module.KIND!r} produced results that break its schema: {err['msg']}",
                         field=loc) from None
    return results
