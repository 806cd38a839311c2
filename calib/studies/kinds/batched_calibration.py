"""Calibration on loaded runs (issue 6, item 4): TPE over overhead models, leave-one-model-out.

Under load the step batch varies from 1 to ``max_num_seqs``, so overhead terms
that depend on the batch (``batch_linear``), on prefill (``prefill_decode_split``)
or on TP (``per_layer_tp_power``) become identifiable.  For every overhead
model of the study file and every fold of a leave-one-model-out split of the
dense non-reasoning runs, Optuna's TPE sampler searches the model's
parameters on the runs of the other models; the best trial is then replayed
on the held-out model's runs (full traces).  Every dense run is held out
exactly once per overhead model, so the held-out errors of a model cover all
dense runs.

Search loss (per training run, then averaged over runs)::

    sum_k w_k * min(APE_k, cap) / sum_k w_k,   k in {ttft, tpot, e2e} (means)

with the weights and cap of the study file.  The cap keeps a saturated trial
(TTFT 100-1000x) from dominating.  During the search each run can be cut to
the first ``window_s`` seconds of every load stage
(:func:`calib.replay.batched.window_trace`); held-out evaluations always
replay full traces.

Determinism and resumption: trials live in the study's Optuna storage and are
run by :func:`calib.studies.search.tpe_search`, which seeds the TPE sampler of
each trial from the study's seed and the number of completed trials, so an
interrupted search resumes to the same trials as an uninterrupted one, and the
same study file gives the same results.  Each search's Optuna study name ends
with a hash of everything it depends on, so editing the study file starts new
searches instead of mixing old trials in.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import optuna
from pydantic import Field, field_validator, model_validator

from calib.errors import CalibError
from calib.physics.options import PhysicsOptions
from calib.physics.overhead import OVERHEAD_MODELS, make_overhead
from calib.replay.batched import APE_KEYS, ape_block
from calib.studies.context import RunContext
from calib.studies.search import tpe_search
from calib.studies.kinds.batched_validation import (Calibration, CalibrationSpec, LoadedData, RunData, _check_physics,
                                                    aggregate, describe_physics, evaluate_calibration,
                                                    group_summaries, load_runs, output_rule_text, physics_options,
                                                    replay, resolve_calibration, run_entry, settings_block, supports,
                                                    without_scatter)
from calib.studies.spec import Strict, StudyBase

KIND = "batched_calibration"

#: Loss of a trial whose parameters the model refuses (a CalibError).
PENALTY = 1e6

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


#: Searchable parameters that are neither physics nor overhead: the client-side latency of the loaded replay.
REPLAY_PARAMS = ("request_latency_ms",)


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


# ======================================================================================= TPE


def study_key(*parts: Any) -> str:
    """A short stable hash of what a search depends on (part of its Optuna study name)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def tpe(storage, name: str, space: Mapping[str, optuna.distributions.BaseDistribution],
        objective: Callable[[dict], tuple[float, dict]], *, n_trials: int, n_startup: int, seed: int,
        progress: bool = False, desc: str = "") -> list[dict]:
    """Minimise ``objective(params) -> (loss, attrs)`` with :func:`calib.studies.search.tpe_search`.

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
    return [{"index": i, "params": dict(t.params), "loss": float(t.value), "attrs": dict(t.user_attrs)}
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


def loaded_loss(runs: Sequence[RunData], options: PhysicsOptions, overhead, objective: Objective, hardware: str,
                window_s: float | None, request_latency_ms: float = 0.0) -> tuple[float, dict]:
    """Mean :meth:`Objective.run_loss` over ``runs`` (windowed replays), with per-run APEs as attributes."""
    losses, attrs = [], {}
    for rd in runs:
        rep = replay(rd, options, overhead, hardware, window_s=window_s, record_steps=False,
                     request_latency_ms=request_latency_ms)
        s = rep.summary()
        ape = ape_block(s["predicted"], s["measured"])["ape"]
        losses.append(objective.run_loss(ape))
        attrs[rd.name] = {k: (None if not math.isfinite(v) else round(float(v), 6)) for k, v in ape.items()}
    return float(np.mean(losses)), attrs


# ======================================================================================= schema


class SearchSettings(Strict):
    """TPE budget of one search (per fold)."""

    n_trials: int = Field(default=40, ge=1, le=2000)
    n_startup_trials: int = Field(default=12, ge=1)
    seed: int = Field(default=1, ge=0)
    window_s: float | None = Field(default=120.0, gt=0)


class OverheadCandidate(Strict):
    """An overhead model and its search ranges (default: the model's own ranges)."""

    name: str
    search: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _known(self) -> "OverheadCandidate":
        if self.name not in OVERHEAD_MODELS:
            raise ValueError(f"unknown overhead model {self.name!r}; known: {', '.join(OVERHEAD_MODELS)}")
        space = self.space()
        _, ovh, _ = split_params({k: 0.0 for k in space}, self.name)
        extra = sorted(set(space) - set(ovh) - set(REPLAY_PARAMS))
        if extra:
            raise ValueError(f"{extra[0]!r} is not a parameter of overhead model {self.name!r} (nor "
                             f"{', '.join(REPLAY_PARAMS)})")
        return self

    def space(self, extra: Mapping[str, Any] | None = None) -> dict:
        """The search space: ``search`` (default: the model's own ranges) plus ``extra`` (e.g. the request latency)."""
        raw = dict(self.search) if self.search is not None else {k: list(v) for k, v in
                                                                 OVERHEAD_MODELS[self.name].ranges.items()}
        for k, v in (extra or {}).items():
            raw.setdefault(k, v)
        return parse_space(raw, f"overhead_models.{self.name}.search")


class BatchedCalibrationSchema(StudyBase, LoadedData):
    kind: Literal["batched_calibration"]
    physics: dict[str, Any] = Field(default_factory=lambda: {"variant": "v2.3"})
    overhead_models: list[OverheadCandidate] = Field(min_length=1)
    search: SearchSettings = SearchSettings()
    objective: Objective = Objective()
    baseline: CalibrationSpec | None = None
    final_fit: bool = True
    extra_search: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra_search")
    @classmethod
    def _extra(cls, v: dict) -> dict:
        bad = sorted(set(v) - set(REPLAY_PARAMS))
        if bad:
            raise ValueError(f"{bad[0]!r} cannot be added to every search; allowed: {', '.join(REPLAY_PARAMS)}")
        parse_space(v, "extra_search")
        return v

    @field_validator("physics")
    @classmethod
    def _physics(cls, v: dict) -> dict:
        return _check_physics(v)

    @model_validator(mode="after")
    def _unique(self) -> "BatchedCalibrationSchema":
        names = [c.name for c in self.overhead_models]
        if len(set(names)) != len(names):
            raise ValueError("overhead models must be listed once each")
        return self


schema = BatchedCalibrationSchema


# ======================================================================================= folds


def model_folds(runs: Sequence[RunData]) -> list[tuple[str, list[RunData], list[RunData]]]:
    """Leave-one-model-out folds over the dense runs: ``[(held-out model, train runs, test runs)]``, by model name."""
    dense = [rd for rd in runs if rd.group == "dense"]
    models = sorted({rd.model for rd in dense})
    if len(models) < 2:
        raise CalibError("leave-one-model-out needs dense runs of at least two models", field="runs")
    return [(m, [rd for rd in dense if rd.model != m], [rd for rd in dense if rd.model == m]) for m in models]


def fold_label(model: str, train: Sequence[RunData]) -> str:
    fitted = sorted({rd.model for rd in train})
    return f"held out {model}; fitted on {len(train)} loaded runs of {', '.join(fitted)}"


def heldout_loss(entries: Sequence[dict], objective: Objective) -> float:
    """Mean :meth:`Objective.run_loss` over the held-out entries (full traces)."""
    vals = [objective.run_loss(e["ape"]) for e in entries if e.get("ape")]
    return float(np.mean(vals)) if vals else float("nan")


def worst_fold(folds: Sequence[dict], key: str = "heldout_loss") -> dict | None:
    """The fold with the highest held-out loss."""
    good = [f for f in folds if f.get(key) is not None and math.isfinite(f[key])]
    return max(good, key=lambda f: f[key]) if good else None


def fold_mapes(entries: Sequence[dict]) -> dict:
    ok = [e for e in entries if e.get("ape")]
    return {k: float(np.mean([e["ape"][k] for e in ok])) if ok else None for k in APE_KEYS}


def run_search(ctx: RunContext, label: str, key: str, train: Sequence[RunData], base_physics: dict, overhead_model: str,
               space: Mapping[str, Any], search: SearchSettings, objective: Objective, hardware: str
               ) -> tuple[list[dict], dict, PhysicsOptions, Any, float]:
    """One TPE search on ``train``; returns (trials, best, its physics options, overhead model, request latency)."""

    def evaluate(params: dict) -> tuple[float, dict]:
        phys, ovh, latency = split_params(params, overhead_model)
        options = physics_options({**base_physics, **phys})
        overhead = make_overhead(overhead_model, ovh)
        return loaded_loss(train, options, overhead, objective, hardware, search.window_s, latency)

    trials = tpe(ctx.storage, f"{label}-{key}", space, evaluate, n_trials=search.n_trials,
                 n_startup=search.n_startup_trials, seed=search.seed, progress=ctx.progress, desc=label)
    best = best_trial(trials)
    phys, ovh, latency = split_params(best["params"], overhead_model)
    return trials, best, physics_options({**base_physics, **phys}), make_overhead(overhead_model, ovh), latency


def cross_validate(ctx: RunContext, name: str, runs: Sequence[RunData], base_physics: dict, overhead_model: str,
                   space: Mapping[str, Any], search: SearchSettings, objective: Objective, hardware: str,
                   scatter_points: int, spec_key: str) -> dict:
    """Leave-one-model-out over the dense runs: per fold a TPE search and held-out full-trace replays."""
    folds, entries = [], []
    variant = physics_options(base_physics).variant
    for model, train, test in model_folds(runs):
        ok, why = supports(model, variant)
        label = fold_label(model, train)
        trials, best, options, overhead, latency = run_search(ctx, f"{name}-{model}", spec_key, train, base_physics,
                                                               overhead_model, space, search, objective, hardware)
        fold_entries = []
        for rd in test:
            if not ok:
                fold_entries.append(run_entry(rd, None, label, True, note=f"unsupported: {why}", fold=model))
                continue
            rep = replay(rd, options, overhead, hardware, request_latency_ms=latency)
            fold_entries.append(run_entry(rd, rep, label, True, scatter_points=scatter_points, fold=model))
        entries += fold_entries
        folds.append({
            "heldout_model": model, "train_runs": [rd.name for rd in train], "test_runs": [rd.name for rd in test],
            "best_params": best["params"], "best_trial": best["index"], "train_loss": best["loss"],
            "train_ape_windowed": best["attrs"], "physics": describe_physics(options),
            "overhead_model": overhead.name, "overhead_params": overhead.params, "request_latency_ms": latency,
            "heldout_loss": heldout_loss(fold_entries, objective), "heldout_mape": fold_mapes(fold_entries),
            "trials": [{"index": t["index"], "loss": t["loss"], "params": t["params"]} for t in trials],
        })
    return {"folds": folds, "runs": entries, "overall": aggregate(entries),
            "heldout_loss": heldout_loss(entries, objective), "worst_fold": _worst(folds)}


def _worst(folds: Sequence[dict]) -> dict | None:
    w = worst_fold(folds)
    return None if w is None else {"heldout_model": w["heldout_model"], "heldout_loss": w["heldout_loss"],
                                   "heldout_mape": w["heldout_mape"]}


def final_fit(ctx: RunContext, name: str, runs: Sequence[RunData], base_physics: dict, overhead_model: str,
              space: Mapping[str, Any], search: SearchSettings, objective: Objective, hardware: str,
              scatter_points: int, spec_key: str) -> dict:
    """Fit on every dense run; replay the runs no fold held out (MoE, overloaded) with it."""
    dense = [rd for rd in runs if rd.group == "dense"]
    trials, best, options, overhead, latency = run_search(ctx, f"{name}-all-dense", spec_key, dense, base_physics,
                                                           overhead_model, space, search, objective, hardware)
    label = f"fit on all {len(dense)} dense runs"
    cal = Calibration(label, options, overhead, "TPE on the dense loaded runs", f"all {len(dense)} dense loaded runs",
                      request_latency_ms=latency)
    others = [rd for rd in runs if rd.group != "dense"]
    entries = evaluate_calibration(cal, others, _Spec(hardware, scatter_points))
    return {"physics": describe_physics(options), "overhead_model": overhead.name, "overhead_params": overhead.params,
            "request_latency_ms": latency, "best_trial": best["index"], "train_loss": best["loss"],
            "text": cal.summary_text(), "runs": without_scatter(entries), "groups": group_summaries(entries)}


class _Spec:
    """The two LoadedData fields :func:`evaluate_calibration` reads."""

    def __init__(self, hardware: str, scatter_points: int):
        self.hardware, self.scatter_points = hardware, scatter_points


def baseline_entries(spec_baseline: CalibrationSpec | None, runs: Sequence[RunData], hardware: str,
                     scatter_points: int, ctx: RunContext) -> dict | None:
    """The synchronous-only calibration on the same runs (held out by construction)."""
    if spec_baseline is None:
        return None
    cal = resolve_calibration(spec_baseline, ctx)
    entries = evaluate_calibration(cal, runs, _Spec(hardware, scatter_points))
    return {"calibration": cal.describe(), "text": cal.summary_text(), "runs": without_scatter(entries),
            "groups": group_summaries(entries)}


# ======================================================================================= run


def run(spec: BatchedCalibrationSchema, ctx: RunContext) -> dict:
    runs = load_runs(spec, ctx.study_file)
    base = dict(spec.physics)
    models = {}
    for cand in spec.overhead_models:
        space = cand.space(spec.extra_search)
        key = study_key(base, cand.name, {k: repr(v) for k, v in space.items()}, spec.search.model_dump(),
                        spec.objective.model_dump(), [rd.name for rd in runs], spec.output_rule, spec.prefix,
                        spec.cached_prefill_pi)
        cv = cross_validate(ctx, f"{spec.name}-{cand.name}", runs, base, cand.name, space, spec.search,
                            spec.objective, spec.hardware, spec.scatter_points, key)
        cv["search_space"] = {k: _space_text(v) for k, v in space.items()}
        models[cand.name] = cv
    ranking = sorted(models, key=lambda m: (models[m]["heldout_loss"], m))
    best = ranking[0]
    final = None
    if spec.final_fit:
        cand = next(c for c in spec.overhead_models if c.name == best)
        space = cand.space(spec.extra_search)
        key = study_key(base, cand.name, {k: repr(v) for k, v in space.items()}, spec.search.model_dump(),
                        spec.objective.model_dump(), [rd.name for rd in runs], spec.output_rule, spec.prefix,
                        spec.cached_prefill_pi, "all")
        final = final_fit(ctx, f"{spec.name}-{best}", runs, base, best, space, spec.search, spec.objective,
                          spec.hardware, spec.scatter_points, key)
    dense = [rd for rd in runs if rd.group == "dense"]
    baseline = baseline_entries(spec.baseline, dense, spec.hardware, spec.scatter_points, ctx)
    if baseline is not None:
        baseline["heldout_loss"] = heldout_loss(baseline["runs"], spec.objective)
    return {
        "study": spec.name,
        "kind": KIND,
        "description": spec.description,
        "physics": describe_physics(physics_options(base)),
        "best_model": best,
        "ranking": [{"overhead_model": m, "heldout_loss": models[m]["heldout_loss"],
                     "heldout_mape": models[m]["overall"].get("mape"),
                     "heldout_mape_without_runaway": models[m]["overall"].get("mape_without_runaway"),
                     "worst_fold": models[m]["worst_fold"],
                     "runaway_runs": models[m]["overall"].get("runaway_runs", [])} for m in ranking],
        "runs": models[best]["runs"],
        "overall": models[best]["overall"],
        "models": {m: {**v, "runs": without_scatter(v["runs"])} for m, v in models.items()},
        "final_fit": final,
        "baseline": baseline,
        "output_rule": output_rule_text(runs),
        "settings": settings_block(spec, ctx, runs) | {
            "cv": "leave-one-model-out over the dense non-reasoning runs",
            "search": spec.search.model_dump() | {"sampler": "optuna TPESampler(multivariate=True), trial i seeded "
                                                  "with seed + i"},
            "objective": spec.objective.model_dump(),
            "storage": ctx.storage_label,
            "physics": base,
            "overhead_models": [c.model_dump(exclude_none=True) for c in spec.overhead_models],
            "baseline": spec.baseline.model_dump(exclude_none=True) if spec.baseline else None,
            "extra_search": spec.extra_search,
        },
    }


def _space_text(d) -> str:
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return " | ".join(str(c) for c in d.choices)
    return f"[{d.low:g}, {d.high:g}]" + (" log" if d.log else "")
