"""Per-family calibration: group and per-experiment optima equal direct replays, the rank test, confounding,
intervals only for large groups, bad input."""

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
            "phases": PHASES, "groups": ["family", "tp"],
            "bootstrap": {"n": 200, "seed": 3, "level": 0.9, "min_interval_members": 3},
            "test": {"n_permutations": 2000, "seed": 1}}
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
            cache[v] = evaluate(X, {"mode": "reference", "per_layer_us": v})
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
        assert e["experiment_optima_us"] == [search([m]) for m in members]
        assert (e["interval_us"] is None) == (len(members) < 3)  # no interval for a group of 1-2 experiments
    tp = r["groupings"][1]
    assert [e["group"] for e in tp["groups"]] == ["2", "4"]
    assert {x["experiment"]: x["optimum_us"] for x in r["experiments"]} == {n: search([n]) for n in X.index}
    for f in ("results.json", "REPORT.md", "optima.png"):
        assert (out / f).stat().st_size > 0


def test_rank_test_and_confounding(result):
    from calib.stats import rank_test

    r, _ = result
    per_exp = {x["experiment"]: x["optimum_us"] for x in r["experiments"]}
    for g in r["groupings"]:
        names = [n for e in g["groups"] for n in e["experiments"]]
        labels = [e["group"] for e in g["groups"] for _ in e["experiments"]]
        order = [x["experiment"] for x in r["experiments"]]
        lab = dict(zip(names, labels))
        again = rank_test([per_exp[n] for n in order], [lab[n] for n in order], n_permutations=2000, seed=1)
        assert again == g["test"]
        assert g["differ"] == (g["test"]["p_value"] is not None and g["test"]["p_value"] < 0.05)
    fam = r["groupings"][0]
    # the cut dataset holds Llama-2-70B at TP 4 only, Qwen3-14B and CodeLlama-34B at TP 2 only
    assert any("llama2-70b" in c and "tp=4" in c for c in fam["confounding"])


def test_seeds_change_only_the_randomised_parts(result, dataset, tmp_path):
    r, _ = result
    again = run_study(write(tmp_path, study_dict(dataset)), tmp_path / "again", progress=False, report=False)
    assert again["groupings"] == r["groupings"]
    other = run_study(write(tmp_path, study_dict(dataset, test={"n_permutations": 2000, "seed": 9})),
                      tmp_path / "other", progress=False, report=False)
    assert [e["optimum_us"] for g in other["groupings"] for e in g["groups"]] == \
        [e["optimum_us"] for g in r["groupings"] for e in g["groups"]]
    assert other["groupings"][1]["test"]["statistic"] == r["groupings"][1]["test"]["statistic"]


def test_percentile_interval():
    v = np.arange(1, 101, dtype=float)
    assert percentile_interval(v, 0.9) == (5.0, 95.0)
    assert percentile_interval(np.full(10, 7.0), 0.95) == (7.0, 7.0)


@pytest.mark.parametrize("changes, field, message", [
    ({"groups": ["vendor"]}, "groups[0]", "no column 'vendor'"),
    ({"bootstrap": {"n": 5}}, "bootstrap.n", "greater than or equal to 10"),
    ({"bootstrap": {"n": 10**9}}, "bootstrap.n", "less than or equal to"),
    ({"test": {"n_permutations": 10**12}}, "test.n_permutations", "less than or equal to"),
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
