"""The inference-perf importer on the real runs of ../shared/data/batched and on small synthetic folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calib.data.importers import ImportOptions, import_runs, read_runs
from calib.data.runs import read_run, shipped_dir
from calib.data.traces import TRACE_COLUMNS, load_trace
from calib.errors import DataError

CODEGEN = "20260217-155451-llama-2-7b-tp1-codegen"
REASONING = "20260217-170634-llama-2-7b-tp1-reasoning"


def same_trace(a, b) -> None:
    """Two traces of one run agree: meta exactly, times to the 1 µs the format stores."""
    for attr in ("name", "model", "tp", "max_num_seqs", "max_num_batched_tokens", "kv_blocks", "block_size", "profile",
                 "overloaded", "excluded", "output_rule", "output_rule_name", "output_len", "stages", "split"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert len(a.skipped) == len(b.skipped)
    for col in TRACE_COLUMNS:
        x, y = a.requests[col].to_numpy(), b.requests[col].to_numpy()
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, atol=6e-4, equal_nan=True, err_msg=col)
        else:
            assert (x == y).all(), col


def test_real_run_round_trips_to_the_same_trace(shared_data, tmp_path):
    src = shared_data / "batched" / CODEGEN
    [(folder, rec)] = import_runs("inference-perf", [src], tmp_path)
    assert folder == tmp_path / CODEGEN
    assert rec.counts() == {"rows": 9000, "ok": 9000, "failed": {}, "bad": {}}
    for rule in ("profile", "recorded", "exclude"):
        trace, info = read_run(folder, output_rule=rule)
        same_trace(load_trace(src, output_rule=rule), trace)
    assert info.max_model_len == 4096 and info.prefix.shared_prompts == 11 and info.prefix.shared_prompt_len == 100
    assert (folder / "requests.csv.gz").stat().st_size < 2_000_000


def test_failed_requests_are_kept_and_counted(shared_data, tmp_path):
    [(folder, rec)] = import_runs("inference-perf", [shared_data / "batched" / REASONING], tmp_path)
    assert rec.counts()["failed"] == {"has_error": 4068} and rec.counts()["ok"] == 732
    trace, _ = read_run(folder)
    assert trace.excluded == 4068 and trace.overloaded
    same_trace(load_trace(shared_data / "batched" / REASONING), trace)


def test_the_shipped_dataset_is_what_the_importer_writes(shared_data, tmp_path):
    """configs/datasets/loaded is exactly `calib import inference-perf ../shared/data/batched` (byte for byte)."""
    written = import_runs("inference-perf", [shared_data / "batched"], tmp_path)
    assert len(written) == 16
    shipped = sorted(p.name for p in shipped_dir().iterdir() if p.is_dir())
    assert shipped == sorted(f.name for f, _ in written)
    for folder, _ in written:
        for name in ("run.yaml", "requests.csv.gz"):
            assert (folder / name).read_bytes() == (shipped_dir() / folder.name / name).read_bytes(), (folder, name)
            assert (folder / name).stat().st_size < 2_000_000


# ------------------------------------------------------------------------------------------- synthetic folders


def test_bad_rows_are_kept_with_their_reason(builders, tmp_path):
    docs = builders.trace_docs()
    docs["ground_truth.json"][1]["e2e_s"] = 0.01  # below its TTFT
    run = builders.write_trace(tmp_path / "src" / "synthetic-run", docs)
    [rec] = read_runs("inference-perf", [run])
    counts = rec.counts()
    assert counts["ok"] == 3 and counts["failed"] == {"has_error": 1}
    assert list(counts["bad"]) == ["ground_truth.json[1]: e2e_s 0.01 is below ttft_s 0.05"]
    [(folder, _)] = import_runs("inference-perf", [run], tmp_path / "out")
    trace, _ = read_run(folder)
    same_trace(load_trace(run), trace)
    assert trace.skipped[0].field == "ground_truth.json[1]"


def test_without_profile_one_stage_is_inferred(builders, tmp_path):
    docs = builders.trace_docs()
    del docs["profile.yaml"]
    run = builders.write_trace(tmp_path / "r", docs)
    [rec] = read_runs("inference-perf", [run])
    assert len(rec.stages) == 1 and rec.output_len is None
    assert any("one stage inferred" in n for n in rec.notes)
    profile = tmp_path / "p.yaml"
    profile.write_text("load: {stages: [{duration: 3, rate: 1}]}\ndata: {shared_prefix: {output_len: 10}}\n")
    [rec] = read_runs("inference-perf", [run], ImportOptions(profile=profile))
    assert [(s.duration_s, s.rate) for s in rec.stages] == [(3.0, 1.0)] and rec.output_len == 10


def test_flags_override_the_files(builders, tmp_path):
    run = builders.write_trace(tmp_path / "r")
    [rec] = read_runs("inference-perf", [run], ImportOptions(kv_blocks=999, name="mine"))
    assert rec.server.kv_blocks == 999 and rec.server.max_num_seqs == 128 and rec.name == "mine"
    assert rec.server.defaults == ()


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["requests.json"]["config"].pop("block_size"), "config.block_size"),
    (lambda d: d["ground_truth.json"].pop(), "<top level>"),
    (lambda d: d["requests.json"]["requests"][2].update(arrival_time_us=0), "requests[2].arrival_time_us"),
])
def test_structural_errors_are_one_line(builders, tmp_path, edit, field):
    docs = builders.trace_docs()
    edit(docs)
    run = builders.write_trace(tmp_path / "r", docs)
    with pytest.raises(DataError) as info:
        read_runs("inference-perf", [run])
    assert field in str(info.value) and "\n" not in str(info.value)


def test_a_folder_without_runs_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no inference-perf run"):
        read_runs("inference-perf", [tmp_path])
    (tmp_path / "x.json").write_text(json.dumps({}))
    with pytest.raises(DataError, match="not a folder"):
        read_runs("inference-perf", [tmp_path / "x.json"])
    with pytest.raises(DataError, match="not found"):
        read_runs("inference-perf", [Path(tmp_path / "nope")])
