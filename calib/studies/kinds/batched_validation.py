"""Loaded-server validation: does a calibration made at concurrency 1 predict a busy vLLM? (issue 6, item 3)

Each calibration of the study file (the HG1 optimum, a fixed per-layer
overhead, the best overhead model of the generalization studies, a
synchronous fit of another roofline variant, ...) is resolved to a step model
and an overhead model *without looking at the loaded runs*, and every run of
``data/batched/`` is replayed with it (:mod:`calib.replay.batched`).  Every
prediction is therefore held out.

Runs are grouped:

* ``dense``: the dense-model, non-reasoning runs (the accuracy figures);
* ``moe``: the Mixtral runs; replayed only under a step model with
  mixture-of-experts support (v3), otherwise reported as unsupported;
* ``overloaded``: the *reasoning* runs (the real server's queue grew without
  bound, most requests failed); replayed and reported apart, never averaged in.

This module also holds the pieces the other loaded-server studies
(``batched_calibration``, ``physics``) share: the data-set fields, run
loading, calibration resolution, per-run result entries and diagnoses.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from calib.data.traces import Trace, list_traces, load_trace
from calib.errors import CalibError, StudyError
from calib.physics.options import PhysicsOptions
from calib.physics.overhead import OVERHEAD_MODELS, OverheadModel, make_overhead
from calib.physics.step_model import StepModel
from calib.replay.batched import APE_KEYS, BatchedReplay, BatchedRun, window_trace
from calib.studies.context import RunContext
from calib.studies.spec import GridRange, Strict, StudyBase

KIND = "batched_validation"

#: Repository root (``calib/studies/kinds/`` is three levels down).
REPO = Path(__file__).resolve().parents[3]
#: Where the loaded-server runs are looked for when a study gives no ``data_dir``.
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "batched"
#: Issue 6 targets (fractions): held-out mean-TPOT and mean-E2E APE, mean-TTFT APE.
TARGETS = {"tpot_mean_ms": 0.10, "e2e_mean_ms": 0.10, "ttft_mean_ms": 0.25}
GROUPS = ("dense", "moe", "overloaded")
_PHYSICS_KEYS = {"variant", "mfu_rule", "gemm_weight_floor", "decode_attention", "prefill_attention", "mixed_rule",
                 "min_step_us", "tp_fallback", "bw_efficiency", "gemm_mfu_scale", "prefill_attention_mfu_scale",
                 "decode_attention_mfu_scale", "mfu_floor", "mfu_prefill", "mfu_decode"}


# ======================================================================================= schema


def _check_physics(v: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(v) - _PHYSICS_KEYS)
    if unknown:
        raise ValueError(f"unknown physics parameter {unknown[0]!r}; known: {', '.join(sorted(_PHYSICS_KEYS))}")
    try:
        physics_options(v)
    except (CalibError, TypeError) as exc:  # TypeError: e.g. a list where a name belongs
        raise ValueError(str(exc)) from None
    return v


class LoadedData(Strict):
    """Where the loaded-server runs are and how they are replayed (shared by the loaded-server studies).

    ``data_dir`` defaults to ``../shared/data/batched`` next to the
    repository; a relative path is taken from the repository root.
    ``window_s`` (searches only) replays the first ``window_s`` seconds of
    each load stage (:func:`calib.replay.batched.window_trace`).
    """

    data_dir: str | None = None
    runs: list[str] | None = None
    output_rule: Literal["profile", "recorded", "exclude"] = "profile"
    prefix: Literal["auto", "groups", "profile", "none"] = "auto"
    cached_prefill_pi: Literal["cached", "zero"] = "cached"
    max_steps: int | None = Field(default=None, ge=1)
    hardware: str = "h100"
    scatter_points: int = Field(default=200, ge=10, le=5000)



class CalibrationSpec(Strict):
    """Where a calibration comes from.

    ``source``:

    * ``fixed``: ``physics`` + ``overhead_model`` + ``overhead_params`` as given;
    * ``hg1``: the per-layer optimum of the HG1 study, read from ``results``
      (default ``reports/hg1/results.json``) or, when that file is absent,
      obtained by running ``study`` (default ``studies/hg1.yaml``); the physics
      are the HG1 estimator's unless ``physics`` overrides them;
    * ``overhead_models``: the best overhead model of the generalization
      studies, read from ``results`` (default
      ``reports/overhead-models-corrected/results.json``); skipped with a note
      when absent or unreadable;
    * ``sync_grid``: grid-search ``per_layer_overhead_us`` over ``grid`` on the
      HG1 train split of the 13 synchronous experiments with the
      :class:`~calib.estimator.RooflineRegressor` settings ``estimator`` and the
      physics ``physics`` (lowest train TPOT MAPE; ties to the smaller value).
    """

    label: str = Field(pattern=r"^[A-Za-z0-9_.@+-]+$")
    source: Literal["fixed", "hg1", "overhead_models", "sync_grid"] = "fixed"
    physics: dict[str, Any] = Field(default_factory=dict)
    overhead_model: str = "per_layer"
    overhead_params: dict[str, float] = Field(default_factory=dict)
    request_latency_ms: float = Field(default=0.0, ge=0.0)
    results: str | None = None
    study: str | None = None
    estimator: dict[str, Any] = Field(default_factory=dict)
    grid: GridRange | None = None
    description: str = ""

    @field_validator("physics")
    @classmethod
    def _physics(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_physics(v)

    @model_validator(mode="after")
    def _check(self) -> "CalibrationSpec":
        if self.overhead_model not in OVERHEAD_MODELS:
            raise ValueError(f"unknown overhead model {self.overhead_model!r}; known: {', '.join(OVERHEAD_MODELS)}")
        if self.source == "fixed":
            make_overhead(self.overhead_model, self.overhead_params)
        if self.source == "sync_grid" and self.grid is None:
            raise ValueError("a sync_grid calibration needs 'grid'")
        return self


class BatchedValidationSchema(StudyBase, LoadedData):
    kind: Literal["batched_validation"]
    calibrations: list[CalibrationSpec] = Field(min_length=1)
    primary: str | None = None

    @model_validator(mode="after")
    def _labels(self) -> "BatchedValidationSchema":
        labels = [c.label for c in self.calibrations]
        if len(set(labels)) != len(labels):
            raise ValueError("calibration labels must be unique")
        if self.primary is not None and self.primary not in labels:
            raise ValueError(f"primary {self.primary!r} is not a calibration label")
        return self


schema = BatchedValidationSchema


# ======================================================================================= runs


def resolve_data_dir(value: str | None, source: str = "") -> Path:
    """The loaded-server data folder; a clear error when it is missing.

    Raises
    ------
    StudyError
        The folder does not exist or holds no run (no ``*/requests.json``).
    """
    path = DEFAULT_DATA_DIR if value is None else Path(value).expanduser()
    if not path.is_absolute():
        path = (REPO / path).resolve()
    if not path.is_dir():
        raise StudyError(f"loaded-server data folder {path} not found (set data_dir to the folder holding the "
                         "runs of data/batched/)", file=source or None, field="data_dir")
    try:
        runs = list_traces(path)
    except CalibError as exc:
        raise StudyError(str(exc), file=source or None, field="data_dir") from None
    if not runs:
        raise StudyError(f"no run (folder with requests.json) in {path}", file=source or None, field="data_dir")
    return path


def data_label(value: str | None) -> str:
    """How the data folder is recorded in results (as given, never machine-specific when defaulted)."""
    return "../shared/data/batched (default)" if value is None else str(value)


@dataclass
class RunData:
    """One loaded run, ready to replay.

    ``group`` is ``dense``, ``moe`` (mixture-of-experts model) or
    ``overloaded`` (a *reasoning* run).
    """

    name: str
    trace: Trace
    run: BatchedRun
    group: str
    is_moe: bool
    windows: dict = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.trace.model


def load_runs(spec: LoadedData, source: str = "") -> list[RunData]:
    """Load the runs of ``spec.data_dir`` (all, or ``spec.runs``), sorted by name."""
    from calib.specs import load_model

    root = resolve_data_dir(spec.data_dir, source)
    folders = list_traces(root)
    by_name = {p.name: p for p in folders}
    if spec.runs is not None:
        unknown = [r for r in spec.runs if r not in by_name]
        if unknown:
            raise StudyError(f"unknown run {unknown[0]!r} in {root}", file=source or None, field="runs")
        folders = [by_name[r] for r in sorted(set(spec.runs))]
    out = []
    for folder in folders:
        trace = load_trace(folder, output_rule=spec.output_rule)
        moe = load_model(trace.model).is_moe
        group = "overloaded" if trace.overloaded else ("moe" if moe else "dense")
        run = BatchedRun(trace, prefix=spec.prefix, cached_prefill_pi=spec.cached_prefill_pi,
                         max_steps=spec.max_steps)
        out.append(RunData(folder.name, trace, run, group, moe))
    return out


def search_run(rd: RunData, window_s: float | None) -> BatchedRun:
    """The run to replay during a search: the full trace, or its first ``window_s`` s of every stage."""
    if window_s is None:
        return rd.run
    key = float(window_s)
    run = rd.windows.get(key)
    if run is None:
        run = BatchedRun(window_trace(rd.trace, key), **{**rd.run._options, "record_steps": False})
        rd.windows[key] = run
    return run


# ======================================================================================= physics


def physics_options(physics: dict[str, Any]) -> PhysicsOptions:
    """``{"variant": ..., <PhysicsOptions field>: ...}`` -> validated options (variant default v2.3)."""
    values = dict(physics)
    variant = values.pop("variant", "v2.3")
    return PhysicsOptions.for_variant(variant, **values)


def supports(model_name: str, variant: str) -> tuple[bool, str]:
    """Whether the step model ``variant`` can time ``model_name`` (MoE needs v3)."""
    from calib.specs import load_model

    m = load_model(model_name)
    if m.is_moe and variant != "v3":
        return False, (f"{model_name} is a mixture-of-experts model ({m.num_experts} experts, {m.experts_per_token} "
                       f"per token); the {variant} roofline has no MoE support (only v3 does, spec §5.3)")
    return True, ""


_STEP_MODELS: dict[tuple, StepModel] = {}


def step_model(model: str, tp: int, options: PhysicsOptions, hardware: str = "h100") -> StepModel:
    """A step model, cached per ``(model, tp, options, hardware)`` (its fast-step caches are reused)."""
    key = (model, int(tp), options, hardware)
    sm = _STEP_MODELS.get(key)
    if sm is None:
        if len(_STEP_MODELS) > 64:
            _STEP_MODELS.clear()
        sm = StepModel.build(model, int(tp), hardware=hardware, options=options)
        _STEP_MODELS[key] = sm
    return sm


def describe_physics(options: PhysicsOptions) -> dict[str, Any]:
    """The options as a JSON-ready dict (only what differs from the variant's defaults, plus the variant)."""
    base = PhysicsOptions.for_variant(options.variant)
    out: dict[str, Any] = {"variant": options.variant}
    for k in sorted(_PHYSICS_KEYS - {"variant"}):
        v = getattr(options, k)
        if v != getattr(base, k):
            out[k] = v
    return out


# ======================================================================================= calibrations


@dataclass
class Calibration:
    """A resolved calibration: physics, overhead model and where they came from."""

    label: str
    options: PhysicsOptions | None
    overhead: OverheadModel | None
    provenance: str
    fitted_on: str
    available: bool = True
    note: str = ""
    extra: dict | None = None
    request_latency_ms: float = 0.0

    def describe(self) -> dict:
        return {
            "label": self.label,
            "available": self.available,
            "physics": describe_physics(self.options) if self.options is not None else None,
            "overhead_model": self.overhead.name if self.overhead is not None else None,
            "overhead_params": self.overhead.params if self.overhead is not None else None,
            "request_latency_ms": self.request_latency_ms,
            "source": self.provenance,
            "fitted_on": self.fitted_on,
            "note": self.note,
            **({"details": self.extra} if self.extra else {}),
        }

    def summary_text(self) -> str:
        """One line: physics + overhead + provenance."""
        if not self.available:
            return f"{self.label}: unavailable ({self.note})"
        p = describe_physics(self.options)
        phys = ", ".join(f"{k}={v}" for k, v in p.items())
        ovh = ", ".join(f"{k}={_fmt(v)}" for k, v in self.overhead.params.items())
        lat = f"; request latency {self.request_latency_ms:.4g} ms" if self.request_latency_ms else ""
        return (f"{self.label}: {phys}; {self.overhead.name}({ovh}){lat}; from {self.provenance}; fitted on "
                f"{self.fitted_on}")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_ESTIMATOR_PHYSICS = ("variant", "mfu_rule", "bw_efficiency", "gemm_weight_floor", "decode_attention",
                      "prefill_attention", "mixed_rule", "gemm_mfu_scale", "prefill_attention_mfu_scale",
                      "decode_attention_mfu_scale", "mfu_floor", "mfu_prefill", "mfu_decode")


def estimator_physics(est: dict[str, Any]) -> dict[str, Any]:
    """Physics keys of a RooflineRegressor parameter dict (as RooflineRegressor resolves them)."""
    from calib.estimator import RooflineRegressor

    return describe_physics(RooflineRegressor(**{k: v for k, v in est.items()
                                                 if k in RooflineRegressor().get_params()}).physics_options())


def _repo_path(value: str | None, default: str) -> Path:
    p = Path(value or default)
    return p if p.is_absolute() else REPO / p


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _hg1(c: CalibrationSpec, ctx: RunContext | None) -> Calibration:
    path = _repo_path(c.results, "reports/hg1/results.json")
    doc = _read_json(path)
    origin = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path} (key optimum_us)"
    if doc is None or "optimum_us" not in doc:
        from calib.studies.runner import run_study

        study = _repo_path(c.study, "studies/hg1.yaml")
        if not study.is_file():
            raise StudyError(f"neither {path} nor the study file {study} exists", field=f"calibrations.{c.label}")
        with tempfile.TemporaryDirectory() as tmp:
            doc = run_study(study, tmp, progress=False, report=False)
        origin = f"{study.relative_to(REPO) if study.is_relative_to(REPO) else study} (run; {path.name} absent)"
    optimum = float(doc["optimum_us"])
    est = dict((doc.get("settings") or {}).get("estimator") or {})
    physics = estimator_physics(est) if est else {"variant": "v2.3"}
    physics.update(c.physics)
    opts = physics_options(physics)
    train = (doc.get("settings") or {}).get("split", {}).get("train") or []
    fitted = f"the {len(train) or 9} HG1 train synchronous experiments (mode {doc.get('mode', '?')})"
    return Calibration(c.label, opts, make_overhead("per_layer", {"per_layer_us": optimum}),
                       f"HG1 optimum {optimum:g} µs/layer from {origin}", fitted,
                       extra={"optimum_us": optimum, "hg1_mode": doc.get("mode")})


