"""Optuna storage: where a study's trials live, how URLs are shown, and worker liveness.

Three kinds of storage URL are understood:

* ``journal:PATH``: Optuna's journal file (the default: ``optuna.journal`` in
  the output folder, for a serial run and for several worker processes sharing
  one machine).
* ``sqlite:///PATH`` (a folder holding an ``optuna.db`` of an earlier serial
  run resumes from it), or any other SQLAlchemy URL such as
  ``postgresql+psycopg2://user:password@host:5432/db`` (the cluster set-up,
  see ``docs/scaling.md``).  These are Optuna ``RDBStorage`` objects.

Every storage opened here has a heartbeat: a worker records one every
``heartbeat_interval`` seconds while it evaluates a trial, and a ``RUNNING``
trial whose last heartbeat is older than ``grace_period`` seconds belongs to a
dead worker.  :func:`optuna.storages.fail_stale_trials` (called by the search
loops of :mod:`calib.calibrate.trials`) marks such a trial ``FAIL`` and Optuna's
:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` queues a copy of it,
so the trial is re-run by a live worker.  ``RDBStorage`` implements the
heartbeat itself; for the journal file, :class:`HeartbeatJournalStorage` adds
it (heartbeats are trial system attributes, times are wall-clock seconds of
the machine), and calib writes the file under an ``flock`` (see
:func:`_journal_backend`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from calib.errors import StudyError

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_GRACE_PERIOD",
    "JOURNAL_FILE",
    "SQLITE_FILE",
    "HeartbeatJournalStorage",
    "check_shareable",
    "default_storage_url",
    "describe_storage",
    "open_storage",
    "mask_url",
    "scrub",
    "repair_journal",
    "storage_label",
    "is_storage_error",
    "is_transient",
    "storage_error",
    "close_storages",
]

#: Seconds between two heartbeats of a worker evaluating a trial.
DEFAULT_HEARTBEAT_INTERVAL = 5
#: Seconds without a heartbeat after which a ``RUNNING`` trial is stale (its worker is dead).
DEFAULT_GRACE_PERIOD = 20
#: How many times a stale trial is queued again before the search loop takes over.
STALE_RETRIES = 3
#: File names of the default storages in a study's output folder.
JOURNAL_FILE = "optuna.journal"
SQLITE_FILE = "optuna.db"

_HEARTBEAT_KEY = "calib:heartbeat"
#: The trial user attribute naming the worker (``host:pid``) that evaluates it (see :mod:`calib.calibrate.trials`).
WORKER_KEY = "calib:worker"
_logger = logging.getLogger(__name__)


def default_storage_url(out_dir: str | Path, workers: int = 1, serial: str = "journal") -> str:
    """The storage of a study run into ``out_dir`` when no URL is given.

    The journal file ``optuna.journal``, for a serial run (about 2 ms per
    trial and nothing to open, against 20-35 ms per trial and 0.4 s to open
    SQLite) and when several worker processes share the study.  A serial run
    into a folder that holds an ``optuna.db`` (and no journal file) resumes
    from that SQLite file instead; with ``serial="sqlite"`` a serial run starts
    an ``optuna.db`` in a folder that holds neither.  An existing journal file
    always wins, so a serial rerun of a parallel study resumes from it.  (A
    parallel rerun of a study run serially into SQLite starts a journal file:
    SQLite cannot be shared, see :func:`check_shareable`; the run copies the
    finished trials over.)

    Parameters
    ----------
    out_dir : str or Path
        The study's output folder.
    workers : int
        Number of worker processes on this machine.
    serial : {"sqlite", "journal"}
        The storage a serial run starts in a folder that holds none.

    Examples
    --------
    >>> default_storage_url("/tmp/new-study").startswith("journal:")
    True
    >>> default_storage_url("/tmp/new-study", workers=2).startswith("journal:")
    True
    >>> default_storage_url("/tmp/new-study", serial="sqlite").startswith("sqlite:///")
    True
    """
    if serial not in ("sqlite", "journal"):
        raise StudyError(f"must be 'sqlite' or 'journal', got {serial!r}", field="serial_storage")
    out = Path(out_dir).resolve()
    journal, db = out / JOURNAL_FILE, out / SQLITE_FILE
    if journal.exists() or workers > 1 or (serial == "journal" and not db.exists()):
        return f"journal:{journal}"
    return f"sqlite:///{db}"


def check_shareable(url: str) -> None:
    """Raise unless several processes can share ``url`` safely.

    SQLite cannot: it has no row locks, so two processes can pop the same
    queued trial.  Journal files (one machine or a shared file system) and
    database servers (PostgreSQL, MySQL) can.

    Raises
    ------
    StudyError
        For a SQLite URL.
    """
    if url.startswith("sqlite"):
        raise StudyError(f"{mask_url(url)} is SQLite, which several worker processes cannot share safely (a "
                         "queued trial can be handed to two of them); use a journal file (journal:PATH, the "
                         "default with --workers) or a PostgreSQL URL", field="storage")


def describe_storage(url: str | None, out_dir: str | Path | None = None) -> str:
    """How a storage is recorded in results: the defaults by name, any other URL masked.

    Examples
    --------
    >>> describe_storage("sqlite:////x/optuna.db", "/x")
    'sqlite: optuna.db in the output folder'
    >>> describe_storage("postgresql://calib:pw@db/studies")
    'postgresql://calib:***@db/studies'
    """
    if url is None:
        return "journal: optuna.journal in the output folder"
    if out_dir is not None:
        out = Path(out_dir).resolve()
        if url == f"sqlite:///{out / SQLITE_FILE}":
            return "sqlite: optuna.db in the output folder"
        if url == f"journal:{out / JOURNAL_FILE}":
            return "journal: optuna.journal in the output folder"
    return mask_url(url)


def mask_url(url: str | None) -> str | None:
    """Hide a password in a storage URL (user-info part and ``password=`` query parameters).

    Everything between the user name and the last ``@`` is hidden, so a
    password holding ``@`` or ``/`` does not leak either.

    Examples
    --------
    >>> mask_url("postgresql://calib:s3cret@db:5432/studies")
    'postgresql://calib:***@db:5432/studies'
    >>> mask_url("postgresql+psycopg2://u:p@ss/w@127.0.0.1/db")
    'postgresql+psycopg2://u:***@127.0.0.1/db'
    >>> mask_url("postgresql://db/studies?user=u&password=x")
    'postgresql://db/studies?user=u&password=***'
    >>> mask_url("sqlite:///tmp/optuna.db")
    'sqlite:///tmp/optuna.db'
    """
    if url is None:
        return None
    text = str(url)
    text = re.sub(r"(?i)([?&](?:password|passwd|pwd)=)[^&#]*", r"\1***", text)
    return re.sub(r"^([A-Za-z][\w+.-]*://[^/?#@:]*:)(.*)@", r"\1***@", text, count=1)


def _secrets(url: str) -> list[str]:
    """The literal secrets of ``url`` (to scrub them from error messages)."""
    out = []
    m = re.match(r"^[A-Za-z][\w+.-]*://[^/?#@:]*:(.*)@", url)
    if m and m.group(1):
        out.append(m.group(1))
    out += [v for v in re.findall(r"(?i)[?&](?:password|passwd|pwd)=([^&#]*)", url) if v]
    return sorted(out, key=len, reverse=True)


def scrub(text: str, url: str | None) -> str:
    """``text`` with the URL masked and any secret of ``url`` replaced by ``***``."""
    if not url:
        return text
    text = text.replace(url, mask_url(url))
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


class _RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a stale trial, with the dead worker's name (``calib:worker``) left off the copy: the
    copy belongs to whichever worker takes it, and is never mistaken for a trial of the dead one."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        import copy

        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != WORKER_KEY}
        super().__call__(study, trial)


def heartbeat_time(trial: optuna.trial.FrozenTrial) -> float:
    """Unix time of a journal-file trial's last sign of life: its last heartbeat, else its start."""
    try:
        last = float(trial.system_attrs.get(_HEARTBEAT_KEY, 0.0) or 0.0)
    except (TypeError, ValueError):
        last = 0.0
    if trial.datetime_start is not None:
        last = max(last, trial.datetime_start.timestamp())
    return last


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat that ``RDBStorage`` has.

    A heartbeat is the trial system attribute ``calib:heartbeat`` (Unix time).
    A ``RUNNING`` trial is stale when the later of its last heartbeat and its
    start is more than ``grace_period`` seconds old.  Workers sharing a journal
    file on a network file system need synchronised clocks.

    Parameters
    ----------
    backend : optuna.storages.journal.BaseJournalBackend
        Usually a :class:`~optuna.storages.journal.JournalFileBackend`.
    heartbeat_interval, grace_period : int
        Seconds.
    stale_trial_callback : callable, optional
        Called with ``(study, frozen_trial)`` for each trial failed as stale.
    """

    def __init__(self, backend, heartbeat_interval: int, grace_period: int,
                 stale_trial_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None):
        super().__init__(backend)
        self._heartbeat_interval = int(heartbeat_interval)
        self.grace_period = int(grace_period)
        self._stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, _HEARTBEAT_KEY, time.time())
        except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
            pass  # finished meanwhile (or failed as stale by another worker): nothing to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's hook for :func:`optuna.storages.fail_stale_trials`: the ids of stale ``RUNNING`` trials.

        A trial without any heartbeat (its worker died between taking it and its first beat) counts from its
        start, so it is found stale too.  Ids come from the public storage API (trial number -> id).
        """
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            last = heartbeat_time(t)
            if now - last > self.grace_period:
                stale.append(self.get_trial_id_from_study_id_trial_number(study_id, t.number))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_trial_callback

    def get_failed_trial_callback(self):  # the pre-4.9 name, kept for older Optuna code paths
        return self._stale_trial_callback


