"""Run a study file: validate, dispatch to its kind, write results and report.

With ``workers > 1`` the lead process starts ``workers - 1`` worker processes
(:class:`calib.studies.workers.WorkerPool`) on the same storage and runs the
study itself as well; every process runs the same study code, and the
searches of :mod:`calib.calibrate.trials` share out the trials.  Before it
forks them, the lead warms what every worker needs (a kind's optional
``warm(spec, ctx)``, e.g. the replays of the experiments the search
evaluates), so the workers inherit it instead of each building it again;
what only the lead needs (the report's Matplotlib) it imports after the
fork, while the workers already evaluate trials.  Only the lead
writes ``results.json`` and the report, from the storage, so they are the ones
a serial run writes.  A worker's side of the study is
:func:`calib.studies.workers.run_worker` (re-exported here).  Every results.json
starts with the envelope of :mod:`calib.studies.results` (results version,
study, kind, mode, seeds, software versions), and a kind's output is checked
against its ``Results`` schema before anything is written.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from pathlib import Path

from calib.calibrate.trials import recording
from calib.errors import StudyError
from calib.studies.context import RunContext
from calib.specs._files import write_atomic
from calib.studies.kinds import KINDS
from calib.studies.results import Envelope, check_results, software_versions
from calib.studies.spec import load_study_file
from calib.studies.storage import check_shareable
from calib.studies.workers import run_worker

__all__ = ["run_study", "run_worker", "write_results"]


def write_results(results: dict, out_dir: Path) -> Path:
    """``results.json`` with a fixed layout (same results, same bytes), replaced atomically."""
    text = json.dumps(results, indent=1, allow_nan=True) + "\n"  # indent 1 keeps large reports under 2 MB
    return write_atomic(Path(out_dir) / "results.json", text)


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


def run_study(study_file: str | Path, out_dir: str | Path, *, mode: str | None = None, storage: str | None = None,
              progress: bool = True, report: bool = True, workers: int = 1, heartbeat_interval: int | None = None,
              grace_period: int | None = None, serial_storage: str = "journal") -> dict:
    """Run ``study_file`` and write ``results.json`` (+ ``REPORT.md`` and plots) into ``out_dir``.

    A rerun with the same storage resumes: completed trials are not repeated.
    A study file with ``modes: [reference, corrected]`` runs every mode, one
    after another, into ``out_dir/<mode>/`` and returns ``{mode: results}``;
    ``mode=`` runs one of them into ``out_dir`` itself.

    Parameters
    ----------
    study_file : str or Path
        The study file (YAML).
    out_dir : str or Path
        Output folder; also holds the default storage.
    mode : {"reference", "corrected"}, optional
        Run only this mode of a study with ``modes``.
    storage : str, optional
        Optuna storage URL (default: the journal file ``optuna.journal`` in
        ``out_dir``, or the ``optuna.db`` a serial run finds there).
    progress : bool
        Show progress bars.
    report : bool
        Write ``REPORT.md`` and the figures besides ``results.json``.
    workers : int
        Processes evaluating trials on this machine, this one included.
    heartbeat_interval, grace_period : int, optional
        Heartbeat settings of the storage in seconds (defaults in
        :mod:`calib.studies.storage`).
    serial_storage : {"journal", "sqlite"}
        The default storage a serial run starts in a folder that holds none
        (``optuna.journal`` or ``optuna.db``; see
        :func:`calib.studies.storage.default_storage_url`).  Either resumes,
        and a folder holding either resumes from it whatever this says.

    Returns
    -------
    dict
        The results, as written to ``results.json`` (``{mode: results}`` for several modes).
    """
    _check_workers(workers)
    if serial_storage not in ("sqlite", "journal"):
        raise StudyError(f"must be 'sqlite' or 'journal', got {serial_storage!r}", field="serial_storage")
    spec = load_study_file(study_file)
    modes = [mode] if mode is not None else spec.mode_list()
    options = dict(storage=storage, progress=progress, report=report, workers=workers,
                   heartbeat_interval=heartbeat_interval, grace_period=grace_period, serial_storage=serial_storage)
    if len(modes) > 1:
        if workers > 1:
            raise StudyError(f"study {spec.name!r} runs in modes {', '.join(modes)}; with --workers choose one with "
                             "--mode (workers share one mode's trials)", field="--mode")
        return {m: _run_one(spec.for_mode(m), study_file, Path(out_dir) / m, mode=m, **options) for m in modes}
    return _run_one(spec.for_mode(modes[0]), study_file, Path(out_dir), mode=modes[0], **options)


def _serial_default(out_dir: Path, serial_storage: str) -> str:
    """The default storage URL of a serial run into ``out_dir`` (its journal file or ``optuna.db`` when it holds
    one, else a new one of ``serial_storage``), after the checks :class:`RunContext` makes of a default storage
    (no link out of the folder)."""
    from calib.studies.context import STORAGE_FILES, check_out_dir, safe_path
    from calib.studies.storage import default_storage_url

    out = check_out_dir(out_dir)
    for name in STORAGE_FILES:
        safe_path(out, name)
    return default_storage_url(out, 1, serial=serial_storage)


def _run_one(spec, study_file, out_dir: Path, *, mode, storage, progress, report, workers, heartbeat_interval,
             grace_period, serial_storage="journal") -> dict:
    if not storage and workers == 1:
        storage = _serial_default(out_dir, serial_storage)
    ctx = RunContext(out_dir, storage_url=storage, progress=progress, study_file=Path(study_file).name,
                     workers=workers, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    if workers > 1:
        check_shareable(ctx.url)
    storage = ctx.storage  # open (and so validate) the storage before any worker starts
    if workers > 1 and hasattr(storage, "engine"):
        storage.engine.dispose()  # forked workers must not inherit this process's database connections
    kind = KINDS[spec.kind]
    started = time.monotonic()
    if progress:
        print(f"calib: study {spec.name} ({spec.kind}{f', {mode} mode' if mode else ''}) -> {ctx.out_dir}; storage "
              f"{ctx.storage_label}", file=sys.stderr)
    with recording() as log, storage_errors(ctx):
        if workers > 1:
            from calib.studies.workers import WorkerPool

            pool = WorkerPool(study_file, ctx.url, workers - 1, mode=mode, heartbeat_interval=heartbeat_interval,
                              grace_period=grace_period)
            warm = getattr(kind, "warm", None)
            if pool.start_method == "fork" and callable(warm):
                warm(spec, ctx)  # once here, inherited by every forked worker
            with pool:
                if report:
                    _import_report(spec.kind)  # only the lead writes the report: meanwhile the workers run trials
                results = kind.run(spec, ctx)
        else:
            if report:
                _import_report(spec.kind)
            results = kind.run(spec, ctx)
    if workers > 1 and not log:
        print(f"calib: note: study kind {spec.kind!r} has no search that workers share; the {workers - 1} extra "
              "worker(s) repeated the lead's work", file=sys.stderr)
    line = resume_line(spec.name, log, ctx.storage_label) if workers == 1 else None
    if line:
        print(line, file=sys.stderr)
    check_results(kind, results)
    _record_samplers(results, log)
    results = {**_envelope(spec, results, log), **results}
    from calib.reporting import commit, render_report, staging

    with staging(ctx.out_dir) as stage:  # results and report move into place together, or not at all
        write_results(results, stage)
        if report:
            render_report(results, stage)
        commit(stage, ctx.out_dir, last=("REPORT.md", "results.json"))
    if progress:
        print(f"calib: study {spec.name} done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return results


def _import_report(kind: str) -> None:
    """Import the report module of ``kind`` (and so Matplotlib) before the study runs: a missing dependency
    fails before the search, and a lead with workers imports it while they evaluate trials.  A kind without a
    report is left to :func:`render_report`.  Ctrl-C and SIGTERM are held back meanwhile and delivered right
    after: interrupted inside the initialisation of Matplotlib's C extensions, the interpreter can abort
    while it tears down (seen once: ``ft2font`` ``initialization failed``, then a fatal error)."""
    from calib.reporting import REPORTS, _signals_held

    if kind in REPORTS:
        with _signals_held():
            importlib.import_module(f"calib.reporting.{REPORTS[kind]}")


def resume_line(name: str, log: list[dict], storage: str) -> str | None:
    """``resumed N of M trials`` when some searches of the run found completed trials, else None."""
    searches = [e for e in log if e.get("complete_at_start") is not None]
    before = sum(e["complete_at_start"] for e in searches)
    if not before:
        return None
    total = sum(e["trials"] for e in searches)
    evaluated = sum(e.get("evaluated", 0) for e in searches)
    return (f"calib: study {name} resumed {before} of {total} trials from the storage ({storage}); "
            f"{evaluated} evaluated in this run")


@contextlib.contextmanager
def storage_errors(ctx: RunContext):
    """Turn a storage failure that escapes a kind (the searches retry theirs) into one line naming the storage."""
    try:
        yield
    except Exception as exc:
        from calib.errors import CalibError
        from calib.studies.storage import is_storage_error, storage_error

        if isinstance(exc, CalibError) or not is_storage_error(exc):
            raise
        raise storage_error(exc, ctx.storage) from None


def _envelope(spec, results: dict, log: list[dict]) -> dict:
    """The keys every results.json carries, filled once here for every kind."""
    settings = results.get("settings") if isinstance(results.get("settings"), dict) else {}
    seeds = {"request_seed": settings.get("request_seed"),
             "search_seeds": sorted({e["seed"] for e in log if e.get("seed") is not None})}
    env = Envelope(study=spec.name, kind=spec.kind, mode=results.get("mode") or spec.estimator.get("mode"),
                   seeds=seeds, software=software_versions())
    return env.model_dump()
