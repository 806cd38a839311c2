"""One calibration for both regimes: synchronous experiments and loaded-server runs, held out by model together.

Rows are a :func:`~calib.estimators.joint.stack` of the synchronous experiments (``dataset`` of the study file,
default the 13 embedded HG1 experiments; ``experiments`` keeps a subset) and the load stages of the dense
non-reasoning runs (:func:`~calib.studies.loaded_data.stage_table`: windowed for the searches, full for the
scores), predicted by :class:`~calib.estimators.joint.JointRegressor` — one set of settings for both, the
synchronous side replayed in ``corrected`` mode (no phantom step; TPOT = ΣE2E/ΣO like GuideLLM).  The objective
is the mean of the two datasets' losses (:meth:`JointRegressor.row_weights`).  Each candidate (a roofline variant
with fixed physics, an overhead model, a search space) is a :class:`~calib.calibrate.Calibrator`;
:func:`~calib.studies.loaded_nested.select` leaves one model out — its experiments and its runs together — and
per outer fold and seed :class:`~calib.calibrate.SelectBest` chooses by an inner leave-one-model-out.  A model with
experiments only (the Qwen models) is an outer fold scored on its experiments.

Held-out figures are reported per dataset (loaded: mean APE over runs; synchronous: mean APE over experiments)
and checked against ``targets`` (median over seeds of the selected candidate's nested figure).  The Mixtral and
overloaded runs are in no fold: the recommended calibration and every candidate's fit on all rows predict them
('unsupported' where the variant cannot time a mixture of experts).  ``calibration.yaml`` is SelectBest's choice
on all rows with its held-out figures; ``ship_to`` names where it is meant to be copied (never written here).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field
from sklearn.base import clone

from calib.calibrate.nested import spread, summarize
from calib.estimators.joint import JointRegressor, stack
from calib.metrics import group_weights
from calib.studies.context import RunContext
from calib.studies.loaded_data import (STAGE_AGGREGATION, CandidateStudy, dataset_block, group_figures, heldout_flags,
                                       load_runs, predict_rows, seed_agreement, settings_block, stage_table)
from calib.studies.loaded_nested import calibrators, candidate_entries, save_calibration, search_settings, select
from calib.studies.schemas.joint import Results
from calib.studies.spec import Strict, StudyBase

__all__ = ["KIND", "schema", "run", "Results", "targets", "run_figures", "SYNC_AGGREGATION"]

KIND = "joint"
METRICS = ("ttft", "tpot", "e2e")
SYNC_AGGREGATION = ("mean APE over the synchronous experiments, pooled over the outer folds (every experiment is "
                    "held out once per seed, with its model); predictions and measurements are experiment means")
JOINT_AGGREGATION = ("per outer fold the mean of the synchronous mean APE (over experiments) and the loaded mean "
                     "APE (over runs) of its held-out model, pooled over the folds (each fold weighs 1); descriptive")
CV = {"outer_cv": "leave-one-model-out over the synchronous experiments and the dense loaded runs together (fit: "
                  "every experiment and the windowed stages of the other models; score: the held-out model's "
                  "experiments and full stages)",
      "inner_cv": "SelectBest: LeaveOneGroupOut by model on the training rows (KFold(3) when one model remains)"}
DEFAULT_TARGETS = {"loaded_tpot": 0.05, "loaded_e2e": 0.05, "loaded_ttft": 0.07, "sync_tpot": 0.06, "sync_e2e": 0.10}


class Evidence(Strict):
    """Decode contexts and batch sizes of the step-time plot; per-request samples kept per run and candidate."""

    contexts: list[int] = Field(default_factory=lambda: [512, 2048, 8192], min_length=1)
    batches: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256], min_length=1)
    requests: int = Field(default=300, ge=10, le=5000)


class JointSchema(StudyBase, CandidateStudy):
    regressor_class: ClassVar[type] = JointRegressor
    kind: Literal["joint"]
    experiments: list[str] | None = Field(default=None, min_length=1)
    targets: dict[Literal[tuple(DEFAULT_TARGETS)], float] = Field(default_factory=lambda: dict(DEFAULT_TARGETS))
    run_target: float = Field(default=0.10, gt=0)
    evidence: Evidence = Evidence()
    ship_to: str | None = None
    lengths: Literal["reference", "numpy", "quantiles"] = "reference"

    def regressor(self, c):
        """The candidate's :class:`~calib.estimators.joint.JointRegressor`, its synchronous experiments replayed
        with this study's request ``lengths`` (:mod:`calib.data.lengths`)."""
        return super().regressor(c).set_params(lengths=self.lengths)


