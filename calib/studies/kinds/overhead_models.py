"""Which overhead model generalises to an unseen family?  Candidates under nested cross-validation, per seed.

Each ``models`` entry is a :class:`~calib.calibrate.Calibrator` over :class:`~calib.RooflineRegressor` with
that overhead model, searching its default ranges (``OVERHEAD_MODELS[name].ranges()``, overridden by
``space``) and any physics named under ``joint`` (``bw_efficiency``, ``mfu_rule``, MFU scales).
:func:`~calib.calibrate.nested.nested_cross_validate` leaves one ``group`` out; in every outer fold and
search seed each candidate is fitted on the other groups and :class:`~calib.calibrate.SelectBest` chooses
among them by an inner leave-one-group-out, so "the selected model" is scored on what the inner loop chose.
The recommended calibration (``calibration.yaml``) is SelectBest's choice on all experiments.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from sklearn.model_selection import LeaveOneGroupOut

from calib.calibrate import Calibrator, Objective, Range, make_space, parse_search
from calib.calibrate.nested import AGGREGATION, nested_cross_validate, recommend, select_on_all, summarize
from calib.calibrate.search import budget
from calib.calibrate.space import describe_space
from calib.data import load_experiments
from calib.errors import CalibError, StudyError
from calib.estimators.roofline import RooflineRegressor
from calib.physics.overhead import OVERHEAD_MODELS
from calib.settings import Settings, qualified_name
from calib.specs import load_model
from calib.studies.context import RunContext
from calib.studies.results import Typed
from calib.studies.spec import StudyBase, Strict

KIND = "overhead_models"


class ModelEntry(Strict):
    """One candidate: an overhead model, range overrides, physics searched with it, its own budget."""

    name: str | None = None
    overhead: str
    space: dict[str, dict[str, Any]] = {}
    joint: dict[str, dict[str, Any]] = {}
    objective: str | None = None
    n_trials: int | None = Field(default=None, ge=1)

    @property
    def label(self) -> str:
        return self.name or "+".join([self.overhead, *sorted(self.joint)])

    def search_space(self, estimator: dict) -> dict:
        if self.overhead not in OVERHEAD_MODELS:
            raise ValueError(f"unknown overhead model {self.overhead!r}; known: {', '.join(OVERHEAD_MODELS)}")
        ranges = OVERHEAD_MODELS[self.overhead].ranges()
        if set(self.space) - set(ranges):
            raise ValueError(f"{sorted(set(self.space) - set(ranges))[0]!r} is not a parameter of overhead model "
                             f"{self.overhead!r} (it has {', '.join(sorted(ranges))})")
        if any(not qualified_name(k).startswith("physics.") for k in self.joint):
            raise ValueError(f"joint parameters must be physics settings, got {', '.join(sorted(self.joint))}")
        base = Settings.from_params({**estimator, "overhead_model": self.overhead})
        return make_space({**{k: Range(*v) for k, v in ranges.items()}, **self.space, **self.joint}, base)


class SearchSpec(Strict):
    """Every candidate's search: algorithm, trials per seed (default ``budget(n_params)``), seeds, options."""

    algorithm: Literal["tpe", "cmaes"] = "tpe"
    n_trials: int | None = Field(default=None, ge=1)
    seeds: int | list[int] = 5
    options: dict[str, Any] = {}

    def make(self, n_trials: int | None = None):
        return parse_search({**self.model_dump(), "n_trials": n_trials or self.n_trials})


class OverheadModelsSchema(StudyBase):
    kind: Literal["overhead_models"]
    models: list[ModelEntry] = Field(min_length=1)
    objective: str = "tpot"
    search: SearchSpec = SearchSpec()
    group: str = "family"
    min_inner_groups: int = Field(default=3, ge=2)

    @model_validator(mode="after")
    def _check(self) -> "OverheadModelsSchema":
        est = {k: v for k, v in self.estimator.items() if k != "target"}
        if any(qualified_name(k).startswith("overhead.") for k in est):
            raise ValueError("the estimator block must not set the overhead: each model entry chooses its own")
        dupes = [k for k, n in Counter(m.label for m in self.models).items() if n > 1]
        if dupes:
            raise ValueError(f"two models are labelled {dupes[0]!r}; give one a 'name'")
        for i, m in enumerate(self.models):
            try:
                Objective.parse(m.objective or self.objective), self.search.make(m.n_trials), m.search_space(est)
            except (CalibError, ValueError) as exc:
                raise ValueError(f"models[{i}] ({m.label}): {getattr(exc, 'message', exc)}") from None
        return self


schema = OverheadModelsSchema


class Results(Typed):
    study: str
    kind: Literal["overhead_models"]
    mode: Literal["reference", "corrected"]
    tpot_definition: Literal["itl", "guidellm"]
    phantom_last_step: bool
    aggregation: str
    candidates: list[dict[str, Any]]
    summary: dict[str, Any]
    nested: dict[str, Any]
    recommended: dict[str, Any]
    implied_overhead: dict[str, Any]
    settings: dict[str, Any]


