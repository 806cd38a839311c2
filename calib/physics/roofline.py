"""The v2 roofline step-time model (``roofline-spec.md`` §3), vectorised over steps.

Pure functions: arrays in, arrays out.  :func:`hardware_time` gives the
overhead-free hardware seconds of every step of a :class:`StepBatch` and its
parts; :func:`step_time_us` adds an overhead (µs per step) and rounds half away
from zero, as the reference does.  Because the overhead enters additively
after the hardware time, callers can cache ``hardware_time`` and re-evaluate
many overhead values cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calib.errors import ConfigError
from calib.physics.batch import StepBatch
from calib.physics.options import PhysicsOptions
from calib.specs.hardware import HardwareSpec
from calib.specs.model import ModelSpec

__all__ = ["StepParts", "hardware_time", "step_time_us", "round_half_away", "prefill_bucket", "dynamic_bytes"]

_BUCKET_MIN, _BUCKET_MAX = 512, 65536
#: Causal-mask divisor on prefill attention FLOPs, inherited from InferSim (spec §3.4).
CAUSAL_DIVISOR = 1.8


@dataclass(frozen=True)
class StepParts:
    """Hardware seconds of each step and its parts (arrays of length ``n_steps``).

    ``prefill_s = max(prefill_compute_s, prefill_memory_s)`` and likewise for
    decode; ``hardware_s`` combines them by the mixed-step rule.
    """

    prefill_compute_s: np.ndarray
    prefill_memory_s: np.ndarray
    decode_compute_s: np.ndarray
    decode_memory_s: np.ndarray
    prefill_s: np.ndarray
    decode_s: np.ndarray
    hardware_s: np.ndarray
    non_empty: np.ndarray


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero to int64 (Go's ``math.Round``; not banker's rounding).

    >>> round_half_away(np.array([0.5, 1.5, 2.5, -0.5])).tolist()
    [1, 2, 3, -1]
    """
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def prefill_bucket(seq: np.ndarray) -> np.ndarray:
    """Smallest of 512, 1024, ..., 65536 that is >= ``seq``, capped at 65536.

    >>> prefill_bucket(np.array([1, 512, 513, 3000, 10**6])).tolist()
    [512, 512, 1024, 4096, 65536]
    """
    seq = np.maximum(np.asarray(seq, dtype=np.int64), 1)
    exp = np.ceil(np.log2(seq)).astype(np.int64)
    # guard against float log2 error at exact powers of two
    exp = np.where((1 << np.maximum(exp - 1, 0)) >= seq, exp - 1, exp)
    return np.clip(1 << np.clip(exp, 0, 62), _BUCKET_MIN, _BUCKET_MAX)


