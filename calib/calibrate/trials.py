"""Optuna searches that resume and that several workers can share: a grid and TPE.

Trials live in an Optuna storage.  Any number of processes (``calib study run
--workers N``, ``calib study worker``) may call the same search on the same
storage at the same time; each call returns only when the whole search is
complete, with the same result in every process.  A rerun loads the study and
evaluates only what is missing, so an interrupted study (Ctrl-C, a killed
process) resumes without losing or repeating a completed trial.

Grid (:func:`grid_search`)
    A worker that finds no queued trial queues a grid value that no live trial
    holds as a ``WAITING`` trial holding the value (``enqueue_trial``), then
    pops a queued trial (Optuna hands each one to exactly one process in
    PostgreSQL/MySQL and journal storages; SQLite cannot be shared, see
    :func:`calib.studies.storage.check_shareable`).  A popped trial is
    evaluated only if the value is not complete and no other live trial
    (``WAITING``, ``RUNNING`` or ``COMPLETE``) of a *lower number* holds it;
    a trial that ``ask`` had to create (another worker popped the queued one
    first) takes a free value and yields to *any* other holder.  A trial that
    yields is recorded ``PRUNED`` without evaluation (user attribute
    ``calib:discarded``).  So a value is evaluated once in total even when two
    workers queue or pick it at the same time.
    Results are read back from the storage and ordered by value, never by
    completion order: N workers give the numbers of a serial run.

TPE (:func:`tpe_search`)
    A trial is evaluated only if fewer than ``n_trials`` live trials have a
    lower number; a surplus trial (a race at the end) is recorded ``FAIL``
    with the user attribute ``calib:discarded`` and never evaluated, so the
    study ends with exactly ``n_trials`` ``COMPLETE`` trials.  The sampler is a
    fresh :class:`optuna.samplers.TPESampler` per trial, seeded from the
    study's seed and the number of completed trials (plus the trial number
    when other trials are running), so a serial run gives the same trials
    every time, resumed or not.

Crashes
    While a trial runs, its worker records an Optuna heartbeat (see
    :mod:`calib.studies.storage`).  The loops call
    :func:`optuna.storages.fail_stale_trials`: the trial of a killed worker is
    failed once its heartbeat is ``grace_period`` seconds old and a copy of it
    is queued and re-run.  Ctrl-C (``KeyboardInterrupt``) or any other
    exception inside a trial marks it ``FAIL`` and propagates; the next run
    evaluates it again.  SIGINT and SIGTERM reach a search only in the
    objective, in a wait or between trials, never inside Optuna's storage
    code (see :class:`_Signals`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import signal
import socket
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from calib.errors import StudyError

__all__ = ["grid_search", "tpe_search", "completed_grid", "objective_attrs", "quiet_optuna", "recording",
           "worker_id"]

_logger = logging.getLogger(__name__)

LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
#: Trial user attributes written by calib (next to the objective's own attributes).
WORKER_KEY = "calib:worker"
DISCARD_KEY = "calib:discarded"
#: A grid value that failed this many times stops the search (a crash that repeats is a bug, not bad luck).
MAX_FAILURES_PER_VALUE = 5
#: This many failed TPE trials in a row in one process stop the search.
MAX_CONSECUTIVE_FAILURES = 10

_RECORD: list[dict] | None = None


def quiet_optuna() -> None:
    """Optuna logs warnings only (no line per trial)."""
    optuna.logging.set_verbosity(logging.WARNING)


def worker_id() -> str:
    """``host:pid`` of this process, recorded on every trial it evaluates (user attribute ``calib:worker``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def recording() -> Iterator[list[dict]]:
    """Collect one entry per search run in this process (study name, sampler, seed, trials).

    Examples
    --------
    >>> with recording() as log:
    ...     pass
    >>> log
    []
    """
    global _RECORD
    previous, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = previous


def objective_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """The attributes the objective returned for ``trial`` (without calib's own ``calib:*`` bookkeeping)."""
    return {k: v for k, v in trial.user_attrs.items() if not k.startswith("calib:")}


def _record(entry: dict) -> dict:
    if _RECORD is not None:
        _RECORD.append(entry)
    return entry


# --------------------------------------------------------------------------- helpers


_OPENED: dict[tuple[str, int], Any] = {}


def open_storage_cached(storage=None, **options):
    """An Optuna storage: a new in-memory one for ``None``, the opened storage of a URL (opened once per
    process, with ``options`` of :func:`calib.studies.storage.open_storage` at that first opening), or
    ``storage`` itself."""
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if isinstance(storage, str):
        key = (storage, os.getpid())  # a forked worker opens its own (a parent's connections are not its)
        if key not in _OPENED:
            from calib.studies.storage import open_storage

            _OPENED[key] = open_storage(storage, **options)
        return _OPENED[key]
    return storage


def forget_storage(url: str) -> None:
    """Drop the opened storage of ``url`` from the cache (a study run is over, or its files are removed)."""
    _OPENED.pop((url, os.getpid()), None)


def _as_storage(storage):
    if isinstance(storage, str):
        from calib.studies.storage import open_storage

        return open_storage(storage)
    return storage


def _heartbeat_interval(storage) -> int | None:
    """The storage's heartbeat interval (s), or None when it keeps no heartbeats (in-memory storage)."""
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if callable(getter) else None


def _trial_id(storage, study: optuna.Study, trial: optuna.trial.Trial) -> int:
    """The storage's id of a running trial, through the public storage API."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                           trial.number)


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class _StaleCheck:
    """Call :func:`optuna.storages.fail_stale_trials` now and then at most once per heartbeat interval."""

    def __init__(self, study: optuna.Study, storage) -> None:
        self.study = study
        self.every = _heartbeat_interval(storage)
        self.last = -math.inf

    def __call__(self) -> None:
        if self.every and time.monotonic() - self.last >= self.every:
            _fail_stale(self.study)
            self.last = time.monotonic()


def _open_study(name: str, storage, directions: Sequence[str], sampler) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=list(directions),
                                load_if_exists=True)
    have = [d.name.lower() for d in study.directions]
    if have != [d.lower() for d in directions]:
        raise StudyError(f"storage holds study {name!r} with directions {have}, not {list(directions)}",
                         field="storage")
    return study


class _Backoff:
    """Sleep between polls while other workers run the remaining trials (50 ms growing to 1 s)."""

    def __init__(self) -> None:
        self.delay = 0.05

    def reset(self) -> None:
        self.delay = 0.05

    def wait(self) -> None:
        time.sleep(self.delay)
        self.delay = min(1.0, self.delay * 1.5)


class _Heartbeat:
    """Record the trial's heartbeat now and then every interval, in a thread, until stopped."""

    def __init__(self, storage, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.interval = _heartbeat_interval(storage)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception as exc:  # a lost heartbeat is retried at the next interval
            _logger.debug("heartbeat of trial %s failed: %s", self.trial_id, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def start(self) -> "_Heartbeat":
        if self.interval:
            self._beat()
            self._thread = threading.Thread(target=self._loop, name=f"calib-heartbeat-{self.trial_id}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _Signals:
    """Deliver SIGINT/SIGTERM to a search only at safe points: in the objective, in a wait, between trials.

    A signal that lands inside Optuna's storage code can leave a trial
    ``RUNNING`` with no heartbeat (an RDB trial popped but not yet beating is
    never found stale) or break the journal file's lock bookkeeping.  So the
    search loops hold signals back, except inside :meth:`interruptible`
    sections (the objective, the sleep while other workers run), and deliver
    a held one with :meth:`deliver` at the top of each loop iteration, where
    no trial is open.  A signal raises what the process's handler raises
    (``KeyboardInterrupt`` for Ctrl-C); the trial it interrupts is marked
    ``FAIL``.  Three signals held at once are delivered at once (an escape
    hatch from a storage that hangs).  Only handlers set in Python are
    wrapped, and only in the main thread.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.live = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                handler = signal.getsignal(sig)
                if callable(handler):
                    self._old[sig] = handler
                    signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        old, self._old = self._old, {}
        if exc_type is None and self.pending and self.pending[0] in old:
            sig, self.pending = self.pending[0], []
            old[sig](sig, None)  # the search is complete; stop now as asked

    def _handle(self, sig: int, frame) -> None:
        self.pending.append(sig)
        if self.live or len(self.pending) >= 3:
            self.deliver()

    def deliver(self) -> None:
        """Raise for a held signal, if any."""
        if self.pending:
            sig, self.pending = self.pending[0], []
            self.live = False
            self._old[sig](sig, None)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self.live = True
        try:
            self.deliver()
            yield
        finally:
            self.live = False


def _ask(study: optuna.Study) -> optuna.trial.Trial:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask()


def _tell_fail(study: optuna.Study, trial, reason: str | None = None) -> None:
    """Mark ``trial`` FAIL, whatever happened to it meanwhile; never raises."""
    try:
        if reason:
            trial.set_user_attr(DISCARD_KEY, reason)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    except Exception as exc:  # the storage is gone or the trial finished: nothing more to do
        _logger.debug("could not mark trial %s FAIL: %s", getattr(trial, "number", "?"), exc)


def _discard(study: optuna.Study, trial, reason: str, state: TrialState) -> None:
    """Finish ``trial`` without evaluating it (``calib:discarded`` says why)."""
    try:
        trial.set_user_attr(DISCARD_KEY, reason)
        study.tell(trial, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def _finish(study: optuna.Study, trial, values, attrs: Mapping[str, Any]) -> bool:
    """Store ``attrs`` and ``values``; False when the trial was failed as stale meanwhile (result dropped)."""
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        frozen = study.tell(trial, values, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        frozen = None
    if frozen is None or frozen.state != TrialState.COMPLETE:
        _logger.warning("trial %s was failed as stale while it ran; its copy is re-run elsewhere", trial.number)
        return False
    return True


@contextlib.contextmanager
def _claimed_trial(study: optuna.Study, storage) -> Iterator[optuna.trial.Trial]:
    """Ask for a trial with a heartbeat running; any exception (Ctrl-C too) inside marks it FAIL."""
    trial = _ask(study)
    beat = _Heartbeat(storage, _trial_id(storage, study, trial))
    try:
        beat.start()
        trial.set_user_attr(WORKER_KEY, worker_id())
        yield trial
    except BaseException:
        _tell_fail(study, trial)
        raise
    finally:
        beat.stop()


def _check_waiting_possible(storage, what: str) -> None:
    if not _heartbeat_interval(storage):
        raise StudyError(f"{what} is RUNNING in another process and the storage has no heartbeat, so a dead "
                         "worker's trial would never be re-run; open the storage with calib.studies.storage."
                         "open_storage", field="storage")


def _bar(total: int, initial: int, desc: str, progress: bool):
    return tqdm(total=total, initial=initial, desc=desc, unit="trial", disable=not progress, leave=False)


def _set_bar(bar, n: int) -> None:
    if n != bar.n:
        bar.n = n
        bar.refresh()


# --------------------------------------------------------------------------- grid


def _bound_value(t: FrozenTrial, param: str) -> float | None:
    """The grid value a trial holds: its queued (fixed) value or its parameter."""
    fixed = t.system_attrs.get("fixed_params") or {}
    value = fixed.get(param, t.params.get(param))
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def completed_grid(study: optuna.Study, param: str) -> dict[float, FrozenTrial]:
    """Completed trials by value of ``param`` (the first completed trial wins a duplicate)."""
    done: dict[float, FrozenTrial] = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        v = _bound_value(t, param)
        if v is not None:
            done.setdefault(v, t)
    return done


def _pick(free: list[float], trials: Sequence[FrozenTrial]) -> float:
    """The free value this worker takes: the ``k``-th, ``k`` being its rank among the active workers.

    Active workers are those with a running trial or one finished in the last
    minute.  Alone (a serial run) a worker takes the first free value, so trial
    numbers follow the grid; workers that start together take different values.
    """
    me = worker_id()
    recent = datetime.datetime.now() - datetime.timedelta(seconds=60)
    active = {me}
    for t in trials:
        if t.state == TrialState.RUNNING or (t.datetime_complete is not None and t.datetime_complete > recent):
            who = t.user_attrs.get(WORKER_KEY)
            if isinstance(who, str):
                active.add(who)
    return free[sorted(active).index(me) % len(free)]


def _free_values(trials: Sequence[FrozenTrial], param: str, wanted: list[float], exclude: int = -1) -> list[float]:
    held = {_bound_value(t, param) for t in trials if t.state in LIVE and t.number != exclude}
    return [v for v in wanted if v not in held]


def _grid_trial(study: optuna.Study, storage, param: str, wanted: list[float],
                objective: Callable[[float], tuple[float, Mapping[str, Any]]], signals: _Signals) -> bool:
    """Take one trial and evaluate it unless another trial holds its value; True if evaluated.

    A popped queued trial holds its value from its creation on: it yields to a
    live trial of lower number holding the same value.  A trial that ``ask``
    created because another worker popped the queued one first holds no value:
    it takes a free value and then yields to any other live holder of that
    value.  Of two trials holding one value, at least one yields.
    """
    lo, hi = min(wanted), max(wanted)
    with _claimed_trial(study, storage) as trial:
        trials = study.get_trials(deepcopy=False)
        me = next(t for t in trials if t.number == trial.number)
        value = _bound_value(me, param)
        late = value is None
        if late:
            free = _free_values(trials, param, wanted, exclude=trial.number)
            if not free:
                _discard(study, trial, "no free grid value", TrialState.PRUNED)
                return False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.sampler = optuna.samplers.PartialFixedSampler({param: _pick(free, trials)}, study.sampler)
            value = float(trial.suggest_float(param, lo, hi))
            trials = study.get_trials(deepcopy=False)
        reason = None if value in wanted else "not a value of this grid"
        for t in trials if reason is None else ():
            if t.number != trial.number and _bound_value(t, param) == value and (
                    t.state == TrialState.COMPLETE or (t.state in LIVE and (late or t.number < trial.number))):
                reason = f"value {value:g} is held by trial {t.number}"
                break
        if reason is not None:
            _discard(study, trial, reason, TrialState.PRUNED)
            return False
        x = trial.suggest_float(param, lo, hi)
        with signals.interruptible():
            score, attrs = objective(x)
        score = float(score)
        if not math.isfinite(score):
            raise StudyError(f"the objective is {score} at {param}={x:g}", field=param)
        return _finish(study, trial, score, attrs)


def grid_search(study_name: str, storage, param: str, values: Sequence[float],
                objective: Callable[[float], tuple[float, Mapping[str, Any]]], *, progress: bool = True,
                desc: str | None = None) -> dict[float, FrozenTrial]:
    """Evaluate ``objective(value)`` once at every grid value, sharing the work with other workers.

    Parameters
    ----------
    study_name : str
        Optuna study holding the trials (created if missing).
    storage : optuna storage or str
        Opened storage (:func:`calib.studies.storage.open_storage`) or its URL.
    param : str
        Parameter name.
    values : sequence of float
        The grid, evaluated in this order by a serial run.
    objective : callable
        ``objective(value) -> (value_to_minimise, user_attrs)``; must be
        deterministic, since the result of any worker stands for all.
    progress : bool
        Show a progress bar (completed values, by any worker).
    desc : str, optional
        Label of the progress bar.

    Returns
    -------
    dict of float to FrozenTrial
        The completed trial of every grid value, keyed and ordered by value.

    Raises
    ------
    StudyError
        The objective is not finite, a value failed too often, or the
        storage holds the study with another direction.
    """
    quiet_optuna()
    storage = _as_storage(storage)
    wanted = list(dict.fromkeys(float(v) for v in values))
    if not wanted:
        raise StudyError("empty grid", field=param)
    study = _open_study(study_name, storage, ["minimize"], optuna.samplers.RandomSampler(seed=0))
    entry = _record({"study": study_name, "sampler": "grid", "seed": None, "trials": len(wanted), "evaluated": 0})
    wanted_set = set(wanted)
    backoff, stale = _Backoff(), _StaleCheck(study, storage)
    with _bar(len(wanted), 0, desc or study_name, progress) as bar, _Signals() as signals:
        while True:
            signals.deliver()
            stale()
            trials = study.get_trials(deepcopy=False)
            done = {v for t in trials if t.state == TrialState.COMPLETE and (v := _bound_value(t, param)) in wanted_set}
            _set_bar(bar, len(done))
            if len(done) == len(wanted):
                break
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting:  # queue a value nobody holds, just in time
                free = _free_values(trials, param, wanted)
                if free:
                    v = _pick(free, trials)
                    failures = sum(1 for t in trials if t.state == TrialState.FAIL and _bound_value(t, param) == v)
                    if failures >= MAX_FAILURES_PER_VALUE:
                        raise StudyError(f"{param}={v:g} failed {failures} times (see the FAIL trials of study "
                                         f"{study_name!r})", field=param)
                    study.enqueue_trial({param: v})
                    waiting = True
            if waiting:
                if _grid_trial(study, storage, param, wanted, objective, signals):
                    entry["evaluated"] += 1
                backoff.reset()
                continue
            _check_waiting_possible(storage, f"a trial of study {study_name!r}")
            with signals.interruptible():
                backoff.wait()
    done = completed_grid(study, param)
    return {v: done[v] for v in sorted(done) if v in wanted_set}


# --------------------------------------------------------------------------- TPE


def _suggest(trial: optuna.trial.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    raise StudyError(f"unsupported distribution {type(dist).__name__}", field=name)


#: sampler name -> Optuna sampler class (``cmaes`` needs the ``cmaes`` package)
SAMPLERS = {"tpe": "TPESampler", "cmaes": "CmaEsSampler", "random": "RandomSampler"}


def _tpe_sampler(seed: int, options: Mapping[str, Any], algorithm: str = "tpe") -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # CMA-ES: "independent sampling" of categorical params
        return getattr(optuna.samplers, SAMPLERS[algorithm])(seed=seed, **options)


def _derive_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


def _values(result: Any, n: int) -> list[float] | None:
    """The objective's value(s) as floats, or None when not finite / of the wrong length."""
    vals = [result] if np.ndim(result) == 0 else list(result)
    try:
        vals = [float(v) for v in vals]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(math.isfinite(v) for v in vals) else None


def _tpe_trial(study: optuna.Study, storage, space: Mapping[str, BaseDistribution], objective, n_trials: int,
               seed: int, options: dict, signals: _Signals, algorithm: str = "tpe") -> str:
    """Ask one trial; ``"surplus"``, ``"complete"``, ``"failed"`` (non-finite objective) or ``"dropped"``."""
    with _claimed_trial(study, storage) as trial:
        trials = study.get_trials(deepcopy=False)
        if sum(1 for t in trials if t.number < trial.number and t.state in LIVE) >= n_trials:
            _discard(study, trial, f"surplus: {n_trials} trials were already under way", TrialState.FAIL)
            return "surplus"
        n_complete = sum(1 for t in trials if t.state == TrialState.COMPLETE)
        others = any(t.state == TrialState.RUNNING and t.number != trial.number for t in trials)
        key = (seed, n_complete, trial.number) if others else (seed, n_complete)
        study.sampler = _tpe_sampler(_derive_seed(*key), options, algorithm)
        params = {name: _suggest(trial, name, dist) for name, dist in space.items()}
        with signals.interruptible():
            result, attrs = objective(params)
        values = _values(result, len(study.directions))
        if values is None:
            _tell_fail(study, trial, f"objective returned {result!r}")
            return "failed"
        return "complete" if _finish(study, trial, values if len(values) > 1 else values[0], attrs) else "dropped"


def tpe_search(study_name: str, storage, space: Mapping[str, BaseDistribution],
               objective: Callable[[dict[str, Any]], tuple[float | Sequence[float], Mapping[str, Any]]],
               n_trials: int, seed: int, directions: Sequence[str] | None = None, progress: bool = True, *,
               desc: str | None = None, sampler_options: Mapping[str, Any] | None = None,
               algorithm: str = "tpe") -> list[FrozenTrial]:
    """Run TPE (or CMA-ES, or random sampling) until the study holds exactly ``n_trials`` completed trials,
    sharing the work with other workers.

    Parameters
    ----------
    study_name : str
        Optuna study holding the trials (created if missing).
    storage : optuna storage or str
        Opened storage (:func:`calib.studies.storage.open_storage`) or its URL.
    space : dict of str to optuna distribution
        ``FloatDistribution``, ``IntDistribution`` or ``CategoricalDistribution``
        per parameter; suggested in this order.
    objective : callable
        ``objective(params) -> (value or values, user_attrs)``.  A non-finite
        value marks the trial ``FAIL`` (it does not count).
    n_trials : int
        Completed trials wanted in total, over all workers and runs.
    seed : int
        Seed (>= 0) of the samplers; recorded in ``results.json`` by the runner.
    directions : sequence of str, optional
        ``"minimize"``/``"maximize"`` per objective value (default one ``"minimize"``).
    progress : bool
        Show a progress bar (completed trials, by any worker).
    desc : str, optional
        Label of the progress bar.
    sampler_options : dict, optional
        Extra arguments of the sampler (TPE: ``n_startup_trials``, ``multivariate``,
        ...; ``constant_liar`` defaults to True; CMA-ES: ``x0``, ``sigma0``, ...).
    algorithm : {"tpe", "cmaes", "random"}
        The Optuna sampler (:data:`SAMPLERS`).

    Returns
    -------
    list of FrozenTrial
        The ``n_trials`` completed trials in trial-number order.

    Raises
    ------
    StudyError
        Invalid arguments, too many failed trials in a row, or the storage
        holds the study with other directions.

    Examples
    --------
    >>> from optuna.distributions import FloatDistribution
    >>> s = optuna.storages.InMemoryStorage()
    >>> trials = tpe_search("demo", s, {"x": FloatDistribution(-1, 1)}, lambda p: (p["x"] ** 2, {}), 5, seed=0,
    ...                     progress=False)
    >>> len(trials)
    5
    """
    quiet_optuna()
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise StudyError(f"must be an integer >= 1, got {n_trials!r}", field="n_trials")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise StudyError(f"must be an integer >= 0, got {seed!r}", field="seed")
    if not space or not all(isinstance(d, BaseDistribution) for d in space.values()):
        raise StudyError("needs at least one parameter, each with an Optuna distribution", field="space")
    directions = [str(d).lower() for d in (directions or ["minimize"])]
    if any(d not in ("minimize", "maximize") for d in directions):
        raise StudyError(f"directions must be 'minimize' or 'maximize', got {directions}", field="directions")
    if algorithm not in SAMPLERS:
        raise StudyError(f"unknown sampler {algorithm!r}; choose one of {', '.join(SAMPLERS)}", field="sampler")
    options = {**({"constant_liar": True} if algorithm == "tpe" else {}), **dict(sampler_options or {})}
    if "seed" in options:
        raise StudyError("give the seed as the 'seed' argument", field="sampler_options.seed")
    storage = _as_storage(storage)
    study = _open_study(study_name, storage, directions, _tpe_sampler(int(seed), options, algorithm))
    entry = _record({"study": study_name, "sampler": SAMPLERS[algorithm], "seed": int(seed), "trials": n_trials,
                     "evaluated": 0})
    backoff, stale, failures = _Backoff(), _StaleCheck(study, storage), 0
    with _bar(n_trials, 0, desc or study_name, progress) as bar, _Signals() as signals:
        while True:
            signals.deliver()
            stale()
            trials = study.get_trials(deepcopy=False)
            n_complete = sum(1 for t in trials if t.state == TrialState.COMPLETE)
            _set_bar(bar, min(n_complete, n_trials))
            if n_complete >= n_trials:
                break
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and sum(1 for t in trials if t.state in LIVE) >= n_trials:
                _check_waiting_possible(storage, f"a trial of study {study_name!r}")
                with signals.interruptible():
                    backoff.wait()
                continue
            outcome = _tpe_trial(study, storage, space, objective, n_trials, int(seed), options, signals, algorithm)
            backoff.reset()
            if outcome == "complete":
                entry["evaluated"] += 1
            failures = failures + 1 if outcome == "failed" else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise StudyError(f"{failures} trials in a row returned a non-finite objective (study "
                                 f"{study_name!r})", field="objective")
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    return complete[:n_trials]