def _find_best_overhead(doc: dict) -> tuple[str, dict, dict, str] | None:
    """The best overhead model of the generalization studies: ``(model, params, estimator, label)``.

    Reads the ``overhead_models`` kind's layout (``ranking[0]``: ``overhead``,
    ``params`` of the fit on all experiments, which may hold jointly searched
    physics such as ``bw_efficiency``; ``settings.estimator``), and tolerates a
    ``best``/``best_model`` entry naming ``overhead_model`` and ``params``.
    """
    est = dict((doc.get("settings") or {}).get("estimator") or {})
    ranking = doc.get("ranking")
    if isinstance(ranking, list) and ranking and isinstance(ranking[0], dict):
        top = min(ranking, key=lambda e: e.get("rank", 10**9)) if all("rank" in e for e in ranking) else ranking[0]
        name, params = top.get("overhead"), top.get("params")
        if isinstance(name, str) and name in OVERHEAD_MODELS and isinstance(params, dict):
            return name, params, est, str(top.get("model", name))
    for key in ("best", "best_model", "winner", "recommended"):
        v = doc.get(key)
        if isinstance(v, dict):
            name = v.get("overhead_model") or v.get("overhead") or v.get("model")
            params = v.get("params") or v.get("overhead_params")
            if isinstance(name, str) and name in OVERHEAD_MODELS and isinstance(params, dict):
                return name, params, dict(v.get("estimator") or est), name
    return None


