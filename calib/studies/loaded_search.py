"""TPE searches on loaded runs, leave-one-model-out (shared by the ``batched_calibration`` and ``physics`` kinds).

For one overhead model (and, for ``physics``, a set of physics constants and
switches) and every fold of a leave-one-model-out split of the dense
non-reasoning runs, Optuna's TPE sampler searches the parameters on the runs
of the other models (:func:`run_search`); the best trial is then replayed on
the held-out model's runs, full traces (:func:`cross_validate`).
:func:`final_fit` fits on every dense run and replays the others.

Search loss (per training run, then averaged over runs)::

    sum_k w_k * min(APE_k, cap) / sum_k w_k,   k in {ttft, tpot, e2e} (means)

(:class:`Objective`).  The cap keeps a saturated trial (TTFT 100-1000x) from
dominating.  During the search each run can be cut to the first ``window_s``
seconds of every load stage (:func:`calib.replay.batched.window_trace`);
held-out evaluations always replay full traces.

Determinism and resumption: trials live in the study's Optuna storage and are
run by :func:`calib.calibrate.trials.tpe_search`, which seeds the TPE sampler
of each trial from the study's seed and the number of completed trials.  Each
search's Optuna study name ends with :func:`study_key`, a hash of everything
it depends on.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import optuna
from pydantic import Field, field_validator

from calib.calibrate.trials import objective_attrs, tpe_search
from calib.errors import CalibError
from calib.metrics import APE_KEYS, ape_block
from calib.physics.overhead import OVERHEAD_MODELS
from calib.replay.loaded import LoadedRun, describe_physics, replay_run, supports
from calib.settings import Settings
from calib.studies.context import RunContext
from calib.studies.loaded_calibrations import Calibration, evaluate_calibration
from calib.studies.loaded_data import (aggregate, group_summaries, physics_settings, run_entry, without_scatter)
from calib.studies.spec import Strict

__all__ = ["PENALTY", "REPLAY_PARAMS", "parse_space", "space_text", "split_params", "search_settings", "study_key",
           "tpe", "best_trial", "Objective", "SearchSettings", "loaded_loss", "model_folds", "heldout_loss",
           "run_search", "cross_validate", "final_fit"]

#: Loss of a trial whose parameters the model refuses (a CalibError).
PENALTY = 1e6
#: Searchable parameters that are neither physics nor overhead: the client-side latency of the loaded replay.
REPLAY_PARAMS = ("request_latency_ms",)


# ======================================================================================= search space


def parse_space(space: Mapping[str, Any], field: str = "search") -> dict[str, optuna.distributions.BaseDistribution]:
    """Study-file search space -> Optuna distributions.

    ``[low, high]`` (numbers) is a uniform float range, ``{low, high, log}`` a
    float range (log-uniform when ``log``), a list of strings or booleans a
    categorical choice.

    Examples
    --------
    >>> d = parse_space({"a_us": [0, 10], "mfu_rule": ["nearest", "interp"]})
    >>> type(d["a_us"]).__name__, d["mfu_rule"].choices
    ('FloatDistribution', ('nearest', 'interp'))
    """
    out = {}
    for name, spec in space.items():
        if isinstance(spec, Mapping):
            low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
        elif (isinstance(spec, (list, tuple)) and len(spec) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)):
            low, high, log = spec[0], spec[1], False
        elif isinstance(spec, (list, tuple)) and spec and all(isinstance(v, (str, bool)) for v in spec):
            out[name] = optuna.distributions.CategoricalDistribution(list(spec))
            continue
        else:
            raise ValueError(f"{field}.{name}: give [low, high], {{low, high, log}} or a list of choices")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or high <= low:
            raise ValueError(f"{field}.{name}: needs numbers low < high")
        if log and low <= 0:
            raise ValueError(f"{field}.{name}: a log range needs low > 0")
        out[name] = optuna.distributions.FloatDistribution(float(low), float(high), log=log)
    return out


def space_text(d: optuna.distributions.BaseDistribution) -> str:
    """A distribution in words: ``[0, 300]``, ``[0.1, 10] log`` or ``a | b``."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return " | ".join(str(c) for c in d.choices)
    return f"[{d.low:g}, {d.high:g}]" + (" log" if d.log else "")


