"""The v3 roofline step-time model (``roofline-spec.md`` §5.3), vectorised over steps.

v3 is the model on the reference simulator's ``main`` since 2026-03-10: one
forward pass per step, constant MFUs, raw peak bandwidth, a 2-matrix MLP, MoE
awareness and a **single crossover** ``max(Σ compute, Σ memory)`` over the whole
step.  It has no overheads; callers add their overhead model on top (as with
:func:`calib.physics.roofline.hardware_time`).

Formulas (``s = 1/TP``; every sum is over the entries of one step)
---------------------------------------------------------------
FLOPs of one entry with progress index ``PI`` and ``n`` new tokens (decode: ``n = 1``),
with mean causal context ``c = PI`` if ``n == 1`` else ``PI + (n - 1)/2`` (spec §5.1)::

    F(PI, n) = L [2n(d² + 2 d dkv) + 2n d² + 4 nH n c dh]          # QKV, O, QKᵀ/AV
             + L [5 nH n c + 2 n d]                                  # vector: softmax + RoPE
             + n · M_tok                                             # MLP, 2 matrices
    M_tok    = 2·2·d · [L_moe (k dff_moe + dff_shared) + L_dense dff_dense]

    compute_s = s · [Σ_prefill F / (P mfu_prefill) + Σ_decode F(PI, 1) / (P mfu_decode)]

**Vector FLOPs run at the phase MFU**, not at ``0.10·P`` as in v1: v3 adds them
to the GEMM-class FLOPs and divides the total by ``P·mfu``.  This is the
reading that reproduces spec §7.4 exactly (prefill 512: 11,730.6 µs; charging
the vector part at ``0.10·P`` would give 11,736.9 µs).

Bytes::

    W₂(B)  = b · [L (d(d + 2 dkv) + d²) + L_dense · 2 d dff_dense
                  + L_moe · (2 d dff_moe · n_eff(B) + 2 d dff_shared)]
    n_eff(B) = N (1 - ((N - k)/N)^B)   (0 when B = 0; N when k >= N)
    dyn(PI, n) = k_tok n + k_tok PI + L d b n       (v1: no discounts)
    memory_s = s · [W₂(B) + Σ dyn] / (BwPeak · bw_efficiency)

``B`` is the number of new tokens of the whole step (prefill tokens + decode
count); the weights are loaded **once per step**, also in a mixed step.
``bw_efficiency`` is ``options.bw_efficiency`` when set, else 1.0 (raw peak; the
hardware's v2 default is *not* used).  ``P`` is the FP8 peak
(``hardware.tflops_fp8``) when ``model.dtype_bytes == 1`` and that field is > 0,
else the dense peak.

Step: ``hardware_s = max(compute_s, memory_s)``; an empty step is 0.

MoE layer count
---------------
Dense model: ``L_moe = 0``, ``L_dense = L``.  MoE model (``num_experts > 0``):
all ``L`` layers are MoE unless ``moe_layer_step = s > 1``, in which case
``L_moe = L // (s + 1)`` (integer division, as the reference's
``numMoELayers = int(nLayers) / (step + 1)``) and ``L_dense = L - L_moe``; the
dense layers use ``dense_intermediate_size`` (HF ``intermediate_size_mlp``).
Note: the reference applies ``L // (s + 1)`` for every ``s > 0``, so for
``interleave_moe_layer_step = 1`` (Llama-4 Scout) it counts ``L // 2`` MoE
layers; here ``s <= 1`` means "every layer is MoE", following the
:class:`~calib.specs.model.ModelSpec` contract.  No shipped model is interleaved.

Shared experts (``shared_expert_intermediate_size > 0``) add ``2·2·d·dff_shared``
FLOPs per token and ``2·d·dff_shared`` weights per MoE layer, always loaded (no
``n_eff``).  The reference v3 code parses the shared width but does not use it
in the roofline; for models without shared experts (all shipped ones) both agree.

Phase parts
-----------
v3 has one crossover, so the per-phase fields of :class:`StepParts` are a
decomposition, not separate rooflines:

- ``prefill_compute_s`` / ``decode_compute_s``: that phase's FLOP time; they sum
  to ``compute_s``.
- ``prefill_memory_s`` / ``decode_memory_s``: that phase's dynamic bytes plus a
  share of ``W₂(B)`` proportional to its new tokens (``p/B`` and ``q/B``); they
  sum to ``memory_s``.  A pure step's phase carries all the weights.
- ``prefill_s``, ``decode_s``: ``max`` of the phase's two parts (0 if absent).
- ``hardware_s = max(Σ compute, Σ memory)``, which in a mixed step lies between
  ``max(prefill_s, decode_s)`` and ``prefill_s + decode_s``.
"""

