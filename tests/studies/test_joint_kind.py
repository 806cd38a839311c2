"""The ``joint`` study kind: synchronous experiments and loaded runs held out by model together.

Pure pieces (the split, the per-dataset restriction of a nested result, the targets, the per-run figures) are
checked on hand-made inputs; one tiny study on a subset of the shipped rows (2 candidates, 2 trials, 2 seeds,
10 s windows) checks nestedness across both datasets, the results, the calibration file and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from calib.calibrate.nested import NestedResult, summarize
from calib.errors import StudyError
from calib.studies.kinds.joint import run_figures, targets
from calib.studies.loaded_data import SearchWindowSplit
from calib.studies.runner import run_study
from calib.studies.spec import load_study_file

DENSE = ["20260217-162547-llama-2-7b-tp1-roleplay", "20260218-155500-codellama-34b-tp2-roleplay"]
OTHER = ["20260218-141024-mixtral-8x7b-v0-1-tp2-roleplay", "20260217-170634-llama-2-7b-tp1-reasoning"]
EXPERIMENTS = ["jan30-llama2-7b-tp1-chatsweep", "20260210-codellama-34b-tp2-codesweep", "20260210-qwen3-14b-tp1-codesweep"]


def study(**changes) -> dict:
    base = {"name": "tiny-joint", "kind": "joint", "runs": DENSE + OTHER, "experiments": EXPERIMENTS,
            "candidates": [
                {"label": "v2.4-physics", "physics": {"variant": "v2.4"}, "overhead_model": "per_layer_tp_power",
                 "cpu_overlap": True, "space": {"per_layer_us": {"low": 0, "high": 300}, "alpha": {"low": 0, "high": 1.5},
                           "request_latency_ms": {"low": 0, "high": 40}}},
                {"label": "v3-physics", "physics": {"variant": "v3"}, "overhead_model": "per_layer",
                 "space": {"mfu_decode": {"low": 0.1, "high": 0.9}, "per_layer_us": {"low": 0, "high": 300}}}],
            "search": {"n_trials": 2, "seeds": 2, "window_s": 10},
            "evidence": {"contexts": [512, 4096], "batches": [1, 8, 64], "requests": 20},
            "ship_to": "configs/calibrations/h100-vllm.yaml"}
    base.update(changes)
    return base


def write(tmp: Path, data: dict) -> Path:
    path = tmp / "joint.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------- pure pieces


def test_split_keeps_a_models_experiments_and_runs_together():
    X = pd.DataFrame({"model": ["a", "b", "a", "b", "a", "b", "q"],
                      "dataset": ["loaded"] * 4 + ["sync"] * 3,
                      "window_s": [5.0, 5.0, np.nan, np.nan, np.nan, np.nan, np.nan]})
    splits = [(tr.tolist(), te.tolist()) for tr, te in SearchWindowSplit().split(X, groups=X["model"])]
    # fit: windowed stages and every experiment of the other models; score: the model's full stages + experiments
    assert splits == [([1, 5, 6], [2, 4]), ([0, 4, 6], [3, 5]), ([0, 1, 4, 5], [6])]
    assert SearchWindowSplit().get_n_splits(X, groups=X["model"]) == 3
    no_dataset = X.drop(columns="dataset").iloc[:4]  # the loaded-only behaviour is unchanged
    assert [(tr.tolist(), te.tolist()) for tr, te in SearchWindowSplit().split(no_dataset, groups=no_dataset["model"])
            ] == [([1], [2]), ([0], [3])]


def _nested() -> NestedResult:
    """Two folds, one seed, one candidate: fold 0 holds a sync row and two stages of run r; fold 1 a sync row."""
    def row(name, tpot, weight):
        return {"row": name, "weight": weight, "ape": {"ttft": tpot, "tpot": tpot, "e2e": tpot},
                "predicted": {}, "measured": {}}
    rows0 = [row("e1", 0.10, 0.5), row("r:0", 0.20, 0.25), row("r:1", 0.40, 0.25)]
    rows1 = [row("e2", 0.30, 1.0)]
    res = NestedResult(["c"], [0], folds=[{"fold": 0, "train": [], "test": ["e1", "r:0", "r:1"], "test_groups": ["a"]},
                                          {"fold": 1, "train": [], "test": ["e2"], "test_groups": ["q"]}])
    for k, rows in enumerate((rows0, rows1)):
        test = {m: float(np.average([r["ape"][m] for r in rows], weights=[r["weight"] for r in rows]))
                for m in ("ttft", "tpot", "e2e")}
        res.records.append({"fold": k, "seed": 0, "candidate": "c", "params": {}, "train_loss": 0.0, "test": test,
                            "rows": rows})
        res.choices.append({"fold": k, "seed": 0, "selected": "c", "test": test, "rows": rows})
    return res


def test_subset_gives_each_datasets_own_figures():
    res = _nested()
    loaded = res.subset({"r:0": 0.5, "r:1": 0.5}, "over runs")
    sync = res.subset({"e1": 1.0, "e2": 1.0}, "over experiments")
    assert [f["fold"] for f in loaded.folds] == [0] and [f["fold"] for f in sync.folds] == [0, 1]
    assert loaded.pooled("tpot", 0) == pytest.approx(0.30) and sync.pooled("tpot", 0) == pytest.approx(0.20)
    assert loaded.aggregation == "over runs" and res.pooled("tpot", 0) == pytest.approx(0.25)  # untouched
    s = summarize(sync)
    assert s["selected"]["heldout"]["tpot"]["median"] == pytest.approx(0.20)
    assert [f["n_test"] for f in s["selected"]["per_fold"]] == [1, 1]
    figs, rule = run_figures(loaded, {"r:0": "r", "r:1": "r"}, {"r": "a"}, 0.25)
    assert figs[0]["run"] == "r" and figs[0]["tpot"]["median"] == pytest.approx(0.30)
    assert rule["met"] is False and rule["worst"] == {"tpot": "r", "e2e": "r"}


def test_targets_read_the_selected_median_per_dataset():
    res = _nested()
    sl = summarize(res.subset({"r:0": 0.5, "r:1": 0.5}, "runs"))
    ss = summarize(res.subset({"e1": 1.0, "e2": 1.0}, "experiments"))
    t = targets(sl, ss, {"loaded_tpot": 0.05, "loaded_ttft": 0.35, "sync_e2e": 0.10})
    assert t == {"loaded_tpot": {"measured": pytest.approx(0.30), "target": 0.05, "met": False},
                 "loaded_ttft": {"measured": pytest.approx(0.30), "target": 0.35, "met": True},
                 "sync_e2e": {"measured": pytest.approx(0.20), "target": 0.10, "met": False}}


@pytest.mark.parametrize("change,match", [
    ({"targets": {"loaded_p99": 0.1}}, "targets"),
    ({"candidates": [{"label": "c", "space": {"mode": {"choices": ["reference", "corrected"]}}}]}, "cannot be searched"),
    ({"candidates": [{"label": "c", "space": {"per_layer_us": {"low": 0, "high": 1}}},
                     {"label": "c", "space": {"per_layer_us": {"low": 0, "high": 1}}}]}, "used twice"),
])
def test_bad_joint_files(tmp_path, change, match):
    with pytest.raises(StudyError, match=match):
        load_study_file(write(tmp_path, study(**change)))


def test_shipped_study_file_is_valid():
    from calib.resources import study_file

    spec = load_study_file(study_file("joint"))
    assert spec.kind == "joint" and spec.ship_to == "configs/calibrations/h100-vllm.yaml"
    assert len(list(spec.search.make().seeds)) >= 5


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny study run once, recording the models and datasets every Calibrator fit saw inside an outer fold."""
    from calib.calibrate import Calibrator
    from calib.studies import loaded_nested

    seen, state = [], {"heldout": None}

    class Recording(SearchWindowSplit):
        def split(self, X, y=None, groups=None):
            for tr, te in super().split(X, y, groups):
                state["heldout"] = set(X["model"].iloc[te])
                yield tr, te
            state["heldout"] = None

    real = Calibrator.fit

    def fit(self, X, y=None):
        seen.append((state["heldout"], set(X["model"]), set(X["dataset"]), list(map(str, X.index))))
        return real(self, X, y)

    tmp = tmp_path_factory.mktemp("joint")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Calibrator, "fit", fit)
        mp.setattr(loaded_nested, "SearchWindowSplit", Recording)
        r = run_study(write(tmp, study()), tmp / "out", progress=False)
    return r, seen, tmp


