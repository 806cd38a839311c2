"""Per-family calibration: a separate optimum per model family (and per TP, per workload), with uncertainty.

For each group of a grouping column the HG1 search runs on that group's
experiments alone.  Its uncertainty is a bootstrap over the group's
experiments: resample them with replacement ``n`` times, rerun the search on
each resample, and take the percentile interval of the resampled optima.  Two
groups' optima *differ beyond their uncertainty* when the percentile interval
of the bootstrap difference (independent resamples of the two groups) excludes
zero; the report also lists plain interval overlap.  A group of one experiment
has no bootstrap variation and takes no part in the verdict.

This is the control experiment the published study proposed: if per-family
optima are indistinguishable, one global constant is as good as the data can
tell; if they differ, the overhead depends on something a single constant
does not capture.
"""

from __future__ import annotations

from itertools import combinations
from typing import Literal

import numpy as np
from pydantic import Field

from calib.data import load_experiments
from calib.estimator import RooflineRegressor
from calib.studies.apematrix import GridApe, phased_optima, require_columns, store_record, worker_result
from calib.studies.context import RunContext
from calib.studies.kinds.split_sensitivity import GridStudyMixin, grid_store
from calib.studies.spec import Strict

KIND = "per_family"

__all__ = ["KIND", "schema", "run", "Bootstrap", "percentile_interval"]


class Bootstrap(Strict):
    """Bootstrap over the experiments of a group."""

    n: int = Field(default=1000, ge=10)
    seed: int = 0
    level: float = Field(default=0.95, gt=0, lt=1)


class PerFamilySchema(GridStudyMixin):
    """``studies/per-family.yaml``."""

    kind: Literal["per_family"]
    groups: list[str] = Field(default=["family", "tp"], min_length=1)
    bootstrap: Bootstrap = Bootstrap()


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
    base = RooflineRegressor(**spec.estimator).get_params()
    est = RooflineRegressor(**base)
    names = [str(i) for i in X.index]
    n_exp = len(names)
    metric = spec.objective.removesuffix("_mape")
    last = spec.phases[-1].name
    B, level = spec.bootstrap.n, spec.bootstrap.level

    # every search (group optima and all their bootstrap resamples) is listed first, then run in one pass
    rng = np.random.default_rng(spec.bootstrap.seed)
    all_idx = np.arange(n_exp)
    jobs: list[np.ndarray] = [all_idx]
    jobs += [all_idx[rng.integers(0, n_exp, size=n_exp)] for _ in range(B)]
    layout = []
    for g in spec.groups:
        labels = X[g].astype(str).to_numpy()
        for value in sorted(set(labels.tolist()), key=lambda v: (len(v), v) if v.isdigit() else (0, v)):
            members = np.flatnonzero(labels == value)
            start = len(jobs)
            jobs.append(members)
            draws = rng.integers(0, len(members), size=(B, len(members)))
            jobs += [members[d] for d in draws]
            layout.append((g, value, members, start))

    store = grid_store(spec, X, ctx, base)
    grid = GridApe(store, spec.parameter)
    optima = [o[last] for o in phased_optima(grid, spec.phases, jobs, metric, desc=spec.name)]
    global_opt = optima[0]
    global_boot = np.array(optima[1:B + 1])
    values = sorted(set(optima))
    P = grid.predictions(values)
    row = {v: i for i, v in enumerate(values)}
    A = {m: P.ape(m) for m in ("tpot", "e2e", "ttft")}

    groupings = []
    for g in spec.groups:
        entries, boots = [], {}
        for gg, value, members, start in layout:
            if gg != g:
                continue
            opt = optima[start]
            boot = np.array(optima[start + 1:start + 1 + B])
            boots[value] = boot
            lo, hi = percentile_interval(boot, level)
            entries.append({
                "group": value, "experiments": [names[j] for j in members], "n_experiments": int(len(members)),
                "optimum_us": opt, "ci_low_us": lo, "ci_high_us": hi,
                "bootstrap_mean_us": float(boot.mean()), "bootstrap_std_us": float(boot.std(ddof=1)),
                "has_interval": bool(len(members) > 1),
                "global_optimum_in_ci": bool(lo <= global_opt <= hi),
                **{f"{m}_mape_at_own_optimum": float(A[m][row[opt], members].mean()) for m in A},
                **{f"{m}_mape_at_global_optimum": float(A[m][row[global_opt], members].mean()) for m in A},
            })
        pairs = []
        for a, b in combinations(entries, 2):
            diff = boots[a["group"]] - boots[b["group"]]
            dlo, dhi = percentile_interval(diff, level)
            eligible = a["has_interval"] and b["has_interval"]
            pairs.append({"a": a["group"], "b": b["group"], "difference_us": a["optimum_us"] - b["optimum_us"],
                          "diff_ci_low_us": dlo, "diff_ci_high_us": dhi, "eligible": eligible,
                          "differ": bool(eligible and (dlo > 0 or dhi < 0)),
                          "intervals_overlap": bool(a["ci_low_us"] <= b["ci_high_us"] and
                                                    b["ci_low_us"] <= a["ci_high_us"])})
        eligible = [p for p in pairs if p["eligible"]]
        differ = [p for p in eligible if p["differ"]]
        groupings.append({
            "grouping": g, "groups": entries, "pairs": pairs,
            "n_eligible_pairs": len(eligible), "n_differing_pairs": len(differ),
            "optima_differ": bool(differ),
            "verdict": ("optima differ beyond their uncertainty" if differ else
                        "optima not distinguishable" if eligible else "too few groups with >1 experiment"),
            "global_optimum_outside_ci": [e["group"] for e in entries if e["has_interval"] and
                                          not e["global_optimum_in_ci"]],
        })
    glo, ghi = percentile_interval(global_boot, level)
    return {
        "study": spec.name,
        "kind": KIND,
        "mode": base["mode"],
        "tpot_definition": est._tpot_def,
        "phantom_last_step": est._phantom,
        "global": {"optimum_us": global_opt, "ci_low_us": glo, "ci_high_us": ghi,
                   **{f"{m}_mape": float(A[m][row[global_opt]].mean()) for m in A}},
        "groupings": groupings,
        "settings": {
            "study_file": ctx.study_file,
            "dataset": spec.dataset or "embedded hg1 (configs/datasets/hg1)",
            "estimator": base,
            "parameter": spec.parameter,
            "objective": f"mean {spec.objective} over the group's experiments",
            "phases": [ph.model_dump(exclude_none=True) for ph in spec.phases],
            "groups": list(spec.groups),
            "bootstrap": spec.bootstrap.model_dump(),
            "sampler": "exhaustive grid per group and per bootstrap resample (HG1 phases); numpy default_rng "
                       "resampling; every grid value replayed once on all experiments",
            "seeds": {"request_seed": base["seed"], "bootstrap_seed": spec.bootstrap.seed},
            "trials": f"{len(store.requested)} grid values, each evaluated once on all experiments",
            "grid_values_evaluated": len(store.requested),
            "optuna_study": store.study_name,
            "samplers": [store_record(store)],
            "storage": ctx.storage_label,
            "request_seed": base["seed"],
            "lengths": base["lengths"],
        },
    }