def split_params(params: Mapping[str, Any], overhead_model: str) -> tuple[dict, dict, float]:
    """Trial parameters -> ``(physics overrides, overhead parameters, request_latency_ms)``.

    >>> split_params({"per_layer_us": 50, "gemm_mfu_scale": 1.5, "request_latency_ms": 4}, "per_layer")
    ({'gemm_mfu_scale': 1.5}, {'per_layer_us': 50.0}, 4.0)
    """
    from dataclasses import fields

    names = {f.name for f in fields(OVERHEAD_MODELS[overhead_model])}
    ovh = {k: float(v) for k, v in params.items() if k in names}
    phys = {k: v for k, v in params.items() if k not in names and k not in REPLAY_PARAMS}
    return phys, ovh, float(params.get("request_latency_ms", 0.0))


def search_settings(base_physics: Mapping[str, Any], overhead_model: str, params: Mapping[str, Any],
                    hardware: str) -> Settings:
    """The settings of one trial: the fixed physics, the trial's parameters, the overhead model, the hardware."""
    phys, ovh, latency = split_params(params, overhead_model)
    return physics_settings({**base_physics, **phys}, hardware=hardware, overhead_model=overhead_model,
                            overhead_params=ovh, request_latency_ms=latency)


# ======================================================================================= TPE


