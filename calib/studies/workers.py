"""Worker processes that share one study.

``calib study run STUDY --workers N`` starts ``N - 1`` worker processes on the
lead's storage (by default the journal file ``optuna.journal`` in the output
folder) and works as the N-th itself.  Every worker runs the study's code;
the searches of :mod:`calib.calibrate.trials` hand each trial to one worker, and
a worker's search returns when the whole search is complete, so all workers
move through the phases of a study together.

On Linux the local workers are forked from the lead once it has imported
everything (they start in milliseconds); elsewhere, or with
``start_method="spawn"``, each is a fresh ``calib study worker`` process (a
few seconds of imports).  A worker on another machine is always the latter:
``calib study worker STUDY --storage URL``, where the URL may also come from
the environment variable ``CALIB_STORAGE`` (``ps`` shows command lines, and
so a password in them).

A worker stops cleanly on SIGTERM or SIGINT: the trial it was evaluating is
marked ``FAIL`` (and evaluated again by another worker or by the next run).  A
worker killed outright (SIGKILL, a lost machine) leaves its trial ``RUNNING``;
its heartbeat stops, and after the storage's grace period any worker fails the
trial and re-runs a copy.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["STORAGE_ENV", "WorkerStopped", "WorkerPool", "run_worker", "worker_command", "stop_on_sigterm"]

#: Environment variable holding the storage URL of ``calib study worker`` (when ``--storage`` is not given).
STORAGE_ENV = "CALIB_STORAGE"
#: Exit status of a worker stopped by SIGINT (like a shell's 128 + 2).
INTERRUPTED = 130


class WorkerStopped(BaseException):
    """Raised in a worker by SIGTERM: the running trial is marked FAIL and the worker exits with status 0."""


def stop_on_sigterm(exc: type[BaseException] = WorkerStopped) -> None:
    """Make SIGTERM raise ``exc`` in the main thread (so the running trial is closed cleanly)."""

    def handler(signum, frame):
        raise exc()

    signal.signal(signal.SIGTERM, handler)


def worker_command(study_file: str | Path, *, heartbeat_interval: int | None = None,
                   grace_period: int | None = None, python: str | None = None, mode: str | None = None) -> list[str]:
    """The command line of one worker process (the storage URL goes in ``CALIB_STORAGE``).

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
    if mode is not None:
        argv += ["--mode", mode]
    return argv


def run_worker(study_file: str | Path, storage: str, *, progress: bool = False, heartbeat_interval: int | None = None,
               grace_period: int | None = None, mode: str | None = None) -> dict:
    """Join the study of ``study_file`` in ``storage`` as a worker: evaluate trials until the study is done.

    Nothing is written besides the trials in the storage.  Returns a summary
    ``{"study", "worker", "searches": [...], "evaluated": n}``.
    """
    import tempfile

    from calib.calibrate.trials import recording, worker_id
    from calib.errors import StudyError
    from calib.studies.context import RunContext
    from calib.studies.kinds import KINDS
    from calib.studies.spec import load_study_file
    from calib.studies.storage import check_shareable

    if not storage:
        raise StudyError("a worker needs the storage URL of the study", field="--storage")
    check_shareable(storage)
    spec = load_study_file(study_file).for_mode(mode)
    with tempfile.TemporaryDirectory(prefix="calib-worker-") as tmp:
        ctx = RunContext(Path(tmp), storage_url=storage, progress=progress, study_file=Path(study_file).name,
                         heartbeat_interval=heartbeat_interval, grace_period=grace_period, role="worker")
        with recording() as log:
            KINDS[spec.kind].run(spec, ctx)
    return {"study": spec.name, "worker": worker_id(), "searches": log,
            "evaluated": sum(e.get("evaluated", 0) for e in log)}