def test_no_fit_sees_the_heldout_model_in_either_dataset(tiny):
    r, seen, _ = tiny
    inside = [s for s in seen if s[0] is not None]
    assert inside and any(s[0] is None for s in seen)
    for heldout, models, datasets, rows in inside:
        assert not heldout & models
    assert any(datasets == {"sync", "loaded"} for _, _, datasets, _ in inside)  # outer fits see both datasets
    for *_, rows in seen:
        assert not any(":" in row and "@" not in row for row in rows), "a search fitted a full trace"
    folds = r["nested"]["folds"]
    assert [f["test_groups"] for f in folds] == [["codellama-34b-instruct-hf"], ["llama-2-7b-hf"], ["qwen3-14b"]]
    assert folds[2]["test"] == ["20260210-qwen3-14b-tp1-codesweep"]  # experiments only: scored on them
    assert set(folds[1]["test"]) == {"jan30-llama2-7b-tp1-chatsweep", "20260217-162547-llama-2-7b-tp1-roleplay:0"}


def test_results_per_dataset_targets_and_runs(tiny):
    r, _, _ = tiny
    sl, ss = r["summary_loaded"], r["summary_sync"]
    assert len(sl["selected"]["per_fold"]) == 2 and len(ss["selected"]["per_fold"]) == 3
    for name, t in r["targets"].items():
        side, metric = name.split("_")
        summary = sl if side == "loaded" else ss
        assert t["measured"] == summary["selected"]["heldout"][metric]["median"]
        assert t["met"] == (t["measured"] < t["target"])
    assert set(r["targets"]) == {"loaded_tpot", "loaded_e2e", "loaded_ttft", "sync_tpot", "sync_e2e"}
    assert sorted(e["run"] for e in r["runs"]) == sorted(DENSE)
    assert r["run_target"]["met"] == all(e["tpot"]["median"] < 0.1 and e["e2e"]["median"] < 0.1 for e in r["runs"])
    assert sorted(sl["selected"]["per_row"]) == sorted(f"{run}:0" for run in DENSE)
    assert r["dataset"]["models"]["qwen3-14b"] == {"experiments": ["20260210-qwen3-14b-tp1-codesweep"],
                                                   "loaded_runs": []}
    assert isinstance(r["runaway"]["any_selected"], bool)


