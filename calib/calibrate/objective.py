"""The loss a calibration minimises: weighted mean APEs of TTFT, TPOT and E2E means.

For each metric, the APE of every row's predicted mean against its measured
mean is (optionally capped, so one runaway row cannot dominate) averaged over
rows with the estimator's row weights — equal for synchronous experiments
("mean over experiments"), ``1 / stages of the run`` for load stages ("mean
over runs").  The loss is the weighted mean of those per-metric means.

Examples
--------
>>> import pandas as pd
>>> pred = pd.DataFrame({"tpot": [11.0, 18.0], "e2e": [100.0, 200.0]})
>>> meas = pd.DataFrame({"tpot": [10.0, 20.0], "e2e": [100.0, 250.0]})
>>> obj = Objective.parse("tpot")
>>> obj.loss(pred, meas)
(0.1, {'train_tpot_mape': 0.1, 'train_e2e_mape': 0.1})
>>> loss, attrs = Objective.parse("tpot_e2e").loss(pred, meas)
>>> round(loss, 4), attrs["train_e2e_mape"]
(0.1, 0.1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from calib.errors import ConfigError
from calib.metrics import ape

__all__ = ["Objective", "METRICS"]

METRICS = ("ttft", "tpot", "e2e")


@dataclass(frozen=True)
class Objective:
    """Weighted mean APE over metrics; per metric a (weighted) mean over rows of the (capped) APE.

    Every metric that both frames hold is recorded as ``train_<metric>_mape``;
    the weighted ones make the loss.

    Parameters
    ----------
    weights : mapping
        Metric (``ttft``, ``tpot``, ``e2e``) -> weight >= 0, positive sum.
    cap : float, optional
        Upper bound on a row's APE before averaging (None: no cap).
    """

    weights: tuple[tuple[str, float], ...]
    cap: float | None = None

    def __post_init__(self) -> None:
        w = dict(self.weights)
        bad = sorted(set(w) - set(METRICS))
        if bad:
            raise ConfigError(f"unknown metric {bad[0]!r}; choose among {', '.join(METRICS)}", field="objective")
        if any(not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) for v in w.values()) \
                or sum(w.values()) <= 0:
            raise ConfigError("weights must be finite, >= 0, with a positive sum", field="objective.weights")
        if self.cap is not None and not (isinstance(self.cap, (int, float)) and math.isfinite(self.cap)
                                         and self.cap > 0):
            raise ConfigError(f"must be a finite number > 0, got {self.cap!r}", field="objective.cap")

    @classmethod
    def parse(cls, spec: Any) -> "Objective":
        """From ``"tpot"``, ``"tpot_mape"``, ``"tpot_e2e_ttft"`` (equal weights), a weights mapping, a mapping
        ``{"weights": {...}, "cap": 2.0}`` or an :class:`Objective`."""
        if isinstance(spec, Objective):
            return spec
        if isinstance(spec, str):
            names = spec.removesuffix("_mape").split("_")
            return cls(tuple((n, 1.0) for n in names))
        if isinstance(spec, Mapping):
            if "weights" in spec:
                extra = sorted(set(spec) - {"weights", "cap"})
                if extra:
                    raise ConfigError("unknown key", field=f"objective.{extra[0]}")
                return cls(tuple(dict(spec["weights"]).items()), spec.get("cap"))
            return cls(tuple(dict(spec).items()))
        raise ConfigError(f"must be a metric name or a mapping of weights, got {spec!r}", field="objective")

    @property
    def metrics(self) -> list[str]:
        return [m for m, w in self.weights if w > 0]

    def describe(self) -> dict:
        """JSON-able description, naming the aggregation."""
        return {"weights": dict(self.weights), "cap": self.cap,
                "aggregation": "weighted mean over metrics of the row-weighted mean APE"}

    def loss(self, predicted, measured, row_weights=None) -> tuple[float, dict[str, float]]:
        """``(loss, {"train_<metric>_mape": ...})`` of predicted vs measured frames (columns = metrics).

        A non-finite prediction makes the loss ``inf`` (the search marks such a trial failed).
        """
        w = None if row_weights is None else np.asarray(row_weights, dtype=float)
        attrs: dict[str, float] = {}
        weights = dict(self.weights)
        # every metric both frames hold is recorded; the weighted ones make the loss
        metrics = [m for m in METRICS if m in weights or (m in predicted and m in measured)]
        pred, meas = _columns(predicted, metrics), _columns(measured, metrics)
        for metric in metrics:
            errors = ape(pred[metric], meas[metric])
            if self.cap is not None:
                errors = np.minimum(errors, self.cap)
            attrs[f"train_{metric}_mape"] = float(np.average(errors, weights=w)) if len(errors) else math.nan
        total = sum(wt * attrs[f"train_{m}_mape"] for m, wt in self.weights)
        loss = total / sum(wt for _, wt in self.weights)
        return (loss if math.isfinite(loss) else math.inf), attrs


def _columns(frame, names: list[str]) -> dict[str, np.ndarray]:
    """Columns ``names`` of ``frame`` as float arrays (a numeric DataFrame converted once, not per column)."""
    if isinstance(frame, pd.DataFrame) and frame.columns.is_unique and all(n in frame.columns for n in names):
        try:
            values = frame.to_numpy(dtype=float)
        except (TypeError, ValueError):  # a column that is not numeric: column by column
            pass
        else:
            return {n: values[:, frame.columns.get_loc(n)] for n in names}
    return {n: np.asarray(frame[n], dtype=float) for n in names}
