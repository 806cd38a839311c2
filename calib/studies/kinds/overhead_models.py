"""Which overhead model generalises? Candidates under nested cross-validation, seed by seed.

Each entry of ``models`` is a :class:`~calib.calibrate.Calibrator` over
:class:`~calib.RooflineRegressor` with that overhead model: the model's default
search ranges (``OVERHEAD_MODELS[name].ranges()``), overridden by ``space``,
plus physics searched jointly (``joint``: ``bw_efficiency``, ``mfu_rule``, MFU
scales).  :func:`~calib.calibrate.nested.nested_cross_validate` leaves one
``group`` (family) out; inside every outer fold and search seed each candidate
is fitted on the remaining families and :class:`~calib.calibrate.SelectBest`
chooses among them by an inner leave-one-family-out, so the held-out figure of
"the selected model" is that of what the inner loop chose.  The recommended
calibration is SelectBest's choice on all experiments (the candidate most seeds
choose), written to ``calibration.yaml``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from sklearn.model_selection import LeaveOneGroupOut

from calib.calibrate import Calibrator, Objective, Range, make_space, parse_search
from calib.calibrate.search import budget
from calib.calibrate.nested import AGGREGATION, nested_cross_validate, select_on_all, summarize
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
    """One candidate: an overhead model, search-range overrides, physics searched with it, its own budget."""

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
        """Validated space: the model's default ranges, ``space`` over them, then ``joint``."""
        if self.overhead not in OVERHEAD_MODELS:
            raise ValueError(f"unknown overhead model {self.overhead!r}; known: {', '.join(OVERHEAD_MODELS)}")
        ranges = OVERHEAD_MODELS[self.overhead].ranges()
        if set(self.space) - set(ranges):
            raise ValueError(f"{sorted(set(self.space) - set(ranges))[0]!r} is not a parameter of overhead model "
                             f"{self.overhead!r}; it has {', '.join(sorted(ranges))}")
        if any(not qualified_name(k).startswith("physics.") for k in self.joint):
            raise ValueError(f"joint parameters are physics settings, got {', '.join(sorted(self.joint))}")
        base = Settings.from_params({**estimator, "overhead_model": self.overhead})
        return make_space({**{k: Range(*v) for k, v in ranges.items()}, **self.space, **self.joint}, base)


class SearchSpec(Strict):
    """The search of every candidate: algorithm, trials per seed (default: ``budget(n_params)``), seeds."""

    algorithm: Literal["tpe", "cmaes"] = "tpe"
    n_trials: int | None = Field(default=None, ge=1)
    seeds: int | list[int] = 5
    options: dict[str, Any] = {}

    def make(self, n_trials: int | None = None):
        return parse_search({"algorithm": self.algorithm, "n_trials": n_trials or self.n_trials,
                             "seeds": self.seeds, "options": self.options})


class OverheadModelsSchema(StudyBase):
    """``studies/overhead-models.yaml``."""

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
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two models are labelled {Counter(labels).most_common(1)[0][0]!r}; give one a 'name'")
        for i, m in enumerate(self.models):
            try:
                Objective.parse(m.objective or self.objective), self.search.make(m.n_trials), m.search_space(est)
            except (CalibError, ValueError, KeyError) as exc:
                raise ValueError(f"models[{i}] ({m.label}): {getattr(exc, 'message', exc)}") from None
        return self


schema = OverheadModelsSchema


class Results(Typed):
    study: str
    kind: Literal["overhead_models"]
    mode: Literal["reference", "corrected"]
    tpot_definition: str
    phantom_last_step: bool
    aggregation: str
    candidates: list[dict[str, Any]]
    summary: dict[str, Any]
    nested: dict[str, Any]
    recommended: dict[str, Any]
    implied_overhead: dict[str, Any]
    settings: dict[str, Any]


def _implied_overhead(X, estimator: dict) -> dict:
    """Per experiment, the overhead per output token the measurement leaves to explain (measured TPOT minus TPOT
    at zero overhead), per layer under the reference scaling (x TP / L) and without TP (/ L)."""
    zero = RooflineRegressor(**estimator, overhead_model="per_layer", per_layer_us=0.0).fit(X).predict_all(X)
    rows = []
    for name, row in X.iterrows():
        L, tp = load_model(str(row["model"])).num_layers, int(row["tp"])
        us = (float(row["tpot_mean_ms"]) - float(zero.loc[name, "tpot"])) * 1e3
        rows.append({"experiment": str(name), "family": str(row["family"]), "tp": tp, "num_layers": L,
                     "tpot_measured_ms": float(row["tpot_mean_ms"]), "tpot_zero_overhead_ms": float(zero.loc[name, "tpot"]),
                     "us_per_token": us, "us_per_layer_x_tp": us * tp / L, "us_per_layer": us / L})
    keys = ("us_per_token", "us_per_layer_x_tp", "us_per_layer")
    cv = {k: float(np.std([r[k] for r in rows]) / abs(np.mean([r[k] for r in rows]))) for k in keys}
    return {"experiments": rows, "coefficient_of_variation": cv, "flattest": min(cv, key=cv.get)}


