"""Per-experiment predictions and errors for one parameter setting."""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from calib.estimators.roofline import RooflineRegressor
from calib.metrics import ape

__all__ = ["evaluate", "MEASURED"]

#: predicted column -> measured column of the experiments table
MEASURED = {"ttft": "ttft_mean_ms", "tpot": "tpot_mean_ms", "e2e": "e2e_mean_ms"}


def evaluate(X: pd.DataFrame, params: Mapping[str, Any]) -> pd.DataFrame:
    """Predictions (ms) and APEs (fractions) of every experiment of ``X`` under estimator ``params``.

    Columns: ``ttft, tpot, e2e`` (predicted), ``ttft_ape, tpot_ape, e2e_ape``, ``overlapped``.
    """
    est = RooflineRegressor(**params).fit(X)
    pred = est.predict_all(X)
    out = pred[["ttft", "tpot", "e2e", "overlapped"]].copy()
    for key, col in MEASURED.items():
        out[f"{key}_ape"] = ape(pred[key].to_numpy(), X[col].to_numpy())
    return out
