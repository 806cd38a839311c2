"""Loaded-server replay, engine side: a :class:`~calib.data.traces.Trace` through the continuous-batching engine.

This module turns a trace of a run under real load (``data/batched/``) into
engine inputs (:func:`replay_inputs`) and replays them with a step model and
an overhead model (:class:`BatchedRun`, :func:`calib.replay.engine.run_engine`)
into per-request predicted times (:class:`BatchedReplay`).  Folders of runs,
replays under a :class:`~calib.settings.Settings` and the per-run and
per-stage statistics are :mod:`calib.replay.loaded`.

What the replay assumes
-----------------------
* **Scheduler** (vLLM 0.15, V1 engine): the run's ``max_num_seqs``,
  ``max_num_batched_tokens`` (chunked prefill), ``kv_blocks_total_gpu`` and
  ``block_size``; FCFS admission, recompute preemption (all inside the engine).
  The last step is *not* counted twice (no phantom step: that was a reference
  simulator bug, not vLLM behaviour).
* **Prefix cache** (:data:`~calib.replay.prefix.PREFIX_MODES`, module
  :mod:`calib.replay.prefix`): vLLM caches full 16-token blocks of every
  prompt.  ``"auto"`` (default) uses ``requests.json``'s ``prefix_group``
  labels when some request has one (in every shipped run they are empty),
  else the prompts the load generator sends over and over (every shipped run
  cycles through 100 prompts: a repeat is served whole from the cache, as long
  as the engine has not evicted it), else the profile's shared system prompts
  (``data.shared_prefix.system_prompt_len`` tokens among
  ``num_unique_system_prompts``, assigned round robin).  ``"none"`` disables
  prefix caching.
* **First step of a cached request**: ``cached_prefill_pi="cached"`` (default)
  charges the cached prefix as KV already present (attention context and KV
  reads), which is what vLLM computes; ``"zero"`` is the reference simulator's
  choice (spec §2).
* **Async scheduling** (``async_scheduling``, default on): vLLM schedules
  step ``N + 1`` while step ``N`` runs (its default from vLLM 0.14; the
  shipped runs are vLLM 0.15.1), so a request arriving during a step joins
  the step after next, unless the engine is idle.  The measured TTFT of the
  shipped runs shows it: after the first 100 requests (served from the prefix
  cache, a one-token prefill) it is about 2.9 engine steps plus 5 ms for every
  model (Llama-2-7B ~25 ms, CodeLlama-34B ~45 ms, Llama-2-70B ~54 ms), where
  joining the next step would give 1.5 steps.
* **Output length**: the trace's output-length rule (``Trace.output_rule``,
  default ``profile``: a recorded count below 0.9 x the profile's fixed length
  is replaced by that length).  A request with 0 output tokens is replayed as
  producing 1.
* **Rejections** (counted, never replayed): a request whose prompt plus
  output exceeds the server's ``max_model_len`` (``exp-config.yaml``; else the
  model's ``max_position_embeddings``), as vLLM's API rejects it, and a
  request that can never fit in the KV cache (rejected by the engine).
* **Client-side latency** (optional, ``request_latency_ms``, default 0): the
  measured TTFT and E2E are client-side (inference-perf): they include the
  HTTP round trip, the API server's tokenization and scheduling hand-off and
  the streaming of the first token, none of which occupies the engine.  A
  constant per-request latency can be added to the predicted TTFT and E2E; it
  changes neither TPOT nor the simulated schedule.
* **Step cap**: ``2 x (sum of output tokens + prefill chunks) + 1000`` steps by
  default (a replay without preemption needs at most half of that); a replay
  that reaches it stops, marks the unfinished requests and says so
  (``hit_step_cap``).

Per request: TTFT, E2E and TPOT = (E2E - TTFT) / (O - 1) in ms (the same
definition for prediction and measurement; the measured one from
``ground_truth.json`` and the output rule, see ``data/README.md``).
:meth:`BatchedReplay.summary` compares both sides over the same requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from calib.data.traces import Stage, Trace
from calib.errors import ConfigError, DataError
from calib.metrics import METRICS, client_ms, stats
from calib.physics.overhead import OverheadModel
from calib.physics.step_model import StepModel
from calib.replay.engine import EngineResult, SchedulerConfig, StepTimer, run_engine
from calib.replay.prefix import PREFIX_MODES, prefix_arrays

__all__ = [
    "PREFIX_MODES",
    "ReplayInputs",
    "BatchedReplay",
    "BatchedRun",
    "check_requests",
    "replay_inputs",
    "replay_requests",
    "window_trace",
    "mean_inflight",
    "default_step_cap",
    "frame",
]



# ---------------------------------------------------------------------------------------- inputs


def check_requests(arrival_us, input_tokens, output_tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate per-request arrays; return them as int64 arrays.

    Raises
    ------
    DataError
        Different lengths, no request, a negative or unsorted arrival, a
        non-integer value, an input of fewer than 1 token or a negative output.

    Examples
    --------
    >>> [a.tolist() for a in check_requests([0, 5], [3, 4], [2, 0])]
    [[0, 5], [3, 4], [2, 0]]
    >>> check_requests([5, 0], [3, 4], [2, 2])
    Traceback (most recent call last):
    ...
    calib.errors.DataError: arrival_us: arrivals not sorted: request 1 arrives at 0 us, before request 0 (5 us)
    """
    arrays = []
    for values, name in ((arrival_us, "arrival_us"), (input_tokens, "input_tokens"), (output_tokens, "output_tokens")):
        arr = np.asarray(values)
        if arr.ndim != 1:
            raise DataError("must be a 1-d array", field=name)
        if arr.size and arr.dtype.kind not in "iu":
            f = arr.astype(np.float64)
            if not np.all(np.isfinite(f)) or np.any(f != np.round(f)):
                raise DataError("must hold whole numbers", field=name)
        arrays.append(arr.astype(np.int64))
    arrival, inp, out = arrays
    if not (len(arrival) == len(inp) == len(out)):
        raise DataError(f"lengths differ: {len(arrival)} arrivals, {len(inp)} inputs, {len(out)} outputs",
                        field="requests")
    if len(arrival) == 0:
        raise DataError("no request", field="requests")
    if arrival.min() < 0:
        i = int(np.argmin(arrival))
        raise DataError(f"negative arrival time {arrival[i]} us (request {i})", field="arrival_us")
    back = np.flatnonzero(np.diff(arrival) < 0)
    if back.size:
        i = int(back[0]) + 1
        raise DataError(f"arrivals not sorted: request {i} arrives at {arrival[i]} us, before request {i - 1} "
                        f"({arrival[i - 1]} us)", field="arrival_us")
    if inp.min() < 1:
        i = int(np.argmin(inp))
        raise DataError(f"request {i} has {inp[i]} input tokens (needs >= 1)", field="input_tokens")
    if out.min() < 0:
        i = int(np.argmin(out))
        raise DataError(f"request {i} has {out[i]} output tokens (needs >= 0)", field="output_tokens")
    return arrival, inp, out


