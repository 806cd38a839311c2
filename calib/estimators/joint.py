"""``JointRegressor``: synchronous experiments and loaded-server load stages in one table, under one set of settings.

``X`` stacks the rows of the two other estimators (:func:`stack`): synchronous
experiments (:func:`calib.data.load_experiments`, rows of
:class:`~calib.estimators.roofline.RooflineRegressor`) and load stages of
loaded-server runs (:func:`calib.replay.loaded.load_stages`, rows of
:class:`~calib.estimators.loaded.LoadedRegressor`), told apart by a ``dataset``
column (``"sync"`` / ``"loaded"``) and sharing a ``model`` column, so a split
by model keeps a model's experiments and runs together.  Each part is
predicted, measured and weighted by the estimator of its rows, built from the
one set of settings of this estimator: a calibration searched on ``X`` is one
physics, one overhead model and one client latency for both regimes.

Synchronous replay
------------------
``mode`` defaults to ``corrected`` here (the settings default is
``reference``): no phantom last step, and predicted TPOT is ΣE2E/ΣO, the
quantity GuideLLM measures.  The loaded replay ignores ``mode`` (it has no
phantom step and compares TPOT per request on both sides); an explicit
``phantom_last_step=True`` or ``tpot_definition="guidellm"`` is refused by
the loaded part (:func:`calib.replay.loaded.check_settings`).

Weights
-------
:meth:`JointRegressor.row_weights` makes every dataset present weigh the same
in total: within a dataset the rows keep their own weights (experiments
equal, a run's stages ``1 / stages``), scaled to sum ``1 / datasets``.  Since
:class:`~calib.calibrate.Objective` takes, per metric, the (capped) APEs'
row-weighted mean, the loss of a calibration on ``X`` is the mean of the
synchronous loss (over experiments) and the loaded loss (over runs): 13
experiments neither outweigh nor are outweighed by the stages of 9 runs.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin

from calib.errors import DataError
from calib.estimators.base import SettingsMixin, check_y, settings_constraints, settings_init
from calib.estimators.loaded import LoadedRegressor
from calib.estimators.roofline import RooflineRegressor
from calib.settings import FLAT_NAMES, Settings

__all__ = ["JointRegressor", "stack", "DATASETS", "SYNC_MODE"]

#: Values of the ``dataset`` column, in the order the parts are predicted.
DATASETS = ("sync", "loaded")
#: The synchronous replay mode when ``mode`` is not given.
SYNC_MODE = "corrected"
_OUTPUT = ("ttft", "tpot", "e2e", "saturated", "runaway")


def stack(sync: pd.DataFrame | None = None, loaded: pd.DataFrame | None = None) -> pd.DataFrame:
    """The joint table: ``sync`` experiments and ``loaded`` load stages with a ``dataset`` column.

    Columns are the union of both tables (a row's foreign columns are NaN) and
    hold Python objects, so an integer column of one table (``seed``,
    ``stage``) is not turned into floats by the other's missing values;
    :class:`JointRegressor` hands each part its own columns back with their
    dtypes.  Row labels must be unique across the tables.

    >>> from calib.data import load_experiments
    >>> X = stack(load_experiments())
    >>> X["dataset"].unique().tolist(), X["seed"].iloc[0]
    (['sync'], 42)
    """
    parts = [df.assign(dataset=name).astype(object) for name, df in zip(DATASETS, (sync, loaded))
             if df is not None and len(df)]
    if not parts:
        raise ValueError("stack needs synchronous experiments or load stages (both empty)")
    for df in parts:
        if "model" not in df.columns:
            raise DataError("a stacked table lacks column model", field="model")
    X = pd.concat(parts)
    if not X.index.is_unique:
        dup = X.index[X.index.duplicated()][0]
        raise DataError(f"row {dup!r} is both an experiment and a load stage", field="index")
    return X


class JointRegressor(SettingsMixin, RegressorMixin, BaseEstimator):
    """Predict synchronous experiment means and load-stage means with one set of settings.

    Parameters
    ----------
    **settings
        Every parameter of :class:`calib.settings.Settings` under its flat
        name (``per_layer_us``, ``variant``, ``request_latency_ms``, ...),
        default ``None``: the settings default, except ``mode``, whose default
        here is ``corrected`` (module docstring).  Validated in ``fit``.
    target : {"tpot", "ttft", "e2e"}, default "tpot"
        What ``predict`` returns and ``score`` scores.
    prefix, cached_prefill_pi, max_steps, async_scheduling :
        Options of the loaded replay (:class:`~calib.estimators.loaded.LoadedRegressor`).

    Attributes
    ----------
    settings_ : Settings
        The validated settings (set by ``fit``).
    estimators_ : dict
        Dataset -> the fitted part (``RooflineRegressor`` for ``sync``, ``LoadedRegressor`` for ``loaded``).
    datasets_ : dict
        Dataset -> rows seen by ``fit``.
    n_features_in_ : int
        Columns of the ``X`` given to ``fit``.

    Notes
    -----
    ``X`` is a :func:`stack` table: a ``dataset`` column and a ``model`` column
    common to both parts; each part needs the columns its estimator needs.
    ``fit`` learns nothing (the search is :class:`~calib.calibrate.Calibrator`'s
    ``fit``); ``predict_all``, ``measured`` and ``row_weights`` delegate each
    part to its estimator and return rows in the order of ``X``.

    Examples
    --------
    >>> from calib.data import load_experiments
    >>> from calib.replay.loaded import load_stages
    >>> sync = load_experiments().head(2)
    >>> loaded = load_stages(None, ["20260217-162547-llama-2-7b-tp1-roleplay"], window_s=10)
    >>> X = stack(sync, loaded)
    >>> est = JointRegressor(variant="v2.4", per_layer_us=40).fit(X)
    >>> pred = est.predict_all(X)
    >>> pred.columns.tolist(), bool((pred[["ttft", "tpot", "e2e"]] > 0).all().all())
    (['ttft', 'tpot', 'e2e', 'saturated', 'runaway'], True)
    >>> w = est.row_weights(X)
    >>> float(w[X["dataset"] == "sync"].sum()), float(w[X["dataset"] == "loaded"].sum())
    (0.5, 0.5)
    """

    __init__ = settings_init(target="tpot", prefix="auto", cached_prefill_pi="cached", max_steps=None,
                             async_scheduling=True)
    _fitted_attr = "datasets_"
    _parameter_constraints = {**settings_constraints(), "target": [str], "prefix": [str],
                              "cached_prefill_pi": [str], "max_steps": [Integral, None],
                              "async_scheduling": ["boolean"]}

    def settings(self) -> Settings:
        """The validated settings; ``mode`` is :data:`SYNC_MODE` unless given."""
        params = {n: getattr(self, n) for n in FLAT_NAMES}
        if params.get("mode") is None:
            params["mode"] = SYNC_MODE
        return Settings.from_params(params)

    def parts(self) -> dict:
        """Dataset -> the (unfitted) estimator of its rows, both built from :meth:`settings`."""
        s = self.settings()
        return {"sync": RooflineRegressor.from_settings(s, target=self.target),
                "loaded": LoadedRegressor.from_settings(s, target=self.target, prefix=self.prefix,
                                                        cached_prefill_pi=self.cached_prefill_pi,
                                                        max_steps=self.max_steps,
                                                        async_scheduling=self.async_scheduling)}

    # ---- scikit-learn API ------------------------------------------------------------
    def fit(self, X, y=None):
        """Validate the settings, each part of ``X`` (by its estimator) and ``y``; nothing is learned."""
        split = _split(X)
        check_y(y, len(X))
        parts = self.parts()
        self.estimators_ = {d: parts[d].fit(rows) for d, rows in split.items()}
        self.settings_ = self.settings()
        self.datasets_ = {d: len(rows) for d, rows in split.items()}
        self.n_features_in_ = X.shape[1]
        return self

    # ---- everything at once ------------------------------------------------------------
    def predict_all(self, X) -> pd.DataFrame:
        """Predicted ``ttft``, ``tpot``, ``e2e`` (ms) per row of ``X``, plus ``saturated`` and ``runaway`` (load
        stages: :func:`calib.replay.loaded.saturation`; always false for synchronous experiments)."""
        parts = self.parts()
        frames = []
        for d, rows in _split(X).items():
            pred = parts[d].predict_all(rows)
            for flag in ("saturated", "runaway"):
                if flag not in pred.columns:
                    pred[flag] = False
            frames.append(pred[list(_OUTPUT)])
        return pd.concat(frames).reindex(X.index)

    @staticmethod
    def measured(X) -> pd.DataFrame:
        """The measured means of ``X`` as ``ttft``, ``tpot``, ``e2e`` columns (ms), each part read by its
        estimator."""
        estimators = {"sync": RooflineRegressor, "loaded": LoadedRegressor}
        return pd.concat([estimators[d].measured(rows) for d, rows in _split(X).items()]).reindex(X.index)

    @staticmethod
    def row_weights(X) -> np.ndarray:
        """Row weights making the objective the mean of the datasets' losses (module docstring).

        Experiments weigh equally, a run's stages ``1 / stages``; each dataset present sums ``1 / datasets``.
        """
        split = _split(X)
        out = pd.Series(0.0, index=X.index)
        for d, rows in split.items():
            w = np.ones(len(rows)) if d == "sync" else LoadedRegressor.row_weights(rows)
            out.loc[rows.index] = w / w.sum() / len(split)
        return out.to_numpy()


def _split(X) -> dict[str, pd.DataFrame]:
    """Dataset -> its rows of ``X``, without the other dataset's columns and with their dtypes inferred again."""
    if not isinstance(X, pd.DataFrame):
        raise TypeError(f"X must be a stacked DataFrame (calib.estimators.joint.stack), got {type(X).__name__}")
    for col in ("dataset", "model"):
        if col not in X.columns:
            raise DataError(f"stacked table lacks column {col}", field=col)
    if len(X) == 0:
        raise ValueError("X has no rows")
    if not X.index.is_unique:
        raise DataError("stacked table has duplicate row labels", field="index")
    labels = X["dataset"].astype(str)
    unknown = sorted(set(labels) - set(DATASETS))
    if unknown:
        raise DataError(f"unknown dataset {unknown[0]!r}; choose {' or '.join(DATASETS)}", field="dataset")
    filled = X.notna().any()
    out = {}
    for d in DATASETS:
        rows = X[labels == d]
        if len(rows):
            foreign = [c for c in X.columns if filled[c] and rows[c].isna().all()]
            out[d] = rows.drop(columns=foreign).infer_objects()
    return out
