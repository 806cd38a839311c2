"""Search algorithms: a phased grid, TPE and CMA-ES, several seeds, an optional local refinement.

Every search is one or more Optuna studies in the storage it is given (see
:mod:`calib.calibrate.trials`), so a search resumes after a crash, shares its
trials with ``--workers`` and ``calib study worker``, and shows in
optuna-dashboard.  One abstract base, :class:`Search`; one small class per
algorithm.  ``run(objective, space, storage=..., name=...)`` minimises
``objective(values) -> (loss, attrs)`` (``values``: qualified name -> value)
and returns a :class:`SearchResult`.

Examples
--------
>>> from calib.calibrate.space import Range
>>> import optuna
>>> res = PhasedGrid([Grid(step=1.0), Refine(radius=1.0, step=0.25)]).run(
...     lambda v: ((v["x"] - 1.3) ** 2, {}), {"x": Range(0, 4)}, storage=optuna.storages.InMemoryStorage(),
...     name="demo")
>>> res.best_params, len(res.trials)
({'x': 1.25}, 14)
>>> res = TPE(n_trials=20, seeds=2).run(lambda v: ((v["x"] - 1.3) ** 2, {}), {"x": Range(0, 4)},
...                                     storage=optuna.storages.InMemoryStorage(), name="demo")
>>> [s["seed"] for s in res.seeds], res.best_loss < 0.05
([0, 1], True)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from calib.calibrate.space import Dimension, Range
from calib.errors import ConfigError

__all__ = ["Search", "SearchResult", "Grid", "Refine", "PhasedGrid", "TPE", "CmaEs", "budget", "parse_search"]

Objective = Callable[[dict[str, Any]], tuple[float, Mapping[str, Any]]]

#: Largest number of grid points one phase may have (a typo in a step must not hang a study).
MAX_GRID_POINTS = 100_000


@dataclass
class SearchResult:
    """What a search found.

    Attributes
    ----------
    best_params : dict
        Qualified name -> value of the lowest-loss trial (ties: the earlier seed, then the smaller values).
    best_loss : float
    trials : list of dict
        Every completed trial: ``params``, ``loss``, ``attrs``, ``stage`` (a grid phase's name or
        ``phase<i>``, ``seed<N>`` or ``refine``), ``number``.
    seeds : list of dict
        Per seed: ``seed``, ``best_loss``, ``best_params``, ``study``, ``curve`` (best loss so far after
        each trial, in trial order).
    converged : bool or None
        Whether the seeds agree on the best train loss within the search's tolerance (None: one seed).
    studies : list of str
        Optuna study names, in the order they ran.
    """

    best_params: dict[str, Any]
    best_loss: float
    trials: list[dict] = field(default_factory=list)
    seeds: list[dict] = field(default_factory=list)
    converged: bool | None = None
    studies: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-able summary (no trial list)."""
        return {"best_params": self.best_params, "best_loss": self.best_loss, "converged": self.converged,
                "seeds": self.seeds, "studies": self.studies, "n_trials": len(self.trials)}