def _overhead_models(c: CalibrationSpec) -> Calibration:
    path = _repo_path(c.results, "reports/overhead-models-corrected/results.json")
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    if not path.is_file():
        return Calibration(c.label, None, None, str(rel), "-", available=False,
                           note=f"{rel} does not exist yet (the generalization studies have not been run)")
    doc = _read_json(path)
    found = _find_best_overhead(doc) if doc else None
    if found is None:
        return Calibration(c.label, None, None, str(rel), "-", available=False,
                           note=f"{rel} names no best overhead model with parameters")
    name, params, est, label = found
    from dataclasses import fields as dc_fields

    ovh_names = {f.name for f in dc_fields(OVERHEAD_MODELS[name])}
    try:
        overhead = make_overhead(name, {k: float(v) for k, v in params.items() if k in ovh_names})
        joint = {k: v for k, v in params.items() if k not in ovh_names}
        est = {**est, **joint}
        physics = estimator_physics(est) if est else {"variant": "v2.3"}
        physics.update(c.physics)
        opts = physics_options(physics)
    except (CalibError, TypeError, ValueError) as exc:
        return Calibration(c.label, None, None, str(rel), "-", available=False, note=f"unusable: {exc}")
    ranked = doc.get("ranked_by", "its ranking")
    return Calibration(c.label, opts, overhead, f"rank-1 model `{label}` of {rel} (ranked by {ranked}; parameters "
                       "of its fit on all experiments)",
                       f"the {doc.get('mode', '?')}-mode synchronous experiments (see that study)",
                       extra={"model": label, "mode": doc.get("mode")})


