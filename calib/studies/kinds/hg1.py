"""The HG1 protocol: grid-search one overhead parameter on a fixed train split, validate on all.

Phases run in order; a phase with ``around`` searches ``optimum ± radius`` of
an earlier phase in steps of ``step`` (clipped at the first phase's low end).
The optimum of a phase is its lowest train objective; ties go to the smaller
parameter value, so the result never depends on trial order.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import Field, model_validator

from calib.data import load_experiments
from calib.errors import StudyError
from calib.estimator import RooflineRegressor
from calib.specs import load_model
from calib.studies.context import RunContext
from calib.studies.criteria import evaluate_criteria
from calib.studies.evaluate import evaluate
from calib.studies.search import grid_search
from calib.studies.spec import METRICS, Criterion, GridRange, StudyBase, Strict

KIND = "hg1"


class SplitSpec(Strict):
    """Either a column of the experiments table holding ``train``/``test``, or explicit lists."""

    column: str | None = "hg1_split"
    train: list[str] | None = None
    test: list[str] | None = None


class Phase(Strict):
    name: str
    grid: GridRange | None = None
    around: str | None = None
    radius: float | None = Field(default=None, gt=0)
    step: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_form(self) -> "Phase":
        if (self.grid is None) == (self.around is None):
            raise ValueError("a phase needs either 'grid' or 'around' (+ 'radius', 'step')")
        if self.around is not None and (self.radius is None or self.step is None):
            raise ValueError("a phase 'around' an optimum needs 'radius' and 'step'")
        return self


class GridStudyMixin(StudyBase):
    """Fields shared by every grid-search study (the HG1 search settings)."""

    parameter: str = "per_layer_overhead_us"
    objective: str = "tpot_mape"
    phases: list[Phase] = Field(min_length=1)
    criteria: list[Criterion] = []

    @model_validator(mode="after")
    def _check_search(self):
        if self.objective not in METRICS:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(METRICS)}")
        if self.parameter not in RooflineRegressor().get_params():
            raise ValueError(f"unknown estimator parameter {self.parameter!r}")
        names = []
        for ph in self.phases:
            if ph.around is not None and ph.around not in names:
                raise ValueError(f"phase {ph.name!r} searches around unknown earlier phase {ph.around!r}")
            names.append(ph.name)
        if self.phases[0].grid is None:
            raise ValueError("the first phase needs a 'grid'")
        return self


class HG1Schema(GridStudyMixin):
    kind: Literal["hg1"]
    split: SplitSpec = SplitSpec()
    validation: list[float | Literal["optimum"]] = ["optimum", 100.0, 0.0]

    @model_validator(mode="after")
    def _check_validation(self) -> "HG1Schema":
        if "optimum" not in self.validation:
            raise ValueError("validation must include 'optimum' (the criteria and tables are read there)")
        return self


schema = HG1Schema


def resolve_split(spec: SplitSpec, X: pd.DataFrame, source: str) -> tuple[list[str], list[str]]:
    """Train and test experiment names, in table order; errors name the study file and key."""
    names = [str(i) for i in X.index]
    if spec.train is not None or spec.test is not None:
        train, test = list(spec.train or []), list(spec.test or [])
        for key, lst in (("split.train", train), ("split.test", test)):
            unknown = [e for e in lst if e not in names]
            if unknown:
                raise StudyError(f"unknown experiment {unknown[0]!r}", file=source, field=key)
        if not test:
            test = [e for e in names if e not in train]
    else:
        if spec.column not in X.columns:
            raise StudyError(f"experiments table has no column {spec.column!r}", file=source, field="split.column")
        labels = X[spec.column].astype(str)
        train = [n for n, s in zip(names, labels) if s == "train"]
        test = [n for n, s in zip(names, labels) if s == "test"]
    if not train or not test:
        raise StudyError("the split leaves an empty train or test set", file=source, field="split")
    order = {n: i for i, n in enumerate(names)}
    return sorted(train, key=order.get), sorted(test, key=order.get)


def _key(v: float) -> str:
    return f"{v:g}"


def run(spec: HG1Schema, ctx: RunContext) -> dict:
    X = load_experiments(spec.dataset)
    train, test = resolve_split(spec.split, X, ctx.study_file)
    base = RooflineRegressor(**spec.estimator).get_params()
    metric = spec.objective.removesuffix("_mape")
    Xtrain = X.loc[train]

    def objective(value: float):
        ev = evaluate(Xtrain, {**base, spec.parameter: value})
        return float(ev[f"{metric}_ape"].mean()), {
            "train_tpot_mape": float(ev["tpot_ape"].mean()),
            "train_e2e_mape": float(ev["e2e_ape"].mean()),
            "train_ttft_mape": float(ev["ttft_ape"].mean()),
        }

    landscape: list[dict] = []
    optima: dict[str, float] = {}
    low_bound = spec.phases[0].grid.low
    for ph in spec.phases:
        if ph.grid is not None:
            values = ph.grid.values()
        else:
            centre = optima[ph.around]
            n = int(round(ph.radius / ph.step))
            values = sorted({round(centre + i * ph.step, 9) for i in range(-n, n + 1)
                             if centre + i * ph.step >= low_bound})
        trials = grid_search(f"{spec.name}-{ph.name}", ctx.storage, spec.parameter, values, objective,
                             progress=ctx.progress, desc=f"{spec.name} {ph.name}")
        best = min(trials, key=lambda v: (trials[v].value, v))
        optima[ph.name] = best
        for v, t in trials.items():
            landscape.append({"phase": ph.name, spec.parameter: v, "overhead_us": v,
                              "objective": float(t.value), **{k: float(t.user_attrs[k]) for k in
                                                              ("train_tpot_mape", "train_e2e_mape",
                                                               "train_ttft_mape")}})
    optimum = optima[spec.phases[-1].name]

    # validation on every experiment at the optimum and the fixed points
    points = {("optimum" if p == "optimum" else _key(float(p))): (optimum if p == "optimum" else float(p))
              for p in spec.validation}
    evals = {k: evaluate(X, {**base, spec.parameter: v}) for k, v in points.items()}
    split_of = {n: ("train" if n in train else "test") for n in X.index}
    experiments = []
    for name, row in X.iterrows():
        L = load_model(str(row["model"])).num_layers
        experiments.append({
            "experiment": str(name), "split": split_of[name], "family": str(row["family"]), "tp": int(row["tp"]),
            "workload": str(row["workload"]), "model": str(row["model"]),
            "measured": {"ttft_ms": float(row["ttft_mean_ms"]), "tpot_ms": float(row["tpot_mean_ms"]),
                         "e2e_ms": float(row["e2e_mean_ms"])},
            "predicted": {k: {"ttft_ms": float(ev.loc[name, "ttft"]), "tpot_ms": float(ev.loc[name, "tpot"]),
                              "e2e_ms": float(ev.loc[name, "e2e"])} for k, ev in evals.items()},
            **{f"{m}_ape": {k: float(ev.loc[name, f"{m}_ape"]) for k, ev in evals.items()}
               for m in ("tpot", "e2e", "ttft")},
            "overlapped_requests": {k: int(ev.loc[name, "overlapped"]) for k, ev in evals.items()},
            "effective_overhead_us_per_step": optimum * L / int(row["tp"]) if spec.parameter ==
            "per_layer_overhead_us" else None,
        })
    members = {"train": train, "test": test, "all": [str(i) for i in X.index]}
    splits = {s: {f"{m}_mape": {k: float(ev.loc[names, f"{m}_ape"].mean()) for k, ev in evals.items()}
                  for m in ("tpot", "e2e", "ttft")} for s, names in members.items()}
    families = {}
    for fam in sorted(X["family"].astype(str).unique()):
        names = [str(n) for n in X.index[X["family"].astype(str) == fam]]
        families[fam] = {"experiments": names, **{f"{m}_mape": {k: float(ev.loc[names, f"{m}_ape"].mean())
                                                                  for k, ev in evals.items()}
                                                   for m in ("tpot", "e2e", "ttft")}}
    at_opt = {f"{m}_mape": {s: splits[s][f"{m}_mape"]["optimum"] for s in members} for m in ("tpot", "e2e", "ttft")}
    criteria = evaluate_criteria(spec.criteria, at_opt) if "optimum" in points else []
    worst = max(experiments, key=lambda e: e["tpot_ape"].get("optimum", 0.0))
    phase_optima = {f"{ph}_optimum_us": v for ph, v in optima.items()}
    est = RooflineRegressor(**base)
    return {
        "study": spec.name,
        "kind": KIND,
        **phase_optima,
        "optimum_us": optimum,
        "mode": base["mode"],
        "tpot_definition": est._tpot_def,
        "phantom_last_step": est._phantom,
        "landscape": landscape,
        "experiments": experiments,
        "splits": splits,
        "families": families,
        "criteria": criteria,
        "verdict": "PASS" if criteria and all(c["passed"] for c in criteria) else "FAIL",
        "worst_experiment": {"experiment": worst["experiment"], "tpot_ape": worst["tpot_ape"].get("optimum")},
        "settings": {
            "study_file": ctx.study_file,
            "dataset": spec.dataset or "embedded hg1 (configs/datasets/hg1)",
            "estimator": base,
            "parameter": spec.parameter,
            "objective": f"train mean {spec.objective}",
            "phases": [ph.model_dump(exclude_none=True) for ph in spec.phases],
            "validation": list(points),
            "split": {"train": train, "test": test},
            "sampler": "grid: every value enqueued once as an Optuna trial (calib.studies.search.grid_search)",
            "storage": ctx.storage_label,
            "request_seed": base["seed"],
            "lengths": base["lengths"],
        },
    }
