"""Overhead models searched with TPE and scored by nested cross-validation.

Each entry of ``models`` names an overhead model of
:mod:`calib.physics.overhead` (global per-layer, per-layer x TP^-alpha,
per-step + per-layer, prefill/decode split, batch-linear), optionally searched
jointly with estimator physics (``bw_efficiency``, ``mfu_rule``), with one
objective (train TPOT MAPE) or two (TPOT and TTFT MAPE: a Pareto front).

What is nested, and why nothing leaks
-------------------------------------
``leave_one_<group>_out`` (``leave_one_family_out``)
    For every fold a separate seeded Optuna TPE study (calib's storage, one
    study per model and fold, resumable) searches the space with the mean
    train MAPE as objective.  Its objective replays *only the fold's train
    experiments*; the held-out family is predicted once, at the selected
    trial, after the search has finished.  (Two objectives: the selected trial
    is the Pareto-front trial with the lowest mean of the two.)
``all_splits``
    715 TPE searches per model are unaffordable, so the inner search is a
    selection from a fixed candidate pool: ``pool_size`` scrambled-Sobol
    points of the search space, drawn from the space and a seed alone (no
    data).  Every candidate is replayed once on every experiment (the
    per-experiment APEs do not depend on the split); for each split the
    candidate with the lowest *train* objective is selected (ties: the earlier
    candidate) and scored on the split's test experiments.  The test columns
    of the matrix are read only after selection, so the selection is the same
    as if they had never been computed; the pool itself cannot have been
    tuned to any split because it is drawn before any data is seen.

A ``full`` TPE search on all experiments gives the parameters a model would
ship with (the ``params`` of the ranking) and, for two objectives, the Pareto
front.  A ``diagnosis`` evaluates the model at zero overhead and reports, per
experiment, the overhead per output token the measurement implies, scaled by
``TP / L`` and by ``1 / L``: the functional form the data asks for.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from calib.data import load_experiments
from calib.estimator import RooflineRegressor
from calib.model_selection import Fold
from calib.physics.overhead import OVERHEAD_MODELS
from calib.specs import load_model
from calib.studies.apematrix import (CandidateStore, SearchParam, SplitterSpec, best_trial, build_folds,
                                     dataset_fingerprint, fingerprint, pareto_front, qmc_pool, space_size,
                                     store_record, tpe_search, worker_result)
from calib.studies.context import RunContext
from calib.studies.evaluate import evaluate
from calib.studies.spec import METRICS, StudyBase, Strict

KIND = "overhead_models"

__all__ = ["KIND", "schema", "run", "ModelEntry", "search_space", "estimator_params"]

#: estimator parameters a model may search jointly with its overhead
JOINT_PARAMS = ("bw_efficiency", "mfu_rule", "gemm_mfu_scale", "prefill_attention_mfu_scale",
                "decode_attention_mfu_scale")
_METRICS = ("tpot", "ttft", "e2e")

#: the replay used by the inner searches; a module attribute so tests can watch what it is shown
_search_eval = evaluate
#: the replay used to score the held-out fold at the selected parameters
_heldout_eval = evaluate


class ModelEntry(Strict):
    """One overhead model to search.

    ``space`` overrides the model's default ranges (``OverheadModel.ranges``);
    ``joint`` adds estimator parameters searched with it; ``objectives`` is one
    or two of ``tpot_mape``, ``ttft_mape``, ``e2e_mape``.
    """

    name: str | None = None
    overhead: str
    space: dict[str, SearchParam] = {}
    joint: dict[str, SearchParam] = {}
    objectives: list[str] = Field(default=["tpot_mape"], min_length=1, max_length=2)
    n_trials: int | None = Field(default=None, ge=1)

    @field_validator("overhead")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OVERHEAD_MODELS:
            raise ValueError(f"unknown overhead model {v!r}; known: {', '.join(OVERHEAD_MODELS)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ModelEntry":
        known = set(OVERHEAD_MODELS[self.overhead].ranges)
        for k in self.space:
            if k not in known:
                raise ValueError(f"{k!r} is not a parameter of overhead model {self.overhead!r}; known: "
                                 f"{', '.join(sorted(known))}")
        for k in self.joint:
            if k not in JOINT_PARAMS:
                raise ValueError(f"cannot search {k!r} jointly; choose from {', '.join(JOINT_PARAMS)}")
        for m in self.objectives:
            if m not in METRICS:
                raise ValueError(f"unknown objective {m!r}; choose from {', '.join(METRICS)}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives repeat")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        tag = self.overhead
        if self.joint:
            tag += "+" + "+".join(sorted(self.joint))
        if len(self.objectives) > 1:
            tag += " [" + ",".join(m.removesuffix("_mape") for m in self.objectives) + "]"
        return tag


class TPESettings(Strict):
    """The seeded TPE sampler of every search."""

    seed: int = 0
    n_trials: int = Field(default=50, ge=1)
    n_startup_trials: int = Field(default=10, ge=1)
    multivariate: bool = True


class LeaveOneGroupOutScheme(Strict):
    group: str = "family"


class AllSplitsScheme(Strict):
    n_test: int = Field(default=4, ge=1)
    pool_size: int = Field(default=128, ge=1)
    seed: int = 0


class OverheadModelsSchema(StudyBase):
    """``studies/overhead-models.yaml``."""

    kind: Literal["overhead_models"]
    models: list[ModelEntry] = Field(min_length=1)
    sampler: TPESettings = TPESettings()
    leave_one_group_out: LeaveOneGroupOutScheme | None = LeaveOneGroupOutScheme()
    all_splits: AllSplitsScheme | None = AllSplitsScheme()

    @model_validator(mode="after")
    def _check(self) -> "OverheadModelsSchema":
        labels = [m.label for m in self.models]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"two models are labelled {dupes[0]!r}; give one a 'name'")
        for i, m in enumerate(self.models):
            space = search_space(m)
            size = space_size(space)
            n = m.n_trials or self.sampler.n_trials
            if size is not None and n > size:
                raise ValueError(f"models[{i}] ({m.label}) asks for {n} trials but its search space has only "
                                 f"{size} points")
            if self.all_splits is not None and size is not None and self.all_splits.pool_size > size:
                raise ValueError(f"all_splits.pool_size {self.all_splits.pool_size} exceeds the {size} points of "
                                 f"models[{i}] ({m.label})")
        if self.leave_one_group_out is None and self.all_splits is None:
            raise ValueError("enable at least one scheme (leave_one_group_out, all_splits)")
        return self


schema = OverheadModelsSchema


def search_space(m: ModelEntry) -> dict[str, SearchParam]:
    """The searched parameters of ``m``: its overhead model's ranges (overridden by ``space``) plus ``joint``."""
    space = {k: SearchParam(low=lo, high=hi) for k, (lo, hi) in OVERHEAD_MODELS[m.overhead].ranges.items()}
    space.update(m.space)
    space.update(m.joint)
    return dict(sorted(space.items()))


