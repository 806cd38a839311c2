"""LoadedRegressor on real loaded-server runs (../shared/data/batched), cut to the first seconds of each stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.model_selection import LeaveOneGroupOut, cross_validate

import calib.estimators.loaded as loaded_module
from calib.errors import CalibError, ConfigError, DataError
from calib.estimators import LoadedRegressor, RooflineRegressor, load_stages
from calib.replay.loaded import load_run, replay_run
from calib.settings import Settings

#: One codegen run (two stages, 5 and 10 req/s) of each of three dense models, sorted by name.
RUNS = ["20260217-155451-llama-2-7b-tp1-codegen", "20260217-203421-llama-2-70b-hf-tp4-codegen",
        "20260218-150956-codellama-34b-tp2-codegen"]
MIXTRAL = "20260218-120914-mixtral-8x7b-v0-1-tp2-codegen"
WINDOW_S = 8.0


@pytest.fixture(scope="module")
def batched(shared_data):
    path = shared_data / "batched"
    missing = [r for r in RUNS + [MIXTRAL] if not (path / r).is_dir()]
    if missing:
        pytest.skip(f"runs not in the shared data: {missing}")
    return path


@pytest.fixture(scope="module")
def X(batched) -> pd.DataFrame:
    return load_stages(batched, RUNS, window_s=WINDOW_S)


@pytest.fixture
def counted(monkeypatch):
    """Count the replays the estimator makes (the cache is emptied first)."""
    loaded_module.clear_cache()
    calls = []

    def counting(run, settings, **kw):
        calls.append(run.name)
        return replay_run(run, settings, **kw)

    monkeypatch.setattr(loaded_module, "replay_run", counting)
    return calls


def test_load_stages_rows(X, batched):
    assert len(X) == 6 and X.index[0] == f"{RUNS[0]}:0"
    assert X["stage"].tolist() == [0, 1] * 3 and X["rate"].tolist() == [5.0, 10.0] * 3
    assert X["model"].tolist() == [m for m in ("llama-2-7b-hf", "llama-2-70b-hf", "codellama-34b-instruct-hf")
                                   for _ in (0, 1)]
    # the requests of the first 8 s of each stage (arrivals are bursty: not rate x 8)
    trace = load_run(batched / RUNS[0]).trace
    arrival_s = trace.requests["arrival_us"].to_numpy() / 1e6
    assert X["n_requests"].iloc[:2].tolist() == [int((arrival_s < WINDOW_S).sum()),
                                                 int(((arrival_s >= 600) & (arrival_s < 600 + WINDOW_S)).sum())]
    # TPOT per request = (E2E - TTFT) / (O - 1), O after the output rule (data/README.md)
    req = trace.requests.iloc[:int(X["n_requests"].iloc[0])]
    per_request = (req["e2e_ms"] - req["ttft_ms"]) / (req["output_tokens"] - 1)
    assert X["tpot_mean_ms"].iloc[0] == pytest.approx(per_request.mean())
    assert 5.0 < X["tpot_mean_ms"].iloc[0] < 15.0


def test_fit_predict_all_and_measured(X):
    est = LoadedRegressor(per_layer_us=80.0).fit(X, X["tpot_mean_ms"])
    assert est.settings_.overhead.per_layer_us == 80.0 and est.runs_ == RUNS and est.n_features_in_ == X.shape[1]
    pred = est.predict_all(X)
    assert pred.index.equals(X.index) and list(pred.columns[:3]) == ["ttft", "tpot", "e2e"]
    assert np.isfinite(pred[["ttft", "tpot", "e2e"]].to_numpy()).all()
    assert (pred["n_compared"] == X["n_requests"]).all()
    assert est.predict(X).tolist() == pred["tpot"].tolist()
    meas = LoadedRegressor.measured(X)
    assert list(meas.columns) == ["ttft", "tpot", "e2e"] and meas["e2e"].tolist() == X["e2e_mean_ms"].tolist()
    mape = np.mean(np.abs(pred["tpot"] - meas["tpot"]) / meas["tpot"])
    assert est.score(X, X["tpot_mean_ms"]) == pytest.approx(-mape)
    # the same layout as the synchronous estimator's predictions
    from calib.data import load_experiments

    E = load_experiments().iloc[:1]
    assert {"ttft", "tpot", "e2e"} <= set(RooflineRegressor().fit(E).predict_all(E).columns)


def test_predictions_are_the_replays_stage_means(X, batched):
    est = LoadedRegressor(variant="v2.4", per_layer_us=60.0).fit(X)
    pred = est.predict_all(X.iloc[[3, 2]])  # rows of one run, in any order
    rep = replay_run(load_run(batched / RUNS[1]), est.settings_, window_s=WINDOW_S)
    for k, key in ((1, X.index[3]), (0, X.index[2])):
        s = rep.summary(rep.stage_masks()[k])
        assert pred.loc[key, "tpot"] == pytest.approx(s["predicted"]["tpot"]["mean"])
        assert pred.loc[key, "ttft"] == pytest.approx(s["predicted"]["ttft"]["mean"])


def test_one_replay_per_run_and_settings(X, counted):
    est = LoadedRegressor(per_layer_us=70.0).fit(X)
    est.predict_all(X)
    assert sorted(counted) == sorted(RUNS)  # once per run, whatever its number of stage rows
    est.predict_all(X.iloc[::-1])
    assert len(counted) == 3  # cached
    base = est.predict_all(X)
    late = clone(est).set_params(request_latency_ms=12.0).fit(X).predict_all(X)
    assert len(counted) == 3  # the request latency does not change the schedule: no new replay
    assert (late["ttft"] - base["ttft"]).tolist() == pytest.approx([12.0] * 6)
    assert late["tpot"].tolist() == pytest.approx(base["tpot"].tolist())
    tok = clone(est).set_params(input_token_latency_us=2.0).fit(X).predict_all(X)
    assert len(counted) == 3  # nor does the per-input-token client latency
    shift = (tok["ttft"] - base["ttft"]).to_numpy()
    assert (shift > 0).all() and np.allclose(tok["e2e"] - base["e2e"], shift)
    # 2 µs per token: the shift is 2e-3 ms times the stage's mean input length (hundreds to thousands of tokens)
    assert ((shift / 2e-3 > 50) & (shift / 2e-3 < 20000)).all()
    clone(est).set_params(per_layer_us=90.0).fit(X).predict_all(X)
    assert len(counted) == 6


def test_cpu_overlap_is_a_setting_of_the_loaded_replay(X, counted):
    """``cpu_overlap`` hides the per-step overhead behind the GPU under async scheduling (a new replay, faster
    steps); with async scheduling off it changes nothing (the estimator option gates it)."""
    params = dict(variant="v4", overhead_model="per_sequence", step_us_const=800.0, per_seq_us=20.0)
    add = LoadedRegressor(**params).fit(X).predict_all(X)
    hid = LoadedRegressor(**params, cpu_overlap=True).fit(X).predict_all(X)
    assert len(counted) == 6  # the setting is part of the replay's key
    assert (hid["tpot"] < add["tpot"]).all() and hid["ttft"].mean() < add["ttft"].mean()
    sync = [LoadedRegressor(**params, cpu_overlap=o, async_scheduling=False).fit(X).predict_all(X) for o in (0, 1)]
    assert sync[0]["tpot"].tolist() == sync[1]["tpot"].tolist()
    assert Settings.from_params({"cpu_overlap": True}).replay.cpu_overlap is True


def test_row_weights_make_a_mean_over_runs(X):
    w = LoadedRegressor.row_weights(X.iloc[:5])  # the last run keeps one of its two stages
    assert w.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, 1.0])
    assert LoadedRegressor.row_weights(X).sum() == pytest.approx(3.0)


def test_sklearn_clone_and_leave_one_model_out(X):
    est = LoadedRegressor(per_layer_us=80.0, target="tpot")
    twin = clone(est)
    assert twin.get_params() == est.get_params() and twin.get_params()["prefix"] == "auto"
    cv = cross_validate(est, X, X["tpot_mean_ms"], groups=X["model"], cv=LeaveOneGroupOut())
    assert len(cv["test_score"]) == 3 and np.all(np.isfinite(cv["test_score"])) and np.all(cv["test_score"] < 0)


def test_from_settings_roundtrip(X):
    s = Settings.from_params({"variant": "v3", "per_layer_us": 50, "request_latency_ms": 3})
    est = LoadedRegressor.from_settings(s, target="e2e").fit(X)
    assert est.settings_ == s and est.target == "e2e"


def test_a_moe_model_needs_v3(batched, X):
    M = load_stages(batched, [MIXTRAL], window_s=4.0)
    with pytest.raises(ConfigError, match="mixture-of-experts.*leave out its run"):
        LoadedRegressor().fit(pd.concat([X, M]))
    pred = LoadedRegressor(variant="v3").fit(M).predict_all(M)
    assert np.isfinite(pred["tpot"]).all()


@pytest.mark.parametrize("params,error,match", [
    ({"target": "p99"}, CalibError, "target"),
    ({"prefix": "sometimes"}, ConfigError, "prefix"),
    ({"cached_prefill_pi": "half"}, ConfigError, "cached_prefill_pi"),
    ({"max_steps": 0}, ConfigError, "max_steps"),
    ({"per_layer_us": -1.0}, ConfigError, "overhead.per_layer_us"),
    ({"phantom_last_step": True}, ConfigError, "phantom"),
    ({"tpot_definition": "guidellm"}, ConfigError, "tpot_definition"),
])
def test_bad_parameters_are_one_line_errors(X, params, error, match):
    with pytest.raises(error, match=match):
        LoadedRegressor(**params).fit(X)


def test_bad_tables(X):
    with pytest.raises(TypeError, match="DataFrame"):
        LoadedRegressor().fit(X.to_numpy())
    with pytest.raises(DataError, match="source"):
        LoadedRegressor().fit(X.drop(columns=["source"]))
    with pytest.raises(DataError, match="duplicate"):
        LoadedRegressor().fit(pd.concat([X.iloc[:1], X.iloc[:1]]))
    moved = X.copy()
    moved["source"] = "/nowhere/run"
    with pytest.raises(DataError, match="run folder not found"):
        LoadedRegressor().fit(moved)
    wrong = X.iloc[:1].copy()
    wrong["stage"] = 7
    with pytest.raises(DataError, match="no stage 7"):
        LoadedRegressor().fit(wrong).predict_all(wrong)
    with pytest.raises(ValueError, match="positive"):
        LoadedRegressor().fit(X, -X["tpot_mean_ms"])
