"""Pre-registered accept criteria -> verdicts."""

from __future__ import annotations

from typing import Mapping, Sequence

from calib.studies.spec import Criterion

__all__ = ["observed_value", "evaluate_criteria"]


def observed_value(c: Criterion, splits: Mapping[str, float]) -> float:
    """The quantity ``c`` looks at, from ``{"train": x, "test": y, "all": z}`` of its metric."""
    if c.quantity in ("train", "test", "all"):
        return float(splits[c.quantity])
    gap = float(splits["test"]) - float(splits["train"])
    return abs(gap) if c.quantity == "abs_gap" else gap


def evaluate_criteria(criteria: Sequence[Criterion], metrics: Mapping[str, Mapping[str, float]]) -> list[dict]:
    """``metrics[metric][split]`` -> list of ``{name, metric, quantity, op, threshold, observed, passed}``."""
    out = []
    for c in criteria:
        obs = observed_value(c, metrics[c.metric])
        out.append({"name": c.name, "metric": c.metric, "quantity": c.quantity, "op": c.op,
                    "threshold": c.threshold, "observed": obs, "passed": bool(c.passes(obs))})
    return out