def estimator_params(m: ModelEntry, params: Mapping[str, Any]) -> dict[str, Any]:
    """Estimator parameter overrides for a point of ``m``'s search space."""
    ov = sorted(OVERHEAD_MODELS[m.overhead].ranges)
    out: dict[str, Any] = {"overhead_model": m.overhead,
                           "overhead_params": {k: float(params[k]) for k in ov if k in params}}
    for k in m.joint:
        out[k] = params[k]
    return out


def _mapes(ev: pd.DataFrame) -> dict[str, float]:
    return {f"{k}_mape": float(ev[f"{k}_ape"].mean()) for k in _METRICS}


def _objective(m: ModelEntry, X: pd.DataFrame, base: dict):
    """TPE objective on the experiments of ``X`` only (a fold's train set)."""
    memo: dict[str, tuple] = {}

    def objective(params: dict):
        key = repr(sorted(params.items()))
        if key not in memo:
            ev = _search_eval(X, {**base, **estimator_params(m, params)})
            mp = _mapes(ev)
            memo[key] = ([mp[o] for o in m.objectives], {f"train_{k}": v for k, v in mp.items()})
        return memo[key]

    return objective


def _trial_point(t, space) -> dict:
    return {k: t.params[k] for k in space}


def _fold_label(values: list[str]) -> str:
    return "+".join(values)


