"""The ``calib`` command line.

Each sub-command lives in ``calib/commands/<name>.py`` and exposes
``register(subparsers)``.  A :class:`calib.errors.CalibError` is printed as one
line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from calib.errors import CalibError

_COMMANDS = ("step", "hg1", "study", "reports", "import_mfu", "import_experiments")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calib", description="Calibrate and validate roofline LLM serving models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"calib.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"calib.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CalibError as exc:
        print(f"calib {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"calib {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
