"""What the loaded-server study kinds share: their data fields, run loading and per-run result entries.

The kinds ``batched_validation``, ``batched_calibration`` and ``physics``
replay the runs of ``data/batched/`` (:mod:`calib.replay.loaded`).  Their
study files share the fields of :class:`LoadedData`; their results share the
per-run entry of :func:`run_entry` (measured, predicted and APE of the four
headline figures, per-stage detail, the issue-6 :data:`TARGETS` and, for a
missed target, a :func:`diagnose` in words) and the group summaries of
:func:`group_summaries` (mean APE over runs, named in ``aggregation``).

Where the runs are
------------------
``data_dir`` of the study file; a relative path is taken from the current
folder (the shipped study files give a path relative to the repository root:
run ``calib reports`` from there).  Without ``data_dir`` the runs are looked
for in ``$CALIB_DATA/batched``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field

from calib.errors import CalibError, StudyError
from calib.metrics import APE_KEYS, mean_apes
from calib.replay.batched import BatchedReplay
from calib.replay.loaded import GROUPS, LoadedRun, batch_profile, load_runs as _load_runs, run_report, scatter
from calib.settings import Physics, Settings
from calib.studies.context import RunContext
from calib.studies.spec import Strict

__all__ = ["TARGETS", "GROUPS", "PHYSICS_KEYS", "LoadedData", "check_physics", "physics_settings", "load_runs",
           "data_label", "settings_block", "output_rule_text", "run_entry", "without_scatter", "targets",
           "diagnose", "aggregate", "group_summaries"]

#: Issue 6 targets (fractions): held-out mean-TPOT and mean-E2E APE, mean-TTFT APE.
TARGETS = {"tpot_mean_ms": 0.10, "e2e_mean_ms": 0.10, "ttft_mean_ms": 0.25}
#: Keys of a study file's ``physics`` mapping (the physics settings; the hardware is ``LoadedData.hardware``).
PHYSICS_KEYS = tuple(k for k in Physics.model_fields if k != "hardware")


# ======================================================================================= schema


def physics_settings(physics: Mapping[str, Any], *, hardware: str = "h100", overhead_model: str = "per_layer",
                     overhead_params: Mapping[str, float] | None = None, request_latency_ms: float = 0.0,
                     source: str | None = None) -> Settings:
    """Settings of a study file's ``physics`` mapping, an overhead model, the hardware and the request latency.

    >>> s = physics_settings({"variant": "v3"}, overhead_params={"per_layer_us": 100})
    >>> s.physics.variant, s.overhead.per_layer_us
    ('v3', 100.0)
    """
    return Settings.from_params({**physics, "hardware": hardware, "overhead_model": overhead_model,
                                 **(overhead_params or {}), "request_latency_ms": request_latency_ms}, source)


def check_physics(v: dict[str, Any]) -> dict[str, Any]:
    """Validate a study file's ``physics`` mapping (a pydantic validator; ValueError in one line)."""
    unknown = sorted(set(v) - set(PHYSICS_KEYS))
    if unknown:
        raise ValueError(f"unknown physics parameter {unknown[0]!r}; known: {', '.join(sorted(PHYSICS_KEYS))}")
    try:
        physics_settings(v).physics_options()
    except (CalibError, TypeError) as exc:  # TypeError: e.g. a list where a name belongs
        raise ValueError(str(exc)) from None
    return v


class LoadedData(Strict):
    """Where the loaded-server runs are and how they are replayed (shared by the loaded-server studies).

    ``data_dir``: the folder of runs; relative to the current folder; default
    ``$CALIB_DATA/batched``.  ``runs``: run folder names (default all).
    ``output_rule``, ``prefix``, ``cached_prefill_pi``, ``max_steps``: see
    :mod:`calib.data.traces` and :mod:`calib.replay.batched`.  ``hardware``:
    the hardware of every replay.  ``scatter_points``: per-request samples
    kept per run for the scatter plots.
    """

    data_dir: str | None = None
    runs: list[str] | None = None
    output_rule: Literal["profile", "recorded", "exclude"] = "profile"
    prefix: Literal["auto", "groups", "profile", "none"] = "auto"
    cached_prefill_pi: Literal["cached", "zero"] = "cached"
    max_steps: int | None = Field(default=None, ge=1)
    hardware: str = "h100"
    scatter_points: int = Field(default=200, ge=10, le=5000)


