"""The nested, multi-seed calibration of candidate loaded-server calibrators: what the ``batched_calibration``
and ``physics`` kinds share (they differ only in their candidates and their study-file fields).

Rows are the load stages of the dense runs; the searches fit the first ``search.window_s`` seconds of every
stage and held-out scores replay full traces (:class:`~calib.studies.loaded_data.SearchWindowSplit`);
:func:`~calib.calibrate.nested.nested_cross_validate` leaves one model out and, per outer fold and search seed,
:class:`~calib.calibrate.SelectBest` chooses by an inner leave-one-model-out.  The recommended calibration
(SelectBest on all dense runs) is written to ``calibration.yaml`` by the lead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sklearn.base import clone

from calib.calibrate import Calibrator
from calib.calibrate.nested import NestedResult, nested_cross_validate, recommend, select_on_all, summarize
from calib.calibrate.search import budget
from calib.calibrate.space import describe_space
from calib.studies.context import RunContext
from calib.studies.loaded_data import (CV_TEXT, STAGE_AGGREGATION, SearchWindowSplit, dataset_block, fit_on_all,
                                       group_figures, heldout_block, heldout_flags, load_runs, predict_rows,
                                       seed_agreement, settings_block, stage_table)

__all__ = ["Candidate", "Selection", "calibrators", "select", "save_calibration", "candidate_entries",
           "search_settings", "run_candidates"]

#: (name, estimator, space, n_trials, description: physics, overhead model, text) of one candidate
Candidate = tuple[str, Any, dict, "int | None", dict]


@dataclass
class Selection:
    """The nested evaluation of the candidates and the recommendation on all rows (what :func:`select` made)."""

    calibrators: list
    seeds: list[int]
    nested: NestedResult
    summary: dict
    recommended: dict
    chosen: Any  # the fitted SelectBest of the recommended seed


def calibrators(spec, ctx: RunContext, candidates: Sequence[Candidate]) -> list:
    """``(name, Calibrator)`` per candidate: the study's objective and search, the run's storage."""
    return [(name, Calibrator(est, space=space, objective=spec.objective.parse(), search=spec.search.make(n),
                              storage=ctx.url, study_name=f"{spec.name}-{name}", progress=ctx.progress))
            for name, est, space, n, _ in candidates]


def select(spec, cands: list, X, fit_rows, aggregation: str = STAGE_AGGREGATION) -> Selection:
    """Nested leave-one-model-out of ``cands`` on ``X`` (:class:`SearchWindowSplit`), and SelectBest on
    ``fit_rows`` per seed with the recommended pick (:func:`~calib.calibrate.nested.recommend`)."""
    seeds = list(spec.search.make().seeds)
    common = dict(groups="model", seeds=seeds, min_inner_groups=2)
    nested = nested_cross_validate(cands, X, outer_cv=SearchWindowSplit(), **common)
    nested.aggregation = aggregation
    summary = summarize(nested)
    rec, chosen = recommend(select_on_all(cands, fit_rows, **common), seeds)
    return Selection(cands, seeds, nested, summary, rec, chosen)


def save_calibration(spec, ctx: RunContext, sel: Selection, heldout: dict, rows_text: str):
    """The recommended calibration with its held-out figures and notes; written to ``calibration.yaml`` by the
    lead.  ``rows_text`` names the rows it was chosen and fitted on (``all 9 dense loaded runs``)."""
    rec = sel.recommended
    window = f"the first {spec.search.window_s:g} s of every load stage" if spec.search.window_s else "full traces"
    calibration = sel.chosen.calibration_.model_copy(update={"heldout": heldout, "notes": (
        f"study {spec.name}: {rec['candidate']}, chosen by SelectBest (inner leave-one-model-out) on "
        f"{rows_text} in {rec['votes'][rec['candidate']]} of {len(sel.seeds)} seeds; "
        f"fitted with seed {rec['seed']} (lowest train loss of those) on {window}; prefix={spec.prefix}, "
        f"cached_prefill_pi={spec.cached_prefill_pi} (LoadedRegressor options, not settings)")})
    if ctx.role == "lead":
        calibration.save(ctx.out_dir / "calibration.yaml")
    return calibration


def candidate_entries(cands: list, candidates: Sequence[Candidate], fit_rows, others) -> list[dict]:
    """The results entry of every candidate, with its fit (all seeds) on ``fit_rows`` predicting ``others``."""
    return [{"name": n, "description": meta["description"],
             "variant": cal.estimator.settings().physics.variant, "physics": meta["physics"],
             "overhead_model": meta["overhead_model"], "cpu_overlap": bool(meta.get("cpu_overlap", False)),
             "space": describe_space(cal.space), "n_params": len(cal.space),
             "n_trials": cal.search.n_trials or budget(len(cal.space)),
             "search": cal.search.describe(), "study_prefix": cal.study_name,
             "fit": fit_on_all(cal, fit_rows, others)}
            for (n, cal), (*_, meta) in zip(cands, candidates)]


def search_settings(spec, ctx: RunContext, cands: list, seeds: list[int], settings: dict) -> dict:
    """The search part of the results' settings block (``settings``: the kind's own, placed after the
    objective)."""
    trials = {n: c.search.n_trials or budget(len(c.space)) for n, c in cands}
    return {"search": spec.search.model_dump(), "objective": spec.objective.model_dump(), **settings,
            "seeds": {"search": seeds}, "storage": ctx.storage_label, "trials": trials,
            **CV_TEXT,
            "sampler": f"optuna {spec.search.algorithm.upper()} via calib.calibrate, one Optuna study per "
                       "(candidate, training rows, seed); shared rows share studies",
            "samplers": [{"study": f"{c.study_name}-<fingerprint>-{spec.search.algorithm}-s<seed>",
                          "sampler": spec.search.algorithm, "seed": seeds, "trials": trials[n]} for n, c in cands]}


def run_candidates(spec, ctx: RunContext, kind: str, candidates: Sequence[Candidate], settings: dict) -> dict:
    """Nested evaluation, recommendation and results of ``candidates``; ``settings`` joins the settings block."""
    X, others = stage_table(spec, spec.search.window_s, ctx.study_file)
    fit_rows = X[X["window_s"].notna()] if spec.search.window_s else X
    cands = calibrators(spec, ctx, candidates)
    sel = select(spec, cands, X, fit_rows)
    summary, rec, chosen, seeds, nested = sel.summary, sel.recommended, sel.chosen, sel.seeds, sel.nested
    heldout = heldout_block(summary)
    calibration = save_calibration(spec, ctx, sel, heldout, f"all {fit_rows['run'].nunique()} dense loaded runs")
    runs = load_runs(spec, ctx.study_file)
    others_rec = predict_rows(clone(chosen.best_estimator_.best_estimator_), others)
    return {
        "study": spec.name, "kind": kind, "description": spec.description, "aggregation": STAGE_AGGREGATION,
        "objective": spec.objective.parse().describe(),
        "dataset": dataset_block(spec, X, others, runs, spec.search.window_s),
        "candidates": candidate_entries(cands, candidates, fit_rows, others),
        "summary": summary, "nested": nested.to_dict(),
        "flags": heldout_flags(cands, nested, X),
        "agreement": seed_agreement(nested, spec.search.tolerance),
        "recommended": {**rec, "heldout": heldout, "settings": calibration.settings.qualified(),
                        "other_runs": others_rec, "other_figures": group_figures(others_rec)},
        "settings": settings_block(spec, ctx, runs) | search_settings(spec, ctx, cands, seeds, settings),
    }
