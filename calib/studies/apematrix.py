"""Per-experiment errors at many parameter sets, computed once; selection per split as array operations.

The error of one experiment at one parameter set does not depend on which
other experiments are in a train or test fold: every experiment is replayed on
its own.  So the generalization studies evaluate each candidate parameter set
once on every experiment, keep the predictions, and answer every split
(715 of them, or a bootstrap's thousands) by indexing a
``(candidates x experiments)`` APE matrix.

Pieces
------
:class:`CandidateStore`
    Predictions of every experiment at a list of estimator parameter sets,
    stored in calib's Optuna storage (predictions as trial user attributes,
    a chunk of candidates per trial) so that a rerun resumes and a finished
    study costs no replay at all.
:class:`Predictions`
    The stored predictions as arrays, and their APE matrices.
:class:`GridApe`
    A one-parameter grid on top of a store: rows are evaluated when a split
    first asks for them.
:func:`phased_optima`
    The HG1 coarse-then-fine search, run for many train folds at once.
:func:`tpe_search`, :func:`best_trial`, :func:`pareto_front`, :func:`qmc_pool`
    A resumable seeded Optuna TPE search (one or two objectives) and a
    data-independent quasi-random candidate pool; :class:`SearchParam` is a
    searched parameter as a study file declares it.
:class:`SplitterSpec`, :func:`build_folds`
    The study-file description of a splitter, checked before any work.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from calib.errors import CalibError, StudyError
from calib.estimators.roofline import RooflineRegressor
from calib.metrics import ape
from calib.calibrate.model_selection import Fold, group_labels, make_splitter, materialize_splits
from calib.calibrate.trials import quiet_optuna
from calib.studies.context import RunContext
from calib.studies.spec import StudyBase, Strict

__all__ = ["CandidateStore", "Predictions", "GridApe", "phased_optima", "SearchParam", "grid_store", "fold_metrics",
           "tpe_search", "best_trial", "pareto_front", "derive_seed", "qmc_pool", "space_size", "SplitterSpec",
           "build_folds", "fingerprint", "dataset_fingerprint", "predict_experiments", "worker_result",
           "store_record", "require_columns", "MEASURED", "METRIC_NAMES"]

#: metric -> measured column of the experiments table
MEASURED = {"ttft": "ttft_mean_ms", "tpot": "tpot_mean_ms", "e2e": "e2e_mean_ms"}
METRIC_NAMES = ("tpot", "ttft", "e2e")
_STORED = ("ttft", "e2e", "tpot_itl", "tpot_guidellm", "overlapped")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able ``parts`` (names Optuna studies after their inputs)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def dataset_fingerprint(X: pd.DataFrame) -> str:
    """Hash of the experiments table (index and every column), so a changed dataset never reuses trials."""
    return fingerprint(X.reset_index().astype(str).to_csv(index=False))


def predict_experiments(X: pd.DataFrame, params: Mapping[str, Any]) -> dict[str, list]:
    """Predictions of every experiment of ``X`` under estimator ``params`` (the replay; the expensive call).

    Returns ``{"ttft", "e2e", "tpot_itl", "tpot_guidellm": [ms per experiment], "overlapped": [int]}``
    in the row order of ``X``.
    """
    est = RooflineRegressor(**params).fit(X)
    pred = est.predict_all(X)
    out = {k: [float(v) for v in pred[k]] for k in ("ttft", "e2e", "tpot_itl", "tpot_guidellm")}
    out["overlapped"] = [int(v) for v in pred["overlapped"]]
    return out


def _canonical(candidate: Mapping[str, Any]) -> str:
    return json.dumps(candidate, sort_keys=True)


@dataclass(frozen=True)
class Predictions:
    """Predictions of ``n_candidates`` parameter sets on ``n_experiments`` experiments.

    Attributes
    ----------
    experiments : tuple of str
    candidates : tuple of dict
    values : dict
        ``"ttft"``, ``"e2e"``, ``"tpot_itl"``, ``"tpot_guidellm"`` (ms) and
        ``"overlapped"`` -> array ``(n_candidates, n_experiments)``.
    measured : dict
        ``"ttft"``, ``"tpot"``, ``"e2e"`` -> measured means (ms), ``(n_experiments,)``.
    tpot_definition : {"itl", "guidellm"}
        Which predicted TPOT is compared with the measured one.
    """

    experiments: tuple[str, ...]
    candidates: tuple[dict, ...]
    values: dict
    measured: dict
    tpot_definition: str

    def predicted(self, metric: str) -> np.ndarray:
        """Predicted ``metric`` (ms), ``(n_candidates, n_experiments)``."""
        return self.values[f"tpot_{self.tpot_definition}" if metric == "tpot" else metric]

    def ape(self, metric: str) -> np.ndarray:
        """APE of ``metric`` (a fraction), ``(n_candidates, n_experiments)``."""
        return ape(self.predicted(metric), self.measured[metric][None, :])

    def with_definition(self, tpot_definition: str) -> "Predictions":
        """The same predictions compared under another TPOT definition."""
        return Predictions(self.experiments, self.candidates, self.values, self.measured, tpot_definition)


class CandidateStore:
    """Predictions of every experiment of ``X`` at candidate parameter sets, evaluated once and stored.

    Each candidate is a dict of estimator parameters that override ``base``.
    Predictions are stored in the Optuna study ``study_name`` of ``storage``:
    each trial holds a chunk of up to ``chunk_size`` candidates as the user
    attribute ``candidates`` (canonical JSON of the candidate -> predictions),
    its value the lowest mean TPOT APE in the chunk (for browsing only).
    Chunks keep the storage overhead (tens of ms per Optuna trial with
    SQLite) small next to a replay; an interrupted run loses at most one
    unfinished chunk.  A rerun on the same storage loads the predictions
    instead of replaying; a candidate is evaluated at most once per storage.

    Parameters
    ----------
    X : DataFrame
        Experiments (all of them: a candidate is always evaluated on every row).
    base : dict
        Estimator parameters shared by every candidate.
    storage : optuna storage or URL
    study_name : str
        Should identify ``X`` and ``base`` (see :func:`fingerprint`).
    progress : bool
    tpot_definition : {"itl", "guidellm"}, optional
        Default: the estimator's (``itl`` in reference mode, ``guidellm`` in corrected).
    evaluate : callable, optional
        ``(X, params) -> predictions`` (default :func:`predict_experiments`); a
        hook for instrumentation.
    chunk_size : int, default 16

    Attributes
    ----------
    n_evaluated : int
        Candidates replayed by this object (not loaded from storage).
    requested : set of str
        Every candidate asked for (canonical JSON), replayed or loaded.
    """

    def __init__(self, X: pd.DataFrame, base: Mapping[str, Any], storage, study_name: str, *, progress: bool = False,
                 tpot_definition: str | None = None, evaluate: Callable | None = None, chunk_size: int = 16):
        self.X = X
        self.base = dict(base)
        self.storage = storage
        self.study_name = study_name
        self.progress = progress
        est = RooflineRegressor(**self.base)
        self.tpot_definition = tpot_definition or est.settings().replay.tpot
        self._evaluate = evaluate or predict_experiments
        self.chunk_size = int(chunk_size)
        self._experiments = tuple(str(i) for i in X.index)
        self._memo: dict[str, dict] = {}
        self._study = None
        self.n_evaluated = 0
        self.requested: set[str] = set()

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            quiet_optuna()
            self._study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                              direction="minimize", load_if_exists=True)
            for t in sorted(self._study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                            key=lambda t: t.number):
                if tuple(t.user_attrs.get("experiments", ())) != self._experiments:
                    continue
                for key, pred in (t.user_attrs.get("candidates") or {}).items():
                    self._memo.setdefault(key, pred)
        return self._study

    def _flush(self, chunk: dict[str, dict]) -> None:
        if not chunk:
            return
        measured = self.X[MEASURED["tpot"]].to_numpy(dtype=float)
        best = min(float(np.mean(ape(np.asarray(p[f"tpot_{self.tpot_definition}"], dtype=float), measured)))
                   for p in chunk.values())
        self.study.add_trial(optuna.trial.create_trial(
            value=best, user_attrs={"experiments": list(self._experiments), "candidates": dict(chunk)}))

    def ensure(self, candidates: Sequence[Mapping[str, Any]], desc: str | None = None) -> int:
        """Evaluate (and store) every candidate not evaluated yet; returns how many were replayed."""
        self.study  # load what the storage has
        keys = [_canonical(c) for c in candidates]
        self.requested.update(keys)
        todo = list(dict.fromkeys(k for k in keys if k not in self._memo))
        chunk: dict[str, dict] = {}
        try:
            with tqdm(total=len(todo), desc=desc or self.study_name, unit="candidate", disable=not self.progress,
                      leave=False) as bar:
                for key in todo:
                    pred = self._evaluate(self.X, {**self.base, **json.loads(key)})
                    pred = {k: list(pred[k]) for k in _STORED}
                    self._memo[key] = pred
                    chunk[key] = pred
                    self.n_evaluated += 1
                    bar.update(1)
                    if len(chunk) >= self.chunk_size:
                        self._flush(chunk)
                        chunk = {}
        finally:
            self._flush(chunk)  # an interrupted run keeps what it evaluated
        return len(todo)

    def predictions(self, candidates: Sequence[Mapping[str, Any]], tpot_definition: str | None = None,
                    desc: str | None = None) -> Predictions:
        """:class:`Predictions` of ``candidates`` (evaluating the missing ones), rows in the given order."""
        self.ensure(candidates, desc=desc)
        rows = [self._memo[_canonical(c)] for c in candidates]
        values = {k: np.asarray([r[k] for r in rows], dtype=np.int64 if k == "overlapped" else float).reshape(
            len(rows), len(self._experiments)) for k in _STORED}
        measured = {m: self.X[col].to_numpy(dtype=float) for m, col in MEASURED.items()}
        return Predictions(self._experiments, tuple(dict(c) for c in candidates), values, measured,
                           tpot_definition or self.tpot_definition)


class GridApe:
    """APE matrices of a one-parameter grid, evaluated lazily through a :class:`CandidateStore`.

    Parameters
    ----------
    store : CandidateStore
    parameter : str
        Estimator parameter the grid varies (e.g. ``per_layer_us``).
    tpot_definition : str, optional
        Override of the store's TPOT definition.

    Examples
    --------
    ``grid.ape("tpot", [0, 25, 50])`` is a ``(3, n_experiments)`` array;
    asking again for ``[25, 30]`` replays only 30.
    """

    def __init__(self, store: CandidateStore, parameter: str, tpot_definition: str | None = None):
        self.store = store
        self.parameter = parameter
        self.tpot_definition = tpot_definition

    def predictions(self, values: Sequence[float], desc: str | None = None) -> Predictions:
        return self.store.predictions([{self.parameter: float(v)} for v in values], self.tpot_definition, desc=desc)

    def ape(self, metric: str, values: Sequence[float]) -> np.ndarray:
        """``(len(values), n_experiments)`` APE of ``metric``."""
        return self.predictions(values).ape(metric)


def phased_optima(grid: GridApe, phases: Sequence[Any], train_idx: Sequence[np.ndarray], metric: str = "tpot",
                  desc: str | None = None) -> list[dict[str, float]]:
    """The HG1 phased grid search, run for every train fold of ``train_idx`` at once.

    Parameters
    ----------
    grid : GridApe
    phases : sequence of :class:`calib.studies.common.Phase`
        The first phase has a ``grid``; later ones a grid or ``around`` an
        earlier phase's optimum (``± radius`` in ``step``, clipped at the first
        phase's low end).
    train_idx : sequence of int arrays
        Row positions of each fold's train experiments.
    metric : str
        ``tpot``, ``ttft`` or ``e2e``: the objective is its train MAPE.

    Returns
    -------
    list of dict
        Per fold, ``{phase name: optimum}``; ties go to the smaller value.
        Every grid value any fold needs is evaluated once, for all folds.
    """
    from calib.calibrate import Range

    dim = Range(phases[0].grid.low, phases[0].grid.high)
    optima: list[dict[str, float]] = [dict() for _ in train_idx]
    for ph in phases:
        phase = ph.to_phase()  # the calibration core's Grid / Refine: one formula for the phase values
        if ph.grid is not None:
            fixed = tuple(phase.values(dim, None))
            windows = [fixed] * len(train_idx)
        else:
            cache: dict[float, tuple] = {}
            windows = []
            for opt in optima:
                c = opt[ph.around]
                if c not in cache:
                    cache[c] = tuple(phase.values(dim, c))
                windows.append(cache[c])
        union = sorted(set().union(*windows))
        A = grid.predictions(union, desc=f"{desc or 'grid'} {ph.name}").ape(metric)
        pos = {v: i for i, v in enumerate(union)}
        for j, (win, idx) in enumerate(zip(windows, train_idx)):
            rows = A[[pos[v] for v in win]]
            means = rows[:, idx].mean(axis=1)
            optima[j][ph.name] = float(win[int(np.argmin(means))])
    return optima


# ---- searching a parameter space -----------------------------------------------------------------------


class SearchParam(Strict):
    """One searched parameter: a float range (optionally stepped or log) or a list of choices."""

    low: float | None = None
    high: float | None = None
    step: float | None = Field(default=None, gt=0)
    log: bool = False
    choices: list[str | float] | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearchParam":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either 'choices' or 'low'/'high', not both")
            if len(self.choices) == 0:
                raise ValueError("empty search space: no choices")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs 'low' and 'high'")
        if self.high < self.low:
            raise ValueError(f"inverted range: high {self.high} < low {self.low}")
        if self.high == self.low:
            raise ValueError(f"empty range: low = high = {self.low}")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.step is not None and self.step > self.high - self.low:
            raise ValueError(f"step {self.step} is wider than the range {self.low}..{self.high}")
        return self

    def size(self) -> int | None:
        """Number of distinct values, or ``None`` for a continuous range."""
        if self.choices is not None:
            return len(self.choices)
        if self.step is not None:
            return int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return None

    def suggest(self, trial: optuna.Trial, name: str):
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def from_unit(self, u: float):
        """Map ``u`` in [0, 1) onto the parameter's values (for a quasi-random pool)."""
        k = self.size()
        if k is not None:
            i = min(int(u * k), k - 1)
            return self.choices[i] if self.choices is not None else round(self.low + i * self.step, 9)
        if self.log:
            return round(float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))), 9)
        return round(float(self.low + u * (self.high - self.low)), 9)