# ======================================================================================= runs


def load_runs(spec: LoadedData, source: str = "") -> list[LoadedRun]:
    """The runs of ``spec`` (:func:`calib.replay.loaded.load_runs`); a bad folder or run name is a StudyError."""
    try:
        return _load_runs(spec.data_dir, spec.runs, output_rule=spec.output_rule, prefix=spec.prefix,
                          cached_prefill_pi=spec.cached_prefill_pi, max_steps=spec.max_steps)
    except CalibError as exc:
        if exc.file is None and exc.field in ("data_dir", "runs"):
            raise StudyError(exc.message, file=source or None, field=exc.field) from None
        raise


def data_label(value: str | None) -> str:
    """How the data folder is recorded in results: as given, or ``$CALIB_DATA/batched`` (never machine-specific)."""
    return "$CALIB_DATA/batched (default)" if value is None else str(value)


def output_rule_text(runs: Sequence[LoadedRun]) -> dict:
    """The output-length rule applied, per run (the trace's own words)."""
    return {rd.name: rd.trace.output_rule for rd in runs}


def settings_block(spec: LoadedData, ctx: RunContext, runs: Sequence[LoadedRun]) -> dict:
    """Settings common to the loaded-server studies (to rerun exactly)."""
    return {
        "study_file": ctx.study_file,
        "data_dir": data_label(spec.data_dir),
        "runs": [rd.name for rd in runs],
        "output_rule": spec.output_rule,
        "prefix": spec.prefix,
        "cached_prefill_pi": spec.cached_prefill_pi,
        "max_steps": spec.max_steps if spec.max_steps is not None else "default (2 x (output tokens + chunks) + 1000)",
        "hardware": spec.hardware,
        "phantom_last_step": False,
        "tpot_definition": "per request (E2E - TTFT) / (O - 1), O after the output rule; mean over requests with "
                           "a defined measured TPOT (same definition for prediction and measurement)",
        "scheduler": "vLLM-like continuous batching (calib.replay.engine): max_num_seqs, max_num_batched_tokens, "
                     "kv_blocks_total_gpu and block_size of each run; FCFS; recompute preemption",
    }


# ======================================================================================= entries


def _nan_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def run_entry(rd: LoadedRun, rep: BatchedReplay | None, calibration: str, heldout: bool, *,
              scatter_points: int = 200, note: str = "", fold: str | None = None) -> dict:
    """The per-run result entry (issue 6 layout plus per-stage detail; ``rep=None``: not replayed)."""
    t = rd.trace
    req = t.requests
    entry: dict[str, Any] = {
        "run": rd.name, "model": t.model, "tp": int(t.tp), "profile": t.profile, "group": rd.group,
        "n_requests": int(req.shape[0]), "excluded": int(t.excluded), "skipped": len(t.skipped),
        "n_short_output": int(t.n_short), "calibration": calibration, "heldout": bool(heldout),
    }
    if fold is not None:
        entry["fold"] = fold
    if rep is None:
        meas = {"ttft_mean_ms": float(req["ttft_ms"].mean()), "tpot_mean_ms": float(req["tpot_ms"].mean()),
                "e2e_mean_ms": float(req["e2e_ms"].mean()), "e2e_p90_ms": float(np.percentile(req["e2e_ms"], 90))}
        entry.update({"supported": False, "note": note, "measured": meas, "predicted": None, "ape": None})
        return _nan_to_none(entry)
    r = run_report(rep)
    entry.update({
        "supported": True,
        "measured": r["headline"]["measured"],
        "predicted": r["headline"]["predicted"],
        "ape": r["headline"]["ape"],
        "stats": r["stats"],
        "stages": [{k: s[k] for k in ("stage", "rate", "duration_s", "n", "n_compared", "measured", "predicted",
                                      "saturation", "batch")} | {"ape": s["headline"]["ape"]} for s in r["stages"]],
        "replay": r["replay"],
        "steps": r["steps"],
        "saturated_stages": r["saturated_stages"],
        "runaway_stages": r["runaway_stages"],
        "batch_profile": batch_profile(rep),
        "scatter": scatter(rep, scatter_points),
    })
    if note:
        entry["note"] = note
    entry["targets"] = targets(entry)
    entry["diagnosis"] = diagnose(entry)
    return _nan_to_none(entry)


