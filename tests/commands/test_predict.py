"""``calib predict``: shipped runs by name, imported runs, the JSON shape, plots, errors."""

from __future__ import annotations

import json

import pytest

from calib.cli import main

HEADER = "arrival_s,input_tokens,output_tokens,ttft_ms,e2e_ms,status"
KEYS = [f"{m}_{s}_ms" for m in ("ttft", "tpot", "e2e") for s in ("mean", "p50", "p90", "p99")]


def test_shipped_run_by_report_name_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CALIB_DATA", raising=False)
    assert main(["predict", "llama-2-7b-tp1-codegen", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [run] = doc["runs"]
    assert run["run"] == "20260217-155451-llama-2-7b-tp1-codegen"
    assert sorted(run["measured"]) == sorted(KEYS) and sorted(run["predicted"]) == sorted(KEYS)
    ape = run["ape"]
    for k in ("ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms"):
        assert ape[k] == pytest.approx(abs(run["predicted"][k] - run["measured"][k]) / run["measured"][k])
    # the shipped default calibration: held-out TPOT/E2E errors of a few percent on this run
    assert ape["tpot_mean_ms"] < 0.1 and ape["e2e_mean_ms"] < 0.1
    assert run["measured"]["tpot_mean_ms"] == pytest.approx(8.342, abs=1e-3)  # (E2E - TTFT)/(O - 1), profile rule
    assert [s["rate"] for s in run["stages"]] == [5.0, 10.0] and sorted(run["stages"][0]["ape"]) == sorted(KEYS)
    assert doc["calibration"]["file"].startswith("shipped default")
    assert (tmp_path / "calib-predict" / f"{run['run']}.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "calib-predict" / "predict.json").read_text())["runs"][0]["run"] == run["run"]


def test_imported_csv_then_predict(tmp_path, capsys):
    rows = [HEADER] + [f"{0.4 * i:.1f},{200 + i},64,{30 + i % 5},{30 + i % 5 + 63 * 9.0},ok" for i in range(60)]
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    assert main(["import", "csv", str(tmp_path / "mine.csv"), "--out", str(tmp_path / "runs"), "--model",
                 "llama-2-7b-hf", "--tp", "1"]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "runs" / "mine"), "--json", "--out", str(tmp_path / "p"),
                 "--no-plot"]) == 0
    [run] = json.loads(capsys.readouterr().out)["runs"]
    assert run["run"] == "mine" and run["n_compared"] == 60
    assert run["measured"]["tpot_mean_ms"] == pytest.approx(9.0)
    assert run["predicted"]["tpot_mean_ms"] > 0 and run["ape"]["e2e_mean_ms"] is not None
    # a folder of runs works too, and so does --data-dir with a name
    assert main(["predict", "mine", "--data-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "p"),
                 "--no-plot"]) == 0
    assert "mine" in capsys.readouterr().out


def test_calibration_file_and_table(tmp_path, capsys):
    from calib.calibration import Calibration
    from calib.settings import Settings

    cal = tmp_path / "cal.yaml"
    Calibration(settings=Settings.from_params({"variant": "v2.3", "per_layer_us": 80}),
                estimator="LoadedRegressor").save(cal)
    assert main(["predict", "codellama-34b-tp2-roleplay", "mixtral-8x7b-v0-1-tp2-roleplay", "--calibration", str(cal),
                 "--window", "20", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert f"calibration: {cal}" in out and "20260218-155500-codellama-34b-tp2-roleplay" in out
    assert "mixtral-8x7b-v0-1-tp2-roleplay: not predicted:" in out and "mixture-of-experts" in out


def test_a_shipped_calibration_by_name(tmp_path, monkeypatch, capsys):
    """``--calibration NAME`` loads configs/calibrations/NAME.yaml when no file of that name exists."""
    from calib.commands.predict import load_calibration, shipped_calibrations

    assert {"h100-vllm", "h100-vllm-additive"} <= set(shipped_calibrations())
    monkeypatch.chdir(tmp_path)
    cal, label = load_calibration("h100-vllm-additive")
    assert label.startswith("shipped h100-vllm-additive") and cal.settings.replay.cpu_overlap is False
    default, _ = load_calibration(None)
    assert default.settings.replay.cpu_overlap is True  # the joint study's run with the CPU overhead overlapped
    (tmp_path / "h100-vllm-additive").write_text("not: a calibration\n")  # a file of that name wins
    with pytest.raises(Exception, match="h100-vllm-additive"):
        load_calibration("h100-vllm-additive")


@pytest.mark.parametrize("argv, message", [
    (["predict", "no-such-run"], "RUN: unknown run 'no-such-run'"),
    (["predict", "llama-2-7b-tp1-codegen", "--calibration", "nope.yaml"], "nope.yaml: file not found"),
    (["predict", "llama-2-7b-tp1-codegen", "--calibration", "nope"], "nope: file not found"),
    (["predict", "llama-2-7b-tp1-codegen", "--window", "-1"], "--window: must be > 0 seconds"),
])
def test_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
