"""The many-fold phased grid of the generalization studies (``apematrix.phased_optima``) is the calibration
core's ``PhasedGrid`` run by a ``Calibrator`` on each fold, only vectorised: same optima on every fold."""

import numpy as np
import optuna
from sklearn.model_selection import LeaveOneGroupOut

from calib import Calibrator, RooflineRegressor
from calib.calibrate import Range
from calib.data import load_experiments
from calib.studies.apematrix import CandidateStore, GridApe, phased_optima
from calib.studies.common import Phase

PHASES = [Phase(name="coarse", grid={"low": 0, "high": 300, "step": 50}),
          Phase(name="fine", around="coarse", radius=25, step=5)]


def test_every_leave_one_family_out_fold_gets_the_calibrators_optimum():
    X = load_experiments()
    base = RooflineRegressor().resolved_params()
    store = CandidateStore(X, base, optuna.storages.InMemoryStorage(), "eq", progress=False)
    folds = [train for train, _ in LeaveOneGroupOut().split(X, groups=X["family"])]
    vectorised = phased_optima(GridApe(store, "per_layer_us"), PHASES, folds)
    from calib.calibrate import PhasedGrid

    search = PhasedGrid([p.to_phase() for p in PHASES])
    for train, opt in zip(folds, vectorised):
        cal = Calibrator(RooflineRegressor(), space={"per_layer_us": Range(0, 300)}, search=search).fit(X.iloc[train])
        assert cal.best_params_["overhead.per_layer_us"] == opt["fine"]
        coarse = [t for t in cal.search_result_.trials if t["stage"] == "coarse"]
        best = min(coarse, key=lambda t: (t["loss"], t["params"]["overhead.per_layer_us"]))
        assert best["params"]["overhead.per_layer_us"] == opt["coarse"]
    assert len({o["fine"] for o in vectorised}) > 1 and np.isfinite([o["fine"] for o in vectorised]).all()
