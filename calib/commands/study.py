"""``calib study run STUDY --out DIR [--storage URL] [--workers N]`` and ``calib study worker STUDY``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["register"]

#: Most worker processes ``--workers`` starts on one machine.
MAX_WORKERS = 256


def study_path(text: str) -> Path:
    """The study file ``text``; a name that is no file but a shipped study (``hg1``) means the shipped file.

    Examples
    --------
    >>> study_path("hg1").name
    'hg1.yaml'
    >>> study_path("my/study.yaml")
    PosixPath('my/study.yaml')
    """
    from calib.resources import available_studies, study_file

    path = Path(text)
    stem = text[:-5] if text.endswith(".yaml") else text
    if not path.exists() and len(path.parts) == 1 and stem in available_studies():
        return study_file(stem)
    return path


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole seconds, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _heartbeat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heartbeat-interval", type=_seconds, metavar="S",
                   help="seconds between the heartbeats of a running trial (default 5)")
    p.add_argument("--grace-period", type=_seconds, metavar="S",
                   help="seconds without heartbeat after which a trial's worker counts as dead and the trial is "
                        "re-run (default 20)")


def register(subparsers) -> None:
    p = subparsers.add_parser("study", help="run studies declared in files under studies/")
    sub = p.add_subparsers(dest="study_command", required=True)
    r = sub.add_parser("run", help="run (or resume) a study and write results.json, REPORT.md and plots")
    r.add_argument("study", type=study_path,
                   help="study file, e.g. studies/hg1.yaml, or the name of a shipped study (hg1)")
    r.add_argument("--out", help="output folder (default reports/<study name>)")
    r.add_argument("--storage", help="Optuna storage URL (default: the CALIB_STORAGE environment variable, which "
                                     "keeps a password out of ps; else the journal file optuna.journal in the output "
                                     "folder, or the SQLite optuna.db a serial run finds there)")
    r.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    r.add_argument("--mode", choices=("reference", "corrected"),
                   help="run one mode of a study with several (default: every mode, into OUT/<mode>/)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _heartbeat_options(r)
    r.set_defaults(func=run)

    w = sub.add_parser("worker", help="join a study in a shared storage and evaluate trials until it is done",
                       description="Join the study of STUDY in the storage at URL (any machine that reaches the "
                                   "storage can join) and evaluate trials until the study is complete.  Writes "
                                   "nothing but trials; the lead (calib study run) writes the report.")
    w.add_argument("study", type=study_path, help="study file (the same file as the lead's) or a shipped study's name")
    w.add_argument("--storage", help="Optuna storage URL, e.g. postgresql+psycopg2://user:pw@host/db (default: "
                                     "the CALIB_STORAGE environment variable, which keeps a password out of ps)")
    w.add_argument("--no-progress", action="store_true", help="hide progress bars")
    w.add_argument("--mode", choices=("reference", "corrected"), help="the lead's mode, for a study with several")
    _heartbeat_options(w)
    w.set_defaults(func=worker)


def run(args: argparse.Namespace) -> int:
    from calib.cli import importing

    with importing():  # the runner's dependencies, imported once and frozen
        from calib.errors import CalibError
        from calib.studies.runner import run_study
        from calib.studies.spec import load_study_file
        from calib.studies.workers import STORAGE_ENV, stop_on_sigterm

        if args.workers == 1:  # the reports' Matplotlib too (with workers, the lead imports it once they run)
            import calib.reporting.plots  # noqa: F401

    if args.workers < 1:
        raise CalibError(f"must be >= 1, got {args.workers}", field="--workers")
    if args.workers > MAX_WORKERS:
        raise CalibError(f"must be <= {MAX_WORKERS} (processes on this machine), got {args.workers}",
                         field="--workers")
    spec = load_study_file(args.study)
    out = Path(args.out) if args.out else Path("reports") / spec.name
    storage = args.storage or os.environ.get(STORAGE_ENV) or None
    stop_on_sigterm(KeyboardInterrupt)  # `kill PID` stops like Ctrl-C: the running trial is closed, a rerun resumes
    results = run_study(args.study, out, mode=args.mode, storage=storage, progress=not args.no_progress,
                        workers=args.workers, heartbeat_interval=args.heartbeat_interval,
                        grace_period=args.grace_period)
    print(summary(results))
    written = [out / "results.json"] if "kind" in results else [out / m / "results.json" for m in results]
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def worker(args: argparse.Namespace) -> int:
    from calib.cli import importing

    with importing():
        import calib.studies.runner  # noqa: F401 - what every study kind needs (Optuna, pandas, scikit-learn)
        from calib.studies.storage import mask_url
        from calib.studies.workers import STORAGE_ENV, WorkerStopped, run_worker, stop_on_sigterm

    url = args.storage or os.environ.get(STORAGE_ENV) or None
    if not url:
        from calib.errors import CalibError

        raise CalibError(f"a worker needs the storage URL of the study: set {STORAGE_ENV} (or give --storage)",
                         field="--storage")
    stop_on_sigterm(WorkerStopped)
    try:
        done = run_worker(args.study, url, progress=not args.no_progress, mode=args.mode,
                          heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period)
    except WorkerStopped:
        return 0
    print(f"worker {done['worker']}: study {done['study']} complete in {mask_url(url)}; "
          f"{done['evaluated']} trial(s) evaluated here")
    return 0


def summary(results: dict) -> str:
    """A short console summary of a finished study (of each mode, for a study with several)."""
    if "kind" not in results:
        return "\n\n".join(f"[{mode}]\n{summary(r)}" for mode, r in results.items())
    if results.get("kind") == "hg1":
        from calib.reporting.hg1 import criteria_table, reproduction_line, reproduction_table, validation_table

        lines = [f"{results['study']}: optimum {results['optimum_us']:g} µs ({results['mode']} mode, TPOT "
                 f"definition {results['tpot_definition']})", "", validation_table(results), ""]
        if results.get("reproduction"):
            lines += ["Published vs reproduced:", "", reproduction_table(results), "", reproduction_line(results), ""]
        lines += [criteria_table(results), "",
                  f"accept criteria (the study's own hypothesis test, not the reproduction): {results['verdict']}"]
        return "\n".join(lines)
    return f"{results.get('study')}: done"
