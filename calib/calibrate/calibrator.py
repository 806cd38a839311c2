"""``Calibrator``: the calibration is ``fit``.  ``SelectBest``: choosing among calibrators is nested.

A :class:`Calibrator` wraps a calib estimator (:class:`~calib.RooflineRegressor`
or :class:`~calib.LoadedRegressor`) the way ``GridSearchCV`` wraps one: its
``fit(X)`` runs the search on the rows of ``X`` only and refits the estimator
at the best settings.  Because it is an estimator itself,
``sklearn.model_selection.cross_validate(Calibrator(...), X, y, groups=..., cv=...)``
gives held-out scores in which nothing about a test fold touched what was
chosen.  :class:`SelectBest` chooses among calibrators (overhead models,
physics variants, switch values) by inner cross-validation on the rows it is
given, so a choice among candidates is nested by construction too.

Examples
--------
>>> from calib import RooflineRegressor, load_experiments
>>> from calib.calibrate import Calibrator, PhasedGrid, Grid, Range
>>> X = load_experiments()
>>> train = X[X.hg1_split == "train"]
>>> cal = Calibrator(RooflineRegressor(), space={"overhead.per_layer_us": Range(0, 200)},
...                  search=PhasedGrid([Grid(step=50)])).fit(train, train.tpot_mean_ms)
>>> cal.best_params_, cal.best_settings_.overhead.per_layer_us
({'overhead.per_layer_us': 100.0}, 100.0)
>>> round(-cal.score(X), 3) < 0.3
True
"""

from __future__ import annotations

import hashlib
import json
import pickle
from typing import Any, Mapping

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, MetaEstimatorMixin, RegressorMixin, clone

from calib.calibrate.objective import Objective
from calib.calibrate.search import Search, SearchResult, TPE, parse_search
from calib.calibrate.space import describe_space, make_space
from calib.calibration import Calibration
from calib.errors import CalibError, ConfigError
from calib.settings import flat_name

__all__ = ["Calibrator", "SelectBest", "fingerprint"]


def fingerprint(*parts: Any) -> str:
    """A short stable hash of everything that determines a search's trials (part of its study names).

    >>> fingerprint({"a": 1}) == fingerprint({"a": 1}), fingerprint({"a": 1}) == fingerprint({"a": 2})
    (True, False)
    """
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: pickled frame -> its digest (a pickle is a faithful copy of the frame: equal pickles, equal digests)
_DIGESTS: dict[bytes, str] = {}
_MAX_DIGESTS = 1024


