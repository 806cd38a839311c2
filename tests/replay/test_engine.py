"""calib.replay.engine: hand-checked scheduling cases, KV accounting and preemption, the step cap,
and the fast (aggregated) engine against the straightforward per-step one."""

from __future__ import annotations

import numpy as np
import pytest

from calib.errors import ConfigError
from calib.physics import StepModel
from calib.physics.overhead import BatchLinear, PerLayer, PrefillDecodeSplit
from calib.replay.engine import SchedulerConfig, StepTimer, _Engine, _FastEngine, run_engine

BOTH = pytest.mark.parametrize("fast", [True, False], ids=["fast", "simple"])


class FakeTimer:
    """Known step times: 1000 + 10 µs per prefill token if the step has prefill, plus 100 µs per decode.

    Records the entries of every general step it is asked about.
    """

    aggregate = False
    steps = None

    def __init__(self):
        self.calls = []

    def step_hw_us(self, p_pi, p_n, q=0, max_pi=0, sum_pi=0, d_pis=None):
        d = list(d_pis or [])
        self.calls.append((list(zip(p_pi, p_n)), d))
        return (1000 + 10 * sum(p_n) if len(p_n) else 0) + 100 * len(d)

    def step_us(self, hw, n_prefill, prefill_tokens, n_decode, after_idle=False):
        return int(hw)

    def decode_run_us(self, pis, k):
        return np.full(k, 100.0 * len(pis))

    def run_us(self, hw, n_decode):
        return np.asarray(hw).astype(np.int64)


def replay(arrival, inp, out, cfg=None, fast=True, timer=None, **kw):
    timer = timer or FakeTimer()
    cfg = cfg or SchedulerConfig(record_steps=True)
    res, nxt = run_engine(timer, arrival, inp, out, cfg, fast=fast, **kw)
    return res, timer


def steps_of(res):
    s = res.steps
    return list(zip(s["start_us"].tolist(), s["duration_us"].tolist(), s["batch_size"].tolist(),
                    s["prefill_tokens"].tolist(), s["decode_tokens"].tolist()))


@pytest.fixture(scope="module")
def sm():
    return StepModel.build("llama-2-7b-hf", 1)


# ------------------------------------------------------------------------------------ by hand


@BOTH
def test_one_request_by_hand(fast):
    # prefill 100 tokens: 2000 µs; then O - 1 = 4 decode steps of 100 µs; phantom adds the last once more
    res, _ = replay([0], [100], [5], fast=fast)
    assert res.ttft_us.tolist() == [2000]
    assert res.e2e_us.tolist() == [2000 + 4 * 100 + 100]
    tpot = (res.e2e_us[0] - res.ttft_us[0]) / (5 - 1)
    assert tpot == 125.0
    assert res.n_steps == 5 and res.start_us.tolist() == [0]
    assert steps_of(res) == [(0, 2000, 1, 100, 0)] + [(2000 + 100 * i, 100, 1, 0, 1) for i in range(4)]


@BOTH
def test_phantom_step_switch(fast):
    off, _ = replay([0], [100], [5], SchedulerConfig(phantom_last_step=False), fast=fast)
    assert off.e2e_us.tolist() == [2400]
    one, _ = replay([0], [100], [1], fast=fast)  # a single output token: no decode step, no phantom
    assert one.ttft_us.tolist() == one.e2e_us.tolist() == [2000]


@BOTH
def test_spec_7_5_one_synchronous_request(sm, fast):
    """Spec §7.5: prompt 512, O = 4, PLO 100 (v2.3): TTFT 16466 µs, E2E 48441 µs (phantom on)."""
    res, _ = run_engine(StepTimer(sm, PerLayer(100.0), fast=fast), [0], [512], [4], SchedulerConfig(), fast=fast)
    assert (int(res.ttft_us[0]), int(res.e2e_us[0])) == (16466, 48441)


