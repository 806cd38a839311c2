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
from calib.estimators.loaded import LoadedRegressor
from calib.physics.overhead import OVERHEAD_MODELS
from calib.studies.context import RunContext
from calib.studies.loaded_data import LoadedData, LoadedObjective, LoadedSearch, check_physics, loaded_space
from calib.studies.loaded_nested import run_candidates
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
    return run_candidates(spec, ctx, KIND, [
        (m.name, spec.regressor(m.name), spec.space(m), m.n_trials,
         {"description": "", "physics": dict(spec.physics), "overhead_model": m.name})
        for m in spec.overhead_models], {"physics": spec.physics, "extra_search": spec.extra_search})
