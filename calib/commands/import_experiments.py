"""``calib import-hg1``: write calib's embedded HG1 dataset from the study's files.

The dataset goes to ``--out``, by default ``configs/datasets/hg1`` under the
current folder (run from the repository root to update the shipped dataset);
never into the installed package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["DEFAULT_OUT", "register", "run"]

#: Default output folder, relative to the current folder.
DEFAULT_OUT = Path("configs") / "datasets" / "hg1"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``import-hg1`` subcommand.

    The handler is stored as ``func`` in the parsed namespace; it returns the
    exit code.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="calib")
    >>> register(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["import-hg1", "data/hg1", "--out", "/tmp/hg1"])
    >>> args.source_dir, args.out, args.func is run
    (PosixPath('data/hg1'), PosixPath('/tmp/hg1'), True)
    """
    parser = subparsers.add_parser(
        "import-hg1",
        help="write calib's embedded HG1 experiment dataset from the study's files",
        description=(
            "Read experiments.csv, workloads.yaml and reference_request_lengths.json from SOURCE_DIR "
            "and write calib's own compact dataset (experiments.csv, workloads.yaml, "
            "request_lengths.json, README.md) to --out."
        ),
    )
    parser.add_argument("source_dir", metavar="SOURCE_DIR", type=Path, help="folder of the HG1 study's files")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT} in the current folder)"
    )
    parser.add_argument("--force", action="store_true",
                        help="overwrite files in --out that an earlier import did not write (default: refuse)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the import; print the files written. Raises DataError on bad input."""
    from calib.data.experiments import import_hg1

    for path in import_hg1(args.source_dir, args.out, force=args.force):
        print(f"wrote {path}")
    return 0
