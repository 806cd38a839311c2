"""Worker processes that share one study.

``calib study run STUDY --workers N`` starts ``N - 1`` processes running
``calib study worker STUDY`` on the lead's storage (by default the journal
file ``optuna.journal`` in the output folder) and works as the N-th itself.
Every worker runs the study's code; the searches of
:mod:`calib.studies.search` hand each trial to one worker, and a worker's
search returns when the whole search is complete, so all workers move through
the phases of a study together.

The storage URL reaches a worker through the environment variable
``CALIB_STORAGE``, never on its command line (where ``ps`` would show a
password).  A worker stops cleanly on SIGTERM or SIGINT: the trial it was
evaluating is marked ``FAIL`` (and evaluated again by another worker or by the
next run).  A worker killed outright (SIGKILL, a lost machine) leaves its trial
``RUNNING``; its heartbeat stops, and after the storage's grace period any
worker fails the trial and re-runs a copy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["STORAGE_ENV", "WorkerStopped", "WorkerPool", "worker_command", "stop_on_sigterm"]

#: Environment variable holding the storage URL of ``calib study worker`` (when ``--storage`` is not given).
STORAGE_ENV = "CALIB_STORAGE"


class WorkerStopped(BaseException):
    """Raised in a worker by SIGTERM: the running trial is marked FAIL and the worker exits with status 0."""


def stop_on_sigterm(exc: type[BaseException] = WorkerStopped) -> None:
    """Make SIGTERM raise ``exc`` in the main thread (so the running trial is closed cleanly)."""

    def handler(signum, frame):
        raise exc()

    signal.signal(signal.SIGTERM, handler)


def worker_command(study_file: str | Path, *, heartbeat_interval: int | None = None,
                   grace_period: int | None = None, python: str | None = None) -> list[str]:
    """The command line of one local worker (the storage URL goes in ``CALIB_STORAGE``).

    Examples
    --------
    >>> worker_command("studies/hg1.yaml", python="python")[1:5]
    ['-m', 'calib.cli', 'study', 'worker']
    """
    argv = [python or sys.executable, "-m", "calib.cli", "study", "worker", str(Path(study_file).resolve()),
            "--no-progress"]
    if heartbeat_interval is not None:
        argv += ["--heartbeat-interval", str(heartbeat_interval)]
    if grace_period is not None:
        argv += ["--grace-period", str(grace_period)]
    return argv


class WorkerPool:
    """``n`` local worker processes on one study; a context manager that stops them on exit.

    Parameters
    ----------
    study_file : str or Path
        The study file every worker runs.
    storage_url : str
        Storage shared with the lead (journal file, SQLite or a database server).
    n : int
        Number of worker processes.
    heartbeat_interval, grace_period : int, optional
        Passed on to the workers.
    quiet : bool
        Discard the workers' standard output (their errors still reach stderr).

    Attributes
    ----------
    procs : list of subprocess.Popen
        The worker processes.
    """

    def __init__(self, study_file: str | Path, storage_url: str, n: int, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, quiet: bool = True) -> None:
        self.argv = worker_command(study_file, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        self.storage_url = storage_url
        self.n = int(n)
        self.quiet = quiet
        self.procs: list[subprocess.Popen] = []
        self._stopped: set[int] = set()

    def start(self) -> "WorkerPool":
        env = dict(os.environ)
        env[STORAGE_ENV] = self.storage_url
        src = str(Path(__file__).resolve().parents[2])  # calib importable even when not installed
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
        out = subprocess.DEVNULL if self.quiet else None
        for _ in range(self.n):
            self.procs.append(subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=out))
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p.poll() is None]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the running workers, wait up to ``timeout`` s, then SIGKILL what is left."""
        for p in self.alive():
            self._stopped.add(p.pid)
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def failures(self) -> list[tuple[int, int]]:
        """``(pid, status)`` of workers that ended on their own with an error (not stopped by the pool)."""
        out = []
        for p in self.procs:
            code = p.poll()
            interrupted = code in (130, 143, -signal.SIGINT, -signal.SIGTERM)
            if code not in (None, 0) and not interrupted:
                out.append((p.pid, code))
        return out

    def __enter__(self) -> "WorkerPool":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        # On success every trial is complete: what the workers still do is redundant.  On an error or
        # Ctrl-C they close their running trial (FAIL) and the next run resumes.
        self.stop()
        for pid, code in self.failures():
            print(f"calib: worker {pid} exited with status {code}; a trial it left unfinished was re-run",
                  file=sys.stderr)
