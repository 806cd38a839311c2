"""Seeds and TPOT definitions: every combination run once, the headline equals the HG1 kind, both TPOT
definitions equal direct replays with the estimator's override, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from calib.data import load_experiments
from calib.errors import StudyError
from calib.studies import apematrix
from calib.studies.evaluate import evaluate
from calib.studies.runner import run_study

KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "20260210-qwen3-14b-tp2-chatsweep",
        "20260210-llama2-70b-tp4-chatsweep"]
PHASES = [{"name": "coarse", "grid": {"low": 0, "high": 200, "step": 100}},
          {"name": "fine", "around": "coarse", "radius": 50, "step": 50}]
CRITERIA = [{"name": "improvement", "quantity": "test", "metric": "tpot_mape", "op": "<", "threshold": 0.2},
            {"name": "overfitting_guard", "quantity": "gap", "metric": "tpot_mape", "op": "<=", "threshold": 0.05}]




@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cut_dataset) -> Path:
    return cut_dataset(tmp_path_factory.mktemp("ds"), KEEP)


def study_dict(dataset: Path, **changes) -> dict:
    base = {"name": "tiny-seeds", "kind": "seeds", "dataset": str(dataset), "estimator": {"mode": "reference"},
            "split": {"column": "hg1_split"}, "phases": PHASES, "criteria": CRITERIA,
            "lengths": ["reference", "numpy"], "seeds": [42, 3], "tpot_definitions": ["itl", "guidellm"],
            "validation": [100]}
    base.update(changes)
    return base


def write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def result(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("run")
    return run_study(write(tmp, study_dict(dataset)), tmp / "out", progress=False), tmp / "out"


def test_every_combination_once_and_the_headline_is_the_hg1_study(result, dataset, tmp_path):
    r, out = result
    combos = [(x["lengths"], x["seed"], x["tpot_definition"]) for x in r["runs"]]
    assert sorted(combos) == sorted((ln, s, d) for ln in ("reference", "numpy") for s in (42, 3)
                                    for d in ("itl", "guidellm"))
    assert [x["headline"] for x in r["runs"]].count(True) == 1
    h = r["headline"]
    assert (h["lengths"], h["seed"], h["tpot_definition"]) == ("reference", 42, "itl")
    hg1 = {"name": "tiny-hg1", "kind": "hg1", "dataset": str(dataset), "estimator": {"mode": "reference"},
           "split": {"column": "hg1_split"}, "phases": PHASES, "validation": ["optimum", 100], "criteria": CRITERIA}
    ref = run_study(write(tmp_path, hg1, "hg1.yaml"), tmp_path / "hg1", progress=False, report=False)
    assert h["optimum_us"] == ref["optimum_us"]
    assert h["tpot_mape"]["optimum"]["test"] == ref["splits"]["test"]["tpot_mape"]["optimum"]
    assert h["tpot_mape"]["100"]["train"] == ref["splits"]["train"]["tpot_mape"]["100"]
    assert h["verdict"] == ref["verdict"]
    assert h["criteria_passed"] == [c["passed"] for c in ref["criteria"]]
    for f in ("results.json", "REPORT.md", "optimum_by_seed.png"):
        assert (out / f).stat().st_size > 0


def test_other_seeds_and_definitions_equal_direct_replays(result, dataset):
    r, _ = result
    X = load_experiments(str(dataset))
    train = [str(n) for n in X.index[X.hg1_split == "train"]]
    test = [str(n) for n in X.index[X.hg1_split == "test"]]
    for x in r["runs"]:
        params = {"mode": "reference", "lengths": x["lengths"], "seed": x["seed"],
                  "tpot_definition": x["tpot_definition"]}
        cache = {}

        def ev(v):
            if v not in cache:
                cache[v] = evaluate(X, {**params, "per_layer_us": v})
            return cache[v]

        loss = lambda v: float(ev(v).loc[train, "tpot_ape"].mean())  # noqa: E731
        coarse = min([0.0, 100.0, 200.0], key=lambda v: (loss(v), v))
        opt = min([v for v in (coarse - 50, coarse, coarse + 50) if v >= 0], key=lambda v: (loss(v), v))
        assert x["optimum_us"] == opt
        assert x["tpot_mape"]["optimum"]["test"] == pytest.approx(ev(opt).loc[test, "tpot_ape"].mean(), rel=1e-12)
        assert x["e2e_mape"]["optimum"]["train"] == pytest.approx(ev(opt).loc[train, "e2e_ape"].mean(), rel=1e-12)
    # the two TPOT definitions really differ (same replays, different quantity)
    a = next(x for x in r["runs"] if x["headline"])
    b = next(x for x in r["runs"] if (x["lengths"], x["seed"], x["tpot_definition"]) == ("reference", 42, "guidellm"))
    assert a["tpot_mape"]["100"]["test"] != b["tpot_mape"]["100"]["test"]
    assert a["e2e_mape"]["100"] == b["e2e_mape"]["100"]


def test_rerun_is_byte_identical(result, dataset, monkeypatch):
    r, out = result
    first = (out / "results.json").read_bytes()

    def no_replay(*a, **k):
        raise AssertionError("a finished study must not replay")

    monkeypatch.setattr(apematrix, "predict_experiments", no_replay)
    run_study(write(out.parent, study_dict(dataset)), out, progress=False)
    assert (out / "results.json").read_bytes() == first


@pytest.mark.parametrize("changes, field, message", [
    ({"seeds": [42, 999]}, "seeds", "no seed 999"),
    ({"seeds": [42, 42]}, "seeds", "repeat"),
    ({"lengths": ["go"]}, "lengths.0", "Input should be"),
    ({"tpot_definitions": []}, "tpot_definitions", "at least 1"),
    ({"split": {"column": "nope"}}, "split.column", "no column"),
])
def test_bad_input_is_caught_before_any_replay(tmp_path, dataset, monkeypatch, changes, field, message):
    def no_replay(*a, **k):
        raise AssertionError("replayed before validating")

    monkeypatch.setattr(apematrix, "predict_experiments", no_replay)
    with pytest.raises(StudyError) as err:
        run_study(write(tmp_path, study_dict(dataset, **changes)), tmp_path / "out", progress=False)
    assert message in str(err.value) and err.value.field.startswith(field)