def default_step_cap(input_tokens, output_tokens, max_scheduled_tokens: int) -> int:
    """Default step cap: ``2 x (sum of max(O, 1) + sum of prefill chunks) + 1000``.

    A replay without preemption never needs more than
    ``sum(max(O, 1)) + sum(ceil(I / budget))`` steps (every step makes progress
    for at least one request), so the cap only stops a replay that thrashes.

    >>> default_step_cap([100, 5000], [10, 0], 2048)
    1030
    """
    inp = np.asarray(input_tokens, dtype=np.int64)
    out = np.maximum(np.asarray(output_tokens, dtype=np.int64), 1)
    chunks = -(-inp // int(max_scheduled_tokens))
    return int(2 * (int(out.sum()) + int(chunks.sum())) + 1000)


@dataclass(frozen=True)
class ReplayInputs:
    """Everything the engine needs for one trace, built once and reused across step models.

    Attributes
    ----------
    arrival_us, input_tokens, output_tokens : numpy.ndarray
        Per trace request (the trace's order); ``output_tokens`` after the
        output rule and at least 1.
    prefix_tokens, prefix_group : numpy.ndarray
        Shared-prefix length and group id (``-1``: none) per request.
    context_rejected : numpy.ndarray of bool
        Requests rejected before the engine (prompt + output > ``max_model_len``).
    scheduler : SchedulerConfig
    max_model_len : int or None
    prefix_source : str
        Where the prefix groups came from, in words.
    """

    arrival_us: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    prefix_tokens: np.ndarray
    prefix_group: np.ndarray
    context_rejected: np.ndarray
    scheduler: SchedulerConfig
    max_model_len: int | None
    prefix_source: str

    @property
    def n(self) -> int:
        return len(self.arrival_us)


def _read_prefix_groups(trace: Trace) -> tuple[np.ndarray | None, int]:
    """``prefix_group`` labels of ``requests.json`` (aligned with the trace) and ``config.system_prompt_len``."""
    if not trace.source:
        return None, 0
    path = Path(trace.source) / "requests.json"
    if not path.is_file():
        return None, 0
    doc = json.loads(path.read_text())
    config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    sys_len = config.get("system_prompt_len", 0)
    sys_len = int(sys_len) if isinstance(sys_len, (int, float)) and not isinstance(sys_len, bool) else 0
    labels = {}
    for r in doc.get("requests", []):
        if isinstance(r, dict) and "index" in r:
            g = r.get("prefix_group")
            labels[r["index"]] = "" if g is None else str(g)
    idx = trace.requests["request_index"].tolist()
    return np.array([labels.get(i, "") for i in idx], dtype=object), sys_len


def _profile_prefix(trace: Trace) -> tuple[int, int]:
    """``(system_prompt_len, num_unique_system_prompts)`` from the run's ``profile.yaml`` (0s when absent)."""
    if not trace.source:
        return 0, 0
    path = Path(trace.source) / "profile.yaml"
    if not path.is_file():
        return 0, 0
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return 0, 0
    sp = ((doc or {}).get("data") or {}).get("shared_prefix") or {}
    length, groups = sp.get("system_prompt_len", 0), sp.get("num_unique_system_prompts", 0)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (length, groups))
    return (int(length), int(groups)) if ok else (0, 0)


