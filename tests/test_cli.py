"""The command line: `calib step` output and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from calib.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calib.cli", *args], capture_output=True, text=True)


def test_step_json(capsys):
    assert main(["step", "--model", "llama-2-7b-hf", "--tp", "1", "--decode", "1000", "--overhead-us", "100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step_us"] == 8068 and isinstance(out["step_us"], int)
    assert out["decode_memory_us"] == pytest.approx(4867.9, abs=0.05)
    assert out["overhead_us"] == 3200


def test_step_v24_and_table(capsys):
    assert main(["step", "--model", "llama-2-7b-hf", "--decode", "1000", "--overhead-us", "100",
                 "--variant", "v2.4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step_us"] == 8471
    assert main(["step", "--model", "llama-2-7b-hf", "--prefill", "0:512", "--overhead-us", "100"]) == 0
    text = capsys.readouterr().out
    assert "16,466" in text and "prefill compute" in text


def test_step_accepts_config_path(shared_data, capsys):
    path = shared_data / "model_configs" / "llama-2-7b-hf" / "config.json"
    assert main(["step", "--model", str(path), "--decode", "1000", "--overhead-us", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step_us"] == 8068


@pytest.mark.parametrize("args,needle", [
    (["--model", "gpt-17", "--decode", "5"], "unknown model"),
    (["--model", "llama-2-7b-hf", "--decode", "5", "--hardware", "tpu9"], "unknown hardware"),
    (["--model", "llama-2-7b-hf", "--decode", "5", "--tp", "0"], "--tp"),
    (["--model", "llama-2-7b-hf", "--decode=-5"], "--decode"),
    (["--model", "llama-2-7b-hf", "--prefill", "0:-3"], "--prefill"),
    (["--model", "llama-2-7b-hf", "--prefill", "12"], "PI:N"),
    (["--model", "llama-2-7b-hf"], "at least one"),
    (["--model", "llama-2-7b-hf", "--decode", "5", "--bw-efficiency", "1.5"], "bw_efficiency"),
])
def test_step_bad_input_one_line(args, needle):
    proc = run_cli("step", *args)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_model_file_names_file_and_field(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "torch_dtype": "float16"}))
    proc = run_cli("step", "--model", str(cfg), "--decode", "5")
    assert proc.returncode == 2 and "num_hidden_layers" in proc.stderr and str(cfg) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_study_file_one_line(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("name: s\nkind: hg1\nphases: []\n")
    proc = run_cli("study", "run", str(study), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "s.yaml" in proc.stderr and "phases" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_error_with_newline_in_key_stays_one_line(tmp_path):
    hw = tmp_path / "hw.yaml"
    hw.write_text('tflops_peak: 1\nbw_peak_tbs: 1\n"a\\nb": 1\n')
    proc = run_cli("step", "--model", "llama-2-7b-hf", "--decode", "5", "--hardware", str(hw))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "a\\nb" in proc.stderr
