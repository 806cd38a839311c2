"""Leave one group out / group k-fold: fold optima and held-out errors equal direct replays; bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from calib.data import load_experiments
from calib.errors import StudyError
from calib.studies import apematrix
from calib.studies.evaluate import evaluate
from calib.studies.runner import run_study
from calib.studies.spec import load_study_file

KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "jan30-llama2-7b-tp2-chatsweep",
        "20260210-qwen3-14b-tp2-chatsweep", "20260210-llama2-70b-tp4-chatsweep",
        "20260210-codellama-34b-tp2-codesweep"]
PHASES = [{"name": "coarse", "grid": {"low": 0, "high": 200, "step": 100}},
          {"name": "fine", "around": "coarse", "radius": 50, "step": 50}]




@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cut_dataset) -> Path:
    return cut_dataset(tmp_path_factory.mktemp("ds"), KEEP)


def study_dict(dataset: Path, **changes) -> dict:
    base = {"name": "tiny-pg", "kind": "per_group", "dataset": str(dataset), "estimator": {"mode": "corrected"},
            "phases": PHASES, "groups": ["family", "tp"],
            "schemes": [{"type": "leave_one_group_out"}, {"type": "group_kfold", "n_splits": 2}],
            "reference_points": [100]}
    base.update(changes)
    return base


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def result(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("run")
    return run_study(write(tmp, study_dict(dataset)), tmp / "out", progress=False), tmp / "out"


def test_folds_hold_out_each_experiment_once_per_scheme(result, dataset):
    r, out = result
    X = load_experiments(str(dataset))
    assert [(s["group"], s["splitter"]) for s in r["schemes"]] == [
        ("family", "leave_one_group_out"), ("family", "group_kfold"), ("tp", "leave_one_group_out"),
        ("tp", "group_kfold")]
    for s in r["schemes"]:
        held = sorted(n for f in s["folds"] for n in f["test"])
        assert held == sorted(X.index)
        for f in s["folds"]:
            assert not set(f["train"]) & set(f["test"])
            labels = {str(X.loc[n, s["group"]]) for n in f["test"]}
            assert labels == set(f["test_groups"])
            assert not labels & {str(X.loc[n, s["group"]]) for n in f["train"]}
    logo_family = r["schemes"][0]
    assert logo_family["n_folds"] == X.family.nunique() == 4
    assert r["schemes"][2]["n_folds"] == 2  # TP 2 and 4
    for f in ("results.json", "REPORT.md", "heldout_per_fold.png"):
        assert (out / f).stat().st_size > 0


def test_fold_optimum_and_heldout_errors_equal_direct_replays(result, dataset):
    r, _ = result
    X = load_experiments(str(dataset))
    cache = {}

    def ev(v):
        if v not in cache:
            cache[v] = evaluate(X, {"mode": "corrected", "per_layer_us": v})
        return cache[v]

    for s in r["schemes"][:3]:
        for f in s["folds"]:
            loss = lambda v: float(ev(v).loc[f["train"], "tpot_ape"].mean())  # noqa: E731
            coarse = min([0.0, 100.0, 200.0], key=lambda v: (loss(v), v))
            opt = min([v for v in (coarse - 50, coarse, coarse + 50) if v >= 0], key=lambda v: (loss(v), v))
            assert f["optimum_us"] == opt
            for m in ("tpot", "e2e", "ttft"):
                assert f["heldout"][f"{m}_mape"] == pytest.approx(ev(opt).loc[f["test"], f"{m}_ape"].mean(), rel=1e-12)
                assert f["heldout_at_100"][f"{m}_mape"] == pytest.approx(ev(100.0).loc[f["test"], f"{m}_ape"].mean(),
                                                                         rel=1e-12)
        o = s["overall"]
        assert o["tpot_mape"] == pytest.approx(np.mean([f["heldout"]["tpot_mape"] for f in s["folds"]]))
        assert o["worst_fold_tpot_mape"] == max(f["heldout"]["tpot_mape"] for f in s["folds"])
        pooled = np.mean([ev(f["optimum_us"]).loc[n, "tpot_ape"] for f in s["folds"] for n in f["test"]])
        assert o["pooled_tpot_mape"] == pytest.approx(pooled, rel=1e-12)
    g = r["global_optimum_us"]
    assert r["global"]["tpot_mape"] == pytest.approx(ev(g)["tpot_ape"].mean(), rel=1e-12)


def test_shipped_study_files():
    root = Path(__file__).resolve().parents[2] / "studies"
    spec = load_study_file(root / "per-group.yaml")
    a, b = spec.for_mode("reference"), spec.for_mode("corrected")
    assert a.groups == b.groups == ["family", "tp", "workload"]
    assert (a.estimator["mode"], b.estimator["mode"]) == ("reference", "corrected")


@pytest.mark.parametrize("changes, field, message", [
    ({"groups": ["family", "vendor"]}, "groups[1]", "no column 'vendor'"),
    ({"schemes": [{"type": "group_kfold", "n_splits": 5}]}, "schemes[0]", "cannot split"),
    ({"schemes": [{"type": "group_kfold"}]}, "schemes.0", "n_splits"),
    ({"schemes": [{"type": "leave_one_group_out"}], "groups": ["model_family_typo"]}, "groups[0]", "no column"),
    ({"schemes": []}, "schemes", "at least 1"),
])
def test_bad_input_is_caught_before_any_replay(tmp_path, dataset, monkeypatch, changes, field, message):
    def no_replay(*a, **k):
        raise AssertionError("replayed before validating")

    monkeypatch.setattr(apematrix, "predict_experiments", no_replay)
    path = write(tmp_path, study_dict(dataset, **changes))
    with pytest.raises(StudyError) as err:
        run_study(path, tmp_path / "out", progress=False)
    assert message in str(err.value)
    assert err.value.field.startswith(field)
