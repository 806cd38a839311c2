"""Latency metrics and their definitions (``roofline-spec.md`` §6.6, §10.6).

Two TPOT definitions exist and they are not the same quantity:

``itl``
    Mean over requests with ``O > 1`` and ``E2E > TTFT`` of ``(E2E - TTFT) / (O - 1)``:
    what the reference simulator reported as predicted TPOT.
``guidellm``
    ``sum(E2E) / sum(O)``: GuideLLM's aggregate ``time_per_output_token_ms``,
    token-weighted and including the first token; what ``tpot_mean_ms`` measured.

``reference`` mode compares the predicted ``itl`` with the measured
``guidellm`` value (what the HG1 study did); ``corrected`` mode predicts the
``guidellm`` quantity, like with like.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TPOT_DEFINITIONS", "tpot_ms", "ape", "mape"]

TPOT_DEFINITIONS = ("itl", "guidellm")


def tpot_ms(ttft_us: np.ndarray, e2e_us: np.ndarray, output_tokens: np.ndarray, definition: str = "itl") -> float:
    """Mean TPOT in ms of one experiment under ``definition``.

    >>> tpot_ms(np.array([10_000.]), np.array([40_000.]), np.array([4]), "itl")
    10.0
    >>> tpot_ms(np.array([10_000.]), np.array([40_000.]), np.array([4]), "guidellm")
    10.0
    """
    ttft = np.asarray(ttft_us, dtype=float)
    e2e = np.asarray(e2e_us, dtype=float)
    out = np.asarray(output_tokens, dtype=float)
    if definition == "itl":
        ok = (out > 1) & (e2e > ttft)
        if not ok.any():
            return float("nan")
        return float(np.mean((e2e[ok] - ttft[ok]) / (out[ok] - 1)) / 1e3)
    if definition == "guidellm":
        return float(e2e.sum() / out.sum() / 1e3)
    raise ValueError(f"unknown TPOT definition {definition!r}; choose one of {TPOT_DEFINITIONS}")


def ape(predicted, measured) -> np.ndarray:
    """Absolute percentage error as a fraction: ``|pred - meas| / meas``."""
    predicted = np.asarray(predicted, dtype=float)
    measured = np.asarray(measured, dtype=float)
    return np.abs(predicted - measured) / np.abs(measured)


def mape(predicted, measured) -> float:
    """Mean of :func:`ape` (a fraction; 0.139 means 13.9 %)."""
    return float(np.mean(ape(predicted, measured)))
