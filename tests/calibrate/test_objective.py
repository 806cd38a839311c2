"""The calibration loss."""

import math

import numpy as np
import pandas as pd
import pytest

from calib.calibrate import Objective
from calib.errors import ConfigError

PRED = pd.DataFrame({"ttft": [10.0, 30.0], "tpot": [11.0, 18.0], "e2e": [100.0, 500.0]})
MEAS = pd.DataFrame({"ttft": [20.0, 30.0], "tpot": [10.0, 20.0], "e2e": [100.0, 100.0]})


def test_names_weights_and_the_aggregation():
    loss, attrs = Objective.parse("tpot_e2e_ttft").loss(PRED, MEAS)
    assert attrs == {"train_ttft_mape": 0.25, "train_tpot_mape": pytest.approx(0.1), "train_e2e_mape": 2.0}
    assert loss == pytest.approx((0.25 + 0.1 + 2.0) / 3)
    weighted, _ = Objective.parse({"weights": {"tpot": 1, "ttft": 0.5}}).loss(PRED, MEAS)
    assert weighted == pytest.approx((0.1 + 0.5 * 0.25) / 1.5)
    assert Objective.parse("tpot_mape") == Objective.parse("tpot")


def test_cap_and_row_weights():
    capped, attrs = Objective.parse({"weights": {"e2e": 1}, "cap": 1.0}).loss(PRED, MEAS)
    assert capped == attrs["train_e2e_mape"] == 0.5
    per_run, _ = Objective.parse("ttft").loss(PRED, MEAS, row_weights=np.array([3.0, 1.0]))
    assert per_run == pytest.approx(0.5 * 3 / 4)


def test_non_finite_predictions_make_an_infinite_loss():
    bad = PRED.assign(tpot=[math.nan, 1.0])
    assert Objective.parse("tpot").loss(bad, MEAS)[0] == math.inf


@pytest.mark.parametrize("spec", ["latency", {"tpot": -1}, {"tpot": 0}, {"weights": {"tpot": 1}, "cap": 0},
                                  {"weights": {"tpot": 1}, "extra": 1}, 3])
def test_bad_objectives_are_config_errors(spec):
    with pytest.raises(ConfigError):
        Objective.parse(spec)


def test_loss_of_frames_equals_loss_of_plain_columns():
    """A numeric DataFrame is converted once; frames with text columns, and mappings, column by column: the same
    numbers either way."""
    pred = pd.DataFrame({"ttft": [1.5, 2.0, 3.0], "tpot": [11.0, 18.0, 9.5], "e2e": [100.0, 200.0, 50.0],
                         "overlapped": [0, 3, 1]})
    meas = pd.DataFrame({"ttft": [1.0, 2.5, 3.0], "tpot": [10.0, 20.0, 9.0], "e2e": [100.0, 250.0, 40.0]})
    obj = Objective.parse({"weights": {"tpot": 2.0, "e2e": 1.0}, "cap": 0.2})
    plain = obj.loss({k: pred[k].tolist() for k in pred}, {k: meas[k].tolist() for k in meas}, [1.0, 2.0, 1.0])
    assert obj.loss(pred, meas, [1.0, 2.0, 1.0]) == plain
    assert obj.loss(pred.assign(name=["a", "b", "c"]), meas, [1.0, 2.0, 1.0]) == plain
    assert set(plain[1]) == {"train_ttft_mape", "train_tpot_mape", "train_e2e_mape"}
    with pytest.raises(KeyError):
        obj.loss(pred.drop(columns="e2e"), meas)
