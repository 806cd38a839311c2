"""``calib import``: every format from the command line, the report by reason, one-line errors."""

from __future__ import annotations

import json

import pytest

from calib.cli import main

HEADER = "arrival_s,input_tokens,output_tokens,ttft_ms,e2e_ms,status"


def test_csv_import_reports_rows_by_reason(tmp_path, capsys):
    path = tmp_path / "bench.csv"
    path.write_text(HEADER + "\n0,100,10,20,110,ok\n0.5,100,10,20,110,ok\n1,100,10,,,error\n2,x,10,20,110,ok\n")
    assert main(["import", "csv", str(path), "--out", str(tmp_path / "runs"), "--model", "llama-2-7b-hf",
                 "--tp", "1", "--max-num-seqs", "64"]) == 0
    out = capsys.readouterr().out
    assert "bench: llama-2-7b-hf TP 1, 2 of 4 requests usable" in out
    assert "failed      1  status 'error'" in out
    assert "bad         1  line 5: input_tokens: expected an integer >= 1, got 'x'" in out
    assert "server defaults used: max_num_batched_tokens=8192, kv_blocks=" in out and "block_size=16" in out
    assert (tmp_path / "runs" / "bench" / "run.yaml").is_file()


def test_json_output_and_inference_perf(shared_data, tmp_path, capsys):
    run = shared_data / "batched" / "20260218-155500-codellama-34b-tp2-roleplay"
    assert main(["import", "inference-perf", str(run), "--out", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [entry] = doc["runs"]
    assert entry["rows"] == {"rows": 7200, "ok": 7200, "failed": {}, "bad": {}} and entry["server_defaults"] == []


def test_guidellm_import(shared_data, tmp_path, capsys):
    assert main(["import", "guidellm", str(shared_data / "guidellm" / "jan20-prefill-llama7b-tp1-1"), "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wrote 5 run(s)" in out and "failed      2  errored" in out


@pytest.mark.parametrize("argv, message", [
    (["import", "excel", "x", "--out", "o"], "calib import: error: FORMAT: unknown format 'excel'"),
    (["import", "csv", "missing.csv", "--out", "o"], "calib import: error: missing.csv: not found"),
    (["import", "csv", "b.csv", "--out", "o"], "calib import: error: --model: required for format csv"),
    (["import", "csv", "b.csv", "--out", "o", "--model", "llama-2-7b-hf"], "--tp: required for format csv"),
])
def test_errors_are_one_line_with_status_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.csv").write_text(HEADER + "\n0,1,1,1,1,ok\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_refuses_to_overwrite_foreign_files(tmp_path, capsys):
    path = tmp_path / "b.csv"
    path.write_text(HEADER + "\n0,100,10,20,110,ok\n")
    (tmp_path / "out" / "b").mkdir(parents=True)
    (tmp_path / "out" / "b" / "requests.csv.gz").write_bytes(b"not calib's")
    argv = ["import", "csv", str(path), "--out", str(tmp_path / "out"), "--model", "llama-2-7b-hf", "--tp", "1"]
    assert main(argv) == 2
    assert "exists and was not written by calib" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
