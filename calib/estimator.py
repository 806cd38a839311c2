"""``RooflineRegressor``: the roofline step model + synchronous replay as a scikit-learn estimator.

``X`` is an experiments DataFrame (:func:`calib.data.load_experiments`), one
row per experiment; ``y`` is the measured mean of ``target`` (ms).  The
overhead and the physics constants are hyperparameters, so ``fit`` only
validates; ``predict`` replays each experiment and returns its predicted mean.

Replays are cached across estimator instances (and so across ``clone``,
``GridSearchCV`` and Optuna trials): the solo-step hardware times of an
experiment depend only on the physics, so a new overhead value reuses them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.metrics import mean_absolute_percentage_error

from calib.errors import CalibError, DataError
from calib.metrics import TPOT_DEFINITIONS, tpot_ms
from calib.physics.options import PhysicsOptions
from calib.physics.overhead import OVERHEAD_MODELS, OverheadModel, make_overhead
from calib.physics.step_model import StepModel
from calib.replay.engine import SchedulerConfig
from calib.replay.synchronous import RequestTimes, SyncReplay, SyncRequests

__all__ = ["RooflineRegressor", "TARGETS", "MODES", "REQUIRED_COLUMNS", "clear_cache"]

TARGETS = ("tpot", "ttft", "e2e")
MODES = ("reference", "corrected")
LENGTH_SOURCES = ("reference", "numpy", "run")
REQUIRED_COLUMNS = ("model", "tp", "workload", "rate", "n_requests", "prefix_tokens")

_REPLAYS: "OrderedDict[tuple, SyncReplay]" = OrderedDict()
_MAX_REPLAYS = 2048


def clear_cache() -> None:
    """Forget every cached replay."""
    _REPLAYS.clear()


class RooflineRegressor(RegressorMixin, BaseEstimator):
    """Predict experiment-mean latency from the roofline step model.

    Parameters
    ----------
    per_layer_overhead_us : float, default 100
        ``perLayerOverhead`` (µs per layer per step, applied ``x L / TP``);
        the parameter of the ``per_layer`` overhead model.
    bw_efficiency : float, default 0.82
        Sustained / peak HBM bandwidth, in (0, 1].
    mfu_rule : {"nearest", "interp"} or None
        MFU lookup rule; ``None`` takes the variant's (v2.3: nearest, v2.4: interp).
    variant : {"v2.3", "v2.4", "v3"}, default "v2.3"
    target : {"tpot", "ttft", "e2e"}, default "tpot"
        What ``predict`` returns and ``score`` scores.
    mode : {"reference", "corrected"}, default "reference"
        ``reference`` replays as the HG1 study did (phantom last step, predicted
        TPOT = mean ITL compared with GuideLLM's TPOT); ``corrected`` drops the
        phantom step and predicts GuideLLM's TPOT quantity (spec §10.6).
    lengths : {"reference", "numpy", "run"}, default "reference"
        Request lengths: the reference draws of ``seed``, a NumPy sample, or a
        GuideLLM run's actual requests (rows loaded from a run).
    seed : int, default 42
    hardware : str, default "h100"
    overhead_model : str, default "per_layer"
        One of :data:`calib.physics.overhead.OVERHEAD_MODELS`.
    overhead_params : dict, optional
        Parameters of a non-default overhead model.
    gemm_weight_floor, decode_attention, prefill_attention, mixed_rule : optional
        Physics switches (``None``: the variant's default).
    gemm_mfu_scale, prefill_attention_mfu_scale, decode_attention_mfu_scale : float, default 1
    mfu_floor : float, default 0
    mfu_prefill, mfu_decode : float, default 0.45, 0.30
        Constant MFUs of the v3 roofline.
    phantom_last_step : bool, optional
        Override of the mode's choice.
    tpot_definition : {"itl", "guidellm"}, optional
        Override of the mode's choice.

    Attributes
    ----------
    experiments_ : list of str
        Experiments seen by ``fit``.
    n_features_in_ : int
        Columns of the ``X`` given to ``fit``.

    Examples
    --------
    >>> from calib.data import load_experiments
    >>> X = load_experiments()
    >>> est = RooflineRegressor(per_layer_overhead_us=60).fit(X, X.tpot_mean_ms)
    >>> pred = est.predict(X)
    >>> len(pred), bool((pred > 0).all())
    (13, True)
    """

    def __init__(self, per_layer_overhead_us=100.0, bw_efficiency=0.82, mfu_rule=None, variant="v2.3",
                 target="tpot", mode="reference", lengths="reference", seed=42, hardware="h100",
                 overhead_model="per_layer", overhead_params=None, gemm_weight_floor=None, decode_attention=None,
                 prefill_attention=None, mixed_rule=None, gemm_mfu_scale=1.0, prefill_attention_mfu_scale=1.0,
                 decode_attention_mfu_scale=1.0, mfu_floor=0.0, mfu_prefill=0.45, mfu_decode=0.30,
                 phantom_last_step=None, tpot_definition=None):
        self.per_layer_overhead_us = per_layer_overhead_us
        self.bw_efficiency = bw_efficiency
        self.mfu_rule = mfu_rule
        self.variant = variant
        self.target = target
        self.mode = mode
        self.lengths = lengths
        self.seed = seed
        self.hardware = hardware
        self.overhead_model = overhead_model
        self.overhead_params = overhead_params
        self.gemm_weight_floor = gemm_weight_floor
        self.decode_attention = decode_attention
        self.prefill_attention = prefill_attention
        self.mixed_rule = mixed_rule
        self.gemm_mfu_scale = gemm_mfu_scale
        self.prefill_attention_mfu_scale = prefill_attention_mfu_scale
        self.decode_attention_mfu_scale = decode_attention_mfu_scale
        self.mfu_floor = mfu_floor
        self.mfu_prefill = mfu_prefill
        self.mfu_decode = mfu_decode
        self.phantom_last_step = phantom_last_step
        self.tpot_definition = tpot_definition

    # ---- validated views of the hyperparameters ---------------------------------
    def physics_options(self) -> PhysicsOptions:
        """The :class:`PhysicsOptions` these hyperparameters describe (validated)."""
        bw = self.bw_efficiency
        if self.variant == "v3" and bw == 0.82:
            bw = None  # v3 uses raw peak bandwidth unless told otherwise
        return PhysicsOptions.for_variant(
            self.variant, mfu_rule=self.mfu_rule, bw_efficiency=bw, gemm_weight_floor=self.gemm_weight_floor,
            decode_attention=self.decode_attention, prefill_attention=self.prefill_attention,
            mixed_rule=self.mixed_rule, gemm_mfu_scale=self.gemm_mfu_scale,
            prefill_attention_mfu_scale=self.prefill_attention_mfu_scale,
            decode_attention_mfu_scale=self.decode_attention_mfu_scale, mfu_floor=self.mfu_floor,
            mfu_prefill=self.mfu_prefill, mfu_decode=self.mfu_decode)

    def overhead(self) -> OverheadModel:
        """The overhead model these hyperparameters describe."""
        if self.overhead_model not in OVERHEAD_MODELS:
            raise CalibError(f"unknown overhead model {self.overhead_model!r}; known: {', '.join(OVERHEAD_MODELS)}",
                             field="overhead_model")
        params = dict(self.overhead_params or {})
        if self.overhead_model == "per_layer":
            params.setdefault("per_layer_us", self.per_layer_overhead_us)
        return make_overhead(self.overhead_model, params)

    def _check_choices(self) -> None:
        for name, allowed in (("target", TARGETS), ("mode", MODES), ("lengths", LENGTH_SOURCES)):
            if getattr(self, name) not in allowed:
                raise CalibError(f"unknown value {getattr(self, name)!r}; choose one of {', '.join(allowed)}",
                                 field=name)
        if self.tpot_definition is not None and self.tpot_definition not in TPOT_DEFINITIONS:
            raise CalibError(f"choose one of {', '.join(TPOT_DEFINITIONS)}", field="tpot_definition")
        value = self.per_layer_overhead_us
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            raise CalibError(f"must be a finite number, got {value!r}", field="per_layer_overhead_us")

    @property
    def _phantom(self) -> bool:
        return self.mode == "reference" if self.phantom_last_step is None else bool(self.phantom_last_step)

    @property
    def _tpot_def(self) -> str:
        return self.tpot_definition or ("itl" if self.mode == "reference" else "guidellm")

    # ---- scikit-learn API ------------------------------------------------------------
    def fit(self, X, y=None):
        """Validate ``X`` (experiments) and ``y`` (measured target, ms); nothing is learned."""
        self._check_choices()
        self.physics_options()
        self.overhead()
        X = _check_frame(X)
        if y is not None:
            y = np.asarray(y, dtype=float)
            if y.shape != (len(X),):
                raise ValueError(f"y has shape {y.shape}, expected ({len(X)},)")
            if not np.all(np.isfinite(y)) or np.any(y <= 0):
                raise ValueError("y must hold finite, positive measured means (ms)")
        self.experiments_ = [str(i) for i in X.index]
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        """Predicted experiment means of ``target`` (ms), one per row of ``X``."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "experiments_")
        return self.predict_all(X)[self.target].to_numpy()

    def score(self, X, y, sample_weight=None) -> float:
        """Negative mean absolute percentage error (a fraction; higher is better)."""
        return -mean_absolute_percentage_error(y, self.predict(X), sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.target_tags.required = True
        tags.target_tags.positive_only = True
        tags.non_deterministic = False
        return tags

    # ---- everything at once ------------------------------------------------------------
    def predict_all(self, X) -> pd.DataFrame:
        """Predicted ``ttft``, ``tpot``, ``e2e`` (ms) per experiment, plus ``tpot_itl``, ``tpot_guidellm``
        and the number of requests replayed overlapping (``overlapped``)."""
        self._check_choices()
        X = _check_frame(X)
        options = self.physics_options()
        overhead = self.overhead()
        rows = []
        for name, row in X.iterrows():
            times = self.replay(row, options).run(overhead)
            rows.append(_summarise(times, self._tpot_def, name))
        return pd.DataFrame(rows, index=X.index)

    def replay(self, row: pd.Series, options: PhysicsOptions | None = None) -> SyncReplay:
        """The cached :class:`SyncReplay` of one experiment row under these physics settings."""
        options = options or self.physics_options()
        sched = SchedulerConfig(phantom_last_step=self._phantom)
        key = (_row_key(row, self.lengths, self.seed), self.hardware, asdict(options), asdict(sched).items())
        key = repr(key)
        rep = _REPLAYS.get(key)
        if rep is None:
            try:
                sm = StepModel.build(str(row["model"]), int(row["tp"]), hardware=self.hardware, options=options)
            except CalibError as exc:
                if exc.file is None and row.get("source") is not None:  # name the experiments file
                    raise type(exc)(f"experiment {row.name!r}: {exc.message}", file=str(row["source"]),
                                    field=exc.field) from None
                raise
            requests = _requests(row, self.lengths, self.seed)
            rep = SyncReplay(sm, requests, sched)
            _REPLAYS[key] = rep
            if len(_REPLAYS) > _MAX_REPLAYS:
                _REPLAYS.popitem(last=False)
        else:
            _REPLAYS.move_to_end(key)
        return rep


def _summarise(times: RequestTimes, tpot_def: str, name) -> dict:
    itl = tpot_ms(times.ttft_us, times.e2e_us, times.output_tokens, "itl")
    gl = tpot_ms(times.ttft_us, times.e2e_us, times.output_tokens, "guidellm")
    return {
        "ttft": float(np.mean(times.ttft_us)) / 1e3,
        "e2e": float(np.mean(times.e2e_us)) / 1e3,
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


def _row_key(row: pd.Series, lengths: str, seed: int) -> tuple:
    cols = ("model", "tp", "workload", "rate", "n_requests", "prefix_tokens", "prompt_mean", "prompt_stdev",
            "prompt_min", "prompt_max", "output_mean", "output_stdev", "output_min", "output_max", "source")
    return tuple(str(row.get(c)) for c in cols) + (lengths, int(seed))


def _requests(row: pd.Series, lengths: str, seed: int) -> SyncRequests:
    from calib.data import load_workloads, reference_lengths, sample_lengths
    from calib.data.workloads import Workload

    n = int(row["n_requests"])
    prefix = int(row["prefix_tokens"])
    if lengths == "reference":
        arr = reference_lengths(str(row["workload"]), int(seed))[:n]
    elif lengths == "numpy":
        workloads = load_workloads()
        wl = workloads.get(str(row["workload"]))
        if wl is None:
            raise DataError(f"unknown workload {row['workload']!r}", field="workload")
        arr = sample_lengths(wl, n, int(seed))
    else:
        from calib.data import load_guidellm_run

        run = load_guidellm_run(str(row["source"]))
        req = run.requests
        arr = np.c_[np.maximum(req["prompt_tokens"].to_numpy() - prefix, 0), req["output_tokens"].to_numpy()]
    _ = Workload  # noqa: F841  (type reference for readers)
    return SyncRequests.from_lengths(arr, float(row["rate"]), prefix)
