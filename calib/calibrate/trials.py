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
    is queued and re-run.  Two cases are found without waiting for Optuna
    (:func:`_fail_abandoned`): a ``RUNNING`` trial of a process of this
    machine that no longer exists (a serial run killed and restarted: its
    trial is re-run at once, with the parameters it had, so the resumed run
    gives the trials of an uninterrupted one), and a ``RUNNING`` trial that
    never recorded its worker (killed between taking the trial and its first
    heartbeat, which Optuna's database storage would never find stale) once
    it is ``grace_period`` seconds old.  Ctrl-C (``KeyboardInterrupt``) or any
    other exception inside a trial marks it ``FAIL`` and propagates; the next
    run evaluates it again.  SIGINT and SIGTERM reach a search only in the
    objective, in a wait or between trials, never inside Optuna's storage
    code (see :class:`_Signals`).

Lost storage
    A storage error that may go away (a dropped database connection, a lock
    timeout, an I/O error on the journal file) is retried with back-off
    (:data:`calib.studies.storage.RETRY_DELAYS`); a search step is safe to repeat, since it reads
    its state from the storage.  If the storage is still failing, or the
    error cannot go away (a damaged database), the search stops with a
    one-line :class:`~calib.errors.StudyError` naming the (masked) storage.
"""

from __future__ import annotations

import contextlib
import copy
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
    """Optuna logs warnings only (no line per trial), and not the SQL of a storage error calib retries."""
    optuna.logging.set_verbosity(logging.WARNING)
    root = logging.getLogger("optuna")
    if not any(isinstance(f, _NoSQLNoise) for f in root.filters):
        root.addFilter(_NoSQLNoise())
        for handler in root.handlers:
            handler.addFilter(_NoSQLNoise())


class _NoSQLNoise(logging.Filter):
    """Drop Optuna's multi-line "Caught an error from sqlalchemy ... Falling back" warnings: calib retries the
    step and reports a storage that stays broken in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Caught an error from sqlalchemy")


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


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _grace_period(storage) -> float | None:
    """Seconds without heartbeat after which a running trial is stale (None: the storage keeps no heartbeat)."""
    interval = _heartbeat_interval(storage)
    if not interval:
        return None
    grace = getattr(storage, "grace_period", None)  # public attribute of RDBStorage and HeartbeatJournalStorage
    return float(grace) if grace else 2.0 * interval


def _process_gone(who: str) -> bool:
    """Whether the worker ``host:pid`` ran on this machine and its process no longer exists (or is a zombie).

    The calling process itself counts as gone: a search calls this between
    trials, when none of its own trials may be running (one left ``RUNNING`` was
    abandoned, e.g. its ``tell`` failed on a lost connection).
    """
    host, _, pid_text = who.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    try:  # a killed child not yet reaped by its parent still answers signal 0
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _fail_abandoned(study: optuna.Study, storage) -> int:
    """Fail (and queue a copy of) every ``RUNNING`` trial that is certainly abandoned; returns how many.

    * its worker was a process of this machine that is gone (see :func:`_process_gone`): at once;
    * it never recorded its worker (``calib:worker``; the worker died between taking the trial and its first
      heartbeat, so the database storage holds no heartbeat for it and would never find it stale): once its
      start is ``grace_period`` seconds old.

    The copy is queued by the storage's stale-trial callback, as for a trial
    Optuna finds stale, so it is re-run with the same parameters.
    """
    grace = _grace_period(storage)
    if grace is None:
        return 0
    now = datetime.datetime.now()
    study_id = None
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = t.user_attrs.get(WORKER_KEY)
        if isinstance(who, str):
            if not _process_gone(who):
                continue
        elif t.datetime_start is None or (now - t.datetime_start).total_seconds() <= grace:
            continue
        if study_id is None:
            study_id = storage.get_study_id_from_name(study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed or finished it first
        failed += 1
        _logger.info("trial %s of study %s (worker %s) was abandoned; failed and queued again", t.number,
                     study.study_name, who or "unknown")
        callback = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))
    return failed


class _StaleCheck:
    """Fail stale and abandoned trials: now, then at most once per heartbeat interval."""

    def __init__(self, study: optuna.Study, storage) -> None:
        self.study, self.storage = study, storage
        self.every = _heartbeat_interval(storage)
        self.last = -math.inf

    def __call__(self) -> None:
        if self.every and time.monotonic() - self.last >= self.every:
            _fail_stale(self.study)
            _fail_abandoned(self.study, self.storage)
            self.last = time.monotonic()