schema = JointSchema


def targets(summary_loaded: dict, summary_sync: dict, wanted: dict[str, float]) -> dict:
    """``{name: {measured, target, met}}``: the median over seeds of the selected candidate's nested held-out mean
    APE of ``name`` (``loaded_tpot`` reads ``summary_loaded``, ``sync_e2e`` ``summary_sync``), met when below.

    >>> s = {"selected": {"heldout": {"tpot": {"median": 0.043}}}}
    >>> targets(s, s, {"loaded_tpot": 0.05, "sync_tpot": 0.04})
    {'loaded_tpot': {'measured': 0.043, 'target': 0.05, 'met': True}, 'sync_tpot': {'measured': 0.043, 'target': 0.04, 'met': False}}
    """
    out = {}
    for name, target in wanted.items():
        side, metric = name.split("_", 1)
        summary = summary_loaded if side == "loaded" else summary_sync
        measured = float(summary["selected"]["heldout"][metric]["median"])
        out[name] = {"measured": measured, "target": float(target), "met": bool(measured < target)}
    return out


def run_figures(nested_loaded, stage_runs: dict[str, str], models: dict[str, str], target: float,
                metrics=("tpot", "e2e")) -> tuple[list[dict], dict]:
    """Per dense run the selected candidate's held-out APE (mean over the run's stages) per seed, as a spread, and
    whether every run's median over seeds is below ``target`` for ``metrics``."""
    per: dict[str, dict[str, list[float]]] = {}
    for seed in nested_loaded.seeds:
        rows = [row for c in nested_loaded.choices if c["seed"] == seed for row in c["rows"]]
        for run in sorted({stage_runs[r["row"]] for r in rows}):
            mine = [r for r in rows if stage_runs[r["row"]] == run]
            for m in METRICS:
                per.setdefault(run, {}).setdefault(m, []).append(float(np.mean([r["ape"][m] for r in mine])))
    out = []
    for run, figs in per.items():
        spreads = {m: spread(v) for m, v in figs.items()}
        out.append({"run": run, "model": models[run], **spreads,
                    "below": {m: bool(spreads[m]["median"] < target) for m in metrics}})
    worst = {m: max(out, key=lambda e: e[m]["median"])["run"] for m in metrics} if out else {}
    return out, {"target": target, "metrics": list(metrics), "worst": worst,
                 "met": bool(out) and all(all(e["below"].values()) for e in out),
                 "rule": "per dense run, the median over seeds of its held-out APE (selected candidate, mean over "
                         "the run's stages) is below the target"}


def _candidates(spec: JointSchema) -> list[tuple]:
    return [(c.label, spec.regressor(c), spec.space(c), c.n_trials,
             {"description": c.description, "physics": dict(c.physics), "overhead_model": c.overhead_model,
              "cpu_overlap": c.cpu_overlap})
            for c in spec.candidates]


def step_curves(name: str, settings, pairs, contexts, batches) -> list[dict]:
    """Decode-only step time (hardware + overhead, or their maximum with ``replay.cpu_overlap``, ms) against batch
    size for ``(model, tp)`` ``pairs`` and ``contexts`` under ``settings`` (:meth:`calib.physics.StepModel.step_us`
    of one :class:`~calib.physics.batch.StepBatch` step per batch size)."""
    from calib.physics import StepBatch, StepModel

    b = np.asarray(batches, dtype=np.int64)
    steps = np.repeat(np.arange(len(b)), b)
    zeros = np.zeros(len(b), dtype=np.int64)
    overhead = settings.overhead_model()
    overlap = settings.replay.cpu_overlap  # busy decode steps under async scheduling, as the loaded replay times them
    out = []
    for model, tp in pairs:
        sm = StepModel.build(model, tp, hardware=settings.physics.hardware, options=settings.physics_options())
        ovh = overhead.step_us({"n_prefill": zeros, "prefill_tokens": zeros, "n_decode": b}, sm.model.num_layers, tp)
        for context in contexts:
            batch = StepBatch.from_arrays(len(b), decode_step=steps, decode_pi=np.full(len(steps), context))
            out.append({"candidate": name, "model": model, "tp": int(tp), "context": int(context),
                        "batch": b.tolist(), "step_ms": (sm.step_us(batch, ovh, overlap=overlap) / 1e3).tolist(),
                        "overhead_ms": (np.asarray(ovh, dtype=float) / 1e3).tolist()})
    return out


