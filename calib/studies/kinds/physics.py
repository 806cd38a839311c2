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

from typing import ClassVar, Literal

from calib.estimators.loaded import LoadedRegressor
from calib.studies.context import RunContext
from calib.studies.loaded_data import CandidateStudy
from calib.studies.loaded_nested import run_candidates
from calib.studies.schemas.physics import Results
from calib.studies.spec import StudyBase

__all__ = ["KIND", "schema", "run", "Results"]

KIND = "physics"


class PhysicsSchema(StudyBase, CandidateStudy):
    regressor_class: ClassVar[type] = LoadedRegressor
    kind: Literal["physics"]


schema = PhysicsSchema


def run(spec: PhysicsSchema, ctx: RunContext) -> dict:
    return run_candidates(spec, ctx, KIND, [
        (c.label, spec.regressor(c), spec.space(c), c.n_trials,
         {"description": c.description, "physics": dict(c.physics), "overhead_model": c.overhead_model,
          "cpu_overlap": c.cpu_overlap})
        for c in spec.candidates], {"candidates": [c.model_dump() for c in spec.candidates]})
