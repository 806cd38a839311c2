"""Nested cross-validation of candidate calibrators, one search seed at a time.

:func:`nested_cross_validate` answers two questions honestly at once:

* *how well does each candidate generalise?*  Per outer fold, per search seed
  and per candidate, a :class:`~calib.calibrate.Calibrator` (its search
  re-seeded to that one seed) is fitted on the fold's training rows only and
  scored on its held-out rows: per-row APEs of TTFT, TPOT and E2E and the
  train loss are recorded.  A table of these is *descriptive*: ranking the
  candidates by it and reporting the best as "the" figure would choose on the
  test rows.
* *how well does choosing a candidate generalise?*  Per outer fold and seed,
  :class:`~calib.calibrate.SelectBest` chooses among the (re-seeded)
  candidates by an inner cross-validation on the fold's training rows
  (``LeaveOneGroupOut`` on the remaining groups, or ``KFold`` when too few
  groups remain); the held-out score of *what it chose* is the honest figure
  of the whole procedure.  The outer test rows reach neither the searches nor
  the choice.

:func:`select_on_all` runs the same selection on every row, per seed: what a
study ships.  Both work for any calib estimator with ``predict_all``,
``measured`` and (optionally) ``row_weights``.  Searches with the same
candidate, seed and rows share their Optuna studies (the calibrator's study
names fingerprint them), so the inner fits that two outer folds have in common
(leaving out families *a* and *b*) run once when a storage URL is given.

Aggregation
-----------
Held-out APEs are pooled over the outer folds: the figure of a candidate (or
of the selection) for one seed is the row-weighted mean APE over every
held-out row of every fold — with ``LeaveOneGroupOut`` every row once, so for
synchronous experiments "mean APE over experiments".  Per-fold means are kept
beside it.

Examples
--------
>>> from sklearn.model_selection import LeaveOneGroupOut
>>> from calib import RooflineRegressor, load_experiments
>>> from calib.calibrate import Calibrator, PhasedGrid, Grid, Range
>>> X = load_experiments()
>>> X = X[X.family.isin(["llama2-7b", "qwen3-14b", "llama2-70b"])]
>>> grid = lambda: PhasedGrid([Grid(step=50)])
>>> cands = [("per_layer", Calibrator(RooflineRegressor(), {"per_layer_us": Range(0, 200)}, search=grid())),
...          ("huge", Calibrator(RooflineRegressor(), {"per_layer_us": Range(400, 400)}, search=grid()))]
>>> res = nested_cross_validate(cands, X, outer_cv=LeaveOneGroupOut(), groups="family", seeds=[0])
>>> len(res.records), len(res.choices), [c["selected"] for c in res.choices]
(6, 3, ['per_layer', 'per_layer', 'per_layer'])
>>> res.pooled("tpot", seed=0) == res.pooled("tpot", seed=0, candidate="per_layer")  # chosen in every fold
True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.model_selection import KFold, LeaveOneGroupOut, check_cv

from calib.calibrate.calibrator import Calibrator, SelectBest
from calib.calibrate.objective import METRICS, Objective
from calib.calibrate.search import TPE, parse_search
from calib.errors import CalibError, ConfigError
from calib.metrics import ape

__all__ = ["NestedResult", "nested_cross_validate", "select_on_all", "recommend", "summarize", "with_seed",
           "inner_splitter", "AGGREGATION", "spread"]

#: How held-out APEs are aggregated (named in every result and table).
AGGREGATION = "mean APE over the held-out experiments of all outer folds (rows weighted by row_weights)"


def with_seed(calibrator: Calibrator, seed: int) -> Calibrator:
    """A clone of ``calibrator`` whose search runs the one seed ``seed`` (a seedless grid is unchanged).

    >>> from calib.calibrate import Calibrator, TPE
    >>> with_seed(Calibrator(None, {}, search=TPE(n_trials=9, seeds=5)), 3).search
    TPE(n_trials=9, seeds=[3], refine=0, tolerance=0.005, options={})
    """
    search = copy.deepcopy(parse_search(calibrator.search, TPE()))
    if hasattr(search, "seeds"):
        search.seeds = [int(seed)]
    return clone(calibrator).set_params(search=search)


def inner_splitter(X: pd.DataFrame, groups: str | None, inner_cv: Any = None, min_groups: int = 3,
                   n_splits: int = 3):
    """The inner splitter of one outer fold and whether it splits by ``groups``.

    ``inner_cv`` given: it, used with groups when ``groups`` is given.  Otherwise
    ``LeaveOneGroupOut`` when the rows hold at least ``min_groups`` groups, else
    ``KFold(min(n_splits, rows))`` (unshuffled).
    """
    if inner_cv is not None:
        return inner_cv, groups is not None
    if groups is not None and X[groups].nunique() >= min_groups:
        return LeaveOneGroupOut(), True
    if len(X) < 2:
        raise CalibError(f"an outer fold leaves {len(X)} training row(s); an inner split needs 2", field="outer_cv")
    return KFold(n_splits=min(n_splits, len(X))), False


def _describe_cv(cv, by_groups: bool, groups: str | None) -> str:
    name = type(cv).__name__
    if isinstance(cv, KFold):
        name += f"({cv.n_splits})"
    return f"{name} by {groups}" if by_groups else name


def _scores(cal, X: pd.DataFrame, metrics: Sequence[str]) -> tuple[dict, list[dict]]:
    """Row-weighted mean APE per metric over ``X``, and per row: name, weight, APE, predicted, measured."""
    pred, meas = cal.predict_all(X), cal.measured(X)
    w = cal.row_weights(X)
    w = np.ones(len(X)) if w is None else np.asarray(w, dtype=float)
    apes = {m: ape(np.asarray(pred[m], dtype=float), np.asarray(meas[m], dtype=float)) for m in metrics}
    mean = {m: float(np.average(apes[m], weights=w)) for m in metrics}
    rows = [{"row": str(name), "weight": float(w[i]), "ape": {m: float(apes[m][i]) for m in metrics},
             "predicted": {m: float(pred[m].iloc[i]) for m in metrics},
             "measured": {m: float(meas[m].iloc[i]) for m in metrics}} for i, name in enumerate(X.index)]
    return mean, rows


@dataclass
class NestedResult:
    """What :func:`nested_cross_validate` measured.

    Attributes
    ----------
    candidates : list of str
    seeds : list of int
    folds : list of dict
        Per outer fold: ``fold``, ``train``, ``test`` (row names), ``test_groups``.
    records : list of dict
        Per (fold, seed, candidate): ``params``, ``train_loss`` (the objective on the fold's training rows),
        ``train`` and ``test`` (row-weighted mean APE per metric), ``rows`` (per held-out row: ``row``,
        ``weight``, ``ape``, ``predicted``, ``measured``), ``study`` (Optuna study prefix), ``converged``.
    choices : list of dict
        Per (fold, seed): ``selected`` (SelectBest's choice), ``inner_scores`` (candidate -> inner fold scores,
        minus the objective), ``inner_mean``, ``inner_cv``, and ``test`` / ``rows``: the held-out scores of the
        chosen calibrator as SelectBest refitted it.
    aggregation : str
    """

    candidates: list[str]
    seeds: list[int]
    folds: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    choices: list[dict] = field(default_factory=list)
    aggregation: str = AGGREGATION

    def record(self, fold: int, seed: int, candidate: str) -> dict:
        """The record of ``candidate`` fitted with ``seed`` on outer fold ``fold``."""
        for r in self.records:
            if (r["fold"], r["seed"], r["candidate"]) == (fold, seed, candidate):
                return r
        raise KeyError((fold, seed, candidate))

    def _rows(self, seed: int, candidate: str | None) -> list[dict]:
        src = self.choices if candidate is None else [r for r in self.records if r["candidate"] == candidate]
        return [row for r in src if r["seed"] == seed for row in r["rows"]]

    def pooled(self, metric: str, seed: int, candidate: str | None = None) -> float:
        """Mean held-out APE of ``metric`` over every held-out row (:data:`AGGREGATION`) for one seed; of
        ``candidate``, or of the inner choice per fold when ``candidate`` is None."""
        rows = self._rows(seed, candidate)
        return float(np.average([r["ape"][metric] for r in rows], weights=[r["weight"] for r in rows]))

    def per_row(self, metric: str, seed: int, candidate: str | None = None) -> dict[str, float]:
        """Held-out APE of ``metric`` per row name (the inner choice's when ``candidate`` is None)."""
        return {r["row"]: r["ape"][metric] for r in self._rows(seed, candidate)}

    def subset(self, weights: Mapping[str, float], aggregation: str) -> "NestedResult":
        """The same result restricted to the held-out rows named in ``weights``, each reweighted by it.

        Per record and choice the held-out ``rows`` are filtered and ``test`` is recomputed as the weighted
        mean APE over the rows kept; a fold none of whose test rows is kept is dropped (with its records and
        choices).  For a table holding two kinds of row (synchronous experiments and load stages), this gives
        each kind's held-out figures under its own aggregation, :func:`summarize` reading it unchanged.
        """
        keep = {str(k): float(v) for k, v in weights.items()}

        def restrict(entries: list[dict]) -> list[dict]:
            out = []
            for e in entries:
                rows = [{**row, "weight": keep[row["row"]]} for row in e["rows"] if row["row"] in keep]
                if not rows:
                    continue
                w = [row["weight"] for row in rows]
                metrics = list(rows[0]["ape"])
                test = {m: float(np.average([row["ape"][m] for row in rows], weights=w)) for m in metrics}
                out.append({**e, "rows": rows, "test": test})
            return out

        folds = [{**f, "test": [t for t in f["test"] if t in keep]} for f in self.folds]
        folds = [f for f in folds if f["test"]]
        kept = {f["fold"] for f in folds}
        return NestedResult(list(self.candidates), list(self.seeds), folds,
                            [r for r in restrict(self.records) if r["fold"] in kept],
                            [c for c in restrict(self.choices) if c["fold"] in kept], aggregation)

    def to_dict(self) -> dict:
        """JSON-able."""
        return {"candidates": self.candidates, "seeds": self.seeds, "aggregation": self.aggregation,
                "folds": self.folds, "records": self.records, "choices": self.choices}


def spread(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "min", "max", "n"}`` of ``values`` (a figure over seeds).

    >>> spread([0.1, 0.3, 0.2])
    {'median': 0.2, 'min': 0.1, 'max': 0.3, 'n': 3}
    """
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def _named(candidates) -> list[tuple[str, Calibrator]]:
    named = SelectBest(candidates)._named()
    for name, cal in named:
        if not isinstance(cal, Calibrator):
            raise ConfigError(f"candidate {name!r} is a {type(cal).__name__}, not a Calibrator", field="candidates")
    return named


def _seeds(seeds: Sequence[int]) -> list[int]:
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ConfigError(f"seeds must be distinct integers >= 0, got {list(seeds)!r}", field="seeds")
    return out


def nested_cross_validate(candidates, X: pd.DataFrame, *, outer_cv, groups: str | None = None, inner_cv=None,
                          seeds: Sequence[int] = (0, 1, 2, 3, 4), min_inner_groups: int = 3,
                          metrics: Sequence[str] = METRICS) -> NestedResult:
    """Outer cross-validation of every candidate and of :class:`SelectBest` among them, per search seed.

    Parameters
    ----------
    candidates : list of (name, Calibrator)
    X : DataFrame
        The rows (experiments or load stages) the estimators take.
    outer_cv : splitter
        ``split(X, y, groups)`` yielding train/test positions (e.g. ``LeaveOneGroupOut()``).
    groups : str, optional
        Column of ``X`` with the group labels of the outer and inner splits.
    inner_cv : splitter, optional
        The inner splitter of :class:`SelectBest`; default per fold from :func:`inner_splitter`.
    seeds : sequence of int
        Search seeds; every candidate is fitted once per seed (:func:`with_seed`).
    min_inner_groups : int
        Fewest groups left in an outer training fold for an inner ``LeaveOneGroupOut``.
    metrics : sequence of str
        Metrics whose held-out APEs are recorded.

    Returns
    -------
    NestedResult
    """
    named, seeds = _named(candidates), _seeds(seeds)
    if groups is not None and groups not in X.columns:
        raise CalibError(f"X has no column {groups!r}", field="groups")
    labels = None if groups is None else X[groups].astype(str).to_numpy()
    result = NestedResult([n for n, _ in named], seeds)
    for k, (tr, te) in enumerate(outer_cv.split(X, None, labels)):
        X_tr, X_te = X.iloc[np.sort(tr)], X.iloc[np.sort(te)]
        test_groups = [] if labels is None else sorted(set(labels[te].tolist()))
        result.folds.append({"fold": k, "train": [str(i) for i in X_tr.index], "test": [str(i) for i in X_te.index],
                             "test_groups": test_groups})
        cv, by_groups = inner_splitter(X_tr, groups, inner_cv, min_inner_groups)
        for seed in seeds:
            seeded = [(name, with_seed(cal, seed)) for name, cal in named]
            for name, cal in seeded:
                fitted = clone(cal).fit(X_tr)
                test, rows = _scores(fitted, X_te, metrics)
                _, train = Objective.parse(fitted.objective).loss(fitted.predict_all(X_tr), fitted.measured(X_tr),
                                                                  fitted.row_weights(X_tr))
                result.records.append({
                    "fold": k, "seed": seed, "candidate": name, "params": fitted.best_params_,
                    "train_loss": fitted.best_loss_,
                    "train": {m: train.get(f"train_{m}_mape") for m in metrics}, "test": test, "rows": rows,
                    "study": fitted.study_name_, "converged": fitted.converged_})
            sel = SelectBest(seeded, cv=cv, groups=groups if by_groups else None).fit(X_tr)
            test, rows = _scores(sel.best_estimator_, X_te, metrics)
            result.choices.append({
                "fold": k, "seed": seed, "selected": sel.best_name_, "params": sel.best_estimator_.best_params_,
                "inner_scores": sel.inner_scores_,
                "inner_mean": {n: float(np.mean(v)) for n, v in sel.inner_scores_.items()},
                "inner_cv": _describe_cv(cv, by_groups, groups), "test": test, "rows": rows})
    if not result.folds:
        raise CalibError(f"{type(outer_cv).__name__} yields no split", field="outer_cv")
    return result


def select_on_all(candidates, X: pd.DataFrame, *, groups: str | None = None, inner_cv=None,
                  seeds: Sequence[int] = (0, 1, 2, 3, 4), min_inner_groups: int = 3) -> list[SelectBest]:
    """:class:`SelectBest` among the candidates on every row of ``X``, once per seed (fitted, in seed order).

    With the same storage as :func:`nested_cross_validate` and ``LeaveOneGroupOut`` as both outer and inner
    splitter, the inner fits are the outer fits already made: only the winner's refit on all rows is new.
    """
    named, seeds = _named(candidates), _seeds(seeds)
    cv, by_groups = inner_splitter(X, groups, inner_cv, min_inner_groups)
    out = []
    for seed in seeds:
        seeded = [(name, with_seed(cal, seed)) for name, cal in named]
        out.append(SelectBest(seeded, cv=cv, groups=groups if by_groups else None).fit(X))
    return out


def summarize(result: NestedResult, metrics: Sequence[str] = METRICS) -> dict:
    """Every held-out figure of ``result`` as a :func:`spread` over seeds (the numbers a report shows).

    Returns
    -------
    dict
        ``aggregation``; ``candidates``: name -> ``heldout`` (metric -> spread of the pooled mean APE, with
        ``per_seed``), ``train_loss`` (spread over seeds of the mean over folds), ``per_fold`` and ``per_row``
        (spreads per outer fold / held-out row); ``selected``: the same for the inner choice, plus per fold
        ``chosen`` (the choice per seed) and ``counts`` (candidate -> (fold, seed) pairs that chose it).
    """
    seeds = result.seeds

    def block(candidate: str | None) -> dict:
        src = result.choices if candidate is None else [r for r in result.records if r["candidate"] == candidate]
        heldout = {}
        for m in metrics:
            per_seed = [result.pooled(m, s, candidate) for s in seeds]
            heldout[m] = {**spread(per_seed), "per_seed": per_seed}
        per_fold = []
        for f in result.folds:
            here = [r for r in src if r["fold"] == f["fold"]]
            entry = {"fold": f["fold"], "test_groups": f["test_groups"], "n_test": len(f["test"]),
                     **{m: spread([r["test"][m] for r in here]) for m in metrics}}
            if candidate is None:
                entry["chosen"] = [r["selected"] for r in sorted(here, key=lambda r: seeds.index(r["seed"]))]
            per_fold.append(entry)
        rows: dict[str, dict[str, list[float]]] = {}
        for r in src:
            for row in r["rows"]:
                for m in metrics:
                    rows.setdefault(row["row"], {}).setdefault(m, []).append(row["ape"][m])
        out = {"heldout": heldout, "per_fold": per_fold,
               "per_row": {k: {m: spread(v) for m, v in d.items()} for k, d in rows.items()}}
        if candidate is not None:
            out["train_loss"] = spread([np.mean([r["train_loss"] for r in src if r["seed"] == s]) for s in seeds])
        return out

    counts = {c: sum(ch["selected"] == c for ch in result.choices) for c in result.candidates}
    return {"aggregation": result.aggregation, "seeds": seeds,
            "candidates": {c: block(c) for c in result.candidates},
            "selected": {**block(None), "counts": counts, "n_choices": len(result.choices)}}


def recommend(selections: Sequence[SelectBest], seeds: Sequence[int]) -> tuple[dict, SelectBest]:
    """What to ship from :func:`select_on_all`: the candidate most seeds chose (ties: the better mean inner score),
    fitted by the seed with the lowest train loss among those that chose it.

    Returns
    -------
    record : dict
        ``candidate``, ``seed``, ``votes`` (candidate -> seeds), ``mean_inner_score`` (candidate -> mean over
        seeds of the mean inner score), ``inner_cv`` (the inner splitters, described), ``params``,
        ``train_loss``, ``per_seed`` (``seed``, ``chosen``,
        ``params``, ``train_loss``, ``inner_mean``).
    selection : SelectBest
        The fitted selector of that seed (``best_estimator_``, ``calibration_``).
    """
    names = [n for n, _ in selections[0]._named()]
    votes = {n: sum(sel.best_name_ == n for sel in selections) for n in names}
    inner = {n: float(np.mean([np.mean(sel.inner_scores_[n]) for sel in selections]))
             for n in names if all(n in sel.inner_scores_ for sel in selections)}  # none with a single candidate

    best = max(names, key=lambda n: (votes[n], inner.get(n, 0.0)))
    seed, chosen = min(((s, sel) for s, sel in zip(seeds, selections) if sel.best_name_ == best),
                       key=lambda p: p[1].best_estimator_.best_loss_)
    per_seed = [{"seed": s, "chosen": sel.best_name_, "params": sel.best_estimator_.best_params_,
                 "train_loss": sel.best_estimator_.best_loss_,
                 "inner_mean": {n: float(np.mean(v)) for n, v in sel.inner_scores_.items()}}
                for s, sel in zip(seeds, selections)]
    inner_cv = sorted({_describe_cv(check_cv(sel.cv), sel.groups is not None, sel.groups) for sel in selections})
    return ({"candidate": best, "seed": seed, "votes": votes, "mean_inner_score": inner, "inner_cv": inner_cv,
             "params": chosen.best_estimator_.best_params_, "train_loss": chosen.best_estimator_.best_loss_,
             "per_seed": per_seed}, chosen)