def _max_model_len(trace: Trace, model_max: int) -> int | None:
    """``max_model_len`` of ``exp-config.yaml`` when present, else the model's context (``None`` if unknown)."""
    if trace.source:
        path = Path(trace.source) / "exp-config.yaml"
        if path.is_file():
            import yaml

            try:
                doc = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                doc = None
            value = doc.get("max_model_len") if isinstance(doc, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return int(value)
    return int(model_max) if model_max and model_max > 0 else None


def replay_inputs(trace: Trace, *, prefix: str = "auto", cached_prefill_pi: str = "cached",
                  async_scheduling: bool = True,
                  max_model_len: int | None = None, model_max_context: int = 0, max_steps: int | None = None,
                  record_steps: bool = True, prefix_tokens: Sequence[int] | None = None,
                  prefix_group: Sequence[int] | None = None) -> ReplayInputs:
    """Engine inputs of a trace.

    Parameters
    ----------
    trace : Trace
    prefix : {"auto", "groups", "repeats", "profile", "none"}
        Prefix-cache assumption (:mod:`calib.replay.prefix`).  Ignored when
        ``prefix_tokens``/``prefix_group`` are given.
    cached_prefill_pi : {"cached", "zero"}
        PI of the first step of a request served partly from the prefix cache.
    async_scheduling : bool
        vLLM's async scheduling (:class:`~calib.replay.engine.SchedulerConfig`; module docstring).
    max_model_len : int, optional
        Server context limit; default from ``exp-config.yaml``, else ``model_max_context``.
    model_max_context : int
        The model's ``max_position_embeddings`` (0: unknown).
    max_steps : int, optional
        Step cap (default :func:`default_step_cap`).
    record_steps : bool
        Keep the per-step records (batch size, tokens, durations).
    prefix_tokens, prefix_group : sequence of int, optional
        Explicit per-request prefix lengths and groups (tests, synthetic traces).

    Raises
    ------
    ConfigError
        Unknown ``prefix`` mode, a server setting < 1 or missing.
    DataError
        Bad per-request values (:func:`check_requests`).
    """
    if prefix not in PREFIX_MODES:
        raise ConfigError(f"unknown prefix mode {prefix!r}; choose one of {', '.join(PREFIX_MODES)}", field="prefix")
    req = trace.requests
    arrival, inp, out = check_requests(req["arrival_us"].to_numpy(), req["input_tokens"].to_numpy(),
                                       req["output_tokens"].to_numpy())
    n = len(arrival)
    for name in ("max_num_seqs", "max_num_batched_tokens", "kv_blocks", "block_size"):
        value = getattr(trace, name)
        if value is None:
            raise ConfigError(f"the trace does not give the server's {name}", field=name)
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ConfigError(f"must be an integer >= 1, got {value!r}", field=name)
    out = np.maximum(out, 1)
    if prefix_tokens is not None or prefix_group is not None:
        pre = np.zeros(n, np.int64) if prefix_tokens is None else np.asarray(prefix_tokens, np.int64)
        grp = np.full(n, -1, np.int64) if prefix_group is None else np.asarray(prefix_group, np.int64)
        if len(pre) != n or len(grp) != n:
            raise DataError(f"prefix arrays need {n} entries", field="prefix")
        if pre.size and pre.min() < 0:
            raise DataError("prefix lengths must be >= 0", field="prefix_tokens")
        source = "given per request"
    else:
        labels, cfg_len = _read_prefix_groups(trace) if prefix != "none" else (None, 0)
        prof_len, prof_groups = _profile_prefix(trace) if prefix != "none" else (0, 0)
        pre, grp, source = prefix_arrays(prefix, request_index=trace.requests["request_index"].to_numpy(),
                                         input_tokens=inp, labels=labels, group_prompt_len=cfg_len or prof_len,
                                         shared_prompt_len=prof_len, shared_prompts=prof_groups,
                                         source=trace.source)
    limit = max_model_len if max_model_len is not None else _max_model_len(trace, model_max_context)
    context_rejected = (inp + out > limit) if limit else np.zeros(n, bool)
    budget = int(trace.max_num_batched_tokens)
    cap = default_step_cap(inp, out, budget) if max_steps is None else int(max_steps)
    sched = SchedulerConfig(max_scheduled_tokens=budget, max_running=int(trace.max_num_seqs),
                            block_size=int(trace.block_size), kv_blocks=int(trace.kv_blocks),
                            prefix_cache=bool((grp >= 0).any()), cached_prefill_pi=cached_prefill_pi,
                            async_scheduling=bool(async_scheduling),
                            phantom_last_step=False, max_steps=cap, record_steps=record_steps)
    return ReplayInputs(arrival, inp, out, pre, grp, context_rejected, sched, limit, source)


# ---------------------------------------------------------------------------------------- replay


def mean_inflight(start_ms: np.ndarray, end_ms: np.ndarray, at_from: np.ndarray, at_to: np.ndarray) -> np.ndarray:
    """Mean number of requests in flight over each interval ``[at_from, at_to]``.

    A request is in flight from ``start_ms`` to ``end_ms`` (NaN: ignored); the
    result is NaN for an empty or invalid interval.

    Examples
    --------
    Two requests in flight over [0, 10] and [5, 10]: over [0, 10] the mean is 1.5.

    >>> mean_inflight(np.array([0., 5.]), np.array([10., 10.]), np.array([0.]), np.array([10.])).tolist()
    [1.5]
    """
    s = np.asarray(start_ms, float)
    e = np.asarray(end_ms, float)
    ok = np.isfinite(s) & np.isfinite(e) & (e > s)
    times = np.concatenate([s[ok], e[ok]])
    delta = np.concatenate([np.ones(ok.sum()), -np.ones(ok.sum())])
    order = np.argsort(times, kind="stable")
    times, delta = times[order], delta[order]
    level = np.cumsum(delta)  # in flight just after each event
    area = np.concatenate([[0.0], np.cumsum(level[:-1] * np.diff(times))])  # integral up to each event

    def integral(t: np.ndarray) -> np.ndarray:
        j = np.searchsorted(times, t, side="right") - 1
        jj = np.maximum(j, 0)
        val = area[jj] + level[jj] * (t - times[jj])
        return np.where(j < 0, 0.0, val)

    a = np.asarray(at_from, float)
    b = np.asarray(at_to, float)
    good = np.isfinite(a) & np.isfinite(b) & (b > a)
    out = np.full(len(a), np.nan)
    if times.size and good.any():
        out[good] = (integral(b[good]) - integral(a[good])) / (b[good] - a[good])
    return out


@dataclass
class BatchedReplay:
    """The outcome of one loaded-server replay, aligned with ``trace.requests``.

    Attributes
    ----------
    trace : Trace
    inputs : ReplayInputs
    ttft_ms, e2e_ms, tpot_ms, wait_ms : numpy.ndarray
        Predicted per request (NaN: rejected or unfinished); ``wait_ms`` is
        admission - arrival (the simulated queueing delay).
    rejected : numpy.ndarray of bool
        Rejected by the replay (context or KV capacity).
    n_steps, n_preemptions : int
    hit_step_cap : bool
    steps : dict
        Per-step records (empty unless recorded).
    """

    trace: Trace
    inputs: ReplayInputs
    ttft_ms: np.ndarray
    e2e_ms: np.ndarray
    tpot_ms: np.ndarray
    wait_ms: np.ndarray
    rejected: np.ndarray
    n_steps: int
    n_preemptions: int
    hit_step_cap: bool
    steps: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Requests of the trace (replayed or not)."""
        return int(self.trace.requests.shape[0])

    @property
    def measured(self) -> dict[str, np.ndarray]:
        """Measured ``ttft``, ``tpot``, ``e2e`` per request (ms)."""
        req = self.trace.requests
        return {"ttft": req["ttft_ms"].to_numpy(float), "tpot": req["tpot_ms"].to_numpy(float),
                "e2e": req["e2e_ms"].to_numpy(float)}

    @property
    def predicted(self) -> dict[str, np.ndarray]:
        """Predicted ``ttft``, ``tpot``, ``e2e`` per request (ms)."""
        return {"ttft": self.ttft_ms, "tpot": self.tpot_ms, "e2e": self.e2e_ms}

    @property
    def n_unfinished(self) -> int:
        """Requests neither rejected nor finished (only when the step cap was hit)."""
        return int((~self.rejected & ~np.isfinite(self.e2e_ms)).sum())

    def compared(self, sel: np.ndarray) -> dict[str, np.ndarray]:
        """Per metric, the requests of ``sel`` compared on both sides: those the replay finished (and, for
        TPOT, whose measured and predicted TPOT are defined)."""
        done = sel & np.isfinite(self.e2e_ms)
        meas_tpot = np.isfinite(self.measured["tpot"])
        return {"ttft": done, "e2e": done, "tpot": done & meas_tpot & np.isfinite(self.tpot_ms)}

    def summary(self, sel: np.ndarray | None = None) -> dict:
        """Measured and predicted :func:`calib.metrics.stats` of each metric over ``sel`` (default all).

        Both sides use the same requests (:meth:`compared`).  Returns ``{"n", "n_compared", "n_tpot",
        "measured": {metric: stats}, "predicted": {metric: stats}}``.
        """
        sel = np.ones(self.n, bool) if sel is None else np.asarray(sel, bool)
        masks = self.compared(sel)
        meas, pred = self.measured, self.predicted
        return {
            "n": int(sel.sum()),
            "n_compared": int(masks["e2e"].sum()),
            "n_tpot": int(masks["tpot"].sum()),
            "measured": {m: stats(meas[m][masks[m]]) for m in METRICS},
            "predicted": {m: stats(pred[m][masks[m]]) for m in METRICS},
        }

    def stage_masks(self) -> list[np.ndarray]:
        """One boolean mask over the requests per load stage."""
        st = self.trace.requests["stage"].to_numpy()
        return [st == k for k in range(len(self.trace.stages))]


def replay_requests(timer: StepTimer, inputs: ReplayInputs) -> EngineResult:
    """Run the engine on the requests of ``inputs`` that are not rejected for context length.

    Returns an :class:`EngineResult` aligned with all requests (context-rejected
    ones are marked ``rejected``, their times NaN).
    """
    keep = ~inputs.context_rejected
    idx = np.flatnonzero(keep)
    n = inputs.n
    if idx.size == 0:
        nan = np.full(n, np.nan)
        return EngineResult(nan, nan.copy(), nan.copy(), inputs.context_rejected.copy(), 0, 0, False, {})
    res, _ = run_engine(timer, inputs.arrival_us[idx], inputs.input_tokens[idx], inputs.output_tokens[idx],
                        inputs.scheduler, prefix_tokens=inputs.prefix_tokens[idx],
                        prefix_group=inputs.prefix_group[idx])
    if idx.size == n:
        return res

    def spread(a: np.ndarray) -> np.ndarray:
        full = np.full(n, np.nan)
        full[idx] = a
        return full

    rejected = inputs.context_rejected.copy()
    rejected[idx] = np.asarray(res.rejected, bool)
    return EngineResult(spread(res.ttft_us), spread(res.e2e_us), spread(res.start_us), rejected, res.n_steps,
                        res.n_preemptions, res.hit_step_cap, res.steps)


class BatchedRun:
    """A trace bound to its engine inputs; :meth:`run` replays it under a step model and an overhead model.

    Parameters
    ----------
    trace : Trace
    **input_options
        Passed to :func:`replay_inputs` (``prefix``, ``cached_prefill_pi``,
        ``max_model_len``, ``max_steps``, ``record_steps``, ...).

    Examples
    --------
    >>> from calib.physics.overhead import PerLayer
    >>> run = BatchedRun(trace)  # doctest: +SKIP
    >>> rep = run.run(StepModel.build(trace.model, trace.tp), PerLayer(80.0))  # doctest: +SKIP
    >>> rep.summary()["predicted"]["tpot"]["mean"]  # doctest: +SKIP
    """

    def __init__(self, trace: Trace, **input_options: Any):
        self.trace = trace
        self._options = dict(input_options)
        self._inputs: dict[int, ReplayInputs] = {}

    @property
    def options(self) -> dict[str, Any]:
        """The :func:`replay_inputs` options this run was made with (a copy)."""
        return dict(self._options)

    def inputs(self, model_max_context: int = 0) -> ReplayInputs:
        """The engine inputs (built once per model context length)."""
        ri = self._inputs.get(model_max_context)
        if ri is None:
            ri = replay_inputs(self.trace, model_max_context=model_max_context, **self._options)
            self._inputs[model_max_context] = ri
        return ri

    def run(self, step_model: StepModel, overhead: OverheadModel | None, *, record_steps: bool | None = None,
            request_latency_ms: float = 0.0, input_token_latency_us: float = 0.0,
            cpu_overlap: bool = False) -> BatchedReplay:
        """Replay under ``step_model`` + ``overhead``.

        Parameters
        ----------
        step_model : StepModel
        overhead : OverheadModel or None
        record_steps : bool, optional
            Override of the inputs' choice.
        request_latency_ms : float
            Client-side latency added to every request's TTFT and E2E (not to
            TPOT and not to the engine's time): see the module docstring.
        input_token_latency_us : float
            Client-side latency per input token, added likewise (:func:`calib.metrics.client_ms`).
        cpu_overlap : bool
            Under async scheduling, the overhead overlaps the GPU work of the step before
            (:class:`~calib.replay.engine.StepTimer` ``overlap``); ignored without async scheduling.
        """
        for name, v in (("request_latency_ms", request_latency_ms), ("input_token_latency_us", input_token_latency_us)):
            if isinstance(v, bool) or not np.isfinite(v) or v < 0:
                raise ConfigError(f"must be a finite number >= 0, got {v!r}", field=name)
        inputs = self.inputs(int(getattr(step_model.model, "max_context", 0) or 0))
        if record_steps is not None and record_steps != inputs.scheduler.record_steps:
            inputs = replace(inputs, scheduler=replace(inputs.scheduler, record_steps=record_steps))
        timer = StepTimer(step_model, overhead, overlap=bool(cpu_overlap) and inputs.scheduler.async_scheduling)
        res = replay_requests(timer, inputs)
        client = client_ms(float(request_latency_ms), float(input_token_latency_us), inputs.input_tokens)
        ttft = res.ttft_us / 1e3 + client
        e2e = res.e2e_us / 1e3 + client
        out = inputs.output_tokens
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out > 1, (e2e - ttft) / (out - 1), np.nan)
        wait = (res.start_us - inputs.arrival_us) / 1e3
        return BatchedReplay(self.trace, inputs, ttft, e2e, tpot, wait, np.asarray(res.rejected, bool),
                             int(res.n_steps), int(res.n_preemptions), bool(res.hit_step_cap), dict(res.steps or {}))


# ---------------------------------------------------------------------------------------- subsampling


def window_trace(trace: Trace, window_s: float) -> Trace:
    """The first ``window_s`` seconds of every load stage, stages made contiguous.

    Requests arriving in ``[stage start, stage start + window_s)`` are kept;
    later stages are shifted back so each starts where the previous window
    ends, so the rate of every stage is preserved and a stage starts with the
    running set the previous window left.  Used to cut search cost; final
    held-out evaluations replay full traces.

    Raises
    ------
    ConfigError
        ``window_s`` not > 0.
    """
    if not (isinstance(window_s, (int, float)) and not isinstance(window_s, bool) and window_s > 0):
        raise ConfigError(f"must be > 0 seconds, got {window_s!r}", field="window_s")
    req = trace.requests
    starts = np.concatenate([[0.0], np.cumsum([s.duration_s for s in trace.stages])[:-1]]) * 1e6
    win = [min(float(window_s), s.duration_s) for s in trace.stages]
    shift = starts - np.concatenate([[0.0], np.cumsum(win)[:-1]]) * 1e6
    st = req["stage"].to_numpy()
    arr = req["arrival_us"].to_numpy()
    keep = (arr - starts[st]) < np.asarray(win)[st] * 1e6
    if not keep.any():
        raise DataError("no request in the window", field="window_s")
    new = req.loc[keep].copy()
    new["arrival_us"] = (arr[keep] - shift[st[keep]]).astype(np.int64)
    new["arrival_us"] -= int(new["arrival_us"].iloc[0])
    new = new.reset_index(drop=True)
    stages = tuple(Stage(w, s.rate) for w, s in zip(win, trace.stages))
    return replace(trace, requests=new, stages=stages)


def frame(rep: BatchedReplay) -> pd.DataFrame:
    """Per-request measured and predicted times as a DataFrame (for inspection)."""
    req = rep.trace.requests
    return pd.DataFrame({
        "request_index": req["request_index"].to_numpy(), "arrival_us": req["arrival_us"].to_numpy(),
        "stage": req["stage"].to_numpy(), "input_tokens": req["input_tokens"].to_numpy(),
        "output_tokens": rep.inputs.output_tokens, "ttft_ms": req["ttft_ms"].to_numpy(),
        "pred_ttft_ms": rep.ttft_ms, "tpot_ms": req["tpot_ms"].to_numpy(), "pred_tpot_ms": rep.tpot_ms,
        "e2e_ms": req["e2e_ms"].to_numpy(), "pred_e2e_ms": rep.e2e_ms, "pred_wait_ms": rep.wait_ms,
        "rejected": rep.rejected,
    })
