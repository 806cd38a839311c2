"""Overhead models: the CPU and scheduling time the roofline does not see.

An overhead model maps per-step features to µs added to every non-empty step.
Each model is a small class with named parameters; ``from_params`` builds one
from a flat dict (what an Optuna trial suggests), ``search_space`` declares the
ranges a study searches.  The features are arrays of length ``n_steps``:

``n_prefill``      prefill entries in the step
``prefill_tokens`` new prefill tokens (``p``)
``n_decode``       decode entries (``q``)

and the scalars ``num_layers`` (``L``) and ``tp``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, Mapping

import numpy as np

from calib.errors import ConfigError

__all__ = [
    "OverheadModel",
    "PerLayer",
    "PerLayerTPPower",
    "PerStepPlusPerLayer",
    "PrefillDecodeSplit",
    "BatchLinear",
    "PerSequence",
    "OVERHEAD_MODELS",
    "make_overhead",
    "param",
]


def param(default: float, doc: str, *, search: tuple[float, float], low: float = 0.0, high: float | None = None):
    """A parameter of an overhead model: default, one doc line, the valid range ``[low, high]`` and the
    default search range (what :mod:`calib.settings` turns into a validated, documented field)."""
    return field(default=default, metadata={"doc": doc, "low": low, "high": high, "search": search})


@dataclass(frozen=True)
class OverheadModel:
    """Base class: ``step_us(features, num_layers, tp)`` -> µs per step (0 for empty steps)."""

    name: ClassVar[str] = "base"

    def _per_step(self, f: Mapping[str, np.ndarray], L: int, tp: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def step_us(self, features: Mapping[str, np.ndarray], num_layers: int, tp: int) -> np.ndarray:
        busy = (np.asarray(features["n_prefill"]) + np.asarray(features["n_decode"])) > 0
        return np.where(busy, self._per_step(features, num_layers, tp), 0.0)

    @classmethod
    def ranges(cls) -> dict[str, tuple[float, float]]:
        """Parameter -> default search range ``(low, high)``."""
        return {f.name: tuple(f.metadata["search"]) for f in fields(cls)}

    @property
    def params(self) -> dict[str, float]:
        return asdict(self)

    @property
    def n_params(self) -> int:
        return len(fields(self))

    @classmethod
    def from_params(cls, params: Mapping[str, float]) -> "OverheadModel":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ConfigError(f"unknown parameter of overhead model {cls.name!r}; known: {', '.join(sorted(names))}",
                              field=unknown[0])
        return cls(**{k: float(v) for k, v in params.items()})


@dataclass(frozen=True)
class PerLayer(OverheadModel):
    """The reference rule: ``per_layer_us * L / TP`` per step (``perLayerOverhead``).

    >>> PerLayer(100.0).step_us({"n_prefill": np.array([0, 1]), "n_decode": np.array([1, 0])}, 32, 1).tolist()
    [3200.0, 3200.0]
    """

    per_layer_us: float = param(100.0, "perLayerOverhead: µs per layer per step, charged x L / TP",
                                search=(0.0, 500.0))
    name: ClassVar[str] = "per_layer"

    def _per_step(self, f, L, tp):
        return np.full(np.shape(f["n_decode"]), self.per_layer_us * L / tp)


@dataclass(frozen=True)
class PerLayerTPPower(OverheadModel):
    """``per_layer_us * L / TP**alpha``: alpha = 1 is the reference, 0 ignores TP."""

    per_layer_us: float = param(100.0, "perLayerOverhead: µs per layer per step, charged x L / TP**alpha",
                                search=(0.0, 500.0))
    alpha: float = param(1.0, "exponent of TP in the per-layer term (1: the reference, 0: TP-independent)",
                         search=(0.0, 1.5), high=4.0)
    name: ClassVar[str] = "per_layer_tp_power"

    def _per_step(self, f, L, tp):
        return np.full(np.shape(f["n_decode"]), self.per_layer_us * L / tp**self.alpha)


@dataclass(frozen=True)
class PerStepPlusPerLayer(OverheadModel):
    """``step_us + per_layer_us * L / TP``: a fixed scheduler cost plus the layer term."""

    step_us_const: float = param(0.0, "fixed µs per non-empty step (scheduler)", search=(0.0, 5000.0))
    per_layer_us: float = param(100.0, "perLayerOverhead: µs per layer per step, charged x L / TP",
                                search=(0.0, 500.0))
    name: ClassVar[str] = "per_step_plus_per_layer"

    def _per_step(self, f, L, tp):
        return np.full(np.shape(f["n_decode"]), self.step_us_const + self.per_layer_us * L / tp)


@dataclass(frozen=True)
class PrefillDecodeSplit(OverheadModel):
    """Separate per-layer constants: steps with prefill pay ``prefill_per_layer_us``, others ``decode_per_layer_us``."""

    prefill_per_layer_us: float = param(100.0, "µs per layer per step holding a prefill chunk, x L / TP",
                                        search=(0.0, 1000.0))
    decode_per_layer_us: float = param(100.0, "µs per layer per decode-only step, x L / TP",
                                       search=(0.0, 500.0))
    name: ClassVar[str] = "prefill_decode_split"

    def _per_step(self, f, L, tp):
        has_p = np.asarray(f["n_prefill"]) > 0
        return np.where(has_p, self.prefill_per_layer_us, self.decode_per_layer_us) * L / tp


@dataclass(frozen=True)
class BatchLinear(OverheadModel):
    """``(a_us + b_us * batch) * L / TP`` with ``batch`` = requests in the step."""

    a_us: float = param(100.0, "µs per layer per step, x L / TP", search=(0.0, 500.0))
    b_us: float = param(0.0, "µs per layer per request in the step, x L / TP", search=(0.0, 20.0))
    name: ClassVar[str] = "batch_linear"

    def _per_step(self, f, L, tp):
        batch = np.asarray(f["n_prefill"]) + np.asarray(f["n_decode"])
        return (self.a_us + self.b_us * batch) * L / tp


@dataclass(frozen=True)
class PerSequence(OverheadModel):
    """``step_us_const + per_seq_us * batch``: the engine's CPU work per step, growing with the requests in it.

    Scheduling, input preparation, sampling and detokenisation are done per
    sequence of the step on the CPU, independent of the layer count and TP (the
    GPU side, kernel fixed costs included, is the v4 roofline's).

    >>> PerSequence(500.0, 10.0).step_us({"n_prefill": np.array([1, 0]), "n_decode": np.array([31, 0])}, 32, 1).tolist()
    [820.0, 0.0]
    """

    step_us_const: float = param(500.0, "fixed µs per non-empty step (scheduler, launch of the step)",
                                 search=(0.0, 3000.0))
    per_seq_us: float = param(10.0, "µs per request in the step (input preparation, sampling, detokenisation)",
                              search=(0.0, 100.0))
    name: ClassVar[str] = "per_sequence"

    def _per_step(self, f, L, tp):
        batch = np.asarray(f["n_prefill"]) + np.asarray(f["n_decode"])
        return self.step_us_const + self.per_seq_us * batch


OVERHEAD_MODELS: dict[str, type[OverheadModel]] = {
    cls.name: cls for cls in (PerLayer, PerLayerTPPower, PerStepPlusPerLayer, PrefillDecodeSplit, BatchLinear,
                              PerSequence)
}


def make_overhead(name: str, params: Mapping[str, float] | None = None) -> OverheadModel:
    """Build an overhead model by name.

    >>> make_overhead("batch_linear", {"a_us": 50, "b_us": 2}).n_params
    2
    """
    if name not in OVERHEAD_MODELS:
        raise ConfigError(f"unknown overhead model {name!r}; known: {', '.join(OVERHEAD_MODELS)}", field="overhead")
    return OVERHEAD_MODELS[name].from_params(params or {})
