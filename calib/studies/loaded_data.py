"""What the loaded-server study kinds share: their data fields, run loading and per-run result entries.

The kinds ``batched_validation``, ``batched_calibration`` and ``physics``
replay the runs of ``data/batched/`` (:mod:`calib.replay.loaded`).  Their
study files share the fields of :class:`LoadedData`; their results share the
per-run entry of :func:`run_entry` (measured, predicted and APE of the four
headline figures, per-stage detail, the issue-6 :data:`TARGETS` and, for a
missed target, a :func:`diagnose` in words) and the group summaries of
:func:`group_summaries` (mean APE over runs, named in ``aggregation``).

Where the runs are
------------------
``data_dir`` of the study file; a relative path is taken from the current
folder.  Without ``data_dir`` (the shipped study files give none) the runs
are looked for in ``$CALIB_DATA/batched`` (or ``$CALIB_DATA`` itself) when
that variable is set, else in the shipped dataset: the 16 runs of
``data/batched`` in calib's own format (``configs/datasets/loaded``,
:func:`calib.replay.loaded.resolve_data_dir`), so the studies run from a
wheel install.

Nested calibration
------------------
The calibrating kinds (``batched_calibration``, ``physics``) share their
study-file ``search`` and ``objective`` (:class:`LoadedSearch`,
:class:`LoadedObjective`), their rows (:func:`stage_table`: the dense load
stages, windowed for the searches and full for the held-out scores, split by
:class:`SearchWindowSplit`) and the figures derived from a
:func:`calib.calibrate.nested.nested_cross_validate` result
(:func:`heldout_flags`, :func:`seed_agreement`, :func:`fit_on_all`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from calib.errors import CalibError, StudyError
from calib.metrics import AGGREGATIONS, APE_KEYS, mean_apes
from calib.replay.batched import BatchedReplay
from calib.replay.loaded import GROUPS, LoadedRun, batch_profile, load_runs as _load_runs, run_report, scatter
from calib.settings import Physics, Settings
from calib.studies.context import RunContext
from calib.studies.spec import Strict

__all__ = ["TARGETS", "GROUPS", "PHYSICS_KEYS", "LoadedData", "check_physics", "physics_settings", "load_runs",
           "data_label", "settings_block", "output_rule_text", "run_entry", "without_scatter", "targets",
           "diagnose", "aggregate", "group_summaries", "STAGE_AGGREGATION", "OTHER_RUNS_RULE", "LoadedSearch",
           "LoadedObjective", "loaded_space", "stage_table", "SearchWindowSplit", "heldout_flags", "seed_agreement",
           "predict_rows", "group_figures", "fit_on_all", "dataset_block", "heldout_block", "CV_TEXT"]

#: Issue 6 targets (fractions): held-out mean-TPOT and mean-E2E APE, mean-TTFT APE.
TARGETS = {"tpot_mean_ms": 0.10, "e2e_mean_ms": 0.10, "ttft_mean_ms": 0.25}
#: Keys of a study file's ``physics`` mapping (the physics settings; the hardware is ``LoadedData.hardware``).
PHYSICS_KEYS = tuple(k for k in Physics.model_fields if k != "hardware")


# ======================================================================================= schema


def physics_settings(physics: Mapping[str, Any], *, hardware: str = "h100", overhead_model: str = "per_layer",
                     overhead_params: Mapping[str, float] | None = None, request_latency_ms: float = 0.0,
                     source: str | None = None) -> Settings:
    """Settings of a study file's ``physics`` mapping, an overhead model, the hardware and the request latency.

    >>> s = physics_settings({"variant": "v3"}, overhead_params={"per_layer_us": 100})
    >>> s.physics.variant, s.overhead.per_layer_us
    ('v3', 100.0)
    """
    return Settings.from_params({**physics, "hardware": hardware, "overhead_model": overhead_model,
                                 **(overhead_params or {}), "request_latency_ms": request_latency_ms}, source)


def check_physics(v: dict[str, Any]) -> dict[str, Any]:
    """Validate a study file's ``physics`` mapping (a pydantic validator; ValueError in one line)."""
    unknown = sorted(set(v) - set(PHYSICS_KEYS))
    if unknown:
        raise ValueError(f"unknown physics parameter {unknown[0]!r}; known: {', '.join(sorted(PHYSICS_KEYS))}")
    try:
        physics_settings(v).physics_options()
    except (CalibError, TypeError) as exc:  # TypeError: e.g. a list where a name belongs
        raise ValueError(str(exc)) from None
    return v


