"""REPORT.md and figures of a physics study: the layout of :mod:`calib.reporting.batched_calibration` (the same
nested calibration on the loaded runs, with physics variants and switches as the candidates), plus what each
candidate fixes and searches."""

from __future__ import annotations

import json
from pathlib import Path

from calib.reporting import batched_calibration as loaded
from calib.reporting.tables import md_table

__all__ = ["write"]


def _candidates(r: dict) -> list[str]:
    return ["## Candidates", "",
            md_table(["candidate", "description", "fixed physics", "overhead model", "searched"],
                     [[c["name"], c["description"] or "—", json.dumps(c["physics"]), c["overhead_model"],
                       ", ".join(k.split(".")[-1] for k in c["space"])] for c in r["candidates"]]), ""]


def write(r: dict, out: Path) -> list[Path]:
    """Write ``REPORT.md`` (with a table of the candidates' physics), ``heldout.png`` and ``convergence.png``."""
    return loaded.write(r, out, extra=(_candidates,))