def without_scatter(entries: Sequence[dict]) -> list[dict]:
    """Entries without their per-request scatter samples (kept only where a report plots them)."""
    return [{k: v for k, v in e.items() if k != "scatter"} for e in entries]


def targets(entry: dict) -> dict:
    """Which issue-6 targets the run meets (APE below target; no runaway stage).

    ``applies`` is false for an overloaded (reasoning) run: the targets are
    about runs whose server stayed stable.
    """
    ape = entry.get("ape") or {}
    out = {k: (ape.get(k) is not None and ape[k] < thr) for k, thr in TARGETS.items()}
    out["no_runaway"] = not entry.get("runaway_stages")
    out["all"] = all(out.values())
    out["applies"] = entry.get("group") != "overloaded"
    return out


def _interp_tpot(profile: list[dict], batch: float) -> float | None:
    pts = [(r["predicted"]["mean_batch"], r["predicted"]["mean_tpot_ms"]) for r in profile
           if r["predicted"]["n"] >= 5 and r["predicted"]["mean_batch"] is not None]
    if not pts or batch is None or not np.isfinite(batch):
        return None
    xs, ys = zip(*sorted(pts))
    return float(np.interp(batch, xs, ys))


def _mean_batch(profile: list[dict], side: str) -> float | None:
    n = sum(r[side]["n"] for r in profile)
    if not n:
        return None
    return sum(r[side]["n"] * r[side]["mean_batch"] for r in profile if r[side]["n"]) / n


def diagnose(entry: dict) -> list[str]:
    """What the remaining error of a run (and of each of its stages) is made of, in words.

    Only produced for a missed target.  The parts:

    * a *runaway* stage: the replay saturates while the server stayed stable;
    * TPOT: the step-time error at the measured batch (predicted TPOT
      interpolated at the measured mean in-flight count, against the measured
      TPOT) versus the batch-size feedback (the replay runs with a different
      number of requests in flight);
    * TTFT: the predicted queueing delay against the first step(s);
    * E2E: the shares of the TTFT error and of (O - 1) x the TPOT error.
    """
    t = entry.get("targets", {})
    if entry.get("predicted") is None or t.get("all", False) or not t.get("applies", True):
        return []
    out = []
    m, p, ape = entry["measured"], entry["predicted"], entry["ape"]
    single = len(entry["stages"]) == 1
    for s in entry["stages"]:
        sat = s["saturation"]
        where = f"stage {s['stage']} ({s['rate']:g} req/s)"
        if sat.get("runaway"):
            wait_s, growth = sat["predicted_wait_last_ms"] / 1e3, sat["predicted_wait_growth_s_per_s"]
            out.append(f"{where}: runaway — the replay saturates (mean wait of the last fifth {wait_s:.1f} s, "
                       f"growing {growth:.3f} s/s) while the server stayed stable (TTFT p50 "
                       f"{sat['measured_ttft_p50_last_ms']:.0f} ms): the "
                       f"predicted step times put the offered load past the simulated capacity "
                       f"(stage TPOT predicted {s['predicted']['tpot']['mean']:.1f} vs measured "
                       f"{s['measured']['tpot']['mean']:.1f} ms)")
        elif sat.get("saturated"):
            out.append(f"{where}: the replay saturates; the measured stage was not stable either")
        sa = s["ape"]
        missed = [k for k, thr in TARGETS.items() if sa.get(k) is not None and sa[k] >= thr]
        if missed and not sat.get("runaway") and not single:
            out.append(f"{where}: " + _tpot_ttft_text(s["measured"], s["predicted"], s["batch"]))
    missed = [k for k, thr in TARGETS.items() if ape.get(k) is not None and ape[k] >= thr]
    if missed:
        stats = entry["stats"]
        out.append("run: " + _tpot_ttft_text(stats["measured"], stats["predicted"], entry["batch_profile"]))
        d_ttft = p["ttft_mean_ms"] - m["ttft_mean_ms"]
        d_e2e = p["e2e_mean_ms"] - m["e2e_mean_ms"]
        if d_e2e and np.isfinite(d_e2e):
            share = d_ttft / d_e2e
            out.append(f"run: E2E error {d_e2e:+.0f} ms = TTFT {d_ttft:+.0f} ms ({100 * share:.0f} %) + decode "
                       f"{d_e2e - d_ttft:+.0f} ms ({100 * (1 - share):.0f} %)")
    return out


