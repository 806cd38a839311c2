"""Run a study file: validate, dispatch to its kind, write results and report.

With ``workers > 1`` the lead process starts ``workers - 1`` worker processes
(:class:`calib.studies.workers.WorkerPool`) on the same storage and runs the
study itself as well; every process runs the same study code, and the
searches of :mod:`calib.studies.search` share out the trials.  Only the lead
writes ``results.json`` and the report, from the storage, so they are the ones
a serial run writes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from calib.errors import StudyError
from calib.studies.context import RunContext
from calib.studies.kinds import KINDS
from calib.studies.search import recording
from calib.studies.storage import check_shareable
from calib.studies.spec import load_study_file

__all__ = ["run_study", "run_worker", "write_results"]


def write_results(results: dict, out_dir: Path) -> Path:
    """``results.json`` with a fixed layout (same results, same bytes), replaced atomically."""
    path = Path(out_dir) / "results.json"
    text = json.dumps(results, indent=1, allow_nan=True) + "\n"  # indent 1 keeps large reports under 2 MB
    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _record_samplers(results: dict, log: list[dict]) -> None:
    """Record the sampler and seed of every search in ``settings.samplers`` (unless the kind did)."""
    settings = results.get("settings")
    if not isinstance(settings, dict) or "samplers" in settings or not log:
        return
    seen: dict[str, dict] = {}
    for entry in log:
        seen.setdefault(entry["study"], {k: entry[k] for k in ("study", "sampler", "seed", "trials")})
    settings["samplers"] = list(seen.values())


def _check_workers(workers: int) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise StudyError(f"must be an integer >= 1, got {workers!r}", field="workers")
    return workers


def run_study(study_file: str | Path, out_dir: str | Path, *, storage: str | None = None, progress: bool = True,
              report: bool = True, workers: int = 1, heartbeat_interval: int | None = None,
              grace_period: int | None = None) -> dict:
    """Run ``study_file`` and write ``results.json`` (+ ``REPORT.md`` and plots) into ``out_dir``.

    A rerun with the same storage resumes: completed trials are not repeated.

    Parameters
    ----------
    study_file : str or Path
        The study file (YAML).
    out_dir : str or Path
        Output folder; also holds the default storage.
    storage : str, optional
        Optuna storage URL (default: ``optuna.db`` in ``out_dir``, or
        ``optuna.journal`` when ``workers > 1``).
    progress : bool
        Show progress bars.
    report : bool
        Write ``REPORT.md`` and the figures besides ``results.json``.
    workers : int
        Processes evaluating trials on this machine, this one included.
    heartbeat_interval, grace_period : int, optional
        Heartbeat settings of the storage in seconds (defaults in
        :mod:`calib.studies.storage`).

    Returns
    -------
    dict
        The results, as written to ``results.json``.
    """
    _check_workers(workers)
    spec = load_study_file(study_file)
    ctx = RunContext(Path(out_dir), storage_url=storage, progress=progress, study_file=Path(study_file).name,
                     workers=workers, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    if workers > 1:
        check_shareable(ctx.url)
    storage = ctx.storage  # open (and so validate) the storage before any worker starts
    if workers > 1 and hasattr(storage, "engine"):
        storage.engine.dispose()  # forked workers must not inherit this process's database connections
    with recording() as log:
        if workers > 1:
            from calib.studies.workers import WorkerPool

            with WorkerPool(study_file, ctx.url, workers - 1, heartbeat_interval=heartbeat_interval,
                            grace_period=grace_period):
                results = KINDS[spec.kind].run(spec, ctx)
        else:
            results = KINDS[spec.kind].run(spec, ctx)
    if workers > 1 and not log:
        print(f"calib: note: study kind {spec.kind!r} has no search that workers share; the {workers - 1} extra "
              "worker(s) repeated the lead's work", file=sys.stderr)
    _record_samplers(results, log)
    write_results(results, ctx.out_dir)
    if report:
        from calib.reporting import write_report

        write_report(results, ctx.out_dir)
    return results


def run_worker(study_file: str | Path, storage: str, *, progress: bool = False, heartbeat_interval: int | None = None,
               grace_period: int | None = None) -> dict:
    """Join the study of ``study_file`` in ``storage`` as a worker: evaluate trials until the study is done.

    Nothing is written besides the trials in the storage.  Returns a summary
    ``{"study", "worker", "searches": [...], "evaluated": n}``.
    """
    from calib.studies.search import worker_id

    if not storage:
        raise StudyError("a worker needs the storage URL of the study", field="--storage")
    check_shareable(storage)
    spec = load_study_file(study_file)
    with tempfile.TemporaryDirectory(prefix="calib-worker-") as tmp:
        ctx = RunContext(Path(tmp), storage_url=storage, progress=progress, study_file=Path(study_file).name,
                         heartbeat_interval=heartbeat_interval, grace_period=grace_period, role="worker")
        with recording() as log:
            KINDS[spec.kind].run(spec, ctx)
    return {"study": spec.name, "worker": worker_id(), "searches": log,
            "evaluated": sum(e.get("evaluated", 0) for e in log)}
