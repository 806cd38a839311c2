"""The command line: `calib step` output, one-line errors with a non-zero exit, a light start, --version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    (["--model", "llama-2-7b-hf", "--decode", "5", "--bw-efficiency", "1.5"], "--bw-efficiency: must be <= 1"),
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


# --------------------------------------------------------------------------- start-up, version, python -m calib

HEAVY = ("sklearn", "scipy", "matplotlib", "sqlalchemy", "optuna")

_IMPORTED_AFTER = """
import sys
import calib.cli
for argv in {argvs!r}:
    try:
        calib.cli.main(argv)
    except SystemExit:
        pass
print("HEAVY", sorted({{m.split(".")[0] for m in sys.modules if m.split(".")[0] in {heavy!r}}}))
"""


def test_help_and_step_import_nothing_heavy():
    argvs = [["--help"], ["--version"], ["step", "--model", "llama-2-7b-hf", "--decode", "1000", "--json"],
             ["step", "--model", "gpt-17", "--decode", "5"]]
    code = _IMPORTED_AFTER.format(argvs=argvs, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"step_us": 4868' in proc.stdout  # the step really ran
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_import_calib_is_lazy():
    code = ("import sys, calib; before = sorted(m for m in sys.modules if m.startswith('calib'));"
            "calib.StepModel; print(before, 'calib.physics' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['calib'] True"


def test_public_names_resolve():
    import calib

    assert set(calib.__all__) <= set(dir(calib))
    for name in ("StepModel", "load_model", "CalibError", "OVERHEAD_MODELS", "run_study", "RooflineRegressor"):
        assert getattr(calib, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        calib.nope  # noqa: B018
    new = {"Calibrator", "SelectBest", "Calibration", "Settings", "LoadedRegressor", "RooflineRegressor"}
    assert new <= set(calib.__all__)


def test_version(capsys):
    from calib import __version__
    from calib.cli import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"calib {version()}" and out.split()[1].count(".") >= 1
    assert version() == __version__  # the installed metadata and the package agree


def test_python_m_calib():
    proc = subprocess.run([sys.executable, "-m", "calib", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("calib ")
    proc = subprocess.run([sys.executable, "-m", "calib", "step", "--model", "llama-2-7b-hf", "--decode", "1000",
                           "--overhead-us", "100", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["step_us"] == 8068
    proc = subprocess.run([sys.executable, "-m", "calib", "step", "--model", "gpt-17", "--decode", "5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_hg1_reads_the_shipped_study_and_writes_to_out(tmp_path, monkeypatch):
    seen = {}

    def fake_run_study(study, out, **kwargs):
        seen.update(study=Path(study), out=Path(out), mode=kwargs.get("mode"))
        return {"study": "hg1", "kind": "other"}

    monkeypatch.setattr("calib.studies.runner.run_study", fake_run_study)
    monkeypatch.chdir(tmp_path)
    assert main(["hg1", "--no-progress"]) == 0
    assert seen["study"].name == "hg1.yaml" and seen["study"].is_file() and seen["out"] == Path("reports/hg1/reference")
    assert seen["mode"] == "reference"
    assert main(["hg1", "--mode", "corrected", "--out", "elsewhere", "--no-progress"]) == 0
    assert seen["study"].name == "hg1.yaml" and seen["out"] == Path("elsewhere") and seen["mode"] == "corrected"


def test_study_names_a_shipped_study_when_no_such_file(tmp_path, monkeypatch):
    from calib.commands.study import study_path
    from calib.resources import study_file

    monkeypatch.chdir(tmp_path)
    assert study_path("hg1") == study_path("hg1.yaml") == study_file("hg1")
    (tmp_path / "hg1.yaml").write_text("name: mine\n")
    assert study_path("hg1.yaml") == Path("hg1.yaml")  # a file of that name wins
    assert study_path("nope.yaml") == Path("nope.yaml") and study_path("a/hg1") == Path("a/hg1")
