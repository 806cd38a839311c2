"""What a study run needs besides its file: where to write, which storage, how loud, which role.

The output folder is checked when the context is made, so that every problem
with it is one line before any work starts: ``--out`` naming a file, a folder
that cannot be created or written, or a storage file in it (``optuna.db``,
``optuna.journal``) that is a symbolic link out of the folder (calib never
writes through a link out of ``--out``).  A parallel run (``workers > 1``) into
a folder that holds a serial run's ``optuna.db`` resumes from it: the finished
trials are copied into the journal file the workers share.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from calib.errors import StudyError
from calib.studies.storage import JOURNAL_FILE, SQLITE_FILE, default_storage_url, describe_storage

__all__ = ["RunContext", "check_out_dir", "safe_path"]

T = TypeVar("T")

#: Files of the default storages in the output folder (SQLite's write-ahead log and the journal's lock included).
STORAGE_FILES = (SQLITE_FILE, f"{SQLITE_FILE}-wal", f"{SQLITE_FILE}-shm", f"{SQLITE_FILE}-journal", JOURNAL_FILE,
                 f"{JOURNAL_FILE}.flock")


def check_out_dir(out_dir: str | os.PathLike, what: str = "--out") -> Path:
    """Create ``out_dir`` if needed and check that calib can write there; a one-line StudyError otherwise."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StudyError("is a file, not a folder", file=out, field=what)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"cannot create the output folder: {exc.strerror or exc}", file=out, field=what) from None
    probe = out / f".calib-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StudyError(f"cannot write in the output folder: {exc.strerror or exc}", file=out, field=what) from None
    return out


def safe_path(out_dir: Path, name: str) -> Path:
    """``out_dir / name``, refused when it is a symbolic link that leads out of ``out_dir``."""
    path = Path(out_dir) / name
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(Path(out_dir).resolve()):
            raise StudyError(f"is a symbolic link to {target}, out of the output folder; calib does not write "
                             "through it (remove the link)", file=path, field="--out")
    return path


@dataclass
class RunContext:
    """Settings of one study run, handed to the study's kind.

    Attributes
    ----------
    out_dir : Path
        Output folder (created; see :func:`check_out_dir`).  Workers get a scratch folder.
    storage_url : str, optional
        Optuna storage URL; ``None`` means the default in ``out_dir``
        (see :func:`calib.studies.storage.default_storage_url`).
    progress : bool
        Show progress bars.
    study_file : str
        Name of the study file, as recorded in results.
    workers : int
        Worker processes on this machine (this process included).
    heartbeat_interval, grace_period : int, optional
        Heartbeat settings of the storage (seconds); ``None`` means the defaults.
    role : str
        ``"lead"`` (writes results and report) or ``"worker"`` (only
        evaluates trials; a kind may skip work whose result only the lead
        needs).
    """

    out_dir: Path
    storage_url: str | None = None
    progress: bool = True
    study_file: str = ""
    workers: int = 1
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    role: str = "lead"

    def __post_init__(self) -> None:
        self.out_dir = check_out_dir(self.out_dir)
        self._storage = None
        if not self.storage_url:
            for name in STORAGE_FILES:
                safe_path(self.out_dir, name)
        self._default_url = None if self.storage_url else default_storage_url(self.out_dir, self.workers)
        if self._default_url and self.workers > 1 and self.role == "lead":
            self.resumed_from_sqlite = _sqlite_to_journal(self.out_dir, self.heartbeat_interval, self.grace_period)

    @property
    def url(self) -> str:
        """The storage URL in use (fixed when the context is made)."""
        return self.storage_url or self._default_url

    @property
    def storage(self):
        """The opened Optuna storage (opened once, on first use)."""
        if self._storage is None:
            from calib.calibrate.trials import forget_storage, open_storage_cached

            forget_storage(self.url)  # a new run opens its storage anew (the file may have been removed)
            self._storage = open_storage_cached(self.url, heartbeat_interval=self.heartbeat_interval,
                                                grace_period=self.grace_period)
        return self._storage

    @property
    def is_worker(self) -> bool:
        return self.role == "worker"

    @property
    def storage_label(self) -> str:
        """Storage as recorded in results: the defaults are named, others are masked."""
        return describe_storage(self.url, self.out_dir)

    def track(self, items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """``items``, with a progress bar labelled ``desc`` when the run shows progress (for the loops of a
        kind that are no Optuna search, e.g. the replays of a loaded-server study)."""
        if not self.progress or self.is_worker:
            yield from items
            return
        from tqdm.auto import tqdm

        if total is None:
            try:
                total = len(items)  # type: ignore[arg-type]
            except TypeError:
                total = None
        with tqdm(items, total=total, desc=desc, unit="item", leave=False, file=sys.stderr) as bar:
            yield from bar


def _sqlite_to_journal(out: Path, heartbeat_interval, grace_period) -> int:
    """Copy the finished trials of a serial run's ``optuna.db`` into a new ``optuna.journal``; returns how many.

    Workers share the journal file (SQLite cannot be shared), so a parallel
    rerun of a study run serially resumes instead of starting over.  Nothing is
    copied when the journal exists already.  The journal is written under a
    temporary name and renamed when complete, so an interrupted copy leaves
    nothing behind.
    """
    db, journal = out / SQLITE_FILE, out / JOURNAL_FILE
    if journal.exists() or not db.is_file():
        return 0
    import optuna

    from calib.studies.storage import open_storage, storage_error, is_storage_error

    tmp = out / f".{JOURNAL_FILE}.{os.getpid()}.tmp"
    copied = 0
    try:
        source = open_storage(f"sqlite:///{db.resolve()}", heartbeat_interval=heartbeat_interval,
                              grace_period=grace_period)
        target = open_storage(f"journal:{tmp}", heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        try:
            for summary in optuna.get_all_study_summaries(source, include_best_trial=False):
                old = optuna.load_study(study_name=summary.study_name, storage=source)
                new = optuna.create_study(study_name=summary.study_name, storage=target,
                                          directions=old.directions)
                for key, value in old.user_attrs.items():
                    new.set_user_attr(key, value)
                finished = [t for t in old.get_trials(deepcopy=False) if t.state.is_finished()]
                new.add_trials(finished)
                copied += sum(1 for t in finished if t.state == optuna.trial.TrialState.COMPLETE)
        except Exception as exc:
            if is_storage_error(exc):
                raise storage_error(exc, source) from None
            raise
        finally:
            engine = getattr(source, "engine", None)
            if engine is not None:
                engine.dispose()
        os.replace(tmp, journal)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.flock").unlink(missing_ok=True)
    print(f"calib: {db} holds a serial run: its {copied} completed trials were copied to {journal}, which the "
          "workers share; the run resumes from them", file=sys.stderr)
    return copied