from __future__ import annotations

import numpy as np

from calib.errors import ConfigError
from calib.physics.batch import StepBatch
from calib.physics.options import PhysicsOptions
from calib.physics.roofline import StepParts
from calib.specs.hardware import HardwareSpec
from calib.specs.model import ModelSpec

__all__ = ["hardware_time_v3", "moe_layer_counts", "effective_experts", "flops_v3", "decode_flops_terms",
           "weight_bytes_v3", "dynamic_bytes_v3", "peak_flops_v3"]


def moe_layer_counts(model: ModelSpec) -> tuple[int, int]:
    """``(L_moe, L_dense)``: MoE and dense layer counts of the v3 model.

    Examples
    --------
    >>> from calib.specs import load_model
    >>> moe_layer_counts(load_model("mixtral-8x7b-v0.1")), moe_layer_counts(load_model("llama-2-7b-hf"))
    ((32, 0), (0, 32))
    """
    L = model.num_layers
    if not model.is_moe:
        return 0, L
    step = model.moe_layer_step
    if step > 1:
        moe = L // (step + 1)
        return moe, L - moe
    return L, 0


def effective_experts(model: ModelSpec, tokens) -> np.ndarray:
    """Expected distinct routed experts loaded for ``tokens`` new tokens: ``N (1 - ((N - k)/N)^B)``.

    Zero tokens load no expert; ``k >= N`` loads all ``N``.  Dense models give 0.

    Examples
    --------
    >>> from calib.specs import load_model
    >>> effective_experts(load_model("mixtral-8x7b-v0.1"), [0, 1, 2]).tolist()
    [0.0, 2.0, 3.5]
    """
    B = np.asarray(tokens, dtype=np.float64)
    N, k = model.num_experts, model.experts_per_token
    if N <= 0:
        return np.zeros_like(B)
    frac = np.ones_like(B) if k >= N else 1.0 - np.power((N - k) / N, B)
    return np.where(B > 0, N * frac, 0.0)


def _mlp_widths(model: ModelSpec) -> tuple[float, float, float]:
    """MLP widths summed over layers: ``(active, routed, fixed)``.

    ``active = L_moe (k dff_moe + dff_shared) + L_dense dff_dense`` (FLOPs per token
    are ``2·2·d·active``); ``routed = L_moe dff_moe`` (weights scale with ``n_eff``);
    ``fixed = L_moe dff_shared + L_dense dff_dense`` (always loaded).
    """
    l_moe, l_dense = moe_layer_counts(model)
    routed = float(l_moe) * model.moe_intermediate_size if l_moe else 0.0
    shared = float(l_moe) * model.shared_expert_intermediate_size if l_moe else 0.0
    dense = float(l_dense) * model.dense_intermediate_size
    active = routed * model.experts_per_token + shared + dense
    return active, routed, shared + dense


