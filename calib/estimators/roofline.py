"""``RooflineRegressor``: the roofline step model + synchronous replay as a scikit-learn estimator.

``X`` is an experiments DataFrame (:func:`calib.data.load_experiments`), one
row per experiment; ``y`` is the measured mean of ``target`` (ms).  The
overhead and the physics constants are hyperparameters, so ``fit`` only
validates; ``predict`` replays each experiment and returns its predicted mean.

Replays are cached across estimator instances (and so across ``clone``,
``GridSearchCV`` and Optuna trials): the solo-step hardware times of an
experiment depend only on the physics, so a new overhead value reuses them.
Predictions are cached too, keyed by (experiment, settings): the folds, seeds
and candidates of a study that meet the same point replay it once.  So are the
request times of a replay without the phantom step, keyed by (experiment,
physics, overhead model): the reference and corrected modes of a study replay
a point they share once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin

from calib.errors import CalibError, DataError
from calib.estimators.base import MEASURED, SettingsMixin, check_y, settings_constraints, settings_init
from calib.metrics import tpot_ms
from calib.physics.step_model import StepModel
from calib.replay.engine import SchedulerConfig
from calib.replay.synchronous import RequestTimes, SyncReplay, SyncRequests
from calib.settings import Settings

__all__ = ["RooflineRegressor", "TARGETS", "REQUIRED_COLUMNS", "clear_cache"]

TARGETS = ("tpot", "ttft", "e2e")
REQUIRED_COLUMNS = ("model", "tp", "workload", "rate", "n_requests", "prefix_tokens")

_REPLAYS: "OrderedDict[tuple, SyncReplay]" = OrderedDict()
_MAX_REPLAYS = 2048
#: (experiment row, settings) -> predicted summary: shared across folds, seeds and candidates of a process
_PREDICTIONS: "OrderedDict[tuple, dict]" = OrderedDict()
_MAX_PREDICTIONS = 100_000
#: (replay without the phantom step, overhead model) -> its request times: shared by both replay modes
_TIMES: "OrderedDict[tuple, RequestTimes]" = OrderedDict()
_MAX_TIMES = 50_000


def clear_cache() -> None:
    """Forget every cached replay and prediction."""
    _REPLAYS.clear()
    _PREDICTIONS.clear()
    _TIMES.clear()


class RooflineRegressor(SettingsMixin, RegressorMixin, BaseEstimator):
    """Predict experiment-mean latency from the roofline step model.

    Parameters
    ----------
    **settings
        Every parameter of :class:`calib.settings.Settings` under its flat
        name (``per_layer_us``, ``variant``, ``bw_efficiency``, ``mode``,
        ``seed``, ...), default ``None``: the settings default.  Validated in
        ``fit`` (one-line :class:`~calib.errors.ConfigError`).
    target : {"tpot", "ttft", "e2e"}, default "tpot"
        What ``predict`` returns and ``score`` scores.

    Attributes
    ----------
    settings_ : Settings
        The validated settings (set by ``fit``).
    experiments_ : list of str
        Experiments seen by ``fit``.
    n_features_in_ : int
        Columns of the ``X`` given to ``fit``.

    Notes
    -----
    ``fit`` learns nothing: the estimator has no fitted parameters.  Learning
    the settings from data is :class:`calib.calibrate.Calibrator`'s ``fit``.

    Examples
    --------
    >>> from calib.data import load_experiments
    >>> X = load_experiments()
    >>> est = RooflineRegressor(per_layer_us=60).fit(X, X.tpot_mean_ms)
    >>> pred = est.predict(X)
    >>> len(pred), bool((pred > 0).all())
    (13, True)
    """

    __init__ = settings_init(target="tpot")
    _fitted_attr = "experiments_"
    _parameter_constraints = {**settings_constraints(), "target": [str]}

    def _check_target(self) -> None:
        if self.target not in TARGETS:
            raise CalibError(f"unknown value {self.target!r}; choose one of {', '.join(TARGETS)}", field="target")

    # ---- scikit-learn API ------------------------------------------------------------
    def fit(self, X, y=None):
        """Validate the settings, ``X`` (experiments) and ``y`` (measured target, ms); nothing is learned."""
        self._check_target()
        settings = self.settings()
        settings.physics_options()
        X = _check_frame(X)
        check_y(y, len(X))
        self.settings_ = settings
        self.experiments_ = [str(i) for i in X.index]
        self.n_features_in_ = X.shape[1]
        return self

    # ---- everything at once ------------------------------------------------------------
    def predict_all(self, X) -> pd.DataFrame:
        """Predicted ``ttft``, ``tpot``, ``e2e`` (ms) per experiment, plus ``tpot_itl``, ``tpot_guidellm``
        and the number of requests replayed overlapping (``overlapped``)."""
        self._check_target()
        settings = self.settings()
        X = _check_frame(X)
        overhead = None
        rows = []
        for i, row_key in enumerate(_row_keys(X, settings.replay.lengths, settings.replay.seed)):
            key = (row_key, settings)
            summary = _PREDICTIONS.get(key)
            if summary is None:
                overhead = overhead or settings.overhead_model()
                rep = self._replay(lambda: X.iloc[i], settings, row_key)
                times = _times(rep, overhead, _replay_key(row_key, settings, phantom=False))
                if settings.replay.phantom:
                    times = times.with_phantom()
                summary = _summarise(times, settings.replay.tpot, settings.replay.client_ms(rep.requests.input_tokens))
                _PREDICTIONS[key] = summary
                if len(_PREDICTIONS) > _MAX_PREDICTIONS:
                    _PREDICTIONS.popitem(last=False)
            rows.append(summary)
        return pd.DataFrame(rows, index=X.index)

    @staticmethod
    def measured(X) -> pd.DataFrame:
        """The measured means of ``X`` as ``ttft``, ``tpot``, ``e2e`` columns (ms)."""
        X = _check_frame(X)
        return pd.DataFrame({k: X[c].to_numpy(dtype=float) for k, c in MEASURED.items()}, index=X.index)

    def replay(self, row: pd.Series, settings: Settings | None = None) -> SyncReplay:
        """The cached :class:`SyncReplay` of one experiment row under these settings' physics and replay."""
        settings = settings or self.settings()
        return self._replay(lambda: row, settings, _row_key(row, settings.replay.lengths, settings.replay.seed))

    def _replay(self, row_of, settings: Settings, row_key: tuple) -> SyncReplay:
        """:meth:`replay` with the row's :func:`_row_key` computed by the caller; ``row_of()`` gives the row
        (taken only when the replay is not cached)."""
        rp = settings.replay
        sched = SchedulerConfig(phantom_last_step=rp.phantom)
        key = _replay_key(row_key, settings, rp.phantom)
        rep = _REPLAYS.get(key)
        if rep is None:
            row = row_of()
            try:
                sm = StepModel.build(str(row["model"]), int(row["tp"]), hardware=settings.physics.hardware,
                                     options=settings.physics_options())
            except CalibError as exc:
                if exc.file is None and row.get("source") is not None:  # name the experiments file
                    raise type(exc)(f"experiment {row.name!r}: {exc.message}", file=str(row["source"]),
                                    field=exc.field) from None
                raise
            requests = _requests(row, rp.lengths, rp.seed)
            rep = SyncReplay(sm, requests, sched)
            _REPLAYS[key] = rep
            if len(_REPLAYS) > _MAX_REPLAYS:
                _REPLAYS.popitem(last=False)
        else:
            _REPLAYS.move_to_end(key)
        return rep