def dynamic_bytes(model: ModelSpec, pi: np.ndarray, n: np.ndarray) -> np.ndarray:
    """KV write + discounted KV read + discounted activations of one entry (spec §3.1).

    The discounts key on ``n == 1`` (0.80 / 0.75), not on the phase (0.92 / 0.85 otherwise).
    """
    pi = np.asarray(pi, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    one = n == 1
    k_tok = float(model.kv_bytes_per_token)
    kv_read = k_tok * pi * np.where(one, 0.80, 0.92)
    act = model.num_layers * model.hidden_size * model.dtype_bytes * n * np.where(one, 0.75, 0.85)
    return k_tok * n + kv_read + act


def _gemm_shapes(model: ModelSpec) -> list[tuple[int, int]]:
    d, dkv, dff = model.hidden_size, model.kv_dim, model.intermediate_size
    return [(d, d), (d, dkv), (d, dkv), (d, d), (d, dff), (d, dff), (dff, d)]


def _scaled(mfu: np.ndarray, scale: float, floor: float) -> np.ndarray:
    return np.maximum(np.minimum(mfu * scale, 1.0), floor)


def _gemm_time(M: np.ndarray, model, mfu_db, opts: PhysicsOptions, flops: float, bw: float, s: float) -> np.ndarray:
    """``G(M) = L * s * sum over the 7 GEMMs of t(M, K, N)``; ``G(0) = 0``."""
    M = np.asarray(M, dtype=np.float64)
    total = np.zeros_like(M)
    live = M > 0
    if not live.any():
        return total
    m = M[live]
    acc = np.zeros_like(m)
    for k, n in _gemm_shapes(model):
        mfu = _scaled(mfu_db.gemm_mfu(m, k, n, rule=opts.mfu_rule), opts.gemm_mfu_scale, opts.mfu_floor)
        t = 2.0 * m * k * n / (flops * mfu)
        if opts.gemm_weight_floor:
            t = np.maximum(t, k * n * model.dtype_bytes / bw)
        acc += t
    total[live] = model.num_layers * s * acc
    return total


def hardware_time(batch: StepBatch, *, model: ModelSpec, hardware: HardwareSpec, mfu, tp: int,
                  options: PhysicsOptions | None = None) -> StepParts:
    """Hardware seconds of every step of ``batch`` under the v2 model.

    Parameters
    ----------
    batch : StepBatch
        The steps.
    model, hardware : ModelSpec, HardwareSpec
        What runs, and on what.
    mfu : MFUDatabase
        MFU tables (``calib.specs.mfu.load_mfu``).
    tp : int
        Tensor-parallel degree (>= 1); compute and bytes scale as 1/TP.
    options : PhysicsOptions, optional
        Variant switches and constants; default v2.3.

    Examples
    --------
    The decode step of spec §7.2 (Llama-2-7B, TP 1, context 1000), without overhead:

    >>> from calib.specs import load_model, load_hardware, load_mfu
    >>> parts = hardware_time(StepBatch.single(decode=[1000]), model=load_model("llama-2-7b-hf"),
    ...                       hardware=load_hardware("h100"), mfu=load_mfu("h100"), tp=1)
    >>> round(float(parts.decode_memory_s[0]) * 1e6, 1)
    4867.9
    """
    opts = options or PhysicsOptions()
    if opts.variant == "v3":
        raise ConfigError("the v3 roofline is calib.physics.roofline_v3.hardware_time_v3", field="variant")
    if isinstance(tp, bool) or int(tp) != tp or tp < 1:
        raise ConfigError(f"must be an integer >= 1, got {tp!r}", field="tp")
    tp = int(tp)
    s = 1.0 / tp
    flops = hardware.flops_peak
    bw = hardware.bw_peak * (opts.bw_efficiency if opts.bw_efficiency is not None else hardware.bw_efficiency)
    L, nH, dh = model.num_layers, model.num_heads, model.head_dim
    weights = float(model.weight_params_per_layer) * L * model.dtype_bytes
    key = mfu.attention_key(*model.attention_shape)
    n_steps = batch.n_steps
    zeros = np.zeros(n_steps)

    # ---- decode phase -------------------------------------------------------
    q = batch.decode_count
    has_d = q > 0
    d_gemm = _gemm_time(q, model, mfu, opts, flops, bw, s)
    d_attn = zeros.copy()
    if batch.decode_step.size:
        dpi = batch.decode_pi.astype(np.float64)
        if opts.decode_attention == "max_context":
            max_pi = np.zeros(n_steps)
            np.maximum.at(max_pi, batch.decode_step, dpi)
            idx = np.flatnonzero(has_d)
            m = mfu.decode_mfu(key, tp, q[idx], max_pi[idx], rule=opts.mfu_rule, tp_fallback=opts.tp_fallback)
            m = _scaled(m, opts.decode_attention_mfu_scale, opts.mfu_floor)
            f = 4.0 * nH * dh * q[idx] * max_pi[idx] * L
            d_attn[idx] = f / (flops * m) * s
        else:
            f_r = 4.0 * nH * dh * dpi * L
            m_r = mfu.decode_mfu(key, tp, q[batch.decode_step], dpi, rule=opts.mfu_rule, tp_fallback=opts.tp_fallback)
            m_r = _scaled(m_r, opts.decode_attention_mfu_scale, opts.mfu_floor)
            f_sum = np.bincount(batch.decode_step, weights=f_r, minlength=n_steps)
            fm_sum = np.bincount(batch.decode_step, weights=f_r * m_r, minlength=n_steps)
            ok = fm_sum > 0
            d_attn[ok] = f_sum[ok] ** 2 / (flops * fm_sum[ok]) * s  # (sum f) / (P * sum(f m)/sum f)
    d_compute = d_gemm + d_attn
    d_dyn = np.bincount(batch.decode_step, weights=dynamic_bytes(model, batch.decode_pi, 1), minlength=n_steps)
    d_memory = np.where(has_d, (weights * s + d_dyn * s) / bw, 0.0)
    d_time = np.maximum(d_compute, d_memory)

    # ---- prefill phase (bucketed) -------------------------------------------
    p = batch.prefill_tokens
    has_p = batch.prefill_count > 0
    p_compute = zeros.copy()
    p_attn_total = zeros.copy()
    if batch.prefill_step.size:
        ppi, pn = batch.prefill_pi, batch.prefill_n
        bucket = prefill_bucket(ppi + pn)
        group_key = batch.prefill_step * 64 + np.log2(bucket).astype(np.int64)
        groups, inverse = np.unique(group_key, return_inverse=True)
        g_step = groups // 64
        g_bucket = (1 << (groups % 64)).astype(np.float64)
        g_tokens = np.bincount(inverse, weights=pn.astype(np.float64))
        if opts.prefill_attention == "bucket":
            g_flops = 4.0 * nH * dh * g_tokens * g_bucket * L
        else:
            g_flops = np.bincount(inverse, weights=4.0 * nH * dh * pn * (ppi + pn).astype(np.float64) * L)
        m = _scaled(mfu.prefill_mfu(key, g_bucket, rule=opts.mfu_rule), opts.prefill_attention_mfu_scale,
                    opts.mfu_floor)
        g_attn = g_flops / CAUSAL_DIVISOR / (flops * m) * s
        g_compute = _gemm_time(g_tokens, model, mfu, opts, flops, bw, s) + g_attn
        p_compute = np.bincount(g_step, weights=g_compute, minlength=n_steps)
        p_attn_total = np.bincount(g_step, weights=g_attn, minlength=n_steps)
    p_dyn = np.bincount(batch.prefill_step, weights=dynamic_bytes(model, batch.prefill_pi, batch.prefill_n),
                        minlength=n_steps)
    p_memory = np.where(has_p, (weights * s + p_dyn * s) / bw, 0.0)
    p_time = np.maximum(p_compute, p_memory)

    # ---- combine ------------------------------------------------------------
    mixed = has_p & has_d
    hw = np.where(has_p, p_time, d_time)
    if mixed.any():
        pm, qm = p[mixed].astype(np.float64), q[mixed].astype(np.float64)
        pt, dt = p_time[mixed], d_time[mixed]
        if opts.mixed_rule == "weighted":
            hw_m = np.where(
                (pm > 4 * qm) & (pm > 100),
                0.75 * pt + 0.25 * dt,
                np.where((qm > 2 * pm) & (qm > 50), 0.35 * pt + 0.65 * dt, (pm * pt + qm * dt) / (pm + qm)),
            )
        elif opts.mixed_rule == "max":
            hw_m = np.maximum(pt, dt)
        else:  # additive: one GEMM pass over all tokens, both attentions, one weight load
            compute = _gemm_time(pm + qm, model, mfu, opts, flops, bw, s) + p_attn_total[mixed] + d_attn[mixed]
            memory = (weights * s + (p_dyn[mixed] + d_dyn[mixed]) * s) / bw
            hw_m = np.maximum(compute, memory)
        hw[mixed] = hw_m
    return StepParts(p_compute, p_memory, d_compute, d_memory, p_time, d_time, hw, has_p | has_d)


def step_time_us(parts: StepParts, overhead_us: float | np.ndarray = 0.0, *, min_step_us: float = 0.0,
                 overlap: bool = False) -> np.ndarray:
    """Integer µs per step: ``round_half_away(hardware_s * 1e6 + overhead)``; empty steps are 0.

    ``min_step_us`` floors non-empty steps (v2.4 uses 1 µs).  ``overlap``: the
    overhead (CPU) runs beside the hardware (GPU) time, so a step lasts
    ``max(hardware, overhead)`` (``replay.cpu_overlap``: a step that follows
    another under async scheduling).
    """
    hw, ovh = parts.hardware_s * 1e6, np.asarray(overhead_us, dtype=np.float64)
    raw = round_half_away(np.maximum(hw, ovh) if overlap else hw + ovh)
    if min_step_us > 0:
        raw = np.maximum(raw, int(np.ceil(min_step_us)))
    return np.where(parts.non_empty, raw, 0)