def test_mixtral_overloaded_calibration_and_report(tiny):
    from calib import Calibration, JointRegressor

    r, _, tmp = tiny
    v24, v3 = r["candidates"]
    assert "moe" in v3["fit"]["other_runs"] and "moe" not in v24["fit"]["other_runs"]
    assert v24["cpu_overlap"] is True and v3["cpu_overlap"] is False
    other = {e["run"]: e for e in r["recommended"]["other_runs"]}
    assert other[OTHER[1]]["group"] == "overloaded" and other[OTHER[1]]["supported"]
    assert other[OTHER[0]]["supported"] == (r["recommended"]["candidate"] == "v3-physics")
    cal = Calibration.load(tmp / "out" / "calibration.yaml")
    assert cal.estimator_class == "JointRegressor" and cal.settings.replay.mode == "corrected"
    assert cal.heldout["loaded_tpot_mape"]["median"] == r["targets"]["loaded_tpot"]["measured"]
    assert cal.heldout["sync_e2e_mape"]["median"] == r["targets"]["sync_e2e"]["measured"]
    assert isinstance(cal.estimator(), JointRegressor)
    assert r["ship_to"] == "configs/calibrations/h100-vllm.yaml" and not (tmp / "configs").exists()
    out = tmp / "out"
    report = (out / "REPORT.md").read_text()
    assert "## Targets" in report and "loaded_tpot" in report and "Mixtral" in report
    for png in ("heldout", "convergence", "step_time", "ttft", "tpot_inflight"):
        assert (out / f"{png}.png").stat().st_size > 1000
    curves = r["evidence"]["step_curves"]
    assert len(curves) == 2 * 2 * 2  # candidates x dense (model, tp) x contexts
    assert all(np.all(np.diff(c["step_ms"]) >= 0) for c in curves)  # a bigger batch never steps faster
    assert {(e["candidate"], e["run"]) for e in r["evidence"]["replays"]} == {
        (c, run) for c in ("v2.4-physics", "v3-physics") for run in DENSE}
    json.dumps(r)


