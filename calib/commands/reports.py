"""``calib reports``: regenerate every committed report from the study files, in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]

REPO = Path(__file__).resolve().parents[2]


def register(subparsers) -> None:
    p = subparsers.add_parser("reports", help="rerun every study in studies/ into reports/<name>/")
    p.add_argument("--only", nargs="*", help="study names to run (default: all)")
    p.add_argument("--studies", default=str(REPO / "studies"), help="folder of study files")
    p.add_argument("--out", default=str(REPO / "reports"), help="reports folder")
    p.add_argument("--resume", action="store_true",
                   help="keep each study's Optuna storage (default: start fresh, so reports reflect the current code)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calib.commands.study import summary
    from calib.studies.runner import run_study
    from calib.studies.spec import load_study_file

    files = sorted(Path(args.studies).glob("*.yaml"))
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
            for name in ("optuna.db", "journal.log"):
                (out / name).unlink(missing_ok=True)
        print(f"== {spec.name} ({f.name}) -> {out}")
        results = run_study(f, out, progress=not args.no_progress)
        print(summary(results))
    return 0