@BOTH
@pytest.mark.parametrize("mode, shown", [("zero", 0), ("cached", 288)])
def test_prefix_reuse(fast, mode, shown):
    # prefix 300 tokens -> 288 (18 blocks of 16) served from cache once request 0 has prefilled
    cfg = SchedulerConfig(cached_prefill_pi=mode)
    res, timer = replay([0, 100_000], [400, 350], [1, 1], cfg, fast=fast, prefix_tokens=[300, 300],
                        prefix_group=[0, 0])
    assert timer.calls == [([(0, 400)], []), ([(shown, 350 - 288)], [])]
    assert res.ttft_us.tolist() == [5000, 1000 + 10 * 62]
    # no sharing without a group, or with the cache off
    _, t2 = replay([0, 100_000], [400, 350], [1, 1], fast=fast, prefix_tokens=[300, 300], prefix_group=[0, -1])
    _, t3 = replay([0, 100_000], [400, 350], [1, 1], SchedulerConfig(prefix_cache=False), fast=fast,
                   prefix_tokens=[300, 300], prefix_group=[0, 0])
    assert t2.calls[1] == t3.calls[1] == ([(0, 350)], [])


@BOTH
def test_prefix_warm_set_is_used_and_updated(fast):
    warm = set()
    replay([0], [400], [2], fast=fast, prefix_tokens=[300], prefix_group=[7], prefix_warm=warm)
    assert warm == {7}
    _, timer = replay([0], [400], [2], fast=fast, prefix_tokens=[300], prefix_group=[7], prefix_warm={7})
    assert timer.calls[0] == ([(0, 400 - 288)], [])


@BOTH
@pytest.mark.parametrize("between, cached", [(16, 63), (17, 48), (19, 16), (20, 0)])
def test_an_idle_cached_prefix_is_evicted_block_by_block_from_its_end(fast, between, cached):
    """vLLM's free queue: A (4 prefix blocks) is released to the queue behind the 16 blocks free then, its
    last prefix block first; B allocates ``between`` blocks; every allocation past those 16 evicts one more
    block of A's prefix from the end; C (A's prompt again) is served what is left (at most 63 = 64 - 1)."""
    cfg = SchedulerConfig(kv_blocks=20, record_steps=True, cached_prefill_pi="cached")
    res, timer = replay([0, 100_000, 200_000], [64, 16 * between, 64], [1, 1, 1], cfg, fast=fast,
                        prefix_tokens=[64, 0, 64], prefix_group=[0, -1, 0])
    assert timer.calls[2] == ([(cached, 64 - cached)], [])


@pytest.mark.parametrize("engine", [_Engine, _FastEngine])
def test_a_prefix_held_by_a_running_request_is_never_evicted(engine):
    """Past its queue position an idle prefix is evicted from its end; while a request holds it, it is not."""
    cfg = SchedulerConfig(kv_blocks=40, cached_prefill_pi="cached")
    eng = engine(FakeTimer(), [0, 0], [64, 64], [1, 1], cfg, [64, 64], [0, 0], 0, False, {0})
    assert eng.cached_tokens(1) == 63  # warm from outside, never released here: pinned
    eng.qpos[0] = 20  # released behind 20 - 0 allocations' worth of queue
    eng.released, eng.free = 23, 40  # 23 blocks allocated so far: 3 of its 4 blocks evicted
    assert eng.cached_tokens(1) == 16
    assert eng.cached_tokens(1, free=38) == 0  # two more blocks allocated first
    eng.holders[0] = 1
    assert eng.cached_tokens(1) == 63


@BOTH
@pytest.mark.parametrize("ahead, b_step, b_ttft", [(False, 2, 3100), (True, 3, 3200)])
def test_async_scheduling_joins_the_step_after_next(fast, ahead, b_step, b_ttft):
    """B arrives while A's prefill step (0-2000 µs) runs.  Scheduling ahead, the step after it was
    scheduled when it started (A's decode alone, 100 µs): B's prefill is the third step.  A reaches an
    idle engine and is scheduled at once either way."""
    cfg = SchedulerConfig(record_steps=True, async_scheduling=ahead)
    res, timer = replay([0, 500], [100, 50], [10, 2], cfg, fast=fast)
    assert res.ttft_us.tolist() == [2000, b_ttft]
    assert [i for i, st in enumerate(steps_of(res), 1) if st[3] == 50] == [b_step]