def _sync_grid(c: CalibrationSpec) -> Calibration:
    from calib.data import load_experiments
    from calib.estimator import RooflineRegressor
    from calib.studies.evaluate import evaluate

    X = load_experiments()
    train = [str(i) for i, s in zip(X.index, X["hg1_split"].astype(str)) if s == "train"]
    est = {k: v for k, v in c.estimator.items()}
    for k, v in c.physics.items():
        est[k] = v
    base = RooflineRegressor(**est).get_params()
    values = c.grid.values()
    scores = []
    for v in values:
        ev = evaluate(X.loc[train], {**base, "per_layer_overhead_us": v})
        scores.append((float(ev["tpot_ape"].mean()), v))
    best_score, best = min(scores)
    est_obj = RooflineRegressor(**{**base, "per_layer_overhead_us": best})
    opts = est_obj.physics_options()
    return Calibration(c.label, opts, make_overhead("per_layer", {"per_layer_us": best}),
                       f"grid {c.grid.low:g}..{c.grid.high:g} step {c.grid.step:g} µs/layer on the HG1 train split "
                       f"(train TPOT MAPE {100 * best_score:.1f} %, mode {base['mode']})",
                       f"the {len(train)} HG1 train synchronous experiments",
                       extra={"optimum_us": best, "train_tpot_mape": best_score, "mode": base["mode"]})


