"""Study files: YAML, loaded with the safe loader and validated by pydantic.

Every study file has a ``kind`` that selects its runner
(``calib.studies.kinds.<kind>``) and schema.  Unknown keys are errors; nothing
in a study file is executed.  Common pieces (the estimator settings, the
pre-registered criteria) are defined here.

Limits, checked before a kind sees the file (each failure one line naming the
file, the key and, for YAML errors, the line and column): at most
:data:`MAX_STUDY_BYTES` bytes of UTF-8 text; no key given twice in one mapping;
no ``NaN`` or infinite number and no integer beyond :data:`MAX_INTEGER` anywhere;
a study name of safe characters, at most :data:`MAX_NAME_LENGTH` long (it names
folders and Optuna studies); every ``estimator`` block, at any depth, made of
settings parameters (:mod:`calib.settings`) with valid values; a grid phase
``around`` an optimum of at most :data:`MAX_GRID_POINTS` points.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calib.errors import CalibError, StudyError
from calib.specs._files import MAX_CONFIG_BYTES, parse_yaml, read_text

__all__ = ["Strict", "Criterion", "GridRange", "StudyBase", "load_study_file", "parse_study", "METRICS",
           "MAX_NAME_LENGTH", "MAX_STUDY_BYTES", "NAME_PATTERN"]

METRICS = ("tpot_mape", "e2e_mape", "ttft_mape")
#: Largest grid a study file may ask for (a typo in a step must not hang a study).
MAX_GRID_POINTS = 100_000
#: Largest study file (bytes).
MAX_STUDY_BYTES = MAX_CONFIG_BYTES
#: Longest study name (it names a folder, Optuna studies ``<name>-<phase>-<fingerprint>`` and files).
MAX_NAME_LENGTH = 64
#: A study name: letters, digits, ``_ . -``, starting with a letter or digit (so never ``.`` or ``..``).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
#: Largest integer magnitude in a study file (2**53: every such integer is also exact as a float).
MAX_INTEGER = 2**53


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
    threshold: float = Field(allow_inf_nan=False)

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

    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME_LENGTH)
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


def _walk(data: Any):
    """``(path, key, value)`` of every node below ``data``, each container once (YAML anchors may share or
    even nest a node in itself)."""
    seen: set[int] = set()
    stack: list[tuple[str, Any, Any]] = [("", None, data)]
    while stack:
        where, key, value = stack.pop()
        yield where, key, value
        if isinstance(value, (dict, list)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((f"{where}.{k}" if where else str(k), k, v) for k, v in reversed(list(items)))


def _check_numbers(data: Any, source) -> None:
    """No NaN, no infinity, no integer beyond :data:`MAX_INTEGER`, anywhere in the document."""
    for where, _, value in _walk(data):
        if isinstance(value, float) and not math.isfinite(value):
            raise StudyError(f"must be a finite number, got {value!r}", file=source, field=where or "(top level)")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
            raise StudyError(f"integer out of range (|x| <= 2**53), got {value}", file=source,
                             field=where or "(top level)")


def _check_estimators(data: Any, source) -> None:
    """Every ``estimator`` block, at any depth, holds valid settings parameters (and ``target``)."""
    from calib.errors import CalibError
    from calib.settings import Settings

    for field, key, value in _walk(data):
        if key != "estimator" or not isinstance(value, dict):
            continue
        target = value.get("target", "tpot")
        if target not in ("tpot", "ttft", "e2e"):
            raise StudyError(f"unknown value {target!r}; choose one of tpot, ttft, e2e", file=source,
                             field=f"{field}.target")
        try:
            Settings.from_params({k: x for k, x in value.items() if k != "target"})
        except CalibError as exc:
            raise StudyError(exc.message, file=source, field=f"{field}.{exc.field}" if exc.field else field) \
                from None


def _check_phases(spec: StudyBase, source) -> None:
    """A phase around an optimum (``radius``, ``step``) stays within :data:`MAX_GRID_POINTS`."""
    for i, phase in enumerate(getattr(spec, "phases", None) or []):
        radius, step = getattr(phase, "radius", None), getattr(phase, "step", None)
        if isinstance(radius, (int, float)) and isinstance(step, (int, float)) and step > 0:
            n = 2 * (radius / step) + 1
            if n > MAX_GRID_POINTS:
                raise StudyError(f"radius {radius:g} in steps of {step:g} gives {n:.3g} grid points, over the "
                                 f"limit of {MAX_GRID_POINTS}", file=source, field=f"phases.{i}.radius")


def parse_study(data: Any, source: str | Path = "<study>") -> StudyBase:
    """Validate a study mapping against the schema of its ``kind``."""
    if not isinstance(data, dict):
        raise StudyError("a study file must be a mapping at top level", file=source)
    _check_numbers(data, source)
    kinds = _kinds()
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise StudyError(f"unknown study kind {kind!r}; known: {', '.join(sorted(kinds))}", file=source, field="kind")
    if isinstance(data.get("name"), str) and len(data["name"]) > MAX_NAME_LENGTH:
        raise StudyError(f"{len(data['name'])} characters, at most {MAX_NAME_LENGTH} allowed", file=source,
                         field="name")
    _check_estimators(data, source)
    try:
        spec = kinds[kind].schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "string_pattern_mismatch" and loc == "name":
            msg = (f"{err.get('input')!r} is not a study name: letters, digits, '_', '.', '-', starting with a "
                   "letter or digit")
        raise StudyError(msg, file=source, field=loc) from None
    except CalibError as exc:  # a kind's validator that raises calib's own error: name the study file
        raise StudyError(exc.message, file=exc.file or source, field=exc.field) from None
    except (TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # a kind's validator tripping over a malformed value (its own bug): still one line naming the file
        raise StudyError(f"invalid study ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                         file=source) from None
    _check_phases(spec, source)
    return spec


def load_study_file(path: str | Path) -> StudyBase:
    """Read and validate a study file.

    Raises
    ------
    StudyError
        Unreadable, too large or not UTF-8 file, invalid YAML or a key given
        twice (with line and column), unknown kind or key, a value out of
        range (the message names the file and the key).
    """
    path = Path(path)
    data = parse_yaml(read_text(path, MAX_STUDY_BYTES, StudyError), path, StudyError)
    return parse_study(data, path)