def _forked_worker(study_file: str, storage_url: str, heartbeat_interval: int | None, grace_period: int | None,
                   quiet: bool, mode: str | None = None) -> None:
    """Body of a forked worker: join the study; exit 0 when done or stopped, 130 on SIGINT, 2 on a CalibError."""
    from calib.errors import CalibError

    stop_on_sigterm(WorkerStopped)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if quiet:
        sys.stdout = open(os.devnull, "w")
    try:
        done = run_worker(study_file, storage_url, progress=False, heartbeat_interval=heartbeat_interval,
                          grace_period=grace_period, mode=mode)
        print(f"worker {done['worker']}: {done['evaluated']} trial(s) evaluated", flush=True)
    except WorkerStopped:
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    except CalibError as exc:
        print(f"calib worker {os.getpid()}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def _import_root() -> str:
    """The folder this process imports ``calib`` from, so a spawned worker imports the same calib."""
    import calib

    return str(Path(next(iter(calib.__path__))).resolve().parent)


class _Forked:
    """The ``subprocess.Popen`` interface the pool uses, for a forked :class:`multiprocessing.Process`."""

    def __init__(self, proc: mp.Process) -> None:
        self._proc = proc
        self.pid = proc.pid

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._proc.kill()


class WorkerPool:
    """``n`` local worker processes on one study; a context manager that stops them on exit.

    Parameters
    ----------
    study_file : str or Path
        The study file every worker runs.
    storage_url : str
        Storage shared with the lead (journal file or a database server).
    n : int
        Number of worker processes.
    heartbeat_interval, grace_period : int, optional
        Passed on to the workers.
    quiet : bool
        Discard the workers' standard output (their errors still reach stderr).
    start_method : {"auto", "fork", "spawn"}
        ``fork``: fork the current process (Linux; the workers inherit its
        imports).  ``spawn``: run ``calib study worker`` processes.  ``auto``:
        fork on Linux, spawn elsewhere.  Fork before opening a database
        connection in this process, or dispose of it first.

    Attributes
    ----------
    procs : list
        The worker processes (``subprocess.Popen``-like: ``pid``, ``poll()``, ``wait()``).
    """

    def __init__(self, study_file: str | Path, storage_url: str, n: int, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, quiet: bool = True, start_method: str = "auto",
                 mode: str | None = None) -> None:
        if start_method not in ("auto", "fork", "spawn"):
            raise ValueError(f"start_method must be auto, fork or spawn, got {start_method!r}")
        if start_method == "auto":
            start_method = "fork" if sys.platform.startswith("linux") else "spawn"
        self.study_file = str(Path(study_file).resolve())
        self.storage_url = storage_url
        self.n = int(n)
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.quiet = quiet
        self.mode = mode
        self.start_method = start_method
        self.procs: list = []

    def start(self) -> "WorkerPool":
        if self.start_method == "fork":
            ctx = mp.get_context("fork")
            for _ in range(self.n):
                p = ctx.Process(target=_forked_worker, name="calib-worker",
                                args=(self.study_file, self.storage_url, self.heartbeat_interval,
                                      self.grace_period, self.quiet, self.mode))
                p.start()
                self.procs.append(_Forked(p))
            return self
        env = dict(os.environ)
        env[STORAGE_ENV] = self.storage_url
        env["PYTHONPATH"] = os.pathsep.join([_import_root(), *filter(None, [env.get("PYTHONPATH")])])
        out = subprocess.DEVNULL if self.quiet else None
        argv = worker_command(self.study_file, heartbeat_interval=self.heartbeat_interval,
                              grace_period=self.grace_period, mode=self.mode)
        for _ in range(self.n):
            self.procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out))
        return self

    def alive(self) -> list:
        return [p for p in self.procs if p.poll() is None]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the running workers, wait up to ``timeout`` s, then SIGKILL what is left."""
        for p in self.alive():
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
        """``(pid, status)`` of workers that ended with an error (not stopped by a signal or the pool)."""
        out = []
        for p in self.procs:
            code = p.poll()
            interrupted = code in (INTERRUPTED, 143, -signal.SIGINT, -signal.SIGTERM)
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
            print(f"calib: worker {pid} exited with status {code}; a trial it left unfinished is re-run by "
                  "the others or the next run", file=sys.stderr)
