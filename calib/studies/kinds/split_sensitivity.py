"""Split sensitivity: the HG1 search on every train/test split, not one.

The published study used one 9/4 split of the 13 experiments, one of
``C(13, 4) = 715``.  This kind runs the HG1 phased grid search (coarse, then
fine around the coarse optimum; ties to the smaller value) on the train fold of
every split of a splitter, and reports, per split, the optimum, train and test
MAPE, the gap and which pre-registered criteria pass, then where the
published split falls in the distribution.

Each experiment's APE at a grid value does not depend on the split, so every
grid value any split needs is replayed once on all experiments
(:class:`calib.studies.apematrix.GridApe`); the 715 searches are array
operations on that matrix.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from calib.data import load_experiments
from calib.estimators.roofline import RooflineRegressor
from calib.calibrate.model_selection import Fold, split_key
from calib.studies.apematrix import (GridApe, SplitterSpec, build_folds, fold_metrics, grid_store, phased_optima,
                                     store_record, worker_result)
from calib.studies.context import RunContext
from calib.studies.criteria import evaluate_criteria
from calib.studies.common import GridStudyMixin, SplitSpec, distribution, resolve_split

KIND = "split_sensitivity"

__all__ = ["KIND", "schema", "run"]


class SplitSensitivitySchema(GridStudyMixin):
    """``studies/split-sensitivity.yaml``."""

    kind: Literal["split_sensitivity"]
    splitter: SplitterSpec = SplitterSpec(type="all_k_of_n", n_test=4)
    published: SplitSpec | None = SplitSpec(column="hg1_split")
    extra_splitters: list[SplitterSpec] = []
    histogram_bins: int = Field(default=30, ge=2)


schema = SplitSensitivitySchema


def _evaluate_folds(spec, grid: GridApe, folds: list[Fold], desc: str) -> list[dict]:
    metric = spec.objective.removesuffix("_mape")
    optima = phased_optima(grid, spec.phases, [f.train_idx for f in folds], metric, desc=desc)
    values = sorted({o[spec.phases[-1].name] for o in optima})
    P = grid.predictions(values)
    row = {v: i for i, v in enumerate(values)}
    out = []
    for fold, opt in zip(folds, optima):
        best = opt[spec.phases[-1].name]
        metrics = fold_metrics(P, row[best], fold)
        crit = evaluate_criteria(spec.criteria, metrics)
        tp = metrics["tpot_mape"]
        out.append({
            "train": list(fold.train), "test": list(fold.test),
            "optimum_us": best,
            **{f"{ph}_optimum_us": v for ph, v in opt.items()},
            "train_tpot_mape": tp["train"], "test_tpot_mape": tp["test"], "gap": tp["test"] - tp["train"],
            "train_e2e_mape": metrics["e2e_mape"]["train"], "test_e2e_mape": metrics["e2e_mape"]["test"],
            "train_ttft_mape": metrics["ttft_mape"]["train"], "test_ttft_mape": metrics["ttft_mape"]["test"],
            "criteria_passed": [bool(c["passed"]) for c in crit],
            "all_passed": bool(crit) and all(c["passed"] for c in crit),
        })
    return out


def _summary(spec, splits: list[dict]) -> dict:
    gaps = [s["gap"] for s in splits]
    optima = [s["optimum_us"] for s in splits]
    counts: dict[float, int] = {}
    for v in optima:
        counts[v] = counts.get(v, 0) + 1
    passed = np.array([s["criteria_passed"] for s in splits], dtype=bool).reshape(len(splits), len(spec.criteria))
    return {
        "n_splits": len(splits),
        "gap": distribution(gaps),
        "abs_gap": distribution(np.abs(gaps)),
        "train_tpot_mape": distribution([s["train_tpot_mape"] for s in splits]),
        "test_tpot_mape": distribution([s["test_tpot_mape"] for s in splits]),
        "optimum_us": distribution(optima),
        "optimum_counts": [{"optimum_us": v, "n_splits": counts[v]} for v in sorted(counts)],
        "criteria_pass_share": {c.name: float(passed[:, i].mean()) for i, c in enumerate(spec.criteria)},
        "all_criteria_pass_share": float(passed.all(axis=1).mean()) if spec.criteria else 0.0,
    }


def run(spec: SplitSensitivitySchema, ctx: RunContext) -> dict:
    early = worker_result(spec, ctx, KIND)
    if early is not None:
        return early
    X = load_experiments(spec.dataset)
    src = ctx.study_file
    # every check first: no replay happens before the splits are known to be valid
    folds = build_folds(spec.splitter, X, src, "splitter")
    extras = [build_folds(s, X, src, f"extra_splitters[{i}]") for i, s in enumerate(spec.extra_splitters)]
    pub_fold = None
    if spec.published is not None:
        pub_train, pub_test = resolve_split(spec.published, X, src)
    base = RooflineRegressor(**spec.estimator).resolved_params()
    est = RooflineRegressor(**base)
    names = [str(i) for i in X.index]
    pos = {n: i for i, n in enumerate(names)}
    if spec.published is not None:
        pub_fold = Fold(np.array([pos[n] for n in pub_train]), np.array([pos[n] for n in pub_test]),
                        tuple(pub_train), tuple(pub_test))

    store = grid_store(spec, X, ctx, base)
    grid = GridApe(store, spec.parameter)
    # one pass over every fold of every scheme (+ the published split): grid values shared, replayed once
    everything = folds + [f for fs in extras for f in fs] + ([pub_fold] if pub_fold is not None else [])
    evaluated = _evaluate_folds(spec, grid, everything, desc=spec.name)
    splits = evaluated[:len(folds)]
    at = len(folds)
    extra_out = []
    for s, fs in zip(spec.extra_splitters, extras):
        part = evaluated[at:at + len(fs)]
        at += len(fs)
        extra_out.append({"splitter": s.label, "spec": s.model_dump(exclude_none=True), "summary": _summary(spec, part),
                          "splits": part})
    published, pct_weak = None, None
    if pub_fold is not None:
        pub = evaluated[-1]
        keys = [(split_key(s["train"]), split_key(s["test"])) for s in splits]
        occurrences = [i for i, k in enumerate(keys) if k == (split_key(pub_fold.train), split_key(pub_fold.test))]
        gaps = np.array([s["gap"] for s in splits])
        pct_weak = float(100.0 * np.mean(gaps <= pub["gap"]))
        published = {**pub, "index_in_splits": occurrences[0] if occurrences else None,
                     "occurrences": len(occurrences), "gap_percentile_weak": pct_weak,
                     "gap_percentile_strict": float(100.0 * np.mean(gaps < pub["gap"])),
                     "test_tpot_mape_percentile": float(100.0 * np.mean(
                         np.array([s["test_tpot_mape"] for s in splits]) <= pub["test_tpot_mape"]))}

    # per experiment: test APE over the splits that hold it out (at each split's optimum)
    values = sorted({s["optimum_us"] for s in splits})
    P = grid.predictions(values)
    row = {v: i for i, v in enumerate(values)}
    A = P.ape("tpot")
    per_exp = []
    for n in names:
        j = pos[n]
        held = [A[row[s["optimum_us"]], j] for s in splits if n in s["test"]]
        trained = [A[row[s["optimum_us"]], j] for s in splits if n in s["train"]]
        per_exp.append({"experiment": n, "family": str(X.loc[n, "family"]), "tp": int(X.loc[n, "tp"]),
                        "workload": str(X.loc[n, "workload"]), "n_test_splits": len(held),
                        "mean_test_tpot_ape": float(np.mean(held)) if held else None,
                        "max_test_tpot_ape": float(np.max(held)) if held else None,
                        "mean_train_tpot_ape": float(np.mean(trained)) if trained else None})
    return {
        "study": spec.name,
        "kind": KIND,
        "mode": base["mode"],
        "tpot_definition": est.settings().replay.tpot,
        "phantom_last_step": est.settings().replay.phantom,
        "splitter": spec.splitter.label,
        "criteria": [c.model_dump() for c in spec.criteria],
        "splits": splits,
        "summary": _summary(spec, splits),
        "published_split": published,
        "published_split_percentile": pct_weak,
        "experiments": per_exp,
        "extra": extra_out,
        "settings": {
            "study_file": ctx.study_file,
            "dataset": spec.dataset or "embedded hg1 (configs/datasets/hg1)",
            "estimator": base,
            "parameter": spec.parameter,
            "objective": f"train mean {spec.objective}",
            "phases": [ph.model_dump(exclude_none=True) for ph in spec.phases],
            "splitter": spec.splitter.model_dump(exclude_none=True),
            "published": spec.published.model_dump(exclude_none=True) if spec.published else None,
            "histogram_bins": spec.histogram_bins,
            "sampler": "exhaustive grid per split (HG1 phases); every grid value replayed once on all experiments",
            "seed": base["seed"],
            "seeds": {"request_seed": base["seed"],
                      **{f"extra_splitters[{i}]": s.seed for i, s in enumerate(spec.extra_splitters)}},
            "grid_values_evaluated": len(store.requested),
            "optuna_study": store.study_name,
            "samplers": [store_record(store)],
            "storage": ctx.storage_label,
            "request_seed": base["seed"],
            "lengths": base["lengths"],
        },
    }
