"""Fast step times for replays: one step, or a run of decode-only steps, from sufficient statistics.

:func:`calib.physics.roofline.hardware_time` (v2.x) and
:func:`calib.physics.roofline_v3.hardware_time_v3` (v3) are vectorised over
many steps, but a continuous-batching replay needs the steps one by one (the
next step's batch depends on when the current one ends), and one call on a
one-step batch costs ~0.1 ms.  :class:`FastSteps` evaluates the same formulas
one step at a time with cached tables, and reduces the decode entries of a
step to a few numbers that an engine keeps up to date as requests join, leave
and advance by one token per step.

Sufficient statistics of the decode entries of a step
-----------------------------------------------------
With ``q`` decode entries of contexts ``PI_r`` (``kind`` of :class:`FastSteps`):

``"max_context"`` (v2.x with ``decode_attention="max_context"``: v2.3)
    ``(q, max PI, Σ PI)``: the GEMMs depend on ``q``, attention on ``q`` and
    ``max PI`` (one MFU lookup), the bytes are linear in ``PI``.
``"per_request"`` (v2.x with ``decode_attention="per_request"``: v2.4)
    ``(q, Σ PI, Σ f m)``: attention takes ``(Σ f)² / (P Σ f m) / TP`` with
    ``f_r = 4 nH dh L PI_r`` and ``m_r`` the decode MFU at ``(q, PI_r)``;
    ``Σ f = 4 nH dh L Σ PI``.  Between two knots of the MFU table's kv axis the
    interpolated MFU is affine in the context, ``m = a + b (PI - x0)``, so
    ``Σ f m = 4 nH dh L Σ_pieces (a Σ PI + b Σ PI (PI - x0))``: per *piece* of
    the kv axis, the count, sum and sum of squares of the contexts, which
    :class:`ContextSet` keeps (a request moves to the next piece when its
    context crosses a knot; a few times in its life).  ``(a, b)`` depend on
    ``q`` and are cached per ``q`` (:meth:`FastSteps.piece_coefficients`).  Where
    the MFU is not affine (the < 1e-4 zero fallback, clipping by the MFU scale
    or floor, the ``nearest`` rule, and ``q = 1``) a piece is summed request by
    request from the tabulated MFU.
``"v4"``
    ``(q, Σ PI)``: :class:`~calib.physics.roofline_v4.V4Terms` splits a step into terms of
    its token count ``M`` (tabulated), of its sequence count (tabulated), of its
    prefill entries (cached per set of entries) and a decode attention linear in
    ``(q, Σ PI)``; every term is evaluated by the same ``V4Terms`` methods as the
    vectorised model, so v4 is bit-identical.
``"v3"``
    ``(q, Σ PI)``: constant MFUs, and the FLOPs and bytes of a decode entry are
    affine in ``PI`` (:func:`~calib.physics.roofline_v3.decode_flops_terms`);
    the weight bytes of a mixture-of-experts model depend on the step's new
    tokens ``p + q`` (cached per token count).

Prefill entries are few per step and are evaluated one by one.  A mixed
(prefill + decode) step has no small cache key worth keeping (its decode part
carries ``Σ PI``, which differs at every step), and needs none: its decode
part costs O(1) from the statistics above, its prefill part a few dozen float
operations per entry.

Exactness
---------
Every float operation is done in the same order as in the reference, so
results are bit-identical to ``StepModel.parts(...).hardware_s * 1e6``, except
for sums that the reference makes entry by entry and this module in closed
form: the v2 decode bytes of ``q > 1`` requests and the ``per_request``
``Σ f m`` of ``q > 1`` requests (a few ulp; tested to 1e-12 relative, far
below the 1 µs rounding of a step time).  v3 is bit-identical (its FLOPs and
bytes are whole numbers below 2**53, summed exactly), and so are steps with
at most one decode entry.  A step model with a variant or option this module
does not know, or whose class overrides ``parts``, falls back to
``StepModel.parts`` for every call (``kind`` is ``None``).
"""

from __future__ import annotations

import math
from bisect import bisect_right, insort
from dataclasses import fields
from heapq import heappop, heappush

import numpy as np

from calib.physics.batch import StepBatch
from calib.physics.roofline import CAUSAL_DIVISOR, _gemm_time, _scaled

__all__ = ["FastSteps", "ContextSet", "round_half_away_scalar"]

_BUCKETS = tuple(512 << i for i in range(8))  # 512 .. 65536
#: The PhysicsOptions fields this module implements; a step model with other fields falls back to
#: ``StepModel.parts`` rather than silently ignoring a new switch.
_KNOWN_OPTIONS = frozenset({
    "variant", "mfu_rule", "gemm_weight_floor", "decode_attention", "prefill_attention", "mixed_rule",
    "min_step_us", "tp_fallback", "bw_efficiency", "gemm_mfu_scale", "prefill_attention_mfu_scale",
    "decode_attention_mfu_scale", "mfu_floor", "mfu_prefill", "mfu_decode", "gemm_mfu_source", "gemm_mfu",
    "kernel_floor_us", "prefill_attention_mfu", "decode_attention_efficiency", "allreduce_us",
})
#: Queries per decode-MFU fill call (one call has a fixed cost; ~0.1 µs per query on top).
_TILE = 16384
_KV_HINT_CAP = 1 << 17
#: Entries of the prefill-part cache (one per distinct set of prefill entries) before it is emptied.
_PCACHE_MAX = 1 << 16
#: Decode batch sizes whose piece coefficients are computed together.
_Q_BLOCK = 64
#: Relative margin kept from the MFU thresholds (zero fallback, clip at 1, floor) by an affine piece.
_MARGIN = 1e-9
#: The first steps of a decode-only run timed one by one with Python floats (the rest of a longer run: NumPy).
SCALAR_RUN = 12


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


