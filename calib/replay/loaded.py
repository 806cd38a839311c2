"""Loaded-server replay: a folder of runs under real load -> replays under a Settings -> per-run / per-stage figures.

The engine-facing part (a trace's engine inputs, one replay of them) is
:mod:`calib.replay.batched`; this module is everything around it:

* **where the runs are** (:func:`resolve_data_dir`): a folder given
  explicitly (a relative path is taken from the current folder), else
  ``$CALIB_DATA/batched`` (or ``$CALIB_DATA`` itself when it holds the runs),
  else the shipped dataset (the 16 runs of ``data/batched`` in calib's own
  format, :func:`calib.data.runs.shipped_dir`); nothing is guessed from where
  calib's source is;
* **runs** (:class:`LoadedRun`, :func:`load_run`, :func:`load_runs`): a trace
  bound to its engine inputs, grouped ``dense``, ``moe`` (mixture-of-experts
  model) or ``overloaded`` (a *reasoning* run, whose real server queue grew
  without bound).  A run folder is calib's own format (``run.yaml`` +
  ``requests.csv.gz``, :mod:`calib.data.runs`, written by ``calib import``) or
  an inference-perf folder (``requests.json``...);
* **replay under a** :class:`~calib.settings.Settings` (:func:`replay_run`):
  the physics (variant, switches, constants, hardware), the overhead model
  and the client-side request latency of the settings; step models are
  cached (:func:`step_model`);
* **statistics** of a replay, measured against predicted over the same
  requests (:meth:`BatchedReplay.summary`): per run and per load stage
  (:func:`run_report`, :func:`stage_means`), queue saturation
  (:func:`saturation`), TPOT by batch (:func:`batch_profile`), per-step
  records (:func:`step_summary`), samples for a scatter plot (:func:`scatter`);
* **estimator rows** (:func:`load_stages`): one row per load stage of every
  run, with its measured means (``X`` of
  :class:`~calib.estimators.loaded.LoadedRegressor`).

Which settings apply
--------------------
A loaded replay is always like with like: no phantom last step, and TPOT per
request ``(E2E - TTFT) / (O - 1)`` on both sides (``data/README.md``), with
the request lengths of the trace.  So ``replay.mode``, ``replay.lengths`` and
``replay.seed`` do not apply, and an explicit ``phantom_last_step=True`` or
``tpot_definition="guidellm"`` is an error (:func:`check_settings`).

Saturation
----------
A load stage *saturates* in the replay when its simulated queue grows without
bound: the mean predicted queueing delay (admission - arrival) of the stage's
last fifth of requests exceeds :data:`SATURATION_WAIT_MS` and has grown by more
than :data:`SATURATION_GROWTH` seconds per second of the stage since its first
fifth (or some of the last fifth never started).  The measured stage is
*stable* when its TTFT p50 over the last fifth is below :data:`STABLE_TTFT_MS`
and below 3x that of the first fifth.  A *runaway* is a saturated replay of a
stable stage: the prediction is then unusable for that stage, whatever its
mean error.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from calib.data.runs import RunInfo, is_run_folder, list_run_folders, read_run, shipped_dir
from calib.data.traces import DEFAULT_OUTPUT_RULE, Trace, load_trace
from calib.errors import ConfigError, DataError
from calib.metrics import METRICS, ape_block, stats
from calib.physics.options import PhysicsOptions
from calib.physics.step_model import StepModel
from calib.replay.batched import BatchedReplay, BatchedRun, mean_inflight, window_trace
from calib.settings import Settings

__all__ = [
    "GROUPS",
    "SATURATION_WAIT_MS",
    "SATURATION_GROWTH",
    "STABLE_TTFT_MS",
    "STAGE_COLUMNS",
    "LoadedRun",
    "resolve_data_dir",
    "run_group",
    "load_run",
    "load_runs",
    "supports",
    "step_model",
    "describe_physics",
    "check_settings",
    "replay_run",
    "inflight",
    "saturation",
    "batch_profile",
    "scatter",
    "step_summary",
    "run_report",
    "stage_means",
    "load_stages",
]

#: Run groups: accuracy figures (dense), mixture-of-experts models, overloaded (reasoning) runs.
GROUPS = ("dense", "moe", "overloaded")
#: A stage saturates when its last fifth waits longer than this (ms) on average ...
SATURATION_WAIT_MS = 1000.0
#: ... and the mean wait grew by more than this many seconds per second of the stage.
SATURATION_GROWTH = 0.005
#: A measured stage is stable when its last-fifth TTFT p50 stays below this (ms) ...
STABLE_TTFT_MS = 1000.0
#: Columns of :func:`load_stages`.
STAGE_COLUMNS = ("run", "stage", "model", "tp", "profile", "group", "rate", "duration_s", "n_requests", "n_tpot",
                 "ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms", "e2e_p90_ms", "output_rule", "window_s", "source")

# ======================================================================================= runs


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder of loaded-server runs.

    ``data_dir`` when given (relative: from the current folder); else, when the
    environment variable ``CALIB_DATA`` is set, ``$CALIB_DATA/batched`` — or
    ``$CALIB_DATA`` itself when that holds the runs (a folder ``calib import``
    wrote); else the shipped dataset (:func:`calib.data.runs.shipped_dir`).

    Raises
    ------
    DataError
        The folder does not exist or holds no run (no sub-folder with
        ``run.yaml`` + ``requests.csv.gz`` or ``requests.json``).

    Examples
    --------
    >>> resolve_data_dir("/nowhere/batched")
    Traceback (most recent call last):
    ...
    calib.errors.DataError: data_dir: loaded-server data folder /nowhere/batched not found
    """
    from calib.resources import DATA_ENV

    if (data_dir is None or str(data_dir) == "") and os.environ.get(DATA_ENV, ""):
        root = Path(os.path.abspath(Path(os.environ[DATA_ENV]).expanduser()))
        for cand in (root / "batched", root):
            if cand.is_dir() and list_run_folders(cand):
                return cand
        raise DataError(f"no run in {root / 'batched'} nor in {root} (${DATA_ENV})", field="data_dir")
    if data_dir is None or str(data_dir) == "":
        return shipped_dir()
    path = Path(os.path.abspath(Path(data_dir).expanduser()))
    if not path.is_dir():
        raise DataError(f"loaded-server data folder {path} not found", field="data_dir")
    if not list_run_folders(path):
        raise DataError(f"no run (folder with run.yaml or requests.json) in {path}", field="data_dir")
    return path