@BOTH
def test_chunked_prefill_at_2048_tokens(fast):
    res, timer = replay([0], [5000], [2], fast=fast)
    assert [c[0] for c in timer.calls[:3]] == [[(0, 2048)], [(2048, 2048)], [(4096, 904)]]
    assert res.ttft_us.tolist() == [3 * 1000 + 10 * 5000]
    assert res.n_steps == 4


@BOTH
def test_overlap_gives_mixed_and_batch2_steps(fast):
    # request 1 arrives while request 0's prefill runs: it joins the next step (mixed), then both decode
    res, timer = replay([0, 1500], [100, 50], [5, 3], fast=fast)
    assert steps_of(res) == [
        (0, 2000, 1, 100, 0),
        (2000, 1600, 2, 50, 1),   # decode r0 + prefill r1 (1000 + 500 + 100)
        (3600, 200, 2, 0, 2),
        (3800, 200, 2, 0, 2),     # r1's last decode
        (4000, 100, 1, 0, 1),     # r0 alone
    ]
    assert timer.calls[1] == ([(0, 50)], [100])  # r0 decodes at PI = 100
    assert res.ttft_us.tolist() == [2000, 3600 - 1500]
    assert res.e2e_us.tolist() == [4100 + 100, 4000 - 1500 + 200]


@BOTH
@pytest.mark.parametrize("aggregate", [True, False], ids=["fast-timer", "plain-timer"])
def test_cpu_overlap_hides_the_overhead_behind_the_step_before(fast, aggregate):
    """With ``overlap`` a step that follows another lasts max(hardware, overhead); the first step after an
    idle engine pays both.  A 20 ms CPU overhead outlasts every GPU step here (a 7B model, 100-token prompts):
    r0's prefill (idle engine) is hardware + 20 ms, its decodes 20 ms each, r1's prefill joins r0's last
    decode (not after idle: 20 ms) and r2 arrives at an idle engine again."""
    from calib.physics.overhead import PerSequence

    sm = StepModel.build("llama-2-7b-hf", 1, variant="v4")
    cfg = SchedulerConfig(record_steps=True, async_scheduling=True)
    args = ([0, 30_000, 10_000_000], [100, 100, 100], [4, 2, 2], cfg)
    timer = StepTimer(sm, PerSequence(20_000.0, 0.0), fast=aggregate, overlap=True)
    res, _ = run_engine(timer, *args, fast=fast)
    plain, _ = run_engine(StepTimer(sm, PerSequence(20_000.0, 0.0), fast=aggregate), *args, fast=fast)
    prefill = timer.step_hw_us([0], [100])
    assert prefill < 20_000
    first = round(prefill + 20_000)
    durations = steps_of(res)
    assert [d[1] for d in durations] == [first, 20_000, 20_000, 20_000, 20_000, first, 20_000]
    assert [d[3] for d in durations] == [100, 0, 0, 100, 0, 100, 0]  # r1 (async) joins r0's third decode
    # without overlap every step adds the overhead: each step is longer than the overlapped one
    assert all(p[1] > o[1] for p, o in zip(steps_of(plain)[1:5], durations[1:5]))
    assert res.ttft_us.tolist() == [first, first + 60_000 - 30_000, first]


@BOTH
def test_cpu_overlap_with_a_small_overhead_is_the_hardware_time(fast, sm):
    """An overhead below every step's GPU time disappears from every step but the first after idle."""
    from calib.physics.overhead import PerSequence

    cfg = SchedulerConfig(record_steps=True)
    res, _ = run_engine(StepTimer(sm, PerSequence(1.0, 0.0), overlap=True), [0], [300], [6], cfg, fast=fast)
    bare, _ = run_engine(StepTimer(sm, None), [0], [300], [6], cfg, fast=fast)
    got, want = steps_of(res), steps_of(bare)
    assert got[0][1] == want[0][1] + 1 and [g[1] for g in got[1:]] == [w[1] for w in want[1:]]


