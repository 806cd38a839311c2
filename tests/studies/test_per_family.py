"""Per-family calibration: group optima equal direct replays, bootstrap intervals and the verdict logic, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from calib.data import load_experiments
from calib.errors import StudyError
from calib.studies import apematrix
from calib.studies.evaluate import evaluate
from calib.studies.kinds.per_family import percentile_interval
from calib.studies.runner import run_study

KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "jan30-llama2-7b-tp2-chatsweep",
        "20260210-qwen3-14b-tp2-chatsweep", "20260210-llama2-70b-tp4-chatsweep",
        "20260210-codellama-34b-tp2-codesweep"]
PHASES = [{"name": "coarse", "grid": {"low": 0, "high": 200, "step": 100}},
          {"name": "fine", "around": "coarse", "radius": 50, "step": 50}]




@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cut_dataset) -> Path:
    return cut_dataset(tmp_path_factory.mktemp("ds"), KEEP)


def study_dict(dataset: Path, **changes) -> dict:
    base = {"name": "tiny-pf", "kind": "per_family", "dataset": str(dataset), "estimator": {"mode": "reference"},
            "phases": PHASES, "groups": ["family", "tp"], "bootstrap": {"n": 200, "seed": 3, "level": 0.9}}
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


def test_group_optima_equal_direct_replays(result, dataset):
    r, out = result
    X = load_experiments(str(dataset))
    cache = {}

    def ev(v):
        if v not in cache:
            cache[v] = evaluate(X, {"mode": "reference", "per_layer_overhead_us": v})
        return cache[v]

    def search(names):
        loss = lambda v: float(ev(v).loc[names, "tpot_ape"].mean())  # noqa: E731
        coarse = min([0.0, 100.0, 200.0], key=lambda v: (loss(v), v))
        return min([v for v in (coarse - 50, coarse, coarse + 50) if v >= 0], key=lambda v: (loss(v), v))

    assert r["global"]["optimum_us"] == search(list(X.index))
    fam = r["groupings"][0]
    assert fam["grouping"] == "family"
    assert [e["group"] for e in fam["groups"]] == sorted(X.family.unique())
    for e in fam["groups"]:
        members = [str(n) for n in X.index[X.family == e["group"]]]
        assert e["experiments"] == members
        assert e["optimum_us"] == search(members)
        assert e["tpot_mape_at_own_optimum"] == pytest.approx(ev(e["optimum_us"]).loc[members, "tpot_ape"].mean())
        assert e["has_interval"] == (len(members) > 1)
        assert e["ci_low_us"] <= e["bootstrap_mean_us"] <= e["ci_high_us"]
        if not e["has_interval"]:  # one experiment: every resample is that experiment
            assert e["ci_low_us"] == e["ci_high_us"] == e["optimum_us"] and e["bootstrap_std_us"] == 0
    tp = r["groupings"][1]
    assert [e["group"] for e in tp["groups"]] == ["2", "4"]
    for f in ("results.json", "REPORT.md", "optima.png"):
        assert (out / f).stat().st_size > 0


def test_verdict_logic(result):
    r, _ = result
    for g in r["groupings"]:
        n = len(g["groups"])
        assert len(g["pairs"]) == n * (n - 1) // 2
        for p in g["pairs"]:
            excl = p["diff_ci_low_us"] > 0 or p["diff_ci_high_us"] < 0
            assert p["differ"] == (p["eligible"] and excl)
        assert g["optima_differ"] == any(p["differ"] for p in g["pairs"])
        assert g["n_differing_pairs"] == sum(p["differ"] for p in g["pairs"])
        for e in g["groups"]:
            assert e["global_optimum_in_ci"] == (e["ci_low_us"] <= r["global"]["optimum_us"] <= e["ci_high_us"])


def test_bootstrap_is_seeded(result, dataset, tmp_path):
    r, _ = result
    again = run_study(write(tmp_path, study_dict(dataset)), tmp_path / "again", progress=False, report=False)
    assert again["groupings"] == r["groupings"]
    other = run_study(write(tmp_path, study_dict(dataset, bootstrap={"n": 200, "seed": 4, "level": 0.9})),
                      tmp_path / "other", progress=False, report=False)
    assert [e["optimum_us"] for e in other["groupings"][0]["groups"]] == \
        [e["optimum_us"] for e in r["groupings"][0]["groups"]]  # the point estimates do not depend on the seed
    assert [e["bootstrap_mean_us"] for g in other["groupings"] for e in g["groups"]] != \
        [e["bootstrap_mean_us"] for g in r["groupings"] for e in g["groups"]]


def test_percentile_interval():
    v = np.arange(1, 101, dtype=float)
    assert percentile_interval(v, 0.9) == (5.0, 95.0)
    assert percentile_interval(np.full(10, 7.0), 0.95) == (7.0, 7.0)


@pytest.mark.parametrize("changes, field, message", [
    ({"groups": ["vendor"]}, "groups[0]", "no column 'vendor'"),
    ({"bootstrap": {"n": 5}}, "bootstrap.n", "greater than or equal to 10"),
    ({"bootstrap": {"level": 1.0}}, "bootstrap.level", "less than 1"),
    ({"phases": [{"name": "c", "grid": {"low": 10, "high": 0, "step": 5}}]}, "phases.0.grid", "empty grid"),
])
def test_bad_input_is_caught_before_any_replay(tmp_path, dataset, monkeypatch, changes, field, message):
    def no_replay(*a, **k):
        raise AssertionError("replayed before validating")

    monkeypatch.setattr(apematrix, "predict_experiments", no_replay)
    with pytest.raises(StudyError) as err:
        run_study(write(tmp_path, study_dict(dataset, **changes)), tmp_path / "out", progress=False)
    assert message in str(err.value) and err.value.field.startswith(field)