def _fast_sqlite(engine) -> None:
    """Write-ahead log and ``synchronous=NORMAL`` for SQLite: about half the cost of a trial's commits.

    A commit is then durable against a crashed or killed process (the case
    that matters for resuming), not against a power cut in the last second.
    """
    import sqlalchemy

    def pragmas(dbapi_conn, record) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    sqlalchemy.event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections opened while the tables were made get the pragmas too


def _check_sqlite(engine, url: str) -> None:
    """``PRAGMA quick_check``: a SQLite file with damaged pages is refused when opened, in one line, instead of
    failing somewhere in the middle of a study."""
    import sqlalchemy

    with engine.connect() as conn:
        rows = [r[0] for r in conn.execute(sqlalchemy.text("PRAGMA quick_check(3)"))]
    if rows != ["ok"]:
        problem = "; ".join(" ".join(str(r).split()) for r in rows)[:200]
        raise StudyError(f"storage {mask_url(url)} is damaged (SQLite quick_check: {problem}); move it away to "
                         "start over, or restore it from a backup", field="storage")


class _FlockLock:
    """An exclusive ``flock`` on ``PATH.flock``: blocking, and released by the kernel when its holder dies."""

    def __init__(self, path: str) -> None:
        self._path = path + ".flock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "_FlockLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def repair_journal(path: str | Path) -> int:
    """Cut a journal file back to its last whole record; returns the number of bytes removed.

    A power cut (or a full disk) can leave the last record of ``optuna.journal``
    half written: a line without its newline, or a line that is not JSON (a
    block of NUL bytes after a crash of the file system).  Optuna would then
    fail on every later read, since the next append continues the broken line.
    Only such a damaged *end* is cut (the trials it held are evaluated again);
    a damaged record followed by whole ones is refused with a
    :class:`~calib.errors.StudyError`, since cutting it would lose trials that
    later records refer to.  Call with the file's lock held.
    """
    import json

    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    good, bad_at, pos = 0, None, 0  # end of the last whole record; start of the first damaged one
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n") and _is_record(line, json):
                if bad_at is not None:
                    raise StudyError(f"journal file damaged at byte {bad_at}, with whole records after it; restore "
                                     "it from a backup or start the study over in another folder", file=path,
                                     field="storage")
                good = pos + len(line)
            elif bad_at is None:
                bad_at = pos
            pos += len(line)
    if good < size:
        with open(path, "r+b") as fh:
            fh.truncate(good)
            fh.flush()
            os.fsync(fh.fileno())
        _logger.warning("calib: %s: cut %d bytes of a half-written last record (a crash or power cut while it was "
                        "written); the trials it held are evaluated again", path, size - good)
    return size - good