def resolve_calibration(c: CalibrationSpec, ctx: RunContext | None = None) -> Calibration:
    """Resolve a :class:`CalibrationSpec` (reads or computes the synchronous calibration)."""
    if c.source == "fixed":
        cal = Calibration(c.label, physics_options(c.physics), make_overhead(c.overhead_model, c.overhead_params),
                          c.description or "fixed in the study file", "none (fixed values)")
    elif c.source == "hg1":
        cal = _hg1(c, ctx)
    elif c.source == "overhead_models":
        cal = _overhead_models(c)
    else:
        cal = _sync_grid(c)
    cal.request_latency_ms = float(c.request_latency_ms)
    return cal


# ======================================================================================= entries


def replay(rd: RunData, options: PhysicsOptions, overhead: OverheadModel, hardware: str = "h100", *,
           window_s: float | None = None, record_steps: bool = True, request_latency_ms: float = 0.0
           ) -> BatchedReplay:
    """Replay one run (the full trace, or a window of it) under ``options`` + ``overhead``."""
    sm = step_model(rd.model, rd.trace.tp, options, hardware)
    return search_run(rd, window_s).run(sm, overhead, record_steps=record_steps if window_s is None else False,
                                        request_latency_ms=request_latency_ms)


def _nan_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def run_entry(rd: RunData, rep: BatchedReplay | None, calibration: str, heldout: bool, *, scatter_points: int = 200,
              note: str = "", fold: str | None = None) -> dict:
    """The per-run result entry (issue 6 layout plus per-stage detail)."""
    t = rd.trace
    req = t.requests
    entry: dict[str, Any] = {
        "run": rd.name, "model": t.model, "tp": int(t.tp), "profile": t.profile, "group": rd.group,
        "n_requests": int(req.shape[0]), "excluded": int(t.excluded), "skipped": len(t.skipped),
        "n_short_output": int(t.n_short), "calibration": calibration, "heldout": bool(heldout),
    }
    if fold is not None:
        entry["fold"] = fold
    if rep is None:
        meas = {"ttft_mean_ms": float(req["ttft_ms"].mean()), "tpot_mean_ms": float(req["tpot_ms"].mean()),
                "e2e_mean_ms": float(req["e2e_ms"].mean()), "e2e_p90_ms": float(np.percentile(req["e2e_ms"], 90))}
        entry.update({"supported": False, "note": note, "measured": meas, "predicted": None, "ape": None})
        return _nan_to_none(entry)
    r = rep.report()
    entry.update({
        "supported": True,
        "measured": r["headline"]["measured"],
        "predicted": r["headline"]["predicted"],
        "ape": r["headline"]["ape"],
        "stats": r["stats"],
        "stages": [{k: s[k] for k in ("stage", "rate", "duration_s", "n", "n_compared", "measured", "predicted",
                                      "saturation", "batch")} | {"ape": s["headline"]["ape"]} for s in r["stages"]],
        "replay": r["replay"],
        "steps": r["steps"],
        "saturated_stages": r["saturated_stages"],
        "runaway_stages": r["runaway_stages"],
        "batch_profile": rep.batch_profile(),
        "scatter": rep.scatter(scatter_points),
    })
    if note:
        entry["note"] = note
    entry["targets"] = targets(entry)
    entry["diagnosis"] = diagnose(entry)
    return _nan_to_none(entry)