def run(spec: OverheadModelsSchema, ctx: RunContext) -> dict:
    early = worker_result(spec, ctx, KIND)
    if early is not None:
        return early
    X = load_experiments(spec.dataset)
    src = ctx.study_file
    # every check first, then the work
    schemes: dict[str, list[Fold]] = {}
    lofo_key = None
    if spec.leave_one_group_out is not None:
        g = spec.leave_one_group_out.group
        lofo_key = f"leave_one_{g}_out"
        schemes[lofo_key] = build_folds(SplitterSpec(type="leave_one_group_out", group=g), X, src,
                                        "leave_one_group_out")
    if spec.all_splits is not None:
        schemes["all_splits"] = build_folds(SplitterSpec(type="all_k_of_n", n_test=spec.all_splits.n_test), X, src,
                                            "all_splits")
    base = RooflineRegressor(**spec.estimator).get_params()
    est = RooflineRegressor(**base)
    data_fp = dataset_fingerprint(X)
    tpe = spec.sampler
    models_out = []
    records: list[dict] = []
    for m in spec.models:
        space = search_space(m)
        n_trials = m.n_trials or tpe.n_trials
        fp = fingerprint(base, data_fp, {k: v.model_dump() for k, v in space.items()}, m.overhead, m.objectives,
                         tpe.model_dump(exclude={"n_trials"}))
        sname = f"{spec.name}-{m.label}-{fp}".replace(" ", "")
        n_obj = len(m.objectives)

        def search(X_sub: pd.DataFrame, study_name: str, desc: str):
            records.append({"study": study_name, "sampler": "TPESampler" + (" (multi-objective)" if n_obj > 1 else ""),
                            "seed": tpe.seed, "trials": n_trials})
            return tpe_search(study_name, ctx.storage, space, _objective(m, X_sub, base), n_trials=n_trials,
                              seed=tpe.seed, n_objectives=n_obj, n_startup_trials=tpe.n_startup_trials,
                              multivariate=tpe.multivariate, progress=ctx.progress, desc=desc)

        entry: dict[str, Any] = {"model": m.label, "overhead": m.overhead, "n_params": len(space),
                                 "objectives": list(m.objectives), "joint": sorted(m.joint),
                                 "space": {k: v.model_dump(exclude_none=True) for k, v in space.items()},
                                 "n_trials": n_trials, "heldout": {}, "folds": {}, "optuna_studies": {}}
        # full fit: the parameters the model ships with
        full = search(X, f"{sname}-all", f"{m.label} all")
        bt = best_trial(full)
        entry["params"] = _trial_point(bt, space)
        entry["optuna_studies"]["all"] = full.study_name
        entry["fit_all"] = {k.removeprefix("train_"): float(v) for k, v in bt.user_attrs.items()
                            if k.startswith("train_")}
        if n_obj > 1:
            entry["pareto_front"] = [{"trial": t.number, "params": _trial_point(t, space),
                                      **{o: float(v) for o, v in zip(m.objectives, t.values)}}
                                     for t in pareto_front(full)]
        # leave one group out: a TPE search inside every training fold
        if lofo_key is not None:
            g = spec.leave_one_group_out.group
            labels = X[g].astype(str).to_numpy()
            folds_out = []
            for fold in schemes[lofo_key]:
                groups = sorted(set(labels[fold.test_idx].tolist()))
                st = search(X.iloc[fold.train_idx], f"{sname}-{lofo_key}-{_fold_label(groups)}",
                            f"{m.label} without {_fold_label(groups)}")
                bt = best_trial(st)
                point = _trial_point(bt, space)
                ev = _heldout_eval(X.iloc[fold.test_idx], {**base, **estimator_params(m, point)})
                held = _mapes(ev)
                train = {k.removeprefix("train_"): float(v) for k, v in bt.user_attrs.items()
                         if k.startswith("train_")}
                folds_out.append({
                    "test_groups": groups, "train": list(fold.train), "test": list(fold.test), "params": point,
                    "train_mapes": train, "heldout": held,
                    "gap": held["tpot_mape"] - train["tpot_mape"], "optuna_study": st.study_name,
                    "per_experiment": [{"experiment": n, "tpot_ape": float(ev.loc[n, "tpot_ape"]),
                                        "ttft_ape": float(ev.loc[n, "ttft_ape"]),
                                        "e2e_ape": float(ev.loc[n, "e2e_ape"]),
                                        "tpot_pred_ms": float(ev.loc[n, "tpot"]),
                                        "tpot_meas_ms": float(X.loc[n, "tpot_mean_ms"])} for n in fold.test],
                })
            entry["folds"][lofo_key] = folds_out
            entry["heldout"][lofo_key] = _aggregate(folds_out)
        # all splits: selection from a data-independent pool, per split, on train only
        if "all_splits" in schemes:
            a = spec.all_splits
            pool = qmc_pool(space, a.pool_size, a.seed)
            cands = [estimator_params(m, p) for p in pool]
            store = CandidateStore(X, base, ctx.storage, f"{sname}-pool-{fingerprint(a.model_dump())}",
                                   progress=ctx.progress)
            P = store.predictions(cands, desc=f"{m.label} pool")
            records.append({**store_record(store, "scrambled Sobol pool (scipy.stats.qmc)"), "seed": a.seed})
            entry["optuna_studies"]["pool"] = store.study_name
            entry["pool_size"] = len(pool)
            sel = select_from_pool({k: P.ape(k) for k in _METRICS}, [f.train_idx for f in schemes["all_splits"]],
                                   [o.removesuffix("_mape") for o in m.objectives])
            A = {k: P.ape(k) for k in _METRICS}
            per_split = []
            for fold, j in zip(schemes["all_splits"], sel):
                held = {f"{k}_mape": float(A[k][j, fold.test_idx].mean()) for k in _METRICS}
                train = {f"{k}_mape": float(A[k][j, fold.train_idx].mean()) for k in _METRICS}
                per_split.append({"test": list(fold.test), "candidate": int(j), "train_mapes": train,
                                  "heldout": held, "gap": held["tpot_mape"] - train["tpot_mape"]})
            entry["heldout"]["all_splits"] = _aggregate(per_split)
            counts = np.bincount(sel, minlength=len(pool))
            entry["all_splits_selected"] = [{"candidate": int(i), "params": pool[i], "n_splits": int(counts[i])}
                                            for i in np.argsort(-counts, kind="stable")[:5] if counts[i] > 0]
            entry["all_splits_test_tpot_mape"] = [s["heldout"]["tpot_mape"] for s in per_split]
            if lofo_key is not None:  # the same pool selection on the leave-one-group-out folds (for comparison)
                lsel = select_from_pool(A, [f.train_idx for f in schemes[lofo_key]],
                                        [o.removesuffix("_mape") for o in m.objectives])
                entry["pool_" + lofo_key] = _aggregate([
                    {"heldout": {f"{k}_mape": float(A[k][j, f.test_idx].mean()) for k in _METRICS},
                     "gap": float(A["tpot"][j, f.test_idx].mean() - A["tpot"][j, f.train_idx].mean())}
                    for f, j in zip(schemes[lofo_key], lsel)])
        models_out.append(entry)

    order = lofo_key or "all_splits"
    ranking = sorted(models_out, key=lambda e: (e["heldout"][order]["tpot_mape"], e["model"]))
    for i, e in enumerate(ranking):
        e["rank"] = i + 1
    diagnosis = _diagnose(X, base, ranking[0], lofo_key)
    return {
        "study": spec.name,
        "kind": KIND,
        "mode": base["mode"],
        "tpot_definition": est._tpot_def,
        "phantom_last_step": est._phantom,
        "ranked_by": f"heldout.{order}.tpot_mape",
        "schemes": {k: {"n_folds": len(v), "folds": [{"train": list(f.train), "test": list(f.test)} for f in v]}
                    if k != "all_splits" else {"n_folds": len(v), "n_test": spec.all_splits.n_test}
                    for k, v in schemes.items()},
        "ranking": ranking,
        "diagnosis": diagnosis,
        "settings": {
            "study_file": ctx.study_file,
            "dataset": spec.dataset or "embedded hg1 (configs/datasets/hg1)",
            "estimator": base,
            "sampler": (f"optuna TPESampler(seed={tpe.seed}, n_startup_trials={tpe.n_startup_trials}, "
                        f"multivariate={tpe.multivariate}); multi-objective TPE for two objectives; all_splits "
                        "pool: scipy scrambled Sobol"),
            "tpe": tpe.model_dump(),
            "all_splits": spec.all_splits.model_dump() if spec.all_splits else None,
            "leave_one_group_out": spec.leave_one_group_out.model_dump() if spec.leave_one_group_out else None,
            "seeds": {"tpe_seed": tpe.seed, "pool_seed": spec.all_splits.seed if spec.all_splits else None,
                      "request_seed": base["seed"]},
            "trials": {e["model"]: e["n_trials"] for e in models_out},
            "samplers": records,
            "storage": ctx.storage_label,
            "request_seed": base["seed"],
            "lengths": base["lengths"],
            "resume": "each search is an Optuna study in the storage; a rerun continues it to n_trials completed "
                      "trials (a resumed sampler is seeded with seed + completed trials)",
        },
    }


