"""The HG1 study kind: a tiny study end to end, resume after an interrupt, determinism, bad study files."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from calib.errors import StudyError
from calib.studies.runner import run_study
from calib.studies.spec import load_study_file
from calib.studies.storage import open_storage

KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "20260210-qwen3-14b-tp2-chatsweep"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cut_dataset) -> Path:
    """The embedded dataset cut down to three experiments (keeps the test fast)."""
    return cut_dataset(tmp_path_factory.mktemp("ds"), KEEP)


def study_dict(dataset: Path, **changes) -> dict:
    base = {
        "name": "tiny", "kind": "hg1", "dataset": str(dataset),
        "estimator": {"mode": "reference"},
        "split": {"train": KEEP[:2], "test": KEEP[2:]},
        "phases": [{"name": "coarse", "grid": {"low": 0, "high": 100, "step": 50}},
                   {"name": "fine", "around": "coarse", "radius": 10, "step": 10}],
        "validation": ["optimum", 100, 0],
        "criteria": [{"name": "improvement", "quantity": "test", "metric": "tpot_mape", "op": "<",
                      "threshold": 0.2}],
    }
    base.update(changes)
    return base


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_tiny_study_end_to_end(tmp_path, dataset):
    study = write(tmp_path, study_dict(dataset))
    out = tmp_path / "out"
    r = run_study(study, out, progress=False)
    coarse = [p for p in r["landscape"] if p["phase"] == "coarse"]
    assert [p["overhead_us"] for p in coarse] == [0, 50, 100]
    best = min(coarse, key=lambda p: (p["train_tpot_mape"], p["overhead_us"]))
    assert r["coarse_optimum_us"] == best["overhead_us"]
    fine = [p["overhead_us"] for p in r["landscape"] if p["phase"] == "fine"]
    c = r["coarse_optimum_us"]
    assert fine == [v for v in (c - 10, c, c + 10) if v >= 0]
    assert r["fine_optimum_us"] == r["optimum_us"]
    # per-split means are the means of the per-experiment APEs
    exp = {e["experiment"]: e for e in r["experiments"]}
    for key in ("0", "100", "optimum"):
        train = sum(exp[n]["tpot_ape"][key] for n in KEEP[:2]) / 2
        assert r["splits"]["train"]["tpot_mape"][key] == pytest.approx(train)
    crit = r["criteria"][0]
    assert crit["observed"] == pytest.approx(r["splits"]["test"]["tpot_mape"]["optimum"])
    assert crit["passed"] == (crit["observed"] < 0.2)
    for f in ("results.json", "REPORT.md", "landscape.png", "per_experiment.png"):
        assert (out / f).stat().st_size > 0
    report = (out / "REPORT.md").read_text()
    assert "Mode **reference**" in report and "itl" in report


def phase_study(out, phase: str) -> str:
    """The Optuna study of one phase: ``<name>-<fingerprint>-<phase>`` (the only such study in the storage)."""
    storage = open_storage(f"journal:{out / 'optuna.journal'}")  # the default storage of a serial run
    names = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.endswith(f"-{phase}")]
    assert len(names) == 1, names
    return names[0]


def test_rerun_is_byte_identical_and_resumes(tmp_path, dataset):
    study = write(tmp_path, study_dict(dataset))
    run_study(study, tmp_path / "a", progress=False)
    first = (tmp_path / "a" / "results.json").read_bytes()
    run_study(study, tmp_path / "a", progress=False)  # resume: nothing left to do
    assert (tmp_path / "a" / "results.json").read_bytes() == first
    run_study(study, tmp_path / "b", progress=False)  # a fresh storage gives the same bytes
    assert (tmp_path / "b" / "results.json").read_bytes() == first
    storage = open_storage(f"journal:{tmp_path / 'a' / 'optuna.journal'}")
    trials = optuna.load_study(study_name=phase_study(tmp_path / "a", "coarse"), storage=storage).get_trials()
    assert sorted(t.params["overhead.per_layer_us"] for t in trials) == [0, 50, 100]


def test_interrupted_study_resumes_without_repeating(tmp_path, dataset, monkeypatch):
    from calib.estimators.roofline import RooflineRegressor

    study = write(tmp_path, study_dict(dataset))
    real = RooflineRegressor.predict_all
    calls = {"n": 0}

    def flaky(self, X):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, X)

    monkeypatch.setattr(RooflineRegressor, "predict_all", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, tmp_path / "out", progress=False)
    monkeypatch.setattr(RooflineRegressor, "predict_all", real)
    storage = open_storage(f"journal:{tmp_path / 'out' / 'optuna.journal'}")
    name = phase_study(tmp_path / "out", "coarse")
    before = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert [t.state.name for t in before] == ["COMPLETE", "FAIL"]
    run_study(study, tmp_path / "out", progress=False)
    after = optuna.load_study(study_name=name, storage=storage).get_trials()
    complete = [t.params["overhead.per_layer_us"] for t in after if t.state.name == "COMPLETE"]
    assert sorted(complete) == [0, 50, 100]  # each grid value completed exactly once
    assert before[0].number in [t.number for t in after if t.state.name == "COMPLETE"]  # kept, not redone
    clean = tmp_path / "clean"
    run_study(study, clean, progress=False)
    assert (clean / "results.json").read_bytes() == (tmp_path / "out" / "results.json").read_bytes()


@pytest.mark.parametrize("change,field", [
    ({"flux": 1}, "flux"),
    ({"phases": [{"name": "coarse", "grid": {"low": 100, "high": 0, "step": 5}}]}, "phases.0.grid"),
    ({"phases": []}, "phases"),
    ({"split": {"train": ["no-such-experiment"], "test": KEEP[:1]}}, "split.train"),
    ({"criteria": [{"name": "x", "quantity": "test", "metric": "p99_mape", "threshold": 1}]}, "criteria.0.metric"),
    ({"estimator": {"overhead": 3}}, "estimator"),
    ({"kind": "astrology"}, "kind"),
    ({"validation": [100, 0]}, "validation"),
])
def test_bad_study_files(tmp_path, dataset, change, field):
    path = write(tmp_path, study_dict(dataset, **change))
    with pytest.raises(StudyError) as info:
        run_study(path, tmp_path / "out", progress=False)
    assert field in str(info.value) and "study.yaml" in str(info.value)


def test_shipped_study_files_are_valid():
    root = Path(__file__).resolve().parents[2] / "studies"
    for path in sorted(root.glob("*.yaml")):
        assert load_study_file(path).name


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: x\nkind: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(StudyError, match="invalid YAML"):
        load_study_file(path)


def test_results_are_json_with_fractions(tmp_path, dataset):
    study = write(tmp_path, study_dict(dataset))
    run_study(study, tmp_path / "o", progress=False, report=False)
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert 0 <= r["splits"]["all"]["tpot_mape"]["100"] < 5
    assert r["settings"]["request_seed"] == 42 and "storage" in r["settings"]


def test_unknown_model_in_dataset_names_the_file(tmp_path, dataset):
    bad = tmp_path / "bad"
    bad.mkdir()
    text = (dataset / "experiments.csv").read_text().replace("llama-2-7b-hf", "llama-9-7b", 1)
    bad.joinpath("experiments.csv").write_text(text)
    bad.joinpath("workloads.yaml").write_text((dataset / "workloads.yaml").read_text())
    with pytest.raises(Exception) as info:
        run_study(write(tmp_path, study_dict(bad)), tmp_path / "out", progress=False)
    assert "experiments.csv" in str(info.value) and "model" in str(info.value)