def _kind(step_model, plain_parts: bool) -> str | None:
    opts = step_model.options
    if not plain_parts or not {f.name for f in fields(opts)} <= _KNOWN_OPTIONS:
        return None
    if opts.variant in ("v3", "v4"):
        return opts.variant
    if opts.variant in ("v2.3", "v2.4"):
        return "max_context" if opts.decode_attention == "max_context" else "per_request"
    return None


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
    kind : {"max_context", "per_request", "v3"} or None
        Which statistics a decode-only step depends on (module docstring);
        ``None``: every call falls back to ``step_model.parts``.
    scalar, aggregate : bool
        ``kind is not None``: the formulas are evaluated here, and decode-only
        steps depend only on the statistics of ``kind``.
    needs_max : bool
        The statistics include ``max PI`` (``"max_context"``).
    needs_contexts : bool
        The statistics include ``Σ f m``, kept by a :class:`ContextSet` (:meth:`contexts`).

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
        self.plain_parts = bool(plain_parts)
        self.kind = _kind(step_model, self.plain_parts)
        self.scalar = self.aggregate = self.kind is not None
        self.needs_max = self.kind == "max_context"
        self.needs_contexts = self.kind == "per_request"
        self._q_hint, self._kv_hint, self._m_hint = 1, 1024, 1024
        self._solo: np.ndarray | None = None  # hardware µs of a batch-1 decode step at PI = index
        self._pcache: dict = {}  # prefill entries -> the prefill part of a step (v2 or v3 tuple)
        if self.kind is None:
            return
        model, hw, tp = step_model.model, step_model.hardware, step_model.tp
        self.model = model
        self.s = 1.0 / tp
        self.L = model.num_layers
        self.k_tok = float(model.kv_bytes_per_token)
        if self.kind == "v3":
            self._init_v3(model, hw)
            self.decode_hw_us = self._decode_closure()
            self.step_stats_hw_us = self._stats_v3
            return
        if self.kind == "v4":
            self._init_v4()
            return
        self.mfu = step_model.mfu
        self.flops = hw.flops_peak
        self.bw = hw.bw_peak * (opts.bw_efficiency if opts.bw_efficiency is not None else hw.bw_efficiency)
        self.c4 = 4.0 * model.num_heads * model.head_dim
        self.ws = float(model.weight_params_per_layer) * self.L * model.dtype_bytes * self.s
        self.ldb = model.num_layers * model.hidden_size * model.dtype_bytes
        self.act1 = (self.ldb * 1.0) * 0.75  # activations of a 1-token entry
        self.key = self.mfu.attention_key(*model.attention_shape)
        self._gemm = np.zeros(1)  # G(M) seconds for M in [0, len); G(0) = 0
        self._gemm_list = [0.0]
        self._rows: dict[int, np.ndarray] = {}  # q -> scaled decode MFU for kv in [0, len)
        self._row_lists: dict[int, list] = {}
        self._comp: dict[int, np.ndarray] = {}  # q -> G(q) + attention(q, max PI = index) (max_context)
        self._comp_lists: dict[int, list] = {}
        self._pmfu: dict[int, float] | None = None
        if self.kind == "per_request":
            self._init_pieces()
        self.decode_hw_us = self._decode_closure()
        self.step_stats_hw_us = self._step_v2

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
        """``G(M)``: seconds of the 7 GEMMs with ``M`` rows (0 for ``M = 0``; v2 only)."""
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
        self._gemm_list.extend(new.tolist())  # in place: the decode closures hold this list

    def decode_mfu_row(self, q: int, kv_max: int) -> np.ndarray:
        """Scaled decode-attention MFU at batch size ``q`` for kv in ``[0, len)``, ``len > kv_max`` (v2 only)."""
        row = self._rows.get(q)
        if row is None or kv_max >= len(row):
            self._grow_rows(q, kv_max)
            row = self._rows[q]
        return row

    def _mfu_list(self, q: int, kv_max: int) -> list:
        row = self._row_lists.get(q)
        if row is None or kv_max >= len(row):
            row = self._row_lists[q] = self.decode_mfu_row(q, kv_max).tolist()
        return row

    def decode_compute_row(self, q: int, kv_max: int) -> np.ndarray:
        """Decode compute seconds ``G(q) + attention`` at max PI = index (``max_context``), ``len > kv_max``."""
        row = self._comp.get(q)
        if row is None or kv_max >= len(row):
            self._grow_rows(q, kv_max)
            row = self._comp[q]
        return row

    def _comp_list(self, q: int, kv_max: int) -> list:
        row = self._comp_lists.get(q)
        if row is None or kv_max >= len(row):
            row = self._comp_lists[q] = self.decode_compute_row(q, kv_max).tolist()
        return row

    def _grow_rows(self, q: int, kv_max: int) -> None:
        """Fill the MFU (and, for ``max_context``, compute) rows of ``q``, with neighbours of ``q`` in one call."""
        size = -(-max(kv_max + 1, self._kv_hint) // 1024) * 1024
        per_call = max(1, _TILE // size) if self.kind == "max_context" else 1
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
            stores = [(self._rows, part)]
            if self.kind == "max_context":
                # same operations, in the same order, as hardware_time's max_context decode attention
                stores.append((self._comp, self.gemm_s(q2) + self.c4 * q2 * M * self.L / (self.flops * part) * self.s))
            for store, new in stores:
                old = store.get(q2)
                store[q2] = new.copy() if old is None else np.concatenate([old, new])

    def solo_decode_row(self, kv_max: int) -> np.ndarray:
        """Hardware µs of a batch-1 decode step at PI = index, ``len > kv_max`` (one ``parts`` call per growth)."""
        if self._solo is None or kv_max >= len(self._solo):
            size = -(-max(kv_max + 1, self._kv_hint) // 1024) * 1024
            pis = np.arange(size, dtype=np.int64)
            self._solo = self.step_model.parts(StepBatch.solo_decode(pis)).hardware_s * 1e6
        return self._solo

    def prefill_mfu(self, bucket: int) -> float:
        """Scaled prefill-attention MFU of a bucket (v2 only)."""
        if self._pmfu is None:
            o = self.options
            vals = _scaled(self.mfu.prefill_mfu(self.key, np.array(_BUCKETS, dtype=np.float64), rule=o.mfu_rule),
                           o.prefill_attention_mfu_scale, o.mfu_floor)
            self._pmfu = dict(zip(_BUCKETS, vals.tolist()))
        return self._pmfu[bucket]

    # ------------------------------------------------------------------ per_request: pieces of the kv axis

    def _init_pieces(self) -> None:
        o = self.options
        table = self.mfu.decode_table(self.key, self.step_model.tp, o.tp_fallback)
        self._bs_axis, kv_axis, self._grid = table.grid
        #: knots of the kv axis: piece i holds contexts in [knots[i-1], knots[i]) (piece 0 below knots[0])
        self.knots: list[int] = kv_axis.tolist()
        self._coefs: dict[int, list] = {}
        self.c4L = self.c4 * self.L

    def contexts(self) -> "ContextSet | None":
        """A new, empty :class:`ContextSet` for this step model (``None`` unless ``needs_contexts``)."""
        return ContextSet(self) if self.needs_contexts else None

    def piece_coefficients(self, q: int) -> list:
        """Per piece of the kv axis, at batch size ``q``: ``(a, b, x0)`` or ``None``.

        ``(a, b, x0)``: the scaled decode MFU is ``a + b (PI - x0)`` for every context
        of the piece (up to rounding).  ``None``: it is not affine there (zero fallback,
        clipping, ``nearest`` rule, ``q = 1``), and the piece is summed request by request.
        """
        co = self._coefs.get(q)
        if co is None:
            self._fill_coefs(q)
            co = self._coefs[q]
        return co

    def _fill_coefs(self, q: int) -> None:
        knots = self.knots
        n_pieces = len(knots) + 1
        o = self.options
        qs = [q2 for q2 in range(q, q + _Q_BLOCK) if q2 not in self._coefs]
        if o.mfu_rule != "interp":
            for q2 in qs:
                self._coefs[q2] = [None] * n_pieces
            return
        qa = np.asarray(qs, dtype=np.float64)
        bs_axis, grid = self._bs_axis, self._grid
        # spec §4.3 bracketing in bs, as calib.specs.mfu: the interpolated MFU at each knot (kv exact hit)
        hi = np.minimum(np.searchsorted(bs_axis, qa, side="left"), bs_axis.size - 1)
        lo = np.where(bs_axis[hi] <= qa, hi, np.maximum(hi - 1, 0))
        x0, x1 = bs_axis[lo].astype(float), bs_axis[hi].astype(float)
        tb = np.where(hi > lo, (qa - x0) / np.where(hi > lo, x1 - x0, 1.0), 0.0)
        raw = grid[lo, :] + (grid[hi, :] - grid[lo, :]) * tb[:, None]  # (len(qs), len(knots))
        # check against the reference lookup at the knots and at the middle of every inner piece
        kn = np.asarray(knots, dtype=np.float64)
        mid = np.floor((kn[:-1] + kn[1:]) / 2)
        probe = np.concatenate([kn, mid])
        ref = self.mfu.decode_mfu(self.key, self.step_model.tp, qa[:, None], probe[None, :], rule="interp",
                                  tp_fallback=o.tp_fallback)
        ref_knots, ref_mid = ref[:, : len(kn)], ref[:, len(kn):]
        knots_ok = np.all((raw < 1e-4) | (raw == ref_knots), axis=1)
        scale, floor = o.decode_attention_mfu_scale, o.mfu_floor
        for i, q2 in enumerate(qs):
            if q2 <= 1 or not knots_ok[i]:
                self._coefs[q2] = [None] * n_pieces
                continue
            v = raw[i].tolist()
            co = [_piece(v[0], v[0], knots[0], None, scale, floor)]
            for j in range(1, len(knots)):
                c = _piece(v[j - 1], v[j], knots[j - 1], knots[j], scale, floor)
                if c is not None:  # the reference at the middle of the piece must agree
                    a, b, xa = c
                    pred = a + b * (mid[j - 1] - xa)
                    got = float(_scaled(ref_mid[i, j - 1], scale, floor))
                    if abs(pred - got) > 1e-12 * abs(got):
                        c = None
                co.append(c)
            co.append(_piece(v[-1], v[-1], knots[-1], None, scale, floor))
            self._coefs[q2] = co

    def fm_of(self, q: int, pis) -> float:
        """``Σ f m`` of decode contexts ``pis`` at batch size ``q``, request by request (as the reference sums)."""
        row = self._mfu_list(q, max(pis))
        c4, L = self.c4, self.L
        fm = 0.0
        for pi in pis:
            fm += c4 * pi * L * row[pi]
        return fm

    # ------------------------------------------------------------------ v3

    def _init_v3(self, model, hw) -> None:
        from calib.physics.roofline_v3 import _mlp_widths, decode_flops_terms, peak_flops_v3

        o = self.options
        self.peak = peak_flops_v3(model, hw)
        self.bw = hw.bw_peak * (o.bw_efficiency if o.bw_efficiency is not None else 1.0)
        self.pk_p = self.peak * o.mfu_prefill
        self.pk_d = self.peak * o.mfu_decode
        self.f0, self.f1 = decode_flops_terms(model)
        self.ldb_f = float(model.num_layers * model.hidden_size * model.dtype_bytes)
        self.dyn0 = int(model.kv_bytes_per_token) + model.num_layers * model.hidden_size * model.dtype_bytes
        self.d_f, self.dkv, self.nH, self.dh = float(model.hidden_size), model.kv_dim, model.num_heads, model.head_dim
        self.active = _mlp_widths(model)[0]
        self._w3: list[float] = []  # weight bytes W2(B) by step tokens B

    def weight_bytes(self, tokens: int) -> float:
        """v3 weight bytes ``W₂(B)`` of a step with ``B`` new tokens (cached; equal to ``weight_bytes_v3``)."""
        w = self._w3
        if tokens >= len(w):
            from calib.physics.roofline_v3 import weight_bytes_v3

            size = -(-max(tokens + 1, self._m_hint, 2 * len(w)) // 1024) * 1024
            w.extend(weight_bytes_v3(self.model, np.arange(len(w), size, dtype=np.float64)).tolist())
        return w[tokens]

    def _flops_v3(self, pi: int, n: int) -> float:
        """``flops_v3`` of one entry, with the same float operations."""
        d, nH, dh = self.d_f, self.nH, self.dh
        n = float(n)
        pi = float(pi)
        c = pi if n == 1 else pi + (n - 1) / 2.0
        attn_proj = 2.0 * n * (d * d + 2.0 * d * self.dkv) + 2.0 * n * d * d
        attn_core = 4.0 * nH * n * c * dh
        vector = 5.0 * nH * n * c + 2.0 * n * d
        mlp = 2.0 * n * 2.0 * d * self.active
        return self.L * (attn_proj + attn_core + vector) + mlp

    def _stats_v3(self, p_pi, p_n, q: int = 0, max_pi: int = 0, sum_pi: int = 0, fm_sum=None) -> float:
        if not p_n:
            return self.decode_hw_us(q, max_pi, sum_pi)
        return self._step_v3(p_pi, p_n, q, sum_pi)

    def _prefill_v3(self, key, p_pi, p_n) -> tuple:
        """``(FLOPs, dynamic bytes, tokens)`` of v3 prefill entries, summed in entry order (cached by key)."""
        k_tok, ldb = self.k_tok, self.ldb_f
        p_flops = p_dyn = 0.0
        p_tok = 0
        for pi, n in zip(p_pi, p_n):
            p_flops += self._flops_v3(pi, n)
            p_dyn += k_tok * n + k_tok * pi + ldb * n
            p_tok += n
        return self._cache_part(key, (p_flops, p_dyn, p_tok))

    def _step_v3(self, p_pi, p_n, q: int, sum_pi: int) -> float:
        s, k_tok = self.s, self.k_tok
        key = (p_pi[0], p_n[0]) if len(p_n) == 1 else (tuple(p_pi), tuple(p_n))
        part = self._pcache.get(key)
        if part is None:
            part = self._prefill_v3(key, p_pi, p_n)
        p_flops, p_dyn, p_tok = part
        compute = p_flops * s / self.pk_p
        d_dyn = 0.0
        if q:
            compute += float(q * self.f0 + self.f1 * sum_pi) * s / self.pk_d
            d_dyn = float(q * self.dyn0 + k_tok * sum_pi)
        memory = (self.weight_bytes(p_tok + q) + p_dyn + d_dyn) * s / self.bw
        return (compute if compute >= memory else memory) * 1e6

    # ------------------------------------------------------------------ v4

    def _init_v4(self) -> None:
        from calib.physics.roofline_v4 import V4Terms

        sm = self.step_model
        self.terms = V4Terms.build(sm.model, sm.hardware, sm.tp, self.options, sm.mfu)
        self._fixed: list[float] = []  # fixed_s(M) by token count M
        self._lm: list[float] = []     # lm_head_s(n) by sequence count n
        fixed, lm, grow, da = self._fixed, self._lm, self._grow_v4, self.terms.decode_attention_s

        def decode_v4(q: int, max_pi: int = 0, sum_pi: int = 0, fm_sum: float = 0.0) -> float:
            if q >= len(fixed):
                grow(q)
            return ((fixed[q] + lm[q]) + da(q, float(sum_pi + q))) * 1e6

        self.decode_hw_us = decode_v4
        self.step_stats_hw_us = self._stats_v4

    def _grow_v4(self, n: int) -> None:
        """Extend the token-count and sequence-count tables past ``n``."""
        have = len(self._fixed)
        size = -(-max(n + 1, self._m_hint, 2 * have) // 1024) * 1024
        idx = np.arange(have, size, dtype=np.float64)
        self._fixed.extend(self.terms.fixed_s(idx).tolist())
        self._lm.extend(self.terms.lm_head_s(idx).tolist())

    def _stats_v4(self, p_pi, p_n, q: int = 0, max_pi: int = 0, sum_pi: int = 0, fm_sum=None) -> float:
        if not len(p_n):
            return self.decode_hw_us(q, max_pi, sum_pi)
        return self._step_v4(p_pi, p_n, q, sum_pi)

    def _step_v4(self, p_pi, p_n, q: int, sum_pi: int) -> float:
        """One step with prefill entries: the same terms and additions as ``hardware_time_v4``."""
        t = self.terms
        key = ("v4", p_pi[0], p_n[0]) if len(p_n) == 1 else ("v4", tuple(p_pi), tuple(p_n))
        part = self._pcache.get(key)
        if part is None:
            flops = nbytes = 0.0
            p_tok = 0
            for pi, n in zip(p_pi, p_n):
                f, b = t.prefill_attention_parts(float(pi), float(n))
                flops += float(f)
                nbytes += float(b)
                p_tok += n
            pa = float(t.prefill_attention_s(flops, nbytes)) if p_tok > 0 else 0.0
            part = self._cache_part(key, (pa, p_tok, len(p_n)))
        pa, p_tok, n_p = part
        M, n_seq = p_tok + q, n_p + q
        top = max(M, n_seq)
        if top >= len(self._fixed):
            self._grow_v4(top)
        return t.total_s(self._fixed[M], self._lm[n_seq], pa, t.decode_attention_s(q, float(sum_pi + q))) * 1e6

    # ------------------------------------------------------------------ decode-only steps (every kind)

    def _decode_closure(self):
        """:meth:`decode_hw_us` of this kind as a closure over its constants (the replay's innermost call).

        Every float operation in the order of the reference (``hardware_time`` /
        ``hardware_time_v3``), with the decode sums in closed form (module docstring).
        """
        s, k_tok = self.s, self.k_tok
        if self.kind == "v3":
            f0, f1, dyn0, pk_d, bw, w3, weight_bytes = self.f0, self.f1, self.dyn0, self.pk_d, self.bw, self._w3, \
                self.weight_bytes

            def decode_v3(q: int, max_pi: int = 0, sum_pi: int = 0, fm_sum: float = 0.0) -> float:
                compute = float(q * f0 + f1 * sum_pi) * s / pk_d
                memory = ((w3[q] if q < len(w3) else weight_bytes(q)) + float(q * dyn0 + k_tok * sum_pi)) * s / bw
                return (compute if compute >= memory else memory) * 1e6

            return decode_v3
        ws, act1, bw = self.ws, self.act1, self.bw
        if self.kind == "max_context":
            get, comp_list = self._comp_lists.get, self._comp_list

            def decode_max(q: int, max_pi: int, sum_pi: int, fm_sum: float = 0.0) -> float:
                row = get(q)
                if row is None or max_pi >= len(row):
                    row = comp_list(q, max_pi)
                comp = row[max_pi]
                mem = (ws + ((k_tok * q + (k_tok * sum_pi) * 0.8) + act1 * q) * s) / bw
                return (comp if comp >= mem else mem) * 1e6

            return decode_max
        gl, gemm_s, c4, L, flops = self._gemm_list, self.gemm_s, self.c4, self.L, self.flops

        def decode_pr(q: int, max_pi: int, sum_pi: int, fm_sum: float) -> float:
            comp = gl[q] if q < len(gl) else gemm_s(q)
            if fm_sum > 0:
                f = c4 * sum_pi * L
                comp += f * f / (flops * fm_sum) * s
            mem = (ws + ((k_tok * q + (k_tok * sum_pi) * 0.8) + act1 * q) * s) / bw
            return (comp if comp >= mem else mem) * 1e6

        return decode_pr

    def _attn_pr(self, sum_pi: int, fm_sum: float) -> float:
        f = self.c4 * sum_pi * self.L
        return f * f / (self.flops * fm_sum) * self.s if fm_sum > 0 else 0.0

    def decode_hw_us(self, q: int, max_pi: int, sum_pi: int, fm_sum: float = 0.0) -> float:
        """Hardware µs of one decode-only step of ``q`` requests from its statistics.

        ``max_pi`` is used by ``max_context``, ``fm_sum`` (``Σ f m``, from a
        :class:`ContextSet` or :meth:`fm_of`) by ``per_request``.  Bound per kind at construction.
        """
        raise NotImplementedError("this step model has no fast path (kind None)")

    def decode_run_hw_us(self, q: int, max_pi: int, sum_pi: int, k: int, fm_sums=None) -> np.ndarray:
        """Hardware µs of ``k`` consecutive decode-only steps of the same ``q`` requests.

        Step ``j`` has max PI ``max_pi + j``, summed PI ``sum_pi + q j`` and, for
        ``per_request``, ``Σ f m = fm_sums[j]``.  Equal to :meth:`decode_hw_us` step by step.
        """
        kind = self.kind
        S = np.arange(sum_pi, sum_pi + q * k, q, dtype=np.float64)[:k]
        if kind == "v3":
            s = self.s
            if abs(q * self.f0) + abs(self.f1) * (sum_pi + q * k) < 2.0**53:  # whole numbers: exact in floats
                flops = float(q * self.f0) + float(self.f1) * S
            else:
                flops = np.array([float(q * self.f0 + self.f1 * (sum_pi + q * j)) for j in range(k)])
            mem = (self.weight_bytes(q) + (float(q * self.dyn0) + self.k_tok * S)) * s / self.bw
            return np.maximum(flops * s / self.pk_d, mem) * 1e6
        if kind == "v4":
            if q >= len(self._fixed):
                self._grow_v4(q)
            base = self._fixed[q] + self._lm[q]
            return (base + self.terms.decode_attention_s(q, S + q)) * 1e6
        if kind == "max_context":
            comp = self.decode_compute_row(q, max_pi + k - 1)[max_pi : max_pi + k]
        else:
            f = self.c4 * S * self.L
            fm = np.asarray(fm_sums, dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                attn = np.where(fm > 0, f * f / (self.flops * fm) * self.s, 0.0)
            comp = self.gemm_s(q) + attn
        dyn = (self.k_tok * q + (self.k_tok * S) * 0.8) + self.act1 * q
        mem = (self.ws + dyn * self.s) / self.bw
        return np.maximum(comp, mem) * 1e6

    def decode_run_pr_hw_us(self, pis, k: int) -> np.ndarray:
        """Hardware µs of ``k`` decode-only steps starting at explicit contexts ``pis`` (+1 per step)."""
        pis = np.asarray(pis, dtype=np.int64)
        q = len(pis)
        if self.kind is None:
            steps = np.repeat(np.arange(k, dtype=np.int64), q)
            dpi = (pis[None, :] + np.arange(k, dtype=np.int64)[:, None]).reshape(-1)
            e = np.zeros(0, np.int64)
            return self.step_model.parts(StepBatch(k, e, e, e, steps, dpi)).hardware_s * 1e6
        fm = None
        if self.needs_contexts:
            P = pis[None, :] + np.arange(k, dtype=np.int64)[:, None]  # (k, q)
            row = self.decode_mfu_row(q, int(P.max()))
            fm = np.cumsum(self.c4 * P.astype(np.float64) * self.L * row[P], axis=1)[:, -1]  # sequential sums
        return self.decode_run_hw_us(q, int(pis.max()), int(pis.sum()), k, fm)

    # ------------------------------------------------------------------ one general step

    def step_hw_us(self, p_pi, p_n, q: int = 0, max_pi: int = 0, sum_pi: int = 0, d_pis=None,
                   fm_sum: float | None = None) -> float:
        """Hardware µs of one step.

        Parameters
        ----------
        p_pi, p_n : sequence of int
            Prefill entries (PI shown to the model, new tokens), in batch order.
        q, max_pi, sum_pi : int
            Decode count, largest and summed PI of the decode entries.
        d_pis : sequence of int, optional
            The decode PIs themselves; when given, ``q``, ``max_pi``, ``sum_pi`` and
            ``fm_sum`` are computed from them (request by request).
        fm_sum : float, optional
            ``Σ f m`` of the decode entries (``per_request``; a :class:`ContextSet`'s
            :meth:`ContextSet.fm_sum`).  Needed with ``q > 0`` unless ``d_pis`` is given.
        """
        if d_pis is not None:
            q = len(d_pis)
            if q:
                max_pi, sum_pi = max(d_pis), sum(d_pis)
        kind = self.kind
        if kind is None:
            d_pis = [] if d_pis is None else list(d_pis)
            if q and not d_pis:
                raise ValueError("this step model needs the decode PIs (d_pis)")
            batch = StepBatch.from_arrays(1, prefill_step=[0] * len(p_pi), prefill_pi=p_pi, prefill_n=p_n,
                                          decode_step=[0] * len(d_pis), decode_pi=d_pis)
            return float(self.step_model.parts(batch).hardware_s[0] * 1e6)
        if kind == "v3":
            if not len(p_n):
                return self.decode_hw_us(q, max_pi, sum_pi)
            return self._step_v3(p_pi, p_n, q, sum_pi)
        if kind == "v4":
            return self._stats_v4(p_pi, p_n, q, max_pi, sum_pi)
        return self._step_v2(p_pi, p_n, q, max_pi, sum_pi, fm_sum, d_pis)

    def step_stats_hw_us(self, p_pi, p_n, q: int = 0, max_pi: int = 0, sum_pi: int = 0, fm_sum=None) -> float:
        """:meth:`step_hw_us` from the decode statistics only (no ``d_pis``); bound per kind at construction."""
        return self.step_hw_us(p_pi, p_n, q, max_pi, sum_pi, None, fm_sum)

    def _cache_part(self, key, part: tuple) -> tuple:
        if len(self._pcache) >= _PCACHE_MAX:
            self._pcache.clear()
        self._pcache[key] = part
        return part

    def _prefill_v2(self, key, p_pi, p_n) -> tuple:
        """``(prefill time, its attention, its dynamic bytes, its tokens)`` of v2 prefill entries (cached by key).

        The prefill phase of a v2 step depends on its prefill entries only (spec §3.4).
        """
        s, L, flops, k_tok = self.s, self.L, self.flops, self.k_tok
        bucket_rule = self.options.prefill_attention == "bucket"
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
        p_mem = (self.ws + p_dyn * s) / self.bw
        p_time = p_comp if p_comp >= p_mem else p_mem
        return self._cache_part(key, (p_time, p_attn, p_dyn, p_tok))

    def _step_v2(self, p_pi, p_n, q: int = 0, max_pi: int = 0, sum_pi: int = 0, fm_sum=None, d_pis=None) -> float:
        kind = self.kind
        s, L, flops, bw, k_tok = self.s, self.L, self.flops, self.bw, self.k_tok
        o = self.options
        d_time = d_attn = d_dyn = 0.0
        if q:
            if kind == "max_context":
                row = self._comp_lists.get(q)
                if row is None or max_pi >= len(row):
                    row = self._comp_list(q, max_pi)
                d_comp = row[max_pi]
                if o.mixed_rule == "additive":
                    d_attn = self.c4 * q * max_pi * L / (flops * self._mfu_list(q, max_pi)[max_pi]) * s
            else:
                if d_pis is not None:
                    fm_sum = self.fm_of(q, d_pis)
                elif fm_sum is None:
                    raise ValueError("the per_request rule needs fm_sum (or d_pis)")
                d_attn = self._attn_pr(sum_pi, fm_sum)
                d_comp = self.gemm_s(q) + d_attn
            if d_pis is not None and q > 1:  # entry by entry, as the reference sums
                for pi in d_pis:
                    d_dyn += (k_tok * 1.0 + (k_tok * pi) * 0.8) + self.act1
            else:
                d_dyn = (k_tok * q + (k_tok * sum_pi) * 0.8) + self.act1 * q
            d_mem = (self.ws + d_dyn * s) / bw
            d_time = d_comp if d_comp >= d_mem else d_mem
        if not len(p_n):
            return d_time * 1e6
        key = (p_pi[0], p_n[0]) if len(p_n) == 1 else (tuple(p_pi), tuple(p_n))
        part = self._pcache.get(key)
        if part is None:
            part = self._prefill_v2(key, p_pi, p_n)
        p_time, p_attn, p_dyn, p_tok = part
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


def _piece(v0: float, v1: float, x0: int, x1: int | None, scale: float, floor: float):
    """Coefficients ``(a, b, x0)`` of the scaled MFU on a piece whose raw MFU runs from ``v0`` to ``v1``.

    ``x1 is None``: a constant piece (below the first or above the last knot).
    ``None`` when the scaled MFU is not affine on the piece: the raw value comes
    within a relative ``_MARGIN`` of the zero-fallback threshold (1e-4), or the
    scaled one crosses (or comes close to) the clip at 1 or the floor.
    """
    lo, hi = min(v0, v1), max(v0, v1)
    if lo < 1e-4 * (1 + _MARGIN):
        return None
    if x1 is None or v0 == v1:  # the reference's value is exactly v0 on the whole piece
        return (max(min(v0 * scale, 1.0), floor), 0.0, x0)
    slo, shi = lo * scale, hi * scale
    if slo >= 1.0 + _MARGIN:
        return (max(1.0, floor), 0.0, x0)
    if shi > 1.0 - _MARGIN:
        return None
    if floor > 0:
        if shi <= floor * (1 - _MARGIN):
            return (floor, 0.0, x0)
        if slo < floor * (1 + _MARGIN):
            return None
    return (v0 * scale, (v1 - v0) * scale / (x1 - x0), x0)


class ContextSet:
    """The contexts of decoding requests, kept as the ``per_request`` rule's sufficient statistics.

    A decoding request ``r`` has context ``PI = c + D`` at decode tick ``D``
    (``c`` is fixed while it decodes).  Per piece of the MFU table's kv axis
    (:attr:`FastSteps.knots`) the set keeps the count and the sums of ``c`` and
    ``c²`` of its members (exact integers), and a heap of the ticks at which a
    member's context reaches the next knot.  :meth:`fm_sum` then gives
    ``Σ f m`` at tick ``D`` in O(number of non-empty pieces), and
    :meth:`segment` the ``Σ f m`` of a run of ticks in which no member moves.

    Parameters
    ----------
    fast : FastSteps
        Of ``kind`` ``"per_request"``.

    Examples
    --------
    >>> from calib.physics import StepModel
    >>> sm = StepModel.build("llama-2-7b-hf", 1, variant="v2.4")
    >>> cs = sm.fast.contexts()
    >>> cs.add(0, 700, 0); cs.add(1, 1500, 0)
    >>> abs(cs.fm_sum(0) / sm.fast.fm_of(2, [700, 1500]) - 1) < 1e-12
    True
    """

    __slots__ = ("fast", "knots", "n", "c1", "c2", "members", "where", "heap", "count", "live")

    def __init__(self, fast: FastSteps):
        self.fast = fast
        self.knots = fast.knots
        n_pieces = len(self.knots) + 1
        self.n = [0] * n_pieces
        self.c1 = [0] * n_pieces
        self.c2 = [0] * n_pieces
        self.members: list[dict[int, int]] = [{} for _ in range(n_pieces)]
        self.where: dict[int, int] = {}  # request -> piece
        self.heap: list[tuple] = []  # (tick of the next knot, request, piece, its last tick)
        self.count = 0
        self.live: list[int] = []  # the non-empty pieces, ascending

    def __len__(self) -> int:
        return self.count

    def add(self, r: int, c: int, D: int, last: int | float = math.inf) -> None:
        """Add request ``r`` with context ``c + D`` at tick ``D``; it decodes no later than tick ``last``.

        ``last`` only saves work: knot crossings after it are not scheduled.
        """
        knots = self.knots
        p = bisect_right(knots, c + D)
        self.where[r] = p
        self.members[p][r] = c
        n = self.n[p]
        if not n:
            insort(self.live, p)
        self.n[p] = n + 1
        self.c1[p] += c
        self.c2[p] += c * c
        self.count += 1
        if p < len(knots) and knots[p] - c <= last:
            heappush(self.heap, (knots[p] - c, r, p, last))

    def remove(self, r: int) -> None:
        """Remove request ``r``."""
        p = self.where.pop(r)
        c = self.members[p].pop(r)
        n = self.n[p] = self.n[p] - 1
        if not n:
            self.live.remove(p)
        self.c1[p] -= c
        self.c2[p] -= c * c
        self.count -= 1

    def clear(self) -> None:
        """Remove every request."""
        self.__init__(self.fast)

    def advance(self, D: int) -> None:
        """Move the requests whose context has reached the next knot by tick ``D``."""
        heap, knots, where, members = self.heap, self.knots, self.where, self.members
        n, c1, c2, live = self.n, self.c1, self.c2, self.live
        while heap and heap[0][0] <= D:
            tick, r, p, last = heappop(heap)
            if where.get(r) != p or knots[p] - members[p].get(r, tick) != tick:
                continue  # stale: the request left (or moved) since
            c = members[p].pop(r)
            n[p] -= 1
            if not n[p]:
                live.remove(p)
            c1[p] -= c
            c2[p] -= c * c
            p += 1
            where[r] = p
            members[p][r] = c
            if not n[p]:
                insort(live, p)
            n[p] += 1
            c1[p] += c
            c2[p] += c * c
            if p < len(knots) and knots[p] - c <= last:
                heappush(heap, (knots[p] - c, r, p, last))

    def horizon(self, D: int) -> int | float:
        """After advancing to tick ``D``: the first tick > ``D`` at which a member moves (``inf`` if none)."""
        heap = self.heap
        if heap and heap[0][0] <= D:
            self.advance(D)
        knots, where, members = self.knots, self.where, self.members
        while heap:
            tick, r, p, _ = heap[0]
            if where.get(r) == p and knots[p] - members[p].get(r, tick) == tick:
                return tick
            heappop(heap)
        return math.inf

    def fm_sum(self, D: int) -> float:
        """``Σ f m`` of the members at tick ``D`` (at batch size ``len(self)``)."""
        if self.heap and self.heap[0][0] <= D:
            self.advance(D)
        q = self.count
        fast = self.fast
        co = fast._coefs.get(q) or fast.piece_coefficients(q)
        reg = 0.0
        irr = 0.0
        n, c1s, c2s = self.n, self.c1, self.c2
        for p in self.live:
            cp = co[p]
            if cp is None:
                irr += self._irregular(p, q, D)
            else:
                a, b, x0 = cp
                c1 = c1s[p]
                reg += a * (c1 + n[p] * D) + b * (c2s[p] + (2 * D - x0) * c1 + n[p] * D * (D - x0))
        return fast.c4L * reg + irr if reg else irr

    def _irregular(self, p: int, q: int, D: int, k: int = 1):
        fast = self.fast
        c4, L = fast.c4, fast.L
        cs = list(self.members[p].values())
        row = fast._mfu_list(q, max(cs) + D + k - 1)
        if k == 1:
            tot = 0.0
            for c in cs:
                pi = c + D
                tot += c4 * pi * L * row[pi]
            return tot
        return [sum(c4 * (c + D + j) * L * row[c + D + j] for c in cs) for j in range(k)]

    def _poly(self, D: int):
        """``Σ PI m`` on the affine pieces at tick ``D + j`` as ``A0 + j (A1 + j A2)``, and the other pieces."""
        co = self.fast.piece_coefficients(self.count)
        A0 = A1 = A2 = 0.0
        irr = []
        n, c1s, c2s = self.n, self.c1, self.c2
        for p in self.live:
            cp = co[p]
            if cp is None:
                irr.append(p)
                continue
            a, b, x0 = cp
            np_ = n[p]
            u1 = c1s[p] + np_ * D
            u2 = c2s[p] + 2 * D * c1s[p] + np_ * D * D
            A0 += a * u1 + b * (u2 - x0 * u1)
            A1 += a * np_ + b * (2 * u1 - np_ * x0)
            A2 += b * np_
        return A0, A1, A2, irr

    def segment(self, D: int, k: int) -> tuple[int, float, float, float, list | None]:
        """Ticks ``D .. D + kk - 1`` (``kk <= k``) in which no member moves, and their ``Σ f m``.

        Returns ``(kk, C0, C1, C2, fms)``: ``Σ f m`` at tick ``D + j`` is
        ``C0 + j (C1 + j C2)`` when ``fms`` is ``None`` (every non-empty piece
        affine), else ``fms[j]`` for ``j < min(kk, SCALAR_RUN)`` (:meth:`fm_series`
        gives the rest).  Advances the set to tick ``D``.
        """
        heap = self.heap
        if heap and heap[0][0] < D + k:  # a member (or a stale entry) reaches a knot within the ticks
            h = self.horizon(D)
            if h - D < k:
                k = h - D
        fast = self.fast
        co = fast._coefs.get(self.count) or fast.piece_coefficients(self.count)
        A0 = A1 = A2 = 0.0
        n, c1s, c2s = self.n, self.c1, self.c2
        for p in self.live:  # _poly, inlined
            cp = co[p]
            if cp is None:
                return k, 0.0, 0.0, 0.0, self.fm_series(D, k if k < SCALAR_RUN else SCALAR_RUN)
            a, b, x0 = cp
            np_ = n[p]
            u1 = c1s[p] + np_ * D
            t0 = c2s[p] + 2 * D * c1s[p] + np_ * D * D - x0 * u1
            A0 += a * u1 + b * t0
            A1 += a * np_ + b * (2 * u1 - np_ * x0)
            A2 += b * np_
        c4L = fast.c4L
        return k, c4L * A0, c4L * A1, c4L * A2, None

    def fm_series(self, D: int, k: int):
        """``Σ f m`` at ticks ``D .. D + k - 1``, for ``k <= horizon(D) - D`` (no member moves meanwhile).

        A list for ``k <= SCALAR_RUN``, else an array.  On affine pieces the sum is a
        quadratic in the tick, evaluated as such.
        """
        A0, A1, A2, irr = self._poly(D)
        fast = self.fast
        c4L = fast.c4L
        q = self.count
        if k <= SCALAR_RUN:
            out = [c4L * (A0 + j * (A1 + j * A2)) for j in range(k)] if (A0 or A1 or A2) else [0.0] * k
            for p in irr:
                vals = self._irregular(p, q, D, k) if k > 1 else [self._irregular(p, q, D)]
                out = [x + y for x, y in zip(out, vals)]
            return out
        j = np.arange(k, dtype=np.float64)
        out = c4L * (A0 + j * (A1 + j * A2)) if (A0 or A1 or A2) else np.zeros(k)
        for p in irr:
            cs = np.fromiter(self.members[p].values(), dtype=np.int64)
            P = cs[None, :] + (D + np.arange(k, dtype=np.int64))[:, None]
            row = fast.decode_mfu_row(q, int(P.max()))
            out = out + (fast.c4 * P.astype(np.float64) * fast.L * row[P]).sum(axis=1)
        return out


def _rebuild(step_model, plain_parts: bool) -> FastSteps:
    """Unpickle a :class:`FastSteps` (its caches are rebuilt on use)."""
    return FastSteps(step_model, plain_parts=plain_parts)