def _is_record(line: bytes, json) -> bool:
    line = line.strip()
    if not line:
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _journal_backend(path: str):
    """Optuna's journal file, written under an ``flock`` and without ``fsync``.

    Optuna's own file locks (a lock file) make a waiting writer sleep with
    exponential back-off and outlive a killed holder (10-30 s until they are
    broken); an ``flock`` wakes the next writer at once and dies with its
    holder.  Appends are flushed to the kernel but not ``fsync``-ed (Optuna
    does, at several ms per trial): a killed process loses nothing; a power
    cut may lose the last trials, which a rerun evaluates again.  Reading is
    Optuna's (lock-free).  Processes on several machines sharing the file over
    NFS need working ``flock`` (NFSv4).
    """
    import json

    from optuna.storages.journal import JournalFileBackend

    class JournalFile(JournalFileBackend):
        def __init__(self, file_path: str) -> None:
            self._calib_path = file_path
            self._calib_lock = _FlockLock(file_path)
            super().__init__(file_path, lock_obj=self._calib_lock)
            with self._calib_lock:
                repair_journal(file_path)

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with self._calib_lock, open(self._calib_path, "ab") as fh:
                fh.write(text.encode("utf-8"))

    return JournalFile(path)


def storage_label(storage) -> str:
    """How a storage is named in errors: its masked URL, or ``journal:PATH``."""
    label = getattr(storage, "calib_label", None) or getattr(storage, "url", None)
    return mask_url(str(label)) if label else type(storage).__name__


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the storage: its database driver, SQLAlchemy, Optuna's storage layer."""
    for e in _chain(exc):
        mod = type(e).__module__ or ""
        if mod.startswith(("sqlalchemy", "sqlite3", "psycopg", "pymysql", "MySQLdb")):
            return True
        if isinstance(e, optuna.exceptions.StorageInternalError):
            return True
    return False