def without_scatter(entries: Sequence[dict]) -> list[dict]:
    """Entries without their per-request scatter samples (kept only where a report plots them)."""
    return [{k: v for k, v in e.items() if k != "scatter"} for e in entries]


def targets(entry: dict) -> dict:
    """Which issue-6 targets the run meets (APE below target; no runaway stage).

    ``applies`` is false for an overloaded (reasoning) run: the targets are
    about runs whose server stayed stable.
    """
    ape = entry.get("ape") or {}
    out = {k: (ape.get(k) is not None and ape[k] < thr) for k, thr in TARGETS.items()}
    out["no_runaway"] = not entry.get("runaway_stages")
    out["all"] = all(out.values())
    out["applies"] = entry.get("group") != "overloaded"
    return out


def _interp_tpot(profile: list[dict], batch: float) -> float | None:
    pts = [(r["predicted"]["mean_batch"], r["predicted"]["mean_tpot_ms"]) for r in profile
           if r["predicted"]["n"] >= 5 and r["predicted"]["mean_batch"] is not None]
    if not pts or batch is None or not np.isfinite(batch):
        return None
    xs, ys = zip(*sorted(pts))
    return float(np.interp(batch, xs, ys))


def _mean_batch(profile: list[dict], side: str) -> float | None:
    n = sum(r[side]["n"] for r in profile)
    if not n:
        return None
    return sum(r[side]["n"] * r[side]["mean_batch"] for r in profile if r[side]["n"]) / n