def flops_v3(model: ModelSpec, pi, n) -> np.ndarray:
    """FLOPs ``F(PI, n)`` of entries (whole model, before the 1/TP split): GEMM-class + vector.

    Examples
    --------
    >>> from calib.specs import load_model
    >>> f = flops_v3(load_model("llama-2-7b-hf"), [0], [512])
    >>> round(float(f[0]) / (989.5e12 * 0.45) * 1e6, 1)   # spec §7.4 prefill compute, µs
    11730.6
    """
    pi = np.asarray(pi, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    L, d, nH, dh, dkv = model.num_layers, float(model.hidden_size), model.num_heads, model.head_dim, model.kv_dim
    c = np.where(n == 1, pi, pi + (n - 1) / 2.0)
    attn_proj = 2.0 * n * (d * d + 2.0 * d * dkv) + 2.0 * n * d * d
    attn_core = 4.0 * nH * n * c * dh
    vector = 5.0 * nH * n * c + 2.0 * n * d
    active_width, _, _ = _mlp_widths(model)
    mlp = 2.0 * n * 2.0 * d * active_width  # already summed over layers
    return L * (attn_proj + attn_core + vector) + mlp


def decode_flops_terms(model: ModelSpec) -> tuple[int, int]:
    """``(F0, F1)`` with ``F(PI, 1) = F0 + F1 PI``: the FLOPs of a decode entry are affine in its context.

    Exact integers (every term of :func:`flops_v3` is a whole number for ``n = 1``), so the
    FLOPs of ``q`` decode entries of summed context ``S`` are exactly ``q F0 + F1 S``: a
    decode-only v3 step depends on its entries only through ``(q, Σ PI)``.

    Examples
    --------
    >>> from calib.specs import load_model
    >>> m = load_model("mixtral-8x7b-v0.1")
    >>> f0, f1 = decode_flops_terms(m)
    >>> float(f0 + f1 * 1000) == float(flops_v3(m, [1000], [1])[0])
    True
    """
    L, d, nH, dh, dkv = model.num_layers, model.hidden_size, model.num_heads, model.head_dim, model.kv_dim
    active, _, _ = _mlp_widths(model)
    f0 = L * (2 * (d * d + 2 * d * dkv) + 2 * d * d + 2 * d) + 4 * d * int(active)
    f1 = L * (4 * nH * dh + 5 * nH)
    return f0, f1


def weight_bytes_v3(model: ModelSpec, tokens) -> np.ndarray:
    """Weight bytes ``W₂(B)`` loaded by a step with ``B`` new tokens (whole model, before 1/TP).

    Examples
    --------
    >>> from calib.specs import load_model
    >>> int(weight_bytes_v3(load_model("llama-2-7b-hf"), [1])[0])   # 2-matrix MLP
    10066329600
    """
    B = np.asarray(tokens, dtype=np.float64)
    L, d, dkv = model.num_layers, float(model.hidden_size), model.kv_dim
    attn = L * (d * (d + 2.0 * dkv) + d * d)
    _, routed, fixed = _mlp_widths(model)
    params = attn + 2.0 * d * fixed + 2.0 * d * routed * effective_experts(model, B)
    return params * model.dtype_bytes


def dynamic_bytes_v3(model: ModelSpec, pi, n) -> np.ndarray:
    """v1 dynamic bytes of entries: KV write ``k_tok n`` + KV read ``k_tok PI`` + activations ``L d b n``."""
    pi = np.asarray(pi, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    k_tok = float(model.kv_bytes_per_token)
    return k_tok * n + k_tok * pi + float(model.num_layers * model.hidden_size * model.dtype_bytes) * n


def peak_flops_v3(model: ModelSpec, hardware: HardwareSpec) -> float:
    """FP8 peak when the weights are 1 byte and the hardware declares one; else the dense peak.

    Examples
    --------
    >>> from calib.specs import load_model, load_hardware
    >>> peak_flops_v3(load_model("llama-2-7b-hf"), load_hardware("h100"))
    989500000000000.0
    """
    if model.dtype_bytes == 1 and hardware.tflops_fp8 > 0:
        return hardware.tflops_fp8 * 1e12
    return hardware.flops_peak


def hardware_time_v3(batch: StepBatch, *, model: ModelSpec, hardware: HardwareSpec, tp: int,
                     options: PhysicsOptions | None = None) -> StepParts:
    """Hardware seconds of every step of ``batch`` under the v3 model (module docstring has the formulas).

    Parameters
    ----------
    batch : StepBatch
        The steps.
    model, hardware : ModelSpec, HardwareSpec
        What runs, and on what.
    tp : int
        Tensor-parallel degree (>= 1); FLOPs, weights and dynamic bytes all scale as 1/TP.
    options : PhysicsOptions, optional
        Uses ``mfu_prefill``, ``mfu_decode`` and ``bw_efficiency`` (``None`` -> 1.0,
        raw peak); default ``PhysicsOptions.for_variant("v3")``.

    Returns
    -------
    StepParts
        ``hardware_s = max(Σ compute, Σ memory)`` per step, no overheads; the phase
        fields are the decomposition described in the module docstring.

    Examples
    --------
    The two steps of spec §7.4 (Llama-2-7B, H100, TP 1):

    >>> from calib.specs import load_model, load_hardware
    >>> kw = dict(model=load_model("llama-2-7b-hf"), hardware=load_hardware("h100"), tp=1)
    >>> d = hardware_time_v3(StepBatch.single(decode=[1000]), **kw)
    >>> round(float(d.hardware_s[0]) * 1e6, 1), round(float(d.decode_memory_s[0]) * 1e6, 1)
    (3161.6, 3161.6)
    >>> p = hardware_time_v3(StepBatch.single(prefill=[(0, 512)]), **kw)
    >>> round(float(p.hardware_s[0]) * 1e6, 1), round(float(p.prefill_compute_s[0]) * 1e6, 1)
    (11730.6, 11730.6)
    """
    opts = options or PhysicsOptions.for_variant("v3")
    if isinstance(tp, bool) or int(tp) != tp or tp < 1:
        raise ConfigError(f"must be an integer >= 1, got {tp!r}", field="tp")
    s = 1.0 / int(tp)
    peak = peak_flops_v3(model, hardware)
    bw = hardware.bw_peak * (opts.bw_efficiency if opts.bw_efficiency is not None else 1.0)
    n_steps = batch.n_steps

    # ---- compute: per-entry FLOPs at the phase MFU ---------------------------
    p_flops = np.bincount(batch.prefill_step, weights=flops_v3(model, batch.prefill_pi, batch.prefill_n),
                          minlength=n_steps)
    d_flops = np.bincount(batch.decode_step, weights=flops_v3(model, batch.decode_pi, np.ones(batch.decode_pi.shape)),
                          minlength=n_steps)
    p_compute = p_flops * s / (peak * opts.mfu_prefill)
    d_compute = d_flops * s / (peak * opts.mfu_decode)

    # ---- memory: one weight load per step + v1 dynamic bytes -----------------
    p_tok = batch.prefill_tokens.astype(np.float64)
    q = batch.decode_count.astype(np.float64)
    tokens = p_tok + q
    weights = weight_bytes_v3(model, tokens)
    p_dyn = np.bincount(batch.prefill_step, weights=dynamic_bytes_v3(model, batch.prefill_pi, batch.prefill_n),
                        minlength=n_steps)
    d_dyn = np.bincount(batch.decode_step, weights=dynamic_bytes_v3(model, batch.decode_pi, 1.0),
                        minlength=n_steps)
    share_p = np.divide(p_tok, tokens, out=np.zeros(n_steps), where=tokens > 0)
    share_d = np.divide(q, tokens, out=np.zeros(n_steps), where=tokens > 0)
    p_memory = (weights * share_p + p_dyn) * s / bw
    d_memory = (weights * share_d + d_dyn) * s / bw

    compute = p_compute + d_compute
    memory = (weights + p_dyn + d_dyn) * s / bw
    non_empty = batch.non_empty
    hw = np.where(non_empty, np.maximum(compute, memory), 0.0)
    return StepParts(p_compute, p_memory, d_compute, d_memory, np.maximum(p_compute, p_memory),
                     np.maximum(d_compute, d_memory), hw, non_empty)
