"""Loaded-server validation: does a calibration made at concurrency 1 predict a busy vLLM? (issue 6, item 3)

Each calibration of the study file (the HG1 optimum, a fixed per-layer
overhead, the best overhead model of the generalization studies, a
synchronous fit of another roofline variant, ...) is resolved to a step model
and an overhead model *without looking at the loaded runs*, and every run of
``data/batched/`` is replayed with it (:mod:`calib.replay.loaded`).  Every
prediction is therefore held out.

Runs are grouped:

* ``dense``: the dense-model, non-reasoning runs (the accuracy figures);
* ``moe``: the Mixtral runs; replayed only under a step model with
  mixture-of-experts support (v3), otherwise reported as unsupported;
* ``overloaded``: the *reasoning* runs (the real server's queue grew without
  bound, most requests failed); replayed and reported apart, never averaged in.

The data fields, run loading and per-run entries are shared with the other
loaded-server kinds (:mod:`calib.studies.loaded_data`); calibration sources are
:mod:`calib.studies.loaded_calibrations`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from calib.studies.context import RunContext
from calib.studies.loaded_calibrations import CalibrationSpec, evaluate_calibration, resolve_calibration
from calib.studies.loaded_data import LoadedData, group_summaries, load_runs, output_rule_text, settings_block
from calib.studies.spec import StudyBase

KIND = "batched_validation"


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


def run(spec: BatchedValidationSchema, ctx: RunContext) -> dict:
    runs = load_runs(spec, ctx.study_file)
    cals = [resolve_calibration(c, spec.hardware, ctx) for c in spec.calibrations]
    primary = spec.primary or cals[0].label
    by_cal = {}
    for cal in ctx.track(cals, f"{spec.name}: replaying every run per calibration"):
        entries = evaluate_calibration(cal, runs, scatter_points=spec.scatter_points)
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