def diagnose(entry: dict) -> list[str]:
    """What the remaining error of a run (and of each of its stages) is made of, in words.

    Only produced for a missed target.  The parts:

    * a *runaway* stage: the replay saturates while the server stayed stable;
    * TPOT: the step-time error at the measured batch (predicted TPOT
      interpolated at the measured mean in-flight count, against the measured
      TPOT) versus the batch-size feedback (the replay runs with a different
      number of requests in flight);
    * TTFT: the predicted queueing delay against the first step(s);
    * E2E: the shares of the TTFT error and of (O - 1) x the TPOT error.
    """
    t = entry.get("targets", {})
    if entry.get("predicted") is None or t.get("all", False) or not t.get("applies", True):
        return []
    out = []
    m, p, ape = entry["measured"], entry["predicted"], entry["ape"]
    single = len(entry["stages"]) == 1
    for s in entry["stages"]:
        sat = s["saturation"]
        where = f"stage {s['stage']} ({s['rate']:g} req/s)"
        if sat.get("runaway"):
            wait_s, growth = sat["predicted_wait_last_ms"] / 1e3, sat["predicted_wait_growth_s_per_s"]
            out.append(f"{where}: runaway — the replay saturates (mean wait of the last fifth {wait_s:.1f} s, "
                       f"growing {growth:.3f} s/s) while the server stayed stable (TTFT p50 "
                       f"{sat['measured_ttft_p50_last_ms']:.0f} ms): the "
                       f"predicted step times put the offered load past the simulated capacity "
                       f"(stage TPOT predicted {s['predicted']['tpot']['mean']:.1f} vs measured "
                       f"{s['measured']['tpot']['mean']:.1f} ms)")
        elif sat.get("saturated"):
            out.append(f"{where}: the replay saturates; the measured stage was not stable either")
        sa = s["ape"]
        missed = [k for k, thr in TARGETS.items() if sa.get(k) is not None and sa[k] >= thr]
        if missed and not sat.get("runaway") and not single:
            out.append(f"{where}: " + _tpot_ttft_text(s["measured"], s["predicted"], s["batch"]))
    missed = [k for k, thr in TARGETS.items() if ape.get(k) is not None and ape[k] >= thr]
    if missed:
        stats = entry["stats"]
        out.append("run: " + _tpot_ttft_text(stats["measured"], stats["predicted"], entry["batch_profile"]))
        d_ttft = p["ttft_mean_ms"] - m["ttft_mean_ms"]
        d_e2e = p["e2e_mean_ms"] - m["e2e_mean_ms"]
        if d_e2e and np.isfinite(d_e2e):
            share = d_ttft / d_e2e
            out.append(f"run: E2E error {d_e2e:+.0f} ms = TTFT {d_ttft:+.0f} ms ({100 * share:.0f} %) + decode "
                       f"{d_e2e - d_ttft:+.0f} ms ({100 * (1 - share):.0f} %)")
    return out


def _tpot_ttft_text(meas: dict, pred: dict, profile: list[dict]) -> str:
    parts = []
    mt, pt = meas["tpot"]["mean"], pred["tpot"]["mean"]
    bm, bp = _mean_batch(profile, "measured"), _mean_batch(profile, "predicted")
    at = _interp_tpot(profile, bm) if bm is not None else None
    if mt and pt and np.isfinite(mt) and np.isfinite(pt):
        text = f"TPOT {pt:.2f} vs {mt:.2f} ms ({100 * (pt - mt) / mt:+.0f} %)"
        if at is not None and bm is not None and bp is not None:
            text += (f"; at the measured mean of {bm:.1f} requests in flight the replay's TPOT is {at:.2f} ms "
                     f"(step-time error {100 * (at - mt) / mt:+.0f} %), the replay has {bp:.1f} in flight "
                     f"(batch feedback {100 * (pt - at) / mt:+.0f} %)")
        parts.append(text)
    parts.append(f"TTFT mean {pred['ttft']['mean']:.1f} vs {meas['ttft']['mean']:.1f} ms, p50 "
                 f"{pred['ttft']['p50']:.1f} vs {meas['ttft']['p50']:.1f} ms")
    return "; ".join(parts)


def aggregate(entries: Sequence[dict]) -> dict:
    """Mean APE per headline key over the supported entries, the worst run per key, and target verdicts."""
    ok = [e for e in entries if e.get("ape")]
    out: dict[str, Any] = {"n_runs": len(ok), "runs": [e["run"] for e in ok]}
    if not ok:
        return out
    out["mape"] = {k: float(np.mean([e["ape"][k] for e in ok if e["ape"][k] is not None])) for k in APE_KEYS}
    out["median_ape"] = {k: float(np.median([e["ape"][k] for e in ok if e["ape"][k] is not None])) for k in APE_KEYS}
    calm = [e for e in ok if not e.get("runaway_stages")]
    out["n_runs_without_runaway"] = len(calm)
    out["mape_without_runaway"] = ({k: float(np.mean([e["ape"][k] for e in calm if e["ape"][k] is not None]))
                                    for k in APE_KEYS} if calm else None)
    out["worst"] = {k: max(ok, key=lambda e: e["ape"][k] if e["ape"][k] is not None else -1)["run"] for k in APE_KEYS}
    out["runaway_runs"] = [e["run"] for e in ok if e.get("runaway_stages")]
    t = {k: out["mape"][k] < thr for k, thr in TARGETS.items()}
    t["no_runaway"] = not out["runaway_runs"]
    t["all"] = all(t.values())
    out["targets"] = t
    return out