@dataclass
class LoadedRun:
    """One loaded run, ready to replay.

    Attributes
    ----------
    name : str
        Folder name.
    trace : Trace
    run : BatchedRun
        The full trace bound to its engine inputs.
    group : {"dense", "moe", "overloaded"}
    is_moe : bool
    windows : dict
        Windowed runs already built (:meth:`windowed`).
    info : RunInfo or None
        Prefix sharing and context limit of a run in calib's format (``None``: an inference-perf
        folder, whose files the replay reads itself).
    """

    name: str
    trace: Trace
    run: BatchedRun
    group: str
    is_moe: bool
    windows: dict = field(default_factory=dict, repr=False)
    info: RunInfo | None = field(default=None, repr=False)

    @property
    def model(self) -> str:
        return self.trace.model

    def windowed(self, window_s: float | None) -> BatchedRun:
        """The full run, or its first ``window_s`` s of every stage (:func:`~calib.replay.batched.window_trace`).

        A window's requests keep the prefix lengths and groups the full run gave them (a window may be too
        short to show the prompts the run repeats).
        """
        if window_s is None:
            return self.run
        key = float(window_s)
        run = self.windows.get(key)
        if run is None:
            trace = window_trace(self.trace, key)
            full = self.run.inputs()
            rows = pd.Index(self.trace.requests["request_index"].to_numpy()).get_indexer(
                trace.requests["request_index"].to_numpy())
            opts = {**self.run.options, "record_steps": False, "prefix_tokens": full.prefix_tokens[rows],
                    "prefix_group": full.prefix_group[rows]}
            run = _GivenPrefixRun(trace, full.prefix_source, **opts)
            self.windows[key] = run
        return run


def run_group(trace: Trace, is_moe: bool) -> str:
    """``overloaded`` for a reasoning run, else ``moe`` or ``dense``."""
    return "overloaded" if trace.overloaded else ("moe" if is_moe else "dense")


class _GivenPrefixRun(BatchedRun):
    """A :class:`BatchedRun` whose prefix arrays were derived here: its inputs name where they came from."""

    def __init__(self, trace: Trace, prefix_source: str, **input_options: Any):
        super().__init__(trace, **input_options)
        self._prefix_source = prefix_source

    def inputs(self, model_max_context: int = 0):
        from dataclasses import replace

        return replace(super().inputs(model_max_context), prefix_source=self._prefix_source)


