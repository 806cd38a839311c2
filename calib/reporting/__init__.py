"""Reports: REPORT.md tables and PNG figures, written from a study's results (never recomputed).

One module per study kind; the registry below names them, and a kind without
a report module, or a module without ``write``, fails loudly.

A report is written whole or not at all: the kind's module writes into a
hidden staging folder inside the output folder, and only a complete report is
moved into place (:func:`commit`, one rename per file, with Ctrl-C and SIGTERM
held back meanwhile and delivered right after).  Ctrl-C while a report is
drawn leaves the previous report as it was, and still stops the command (exit
status 130).  A rename replaces a symbolic link in the output folder instead
of writing through it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Sequence

from calib.errors import StudyError

__all__ = ["write_report", "render_report", "staging", "commit", "REPORTS"]

#: Prefix of the staging folders (``<prefix><pid>-<random>``) inside an output folder.
STAGING_PREFIX = ".calib-staging-"

#: study kind -> report module under calib.reporting
REPORTS = {kind: kind for kind in ("hg1", "split_sensitivity", "per_group", "per_family", "overhead_models", "seeds",
                                   "physics", "batched_validation", "batched_calibration",
                                   "joint")}


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """Write the report of ``results`` (by its ``kind``) into ``out_dir``, whole or not at all; returns the
    files written."""
    out_dir = Path(out_dir)
    with staging(out_dir) as stage:
        render_report(results, stage)
        return commit(stage, out_dir, last=("REPORT.md",))


@contextlib.contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A fresh hidden folder inside ``out_dir`` to write into, removed afterwards (with whatever is left in it).

    Staging folders left by killed processes of this machine are removed first.
    """
    out_dir = Path(out_dir)
    _remove_orphans(out_dir)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out_dir))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove_orphans(out_dir: Path) -> None:
    for old in out_dir.glob(f"{STAGING_PREFIX}*"):
        pid = old.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its writer is alive
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue


def commit(stage: Path, out_dir: Path, files: Sequence[Path] | None = None, last: Sequence[str] = ()) -> list[Path]:
    """Move ``files`` (default: every file) of ``stage`` into ``out_dir``; the names in ``last`` go last.

    Each move is a rename, so each file is replaced whole (a symbolic link in
    ``out_dir`` is replaced, not followed).  SIGINT and SIGTERM are held back
    while the files move and delivered when all are in place.
    """
    stage, out_dir = Path(stage), Path(out_dir)
    names = [Path(f).name for f in (files if files is not None else sorted(stage.iterdir())) if f is not None]
    names = list(dict.fromkeys(n for n in names if (stage / n).is_file()))
    names.sort(key=lambda n: (n in last, last.index(n) if n in last else 0))
    with _signals_held():
        for name in names:
            os.replace(stage / name, out_dir / name)
    return [out_dir / n for n in names]


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Block SIGINT and SIGTERM (main thread, POSIX); a signal that arrives meanwhile is delivered on exit."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def render_report(results: dict, out_dir: Path) -> list[Path]:
    """Have the kind's report module write its files into ``out_dir`` (no staging); returns them."""
    kind = results.get("kind")
    if kind not in REPORTS:
        raise StudyError(f"no report for study kind {kind!r}; known: {', '.join(sorted(REPORTS))}", field="kind")
    module = importlib.import_module(f"calib.reporting.{REPORTS[kind]}")
    if not callable(getattr(module, "write", None)):
        raise StudyError(f"report module calib.reporting.{REPORTS[kind]} has no write(results, out)", field="kind")
    return module.write(results, Path(out_dir))
