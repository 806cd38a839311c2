"""Study files: YAML, loaded with ``yaml.safe_load`` and validated by pydantic.

Every study file has a ``kind`` that selects its runner
(``calib.studies.kinds.<kind>``) and schema.  Unknown keys are errors; nothing
in a study file is executed.  Common pieces (the estimator settings, the
pre-registered criteria) are defined here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calib.errors import StudyError

__all__ = ["Strict", "Criterion", "GridRange", "StudyBase", "load_study_file", "parse_study", "METRICS"]

METRICS = ("tpot_mape", "e2e_mape", "ttft_mape")


class Strict(BaseModel):
    """Base of every study-file schema: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Criterion(Strict):
    """A pre-registered accept criterion, evaluated at the optimum.

    ``quantity`` is ``train``, ``test``, ``all``, ``gap`` (test - train) or
    ``abs_gap`` (|test - train|) of ``metric`` (a MAPE, as a fraction).
    """

    name: str
    metric: str = "tpot_mape"
    quantity: Literal["train", "test", "all", "gap", "abs_gap"]
    op: Literal["<", "<="] = "<="
    threshold: float

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; choose one of {', '.join(METRICS)}")
        return v

    def passes(self, observed: float) -> bool:
        return observed < self.threshold if self.op == "<" else observed <= self.threshold


class GridRange(Strict):
    """``low`` to ``high`` inclusive in steps of ``step``."""

    low: float
    high: float
    step: float = Field(gt=0)

    @model_validator(mode="after")
    def _not_inverted(self) -> "GridRange":
        if self.high < self.low:
            raise ValueError(f"empty grid: high {self.high} < low {self.low}")
        return self

    def values(self) -> list[float]:
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 9) for i in range(n + 1)]


class StudyBase(Strict):
    """Fields every study has."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: str
    description: str = ""
    estimator: dict[str, Any] = Field(default_factory=dict)
    dataset: str | None = None

    @field_validator("estimator")
    @classmethod
    def _known_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        from calib.estimator import RooflineRegressor

        known = set(RooflineRegressor().get_params())
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown estimator parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return v


def _kinds() -> dict[str, type[StudyBase]]:
    from calib.studies.kinds import KINDS

    return KINDS


def parse_study(data: Any, source: str | Path = "<study>") -> StudyBase:
    """Validate a study mapping against the schema of its ``kind``."""
    if not isinstance(data, dict):
        raise StudyError("a study file must be a mapping at top level", file=source)
    kinds = _kinds()
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise StudyError(f"unknown study kind {kind!r}; known: {', '.join(sorted(kinds))}", file=source, field="kind")
    try:
        return kinds[kind].schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise StudyError(msg, file=source, field=loc) from None


def load_study_file(path: str | Path) -> StudyBase:
    """Read and validate a study file.

    Raises
    ------
    StudyError
        Unreadable file, invalid YAML, unknown kind or key, a value out of range
        (the message names the file and the key).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise StudyError(f"cannot read study file ({exc.strerror})", file=path) from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise StudyError(f"invalid YAML: {(str(exc) or type(exc).__name__).splitlines()[0]}", file=path) from None
    return parse_study(data, path)
