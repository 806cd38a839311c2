"""calib.physics.fast: the one-step-at-a-time evaluation against the vectorised reference physics.

Every variant (v2.3, v2.4, v3, and option combinations that reach the
non-affine MFU paths), several models (dense, GQA, TP > 1, mixture-of-experts),
and random batches: general steps from explicit decode contexts and from the
decode statistics (:class:`~calib.physics.fast.ContextSet`), decode-only steps
and runs, the per-piece MFU coefficients and the knot crossings of a
ContextSet.  Exact means bit-identical, or within 1e-12 relative where the
reference sums entry by entry and the fast path in closed form.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calib.physics import StepBatch, StepModel
from calib.physics.fast import SCALAR_RUN, FastSteps, round_half_away_scalar
from calib.physics.roofline import _scaled
from calib.physics.roofline_v3 import decode_flops_terms, flops_v3
from calib.specs import load_model

REL = 1e-12

#: name -> (model, tp, options)
CASES = {
    "v2.3": ("llama-2-7b-hf", 1, {"variant": "v2.3"}),
    "v2.4": ("llama-2-7b-hf", 1, {"variant": "v2.4"}),
    "v3": ("llama-2-7b-hf", 1, {"variant": "v3"}),
    "v3-mixtral": ("mixtral-8x7b-v0.1", 2, {"variant": "v3"}),
    "v2.4-mixtral": ("mixtral-8x7b-v0.1", 2, {"variant": "v2.4"}),
    "v2.3-70b-tp4": ("llama-2-70b-hf", 4, {"variant": "v2.3"}),
    "v2.4-34b-tp2": ("codellama-34b-instruct-hf", 2, {"variant": "v2.4"}),
    "v3-34b-tp2": ("codellama-34b-instruct-hf", 2, {"variant": "v3", "bw_efficiency": 0.8, "mfu_decode": 0.2}),
    "v2.4-qwen": ("qwen2.5-7b-instruct", 1, {"variant": "v2.4"}),
    "v2.3-additive": ("llama-2-7b-hf", 2, {"variant": "v2.3", "mixed_rule": "additive"}),
    "v2.3-interp-max-actual": ("llama-2-7b-hf", 2, {"variant": "v2.3", "mixed_rule": "max",
                                                    "prefill_attention": "actual", "mfu_rule": "interp"}),
    "v2.4-max_context-scaled": ("llama-2-7b-hf", 2, {"variant": "v2.4", "decode_attention": "max_context",
                                                     "gemm_mfu_scale": 1.3, "mfu_floor": 0.05}),
    "v2.3-per_request-nearest": ("llama-2-7b-hf", 2, {"variant": "v2.3", "decode_attention": "per_request",
                                                      "bw_efficiency": 0.9}),
    # the decode MFU crosses the floor (0.0025) or the clip at 1 (x 500) inside some pieces
    "v2.4-floor": ("llama-2-7b-hf", 1, {"variant": "v2.4", "mfu_floor": 0.0025}),
    "v2.4-clip": ("llama-2-7b-hf", 1, {"variant": "v2.4", "decode_attention_mfu_scale": 500.0}),
    "v2.4-additive": ("llama-2-7b-hf", 4, {"variant": "v2.4", "mixed_rule": "additive"}),
    "v4": ("llama-2-7b-hf", 1, {"variant": "v4"}),
    "v4-mixtral": ("mixtral-8x7b-v0.1", 2, {"variant": "v4"}),
    "v4-70b-tp4-table": ("llama-2-70b-hf", 4, {"variant": "v4", "gemm_mfu_source": "table", "kernel_floor_us": 0.0}),
}
#: kinds whose fast path is bit-identical to the vectorised model
EXACT = ("v3", "v4")
PER_REQUEST = [k for k, (_, _, o) in CASES.items()
               if o.get("decode_attention", "per_request" if o["variant"] == "v2.4" else "") == "per_request"]


@lru_cache(maxsize=None)
def model_of(name: str) -> StepModel:
    m, tp, opts = CASES[name]
    return StepModel.build(m, tp, **opts)


def ref_us(sm: StepModel, prefill, decode) -> float:
    return float(sm.parts(StepBatch.single(prefill, decode)).hardware_s[0] * 1e6)


def close(got: float, ref: float, exact: bool) -> bool:
    return got == ref if exact else abs(got - ref) <= REL * abs(ref)


def stats_of(sm: StepModel, d_pis, D: int = 0):
    """``(q, max PI, Σ PI, Σ f m)`` of decode contexts, ``Σ f m`` from a ContextSet at tick ``D``."""
    f = sm.fast
    cs = f.contexts()
    if cs is not None:
        for r, pi in enumerate(d_pis):
            cs.add(r, pi - D, D)
    q = len(d_pis)
    fm = cs.fm_sum(D) if cs is not None and q else None
    return q, (max(d_pis) if q else 0), sum(d_pis), fm


steps_strategy = st.fixed_dictionaries({
    "prefill": st.lists(st.tuples(st.integers(0, 9000), st.integers(1, 3000)), max_size=3),
    "decode": st.one_of(st.lists(st.integers(1, 20000), max_size=3),
                        st.lists(st.integers(1, 20000), min_size=4, max_size=160)),
    "D": st.integers(0, 50000),
})


# ------------------------------------------------------------------------------------ kinds


def test_every_variant_has_a_fast_path():
    kinds = {name: model_of(name).fast.kind for name in CASES}
    assert kinds["v2.3"] == "max_context" and kinds["v2.4"] == "per_request" and kinds["v3"] == "v3"
    assert kinds["v4"] == "v4" and kinds["v4-mixtral"] == "v4"
    assert kinds["v3-mixtral"] == "v3" and all(k is not None for k in kinds.values())


def test_subclass_overriding_parts_falls_back():
    class Custom(StepModel):
        def parts(self, batch):
            return StepModel.parts(self, batch)

    base = model_of("v2.4")
    sm = Custom(base.model, base.hardware, base.mfu, base.tp, base.options)
    assert sm.fast.kind is None and not sm.fast.aggregate
    ref = ref_us(base, [(0, 300)], [700, 900])
    assert sm.fast.step_hw_us([0], [300], d_pis=[700, 900]) == ref
    with pytest.raises(ValueError):
        sm.fast.step_hw_us([0], [300], q=2)


# ------------------------------------------------------------------------------------ one step


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=steps_strategy)
def test_general_step_equals_reference(name, case):
    """Explicit contexts and decode statistics both reproduce ``StepModel.parts``."""
    sm = model_of(name)
    f = sm.fast
    prefill, decode, D = case["prefill"], case["decode"], case["D"]
    if not prefill and not decode:
        decode = [1000]
    ref = ref_us(sm, prefill, decode)
    p_pi, p_n = [p for p, _ in prefill], [n for _, n in prefill]
    v3 = f.kind in EXACT
    explicit = f.step_hw_us(p_pi, p_n, d_pis=decode)
    assert close(explicit, ref, exact=v3 or len(decode) <= 1), (explicit, ref)
    q, mx, sm_, fm = stats_of(sm, decode, D)
    from_stats = f.step_stats_hw_us(p_pi, p_n, q, mx, sm_, fm)
    assert close(from_stats, ref, exact=v3 or (len(decode) <= 1 and f.kind != "per_request")), (from_stats, ref)
    if not prefill:
        assert f.decode_hw_us(q, mx, sm_, fm) == from_stats


@pytest.mark.parametrize("name", ["v2.3", "v2.4", "v3", "v3-mixtral", "v4", "v4-mixtral"])
def test_steps_at_most_one_decode_entry_are_bit_identical(name):
    sm = model_of(name)
    f = sm.fast
    rng = np.random.default_rng(4)
    for _ in range(200):
        prefill = [(int(rng.integers(0, 5000)), int(rng.integers(1, 3000)))] if rng.random() < 0.6 else []
        decode = [int(rng.integers(1, 20000))] if rng.random() < 0.7 or not prefill else []
        ref = ref_us(sm, prefill, decode)
        assert f.step_hw_us([p for p, _ in prefill], [n for _, n in prefill], d_pis=decode) == ref


def test_v3_mixture_of_experts_weights_follow_the_step_tokens():
    """Mixtral under v3: the same decode set costs more with a prefill chunk (more experts loaded)."""
    sm = model_of("v3-mixtral")
    f = sm.fast
    decode = [900, 1500, 3000]
    alone = f.step_stats_hw_us([], [], 3, 3000, sum(decode))
    with_prefill = f.step_stats_hw_us([0], [8], 3, 3000, sum(decode))
    assert alone == ref_us(sm, [], decode) and with_prefill == ref_us(sm, [(0, 8)], decode)
    assert with_prefill > alone
    for tokens in (0, 1, 2, 5, 64, 3000):
        from calib.physics.roofline_v3 import weight_bytes_v3

        assert f.weight_bytes(tokens) == float(weight_bytes_v3(sm.model, [tokens])[0])


@pytest.mark.parametrize("name", ["llama-2-7b-hf", "mixtral-8x7b-v0.1", "llama-2-70b-hf", "qwen3-14b"])
def test_v3_decode_flops_are_affine_in_the_context(name):
    m = load_model(name)
    f0, f1 = decode_flops_terms(m)
    pis = np.array([0, 1, 17, 1000, 4096, 131071])
    assert (flops_v3(m, pis, np.ones(len(pis))) == np.array([float(f0 + f1 * p) for p in pis])).all()


# ------------------------------------------------------------------------------------ decode runs


@pytest.mark.parametrize("name", list(CASES))
def test_decode_runs_equal_reference(name):
    sm = model_of(name)
    f = sm.fast
    rng = np.random.default_rng(1)
    for _ in range(12):
        q, k = int(rng.integers(1, 70)), int(rng.integers(1, 40))
        pis = rng.integers(1, 9000, q)
        steps = np.repeat(np.arange(k), q)
        dpi = (pis[None, :] + np.arange(k)[:, None]).reshape(-1)
        e = np.zeros(0, np.int64)
        ref = sm.parts(StepBatch(k, e, e, e, steps, dpi)).hardware_s * 1e6
        np.testing.assert_allclose(f.decode_run_pr_hw_us(pis, k), ref, rtol=REL)
        fms = [f.fm_of(q, (pis + j).tolist()) for j in range(k)] if f.needs_contexts else None
        vec = f.decode_run_hw_us(q, int(pis.max()), int(pis.sum()), k, fms)
        one = [f.decode_hw_us(q, int(pis.max()) + j, int(pis.sum()) + q * j, 0.0 if fms is None else fms[j])
               for j in range(k)]
        np.testing.assert_allclose(vec, ref, rtol=REL)
        assert np.array_equal(vec, one)  # the vectorised run and the one-step function agree exactly
        if f.kind in EXACT:
            assert np.array_equal(vec, ref)


@pytest.mark.parametrize("name", ["v2.3", "v2.4", "v3", "v3-mixtral", "v2.4-floor", "v2.3-per_request-nearest",
                                  "v4", "v4-mixtral"])
def test_solo_decode_row_is_bit_identical(name):
    sm = model_of(name)
    pis = np.arange(1, 5000, 7)
    ref = sm.parts(StepBatch.solo_decode(pis)).hardware_s * 1e6
    assert np.array_equal(sm.fast.solo_decode_row(int(pis.max()))[pis], ref)


# ------------------------------------------------------------------------------------ per_request statistics


@pytest.mark.parametrize("name", PER_REQUEST)
def test_piece_coefficients_are_the_reference_mfu(name):
    """On every affine piece, ``a + b (PI - x0)`` is the scaled decode MFU of the reference at each integer PI."""
    sm = model_of(name)
    f = sm.fast
    o = sm.options
    knots = [0] + f.knots + [f.knots[-1] + 20000]
    checked = 0
    for q in [1, 2, 3, 7, 15, 16, 17, 31, 64, 100, 128, 129, 200, 511, 512, 600]:
        co = f.piece_coefficients(q)
        assert len(co) == len(f.knots) + 1
        if q == 1:
            assert all(c is None for c in co)
        for p, c in enumerate(co):
            if c is None:
                continue
            lo, hi = knots[p], min(knots[p + 1], knots[p] + 6000)
            kv = np.arange(lo, hi, dtype=np.float64)
            ref = _scaled(sm.mfu.decode_mfu(f.key, sm.tp, q, kv, rule=o.mfu_rule, tp_fallback=o.tp_fallback),
                          o.decode_attention_mfu_scale, o.mfu_floor)
            a, b, x0 = c
            np.testing.assert_allclose(a + b * (kv - x0), ref, rtol=1e-12)
            checked += 1
    assert checked > 0 or o.mfu_rule == "nearest"


def test_irregular_pieces_exist_where_the_mfu_is_not_affine():
    assert all(c is None for c in model_of("v2.3-per_request-nearest").fast.piece_coefficients(5))
    assert any(c is None for c in model_of("v2.4-floor").fast.piece_coefficients(5))
    assert any(c is None for c in model_of("v2.4-clip").fast.piece_coefficients(5))
    assert all(c is not None for c in model_of("v2.4").fast.piece_coefficients(5))


@pytest.mark.parametrize("name", PER_REQUEST)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_context_set_follows_requests_across_knots(name, data):
    """Random adds, removals and ticks: ``fm_sum`` and ``segment`` equal the request-by-request sum."""
    sm = model_of(name)
    f = sm.fast
    cs = f.contexts()
    live: dict[int, int] = {}  # r -> c
    D = data.draw(st.integers(0, 3000))
    nxt = 0
    for _ in range(data.draw(st.integers(1, 25))):
        action = data.draw(st.sampled_from(["add", "add", "remove", "tick"]))
        if action == "add" or not live:
            pi = data.draw(st.integers(1, 9000))
            cs.add(nxt, pi - D, D)
            live[nxt] = pi - D
            nxt += 1
        elif action == "remove":
            r = data.draw(st.sampled_from(sorted(live)))
            cs.remove(r)
            del live[r]
        else:
            D += data.draw(st.integers(1, 1500))
        if not live:
            continue
        q = len(live)
        pis = [c + D for c in live.values()]
        ref = f.fm_of(q, pis)
        assert len(cs) == q
        assert abs(cs.fm_sum(D) - ref) <= REL * ref
        kk, C0, C1, C2, fms = cs.segment(D, 60)
        assert 1 <= kk <= 60
        for j in range(kk):
            want = f.fm_of(q, [p + j for p in pis])
            got = (C0 + j * (C1 + j * C2)) if fms is None else (fms[j] if j < SCALAR_RUN
                                                                else cs.fm_series(D, kk)[j])
            assert abs(got - want) <= 1e-11 * want
        if kk < 60:  # the segment ends where a context reaches a knot
            assert any(p + kk in f.knots for p in pis)


def test_context_set_clear_and_stale_entries():
    f = model_of("v2.4").fast
    cs = f.contexts()
    cs.add(0, 1000, 0)
    cs.add(1, 3000, 0)
    cs.remove(0)
    cs.add(0, 1000, 0)  # re-added with the same context: one stale heap entry, one live
    assert cs.horizon(0) == 1024 - 1000  # request 0 reaches the knot 1024 first
    assert abs(cs.fm_sum(100) / f.fm_of(2, [1100, 3100]) - 1) < REL
    assert cs.horizon(100) == 4096 - 3000  # then request 1 reaches 4096 (ticks only move forward)
    cs.clear()
    assert len(cs) == 0 and cs.horizon(0) == float("inf")


# ------------------------------------------------------------------------------------ misc


def test_rounding_helper():
    assert [round_half_away_scalar(x) for x in (0.5, 1.5, 2.5, -0.5, -1.5, 0.0, 2.4999)] == [1, 2, 3, -1, -2, 0, 2]


def test_pickled_fast_steps_rebuild_their_caches():
    import pickle

    sm = model_of("v2.4")
    sm.fast.step_hw_us([0], [300], d_pis=[700, 900])
    f2 = pickle.loads(pickle.dumps(sm.fast))
    assert isinstance(f2, FastSteps) and f2.kind == "per_request" and not f2._pcache
    assert f2.step_hw_us([0], [300], d_pis=[700, 900]) == sm.fast.step_hw_us([0], [300], d_pis=[700, 900])
