"""The v4 "physical" step model: every kernel of the forward pass is a roofline plus a fixed cost.

v4 replaces the v2 MFU-table lookups and the v3 whole-step crossover with the
forms the measured H100 kernels support (``kernel-evidence.md``):

- **per-GEMM roofline at the sharded shape**: a GEMM of ``M`` rows, inner
  size ``K`` and ``N`` columns (the shard one GPU runs, so ``N`` or ``K`` is
  divided by TP) takes ``max(2MKN / (P m), b (KN + MK + MN) / (BW e)) + f``:
  decode GEMMs are weight-bound by construction (no MFU rule decides it), prefill
  GEMMs run at the compute efficiency ``m``, and ``f`` is the fixed cost of a
  kernel (``kernel_floor_us``; measured 3-5 µs at the kernels' knee);
- a **gated (three-matrix) MLP**, as Llama, Qwen and Mixtral have;
- **element-wise kernels** (the two fused add+RMSNorm, rotary embedding, SiLU-and-mul),
  bandwidth-bound on their activations, each with the fixed cost;
- **attention** as one kernel per layer (fixed cost) with separate efficiencies:
  prefill attention is compute-bound (``prefill_attention_mfu``; FLOPs of the
  causal ``QKᵀ`` and ``AV`` over ``PI + (n + 1)/2`` keys per new token), decode
  attention reads every request's KV cache at ``decode_attention_efficiency`` of
  the peak bandwidth;
- **tensor-parallel all-reduce** (TP > 1): two per layer, each ``allreduce_us`` plus
  the ring's ``2 (TP - 1)/TP`` of the activations over the GPU link
  (``HardwareSpec.link_bw_gbs``; no link bandwidth given: latency only);
- the **LM head** on one row per sequence of the step (vLLM computes logits for
  the last token of each scheduled request only);
- **mixture of experts** (Mixtral): ``n_eff(B)`` experts are loaded, each running
  ``B k / n_eff`` of the step's ``B`` tokens, in one fused kernel per expert matrix.

One forward pass per step: prefill chunks and decodes share the GEMMs
(``M = p + q`` rows); their attention parts add.  Per step, with ``q`` decodes of
summed context ``S`` and prefill entries ``(PI, n)``::

    hardware_s = fixed(M) + lm_head(n_seq) + prefill_attention(entries) + decode_attention(q, S)

``fixed`` (GEMMs, element-wise kernels, all-reduce, the attention kernel's fixed
cost) depends only on ``M = p + q``, ``lm_head`` only on ``n_seq``, and decode
attention is linear in ``(q, S)``: a decode-only step depends on its entries only
through ``(q, S)``, which is what the replay's fast path keeps
(:mod:`calib.physics.fast`, kind ``"v4"``).  :class:`V4Terms` holds these terms
once; :func:`hardware_time_v4` (vectorised over steps) and the fast path both
evaluate them, with the same float operations.

Not modelled (by choice, see docs/choices.md): the embedding lookup, sampling
and the CPU-side costs (the overhead models and the client terms of the
settings carry those), pipeline parallelism, quantised weights' dequantisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calib.errors import ConfigError
from calib.physics.batch import StepBatch
from calib.physics.options import PhysicsOptions
from calib.physics.roofline import StepParts
from calib.specs.hardware import HardwareSpec
from calib.specs.model import ModelSpec

__all__ = ["V4Terms", "hardware_time_v4", "gemm_shapes"]

#: Row count at which the ``table`` MFU source reads a GEMM's compute-bound MFU.
TABLE_MFU_ROWS = 4096
#: Element-wise kernels per layer: two fused add+RMSNorm, rotary embedding, SiLU-and-mul.
ELEMENTWISE_KERNELS = 4


def gemm_shapes(model: ModelSpec, tp: int) -> dict[str, tuple[float, float]]:
    """``(K, N)`` of each GEMM one GPU runs per layer (sharded by ``tp``), by name.

    Dense layers: ``qkv`` and ``up`` (gate and up fused) are column-parallel
    (``N / TP``), ``o`` and ``down`` row-parallel (``K / TP``).  MoE models: ``up`` and
    ``down`` are one expert's matrices, ``router`` the gate.

    Examples
    --------
    >>> from calib.specs import load_model
    >>> gemm_shapes(load_model("llama-2-7b-hf"), 2)["up"]
    (4096.0, 11008.0)
    """
    d, dh = float(model.hidden_size), float(model.head_dim)
    q_dim, kv_dim = model.num_heads * dh, float(model.kv_dim)
    ff = float(model.moe_intermediate_size if model.is_moe else model.intermediate_size)
    shapes = {"qkv": (d, (q_dim + 2.0 * kv_dim) / tp), "o": (q_dim / tp, d),
              "up": (d, 2.0 * ff / tp), "down": (ff / tp, d)}
    if model.is_moe:
        shapes["router"] = (d, float(model.num_experts))
    return shapes


@dataclass(frozen=True)
class V4Terms:
    """The constants of the v4 model for one (model, hardware, TP, options), and its four terms.

    Every method works on floats and on NumPy arrays with the same float operations,
    so the vectorised model and the replay's scalar fast path agree bit for bit.

    Examples
    --------
    >>> from calib.specs import load_model, load_hardware
    >>> t = V4Terms.build(load_model("llama-2-7b-hf"), load_hardware("h100"), 1, PhysicsOptions.for_variant("v4"))
    >>> fixed = float(t.fixed_s(np.array([1.0]))[0])
    >>> 0.003 < fixed < 0.006    # one decode token: the 6.5 GB of layer weights at ~2.9 TB/s + fixed costs
    True
    """

    L: int
    peak: float        # FLOP/s
    bw: float          # B/s for GEMMs and element-wise kernels
    bw_decode: float   # B/s for decode attention
    floor_s: float
    gemm_mfu: dict     # GEMM name -> compute efficiency
    shapes: dict       # GEMM name -> (K, N)
    b: float           # bytes per element
    elem_bytes: float  # element-wise bytes per token per layer
    tp: int
    allreduce_s: float
    allreduce_byte_s: float  # seconds per token of one all-reduce's bandwidth part
    vocab: float
    d: float
    attn_flops: float  # 4 h dh: attention FLOPs per (new token x key) per layer
    attn_kv: float     # KV bytes per key per layer (2 hk dh b)
    attn_q: float      # Q-in + O-out bytes per new token per layer (2 h dh b)
    prefill_mfu: float
    n_experts: int
    top_k: int

    @classmethod
    def build(cls, model: ModelSpec, hardware: HardwareSpec, tp: int, options: PhysicsOptions,
              mfu_db=None) -> "V4Terms":
        if isinstance(tp, bool) or int(tp) != tp or tp < 1:
            raise ConfigError(f"must be an integer >= 1, got {tp!r}", field="tp")
        tp = int(tp)
        o = options
        peak = hardware.tflops_fp8 * 1e12 if model.dtype_bytes == 1 and hardware.tflops_fp8 > 0 else hardware.flops_peak
        bw_eff = o.bw_efficiency if o.bw_efficiency is not None else hardware.bw_efficiency
        shapes = gemm_shapes(model, tp)
        if o.gemm_mfu_source == "table":
            if mfu_db is None:
                raise ConfigError("the table MFU source needs an MFU table", field="gemm_mfu_source")
            mfu = {name: min(1.0, float(mfu_db.gemm_mfu(np.array([TABLE_MFU_ROWS], dtype=np.float64), int(round(k)),
                                                        int(round(n)), rule="interp")[0]) * o.gemm_mfu_scale)
                   for name, (k, n) in shapes.items()}
            if min(mfu.values()) <= 0:
                raise ConfigError("the MFU table gives 0 for a GEMM of this model", field="gemm_mfu_source")
        else:
            mfu = {name: o.gemm_mfu for name in shapes}
        d, dh, b = float(model.hidden_size), float(model.head_dim), float(model.dtype_bytes)
        h, hk = model.num_heads / tp, model.num_kv_heads / tp
        ff_tok = float(model.moe_intermediate_size * model.experts_per_token if model.is_moe
                       else model.intermediate_size)
        elem = b * (8.0 * d + 2.0 * (h + hk) * dh + 3.0 * ff_tok / tp)
        link = hardware.link_bw_gbs * 1e9
        ar_bytes = 2.0 * (tp - 1) / tp * d * b if tp > 1 else 0.0
        return cls(
            L=model.num_layers, peak=peak, bw=hardware.bw_peak * bw_eff,
            bw_decode=hardware.bw_peak * o.decode_attention_efficiency, floor_s=o.kernel_floor_us * 1e-6,
            gemm_mfu=mfu, shapes=shapes, b=b, elem_bytes=elem, tp=tp,
            allreduce_s=o.allreduce_us * 1e-6 if tp > 1 else 0.0,
            allreduce_byte_s=ar_bytes / link if link > 0 else 0.0,
            vocab=float(model.vocab_size), d=d, attn_flops=4.0 * h * dh, attn_kv=2.0 * hk * dh * b,
            attn_q=2.0 * h * dh * b, prefill_mfu=o.prefill_attention_mfu,
            n_experts=model.num_experts, top_k=model.experts_per_token)

    # ---- the terms ---------------------------------------------------------------------------

    def gemm_s(self, M, K: float, N: float, mfu: float):
        """One GEMM of ``M`` rows (> 0): ``max(compute, bytes) + floor`` seconds."""
        compute = 2.0 * M * K * N / (self.peak * mfu)
        memory = self.b * (K * N + M * K + M * N) / self.bw
        return np.maximum(compute, memory) + self.floor_s

    def fixed_s(self, M: np.ndarray) -> np.ndarray:
        """Seconds of everything that depends only on the step's ``M`` new tokens (0 for ``M = 0``)."""
        M = np.asarray(M, dtype=np.float64)
        mfu, sh = self.gemm_mfu, self.shapes
        layer = self.gemm_s(M, *sh["qkv"], mfu["qkv"]) + self.gemm_s(M, *sh["o"], mfu["o"])
        if self.n_experts:
            E = float(self.n_experts)
            n_eff = E if self.top_k >= self.n_experts else E * (1.0 - np.power((E - self.top_k) / E, M))
            rows = M * self.top_k / np.maximum(n_eff, 1.0)
            layer = layer + self.gemm_s(M, *sh["router"], mfu["router"])
            for name in ("up", "down"):
                layer = layer + n_eff * (self.gemm_s(rows, *sh[name], mfu[name]) - self.floor_s) + self.floor_s
        else:
            layer = layer + self.gemm_s(M, *sh["up"], mfu["up"]) + self.gemm_s(M, *sh["down"], mfu["down"])
        layer = layer + M * self.elem_bytes / self.bw + (ELEMENTWISE_KERNELS + 1) * self.floor_s  # + attention's
        if self.tp > 1:
            layer = layer + 2.0 * (self.allreduce_s + M * self.allreduce_byte_s)
        return np.where(M > 0, self.L * layer, 0.0)

    def lm_head_s(self, n_seq: np.ndarray) -> np.ndarray:
        """Seconds of the LM head on ``n_seq`` rows (one per sequence of the step; 0 without a vocabulary)."""
        n_seq = np.asarray(n_seq, dtype=np.float64)
        if self.vocab <= 0:
            return np.zeros_like(n_seq)
        return np.where(n_seq > 0, self.gemm_s(n_seq, self.d, self.vocab / self.tp, self.gemm_mfu["qkv"]), 0.0)

    def prefill_attention_parts(self, pi, n):
        """``(FLOPs, bytes)`` of prefill entries' attention per layer: causal keys ``PI + (n + 1)/2`` per new token."""
        pi = np.asarray(pi, dtype=np.float64)
        n = np.asarray(n, dtype=np.float64)
        flops = self.attn_flops * n * (pi + (n + 1.0) / 2.0)
        nbytes = self.attn_kv * (pi + n) + self.attn_q * n
        return flops, nbytes

    def prefill_attention_s(self, flops, nbytes):
        """Seconds of the prefill attention of a step from its summed per-layer FLOPs and bytes."""
        return self.L * np.maximum(flops / (self.peak * self.prefill_mfu), nbytes / self.bw)

    def decode_attention_s(self, q, keys):
        """Seconds of the decode attention of ``q`` requests reading ``keys = Σ (PI + 1)`` cached tokens."""
        return self.L * (self.attn_kv * keys + self.attn_q * q) / self.bw_decode

    @staticmethod
    def total_s(fixed, lm, prefill_attention, decode_attention):
        """The step's hardware seconds (one order of additions for every caller)."""
        return fixed + lm + prefill_attention + decode_attention


