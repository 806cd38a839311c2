"""The ``calib`` command line (also ``python -m calib``).

Each sub-command lives in ``calib/commands/<name>.py`` and exposes
``register(subparsers)``; a command module imports its heavy dependencies
inside its handler, so ``calib --help`` and ``calib step`` start quickly.  A
:class:`calib.errors.CalibError` is printed as one line on stderr with exit
status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from calib.errors import CalibError

__all__ = ["build_parser", "main", "version"]

_COMMANDS = ("step", "hg1", "study", "reports", "import_mfu", "import_experiments")


def version() -> str:
    """The installed distribution's version (``importlib.metadata``), else ``calib.__version__``.

    Examples
    --------
    >>> version().count(".") >= 1
    True
    """
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("calib")
    except PackageNotFoundError:
        from calib import __version__

        return __version__


class _Version(argparse.Action):
    """``--version``: print ``calib <version>`` and exit (the version is looked up only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"calib {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calib", description="Calibrate and validate roofline LLM serving models.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
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