def _given_prefix_run(trace: Trace, info: RunInfo, *, prefix: str = "auto", **options: Any) -> BatchedRun:
    """The engine binding of a calib-format trace: its prefix arrays and context limit from ``info``.

    The rule of :func:`calib.replay.prefix.prefix_arrays`, as for an inference-perf folder's files
    (:func:`calib.replay.batched.replay_inputs`).
    """
    from calib.replay.prefix import PREFIX_MODES, prefix_arrays

    if prefix not in PREFIX_MODES:
        raise ConfigError(f"unknown prefix mode {prefix!r}; choose one of {', '.join(PREFIX_MODES)}", field="prefix")
    opts: dict[str, Any] = dict(options)
    if info.max_model_len is not None:
        opts["max_model_len"] = int(info.max_model_len)
    req = trace.requests
    labels = req["prefix_group"].astype(str).to_numpy() if "prefix_group" in req.columns else None
    p = info.prefix
    pre, grp, source = prefix_arrays(prefix, request_index=req["request_index"].to_numpy(),
                                     input_tokens=req["input_tokens"].to_numpy(np.int64), labels=labels,
                                     group_prompt_len=p.group_prompt_len, shared_prompt_len=p.shared_prompt_len,
                                     shared_prompts=p.shared_prompts, source=trace.source)
    if not (grp >= 0).any():
        return BatchedRun(trace, prefix="none", **opts)
    return _GivenPrefixRun(trace, source, prefix=prefix, prefix_tokens=pre, prefix_group=grp, **opts)


def load_run(folder: str | os.PathLike, *, output_rule: str = DEFAULT_OUTPUT_RULE, prefix: str = "auto",
             cached_prefill_pi: str = "cached", max_steps: int | None = None, async_scheduling: bool = True
             ) -> LoadedRun:
    """Load one run folder and bind it to its engine options.

    ``folder`` is a run in calib's format (:func:`calib.data.runs.read_run`: ``run.yaml`` +
    ``requests.csv.gz``) or an inference-perf folder (:func:`~calib.data.traces.load_trace`).
    """
    from calib.specs import load_model

    folder = Path(folder)
    info = None
    if is_run_folder(folder):
        trace, info = read_run(folder, output_rule=output_rule)
        run = _given_prefix_run(trace, info, prefix=prefix, cached_prefill_pi=cached_prefill_pi, max_steps=max_steps,
                                async_scheduling=async_scheduling)
    else:
        trace = load_trace(folder, output_rule=output_rule)
        run = BatchedRun(trace, prefix=prefix, cached_prefill_pi=cached_prefill_pi, max_steps=max_steps,
                         async_scheduling=async_scheduling)
    moe = load_model(trace.model).is_moe
    return LoadedRun(folder.name, trace, run, run_group(trace, moe), moe, info=info)


def load_runs(data_dir: str | os.PathLike | None = None, runs: Sequence[str] | None = None, **options: Any
              ) -> list[LoadedRun]:
    """The runs of a folder (all, or ``runs``), sorted by name; ``options`` as :func:`load_run`.

    Raises
    ------
    DataError
        The folder is missing or empty (:func:`resolve_data_dir`), or ``runs`` names an unknown run.
    """
    root = resolve_data_dir(data_dir)
    folders = list_run_folders(root)
    if runs is not None:
        by_name = {p.name: p for p in folders}
        unknown = [r for r in runs if r not in by_name]
        if unknown:
            raise DataError(f"unknown run {unknown[0]!r} in {root}", field="runs")
        folders = [by_name[r] for r in sorted(set(runs))]
    return [load_run(f, **options) for f in folders]


# ======================================================================================= physics


#: Step-model variants that time a mixture-of-experts model.
MOE_VARIANTS = ("v3", "v4")


def supports(model_name: str, variant: str) -> tuple[bool, str]:
    """Whether the step model ``variant`` can time ``model_name`` (a mixture-of-experts model needs v3 or v4).

    >>> supports("llama-2-7b-hf", "v2.3")
    (True, '')
    """
    from calib.specs import load_model

    m = load_model(model_name)
    if m.is_moe and variant not in MOE_VARIANTS:
        return False, (f"{model_name} is a mixture-of-experts model ({m.num_experts} experts, {m.experts_per_token} "
                       f"per token); the {variant} roofline has no MoE support (only v3, spec §5.3, and v4 do)")
    return True, ""