#: Seconds to wait before each retry of a storage call after an error that may go away (about 30 s in all): a
#: search step (:mod:`calib.calibrate.trials`) and the opening of a database storage.
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)

#: Words of a driver's message that say the connection was lost or the database busy, not that it is wrong.
_LOST = ("server closed the connection", "connection reset", "terminating connection", "connection already closed",
         "could not receive data", "could not send data", "ssl syscall", "eof detected", "broken pipe",
         "timeout", "timed out", "database is locked", "the database system is starting up",
         "the database system is shutting down", "connection not open", "lost connection", "gone away",
         "cursor already closed", "no connection to the server")
#: The same for a server that is not (yet, or again) accepting connections.
_DOWN = ("connection refused", "could not connect to server", "is the server running")


def is_transient(exc: BaseException, opening: bool = False) -> bool:
    """Whether a storage error may go away by itself: a lost connection, a busy database, a server restart.

    A damaged database (``database disk image is malformed``), a wrong
    password or a missing table is not: retrying cannot help.  While the
    storage is being opened, a server that refuses connections counts as a
    wrong URL (one line at once), not as a restart.
    """
    for e in _chain(exc):
        mod = type(e).__module__ or ""
        if getattr(e, "connection_invalidated", False):
            return True
        if mod.startswith(("sqlalchemy", "sqlite3", "psycopg", "pymysql", "MySQLdb")):
            text = str(e).lower()
            if any(w in text for w in ("malformed", "not a database", "authentication", "password")):
                return False
            if any(w in text for w in _LOST) or (not opening and any(w in text for w in _DOWN)):
                return True
            if type(e).__name__ in ("DisconnectionError", "PendingRollbackError"):
                return True
    return False


def error_reason(exc: BaseException, storage=None) -> str:
    """The first line of the clearest message in ``exc``'s chain (the driver's), password scrubbed."""
    url = storage if isinstance(storage, str) else getattr(storage, "url", None)
    reason = ""
    for e in _chain(exc):
        text = scrub(str(e), url) if url else str(e)
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        if first and not first.startswith("An exception is raised during the commit"):
            first = re.sub(r"^\([\w.]+\) ", "", first)  # SQLAlchemy's "(psycopg2.OperationalError) " prefix
            reason = f"{type(e).__name__}: {first}"
            if (type(e).__module__ or "").startswith(("sqlite3", "psycopg", "pymysql")):
                break  # the driver's own words are the clearest
    reason = reason or type(exc).__name__
    return reason if len(reason) <= 300 else reason[:300] + "..."


def storage_error(exc: BaseException, storage, attempts: int = 0, seconds: float = 0.0) -> StudyError:
    """A one-line :class:`StudyError` for a storage failure (the password masked, the driver's first line)."""
    label = storage_label(storage)
    reason = error_reason(exc, storage)
    if attempts:
        return StudyError(f"lost the storage {label} (still failing after {attempts} retries over {seconds:.0f} s): "
                          f"{reason}", field="storage")
    what = "is damaged" if any(w in reason.lower() for w in ("malformed", "not a database", "corrupt")) \
        else "failed"
    return StudyError(f"storage {label} {what}: {reason}", field="storage")


