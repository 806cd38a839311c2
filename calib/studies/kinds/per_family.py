"""Per-family calibration: an optimum per model family (and per TP, per workload), tested as the samples allow.

For each group of a grouping column the HG1 search runs on that group's
experiments alone (the group's optimum).  Whether the optimum *depends on*
the grouping is asked of the **per-experiment optima** (the HG1 search on one
experiment at a time): a Kruskal–Wallis rank statistic whose p-value comes
from permuting the group labels (:func:`calib.stats.rank_test`).  With one to
four experiments per group, a bootstrap over a group's experiments would only
return [min, max] of two or three optima, so an interval is given only for a
group of at least ``min_interval_members`` experiments.  Groupings that the
data cannot separate (a family seen at one TP only) are stated, from the table
itself (:func:`calib.stats.confounding`).

This is the control experiment the published study proposed: if per-group
optima are indistinguishable, one global constant is as good as the data can
tell; if they differ, the overhead depends on something a single constant
does not capture.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from calib.data import load_experiments
from calib.estimators.roofline import RooflineRegressor
from calib.studies.apematrix import (GridApe, grid_store, phased_optima, require_columns, store_record,
                                     worker_result)
from calib.studies.context import RunContext
from calib.studies.common import GridStudyMixin
from calib.stats import confounding, rank_test
from calib.studies.spec import Strict

KIND = "per_family"

__all__ = ["KIND", "schema", "run", "Bootstrap", "RankTest", "percentile_interval"]


class Bootstrap(Strict):
    """Bootstrap over the experiments of a group (only for groups of ``min_interval_members`` or more)."""

    n: int = Field(default=1000, ge=10, le=20_000)
    seed: int = Field(default=0, ge=0)
    level: float = Field(default=0.95, gt=0, lt=1)
    min_interval_members: int = Field(default=5, ge=3)


class RankTest(Strict):
    """The permutation rank test of the per-experiment optima."""

    n_permutations: int = Field(default=20_000, ge=100, le=1_000_000)
    seed: int = Field(default=0, ge=0)
    alpha: float = Field(default=0.05, gt=0, lt=1)


class PerFamilySchema(GridStudyMixin):
    """``studies/per-family.yaml``."""

    kind: Literal["per_family"]
    groups: list[str] = Field(default=["family", "tp"], min_length=1)
    bootstrap: Bootstrap = Bootstrap()
    test: RankTest = RankTest()


schema = PerFamilySchema


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of a bootstrap sample (``inverted_cdf``: the ends are sampled values)."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(values, dtype=float), [a, 1.0 - a], method="inverted_cdf")
    return float(lo), float(hi)


def run(spec: PerFamilySchema, ctx: RunContext) -> dict:
    early = worker_result(spec, ctx, KIND)
    if early is not None:
        return early
    X = load_experiments(spec.dataset)
    require_columns(X, spec.groups, ctx.study_file, "groups")
    base = RooflineRegressor(**spec.estimator).resolved_params()
    settings = RooflineRegressor(**base).settings()
    names = [str(i) for i in X.index]
    n_exp = len(names)
    B, level, min_n = spec.bootstrap.n, spec.bootstrap.level, spec.bootstrap.min_interval_members

    # every search is listed first (all experiments, each experiment alone, each group and the bootstrap
    # resamples of the groups large enough for an interval), then run in one pass over one APE matrix
    rng = np.random.default_rng(spec.bootstrap.seed)
    jobs: list[np.ndarray] = [np.arange(n_exp)] + [np.array([j]) for j in range(n_exp)]
    layout = []
    for g in spec.groups:
        labels = X[g].astype(str).to_numpy()
        for value in sorted(set(labels.tolist()), key=lambda v: (len(v), v) if v.isdigit() else (0, v)):
            members = np.flatnonzero(labels == value)
            start = len(jobs)
            jobs.append(members)
            if len(members) >= min_n:
                jobs += [members[d] for d in rng.integers(0, len(members), size=(B, len(members)))]
            layout.append((g, value, members, start))

    store = grid_store(spec, X, ctx, base)
    grid = GridApe(store, spec.parameter)
    optima = [o[spec.phases[-1].name] for o in
              phased_optima(grid, spec.phases, jobs, spec.objective.removesuffix("_mape"), desc=spec.name)]
    global_opt, per_exp = optima[0], np.array(optima[1:n_exp + 1])
    values = sorted(set(optima))
    P = grid.predictions(values)
    row = {v: i for i, v in enumerate(values)}
    A = {m: P.ape(m) for m in ("tpot", "e2e", "ttft")}

    groupings = []
    confounded = confounding(X, spec.groups)
    for g in spec.groups:
        entries = []
        for gg, value, members, start in layout:
            if gg != g:
                continue
            opt = optima[start]
            interval = None
            if len(members) >= min_n:
                interval = percentile_interval(np.array(optima[start + 1:start + 1 + B]), level)
            entries.append({
                "group": value, "experiments": [names[j] for j in members], "n_experiments": int(len(members)),
                "optimum_us": opt, "experiment_optima_us": [float(per_exp[j]) for j in members],
                "interval_us": list(interval) if interval else None,
                **{f"{m}_mape_at_own_optimum": float(A[m][row[opt], members].mean()) for m in A},
                **{f"{m}_mape_at_global_optimum": float(A[m][row[global_opt], members].mean()) for m in A},
            })
        test = rank_test(per_exp, X[g].astype(str).to_numpy(), n_permutations=spec.test.n_permutations,
                         seed=spec.test.seed)
        p = test["p_value"]
        verdict = ("too few groups with two or more experiments to test" if p is None else
                   f"per-experiment optima differ between {g} groups (p = {p:.2g} < {spec.test.alpha:g})"
                   if p < spec.test.alpha else
                   f"no difference between {g} groups detectable (p = {p:.2g} >= {spec.test.alpha:g})")
        groupings.append({"grouping": g, "groups": entries, "test": test,
                          "differ": bool(p is not None and p < spec.test.alpha), "verdict": verdict,
                          "confounding": [c for c in confounded if c.startswith(f"{g} ")]})
    return {
        "study": spec.name,
        "kind": KIND,
        "mode": settings.replay.mode,
        "tpot_definition": settings.replay.tpot,
        "phantom_last_step": settings.replay.phantom,
        "global": {"optimum_us": global_opt, **{f"{m}_mape": float(A[m][row[global_opt]].mean()) for m in A}},
        "experiments": [{"experiment": n, "optimum_us": float(per_exp[j]),
                         **{g: str(X[g].iloc[j]) for g in spec.groups}} for j, n in enumerate(names)],
        "groupings": groupings,
        "settings": {
            "study_file": ctx.study_file,
            "dataset": spec.dataset or "embedded hg1",
            "estimator": base,
            "parameter": spec.parameter,
            "objective": f"mean {spec.objective} over the group's (or the one experiment's) experiments",
            "phases": [ph.model_dump(exclude_none=True) for ph in spec.phases],
            "groups": list(spec.groups),
            "bootstrap": spec.bootstrap.model_dump(),
            "test": spec.test.model_dump(),
            "sampler": "exhaustive grid per experiment, per group and per bootstrap resample (HG1 phases); every "
                       "grid value replayed once on all experiments",
            "seeds": {"request_seed": base["seed"], "bootstrap_seed": spec.bootstrap.seed,
                      "permutation_seed": spec.test.seed},
            "trials": f"{len(store.requested)} grid values, each evaluated once on all experiments",
            "grid_values_evaluated": len(store.requested),
            "optuna_study": store.study_name,
            "samplers": [store_record(store)],
            "storage": ctx.storage_label,
            "request_seed": base["seed"],
            "lengths": base["lengths"],
        },
    }