class Search(ABC):
    """Base of every search algorithm."""

    @abstractmethod
    def run(self, objective: Objective, space: Mapping[str, Dimension], *, storage, name: str,
            progress: bool = False) -> SearchResult:
        """Minimise ``objective`` over ``space``; Optuna studies are named ``name-...`` in ``storage``."""

    @abstractmethod
    def describe(self) -> dict:
        """A JSON-able description (recorded in results and calibration files, part of the study fingerprint)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "algorithm")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash(repr(self))


def _trial_row(t, stage: str) -> dict:
    from calib.calibrate.trials import objective_attrs

    return {"params": dict(t.params), "loss": float(t.value), "attrs": objective_attrs(t), "stage": stage,
            "number": t.number}


def _curve(rows: Sequence[dict]) -> list[float]:
    best, out = math.inf, []
    for r in sorted(rows, key=lambda r: r["number"]):
        best = min(best, r["loss"])
        out.append(best)
    return out


def _best(rows: Sequence[dict]) -> dict:
    return min(rows, key=lambda r: (r["loss"], sorted(r["params"].items(), key=lambda kv: kv[0])))


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise ConfigError(f"must be a count >= 1 or a list of seeds, got {seeds!r}", field="search.seeds")
    if isinstance(seeds, int):
        if seeds < 1 or seeds > 1000:
            raise ConfigError(f"must be between 1 and 1000, got {seeds}", field="search.seeds")
        return list(range(seeds))
    out = list(seeds)
    if not out or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in out):
        raise ConfigError(f"seeds must be integers >= 0, got {out!r}", field="search.seeds")
    if len(set(out)) != len(out):
        raise ConfigError(f"seeds repeat: {out!r}", field="search.seeds")
    return out


def budget(n_params: int) -> int:
    """Default trials per seed for ``n_params`` searched parameters: grows with the dimension.

    >>> budget(1), budget(4), budget(8)
    (30, 100, 200)
    """
    return max(30, 25 * n_params)


# ---------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Grid:
    """A grid phase over ``[low, high]`` (default: the space's range) in steps of ``step``; ``name`` labels the
    phase (its Optuna study is ``<search name>-<name>``)."""

    step: float
    low: float | None = None
    high: float | None = None
    name: str | None = None

    def values(self, dim: Range, previous: float | None) -> list[float]:
        low = dim.low if self.low is None else self.low
        high = dim.high if self.high is None else self.high
        return _grid(low, high, self.step, dim)

    def describe(self) -> dict:
        return {"grid": {k: v for k, v in (("low", self.low), ("high", self.high), ("step", self.step),
                                           ("name", self.name)) if v is not None}}


@dataclass(frozen=True)
class Refine:
    """A grid phase around the previous phase's optimum: ``optimum ± radius`` in steps of ``step``, clipped at
    the space's low end only (as the HG1 study did: an optimum at the top of the first grid is refined above
    it)."""

    radius: float
    step: float
    name: str | None = None

    def values(self, dim: Range, previous: float | None) -> list[float]:
        if previous is None:
            raise ConfigError("a refine phase needs an earlier phase", field="search.phases")
        n = int(round(self.radius / self.step))
        return [v for v in _grid(previous - n * self.step, previous + n * self.step, self.step, dim)
                if v >= dim.low]

    def describe(self) -> dict:
        return {"refine": {k: v for k, v in (("radius", self.radius), ("step", self.step), ("name", self.name))
                           if v is not None}}


def _grid(low: float, high: float, step: float, dim: Range) -> list[float]:
    for name, v in (("low", low), ("high", high), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"must be a finite number, got {v!r}", field=f"search.phases.{name}")
    if step <= 0:
        raise ConfigError(f"must be > 0, got {step}", field="search.phases.step")
    if high < low:
        raise ConfigError(f"empty grid: high {high} < low {low}", field="search.phases.high")
    n = int(round((high - low) / step))
    if n + 1 > MAX_GRID_POINTS:
        raise ConfigError(f"{n + 1} grid points exceed the limit of {MAX_GRID_POINTS}", field="search.phases.step")
    return [round(low + i * step, 9) for i in range(n + 1)]


class PhasedGrid(Search):
    """Grid phases over one parameter, each evaluated exactly once per value (shared by every worker).

    The optimum of a phase is its lowest loss, ties to the smaller value, so
    the result never depends on trial order.

    Parameters
    ----------
    phases : list of Grid or Refine
        The first must be a :class:`Grid`.
    """

    def __init__(self, phases: Sequence[Grid | Refine]) -> None:
        self.phases = list(phases)
        if not self.phases or not isinstance(self.phases[0], Grid):
            raise ConfigError("the first phase must be a Grid", field="search.phases")

    def describe(self) -> dict:
        return {"algorithm": "phased_grid", "phases": [p.describe() for p in self.phases]}

    def run(self, objective, space, *, storage, name, progress=False) -> SearchResult:
        from calib.calibrate.trials import grid_search

        if len(space) != 1 or not isinstance(next(iter(space.values())), Range):
            raise ConfigError("a phased grid searches exactly one Range parameter", field="space")
        param, dim = next(iter(space.items()))
        rows: list[dict] = []
        studies: list[str] = []
        previous = None
        labels = [p.name or f"phase{i}" for i, p in enumerate(self.phases)]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"phase names repeat: {labels}", field="search.phases")
        for phase, label in zip(self.phases, labels):
            values = phase.values(dim, previous)
            study = f"{name}-{label}"
            done = grid_search(study, storage, param, values, lambda v: objective({param: v}), progress=progress,
                               desc=f"{name} {label}")
            studies.append(study)
            phase_rows = [{**_trial_row(t, label), "params": {param: v}} for v, t in done.items()]
            rows += phase_rows
            previous = min(phase_rows, key=lambda r: (r["loss"], r["params"][param]))["params"][param]
        best = {param: previous}
        loss = min(r["loss"] for r in rows if r["params"][param] == previous)
        return SearchResult(best, loss, rows, [], None, studies)


# ---------------------------------------------------------------------------------------- samplers


class _Seeded(Search):
    """Several seeds of one Optuna sampler, then an optional CMA-ES refinement from the best point."""

    algorithm = "tpe"

    def __init__(self, n_trials: int | None = None, seeds: int | Sequence[int] = 5, refine: int = 0,
                 tolerance: float = 0.005, options: Mapping[str, Any] | None = None) -> None:
        if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int)
                                     or not 1 <= n_trials <= 100_000):
            raise ConfigError(f"must be an integer in [1, 100000], got {n_trials!r}", field="search.n_trials")
        if isinstance(refine, bool) or not isinstance(refine, int) or not 0 <= refine <= 100_000:
            raise ConfigError(f"must be an integer in [0, 100000], got {refine!r}", field="search.refine")
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
            raise ConfigError(f"must be a finite number >= 0, got {tolerance!r}", field="search.tolerance")
        self.n_trials = n_trials
        self.seeds = _seed_list(seeds)
        self.refine = refine
        self.tolerance = float(tolerance)
        self.options = dict(options or {})

    def describe(self) -> dict:
        return {"algorithm": self.algorithm, "n_trials": self.n_trials, "seeds": self.seeds,
                "refine": self.refine, "tolerance": self.tolerance, "options": self.options}

    def _sampler_options(self, space) -> dict:
        return dict(self.options)

    def run(self, objective, space, *, storage, name, progress=False) -> SearchResult:
        from calib.calibrate.trials import tpe_search

        dists = {k: d.distribution() for k, d in space.items()}
        n_trials = self.n_trials or budget(len(space))
        rows, seeds, studies = [], [], []
        for seed in self.seeds:
            study = f"{name}-{self.algorithm}-s{seed}"
            done = tpe_search(study, storage, dists, objective, n_trials, seed, progress=progress,
                              desc=f"{name} seed {seed}", sampler_options=self._sampler_options(space),
                              algorithm=self.algorithm)
            seed_rows = [_trial_row(t, f"seed{seed}") for t in done]
            best = _best(seed_rows)
            seeds.append({"seed": seed, "best_loss": best["loss"], "best_params": best["params"], "study": study,
                          "curve": _curve(seed_rows)})
            rows += seed_rows
            studies.append(study)
        top = min(seeds, key=lambda s: (s["best_loss"], self.seeds.index(s["seed"])))
        best_params, best_loss = dict(top["best_params"]), top["best_loss"]
        floats = [k for k, d in space.items() if isinstance(d, Range) and not d.integer]
        if self.refine and len(floats) >= 2:
            study = f"{name}-refine"
            fixed = {k: v for k, v in best_params.items() if k not in floats}
            done = tpe_search(study, storage, _local_box(space, floats, best_params),
                              lambda v: objective({**fixed, **v}), self.refine, self.seeds[0], progress=progress,
                              desc=f"{name} refine", algorithm="cmaes")
            ref_rows = [{**_trial_row(t, "refine"), "params": {**fixed, **t.params}} for t in done]
            rows += ref_rows
            studies.append(study)
            ref = _best(ref_rows)
            if ref["loss"] < best_loss:
                best_params, best_loss = dict(ref["params"]), ref["loss"]
        losses = [s["best_loss"] for s in seeds]
        converged = None if len(seeds) < 2 else bool(max(losses) - min(losses) <= self.tolerance)
        return SearchResult(best_params, best_loss, rows, seeds, converged, studies)


def _local_box(space, names, centre, fraction: float = 0.1) -> dict:
    """Distributions of a box ``centre ± fraction × width`` (clipped to the space): CMA-ES starts at its middle
    with a step of a sixth of its width, i.e. a local search around ``centre``."""
    from calib.calibrate.space import Range

    out = {}
    for k in names:
        dim = space[k]
        half = fraction * (dim.high - dim.low)
        low, high = max(dim.low, centre[k] - half), min(dim.high, centre[k] + half)
        if dim.log:
            low = max(low, dim.low)
        out[k] = Range(low, high if high > low else low + 1e-12, log=dim.log).distribution()
    return out


class TPE(_Seeded):
    """Optuna's TPE sampler, ``seeds`` independent runs of ``n_trials`` each (default :func:`budget`).

    Parameters
    ----------
    n_trials : int, optional
        Trials per seed (default grows with the number of parameters, :func:`budget`).
    seeds : int or list of int, default 5
        A count (seeds ``0..n-1``) or the seeds themselves.
    refine : int, default 0
        Trials of a CMA-ES refinement in a box of ±10 % of each range around the best point (two or more
        real parameters).
    tolerance : float, default 0.005
        The seeds are "converged" when their best train losses differ by at most this much.
    options : dict, optional
        Extra ``TPESampler`` arguments (``n_startup_trials``, ``multivariate``...).
    """

    algorithm = "tpe"

    def _sampler_options(self, space) -> dict:
        n = self.n_trials or budget(len(space))
        return {"n_startup_trials": min(10, max(1, n // 3)), **self.options}


class CmaEs(_Seeded):
    """Optuna's CMA-ES sampler (``cmaes`` package), same parameters as :class:`TPE`."""

    algorithm = "cmaes"