def _frame_digest(X: pd.DataFrame) -> str:
    """A digest of the rows, index and columns of ``X`` (as text), remembered by the frame's pickle (cheaper)."""
    try:
        key = pickle.dumps(X, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an unpicklable cell: no memo
        return _digest_of(X)
    digest = _DIGESTS.get(key)
    if digest is None:
        if len(_DIGESTS) >= _MAX_DIGESTS:
            _DIGESTS.clear()
        digest = _DIGESTS[key] = _digest_of(X)
    return digest


def _digest_of(X: pd.DataFrame) -> str:
    hashed = pd.util.hash_pandas_object(X.astype(str), index=True).to_numpy()
    return hashlib.sha256(hashed.tobytes() + "|".join(map(str, X.columns)).encode()).hexdigest()[:16]


class Calibrator(MetaEstimatorMixin, RegressorMixin, BaseEstimator):
    """Fit the settings of ``estimator`` to the rows given: an Optuna search over ``space``.

    Parameters
    ----------
    estimator : RooflineRegressor or LoadedRegressor
        The model; its hyperparameters are the fixed settings, ``space`` the searched ones.
    space : mapping
        Settings parameter (``overhead.per_layer_us`` or ``per_layer_us``) -> :class:`~calib.calibrate.Range`
        or :class:`~calib.calibrate.Choice`.
    objective : str or mapping, default "tpot"
        The loss (:class:`~calib.calibrate.Objective`): ``"tpot"``, ``"tpot_e2e_ttft"``, weights, a cap.
    search : Search, optional
        :class:`~calib.calibrate.PhasedGrid`, :class:`~calib.calibrate.TPE` (default, 5 seeds) or
        :class:`~calib.calibrate.CmaEs`.
    storage : str, optional
        Optuna storage URL (trials persist, resume and are shared by workers); default in memory.
    study_name : str, default "calib"
        Prefix of the Optuna study names; a fingerprint of the estimator, data, space, objective and search
        follows it, so a changed study never reuses another's trials.
    progress : bool, default False
        Progress bars.

    Attributes
    ----------
    best_params_ : dict
        Qualified name -> chosen value of each searched parameter.
    best_settings_ : Settings
        The estimator's settings with ``best_params_`` applied.
    best_estimator_ : estimator
        ``estimator`` with the best settings, fitted on ``X``.
    best_loss_ : float
        The objective at ``best_params_`` on the fitted rows.
    search_result_ : SearchResult
        Every trial, per-seed results and best-so-far curves.
    convergence_ : dict
        Seed -> best loss so far after each trial.
    converged_ : bool or None
        Whether the seeds agree within the search's tolerance (None: a grid or one seed).
    calibration_ : Calibration
        Settings + provenance, ready to save.
    study_name_ : str
        The fingerprinted prefix of the Optuna studies.
    storage_ : optuna storage
        The storage the trials are in.
    n_features_in_ : int
    """

    def __init__(self, estimator, space, objective="tpot", search=None, storage=None, study_name="calib",
                 progress=False):
        self.estimator = estimator
        self.space = space
        self.objective = objective
        self.search = search
        self.storage = storage
        self.study_name = study_name
        self.progress = progress

    # ---- helpers -----------------------------------------------------------------------
    def _search(self) -> Search:
        return parse_search(self.search, TPE())

    def _check_y(self, X, y) -> None:
        if y is None:
            return
        y = np.asarray(y, dtype=float)
        measured = self.estimator.measured(X)[getattr(self.estimator, "target", "tpot")].to_numpy(dtype=float)
        if y.shape != measured.shape or not np.allclose(y, measured, rtol=1e-9, equal_nan=True):
            raise ValueError("y must be the measured target column of X (a Calibrator reads every measured "
                             "metric its objective needs from X)")

    def _row_weights(self, X):
        fn = getattr(self.estimator, "row_weights", None)
        return fn(X) if callable(fn) else None

    # ---- scikit-learn API ------------------------------------------------------------
    def fit(self, X, y=None):
        """Search the settings on the rows of ``X`` (and only those), then refit the estimator at the best."""
        from calib.calibrate.trials import open_storage_cached

        if not isinstance(X, pd.DataFrame) or len(X) == 0:
            raise ValueError("X must be a non-empty DataFrame of experiments or load stages")
        base = self.estimator.settings()
        space = make_space(self.space, base)
        search = self._search()
        objective = Objective.parse(self.objective)
        self._check_y(X, y)
        measured = self.estimator.measured(X)
        weights = self._row_weights(X)
        est_params = {k: v for k, v in self.estimator.get_params().items()}
        digest = _frame_digest(X)
        fp = fingerprint(type(self.estimator).__name__, est_params, base.params(), describe_space(space),
                         search.describe(), objective.describe(), digest)
        name = f"{self.study_name}-{fp}"
        estimator = self.estimator

        def evaluate(values: Mapping[str, Any]):
            est = clone(estimator).set_params(**{flat_name(k): v for k, v in values.items()})
            pred = est.fit(X).predict_all(X)
            return objective.loss(pred, measured, weights)

        self.storage_ = storage = open_storage_cached(self.storage)
        result: SearchResult = search.run(evaluate, space, storage=storage, name=name, progress=self.progress)
        self.best_params_ = dict(result.best_params)
        self.best_settings_ = base.with_values(self.best_params_)
        self.best_estimator_ = clone(estimator).set_params(
            **{flat_name(k): v for k, v in self.best_params_.items()}).fit(X, y)
        self.best_loss_ = float(result.best_loss)
        self.search_result_ = result
        self.convergence_ = {s["seed"]: s["curve"] for s in result.seeds}
        self.converged_ = result.converged
        self.study_name_ = name
        self.n_features_in_ = X.shape[1]
        self.calibration_ = Calibration(
            settings=self.best_settings_, estimator=type(estimator).__name__,
            data={"rows": [str(i) for i in X.index], "fingerprint": digest},
            objective=objective.describe(), search=search.describe(), space=describe_space(space),
            train_loss=self.best_loss_,
            seeds=[{k: s[k] for k in ("seed", "best_loss", "best_params")} for s in result.seeds],
            converged=result.converged)
        return self

    def _fitted(self):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_

    def predict(self, X) -> np.ndarray:
        """The best estimator's prediction of its target (ms)."""
        return self._fitted().predict(X)

    def predict_all(self, X) -> pd.DataFrame:
        """The best estimator's TTFT/TPOT/E2E predictions (ms)."""
        return self._fitted().predict_all(X)

    def measured(self, X) -> pd.DataFrame:
        return self.estimator.measured(X)

    def row_weights(self, X):
        return self._row_weights(X)

    def settings(self):
        """The fixed settings of the wrapped estimator (what the search starts from)."""
        return self.estimator.settings()

    def score(self, X, y=None, sample_weight=None) -> float:
        """Minus the objective on ``X`` at the best settings (higher is better; ``-0.139`` is 13.9 %)."""
        self._check_y(X, y)
        loss, _ = Objective.parse(self.objective).loss(self.predict_all(X), self.measured(X), self._row_weights(X))
        return -loss

    @property
    def study_(self):
        """The Optuna study of the best seed (or the last grid phase), loaded from the storage."""
        import optuna

        self._fitted()
        result = self.search_result_
        names = [s["study"] for s in result.seeds if s["best_params"] == result.best_params] or result.studies
        return optuna.load_study(study_name=names[-1], storage=self.storage_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


class SelectBest(MetaEstimatorMixin, RegressorMixin, BaseEstimator):
    """Choose among candidate calibrators by inner cross-validation on the rows given, then refit the winner.

    Inside ``cross_validate(SelectBest(...), X, ...)`` the choice happens on
    each outer fold's training rows only: the outer score is that of what the
    inner loop chose.

    Parameters
    ----------
    candidates : list of Calibrator or of (name, Calibrator)
    cv : int or splitter, default 3
        Inner splitter (``KFold`` for an int).
    groups : str, optional
        Column of ``X`` holding the inner groups (for group splitters such as ``LeaveOneGroupOut``).

    Attributes
    ----------
    inner_scores_ : dict
        Candidate name -> per-fold inner held-out scores (empty with a single candidate: there is nothing to
        choose, so no inner cross-validation is run).
    best_index_ : int
    best_name_ : str
    best_estimator_ : Calibrator
        The chosen candidate, refitted on all rows given.
    best_settings_, calibration_ :
        Those of ``best_estimator_`` (the calibration notes the selection).
    """

    def __init__(self, candidates, cv=3, groups=None):
        self.candidates = candidates
        self.cv = cv
        self.groups = groups

    def _named(self) -> list[tuple[str, Any]]:
        out = []
        for i, c in enumerate(self.candidates):
            out.append((str(c[0]), c[1]) if isinstance(c, tuple) else (f"candidate{i}", c))
        names = [n for n, _ in out]
        if not out or len(set(names)) != len(names):
            raise ConfigError("SelectBest needs at least one candidate, with distinct names", field="candidates")
        return out

    def fit(self, X, y=None):
        from sklearn.model_selection import check_cv, cross_validate

        named = self._named()
        groups = None
        if self.groups is not None:
            if self.groups not in X.columns:
                raise CalibError(f"X has no column {self.groups!r}", field="groups")
            groups = X[self.groups].to_numpy()
        cv = check_cv(self.cv)
        self.inner_scores_ = {}
        for name, cand in named if len(named) > 1 else ():  # one candidate: nothing to choose, no inner CV
            scores = cross_validate(cand, X, y, groups=groups, cv=cv, error_score="raise")["test_score"]
            self.inner_scores_[name] = [float(s) for s in scores]
        means = [float(np.mean(self.inner_scores_[n])) if n in self.inner_scores_ else 0.0 for n, _ in named]
        self.best_index_ = int(np.argmax(means))
        self.best_name_ = named[self.best_index_][0]
        self.best_estimator_ = clone(named[self.best_index_][1]).fit(X, y)
        self.best_settings_ = self.best_estimator_.best_settings_
        note = (f"chosen by SelectBest among {', '.join(n for n, _ in named)} by mean inner held-out score "
                f"({type(cv).__name__})" if len(named) > 1 else f"the only candidate, {self.best_name_}")
        self.calibration_ = self.best_estimator_.calibration_.model_copy(update={"notes": note})
        self.n_features_in_ = X.shape[1]
        return self

    def _fitted(self):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_

    def predict(self, X):
        return self._fitted().predict(X)

    def predict_all(self, X):
        return self._fitted().predict_all(X)

    def score(self, X, y=None, sample_weight=None) -> float:
        return self._fitted().score(X, y)