def select_from_pool(A: Mapping[str, np.ndarray], train_idx: list[np.ndarray], objectives: list[str]) -> np.ndarray:
    """Per fold, the pool candidate with the lowest mean train objective (ties: the earlier candidate).

    Parameters
    ----------
    A : dict
        Metric -> ``(n_candidates, n_experiments)`` APE matrix.
    train_idx : list of int arrays
        Train experiment positions per fold.  Only these columns are read.
    objectives : list of str
        One metric, or two (selection by the mean of the two train MAPEs, a
        point of the train Pareto front).

    Returns
    -------
    ndarray of int
        Selected candidate per fold.
    """
    out = np.empty(len(train_idx), dtype=np.int64)
    for j, idx in enumerate(train_idx):
        score = np.mean([A[o][:, idx].mean(axis=1) for o in objectives], axis=0)
        out[j] = int(np.argmin(score))
    return out


def _aggregate(folds: list[dict]) -> dict[str, float]:
    """Mean held-out MAPEs over folds, the worst fold, the mean gap."""
    out = {f"{k}_mape": float(np.mean([f["heldout"][f"{k}_mape"] for f in folds])) for k in _METRICS}
    out["worst_fold_tpot_mape"] = float(np.max([f["heldout"]["tpot_mape"] for f in folds]))
    out["worst_fold_ttft_mape"] = float(np.max([f["heldout"]["ttft_mape"] for f in folds]))
    out["worst_fold_e2e_mape"] = float(np.max([f["heldout"]["e2e_mape"] for f in folds]))
    out["gap"] = float(np.mean([f["gap"] for f in folds]))
    out["n_folds"] = len(folds)
    return out