_STEP_MODELS: dict[tuple, StepModel] = {}


def step_model(model: str, tp: int, options: PhysicsOptions, hardware: str = "h100") -> StepModel:
    """A step model, cached per ``(model, tp, options, hardware)`` (its fast-step caches are reused)."""
    key = (model, int(tp), options, hardware)
    sm = _STEP_MODELS.get(key)
    if sm is None:
        if len(_STEP_MODELS) > 64:
            _STEP_MODELS.clear()
        sm = StepModel.build(model, int(tp), hardware=hardware, options=options)
        _STEP_MODELS[key] = sm
    return sm


def describe_physics(options: PhysicsOptions) -> dict[str, Any]:
    """The options as a JSON-ready dict: the variant and what differs from the variant's defaults.

    >>> describe_physics(PhysicsOptions.for_variant("v2.3", bw_efficiency=0.82))
    {'variant': 'v2.3', 'bw_efficiency': 0.82}
    """
    from dataclasses import fields

    base = PhysicsOptions.for_variant(options.variant)
    out: dict[str, Any] = {"variant": options.variant}
    for k in sorted(f.name for f in fields(PhysicsOptions) if f.name != "variant"):
        v = getattr(options, k)
        if v != getattr(base, k):
            out[k] = v
    return out


# ======================================================================================= replay


def check_settings(settings: Settings) -> None:
    """Refuse replay settings a loaded replay cannot honour (module docstring).

    >>> check_settings(Settings.from_params({"phantom_last_step": True}))
    Traceback (most recent call last):
    ...
    calib.errors.ConfigError: replay.phantom_last_step: a loaded replay has no phantom last step (vLLM has none)
    """
    rp = settings.replay
    if rp.phantom_last_step:
        raise ConfigError("a loaded replay has no phantom last step (vLLM has none)", field="replay.phantom_last_step")
    if rp.tpot_definition not in (None, "itl"):
        raise ConfigError(f"a loaded replay compares TPOT per request, (E2E - TTFT) / (O - 1) (itl), not "
                          f"{rp.tpot_definition!r}", field="replay.tpot_definition")


def replay_run(run: LoadedRun, settings: Settings, *, window_s: float | None = None, record_steps: bool = True
               ) -> BatchedReplay:
    """Replay one run (the full trace, or its first ``window_s`` s of every stage) under ``settings``.

    Uses the settings' physics (on ``settings.physics.hardware``), overhead
    model, client latencies and ``cpu_overlap``; a windowed replay records no steps.

    Raises
    ------
    ConfigError
        The variant cannot time the run's model (:func:`supports`) or the
        settings ask for what a loaded replay cannot do (:func:`check_settings`).
    """
    check_settings(settings)
    options = settings.physics_options()
    ok, why = supports(run.model, options.variant)
    if not ok:
        raise ConfigError(f"run {run.name}: {why}", field="physics.variant")
    sm = step_model(run.model, run.trace.tp, options, settings.physics.hardware)
    return run.windowed(window_s).run(sm, settings.overhead_model(),
                                      record_steps=record_steps if window_s is None else False,
                                      request_latency_ms=settings.replay.request_latency_ms,
                                      input_token_latency_us=settings.replay.input_token_latency_us,
                                      cpu_overlap=settings.replay.cpu_overlap)


# ======================================================================================= statistics


def inflight(rep: BatchedReplay) -> dict[str, np.ndarray]:
    """Mean requests in flight during each request's decode phase, measured and predicted.

    A request is in flight from arrival to completion (measured: arrival +
    E2E; predicted: the replay's).  The mean over ``[arrival + TTFT,
    arrival + E2E]`` approximates the decode batch the request ran in.
    """
    arr = rep.trace.requests["arrival_us"].to_numpy(float) / 1e3
    out = {}
    for key, side in (("measured", rep.measured), ("predicted", rep.predicted)):
        end = arr + side["e2e"]
        out[key] = mean_inflight(arr, end, arr + side["ttft"], end)
    return out


