"""``calib hg1``: the shipped HG1 study (``studies/hg1.yaml``) on the embedded data, in one command.

Works from any folder with any install: the study file is read through
:mod:`calib.resources` and the report goes to ``--out`` (default
``reports/<study>`` in the current folder).  The trials go to a journal file
(``optuna.journal``) in the output folder, which a rerun resumes; a folder
holding an ``optuna.db`` of an earlier run resumes from that instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser("hg1", help="reproduce the HG1 perLayerOverhead study on the embedded data")
    p.add_argument("--mode", choices=("reference", "corrected"), default="reference",
                   help="reference: as published; corrected: like-with-like TPOT, no phantom step")
    p.add_argument("--out", help="output folder (default reports/hg1/<mode>)")
    p.add_argument("--storage", help="Optuna storage URL (default: the journal file optuna.journal in the output "
                                     "folder, or its optuna.db when it holds one)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calib.cli import importing

    with importing():  # the study's and its report's dependencies (Matplotlib too), imported once and frozen
        import calib.reporting.hg1  # noqa: F401
        import calib.studies.kinds.hg1  # noqa: F401
        from calib.commands.study import summary
        from calib.resources import study_file
        from calib.studies.runner import run_study

    study = study_file("hg1")
    out = Path(args.out) if args.out else Path("reports") / "hg1" / args.mode
    results = run_study(study, out, mode=args.mode, storage=args.storage, progress=not args.no_progress,
                        serial_storage="journal")  # a 32-trial grid: opening SQLite would cost more than the grid
    print(summary(results))
    print(f"wrote {out / 'REPORT.md'} and {out / 'results.json'}")
    return 0