def _diagnose(X: pd.DataFrame, base: dict, best: dict, lofo_key: str | None) -> dict:
    """What the best model misses: held-out errors per experiment and the overhead the data implies."""
    ev0 = evaluate(X, {**base, "overhead_model": "per_layer", "overhead_params": {"per_layer_us": 0.0}})
    heldout = {}
    if lofo_key is not None:
        for f in best["folds"][lofo_key]:
            for e in f["per_experiment"]:
                heldout[e["experiment"]] = e
    rows = []
    for n, row in X.iterrows():
        n = str(n)
        L = load_model(str(row["model"])).num_layers
        tp = int(row["tp"])
        meas = float(row["tpot_mean_ms"])
        pred0 = float(ev0.loc[n, "tpot"])
        implied_us = (meas - pred0) * 1e3  # overhead per output token the measurement leaves unexplained
        h = heldout.get(n)
        rows.append({
            "experiment": n, "family": str(row["family"]), "tp": tp, "workload": str(row["workload"]),
            "num_layers": L, "tpot_meas_ms": meas, "tpot_pred_zero_overhead_ms": pred0,
            "implied_overhead_us_per_token": implied_us,
            "implied_per_layer_us_x_tp": implied_us * tp / L,
            "implied_per_layer_us": implied_us / L,
            "heldout_tpot_ape": h["tpot_ape"] if h else None,
            "heldout_tpot_signed": (h["tpot_pred_ms"] - h["tpot_meas_ms"]) / h["tpot_meas_ms"] if h else None,
        })
    rows.sort(key=lambda r: -(r["heldout_tpot_ape"] or 0.0))
    arr = lambda k: np.array([r[k] for r in rows], dtype=float)  # noqa: E731
    cv = {k: float(np.std(arr(k)) / abs(np.mean(arr(k)))) if np.mean(arr(k)) != 0 else None
          for k in ("implied_per_layer_us_x_tp", "implied_per_layer_us", "implied_overhead_us_per_token")}
    target = 0.10
    flat = min((k for k, v in cv.items() if v is not None), key=lambda k: cv[k], default=None)
    return {
        "flattest_scaling": flat,
        "best_model": best["model"],
        "heldout_scheme": lofo_key,
        "heldout_tpot_mape": best["heldout"][lofo_key]["tpot_mape"] if lofo_key else None,
        "target_tpot_mape": target,
        "meets_target": bool(lofo_key and best["heldout"][lofo_key]["tpot_mape"] < target),
        "experiments_over_target": [r["experiment"] for r in rows
                                    if r["heldout_tpot_ape"] is not None and r["heldout_tpot_ape"] >= target],
        "implied_overhead_spread": cv,
        "experiments": rows,
    }
