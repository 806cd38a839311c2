"""``LoadedRegressor``: the roofline step model + the loaded-server replay as a scikit-learn estimator.

``X`` is a table of load stages of loaded-server runs
(:func:`load_stages`), one row per stage; ``y`` is the measured mean of
``target`` (ms).  The settings are hyperparameters, so ``fit`` only
validates; ``predict`` replays each run of ``X`` through the
continuous-batching engine (:func:`calib.replay.loaded.replay_run`) and reads
every stage row of that run from the one replay.

Replays are cached across estimator instances (so across ``clone``,
``cross_validate`` and search trials), keyed by the run and the settings
that change the schedule (physics, hardware, overhead model, prefix-cache
options); the client-side ``request_latency_ms`` only shifts TTFT and E2E,
so a new latency reuses a replay.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin

from calib.errors import CalibError, ConfigError, DataError
from calib.estimators.base import MEASURED, SettingsMixin, check_y, settings_constraints, settings_init
from calib.metrics import group_weights
from calib.replay.batched import PREFIX_MODES
from calib.replay.loaded import (LoadedRun, check_settings, load_run, load_stages, replay_run, stage_means,
                                 supports)
from calib.settings import Settings

__all__ = ["LoadedRegressor", "load_stages", "TARGETS", "REQUIRED_COLUMNS", "clear_cache"]

TARGETS = ("tpot", "ttft", "e2e")
REQUIRED_COLUMNS = ("run", "stage", "model", "tp", "source", "ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms")
CACHED_PREFILL_PI = ("cached", "zero")

_RUNS: "OrderedDict[tuple, LoadedRun]" = OrderedDict()
_STAGES: "OrderedDict[tuple, pd.DataFrame]" = OrderedDict()
_MAX_RUNS = 32
_MAX_STAGES = 4096
#: Columns of :meth:`LoadedRegressor.predict_all` and their dtypes.
_OUTPUT = {"ttft": float, "tpot": float, "e2e": float, "n_compared": np.int64, "saturated": bool, "runaway": bool}


def clear_cache() -> None:
    """Forget every cached run and replay."""
    _RUNS.clear()
    _STAGES.clear()


def _remember(cache: OrderedDict, key, value, limit: int):
    cache[key] = value
    if len(cache) > limit:
        cache.popitem(last=False)
    return value


class LoadedRegressor(SettingsMixin, RegressorMixin, BaseEstimator):
    """Predict the mean latencies of load stages of loaded-server runs.

    Parameters
    ----------
    **settings
        Every parameter of :class:`calib.settings.Settings` under its flat
        name (``per_layer_us``, ``variant``, ``bw_efficiency``,
        ``request_latency_ms``, ...), default ``None``: the settings default.
        A loaded replay has no phantom step and compares TPOT per request on
        both sides, so ``mode``, ``lengths`` and ``seed`` do not apply and
        ``phantom_last_step=True`` or ``tpot_definition="guidellm"`` are
        errors (:func:`calib.replay.loaded.check_settings`).
    target : {"tpot", "ttft", "e2e"}, default "tpot"
        What ``predict`` returns and ``score`` scores.
    prefix : {"auto", "groups", "repeats", "profile", "none"}, default "auto"
        Prefix-cache assumption (:mod:`calib.replay.prefix`).
    cached_prefill_pi : {"cached", "zero"}, default "cached"
        First step of a request partly served from the prefix cache.
    async_scheduling : bool, default True
        vLLM's async scheduling: an arrival joins the step after next (:mod:`calib.replay.batched`).
    max_steps : int, optional
        Step cap of a replay (default: ``2 x (output tokens + chunks) + 1000``).

    Attributes
    ----------
    settings_ : Settings
        The validated settings (set by ``fit``).
    runs_ : list of str
        Runs seen by ``fit``.
    n_features_in_ : int
        Columns of the ``X`` given to ``fit``.

    Notes
    -----
    ``X`` needs the columns :data:`REQUIRED_COLUMNS` (``source``: the run
    folder); optional ``output_rule`` (default ``profile``) and ``window_s``
    (NaN: the full stage) say which trace the row describes, as
    :func:`load_stages` writes them.  Predicted means are over the requests
    the replay finished.  A mixture-of-experts model needs ``variant="v3"``
    (a one-line :class:`~calib.errors.ConfigError` otherwise).  ``score`` is
    a mean over rows; ``score(X, y, sample_weight=est.row_weights(X))`` is a
    mean over runs.

    Examples
    --------
    >>> X = load_stages("data/batched", ["20260218-155500-codellama-34b-tp2-roleplay"],
    ...                 window_s=20)  # doctest: +SKIP
    >>> est = LoadedRegressor(per_layer_us=80).fit(X)  # doctest: +SKIP
    >>> est.predict_all(X).columns.tolist()[:3]  # doctest: +SKIP
    ['ttft', 'tpot', 'e2e']
    """

    __init__ = settings_init(target="tpot", prefix="auto", cached_prefill_pi="cached", max_steps=None,
                             async_scheduling=True)
    _fitted_attr = "runs_"
    _parameter_constraints = {**settings_constraints(), "target": [str], "prefix": [str],
                              "cached_prefill_pi": [str], "max_steps": [Integral, None],
                              "async_scheduling": ["boolean"]}

    def _check_params(self) -> Settings:
        if self.target not in TARGETS:
            raise CalibError(f"unknown value {self.target!r}; choose one of {', '.join(TARGETS)}", field="target")
        if self.prefix not in PREFIX_MODES:
            raise ConfigError(f"unknown value {self.prefix!r}; choose one of {', '.join(PREFIX_MODES)}",
                              field="prefix")
        if self.cached_prefill_pi not in CACHED_PREFILL_PI:
            raise ConfigError(f"unknown value {self.cached_prefill_pi!r}; choose one of "
                              f"{', '.join(CACHED_PREFILL_PI)}", field="cached_prefill_pi")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, Integral)
                                           or self.max_steps < 1):
            raise ConfigError(f"must be an integer >= 1, got {self.max_steps!r}", field="max_steps")
        settings = self.settings()
        check_settings(settings)
        settings.physics_options()
        return settings

    # ---- scikit-learn API ------------------------------------------------------------
    def fit(self, X, y=None):
        """Validate the settings, ``X`` (load stages) and ``y`` (measured target, ms); nothing is learned."""
        settings = self._check_params()
        X = _check_frame(X)
        check_y(y, len(X))
        variant = settings.physics_options().variant
        for model in X["model"].astype(str).unique():
            ok, why = supports(model, variant)
            if not ok:
                runs = sorted(X.loc[X["model"].astype(str) == model, "run"].astype(str).unique())
                raise ConfigError(f"{why}; leave out its run(s) {', '.join(runs)}", field="physics.variant")
        missing = sorted({str(s) for s in X["source"] if not Path(str(s)).is_dir()})
        if missing:
            raise DataError("run folder not found", file=missing[0], field="source")
        self.settings_ = settings
        self.runs_ = sorted(X["run"].astype(str).unique())
        self.n_features_in_ = X.shape[1]
        return self

    # ---- everything at once ------------------------------------------------------------
    def predict_all(self, X) -> pd.DataFrame:
        """Predicted ``ttft``, ``tpot``, ``e2e`` means (ms) per stage row, plus ``n_compared`` (requests the
        replay finished), ``saturated`` and ``runaway`` (:func:`calib.replay.loaded.saturation`).

        Every run of ``X`` is replayed once (or read from the cache) and all
        its rows are read from that replay.
        """
        settings = self._check_params()
        X = _check_frame(X)
        rp = settings.replay
        by_trace: dict[tuple, list[int]] = {}
        for pos, key in enumerate(_trace_keys(X)):
            by_trace.setdefault(key, []).append(pos)
        cols = {c: np.empty(len(X), dtype=t) for c, t in _OUTPUT.items()}
        inputs = np.empty(len(X))
        stage_col = X["stage"].to_numpy()
        for key, pos in by_trace.items():
            stages = self._stages(key, settings)
            k = stage_col[pos].astype(int)
            unknown = sorted(set(k.tolist()) - set(stages.index.tolist()))
            if unknown:
                raise DataError(f"run {X['run'].iloc[pos[0]]} has no stage {unknown[0]}", file=key[0], field="stage")
            at = stages.index.get_indexer(k)
            for c in cols:
                cols[c][pos] = stages[c].to_numpy()[at]
            inputs[pos] = stages["input_mean"].to_numpy()[at]
        client = rp.client_ms(inputs)  # mean of the per-request client latency over the compared requests
        cols["ttft"] += client
        cols["e2e"] += client
        return pd.DataFrame(cols, index=X.index)

    @staticmethod
    def measured(X) -> pd.DataFrame:
        """The measured means of ``X`` as ``ttft``, ``tpot``, ``e2e`` columns (ms)."""
        X = _check_frame(X)
        return pd.DataFrame({k: X[c].to_numpy(dtype=float) for k, c in MEASURED.items()}, index=X.index)

    @staticmethod
    def row_weights(X) -> np.ndarray:
        """``1 / (rows of the same run in X)``: a weighted mean over rows is a mean over runs."""
        X = _check_frame(X)
        return group_weights(X["run"].astype(str).to_numpy())

    # ---- replays -----------------------------------------------------------------------
    def _run(self, source: str, output_rule: str) -> LoadedRun:
        key = (source, output_rule, self.prefix, self.cached_prefill_pi, self.max_steps, self.async_scheduling)
        run = _RUNS.get(key)
        if run is None:
            return _remember(_RUNS, key, load_run(source, output_rule=output_rule, prefix=self.prefix,
                                                  cached_prefill_pi=self.cached_prefill_pi,
                                                  max_steps=self.max_steps,
                                                  async_scheduling=self.async_scheduling), _MAX_RUNS)
        _RUNS.move_to_end(key)
        return run

    def _stages(self, trace_key: tuple, settings: Settings) -> pd.DataFrame:
        """Per-stage predicted means of one (run, output rule, window) without the client latency (cached)."""
        source, output_rule, window_s = trace_key
        base = settings.with_values({"request_latency_ms": 0.0, "input_token_latency_us": 0.0})
        key = (trace_key, self.prefix, self.cached_prefill_pi, self.max_steps, self.async_scheduling,
               settings.replay.cpu_overlap, settings.physics.hardware,
               settings.physics_options(), settings.overhead_model())
        stages = _STAGES.get(key)
        if stages is None:
            rep = replay_run(self._run(source, output_rule), base, window_s=window_s, record_steps=False)
            return _remember(_STAGES, key, stage_means(rep), _MAX_STAGES)
        _STAGES.move_to_end(key)
        return stages


def _trace_keys(X: pd.DataFrame) -> list[tuple]:
    """``(source, output_rule, window_s or None)`` of every row: which trace it describes."""
    rules = X["output_rule"].astype(str) if "output_rule" in X.columns else ["profile"] * len(X)
    windows = X["window_s"] if "window_s" in X.columns else [None] * len(X)
    keys = []
    for src, rule, win in zip(X["source"].astype(str), rules, windows):
        w = None if win is None or (isinstance(win, float) and math.isnan(win)) else float(win)
        keys.append((src, rule, w))
    return keys


def _check_frame(X) -> pd.DataFrame:
    if not isinstance(X, pd.DataFrame):
        raise TypeError("X must be a load-stages DataFrame (calib.estimators.load_stages), "
                        f"got {type(X).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in X.columns]
    if missing:
        raise DataError(f"load-stages table lacks column(s) {', '.join(missing)}", field=missing[0])
    if len(X) == 0:
        raise ValueError("X has no load stages (0 rows)")
    if not X.index.is_unique:
        raise DataError("load-stages table has duplicate row labels", field="index")
    return X
