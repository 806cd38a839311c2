"""Overhead models with nested CV: the inner searches never see held-out experiments (instrumented), pool
selection equals brute force, resume, determinism, Pareto fronts, the results.json contract, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.data import load_experiments
from calib.errors import StudyError
from calib.studies import apematrix
from calib.studies.evaluate import evaluate
from calib.studies.kinds import overhead_models as om
from calib.studies.runner import run_study
from calib.studies.spec import load_study_file

KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "20260210-qwen3-14b-tp2-chatsweep",
        "20260210-llama2-70b-tp4-chatsweep"]




@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cut_dataset) -> Path:
    return cut_dataset(tmp_path_factory.mktemp("ds"), KEEP)


def study_dict(dataset: Path, **changes) -> dict:
    base = {"name": "tiny-om", "kind": "overhead_models", "dataset": str(dataset),
            "estimator": {"mode": "corrected"},
            "sampler": {"seed": 0, "n_trials": 4, "n_startup_trials": 2},
            "leave_one_group_out": {"group": "family"},
            "all_splits": {"n_test": 1, "pool_size": 4, "seed": 0},
            "models": [{"overhead": "per_layer"},
                       {"overhead": "per_layer_tp_power", "objectives": ["tpot_mape", "ttft_mape"]}]}
    base.update(changes)
    return base


def write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def instrumented(tmp_path_factory, dataset):
    """One run with every replay recorded: (active Optuna study, experiments shown)."""
    calls = {"search": [], "heldout": []}
    active = {"study": None}
    real_tpe = om.tpe_search

    def tpe(study_name, *a, **k):
        active["study"] = study_name
        try:
            return real_tpe(study_name, *a, **k)
        finally:
            active["study"] = None

    def search_eval(X, params):
        calls["search"].append((active["study"], tuple(sorted(X.index))))
        return evaluate(X, params)

    def heldout_eval(X, params):
        calls["heldout"].append((active["study"], tuple(sorted(X.index)), params["overhead_model"]))
        return evaluate(X, params)

    mp = pytest.MonkeyPatch()
    mp.setattr(om, "tpe_search", tpe)
    mp.setattr(om, "_search_eval", search_eval)
    mp.setattr(om, "_heldout_eval", heldout_eval)
    tmp = tmp_path_factory.mktemp("run")
    try:
        r = run_study(write(tmp, study_dict(dataset)), tmp / "out", progress=False)
    finally:
        mp.undo()
    return r, tmp / "out", calls


def test_inner_searches_never_see_the_held_out_family(instrumented, dataset):
    r, _, calls = instrumented
    X = load_experiments(str(dataset))
    family = {str(n): str(f) for n, f in zip(X.index, X.family)}
    everything = tuple(sorted(family))
    per_study: dict[str, set] = {}
    for study, shown in calls["search"]:
        assert study is not None, "a search replay outside any TPE study"
        per_study.setdefault(study, set()).add(shown)
    fold_studies = [s for s in per_study if "-leave_one_family_out-" in s]
    assert len(fold_studies) == 2 * X.family.nunique()  # two models x three families
    for s in fold_studies:
        held = s.rsplit("-leave_one_family_out-", 1)[1]
        train = tuple(n for n in everything if family[n] != held)
        assert per_study[s] == {train}, f"{s} evaluated {per_study[s]}"
    for s in per_study:
        if s.endswith("-all"):
            assert per_study[s] == {everything}
    assert set(per_study) == set(fold_studies) | {s for s in per_study if s.endswith("-all")}
    # the held-out family is replayed once per model and fold, after its search, on its experiments only
    assert all(study is None for study, _, _ in calls["heldout"])
    held = sorted((shown, m) for _, shown, m in calls["heldout"])
    expected = sorted((tuple(n for n in everything if family[n] == f), m) for f in set(family.values())
                      for m in ("per_layer", "per_layer_tp_power"))
    assert held == expected


def test_results_contract(instrumented):
    r, out, _ = instrumented
    assert r["mode"] == "corrected"
    assert [e["rank"] for e in r["ranking"]] == [1, 2]
    lo = [e["heldout"]["leave_one_family_out"]["tpot_mape"] for e in r["ranking"]]
    assert lo == sorted(lo)
    for e in r["ranking"]:
        assert set(e) >= {"model", "params", "n_params", "heldout"}
        assert e["n_params"] == len(e["params"]) == {"per_layer": 1, "per_layer_tp_power": 2}[e["overhead"]]
        for scheme in ("leave_one_family_out", "all_splits"):
            h = e["heldout"][scheme]
            for k in ("tpot_mape", "ttft_mape", "e2e_mape", "worst_fold_tpot_mape"):
                assert 0 <= h[k] < 5  # fractions, not percent
            assert h["worst_fold_tpot_mape"] >= h["tpot_mape"]
        folds = e["folds"]["leave_one_family_out"]
        assert e["heldout"]["leave_one_family_out"]["tpot_mape"] == pytest.approx(
            np.mean([f["heldout"]["tpot_mape"] for f in folds]))
        assert e["heldout"]["all_splits"]["n_folds"] == 4
    for f in ("results.json", "REPORT.md", "ranking.png", "implied_overhead.png", "pareto.png"):
        assert (out / f).stat().st_size > 0
    report = (out / "REPORT.md").read_text()
    assert "TPESampler(seed=0" in report and "storage" in report and "What is nested" in report


def test_heldout_numbers_equal_direct_replays(instrumented, dataset):
    r, _, _ = instrumented
    X = load_experiments(str(dataset))
    for e in r["ranking"]:
        m = om.ModelEntry(overhead=e["overhead"], objectives=e["objectives"])
        for f in e["folds"]["leave_one_family_out"]:
            ev = evaluate(X.loc[f["test"]], {"mode": "corrected", **om.estimator_params(m, f["params"])})
            assert f["heldout"]["tpot_mape"] == pytest.approx(ev["tpot_ape"].mean(), rel=1e-12)
            assert f["heldout"]["ttft_mape"] == pytest.approx(ev["ttft_ape"].mean(), rel=1e-12)


def test_pool_selection_equals_brute_force(instrumented, dataset):
    r, _, _ = instrumented
    X = load_experiments(str(dataset))
    names = [str(n) for n in X.index]
    for e in r["ranking"]:
        m = om.ModelEntry(overhead=e["overhead"], objectives=e["objectives"])
        pool = apematrix.qmc_pool(om.search_space(m), 4, 0)
        evs = [evaluate(X, {"mode": "corrected", **om.estimator_params(m, p)}) for p in pool]
        objs = [o.removesuffix("_mape") for o in e["objectives"]]
        tests = []
        for held in names:
            train = [n for n in names if n != held]
            scores = [np.mean([ev.loc[train, f"{o}_ape"].mean() for o in objs]) for ev in evs]
            best = min(range(len(pool)), key=lambda i: (scores[i], i))
            tests.append(evs[best].loc[[held], "tpot_ape"].mean())
        assert e["heldout"]["all_splits"]["tpot_mape"] == pytest.approx(np.mean(tests), rel=1e-12)
        assert e["heldout"]["all_splits"]["worst_fold_tpot_mape"] == pytest.approx(max(tests), rel=1e-12)


def test_pareto_front_is_non_dominated(instrumented):
    r, _, _ = instrumented
    e = next(x for x in r["ranking"] if len(x["objectives"]) == 2)
    front = e["pareto_front"]
    assert front
    for a in front:
        for b in front:
            dominated = all(b[o] <= a[o] for o in e["objectives"]) and any(b[o] < a[o] for o in e["objectives"])
            assert not dominated
    # the shipped parameters are the front's point with the lowest mean of the two objectives
    best = min(front, key=lambda p: (np.mean([p[o] for o in e["objectives"]]), p["trial"]))
    assert e["params"] == best["params"]


@settings(max_examples=60, deadline=None)
@given(A=arrays(np.float64, (7, 5), elements=st.floats(0, 2, allow_nan=False)), data=st.data())
def test_select_from_pool_reads_only_train_columns(A, data):
    train = np.array(sorted(data.draw(st.sets(st.integers(0, 4), min_size=1, max_size=4))))
    test = np.setdiff1d(np.arange(5), train)
    B = A.copy()
    B[:, test] = data.draw(arrays(np.float64, (7, len(test)), elements=st.floats(0, 2, allow_nan=False)))
    mats_a = {"tpot": A, "ttft": A[::-1].copy()}
    mats_b = {"tpot": B, "ttft": B[::-1].copy()}
    for objs in (["tpot"], ["tpot", "ttft"]):
        sa = om.select_from_pool(mats_a, [train], objs)[0]
        assert sa == om.select_from_pool(mats_b, [train], objs)[0]
        scores = [np.mean([mats_a[o][i, train].mean() for o in objs]) for i in range(7)]
        assert sa == min(range(7), key=lambda i: (scores[i], i))


def test_resume_continues_to_the_requested_trials_and_rerun_is_identical(instrumented, dataset, tmp_path):
    r, out, _ = instrumented
    first = (out / "results.json").read_bytes()
    study = write(out.parent, study_dict(dataset))
    run_study(study, out, progress=False)
    assert (out / "results.json").read_bytes() == first
    url = f"sqlite:///{out / 'optuna.db'}"
    name = r["ranking"][0]["optuna_studies"]["all"] if r["ranking"][0]["overhead"] == "per_layer" else \
        r["ranking"][1]["optuna_studies"]["all"]
    before = [t.params for t in optuna.load_study(study_name=name, storage=url).trials]
    assert len(before) == 4
    more = study_dict(dataset)
    more["models"] = [{"overhead": "per_layer", "n_trials": 6}]
    run_study(write(out.parent, more, "more.yaml"), out, progress=False, report=False)
    after = [t.params for t in optuna.load_study(study_name=name, storage=url).trials]
    assert len(after) == 6 and after[:4] == before
    # resumed (4 then 6) proposes the same trials as an uninterrupted search of 6
    run_study(write(out.parent, more, "more.yaml"), tmp_path / "straight", progress=False, report=False)
    straight = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'straight' / 'optuna.db'}")
    assert [t.params for t in straight.trials] == after
    # a fresh storage reproduces the first run byte for byte
    run_study(study, tmp_path / "fresh", progress=False)
    assert (tmp_path / "fresh" / "results.json").read_bytes() == first


def test_shipped_study_files_are_valid():
    root = Path(__file__).resolve().parents[2] / "studies"
    a = load_study_file(root / "overhead-models.yaml")
    b = load_study_file(root / "overhead-models-corrected.yaml")
    assert (a.estimator["mode"], b.estimator["mode"]) == ("reference", "corrected")
    overheads = {m.overhead for m in a.models}
    assert overheads == {"per_layer", "per_layer_tp_power", "per_step_plus_per_layer", "prefill_decode_split",
                         "batch_linear"}
    assert any(m.joint for m in a.models) and any(len(m.objectives) == 2 for m in a.models)


@pytest.mark.parametrize("changes, field, message", [
    ({"models": [{"overhead": "per_layer", "space": {"per_layer_us": {"low": 100, "high": 10}}}]},
     "models.0.space.per_layer_us", "inverted range"),
    ({"models": [{"overhead": "per_layer", "space": {"per_layer_us": {"low": 10, "high": 10}}}]},
     "models.0.space.per_layer_us", "empty range"),
    ({"models": [{"overhead": "per_layer", "joint": {"mfu_rule": {"choices": []}}}]},
     "models.0.joint.mfu_rule", "no choices"),
    ({"models": [{"overhead": "per_layer", "space": {"per_layer_us": {"low": 0, "high": 10, "step": 5}}}]},
     "(top level)", "asks for 4 trials but its search space has only 3 points"),
    ({"models": [{"overhead": "per_layer", "n_trials": 3,
                  "space": {"per_layer_us": {"low": 0, "high": 10, "step": 5}}}]},
     "(top level)", "pool_size 4 exceeds the 3 points"),
    ({"models": [{"overhead": "per_token"}]}, "models.0.overhead", "unknown overhead model"),
    ({"models": [{"overhead": "per_layer", "space": {"alpha": {"low": 0, "high": 1}}}]}, "models.0",
     "not a parameter"),
    ({"models": [{"overhead": "per_layer", "joint": {"seed": {"low": 0, "high": 1}}}]}, "models.0",
     "cannot search 'seed' jointly"),
    ({"models": [{"overhead": "per_layer", "objectives": ["itl_mape"]}]}, "models.0", "unknown objective"),
    ({"models": [{"overhead": "per_layer"}, {"overhead": "per_layer"}]}, "(top level)", "labelled"),
    ({"leave_one_group_out": {"group": "vendor"}}, "leave_one_group_out", "no column 'vendor'"),
    ({"all_splits": {"n_test": 4}}, "all_splits", "empty train"),
    ({"models": []}, "models", "at least 1"),
])
def test_bad_input_is_caught_before_any_work(tmp_path, dataset, monkeypatch, changes, field, message):
    def no_replay(*a, **k):
        raise AssertionError("replayed before validating")

    monkeypatch.setattr(apematrix, "predict_experiments", no_replay)
    monkeypatch.setattr(om, "_search_eval", no_replay)
    with pytest.raises(StudyError) as err:
        run_study(write(tmp_path, study_dict(dataset, **changes)), tmp_path / "out", progress=False)
    assert message in str(err.value)
    assert err.value.field.startswith(field)
    assert not (tmp_path / "out" / "optuna.db").exists() or not optuna.get_all_study_summaries(
        f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
