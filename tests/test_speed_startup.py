"""What keeps the command line fast (issue 15), checked by what is imported and stored, never by timing.

* ``calib --help`` builds the parser without importing numpy, pandas or the physics; ``--variant`` still
  validates against and shows :data:`calib.physics.options.VARIANTS`.
* Reports draw without pyplot, and the PNG bytes are pyplot's.
* ``calib hg1`` does not import the loaded and joint estimators; an MFU file is parsed once per content; the
  prediction cache's row keys are the same read column by column as row by row.
* Run as a program, ``calib`` runs ``atexit`` handlers and flushes its output before it ends without tearing the
  interpreter down; called from Python, ``main`` returns and leaves the garbage collector alone.
* ``calib hg1`` and ``calib study run`` keep their trials in a journal file by default (no SQLite to open), resume
  from it, and resume a folder's ``optuna.db`` of an earlier run; ``serial_storage="sqlite"`` still starts one.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from calib.studies.runner import run_study
from calib.studies.storage import default_storage_url

KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "20260210-qwen3-14b-tp2-chatsweep"]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_help_imports_no_numerics():
    mods = _modules_after("from calib.cli import build_parser\nbuild_parser().format_help()")
    assert not {"numpy", "pandas", "calib.physics", "sklearn", "optuna", "matplotlib"} & mods


def test_step_variants_are_the_physics_variants(capsys):
    from calib.cli import main
    from calib.commands.step import VARIANT_METAVAR
    from calib.physics.options import VARIANTS

    assert VARIANT_METAVAR == "{" + ",".join(VARIANTS) + "}"
    with pytest.raises(SystemExit) as info:
        main(["step", "--model", "llama-2-7b-hf", "--decode", "10", "--variant", "v9"])
    assert info.value.code == 2
    assert "invalid choice: 'v9'" in capsys.readouterr().err
    assert main(["step", "--model", "llama-2-7b-hf", "--decode", "1000", "--overhead-us", "100", "--variant",
                 VARIANTS[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step_us"] == 8068


def test_figures_without_pyplot_are_pyplot_bytes():
    mods = _modules_after("from calib.reporting.plots import plt, save\nfig, ax = plt.subplots(figsize=(3, 2))\n"
                          "ax.plot([0, 1], [1, 0])\nimport io\nfig.savefig(io.BytesIO(), format='png')")
    assert "matplotlib.pyplot" not in mods

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    from calib.reporting.plots import plt

    def draw(make):
        fig, axes = make(1, 2, figsize=(6, 3), sharey=True)
        axes[0].plot([0, 1, 2], [3, 1, 2], marker="o", label="a")
        axes[1].bar(["x", "y"], [1, 2])
        axes[0].legend()
        fig.suptitle("title")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        return buf.getvalue()

    ours = draw(plt.subplots)
    theirs = draw(pyplot.subplots)
    pyplot.close("all")
    assert ours == theirs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cut_dataset) -> Path:
    return cut_dataset(tmp_path_factory.mktemp("ds"), KEEP)


def _study(tmp_path: Path, dataset: Path) -> Path:
    doc = {"name": "tiny", "kind": "hg1", "dataset": str(dataset), "estimator": {"mode": "reference"},
           "split": {"train": KEEP[:2], "test": KEEP[2:]},
           "phases": [{"name": "coarse", "grid": {"low": 0, "high": 100, "step": 50}}],
           "validation": ["optimum", 100, 0], "criteria": []}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_serial_journal_storage_resumes_and_matches_sqlite(tmp_path, dataset, capsys):
    study = _study(tmp_path, dataset)
    journal = run_study(study, tmp_path / "j", progress=False)  # the default of run_study / calib study run
    assert (tmp_path / "j" / "optuna.journal").is_file() and not (tmp_path / "j" / "optuna.db").exists()
    assert journal["settings"]["storage"] == "journal: optuna.journal in the output folder"
    sqlite = run_study(study, tmp_path / "s", progress=False, serial_storage="sqlite")
    assert (tmp_path / "s" / "optuna.db").is_file() and not (tmp_path / "s" / "optuna.journal").exists()
    assert sqlite["settings"]["storage"] == "sqlite: optuna.db in the output folder"
    strip = lambda r: {k: v for k, v in r.items() if k != "settings"}  # noqa: E731
    assert strip(journal) == strip(sqlite)
    first = (tmp_path / "j" / "results.json").read_bytes()
    run_study(study, tmp_path / "j", progress=True, serial_storage="sqlite")  # the journal file there wins
    assert "resumed 3 of 3 trials" in capsys.readouterr().err
    assert (tmp_path / "j" / "results.json").read_bytes() == first
    # a folder holding an earlier run's optuna.db resumes from it, not from a new journal file
    again = run_study(study, tmp_path / "s", progress=False)
    assert not (tmp_path / "s" / "optuna.journal").exists()
    assert again["settings"]["storage"] == "sqlite: optuna.db in the output folder"
    with pytest.raises(Exception, match="serial_storage"):
        run_study(study, tmp_path / "x", serial_storage="postgres")


def test_default_storage_url_serial_journal(tmp_path):
    assert default_storage_url(tmp_path) == f"journal:{tmp_path.resolve() / 'optuna.journal'}"
    assert default_storage_url(tmp_path, serial="journal") == default_storage_url(tmp_path)
    assert default_storage_url(tmp_path, serial="sqlite") == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
    (tmp_path / "optuna.db").touch()
    assert default_storage_url(tmp_path).startswith("sqlite:///")  # a folder's optuna.db is resumed
    assert default_storage_url(tmp_path, workers=2).startswith("journal:")


def test_hg1_command_asks_for_a_journal(monkeypatch, tmp_path):
    from calib.cli import main

    seen = {}

    def fake_run_study(study, out, **kwargs):
        seen.update(kwargs)
        return {"study": "hg1", "kind": "other"}

    monkeypatch.setattr("calib.studies.runner.run_study", fake_run_study)
    assert main(["hg1", "--no-progress", "--out", str(tmp_path)]) == 0
    assert seen["serial_storage"] == "journal" and seen["storage"] is None


def test_synchronous_estimators_leave_the_loaded_ones_unimported():
    mods = _modules_after("import calib.estimators\nfrom calib.estimators import RooflineRegressor")
    assert "calib.estimators.roofline" in mods
    loaded = {"calib.estimators.joint", "calib.estimators.loaded", "calib.replay.batched", "calib.replay.loaded"}
    assert not loaded & mods
    mods = _modules_after("from calib.estimators import JointRegressor, LoadedRegressor, load_stages, stack")
    assert {"calib.estimators.joint", "calib.estimators.loaded"} <= mods
    import calib.estimators as est

    assert set(est.__all__) <= set(dir(est))
    assert est.LoadedRegressor.__module__ == "calib.estimators.loaded"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        est.Nope  # noqa: B018


def test_an_mfu_file_is_parsed_once_per_content(tmp_path):
    from calib.specs.mfu import MFU_CONFIG_DIR, load_mfu

    path = tmp_path / "h100.json"
    text = (MFU_CONFIG_DIR / "h100.json").read_text()
    path.write_text(text)
    first = load_mfu(path)
    assert load_mfu(path) is first and load_mfu("h100") is load_mfu("H100")
    assert load_mfu(path).source == str(path)
    stat = path.stat()
    doc = json.loads(text)
    doc["gemm"]["mfu"][0] = 0.123456
    path.write_text(json.dumps(doc))
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same time stamp: the bytes tell
    second = load_mfu(path)
    assert second is not first and second.gemm.mfu[0] == 0.123456 != first.gemm.mfu[0]
    doc["gemm"]["mfu"][0] = 2.0
    path.write_text(json.dumps(doc))
    with pytest.raises(Exception, match="mfu"):
        load_mfu(path)  # an invalid edit is refused, not answered from the cache
    path.write_text(text)
    assert load_mfu(path) is first


def test_row_keys_read_by_column_are_the_row_keys():
    from calib.data import load_experiments
    from calib.estimators.roofline import _row_key, _row_keys

    X = load_experiments()
    for lengths in ("reference", "numpy"):
        assert _row_keys(X, lengths, 3) == [_row_key(row, lengths, 3) for _, row in X.iterrows()]
    assert _row_keys(X.drop(columns=["source"]), "numpy", 1) == \
        [_row_key(row, "numpy", 1) for _, row in X.drop(columns=["source"]).iterrows()]


def test_calib_called_from_python_freezes_nothing():
    code = ("import gc; from calib.cli import main; "
            "assert main(['step', '--model', 'llama-2-7b-hf', '--decode', '10', '--json']) == 0; "
            "assert gc.get_freeze_count() == 0; print('returned')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "returned"
