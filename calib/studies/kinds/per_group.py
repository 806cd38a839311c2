"""Leave-one-group-out and group k-fold: does a train optimum carry over to an unseen family, TP or workload?

For every grouping column (model family, TP degree, workload type) and every
group splitter (``LeaveOneGroupOut``, ``GroupKFold``), the HG1 search runs on
the train fold and the held-out groups are predicted at its optimum.  Reported
per fold and overall: held-out TPOT, E2E and TTFT MAPE, next to the same folds
at fixed reference values (100 µs: the analytical default) and at the
optimum of all experiments (the single global constant).

Per-experiment errors at each grid value are computed once and shared by all
folds of all groupings (:mod:`calib.studies.apematrix`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from calib.data import load_experiments
from calib.estimators.roofline import RooflineRegressor
from calib.studies.apematrix import (GridApe, Predictions, SplitterSpec, build_folds, grid_store, phased_optima,
                                     require_columns, store_record, worker_result)
from calib.studies.context import RunContext
from calib.studies.common import GridStudyMixin
from calib.studies.spec import Strict

KIND = "per_group"

__all__ = ["KIND", "schema", "run", "GroupScheme", "heldout_metrics"]


class GroupScheme(Strict):
    """A group splitter, applied to each grouping column in turn."""

    type: Literal["leave_one_group_out", "group_kfold"]
    n_splits: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _check(self) -> "GroupScheme":
        if self.type == "group_kfold" and self.n_splits is None:
            raise ValueError("group_kfold needs n_splits (>= 2)")
        return self


class PerGroupSchema(GridStudyMixin):
    """``studies/per-group.yaml``."""

    kind: Literal["per_group"]
    groups: list[str] = Field(default=["family", "tp", "workload"], min_length=1)
    schemes: list[GroupScheme] = Field(default=[GroupScheme(type="leave_one_group_out")], min_length=1)
    reference_points: list[float] = [100.0]


schema = PerGroupSchema

_METRICS = ("tpot", "e2e", "ttft")


def heldout_metrics(P: Predictions, row: int, idx: np.ndarray) -> dict[str, float]:
    """``{tpot_mape, e2e_mape, ttft_mape}`` of candidate ``row`` over experiment positions ``idx``."""
    return {f"{m}_mape": float(P.ape(m)[row, idx].mean()) for m in _METRICS}


def _aggregate(folds: list[dict], point: str) -> dict:
    """Mean over folds, worst fold and pooled (over held-out experiments) MAPEs at ``point``."""
    key = "heldout" if point == "optimum" else f"heldout_at_{point}"
    out = {}
    for m in _METRICS:
        vals = [f[key][f"{m}_mape"] for f in folds]
        out[f"{m}_mape"] = float(np.mean(vals))
        out[f"worst_fold_{m}_mape"] = float(np.max(vals))
        # pooled: every held-out experiment's APE (an experiment held out k times counts k times)
        out[f"pooled_{m}_mape"] = float(np.mean([e[f"{m}_ape"][point] for f in folds for e in f["per_experiment"]]))
    return out


def run(spec: PerGroupSchema, ctx: RunContext) -> dict:
    early = worker_result(spec, ctx, KIND)
    if early is not None:
        return early
    X = load_experiments(spec.dataset)
    src = ctx.study_file
    require_columns(X, spec.groups, src, "groups")
    plan = []  # (group, scheme, folds), all checked before any replay
    for gi, g in enumerate(spec.groups):
        for si, sch in enumerate(spec.schemes):
            sp = SplitterSpec(type=sch.type, group=g, n_splits=sch.n_splits)
            plan.append((g, sp, build_folds(sp, X, src, f"schemes[{si}] (group {g!r})")))
    base = RooflineRegressor(**spec.estimator).resolved_params()
    est = RooflineRegressor(**base)
    names = [str(i) for i in X.index]
    all_idx = np.arange(len(names))
    metric = spec.objective.removesuffix("_mape")
    last = spec.phases[-1].name

    store = grid_store(spec, X, ctx, base)
    grid = GridApe(store, spec.parameter)
    all_folds = [f for _, _, fs in plan for f in fs]
    optima = phased_optima(grid, spec.phases, [f.train_idx for f in all_folds] + [all_idx], metric, desc=spec.name)
    global_opt = optima[-1][last]
    refs = {f"{v:g}": float(v) for v in spec.reference_points}
    values = sorted({o[last] for o in optima} | set(refs.values()))
    P = grid.predictions(values)
    row = {v: i for i, v in enumerate(values)}
    points = {"optimum": None, **refs, "global_optimum": global_opt}

    schemes = []
    k = 0
    for g, sp, folds in plan:
        labels = X[g].astype(str).to_numpy()
        out_folds = []
        for fold in folds:
            opt = optima[k][last]
            k += 1
            at = {p: (opt if v is None else v) for p, v in points.items()}
            heldout = {p: heldout_metrics(P, row[v], fold.test_idx) for p, v in at.items()}
            train = heldout_metrics(P, row[opt], fold.train_idx)
            out_folds.append({
                "test_groups": sorted(set(labels[fold.test_idx].tolist())),
                "train": list(fold.train), "test": list(fold.test),
                "optimum_us": opt, **{f"{ph}_optimum_us": v for ph, v in optima[k - 1].items()},
                "train_tpot_mape": train["tpot_mape"], "train_e2e_mape": train["e2e_mape"],
                "train_ttft_mape": train["ttft_mape"],
                "heldout": heldout["optimum"],
                "gap": heldout["optimum"]["tpot_mape"] - train["tpot_mape"],
                **{f"heldout_at_{p}": heldout[p] for p in points if p != "optimum"},
                "per_experiment": [{"experiment": names[j], "group": str(labels[j]),
                                    **{f"{m}_ape": {p: float(P.ape(m)[row[v], j]) for p, v in at.items()}
                                       for m in _METRICS}} for j in fold.test_idx],
            })
        overall = {p: _aggregate(out_folds, p) for p in points}
        schemes.append({"group": g, "splitter": sp.type, "label": sp.label, "n_folds": len(out_folds),
                        "folds": out_folds, "overall": overall["optimum"],
                        **{f"overall_at_{p}": overall[p] for p in points if p != "optimum"},
                        "mean_gap": float(np.mean([f["gap"] for f in out_folds]))})
    return {
        "study": spec.name,
        "kind": KIND,
        "mode": base["mode"],
        "tpot_definition": est.settings().replay.tpot,
        "phantom_last_step": est.settings().replay.phantom,
        "global_optimum_us": global_opt,
        "global": heldout_metrics(P, row[global_opt], all_idx),
        "reference_points": list(refs),
        "schemes": schemes,
        "settings": {
            "study_file": ctx.study_file,
            "dataset": spec.dataset or "embedded hg1 (configs/datasets/hg1)",
            "estimator": base,
            "parameter": spec.parameter,
            "objective": f"train mean {spec.objective}",
            "phases": [ph.model_dump(exclude_none=True) for ph in spec.phases],
            "groups": list(spec.groups),
            "schemes": [s.model_dump(exclude_none=True) for s in spec.schemes],
            "sampler": "exhaustive grid per fold (HG1 phases); every grid value replayed once on all experiments",
            "seeds": {"request_seed": base["seed"]},
            "trials": f"{len(store.requested)} grid values, each evaluated once on all experiments",
            "grid_values_evaluated": len(store.requested),
            "optuna_study": store.study_name,
            "samplers": [store_record(store)],
            "storage": ctx.storage_label,
            "request_seed": base["seed"],
            "lengths": base["lengths"],
        },
    }