def replay_evidence(name: str, settings, run, max_requests: int) -> dict:
    """One full-trace replay of a dense run under ``settings``: every k-th request's input length and TTFT
    (measured, predicted), per-stage means and TPOT by requests in flight (:func:`calib.replay.loaded.batch_profile`)."""
    from calib.replay.loaded import batch_profile, replay_run, run_report

    rep = replay_run(run, settings, record_steps=False)
    req = rep.trace.requests
    idx = np.arange(0, rep.n, max(1, -(-rep.n // max_requests)))

    def r(a):
        return [None if not np.isfinite(x) else round(float(x), 2) for x in np.asarray(a, dtype=float)[idx]]

    stages = [{"stage": s["stage"], "rate": s["rate"],
               **{f"{side}_{m}_ms": s[side][m]["mean"] for side in ("measured", "predicted") for m in METRICS}}
              for s in run_report(rep)["stages"]]
    return {"candidate": name, "run": run.name, "model": run.model, "stages": stages, "batch_profile": batch_profile(rep),
            "requests": {"input_tokens": req["input_tokens"].to_numpy()[idx].tolist(),
                         "stage": req["stage"].to_numpy()[idx].tolist(),
                         "measured_ttft_ms": r(rep.measured["ttft"]), "predicted_ttft_ms": r(rep.ttft_ms)}}


def run(spec: JointSchema, ctx: RunContext) -> dict:
    from calib.data import load_experiments

    loaded, others = stage_table(spec, spec.search.window_s, ctx.study_file)
    sync = load_experiments(spec.dataset)
    if spec.experiments is not None:
        unknown = sorted(set(spec.experiments) - set(sync.index))
        if unknown:
            from calib.errors import StudyError

            raise StudyError(f"unknown experiment {unknown[0]!r}", file=ctx.study_file or None, field="experiments")
        sync = sync.loc[list(spec.experiments)]
    X = stack(sync, loaded)
    fit_rows = X[(X["dataset"] == "sync") | X["window_s"].notna()] if spec.search.window_s else X
    others = stack(loaded=others) if len(others) else others.assign(dataset="loaded")
    candidates = _candidates(spec)
    cands = calibrators(spec, ctx, candidates)
    sel = select(spec, cands, X, fit_rows, JOINT_AGGREGATION)
    scored = X[X["window_s"].isna()]
    stages = scored[scored["dataset"] == "loaded"]
    nested_loaded = sel.nested.subset(dict(zip(stages.index, group_weights(stages["run"]))), STAGE_AGGREGATION)
    nested_sync = sel.nested.subset({i: 1.0 for i in X.index[X["dataset"] == "sync"]}, SYNC_AGGREGATION)
    summary_loaded, summary_sync = summarize(nested_loaded), summarize(nested_sync)
    heldout = {"scheme": f"nested: outer leave-one-model-out over synchronous experiments and dense loaded runs "
                         f"together, inner SelectBest (leave-one-model-out); median [min, max] over "
                         f"{len(sel.seeds)} seeds",
               "aggregation": {"loaded": STAGE_AGGREGATION, "sync": SYNC_AGGREGATION},
               **{f"{side}_{m}_mape": {k: h[k] for k in ("median", "min", "max")}
                  for side, sm in (("loaded", summary_loaded), ("sync", summary_sync))
                  for m, h in sm["selected"]["heldout"].items()}}
    n_runs, n_sync = stages["run"].nunique(), int((X["dataset"] == "sync").sum())
    calibration = save_calibration(spec, ctx, sel, heldout,
                                   f"all {n_runs} dense loaded runs and {n_sync} synchronous experiments")
    runs = load_runs(spec, ctx.study_file)
    others_rec = predict_rows(clone(sel.chosen.best_estimator_.best_estimator_), others)
    entries = candidate_entries(cands, candidates, fit_rows, others)
    flags = heldout_flags(cands, sel.nested, X)
    chosen = {(c["fold"], c["seed"], c["selected"]) for c in sel.nested.choices}
    mine = [f for f in flags if f["runaway"] and (f["fold"], f["seed"], f["candidate"]) in chosen]
    per_run, run_target = run_figures(nested_loaded, dict(zip(stages.index, stages["run"])),
                                      dict(zip(stages["run"], stages["model"])), spec.run_target)
    pairs = sorted({(str(m), int(t)) for m, t in zip(stages["model"], stages["tp"])})
    dense = [rd for rd in runs if rd.name in set(stages["run"])]
    ev = spec.evidence
    curves, replays = [], []
    for (name, cal), entry in zip(cands, entries):
        settings = cal.estimator.settings().with_values(entry["fit"]["params"])
        curves += step_curves(name, settings, pairs, ev.contexts, ev.batches)
        replays += [replay_evidence(name, settings, rd, ev.requests) for rd in dense]
    models = sorted(set(X["model"].astype(str)))
    return {
        "study": spec.name, "kind": KIND, "description": spec.description,
        "aggregation": {"loaded": STAGE_AGGREGATION, "sync": SYNC_AGGREGATION, "joint": JOINT_AGGREGATION},
        "objective": spec.objective.parse().describe() | {
            "datasets": "mean of the synchronous loss (experiments weigh equally) and the loaded loss (a run's "
                        "stages weigh 1 / stages): JointRegressor.row_weights"},
        "dataset": {"loaded": dataset_block(spec, loaded, others, runs, spec.search.window_s),
                    "sync": {"source": spec.dataset or "embedded hg1 (configs/datasets/hg1)",
                             "experiments": [str(i) for i in sync.index], "mode": "corrected",
                             "tpot_definition": "guidellm: sum E2E / sum O (GuideLLM's measured TPOT)",
                             "phantom_last_step": False, "lengths": spec.lengths},
                    "models": {m: {"experiments": [str(i) for i in sync.index[sync["model"] == m]],
                                   "loaded_runs": sorted(set(stages.loc[stages["model"] == m, "run"]))}
                               for m in models},
                    "groups": "model (a model's experiments and runs leave together)"},
        "candidates": entries,
        "summary": sel.summary, "summary_loaded": summary_loaded, "summary_sync": summary_sync,
        "nested": sel.nested.to_dict(), "flags": flags, "agreement": seed_agreement(sel.nested, spec.search.tolerance),
        "targets": targets(summary_loaded, summary_sync, spec.targets),
        "runs": per_run, "run_target": run_target,
        "runaway": {"any_selected": bool(mine), "any_candidate": any(f["runaway"] for f in flags), "selected": mine},
        "recommended": {**sel.recommended, "heldout": heldout, "settings": calibration.settings.qualified(),
                        "other_runs": others_rec, "other_figures": group_figures(others_rec)},
        "evidence": {"contexts": list(ev.contexts), "batches": list(ev.batches), "step_curves": curves,
                     "replays": replays,
                     "note": "each candidate at its fit on all rows (best seed), so in-sample for the dense runs; "
                             "per-request TTFT from one full-trace replay per run (every k-th request)"},
        "ship_to": spec.ship_to,
        "settings": settings_block(spec, ctx, runs) | search_settings(spec, ctx, cands, sel.seeds, {
            "candidates": [c.model_dump() for c in spec.candidates], "dataset": spec.dataset,
            "experiments": spec.experiments, "targets": dict(spec.targets), "run_target": spec.run_target,
            "evidence": ev.model_dump(), "ship_to": spec.ship_to}) | CV,
    }
