"""The study runner: modes, the results envelope, schema checks, calibration files, study identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from calib import Calibration
from calib.errors import StudyError
from calib.studies.results import RESULTS_VERSION
from calib.studies.runner import run_study

KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "20260210-qwen3-14b-tp2-chatsweep"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cut_dataset) -> Path:
    return cut_dataset(tmp_path_factory.mktemp("ds"), KEEP)


def study(tmp_path: Path, dataset: Path, **changes) -> Path:
    data = {"name": "tiny", "kind": "hg1", "dataset": str(dataset), "modes": ["reference", "corrected"],
            "split": {"train": KEEP[:2], "test": KEEP[2:]},
            "phases": [{"name": "coarse", "grid": {"low": 0, "high": 100, "step": 50}}],
            "validation": ["optimum", 0]}
    data.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_study_with_modes_runs_each_into_its_folder(tmp_path, dataset):
    out = run_study(study(tmp_path, dataset), tmp_path / "out", progress=False)
    assert sorted(out) == ["corrected", "reference"]
    for mode, r in out.items():
        disk = json.loads((tmp_path / "out" / mode / "results.json").read_text())
        assert disk["mode"] == mode == r["mode"] and disk["tpot_definition"] == ("itl" if mode == "reference"
                                                                                 else "guidellm")
        assert (tmp_path / "out" / mode / "REPORT.md").is_file()
    one = run_study(study(tmp_path, dataset), tmp_path / "one", mode="corrected", progress=False, report=False)
    assert one["mode"] == "corrected" and (tmp_path / "one" / "results.json").is_file()
    assert one["landscape"] == out["corrected"]["landscape"]


def test_modes_errors(tmp_path, dataset):
    with pytest.raises(StudyError, match="no mode"):
        run_study(study(tmp_path, dataset, modes=["reference"]), tmp_path / "x", mode="corrected", progress=False)
    with pytest.raises(StudyError, match="either estimator.mode or modes"):
        run_study(study(tmp_path, dataset, estimator={"mode": "reference"}), tmp_path / "x", progress=False)
    with pytest.raises(StudyError, match="choose one"):
        run_study(study(tmp_path, dataset), tmp_path / "x", workers=2, progress=False)


def test_every_results_file_carries_the_envelope(tmp_path, dataset):
    r = run_study(study(tmp_path, dataset), tmp_path / "env", mode="reference", progress=False, report=False)
    assert r["results_version"] == RESULTS_VERSION and r["study"] == "tiny" and r["kind"] == "hg1"
    assert {"calib", "numpy", "optuna", "python", "scikit-learn"} <= set(r["software"])
    assert r["seeds"]["request_seed"] == 42


def test_a_kind_breaking_its_schema_is_refused_before_writing(tmp_path, dataset, monkeypatch):
    from calib.studies.kinds import KINDS

    real = KINDS["hg1"].run
    monkeypatch.setattr(KINDS["hg1"], "run", lambda spec, ctx: {**real(spec, ctx), "surprise": 1})
    with pytest.raises(StudyError, match="surprise"):
        run_study(study(tmp_path, dataset), tmp_path / "bad", mode="reference", progress=False)
    assert not (tmp_path / "bad" / "results.json").exists()


def test_the_study_writes_its_calibration(tmp_path, dataset):
    r = run_study(study(tmp_path, dataset), tmp_path / "cal", mode="corrected", progress=False, report=False)
    cal = Calibration.load(tmp_path / "cal" / "calibration.yaml")
    assert cal.settings.overhead.per_layer_us == r["optimum_us"]
    assert cal.settings.replay.mode == "corrected" and cal.data["rows"] == KEEP[:2]
    assert cal.heldout["test_tpot_mape"] == pytest.approx(r["splits"]["test"]["tpot_mape"]["optimum"])


def test_an_edited_study_in_the_same_folder_never_reports_the_old_optimum(tmp_path, dataset):
    out = tmp_path / "same"
    first = run_study(study(tmp_path, dataset), out, mode="reference", progress=False, report=False)
    edited = run_study(study(tmp_path, dataset, estimator={"bw_efficiency": 0.3}, modes=None), out,
                       progress=False, report=False)
    fresh = run_study(study(tmp_path, dataset, estimator={"bw_efficiency": 0.3}, modes=None), tmp_path / "fresh",
                      progress=False, report=False)
    assert edited["landscape"] == fresh["landscape"]
    assert edited["settings"]["optuna_study_prefix"] != first["settings"]["optuna_study_prefix"]
