"""Which roofline physics generalises to an unseen model under load?  Candidates under nested leave-one-model-out.

Each ``candidates`` entry is a :class:`~calib.calibrate.Calibrator` over :class:`~calib.LoadedRegressor`: a roofline
variant (v2.3, v2.4, v3) with fixed physics switches and an overhead model, searching ``space`` — physics constants
and switches (MFU rule and scales, mixed-step rule, bandwidth efficiency, v3's constant MFUs), the overhead
parameters and the client-side request latency.  The protocol is that of the ``batched_calibration`` kind: rows are
the load stages of the dense non-reasoning runs, the searches fit the first ``search.window_s`` seconds of every
stage and held-out scores replay full traces (:class:`~calib.studies.loaded_data.SearchWindowSplit`);
:func:`~calib.calibrate.nested.nested_cross_validate` leaves one model out and, in every outer fold and search seed,
:class:`~calib.calibrate.SelectBest` chooses a candidate by an inner leave-one-model-out, so the reported choice is
never made on an outer held-out score.  ``calibration.yaml`` is SelectBest's choice on all dense runs.  Every
candidate is also fitted with all its seeds on all dense runs; those fits predict the Mixtral runs (only v3 can time
a mixture-of-experts model; the others report them 'unsupported') and the overloaded runs.

The synchronous side of earlier versions (the same candidates scored on the 13 synchronous experiments with
``RooflineRegressor``) is left out: nested over five families it costs more than the loaded side; the
``overhead_models`` kind evaluates physics searched jointly (``joint``) on those experiments.
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
from calib.studies.schemas.physics import Results
from calib.studies.spec import Strict, StudyBase

__all__ = ["KIND", "schema", "run", "Results"]

KIND = "physics"


class Candidate(Strict):
    """A roofline variant with fixed physics, an overhead model, a search space and optionally its own budget."""

    label: str = Field(pattern=r"^[A-Za-z0-9_.@+-]+$")
    description: str = ""
    physics: dict[str, Any] = Field(default_factory=lambda: {"variant": "v2.3"})
    overhead_model: str = "per_layer_tp_power"
    space: dict[str, dict[str, Any]] = Field(min_length=1)
    n_trials: int | None = Field(default=None, ge=1)

    @field_validator("physics")
    @classmethod
    def _physics(cls, v: dict) -> dict:
        return check_physics(v)


class PhysicsSchema(StudyBase, LoadedData):
    kind: Literal["physics"]
    candidates: list[Candidate] = Field(min_length=1)
    search: LoadedSearch = LoadedSearch()
    objective: LoadedObjective = LoadedObjective()

    @model_validator(mode="after")
    def _check(self) -> "PhysicsSchema":
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

    def regressor(self, c: Candidate) -> LoadedRegressor:
        return LoadedRegressor(**c.physics, overhead_model=c.overhead_model, hardware=self.hardware,
                               prefix=self.prefix, cached_prefill_pi=self.cached_prefill_pi, max_steps=self.max_steps)

    def space(self, c: Candidate) -> dict:
        return loaded_space(c.space, self.regressor(c).settings(), f"candidates.{c.label}.space")


schema = PhysicsSchema


def run(spec: PhysicsSchema, ctx: RunContext) -> dict:
    X, others = stage_table(spec, spec.search.window_s, ctx.study_file)
    fit_rows = X[X["window_s"].notna()] if spec.search.window_s else X
    cands = [(c.label, Calibrator(spec.regressor(c), space=spec.space(c), objective=spec.objective.parse(),
                                  search=spec.search.make(c.n_trials), storage=ctx.url,
                                  study_name=f"{spec.name}-{c.label}", progress=ctx.progress))
             for c in spec.candidates]
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
        "candidates": [{"name": n, "description": c.description, "variant": cal.estimator.settings().physics.variant,
                        "physics": dict(c.physics), "overhead_model": c.overhead_model,
                        "space": describe_space(cal.space), "n_params": len(cal.space), "n_trials": trials[n],
                        "search": cal.search.describe(), "study_prefix": cal.study_name,
                        "fit": fit_on_all(cal, fit_rows, others)} for (n, cal), c in zip(cands, spec.candidates)],
        "summary": summary, "nested": nested.to_dict(),
        "flags": heldout_flags(cands, nested, X),
        "agreement": seed_agreement(nested, spec.search.tolerance),
        "recommended": {**rec, "heldout": heldout, "settings": calibration.settings.qualified(),
                        "other_runs": others_rec, "other_figures": group_figures(others_rec)},
        "settings": settings_block(spec, ctx, runs) | {
            "search": spec.search.model_dump(), "objective": spec.objective.model_dump(),
            "candidates": [c.model_dump() for c in spec.candidates], "seeds": {"search": seeds},
            "storage": ctx.storage_label, "trials": trials,
            **CV_TEXT,
            "sampler": f"optuna {spec.search.algorithm.upper()} via calib.calibrate, one Optuna study per "
                       "(candidate, training rows, seed); shared rows share studies",
            "samplers": [{"study": f"{c.study_name}-<fingerprint>-{spec.search.algorithm}-s<seed>",
                          "sampler": spec.search.algorithm, "seed": seeds, "trials": trials[n]} for n, c in cands]},
    }
