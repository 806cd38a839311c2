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

The search, its loss (weighted, capped APEs of the TTFT, TPOT and E2E means
of each training run, with the weights and cap of the study file) and the
folds are :mod:`calib.studies.loaded_search`: during the search each run can
be cut to the first ``window_s`` seconds of every load stage; held-out
evaluations always replay full traces.

Determinism and resumption: trials live in the study's Optuna storage and are
run by :func:`calib.calibrate.trials.tpe_search`, which seeds the TPE sampler of
each trial from the study's seed and the number of completed trials, so an
interrupted search resumes to the same trials as an uninterrupted one, and the
same study file gives the same results.  Each search's Optuna study name ends
with a hash of everything it depends on, so editing the study file starts new
searches instead of mixing old trials in.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

from pydantic import Field, field_validator, model_validator

from calib.physics.overhead import OVERHEAD_MODELS
from calib.replay.loaded import LoadedRun, describe_physics
from calib.studies.context import RunContext
from calib.studies.loaded_calibrations import CalibrationSpec, evaluate_calibration, resolve_calibration
from calib.studies.loaded_data import (LoadedData, check_physics, group_summaries, load_runs, output_rule_text,
                                       physics_settings, settings_block, without_scatter)
from calib.studies.loaded_search import (REPLAY_PARAMS, Objective, SearchSettings, cross_validate, final_fit,
                                         heldout_loss, parse_space, space_text, split_params, study_key)
from calib.studies.spec import Strict, StudyBase

KIND = "batched_calibration"


# ======================================================================================= schema


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
                                                                 OVERHEAD_MODELS[self.name].ranges().items()}
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
        return check_physics(v)

    @model_validator(mode="after")
    def _unique(self) -> "BatchedCalibrationSchema":
        names = [c.name for c in self.overhead_models]
        if len(set(names)) != len(names):
            raise ValueError("overhead models must be listed once each")
        return self


schema = BatchedCalibrationSchema


# ======================================================================================= run


def baseline_entries(spec_baseline: CalibrationSpec | None, runs: Sequence[LoadedRun], hardware: str,
                     scatter_points: int, ctx: RunContext) -> dict | None:
    """The synchronous-only calibration on the same runs (held out by construction)."""
    if spec_baseline is None:
        return None
    cal = resolve_calibration(spec_baseline, hardware, ctx)
    entries = evaluate_calibration(cal, runs, scatter_points=scatter_points)
    return {"calibration": cal.describe(), "text": cal.summary_text(), "runs": without_scatter(entries),
            "groups": group_summaries(entries)}


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
        cv["search_space"] = {k: space_text(v) for k, v in space.items()}
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
        "physics": describe_physics(physics_settings(base).physics_options()),
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
