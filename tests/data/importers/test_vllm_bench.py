"""The vLLM ``bench serve`` importer on small result files written here (the format of --save-detailed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calib.data.importers import ImportOptions, import_runs, read_runs
from calib.data.importers.vllm_bench import synthesized_arrivals_s
from calib.data.runs import read_run
from calib.errors import ConfigError, DataError

OPTS = ImportOptions(model="llama-2-7b-hf", tp=1)


def result(n: int = 6, *, detailed_times: bool = True) -> dict:
    """A ``vllm bench serve --save-result --save-detailed`` object of ``n`` requests (request 2 failed)."""
    doc = {
        "date": "20260101-000000", "backend": "vllm", "model_id": "meta-llama/Llama-2-7b-hf", "num_prompts": n,
        "request_rate": 4.0, "burstiness": 1.0, "max_concurrency": None, "duration": 2.0, "completed": n - 1,
        "input_lens": [100 + i for i in range(n)],
        "output_lens": [0 if i == 2 else 20 for i in range(n)],
        "ttfts": [0.0 if i == 2 else 0.030 + 0.001 * i for i in range(n)],
        "itls": [[] if i == 2 else [0.010] * 19 for i in range(n)],
        "generated_texts": ["" for _ in range(n)],
        "errors": ["Traceback (most recent call last):\n  ... ClientConnectorError" if i == 2 else ""
                   for i in range(n)],
    }
    if detailed_times:
        doc["start_times"] = [1000.0 + 0.25 * i for i in range(n)]
        doc["latencies"] = [0.0 if i == 2 else 0.030 + 0.001 * i + 0.19 for i in range(n)]
    return doc


def test_detailed_result_with_start_times(tmp_path):
    path = tmp_path / "vllm-bench.json"
    path.write_text(json.dumps(result()))
    [(folder, rec)] = import_runs("vllm-bench", [path], tmp_path / "out", OPTS)
    assert rec.name == "vllm-bench" and rec.counts() == {
        "rows": 6, "ok": 5, "failed": {"error: ... ClientConnectorError": 1},
        "bad": {}}
    trace, _ = read_run(folder)
    req = trace.requests
    assert req["arrival_us"].tolist() == [0, 250000, 750000, 1000000, 1250000]
    np.testing.assert_allclose(req["e2e_ms"] - req["ttft_ms"], 190.0, atol=1e-3)
    np.testing.assert_allclose(req["tpot_ms"], 10.0, atol=1e-3)  # (E2E - TTFT) / (O - 1)
    assert rec.source["arrivals"] == "start_times (s)" and rec.source["e2e"] == "latencies (s)"
    assert len(rec.stages) == 1 and any("inferred" in n for n in rec.notes)


def test_older_result_without_start_times(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(result(detailed_times=False)))
    [rec] = read_runs("vllm-bench", [path], OPTS)
    assert any("arrivals synthesized" in n for n in rec.notes) and rec.source["e2e"] == "ttfts + sum(itls) (s)"
    ok = rec.requests[rec.requests["status"] == "ok"]
    np.testing.assert_allclose(ok["e2e_ms"] - ok["ttft_ms"], 190.0, atol=1e-6)
    expected = synthesized_arrivals_s(6, 4.0, 1.0)
    np.testing.assert_allclose(np.sort(rec.requests["arrival_us"].to_numpy(float)), np.round(expected * 1e6))


def test_json_lines_and_bad_values(tmp_path):
    a, b = result(), result()
    b["ttfts"][0] = -1.0
    b["input_lens"][1] = 0
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n")
    recs = read_runs("vllm-bench", [path], ImportOptions(model="llama-2-7b-hf", tp=1, name="sweep"))
    assert [r.name for r in recs] == ["sweep-0", "sweep-1"]
    assert recs[1].counts()["bad"] == {"[1].input_lens[1]: expected an integer >= 1, got 0": 1,
                                       "[1].ttfts[0]: expected a number > 0 (s), got -1.0": 1}


def test_model_and_tp_are_required(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result()))
    with pytest.raises(ConfigError, match="--model: required for format vllm-bench"):
        read_runs("vllm-bench", [path])
    with pytest.raises(ConfigError, match="--tp: required"):
        read_runs("vllm-bench", [path], ImportOptions(model="llama-2-7b-hf"))
    with pytest.raises(ConfigError, match="unknown model 'gpt-9'"):
        read_runs("vllm-bench", [path], ImportOptions(model="gpt-9", tp=1))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("ttfts"), r"r.json: ttfts: missing key \(save the benchmark with --save-result --save-detailed\)"),
    (lambda d: d["output_lens"].pop(), "r.json: output_lens: 5 entries, input_lens has 6"),
    (lambda d: (d.pop("itls"), d.pop("latencies")), "r.json: itls: neither latencies nor itls"),
    (lambda d: d.update(input_lens=[]), "r.json: input_lens: no request"),
])
def test_malformed_results_are_one_line_errors(tmp_path, edit, match):
    doc = result()
    edit(doc)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=match):
        read_runs("vllm-bench", [path], OPTS)


def test_not_json_at_all(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="r.json: invalid JSON"):
        read_runs("vllm-bench", [path], OPTS)