class LoadedData(Strict):
    """Where the loaded-server runs are and how they are replayed (shared by the loaded-server studies).

    ``data_dir``: the folder of runs; relative to the current folder; default
    ``$CALIB_DATA/batched`` when ``CALIB_DATA`` is set, else the shipped dataset.  ``runs``: run folder names
    (default all).
    ``output_rule``, ``prefix``, ``cached_prefill_pi``, ``async_scheduling``, ``max_steps``: see
    :mod:`calib.data.traces` and :mod:`calib.replay.batched`.  ``hardware``:
    the hardware of every replay.  ``scatter_points``: per-request samples
    kept per run for the scatter plots.
    """

    data_dir: str | None = None
    runs: list[str] | None = None
    output_rule: Literal["profile", "recorded", "exclude"] = "profile"
    prefix: Literal["auto", "groups", "repeats", "profile", "none"] = "auto"
    cached_prefill_pi: Literal["cached", "zero"] = "cached"
    async_scheduling: bool = True
    max_steps: int | None = Field(default=None, ge=1)
    hardware: str = "h100"
    scatter_points: int = Field(default=200, ge=10, le=5000)


# ======================================================================================= runs


def load_runs(spec: LoadedData, source: str = "") -> list[LoadedRun]:
    """The runs of ``spec`` (:func:`calib.replay.loaded.load_runs`); a bad folder or run name is a StudyError."""
    try:
        return _load_runs(spec.data_dir, spec.runs, output_rule=spec.output_rule, prefix=spec.prefix,
                          cached_prefill_pi=spec.cached_prefill_pi, max_steps=spec.max_steps,
                          async_scheduling=spec.async_scheduling)
    except CalibError as exc:
        if exc.file is None and exc.field in ("data_dir", "runs"):
            raise StudyError(exc.message, file=source or None, field=exc.field) from None
        raise


def data_label(value: str | None) -> str:
    """How the data folder is recorded in results: as given, or the default in words (never machine-specific)."""
    import os

    from calib.resources import DATA_ENV

    if value is not None:
        return str(value)
    if os.environ.get(DATA_ENV, ""):
        return f"${DATA_ENV}/batched (default)"
    return "shipped dataset configs/datasets/loaded (default)"


def output_rule_text(runs: Sequence[LoadedRun]) -> dict:
    """The output-length rule applied, per run (the trace's own words)."""
    return {rd.name: rd.trace.output_rule for rd in runs}


def settings_block(spec: LoadedData, ctx: RunContext, runs: Sequence[LoadedRun]) -> dict:
    """Settings common to the loaded-server studies (to rerun exactly)."""
    return {
        "study_file": ctx.study_file,
        "data_dir": data_label(spec.data_dir),
        "runs": [rd.name for rd in runs],
        "output_rule": spec.output_rule,
        "prefix": spec.prefix,
        "cached_prefill_pi": spec.cached_prefill_pi,
        "async_scheduling": spec.async_scheduling,
        "max_steps": spec.max_steps if spec.max_steps is not None else "default (2 x (output tokens + chunks) + 1000)",
        "hardware": spec.hardware,
        "phantom_last_step": False,
        "tpot_definition": "per request (E2E - TTFT) / (O - 1), O after the output rule; mean over requests with "
                           "a defined measured TPOT (same definition for prediction and measurement)",
        "scheduler": "vLLM-like continuous batching (calib.replay.engine): max_num_seqs, max_num_batched_tokens, "
                     "kv_blocks_total_gpu and block_size of each run; FCFS; recompute preemption",
    }


# ======================================================================================= entries


def _nan_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def run_entry(rd: LoadedRun, rep: BatchedReplay | None, calibration: str, heldout: bool, *,
              scatter_points: int = 200, note: str = "", fold: str | None = None) -> dict:
    """The per-run result entry (issue 6 layout plus per-stage detail; ``rep=None``: not replayed)."""
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
    r = run_report(rep)
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
        "batch_profile": batch_profile(rep),
        "scatter": scatter(rep, scatter_points),
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


# ======================================================================================= summaries