def output_rule_text(runs: Sequence[RunData]) -> dict:
    """The output-length rule applied, per run (the trace's own words)."""
    return {rd.name: rd.trace.output_rule for rd in runs}


def settings_block(spec: LoadedData, ctx: RunContext, runs: Sequence[RunData]) -> dict:
    """Settings common to the loaded-server studies (to rerun exactly)."""
    return {
        "study_file": ctx.study_file,
        "data_dir": data_label(spec.data_dir),
        "runs": [rd.name for rd in runs],
        "output_rule": spec.output_rule,
        "prefix": spec.prefix,
        "cached_prefill_pi": spec.cached_prefill_pi,
        "max_steps": spec.max_steps if spec.max_steps is not None else "default (2 x (output tokens + chunks) + 1000)",
        "hardware": spec.hardware,
        "phantom_last_step": False,
        "tpot_definition": "per request (E2E - TTFT) / (O - 1), O after the output rule; mean over requests with "
                           "a defined measured TPOT (same definition for prediction and measurement)",
        "scheduler": "vLLM-like continuous batching (calib.replay.engine): max_num_seqs, max_num_batched_tokens, "
                     "kv_blocks_total_gpu and block_size of each run; FCFS; recompute preemption",
    }


# ======================================================================================= run


def evaluate_calibration(cal: Calibration, runs: Sequence[RunData], spec: LoadedData, *,
                         heldout: bool = True) -> list[dict]:
    """Replay every run under one calibration; one entry per run (unsupported ones without prediction)."""
    entries = []
    where = f"{cal.label}: {cal.provenance}; fitted on {cal.fitted_on}"
    for rd in runs:
        if not cal.available:
            entries.append(run_entry(rd, None, where, heldout, note=cal.note))
            continue
        ok, why = supports(rd.model, cal.options.variant)
        if not ok:
            entries.append(run_entry(rd, None, where, heldout, note=f"unsupported: {why}"))
            continue
        rep = replay(rd, cal.options, cal.overhead, spec.hardware, request_latency_ms=cal.request_latency_ms)
        note = ""
        if rep.hit_step_cap:
            note = f"hit the step cap ({rep.inputs.scheduler.max_steps} steps): {rep.n_unfinished} requests unfinished"
        if rd.group == "overloaded":
            note = (note + "; " if note else "") + (f"overloaded run: {rd.trace.excluded} requests failed on the real "
                                                     "server and are missing from the replayed load")
        entries.append(run_entry(rd, rep, where, heldout, scatter_points=spec.scatter_points, note=note))
    return entries


def group_summaries(entries: Sequence[dict]) -> dict:
    """``{group: aggregate}`` for the dense, MoE and overloaded runs (overloaded: reported apart)."""
    return {g: aggregate([e for e in entries if e["group"] == g]) for g in GROUPS}


def run(spec: BatchedValidationSchema, ctx: RunContext) -> dict:
    runs = load_runs(spec, ctx.study_file)
    cals = [resolve_calibration(c, ctx) for c in spec.calibrations]
    primary = spec.primary or cals[0].label
    by_cal = {}
    for cal in cals:
        entries = evaluate_calibration(cal, runs, spec)
        by_cal[cal.label] = {"calibration": cal.describe(), "text": cal.summary_text(), "runs": entries,
                             "groups": group_summaries(entries)}
    prim = by_cal[primary]
    return {
        "study": spec.name,
        "kind": KIND,
        "description": spec.description,
        "primary": primary,
        "runs": prim["runs"],
        "overall": prim["groups"]["dense"],
        "groups": prim["groups"],
        "calibrations": by_cal,
        "targets": {"tpot_mean_ms": "< 10 % (held-out, dense runs)", "e2e_mean_ms": "< 10 %",
                    "ttft_mean_ms": "< 25 %", "runaway": "no runaway queue in a stage where the server stayed stable"},
        "output_rule": output_rule_text(runs),
        "settings": settings_block(spec, ctx, runs) | {
            "calibrations": [c.model_dump(exclude_none=True) for c in spec.calibrations]},
    }
