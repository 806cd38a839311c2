"""Run a study file: validate, dispatch to its kind, write results and report."""

from __future__ import annotations

import json
from pathlib import Path

from calib.studies.context import RunContext
from calib.studies.kinds import KINDS
from calib.studies.spec import load_study_file

__all__ = ["run_study", "write_results"]


def write_results(results: dict, out_dir: Path) -> Path:
    """``results.json`` with a fixed layout (same results, same bytes)."""
    path = Path(out_dir) / "results.json"
    path.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    return path


def run_study(study_file: str | Path, out_dir: str | Path, *, storage: str | None = None, progress: bool = True,
              report: bool = True, workers: int = 1) -> dict:
    """Run ``study_file`` and write ``results.json`` (+ ``REPORT.md`` and plots) into ``out_dir``.

    A rerun with the same storage resumes: completed trials are not repeated.
    """
    spec = load_study_file(study_file)
    ctx = RunContext(Path(out_dir), storage_url=storage, progress=progress, study_file=Path(study_file).name,
                     workers=workers)
    results = KINDS[spec.kind].run(spec, ctx)
    write_results(results, ctx.out_dir)
    if report:
        from calib.reporting import write_report

        write_report(results, ctx.out_dir)
    return results