def aggregate(entries: Sequence[dict]) -> dict:
    """Mean and median APE per headline key over the replayed runs (each run weighs 1), the worst run per
    key, the runs with a runaway stage and the target verdicts."""
    ok = [e for e in entries if e.get("ape")]
    out: dict[str, Any] = {"n_runs": len(ok), "runs": [e["run"] for e in ok]}
    if not ok:
        return out
    agg = mean_apes([e["ape"] for e in ok], APE_KEYS, over="run")
    out["aggregation"] = agg["aggregation"]
    out["mape"] = agg["mape"]
    out["median_ape"] = agg["median_ape"]
    calm = [e for e in ok if not e.get("runaway_stages")]
    out["n_runs_without_runaway"] = len(calm)
    out["mape_without_runaway"] = mean_apes([e["ape"] for e in calm], APE_KEYS, over="run")["mape"] if calm else None
    out["worst"] = {k: max(ok, key=lambda e: e["ape"][k] if e["ape"][k] is not None else -1)["run"] for k in APE_KEYS}
    out["runaway_runs"] = [e["run"] for e in ok if e.get("runaway_stages")]
    t = {k: out["mape"][k] < thr for k, thr in TARGETS.items()}
    t["no_runaway"] = not out["runaway_runs"]
    t["all"] = all(t.values())
    out["targets"] = t
    return out


def group_summaries(entries: Sequence[dict]) -> dict:
    """``{group: aggregate}`` for the dense, MoE and overloaded runs (overloaded: reported apart)."""
    return {g: aggregate([e for e in entries if e["group"] == g]) for g in GROUPS}


# ======================================================================================= nested calibration
# What the calibrating kinds (batched_calibration, physics) share around calib.calibrate.nested: the study-file
# search and objective, the stage rows (windowed for the searches, full for the scores), the outer splitter, and
# the derived figures of their results (runaway held-out rows, seed agreement, the runs no fold holds).

#: How the held-out APEs of load stages are aggregated (named in results and in every table header).
STAGE_AGGREGATION = (AGGREGATIONS["run_of_stages"] + ", pooled over the outer folds (every dense run is held out "
                     "once per seed); predictions and measurements are means over the stage's requests")
#: The rule for the runs no fold holds.
OTHER_RUNS_RULE = ("the mixture-of-experts and overloaded runs are in no fold: each is predicted by fits on every "
                   "dense run (held out by construction); a variant without MoE support reports the run "
                   "'unsupported' with the reason, and overloaded runs are reported apart from accuracy figures")
#: Settings a loaded calibration may not search: the variant (it decides MoE support), hardware, replay options.
_FIXED = ("physics.variant", "physics.hardware", "overhead.model")
#: Replay settings a loaded calibration may search: client-side latencies, which a loaded replay honours (the
#: per-input-token one once :mod:`calib.settings` defines it; until then it is an unknown parameter).
SEARCHABLE_REPLAY = ("replay.request_latency_ms", "replay.input_token_latency_us")


class LoadedSearch(Strict):
    """The search of every candidate: algorithm, trials per seed and fit (default
    :func:`calib.calibrate.search.budget` of the candidate's parameters), seeds, ``refine`` (CMA-ES trials
    polishing the best point in a box of ±10 % of each range around it; 0: none), convergence tolerance,
    sampler options, and ``window_s``: the searches replay the first ``window_s`` s of every load stage
    (``None``: full traces); held-out scores always replay full traces."""

    algorithm: Literal["tpe", "cmaes"] = "tpe"
    n_trials: int | None = Field(default=None, ge=1, le=100_000)
    seeds: int | list[int] = 5
    refine: int = Field(default=0, ge=0, le=100_000)
    tolerance: float = Field(default=0.005, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)
    window_s: float | None = Field(default=120.0, gt=0)

    def make(self, n_trials: int | None = None):
        """The :class:`~calib.calibrate.Search` (``n_trials`` overrides the study-wide budget)."""
        from calib.calibrate import parse_search

        return parse_search({"algorithm": self.algorithm, "n_trials": n_trials or self.n_trials, "seeds": self.seeds,
                             "refine": self.refine, "tolerance": self.tolerance, "options": self.options})

    @model_validator(mode="after")
    def _valid(self) -> "LoadedSearch":
        try:
            self.make()
        except CalibError as exc:
            raise ValueError(exc.message) from None
        return self


class LoadedObjective(Strict):
    """Search loss: the weighted mean over metrics of the run-weighted mean capped APE of the stage means."""

    weights: dict[Literal["ttft", "tpot", "e2e"], float] = Field(
        default_factory=lambda: {"tpot": 1.0, "e2e": 1.0, "ttft": 0.5})
    cap: float | None = Field(default=2.0, gt=0)

    def parse(self):
        """The :class:`~calib.calibrate.Objective`."""
        from calib.calibrate import Objective

        return Objective.parse({"weights": dict(self.weights), "cap": self.cap})

    @model_validator(mode="after")
    def _valid(self) -> "LoadedObjective":
        try:
            self.parse()
        except CalibError as exc:
            raise ValueError(exc.message) from None
        return self


