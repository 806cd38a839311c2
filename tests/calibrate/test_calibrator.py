"""Calibrator and SelectBest: the calibration is fit, selection is nested."""

import numpy as np
import optuna
import pytest
from sklearn.base import clone
from sklearn.model_selection import KFold, LeaveOneGroupOut, cross_validate

from calib import Calibration, Calibrator, RooflineRegressor, SelectBest
from calib.calibrate import TPE, Grid, PhasedGrid, Range, Refine
from calib.data import load_experiments
from calib.errors import ConfigError

HG1_SEARCH = PhasedGrid([Grid(step=25, name="coarse"), Refine(radius=25, step=5, name="fine")])


@pytest.fixture(scope="module")
def X():
    return load_experiments()


@pytest.fixture(scope="module")
def train(X):
    return X[X["hg1_split"] == "train"]


def hg1_calibrator(**kw):
    return Calibrator(RooflineRegressor(**kw), space={"overhead.per_layer_us": Range(0, 500)}, search=HG1_SEARCH)


def test_phased_grid_on_the_hg1_train_rows_gives_80us(train):
    cal = hg1_calibrator().fit(train, train.tpot_mean_ms)
    assert cal.best_params_ == {"overhead.per_layer_us": 80.0}
    assert cal.best_settings_.overhead.per_layer_us == 80.0
    assert cal.best_estimator_.get_params()["per_layer_us"] == 80.0
    stages = [t["stage"] for t in cal.search_result_.trials]
    assert stages.count("coarse") == 21 and stages.count("fine") == 11
    coarse = min((t for t in cal.search_result_.trials if t["stage"] == "coarse"), key=lambda t: t["loss"])
    assert coarse["params"]["overhead.per_layer_us"] == 75.0
    assert cal.best_loss_ == pytest.approx(0.1398, abs=5e-4)  # the published train MAPE is 13.9 %


def test_clone_keeps_parameters_and_drops_fitted_state(train):
    cal = hg1_calibrator(mode="corrected")
    twin = clone(cal)
    assert twin.get_params()["estimator"].get_params() == cal.estimator.get_params()
    cal.fit(train)
    assert not hasattr(clone(cal), "best_params_")


def test_cross_validate_by_family_gives_one_score_per_family(X):
    out = cross_validate(hg1_calibrator(), X, X.tpot_mean_ms, groups=X["family"], cv=LeaveOneGroupOut(),
                         return_estimator=True)
    assert len(out["test_score"]) == X["family"].nunique()
    assert all(s < 0 for s in out["test_score"])
    # each fold's optimum was chosen on its own training rows: refit by hand on one fold and compare
    fold_train = X[X["family"] != sorted(X["family"].unique())[0]]
    by_hand = hg1_calibrator().fit(fold_train)
    assert out["estimator"][0].best_params_ == by_hand.best_params_


def test_the_search_never_sees_rows_outside_fit(X, train, monkeypatch):
    seen = set()
    real = RooflineRegressor.predict_all

    def spy(self, rows):
        seen.update(map(str, rows.index))
        return real(self, rows)

    monkeypatch.setattr(RooflineRegressor, "predict_all", spy)
    hg1_calibrator().fit(train)
    assert seen == set(map(str, train.index))


def test_tpe_records_seeds_and_convergence_and_a_calibration(train, tmp_path):
    cal = Calibrator(RooflineRegressor(), space={"per_layer_us": Range(0, 300)},
                     search=TPE(n_trials=12, seeds=3)).fit(train)
    assert sorted(cal.convergence_) == [0, 1, 2]
    for curve in cal.convergence_.values():
        assert len(curve) == 12 and all(a >= b for a, b in zip(curve, curve[1:]))
    assert cal.converged_ in (True, False)
    assert cal.best_loss_ == min(s["best_loss"] for s in cal.search_result_.seeds)
    path = cal.calibration_.save(tmp_path / "cal.yaml")
    loaded = Calibration.load(path)
    assert loaded.settings == cal.best_settings_ and len(loaded.seeds) == 3
    assert loaded.estimator().get_params()["per_layer_us"] == pytest.approx(cal.best_params_["overhead.per_layer_us"])


def test_storage_resumes_and_a_changed_calibrator_uses_other_studies(train, tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    a = hg1_calibrator()
    a.set_params(storage=url).fit(train)
    n = len(optuna.get_all_study_summaries(url))
    again = clone(a).fit(train)  # same fingerprint: everything is read back, nothing evaluated
    assert again.best_params_ == a.best_params_ and len(optuna.get_all_study_summaries(url)) == n
    other = Calibrator(RooflineRegressor(bw_efficiency=0.95), space={"per_layer_us": Range(0, 500)},
                       search=HG1_SEARCH, storage=url).fit(train)
    assert other.study_name_ != a.study_name_
    assert len(optuna.get_all_study_summaries(url)) == 2 * n
    assert other.best_params_ != a.best_params_  # an edited study never reports the old optimum


def test_bad_spaces_are_one_line_errors(train):
    for space, field in (({"per_layer_us": Range(-100, 100)}, "overhead.per_layer_us"),
                         ({"overhead_model": Range(0, 1)}, "overhead_model"),
                         ({"nope": Range(0, 1)}, "nope")):
        with pytest.raises(ConfigError, match=field):
            Calibrator(RooflineRegressor(), space=space, search=HG1_SEARCH).fit(train)
    with pytest.raises(ConfigError, match="finite"):
        Range(0, float("inf"))


def test_y_must_be_the_measured_target(train):
    with pytest.raises(ValueError, match="measured target"):
        hg1_calibrator().fit(train, train.e2e_mean_ms)


def test_select_best_chooses_inside_each_outer_fold(X):
    good = ("fitted", hg1_calibrator())
    bad = ("zero", Calibrator(RooflineRegressor(), space={"per_layer_us": Range(0, 0)},
                              search=PhasedGrid([Grid(step=1)])))
    sel = SelectBest([good, bad], cv=KFold(3))
    outer = cross_validate(sel, X, groups=X["family"], cv=LeaveOneGroupOut(), return_estimator=True)
    assert len(outer["test_score"]) == X["family"].nunique()
    for est in outer["estimator"]:
        assert set(est.inner_scores_) == {"fitted", "zero"}
        means = {k: np.mean(v) for k, v in est.inner_scores_.items()}
        assert est.best_name_ == max(means, key=means.get)
        assert "SelectBest" in est.calibration_.notes
    assert clone(sel).get_params()["candidates"][0][0] == "fitted"


def test_frame_digest_is_the_text_hash_whatever_the_memo(X):
    """The digest remembered by a frame's pickle is the one computed from its text; any change of rows, values,
    index or columns changes it; an unpicklable frame is digested directly."""
    import pandas as pd

    from calib.calibrate import calibrator

    calibrator._DIGESTS.clear()
    sub = X.iloc[[0, 2, 5]]
    first = calibrator._frame_digest(sub)
    assert first == calibrator._digest_of(sub) == calibrator._frame_digest(X.iloc[[0, 2, 5]].copy())
    changed = sub.copy()
    changed.iloc[0, changed.columns.get_loc("rate")] += 1e-9
    variants = [X.iloc[[0, 2]], X.iloc[[2, 0, 5]], changed, sub.rename(index=str.upper), sub.rename(columns=str.upper)]
    digests = {calibrator._frame_digest(v) for v in variants}
    assert len(digests) == len(variants) and first not in digests
    odd = pd.DataFrame({"a": [lambda: 0]})  # a lambda does not pickle
    assert calibrator._frame_digest(odd) == calibrator._digest_of(odd)
