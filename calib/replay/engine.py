"""A small continuous-batching engine: the replay owns time.

The engine replays requests through a vLLM-v1/BLIS-like scheduler.  Every step:

1. each running request, in admission order, gets its next token (decode) or
   its next prefill chunk, within the step's token budget
   (``max_scheduled_tokens``); the KV blocks the step needs are allocated
   before it runs.  When a running request needs a block and none is free, the
   most recently admitted running request is preempted (it may be the request
   itself): its blocks are freed and it goes back to the *front* of the waiting
   queue, to recompute its prompt and the tokens generated so far as a prefill
   (vLLM's recompute preemption); that recompute prefill produces the next
   output token, as in vLLM;
2. if nothing was preempted in this step, waiting requests are admitted
   first-come-first-served while the budget, the running-request cap
   (``max_running``) and the free KV blocks allow (the first request that does
   not fit stops admission).

A step lasts the step model's time plus the overhead model's (with
``StepTimer(..., overlap=True)``, vLLM's async scheduling with the CPU
overhead hidden behind the GPU: the larger of the two, except for the first
step after the engine was idle, which pays both); progress, TTFT
and output tokens are credited at the end of the step (``roofline-spec.md``
§6.5).  A request whose prompt plus output can never fit in the KV cache is
rejected on arrival (``EngineResult.rejected``).  Every step makes progress (the
oldest running request can always run), so a replay always ends; ``max_steps``
caps its length (``EngineResult.hit_step_cap``).

Two implementations of the same scheduler:

* the default one keeps the decoding requests as an aggregate (count and sum
  of contexts, KV-block phase counts, a heap of finishing ticks, and what the
  step model's decode time depends on: the max context for v2.3, the per-piece
  context sums of a :class:`calib.physics.fast.ContextSet` for v2.4, nothing
  more for v3), so a step costs O(changes) rather than O(running), and times
  runs of pure-decode steps between two events (an admissible arrival, a
  completion, KV exhaustion) from those statistics with
  :class:`calib.physics.fast.FastSteps`, for every variant;
* ``run_engine(..., fast=False)`` is a straightforward step-by-step loop over
  explicit per-request state (the reference the fast one is tested against;
  with ``StepTimer(..., fast=False)`` it also times every step with a plain
  ``StepModel.parts`` call).

Both give the same integer µs per request.  :class:`BusyPeriods` replays the
busy periods of one experiment one after another with one engine, restarted
between them (the synchronous replay's overlapping stretches).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from calib.errors import ConfigError
from calib.physics.batch import StepBatch
from calib.physics.fast import SCALAR_RUN, round_half_away_scalar
from calib.physics.overhead import OverheadModel
from calib.physics.roofline import round_half_away
from calib.physics.step_model import StepModel

__all__ = ["SchedulerConfig", "EngineResult", "StepTimer", "run_engine", "BusyPeriods"]

def _round_pos(x: float) -> int:
    """``round_half_away`` for ``x >= 0``."""
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduler settings.  Defaults are the reference simulator's (spec §6.3).

    Parameters
    ----------
    max_scheduled_tokens : int
        Token budget per step (chunked prefill); 2048 in the reference.
    max_running : int
        Cap on running requests (``max_num_seqs``); 256 in the reference.
    block_size : int
        KV-cache block size in tokens.
    kv_blocks : int
        KV-cache capacity in blocks.  A request holds the blocks of the tokens
        in its KV (cached prefix included); when a running request needs a block
        and none is free, the most recently admitted running request is
        preempted and recomputed later (vLLM's recompute preemption).  A
        request needing more than ``kv_blocks`` blocks on its own
        (``ceil((input + output - 1) / block_size)``) is rejected.
    prefix_cache : bool
        Serve ``floor(prefix / block) * block`` shared-prefix tokens from cache
        once a request of the same prefix group has finished its prefill, while
        those blocks are cached (see *Prefix-cache eviction* in
        :func:`run_engine`).
    cached_prefill_pi : {"zero", "cached"}
        The PI a newly scheduled request with a cache hit shows its first step:
        ``"zero"`` is the reference behaviour (spec §2: cached tokens add no KV
        read), ``"cached"`` uses the number of cached tokens.
    phantom_last_step : bool
        Add the last step's time to E2E once more (reference before 08d5abc6).
    async_scheduling : bool
        vLLM's async scheduling (the default from vLLM 0.14): the engine
        schedules step ``N + 1`` when step ``N`` starts executing, so a request
        arriving while a step runs joins the step after next; an idle engine
        schedules an arrival at once.  Off: a request joins the next step.
    max_steps : int
        Safety cap; a replay that reaches it stops and says so (``hit_step_cap``).
    record_steps : bool
        Keep per-step start, duration, batch size and token counts.
    """

    max_scheduled_tokens: int = 2048
    max_running: int = 256
    block_size: int = 16
    kv_blocks: int = 1_000_000
    prefix_cache: bool = True
    cached_prefill_pi: str = "zero"
    phantom_last_step: bool = True
    async_scheduling: bool = False
    max_steps: int = 50_000_000
    record_steps: bool = False

    def __post_init__(self) -> None:
        for name in ("max_scheduled_tokens", "max_running", "block_size", "kv_blocks", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"must be an integer >= 1, got {value!r}", field=name)
        if self.cached_prefill_pi not in ("zero", "cached"):
            raise ConfigError("choose 'zero' or 'cached'", field="cached_prefill_pi")


#: Overhead memos shared by the timers of equal overhead models: (overhead, L, TP) -> {features: µs}.
_OVERHEAD_MEMOS: dict[tuple, dict] = {}
_MEMO_MODELS_MAX = 256
_MEMO_ENTRIES_MAX = 1 << 20
#: Decode counts whose overhead one memo miss computes together (one vectorised call).
_OVH_BLOCK = 64


def _overhead_memo(overhead, num_layers: int, tp: int) -> dict:
    """The memo of ``overhead``'s step µs by features, shared by equal (hashable) overhead models."""
    key = (overhead, num_layers, tp)
    try:
        memo = _OVERHEAD_MEMOS.get(key)
    except TypeError:  # an unhashable overhead model: a private memo
        return {}
    if memo is None or len(memo) > _MEMO_ENTRIES_MAX:
        if len(_OVERHEAD_MEMOS) >= _MEMO_MODELS_MAX:
            _OVERHEAD_MEMOS.clear()
        memo = _OVERHEAD_MEMOS[key] = {}
    return memo


def _features(n_prefill, prefill_tokens, n_decode) -> dict:
    return {"n_prefill": np.asarray(n_prefill), "prefill_tokens": np.asarray(prefill_tokens),
            "n_decode": np.asarray(n_decode)}


def overhead_keys(n_prefill, prefill_tokens, n_decode) -> tuple[list[tuple[int, int, int]], dict]:
    """The distinct non-empty step features among these arrays, as memo keys and as the overhead's features
    (for :meth:`StepTimer.prime_keys`).

    >>> overhead_keys([1, 0, 1, 0], [64, 0, 64, 0], [0, 2, 0, 0])[0]
    [(0, 0, 2), (1, 64, 0)]
    """
    keys = np.unique(np.stack([np.asarray(n_prefill, np.int64), np.asarray(prefill_tokens, np.int64),
                               np.asarray(n_decode, np.int64)], axis=1).reshape(-1, 3), axis=0)
    keys = keys[(keys[:, 0] + keys[:, 2]) > 0]
    return list(map(tuple, keys.tolist())), _features(keys[:, 0], keys[:, 1], keys[:, 2])