def space_size(space: Mapping[str, SearchParam]) -> int | None:
    """Number of distinct points of a fully discrete space, ``None`` if any parameter is continuous."""
    total = 1
    for p in space.values():
        k = p.size()
        if k is None:
            return None
        total *= k
    return total


def qmc_pool(space: Mapping[str, SearchParam], n: int, seed: int) -> list[dict]:
    """``n`` quasi-random points of ``space`` (scrambled Sobol, ``seed``), duplicates dropped, in draw order.

    The pool depends only on the space, ``n`` and ``seed``, never on data.
    """
    from scipy.stats import qmc

    names = sorted(space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Sobol prefers powers of two; any n is fine here
        u = qmc.Sobol(d=len(names), scramble=True, seed=seed).random(n)
    pool = {}
    for row in u:
        point = {k: space[k].from_unit(float(x)) for k, x in zip(names, row)}
        pool.setdefault(_canonical(point), point)
    return list(pool.values())


def derive_seed(*key: int) -> int:
    """A sampler seed from integers (``numpy.random.SeedSequence``), as :mod:`calib.calibrate.trials` derives them."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


def tpe_search(study_name: str, storage, space: Mapping[str, SearchParam],
               objective: Callable[[dict], tuple[Sequence[float], Mapping[str, Any]]], *, n_trials: int, seed: int,
               n_objectives: int = 1, n_startup_trials: int = 10, multivariate: bool = True, progress: bool = False,
               desc: str | None = None, flush_every: int = 10) -> optuna.Study:
    """A seeded Optuna TPE search that resumes: a rerun continues to ``n_trials`` completed trials.

    The sampler works on an in-memory copy of the study, and completed trials
    are copied to ``storage`` every ``flush_every`` trials and when the search
    ends or is interrupted: Optuna's SQLite storage costs ~0.1-0.2 s per
    ask/tell cycle, as much as the replay of a trial, and this keeps the
    storage cost near 20 ms per trial.  Each trial gets a fresh
    :class:`optuna.samplers.TPESampler` seeded from ``(seed, completed
    trials)`` (the rule of :func:`calib.calibrate.trials.tpe_search`), so a
    resumed search proposes the same trials as an uninterrupted one.  Unlike
    that function, the trials of one search are not shared between worker
    processes.

    Parameters
    ----------
    study_name, storage
        Where the trials live (calib's storage).
    space : dict of SearchParam
    objective : callable
        ``params -> (values, user_attrs)``; ``values`` has ``n_objectives`` entries, all minimised.
    n_trials : int
        Completed trials wanted in the study (not trials to add).
    seed : int
        Sampler seed (>= 0).
    n_objectives : {1, 2}
        Two objectives make a multi-objective TPE study (its Pareto front is
        ``study.best_trials``).
    n_startup_trials, multivariate
        Passed to :class:`optuna.samplers.TPESampler`.
    flush_every : int
        Completed trials kept in memory before they are written to ``storage``.

    Returns
    -------
    optuna.Study
        The study in ``storage``.
    """
    quiet_optuna()
    directions = ["minimize"] * n_objectives
    persist = optuna.create_study(study_name=study_name, storage=storage, directions=directions, load_if_exists=True)
    done = sorted(persist.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                  key=lambda t: t.number)
    if len(done) >= n_trials:
        return persist
    mem = optuna.create_study(directions=directions)
    if done:
        mem.add_trials(done)
    names = sorted(space)
    n_done = len(done)
    pending: list[optuna.trial.FrozenTrial] = []
    try:
        with tqdm(total=n_trials, initial=n_done, desc=desc or study_name, unit="trial", disable=not progress,
                  leave=False) as bar:
            while n_done < n_trials:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    mem.sampler = optuna.samplers.TPESampler(seed=derive_seed(seed, n_done),
                                                             n_startup_trials=n_startup_trials,
                                                             multivariate=multivariate)
                trial = mem.ask()
                params = {k: space[k].suggest(trial, k) for k in names}
                try:
                    values, attrs = objective(params)
                except BaseException:
                    mem.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise
                for k, v in attrs.items():
                    trial.set_user_attr(k, v)
                values = [float(v) for v in values]
                pending.append(mem.tell(trial, values if n_objectives > 1 else values[0]))
                n_done += 1
                bar.update(1)
                if len(pending) >= flush_every:
                    persist.add_trials(pending)
                    pending = []
    finally:
        if pending:
            persist.add_trials(pending)
    return persist


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The selected trial: lowest value (one objective) or, on the Pareto front, lowest mean of the values.

    Ties go to the earlier trial, so the choice never depends on timing.  (The
    lowest mean over all trials is always on the Pareto front.)
    """
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not trials:
        raise RuntimeError(f"study {study.study_name!r} has no completed trial")
    return min(trials, key=lambda t: (float(np.mean(t.values)), t.number))


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Non-dominated trials of a multi-objective study, by trial number."""
    return sorted(study.best_trials, key=lambda t: t.number)


# ---- splitters in study files --------------------------------------------------------------------------


class SplitterSpec(Strict):
    """A splitter as a study file names it.

    ``type``: ``all_k_of_n`` (``n_test``), ``fixed`` (``column``), ``shuffle``
    (``n_splits``, ``test_size``, ``seed``), ``group_shuffle`` (``group``,
    ``n_splits``, ``test_size`` = groups held out when an integer, ``seed``),
    ``leave_one_group_out`` (``group``), ``group_kfold`` (``group``, ``n_splits``).
    """

    type: Literal["all_k_of_n", "fixed", "shuffle", "group_shuffle", "leave_one_group_out", "group_kfold"]
    n_test: int | None = Field(default=None, ge=1)
    n_splits: int | None = Field(default=None, ge=1)
    test_size: float | None = Field(default=None, gt=0)
    seed: int = 0
    group: str | None = None
    column: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "SplitterSpec":
        t = self.type
        if t in ("shuffle", "group_shuffle"):
            if self.n_splits is None or self.test_size is None:
                raise ValueError(f"a {t} splitter needs 'n_splits' and 'test_size'")
        if t in ("group_shuffle", "leave_one_group_out", "group_kfold") and not self.group:
            raise ValueError(f"a {t} splitter needs 'group' (a column of the experiments table)")
        if t == "group_kfold" and (self.n_splits or 0) < 2:
            raise ValueError("a group_kfold splitter needs n_splits >= 2")
        return self

    @property
    def label(self) -> str:
        t = self.type
        if t == "all_k_of_n":
            return f"all_k_of_n(n_test={self.n_test or 4})"
        if t == "fixed":
            return f"fixed({self.column or 'hg1_split'})"
        if t == "leave_one_group_out":
            return f"leave_one_group_out({self.group})"
        if t == "group_kfold":
            return f"group_kfold({self.group}, n_splits={self.n_splits})"
        group = f"{self.group}, " if self.group else ""
        return f"{t}({group}n_splits={self.n_splits}, test_size={self.test_size:g}, seed={self.seed})"


def _test_count(test_size: float, n: int) -> int:
    return int(test_size) if float(test_size).is_integer() and test_size >= 1 else int(math.ceil(test_size * n))


def build_folds(spec: SplitterSpec, X: pd.DataFrame, source: str, field: str = "splitter") -> list[Fold]:
    """Materialise ``spec`` on ``X``; every problem is a :class:`StudyError` naming ``source`` and ``field``.

    Raises
    ------
    StudyError
        A group column that does not exist, a splitter that cannot split the
        table or yields an empty train or test fold, or a shuffle asking for
        more splits than distinct splits exist.
    """
    try:
        groups = group_labels(X, spec.group) if spec.group else None
        test_size = spec.test_size
        if test_size is not None and float(test_size).is_integer() and test_size >= 1:
            test_size = int(test_size)
        if spec.type in ("shuffle", "group_shuffle"):
            n = len(X) if spec.type == "shuffle" else len(set(groups.tolist()))
            k = _test_count(spec.test_size, n)
            if k >= n:
                what = "experiments" if spec.type == "shuffle" else "groups"
                raise CalibError(f"test_size {spec.test_size:g} of {n} {what} leaves an empty train fold",
                                 field="test_size")
            distinct = math.comb(n, k)
            if spec.n_splits > distinct:
                raise CalibError(f"asks for {spec.n_splits} splits but only C({n}, {k}) = {distinct} distinct "
                                 "splits exist", field="n_splits")
        splitter = make_splitter(spec.type, n_test=spec.n_test, n_splits=spec.n_splits, test_size=test_size,
                                 seed=spec.seed, column=spec.column)
        return materialize_splits(splitter, X, groups)
    except CalibError as exc:
        sub = f"{field}.{exc.field}" if exc.field and exc.field not in ("splitter",) else field
        raise StudyError(exc.message, file=source, field=sub) from None


def worker_result(spec, ctx, kind: str) -> dict | None:
    """For a worker process (``calib study worker``/``--workers``): the generalization kinds run in the lead only.

    Their searches keep trials in memory between flushes (see :func:`tpe_search`)
    and cannot be shared, so a worker returns at once and the lead does all the
    work; ``None`` for the lead.
    """
    if getattr(ctx, "is_worker", False):
        return {"study": spec.name, "kind": kind, "worker": "nothing to do: this kind runs in the lead process"}
    return None


def store_record(store: CandidateStore, sampler: str = "exhaustive grid") -> dict:
    """A ``settings.samplers`` entry for a candidate store."""
    return {"study": store.study_name, "sampler": sampler, "seed": None, "trials": len(store.requested)}


def require_columns(X: pd.DataFrame, columns: Iterable[str], source: str, field: str) -> None:
    """Raise :class:`StudyError` for the first of ``columns`` missing from ``X``."""
    for i, c in enumerate(columns):
        if c not in X.columns:
            raise StudyError(f"experiments table has no column {c!r}; columns: {', '.join(map(str, X.columns))}",
                             file=source, field=f"{field}[{i}]")


def grid_store(spec: StudyBase, X: pd.DataFrame, ctx: RunContext, base: dict, label: str = "grid") -> CandidateStore:
    """The candidate store of a study's grid (its Optuna study is named after the dataset and estimator)."""
    name = f"{spec.name}-{label}-{fingerprint(base, dataset_fingerprint(X))}"
    return CandidateStore(X, base, ctx.storage, name, progress=ctx.progress)


def fold_metrics(P: Predictions, row: int, fold: Fold) -> dict[str, dict[str, float]]:
    """``{metric_mape: {train, test, all}}`` at candidate ``row`` of ``P`` for one fold."""
    out = {}
    for m in ("tpot", "ttft", "e2e"):
        a = P.ape(m)[row]
        out[f"{m}_mape"] = {"train": float(a[fold.train_idx].mean()), "test": float(a[fold.test_idx].mean()),
                            "all": float(a.mean())}
    return out
