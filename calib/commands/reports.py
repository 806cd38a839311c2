"""``calib reports``: regenerate every committed report from the study files, in one command.

By default the shipped study files are run (read through :mod:`calib.resources`)
and the reports go to ``reports/`` in the current folder: run it from the
repository root to refresh the committed reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser("reports", help="rerun every study in studies/ into reports/<name>/")
    p.add_argument("--only", nargs="*", help="study names to run (default: all)")
    p.add_argument("--studies", help="folder of study files (default: the shipped studies/)")
    p.add_argument("--out", default="reports", help="reports folder (default: reports/ in the current folder)")
    p.add_argument("--resume", action="store_true",
                   help="keep each study's Optuna storage (default: start fresh, so reports reflect the current code)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calib.cli import importing

    with importing():  # the runner's and the reports' dependencies, imported once and frozen
        import calib.reporting.plots  # noqa: F401
        from calib.commands.study import summary
        from calib.resources import study_dir
        from calib.studies.context import check_out_dir
        from calib.studies.runner import run_study
        from calib.studies.spec import load_study_file

    check_out_dir(args.out)  # a file or an unwritable place: one line before any study runs
    folder = Path(args.studies or study_dir())
    if not folder.is_dir():
        from calib.errors import CalibError

        raise CalibError("not a folder of study files", file=folder, field="--studies")
    files = sorted(folder.glob("*.yaml"))
    specs = [(f, load_study_file(f)) for f in files]  # validate all before running any
    if args.only:
        known = {s.name for _, s in specs}
        unknown = sorted(set(args.only) - known)
        if unknown:
            from calib.errors import CalibError

            raise CalibError(f"no study named {unknown[0]!r}; known: {', '.join(sorted(known))}", field="--only")
        specs = [(f, s) for f, s in specs if s.name in args.only]
    for f, spec in specs:
        out = Path(args.out) / spec.name
        if not args.resume:
            from calib.studies.context import STORAGE_FILES

            for folder in [out, *(out / m for m in spec.modes or [])]:
                for name in STORAGE_FILES:  # the storages with SQLite's log and the journal's lock
                    (folder / name).unlink(missing_ok=True)
        print(f"== {spec.name} ({f.name}) -> {out}")
        results = run_study(f, out, progress=not args.no_progress)
        print(summary(results))
    return 0