def saturation(rep: BatchedReplay, sel: np.ndarray) -> dict:
    """Queue-growth diagnosis of the requests ``sel`` (one stage); see the module docstring."""
    idx = np.flatnonzero(sel)
    out = {"saturated": False, "measured_stable": True, "runaway": False}
    if len(idx) < 10:
        return out
    fifth = max(len(idx) // 5, 1)
    first, last = idx[:fifth], idx[-fifth:]
    arr_s = rep.trace.requests["arrival_us"].to_numpy(float) / 1e6
    wait = rep.wait_ms
    unfinished = ~np.isfinite(rep.e2e_ms) & ~rep.rejected
    w_first = float(np.nanmean(wait[first])) if np.isfinite(wait[first]).any() else float("nan")
    w_last = float(np.nanmean(wait[last])) if np.isfinite(wait[last]).any() else float("inf")
    span = float(arr_s[last].mean() - arr_s[first].mean()) or 1.0
    growth = (w_last - (w_first if np.isfinite(w_first) else 0.0)) / 1e3 / span
    never_started = bool(unfinished[last].any())
    meas_ttft = rep.measured["ttft"]
    m_first, m_last = float(np.median(meas_ttft[first])), float(np.median(meas_ttft[last]))
    saturated = never_started or (w_last > SATURATION_WAIT_MS and growth > SATURATION_GROWTH)
    stable = m_last < STABLE_TTFT_MS and m_last < 3.0 * max(m_first, 1e-9)
    ttft_last = rep.ttft_ms[last]
    out.update({
        "saturated": bool(saturated),
        "measured_stable": bool(stable),
        "runaway": bool(saturated and stable),
        "predicted_wait_first_ms": w_first,
        "predicted_wait_last_ms": w_last,
        "predicted_wait_growth_s_per_s": growth,
        "predicted_ttft_p50_last_ms": float(np.nanmedian(ttft_last)) if np.isfinite(ttft_last).any()
        else float("nan"),
        "measured_ttft_p50_first_ms": m_first,
        "measured_ttft_p50_last_ms": m_last,
    })
    return out


def batch_profile(rep: BatchedReplay, sel: np.ndarray | None = None,
                  edges: Sequence[float] = (0, 4, 8, 16, 24, 32, 48, 64, 96, 128, 1e9)) -> list[dict]:
    """Measured and predicted mean TPOT by mean in-flight batch (bins of :func:`inflight`)."""
    sel = np.ones(rep.n, bool) if sel is None else np.asarray(sel, bool)
    infl = inflight(rep)
    meas_tpot, pred_tpot = rep.measured["tpot"], rep.tpot_ms
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        row = {"batch_from": float(lo), "batch_to": float(hi) if hi < 1e8 else None}
        for key, tpot in (("measured", meas_tpot), ("predicted", pred_tpot)):
            b = infl[key]
            m = sel & np.isfinite(b) & np.isfinite(tpot) & (b >= lo) & (b < hi)
            row[key] = {"n": int(m.sum()), "mean_batch": float(b[m].mean()) if m.any() else None,
                        "mean_tpot_ms": float(tpot[m].mean()) if m.any() else None}
        if row["measured"]["n"] or row["predicted"]["n"]:
            rows.append(row)
    return rows


def scatter(rep: BatchedReplay, max_points: int = 200) -> dict:
    """Every k-th request's measured and predicted E2E and TTFT (ms, 0.1 ms), k = ceil(n / max_points)."""
    k = max(1, math.ceil(rep.n / max_points))
    idx = np.arange(0, rep.n, k)
    meas = rep.measured

    def r(a):
        return [None if not np.isfinite(x) else round(float(x), 1) for x in a[idx]]

    return {"every": k, "measured_e2e_ms": r(meas["e2e"]), "predicted_e2e_ms": r(rep.e2e_ms),
            "measured_ttft_ms": r(meas["ttft"]), "predicted_ttft_ms": r(rep.ttft_ms),
            "stage": rep.trace.requests["stage"].to_numpy()[idx].tolist()}


def step_summary(steps: dict, bins: Sequence[int] = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256)) -> dict:
    """Per-step records -> counts and mean durations of pure-decode steps by batch size, and token totals.

    Returns ``{"n_steps", "n_decode_only", "n_mixed", "n_prefill_only", "busy_s", "batch_size": stats, ...,
    "decode_only_by_batch": [{"batch_from", "batch_to", "n_steps", "mean_batch", "mean_duration_ms"}]}``
    (``{"n_steps": 0}`` without records).
    """
    if not steps or len(steps.get("duration_us", [])) == 0:
        return {"n_steps": 0}
    dur = np.asarray(steps["duration_us"], float)
    bsz = np.asarray(steps["batch_size"], np.int64)
    ptok = np.asarray(steps["prefill_tokens"], np.int64)
    dtok = np.asarray(steps["decode_tokens"], np.int64)
    dec_only = (ptok == 0) & (dtok > 0)
    pre_only = (ptok > 0) & (dtok == 0)
    mixed = (ptok > 0) & (dtok > 0)
    rows = []
    edges = list(bins)
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = dec_only & (dtok >= lo) & (dtok < hi)
        if sel.any():
            rows.append({"batch_from": int(lo), "batch_to": int(hi - 1), "n_steps": int(sel.sum()),
                         "mean_batch": float(dtok[sel].mean()), "mean_duration_ms": float(dur[sel].mean() / 1e3)})
    return {
        "n_steps": int(len(dur)),
        "n_decode_only": int(dec_only.sum()),
        "n_mixed": int(mixed.sum()),
        "n_prefill_only": int(pre_only.sum()),
        "busy_s": float(dur.sum() / 1e6),
        "batch_size": stats(bsz),
        "prefill_tokens_per_prefill_step": stats(ptok[ptok > 0]),
        "decode_only_duration_ms": stats(dur[dec_only] / 1e3),
        "mixed_duration_ms": stats(dur[mixed] / 1e3),
        "decode_only_by_batch": rows,
    }