def study_key(*parts: Any) -> str:
    """A short stable hash of what a search depends on (part of its Optuna study name)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def tpe(storage, name: str, space: Mapping[str, optuna.distributions.BaseDistribution],
        objective: Callable[[dict], tuple[float, dict]], *, n_trials: int, n_startup: int, seed: int,
        progress: bool = False, desc: str = "") -> list[dict]:
    """Minimise ``objective(params) -> (loss, attrs)`` with :func:`calib.calibrate.trials.tpe_search`.

    Resumable and deterministic (that function seeds the sampler of each
    trial from ``seed`` and the number of completed trials).  A
    :class:`~calib.errors.CalibError` raised by the objective, or a non-finite
    loss, scores :data:`PENALTY` (recorded in ``attrs["error"]``), so a
    parameter set the model refuses is a bad trial, not a crash.

    Returns
    -------
    list of dict
        The completed trials in order: ``[{"index", "params", "loss", "attrs"}]``.
    """
    def wrapped(params: dict) -> tuple[float, dict]:
        try:
            loss, attrs = objective(dict(params))
        except CalibError as exc:
            return PENALTY, {"error": str(exc)}
        if not math.isfinite(loss):
            return PENALTY, {**attrs, "error": f"non-finite loss {loss!r}"}
        return float(loss), attrs

    trials = tpe_search(name, storage, dict(space), wrapped, n_trials, seed, progress=progress, desc=desc or name,
                        sampler_options={"n_startup_trials": n_startup, "multivariate": True})
    return [{"index": i, "params": dict(t.params), "loss": float(t.value), "attrs": objective_attrs(t)}
            for i, t in enumerate(trials)]


def best_trial(trials: Sequence[dict]) -> dict:
    """Lowest loss; ties go to the earlier trial."""
    return min(trials, key=lambda t: (t["loss"], t["index"]))


# ======================================================================================= loss


class Objective(Strict):
    """Search loss: weighted, capped mean APEs of the TTFT, TPOT and E2E means of each training run."""

    weights: dict[Literal["ttft", "tpot", "e2e"], float] = Field(
        default_factory=lambda: {"tpot": 1.0, "e2e": 1.0, "ttft": 0.5})
    cap: float = Field(default=2.0, gt=0)

    @field_validator("weights")
    @classmethod
    def _positive(cls, v: dict) -> dict:
        if not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return v

    def run_loss(self, ape: Mapping[str, float]) -> float:
        """Loss of one run from its APE block (keys ``ttft_mean_ms``, ...)."""
        total = 0.0
        for k, w in self.weights.items():
            a = ape.get(f"{k}_mean_ms")
            a = self.cap if a is None or not math.isfinite(a) else min(a, self.cap)
            total += w * a
        return total / sum(self.weights.values())


def loaded_loss(runs: Sequence[LoadedRun], settings: Settings, objective: Objective, window_s: float | None
                ) -> tuple[float, dict]:
    """Mean :meth:`Objective.run_loss` over ``runs`` (windowed replays; each run weighs 1), with per-run APEs
    as attributes."""
    losses, attrs = [], {}
    for rd in runs:
        rep = replay_run(rd, settings, window_s=window_s, record_steps=False)
        s = rep.summary()
        ape = ape_block(s["predicted"], s["measured"])["ape"]
        losses.append(objective.run_loss(ape))
        attrs[rd.name] = {k: (None if not math.isfinite(v) else round(float(v), 6)) for k, v in ape.items()}
    return float(np.mean(losses)), attrs


class SearchSettings(Strict):
    """TPE budget of one search (per fold)."""

    n_trials: int = Field(default=40, ge=1, le=2000)
    n_startup_trials: int = Field(default=12, ge=1)
    seed: int = Field(default=1, ge=0)
    window_s: float | None = Field(default=120.0, gt=0)


# ======================================================================================= folds


def model_folds(runs: Sequence[LoadedRun]) -> list[tuple[str, list[LoadedRun], list[LoadedRun]]]:
    """Leave-one-model-out folds over the dense runs: ``[(held-out model, train runs, test runs)]``, by model name."""
    dense = [rd for rd in runs if rd.group == "dense"]
    models = sorted({rd.model for rd in dense})
    if len(models) < 2:
        raise CalibError("leave-one-model-out needs dense runs of at least two models", field="runs")
    return [(m, [rd for rd in dense if rd.model != m], [rd for rd in dense if rd.model == m]) for m in models]


def fold_label(model: str, train: Sequence[LoadedRun]) -> str:
    fitted = sorted({rd.model for rd in train})
    return f"held out {model}; fitted on {len(train)} loaded runs of {', '.join(fitted)}"


def heldout_loss(entries: Sequence[dict], objective: Objective) -> float:
    """Mean :meth:`Objective.run_loss` over the held-out entries (full traces; each run weighs 1)."""
    vals = [objective.run_loss(e["ape"]) for e in entries if e.get("ape")]
    return float(np.mean(vals)) if vals else float("nan")


def worst_fold(folds: Sequence[dict], key: str = "heldout_loss") -> dict | None:
    """The fold with the highest held-out loss."""
    good = [f for f in folds if f.get(key) is not None and math.isfinite(f[key])]
    return max(good, key=lambda f: f[key]) if good else None


def fold_mapes(entries: Sequence[dict]) -> dict:
    """Mean APE per headline key over the replayed entries of a fold (each run weighs 1)."""
    ok = [e for e in entries if e.get("ape")]
    return {k: float(np.mean([e["ape"][k] for e in ok])) if ok else None for k in APE_KEYS}


def run_search(ctx: RunContext, label: str, key: str, train: Sequence[LoadedRun], base_physics: dict,
               overhead_model: str, space: Mapping[str, Any], search: SearchSettings, objective: Objective,
               hardware: str) -> tuple[list[dict], dict, Settings]:
    """One TPE search on ``train``; returns (trials, best trial, its settings)."""

    def evaluate(params: dict) -> tuple[float, dict]:
        settings = search_settings(base_physics, overhead_model, params, hardware)
        return loaded_loss(train, settings, objective, search.window_s)

    trials = tpe(ctx.storage, f"{label}-{key}", space, evaluate, n_trials=search.n_trials,
                 n_startup=search.n_startup_trials, seed=search.seed, progress=ctx.progress, desc=label)
    best = best_trial(trials)
    return trials, best, search_settings(base_physics, overhead_model, best["params"], hardware)


def _fitted(settings: Settings) -> dict:
    """The fitted physics, overhead and request latency of a search, as results record them."""
    overhead = settings.overhead_model()
    return {"physics": describe_physics(settings.physics_options()), "overhead_model": overhead.name,
            "overhead_params": overhead.params, "request_latency_ms": settings.replay.request_latency_ms}


def cross_validate(ctx: RunContext, name: str, runs: Sequence[LoadedRun], base_physics: dict, overhead_model: str,
                   space: Mapping[str, Any], search: SearchSettings, objective: Objective, hardware: str,
                   scatter_points: int, spec_key: str) -> dict:
    """Leave-one-model-out over the dense runs: per fold a TPE search and held-out full-trace replays."""
    folds, entries = [], []
    variant = physics_settings(base_physics).physics.variant
    for model, train, test in model_folds(runs):
        ok, why = supports(model, variant)
        label = fold_label(model, train)
        trials, best, settings = run_search(ctx, f"{name}-{model}", spec_key, train, base_physics, overhead_model,
                                            space, search, objective, hardware)
        fold_entries = []
        for rd in test:
            if not ok:
                fold_entries.append(run_entry(rd, None, label, True, note=f"unsupported: {why}", fold=model))
                continue
            rep = replay_run(rd, settings)
            fold_entries.append(run_entry(rd, rep, label, True, scatter_points=scatter_points, fold=model))
        entries += fold_entries
        fitted = _fitted(settings)
        folds.append({
            "heldout_model": model, "train_runs": [rd.name for rd in train], "test_runs": [rd.name for rd in test],
            "best_params": best["params"], "best_trial": best["index"], "train_loss": best["loss"],
            "train_ape_windowed": best["attrs"], "physics": fitted["physics"],
            "overhead_model": fitted["overhead_model"], "overhead_params": fitted["overhead_params"],
            "request_latency_ms": fitted["request_latency_ms"],
            "heldout_loss": heldout_loss(fold_entries, objective), "heldout_mape": fold_mapes(fold_entries),
            "trials": [{"index": t["index"], "loss": t["loss"], "params": t["params"]} for t in trials],
        })
    return {"folds": folds, "runs": entries, "overall": aggregate(entries),
            "heldout_loss": heldout_loss(entries, objective), "worst_fold": _worst(folds)}


def _worst(folds: Sequence[dict]) -> dict | None:
    w = worst_fold(folds)
    return None if w is None else {"heldout_model": w["heldout_model"], "heldout_loss": w["heldout_loss"],
                                   "heldout_mape": w["heldout_mape"]}


def final_fit(ctx: RunContext, name: str, runs: Sequence[LoadedRun], base_physics: dict, overhead_model: str,
              space: Mapping[str, Any], search: SearchSettings, objective: Objective, hardware: str,
              scatter_points: int, spec_key: str) -> dict:
    """Fit on every dense run; replay the runs no fold held out (MoE, overloaded) with it."""
    dense = [rd for rd in runs if rd.group == "dense"]
    trials, best, settings = run_search(ctx, f"{name}-all-dense", spec_key, dense, base_physics, overhead_model,
                                        space, search, objective, hardware)
    label = f"fit on all {len(dense)} dense runs"
    cal = Calibration(label, settings, "TPE on the dense loaded runs", f"all {len(dense)} dense loaded runs")
    others = [rd for rd in runs if rd.group != "dense"]
    entries = evaluate_calibration(cal, others, scatter_points=scatter_points)
    return {**_fitted(settings), "best_trial": best["index"], "train_loss": best["loss"],
            "text": cal.summary_text(), "runs": without_scatter(entries), "groups": group_summaries(entries)}