class _Retry:
    """Retry a search step after a storage error that may go away; else stop with a one-line StudyError.

    Errors raised by the objective are not the storage's and pass through
    untouched (:func:`_objective_call` marks them).
    """

    def __init__(self, storage, signals: "_Signals | None" = None, stale: "_StaleCheck | None" = None) -> None:
        self.storage, self.signals, self.stale = storage, signals, stale
        self.attempt = 0
        self.first: float | None = None

    def ok(self) -> None:
        self.attempt, self.first = 0, None

    def failed(self, exc: Exception) -> None:
        """Called in an ``except`` block: returns after a back-off, or raises."""
        from calib.studies.storage import RETRY_DELAYS, is_storage_error, is_transient, storage_error

        if getattr(exc, "_calib_objective", False) or not is_storage_error(exc) and not (
                isinstance(exc, OSError) and _is_journal(self.storage)):
            raise exc
        if not (is_transient(exc) or isinstance(exc, OSError)):
            raise storage_error(exc, self.storage) from None
        if self.first is None:
            self.first = time.monotonic()
        if self.attempt >= len(RETRY_DELAYS):
            raise storage_error(exc, self.storage, self.attempt, time.monotonic() - self.first) from None
        delay = RETRY_DELAYS[self.attempt]
        self.attempt += 1
        from calib.studies.storage import error_reason

        _logger.warning("calib: storage %s failed (%s); retry %d of %d in %g s", _label(self.storage),
                        error_reason(exc, self.storage), self.attempt, len(RETRY_DELAYS), delay)
        if self.signals is not None:
            with self.signals.interruptible():
                time.sleep(delay)
        else:
            time.sleep(delay)
        if self.stale is not None:  # a trial this process held when the storage failed is re-run at once
            self.stale.last = -math.inf

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried as :meth:`failed` says."""
        while True:
            try:
                out = fn()
            except Exception as exc:
                self.failed(exc)
                continue
            self.ok()
            return out


def _is_journal(storage) -> bool:
    return str(getattr(storage, "calib_label", "")).startswith("journal:")


def _label(storage) -> str:
    from calib.studies.storage import storage_label

    return storage_label(storage)


def _objective_call(fn: Callable, arg: Any) -> Any:
    """``fn(arg)``; an exception it raises is marked as the objective's, so no storage retry swallows it."""
    try:
        return fn(arg)
    except Exception as exc:
        try:
            exc._calib_objective = True
        except AttributeError:
            pass
        raise


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
    """Record the heartbeat of the trial a search runs: when it starts, then every interval until it ends.

    One thread per search (not per trial) beats whichever trial is running;
    :meth:`stop` returns only when no beat of the ended trial can follow.
    :meth:`close` ends the thread.
    """

    def __init__(self, storage, study: optuna.Study) -> None:
        self.storage, self.study = storage, study
        self.interval = _heartbeat_interval(storage)
        self.trial_id: int | None = None
        self.storage_study_id: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self, trial_id: int) -> None:
        try:
            self.storage.record_heartbeat(trial_id)
        except Exception as exc:  # a lost heartbeat is retried at the next interval
            _logger.debug("heartbeat of trial %s failed: %s", trial_id, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self.trial_id is not None:
                    self._beat(self.trial_id)

    def start(self, trial: optuna.trial.Trial) -> "_Heartbeat":
        """Beat for ``trial`` now and from now on (a storage without heartbeats: nothing)."""
        if self.interval:
            if self.storage_study_id is None:  # the storage's ids, through its public API (the study's never changes)
                self.storage_study_id = self.storage.get_study_id_from_name(self.study.study_name)
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.storage_study_id, trial.number)
            with self._lock:
                self.trial_id = trial_id
            self._beat(trial_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"calib-heartbeat-{self.study.study_name}",
                                                daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """The trial is over: no more beats for it."""
        with self._lock:
            self.trial_id = None

    def close(self) -> None:
        self.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


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
def _heartbeat(study: optuna.Study, storage) -> Iterator[_Heartbeat]:
    """The :class:`_Heartbeat` of a search, closed when it ends."""
    beat = _Heartbeat(storage, study)
    try:
        yield beat
    finally:
        beat.close()


@contextlib.contextmanager
def _claimed_trial(study: optuna.Study, storage, beat: _Heartbeat | None = None) -> Iterator[optuna.trial.Trial]:
    """Ask for a trial with a heartbeat running (``beat``, the search's, or one for this trial only); any
    exception (Ctrl-C too) inside marks it FAIL."""
    with contextlib.ExitStack() as stack:
        if beat is None:
            beat = stack.enter_context(_heartbeat(study, storage))
        trial = _ask(study)
        try:
            beat.start(trial)
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
                objective: Callable[[float], tuple[float, Mapping[str, Any]]], signals: _Signals,
                beat: _Heartbeat | None = None) -> bool:
    """Take one trial and evaluate it unless another trial holds its value; True if evaluated.

    A popped queued trial holds its value from its creation on: it yields to a
    live trial of lower number holding the same value.  A trial that ``ask``
    created because another worker popped the queued one first holds no value:
    it takes a free value and then yields to any other live holder of that
    value.  Of two trials holding one value, at least one yields.
    """
    lo, hi = min(wanted), max(wanted)
    with _claimed_trial(study, storage, beat) as trial:
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
            score, attrs = _objective_call(objective, x)
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
    retry = _Retry(storage)
    study = retry.run(lambda: _open_study(study_name, storage, ["minimize"], optuna.samplers.RandomSampler(seed=0)))
    entry = _record({"study": study_name, "sampler": "grid", "seed": None, "trials": len(wanted), "evaluated": 0,
                     "complete_at_start": None})
    wanted_set = set(wanted)
    backoff, stale = _Backoff(), _StaleCheck(study, storage)

    def step(signals: _Signals) -> bool:
        """One pass of the loop; True when every value is complete."""
        signals.deliver()
        stale()
        trials = study.get_trials(deepcopy=False)
        done = {v for t in trials if t.state == TrialState.COMPLETE and (v := _bound_value(t, param)) in wanted_set}
        if entry["complete_at_start"] is None:
            entry["complete_at_start"] = len(done)
        _set_bar(bar, len(done))
        if len(done) == len(wanted):
            return True
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
            if _grid_trial(study, storage, param, wanted, objective, signals, beat):
                entry["evaluated"] += 1
            backoff.reset()
            return False
        _check_waiting_possible(storage, f"a trial of study {study_name!r}")
        with signals.interruptible():
            backoff.wait()
        return False

    with _bar(len(wanted), 0, desc or study_name, progress) as bar, _Signals() as signals, \
            _heartbeat(study, storage) as beat:
        retry.signals, retry.stale = signals, stale
        while not retry.run(lambda: step(signals)):
            pass
    done = retry.run(lambda: completed_grid(study, param))
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
               seed: int, options: dict, signals: _Signals, algorithm: str = "tpe",
               beat: _Heartbeat | None = None) -> str:
    """Ask one trial; ``"surplus"``, ``"complete"``, ``"failed"`` (non-finite objective) or ``"dropped"``."""
    with _claimed_trial(study, storage, beat) as trial:
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
            result, attrs = _objective_call(objective, params)
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
    retry = _Retry(storage)
    study = retry.run(lambda: _open_study(study_name, storage, directions, _tpe_sampler(int(seed), options,
                                                                                        algorithm)))
    entry = _record({"study": study_name, "sampler": SAMPLERS[algorithm], "seed": int(seed), "trials": n_trials,
                     "evaluated": 0, "complete_at_start": None})
    backoff, stale = _Backoff(), _StaleCheck(study, storage)
    failures = [0]

    def step(signals: _Signals) -> bool:
        """One pass of the loop; True when ``n_trials`` trials are complete."""
        signals.deliver()
        stale()
        trials = study.get_trials(deepcopy=False)
        n_complete = sum(1 for t in trials if t.state == TrialState.COMPLETE)
        if entry["complete_at_start"] is None:
            entry["complete_at_start"] = min(n_complete, n_trials)
        _set_bar(bar, min(n_complete, n_trials))
        if n_complete >= n_trials:
            return True
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and sum(1 for t in trials if t.state in LIVE) >= n_trials:
            _check_waiting_possible(storage, f"a trial of study {study_name!r}")
            with signals.interruptible():
                backoff.wait()
            return False
        outcome = _tpe_trial(study, storage, space, objective, n_trials, int(seed), options, signals, algorithm,
                             beat)
        backoff.reset()
        if outcome == "complete":
            entry["evaluated"] += 1
        failures[0] = failures[0] + 1 if outcome == "failed" else 0
        if failures[0] >= MAX_CONSECUTIVE_FAILURES:
            raise StudyError(f"{failures[0]} trials in a row returned a non-finite objective (study "
                             f"{study_name!r})", field="objective")
        return False

    with _bar(n_trials, 0, desc or study_name, progress) as bar, _Signals() as signals, \
            _heartbeat(study, storage) as beat:
        retry.signals, retry.stale = signals, stale
        while not retry.run(lambda: step(signals)):
            pass
    complete = retry.run(lambda: sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                                        key=lambda t: t.number))
    return complete[:n_trials]
