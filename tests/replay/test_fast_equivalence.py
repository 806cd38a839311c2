"""The fast engine path (aggregated decode statistics, cached step times) against the reference, for every variant.

Reference: the straightforward per-request engine (``run_engine(..., fast=False)``)
timing every step with one plain ``StepModel.parts`` call (``StepTimer(fast=False)``).
Fast: the default engine, whose decode-only runs and mixed steps come from the
decode statistics of :mod:`calib.physics.fast` (``(q, max PI, Σ PI)`` for v2.3,
``(q, Σ PI, Σ f m)`` kept by a ContextSet for v2.4, ``(q, Σ PI)`` for v3).
Every request's TTFT, E2E and start, and every recorded step, must be equal.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calib.physics import StepModel
from calib.physics.overhead import BatchLinear, PerLayer, PrefillDecodeSplit
from calib.replay.engine import BusyPeriods, SchedulerConfig, StepTimer, run_engine

#: name -> (model, tp, options)
VARIANTS = {
    "v2.3": ("llama-2-7b-hf", 1, {"variant": "v2.3"}),
    "v2.4": ("llama-2-7b-hf", 1, {"variant": "v2.4"}),
    "v3": ("llama-2-7b-hf", 1, {"variant": "v3"}),
    "v3-mixtral": ("mixtral-8x7b-v0.1", 2, {"variant": "v3"}),
    "v2.4-34b-tp2": ("codellama-34b-instruct-hf", 2, {"variant": "v2.4"}),
    "v2.4-floor": ("llama-2-7b-hf", 1, {"variant": "v2.4", "mfu_floor": 0.0025}),
    "v2.3-per_request": ("llama-2-7b-hf", 2, {"variant": "v2.3", "decode_attention": "per_request"}),
    "v2.3-additive": ("llama-2-7b-hf", 2, {"variant": "v2.3", "mixed_rule": "additive"}),
    "v4": ("llama-2-7b-hf", 1, {"variant": "v4"}),
    "v4-mixtral-tp2": ("mixtral-8x7b-v0.1", 2, {"variant": "v4"}),
}


@lru_cache(maxsize=None)
def model_of(name: str) -> StepModel:
    m, tp, opts = VARIANTS[name]
    return StepModel.build(m, tp, **opts)


def same(a, b) -> bool:
    return (np.array_equal(a.ttft_us, b.ttft_us, equal_nan=True) and np.array_equal(a.e2e_us, b.e2e_us, equal_nan=True)
            and np.array_equal(a.start_us, b.start_us, equal_nan=True) and np.array_equal(a.rejected, b.rejected)
            and a.n_steps == b.n_steps and a.n_preemptions == b.n_preemptions and a.hit_step_cap == b.hit_step_cap
            and all(np.array_equal(a.steps[k], b.steps[k]) for k in b.steps))


def replay_both(sm, overhead, arr, inp, out, cfg, overlap=False, **kw):
    fast, nxt_f = run_engine(StepTimer(sm, overhead, overlap=overlap), arr, inp, out, cfg, prefix_warm=set(), **kw)
    ref, nxt_r = run_engine(StepTimer(sm, overhead, fast=False, overlap=overlap), arr, inp, out, cfg, fast=False,
                            prefix_warm=set(), **kw)
    assert nxt_f == nxt_r
    return fast, ref


workloads = st.fixed_dictionaries({
    "n": st.integers(1, 12),
    "seed": st.integers(0, 2**31 - 1),
    "rate_us": st.sampled_from([0, 2_000, 30_000, 300_000]),
    "budget": st.sampled_from([64, 512, 2048]),
    "max_running": st.sampled_from([2, 256]),
    "kv_blocks": st.sampled_from([40, 120, 1_000_000]),
    "record": st.booleans(),
    "ahead": st.booleans(),
    "prefix": st.sampled_from([0, 150, "repeat"]),
    "overhead": st.sampled_from(["per_layer", "batch_linear", "split", "none"]),
    "overlap": st.booleans(),
})


def make_case(w):
    rng = np.random.default_rng(w["seed"])
    n = w["n"]
    arr = np.sort(rng.integers(0, max(1, w["rate_us"] * n), n)) if w["rate_us"] else np.zeros(n, np.int64)
    repeat = w["prefix"] == "repeat"  # three prompts sent in turn, each a prefix of itself (eviction at small KV)
    inp = rng.integers(1, 1500, 3)[np.arange(n) % 3] if repeat else rng.integers(1, 1500, n) + w["prefix"]
    out = rng.integers(1, 60, n)
    cfg = SchedulerConfig(max_scheduled_tokens=w["budget"], max_running=w["max_running"], kv_blocks=w["kv_blocks"],
                          record_steps=w["record"], async_scheduling=w["ahead"])
    overhead = {"per_layer": PerLayer(80.0), "batch_linear": BatchLinear(50.0, 3.0),
                "split": PrefillDecodeSplit(200.0, 40.0), "none": None}[w["overhead"]]
    if repeat:
        return arr, inp, out, cfg, overhead, dict(prefix_tokens=inp, prefix_group=np.arange(n) % 3)
    grp = np.where(rng.random(n) < 0.8, rng.integers(0, 2, n), -1)
    return arr, inp, out, cfg, overhead, dict(prefix_tokens=np.full(n, w["prefix"]), prefix_group=grp)


@pytest.mark.parametrize("name", list(VARIANTS))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads)
def test_random_workloads_equal_plain_reference(name, w):
    arr, inp, out, cfg, overhead, kw = make_case(w)
    fast, ref = replay_both(model_of(name), overhead, arr, inp, out, cfg, overlap=w["overlap"], **kw)
    assert same(fast, ref), cfg


@pytest.mark.parametrize("name", ["v2.4", "v2.4-floor", "v2.3-per_request", "v3-mixtral", "v2.3"])
def test_long_runs_across_mfu_knots(name):
    """Long decodes whose contexts cross the kv knots (512, 1024, 4096) during long decode-only runs,
    some cut by arrivals: ContextSet segments, vectorised remainders and cuts inside a segment."""
    sm = model_of(name)
    rng = np.random.default_rng(7)
    n = 8
    arr = np.sort(rng.integers(0, 3_000_000, n))
    inp = rng.choice([300, 500, 900, 1000, 3900, 4000], n)
    out = rng.integers(100, 400, n)
    fast, ref = replay_both(sm, PerLayer(60.0), arr, inp, out, SchedulerConfig(record_steps=True))
    assert same(fast, ref)
    assert fast.steps["batch_size"].max() >= 3


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("name", ["v2.3", "v2.4", "v3", "v3-mixtral", "v4", "v4-mixtral-tp2"])
def test_fast_engine_equals_fast_straightforward_engine_on_bigger_cases(name, overlap):
    """Many requests (the explicit engine with the fast timer: explicit decode contexts per step)."""
    sm = model_of(name)
    rng = np.random.default_rng(3)
    for _ in range(3):
        n = 150
        arr = np.sort(rng.integers(0, 20_000_000, n))
        inp = rng.integers(50, 3000, n)
        out = rng.integers(1, 300, n)
        cfg = SchedulerConfig(max_running=int(rng.choice([16, 128])), kv_blocks=int(rng.choice([600, 10_000])),
                              record_steps=True, async_scheduling=bool(rng.integers(2)))
        a, _ = run_engine(StepTimer(sm, PerLayer(70.0), overlap=overlap), arr, inp, out, cfg)
        b, _ = run_engine(StepTimer(sm, PerLayer(70.0), overlap=overlap), arr, inp, out, cfg, fast=False)
        assert same(a, b)


@pytest.mark.parametrize("name", ["v2.3", "v4", "v4-mixtral-tp2"])
@pytest.mark.parametrize("kv_blocks", [300, 900, 100_000])
@pytest.mark.parametrize("overlap", [False, True])
def test_repeated_prompts_with_eviction(name, kv_blocks, overlap):
    """Twenty prompts sent in turn under load, each cached whole: at small KV caches prefixes are evicted
    (the replays differ from the unbounded cache's) and both engines still agree step for step."""
    sm = model_of(name)
    rng = np.random.default_rng(11)
    n = 240
    arr = np.sort(rng.integers(0, 12_000_000, n))
    prompts = rng.integers(200, 900, 20)
    inp = prompts[np.arange(n) % 20]
    out = rng.integers(20, 200, n)
    kw = dict(prefix_tokens=inp, prefix_group=np.arange(n) % 20)
    cfg = SchedulerConfig(kv_blocks=kv_blocks, record_steps=True, cached_prefill_pi="cached", async_scheduling=True)
    fast, ref = replay_both(sm, PerLayer(70.0), arr, inp, out, cfg, overlap=overlap, **kw)
    assert same(fast, ref)
    unbounded, _ = replay_both(sm, PerLayer(70.0), arr, inp, out, replace(cfg, kv_blocks=1_000_000), overlap=overlap,
                               **kw)
    prefill = fast.steps["prefill_tokens"].sum()
    if kv_blocks < 1000:  # evictions: more prompt tokens computed than with room for every prompt
        assert prefill > unbounded.steps["prefill_tokens"].sum()
    else:
        assert prefill == unbounded.steps["prefill_tokens"].sum()


def periods_equal_fresh_engines(sm, overhead, arr, inp, out, cfg, skip, fast, overlap=False, **kw):
    """Replay the busy periods in order (skipping ``skip`` requests after each) with one :class:`BusyPeriods`
    and with a new engine per period (``run_engine(first=i, stop_when_idle=True)``); returns the periods seen."""
    periods = BusyPeriods(StepTimer(sm, overhead, fast=fast, overlap=overlap), arr, inp, out,
                          replace(cfg, phantom_last_step=False),
                          prefix_warm=(warm_a := set()), fast=fast, **kw)
    warm_b: set = set()
    n, i, seen = len(arr), 0, 0
    while i < n:
        j, ttft, e2e, last = periods.run(i)
        res, nxt = run_engine(StepTimer(sm, overhead, fast=fast, overlap=overlap), arr, inp, out,
                              replace(cfg, phantom_last_step=True),
                              first=i, stop_when_idle=True, prefix_warm=warm_b, fast=fast, **kw)
        assert j == nxt and warm_a == warm_b
        assert np.array_equal(ttft, res.ttft_us[i:j], equal_nan=True)
        # the phantom step of the fresh engine is the period's last step of each request with more than one token
        phantom = np.where(np.maximum(np.asarray(out[i:j]), 1) > 1, last, 0)
        assert np.array_equal(np.asarray(e2e, float) + phantom, res.e2e_us[i:j], equal_nan=True)
        seen += 1
        if res.hit_step_cap:
            break
        i = j + skip
    return seen


@pytest.mark.parametrize("fast", [True, False])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads, skip=st.integers(0, 2))
def test_busy_periods_equal_a_fresh_engine_per_period(fast, w, skip):
    """One engine restarted between busy periods gives what a new engine per period gives (prefix groups,
    small KV caches with preemption and eviction, async scheduling, step records)."""
    arr, inp, out, cfg, overhead, kw = make_case({**w, "rate_us": max(w["rate_us"], 300_000)})
    name = "v2.3" if fast else "v2.4"
    periods_equal_fresh_engines(model_of(name), overhead, arr, inp, out, cfg, skip, fast, overlap=w["overlap"], **kw)


