"""Which overhead model generalises to an unseen model under load?  Candidates under nested leave-one-model-out.

Each ``overhead_models`` entry is a :class:`~calib.calibrate.Calibrator` over
:class:`~calib.LoadedRegressor` with the study's fixed ``physics`` and that overhead model, searching the model's
ranges (``OVERHEAD_MODELS[name].ranges()``, overridden by ``space``) plus ``extra_search`` (the client-side request
latency).  Rows are the load stages of the dense non-reasoning runs
(:func:`~calib.studies.loaded_data.stage_table`): the searches fit the first ``search.window_s`` seconds of every
stage, held-out scores replay full traces (:class:`~calib.studies.loaded_data.SearchWindowSplit`).
:func:`~calib.calibrate.nested.nested_cross_validate` leaves one model out; in every outer fold and search seed
each candidate is fitted on the other models and :class:`~calib.calibrate.SelectBest` chooses among them by an
inner leave-one-model-out, so "the selected model" is scored on what the inner loop chose, never on its outer
score.  The recommended calibration (``calibration.yaml``) is SelectBest's choice on all dense runs
(:func:`~calib.calibrate.nested.select_on_all`).  Each candidate is also fitted with all its seeds on all dense
runs: its convergence, and its predictions of the runs no fold holds (Mixtral, overloaded runs).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from sklearn.base import clone

from calib.calibrate import Calibrator
from calib.calibrate.nested import nested_cross_validate, recommend, select_on_all, summarize
from calib.calibrate.search import budget
from calib.calibrate.space import describe_space
from calib.estimators.loaded import LoadedRegressor
from calib.physics.overhead import OVERHEAD_MODELS
from calib.studies.context import RunContext
from calib.studies.loaded_data import (CV_TEXT, STAGE_AGGREGATION, LoadedData, LoadedObjective, LoadedSearch,
                                       SearchWindowSplit, check_physics, dataset_block, fit_on_all, group_figures,
                                       heldout_block, heldout_flags, load_runs, loaded_space, predict_rows,
                                       seed_agreement, settings_block, stage_table)
from calib.studies.schemas.batched_calibration import Results
from calib.studies.spec import Strict, StudyBase

__all__ = ["KIND", "schema", "run", "Results"]

KIND = "batched_calibration"


class OverheadEntry(Strict):
    """One candidate: an overhead model, range overrides (``{low, high}`` per parameter), its own trial budget."""

    name: str
    space: dict[str, dict[str, Any]] = {}
    n_trials: int | None = Field(default=None, ge=1)


class BatchedCalibrationSchema(StudyBase, LoadedData):
    kind: Literal["batched_calibration"]
    physics: dict[str, Any] = Field(default_factory=lambda: {"variant": "v2.3"})
    overhead_models: list[OverheadEntry] = Field(min_length=1)
    extra_search: dict[str, dict[str, Any]] = {}
    search: LoadedSearch = LoadedSearch()
    objective: LoadedObjective = LoadedObjective()

    @field_validator("physics")
    @classmethod
    def _physics(cls, v: dict) -> dict:
        return check_physics(v)

    @model_validator(mode="after")
    def _check(self) -> "BatchedCalibrationSchema":
        dupes = [k for k, n in Counter(m.name for m in self.overhead_models).items() if n > 1]
        if dupes:
            raise ValueError(f"overhead model {dupes[0]!r} is listed twice")
        for m in self.overhead_models:
            if m.name not in OVERHEAD_MODELS:
                raise ValueError(f"unknown overhead model {m.name!r}; known: {', '.join(OVERHEAD_MODELS)}")
            self.space(m)
            self.search.make(m.n_trials)
        return self

    def regressor(self, overhead: str) -> LoadedRegressor:
        return LoadedRegressor(**self.physics, overhead_model=overhead, hardware=self.hardware, prefix=self.prefix,
                               cached_prefill_pi=self.cached_prefill_pi, max_steps=self.max_steps)

    def space(self, m: OverheadEntry) -> dict:
        ranges = {k: {"low": lo, "high": hi} for k, (lo, hi) in OVERHEAD_MODELS[m.name].ranges().items()}
        return loaded_space({**ranges, **m.space, **self.extra_search}, self.regressor(m.name).settings(),
                            f"overhead_models.{m.name}")


schema = BatchedCalibrationSchema


def run(spec: BatchedCalibrationSchema, ctx: RunContext) -> dict:
    X, others = stage_table(spec, spec.search.window_s, ctx.study_file)
    fit_rows = X[X["window_s"].notna()] if spec.search.window_s else X
    cands = [(m.name, Calibrator(spec.regressor(m.name), space=spec.space(m), objective=spec.objective.parse(),
                                 search=spec.search.make(m.n_trials), storage=ctx.url,
                                 study_name=f"{spec.name}-{m.name}", progress=ctx.progress))
             for m in spec.overhead_models]
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
        "study": spec.name, "kind": KIND, "description": spec.description, "aggregation": STAGE_AGGREGATION,
        "objective": spec.objective.parse().describe(),
        "dataset": dataset_block(spec, X, others, runs, spec.search.window_s),
        "candidates": [{"name": n, "description": "", "variant": c.estimator.settings().physics.variant,
                        "physics": dict(spec.physics), "overhead_model": n, "space": describe_space(c.space),
                        "n_params": len(c.space), "n_trials": trials[n],
                        "search": c.search.describe(), "study_prefix": c.study_name,
                        "fit": fit_on_all(c, fit_rows, others)} for n, c in cands],
        "summary": summary, "nested": nested.to_dict(),
        "flags": heldout_flags(cands, nested, X),
        "agreement": seed_agreement(nested, spec.search.tolerance),
        "recommended": {**rec, "heldout": heldout, "settings": calibration.settings.qualified(),
                        "other_runs": others_rec, "other_figures": group_figures(others_rec)},
        "settings": settings_block(spec, ctx, runs) | {
            "search": spec.search.model_dump(), "objective": spec.objective.model_dump(), "physics": spec.physics,
            "extra_search": spec.extra_search, "seeds": {"search": seeds}, "storage": ctx.storage_label,
            "trials": trials,
            **CV_TEXT,
            "sampler": f"optuna {spec.search.algorithm.upper()} via calib.calibrate, one Optuna study per "
                       "(candidate, training rows, seed); shared rows share studies",
            "samplers": [{"study": f"{c.study_name}-<fingerprint>-{spec.search.algorithm}-s<seed>",
                          "sampler": spec.search.algorithm, "seed": seeds,
                          "trials": trials[n]} for n, c in cands]},
    }

