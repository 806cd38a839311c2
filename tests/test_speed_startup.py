"""What keeps the command line fast (issue 15), checked by what is imported and stored, never by timing.

* ``calib --help`` builds the parser without importing numpy, pandas or the physics; ``--variant`` still
  validates against and shows :data:`calib.physics.options.VARIANTS`.
* Reports draw without pyplot, and the PNG bytes are pyplot's.
* ``calib hg1`` keeps its trials in a journal file (no SQLite to open), resumes from it, and resumes a folder's
  ``optuna.db`` of an earlier run; ``calib study run`` keeps SQLite by default.
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
    journal = run_study(study, tmp_path / "j", progress=False, serial_storage="journal")
    assert (tmp_path / "j" / "optuna.journal").is_file() and not (tmp_path / "j" / "optuna.db").exists()
    assert journal["settings"]["storage"] == "journal: optuna.journal in the output folder"
    sqlite = run_study(study, tmp_path / "s", progress=False)  # the default of run_study / calib study run
    assert (tmp_path / "s" / "optuna.db").is_file() and not (tmp_path / "s" / "optuna.journal").exists()
    strip = lambda r: {k: v for k, v in r.items() if k != "settings"}  # noqa: E731
    assert strip(journal) == strip(sqlite)
    first = (tmp_path / "j" / "results.json").read_bytes()
    run_study(study, tmp_path / "j", progress=True, serial_storage="journal")
    assert "resumed 3 of 3 trials" in capsys.readouterr().err
    assert (tmp_path / "j" / "results.json").read_bytes() == first
    # a folder holding an earlier run's optuna.db resumes from it, not from a new journal file
    again = run_study(study, tmp_path / "s", progress=False, serial_storage="journal")
    assert not (tmp_path / "s" / "optuna.journal").exists()
    assert again["settings"]["storage"] == "sqlite: optuna.db in the output folder"
    with pytest.raises(Exception, match="serial_storage"):
        run_study(study, tmp_path / "x", serial_storage="postgres")


def test_default_storage_url_serial_journal(tmp_path):
    assert default_storage_url(tmp_path, serial="journal") == f"journal:{tmp_path.resolve() / 'optuna.journal'}"
    (tmp_path / "optuna.db").touch()
    assert default_storage_url(tmp_path, serial="journal").startswith("sqlite:///")
    assert default_storage_url(tmp_path, workers=2, serial="journal").startswith("journal:")


def test_hg1_command_asks_for_a_journal(monkeypatch, tmp_path):
    from calib.cli import main

    seen = {}

    def fake_run_study(study, out, **kwargs):
        seen.update(kwargs)
        return {"study": "hg1", "kind": "other"}

    monkeypatch.setattr("calib.studies.runner.run_study", fake_run_study)
    assert main(["hg1", "--no-progress", "--out", str(tmp_path)]) == 0
    assert seen["serial_storage"] == "journal" and seen["storage"] is None