def loaded_space(raw: Mapping[str, Any], base: Settings, where: str) -> dict:
    """A candidate's search space (``{low, high[, log]}`` or ``{choices: [...]}`` per settings parameter), checked
    against its settings ``base``; a ValueError naming ``where`` otherwise."""
    from calib.calibrate import make_space

    try:
        space = make_space(raw, base)
    except CalibError as exc:
        raise ValueError(f"{where}: {exc.message}") from None
    bad = [k for k in space if k in _FIXED or (k.startswith("replay.") and k not in SEARCHABLE_REPLAY)]
    if bad:
        raise ValueError(f"{where}: {bad[0]} cannot be searched (fixed per candidate, or no loaded-replay setting)")
    return space


class Candidate(Strict):
    """A candidate of the ``physics`` and ``joint`` kinds: a roofline variant with fixed physics, an overhead model,
    whether that overhead overlaps the GPU under async scheduling (``replay.cpu_overlap``), a search space and
    optionally its own budget."""

    label: str = Field(pattern=r"^[A-Za-z0-9_.@+-]+$")
    description: str = ""
    physics: dict[str, Any] = Field(default_factory=lambda: {"variant": "v2.3"})
    overhead_model: str = "per_layer_tp_power"
    cpu_overlap: bool = False
    space: dict[str, dict[str, Any]] = Field(min_length=1)
    n_trials: int | None = Field(default=None, ge=1)

    @field_validator("physics")
    @classmethod
    def _physics(cls, v: dict) -> dict:
        return check_physics(v)


class CandidateStudy(LoadedData):
    """What a study of loaded-replay candidates shares (the ``physics`` and ``joint`` kinds): the candidates,
    search and objective, their checks, and each candidate's estimator and space.  A kind sets
    ``regressor_class`` (the estimator class its candidates use) and lists this class after ``StudyBase``."""

    regressor_class: ClassVar[type]
    candidates: list[Candidate] = Field(min_length=1)
    search: LoadedSearch = LoadedSearch()
    objective: LoadedObjective = LoadedObjective()

    @model_validator(mode="after")
    def _check_candidates(self):
        """Distinct labels, known overhead models, valid spaces and budgets (a ValueError naming the candidate)."""
        from collections import Counter

        from calib.physics.overhead import OVERHEAD_MODELS

        dupes = [k for k, n in Counter(c.label for c in self.candidates).items() if n > 1]
        if dupes:
            raise ValueError(f"candidate label {dupes[0]!r} is used twice")
        for c in self.candidates:
            if c.overhead_model not in OVERHEAD_MODELS:
                raise ValueError(f"candidates.{c.label}: unknown overhead model {c.overhead_model!r}; known: "
                                 f"{', '.join(OVERHEAD_MODELS)}")
            self.space(c)
            self.search.make(c.n_trials)
        return self

    def regressor(self, c: Candidate):
        """The candidate's estimator: ``regressor_class`` with its physics and overhead model and this study's replay
        options."""
        return self.regressor_class(**c.physics, overhead_model=c.overhead_model, cpu_overlap=c.cpu_overlap,
                                    hardware=self.hardware,
                                    prefix=self.prefix, cached_prefill_pi=self.cached_prefill_pi,
                                    max_steps=self.max_steps, async_scheduling=self.async_scheduling)

    def space(self, c: Candidate) -> dict:
        return loaded_space(c.space, self.regressor(c).settings(), f"candidates.{c.label}.space")


def stage_table(spec: LoadedData, window_s: float | None, source: str = ""):
    """``(X, others)``: the load stages of the dense runs and those of the other runs.

    ``X`` holds every dense stage in full (scored) and, with ``window_s``, the
    same stages cut to their first ``window_s`` s (fitted; row ``<run>:<stage>@<w>s``, ``window_s`` set), as
    :func:`calib.replay.loaded.load_stages` writes them.  ``others``: the full stages of the MoE and overloaded runs.
    """
    import pandas as pd

    from calib.replay.loaded import load_stages

    def read(w):
        try:
            return load_stages(spec.data_dir, spec.runs, window_s=w, output_rule=spec.output_rule)
        except CalibError as exc:
            if exc.file is None and exc.field in ("data_dir", "runs"):
                raise StudyError(exc.message, file=source or None, field=exc.field) from None
            raise

    full = read(None)
    dense = full[full["group"] == "dense"]
    if dense["model"].nunique() < 2:
        raise StudyError("leave-one-model-out needs dense runs of at least two models", file=source or None,
                         field="runs")
    others = full[full["group"] != "dense"]
    if window_s is None:
        return dense, others
    win = read(window_s)
    win = win[win["group"] == "dense"]
    win.index = [f"{i}@{window_s:g}s" for i in win.index]
    X = pd.concat([win, dense])
    X.attrs["skipped"] = full.attrs.get("skipped", []) + win.attrs.get("skipped", [])
    return X, others


