"""``calib hg1``: the embedded HG1 study (studies/hg1.yaml) in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]

REPO = Path(__file__).resolve().parents[2]


def register(subparsers) -> None:
    p = subparsers.add_parser("hg1", help="reproduce the HG1 perLayerOverhead study on the embedded data")
    p.add_argument("--mode", choices=("reference", "corrected"), default="reference",
                   help="reference: as published; corrected: like-with-like TPOT, no phantom step")
    p.add_argument("--out", help="output folder (default reports/hg1 or reports/hg1-corrected)")
    p.add_argument("--storage", help="Optuna storage URL (default SQLite in the output folder)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calib.commands.study import summary
    from calib.studies.runner import run_study

    name = "hg1" if args.mode == "reference" else "hg1-corrected"
    study = REPO / "studies" / f"{name}.yaml"
    out = Path(args.out) if args.out else Path("reports") / name
    results = run_study(study, out, storage=args.storage, progress=not args.no_progress)
    print(summary(results))
    print(f"wrote {out / 'REPORT.md'} and {out / 'results.json'}")
    return 0
