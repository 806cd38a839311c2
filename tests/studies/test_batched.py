"""Loaded-server studies (batched_validation, batched_calibration, physics) on tiny synthetic runs.

The synthetic runs have the ``data/batched/`` layout (requests.json, ground_truth.json, profile.yaml,
exp-config.yaml) with a few dozen short requests, so every study runs end to end in seconds.  The calibrating
kinds run with two seeds, three trials and a 3 s search window: nestedness (no fit sees the held-out model, every
fit sees windowed rows only), per-seed records, the inner choice as the inner-CV argmax, determinism and the
calibration file are checked on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from calib.errors import DataError, StudyError
from calib.studies.runner import run_study
from calib.studies.spec import load_study_file

MODELS = {"llama-2-7b-hf": ("meta-llama/Llama-2-7b-hf", 1), "codellama-34b-instruct-hf":
          ("codellama/CodeLlama-34b-Instruct-hf", 2), "mixtral-8x7b-v0.1": ("mistralai/Mixtral-8x7B-v0.1", 2)}


def make_run(root: Path, name: str, model: str, profile: str = "codegen", *, n: int = 24, rate: float = 4.0,
             out: int = 12, errors: int = 0, tpot_ms: float = 8.0, gt_mismatch: bool = False) -> Path:
    """A tiny loaded run: ``n`` requests at ``rate`` req/s, measured TTFT 30 ms and TPOT ``tpot_ms``."""
    hf, tp = MODELS[model]
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    reqs, gts = [], []
    for i in range(n):
        inp = int(rng.integers(80, 160))
        o = out if i % 5 else 2  # every fifth request records a short output (the output rule fixes it)
        err = i < errors
        reqs.append({"index": i, "arrival_time_us": int(i * 1e6 / rate), "input_tokens": inp, "output_tokens": o,
                     "prefix_group": "", "has_error": err})
        ttft = 0.030
        gts.append({"index": i + (1 if gt_mismatch and i == 3 else 0), "has_error": err, "ttft_s": ttft,
                    "e2e_s": ttft + (out - 1) * tpot_ms / 1e3})
    doc = {"experiment": name, "model_id": hf, "profile": profile, "split": "train",
           "config": {"tensor_parallelism": tp, "max_num_seqs": 16, "max_num_batched_tokens": 512,
                      "kv_blocks_total_gpu": 4000, "block_size": 16, "num_prefix_groups": 0, "users_per_group": 0,
                      "system_prompt_len": 0},
           "requests": reqs}
    (d / "requests.json").write_text(json.dumps(doc))
    (d / "ground_truth.json").write_text(json.dumps(gts))
    prof = {"data": {"shared_prefix": {"output_len": out, "system_prompt_len": 32, "num_unique_system_prompts": 2,
                                       "question_len": 100}},
            "load": {"stages": [{"duration": n / rate / 2, "rate": rate}, {"duration": n / rate / 2, "rate": rate}]}}
    (d / "profile.yaml").write_text(yaml.safe_dump(prof))
    (d / "exp-config.yaml").write_text(yaml.safe_dump({"model": hf, "tensor_parallelism": tp,
                                                       "max_model_len": 4096}))
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batched")
    make_run(root, "r1-llama-2-7b-codegen", "llama-2-7b-hf")
    make_run(root, "r2-llama-2-7b-roleplay", "llama-2-7b-hf", "roleplay", rate=6.0)
    make_run(root, "r3-codellama-codegen", "codellama-34b-instruct-hf", tpot_ms=14.0)
    make_run(root, "r4-mixtral-codegen", "mixtral-8x7b-v0.1", tpot_ms=15.0)
    make_run(root, "r5-llama-2-7b-reasoning", "llama-2-7b-hf", "reasoning", n=16, out=20, errors=4)
    return root


def write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def fake_hg1(tmp_path: Path, optimum: float = 60.0) -> Path:
    """A calibration file as the HG1 study writes it (per-layer optimum ``optimum``)."""
    from calib import Calibration
    from calib.settings import Settings

    s = Settings.from_params({"variant": "v2.3", "mfu_rule": "nearest", "bw_efficiency": 0.82, "per_layer_us": optimum})
    return Calibration(settings=s, data={"rows": [f"e{i}" for i in range(9)]},
                       notes="HG1 optimum").save(tmp_path / "hg1-calibration.yaml")


def validation(data_dir: Path, tmp_path: Path, **changes) -> dict:
    base = {"name": "tiny-validation", "kind": "batched_validation", "data_dir": str(data_dir), "scatter_points": 50,
            "calibrations": [
                {"label": "hg1-optimum", "source": "file", "calibration": str(fake_hg1(tmp_path))},
                {"label": "v3-fixed", "physics": {"variant": "v3"}, "overhead_model": "per_layer",
                 "per_layer_us": 100},
                {"label": "best-overhead-model", "source": "file",
                 "calibration": str(tmp_path / "missing.yaml")}]}
    base.update(changes)
    return base


# ---------------------------------------------------------------------------------------------- validation


def test_validation_end_to_end_and_deterministic(tmp_path, data_dir):
    study = write(tmp_path, validation(data_dir, tmp_path))
    r = run_study(study, tmp_path / "a", progress=False)
    assert r["primary"] == "hg1-optimum"
    by_run = {e["run"]: e for e in r["runs"]}
    assert len(by_run) == 5
    e = by_run["r1-llama-2-7b-codegen"]
    for key in ("run", "model", "tp", "n_requests", "excluded", "measured", "predicted", "ape", "calibration",
                "heldout"):
        assert key in e
    assert set(e["ape"]) == {"ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms", "e2e_p90_ms"}
    cal = r["calibrations"]["hg1-optimum"]["calibration"]
    assert e["heldout"] is True and "hg1-calibration.yaml" in cal["source"]
    assert cal["overhead_params"] == {"per_layer_us": 60.0} and cal["physics"] == {"variant": "v2.3", "bw_efficiency": 0.82}
    assert e["calibration"].startswith("hg1-optimum: ") and "fitted on 9 rows" in e["calibration"]
    assert e["measured"]["tpot_mean_ms"] == pytest.approx(8.0)  # the output rule restored the short outputs
    # Mixtral: unsupported under v2.3, replayed under v3
    assert by_run["r4-mixtral-codegen"]["supported"] is False and "mixture-of-experts" in by_run[
        "r4-mixtral-codegen"]["note"]
    v3 = {x["run"]: x for x in r["calibrations"]["v3-fixed"]["runs"]}
    assert v3["r4-mixtral-codegen"]["supported"] is True
    # reasoning: apart, with its failed requests counted
    assert by_run["r5-llama-2-7b-reasoning"]["group"] == "overloaded" and by_run["r5-llama-2-7b-reasoning"][
        "excluded"] == 4
    assert r["overall"]["runs"] == ["r1-llama-2-7b-codegen", "r2-llama-2-7b-roleplay", "r3-codellama-codegen"]
    assert r["calibrations"]["best-overhead-model"]["calibration"]["available"] is False
    assert "profile" in r["output_rule"]["r1-llama-2-7b-codegen"]
    assert (tmp_path / "a" / "REPORT.md").is_file() and (tmp_path / "a" / "e2e_scatter_hg1-optimum.png").is_file()
    report = (tmp_path / "a" / "REPORT.md").read_text()
    assert "Output-length rule" in report and "Overloaded runs" in report
    r2 = run_study(study, tmp_path / "b", progress=False, report=False)
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    assert r2["overall"] == r["overall"]


def test_a_calibration_file_is_applied_with_physics_overrides(tmp_path, data_dir):
    from calib import Calibration
    from calib.settings import Settings

    s = Settings.from_params({"overhead_model": "per_layer_tp_power", "per_layer_us": 40.0, "alpha": 0.5,
                              "bw_efficiency": 0.9, "mfu_rule": "interp", "mode": "corrected"})
    path = Calibration(settings=s, data={"rows": ["x"]}).save(tmp_path / "om.yaml")
    study = write(tmp_path, validation(data_dir, tmp_path, runs=["r1-llama-2-7b-codegen"], calibrations=[
        {"label": "best", "source": "file", "calibration": str(path)},
        {"label": "best-v24", "source": "file", "calibration": str(path), "physics": {"variant": "v2.4"}}]))
    r = run_study(study, tmp_path / "o", progress=False, report=False)
    cal = r["calibrations"]["best"]["calibration"]
    assert cal["available"] and cal["overhead_model"] == "per_layer_tp_power"
    assert cal["overhead_params"] == {"per_layer_us": 40.0, "alpha": 0.5}
    assert cal["physics"] == {"variant": "v2.3", "bw_efficiency": 0.9, "mfu_rule": "interp"}
    assert "om.yaml" in cal["source"]
    assert r["calibrations"]["best-v24"]["calibration"]["physics"]["variant"] == "v2.4"


def test_a_study_source_runs_the_study_when_its_file_is_absent(tmp_path, data_dir, cut_dataset):
    from calib.studies.loaded_calibrations import CalibrationSpec, resolve_calibration

    ds = cut_dataset(tmp_path / "ds", ["jan30-llama2-7b-tp4-chatsweep", "20260210-qwen3-14b-tp2-chatsweep"])
    hg1 = tmp_path / "tiny-hg1.yaml"
    hg1.write_text(yaml.safe_dump({"name": "tiny", "kind": "hg1", "dataset": str(ds),
                                   "split": {"train": ["jan30-llama2-7b-tp4-chatsweep"]},
                                   "phases": [{"name": "coarse", "grid": {"low": 0, "high": 100, "step": 50}}]}))
    cal = resolve_calibration(CalibrationSpec(label="x", source="study", study=str(hg1),
                                              calibration=str(tmp_path / "absent.yaml")))
    assert cal.available and cal.settings.overhead.per_layer_us in (0.0, 50.0, 100.0)
    assert "run now" in cal.provenance


def test_missing_data_dir_is_a_clear_error(tmp_path):
    study = write(tmp_path, validation(tmp_path / "nowhere", tmp_path))
    with pytest.raises(StudyError, match="data_dir.*not found"):
        run_study(study, tmp_path / "out", progress=False)


def test_ground_truth_not_matching_the_trace(tmp_path):
    root = tmp_path / "bad"
    make_run(root, "r1-llama-2-7b-codegen", "llama-2-7b-hf", gt_mismatch=True)
    study = write(tmp_path, validation(root, tmp_path))
    with pytest.raises(DataError, match="index"):
        run_study(study, tmp_path / "out", progress=False)


@pytest.mark.parametrize("change,match", [
    ({"calibrations": [{"label": "x", "physics": {"varaint": "v3"}}]}, "unknown physics parameter"),
    ({"calibrations": [{"label": "x", "overhead_model": "magic"}]}, "unknown overhead model"),
    ({"calibrations": [{"label": "x", "source": "sync_grid"}]}, "needs 'grid'"),
    ({"runs": ["nope"]}, "unknown run"),
    ({"output_rule": "guess"}, "output_rule"),
])
def test_bad_validation_files(tmp_path, data_dir, change, match):
    study = write(tmp_path, validation(data_dir, tmp_path, **change))
    with pytest.raises(StudyError, match=match):
        run_study(study, tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------------- calibration

DENSE_MODELS = {"llama-2-7b-hf", "codellama-34b-instruct-hf"}


def calibration(data_dir: Path, **changes) -> dict:
    base = {"name": "tiny-calibration", "kind": "batched_calibration", "data_dir": str(data_dir),
            "physics": {"variant": "v2.3", "mfu_rule": "interp"},
            "overhead_models": [{"name": "per_layer", "space": {"per_layer_us": {"low": 0, "high": 100}}},
                                {"name": "batch_linear",
                                 "space": {"a_us": {"low": 0, "high": 100}, "b_us": {"low": 0, "high": 5}}}],
            "search": {"n_trials": 3, "seeds": 2, "window_s": 3},
            "extra_search": {"request_latency_ms": {"low": 0, "high": 20}}}
    base.update(changes)
    return base


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory, data_dir):
    """The tiny calibration study run once, with every Calibrator/SelectBest fit recorded: (held-out model of the
    outer fold being worked on, or None outside the outer loop; the models and row names the fit saw)."""
    from calib.calibrate import Calibrator, SelectBest
    from calib.studies import loaded_nested as kind  # where the kinds run their nested evaluation
    from calib.studies.loaded_data import SearchWindowSplit

    seen: dict[str, list] = {"calibrator": [], "select": []}
    state: dict[str, set | None] = {"heldout": None}

    class Recording(SearchWindowSplit):
        def split(self, X, y=None, groups=None):
            for tr, te in super().split(X, y, groups):
                state["heldout"] = set(X["model"].iloc[te])
                yield tr, te
            state["heldout"] = None

    real_cal, real_sel = Calibrator.fit, SelectBest.fit

    def cal_fit(self, X, y=None):
        seen["calibrator"].append((state["heldout"], set(X["model"]), list(map(str, X.index))))
        return real_cal(self, X, y)

    def sel_fit(self, X, y=None):
        seen["select"].append((state["heldout"], set(X["model"]), list(map(str, X.index))))
        return real_sel(self, X, y)

    tmp = tmp_path_factory.mktemp("cal")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Calibrator, "fit", cal_fit)
        mp.setattr(SelectBest, "fit", sel_fit)
        mp.setattr(kind, "SearchWindowSplit", Recording)
        r = run_study(write(tmp, calibration(data_dir)), tmp / "out", progress=False)
    return r, seen, tmp


def test_no_fit_sees_the_heldout_model_nor_a_full_trace(spied_run):
    r, seen, _ = spied_run
    inside = [s for s in seen["calibrator"] + seen["select"] if s[0] is not None]
    after = [s for s in seen["calibrator"] + seen["select"] if s[0] is None]
    assert inside and after
    for heldout, models, rows in inside:
        assert not heldout & models, f"a fit saw the held-out model {heldout}"
    for _, _, rows in seen["calibrator"] + seen["select"]:
        assert all(row.endswith("@3s") for row in rows), "a search fitted a full trace"
    # after the outer loop: SelectBest on all dense runs and every candidate fitted on them (all seeds)
    assert any(models == DENSE_MODELS for _, models, _ in after)
    for rec in r["nested"]["records"]:
        assert all("@" not in row["row"] for row in rec["rows"])  # scored on full traces


def test_nested_records_per_seed_and_the_inner_argmax(spied_run):
    r, _, _ = spied_run
    nested, seeds, cands = r["nested"], [0, 1], ["per_layer", "batch_linear"]
    assert [f["test_groups"] for f in nested["folds"]] == [["codellama-34b-instruct-hf"], ["llama-2-7b-hf"]]
    assert {(x["fold"], x["seed"], x["candidate"]) for x in nested["records"]} == {
        (f, s, c) for f in (0, 1) for s in seeds for c in cands}
    assert len(nested["choices"]) == 2 * len(seeds)
    for ch in nested["choices"]:
        assert ch["selected"] == max(ch["inner_mean"], key=ch["inner_mean"].get)
        rec = next(x for x in nested["records"] if (x["fold"], x["seed"], x["candidate"]) ==
                   (ch["fold"], ch["seed"], ch["selected"]))
        assert ch["params"] == rec["params"]
    sel = r["summary"]["selected"]
    assert all(len(sel["heldout"][m]["per_seed"]) == len(seeds) for m in ("tpot", "e2e", "ttft"))
    assert [len(f["chosen"]) for f in sel["per_fold"]] == [len(seeds)] * 2
    # each held-out stage is scored once per seed, full traces; the aggregation is named
    assert sorted(sel["per_row"]) == sorted(r["nested"]["folds"][0]["test"] + r["nested"]["folds"][1]["test"])
    assert r["aggregation"].startswith("mean over runs of the mean over the run's stages")
    assert r["nested"]["aggregation"] == r["summary"]["aggregation"] == r["aggregation"]
    assert len(r["agreement"]) == 2 * len(cands)
    for c in r["candidates"]:
        assert [s["seed"] for s in c["fit"]["seeds"]] == seeds and all(len(s["curve"]) == 3 for s in c["fit"]["seeds"])
        assert c["fit"]["converged"] in (True, False)
        assert c["fit"]["params"]["replay.request_latency_ms"] <= 20


def test_other_runs_and_the_calibration_file(spied_run):
    from calib import Calibration
    from calib.estimators.loaded import load_stages

    r, _, tmp = spied_run
    assert r["dataset"]["other_runs"] == {"moe": ["r4-mixtral-codegen"], "overloaded": ["r5-llama-2-7b-reasoning"]}
    other = {e["run"]: e for e in r["recommended"]["other_runs"]}
    assert other["r4-mixtral-codegen"]["supported"] is False and "mixture-of-experts" in other[
        "r4-mixtral-codegen"]["note"]
    assert other["r5-llama-2-7b-reasoning"]["group"] == "overloaded" and other["r5-llama-2-7b-reasoning"]["predicted"]
    assert set(r["recommended"]["other_figures"]) == {"overloaded"}
    cal = Calibration.load(tmp / "out" / "calibration.yaml")
    est = cal.estimator("LoadedRegressor")
    assert cal.estimator_class == "LoadedRegressor" and cal.heldout["aggregation"] == r["aggregation"]
    assert {k: v for k, v in cal.settings.qualified().items() if k in r["recommended"]["params"]} == \
        r["recommended"]["params"]
    assert all(row.endswith("@3s") for row in cal.data["rows"])
    X = load_stages(r["settings"]["data_dir"], ["r1-llama-2-7b-codegen"])
    assert np.isfinite(est.fit(X).predict(X)).all()
    report = (tmp / "out" / "REPORT.md").read_text()
    assert "The nested selection" in report and "Mixtral beside the dense runs" in report
    assert (tmp / "out" / "convergence.png").is_file() and (tmp / "out" / "heldout.png").is_file()


def test_calibration_is_deterministic_and_resumes(spied_run, data_dir):
    _, _, tmp = spied_run
    study = tmp / "study.yaml"
    run_study(study, tmp / "again", progress=False)
    assert (tmp / "again" / "results.json").read_bytes() == (tmp / "out" / "results.json").read_bytes()
    run_study(study, tmp / "again", progress=False)  # resume: nothing new to evaluate, same bytes
    assert (tmp / "again" / "results.json").read_bytes() == (tmp / "out" / "results.json").read_bytes()


def test_search_window_split():
    import pandas as pd

    from calib.studies.loaded_data import SearchWindowSplit

    X = pd.DataFrame({"model": ["a", "b", "c", "a", "b", "c"], "window_s": [5.0, 5.0, 5.0, np.nan, np.nan, np.nan]})
    splits = list(SearchWindowSplit().split(X, groups=X["model"]))
    assert [(tr.tolist(), te.tolist()) for tr, te in splits] == [([1, 2], [3]), ([0, 2], [4]), ([0, 1], [5])]
    assert SearchWindowSplit().get_n_splits(X, groups=X["model"]) == 3
    full = X.iloc[3:]
    assert [(tr.tolist(), te.tolist()) for tr, te in SearchWindowSplit().split(full, groups=full["model"])] == [
        ([1, 2], [0]), ([0, 2], [1]), ([0, 1], [2])]


@pytest.mark.parametrize("change,match", [
    ({"overhead_models": [{"name": "per_layer", "space": {"alpha": {"low": 0, "high": 1}}}]}, "not a parameter"),
    ({"overhead_models": [{"name": "per_layer", "space": {"per_layer_us": {"low": 5, "high": 1}}}]}, "empty range"),
    ({"overhead_models": [{"name": "magic"}]}, "unknown overhead model"),
    ({"overhead_models": [{"name": "per_layer"}, {"name": "per_layer"}]}, "listed twice"),
    ({"search": {"n_trials": 0}}, "n_trials"),
    ({"search": {"seeds": [1, 1]}}, "seeds repeat"),
    ({"objective": {"weights": {"tpot": -1}}}, "weights"),
    ({"extra_search": {"variant": {"choices": ["v2.3", "v3"]}}}, "cannot be searched"),
    ({"extra_search": {"mode": {"choices": ["reference", "corrected"]}}}, "cannot be searched"),
])
def test_bad_calibration_files(tmp_path, data_dir, change, match):
    path = write(tmp_path, calibration(data_dir, **change))
    with pytest.raises(StudyError, match=match):
        load_study_file(path)


def test_one_model_cannot_be_left_out(tmp_path, data_dir):
    study = write(tmp_path, calibration(data_dir, runs=["r1-llama-2-7b-codegen", "r2-llama-2-7b-roleplay"]))
    with pytest.raises(StudyError, match="at least two models"):
        run_study(study, tmp_path / "x", progress=False)


# ---------------------------------------------------------------------------------------------- physics


def test_physics_study_end_to_end(tmp_path, data_dir):
    data = {"name": "tiny-physics", "kind": "physics", "data_dir": str(data_dir),
            "runs": ["r1-llama-2-7b-codegen", "r3-codellama-codegen", "r4-mixtral-codegen"],
            "candidates": [
                {"label": "v2.3-overhead-only", "physics": {"variant": "v2.3"}, "overhead_model": "per_layer",
                 "space": {"per_layer_us": {"low": 0, "high": 150}}},
                {"label": "v3", "physics": {"variant": "v3"}, "overhead_model": "per_layer_tp_power",
                 "space": {"mfu_decode": {"low": 0.2, "high": 0.8}, "per_layer_us": {"low": 0, "high": 150},
                           "alpha": {"low": 0, "high": 1.5}, "request_latency_ms": {"low": 0, "high": 20}}}],
            "search": {"n_trials": 2, "seeds": 2, "window_s": 3}}
    r = run_study(write(tmp_path, data), tmp_path / "ph", progress=False)
    assert [c["name"] for c in r["candidates"]] == ["v2.3-overhead-only", "v3"]
    assert [c["variant"] for c in r["candidates"]] == ["v2.3", "v3"]
    assert r["recommended"]["candidate"] in ("v2.3-overhead-only", "v3")
    # no fold holds Mixtral; v3's fits on all dense runs predict it, v2.3 reports it unsupported
    assert r["dataset"]["models"] == ["codellama-34b-instruct-hf", "llama-2-7b-hf"]
    v23, v3 = r["candidates"]
    assert "moe" in v3["fit"]["other_runs"] and "moe" not in v23["fit"]["other_runs"]
    assert all(e["supported"] for s in v3["fit"]["seeds"] for e in s["other_runs"])
    assert not any(e["supported"] for s in v23["fit"]["seeds"] for e in s["other_runs"])
    assert v3["fit"]["other_runs"]["moe"]["tpot"]["n"] == 2
    report = (tmp_path / "ph" / "REPORT.md").read_text()
    assert "## Candidates" in report and "which roofline physics" in report
    from calib import Calibration

    assert Calibration.load(tmp_path / "ph" / "calibration.yaml").estimator("LoadedRegressor").get_params()[
        "variant"] == r["candidates"][[c["name"] for c in r["candidates"]].index(r["recommended"]["candidate"])][
        "variant"]


@pytest.mark.parametrize("space,match", [
    ({"warp_factor": {"low": 0, "high": 1}}, "unknown settings parameter"),
    ({"variant": {"choices": ["v2.3", "v3"]}}, "cannot be searched"),
    ({"mfu_rule": {"choices": ["nearest", 3]}}, "mfu_rule"),
    ({"alpha": {"low": 0, "high": 1}}, "not a parameter of overhead model"),
])
def test_bad_physics_files(tmp_path, data_dir, space, match):
    data = {"name": "p", "kind": "physics", "data_dir": str(data_dir),
            "candidates": [{"label": "c", "physics": {"variant": "v2.3"}, "overhead_model": "per_layer",
                            "space": space}]}
    with pytest.raises(StudyError, match=match):
        load_study_file(write(tmp_path, data))


def test_predict_rows_of_no_rows_is_empty():
    """A loaded study without Mixtral or overloaded runs reports nothing apart instead of failing."""
    from calib.estimators.loaded import LoadedRegressor, load_stages
    from calib.studies.loaded_data import predict_rows

    X = load_stages()
    assert predict_rows(LoadedRegressor(per_layer_us=70.0), X.iloc[:0]) == []