@BOTH
def test_max_running_cap_and_fcfs(fast):
    cfg = SchedulerConfig(max_running=1, record_steps=True, phantom_last_step=False)
    res, _ = replay([0, 0, 0], [100, 50, 10], [2, 2, 2], cfg, fast=fast)
    # one at a time, in arrival order: 2000 + 100, then 1500 + 100, then 1100 + 100
    assert res.start_us.tolist() == [0, 2100, 3700]
    assert res.e2e_us.tolist() == [2100, 3700, 4900]
    assert max(res.steps["batch_size"]) == 1


@BOTH
def test_fcfs_head_of_line_blocking(fast):
    # KV 10 blocks of 4: request 1 (30 tokens, 8 blocks) cannot start while request 0 holds 5;
    # request 2 (tiny) must not overtake it
    cfg = SchedulerConfig(block_size=4, kv_blocks=10, phantom_last_step=False)
    res, _ = replay([0, 1, 2], [20, 30, 4], [5, 3, 2], cfg, fast=fast)
    assert not res.rejected.any()
    assert res.start_us[2] >= res.start_us[1] > res.start_us[0]


@BOTH
def test_recompute_preemption_of_most_recent(fast):
    """Two requests share a 6-block KV cache (blocks of 4 tokens).  Worked by hand:

    t=0     both admitted (2 blocks each), prefill 16 tokens: 1160 µs; first tokens
    t=1160  decode x2 (each takes a 3rd block: free 0) ... four batch-2 decodes of 200 µs
    t=1960  r0 needs a 4th block, none free: the most recently admitted (r1, 3 blocks) is preempted;
            r0 decodes alone (100 µs) and finishes at 2060 (E2E 2060 + phantom 100)
    t=2060  r1 readmitted: recomputes prompt + 5 generated = 13 tokens (1130 µs), which yields its
            6th and last token at 3190 (E2E 3190 + phantom 1130); its TTFT stays 1160
    """
    cfg = SchedulerConfig(block_size=4, kv_blocks=6, record_steps=True)
    res, timer = replay([0, 0], [8, 8], [6, 6], cfg, fast=fast)
    assert res.n_preemptions == 1
    assert res.ttft_us.tolist() == [1160, 1160]
    assert res.e2e_us.tolist() == [2160, 3190 + 1130]
    assert res.n_steps == 7
    assert steps_of(res)[-2:] == [(1960, 100, 1, 0, 1), (2060, 1130, 1, 13, 0)]
    assert timer.calls[-1] == ([(0, 13)], [])


@BOTH
def test_preemption_victim_can_be_the_requester(fast):
    """r1 (admitted last) needs a block, none is free: r1 itself is preempted, r0 keeps running.

    t=0 prefill 18 tokens (1180); t=1180 r1 needs its 3rd block, free 0 -> r1 preempted (target 9);
    r0 decodes at 1180 and 1280 and finishes at 1380 (E2E 1480); r1 recomputes 9 tokens (1090 µs,
    its 2nd token) then decodes 4 times: finishes at 2870 (E2E 2970).
    """
    cfg = SchedulerConfig(block_size=4, kv_blocks=5)
    res, _ = replay([0, 0], [10, 8], [3, 6], cfg, fast=fast)
    assert res.n_preemptions == 1
    assert res.ttft_us.tolist() == [1180, 1180]
    assert res.e2e_us.tolist() == [1480, 2970]
    assert res.n_steps == 8


@pytest.mark.parametrize("cls", [_FastEngine, _Engine])
def test_kv_blocks_all_returned(cls):
    cfg = SchedulerConfig(block_size=4, kv_blocks=12)
    rng = np.random.default_rng(3)
    arr = np.sort(rng.integers(0, 20_000, 30))
    eng = cls(FakeTimer(), arr, rng.integers(1, 30, 30), rng.integers(1, 20, 30), cfg, None, None, 0, False, None)
    res, _ = eng.run()
    assert res.n_preemptions > 0 and not np.isnan(res.e2e_us).any()
    assert eng.free == cfg.kv_blocks


@BOTH
def test_rejection_of_requests_that_can_never_fit(fast):
    # 3 blocks of 4 = 12 tokens: a request needs input + output - 1 tokens of KV
    cfg = SchedulerConfig(block_size=4, kv_blocks=3)
    res, _ = replay([0, 0, 0], [10, 10, 5], [3, 4, 2], cfg, fast=fast)
    assert res.rejected.tolist() == [False, True, False]
    assert res.n_rejected == 1
    assert np.isnan(res.e2e_us[1]) and np.isnan(res.ttft_us[1]) and not np.isnan(res.e2e_us[[0, 2]]).any()