def parse_search(data: Mapping[str, Any] | Search | None, default: Search | None = None) -> Search:
    """A search from a study file's mapping (``{algorithm: tpe, n_trials: 100, seeds: 5}`` or
    ``{algorithm: phased_grid, phases: [{grid: {step: 25}}, {refine: {radius: 25, step: 5}}]}``)."""
    if data is None:
        return default or TPE()
    if isinstance(data, Search):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError("must be a mapping with an 'algorithm'", field="search")
    data = dict(data)
    algorithm = data.pop("algorithm", "tpe")
    if algorithm == "phased_grid":
        phases = []
        for p in data.pop("phases", []):
            if not isinstance(p, Mapping) or len(p) != 1 or next(iter(p)) not in ("grid", "refine"):
                raise ConfigError("each phase is {grid: {...}} or {refine: {...}}", field="search.phases")
            kind, args = next(iter(p.items()))
            try:
                phases.append((Grid if kind == "grid" else Refine)(**args))
            except TypeError as exc:
                raise ConfigError(str(exc), field=f"search.phases.{kind}") from None
        if data:
            raise ConfigError("unknown key", field=f"search.{next(iter(data))}")
        return PhasedGrid(phases)
    classes = {"tpe": TPE, "cmaes": CmaEs}
    if algorithm not in classes:
        raise ConfigError(f"unknown algorithm {algorithm!r}; choose phased_grid, tpe or cmaes",
                          field="search.algorithm")
    try:
        return classes[algorithm](**data)
    except TypeError as exc:
        raise ConfigError(str(exc).split("() ", 1)[-1], field="search") from None