class StepTimer:
    """Step model + overhead model -> integer µs per step.

    Hardware times come from ``step_model.fast`` (:class:`calib.physics.fast.FastSteps`),
    whose caches belong to the step model and so are shared by every timer,
    replay and overhead value of that step model.  The overhead of a step
    depends only on its features ``(n_prefill, prefill_tokens, n_decode)``
    (overhead models are elementwise in them); it is memoised, and the memo is
    shared by the timers of equal overhead models (they are frozen dataclasses,
    equal by value).

    The engine uses ``step_hw_us``, ``step_us``, ``decode_run_us`` and
    ``run_us`` (and, when ``aggregate`` is true, ``steps``, ``overhead_us``,
    ``decode_overhead_us`` and ``solo_table``); a test double needs only the
    first four and ``aggregate = False``.

    Parameters
    ----------
    step_model : StepModel
    overhead : OverheadModel or None
        ``None``: no overhead.
    overlap : bool
        The overhead is CPU time that runs beside the GPU work of the step
        before (vLLM's async scheduling, ``replay.cpu_overlap``): a step that
        follows another lasts ``max(hardware, overhead)``, the first step after
        the engine was idle ``hardware + overhead`` (:meth:`step_us`
        ``after_idle``).  A pure-decode step never follows an idle engine.
    fast : bool
        ``False`` times every step with a plain ``step_model.parts`` call (the
        straightforward reference, no caches; slow).
    """

    def __init__(self, step_model: StepModel, overhead: OverheadModel | None, *, fast: bool = True,
                 overlap: bool = False):
        self.step_model = step_model
        self.overhead = overhead
        self.fast = bool(fast)
        self.overlap = bool(overlap)
        self.steps = step_model.fast
        self._L, self._tp = step_model.model.num_layers, step_model.tp
        self._ovh: dict[tuple[int, int, int], float] = (
            _overhead_memo(overhead, self._L, self._tp) if overhead is not None else {})
        self._dec_ovh: list[float] = []  # overhead of a decode-only step, by decode count (index 0 unused)
        self.misses: list[tuple[int, int, int]] = []  # features whose overhead was not memoised when asked
        self._solo: tuple[np.ndarray, np.ndarray] | None = None
        floor = step_model.options.min_step_us
        self._floor = int(math.ceil(floor)) if floor > 0 else None

    # ---- hardware time ----------------------------------------------------------------------

    @property
    def aggregate(self) -> bool:
        """Decode-only steps depend only on the statistics of ``steps.kind`` (and the fast path is on).

        See :mod:`calib.physics.fast`: ``(q, max PI, Σ PI)``, ``(q, Σ PI, Σ f m)`` or ``(q, Σ PI)``.
        """
        return self.fast and self.steps.aggregate

    def hardware_us(self, batch: StepBatch) -> np.ndarray:
        """Hardware µs of every step of ``batch`` (one plain ``StepModel.parts`` call)."""
        return self.step_model.parts(batch).hardware_s * 1e6

    def step_hw_us(self, p_pi, p_n, q: int = 0, max_pi: int = 0, sum_pi: int = 0, d_pis=None,
                   fm_sum: float | None = None) -> float:
        """Hardware µs of one step (see :meth:`calib.physics.fast.FastSteps.step_hw_us`)."""
        if self.fast:
            return self.steps.step_hw_us(p_pi, p_n, q, max_pi, sum_pi, d_pis, fm_sum)
        d_pis = [] if d_pis is None else list(d_pis)
        batch = StepBatch.from_arrays(1, prefill_step=[0] * len(p_pi), prefill_pi=p_pi, prefill_n=p_n,
                                      decode_step=[0] * len(d_pis), decode_pi=d_pis)
        return float(self.hardware_us(batch)[0])

    def decode_run_us(self, pis, k: int) -> np.ndarray:
        """Hardware µs of ``k`` consecutive pure-decode steps starting at contexts ``pis`` (+1 per step)."""
        pis = np.asarray(pis, dtype=np.int64)
        if self.fast:
            return self.steps.decode_run_pr_hw_us(pis, k)
        q = len(pis)
        steps = np.repeat(np.arange(k, dtype=np.int64), q)
        dpi = (pis[None, :] + np.arange(k, dtype=np.int64)[:, None]).reshape(-1)
        e = np.zeros(0, np.int64)
        return self.hardware_us(StepBatch(k, e, e, e, steps, dpi))

    # ---- overhead and rounding --------------------------------------------------------------

    def overhead_us(self, n_prefill: int, prefill_tokens: int, n_decode: int) -> float:
        """Overhead µs of a (non-empty) step with these features (memoised).

        A miss computes, in one vectorised call, the overhead of a block of
        ``_OVH_BLOCK`` decode counts with the same prefill features.
        """
        key = (n_prefill, prefill_tokens, n_decode)
        v = self._ovh.get(key)
        if v is None:
            if self.overhead is None:
                v = self._ovh[key] = 0.0
            else:
                self.misses.append(key)
                lo = n_decode // _OVH_BLOCK * _OVH_BLOCK
                qs = np.arange(lo, lo + _OVH_BLOCK)
                if n_prefill == 0 and lo == 0:
                    qs = qs[1:]  # empty steps have no overhead
                vals = self.overhead.step_us(_features(np.full(len(qs), n_prefill), np.full(len(qs), prefill_tokens),
                                                       qs), self._L, self._tp)
                vals = np.broadcast_to(np.asarray(vals, dtype=np.float64), (len(qs),)).tolist()
                self._ovh.update(((n_prefill, prefill_tokens, qq), vv) for qq, vv in zip(qs.tolist(), vals))
                v = self._ovh[key]
        return v

    def decode_overhead_us(self, n_decode: int) -> float:
        """``overhead_us(0, 0, n_decode)``, also kept in a list by decode count for the engine's inner loop."""
        lst = self._dec_ovh
        if n_decode >= len(lst):
            lst.extend(self.overhead_us(0, 0, q) if q else 0.0 for q in range(len(lst), n_decode + 1))
        return lst[n_decode]

    def step_us(self, hw_us: float, n_prefill: int, prefill_tokens: int, n_decode: int,
                after_idle: bool = False) -> int:
        """Integer µs of one non-empty step: hardware + overhead (with ``overlap``, unless ``after_idle``: their
        maximum), rounded half away from zero, floored."""
        ovh = self.overhead_us(n_prefill, prefill_tokens, n_decode)
        d = round_half_away_scalar(hw_us + ovh if after_idle or not self.overlap else max(hw_us, ovh))
        if self._floor is not None and d < self._floor:
            d = self._floor
        return d

    def run_us(self, hw_us: np.ndarray, n_decode: int) -> np.ndarray:
        """Integer µs of pure-decode steps of ``n_decode`` requests (never the first step after idle)."""
        ovh = self.decode_overhead_us(n_decode)
        x = np.maximum(hw_us, ovh) if self.overlap else hw_us + ovh
        out = np.floor(x + 0.5).astype(np.int64) if x.size and x.min() >= 0 else round_half_away(x)
        if self._floor is not None:
            out = np.maximum(out, self._floor)
        return out

    def prime(self, n_prefill, prefill_tokens, n_decode) -> None:
        """Memoise the overhead of these step features (arrays) with one vectorised call.

        Overhead models are elementwise in the features, so this only saves time.
        """
        if self.overhead is not None:
            self.prime_keys(*overhead_keys(n_prefill, prefill_tokens, n_decode))

    def prime_keys(self, keys: list[tuple[int, int, int]], features: dict) -> None:
        """:meth:`prime` of the distinct, non-empty step features :func:`overhead_keys` lists."""
        if self.overhead is None or not keys:
            return
        vals = self.overhead.step_us(features, self._L, self._tp)
        vals = np.broadcast_to(np.asarray(vals, dtype=np.float64), (len(keys),))
        self._ovh.update(zip(keys, vals.tolist()))

    def solo_table(self, kv_max: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(durations, cumulative)`` of batch-1 decode steps by PI (``cumulative[i]`` = sum of the first i).

        ``None`` unless decode steps are aggregated and batch-1 steps take >= 0 µs
        (so that cumulative times are monotone).
        """
        if not self.aggregate:
            return None
        tab = self._solo
        if tab is None or kv_max >= len(tab[0]):
            if self.overhead_us(0, 0, 1) < 0:
                return None
            dur = self.run_us(self.steps.solo_decode_row(kv_max), 1)
            tab = self._solo = (dur, np.concatenate([np.zeros(1, np.int64), np.cumsum(dur)]))
        return tab

    def overhead_array(self, features: dict) -> np.ndarray:
        """Overhead µs of the steps whose features are these arrays (0 for empty steps)."""
        n = len(features["n_decode"])
        if self.overhead is None:
            return np.zeros(n)
        return np.broadcast_to(np.asarray(self.overhead.step_us(features, self._L, self._tp), np.float64), (n,))

    def combine(self, hw_us: np.ndarray, features: dict) -> np.ndarray:
        """Add the overhead to hardware µs and round half away from zero (with the variant's floor): steps timed
        on their own, as after an idle engine (``overlap`` does not apply)."""
        ovh = 0.0 if self.overhead is None else self.overhead.step_us(features, self._L, self._tp)
        return self.combine_overhead(hw_us, ovh)

    def combine_overhead(self, hw_us: np.ndarray, ovh_us) -> np.ndarray:
        """Hardware µs plus overhead µs, rounded half away from zero (with the variant's floor)."""
        out = round_half_away(hw_us + ovh_us)
        if self._floor is not None:
            out = np.maximum(out, self._floor)
        return out

    def __call__(self, batch: StepBatch) -> np.ndarray:
        feats = {"n_prefill": batch.prefill_count, "prefill_tokens": batch.prefill_tokens,
                 "n_decode": batch.decode_count}
        return np.where(batch.non_empty, self.combine(self.hardware_us(batch), feats), 0)


@dataclass
class EngineResult:
    """Per-request outcome (µs; NaN where a request never got there).

    ``rejected`` marks requests that can never fit in the KV cache;
    ``n_rejected`` counts them.
    """

    ttft_us: np.ndarray
    e2e_us: np.ndarray
    start_us: np.ndarray
    rejected: np.ndarray
    n_steps: int = 0
    n_preemptions: int = 0
    hit_step_cap: bool = False
    steps: dict = field(default_factory=dict)

    @property
    def n_rejected(self) -> int:
        return int(self.rejected.sum())


def run_engine(timer: StepTimer, arrival_us, input_tokens, output_tokens, cfg: SchedulerConfig,
               prefix_tokens=None, prefix_group=None, first: int = 0, stop_when_idle: bool = False,
               prefix_warm: set | None = None, *, fast: bool = True) -> tuple[EngineResult, int]:
    """Replay requests ``first..`` through the scheduler.

    Parameters
    ----------
    timer : StepTimer
    arrival_us, input_tokens, output_tokens : array-like of int
        Per request; arrivals sorted ascending.  ``input_tokens`` includes the prefix.
    cfg : SchedulerConfig
    prefix_tokens, prefix_group : array-like, optional
        Shared-prefix length and group id per request (group < 0: no sharing).
    first : int
        Index of the first request to replay.
    stop_when_idle : bool
        Return as soon as the engine is idle and the next arrival is later
        (one busy period); the second return value is the next request index.
    prefix_warm : set, optional
        Prefix groups whose prefix is already cached (updated in place).  A
        group given here and not released in this call is never evicted.
    fast : bool
        ``False``: the straightforward step-by-step implementation (same results, slower).

    Returns
    -------
    (EngineResult, int)
        Results for all requests (untouched ones NaN) and the index of the first
        request not replayed.

    Notes
    -----
    *Prefix-cache eviction* (vLLM's free-block queue).  A finished (or
    preempted) request returns its blocks to the tail of a queue of free
    blocks, last block first; an allocation takes blocks from the head, and a
    cached block taken that way loses its content.  So a group's prefix stays
    cached while a running request holds it, and once the last holder is
    released its blocks survive until as many blocks have been allocated as
    stood ahead of them in the queue: the blocks free at that time, plus the
    request's own blocks after the prefix.  The engine counts blocks returned
    (``released``) and allocated (``released + kv_blocks - free``): a prefix
    released when ``released`` was ``R`` by a request holding ``n`` blocks, of
    which ``m`` are the prefix, has its last block at queue position
    ``R + kv_blocks + n - m``; every block allocated beyond that position
    evicts one more of its blocks from the end (a prefix is served up to its
    first missing block).  Requests released in the same step are placed as
    if released together (position from ``released`` before that step's
    releases; of several holders of one prefix, the furthest position), which
    keeps the order in which a step releases them irrelevant.  A cache hit allocates the hit blocks like new ones (vLLM
    takes them out of the free queue).
    """
    eng = (_FastEngine if fast else _Engine)(timer, arrival_us, input_tokens, output_tokens, cfg, prefix_tokens,
                                             prefix_group, first, stop_when_idle, prefix_warm)
    return eng.run()


class BusyPeriods:
    """The busy periods of one set of requests, replayed one after another by one engine.

    ``run(first)`` gives, for the requests of the busy period that starts with
    request ``first``, what ``run_engine(..., first=first, stop_when_idle=True)``
    gives, without building a new engine (per-request lists of every request)
    for each period: the engine is restarted (:meth:`_Engine.restart`) when the
    periods come in order, else built anew.

    Parameters
    ----------
    timer, arrival_us, input_tokens, output_tokens, cfg, prefix_tokens, prefix_group, prefix_warm, fast
        As for :func:`run_engine`.

    Examples
    --------
    >>> from calib.physics import StepModel
    >>> from calib.physics.overhead import PerLayer
    >>> timer = StepTimer(StepModel.build("llama-2-7b-hf", 1), PerLayer(100.0))
    >>> periods = BusyPeriods(timer, [0, 10, 10**7], [512, 512, 512], [4, 4, 4], SchedulerConfig())
    >>> nxt, ttft, e2e, last = periods.run(0)
    >>> nxt, len(ttft), periods.run(nxt)[0]
    (2, 2, 3)
    """

    def __init__(self, timer: StepTimer, arrival_us, input_tokens, output_tokens, cfg: SchedulerConfig,
                 prefix_tokens=None, prefix_group=None, prefix_warm: set | None = None, *, fast: bool = True):
        self._args = (timer, arrival_us, input_tokens, output_tokens, cfg, prefix_tokens, prefix_group)
        self._warm = prefix_warm
        self._cls = _FastEngine if fast else _Engine
        self._eng: _Engine | None = None

    def run(self, first: int) -> tuple[int, list, list, list]:
        """Replay the busy period starting with request ``first``.

        Returns
        -------
        (int, list, list, list)
            The index ``j`` of the first request after the period, and the TTFT,
            E2E and last-step duration (µs) of requests ``first..j-1``.
        """
        eng = self._eng
        if eng is None or eng.hit_cap or first < eng.nxt:
            eng = self._eng = self._cls(*self._args, first, True, self._warm)
        else:
            eng.restart(first)
        eng.loop()
        j = eng.nxt
        return j, eng.ttft[first:j], eng.e2e[first:j], eng.last[first:j]


# ================================================================================== engines


class _Engine:
    """The straightforward engine: explicit per-request state, one step at a time."""

    def __init__(self, timer, arrival_us, input_tokens, output_tokens, cfg, prefix_tokens, prefix_group, first,
                 stop_when_idle, prefix_warm):
        arrival = np.asarray(arrival_us, dtype=np.int64)
        n = len(arrival)
        self.timer, self.cfg, self.n = timer, cfg, n
        self.arrival = arrival.tolist()
        self.inp = np.asarray(input_tokens, dtype=np.int64).tolist()
        self.out = [max(int(o), 1) for o in np.asarray(output_tokens, dtype=np.int64).tolist()]
        if len(self.inp) != n or len(self.out) != n:
            raise ConfigError("arrival, input and output arrays differ in length", field="requests")
        self.pre = [0] * n if prefix_tokens is None else np.asarray(prefix_tokens, np.int64).tolist()
        self.grp = [-1] * n if prefix_group is None else np.asarray(prefix_group, np.int64).tolist()
        self.warm = prefix_warm if prefix_warm is not None else set()
        self.holds = [False] * n   # the request holds its group's prefix (its prefill is done)
        self.stop_when_idle = stop_when_idle
        self.bs = cfg.block_size
        nan = float("nan")
        self.ttft = [nan] * n
        self.e2e = [nan] * n
        self.start = [nan] * n
        self.rejected = [False] * n
        self.progress = [0] * n   # tokens of the current prefill target already in KV
        self.target = list(self.inp)  # prefill target: the prompt, or prompt + generated after a preemption
        self.generated = [0] * n  # output tokens produced
        self.held = [0] * n       # KV blocks held
        self.last = [0] * n       # duration of the request's latest step
        self.ahead = cfg.async_scheduling
        self._start(first)

    def _start(self, first: int) -> None:
        """The state of a call that starts with request ``first`` (besides the per-request state)."""
        cfg = self.cfg
        self.released = 0          # KV blocks ever returned to the free queue
        self.holders: dict[int, int] = {}  # prefix group -> running requests holding its cached prefix
        self.qpos: dict[int, int] = {}     # idle prefix group -> queue position of its last prefix block
        self.running: list[int] = []  # admission order
        self.waiting: deque[int] = deque()  # FCFS; preempted requests go back to the front
        self.free = cfg.kv_blocks
        self.first = first
        self.t = self.arrival[first] if first < self.n else 0
        self.t_sched = self.t  # arrivals up to here can join the step about to be built (async_scheduling)
        self.nxt = first
        self.n_steps = 0
        self.preemptions = 0
        self.hit_cap = False
        self.after_idle = True     # no step is running: the next step's CPU work cannot overlap one
        self.rec = {"start_us": [], "duration_us": [], "batch_size": [], "prefill_tokens": [],
                    "decode_tokens": []} if cfg.record_steps else None

    def restart(self, first: int) -> None:
        """Continue with the busy period that starts with request ``first``, as a new engine would.

        Only after a call that ended idle (``stop_when_idle``, step cap not hit) and
        with ``first`` at or after the request it stopped at: the requests from
        ``first`` on were never touched, and the state of the call is reset (free
        blocks, released-block count, queue positions of idle prefixes, clock,
        step and preemption counters).  The prefix groups in ``prefix_warm`` stay.
        """
        if self.hit_cap or first < self.nxt or not self.idle():
            raise ValueError("restart needs an idle engine and a first request not yet replayed")
        self._start(first)

    # ---- shared pieces ---------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def admit_arrivals(self) -> None:
        n, arrival, t = self.n, self.arrival, (self.t_sched if self.ahead else self.t)
        while self.nxt < n and arrival[self.nxt] <= t:
            r = self.nxt
            self.nxt += 1
            if self.blocks_for(self.inp[r] + self.out[r] - 1) > self.cfg.kv_blocks:
                self.rejected[r] = True  # can never fit: rejected, as vLLM does
                continue
            self.waiting.append(r)

    def cached_tokens(self, r: int, free: int | None = None) -> int:
        """Prefix tokens of ``r`` served from cache if it is admitted now (``free``: free blocks at that point)."""
        g = self.grp[r]
        if not self.cfg.prefix_cache or g < 0 or g not in self.warm:
            return 0
        blocks = self.pre[r] // self.bs
        pos = self.qpos.get(g)
        if pos is not None and not self.holders.get(g):
            evicted = self.released + self.cfg.kv_blocks - (self.free if free is None else free) - pos
            if evicted > 0:
                blocks = blocks - evicted if evicted < blocks else 0
        return max(0, min(blocks * self.bs, self.target[r] - 1))

    def evictable(self, r: int) -> bool:
        """Whether the cached prefix of ``r`` could still shrink before ``r`` is admitted."""
        g = self.grp[r]
        return g >= 0 and g in self.warm and g in self.qpos and not self.holders.get(g)

    def hold(self, r: int) -> None:
        """``r`` finished its prefill: its group's prefix is cached and held."""
        g = self.grp[r]
        if g >= 0:
            self.warm.add(g)
            if not self.holds[r]:
                self.holds[r] = True
                self.holders[g] = self.holders.get(g, 0) + 1

    def release(self, r: int, blocks: int, released: int | None = None) -> None:
        """Return the ``blocks`` of ``r`` to the free queue (``released``: the count the step's releases start from)."""
        if self.holds[r]:
            self.holds[r] = False
            g = self.grp[r]
            self.holders[g] -= 1
            base = self.released if released is None else released
            pos = base + self.cfg.kv_blocks + blocks - self.pre[r] // self.bs
            # the latest release's position is the largest one; max() also keeps same-step releases order-free
            self.qpos[g] = max(self.qpos.get(g, pos), pos)
        self.free += blocks
        self.released += blocks

    def record(self, starts, durs, batch_size, ptoks, dtoks) -> None:
        rec = self.rec
        rec["start_us"].extend(starts)
        rec["duration_us"].extend(durs)
        rec["batch_size"].extend(batch_size)
        rec["prefill_tokens"].extend(ptoks)
        rec["decode_tokens"].extend(dtoks)

    def set_e2e(self, r: int) -> None:
        phantom = self.last[r] if self.cfg.phantom_last_step and self.out[r] > 1 else 0
        self.e2e[r] = self.t - self.arrival[r] + phantom

    def admit_waiting(self, budget: int, entries: list, n_running: int) -> tuple[int, list[int]]:
        """FCFS admission into the current step.

        Appends ``(pi_shown, chunk, r)`` to ``entries``; returns the budget left and the admitted requests.
        """
        cfg, waiting, target = self.cfg, self.waiting, self.target
        zero = cfg.cached_prefill_pi == "zero"
        admitted: list[int] = []
        while waiting and budget > 0 and n_running + len(admitted) < cfg.max_running:
            r = waiting[0]
            cached = self.cached_tokens(r)
            chunk = min(target[r] - cached, budget)
            nb = self.blocks_for(cached + chunk)
            if nb > self.free:
                break
            waiting.popleft()
            admitted.append(r)
            if self.start[r] != self.start[r]:  # NaN: first admission
                self.start[r] = self.t
            self.free -= nb
            self.held[r] = nb
            self.progress[r] = cached
            entries.append((0 if zero else cached, chunk, r))
            budget -= chunk
        return budget, admitted

    def result(self) -> tuple[EngineResult, int]:
        steps = {k: np.array(v, np.int64) for k, v in self.rec.items()} if self.rec is not None else {}
        res = EngineResult(np.array(self.ttft), np.array(self.e2e), np.array(self.start), np.array(self.rejected),
                           self.n_steps, self.preemptions, self.hit_cap, steps)
        return res, self.nxt

    # ---- the loop --------------------------------------------------------------------------

    def idle(self) -> bool:
        return not self.running and not self.waiting

    def run(self) -> tuple[EngineResult, int]:
        self.loop()
        return self.result()

    def loop(self) -> None:
        """Replay until the requests are done, the engine is idle (``stop_when_idle``) or the step cap."""
        cfg = self.cfg
        while True:
            self.admit_arrivals()
            if self.idle():
                self.after_idle = True
                if self.ahead and self.nxt < self.n and self.arrival[self.nxt] <= self.t:
                    self.t_sched = self.t  # nothing in flight: an arrival is scheduled at once
                    continue
                if self.nxt >= self.n or self.stop_when_idle:
                    break
                self.t = self.t_sched = self.arrival[self.nxt]
                continue
            if self.n_steps >= cfg.max_steps:
                self.hit_cap = True
                break
            self.step()

    def step(self) -> None:
        self.running = self.explicit_step(self.running)

    def explicit_step(self, running: list[int]) -> list[int]:
        """One step over explicit state; returns the new running order."""
        cfg, inp, out = self.cfg, self.inp, self.out
        progress, target, generated, held = self.progress, self.target, self.generated, self.held
        budget = cfg.max_scheduled_tokens
        entries: list[tuple[int, int, int]] = []  # prefill (pi shown, chunk, r)
        d_req: list[int] = []
        preempted = False
        i = 0
        while i < len(running) and budget > 0:  # running requests first, in admission order
            r = running[i]
            decode = progress[r] >= target[r]
            if decode:
                n_new, after = 1, inp[r] + generated[r]
            else:
                n_new = min(target[r] - progress[r], budget)
                after = progress[r] + n_new
            need = self.blocks_for(after) - held[r]
            while need > self.free:  # preempt the most recently admitted (possibly r itself)
                victim = running.pop()
                self.preempt(victim)
                preempted = True
                if victim == r:
                    break
            if preempted and (i >= len(running) or running[i] != r):
                break  # r preempted itself: it was the last running request
            if need > 0:
                self.free -= need
                held[r] += need
            if decode:
                d_req.append(r)
            else:
                entries.append((progress[r], n_new, r))
            budget -= n_new
            i += 1
        if not preempted:  # then waiting ones, FCFS (vLLM admits none in a step that preempted)
            budget, admitted = self.admit_waiting(budget, entries, len(running))
            running.extend(admitted)
        if not entries and not d_req:
            raise ConfigError("no request can be scheduled: the KV cache is too small for the running set",
                              field="kv_blocks")
        d_pis = [inp[r] + generated[r] - 1 for r in d_req]
        hw = self.timer.step_hw_us([e[0] for e in entries], [e[1] for e in entries], d_pis=d_pis)
        ptoks = sum(e[1] for e in entries)
        dur = self.timer.step_us(hw, len(entries), ptoks, len(d_req), self.after_idle)
        self.after_idle = False
        if self.rec is not None:
            self.record([self.t], [dur], [len(entries) + len(d_req)], [ptoks], [len(d_req)])
        self.t_sched = self.t  # the next step was scheduled when this one started
        self.t += dur
        self.n_steps += 1
        finished = []
        for _, chunk, r in entries:
            progress[r] += chunk
            if progress[r] >= target[r]:
                self.hold(r)
                if generated[r] == 0:
                    self.ttft[r] = self.t - self.arrival[r]
                generated[r] += 1  # the first token, or the next one after a recompute
                self.last[r] = dur
                if generated[r] >= out[r]:
                    finished.append(r)
        for r in d_req:
            generated[r] += 1
            self.last[r] = dur
            if generated[r] >= out[r]:
                finished.append(r)
        if finished:
            done = set(finished)
            base = self.released
            for r in finished:
                self.set_e2e(r)
                self.release(r, held[r], base)
                held[r] = 0
            running = [r for r in running if r not in done]
        return running

    def preempt(self, victim: int) -> None:
        """Free the victim's blocks; it recomputes prompt + generated tokens later (front of the queue)."""
        self.release(victim, self.held[victim])
        self.held[victim] = 0
        self.progress[victim] = 0
        self.target[victim] = self.inp[victim] + self.generated[victim]
        self.waiting.appendleft(victim)
        self.preemptions += 1


class _FastEngine(_Engine):
    """Same scheduler; decoding requests kept as an aggregate so a step costs O(changes).

    Decoding request ``r`` has PI ``c_r + D`` at decode tick ``D`` (a global
    counter of steps in which every decoding request decodes).  It needs a new
    KV block at tick ``D`` iff ``(c_r + D) % block_size == 0`` and does its last
    decode at tick ``F_r = out + inp - 2 - c_r``.  The aggregate keeps
    ``count``, ``Σ c``, a min-heap of ``F`` (with lazy deletion), the number of
    requests per block phase ``c % block_size`` and what the step model's
    decode statistics need (``timer.steps.kind``, :mod:`calib.physics.fast`):
    a max-heap of ``c`` for ``max_context``, a
    :class:`~calib.physics.fast.ContextSet` for ``per_request``.  Explicit
    ``generated``/``held`` of decoding requests are stale while they are in the
    aggregate.  At most one running request is mid-prefill at a time, and it
    is the last admitted one (admission stops when a chunk uses up the
    budget); steps that break that shape or starve decodes of budget
    (``running > max_scheduled_tokens``) go through the explicit step.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.last_tick = [0] * self.n        # F_r of a decoding request
        cfg = self.cfg
        self.B, self.max_running, self.max_steps = cfg.max_scheduled_tokens, cfg.max_running, cfg.max_steps
        timer = self.timer
        self.aggregate = bool(getattr(timer, "aggregate", False))
        steps = timer.steps if self.aggregate else None
        self.need_max = self.aggregate and steps.needs_max
        # hardware µs of a step from its prefill entries and decode statistics (or explicit decode PIs)
        self.step_hw = steps.step_stats_hw_us if self.aggregate else timer.step_hw_us
        self.hw_us = steps.decode_hw_us if self.aggregate else None
        self.floor = getattr(timer, "_floor", None)
        self.overlap = bool(getattr(timer, "overlap", False))
        self.phantom = cfg.phantom_last_step
        self.zero_pi = cfg.cached_prefill_pi == "zero"
        self.cacheable = cfg.prefix_cache and any(g >= 0 for g in self.grp)
        self._start_aggregate()

    def _start_aggregate(self) -> None:
        """The empty decode aggregate of a call starting at ``self.first``; size hints for the step caches."""
        self.run_order: dict[int, None] = {}  # running requests in admission order
        self.pref: list[int] = []            # running requests mid-prefill (explicit state)
        self.dec_c: dict[int, int] = {}       # decoding request -> c
        self.sum_c = 0
        self.D = 0
        self.phase = [0] * self.bs
        self.fin_heap: list[tuple[int, int]] = []
        self.max_heap: list[tuple[int, int]] = []
        self.max_cache: int | None = None     # max c when known (None: ask the heap)
        self.ctx = self.timer.steps.contexts() if self.aggregate else None
        n, first, cfg = self.n, self.first, self.cfg
        if first < n and self.aggregate:
            q_max = min(cfg.max_running, max(n - first, 1))
            kv_max = max(a + b for a, b in zip(self.inp[first:], self.out[first:]))
            self.timer.steps.reserve(q_max, kv_max, cfg.max_scheduled_tokens + q_max)

    def restart(self, first: int) -> None:
        super().restart(first)
        self._start_aggregate()

    # ---- aggregate bookkeeping ---------------------------------------------------------------

    def idle(self) -> bool:
        return not self.run_order and not self.waiting

    def dec_add(self, r: int, c: int) -> None:
        self.dec_c[r] = c
        self.sum_c += c
        self.phase[c % self.bs] += 1
        f = self.last_tick[r] = self.out[r] + self.inp[r] - 2 - c
        heapq.heappush(self.fin_heap, (f, r))
        if self.need_max:
            heapq.heappush(self.max_heap, (-c, r))
            m = self.max_cache
            if m is not None and c > m:
                self.max_cache = c
        if self.ctx is not None:
            self.ctx.add(r, c, self.D, f)

    def dec_remove(self, r: int) -> int:
        c = self.dec_c.pop(r)
        self.sum_c -= c
        self.phase[c % self.bs] -= 1
        if c == self.max_cache:
            self.max_cache = None
        if self.ctx is not None:
            self.ctx.remove(r)
        return c

    def max_c(self) -> int:
        m = self.max_cache
        if m is None:
            h, dec_c = self.max_heap, self.dec_c
            while dec_c.get(h[0][1]) != -h[0][0]:
                heapq.heappop(h)
            m = self.max_cache = -h[0][0]
        return m

    def min_fin(self) -> int:
        """The first last tick ``F`` of the decoding requests (stale heap entries are dropped)."""
        h, dec_c, last_tick = self.fin_heap, self.dec_c, self.last_tick
        while True:
            f, r = h[0]
            if r in dec_c and last_tick[r] == f:
                return f
            heapq.heappop(h)

    def finish_decoders(self, dur: int, released: int | None = None) -> None:
        """Finish every decoding request whose last tick was ``D - 1`` (stale heap entries are dropped).

        ``released``: the released-block count this step's releases start from (default: now).
        """
        h = self.fin_heap
        D = self.D
        if not h or h[0][0] >= D:  # every entry, stale or not, is later
            return
        base = self.released if released is None else released
        holds = self.holds
        dec_c, last_tick, bs, phase = self.dec_c, self.last_tick, self.bs, self.phase
        freed = 0
        while h and h[0][0] < D:
            f, r = heapq.heappop(h)
            if r not in dec_c or last_tick[r] != f:
                continue
            if self.ctx is None:  # dec_remove, inlined
                c = dec_c.pop(r)
                self.sum_c -= c
                phase[c % bs] -= 1
                if c == self.max_cache:
                    self.max_cache = None
            else:
                c = self.dec_remove(r)
            self.last[r] = dur
            self.e2e[r] = self.t - self.arrival[r] + (dur if self.phantom and self.out[r] > 1 else 0)
            nb = -(-(c + D) // bs)
            if holds[r]:
                self.release(r, nb, base)
            else:
                freed += nb
            del self.run_order[r]
        self.free += freed
        self.released += freed

    def new_blocks(self, k: int) -> int:
        """KV blocks the decoding requests newly need over the next ``k`` ticks."""
        bs, D = self.bs, self.D
        cycles, rem = divmod(k, bs)
        total = cycles * len(self.dec_c)
        if rem:  # phases ph, ph - 1, ..., ph - rem + 1 (mod bs)
            ph, phase = (-D) % bs, self.phase
            lo = ph - rem + 1
            total += sum(phase[lo : ph + 1]) if lo >= 0 else sum(phase[: ph + 1]) + sum(phase[bs + lo :])
        return total

    def d_pis(self) -> list[int]:
        D = self.D
        return [c + D for c in self.dec_c.values()]

    def materialise(self) -> None:
        """Write explicit state of every decoding request and empty the aggregate."""
        D, inp = self.D, self.inp
        for r, c in self.dec_c.items():
            self.generated[r] = c + D + 1 - inp[r]
            self.held[r] = self.blocks_for(c + D)
        self.dec_c.clear()
        self.sum_c = 0
        self.phase = [0] * self.bs
        self.fin_heap.clear()
        self.max_heap.clear()
        self.max_cache = None
        if self.ctx is not None:
            self.ctx.clear()

    # ---- the loop ----------------------------------------------------------------------------

    def loop(self) -> None:
        arrival, n, B = self.arrival, self.n, self.B
        while True:
            if self.nxt < n and arrival[self.nxt] <= (self.t_sched if self.ahead else self.t):
                self.admit_arrivals()
            if not self.run_order and not self.waiting:
                self.after_idle = True
                if self.ahead and self.nxt < n and arrival[self.nxt] <= self.t:
                    self.t_sched = self.t  # nothing in flight: an arrival is scheduled at once
                    continue
                if self.nxt >= n or self.stop_when_idle:
                    break
                self.t = self.t_sched = arrival[self.nxt]
                continue
            if self.n_steps >= self.max_steps:
                self.hit_cap = True
                break
            pref = self.pref
            if not pref:
                if self.dec_c and self.decode_run():
                    continue
                if len(self.dec_c) <= B:
                    self.general_step()
                    continue
            elif len(pref) == 1 and len(self.dec_c) <= B and next(reversed(self.run_order)) == pref[0]:
                self.general_step()
                continue
            self.explicit_fallback()

    def admit_arrivals(self) -> None:
        """:meth:`_Engine.admit_arrivals`, inlined."""
        n, arrival, inp, out, bs = self.n, self.arrival, self.inp, self.out, self.bs
        t = self.t_sched if self.ahead else self.t
        kv_blocks, waiting = self.cfg.kv_blocks, self.waiting
        r = self.nxt
        while r < n and arrival[r] <= t:
            if -(-(inp[r] + out[r] - 1) // bs) > kv_blocks:
                self.rejected[r] = True  # can never fit: rejected, as vLLM does
            else:
                waiting.append(r)
            r += 1
        self.nxt = r

    def admit_waiting(self, budget: int, entries: list, n_running: int) -> tuple[int, list[int]]:
        """:meth:`_Engine.admit_waiting` with the prefix-cache lookup inlined."""
        waiting, target, cacheable = self.waiting, self.target, self.cacheable
        bs, zero, start, held, progress = self.bs, self.zero_pi, self.start, self.held, self.progress
        room = self.max_running - n_running
        admitted: list[int] = []
        while waiting and budget > 0 and room > 0:
            r = waiting[0]
            cached = self.cached_tokens(r) if cacheable else 0
            chunk = target[r] - cached
            if chunk > budget:
                chunk = budget
            nb = -(-(cached + chunk) // bs)
            if nb > self.free:
                break
            waiting.popleft()
            admitted.append(r)
            room -= 1
            if start[r] != start[r]:  # NaN: first admission
                start[r] = self.t
            self.free -= nb
            held[r] = nb
            progress[r] = cached
            entries.append((0 if zero else cached, chunk, r))
            budget -= chunk
        return budget, admitted

    def explicit_fallback(self) -> None:
        self.materialise()
        order = self.explicit_step(list(self.run_order))
        self.run_order = dict.fromkeys(order)
        self.pref = []
        D, inp, progress, target, generated = self.D, self.inp, self.progress, self.target, self.generated
        for r in order:
            if progress[r] >= target[r]:
                self.dec_add(r, inp[r] + generated[r] - 1 - D)
            else:
                self.pref.append(r)

    def preempt_decoder(self, r: int) -> None:
        c = self.dec_remove(r)
        D = self.D
        self.generated[r] = c + D + 1 - self.inp[r]
        self.release(r, self.blocks_for(c + D))
        self.held[r] = 0
        del self.run_order[r]
        self.progress[r] = 0
        self.target[r] = self.inp[r] + self.generated[r]
        self.waiting.appendleft(r)
        self.preemptions += 1

    def preempt_prefiller(self, r: int) -> None:
        self.pref.remove(r)
        del self.run_order[r]
        self.preempt(r)

    def general_step(self) -> None:
        bs, D = self.bs, self.D
        progress, target, held = self.progress, self.target, self.held
        q = len(self.dec_c)
        budget = self.B - q
        need_d = self.phase[(-D) % bs] if q else 0
        p = self.pref[0] if self.pref else -1
        preempted = False
        if need_d > self.free:
            # victims from the most recently admitted: the prefiller, then decoders from the end,
            # until the remaining decoders' new blocks fit (the sequential rule's outcome)
            if p >= 0:
                self.preempt_prefiller(p)
                p = -1
            while need_d > self.free:
                r = next(reversed(self.run_order))
                if (self.dec_c[r] + D) % bs == 0:
                    need_d -= 1
                self.preempt_decoder(r)
            preempted = True
            q = len(self.dec_c)
            budget = self.B - q
        entries: list[tuple[int, int, int]] = []
        if p >= 0 and budget > 0:
            chunk = min(target[p] - progress[p], budget)
            need_p = -(-(progress[p] + chunk) // bs) - held[p]
            if need_p > self.free - need_d:
                self.preempt_prefiller(p)  # it is the most recently admitted: it preempts itself
                preempted = True
            else:
                self.free -= need_p
                held[p] += need_p
                entries.append((progress[p], chunk, p))
                budget -= chunk
        self.free -= need_d
        if not preempted and self.waiting and budget > 0:
            budget, admitted = self.admit_waiting(budget, entries, len(self.run_order))
            for r in admitted:
                self.run_order[r] = None
            self.pref.extend(admitted)
        if len(entries) == 1:
            e = entries[0]
            p_pi, p_n, ptoks = [e[0]], [e[1]], e[1]
        elif entries:
            p_pi = [e[0] for e in entries]
            p_n = [e[1] for e in entries]
            ptoks = sum(p_n)
        elif q:
            p_pi = p_n = []
            ptoks = 0
        else:
            raise ConfigError("no request can be scheduled: the KV cache is too small for the running set",
                              field="kv_blocks")
        if not q:
            hw = self.step_hw(p_pi, p_n)
        elif self.aggregate:
            if self.need_max:
                m = self.max_cache
                hw = self.step_hw(p_pi, p_n, q, (self.max_c() if m is None else m) + D, self.sum_c + q * D)
            else:
                hw = self.step_hw(p_pi, p_n, q, 0, self.sum_c + q * D,
                                  self.ctx.fm_sum(D) if self.ctx is not None else None)
        else:
            hw = self.step_hw(p_pi, p_n, d_pis=self.d_pis())
        timer = self.timer
        if self.aggregate:  # StepTimer.step_us, inlined
            ovh = timer._ovh.get((len(entries), ptoks, q))
            if ovh is None:
                ovh = timer.overhead_us(len(entries), ptoks, q)
            x = hw + ovh if self.after_idle or not self.overlap else (hw if hw > ovh else ovh)
            dur = math.floor(x + 0.5) if x >= 0 else round_half_away_scalar(x)
            if timer._floor is not None and dur < timer._floor:
                dur = timer._floor
        else:
            dur = timer.step_us(hw, len(entries), ptoks, q, self.after_idle)
        self.after_idle = False
        if self.rec is not None:
            self.record([self.t], [dur], [len(entries) + q], [ptoks], [q])
        self.t_sched = self.t  # the next step was scheduled when this one started
        t = self.t = self.t + dur
        self.n_steps += 1
        self.D = D = D + 1
        generated, out, inp, pref = self.generated, self.out, self.inp, self.pref
        released = self.released  # this step's releases start here
        for _, chunk, r in entries:
            pr = progress[r] = progress[r] + chunk
            if pr >= target[r]:
                pref.remove(r)
                if self.grp[r] >= 0:
                    self.hold(r)
                gen = generated[r]
                if gen == 0:
                    self.ttft[r] = t - self.arrival[r]
                generated[r] = gen = gen + 1
                self.last[r] = dur
                if gen >= out[r]:
                    self.set_e2e(r)
                    self.release(r, held[r], released)
                    held[r] = 0
                    del self.run_order[r]
                elif self.ctx is None:  # dec_add, inlined
                    c = inp[r] + gen - 1 - D
                    self.dec_c[r] = c
                    self.sum_c += c
                    self.phase[c % bs] += 1
                    f = self.last_tick[r] = out[r] + inp[r] - 2 - c
                    heapq.heappush(self.fin_heap, (f, r))
                    if self.need_max:
                        heapq.heappush(self.max_heap, (-c, r))
                        m = self.max_cache
                        if m is not None and c > m:
                            self.max_cache = c
                else:
                    self.dec_add(r, inp[r] + gen - 1 - D)
        if q:
            h = self.fin_heap
            if h and h[0][0] < D:
                self.finish_decoders(dur, released)

    def decode_run(self) -> bool:
        """A run of pure-decode steps until the next event; False if the next step is not one."""
        D, dec_c, B, bs = self.D, self.dec_c, self.B, self.bs
        q = len(dec_c)
        if q > B:
            return False
        need0 = self.phase[(-D) % bs]
        free = self.free
        if need0 > free:
            return False
        waiting = self.waiting
        room = len(self.run_order) < self.max_running and B > q
        evicting = False
        if room and waiting:  # would the head of the queue be admitted in this step?
            r = waiting[0]
            cached = self.cached_tokens(r, free - need0) if self.cacheable else 0
            if -(-(cached + min(self.target[r] - cached, B - q)) // bs) <= free - need0:
                return False
            # its cached prefix may shrink as the run allocates blocks, which can let it in: step by step
            evicting = self.cacheable and self.evictable(r)
        f, r = self.fin_heap[0]
        if r not in dec_c or self.last_tick[r] != f:
            f = self.min_fin()
        k = 1 if evicting else f - D + 1
        if self.max_steps - self.n_steps < k:
            k = self.max_steps - self.n_steps
        if k > 1 and (-(-k // bs)) * q > free and self.new_blocks(k) > free:
            lo, hi = 1, k - 1  # largest k whose new blocks fit (need0 <= free: k = 1 fits)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self.new_blocks(mid) <= free else (lo, mid - 1)
            k = lo
        cut = room and not waiting and self.nxt < self.n  # an arrival could join: stop before its step
        arrival_next = self.arrival[self.nxt] if cut else 0
        t0 = self.t
        rec = self.rec
        if not self.aggregate:
            timer = self.timer
            durs_np = timer.run_us(timer.decode_run_us(np.array(self.d_pis(), dtype=np.int64), k), q)
            k = _cut(durs_np, k, cut, arrival_next - t0)
            self.t = t0 + int(durs_np[:k].sum())
            last = int(durs_np[k - 1])
            durs = durs_np[:k].tolist() if rec is not None else None
        else:
            S0 = self.sum_c + q * D
            tab = self.timer.solo_table(S0 + k) if q == 1 and k > 2 else None
            if tab is not None:  # batch-1 run: durations and their cumulative sums are tabulated per PI
                dur1, cum1 = tab
                base = int(cum1[S0])
                if cut:  # steps j >= 1 start at t0 + cum1[S0 + j] - base; keep those starting before the arrival
                    k = min(k, 1 + int(np.searchsorted(cum1[S0 + 1 : S0 + k], arrival_next - t0 + base,
                                                       side="left")))
                self.t = t0 + int(cum1[S0 + k]) - base
                last = int(dur1[S0 + k - 1])
                durs = dur1[S0 : S0 + k].tolist() if rec is not None else None
            elif self.ctx is not None and rec is None:  # per_request, inlined: Σ f m = C0 + j (C1 + j C2)
                kk, C0, C1, C2, fms = self.ctx.segment(D, k)
                if fms is not None:  # a piece where the MFU is not affine: the general path
                    k, last, durs = self.aggregate_run(q, S0, k, cut, arrival_next)
                else:
                    hw_us, floor, overlap = self.hw_us, self.floor, self.overlap
                    dov = self.timer._dec_ovh
                    ovh = dov[q] if q < len(dov) else self.timer.decode_overhead_us(q)
                    t = t0
                    n = 0
                    last = 0
                    for j in range(kk if kk <= SCALAR_RUN else SCALAR_RUN):
                        x = hw_us(q, 0, S0 + q * j, C0 + j * (C1 + j * C2))
                        x = (x if x > ovh else ovh) if overlap else x + ovh
                        last = math.floor(x + 0.5) if x >= 0 else round_half_away_scalar(x)
                        if floor is not None and last < floor:
                            last = floor
                        t += last
                        n += 1
                        if cut and t >= arrival_next:
                            break
                    else:
                        if n < k:  # the rest of a long run (or of its first segment), general path
                            self.t = t
                            n, last, _ = self.aggregate_run(q, S0, k, cut, arrival_next, n)
                            t = self.t
                    self.t = t
                    k = n
                    durs = None
            elif rec is None:  # the common case, inlined: first steps one by one
                hw_us, floor, overlap = self.hw_us, self.floor, self.overlap
                M0 = ((self.max_c() if self.max_cache is None else self.max_cache) + D) if self.need_max else 0
                dov = self.timer._dec_ovh
                ovh = dov[q] if q < len(dov) else self.timer.decode_overhead_us(q)
                t = t0
                n = 0
                last = 0
                for j in range(k if k <= SCALAR_RUN else SCALAR_RUN):
                    x = hw_us(q, M0 + j, S0 + q * j)
                    x = (x if x > ovh else ovh) if overlap else x + ovh
                    last = math.floor(x + 0.5) if x >= 0 else round_half_away_scalar(x)
                    if floor is not None and last < floor:
                        last = floor
                    t += last
                    n += 1
                    if cut and t >= arrival_next:
                        break
                else:
                    if n < k:  # a long run: the rest vectorised
                        self.t = t
                        n, last, _ = self.aggregate_run(q, S0, k, cut, arrival_next, n)
                        t = self.t
                self.t = t
                k = n
                durs = None
            else:
                k, last, durs = self.aggregate_run(q, S0, k, cut, arrival_next)
        if rec is not None:
            starts = (t0 + np.cumsum([0] + durs[:-1])).tolist()
            self.record(starts, durs, [q] * k, [0] * k, [q] * k)
        self.n_steps += k
        self.t_sched = self.t - last  # the start of the run's last step
        self.free -= need0 if k == 1 else self.new_blocks(k)
        self.D = D = D + k
        if self.fin_heap[0][0] < D:
            self.finish_decoders(last)
        return True

    def aggregate_run(self, q: int, S0: int, k: int, cut: bool, arrival_next: int,
                      done: int = 0) -> tuple[int, int, list | None]:
        """Time decode-only steps ``done .. k - 1`` of a run from the decode statistics; advance ``self.t``.

        Stops after the first step that ends at or after ``arrival_next`` when
        ``cut``.  The first steps are timed one by one with Python floats (a run
        cut by an arrival usually stops after a few), the rest of a long run in
        one vectorised call.  A ``per_request`` run is evaluated in segments
        between two knot crossings of its :class:`~calib.physics.fast.ContextSet`.
        Returns ``(steps done, last duration, durations or None)``.
        """
        timer, ctx, D = self.timer, self.ctx, self.D
        steps = timer.steps
        hw_us = steps.decode_hw_us
        M0 = self.max_c() + D if self.need_max else 0
        ovh = timer._dec_ovh[q] if q < len(timer._dec_ovh) else timer.decode_overhead_us(q)
        floor, overlap = timer._floor, self.overlap
        keep = self.rec is not None
        durs: list | None = [] if keep else None
        t = self.t
        d = 0
        while True:
            kk = k - done
            fms = None
            if ctx is not None:  # Σ f m of the steps: C0 + j (C1 + j C2), or listed
                kk, C0, C1, C2, fms = ctx.segment(D + done, kk)
            M, S = M0 + done, S0 + q * done
            n = 0
            stop = False
            for j in range(kk if kk <= SCALAR_RUN else SCALAR_RUN):
                if ctx is None:
                    x = hw_us(q, M + j, S + q * j)
                else:
                    x = hw_us(q, M + j, S + q * j, C0 + j * (C1 + j * C2) if fms is None else fms[j])
                x = (x if x > ovh else ovh) if overlap else x + ovh
                d = math.floor(x + 0.5) if x >= 0 else round_half_away_scalar(x)
                if floor is not None and d < floor:
                    d = floor
                t += d
                n += 1
                if keep:
                    durs.append(d)
                if cut and t >= arrival_next:
                    stop = True
                    break
            if not stop and n < kk:  # the rest of a long segment, vectorised
                rest = kk - n
                part = timer.run_us(steps.decode_run_hw_us(
                    q, M + n, S + q * n, rest, None if ctx is None else ctx.fm_series(D + done + n, rest)), q)
                m = _cut(part, rest, cut, arrival_next - t)
                t += int(part[:m].sum())
                if keep:
                    durs.extend(part[:m].tolist())
                d = int(part[m - 1])
                n += m
                stop = cut and t >= arrival_next
            done += n
            if stop or done >= k:
                break
        self.t = t
        return done, d, durs


def _cut(durs: np.ndarray, k: int, cut: bool, until: int) -> int:
    """Steps of a run kept when an arrival ``until`` µs after its start cuts it.

    Step ``j >= 1`` runs when step ``j - 1`` ended before the arrival; so the run
    ends with the first step that ends at or after it.
    """
    if not cut or k <= 1:
        return k
    ends = np.cumsum(durs[: k - 1])
    if durs.min() >= 0:
        return min(k, 1 + int(np.searchsorted(ends, until, side="left")))
    return min(k, 1 + int(np.argmax(np.append(ends >= until, True))))
