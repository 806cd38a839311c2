"""The importer registry, calib's run format (calib.data.runs) and its output-folder rules."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import yaml

from calib.data.importers import FORMATS, ImportOptions, import_runs, importer, read_runs
from calib.data.runs import (COLUMNS, OutputFolder, Server, estimate_kv_blocks, find_run, list_run_folders, read_run,
                             server_config, shipped_dir, synthetic_trace)
from calib.errors import CalibError, ConfigError, DataError

HEADER = "arrival_s,input_tokens,output_tokens,ttft_ms,e2e_ms,status"
OPTS = ImportOptions(model="llama-2-7b-hf", tp=1)


def csv_run(tmp_path, name="r"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.csv"
    path.write_text(HEADER + "\n0,100,10,20,110,ok\n0.5,100,10,20,110,ok\n")
    return path


def test_registry_fails_loudly_and_matches_the_command():
    from calib.commands.import_runs import FORMAT_HELP

    assert set(FORMATS) == set(FORMAT_HELP)
    for fmt in FORMATS:
        assert importer(fmt).NAME == fmt
    with pytest.raises(ConfigError, match="FORMAT: unknown format 'excel'; known: csv, guidellm"):
        importer("excel")


def test_two_runs_of_one_name_are_refused(tmp_path):
    a = csv_run(tmp_path / "a")
    b = csv_run(tmp_path / "b")
    with pytest.raises(DataError, match="2 runs would be called 'r'"):
        read_runs("csv", [a, b], OPTS)


def test_output_folder_refuses_foreign_files_and_writes_atomically(tmp_path):
    out = tmp_path / "out"
    (out / "r").mkdir(parents=True)
    (out / "r" / "run.yaml").write_text("my notes\n")
    with pytest.raises(CalibError, match=r"run.yaml: --out: exists and was not written by calib.*--force"):
        import_runs("csv", [csv_run(tmp_path)], out, OPTS)
    assert (out / "r" / "run.yaml").read_text() == "my notes\n"  # untouched
    import_runs("csv", [csv_run(tmp_path)], out, OPTS, force=True)
    import_runs("csv", [csv_run(tmp_path)], out, OPTS)  # calib's own files: rewritten without --force
    assert sorted(p.name for p in (out / "r").iterdir()) == ["requests.csv.gz", "run.yaml"]  # no temp files left
    folder = OutputFolder(out)
    (out / "notes.txt").write_text("x")
    with pytest.raises(CalibError, match="notes.txt"):
        folder.write_text("notes.txt", "y")
    folder.write_text("mine.txt", "1")
    assert folder.write_text("mine.txt", "2").read_text() == "2"


def test_format_round_trip_and_strict_reading(tmp_path):
    [(folder, _)] = import_runs("csv", [csv_run(tmp_path)], tmp_path / "out", OPTS)
    meta = yaml.safe_load((folder / "run.yaml").read_text())
    assert meta["format"] == "calib-run" and meta["version"] == 1 and meta["rows"]["ok"] == 2
    with gzip.open(folder / "requests.csv.gz", "rt") as fh:
        assert fh.readline().strip() == ",".join(COLUMNS)
    trace, info = read_run(folder)
    assert len(trace.requests) == 2 and info.server_defaults
    # tampering is caught with the file and the field named
    meta["version"] = 7
    (folder / "run.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DataError, match="run.yaml: version: unsupported version 7"):
        read_run(folder)
    meta["version"] = 1
    meta["server"].pop("kv_blocks")
    (folder / "run.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DataError, match="run.yaml: server.kv_blocks: missing key"):
        read_run(folder)
    meta["server"]["kv_blocks"] = 10
    (folder / "run.yaml").write_text(yaml.safe_dump(meta))
    with gzip.open(folder / "requests.csv.gz", "wt") as fh:
        fh.write(",".join(COLUMNS) + "\n0,0,100,10,20.0,x,ok,,\n")
    with pytest.raises(DataError, match="requests.csv.gz: e2e_ms: line 2: expected a number >= 0, got 'x'"):
        read_run(folder)


def test_shipped_dataset_and_names():
    runs = list_run_folders(shipped_dir())
    assert len(runs) == 16
    assert find_run("llama-2-7b-tp1-codegen", [shipped_dir()]).name == "20260217-155451-llama-2-7b-tp1-codegen"
    assert find_run("20260218-155500-codellama-34b-tp2-roleplay", [shipped_dir()]) is not None
    assert find_run("nope", [shipped_dir()]) is None
    for p in runs:
        assert (p / "requests.csv.gz").stat().st_size < 2_000_000


def test_kv_estimate_is_close_to_the_recorded_caches():
    recorded = {("llama-2-7b-hf", 1): 7462, ("llama-2-70b-hf", 4): 31356, ("mixtral-8x7b-v0.1", 2): 27510,
                ("codellama-34b-instruct-hf", 2): 26602}
    for (model, tp), blocks in recorded.items():
        assert abs(estimate_kv_blocks(model, tp) / blocks - 1) < 0.03, model
    with pytest.raises(ConfigError, match="leaves no memory for a KV cache"):
        estimate_kv_blocks("llama-2-70b-hf", 1)
    s = server_config("llama-2-7b-hf", 1, max_num_seqs=64)
    assert s.max_num_seqs == 64 and "max_num_seqs" not in s.defaults


def test_synthetic_trace_is_seeded_and_shares_random_numbers_across_rates():
    s = Server(max_num_seqs=8, max_num_batched_tokens=512, kv_blocks=100, block_size=16)
    a = synthetic_trace(model="llama-2-7b-hf", tp=1, server=s, rate=2, duration_s=50, input_len=100, output_len=10,
                        input_std=20, seed=3)
    b = synthetic_trace(model="llama-2-7b-hf", tp=1, server=s, rate=4, duration_s=25, input_len=100, output_len=10,
                        input_std=20, seed=3)
    assert len(a.requests) == len(b.requests)
    np.testing.assert_allclose(a.requests["arrival_us"] / 2, b.requests["arrival_us"], atol=1)
    assert (a.requests["input_tokens"] >= 1).all() and a.requests["input_tokens"].std() > 5
    c = synthetic_trace(model="llama-2-7b-hf", tp=1, server=s, rate=2, duration_s=50, input_len=100, output_len=10,
                        seed=4)
    assert c.requests["arrival_us"].tolist() != a.requests["arrival_us"].tolist()


def test_compact_run_replays_like_the_inference_perf_folder(shared_data, tmp_path):
    """Same engine inputs (prefix caching, context limit) and the same predictions, windowed or not."""
    from calib.replay.loaded import load_run, replay_run
    from calib.settings import Settings

    name = "20260218-155500-codellama-34b-tp2-roleplay"
    a, b = load_run(shared_data / "batched" / name), load_run(shipped_dir() / name)
    s = Settings.from_params({"variant": "v3", "per_layer_us": 50})
    for window in (None, 30.0):
        ra, rb = replay_run(a, s, window_s=window), replay_run(b, s, window_s=window)
        assert np.array_equal(ra.e2e_ms, rb.e2e_ms, equal_nan=True)
        assert np.array_equal(ra.inputs.prefix_tokens, rb.inputs.prefix_tokens)
        assert ra.inputs.max_model_len == rb.inputs.max_model_len
    assert json.dumps(b.trace.stages, default=str) == json.dumps(a.trace.stages, default=str)
    none = load_run(shipped_dir() / name, prefix="none")
    assert replay_run(none, s, window_s=30.0).inputs.prefix_source.startswith("none")


def test_data_folder_default_is_the_shipped_dataset(tmp_path, monkeypatch):
    """No folder and no CALIB_DATA: the shipped runs; CALIB_DATA may name an import's --out folder itself."""
    from calib.replay.loaded import resolve_data_dir
    from calib.studies.loaded_data import data_label

    monkeypatch.delenv("CALIB_DATA", raising=False)
    assert resolve_data_dir() == shipped_dir() and resolve_data_dir("") == shipped_dir()
    assert data_label(None) == "shipped dataset configs/datasets/loaded (default)"
    import_runs("csv", [csv_run(tmp_path)], tmp_path / "runs", OPTS)
    monkeypatch.setenv("CALIB_DATA", str(tmp_path / "runs"))
    assert resolve_data_dir() == tmp_path / "runs"
    assert data_label(None) == "$CALIB_DATA/batched (default)"
    monkeypatch.setenv("CALIB_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="data_dir: no run in .*empty/batched nor in .*empty"):
        resolve_data_dir()