def run_report(rep: BatchedReplay) -> dict:
    """Run-level and per-stage statistics, APEs, saturation and replay counters (JSON-ready).

    ``headline`` and every stage's ``headline`` are :func:`calib.metrics.ape_block` of that unit's
    requests (the run's APE is of the run's statistics, not a mean of its stages').
    """
    whole = rep.summary()
    st_out = []
    for k, (mask, stage) in enumerate(zip(rep.stage_masks(), rep.trace.stages)):
        s = rep.summary(mask)
        s.update({"stage": k, "rate": stage.rate, "duration_s": stage.duration_s})
        s["headline"] = ape_block(s["predicted"], s["measured"])
        s["saturation"] = saturation(rep, mask)
        s["batch"] = batch_profile(rep, mask)
        st_out.append(s)
    inputs = rep.inputs
    return {
        "n_requests": rep.n,
        "headline": ape_block(whole["predicted"], whole["measured"]),
        "stats": {"measured": whole["measured"], "predicted": whole["predicted"], "n_compared": whole["n_compared"],
                  "n_tpot": whole["n_tpot"]},
        "stages": st_out,
        "replay": {"n_steps": rep.n_steps, "n_preemptions": rep.n_preemptions, "hit_step_cap": rep.hit_step_cap,
                   "step_cap": inputs.scheduler.max_steps, "rejected_context": int(inputs.context_rejected.sum()),
                   "rejected_kv": int((rep.rejected & ~inputs.context_rejected).sum()),
                   "unfinished": rep.n_unfinished, "max_model_len": inputs.max_model_len,
                   "prefix": inputs.prefix_source, "cached_prefill_pi": inputs.scheduler.cached_prefill_pi,
                   "async_scheduling": inputs.scheduler.async_scheduling},
        "steps": step_summary(rep.steps),
        "saturated_stages": [s["stage"] for s in st_out if s["saturation"]["saturated"]],
        "runaway_stages": [s["stage"] for s in st_out if s["saturation"]["runaway"]],
    }


def stage_means(rep: BatchedReplay) -> pd.DataFrame:
    """Predicted means per load stage (one row per stage of the replayed trace).

    Columns ``ttft``, ``tpot``, ``e2e`` (predicted means, ms, over the
    requests the replay finished; TPOT over those whose measured TPOT is
    defined), ``n_compared`` (requests finished), ``saturated`` and
    ``runaway`` (:func:`saturation`), ``input_mean`` (mean input tokens of the requests compared on
    TTFT and E2E: what a per-input-token client latency adds to those means, per token).
    """
    rows = []
    inp = np.asarray(rep.inputs.input_tokens, dtype=np.float64)
    for k, mask in enumerate(rep.stage_masks()):
        s = rep.summary(mask)
        sat = saturation(rep, mask)
        done = rep.compared(mask)["e2e"]
        rows.append({"stage": k, **{m: s["predicted"][m]["mean"] for m in METRICS}, "n_compared": s["n_compared"],
                     "saturated": sat["saturated"], "runaway": sat["runaway"],
                     "input_mean": float(inp[done].mean()) if done.any() else float("nan")})
    return pd.DataFrame(rows).set_index("stage")