def test_busy_periods_restart_with_prefix_eviction():
    """Repeated prompts in a small KV cache over many busy periods: queue positions are per period."""
    rng = np.random.default_rng(11)
    n = 40
    arr = np.cumsum(rng.choice([1_000, 2_000_000], n, p=[0.7, 0.3]))
    inp = rng.integers(200, 1500, 3)[np.arange(n) % 3]
    out = rng.integers(2, 40, n)
    seen = periods_equal_fresh_engines(model_of("v2.3"), PerLayer(80.0), arr, inp, out, SchedulerConfig(kv_blocks=150),
                                       0, True, prefix_tokens=inp, prefix_group=np.arange(n) % 3)
    assert seen > 3


def test_busy_periods_out_of_order_or_after_the_step_cap_build_a_new_engine():
    sm = model_of("v2.3")
    arr, inp, out = [0, 10, 5_000_000, 5_000_010], [300, 300, 300, 300], [20, 20, 20, 20]
    periods = BusyPeriods(StepTimer(sm, PerLayer(50.0)), arr, inp, out, SchedulerConfig())
    first = periods.run(0)
    assert first[0] == 2 and periods.run(2)[0] == 4
    assert periods.run(0) == first  # back to the start: a new engine
    capped = BusyPeriods(StepTimer(sm, PerLayer(50.0)), arr, inp, out, SchedulerConfig(max_steps=3))
    j, ttft, e2e, _ = capped.run(0)
    assert np.isnan(e2e).all()
    ref, _ = run_engine(StepTimer(sm, PerLayer(50.0)), arr, inp, out, SchedulerConfig(max_steps=3), first=2,
                        stop_when_idle=True)
    assert capped.run(2)[1] == ref.ttft_us[2:4].tolist()
