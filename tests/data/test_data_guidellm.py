"""GuideLLM runs: the two real runs, synthetic runs and their error cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calib.data import REQUEST_COLUMNS, load_experiments, load_guidellm_run
from calib.errors import DataError

REAL = {
    # run: (rate, ttft, tpot, e2e, max_num_batched_tokens)
    "jan20-prefill-llama7b-tp1-1": (40 / 39.71294379234314, 221.2117850780487, 32.35025588535349, 992.5661265850067, 4096),
    "jan20-codellama-prefill-1": (40 / 67.17498111724854, 905.6251287460327, 54.7203683425667, 1678.9040923118591, 64),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_runs(shared, name):
    run = load_guidellm_run(shared / "guidellm" / name)
    rate, ttft, tpot, e2e, mnbt = REAL[name]
    assert run.model == "codellama-34b-instruct-hf" and run.tp == 1  # despite the folder name
    assert run.max_num_batched_tokens == mnbt
    assert run.rate == pytest.approx(rate, rel=1e-12)
    assert (run.ttft_mean_ms, run.tpot_mean_ms) == pytest.approx((ttft, tpot), rel=1e-12)
    assert run.e2e_mean_ms == pytest.approx(e2e, rel=1e-12)
    assert set(run.means_from.values()) == {"aggregate"}
    assert list(run.requests.columns) == list(REQUEST_COLUMNS) and len(run.requests) == 40 and not run.skipped
    r = run.requests
    assert r.ttft_ms.mean() == pytest.approx(ttft, rel=1e-9)
    # GuideLLM's per-request TPOT includes the first token: latency / O
    assert np.allclose(r.tpot_guidellm_ms, r.e2e_ms / r.output_tokens, atol=1.0)
    assert run.itl_mean_ms == pytest.approx(26.0, abs=0.2)
    assert r.start_s.iloc[0] == 0 and r.start_s.is_monotonic_increasing
    assert run.workload.prefix_tokens == 1024 and run.workload.n_requests == 40 and not run.profile_defaults
    traces = run.constant_rate_benchmarks()
    assert len(traces) == 3
    for t in traces:
        assert t.requests.arrival_us.is_monotonic_increasing and t.requests.arrival_us.iloc[0] == 0
        assert t.output_rule_name == "recorded" and t.kv_blocks is None
    if name == "jan20-prefill-llama7b-tp1-1":
        assert [t.excluded for t in traces] == [0, 0, 2] and len(traces[2].requests) == 38
    row = load_experiments(shared / "guidellm" / name)
    assert len(row) == 1 and row.iloc[0].rate == pytest.approx(rate) and row.iloc[0].family == "codellama-34b"
    assert load_guidellm_run(row.iloc[0].source).experiment == name  # the source column loads back


def test_synthetic_run(tmp_path, builders):
    run = load_guidellm_run(builders.write_guidellm_run(tmp_path / "r"))
    assert run.rate == 1.0 and run.model == "llama-2-7b-hf" and run.benchmark_index == 0
    assert run.e2e_mean_ms == pytest.approx(110.0)
    assert run.requests.itl_ms.tolist() == pytest.approx([5.0] * 4)
    (t,) = run.constant_rate_benchmarks()
    assert t.excluded == 1 and t.stages[0].rate == 2.0 and t.requests.arrival_us.tolist() == [0, 500000, 1000000, 1500000]
    assert t.requests.tpot_ms.tolist() == pytest.approx([5.0] * 4)


def test_missing_aggregates_fall_back_to_requests(tmp_path, builders):
    doc = builders.guidellm_doc()
    del doc["benchmarks"][0]["metrics"]
    run = load_guidellm_run(builders.write_guidellm_run(tmp_path / "r", doc))
    assert set(run.means_from.values()) == {"requests"}
    assert run.ttft_mean_ms == pytest.approx(51.5) and run.e2e_mean_ms == pytest.approx(run.requests.e2e_ms.mean())


def test_profile_defaults_are_reported(tmp_path, builders):
    prof = builders.profile()
    del prof["data"]["output_tokens_max"], prof["max-requests"]
    run = load_guidellm_run(builders.write_guidellm_run(tmp_path / "r", profile=prof))
    assert run.profile_defaults == ["max_requests", "output_tokens_max"]
    assert run.workload.output_max == 7000 and run.workload.n_requests == 50


def test_no_synchronous_benchmark(tmp_path, builders):
    doc = builders.guidellm_doc(strategies=("throughput", "constant"))
    folder = builders.write_guidellm_run(tmp_path / "r", doc)
    builders.expect_error(lambda: load_guidellm_run(folder), "guidellm-results.json", "strategy.type_", "throughput, constant")


def test_zero_duration(tmp_path, builders):
    doc = builders.guidellm_doc()
    doc["benchmarks"][0]["duration"] = 0.0
    folder = builders.write_guidellm_run(tmp_path / "r", doc)
    builders.expect_error(lambda: load_guidellm_run(folder), "guidellm-results.json", "benchmarks[0].duration", "is 0")


def test_bad_constant_benchmark_only_fails_its_traces(tmp_path, builders):
    doc = builders.guidellm_doc()
    doc["benchmarks"][2]["duration"] = 0
    run = load_guidellm_run(builders.write_guidellm_run(tmp_path / "r", doc))
    builders.expect_error(run.constant_rate_benchmarks, "guidellm-results.json", "benchmarks[2].duration")


def test_bad_requests_are_skipped_with_reasons(tmp_path, builders):
    doc = builders.guidellm_doc()
    reqs = doc["benchmarks"][0]["requests"]["successful"]
    reqs[1]["output_tokens"] = 0
    del reqs[2]["time_to_first_token_ms"]
    reqs[3]["request_latency"] = None
    run = load_guidellm_run(builders.write_guidellm_run(tmp_path / "r", doc))
    assert len(run.requests) == 1
    fields = [s.field for s in run.skipped]
    assert fields == [
        "benchmarks[0].requests.successful[1].output_tokens",
        "benchmarks[0].requests.successful[2].time_to_first_token_ms",
        "benchmarks[0].requests.successful[3].request_latency",
    ]
    assert "must be >= 1" in run.skipped[0].reason and "missing key" in run.skipped[1].reason
    assert run.rate == 1.0  # spec §6.2: len(successful) / duration, as the reference did


def test_all_requests_bad_is_an_error(tmp_path, builders):
    doc = builders.guidellm_doc()
    for r in doc["benchmarks"][0]["requests"]["successful"]:
        r["output_tokens"] = 0
    folder = builders.write_guidellm_run(tmp_path / "r", doc)
    builders.expect_error(
        lambda: load_guidellm_run(folder), "guidellm-results.json", "benchmarks[0].requests.successful", "output_tokens"
    )


@pytest.mark.parametrize(
    ("mutate", "file", "field"),
    [
        (lambda d, e, p: e.pop("model"), "exp-config.yaml", "model"),
        (lambda d, e, p: e.update(tensor_parallelism=0), "exp-config.yaml", "tensor_parallelism"),
        (lambda d, e, p: d.pop("benchmarks"), "guidellm-results.json", "benchmarks"),
        (lambda d, e, p: d["benchmarks"][0].pop("duration"), "guidellm-results.json", "benchmarks[0].duration"),
        (lambda d, e, p: d["benchmarks"][0]["requests"].update(successful={}), "guidellm-results.json", "successful"),
        (
            lambda d, e, p: d["benchmarks"][0]["metrics"]["request_latency"]["successful"].update(mean=-1),
            "guidellm-results.json",
            "metrics.request_latency.successful.mean",
        ),
        (lambda d, e, p: p["data"].update(prompt_tokens_min=500), "profile.yaml", "data.prompt_tokens_max"),
    ],
)
def test_bad_run_files(tmp_path, builders, mutate, file, field):
    doc, exp, prof = builders.guidellm_doc(), builders.exp_config(), builders.profile()
    mutate(doc, exp, prof)
    folder = builders.write_guidellm_run(tmp_path / "r", doc, exp, prof)
    builders.expect_error(lambda: load_guidellm_run(folder), file, field)


def test_missing_files(tmp_path, builders):
    folder = builders.write_guidellm_run(tmp_path / "r")
    (folder / "profile.yaml").unlink()
    builders.expect_error(lambda: load_guidellm_run(folder), "profile.yaml", "not found")
    builders.write_guidellm_run(folder)
    (folder / "guidellm-results.json").write_text("{not json")
    with pytest.raises(DataError, match="guidellm-results.json"):
        load_experiments(folder)
    builders.expect_error(lambda: load_guidellm_run(tmp_path / "nope"), "nope", "not a folder")


def test_profile_data_as_string(tmp_path, builders):
    prof = builders.profile()
    prof["data"] = "prompt_tokens=256,output_tokens=128"
    run = load_guidellm_run(builders.write_guidellm_run(tmp_path / "r", profile=prof))
    assert (run.workload.prompt_mean, run.workload.output_mean) == (256.0, 128.0)
    assert json.dumps(run.profile_defaults)  # the rest defaulted, and listed
    assert "prompt_tokens_stdev" in run.profile_defaults
