"""Reports: REPORT.md tables and PNG figures, written from a study's results (never recomputed)."""

from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["write_report"]


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """Write the report of ``results`` (by its ``kind``) into ``out_dir``; returns the files written."""
    try:
        module = importlib.import_module(f"calib.reporting.{results['kind']}")
    except ModuleNotFoundError:
        return []
    return module.write(results, Path(out_dir))
