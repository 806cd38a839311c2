"""RooflineRegressor: scikit-learn conformance, caching, and model-selection tools."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut, cross_validate
from sklearn.utils.estimator_checks import parametrize_with_checks

from calib.data import load_experiments
from calib.errors import CalibError, ConfigError
from calib.estimators.roofline import RooflineRegressor

# X is an experiments table (model, TP, workload, rate, ...), not a numeric matrix: the checks that
# feed random numeric arrays cannot apply.  Their DataFrame equivalents are tested below.
_NUMERIC_INPUT = "X must be an experiments DataFrame, not a numeric array; DataFrame equivalent tested below"
_NOT_APPLICABLE = {
    name: _NUMERIC_INPUT
    for name in (
        "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
        "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
        "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_complex_data", "check_dtype_object",
        "check_estimators_empty_data_messages", "check_pipeline_consistency", "check_estimators_nan_inf",
        "check_estimator_sparse_tag", "check_estimator_sparse_array", "check_estimator_sparse_matrix",
        "check_estimators_pickle", "check_f_contiguous_array_estimator", "check_regressors_train",
        "check_regressor_data_not_an_array", "check_regressors_no_decision_function", "check_supervised_y_2d",
        "check_supervised_y_no_nan", "check_regressors_int", "check_methods_sample_order_invariance",
        "check_methods_subset_invariance", "check_fit2d_1sample", "check_fit2d_1feature", "check_dict_unchanged",
        "check_fit_idempotent", "check_fit_check_is_fitted", "check_n_features_in", "check_fit1d",
        "check_fit2d_predict1d", "check_requires_y_none",
    )
}


@parametrize_with_checks([RooflineRegressor()], expected_failed_checks=lambda est: _NOT_APPLICABLE)
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def X():
    return load_experiments()


@pytest.fixture(scope="module")
def small(X):
    # one chat, one code, one summarization experiment, three families
    return X.loc[["jan30-llama2-7b-tp4-chatsweep", "20260210-qwen3-14b-tp1-codesweep",
                  "dec17-tp1-qwen7-summarization"]]


def test_fit_returns_self_and_sets_fitted_attrs(small):
    est = RooflineRegressor()
    assert est.fit(small, small.tpot_mean_ms) is est
    assert est.experiments_ == list(small.index) and est.n_features_in_ == small.shape[1]


def test_unfitted_predict_raises(small):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        RooflineRegressor().predict(small)


def test_fit_does_not_change_params(small):
    est = RooflineRegressor(per_layer_us=55.0, variant="v2.4")
    before = est.get_params()
    est.fit(small, small.tpot_mean_ms)
    assert est.get_params() == before


def test_idempotent_order_and_subset_invariant(small):
    est = RooflineRegressor(per_layer_us=80).fit(small, small.tpot_mean_ms)
    a = est.predict(small)
    assert np.array_equal(a, est.fit(small, small.tpot_mean_ms).predict(small))
    rev = small.iloc[::-1]
    assert np.array_equal(est.predict(rev), a[::-1])
    assert np.array_equal(est.predict(small.iloc[1:2]), a[1:2])


def test_pickle_and_clone_roundtrip(small):
    est = RooflineRegressor(per_layer_us=80).fit(small, small.tpot_mean_ms)
    again = pickle.loads(pickle.dumps(est))
    assert np.array_equal(again.predict(small), est.predict(small))
    c = clone(est)
    assert c.get_params() == est.get_params() and not hasattr(c, "experiments_")


def test_bad_y_and_empty(small):
    est = RooflineRegressor()
    with pytest.raises(ValueError):
        est.fit(small, [1.0, np.inf, 2.0])
    with pytest.raises(ValueError):
        est.fit(small, [1.0, 2.0])
    with pytest.raises(ValueError):
        est.fit(small.iloc[:0])
    with pytest.raises(TypeError, match="experiments DataFrame"):
        est.fit(np.zeros((3, 2)))


@pytest.mark.parametrize("param,value,field", [
    ("target", "latency", "target"), ("mode", "fast", "mode"), ("mfu_rule", "cubic", "mfu_rule"),
    ("bw_efficiency", 1.5, "bw_efficiency"), ("gemm_mfu_scale", 0.0, "gemm_mfu_scale"),
    ("mixed_rule", "sum", "mixed_rule"), ("overhead_model", "magic", "overhead.model"),
    ("per_layer_us", -5.0, "overhead.per_layer_us"), ("per_layer_us", float("nan"), "overhead.per_layer_us"),
    ("seed", 4.5, "replay.seed"), ("seed", "abc", "replay.seed"), ("alpha", 0.5, "overhead.alpha"),
])
def test_bad_hyperparameters_named(small, param, value, field):
    with pytest.raises(CalibError) as info:
        RooflineRegressor(**{param: value}).fit(small)
    assert field in str(info.value)


def test_targets_and_score(small):
    y = small.tpot_mean_ms.to_numpy()
    est = RooflineRegressor(per_layer_us=80, target="tpot").fit(small, y)
    pred = est.predict(small)
    assert est.score(small, y) == pytest.approx(-np.mean(np.abs(pred - y) / y))
    ttft = RooflineRegressor(per_layer_us=80, target="ttft").fit(small).predict(small)
    e2e = RooflineRegressor(per_layer_us=80, target="e2e").fit(small).predict(small)
    assert np.all(ttft < e2e)


def test_overhead_raises_tpot_monotonically(small):
    preds = [RooflineRegressor(per_layer_us=v).fit(small).predict(small) for v in (0, 50, 100)]
    assert np.all(preds[0] < preds[1]) and np.all(preds[1] < preds[2])


def test_corrected_mode_differs_from_reference(small):
    ref = RooflineRegressor(per_layer_us=80).fit(small).predict_all(small)
    cor = RooflineRegressor(per_layer_us=80, mode="corrected").fit(small).predict_all(small)
    # corrected predicts sum(E2E)/sum(O) without the phantom step: TTFT is identical
    assert np.allclose(ref["ttft"], cor["ttft"])
    assert np.all(cor["e2e"] < ref["e2e"])
    assert np.allclose(cor["tpot"], cor["tpot_guidellm"])


def test_new_overhead_reuses_cached_physics(small, monkeypatch):
    from calib.physics import step_model

    est = RooflineRegressor(per_layer_us=10).fit(small)
    est.predict(small)  # warm the cache
    calls = {"n": 0}
    original = step_model.StepModel.build

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    monkeypatch.setattr(step_model.StepModel, "build", counting)
    RooflineRegressor(per_layer_us=10).fit(small).predict(small)
    assert calls["n"] == 0  # no replay (and no solo-step physics) was rebuilt


def test_cross_validate_with_groups_and_grid_search(X):
    sub = X.loc[["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep",
                 "20260210-qwen3-14b-tp1-codesweep", "20260210-qwen3-14b-tp2-chatsweep"]]
    y = sub.tpot_mean_ms
    cv = cross_validate(RooflineRegressor(per_layer_us=80), sub, y, groups=sub.family,
                        cv=LeaveOneGroupOut())
    assert len(cv["test_score"]) == 2 and np.all(cv["test_score"] < 0)
    gs = GridSearchCV(RooflineRegressor(), {"per_layer_us": [0.0, 80.0, 160.0]},
                      cv=LeaveOneGroupOut()).fit(sub, y, groups=sub.family)
    assert gs.best_params_["per_layer_us"] in (0.0, 80.0, 160.0)
    # the chosen value is the one with the best mean held-out score
    scores = gs.cv_results_["mean_test_score"]
    assert gs.best_params_["per_layer_us"] == [0.0, 80.0, 160.0][int(np.argmax(scores))]


def test_physics_defaults_are_v23():
    opts = RooflineRegressor().settings().physics_options()
    assert (opts.mfu_rule, opts.gemm_weight_floor, opts.decode_attention, opts.mixed_rule) == (
        "nearest", False, "max_context", "weighted")
    with pytest.raises(ConfigError, match="physics.mfu_floor"):
        RooflineRegressor(mfu_floor=1.0).settings()


def test_parameters_are_the_settings_flat_names():
    from calib.settings import FLAT_NAMES

    assert set(RooflineRegressor().get_params()) == set(FLAT_NAMES) | {"target"}
    assert all(v is None for k, v in RooflineRegressor().get_params().items() if k != "target")
    with pytest.raises(TypeError, match="overhead_params"):
        RooflineRegressor(overhead_params={})


def test_from_settings_roundtrip():
    from calib.settings import Settings

    s = Settings.from_params({"overhead_model": "batch_linear", "a_us": 30, "variant": "v2.4", "mode": "corrected"})
    est = RooflineRegressor.from_settings(s, target="e2e")
    assert est.settings() == s and est.target == "e2e"


def test_request_latency_adds_to_ttft_and_e2e(small):
    a = RooflineRegressor(per_layer_us=80).fit(small).predict_all(small)
    b = RooflineRegressor(per_layer_us=80, request_latency_ms=7.0).fit(small).predict_all(small)
    np.testing.assert_allclose(b["ttft"] - a["ttft"], 7.0)
    np.testing.assert_allclose(b["e2e"] - a["e2e"], 7.0)
    np.testing.assert_allclose(b["tpot_itl"], a["tpot_itl"])
    c = RooflineRegressor(per_layer_us=80, input_token_latency_us=3.0).fit(small).predict_all(small)
    shift = (c["ttft"] - a["ttft"]).to_numpy()
    np.testing.assert_allclose(c["e2e"] - a["e2e"], shift)
    means = [RooflineRegressor().replay(row).requests.input_tokens.mean() for _, row in small.iterrows()]
    np.testing.assert_allclose(shift, 3e-3 * np.array(means))  # 3 µs per token of each request's prompt


def test_guidellm_run_with_actual_requests(shared_data):
    run = shared_data / "guidellm" / "jan20-prefill-llama7b-tp1-1"
    X = load_experiments(run)
    assert len(X) == 1 and X.iloc[0]["model"] == "codellama-34b-instruct-hf"
    est = RooflineRegressor(per_layer_us=80, lengths="run", mode="corrected").fit(X, X.tpot_mean_ms)
    out = est.predict_all(X)
    assert 0 < out["ttft"].iloc[0] < out["e2e"].iloc[0]
    # the replay used the run's own request count
    from calib.data import load_guidellm_run

    n = len(load_guidellm_run(run).requests)
    row = X.iloc[0]
    assert est.replay(row).requests.n == n