class SearchWindowSplit:
    """Leave one group out, fitting on the windowed rows of the other groups and scoring the group's full rows.

    Rows with a ``window_s`` (:func:`stage_table`) are fitted, rows without one are scored; when no row has a
    window every row is both, and this is ``LeaveOneGroupOut``.  With a ``dataset`` column (a table stacking
    load stages and synchronous experiments, :mod:`calib.studies.kinds.joint`) the rule holds per dataset: the
    rows of a dataset without any windowed row are both fitted and scored.  Groups in sorted order.
    """

    @staticmethod
    def _masks(X) -> tuple[np.ndarray, np.ndarray]:
        """``(fit, score)``: which rows the searches fit and which the held-out scores read."""
        windowed = X["window_s"].notna().to_numpy()
        parts = X["dataset"].astype(str).to_numpy() if "dataset" in X.columns else np.zeros(len(X), dtype=object)
        fit, score = np.ones(len(X), bool), np.ones(len(X), bool)
        for part in np.unique(parts):
            mine = parts == part
            if windowed[mine].any():
                fit[mine], score[mine] = windowed[mine], ~windowed[mine]
        return fit, score

    def split(self, X, y=None, groups=None):
        fit, score = self._masks(X)
        labels = np.asarray(groups).astype(str)
        for g in np.unique(labels[score]):
            yield np.flatnonzero(fit & (labels != g)), np.flatnonzero(score & (labels == g))

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return len(np.unique(np.asarray(groups).astype(str)[self._masks(X)[1]]))


def _estimator(calibrator, params: Mapping[str, Any]):
    """The calibrator's estimator at ``params`` (qualified names), unfitted."""
    from sklearn.base import clone

    from calib.settings import flat_name

    return clone(calibrator.estimator).set_params(**{flat_name(k): v for k, v in params.items()})


def heldout_flags(candidates, nested, X) -> list[dict]:
    """The held-out stages whose replay saturated, per (fold, seed, candidate): ``runaway`` when the measured
    stage stayed stable (:func:`calib.replay.loaded.saturation`); replayed again at each record's parameters."""
    named, out = dict(candidates), []
    for r in nested.records:
        rows = X.loc[[row["row"] for row in r["rows"]]]
        pred = _estimator(named[r["candidate"]], r["params"]).fit(rows).predict_all(rows)
        out += [{"fold": r["fold"], "seed": r["seed"], "candidate": r["candidate"], "row": str(i),
                 "run": str(rows.at[i, "run"]), "runaway": bool(pred.at[i, "runaway"])}
                for i in rows.index if pred.at[i, "saturated"]]
    return out


def seed_agreement(nested, tolerance: float) -> list[dict]:
    """Per outer fold and candidate: the spread over seeds of the train loss, and whether the seeds agree within
    ``tolerance`` (the search's convergence rule; None with one seed)."""
    from calib.calibrate.nested import spread

    out = []
    for f in nested.folds:
        for c in nested.candidates:
            losses = [r["train_loss"] for r in nested.records if (r["fold"], r["candidate"]) == (f["fold"], c)]
            out.append({"fold": f["fold"], "test_groups": f["test_groups"], "candidate": c,
                        "train_loss": spread(losses),
                        "converged": None if len(losses) < 2 else bool(max(losses) - min(losses) <= tolerance)})
    return out