def run(spec: OverheadModelsSchema, ctx: RunContext) -> dict:
    X = load_experiments(spec.dataset)
    if spec.group not in X.columns or X[spec.group].nunique() < 2:
        raise StudyError(f"experiments table needs a column {spec.group!r} with two groups or more", field="group")
    est = {k: v for k, v in spec.estimator.items() if k != "target"}
    cands = [(m.label, Calibrator(RooflineRegressor(**spec.estimator, overhead_model=m.overhead),
                                  space=m.search_space(est), objective=m.objective or spec.objective,
                                  search=spec.search.make(m.n_trials), storage=ctx.url,
                                  study_name=f"{spec.name}-{m.label}", progress=ctx.progress)) for m in spec.models]
    seeds = list(spec.search.make().seeds)
    nested = nested_cross_validate(cands, X, outer_cv=LeaveOneGroupOut(), groups=spec.group, seeds=seeds,
                                   min_inner_groups=spec.min_inner_groups)
    summary = summarize(nested)
    finals = select_on_all(cands, X, groups=spec.group, seeds=seeds, min_inner_groups=spec.min_inner_groups)
    names = [n for n, _ in cands]
    votes = Counter(sel.best_name_ for sel in finals)
    inner = {n: float(np.mean([np.mean(sel.inner_scores_[n]) for sel in finals])) for n in names}
    best = max(names, key=lambda n: (votes[n], inner[n]))
    chosen = min((sel for sel in finals if sel.best_name_ == best), key=lambda sel: sel.best_estimator_.best_loss_)
    sel_heldout = summary["selected"]["heldout"]
    heldout = {"scheme": f"nested: outer leave-one-{spec.group}-out, inner SelectBest; median [min, max] over "
                         f"{len(seeds)} seeds", "aggregation": AGGREGATION,
               **{f"{m}_mape": {k: sel_heldout[m][k] for k in ("median", "min", "max")} for m in sel_heldout}}
    calibration = chosen.calibration_.model_copy(update={"heldout": heldout, "notes": (
        f"study {spec.name}: {best!r}, chosen by SelectBest (inner leave-one-{spec.group}-out) on all "
        f"{len(X)} experiments in {votes[best]} of {len(seeds)} seeds; the lowest train loss of those seeds")})
    if ctx.role == "lead":
        calibration.save(ctx.out_dir / "calibration.yaml")
    settings = RooflineRegressor(**spec.estimator).settings()
    return {
        "study": spec.name, "kind": KIND, "mode": settings.replay.mode, "tpot_definition": settings.replay.tpot,
        "phantom_last_step": settings.replay.phantom, "aggregation": AGGREGATION,
        "candidates": [{"name": n, "overhead": m.overhead, "joint": sorted(m.joint), "n_params": len(c.space),
                        "space": describe_space(c.space), "objective": Objective.parse(c.objective).describe(),
                        "search": c.search.describe(), "study_prefix": c.study_name} for (n, c), m in zip(cands, spec.models)],
        "summary": summary, "nested": nested.to_dict(),
        "recommended": {"candidate": best, "votes": dict(votes), "mean_inner_score": inner,
                        "per_seed": [{"seed": s, "chosen": sel.best_name_, "params": sel.best_estimator_.best_params_,
                                      "train_loss": sel.best_estimator_.best_loss_,
                                      "inner_mean": {n: float(np.mean(v)) for n, v in sel.inner_scores_.items()}}
                                     for s, sel in zip(seeds, finals)],
                        "params": chosen.best_estimator_.best_params_, "train_loss": chosen.best_estimator_.best_loss_,
                        "settings": calibration.settings.qualified(), "heldout": heldout,
                        "file": "calibration.yaml" if ctx.role == "lead" else None},
        "implied_overhead": _implied_overhead(X, est),
        "settings": {"study_file": ctx.study_file, "dataset": spec.dataset or "embedded hg1 (configs/datasets/hg1)",
                     "estimator": spec.estimator, "settings": settings.qualified(), "group": spec.group,
                     "outer_cv": f"LeaveOneGroupOut by {spec.group}",
                     "inner_cv": f"SelectBest: LeaveOneGroupOut by {spec.group} when >= {spec.min_inner_groups} "
                                 "groups remain, else KFold(3)",
                     "objective": f"train {Objective.parse(spec.objective).describe()}", "seeds": {"search": seeds,
                     "request_seed": settings.replay.seed}, "search": spec.search.model_dump(),
                     "trials": {n: c.search.n_trials or budget(len(c.space)) for n, c in cands},
                     "storage": ctx.storage_label, "request_seed": settings.replay.seed,
                     "lengths": settings.replay.lengths},
    }
