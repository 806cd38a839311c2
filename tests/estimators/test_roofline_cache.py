"""RooflineRegressor's caches: the two replay modes share one replay per overhead value, and a prediction
never depends on what was replayed before it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import calib.estimators.roofline as roofline
from calib.data import load_experiments
from calib.errors import DataError
from calib.estimators.roofline import RooflineRegressor, clear_cache

ESTIMATOR = dict(variant="v2.3", mfu_rule="nearest", bw_efficiency=0.82, lengths="reference", seed=42)


@pytest.fixture(scope="module")
def X():
    return load_experiments().iloc[:6]


def predict(X, mode, **overhead):
    return RooflineRegressor(**ESTIMATOR, mode=mode, **overhead).fit(X).predict_all(X)


@pytest.mark.parametrize("overhead", [dict(overhead_model="per_layer", per_layer_us=77.0),
                                      dict(overhead_model="per_layer_tp_power", per_layer_us=50.0, alpha=0.6)])
def test_modes_share_replays_and_predict_as_if_alone(X, overhead):
    clear_cache()
    alone = {mode: predict(X, mode, **overhead) for mode in ("reference", "corrected")}
    clear_cache()
    first = predict(X, "corrected", **overhead)
    replays = len(roofline._TIMES)
    second = predict(X, "reference", **overhead)
    assert len(roofline._TIMES) == replays == len(X)  # the reference mode replayed nothing
    pd.testing.assert_frame_equal(first, alone["corrected"], check_exact=True)
    pd.testing.assert_frame_equal(second, alone["reference"], check_exact=True)
    assert (second["e2e"] > first["e2e"]).all()  # the phantom step is there


def test_clear_cache_forgets_the_times(X):
    predict(X, "corrected", overhead_model="per_layer", per_layer_us=12.0)
    clear_cache()
    assert not roofline._TIMES and not roofline._PREDICTIONS and not roofline._REPLAYS


def test_numpy_and_quantile_lengths_read_the_experiments_own_workload():
    """``lengths`` numpy / quantiles draw from the row's workload columns (the embedded definition when a row lacks
    them), so an experiment of a workload calib does not ship replays too."""
    from calib.data import load_workloads
    from calib.estimators.roofline import _requests, _row_workload

    X = load_experiments()
    for _, row in X.iterrows():
        assert _row_workload(row) == load_workloads()[row["workload"]]
    row = X.loc["20260210-codellama-34b-tp2-codesweep"]
    own = row.copy()
    own["workload"] = "my-code-workload"
    for lengths in ("numpy", "quantiles"):
        a, b = _requests(row, lengths, 42), _requests(own, lengths, 42)
        assert np.array_equal(a.input_tokens, b.input_tokens) and np.array_equal(a.output_tokens, b.output_tokens)
    wider = own.copy()
    wider["output_mean"] = 60.0
    assert _requests(wider, "quantiles", 42).output_tokens.mean() > _requests(own, "quantiles", 42).output_tokens.mean()
    bad = own.copy()
    bad["output_max"] = 2  # below output_min 6: validated like a workloads file
    with pytest.raises(DataError, match="output_max"):
        _requests(bad, "quantiles", 42)
    bare = own.drop(["output_mean"])
    with pytest.raises(DataError, match="my-code-workload"):
        _requests(bare, "quantiles", 42)