def implied_overhead(X, estimator: dict) -> dict:
    """Per experiment, the overhead the measurement leaves to explain: measured TPOT minus TPOT at zero overhead
    (µs per output token), also x TP / L and / L; with each column's coefficient of variation."""
    zero = RooflineRegressor(**estimator, overhead_model="per_layer", per_layer_us=0.0).fit(X).predict_all(X)
    rows = []
    for name, row in X.iterrows():
        L, tp, pred = load_model(str(row["model"])).num_layers, int(row["tp"]), float(zero.loc[name, "tpot"])
        us = (float(row["tpot_mean_ms"]) - pred) * 1e3
        rows.append({"experiment": str(name), "family": str(row["family"]), "tp": tp, "num_layers": L,
                     "tpot_measured_ms": float(row["tpot_mean_ms"]), "tpot_zero_overhead_ms": pred,
                     "us_per_token": us, "us_per_layer_x_tp": us * tp / L, "us_per_layer": us / L})
    keys = ("us_per_token", "us_per_layer_x_tp", "us_per_layer")
    cv = {k: float(np.std([r[k] for r in rows]) / abs(np.mean([r[k] for r in rows]))) for k in keys}
    return {"experiments": rows, "coefficient_of_variation": cv, "flattest": min(cv, key=cv.get)}


def run(spec: OverheadModelsSchema, ctx: RunContext) -> dict:
    X = load_experiments(spec.dataset)
    if spec.group not in X.columns or X[spec.group].nunique() < 2:
        raise StudyError(f"the experiments need a column {spec.group!r} with two groups or more", field="group")
    est = {k: v for k, v in spec.estimator.items() if k != "target"}
    cands = [(m.label, Calibrator(RooflineRegressor(**spec.estimator, overhead_model=m.overhead),
                                  space=m.search_space(est), objective=m.objective or spec.objective,
                                  search=spec.search.make(m.n_trials), storage=ctx.url,
                                  study_name=f"{spec.name}-{m.label}", progress=ctx.progress)) for m in spec.models]
    seeds = list(spec.search.make().seeds)
    common = dict(groups=spec.group, seeds=seeds, min_inner_groups=spec.min_inner_groups)
    nested = nested_cross_validate(cands, X, outer_cv=LeaveOneGroupOut(), **common)
    summary = summarize(nested)
    rec, chosen = recommend(select_on_all(cands, X, **common), seeds)
    heldout = {"scheme": f"nested: outer leave-one-{spec.group}-out, inner SelectBest; median [min, max] over "
                         f"{len(seeds)} seeds", "aggregation": AGGREGATION, **{f"{m}_mape": {k: h[k] for k in (
                             "median", "min", "max")} for m, h in summary["selected"]["heldout"].items()}}
    calibration = chosen.calibration_.model_copy(update={"heldout": heldout, "notes": (
        f"study {spec.name}: {rec['candidate']}, chosen by SelectBest (inner leave-one-{spec.group}-out) on all "
        f"{len(X)} experiments in {rec['votes'][rec['candidate']]} of {len(seeds)} seeds; fitted with seed "
        f"{rec['seed']}, the lowest train loss of those")})
    if ctx.role == "lead":
        calibration.save(ctx.out_dir / "calibration.yaml")
    settings, w = RooflineRegressor(**spec.estimator).settings(), dict(Objective.parse(spec.objective).weights)
    trials = {n: c.search.n_trials or budget(len(c.space)) for n, c in cands}
    return {
        "study": spec.name, "kind": KIND, "mode": settings.replay.mode, "tpot_definition": settings.replay.tpot,
        "phantom_last_step": settings.replay.phantom, "aggregation": AGGREGATION, "summary": summary,
        "candidates": [{"name": n, "overhead": m.overhead, "joint": sorted(m.joint), "n_params": len(c.space),
                        "space": describe_space(c.space), "objective": Objective.parse(c.objective).describe(),
                        "search": c.search.describe(), "study_prefix": c.study_name}
                       for (n, c), m in zip(cands, spec.models)],
        "nested": nested.to_dict(),
        "recommended": {**rec, "heldout": heldout, "settings": calibration.settings.qualified()},
        "implied_overhead": implied_overhead(X, est),
        "settings": {"study_file": ctx.study_file, "dataset": spec.dataset or "embedded hg1 (configs/datasets/hg1)",
                     "estimator": spec.estimator, "settings": settings.qualified(), "group": spec.group,
                     "search": spec.search.model_dump(), "outer_cv": f"LeaveOneGroupOut by {spec.group}",
                     "inner_cv": f"LeaveOneGroupOut by {spec.group}, or KFold(3) when fewer than "
                                 f"{spec.min_inner_groups} groups remain",
                     "objective": " + ".join(f"{v:g} × {m.upper()}" for m, v in w.items())
                                  + " mean APE over the train experiments",
                     "sampler": f"{spec.search.algorithm} (calib.calibrate): an Optuna study per candidate, rows, seed",
                     "samplers": [{"study": f"{c.study_name}-<fingerprint>-{spec.search.algorithm}-s<seed>",
                                   "sampler": spec.search.algorithm, "seed": seeds, "trials": trials[n]}
                                  for n, c in cands],
                     "trials": trials, "seeds": {"search": seeds, "request_seed": settings.replay.seed},
                     "storage": ctx.storage_label, "request_seed": settings.replay.seed},
    }
