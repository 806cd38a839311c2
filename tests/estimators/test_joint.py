"""JointRegressor: one set of settings over stacked synchronous experiments and load stages.

The parts are predicted exactly as the other two estimators predict them (same settings, corrected mode on the
synchronous side), and the row weights make the objective the mean of the two datasets' losses.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from calib import JointRegressor, LoadedRegressor, RooflineRegressor
from calib.calibrate import Objective
from calib.data import load_experiments
from calib.errors import DataError
from calib.estimators.joint import stack
from calib.replay.loaded import load_stages

RUNS = ["20260217-155451-llama-2-7b-tp1-codegen", "20260218-155500-codellama-34b-tp2-roleplay"]
PARAMS = {"variant": "v2.4", "overhead_model": "per_layer_tp_power", "per_layer_us": 60.0, "alpha": 0.5,
          "request_latency_ms": 3.0}


@pytest.fixture(scope="module")
def parts():
    sync = load_experiments()
    sync = sync[sync["model"].isin(["llama-2-7b-hf", "codellama-34b-instruct-hf", "qwen3-14b"])]
    loaded = load_stages(None, RUNS, window_s=10)
    return sync, loaded


def test_stack_keeps_each_tables_columns_and_dtypes(parts):
    sync, loaded = parts
    X = stack(sync, loaded)
    assert X["dataset"].tolist() == ["sync"] * len(sync) + ["loaded"] * len(loaded)
    assert X.loc[sync.index[0], "seed"] == 42 and isinstance(X.loc[loaded.index[0], "stage"], (int, np.integer))
    with pytest.raises(DataError, match="both an experiment and a load stage"):
        stack(sync, sync.head(1))


def test_predictions_equal_the_two_estimators_with_the_same_settings(parts):
    sync, loaded = parts
    X = stack(sync, loaded)
    joint = JointRegressor(**PARAMS).fit(X)
    pred = joint.predict_all(X)
    assert pred.index.equals(X.index)
    roof = RooflineRegressor(**PARAMS, mode="corrected").fit(sync).predict_all(sync)
    load = LoadedRegressor(**PARAMS).fit(loaded).predict_all(loaded)
    cols = ["ttft", "tpot", "e2e"]
    np.testing.assert_array_equal(pred.loc[sync.index, cols].to_numpy(), roof[cols].to_numpy())
    np.testing.assert_array_equal(pred.loc[loaded.index, cols].to_numpy(), load[cols].to_numpy())
    assert not pred.loc[sync.index, "runaway"].any()
    meas = joint.measured(X)
    np.testing.assert_array_equal(meas.loc[sync.index].to_numpy(), RooflineRegressor.measured(sync).to_numpy())
    np.testing.assert_array_equal(meas.loc[loaded.index].to_numpy(), LoadedRegressor.measured(loaded).to_numpy())
    # rows in any order come back aligned
    shuffled = X.iloc[::-1]
    assert joint.predict_all(shuffled)[cols].equals(pred.loc[shuffled.index, cols])


def test_corrected_mode_is_the_default_and_a_given_mode_is_kept(parts):
    sync, _ = parts
    X = stack(sync)
    assert JointRegressor().settings().replay.mode == "corrected"
    assert JointRegressor().settings().replay.tpot == "guidellm"
    ref = JointRegressor(per_layer_us=60.0, mode="reference").predict_all(X)["tpot"].to_numpy()
    assert np.allclose(ref, RooflineRegressor(per_layer_us=60.0, mode="reference").predict_all(sync)["tpot"])
    est = clone(JointRegressor(**PARAMS, max_steps=10**6))
    assert est.get_params()["per_layer_us"] == 60.0 and est.get_params()["max_steps"] == 10**6


def test_weights_make_the_loss_the_mean_of_the_two_datasets_losses(parts):
    sync, loaded = parts
    X = stack(sync, loaded)
    w = JointRegressor.row_weights(X)
    is_sync = (X["dataset"] == "sync").to_numpy()
    assert w[is_sync].sum() == pytest.approx(0.5) and w[~is_sync].sum() == pytest.approx(0.5)
    assert np.allclose(w[is_sync], 0.5 / len(sync))
    lw = LoadedRegressor.row_weights(loaded)
    assert np.allclose(w[~is_sync] / w[~is_sync].sum(), lw / lw.sum())  # a run's stages keep 1 / stages
    obj = Objective.parse({"weights": {"tpot": 1.0, "e2e": 1.0, "ttft": 0.5}, "cap": 2.0})
    est = JointRegressor(**PARAMS)
    joint, _ = obj.loss(est.predict_all(X), est.measured(X), w)
    s, _ = obj.loss(RooflineRegressor(**PARAMS, mode="corrected").predict_all(sync), RooflineRegressor.measured(sync))
    ld, _ = obj.loss(LoadedRegressor(**PARAMS).predict_all(loaded), LoadedRegressor.measured(loaded), lw)
    assert joint == pytest.approx((s + ld) / 2)
    assert np.allclose(JointRegressor.row_weights(stack(sync)), 1 / len(sync))  # one dataset: plain weights


def test_fit_validates_and_stores_state(parts):
    sync, loaded = parts
    X = stack(sync, loaded)
    est = JointRegressor(**PARAMS).fit(X)
    assert est.datasets_ == {"sync": len(sync), "loaded": len(loaded)}
    assert isinstance(est.estimators_["sync"], RooflineRegressor) and est.estimators_["loaded"].runs_ == sorted(RUNS)
    assert est.settings_.replay.mode == "corrected"
    assert np.isfinite(est.predict(X)).all()
    bad = X.assign(dataset=["sync"] * (len(X) - 1) + ["other"])
    with pytest.raises(DataError, match="unknown dataset"):
        JointRegressor().fit(bad)
    with pytest.raises(DataError, match="lacks column dataset"):
        JointRegressor().fit(pd.DataFrame(sync))
    mixtral = load_stages(None, ["20260218-141024-mixtral-8x7b-v0-1-tp2-roleplay"], window_s=5)
    with pytest.raises(Exception, match="mixture-of-experts"):
        JointRegressor(variant="v2.4").fit(stack(sync, mixtral))
