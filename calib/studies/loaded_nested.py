"""The nested, multi-seed calibration of candidate loaded-server calibrators: what the ``batched_calibration``
and ``physics`` kinds share (they differ only in their candidates and their study-file fields).

Rows are the load stages of the dense runs; the searches fit the first ``search.window_s`` seconds of every
stage and held-out scores replay full traces (:class:`~calib.studies.loaded_data.SearchWindowSplit`);
:func:`~calib.calibrate.nested.nested_cross_validate` leaves one model out and, per outer fold and search seed,
:class:`~calib.calibrate.SelectBest` chooses by an inner leave-one-model-out.  The recommended calibration
(SelectBest on all dense runs) is written to ``calibration.yaml`` by the lead.
"""

from __future__ import annotations

from typing import Any, Sequence

from sklearn.base import clone

from calib.calibrate import Calibrator
from calib.calibrate.nested import nested_cross_validate, recommend, select_on_all, summarize
from calib.calibrate.search import budget
from calib.calibrate.space import describe_space
from calib.studies.context import RunContext
from calib.studies.loaded_data import (CV_TEXT, STAGE_AGGREGATION, SearchWindowSplit, dataset_block, fit_on_all,
                                       group_figures, heldout_block, heldout_flags, load_runs, predict_rows,
                                       seed_agreement, settings_block, stage_table)

__all__ = ["Candidate", "run_candidates"]

#: (name, estimator, space, n_trials, description: physics, overhead model, text) of one candidate
Candidate = tuple[str, Any, dict, "int | None", dict]


def run_candidates(spec, ctx: RunContext, kind: str, candidates: Sequence[Candidate], settings: dict) -> dict:
    """Nested evaluation, recommendation and results of ``candidates``; ``settings`` joins the settings block."""
    X, others = stage_table(spec, spec.search.window_s, ctx.study_file)
    fit_rows = X[X["window_s"].notna()] if spec.search.window_s else X
    cands = [(name, Calibrator(est, space=space, objective=spec.objective.parse(), search=spec.search.make(n),
                               storage=ctx.url, study_name=f"{spec.name}-{name}", progress=ctx.progress))
             for name, est, space, n, _ in candidates]
    seeds = list(spec.search.make().seeds)
    common = dict(groups="model", seeds=seeds, min_inner_groups=2)
    nested = nested_cross_validate(cands, X, outer_cv=SearchWindowSplit(), **common)
    nested.aggregation = STAGE_AGGREGATION  # rows are load stages weighted 1 / stages of the run, not experiments
    summary = summarize(nested)
    rec, chosen = recommend(select_on_all(cands, fit_rows, **common), seeds)
    heldout = heldout_block(summary)
    window = f"the first {spec.search.window_s:g} s of every load stage" if spec.search.window_s else "full traces"
    calibration = chosen.calibration_.model_copy(update={"heldout": heldout, "notes": (
        f"study {spec.name}: {rec['candidate']}, chosen by SelectBest (inner leave-one-model-out) on all "
        f"{fit_rows['run'].nunique()} dense loaded runs in {rec['votes'][rec['candidate']]} of {len(seeds)} seeds; "
        f"fitted with seed {rec['seed']} (lowest train loss of those) on {window}; prefix={spec.prefix}, "
        f"cached_prefill_pi={spec.cached_prefill_pi} (LoadedRegressor options, not settings)")})
    if ctx.role == "lead":
        calibration.save(ctx.out_dir / "calibration.yaml")
    runs = load_runs(spec, ctx.study_file)
    others_rec = predict_rows(clone(chosen.best_estimator_.best_estimator_), others)
    trials = {n: c.search.n_trials or budget(len(c.space)) for n, c in cands}
    return {
        "study": spec.name, "kind": kind, "description": spec.description, "aggregation": STAGE_AGGREGATION,
        "objective": spec.objective.parse().describe(),
        "dataset": dataset_block(spec, X, others, runs, spec.search.window_s),
        "candidates": [{"name": n, "description": meta["description"],
                        "variant": cal.estimator.settings().physics.variant, "physics": meta["physics"],
                        "overhead_model": meta["overhead_model"], "space": describe_space(cal.space), "n_params": len(cal.space), "n_trials": trials[n],
                        "search": cal.search.describe(), "study_prefix": cal.study_name,
                        "fit": fit_on_all(cal, fit_rows, others)}
                       for (n, cal), (*_, meta) in zip(cands, candidates)],
        "summary": summary, "nested": nested.to_dict(),
        "flags": heldout_flags(cands, nested, X),
        "agreement": seed_agreement(nested, spec.search.tolerance),
        "recommended": {**rec, "heldout": heldout, "settings": calibration.settings.qualified(),
                        "other_runs": others_rec, "other_figures": group_figures(others_rec)},
        "settings": settings_block(spec, ctx, runs) | {
            "search": spec.search.model_dump(), "objective": spec.objective.model_dump(), **settings,
            "seeds": {"search": seeds}, "storage": ctx.storage_label, "trials": trials,
            **CV_TEXT,
            "sampler": f"optuna {spec.search.algorithm.upper()} via calib.calibrate, one Optuna study per "
                       "(candidate, training rows, seed); shared rows share studies",
            "samplers": [{"study": f"{c.study_name}-<fingerprint>-{spec.search.algorithm}-s<seed>",
                          "sampler": spec.search.algorithm, "seed": seeds, "trials": trials[n]} for n, c in cands]},
    }