#: The database engines of the storages opened in this process (see :func:`close_storages`).
_ENGINES: "weakref.WeakSet" = weakref.WeakSet()


def close_storages() -> int:
    """Close the idle database connections of every storage opened in this process; returns how many engines.

    The storages stay usable (a later call opens a connection again).  The
    command line calls this when a command has finished, so that connections
    close as they would when their objects are freed at exit (SQLite removes
    its write-ahead log, a database server sees a clean log-off), also when the
    interpreter does not collect them (see :mod:`calib.cli`).  A journal file
    holds nothing open between two operations.
    """
    engines = list(_ENGINES)
    for engine in engines:
        try:
            engine.dispose()
        except Exception as exc:  # a connection already lost: nothing left to close
            _logger.debug("closing storage %s failed: %s", mask_url(str(engine.url)), exc)
    return len(engines)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise StudyError(f"must be a whole number of seconds >= 1, got {value!r}", field=name)
    return int(value)


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """An Optuna storage for ``url``, with heartbeat and stale-trial retry.

    Parameters
    ----------
    url : str
        ``journal:PATH``, ``sqlite:///PATH`` or any SQLAlchemy URL
        (``postgresql+psycopg2://user:password@host:port/db``).
    heartbeat_interval : int, optional
        Seconds between heartbeats (default :data:`DEFAULT_HEARTBEAT_INTERVAL`).
    grace_period : int, optional
        Seconds without heartbeat before a running trial is stale (default
        :data:`DEFAULT_GRACE_PERIOD`; at least ``2 * heartbeat_interval``
        is sensible).

    Raises
    ------
    StudyError
        The storage cannot be opened; the message shows the URL with its
        password masked and never the password itself.
    """
    if not isinstance(url, str) or not url.strip():
        raise StudyError("empty storage URL", field="storage")
    interval = _positive_int(DEFAULT_HEARTBEAT_INTERVAL if heartbeat_interval is None else heartbeat_interval,
                             "heartbeat_interval")
    grace = _positive_int(max(DEFAULT_GRACE_PERIOD, 2 * interval) if grace_period is None else grace_period,
                          "grace_period")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = _RetryStaleTrial(max_retry=STALE_RETRIES)
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:")).expanduser()
            if not path.parent.is_dir():
                raise StudyError("folder of the journal file does not exist", file=path, field="storage")
            try:
                storage = HeartbeatJournalStorage(_journal_backend(str(path)), interval, grace, retry)
            except (OSError, ValueError) as exc:
                raise StudyError(f"cannot open journal file ({exc.strerror if isinstance(exc, OSError) else exc})",
                                 file=path, field="storage") from None
            storage.calib_label = f"journal:{path}"
            return storage
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 60}  # several local processes may wait for the write lock
        elif "://" in url:
            kwargs["pool_pre_ping"] = True  # a database server restart does not break a long study
        delays = RETRY_DELAYS  # a connection lost while opening is the same outage as one lost in a search step
        for attempt in range(len(delays) + 1):
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=interval,
                                                     grace_period=grace, heartbeat_stale_trial_callback=retry)
                if url.startswith("sqlite"):
                    _fast_sqlite(storage.engine)
                    _check_sqlite(storage.engine, url)
                _ENGINES.add(storage.engine)
                return storage
            except StudyError:
                raise
            except ImportError as exc:
                raise StudyError(f"cannot open storage {mask_url(url)}: missing database driver "
                                 f"({scrub(str(exc), url)})", field="storage") from None
            except Exception as exc:  # SQLAlchemy ArgumentError/OperationalError/IntegrityError, ValueError, ...
                from sqlalchemy.exc import ArgumentError, IntegrityError

                # a lost connection, or workers creating the tables of a new database at once (IntegrityError)
                again = is_transient(exc, opening=True) or isinstance(exc, IntegrityError) or (
                    attempt < 2 and not isinstance(exc, (ArgumentError, ValueError)) and not is_storage_error(exc))
                if attempt < len(delays) and again:
                    time.sleep(delays[attempt])
                    continue
                reason = error_reason(exc, url)
                what = "is damaged" if any(w in reason.lower() for w in ("malformed", "not a database")) else \
                    "cannot be opened"
                raise StudyError(f"storage {mask_url(url)} {what}: {reason}", field="storage") from None
