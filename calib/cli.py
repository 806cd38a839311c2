"""The ``calib`` command line (also ``python -m calib``).

Each sub-command lives in ``calib/commands/<name>.py`` and exposes
``register(subparsers)``; a command module imports its heavy dependencies
inside its handler, so ``calib --help`` and ``calib step`` start quickly.  A
:class:`calib.errors.CalibError` is printed as one line on stderr with exit
status 2, never as a traceback.

Run as a program (``main()`` without arguments: the ``calib`` script,
``python -m calib``), calib skips work no command needs (issue 15): OpenBLAS
starts one thread instead of one per core unless ``OPENBLAS_NUM_THREADS`` is
set (calib does no linear algebra, and the idle threads of numpy's and SciPy's
OpenBLAS spin for about 0.2 s of CPU at start-up).  The cyclic garbage
collector is tuned for a short-lived process (:data:`YOUNG_GC_THRESHOLD`,
:func:`importing`): it pauses while a command imports its dependencies, leaves
what they allocated alone afterwards (:func:`gc.freeze`), collects the young
generation every 10,000 allocations instead of 700, and, once a command has
finished (its files written and closed, its storage closed), is not run over
the command's objects again while the interpreter tears down.  The process
still ends through the interpreter's normal teardown: ``atexit`` handlers run,
output is flushed and every object freed by reference counting is finalized
(a faster ``os._exit`` saved 0.2 s of ``calib hg1`` but would skip all of
that); only objects in reference cycles left by a finished command are not
collected at exit.  ``main(argv)`` called from Python does none of this.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys

from calib.errors import CalibError

__all__ = ["as_program", "build_parser", "finished", "freeze_imports", "importing", "main", "version"]

#: Whether calib runs as a program (``main()`` without arguments), not called from Python.
_PROGRAM = False
#: Allocations between two collections of the garbage collector's young generation when calib runs as a program
#: (Python's default: 700).  The replays allocate and free objects at a high rate, few of them in cycles; with the
#: default, ``calib hg1`` runs about 700 collections that find almost nothing.
YOUNG_GC_THRESHOLD = 10_000

_COMMANDS = ("step", "hg1", "study", "reports", "import_mfu", "import_experiments", "import_runs", "predict", "capacity",
             "calibrate")


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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit status 2), like every other user error."""

    def error(self, message: str):
        from calib.errors import _one_line

        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="calib", description="Calibrate and validate roofline LLM serving models.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:  # a listed command that is missing or broken fails loudly here
        module = importlib.import_module(f"calib.commands.{name}")
        if not callable(getattr(module, "register", None)):
            raise RuntimeError(f"command module calib.commands.{name} has no register(subparsers)")
        module.register(subparsers)
    return parser


def freeze_imports() -> None:
    """Tell the cyclic garbage collector that what exists now lives until exit (:func:`gc.freeze`).

    A command calls this (or imports inside :func:`importing`) after importing
    its dependencies: the objects of the imported modules (scikit-learn,
    SciPy, pandas, ...) are then never traversed again by a full collection
    (about 0.1 s of CPU in ``calib hg1``).  Only when calib runs as a program;
    called from Python, it does nothing (the caller's garbage of the moment
    would never be collected).
    """
    if _PROGRAM:
        gc.freeze()


@contextlib.contextmanager
def importing():
    """A command's imports: the cyclic garbage collector pauses meanwhile, and what they allocated is frozen
    afterwards (:func:`freeze_imports`), whether or not they succeed.

    Importing scikit-learn, SciPy, pandas, Optuna and Matplotlib allocates
    some 300,000 objects that live until exit; the collections this triggers
    (full ones among them) find almost nothing to free.  Ctrl-C and SIGTERM
    are held back meanwhile and delivered right after the imports.  Only when
    calib runs as a program; called from Python, the imports run as any others.

    Examples
    --------
    >>> with importing():
    ...     import json
    """
    if not _PROGRAM:
        yield
        return
    from calib.reporting import _signals_held

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with _signals_held():  # Ctrl-C delivered after the imports, never inside a C extension's initialisation
            yield
    finally:
        freeze_imports()
        if was_enabled:
            gc.enable()


def finished() -> None:
    """A command finished (run as a program; ``main`` calls this): what it made lives until exit, so the
    garbage collector leaves it alone (:func:`gc.freeze`) instead of traversing it once more while the
    interpreter tears down (about 0.07 s of ``calib hg1``).  Objects freed by reference counting are finalized
    at exit as before; files are closed where they are written, and the database connections of the storages
    are closed here (:func:`calib.studies.storage.close_storages`)."""
    if not _PROGRAM:
        return
    storage = sys.modules.get("calib.studies.storage")
    if storage is not None:
        storage.close_storages()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status.

    0 success; 2 a user error (one line on stderr); 1 the system refused
    (disk full, permission: one line); 130 interrupted (Ctrl-C, SIGTERM), with
    nothing half-written; 141 the reader of the output went away (``| head``),
    silently, as a shell tool killed by SIGPIPE.

    ``argv=None`` means calib runs as a program (the arguments are
    ``sys.argv``): see the module notes for what that changes.
    """
    if argv is not None:
        return _main(argv)
    as_program()
    return _main(None)


def as_program() -> None:
    """Set this process up as the ``calib`` program (what ``main()`` without arguments does first): one
    OpenBLAS thread unless ``OPENBLAS_NUM_THREADS`` says otherwise, the garbage collector tuned for a
    short-lived process, :func:`importing` and the end of a command active (see the module notes).

    Call it before anything imports numpy, in a process that runs calib as a program would (a benchmark of
    ``calib study run``); never in a library or a test process.
    """
    global _PROGRAM
    _PROGRAM = True
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before anything imports numpy
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


def _main(argv: list[str] | None) -> int:
    name = "calib"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        name = f"calib {args.command}"
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        finished()
        return status
    except CalibError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except OSError as exc:  # not calib's to explain at length: the file and the system's reason
        from calib.errors import _one_line

        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{name}: error: {_one_line(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail again on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