def _tpot_ttft_text(meas: dict, pred: dict, profile: list[dict]) -> str:
    parts = []
    mt, pt = meas["tpot"]["mean"], pred["tpot"]["mean"]
    bm, bp = _mean_batch(profile, "measured"), _mean_batch(profile, "predicted")
    at = _interp_tpot(profile, bm) if bm is not None else None
    if mt and pt and np.isfinite(mt) and np.isfinite(pt):
        text = f"TPOT {pt:.2f} vs {mt:.2f} ms ({100 * (pt - mt) / mt:+.0f} %)"
        if at is not None and bm is not None and bp is not None:
            text += (f"; at the measured mean of {bm:.1f} requests in flight the replay's TPOT is {at:.2f} ms "
                     f"(step-time error {100 * (at - mt) / mt:+.0f} %), the replay has {bp:.1f} in flight "
                     f"(batch feedback {100 * (pt - at) / mt:+.0f} %)")
        parts.append(text)
    parts.append(f"TTFT mean {pred['ttft']['mean']:.1f} vs {meas['ttft']['mean']:.1f} ms, p50 "
                 f"{pred['ttft']['p50']:.1f} vs {meas['ttft']['p50']:.1f} ms")
    return "; ".join(parts)


# ======================================================================================= summaries


def aggregate(entries: Sequence[dict]) -> dict:
    """Mean and median APE per headline key over the replayed runs (each run weighs 1), the worst run per
    key, the runs with a runaway stage and the target verdicts."""
    ok = [e for e in entries if e.get("ape")]
    out: dict[str, Any] = {"n_runs": len(ok), "runs": [e["run"] for e in ok]}
    if not ok:
        return out
    agg = mean_apes([e["ape"] for e in ok], APE_KEYS, over="run")
    out["aggregation"] = agg["aggregation"]
    out["mape"] = agg["mape"]
    out["median_ape"] = agg["median_ape"]
    calm = [e for e in ok if not e.get("runaway_stages")]
    out["n_runs_without_runaway"] = len(calm)
    out["mape_without_runaway"] = mean_apes([e["ape"] for e in calm], APE_KEYS, over="run")["mape"] if calm else None
    out["worst"] = {k: max(ok, key=lambda e: e["ape"][k] if e["ape"][k] is not None else -1)["run"] for k in APE_KEYS}
    out["runaway_runs"] = [e["run"] for e in ok if e.get("runaway_stages")]
    t = {k: out["mape"][k] < thr for k, thr in TARGETS.items()}
    t["no_runaway"] = not out["runaway_runs"]
    t["all"] = all(t.values())
    out["targets"] = t
    return out


def group_summaries(entries: Sequence[dict]) -> dict:
    """``{group: aggregate}`` for the dense, MoE and overloaded runs (overloaded: reported apart)."""
    return {g: aggregate([e for e in entries if e["group"] == g]) for g in GROUPS}