def _replay_key(row_key: tuple, settings: Settings, phantom: bool) -> tuple:
    """What identifies the replay of an experiment row: the row, the physics and the scheduler."""
    physics = _PHYSICS_KEYS.get(settings.physics)
    if physics is None:
        if len(_PHYSICS_KEYS) >= 1024:
            _PHYSICS_KEYS.clear()
        physics = _PHYSICS_KEYS[settings.physics] = repr((settings.physics.hardware,
                                                          asdict(settings.physics_options())))
    return row_key, physics, _SCHEDULER_KEYS[bool(phantom)]


#: physics settings -> their part of a replay key (``asdict`` of the options costs more than a replay look-up)
_PHYSICS_KEYS: dict = {}
_SCHEDULER_KEYS = {p: repr(asdict(SchedulerConfig(phantom_last_step=p))) for p in (False, True)}


def _times(rep: SyncReplay, overhead, key: tuple) -> RequestTimes:
    """``rep.run(overhead, phantom=False)``, cached by ``(key, overhead)`` (``key``: the replay's without the
    phantom step, so both replay modes share the times; an unhashable overhead model is not cached)."""
    try:
        times = _TIMES.get((key, overhead))
    except TypeError:
        return rep.run(overhead, phantom=False)
    if times is None:
        times = _TIMES[(key, overhead)] = rep.run(overhead, phantom=False)
        if len(_TIMES) > _MAX_TIMES:
            _TIMES.popitem(last=False)
    return times


def _summarise(times: RequestTimes, tpot_def: str, client_ms=0.0) -> dict:
    """Experiment means; ``client_ms`` (scalar or per request) is added to every TTFT and E2E."""
    extra_us = np.asarray(client_ms, dtype=np.float64) * 1e3
    ttft, e2e = times.ttft_us + extra_us, times.e2e_us + extra_us
    itl = tpot_ms(ttft, e2e, times.output_tokens, "itl")
    gl = tpot_ms(ttft, e2e, times.output_tokens, "guidellm")
    return {
        "ttft": float(np.mean(ttft)) / 1e3,
        "e2e": float(np.mean(e2e)) / 1e3,
        "tpot": itl if tpot_def == "itl" else gl,
        "tpot_itl": itl,
        "tpot_guidellm": gl,
        "overlapped": times.overlapped,
    }