@BOTH
def test_kv_cache_too_small_for_anything_ends(fast):
    res, _ = replay([0, 5], [100, 200], [10, 10], SchedulerConfig(block_size=16, kv_blocks=1), fast=fast)
    assert res.rejected.all() and res.n_steps == 0


@BOTH
def test_step_cap(fast):
    cfg = SchedulerConfig(max_steps=5)
    res, _ = replay([0, 0], [100, 100], [50, 50], cfg, fast=fast)
    assert res.hit_step_cap and res.n_steps == 5
    assert np.isnan(res.e2e_us).all() and not np.isnan(res.ttft_us).any()
    # a replay that ends exactly at the cap did not hit it
    done, _ = replay([0], [100], [5], SchedulerConfig(max_steps=5), fast=fast)
    assert not done.hit_step_cap and done.n_steps == 5


def test_stop_when_idle_returns_one_busy_period():
    res, nxt = run_engine(FakeTimer(), [0, 1000, 100_000], [100, 50, 10], [3, 3, 3], SchedulerConfig(),
                          stop_when_idle=True)
    assert nxt == 2 and not np.isnan(res.e2e_us[:2]).any() and np.isnan(res.e2e_us[2])
    res2, nxt2 = run_engine(FakeTimer(), [0, 1000, 100_000], [100, 50, 10], [3, 3, 3], SchedulerConfig(),
                            first=2, stop_when_idle=True)
    assert nxt2 == 3 and res2.ttft_us[2] == 1100


def test_config_validation():
    for bad in ({"max_running": 0}, {"kv_blocks": 0}, {"block_size": True}, {"max_steps": 1.5},
                {"cached_prefill_pi": "x"}):
        with pytest.raises(ConfigError):
            SchedulerConfig(**bad)


# ------------------------------------------------------------------------ fast == straightforward


