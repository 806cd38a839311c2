"""Fast step times for replays: the v2 step model evaluated one step (or one decode run) at a time.

:func:`calib.physics.roofline.hardware_time` is vectorised over many steps,
but a continuous-batching replay needs the steps one by one (the next step's
batch depends on when the current one ends), and a ``hardware_time`` call on a
one-step batch costs milliseconds, mostly in MFU-table lookups.
:class:`FastSteps` evaluates the same formulas with cached MFUs:

* the GEMM time ``G(M)`` of the 7 projections, per integer ``M`` (rows grown in
  blocks, computed with roofline's own ``_gemm_time``);
* the scaled decode-attention MFU per ``(q, kv)`` (one row of kv values per
  decode count ``q``, filled in tiles of several ``q`` by one vectorised
  ``decode_mfu`` call, because each call has a fixed cost of a few ms);
* the scaled prefill-attention MFU per bucket.

A decode-only step under the v2.3 ``max_context`` rule depends only on
``(q, max PI, sum PI)``, so a run of ``k`` pure-decode steps (max and sum PI
growing by 1 and ``q`` per step) is a few array operations.  One mixed or
prefill step is a few dozen float operations in Python.

Exactness: every float operation is done in the same order as in
``hardware_time`` (Python floats and NumPy float64 round identically), so
results are bit-identical, except that the decode dynamic bytes of ``q > 1``
requests are summed in closed form ``k_tok q + 0.8 k_tok ΣPI + act q`` rather
than request by request (a difference of an ulp or so, far below the 1 µs
rounding of a step time).  Solo steps (``q <= 1``) are bit-identical.
Variants this module does not cover (v3) fall back to ``StepModel.parts``.
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np

from calib.physics.batch import StepBatch
from calib.physics.roofline import CAUSAL_DIVISOR, _gemm_time, _scaled

__all__ = ["FastSteps", "round_half_away_scalar"]

_BUCKETS = tuple(512 << i for i in range(8))  # 512 .. 65536
#: The PhysicsOptions fields this module implements; a step model with other fields falls back to
#: ``StepModel.parts`` rather than silently ignoring a new switch.
_KNOWN_OPTIONS = frozenset({
    "variant", "mfu_rule", "gemm_weight_floor", "decode_attention", "prefill_attention", "mixed_rule",
    "min_step_us", "tp_fallback", "bw_efficiency", "gemm_mfu_scale", "prefill_attention_mfu_scale",
    "decode_attention_mfu_scale", "mfu_floor", "mfu_prefill", "mfu_decode",
})
#: Queries per decode-MFU fill call (one call has a fixed cost of a few ms; ~0.5 µs per query on top).
_TILE = 16384
_KV_HINT_CAP = 1 << 17


def round_half_away_scalar(x: float) -> int:
    """Scalar :func:`calib.physics.roofline.round_half_away` (Go's ``math.Round``).

    >>> [round_half_away_scalar(v) for v in (0.5, 1.5, 2.5, -0.5, 0.0)]
    [1, 2, 3, -1, 0]
    """
    if x >= 0:
        return int(math.floor(x + 0.5))
    return -int(math.floor(-x + 0.5))


def _bucket(seq: int) -> int:
    """Scalar ``prefill_bucket``: smallest of 512, 1024, ..., 65536 that is >= seq (capped)."""
    b = 512
    while b < seq and b < 65536:
        b <<= 1
    return b


class FastSteps:
    """Cached, step-at-a-time evaluation of one :class:`~calib.physics.step_model.StepModel`.

    Get it as ``step_model.fast`` (one instance per step model, so caches are
    shared by every replay and overhead value that uses that step model).

    Parameters
    ----------
    step_model : StepModel
    plain_parts : bool
        ``step_model.parts`` is :meth:`StepModel.parts` itself (not overridden
        by a subclass), so the formulas here reproduce it.  ``StepModel.fast``
        sets it; ``False`` makes every call fall back to ``step_model.parts``.

    Attributes
    ----------
    scalar : bool
        The v2 formulas are evaluated here; otherwise every call falls back to
        ``step_model.parts`` (v3, unknown option fields, or a step model
        class that overrides ``parts``).
    aggregate : bool
        A decode-only step depends only on ``(q, max PI, sum PI)`` (the
        ``max_context`` decode-attention rule).

    Examples
    --------
    >>> from calib.physics import StepModel
    >>> sm = StepModel.build("llama-2-7b-hf", tp=1)
    >>> f = sm.fast
    >>> ref = float(sm.parts(StepBatch.single(decode=[1000])).hardware_s[0] * 1e6)
    >>> f.decode_hw_us(1, 1000, 1000) == ref
    True
    """

    def __init__(self, step_model, *, plain_parts: bool = False):
        self.step_model = step_model
        opts = step_model.options
        self.options = opts
        known = {f.name for f in fields(opts)} <= _KNOWN_OPTIONS
        self.plain_parts = bool(plain_parts)
        self.scalar = known and opts.variant in ("v2.3", "v2.4") and self.plain_parts
        self.aggregate = self.scalar and opts.decode_attention == "max_context"
        if not self.scalar:
            return
        model, hw, tp = step_model.model, step_model.hardware, step_model.tp
        self.model = model
        self.mfu = step_model.mfu
        self.s = 1.0 / tp
        self.flops = hw.flops_peak
        self.bw = hw.bw_peak * (opts.bw_efficiency if opts.bw_efficiency is not None else hw.bw_efficiency)
        self.L = model.num_layers
        self.c4 = 4.0 * model.num_heads * model.head_dim
        self.ws = float(model.weight_params_per_layer) * self.L * model.dtype_bytes * self.s
        self.k_tok = float(model.kv_bytes_per_token)
        self.ldb = model.num_layers * model.hidden_size * model.dtype_bytes
        self.act1 = (self.ldb * 1.0) * 0.75  # activations of a 1-token entry
        self.key = self.mfu.attention_key(*model.attention_shape)
        self._gemm = np.zeros(1)  # G(M) seconds for M in [0, len); G(0) = 0
        self._gemm_list = [0.0]
        self._rows: dict[int, np.ndarray] = {}  # q -> scaled decode MFU for kv in [0, len)
        self._comp: dict[int, np.ndarray] = {}  # q -> decode compute seconds G(q) + attention(q, kv) (max_context)
        self._solo: np.ndarray | None = None  # hardware µs of a batch-1 decode step at PI = index
        self._pmfu: dict[int, float] | None = None
        self._q_hint = 1
        self._kv_hint = 1024
        self._m_hint = 1024

    def __reduce__(self):  # pickles without its caches
        return (_rebuild, (self.step_model, self.plain_parts))

    # ------------------------------------------------------------------ caches

    def reserve(self, q_max: int = 1, kv_max: int = 1024, m_max: int = 1024) -> None:
        """Size hints for the caches: largest decode count, context and GEMM rows expected.

        Only shapes the fill tiles (fewer, larger lookups); never limits what can be asked.
        """
        self._q_hint = max(self._q_hint, int(q_max))
        self._kv_hint = max(self._kv_hint, min(int(kv_max) + 1, _KV_HINT_CAP))
        self._m_hint = max(self._m_hint, min(int(m_max) + 1, _KV_HINT_CAP))

    def gemm_s(self, M: int) -> float:
        """``G(M)``: seconds of the 7 GEMMs with ``M`` rows (0 for ``M = 0``)."""
        if M >= len(self._gemm_list):
            self._grow_gemm(M)
        return self._gemm_list[M]

    def _grow_gemm(self, M: int) -> None:
        have = len(self._gemm)
        size = -(-max(M + 1, self._m_hint, 2 * have) // 1024) * 1024
        sm = self.step_model
        new = _gemm_time(np.arange(have, size, dtype=np.float64), sm.model, self.mfu, self.options,
                         self.flops, self.bw, self.s)
        self._gemm = np.concatenate([self._gemm, new])
        self._gemm_list = self._gemm.tolist()

    def decode_mfu_row(self, q: int, kv_max: int) -> np.ndarray:
        """Scaled decode-attention MFU at batch size ``q`` for kv in ``[0, len)``, ``len > kv_max``."""
        row = self._rows.get(q)
        if row is None or kv_max >= len(row):
            self._grow_rows(q, kv_max)
            row = self._rows[q]
        return row

    def decode_compute_row(self, q: int, kv_max: int) -> np.ndarray:
        """Decode compute seconds ``G(q) + attention`` at max PI = index (``max_context``), ``len > kv_max``."""
        row = self._comp.get(q)
        if row is None or kv_max >= len(row):
            self._grow_rows(q, kv_max)
            row = self._comp[q]
        return row

    def _grow_rows(self, q: int, kv_max: int) -> None:
        size = -(-max(kv_max + 1, self._kv_hint) // 1024) * 1024
        per_call = max(1, _TILE // size)
        qs = [q] + [q2 for q2 in range(q + 1, min(q + per_call, self._q_hint + 1))
                    if len(self._rows.get(q2, ())) < size]
        starts = [len(self._rows.get(q2, ())) for q2 in qs]
        bs = np.concatenate([np.full(size - a, q2, dtype=np.int64) for q2, a in zip(qs, starts)])
        kv = np.concatenate([np.arange(a, size, dtype=np.float64) for a in starts])
        o = self.options
        m = _scaled(self.mfu.decode_mfu(self.key, self.step_model.tp, bs, kv, rule=o.mfu_rule,
                                        tp_fallback=o.tp_fallback), o.decode_attention_mfu_scale, o.mfu_floor)
        pos = 0
        for q2, a in zip(qs, starts):
            part = m[pos : pos + size - a]
            M = kv[pos : pos + size - a]
            pos += size - a
            # same operations, in the same order, as hardware_time's max_context decode attention
            comp = self.gemm_s(q2) + self.c4 * q2 * M * self.L / (self.flops * part) * self.s
            for store, new in ((self._rows, part), (self._comp, comp)):
                old = store.get(q2)
                store[q2] = new.copy() if old is None else np.concatenate([old, new])

    def solo_decode_row(self, kv_max: int) -> np.ndarray:
        """Hardware µs of a batch-1 decode step at PI = index (``max_context``), ``len > kv_max``."""
        if self._solo is None or kv_max >= len(self._solo):
            comp = self.decode_compute_row(1, kv_max)
            S = np.arange(len(comp), dtype=np.float64)
            dyn = (self.k_tok * 1 + (self.k_tok * S) * 0.8) + self.act1 * 1
            self._solo = np.maximum(comp, (self.ws + dyn * self.s) / self.bw) * 1e6
        return self._solo

    def prefill_mfu(self, bucket: int) -> float:
        """Scaled prefill-attention MFU of a bucket."""
        if self._pmfu is None:
            o = self.options
            vals = _scaled(self.mfu.prefill_mfu(self.key, np.array(_BUCKETS, dtype=np.float64), rule=o.mfu_rule),
                           o.prefill_attention_mfu_scale, o.mfu_floor)
            self._pmfu = dict(zip(_BUCKETS, vals.tolist()))
        return self._pmfu[bucket]

    # ------------------------------------------------------------------ decode-only steps

    def decode_hw_us(self, q: int, max_pi: int, sum_pi: int) -> float:
        """Hardware µs of one pure-decode step of ``q`` requests (``max_context`` rule)."""
        row = self._comp.get(q)
        if row is None or max_pi >= len(row):
            row = self.decode_compute_row(q, max_pi)
        comp = float(row[max_pi])
        dyn = (self.k_tok * q + (self.k_tok * sum_pi) * 0.8) + self.act1 * q
        mem = (self.ws + dyn * self.s) / self.bw
        return (comp if comp >= mem else mem) * 1e6

    def decode_run_hw_us(self, q: int, max_pi: int, sum_pi: int, k: int) -> np.ndarray:
        """Hardware µs of ``k`` consecutive pure-decode steps (``max_context`` rule).

        Step ``j`` has max PI ``max_pi + j`` and sum PI ``sum_pi + q j``.  Equal to
        :meth:`decode_hw_us` step by step.
        """
        comp = self.decode_compute_row(q, max_pi + k - 1)[max_pi : max_pi + k]
        S = np.arange(sum_pi, sum_pi + q * k, q, dtype=np.float64)
        dyn = (self.k_tok * q + (self.k_tok * S) * 0.8) + self.act1 * q
        mem = (self.ws + dyn * self.s) / self.bw
        return np.maximum(comp, mem) * 1e6

    def decode_run_pr_hw_us(self, pis, k: int) -> np.ndarray:
        """Hardware µs of ``k`` pure-decode steps starting at contexts ``pis`` (any decode rule)."""
        pis = np.asarray(pis, dtype=np.int64)
        q = len(pis)
        if not self.scalar:
            steps = np.repeat(np.arange(k, dtype=np.int64), q)
            dpi = (pis[None, :] + np.arange(k, dtype=np.int64)[:, None]).reshape(-1)
            e = np.zeros(0, np.int64)
            return self.step_model.parts(StepBatch(k, e, e, e, steps, dpi)).hardware_s * 1e6
        if self.aggregate:
            return self.decode_run_hw_us(q, int(pis.max()), int(pis.sum()), k)
        P = pis[None, :] + np.arange(k, dtype=np.int64)[:, None]  # (k, q)
        row = self.decode_mfu_row(q, int(P.max()))
        Pf = P.astype(np.float64)
        f = self.c4 * Pf * self.L
        # cumulative sums along a row are sequential, like hardware_time's bincount
        f_sum = np.cumsum(f, axis=1)[:, -1]
        fm_sum = np.cumsum(f * row[P], axis=1)[:, -1]
        ok = fm_sum > 0
        attn = np.zeros(k)
        attn[ok] = f_sum[ok] ** 2 / (self.flops * fm_sum[ok]) * self.s
        comp = self.gemm_s(q) + attn
        dyn = np.cumsum((self.k_tok * 1.0 + (self.k_tok * Pf) * 0.8) + self.act1, axis=1)[:, -1]
        mem = (self.ws + dyn * self.s) / self.bw
        return np.maximum(comp, mem) * 1e6

    # ------------------------------------------------------------------ one general step

    def step_hw_us(self, p_pi, p_n, q: int = 0, max_pi: int = 0, sum_pi: int = 0, d_pis=None) -> float:
        """Hardware µs of one step.

        Parameters
        ----------
        p_pi, p_n : sequence of int
            Prefill entries (PI shown to the model, new tokens), in batch order.
        q, max_pi, sum_pi : int
            Decode count, largest and summed PI of the decode entries
            (enough under ``max_context``).
        d_pis : sequence of int, optional
            The decode PIs themselves; needed by the ``per_request`` rule and by
            the fallback, used for ``q``/max/sum when given.
        """
        if d_pis is not None:
            q = len(d_pis)
            if q:
                max_pi, sum_pi = max(d_pis), sum(d_pis)
        if not self.scalar or (q and not self.aggregate and d_pis is None):
            if d_pis is None and q:
                raise ValueError("this step model needs the decode PIs (d_pis)")
            d_pis = [] if d_pis is None else list(d_pis)
            batch = StepBatch.from_arrays(1, prefill_step=[0] * len(p_pi), prefill_pi=p_pi, prefill_n=p_n,
                                          decode_step=[0] * len(d_pis), decode_pi=d_pis)
            return float(self.step_model.parts(batch).hardware_s[0] * 1e6)
        s, L, flops, bw, k_tok = self.s, self.L, self.flops, self.bw, self.k_tok
        o = self.options
        d_time = d_attn = d_dyn = 0.0
        if q:
            if self.aggregate:
                row = self._comp.get(q)
                if row is None or max_pi >= len(row):
                    row = self.decode_compute_row(q, max_pi)
                d_comp = float(row[max_pi])
                if o.mixed_rule == "additive":
                    d_attn = self.c4 * q * max_pi * L / (flops * float(self._rows[q][max_pi])) * s
                d_dyn = (k_tok * q + (k_tok * sum_pi) * 0.8) + self.act1 * q
            else:
                row = self.decode_mfu_row(q, max_pi)
                f_sum = fm_sum = 0.0
                for pi in d_pis:
                    f = self.c4 * pi * L
                    f_sum += f
                    fm_sum += f * float(row[pi])
                    d_dyn += (k_tok * 1.0 + (k_tok * pi) * 0.8) + self.act1
                d_attn = f_sum * f_sum / (flops * fm_sum) * s if fm_sum > 0 else 0.0
                d_comp = self.gemm_s(q) + d_attn
            d_mem = (self.ws + d_dyn * s) / bw
            d_time = d_comp if d_comp >= d_mem else d_mem
        if not len(p_n):
            return d_time * 1e6
        bucket_rule = o.prefill_attention == "bucket"
        if len(p_n) == 1:  # the common case, without grouping (0.0 + x == x)
            pi, n = p_pi[0], p_n[0]
            p_tok = n
            b = _bucket(pi + n)
            if n == 1:
                p_dyn = (k_tok * 1.0 + (k_tok * pi) * 0.8) + (self.ldb * 1.0) * 0.75
            else:
                p_dyn = (k_tok * n + (k_tok * pi) * 0.92) + (self.ldb * float(n)) * 0.85
            g_flops = self.c4 * float(n) * float(b) * L if bucket_rule else self.c4 * n * float(pi + n) * L
            p_attn = g_flops / CAUSAL_DIVISOR / (flops * self.prefill_mfu(b)) * s
            p_comp = self.gemm_s(n) + p_attn
        else:
            # group by bucket (ascending); tokens and "actual" FLOPs summed in entry order
            groups: dict[int, list[float]] = {}
            p_dyn = 0.0
            p_tok = 0
            for pi, n in zip(p_pi, p_n):
                b = _bucket(pi + n)
                g = groups.get(b)
                if g is None:
                    g = groups[b] = [0.0, 0.0]
                g[0] += float(n)
                if not bucket_rule:
                    g[1] += self.c4 * n * float(pi + n) * L
                if n == 1:
                    p_dyn += (k_tok * 1.0 + (k_tok * pi) * 0.8) + (self.ldb * 1.0) * 0.75
                else:
                    p_dyn += (k_tok * n + (k_tok * pi) * 0.92) + (self.ldb * float(n)) * 0.85
                p_tok += n
            p_comp = p_attn = 0.0
            for b in sorted(groups):
                tokens, actual = groups[b]
                g_flops = self.c4 * tokens * float(b) * L if bucket_rule else actual
                g_attn = g_flops / CAUSAL_DIVISOR / (flops * self.prefill_mfu(b)) * s
                p_comp += self.gemm_s(int(tokens)) + g_attn
                p_attn += g_attn
        p_mem = (self.ws + p_dyn * s) / bw
        p_time = p_comp if p_comp >= p_mem else p_mem
        if not q:
            return p_time * 1e6
        pm, qm = float(p_tok), float(q)
        rule = o.mixed_rule
        if rule == "weighted":
            if pm > 4 * qm and pm > 100:
                hw = 0.75 * p_time + 0.25 * d_time
            elif qm > 2 * pm and qm > 50:
                hw = 0.35 * p_time + 0.65 * d_time
            else:
                hw = (pm * p_time + qm * d_time) / (pm + qm)
        elif rule == "max":
            hw = p_time if p_time >= d_time else d_time
        else:  # additive
            comp = self.gemm_s(p_tok + q) + p_attn + d_attn
            mem = (self.ws + (p_dyn + d_dyn) * s) / bw
            hw = comp if comp >= mem else mem
        return hw * 1e6


def _rebuild(step_model, plain_parts: bool) -> FastSteps:
    """Unpickle a :class:`FastSteps` (its caches are rebuilt on use)."""
    return FastSteps(step_model, plain_parts=plain_parts)
