"""The switches and constants of the v2 step model, as one validated object.

:class:`PhysicsOptions` collects every choice of ``roofline-spec.md`` §3 that
differs between the v2.3 form (the HG1 reconstruction, the default) and the
v2.4 form, plus the calibratable constants (MFU scales and floor, bandwidth
efficiency).  ``PhysicsOptions.for_variant("v2.4")`` gives the v2.4 set;
keyword overrides change one choice and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from calib.errors import ConfigError

__all__ = ["PhysicsOptions", "VARIANTS", "GEMM_MFU_SOURCES", "MIXED_RULES", "DECODE_ATTENTION_RULES", "PREFILL_ATTENTION_RULES"]

VARIANTS = ("v2.3", "v2.4", "v3", "v4")
MIXED_RULES = ("weighted", "max", "additive")
DECODE_ATTENTION_RULES = ("max_context", "per_request")
PREFILL_ATTENTION_RULES = ("bucket", "actual")
_MFU_RULES = ("nearest", "interp")
_TP_FALLBACKS = ("tp1", "nearest")
GEMM_MFU_SOURCES = ("constant", "table")

_VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "v2.3": dict(
        mfu_rule="nearest",
        gemm_weight_floor=False,
        decode_attention="max_context",
        prefill_attention="bucket",
        mixed_rule="weighted",
        min_step_us=0.0,
        tp_fallback="tp1",
    ),
    "v2.4": dict(
        mfu_rule="interp",
        gemm_weight_floor=True,
        decode_attention="per_request",
        prefill_attention="actual",
        mixed_rule="max",
        min_step_us=1.0,
        tp_fallback="nearest",
    ),
    # v3 is a different formula (calib.physics.roofline_v3); these fields are unused there.
    "v3": dict(
        mfu_rule="nearest",
        gemm_weight_floor=False,
        decode_attention="per_request",
        prefill_attention="actual",
        mixed_rule="max",
        min_step_us=0.0,
        tp_fallback="tp1",
        bw_efficiency=1.0,
    ),
    # v4 (calib.physics.roofline_v4): per-kernel rooflines; the v2 switches are unused there.
    "v4": dict(
        mfu_rule="interp",
        gemm_weight_floor=False,
        decode_attention="per_request",
        prefill_attention="actual",
        mixed_rule="additive",
        min_step_us=0.0,
        tp_fallback="nearest",
        bw_efficiency=0.94,
    ),
}


@dataclass(frozen=True)
class PhysicsOptions:
    """Every choice and constant of the step model.

    Parameters
    ----------
    variant : {"v2.3", "v2.4", "v3"}
        Label of the formula family; ``for_variant`` fills the switches from it.
    mfu_rule : {"nearest", "interp"}
        MFU lookup rule (spec §4.2 / §4.3).
    gemm_weight_floor : bool
        v2.4: each GEMM takes at least the time to load its weights.
    decode_attention : {"max_context", "per_request"}
        v2.3 charges every decode request the longest context of the batch at one
        MFU; v2.4 uses each request's context and a FLOP-weighted MFU.
    prefill_attention : {"bucket", "actual"}
        v2.3 charges attention at the bucket length; v2.4 at ``PI + n`` (MFU still at the bucket).
    mixed_rule : {"weighted", "max", "additive"}
        How a step with prefill and decode entries combines them (spec §3.5).
        ``additive`` runs one GEMM pass of ``M = p + q`` tokens plus both
        attention parts, against one weight load (the v2.2 form with tokens, not
        request counts, as GEMM rows).
    min_step_us : float
        Floor on a non-empty step (v2.4: 1 µs).
    tp_fallback : {"tp1", "nearest"}
        Decode MFU table used when the TP-specific one is missing.
    bw_efficiency : float, optional
        Bandwidth efficiency in (0, 1]; ``None`` takes the hardware default.
    gemm_mfu_scale, prefill_attention_mfu_scale, decode_attention_mfu_scale : float
        Multipliers (> 0) on the looked-up MFU, clipped to 1.
    mfu_floor : float
        Lower bound on every MFU after scaling, in [0, 1).
    mfu_prefill, mfu_decode : float
        The constant MFUs of the v3 roofline.
    gemm_mfu_source : {"constant", "table"}
        v4: a GEMM's compute efficiency is ``gemm_mfu`` (default) or the MFU table's at the
        sharded shape and 4096 rows, times ``gemm_mfu_scale``.
    gemm_mfu : float
        v4: compute efficiency of every GEMM (measured H100 prefill GEMMs: 0.66-0.77).
    kernel_floor_us : float
        v4: fixed cost of every kernel (measured: 3-5 µs).
    prefill_attention_mfu : float
        v4: compute efficiency of prefill attention.
    decode_attention_efficiency : float
        v4: fraction of the peak bandwidth at which decode attention reads the KV cache.
    allreduce_us : float
        v4: fixed cost of one tensor-parallel all-reduce (two per layer when TP > 1).

    Examples
    --------
    >>> PhysicsOptions.for_variant("v2.4").mixed_rule
    'max'
    >>> PhysicsOptions.for_variant("v2.3", mfu_rule="interp").gemm_weight_floor
    False
    """

    variant: str = "v2.3"
    mfu_rule: str = "nearest"
    gemm_weight_floor: bool = False
    decode_attention: str = "max_context"
    prefill_attention: str = "bucket"
    mixed_rule: str = "weighted"
    min_step_us: float = 0.0
    tp_fallback: str = "tp1"
    bw_efficiency: float | None = None
    gemm_mfu_scale: float = 1.0
    prefill_attention_mfu_scale: float = 1.0
    decode_attention_mfu_scale: float = 1.0
    mfu_floor: float = 0.0
    mfu_prefill: float = 0.45
    mfu_decode: float = 0.30
    gemm_mfu_source: str = "constant"
    gemm_mfu: float = 0.72
    kernel_floor_us: float = 3.0
    prefill_attention_mfu: float = 0.6
    decode_attention_efficiency: float = 0.7
    allreduce_us: float = 10.0

    def __post_init__(self) -> None:
        choices = {
            "variant": VARIANTS,
            "mfu_rule": _MFU_RULES,
            "decode_attention": DECODE_ATTENTION_RULES,
            "prefill_attention": PREFILL_ATTENTION_RULES,
            "mixed_rule": MIXED_RULES,
            "tp_fallback": _TP_FALLBACKS,
            "gemm_mfu_source": GEMM_MFU_SOURCES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"unknown value {getattr(self, name)!r}; choose one of {', '.join(allowed)}", field=name
                )
        if not isinstance(self.gemm_weight_floor, bool):
            raise ConfigError("must be true or false", field="gemm_weight_floor")
        for name in ("gemm_mfu_scale", "prefill_attention_mfu_scale", "decode_attention_mfu_scale"):
            _number(self, name, low=0.0, low_open=True)
        for name in ("mfu_prefill", "mfu_decode", "gemm_mfu", "prefill_attention_mfu", "decode_attention_efficiency"):
            _number(self, name, low=0.0, low_open=True, high=1.0)
        _number(self, "mfu_floor", low=0.0, high=1.0, high_open=True)
        _number(self, "min_step_us", low=0.0)
        _number(self, "kernel_floor_us", low=0.0, high=1e4)
        _number(self, "allreduce_us", low=0.0, high=1e4)
        if self.bw_efficiency is not None:
            _number(self, "bw_efficiency", low=0.0, low_open=True, high=1.0)

    @classmethod
    def for_variant(cls, variant: str = "v2.3", **overrides: Any) -> "PhysicsOptions":
        """Options of a named variant, with ``overrides`` (``None`` values are ignored)."""
        if variant not in _VARIANT_DEFAULTS:
            raise ConfigError(f"unknown value {variant!r}; choose one of {', '.join(VARIANTS)}", field="variant")
        known = {f.name for f in fields(cls)}
        for key in overrides:
            if key not in known:
                raise ConfigError(f"unknown physics parameter; known: {', '.join(sorted(known))}", field=key)
        values = dict(_VARIANT_DEFAULTS[variant], variant=variant)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> "PhysicsOptions":
        """A copy with ``changes`` applied and validated."""
        return replace(self, **changes)


def _number(opts: PhysicsOptions, name: str, *, low: float, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(opts, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"must be a number, got {value!r}", field=name)
    bad_low = value <= low if low_open else value < low
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"must be in {lo}{low}, {high if high is not None else 'inf'}{hi}, got {value}", field=name)