def _random_case(rng):
    n = int(rng.integers(1, 30))
    arr = np.sort(rng.integers(0, 1_500_000, n))
    if rng.random() < 0.3:
        arr[:] = 0
    pre = int(rng.choice([0, 100, 500]))
    inp = rng.integers(1, 2500, n) + pre
    out = rng.integers(1, 200, n)
    bs = int(rng.choice([1, 4, 16]))
    cfg = SchedulerConfig(
        max_scheduled_tokens=int(rng.choice([3, 64, 512, 2048])),
        max_running=int(rng.choice([1, 3, 256])),
        block_size=bs,
        kv_blocks=int(rng.choice([60, 300, 1_000_000])) * (16 // bs),
        prefix_cache=bool(rng.random() < 0.7),
        cached_prefill_pi=str(rng.choice(["zero", "cached"])),
        phantom_last_step=bool(rng.random() < 0.5),
        max_steps=int(rng.choice([50, 50_000_000])),
        record_steps=True,
    )
    grp = np.where(rng.random(n) < 0.7, rng.integers(0, 2, n), -1)
    return arr, inp, out, cfg, np.full(n, pre), grp


def _same(a, b):
    return (np.array_equal(a.ttft_us, b.ttft_us, equal_nan=True) and np.array_equal(a.e2e_us, b.e2e_us, equal_nan=True)
            and np.array_equal(a.start_us, b.start_us, equal_nan=True) and np.array_equal(a.rejected, b.rejected)
            and a.n_steps == b.n_steps and a.n_preemptions == b.n_preemptions and a.hit_step_cap == b.hit_step_cap
            and all(np.array_equal(a.steps[k], b.steps[k]) for k in b.steps))


@pytest.mark.parametrize("variant", ["v2.3", "v2.4", "per_request", "v3", "v3-mixtral"])
def test_fast_engine_equals_straightforward_engine(variant):
    if variant == "per_request":
        sm = StepModel.build("llama-2-7b-hf", 2, decode_attention="per_request")
    elif variant == "v3-mixtral":
        sm = StepModel.build("mixtral-8x7b-v0.1", 2, variant="v3")
    else:
        sm = StepModel.build("qwen2.5-7b-instruct", 1, variant=variant)
    rng = np.random.default_rng({"v2.3": 1, "v2.4": 2, "per_request": 3, "v3": 4, "v3-mixtral": 5}[variant])
    preemptions = 0
    for _ in range(25):
        arr, inp, out, cfg, pre, grp = _random_case(rng)
        ovh = [PerLayer(float(rng.uniform(0, 300))), BatchLinear(50, 3), PrefillDecodeSplit(200, 50)][rng.integers(3)]
        got = [run_engine(StepTimer(sm, ovh), arr, inp, out, cfg, prefix_tokens=pre, prefix_group=grp,
                          fast=fast, prefix_warm=set()) for fast in (True, False)]
        assert got[0][1] == got[1][1]
        assert _same(got[0][0], got[1][0]), cfg
        res = got[0][0]
        assert res.hit_step_cap or (~np.isnan(res.e2e_us) | res.rejected).all()
        preemptions += res.n_preemptions
    assert preemptions > 0


def test_fast_engine_equals_fake_timer_engine():
    rng = np.random.default_rng(11)
    for _ in range(40):
        arr, inp, out, cfg, pre, grp = _random_case(rng)
        a, _ = replay(arr, inp, out, cfg, fast=True, prefix_tokens=pre, prefix_group=grp)
        b, _ = replay(arr, inp, out, cfg, fast=False, prefix_tokens=pre, prefix_group=grp)
        assert _same(a, b), cfg


def test_plain_timer_equals_fast_timer(sm):
    """``StepTimer(fast=False)`` (one StepModel.parts call per step) gives the same integer µs."""
    rng = np.random.default_rng(5)
    arr = np.sort(rng.integers(0, 400_000, 8))
    inp, out = rng.integers(10, 3000, 8), rng.integers(2, 40, 8)
    cfg = SchedulerConfig(record_steps=True)
    a, _ = run_engine(StepTimer(sm, PerLayer(80.0)), arr, inp, out, cfg)
    b, _ = run_engine(StepTimer(sm, PerLayer(80.0), fast=False), arr, inp, out, cfg, fast=False)
    assert _same(a, b)
    assert a.steps["batch_size"].max() >= 2


# ------------------------------------------------------------------------------ the step times
# (FastSteps against StepModel.parts step by step: tests/physics/test_fast.py)


@pytest.mark.parametrize("name, model, tp", [("v3", "llama-2-7b-hf", 1), ("v3", "mixtral-8x7b-v0.1", 2),
                                             ("v2.4", "llama-2-7b-hf", 1)])
def test_every_variant_runs_the_aggregate_path(name, model, tp):
    """v3 (dense and MoE) and v2.4 have a fast path too; it equals the plain timer step for step."""
    sm = StepModel.build(model, tp, variant=name)
    timer = StepTimer(sm, PerLayer(50.0))
    assert timer.aggregate and sm.fast.kind is not None
    arr, inp, out = [0, 20_000, 25_000], [300, 900, 1500], [20, 10, 40]
    cfg = SchedulerConfig(record_steps=True)
    res, _ = run_engine(timer, arr, inp, out, cfg)
    ref_res, _ = run_engine(StepTimer(sm, PerLayer(50.0), fast=False), arr, inp, out, cfg, fast=False)
    assert _same(res, ref_res)
    assert res.steps["batch_size"].max() == 3


def test_timer_has_no_memo_parameter(sm):
    with pytest.raises(TypeError):
        StepTimer(sm, PerLayer(1.0), {})


def test_timer_overhead_memo_and_prime(sm):
    timer = StepTimer(sm, BatchLinear(10.0, 2.0))
    timer.prime([1, 0], [300, 0], [2, 5])
    assert timer._ovh[(1, 300, 2)] == (10.0 + 2.0 * 3) * 32
    assert timer.overhead_us(0, 0, 5) == (10.0 + 2.0 * 5) * 32
    assert timer.step_us(1000.4, 0, 0, 5) == 1000 + 640
    assert StepTimer(sm, None).step_us(1000.5, 0, 0, 1) == 1001
