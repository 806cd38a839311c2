"""The overhead-models study: nested by construction (instrumented), one record per fold, seed and candidate, the
selected model is the inner argmax, the recommended calibration, determinism, a worker, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from calib import Calibration, RooflineRegressor
from calib.calibrate import Calibrator, SelectBest
from calib.data import load_experiments
from calib.errors import StudyError
from calib.studies.context import RunContext
from calib.studies.kinds import overhead_models as om
from calib.studies.runner import run_study
from calib.studies.spec import load_study_file

KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "20260210-qwen3-14b-tp2-chatsweep",
        "20260210-llama2-70b-tp4-chatsweep", "20260210-codellama-34b-tp2-chatsweep"]
FAMILIES = ["codellama-34b", "llama2-70b", "llama2-7b", "qwen3-14b"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cut_dataset) -> Path:
    return cut_dataset(tmp_path_factory.mktemp("ds"), KEEP)


def study_dict(dataset: Path, **changes) -> dict:
    base = {"name": "tiny-om", "kind": "overhead_models", "dataset": str(dataset), "estimator": {"mode": "corrected"},
            "search": {"n_trials": 4, "seeds": 2},
            "models": [{"overhead": "per_layer"}, {"overhead": "per_layer_tp_power", "n_trials": 5}]}
    base.update(changes)
    return base


def write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def instrumented(tmp_path_factory, dataset):
    """One run with every Calibrator.fit and SelectBest.fit recorded, with the outer fold being worked on."""
    seen = {"fit": [], "select": []}
    current = {"test": None}
    real_fit, real_select = Calibrator.fit, SelectBest.fit

    class Outer(om.LeaveOneGroupOut):  # the kind's outer splitter only (the inner ones are nested.py's)
        def split(self, X, y=None, groups=None):
            for tr, te in super().split(X, y, groups):
                current["test"] = {str(i) for i in X.index[te]}
                yield tr, te
            current["test"] = None

    def fit(self, X, y=None):
        seen["fit"].append((current["test"], {str(i) for i in X.index}, tuple(self.search.seeds),
                            self.estimator.overhead_model))
        return real_fit(self, X, y)

    def select(self, X, y=None):
        seen["select"].append((current["test"], {str(i) for i in X.index}))
        return real_select(self, X, y)

    mp = pytest.MonkeyPatch()
    mp.setattr(om, "LeaveOneGroupOut", Outer)
    mp.setattr(Calibrator, "fit", fit)
    mp.setattr(SelectBest, "fit", select)
    tmp = tmp_path_factory.mktemp("run")
    try:
        r = run_study(write(tmp, study_dict(dataset)), tmp / "out", progress=False)
    finally:
        mp.undo()
    return r, tmp / "out", seen


def test_the_held_out_family_reaches_no_fit_and_no_choice(instrumented):
    r, _, seen = instrumented
    family = dict(zip(KEEP, ["llama2-7b", "llama2-7b", "qwen3-14b", "llama2-70b", "codellama-34b"]))
    in_folds = [s for s in seen["fit"] if s[0] is not None]
    assert {frozenset(s[0]) for s in in_folds} == {frozenset(k for k in KEEP if family[k] == f) for f in FAMILIES}
    for test, rows, _, _ in in_folds:
        assert not rows & test
    for test, rows in seen["select"]:
        assert test is None or not rows & test
    # inside each fold, SelectBest's inner loop leaves one more family out
    inner = [rows for test, rows, _, _ in in_folds if len({family[k] for k in rows}) == 2]
    assert len(inner) >= len(FAMILIES) * 2 * 2 * 3  # folds x seeds x candidates x inner folds
    # the recommended calibration is the only thing fitted on every experiment
    assert all(rows == set(KEEP) for test, rows, _, _ in seen["fit"] if len(rows) == len(KEEP))
    # each fit runs one search seed, and both seeds run for both candidates
    assert {(s, m) for *_, s, m in seen["fit"]} == {((0,), "per_layer"), ((1,), "per_layer"),
                                                   ((0,), "per_layer_tp_power"), ((1,), "per_layer_tp_power")}


def test_one_record_per_fold_seed_and_candidate(instrumented):
    r, _, _ = instrumented
    n = r["nested"]
    assert n["seeds"] == [0, 1] and n["candidates"] == ["per_layer", "per_layer_tp_power"]
    assert sorted((x["fold"], x["seed"], x["candidate"]) for x in n["records"]) == sorted(
        (f, s, c) for f in range(4) for s in (0, 1) for c in n["candidates"])
    for x in n["records"]:
        fold = n["folds"][x["fold"]]
        assert [row["row"] for row in x["rows"]] == fold["test"]
        assert set(x["test"]) == set(x["train"]) == {"tpot", "e2e", "ttft"}
        assert x["train_loss"] == pytest.approx(x["train"]["tpot"])  # the objective is the train TPOT MAPE
    # the held-out numbers are those of a direct replay at the fold's fitted parameters
    X = load_experiments(r["settings"]["dataset"])
    for x in n["records"][:4]:
        test = X.loc[n["folds"][x["fold"]]["test"]]
        overhead = next(c["overhead"] for c in r["candidates"] if c["name"] == x["candidate"])
        est = RooflineRegressor(mode="corrected", overhead_model=overhead,
                                **{k.split(".")[1]: v for k, v in x["params"].items()}).fit(test)
        pred = est.predict_all(test)
        assert x["test"]["tpot"] == pytest.approx(float(np.mean(np.abs(pred.tpot - test.tpot_mean_ms)
                                                                / test.tpot_mean_ms)), rel=1e-12)


def test_the_selected_model_is_the_inner_argmax_and_scored_as_chosen(instrumented):
    r, _, _ = instrumented
    n, sm = r["nested"], r["summary"]
    assert len(n["choices"]) == 4 * 2
    for ch in n["choices"]:
        assert ch["selected"] == max(ch["inner_mean"], key=ch["inner_mean"].get)
        assert ch["inner_cv"] == "LeaveOneGroupOut by family"
        rec = next(x for x in n["records"] if (x["fold"], x["seed"], x["candidate"]) ==
                   (ch["fold"], ch["seed"], ch["selected"]))
        assert ch["test"] == pytest.approx(rec["test"], rel=1e-12)
    for seed_i, seed in enumerate(n["seeds"]):
        rows = [row["ape"]["tpot"] for ch in n["choices"] if ch["seed"] == seed for row in ch["rows"]]
        assert len(rows) == len(KEEP)
        assert sm["selected"]["heldout"]["tpot"]["per_seed"][seed_i] == pytest.approx(np.mean(rows), rel=1e-12)
    h = sm["selected"]["heldout"]["tpot"]
    assert h["min"] <= h["median"] <= h["max"] and h["n"] == 2
    assert sum(sm["selected"]["counts"].values()) == 8


def test_recommended_calibration_and_report(instrumented):
    r, out, _ = instrumented
    rec = r["recommended"]
    assert rec["candidate"] == max(rec["votes"], key=lambda c: (rec["votes"][c], rec["mean_inner_score"][c]))
    cal = Calibration.load(out / "calibration.yaml")
    overhead = next(c["overhead"] for c in r["candidates"] if c["name"] == rec["candidate"])
    assert cal.settings.overhead.model == overhead
    assert {k: cal.settings.get(k) for k in rec["params"]} == pytest.approx(rec["params"])
    assert cal.heldout["tpot_mape"]["median"] == r["summary"]["selected"]["heldout"]["tpot"]["median"]
    assert len(cal.data["rows"]) == len(KEEP) and "SelectBest" in cal.notes
    report = (out / "REPORT.md").read_text()
    lines = report.splitlines()
    assert [ln.startswith("> ") for ln in lines[2:5]] == [True] * 3 and not lines[5].startswith(">")
    assert "descriptive, not a selection" in report and "mean APE over experiments" in report
    assert "median [min–max] over seeds" in report
    for f in ("results.json", "REPORT.md", "heldout.png", "implied_overhead.png"):
        assert (out / f).stat().st_size > 0


def test_rerun_and_fresh_run_are_identical_and_a_worker_shares_the_trials(instrumented, dataset, tmp_path):
    r, out, _ = instrumented
    first = (out / "results.json").read_bytes()
    study = write(out.parent, study_dict(dataset))
    run_study(study, out, progress=False)  # resumed: every search read back from the storage
    assert (out / "results.json").read_bytes() == first
    run_study(study, tmp_path / "fresh", progress=False)
    assert (tmp_path / "fresh" / "results.json").read_bytes() == first
    assert (tmp_path / "fresh" / "calibration.yaml").read_text() == (out / "calibration.yaml").read_text()
    spec = load_study_file(study)
    ctx = RunContext(tmp_path / "worker", storage_url=f"journal:{out / 'optuna.journal'}", role="worker",
                     progress=False)
    w = om.run(spec, ctx)
    assert w["summary"] == r["summary"] and not (tmp_path / "worker" / "calibration.yaml").exists()


def test_shipped_study_file():
    root = Path(__file__).resolve().parents[2] / "studies"
    spec = load_study_file(root / "overhead-models.yaml")
    assert spec.modes == ["reference", "corrected"] and spec.group == "family"
    assert [m.overhead for m in spec.models][0] == "per_layer"
    assert len(spec.search.make().seeds) >= 5
    assert not (root / "overhead-models-corrected.yaml").exists()


@pytest.mark.parametrize("changes, message", [
    ({"models": [{"overhead": "per_token"}]}, "unknown overhead model"),
    ({"models": [{"overhead": "per_layer", "space": {"alpha": {"low": 0, "high": 1}}}]}, "not a parameter"),
    ({"models": [{"overhead": "per_layer", "space": {"per_layer_us": {"low": 10, "high": 1}}}]}, "empty range"),
    ({"models": [{"overhead": "per_layer", "space": {"per_layer_us": {"low": -5, "high": 1}}}]}, "must be >= 0"),
    ({"models": [{"overhead": "per_layer", "joint": {"seed": {"low": 0, "high": 1}}}]}, "physics settings"),
    ({"models": [{"overhead": "per_layer", "joint": {"bw_efficiency": {"low": 0.5, "high": 1.5}}}]}, "must be <="),
    ({"models": [{"overhead": "per_layer", "objective": "itl"}]}, "unknown metric"),
    ({"models": [{"overhead": "per_layer"}, {"overhead": "per_layer"}]}, "labelled"),
    ({"estimator": {"mode": "corrected", "per_layer_us": 80}}, "must not set the overhead"),
    ({"search": {"seeds": [1, 1]}}, "seeds repeat"),
    ({"models": []}, "at least 1"),
])
def test_bad_study_files_fail_on_one_line_before_any_work(tmp_path, dataset, monkeypatch, changes, message):
    monkeypatch.setattr(Calibrator, "fit", lambda *a, **k: pytest.fail("searched before validating"))
    with pytest.raises(StudyError) as err:
        run_study(write(tmp_path, study_dict(dataset, **changes)), tmp_path / "out", progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_group_column_is_a_study_error(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(Calibrator, "fit", lambda *a, **k: pytest.fail("searched before validating"))
    with pytest.raises(StudyError, match="column 'vendor'"):
        run_study(write(tmp_path, study_dict(dataset, group="vendor")), tmp_path / "out", progress=False)
