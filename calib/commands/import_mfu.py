"""``calib import-mfu``: turn a raw InferSim ``bench_data`` directory into calib's MFU JSON.

The file goes to ``--out``, by default ``configs/mfu/<gpu>.json`` under the
current folder (run from the repository root to update the shipped tables);
never into the installed package.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from calib.specs.mfu import MFUDatabase

__all__ = ["DEFAULT_OUT_DIR", "register", "run", "summary"]

#: Folder of the default output file, relative to the current folder.
DEFAULT_OUT_DIR = Path("configs") / "mfu"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import-mfu",
        help="import one GPU's MFU tables from a bench_data directory",
        description="Read gemm/, mha/prefill/ and mha/decode/ CSVs of one GPU, validate them and write "
        "calib's compact MFU JSON (only the key columns and mfu, rows in file order).",
    )
    p.add_argument("bench_dir", metavar="BENCH_DIR", type=Path, help="the bench_data directory")
    p.add_argument("--gpu", required=True, metavar="NAME", help="GPU directory name, any case (e.g. h100)")
    p.add_argument("--out", type=Path, metavar="PATH",
                   help="output file (default: configs/mfu/<gpu>.json in the current folder)")
    p.add_argument("--force", action="store_true",
                   help="overwrite --out even if it is not an MFU file calib wrote (default: refuse)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calib.specs.mfu import import_bench_data

    out = args.out if args.out is not None else DEFAULT_OUT_DIR / f"{args.gpu.lower()}.json"
    db = import_bench_data(args.bench_dir, args.gpu, out, force=args.force)
    print(f"{summary(db)} -> {out}")
    return 0


def summary(db: MFUDatabase) -> str:
    """One line: rows per table, e.g. ``h100: gemm 112; prefill 28-4-128:5 ...; decode 28-4-128-tp1:55 ...``."""
    prefill = " ".join(f"{k}:{t.mfu.size}" for k, t in db.prefill.items())
    decode = " ".join(f"{k}-tp{tp}:{t.mfu.size}" for (k, tp), t in db.decode.items())
    return f"{db.gpu}: gemm {db.gemm.mfu.size}; prefill {prefill}; decode {decode}"
