"""Loaded-server replay library (calib.replay.loaded) and its aggregation metrics, on tiny synthetic run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from calib.errors import ConfigError, DataError
from calib.metrics import AGGREGATIONS, group_weights, mean_apes, weighted_mape
from calib.physics.options import PhysicsOptions
from calib.replay.loaded import (STAGE_COLUMNS, load_runs, load_stages, replay_run, resolve_data_dir, run_report,
                                 stage_means, step_model, supports)
from calib.settings import Settings

MODELS = {"llama-2-7b-hf": ("meta-llama/Llama-2-7b-hf", 1), "mixtral-8x7b-v0.1": ("mistralai/Mixtral-8x7B-v0.1", 2)}


def make_run(root: Path, name: str, model: str = "llama-2-7b-hf", profile: str = "codegen", *, n: int = 30,
             rate: float = 5.0, out: int = 10, stages: int = 2, errors: int = 0) -> Path:
    """A run folder of ``n`` requests at ``rate`` req/s over ``stages`` equal stages (TTFT 25 ms, TPOT 9 ms)."""
    hf, tp = MODELS[model]
    d = root / name
    d.mkdir(parents=True)
    reqs = [{"index": i, "arrival_time_us": int(i * 1e6 / rate), "input_tokens": 100 + i, "output_tokens": out,
             "prefix_group": "", "has_error": i < errors} for i in range(n)]
    gts = [{"index": i, "has_error": i < errors, "ttft_s": 0.025, "e2e_s": 0.025 + (out - 1) * 0.009}
           for i in range(n)]
    doc = {"experiment": name, "model_id": hf, "profile": profile,
           "config": {"tensor_parallelism": tp, "max_num_seqs": 16, "max_num_batched_tokens": 512,
                      "kv_blocks_total_gpu": 4000, "block_size": 16}, "requests": reqs}
    (d / "requests.json").write_text(json.dumps(doc))
    (d / "ground_truth.json").write_text(json.dumps(gts))
    dur = n / rate / 2
    prof = {"data": {"shared_prefix": {"output_len": out, "system_prompt_len": 0, "num_unique_system_prompts": 0}},
            "load": {"stages": [{"duration": dur, "rate": rate}] * stages}}
    (d / "profile.yaml").write_text(yaml.safe_dump(prof))
    return d


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("batched")
    make_run(r, "a-llama-codegen")
    make_run(r, "b-llama-reasoning", profile="reasoning", errors=5)
    make_run(r, "c-mixtral-codegen", "mixtral-8x7b-v0.1")
    make_run(r, "d-llama-three-stages", stages=3)  # the third stage has no request
    return r


# ---------------------------------------------------------------------------------------------- data folder


def test_data_dir_explicit_relative_and_from_the_environment(root, tmp_path, monkeypatch):
    monkeypatch.delenv("CALIB_DATA", raising=False)
    assert resolve_data_dir(root) == root
    monkeypatch.chdir(root.parent)
    assert resolve_data_dir(root.name) == root  # relative: from the current folder
    make_run(tmp_path / "batched", "x-run")
    monkeypatch.setenv("CALIB_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path / "batched"
    assert resolve_data_dir(root) == root  # an explicit folder wins


def test_data_dir_errors(tmp_path, monkeypatch):
    from calib.data.runs import shipped_dir

    monkeypatch.delenv("CALIB_DATA", raising=False)
    assert resolve_data_dir() == shipped_dir()  # no folder and no CALIB_DATA: the dataset shipped with calib
    with pytest.raises(DataError, match="data_dir: loaded-server data folder .* not found"):
        resolve_data_dir(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no run"):
        resolve_data_dir(tmp_path)


# ---------------------------------------------------------------------------------------------- runs


def test_load_runs_groups_and_selection(root):
    runs = load_runs(root)
    assert [r.name for r in runs] == ["a-llama-codegen", "b-llama-reasoning", "c-mixtral-codegen",
                                      "d-llama-three-stages"]
    assert [r.group for r in runs] == ["dense", "overloaded", "moe", "dense"]
    assert runs[1].trace.excluded == 5
    assert [r.name for r in load_runs(root, ["c-mixtral-codegen", "a-llama-codegen"])] == ["a-llama-codegen",
                                                                                          "c-mixtral-codegen"]
    with pytest.raises(DataError, match="runs: unknown run 'zzz'"):
        load_runs(root, ["zzz"])


def test_supports_and_step_model_cache():
    assert supports("llama-2-7b-hf", "v2.3") == (True, "")
    ok, why = supports("mixtral-8x7b-v0.1", "v2.4")
    assert not ok and "mixture-of-experts" in why and supports("mixtral-8x7b-v0.1", "v3")[0]
    opts = PhysicsOptions.for_variant("v2.3")
    assert step_model("llama-2-7b-hf", 1, opts) is step_model("llama-2-7b-hf", 1, PhysicsOptions.for_variant("v2.3"))


# ---------------------------------------------------------------------------------------------- replay


def test_replay_run_uses_the_settings(root):
    run = load_runs(root, ["a-llama-codegen"])[0]
    s = Settings.from_params({"variant": "v2.4", "per_layer_us": 40})
    rep = replay_run(run, s)
    direct = run.run.run(step_model(run.model, 1, s.physics_options()), s.overhead_model())
    assert rep.ttft_ms.tolist() == direct.ttft_ms.tolist() and rep.e2e_ms.tolist() == direct.e2e_ms.tolist()
    late = replay_run(run, s.with_values({"request_latency_ms": 5.0}))
    assert late.ttft_ms.tolist() == pytest.approx((rep.ttft_ms + 5.0).tolist())
    assert late.tpot_ms.tolist() == pytest.approx(rep.tpot_ms.tolist())
    slower = replay_run(run, s.with_values({"per_layer_us": 400}))
    assert slower.tpot_ms.mean() > rep.tpot_ms.mean()


def test_replay_run_refuses_what_a_loaded_replay_cannot_do(root):
    moe = load_runs(root, ["c-mixtral-codegen"])[0]
    with pytest.raises(ConfigError, match="c-mixtral-codegen.*mixture-of-experts"):
        replay_run(moe, Settings())
    assert np.isfinite(replay_run(moe, Settings.from_params({"variant": "v3"})).e2e_ms).all()
    run = load_runs(root, ["a-llama-codegen"])[0]
    with pytest.raises(ConfigError, match="replay.phantom_last_step"):
        replay_run(run, Settings.from_params({"phantom_last_step": True}))
    with pytest.raises(ConfigError, match="replay.tpot_definition"):
        replay_run(run, Settings.from_params({"tpot_definition": "guidellm"}))


def test_windowed_replay_is_cached_and_cut(root):
    run = load_runs(root, ["a-llama-codegen"])[0]
    assert run.windowed(1.0) is run.windowed(1.0) and run.windowed(None) is run.run
    rep = replay_run(run, Settings(), window_s=1.0)
    assert rep.n == 10 and not rep.steps  # 5 req/s x 1 s in each of two stages; no step records


def test_stage_means_agree_with_the_run_report(root):
    run = load_runs(root, ["a-llama-codegen"])[0]
    rep = replay_run(run, Settings())
    means = stage_means(rep)
    report = run_report(rep)
    assert means.index.tolist() == [0, 1]
    for k, st in enumerate(report["stages"]):
        assert means.loc[k, "tpot"] == pytest.approx(st["predicted"]["tpot"]["mean"])
        assert means.loc[k, "ttft"] == pytest.approx(st["headline"]["predicted"]["ttft_mean_ms"])
        assert means.loc[k, "n_compared"] == st["n_compared"] == 15
    assert set(report["headline"]["ape"]) == {"ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms", "e2e_p90_ms"}


# ---------------------------------------------------------------------------------------------- stages table


def test_load_stages(root):
    X = load_stages(root, ["a-llama-codegen", "d-llama-three-stages"])
    assert list(X.columns) == list(STAGE_COLUMNS)
    assert X.index.tolist() == ["a-llama-codegen:0", "a-llama-codegen:1", "d-llama-three-stages:0",
                                "d-llama-three-stages:1"]
    assert X.attrs["skipped"] == [{"row": "d-llama-three-stages:2", "reason": "no request"}]
    row = X.loc["a-llama-codegen:0"]
    assert (row["n_requests"], row["rate"], row["ttft_mean_ms"]) == (15, 5.0, 25.0)
    assert row["tpot_mean_ms"] == pytest.approx(9.0)  # (E2E - TTFT) / (O - 1)
    assert np.isnan(row["window_s"]) and row["source"] == str(root / "a-llama-codegen")
    W = load_stages(root, ["a-llama-codegen"], window_s=1.0)
    assert W["n_requests"].tolist() == [5, 5] and W["window_s"].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------- aggregation


def test_aggregations_are_named():
    assert group_weights(["r1", "r1", "r1", "r2"]).tolist() == pytest.approx([1 / 3] * 3 + [1.0])
    # three stages of one run off by 10 %, one stage of another off by 40 %: 25 % over runs, 17.5 % over stages
    pred, meas = [11.0, 11.0, 11.0, 14.0], [10.0] * 4
    assert weighted_mape(pred, meas, group_weights(["r1"] * 3 + ["r2"])) == pytest.approx(0.25)
    assert weighted_mape(pred, meas) == pytest.approx(0.175)
    agg = mean_apes([{"tpot_mean_ms": 0.1}, {"tpot_mean_ms": 0.4}, {"tpot_mean_ms": float("nan")}],
                    ["tpot_mean_ms"], over="run")
    assert agg["aggregation"] == AGGREGATIONS["run"] and agg["n"] == 3 and agg["n_used"]["tpot_mean_ms"] == 2
    assert agg["mape"]["tpot_mean_ms"] == pytest.approx(0.25) and agg["median_ape"]["tpot_mean_ms"] == 0.25
    with pytest.raises(ValueError, match="aggregation unit"):
        mean_apes([], over="request")
