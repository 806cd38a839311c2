"""``calib study run STUDY --out DIR [--storage URL]``."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("study", help="run studies declared in files under studies/")
    sub = p.add_subparsers(dest="study_command", required=True)
    r = sub.add_parser("run", help="run (or resume) a study and write results.json, REPORT.md and plots")
    r.add_argument("study", help="study file, e.g. studies/hg1.yaml")
    r.add_argument("--out", help="output folder (default reports/<study name>)")
    r.add_argument("--storage", help="Optuna storage URL (default: SQLite optuna.db in the output folder)")
    r.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calib.errors import CalibError
    from calib.studies.runner import run_study
    from calib.studies.spec import load_study_file

    if args.workers < 1:
        raise CalibError(f"must be >= 1, got {args.workers}", field="--workers")
    spec = load_study_file(args.study)
    out = Path(args.out) if args.out else Path("reports") / spec.name
    results = run_study(args.study, out, storage=args.storage, progress=not args.no_progress,
                        workers=args.workers)
    print(summary(results))
    print(f"wrote {out / 'results.json'}")
    return 0


def summary(results: dict) -> str:
    """A short console summary of a finished study."""
    if results.get("kind") == "hg1":
        from calib.reporting.hg1 import criteria_table, validation_table

        return "\n".join([
            f"{results['study']}: optimum {results['optimum_us']:g} µs ({results['mode']} mode, TPOT "
            f"definition {results['tpot_definition']})", "", validation_table(results), "", criteria_table(results),
            "", f"verdict: {results['verdict']}"])
    return f"{results.get('study')}: done"