def test_report_is_deterministic(tiny):
    from calib.reporting import write_report

    r, _, tmp = tiny
    again = tmp / "again"
    again.mkdir()
    write_report(json.loads((tmp / "out" / "results.json").read_text()), again)
    for name in ("REPORT.md", "step_time.png", "ttft.png", "tpot_inflight.png", "heldout.png"):
        assert (again / name).read_bytes() == (tmp / "out" / name).read_bytes()


def test_study_lengths_reach_the_synchronous_replays(tmp_path):
    """``lengths`` of a joint study file sets how its synchronous experiments' requests are made, nothing else."""
    from calib.data import load_experiments

    X = load_experiments().loc[["20260210-codellama-34b-tp2-codesweep"]]
    default = load_study_file(write(tmp_path, study()))
    quant = load_study_file(write(tmp_path, study(lengths="quantiles")))
    assert default.lengths == "reference" and quant.lengths == "quantiles"
    for spec in (default, quant):
        est = spec.regressor(spec.candidates[0])
        assert est.get_params()["lengths"] == spec.lengths
        sync = est.parts()["sync"]
        assert sync.settings().replay.lengths == spec.lengths
        e2e = sync.fit(X, X.e2e_mean_ms).predict_all(X)["e2e"].iloc[0]
        if spec is default:
            ref_e2e = e2e
    assert e2e < ref_e2e  # seed 42's draws have 51.8 output tokens on average, the distribution 42.4
    with pytest.raises(StudyError, match="lengths"):
        load_study_file(write(tmp_path, study(lengths="run")))


def test_candidate_cpu_overlap_reaches_its_estimator(tmp_path):
    """A candidate's ``cpu_overlap`` is its estimator's ``replay.cpu_overlap`` (what its calibration file carries);
    the other candidate keeps the default."""
    spec = load_study_file(write(tmp_path, study()))
    on, off = (spec.regressor(c) for c in spec.candidates)
    assert on.settings().replay.cpu_overlap is True and off.settings().replay.cpu_overlap is False
    assert on.parts()["loaded"].get_params()["cpu_overlap"] is True


def test_search_refine_reaches_every_fit(tmp_path):
    """``search.refine`` of a loaded-study file is the CMA-ES polish of every fit, one per nested seed."""
    from calib.calibrate.nested import with_seed

    spec = load_study_file(write(tmp_path, study(search={"n_trials": 4, "seeds": 3, "refine": 7})))
    search = spec.search.make()
    assert search.refine == 7 and search.describe()["refine"] == 7
    assert load_study_file(write(tmp_path, study())).search.make().refine == 0
    from calib.calibrate import Calibrator

    one = with_seed(Calibrator(spec.regressor(spec.candidates[0]), spec.space(spec.candidates[0]), search=search), 2)
    assert one.search.seeds == [2] and one.search.refine == 7
    with pytest.raises(StudyError, match="refine"):
        load_study_file(write(tmp_path, study(search={"refine": -1})))
