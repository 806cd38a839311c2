"""The GuideLLM importer on the two real result files of ../shared/data/guidellm and on synthetic documents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calib.data.guidellm import load_guidellm_run
from calib.data.importers import ImportOptions, import_runs, read_runs
from calib.data.runs import read_run
from calib.errors import ConfigError, DataError

RUNS = ("jan20-codellama-prefill-1", "jan20-prefill-llama7b-tp1-1")


@pytest.mark.parametrize("name", RUNS)
def test_real_results_one_run_per_benchmark(shared_data, tmp_path, name):
    src = shared_data / "guidellm" / name
    written = import_runs("guidellm", [src], tmp_path)
    assert [f.name for f, _ in written] == [f"{name}-b0-synchronous", f"{name}-b1-throughput",
                                            *(f"{name}-b{k}-constant" for k in (2, 3, 4))]
    for folder, rec in written:
        # both runs are CodeLlama-34B at TP 1 whatever the folder says (exp-config.yaml)
        assert rec.model == "codellama-34b-instruct-hf" and rec.tp == 1
        assert rec.counts()["rows"] == 40 and rec.server.defaults == ("kv_blocks", "block_size")
        assert rec.prefix.shared_prompt_len == 1024 and rec.prefix.shared_prompts == 1
        trace, info = read_run(folder)
        assert trace.output_rule_name == "recorded"  # no fixed output length: nothing to correct
        assert len(trace.requests) == rec.counts()["ok"] and trace.excluded == sum(rec.counts()["failed"].values())
    guide = load_guidellm_run(src)
    # the constant-rate benchmarks agree with calib's GuideLLM loader, request by request
    for loaded, (folder, _) in zip(guide.constant_rate_benchmarks(), written[2:]):
        trace, _ = read_run(folder)
        a, b = loaded.requests, trace.requests
        assert len(a) == len(b) and loaded.stages == trace.stages
        for col in ("input_tokens", "output_tokens"):
            assert (a[col].to_numpy() == b[col].to_numpy()).all()
        for col in ("ttft_ms", "e2e_ms", "tpot_ms"):
            np.testing.assert_allclose(a[col], b[col], atol=6e-4, equal_nan=True)
        shift = np.diff(a["arrival_us"].to_numpy()) - np.diff(b["arrival_us"].to_numpy())
        assert np.abs(shift).max() <= 1
    # TPOT is (E2E - TTFT) / (O - 1), not GuideLLM's time_per_output_token_ms (which includes the first token)
    sync, _ = read_run(written[0][0])
    np.testing.assert_allclose(sync.requests["tpot_ms"].dropna().to_numpy(), guide.requests["itl_ms"].dropna(),
                               atol=1e-3)


def test_errored_requests_are_counted(shared_data):
    recs = read_runs("guidellm", [shared_data / "guidellm" / RUNS[1] / "guidellm-results.json"])
    assert recs[1].counts()["failed"] == {"errored": 1} and recs[4].counts()["failed"] == {"errored": 2}


def test_replayable_with_the_default_calibration(shared_data, tmp_path):
    from calib.calibration import Calibration
    from calib.replay.loaded import load_run, replay_run
    from calib.resources import config_path

    written = import_runs("guidellm", [shared_data / "guidellm" / RUNS[0]], tmp_path, ImportOptions(name="x"))
    folder = written[2][0]
    assert folder.name == "x-b2-constant"
    rep = replay_run(load_run(folder), Calibration.load(config_path("calibrations", "loaded-default.yaml")).settings)
    assert rep.summary()["n_compared"] == 40
    assert rep.inputs.prefix_source.startswith("profile: 1 system prompts of 1024 tokens")


# ------------------------------------------------------------------------------------------- synthetic documents


def test_synthetic_document_statuses(builders, tmp_path):
    doc = builders.guidellm_doc(n=4)
    doc["benchmarks"][2]["requests"]["successful"][1]["request_latency"] = 0.001  # below its TTFT
    run = builders.write_guidellm_run(tmp_path / "g", doc=doc)
    recs = read_runs("guidellm", [run])
    assert [r.profile for r in recs] == ["guidellm-synchronous", "guidellm-throughput", "guidellm-constant"]
    c = recs[2].counts()
    assert c["ok"] == 3 and c["failed"] == {"errored": 1}
    assert list(c["bad"]) == ["benchmarks[2].requests.successful[1].request_latency: latency 1 ms is below TTFT 51 ms"]
    assert recs[2].stages[0].rate == 2.0 and recs[0].stages[0].rate == 1.0  # target rate; else requests / duration


def test_model_and_tp_from_flags_without_exp_config(builders, tmp_path):
    run = builders.write_guidellm_run(tmp_path / "g")
    (run / "exp-config.yaml").unlink()
    with pytest.raises(ConfigError, match="--model: required for format guidellm"):
        read_runs("guidellm", [run])
    with pytest.raises(ConfigError, match="--tp: required"):
        read_runs("guidellm", [run], ImportOptions(model="llama-2-7b-hf"))
    recs = read_runs("guidellm", [run], ImportOptions(model="llama-2-7b-hf", tp=1, max_num_seqs=4))
    assert recs[0].server.max_num_seqs == 4 and recs[0].server.max_num_batched_tokens == 8192


def test_malformed_files_are_one_line_errors(builders, tmp_path):
    run = builders.write_guidellm_run(tmp_path / "g")
    (run / "guidellm-results.json").write_text(json.dumps({"benchmarks": [{"duration": 0, "requests": {}}]}))
    with pytest.raises(DataError, match=r"guidellm-results.json: benchmarks\[0\].duration: must be a number > 0"):
        read_runs("guidellm", [run])
    with pytest.raises(DataError, match="--profile: not used by format guidellm"):
        read_runs("guidellm", [run], ImportOptions(profile=tmp_path / "p.yaml"))