def _check_frame(X) -> pd.DataFrame:
    if not isinstance(X, pd.DataFrame):
        raise TypeError("X must be an experiments DataFrame (calib.data.load_experiments), "
                        f"got {type(X).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in X.columns]
    if missing:
        raise DataError(f"experiments table lacks column(s) {', '.join(missing)}", field=missing[0])
    if len(X) == 0:
        raise ValueError("X has no experiments (0 rows)")
    return X


_WORKLOAD_COLS = ("n_requests", "seed", "prefix_tokens", "prompt_mean", "prompt_stdev", "prompt_min", "prompt_max",
                  "output_mean", "output_stdev", "output_min", "output_max")


def _lengths_file(row):
    """The reference-draws file of this experiment's dataset (None: the embedded draws)."""
    from calib.data.lengths import dataset_lengths_file

    source = row.get("source")
    return dataset_lengths_file(None if source is None else str(source), str(row["workload"]),
                                {c: row.get(c) for c in _WORKLOAD_COLS})


_KEY_COLS = ("model", "tp", "workload", "rate", "n_requests", "prefix_tokens", "prompt_mean", "prompt_stdev",
             "prompt_min", "prompt_max", "output_mean", "output_stdev", "output_min", "output_max", "source")
#: every column :func:`_row_key` reads (its own and :func:`_lengths_file`'s)
_ROW_KEY_READS = tuple(dict.fromkeys(_KEY_COLS + _WORKLOAD_COLS + ("workload",)))


def _row_key(row, lengths: str, seed: int) -> tuple:
    """What identifies an experiment row's replay: its workload and model columns, the lengths and seed, and
    (reference lengths) the identity of the draws file.  ``row`` is a Series or a dict of one row."""
    key = tuple(str(row.get(c)) for c in _KEY_COLS) + (lengths, int(seed))
    if lengths == "reference":  # the draws file's identity: an edited file is never replayed from a cache
        from calib.data.lengths import file_stamp

        file = _lengths_file(row)
        key += (None,) if file is None else (str(file), file_stamp(file))
    return key


def _row_keys(X: pd.DataFrame, lengths: str, seed: int) -> list[tuple]:
    """:func:`_row_key` of every row of ``X``, read column by column (a row Series per look-up costs more than
    the cached prediction it finds)."""
    columns = {c: X[c].tolist() for c in _ROW_KEY_READS if c in X.columns}
    return [_row_key({c: v[i] for c, v in columns.items()}, lengths, seed) for i in range(len(X))]


def _row_workload(row):
    """The experiment's own workload figures (its workload columns), or ``None`` when the row lacks one."""
    from calib.data.workloads import WORKLOAD_COLUMNS, Workload

    values = {c: row.get(c) for c in WORKLOAD_COLUMNS}
    if any(v is None or v != v for v in values.values()):  # missing or NaN
        return None
    values = {c: v.item() if isinstance(v, np.generic) else v for c, v in values.items()}  # numpy -> Python numbers
    source = row.get("source")
    return Workload.from_columns(str(row["workload"]), values, "" if source is None else str(source))


def _requests(row: pd.Series, lengths: str, seed: int) -> SyncRequests:
    from calib.data import load_workloads, quantile_lengths, reference_lengths, sample_lengths

    n = int(row["n_requests"])
    prefix = int(row["prefix_tokens"])
    if lengths == "reference":
        file = _lengths_file(row)
        arr = reference_lengths(str(row["workload"]), int(seed), path=file)
        if len(arr) < n:
            raise DataError(f"{len(arr)} reference draws for workload {row['workload']!r} at seed {seed}, the "
                            f"experiment has {n} requests", file=file or "configs/datasets/hg1/request_lengths.json",
                            field="lengths")
        arr = arr[:n]
    elif lengths in ("numpy", "quantiles"):
        wl = _row_workload(row) or load_workloads().get(str(row["workload"]))
        if wl is None:
            raise DataError(f"unknown workload {row['workload']!r} and no workload columns", field="workload")
        arr = (sample_lengths if lengths == "numpy" else quantile_lengths)(wl, n, int(seed))
    else:
        from calib.data import load_guidellm_run

        run = load_guidellm_run(str(row["source"]))
        req = run.requests
        arr = np.c_[np.maximum(req["prompt_tokens"].to_numpy() - prefix, 0), req["output_tokens"].to_numpy()]
    return SyncRequests.from_lengths(arr, float(row["rate"]), prefix)
