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
#: Largest grid a study file may ask for (a typo in a step must not hang a study).
MAX_GRID_POINTS = 100_000


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

    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    step: float = Field(gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _not_inverted(self) -> "GridRange":
        if self.high < self.low:
            raise ValueError(f"empty grid: high {self.high} < low {self.low}")
        n = (self.high - self.low) / self.step + 1
        if n > MAX_GRID_POINTS:
            raise ValueError(f"{n:.3g} grid points exceed the limit of {MAX_GRID_POINTS}")
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
    modes: list[Literal["reference", "corrected"]] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _modes(self):
        if self.modes is not None:
            if len(set(self.modes)) != len(self.modes):
                raise ValueError(f"modes repeat: {self.modes}")
            if "mode" in self.estimator:
                raise ValueError("give either estimator.mode or modes, not both")
        return self

    def for_mode(self, mode: str | None):
        """This study in one mode (``estimator.mode`` set, ``modes`` cleared); ``None``: as written."""
        if mode is None:
            if self.modes and len(self.modes) > 1:
                raise StudyError(f"study {self.name!r} runs in modes {', '.join(self.modes)}: choose one",
                                 field="--mode")
            mode = self.modes[0] if self.modes else None
            if mode is None:
                return self
        if self.modes is not None and mode not in self.modes:
            raise StudyError(f"study {self.name!r} has no mode {mode!r}; its modes: {', '.join(self.modes)}",
                             field="--mode")
        if self.modes is None and self.estimator.get("mode", "reference") != mode:
            raise StudyError(f"study {self.name!r} runs in mode {self.estimator.get('mode', 'reference')!r} only",
                             field="--mode")
        return self.model_copy(update={"estimator": {**self.estimator, "mode": mode}, "modes": None})

    def mode_list(self) -> list[str | None]:
        """The modes a full run of this study covers (``[None]``: the one the estimator block sets)."""
        return list(self.modes) if self.modes else [None]

    @field_validator("estimator")
    @classmethod
    def _known_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        from calib.errors import CalibError
        from calib.settings import Settings

        target = v.get("target", "tpot")
        if target not in ("tpot", "ttft", "e2e"):
            raise ValueError(f"target: unknown value {target!r}; choose one of tpot, ttft, e2e")
        try:
            Settings.from_params({k: x for k, x in v.items() if k != "target"})
        except CalibError as exc:
            raise ValueError(f"{exc.field}: {exc.message}" if exc.field else exc.message) from None
        return v


def _kinds():
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
