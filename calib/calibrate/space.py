"""Search spaces: which settings parameters a calibration searches, and over what.

A space maps a settings parameter (qualified ``overhead.per_layer_us`` or flat
``per_layer_us``; stored qualified) to a :class:`Range` or a :class:`Choice`.
Ranges must be finite and non-empty, and must lie inside the parameter's valid
range (checked by building a :class:`~calib.settings.Settings` at both ends).

Examples
--------
>>> space = make_space({"per_layer_us": Range(0, 500)})
>>> list(space), space["overhead.per_layer_us"].distribution()
(['overhead.per_layer_us'], FloatDistribution(high=500.0, log=False, low=0.0, step=None))
>>> make_space({"per_layer_us": Range(-5, 5)})
Traceback (most recent call last):
...
calib.errors.ConfigError: space: overhead.per_layer_us: must be >= 0, got -5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from calib.errors import CalibError, ConfigError
from calib.settings import Settings, qualified_name

__all__ = ["Range", "Choice", "Dimension", "make_space", "describe_space"]


@dataclass(frozen=True)
class Range:
    """A real interval ``[low, high]`` (``log``: sampled on a log scale; ``integer``: whole numbers)."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"must be a finite number, got {v!r}", field=f"space.{name}")
        if self.high < self.low:
            raise ConfigError(f"empty range: high {self.high} < low {self.low}", field="space.high")
        if self.log and self.low <= 0:
            raise ConfigError("a log range needs low > 0", field="space.low")

    def distribution(self):
        from optuna.distributions import FloatDistribution, IntDistribution

        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def ends(self) -> list[Any]:
        return [self.low, self.high]

    def describe(self) -> dict:
        return {"low": self.low, "high": self.high, **({"log": True} if self.log else {}),
                **({"integer": True} if self.integer else {})}


@dataclass(frozen=True)
class Choice:
    """One of a few values (strings, booleans or numbers)."""

    values: tuple

    def __init__(self, values: Sequence[Any]) -> None:
        values = tuple(values)
        if not values:
            raise ConfigError("a choice needs at least one value", field="space.values")
        object.__setattr__(self, "values", values)

    def distribution(self):
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.values)

    def ends(self) -> list[Any]:
        return list(self.values)

    def describe(self) -> dict:
        return {"choices": list(self.values)}


Dimension = Range | Choice


def make_space(space: Mapping[str, Any], base: Settings | None = None) -> dict[str, Dimension]:
    """Validate a space: qualified names, :class:`Range`/:class:`Choice` values (a mapping with ``low``/``high``
    or ``choices`` is accepted too), every end point a valid setting.  Ordered by qualified name."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("a search space needs at least one parameter", field="space")
    base = base or Settings()
    out: dict[str, Dimension] = {}
    for key, dim in space.items():
        qual = qualified_name(key)
        if qual == "overhead.model":
            raise ConfigError("the overhead model is chosen among candidates (SelectBest), not searched",
                              field=f"space.{key}")
        if isinstance(dim, Mapping):
            try:
                dim = Choice(dim["choices"]) if "choices" in dim else Range(**dim)
            except TypeError as exc:  # a missing or unknown key
                raise ConfigError(f"a range needs low and high (optionally log, integer): {exc}",
                                  field=f"space.{key}") from None
        if not isinstance(dim, (Range, Choice)):
            raise ConfigError(f"must be a Range or a Choice, got {type(dim).__name__}", field=f"space.{key}")
        for value in dim.ends():
            try:
                base.with_values({qual: value})
            except CalibError as exc:
                raise ConfigError(f"{exc.field}: {exc.message}", field="space") from None
        out[qual] = dim
    return dict(sorted(out.items()))


def describe_space(space: Mapping[str, Dimension]) -> dict:
    """A JSON-able description of a space (for results and calibration files)."""
    return {k: v.describe() for k, v in space.items()}
