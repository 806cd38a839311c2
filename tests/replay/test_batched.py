"""Loaded-server replay, engine side (calib.replay.batched): hand-checkable tiny traces, bad inputs, saturation,
one real run; the statistics of a replay come from calib.replay.loaded."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from calib.data.traces import Stage, assemble_trace
from calib.errors import ConfigError, DataError
from calib.physics.batch import StepBatch
from calib.physics.overhead import PerLayer
from calib.physics.step_model import StepModel
from calib.metrics import stats
from calib.replay.batched import (BatchedRun, check_requests, default_step_cap, mean_inflight, replay_inputs,
                                  window_trace)
from calib.replay.loaded import run_report


def make_trace(arrival_us, inp, out, *, ttft=20.0, tpot=5.0, stages=None, max_num_seqs=8, budget=2048,
               kv_blocks=10_000, block_size=16, model="llama-2-7b-hf", tp=1):
    """A synthetic trace; measured TTFT ``ttft`` ms and E2E = TTFT + (O - 1) * ``tpot`` ms."""
    arrival_us, inp, out = (np.asarray(a, np.int64) for a in (arrival_us, inp, out))
    n = len(arrival_us)
    ttft_ms = np.full(n, float(ttft))
    e2e_ms = ttft_ms + (np.maximum(out, 1) - 1) * tpot
    stages = stages or (Stage(max(1.0, arrival_us[-1] / 1e6 + 1), n / max(1.0, arrival_us[-1] / 1e6 + 1)),)
    return assemble_trace(arrival_us=arrival_us, input_tokens=inp, output_recorded=out, ttft_ms=ttft_ms,
                          e2e_ms=e2e_ms, request_index=np.arange(n), stages=tuple(stages), output_rule="recorded",
                          output_len=None, name="synthetic", model=model, tp=tp, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=budget, kv_blocks=kv_blocks, block_size=block_size,
                          profile="codegen", overloaded=False, excluded=0)


@pytest.fixture(scope="module")
def sm():
    return StepModel.build("llama-2-7b-hf", 1)


OVH = PerLayer(50.0)


def step(sm, prefill=(), decode=()):
    """Integer µs of one step (hardware + 50 µs/layer overhead), straight from the step model."""
    return int(sm.step_us(StepBatch.single(prefill=prefill, decode=decode), 50.0 * 32)[0])


def test_single_request_is_the_sum_of_its_steps(sm):
    trace = make_trace([0], [100], [4])
    rep = BatchedRun(trace, prefix="none").run(sm, OVH)
    ttft = step(sm, prefill=[(0, 100)])
    decodes = [step(sm, decode=[pi]) for pi in (100, 101, 102)]
    assert rep.ttft_ms[0] == pytest.approx(ttft / 1e3)
    assert rep.e2e_ms[0] == pytest.approx((ttft + sum(decodes)) / 1e3)  # no phantom last step
    assert rep.tpot_ms[0] == pytest.approx(sum(decodes) / 3 / 1e3)
    assert rep.wait_ms[0] == 0.0
    assert rep.n_steps == 4 and not rep.hit_step_cap and rep.n_unfinished == 0


def test_two_simultaneous_requests_share_their_steps(sm):
    trace = make_trace([0, 0], [100, 60], [3, 3])
    rep = BatchedRun(trace, prefix="none").run(sm, OVH)
    first = step(sm, prefill=[(0, 100), (0, 60)])
    assert rep.ttft_ms.tolist() == pytest.approx([first / 1e3] * 2)
    d1 = step(sm, decode=[100, 60])
    d2 = step(sm, decode=[101, 61])
    assert rep.e2e_ms.tolist() == pytest.approx([(first + d1 + d2) / 1e3] * 2)
    assert rep.n_steps == 3


def test_chunked_prefill_and_budget(sm):
    """A 300-token prompt with a 128-token budget takes three prefill chunks (128, 128, 44)."""
    trace = make_trace([0], [300], [1], budget=128)
    rep = BatchedRun(trace, prefix="none").run(sm, OVH)
    expect = step(sm, prefill=[(0, 128)]) + step(sm, prefill=[(128, 128)]) + step(sm, prefill=[(256, 44)])
    assert rep.ttft_ms[0] == pytest.approx(expect / 1e3)
    assert rep.e2e_ms[0] == pytest.approx(expect / 1e3)
    assert np.isnan(rep.tpot_ms[0])  # O = 1: no TPOT


def test_later_arrival_waits_for_a_full_batch(sm):
    """max_num_seqs = 1: the second request is admitted when the first one finishes."""
    trace = make_trace([0, 0], [50, 50], [3, 2], max_num_seqs=1)
    rep = BatchedRun(trace, prefix="none").run(sm, OVH)
    e2e0 = step(sm, prefill=[(0, 50)]) + step(sm, decode=[50]) + step(sm, decode=[51])
    assert rep.e2e_ms[0] == pytest.approx(e2e0 / 1e3)
    assert rep.wait_ms[1] == pytest.approx(e2e0 / 1e3)
    assert rep.ttft_ms[1] == pytest.approx((e2e0 + step(sm, prefill=[(0, 50)])) / 1e3)


def test_prefix_cache_shortens_later_prefills(sm):
    trace = make_trace([0, 10_000_000], [200, 200], [2, 2])
    plain = BatchedRun(trace, prefix="none").run(sm, OVH)
    cached = BatchedRun(trace, prefix_tokens=[64, 64], prefix_group=[0, 0], cached_prefill_pi="cached").run(sm, OVH)
    assert cached.ttft_ms[0] == plain.ttft_ms[0]  # nothing cached yet
    assert cached.ttft_ms[1] == pytest.approx(step(sm, prefill=[(64, 136)]) / 1e3)
    assert cached.ttft_ms[1] < plain.ttft_ms[1]


def test_summary_uses_the_same_requests_on_both_sides(sm):
    trace = make_trace([0, 1_000_000, 2_000_000], [100, 100, 100], [5, 5, 5], ttft=10.0, tpot=2.0)
    rep = BatchedRun(trace, prefix="none").run(sm, OVH)
    s = rep.summary()
    assert s["n"] == s["n_compared"] == s["n_tpot"] == 3
    assert s["measured"]["ttft"]["mean"] == 10.0 and s["measured"]["tpot"]["mean"] == 2.0
    r = run_report(rep)
    assert set(r["headline"]["ape"]) == {"ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms", "e2e_p90_ms"}
    ape = r["headline"]["ape"]["ttft_mean_ms"]
    assert ape == pytest.approx(abs(np.mean(rep.ttft_ms) - 10.0) / 10.0)
    assert r["replay"]["n_steps"] == rep.n_steps and r["steps"]["n_steps"] == rep.n_steps


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("arrival,inp,out,match", [
    ([5, 0], [3, 3], [2, 2], "not sorted"),
    ([-1, 0], [3, 3], [2, 2], "negative arrival"),
    ([0, 1], [3], [2, 2], "lengths differ"),
    ([0, 1], [3, 0], [2, 2], "input tokens"),
    ([0, 1], [3, 3], [2, -1], "output tokens"),
    ([], [], [], "no request"),
    ([0.5], [3], [2], "whole numbers"),
])
def test_bad_request_arrays(arrival, inp, out, match):
    with pytest.raises(DataError, match=match):
        check_requests(arrival, inp, out)


def test_unsorted_trace_is_refused(sm):
    trace = make_trace([0, 10], [5, 5], [2, 2])
    trace.requests.loc[1, "arrival_us"] = -3
    with pytest.raises(DataError, match="arrival"):
        BatchedRun(trace).run(sm, OVH)


@pytest.mark.parametrize("field,value", [("kv_blocks", 0), ("max_num_seqs", 0), ("max_num_batched_tokens", 0),
                                         ("block_size", None)])
def test_bad_server_config(field, value):
    trace = replace(make_trace([0], [5], [2]), **{field: value})
    with pytest.raises(ConfigError, match=field):
        replay_inputs(trace)


def test_unknown_prefix_mode():
    with pytest.raises(ConfigError, match="prefix"):
        replay_inputs(make_trace([0], [5], [2]), prefix="sometimes")


def test_too_long_for_the_context_is_a_counted_rejection(sm):
    trace = make_trace([0, 100, 200], [100, 5000, 100], [4, 4, 4])
    rep = BatchedRun(trace, prefix="none", max_model_len=4096).run(sm, OVH)
    assert rep.rejected.tolist() == [False, True, False]
    assert np.isnan(rep.e2e_ms[1]) and np.isfinite(rep.e2e_ms[[0, 2]]).all()
    r = run_report(rep)
    assert r["replay"]["rejected_context"] == 1 and r["stats"]["n_compared"] == 2


def test_never_fits_in_the_kv_cache_is_a_counted_rejection(sm):
    trace = make_trace([0, 100], [100, 1000], [4, 4], kv_blocks=20)  # 20 blocks = 320 tokens
    rep = BatchedRun(trace, prefix="none").run(sm, OVH)
    assert rep.rejected.tolist() == [False, True]
    assert run_report(rep)["replay"]["rejected_kv"] == 1


def test_kv_pressure_preempts_and_still_finishes(sm):
    trace = make_trace([0, 0, 0, 0], [100, 100, 100, 100], [60, 60, 60, 60], kv_blocks=30)
    rep = BatchedRun(trace, prefix="none").run(sm, OVH)
    assert np.isfinite(rep.e2e_ms).all() and rep.n_preemptions > 0 and not rep.hit_step_cap


def test_step_cap_stops_and_says_so(sm):
    trace = make_trace([0, 0], [100, 100], [50, 50])
    rep = BatchedRun(trace, prefix="none", max_steps=10).run(sm, OVH)
    assert rep.hit_step_cap and rep.n_steps <= 10 and rep.n_unfinished == 2
    r = run_report(rep)
    assert r["replay"]["hit_step_cap"] and r["replay"]["unfinished"] == 2 and r["stats"]["n_compared"] == 0


def test_default_step_cap():
    assert default_step_cap([100, 5000], [10, 0], 2048) == 2 * (10 + 1 + 1 + 3) + 1000


# ---------------------------------------------------------------------------------------------- saturation


def _burst(rate: float, n: int, out: int, **kw):
    arr = (np.arange(n) * (1e6 / rate)).astype(np.int64)
    return make_trace(arr, [200] * n, [out] * n, stages=(Stage(n / rate, rate),), **kw)


def test_saturation_flags_a_runaway_queue(sm):
    """Far more load than 2 running slots can serve: the simulated wait grows while the measured TTFT is flat."""
    rep = BatchedRun(_burst(50.0, 300, 100, max_num_seqs=2), prefix="none").run(sm, OVH)
    sat = run_report(rep)["stages"][0]["saturation"]
    assert sat["saturated"] and sat["measured_stable"] and sat["runaway"]
    assert run_report(rep)["runaway_stages"] == [0]


def test_light_load_does_not_saturate(sm):
    rep = BatchedRun(_burst(2.0, 60, 20), prefix="none").run(sm, OVH)
    sat = run_report(rep)["stages"][0]["saturation"]
    assert not sat["saturated"] and not sat["runaway"]


# ---------------------------------------------------------------------------------------------- helpers


def test_window_trace_keeps_rates_and_joins_stages():
    arr = np.r_[np.arange(0, 10_000_000, 500_000), 10_000_000 + np.arange(0, 10_000_000, 250_000)]
    trace = make_trace(arr, [10] * len(arr), [2] * len(arr), stages=(Stage(10, 2), Stage(10, 4)))
    w = window_trace(trace, 3.0)
    st = w.requests["stage"].tolist()
    assert st.count(0) == 6 and st.count(1) == 12
    assert w.stages == (Stage(3.0, 2), Stage(3.0, 4))
    a = w.requests["arrival_us"].to_numpy()
    assert a[0] == 0 and a[6] == 3_000_000 and (np.diff(a) >= 0).all()
    with pytest.raises(ConfigError):
        window_trace(trace, 0)


def test_mean_inflight_by_hand():
    got = mean_inflight(np.array([0.0, 5.0, 20.0]), np.array([10.0, 10.0, 30.0]),
                        np.array([0.0, 5.0, 20.0]), np.array([10.0, 10.0, 30.0]))
    assert got.tolist() == pytest.approx([1.5, 2.0, 1.0])


def test_stats():
    s = stats([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert s["mean"] == 2.5 and s["p50"] == 2.5 and s["p90"] == pytest.approx(3.7)
    assert np.isnan(stats([])["mean"])


# ---------------------------------------------------------------------------------------------- one real run


def test_real_run_window(shared_data):
    from calib.data.traces import load_trace

    run = shared_data / "batched" / "20260218-155500-codellama-34b-tp2-roleplay"
    if not run.is_dir():
        pytest.skip("run not in the shared data")
    trace = window_trace(load_trace(run), 30.0)
    sm = StepModel.build(trace.model, trace.tp)
    rep = BatchedRun(trace).run(sm, PerLayer(80.0))
    r = run_report(rep)
    assert r["stats"]["n_compared"] == len(trace.requests) and not r["replay"]["hit_step_cap"]
    assert r["replay"]["prefix"].startswith("repeated prompts: 100 prompts")
    assert all(np.isfinite(v) for v in r["headline"]["ape"].values())
    assert 10.0 < r["headline"]["measured"]["tpot_mean_ms"] < 20.0


def test_request_latency_shifts_ttft_and_e2e_only(sm):
    trace = make_trace([0, 0], [100, 60], [3, 3])
    run = BatchedRun(trace, prefix="none")
    base, late = run.run(sm, OVH), run.run(sm, OVH, request_latency_ms=7.5)
    assert late.ttft_ms.tolist() == pytest.approx((base.ttft_ms + 7.5).tolist())
    assert late.e2e_ms.tolist() == pytest.approx((base.e2e_ms + 7.5).tolist())
    assert late.tpot_ms.tolist() == pytest.approx(base.tpot_ms.tolist()) and late.n_steps == base.n_steps
    with pytest.raises(ConfigError, match="request_latency_ms"):
        run.run(sm, OVH, request_latency_ms=-1.0)