def predict_rows(estimator, rows) -> list[dict]:
    """Measured and predicted stage means of ``rows`` under ``estimator`` (a LoadedRegressor), with APEs and
    saturation; a model the variant cannot time is a row ``supported: False`` with the reason."""
    from calib.estimators.loaded import LoadedRegressor
    from calib.metrics import METRICS
    from calib.replay.loaded import supports

    if not len(rows):  # a study without Mixtral or overloaded runs has nothing to report apart
        return []
    variant = estimator.settings().physics.variant
    ok = {m: supports(m, variant) for m in rows["model"].astype(str).unique()}
    good = rows[[ok[str(m)][0] for m in rows["model"]]]
    pred = estimator.fit(good).predict_all(good) if len(good) else None
    meas, out = LoadedRegressor.measured(rows), []
    for i, r in rows.iterrows():
        entry = {"row": str(i), "run": str(r["run"]), "model": str(r["model"]), "group": str(r["group"]),
                 "stage": int(r["stage"]), "rate": float(r["rate"]),
                 "measured": {m: float(meas.at[i, m]) for m in METRICS}}
        supported, why = ok[str(r["model"])]
        if not supported:
            out.append({**entry, "supported": False, "note": f"unsupported: {why}", "predicted": None, "ape": None,
                        "saturated": None, "runaway": None})
            continue
        p = {m: float(pred.at[i, m]) for m in METRICS}
        out.append({**entry, "supported": True, "note": "", "predicted": p,
                    "ape": {m: abs(p[m] - entry["measured"][m]) / entry["measured"][m] for m in METRICS},
                    "saturated": bool(pred.at[i, "saturated"]), "runaway": bool(pred.at[i, "runaway"])})
    return out


def group_figures(rows: Sequence[dict]) -> dict:
    """``{group: {metric: mean APE over runs}}`` of :func:`predict_rows` entries (supported rows; a run's stages
    weigh 1 / stages, as :data:`STAGE_AGGREGATION`)."""
    from calib.metrics import METRICS, group_weights

    out = {}
    for g in sorted({r["group"] for r in rows if r["supported"]}):
        sel = [r for r in rows if r["group"] == g and r["supported"]]
        w = group_weights([r["run"] for r in sel])
        out[g] = {m: float(np.average([r["ape"][m] for r in sel], weights=w)) for m in METRICS}
    return out


def fit_on_all(calibrator, X, others) -> dict:
    """Fit ``calibrator`` (every seed of its search) on the rows ``X``; per seed its best parameters, best-so-far
    curve and the predictions of ``others`` (:func:`predict_rows`), and per group the spread over seeds."""
    from sklearn.base import clone

    from calib.calibrate.nested import spread
    from calib.metrics import METRICS

    fitted = clone(calibrator).fit(X)
    seeds = [{"seed": s["seed"], "best_loss": s["best_loss"], "params": s["best_params"], "curve": s["curve"],
              "other_runs": predict_rows(_estimator(calibrator, s["best_params"]), others)}
             for s in fitted.search_result_.seeds]
    figures = [group_figures(s["other_runs"]) for s in seeds]
    groups = sorted(set().union(*figures)) if figures else []
    return {"params": fitted.best_params_, "train_loss": fitted.best_loss_, "converged": fitted.converged_,
            "study": fitted.study_name_, "seeds": seeds,
            "other_runs": {g: {m: spread([f[g][m] for f in figures]) for m in METRICS} for g in groups}}


def dataset_block(spec: LoadedData, X, others, runs: Sequence[LoadedRun], window_s: float | None) -> dict:
    """What the rows of a nested calibration were (results ``dataset``)."""
    windowed = X["window_s"].notna()
    return {"data_dir": data_label(spec.data_dir), "dense_runs": sorted(X["run"].unique()),
            "other_runs": {g: sorted(others.loc[others["group"] == g, "run"].unique()) for g in ("moe", "overloaded")},
            "models": sorted(X["model"].unique()), "window_s": window_s,
            "search_rows": int(windowed.sum()) if window_s else len(X), "heldout_rows": int((~windowed).sum()),
            "skipped": X.attrs.get("skipped", []), "output_rule": output_rule_text(runs),
            "other_runs_rule": OTHER_RUNS_RULE}


def heldout_block(summary: dict) -> dict:
    """The nested selection's held-out figures as a calibration file records them (metric -> median, min, max)."""
    return {"scheme": f"nested: outer leave-one-model-out, inner SelectBest (leave-one-model-out); median [min, max] "
                      f"over {len(summary['seeds'])} seeds", "aggregation": STAGE_AGGREGATION,
            **{f"{m}_mape": {k: h[k] for k in ("median", "min", "max")}
               for m, h in summary["selected"]["heldout"].items()}}


#: How the calibrating kinds split (results ``settings``).
CV_TEXT = {"outer_cv": "leave-one-model-out over the dense runs (fit: windowed stages of the other models; score: "
                       "full stages of the held-out model)",
           "inner_cv": "SelectBest: LeaveOneGroupOut by model on the training models' windowed stages (KFold(3) "
                       "over stages when one model remains)"}
