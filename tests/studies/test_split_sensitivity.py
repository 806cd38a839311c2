"""Split sensitivity: every split once, the array selection equals a brute-force search, the published split
agrees with the HG1 kind, determinism, resume, and bad study files caught before any replay."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from calib.data import load_experiments
from calib.errors import StudyError
from calib.studies import apematrix
from calib.studies.evaluate import evaluate
from calib.studies.runner import run_study
from calib.studies.spec import load_study_file
from calib.studies.storage import open_storage

# six quick experiments, three families; the published split is 4 train / 2 test among them
KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "jan30-llama2-7b-tp2-chatsweep",
        "20260210-qwen3-14b-tp2-chatsweep", "20260210-llama2-70b-tp4-chatsweep",
        "20260210-codellama-34b-tp2-codesweep"]
PHASES = [{"name": "coarse", "grid": {"low": 0, "high": 200, "step": 100}},
          {"name": "fine", "around": "coarse", "radius": 50, "step": 50}]
CRITERIA = [{"name": "generalization", "quantity": "abs_gap", "metric": "tpot_mape", "op": "<=", "threshold": 0.03},
            {"name": "improvement", "quantity": "test", "metric": "tpot_mape", "op": "<", "threshold": 0.20},
            {"name": "overfitting_guard", "quantity": "gap", "metric": "tpot_mape", "op": "<=", "threshold": 0.05}]




@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cut_dataset) -> Path:
    return cut_dataset(tmp_path_factory.mktemp("ds"), KEEP)


def study_dict(dataset: Path, **changes) -> dict:
    base = {"name": "tiny-ss", "kind": "split_sensitivity", "dataset": str(dataset),
            "estimator": {"mode": "reference"}, "phases": PHASES, "criteria": CRITERIA,
            "splitter": {"type": "all_k_of_n", "n_test": 2}, "published": {"column": "hg1_split"},
            "extra_splitters": [{"type": "shuffle", "n_splits": 4, "test_size": 3, "seed": 1}]}
    base.update(changes)
    return base


def write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def result(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    r = run_study(write(tmp, study_dict(dataset)), out, progress=False)
    return r, out


def brute_force(X, train: list[str], test: list[str]) -> dict:
    """The HG1 search on one split, by direct replays, independent of calib.studies.apematrix."""
    cache = {}

    def ev(v):
        if v not in cache:
            cache[v] = evaluate(X, {"mode": "reference", "per_layer_us": v})
        return cache[v]

    def train_loss(v):
        return float(ev(v).loc[train, "tpot_ape"].mean())

    coarse = min([0.0, 100.0, 200.0], key=lambda v: (train_loss(v), v))
    fine_vals = [v for v in (coarse - 50, coarse, coarse + 50) if v >= 0]
    opt = min(fine_vals, key=lambda v: (train_loss(v), v))
    return {"coarse": coarse, "optimum": opt, "train": train_loss(opt),
            "test": float(ev(opt).loc[test, "tpot_ape"].mean())}


def test_every_split_once_and_the_published_split_exactly_once(result, dataset):
    r, out = result
    assert len(r["splits"]) == math.comb(6, 2) == r["summary"]["n_splits"]
    tests = [tuple(sorted(s["test"])) for s in r["splits"]]
    assert len(set(tests)) == 15
    X = load_experiments(str(dataset))
    pub_test = tuple(sorted(str(n) for n in X.index[X.hg1_split == "test"]))
    assert tests.count(pub_test) == 1
    pub = r["published_split"]
    assert pub["occurrences"] == 1 and tests[pub["index_in_splits"]] == pub_test
    assert r["splits"][pub["index_in_splits"]]["optimum_us"] == pub["optimum_us"]
    for s in r["splits"]:
        assert set(s) >= {"train", "test", "optimum_us", "train_tpot_mape", "test_tpot_mape", "gap",
                          "criteria_passed"}
        assert len(s["train"]) == 4 and len(s["test"]) == 2 and not set(s["train"]) & set(s["test"])
        assert s["gap"] == pytest.approx(s["test_tpot_mape"] - s["train_tpot_mape"])
        assert [type(p) for p in s["criteria_passed"]] == [bool] * 3
        gap = s["gap"]
        assert s["criteria_passed"] == [abs(gap) <= 0.03, s["test_tpot_mape"] < 0.20, gap <= 0.05]
    gaps = np.array([s["gap"] for s in r["splits"]])
    assert r["published_split_percentile"] == pytest.approx(100 * np.mean(gaps <= pub["gap"]))
    assert r["summary"]["criteria_pass_share"]["improvement"] == pytest.approx(
        np.mean([s["criteria_passed"][1] for s in r["splits"]]))
    assert len(r["extra"]) == 1 and len(r["extra"][0]["splits"]) == 4
    assert all(len(s["test"]) == 3 for s in r["extra"][0]["splits"])
    for f in ("results.json", "REPORT.md", "gap_histogram.png", "optimum_spread.png", "train_vs_test.png"):
        assert (out / f).stat().st_size > 0
    report = (out / "REPORT.md").read_text()
    assert "percentile" in report and "storage" in report and "sampler" in report


def test_array_selection_equals_brute_force_on_every_split(result, dataset):
    r, _ = result
    X = load_experiments(str(dataset))
    for s in r["splits"]:
        bf = brute_force(X, s["train"], s["test"])
        assert s["coarse_optimum_us"] == bf["coarse"]
        assert s["optimum_us"] == bf["optimum"]
        assert s["train_tpot_mape"] == pytest.approx(bf["train"], rel=1e-12)
        assert s["test_tpot_mape"] == pytest.approx(bf["test"], rel=1e-12)


def test_published_split_agrees_with_the_hg1_kind(result, dataset, tmp_path):
    r, _ = result
    hg1 = {"name": "tiny-hg1", "kind": "hg1", "dataset": str(dataset), "estimator": {"mode": "reference"},
           "split": {"column": "hg1_split"}, "phases": PHASES, "validation": ["optimum"], "criteria": CRITERIA}
    h = run_study(write(tmp_path, hg1), tmp_path / "hg1", progress=False, report=False)
    pub = r["published_split"]
    assert pub["optimum_us"] == h["optimum_us"]
    assert pub["train_tpot_mape"] == h["splits"]["train"]["tpot_mape"]["optimum"]
    assert pub["test_tpot_mape"] == h["splits"]["test"]["tpot_mape"]["optimum"]
    assert pub["criteria_passed"] == [c["passed"] for c in h["criteria"]]


def test_phased_optima_ties_go_to_the_smaller_value():
    class FakeGrid:
        def predictions(self, values, desc=None):
            class P:
                def ape(self, metric):
                    # flat landscape: every value ties
                    return np.ones((len(values), 3))
            return P()

    from calib.studies.common import Phase

    phases = [Phase(name="c", grid={"low": 0, "high": 50, "step": 25}),
              Phase(name="f", around="c", radius=10, step=5)]
    out = apematrix.phased_optima(FakeGrid(), phases,
                                  [np.array([0, 1]), np.array([2])])
    assert out == [{"c": 0.0, "f": 0.0}, {"c": 0.0, "f": 0.0}]


def test_rerun_is_byte_identical_and_replays_nothing(result, dataset, tmp_path, monkeypatch):
    r, out = result
    first = (out / "results.json").read_bytes()
    study = write(out.parent, study_dict(dataset))

    def no_replay(*a, **k):
        raise AssertionError("a finished study must not replay")

    monkeypatch.setattr(apematrix, "predict_experiments", no_replay)
    run_study(study, out, progress=False)  # same storage: everything loaded
    assert (out / "results.json").read_bytes() == first
    monkeypatch.undo()
    run_study(study, tmp_path / "fresh", progress=False)  # fresh storage: replayed again, same bytes
    assert (tmp_path / "fresh" / "results.json").read_bytes() == first
    storage = open_storage(f"journal:{out / 'optuna.journal'}")  # the default storage of a serial run
    s = optuna.load_study(study_name=r["settings"]["optuna_study"], storage=storage)
    stored = sum(len(t.user_attrs["candidates"]) for t in s.trials)
    assert stored == r["settings"]["grid_values_evaluated"]


@pytest.mark.parametrize("changes, field, message", [
    ({"splitter": {"type": "all_k_of_n", "n_test": 6}}, "splitter", "empty train"),
    ({"splitter": {"type": "all_k_of_n", "n_test": 0}}, "splitter.n_test", "greater than or equal to 1"),
    ({"extra_splitters": [{"type": "shuffle", "n_splits": 16, "test_size": 2}]}, "extra_splitters[0]",
     "only C(6, 2) = 15"),
    ({"extra_splitters": [{"type": "group_shuffle", "group": "vendor", "n_splits": 2, "test_size": 1}]},
     "extra_splitters[0]", "no column 'vendor'"),
    ({"extra_splitters": [{"type": "group_shuffle", "group": "family", "n_splits": 2, "test_size": 4}]},
     "extra_splitters[0]", "empty train"),
    ({"published": {"column": "nope"}}, "split.column", "no column"),
    ({"phases": [{"name": "c", "grid": {"low": 100, "high": 0, "step": 10}}]}, "phases.0.grid", "empty grid"),
    ({"phases": [{"name": "c", "grid": {"low": 0, "high": 100, "step": 0}}]}, "phases.0.grid.step", "greater"),
    ({"objective": "itl_mape"}, "(top level)", "unknown objective"),
])
def test_bad_input_is_caught_before_any_replay(tmp_path, dataset, monkeypatch, changes, field, message):
    def no_replay(*a, **k):
        raise AssertionError("replayed before validating")

    monkeypatch.setattr(apematrix, "predict_experiments", no_replay)
    path = write(tmp_path, study_dict(dataset, **changes))
    with pytest.raises(StudyError) as err:
        load_study_file(path)
        run_study(path, tmp_path / "out", progress=False)
    assert message in str(err.value)
    assert err.value.file and err.value.file.endswith("study.yaml")
    assert err.value.field is not None and err.value.field.startswith(field.split(".")[0])


def test_results_keys_of_the_shipped_study_file():
    spec = load_study_file(Path(__file__).resolve().parents[2] / "studies" / "split-sensitivity.yaml")
    assert spec.splitter.type == "all_k_of_n" and spec.splitter.n_test == 4
    assert spec.modes == ["reference", "corrected"]
    ref, cor = spec.for_mode("reference"), spec.for_mode("corrected")
    assert (ref.estimator["mode"], cor.estimator["mode"]) == ("reference", "corrected")
    assert json.dumps(ref.model_dump(exclude={"estimator"}), sort_keys=True) == json.dumps(
        cor.model_dump(exclude={"estimator"}), sort_keys=True)


def test_a_worker_process_leaves_the_work_to_the_lead(tmp_path, dataset, monkeypatch):
    from calib.studies.context import RunContext
    from calib.studies.kinds import KINDS

    def no_replay(*a, **k):
        raise AssertionError("a worker must not replay")

    monkeypatch.setattr(apematrix, "predict_experiments", no_replay)
    spec = load_study_file(write(tmp_path, study_dict(dataset)))
    ctx = RunContext(tmp_path / "w", role="worker")
    for kind in ("split_sensitivity", "per_group", "per_family", "seeds"):
        assert "worker" in KINDS[kind].run(spec, ctx)


def test_without_a_published_split(result, dataset):
    r, out = result
    other = run_study(write(out.parent, study_dict(dataset, published=None), "nopub.yaml"), out.parent / "nopub",
                      progress=False)
    assert other["published_split"] is None and other["published_split_percentile"] is None
    assert [s["optimum_us"] for s in other["splits"]] == [s["optimum_us"] for s in r["splits"]]
    assert "No published split" in (out.parent / "nopub" / "REPORT.md").read_text()
