"""Loaded-server studies (batched_validation, batched_calibration, physics) on tiny synthetic runs.

The synthetic runs have the ``data/batched/`` layout (requests.json, ground_truth.json, profile.yaml,
exp-config.yaml) with a few dozen short requests, so every study runs end to end in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from calib.data.workloads import EMBEDDED_HG1
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


@pytest.fixture(scope="module")
def sync_dataset(tmp_path_factory) -> Path:
    """The embedded HG1 dataset cut to three experiments of two families."""
    keep = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "20260210-qwen3-14b-tp2-chatsweep"]
    d = tmp_path_factory.mktemp("ds")
    lines = (EMBEDDED_HG1 / "experiments.csv").read_text().splitlines()
    d.joinpath("experiments.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:]
                                                                     if ln.split(",")[0] in keep]) + "\n")
    d.joinpath("workloads.yaml").write_text((EMBEDDED_HG1 / "workloads.yaml").read_text())
    return d


def write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def fake_hg1(tmp_path: Path, optimum: float = 60.0) -> Path:
    p = tmp_path / "hg1-results.json"
    p.write_text(json.dumps({"optimum_us": optimum, "mode": "reference",
                             "settings": {"estimator": {"variant": "v2.3", "mfu_rule": "nearest",
                                                        "bw_efficiency": 0.82},
                                          "split": {"train": ["a"] * 9}}}))
    return p


def validation(data_dir: Path, tmp_path: Path, **changes) -> dict:
    base = {"name": "tiny-validation", "kind": "batched_validation", "data_dir": str(data_dir), "scatter_points": 50,
            "calibrations": [
                {"label": "hg1-optimum", "source": "hg1", "results": str(fake_hg1(tmp_path))},
                {"label": "v3-fixed", "physics": {"variant": "v3"}, "overhead_model": "per_layer",
                 "per_layer_us": 100},
                {"label": "best-overhead-model", "source": "overhead_models",
                 "results": str(tmp_path / "missing.json")}]}
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
    assert e["heldout"] is True and "HG1 optimum 60" in r["calibrations"]["hg1-optimum"]["calibration"]["source"]
    assert e["calibration"].startswith("hg1-optimum: HG1 optimum 60") and "fitted on" in e["calibration"]
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


def test_best_overhead_model_is_read_when_present(tmp_path, data_dir):
    p = tmp_path / "om.json"
    p.write_text(json.dumps({  # the overhead_models kind's layout: rank-1 model, joint physics in its params
        "kind": "overhead_models", "mode": "corrected", "ranked_by": "heldout.leave_one_family_out.tpot_mape",
        "ranking": [{"rank": 2, "model": "batch_linear", "overhead": "batch_linear", "params": {"a_us": 1, "b_us": 1}},
                    {"rank": 1, "model": "per_layer_tp_power+bw_efficiency+mfu_rule", "overhead": "per_layer_tp_power",
                     "params": {"per_layer_us": 40.0, "alpha": 0.5, "bw_efficiency": 0.9, "mfu_rule": "interp"}}],
        "settings": {"estimator": {"variant": "v2.3", "mfu_rule": "nearest", "bw_efficiency": 0.82,
                                   "mode": "corrected"}}}))
    study = write(tmp_path, validation(data_dir, tmp_path, runs=["r1-llama-2-7b-codegen"], calibrations=[
        {"label": "best", "source": "overhead_models", "results": str(p)}]))
    r = run_study(study, tmp_path / "o", progress=False, report=False)
    cal = r["calibrations"]["best"]["calibration"]
    assert cal["available"] and cal["overhead_model"] == "per_layer_tp_power"
    assert cal["overhead_params"] == {"per_layer_us": 40.0, "alpha": 0.5}
    assert cal["physics"] == {"variant": "v2.3", "bw_efficiency": 0.9, "mfu_rule": "interp"}
    assert "rank-1 model" in cal["source"]


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


def calibration(data_dir: Path, tmp_path: Path, **changes) -> dict:
    base = {"name": "tiny-calibration", "kind": "batched_calibration", "data_dir": str(data_dir),
            "physics": {"variant": "v2.3", "mfu_rule": "interp"},
            "overhead_models": [{"name": "per_layer", "search": {"per_layer_us": [0, 100]}},
                                {"name": "batch_linear", "search": {"a_us": [0, 100], "b_us": [0, 5]}}],
            "search": {"n_trials": 3, "n_startup_trials": 2, "seed": 3, "window_s": 3},
            "extra_search": {"request_latency_ms": [0, 20]},
            "baseline": {"label": "hg1", "source": "hg1", "results": str(fake_hg1(tmp_path))}}
    base.update(changes)
    return base


def test_calibration_leave_one_model_out_and_resume(tmp_path, data_dir):
    study = write(tmp_path, calibration(data_dir, tmp_path))
    out = tmp_path / "cal"
    r = run_study(study, out, progress=False)
    folds = r["models"]["per_layer"]["folds"]
    assert [f["heldout_model"] for f in folds] == ["codellama-34b-instruct-hf", "llama-2-7b-hf"]
    assert folds[0]["train_runs"] == ["r1-llama-2-7b-codegen", "r2-llama-2-7b-roleplay"]
    assert all(len(f["trials"]) == 3 for f in folds)
    assert all(0 <= f["request_latency_ms"] <= 20 and "request_latency_ms" in f["best_params"] for f in folds)
    assert {e["run"] for e in r["runs"]} == {"r1-llama-2-7b-codegen", "r2-llama-2-7b-roleplay",
                                             "r3-codellama-codegen"}
    assert all(e["heldout"] and e["fold"] for e in r["runs"])
    assert r["best_model"] == r["ranking"][0]["overhead_model"]
    assert r["baseline"]["groups"]["dense"]["n_runs"] == 3
    fin = {e["run"]: e for e in r["final_fit"]["runs"]}
    assert fin["r4-mixtral-codegen"]["supported"] is False and fin["r5-llama-2-7b-reasoning"]["group"] == "overloaded"
    first = (out / "results.json").read_bytes()
    run_study(study, out, progress=False)  # resume: nothing new to evaluate, same bytes
    assert (out / "results.json").read_bytes() == first
    assert (out / "REPORT.md").is_file() and "Ranking" in (out / "REPORT.md").read_text()


@pytest.mark.parametrize("change,match", [
    ({"overhead_models": [{"name": "per_layer", "search": {"alpha": [0, 1]}}]}, "not a parameter"),
    ({"overhead_models": [{"name": "per_layer", "search": {"per_layer_us": [5, 1]}}]}, "low < high"),
    ({"search": {"n_trials": 0}}, "n_trials"),
    ({"objective": {"weights": {"tpot": -1}}}, "weights"),
    ({"extra_search": {"gemm_mfu_scale": [1, 2]}}, "cannot be added"),
])
def test_bad_calibration_files(tmp_path, data_dir, change, match):
    path = write(tmp_path, calibration(data_dir, tmp_path, **change))
    with pytest.raises(StudyError, match=match):
        load_study_file(path)


def test_one_model_cannot_be_left_out(tmp_path, data_dir):
    study = write(tmp_path, calibration(data_dir, tmp_path, runs=["r1-llama-2-7b-codegen", "r2-llama-2-7b-roleplay"]))
    with pytest.raises(Exception, match="at least two models"):
        run_study(study, tmp_path / "x", progress=False)


# ---------------------------------------------------------------------------------------------- physics


def test_physics_study_end_to_end(tmp_path, data_dir, sync_dataset):
    data = {"name": "tiny-physics", "kind": "physics", "data_dir": str(data_dir),
            "runs": ["r1-llama-2-7b-codegen", "r3-codellama-codegen", "r4-mixtral-codegen"],
            "candidates": [
                {"label": "v2.3-overhead-only", "physics": {"variant": "v2.3"}, "overhead_model": "per_layer",
                 "search": {"per_layer_us": [0, 150]}},
                {"label": "v3", "physics": {"variant": "v3"}, "overhead_model": "per_layer_tp_power",
                 "search": {"mfu_decode": [0.2, 0.8], "per_layer_us": [0, 150], "alpha": [0, 1.5],
                            "request_latency_ms": [0, 20]}}],
            "overhead_only": "v2.3-overhead-only",
            "loaded": {"n_trials": 2, "n_startup_trials": 2, "window_s": 3},
            "synchronous": {"n_trials": 2, "n_startup_trials": 2, "dataset": str(sync_dataset)},
            "batched_calibration_results": None}
    r = run_study(write(tmp_path, data), tmp_path / "ph", progress=False)
    labels = [x["label"] for x in r["ranking"]]
    assert sorted(labels) == ["v2.3-overhead-only", "v3"] and r["best"]["label"] == labels[0]
    for x in r["ranking"]:
        assert set(x["loaded_heldout_mape"]) >= {"ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms"}
        assert x["sync_worst_fold"]["heldout_family"] in ("llama2-7b", "qwen3-14b")
    mixtral = r["other_runs"]["v3"]
    assert [e["run"] for e in mixtral] == ["r4-mixtral-codegen"] and mixtral[0]["supported"]
    assert "mixtral-8x7b-v0.1" in r["decode_profiles"]
    assert r["decode_profiles"]["llama-2-7b-hf"]["candidates"]["v3"]["step_curve"][0]["batch"] == 1
    assert (tmp_path / "ph" / "decode_steps.png").is_file()
    assert "Best calibrated physics" in (tmp_path / "ph" / "REPORT.md").read_text()


@pytest.mark.parametrize("search,match", [
    ({"warp_factor": [0, 1]}, "neither a physics option"),
    ({"min_step_us": [0, 1]}, "cannot be searched"),
    ({"mfu_rule": ["nearest", 3]}, "list of choices"),
])
def test_bad_physics_files(tmp_path, data_dir, search, match):
    data = {"name": "p", "kind": "physics", "data_dir": str(data_dir),
            "candidates": [{"label": "c", "physics": {"variant": "v2.3"}, "search": search}]}
    with pytest.raises(StudyError, match=match):
        load_study_file(write(tmp_path, data))