def hardware_time_v4(batch: StepBatch, *, model: ModelSpec, hardware: HardwareSpec, tp: int,
                     options: PhysicsOptions | None = None, mfu=None) -> StepParts:
    """Hardware seconds of every step of ``batch`` under the v4 model (module docstring).

    Returns
    -------
    StepParts
        ``hardware_s`` per step (no overheads).  ``prefill_compute_s`` /
        ``prefill_memory_s`` are the prefill attention's two roofline sides,
        ``decode_memory_s`` the decode attention, ``prefill_s`` / ``decode_s`` those
        attention times; the GEMM, element-wise, all-reduce and LM-head time is in
        ``hardware_s`` only.

    Examples
    --------
    >>> from calib.specs import load_model, load_hardware
    >>> kw = dict(model=load_model("llama-2-7b-hf"), hardware=load_hardware("h100"), tp=1,
    ...           options=PhysicsOptions.for_variant("v4"))
    >>> one = hardware_time_v4(StepBatch.single(decode=[1000]), **kw).hardware_s[0]
    >>> many = hardware_time_v4(StepBatch.single(decode=[1000] * 32), **kw).hardware_s[0]
    >>> 1.0 < many / one < 2.0     # 32 decodes cost far less than 32 times one: weight-bound
    True
    """
    opts = options or PhysicsOptions.for_variant("v4")
    t = V4Terms.build(model, hardware, tp, opts, mfu)
    n = batch.n_steps
    p_tok = batch.prefill_tokens.astype(np.float64)
    q = batch.decode_count.astype(np.float64)
    n_seq = batch.prefill_count.astype(np.float64) + q
    pf, pb = t.prefill_attention_parts(batch.prefill_pi, batch.prefill_n)
    pf = np.bincount(batch.prefill_step, weights=pf, minlength=n)
    pb = np.bincount(batch.prefill_step, weights=pb, minlength=n)
    keys = np.bincount(batch.decode_step, weights=batch.decode_pi.astype(np.float64) + 1.0, minlength=n)
    fixed = t.fixed_s(p_tok + q)
    lm = t.lm_head_s(n_seq)
    pa = np.where(p_tok > 0, t.prefill_attention_s(pf, pb), 0.0)
    da = t.decode_attention_s(q, keys)
    non_empty = batch.non_empty
    hw = np.where(non_empty, t.total_s(fixed, lm, pa, da), 0.0)
    zero = np.zeros(n)
    p_comp = np.where(p_tok > 0, t.L * pf / (t.peak * t.prefill_mfu), 0.0)
    p_mem = np.where(p_tok > 0, t.L * pb / t.bw, 0.0)
    return StepParts(p_comp, p_mem, zero, da, pa, da, hw, non_empty)
