"""Seeds and metric definitions: does the headline HG1 result survive other request draws and TPOT definitions?

The headline study (the HG1 protocol on the published split) is rerun for
every combination of

* request lengths: ``reference`` (the reference simulator's Go ``math/rand``
  draws, seeds 42 and 1-10) and ``numpy`` (calib's NumPy sampler);
* request seed;
* TPOT definition: ``itl`` (mean (E2E - TTFT)/(O - 1), what the reference
  simulator predicted) and ``guidellm`` (ΣE2E/ΣO, what GuideLLM measured).

The two TPOT definitions come from the same replay, so each (lengths, seed)
costs one grid of replays; both definitions are read from it.  Reported per
run: the coarse and final optimum, train/test/all TPOT and E2E MAPE and the
pre-registered criteria; overall, how far the optimum moves and how often each
verdict flips.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from calib.data import load_experiments
from calib.errors import StudyError
from calib.estimators.roofline import RooflineRegressor
from calib.calibrate.model_selection import Fold
from calib.studies.apematrix import (GridApe, fold_metrics, grid_store, phased_optima, store_record,
                                     worker_result)
from calib.studies.context import RunContext
from calib.studies.criteria import evaluate_criteria
from calib.studies.common import GridStudyMixin, SplitSpec, distribution, resolve_split

KIND = "seeds"

__all__ = ["KIND", "schema", "run"]


class SeedsSchema(GridStudyMixin):
    """``studies/seeds.yaml``."""

    kind: Literal["seeds"]
    split: SplitSpec = SplitSpec()
    lengths: list[Literal["reference", "numpy"]] = Field(default=["reference", "numpy"], min_length=1)
    seeds: list[int] = Field(default=[42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], min_length=1)
    tpot_definitions: list[Literal["itl", "guidellm"]] = Field(default=["itl", "guidellm"], min_length=1)
    validation: list[float] = [100.0, 0.0]


schema = SeedsSchema


def _check_seeds(spec: SeedsSchema, X, src: str) -> None:
    if "reference" not in spec.lengths:
        return
    from calib.data.lengths import available_seeds

    have = set(available_seeds())
    missing = [s for s in spec.seeds if s not in have]
    if missing:
        raise StudyError(f"the reference draws have no seed {missing[0]}; available: "
                         f"{', '.join(map(str, sorted(have)))}", file=src, field="seeds")


def run(spec: SeedsSchema, ctx: RunContext) -> dict:
    early = worker_result(spec, ctx, KIND)
    if early is not None:
        return early
    X = load_experiments(spec.dataset)
    src = ctx.study_file
    train, test = resolve_split(spec.split, X, src)
    _check_seeds(spec, X, src)
    if len(set(spec.seeds)) != len(spec.seeds):
        raise StudyError("seeds repeat", file=src, field="seeds")
    base = RooflineRegressor(**spec.estimator).resolved_params()
    est = RooflineRegressor(**base)
    names = [str(i) for i in X.index]
    pos = {n: i for i, n in enumerate(names)}
    fold = Fold(np.array([pos[n] for n in train]), np.array([pos[n] for n in test]), tuple(train), tuple(test))
    metric = spec.objective.removesuffix("_mape")
    last = spec.phases[-1].name
    headline_key = (base["lengths"], int(base["seed"]), est.settings().replay.tpot)

    runs = []
    studies = {}
    records = []
    for lengths in spec.lengths:
        for seed in spec.seeds:
            variant = {**base, "lengths": lengths, "seed": int(seed)}
            store = grid_store(spec, X, ctx, variant, label=f"{lengths}-seed{seed}")
            studies[f"{lengths}/{seed}"] = store.study_name
            records.append(store)
            for d in spec.tpot_definitions:
                grid = GridApe(store, spec.parameter, tpot_definition=d)
                opt = phased_optima(grid, spec.phases, [fold.train_idx], metric,
                                    desc=f"{spec.name} {lengths} seed {seed}")[0]
                points = {"optimum": opt[last], **{f"{v:g}": float(v) for v in spec.validation}}
                P = grid.predictions(list(points.values()))
                at = {k: fold_metrics(P, i, fold) for i, k in enumerate(points)}
                crit = evaluate_criteria(spec.criteria, at["optimum"])
                runs.append({
                    "lengths": lengths, "seed": int(seed), "tpot_definition": d,
                    "headline": (lengths, int(seed), d) == headline_key,
                    "optimum_us": opt[last], **{f"{ph}_optimum_us": v for ph, v in opt.items()},
                    **{f"{m}_mape": {p: at[p][f"{m}_mape"] for p in points} for m in ("tpot", "e2e", "ttft")},
                    "gap": at["optimum"]["tpot_mape"]["test"] - at["optimum"]["tpot_mape"]["train"],
                    "criteria": crit,
                    "criteria_passed": [c["passed"] for c in crit],
                    "verdict": "PASS" if crit and all(c["passed"] for c in crit) else "FAIL",
                })
    head = [r for r in runs if r["headline"]]
    summary = []
    for lengths in spec.lengths:
        for d in spec.tpot_definitions:
            rs = [r for r in runs if r["lengths"] == lengths and r["tpot_definition"] == d]
            summary.append({
                "lengths": lengths, "tpot_definition": d, "n_runs": len(rs),
                "optimum_us": distribution([r["optimum_us"] for r in rs]),
                "test_tpot_mape": distribution([r["tpot_mape"]["optimum"]["test"] for r in rs]),
                "gap": distribution([r["gap"] for r in rs]),
                "criteria_pass_share": {c.name: float(np.mean([r["criteria_passed"][i] for r in rs]))
                                        for i, c in enumerate(spec.criteria)},
                "verdict_pass_share": float(np.mean([r["verdict"] == "PASS" for r in rs])),
            })
    return {
        "study": spec.name,
        "kind": KIND,
        "mode": base["mode"],
        "tpot_definition": est.settings().replay.tpot,
        "phantom_last_step": est.settings().replay.phantom,
        "split": {"train": train, "test": test},
        "criteria_spec": [c.model_dump() for c in spec.criteria],
        "headline": head[0] if head else None,
        "runs": runs,
        "summary": summary,
        "settings": {
            "study_file": ctx.study_file,
            "dataset": spec.dataset or "embedded hg1 (configs/datasets/hg1)",
            "estimator": base,
            "parameter": spec.parameter,
            "objective": f"train mean {spec.objective}",
            "phases": [ph.model_dump(exclude_none=True) for ph in spec.phases],
            "lengths": list(spec.lengths),
            "tpot_definitions": list(spec.tpot_definitions),
            "validation": list(spec.validation),
            "sampler": "exhaustive grid (HG1 phases) per (lengths, seed, TPOT definition); both definitions read "
                       "from the same replays",
            "seeds": {"request_seeds": [int(s) for s in spec.seeds]},
            "trials": "one grid per (lengths, seed)",
            "optuna_studies": studies,
            "samplers": [store_record(st) for st in records],
            "storage": ctx.storage_label,
            "request_seed": base["seed"],
        },
    }