# ======================================================================================= estimator rows


def _stage_rows(lr: LoadedRun, trace: Trace, window_s: float | None) -> tuple[list[dict], list[dict]]:
    req = trace.requests
    rows, skipped = [], []
    st = req["stage"].to_numpy()
    for k, stage in enumerate(trace.stages):
        sel = st == k
        key = f"{lr.name}:{k}"
        ttft, e2e, tpot = (req[c].to_numpy(float)[sel] for c in ("ttft_ms", "e2e_ms", "tpot_ms"))
        tpot = tpot[np.isfinite(tpot)]
        if not sel.any() or not tpot.size:
            skipped.append({"row": key, "reason": "no request" if not sel.any() else "no request with a TPOT"})
            continue
        rows.append({"key": key, "run": lr.name, "stage": k, "model": trace.model, "tp": int(trace.tp),
                     "profile": trace.profile, "group": lr.group, "rate": float(stage.rate),
                     "duration_s": float(stage.duration_s), "n_requests": int(sel.sum()), "n_tpot": int(tpot.size),
                     "ttft_mean_ms": float(ttft.mean()), "tpot_mean_ms": float(tpot.mean()),
                     "e2e_mean_ms": float(e2e.mean()), "e2e_p90_ms": float(np.percentile(e2e, 90)),
                     "output_rule": trace.output_rule_name,
                     "window_s": float(window_s) if window_s is not None else float("nan"),
                     "source": trace.source})
    return rows, skipped


def load_stages(data_dir: str | os.PathLike | None = None, runs: Sequence[str] | None = None, *,
                window_s: float | None = None, output_rule: str = DEFAULT_OUTPUT_RULE) -> pd.DataFrame:
    """One row per load stage of every run of a folder: the ``X`` of :class:`~calib.estimators.LoadedRegressor`.

    The measured means are over the stage's requests (after the output rule;
    TPOT per request = (E2E - TTFT) / (O - 1), over the requests where it is
    defined, ``data/README.md``).  With ``window_s`` only the first
    ``window_s`` seconds of every stage are kept (the rows then describe the
    windowed trace, which is also what the estimator replays).

    Parameters
    ----------
    data_dir : str or path-like, optional
        Folder of runs (default ``$CALIB_DATA/batched``, else the shipped dataset; :func:`resolve_data_dir`).
    runs : sequence of str, optional
        Run folder names (default: all).
    window_s : float, optional
        Keep the first ``window_s`` seconds of every stage.
    output_rule : {"profile", "recorded", "exclude"}
        Output-length rule of :func:`~calib.data.traces.load_trace`.

    Returns
    -------
    pandas.DataFrame
        Index ``"<run>:<stage>"``; columns :data:`STAGE_COLUMNS` (``source``:
        the run folder; ``window_s`` NaN for full stages).  A stage without a
        request, or without a request whose TPOT is defined, cannot be
        compared: it is left out and listed in ``X.attrs["skipped"]``
        (``[{"row", "reason"}]``).

    Examples
    --------
    >>> X = load_stages("data/batched", ["20260218-155500-codellama-34b-tp2-roleplay"],
    ...                 window_s=20)  # doctest: +SKIP
    >>> X[["stage", "rate", "n_requests"]].values.tolist()  # doctest: +SKIP
    [[0, 5.0, 100], [1, 10.0, 200]]
    """
    rows, skipped = [], []
    for lr in load_runs(data_dir, runs, output_rule=output_rule):
        trace = lr.trace if window_s is None else window_trace(lr.trace, window_s)
        r, s = _stage_rows(lr, trace, window_s)
        rows += r
        skipped += s
    if not rows:
        raise DataError("no load stage to compare" + (f" ({len(skipped)} without requests)" if skipped else ""),
                        field="runs")
    X = pd.DataFrame(rows).set_index("key")
    X.index.name = None
    X = X[list(STAGE_COLUMNS)]
    X.attrs["skipped"] = skipped
    return X

