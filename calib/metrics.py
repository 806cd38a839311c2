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
``guidellm`` quantity, like with like.  A loaded-server run compares the
``itl`` quantity per request on both sides (``data/README.md``).

Statistics and APEs
-------------------
:func:`stats` gives the mean and percentiles of a metric over requests;
:func:`ape_block` the APEs of the four headline figures of a run or a load
stage (:data:`APE_KEYS`).

Aggregation
-----------
An APE is computed per *unit* (a synchronous experiment, a loaded run, a load
stage) and then averaged.  How is part of every aggregated result
(:data:`AGGREGATIONS`, :func:`mean_apes`): a mean over runs weighs every run
once, however many stages or requests it has; rows that belong to one group
are weighted by :func:`group_weights` for that.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["TPOT_DEFINITIONS", "METRICS", "STATS", "APE_KEYS", "AGGREGATIONS", "client_ms", "tpot_ms", "ape", "mape", "stats",
           "ape_block", "group_weights", "weighted_mape", "mean_apes"]

TPOT_DEFINITIONS = ("itl", "guidellm")
#: Per-request latency metrics (ms).
METRICS = ("ttft", "tpot", "e2e")
#: Statistics of a metric over requests (:func:`stats`).
STATS = ("mean", "p50", "p90", "p99")
#: The four headline figures of a loaded run or stage, compared by :func:`ape_block`.
APE_KEYS = ("ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms", "e2e_p90_ms")
#: Unit of an APE -> how a mean over those units is described in results.
AGGREGATIONS = {
    "experiment": "mean over experiments of the experiment's APE (each experiment weighs 1)",
    "run": "mean over runs of the run's APE (each run weighs 1, whatever its length)",
    "stage": "mean over load stages of the stage's APE (each stage weighs 1)",
    "run_of_stages": "mean over runs of the mean over the run's stages of the stage's APE (each run weighs 1)",
}


def client_ms(request_latency_ms: float, input_token_latency_us: float, input_tokens):
    """Client/API-server latency (ms) a request adds to its TTFT and E2E: a constant plus a per-input-token term.

    The API server tokenises the prompt and relays the stream; neither is engine time,
    so the replay adds this after the fact (it never delays a step).

    >>> client_ms(10.0, 2.0, np.array([1000, 0])).tolist()
    [12.0, 10.0]
    """
    return request_latency_ms + input_token_latency_us * np.asarray(input_tokens, dtype=np.float64) / 1e3


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


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


def stats(values) -> dict[str, float]:
    """Mean, p50, p90, p99 of the finite values (NaN when there are none; NumPy's linear percentiles).

    >>> stats([1.0, 2.0, 3.0, float("nan")])["p50"]
    2.0
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()) if v.size else float("nan"), "p50": _pct(v, 50), "p90": _pct(v, 90),
            "p99": _pct(v, 99)}


def ape_block(pred: Mapping[str, Mapping[str, float]], meas: Mapping[str, Mapping[str, float]]) -> dict:
    """The headline figures (:data:`APE_KEYS`) of predicted and measured :func:`stats`, and their APEs.

    ``pred`` and ``meas`` map each of :data:`METRICS` to its :func:`stats`.  An
    APE is NaN when the measured figure is 0 or either side is not finite.

    >>> s = {m: stats([10.0]) for m in METRICS}
    >>> ape_block({m: stats([11.0]) for m in METRICS}, s)["ape"]["tpot_mean_ms"]
    0.1
    """
    def four(s):
        return {"ttft_mean_ms": s["ttft"]["mean"], "tpot_mean_ms": s["tpot"]["mean"], "e2e_mean_ms": s["e2e"]["mean"],
                "e2e_p90_ms": s["e2e"]["p90"]}

    p, m = four(pred), four(meas)
    out = {k: (abs(p[k] - m[k]) / m[k] if m[k] and np.isfinite(m[k]) and np.isfinite(p[k]) else float("nan"))
           for k in APE_KEYS}
    return {"measured": m, "predicted": p, "ape": out}


def group_weights(groups) -> np.ndarray:
    """``1 / (rows of the same group)`` per row: a weighted mean over rows is then a mean over groups.

    >>> group_weights(["a", "a", "b"]).tolist()
    [0.5, 0.5, 1.0]
    """
    g = np.asarray(groups, dtype=object)
    _, inverse, counts = np.unique(g.astype(str), return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].astype(float)


def weighted_mape(predicted, measured, weights=None) -> float:
    """Mean of :func:`ape` weighted by ``weights`` (e.g. :func:`group_weights`; None: each row weighs 1).

    >>> weighted_mape([11.0, 12.0, 20.0], [10.0, 10.0, 10.0], group_weights(["a", "a", "b"]))
    0.575
    """
    errors = ape(predicted, measured)
    return float(np.average(errors, weights=None if weights is None else np.asarray(weights, dtype=float)))


def mean_apes(apes: Sequence[Mapping[str, Any]], keys: Sequence[str] = APE_KEYS, over: str = "run") -> dict:
    """Mean and median APE per key over units (one APE mapping per unit; ``None``/NaN values left out).

    Returns ``{"aggregation": <words>, "n": units, "mape": {key: mean}, "median_ape": {key: median},
    "n_used": {key: units with a value}}``; a key no unit has is NaN.

    >>> r = mean_apes([{"tpot_mean_ms": 0.1}, {"tpot_mean_ms": 0.3}, {"tpot_mean_ms": None}], ["tpot_mean_ms"])
    >>> round(r["mape"]["tpot_mean_ms"], 6), r["n_used"]["tpot_mean_ms"], r["aggregation"].split(" (")[0]
    (0.2, 2, "mean over runs of the run's APE")
    """
    if over not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation unit {over!r}; choose one of {', '.join(AGGREGATIONS)}")
    out: dict[str, Any] = {"aggregation": AGGREGATIONS[over], "n": len(apes), "mape": {}, "median_ape": {},
                           "n_used": {}}
    for k in keys:
        vals = [float(a[k]) for a in apes if a.get(k) is not None and np.isfinite(a[k])]
        out["mape"][k] = float(np.mean(vals)) if vals else float("nan")
        out["median_ape"][k] = float(np.median(vals)) if vals else float("nan")
        out["n_used"][k] = len(vals)
    return out
