"""calib.replay.synchronous: the cached solo-step replay, its busy periods through the engine, and its
agreement with a plain engine replay of every request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calib.errors import DataError
from calib.physics import StepModel
from calib.physics.overhead import BatchLinear, PerLayer
from calib.replay.engine import SchedulerConfig, StepTimer, run_engine
from calib.replay.synchronous import SyncReplay, SyncRequests, fixed_interval_arrivals

REPO = Path(__file__).resolve().parents[2]
EMBEDDED_LENGTHS = REPO / "configs" / "datasets" / "hg1" / "request_lengths.json"
SHARED_HG1 = (REPO / ".." / "shared" / "data" / "hg1").resolve()

# (workload, prefix tokens, measured E2E mean ms -> rate, model, tp): a chat, a code and a summarization experiment
WORKLOADS = [
    ("chatsweep", 284, 1292.6, "llama-2-7b-hf", 1),
    ("codesweep", 0, 334.0, "llama-2-7b-hf", 1),
    ("summarization", 820, 3532.7, "qwen2.5-7b-instruct", 1),
]


def lengths_of(workload: str) -> np.ndarray:
    from calib.data.lengths import reference_lengths

    if EMBEDDED_LENGTHS.is_file():
        return reference_lengths(workload, 42)
    shared = SHARED_HG1 / "reference_request_lengths.json"
    if not shared.is_file():
        pytest.skip("no reference request lengths (embedded or ../shared/data/hg1)")
    return reference_lengths(workload, 42, path=shared)


def engine_replay(sm, req: SyncRequests, overhead, sched: SchedulerConfig, fast=True):
    grp = np.zeros(req.n, np.int64) if req.prefix_tokens and sched.prefix_cache else np.full(req.n, -1)
    res, nxt = run_engine(StepTimer(sm, overhead, fast=fast), req.arrival_us, req.input_tokens, req.output_tokens,
                          sched, prefix_tokens=np.full(req.n, req.prefix_tokens), prefix_group=grp, fast=fast)
    assert nxt == req.n
    return res


@pytest.fixture(scope="module")
def sm():
    return StepModel.build("llama-2-7b-hf", 1)


def test_fixed_interval_arrivals():
    assert fixed_interval_arrivals(3, 0.773634).tolist() == [0, 1292600, 2585200]
    with pytest.raises(DataError):
        fixed_interval_arrivals(3, 0.0)


def test_requests_validation():
    req = SyncRequests.from_lengths([[10, 3], [0, 1]], rate=2.0, prefix_tokens=5)
    assert req.input_tokens.tolist() == [15, 5] and req.arrival_us.tolist() == [0, 500_000]
    for bad in ([[10, 0]], [[-1, 3]], np.zeros((0, 2)), [[0, 3]]):
        with pytest.raises(DataError):
            SyncRequests.from_lengths(bad, rate=1.0)


def test_spec_7_5_one_request(sm):
    times = SyncReplay(sm, SyncRequests.from_lengths([[512, 4]], rate=1.0)).run(PerLayer(100.0))
    assert (int(times.ttft_us[0]), int(times.e2e_us[0])) == (16466, 48441)
    assert times.overlapped == 0
    assert times.itl_us[0] == (48441 - 16466) / 3


def test_independent_requests_need_no_engine(sm):
    # one request per minute: every request ends before the next arrives
    req = SyncRequests.from_lengths([[300, 20], [3000, 5], [50, 1]], rate=1 / 60, prefix_tokens=100)
    rep = SyncReplay(sm, req)
    times = rep.run(PerLayer(50.0))
    assert times.overlapped == 0
    ref = engine_replay(sm, req, PerLayer(50.0), SchedulerConfig())
    assert np.array_equal(times.ttft_us, ref.ttft_us) and np.array_equal(times.e2e_us, ref.e2e_us)
    assert np.isnan(times.itl_us[2])  # one output token


def test_overlap_is_replayed_through_the_engine(sm):
    # 10 requests, arriving faster than they run: batch-2 decode and mixed steps
    lengths = np.array([[400, 60], [900, 30], [100, 80], [2500, 10], [50, 50]] * 2)
    req = SyncRequests.from_lengths(lengths, rate=50.0, prefix_tokens=64)
    times = SyncReplay(sm, req).run(PerLayer(100.0))
    assert times.overlapped == req.n
    ref = engine_replay(sm, req, PerLayer(100.0), SchedulerConfig(record_steps=True))
    assert np.array_equal(times.ttft_us, ref.ttft_us) and np.array_equal(times.e2e_us, ref.e2e_us)
    assert ref.steps["batch_size"].max() >= 2
    assert ((ref.steps["prefill_tokens"] > 0) & (ref.steps["decode_tokens"] > 0)).any()


def test_results_do_not_depend_on_cache_state(sm):
    lengths = lengths_of("codesweep")
    req = SyncRequests.from_lengths(lengths, rate=1000 / 334.0)
    warm = SyncReplay(sm, req)
    for plo in (300.0, 0.0, 100.0):
        warm.run(PerLayer(plo))
    fresh = SyncReplay(StepModel.build("llama-2-7b-hf", 1), req).run(PerLayer(100.0))
    again = warm.run(PerLayer(100.0))
    assert np.array_equal(fresh.e2e_us, again.e2e_us) and np.array_equal(fresh.ttft_us, again.ttft_us)


@pytest.mark.parametrize("workload, prefix, e2e_ms, model, tp", WORKLOADS)
def test_engine_only_replay_equals_sync_replay(workload, prefix, e2e_ms, model, tp):
    """The reference workloads (HG1 rates): SyncReplay.run == one engine replay of all requests."""
    lengths = lengths_of(workload)
    req = SyncRequests.from_lengths(lengths, round(1000 / e2e_ms, 6), prefix)
    sm = StepModel.build(model, tp)
    rep = SyncReplay(sm, req)
    overlapped = []
    for overhead in (PerLayer(0.0), PerLayer(100.0), PerLayer(400.0), BatchLinear(50.0, 5.0)):
        times = rep.run(overhead)
        ref = engine_replay(sm, req, overhead, SchedulerConfig())
        assert np.array_equal(times.ttft_us, ref.ttft_us), overhead
        assert np.array_equal(times.e2e_us, ref.e2e_us), overhead
        overlapped.append(times.overlapped)
    assert max(overlapped) > 0  # the busy-period path is exercised


@pytest.mark.parametrize("workload, prefix, e2e_ms, model, tp", WORKLOADS[:2])
def test_sync_replay_equals_straightforward_engine(workload, prefix, e2e_ms, model, tp):
    """Against the per-step engine with a plain StepModel.parts call per step (no caches at all)."""
    lengths = lengths_of(workload)[:12]
    req = SyncRequests.from_lengths(lengths, round(1000 / e2e_ms, 6), prefix)
    sm = StepModel.build(model, tp)
    times = SyncReplay(sm, req).run(PerLayer(150.0))
    ref = engine_replay(StepModel.build(model, tp), req, PerLayer(150.0), SchedulerConfig(), fast=False)
    assert times.overlapped > 0
    assert np.array_equal(times.ttft_us, ref.ttft_us) and np.array_equal(times.e2e_us, ref.e2e_us)


@pytest.mark.parametrize("opts", [{"variant": "v2.4"}, {"variant": "v2.3", "decode_attention": "per_request"},
                                  {"variant": "v3"}])
def test_other_physics_variants(opts):
    lengths = lengths_of("chatsweep")[:20]
    req = SyncRequests.from_lengths(lengths, round(1000 / 1292.6, 6), 284)
    sm = StepModel.build("llama-2-7b-hf", 1, **opts)
    times = SyncReplay(sm, req).run(PerLayer(200.0))
    ref = engine_replay(sm, req, PerLayer(200.0), SchedulerConfig())
    assert times.overlapped > 0
    assert np.array_equal(times.ttft_us, ref.ttft_us) and np.array_equal(times.e2e_us, ref.e2e_us)


def test_phantom_off(sm):
    lengths = lengths_of("chatsweep")[:15]
    req = SyncRequests.from_lengths(lengths, round(1000 / 1292.6, 6), 284)
    sched = SchedulerConfig(phantom_last_step=False)
    on = SyncReplay(sm, req).run(PerLayer(100.0))
    off = SyncReplay(sm, req, sched).run(PerLayer(100.0))
    ref = engine_replay(sm, req, PerLayer(100.0), sched)
    assert np.array_equal(off.e2e_us, ref.e2e_us)
    assert (on.e2e_us >= off.e2e_us).all() and (on.e2e_us > off.e2e_us).any()


@pytest.mark.parametrize("lengths,rejected", [
    ([[100, 10], [5000, 10], [100, 5]], [False, True, False]),
    ([[100, 10], [100, 5], [5000, 10]], [False, False, True]),  # the last one, after an idle gap
])
def test_request_that_never_fits_is_rejected_like_the_engine(sm, lengths, rejected):
    req = SyncRequests.from_lengths(lengths, rate=1 / 60)
    sched = SchedulerConfig(kv_blocks=100)  # 1600 tokens: a 5000-token request can never fit
    times = SyncReplay(sm, req, sched).run(PerLayer(10.0))
    ref = engine_replay(sm, req, PerLayer(10.0), sched)
    assert ref.rejected.tolist() == rejected
    assert np.isnan(times.e2e_us[rejected]).all()
    assert np.array_equal(times.e2e_us, ref.e2e_us, equal_nan=True)
    assert np.array_equal(times.ttft_us, ref.ttft_us, equal_nan=True)


def test_one_replay_serves_both_phantom_settings(sm):
    """run(phantom=...) of one replay equals a replay built with that scheduler setting, and the engine's."""
    lengths = lengths_of("chatsweep")[:15]
    req = SyncRequests.from_lengths(lengths, round(1000 / 1292.6, 6), 284)
    rep_off = SyncReplay(sm, req, SchedulerConfig(phantom_last_step=False))
    rep_on = SyncReplay(sm, req)
    for overhead in (PerLayer(100.0), BatchLinear(50.0, 5.0)):
        off = rep_off.run(overhead)
        on = rep_off.run(overhead, phantom=True)
        assert off.overlapped > 0 and on.phantom_us is None
        assert np.array_equal(on.e2e_us, rep_on.run(overhead).e2e_us)
        assert np.array_equal(on.e2e_us, off.with_phantom().e2e_us)
        assert np.array_equal(off.e2e_us, rep_on.run(overhead, phantom=False).e2e_us)
        assert np.array_equal(on.e2e_us, engine_replay(sm, req, overhead, SchedulerConfig()).e2e_us)
        assert np.array_equal(on.ttft_us, off.ttft_us)
    with pytest.raises(ValueError):
        on.with_phantom()


def test_missing_step_features_are_primed_in_later_runs(sm):
    """The overheads a busy period needed are computed up front in the next runs (fewer memo misses)."""
    lengths = lengths_of("codesweep")
    req = SyncRequests.from_lengths(lengths, round(1000 / 334.0, 6))
    rep = SyncReplay(sm, req)
    before = len(rep._primed)
    rep.run(PerLayer(101.0))
    assert len(rep._primed) > before
    timer_misses = []
    import calib.replay.synchronous as sync

    class Spy(StepTimer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            timer_misses.append(self.misses)

    real, sync.StepTimer = sync.StepTimer, Spy
    try:
        times = rep.run(PerLayer(102.0))
    finally:
        sync.StepTimer = real
    assert len(timer_misses[0]) == 0
    ref = engine_replay(sm, req, PerLayer(102.0), SchedulerConfig())
    assert np.array_equal(times.e2e_us, ref.e2e_us) and np.array_equal(times.ttft_us, ref.ttft_us)
