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

A step lasts the step model's time plus the overhead model's; progress, TTFT
and output tokens are credited at the end of the step (``roofline-spec.md``
§6.5).  A request whose prompt plus output can never fit in the KV cache is
rejected on arrival (``EngineResult.rejected``).  Every step makes progress (the
oldest running request can always run), so a replay always ends; ``max_steps``
caps its length (``EngineResult.hit_step_cap``).

Two implementations of the same scheduler:

* the default one keeps the decoding requests as an aggregate (count, max and
  sum of contexts, KV-block phase counts, heaps of finishing ticks), so a step
  costs O(changes) rather than O(running), and evaluates runs of pure-decode
  steps between two events (an admissible arrival, a completion, KV exhaustion)
  in one go with the cached step times of :class:`calib.physics.fast.FastSteps`;
* ``run_engine(..., fast=False)`` is a straightforward step-by-step loop over
  explicit per-request state (the reference the fast one is tested against;
  with ``StepTimer(..., fast=False)`` it also times every step with a plain
  ``StepModel.parts`` call).

Both give the same integer µs per request.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from calib.errors import ConfigError
from calib.physics.batch import StepBatch
from calib.physics.fast import round_half_away_scalar
from calib.physics.overhead import OverheadModel
from calib.physics.roofline import round_half_away
from calib.physics.step_model import StepModel

__all__ = ["SchedulerConfig", "EngineResult", "StepTimer", "run_engine"]

#: Decode runs up to this many steps are timed step by step in Python; longer ones with NumPy.
_SCALAR_RUN = 12


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
        once a request of the same prefix group has finished its prefill.
    cached_prefill_pi : {"zero", "cached"}
        The PI a newly scheduled request with a cache hit shows its first step:
        ``"zero"`` is the reference behaviour (spec §2: cached tokens add no KV
        read), ``"cached"`` uses the number of cached tokens.
    phantom_last_step : bool
        Add the last step's time to E2E once more (reference before 08d5abc6).
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
    max_steps: int = 50_000_000
    record_steps: bool = False

    def __post_init__(self) -> None:
        for name in ("max_scheduled_tokens", "max_running", "block_size", "kv_blocks", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"must be an integer >= 1, got {value!r}", field=name)
        if self.cached_prefill_pi not in ("zero", "cached"):
            raise ConfigError("choose 'zero' or 'cached'", field="cached_prefill_pi")


def _features(n_prefill, prefill_tokens, n_decode) -> dict:
    return {"n_prefill": np.asarray(n_prefill), "prefill_tokens": np.asarray(prefill_tokens),
            "n_decode": np.asarray(n_decode)}


class StepTimer:
    """Step model + overhead model -> integer µs per step.

    Hardware times come from ``step_model.fast`` (:class:`calib.physics.fast.FastSteps`),
    whose caches belong to the step model and so are shared by every timer,
    replay and overhead value of that step model.  The overhead of a step
    depends only on its features ``(n_prefill, prefill_tokens, n_decode)``
    (overhead models are elementwise in them); it is memoised per timer.

    The engine uses ``step_hw_us``, ``step_us``, ``decode_run_us`` and
    ``run_us`` (and, when ``aggregate`` is true, ``steps``, ``overhead_us`` and
    ``solo_table``); a test double needs only the first four and
    ``aggregate = False``.

    Parameters
    ----------
    step_model : StepModel
    overhead : OverheadModel or None
        ``None``: no overhead.
    memo : dict, optional
        Ignored (the step-time caches live in ``step_model.fast``); still
        accepted because :class:`calib.replay.synchronous.SyncReplay` passes it.
    fast : bool
        ``False`` times every step with a plain ``step_model.parts`` call (the
        straightforward reference, no caches; slow).
    """

    def __init__(self, step_model: StepModel, overhead: OverheadModel | None, memo: dict | None = None, *,
                 fast: bool = True):
        self.step_model = step_model
        self.overhead = overhead
        self.fast = bool(fast)
        self.steps = step_model.fast
        self._ovh: dict[tuple[int, int, int], float] = {}
        self._solo: tuple[np.ndarray, np.ndarray] | None = None
        floor = step_model.options.min_step_us
        self._floor = int(math.ceil(floor)) if floor > 0 else None
        self._L, self._tp = step_model.model.num_layers, step_model.tp

    # ---- hardware time ----------------------------------------------------------------------

    @property
    def aggregate(self) -> bool:
        """Decode-only steps depend only on ``(q, max PI, sum PI)`` (and the fast path is on)."""
        return self.fast and self.steps.aggregate

    def hardware_us(self, batch: StepBatch) -> np.ndarray:
        """Hardware µs of every step of ``batch`` (one plain ``StepModel.parts`` call)."""
        return self.step_model.parts(batch).hardware_s * 1e6

    def step_hw_us(self, p_pi, p_n, q: int = 0, max_pi: int = 0, sum_pi: int = 0, d_pis=None) -> float:
        """Hardware µs of one step (see :meth:`calib.physics.fast.FastSteps.step_hw_us`)."""
        if self.fast:
            return self.steps.step_hw_us(p_pi, p_n, q, max_pi, sum_pi, d_pis)
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

        A miss computes, in one vectorised call, the overhead of a block of 16
        decode counts with the same prefill features.
        """
        key = (n_prefill, prefill_tokens, n_decode)
        v = self._ovh.get(key)
        if v is None:
            if self.overhead is None:
                v = self._ovh[key] = 0.0
            else:
                qs = np.arange(n_decode // 16 * 16, n_decode // 16 * 16 + 16)
                if n_prefill == 0 and n_decode < 16:
                    qs = qs[1:]  # empty steps have no overhead
                vals = self.overhead.step_us(_features(np.full(len(qs), n_prefill), np.full(len(qs), prefill_tokens),
                                                       qs), self._L, self._tp)
                vals = np.broadcast_to(np.asarray(vals, dtype=np.float64), (len(qs),)).tolist()
                self._ovh.update(((n_prefill, prefill_tokens, qq), vv) for qq, vv in zip(qs.tolist(), vals))
                v = self._ovh[key]
        return v

    def step_us(self, hw_us: float, n_prefill: int, prefill_tokens: int, n_decode: int) -> int:
        """Integer µs of one non-empty step: hardware + overhead, rounded half away from zero, floored."""
        d = round_half_away_scalar(hw_us + self.overhead_us(n_prefill, prefill_tokens, n_decode))
        if self._floor is not None and d < self._floor:
            d = self._floor
        return d

    def run_us(self, hw_us: np.ndarray, n_decode: int) -> np.ndarray:
        """Integer µs of pure-decode steps of ``n_decode`` requests."""
        x = hw_us + self.overhead_us(0, 0, n_decode)
        out = np.floor(x + 0.5).astype(np.int64) if x.size and x.min() >= 0 else round_half_away(x)
        if self._floor is not None:
            out = np.maximum(out, self._floor)
        return out

    def prime(self, n_prefill, prefill_tokens, n_decode) -> None:
        """Memoise the overhead of these step features (arrays) with one vectorised call.

        Overhead models are elementwise in the features, so this only saves time.
        """
        if self.overhead is None:
            return
        keys = np.unique(np.stack([np.asarray(n_prefill, np.int64), np.asarray(prefill_tokens, np.int64),
                                   np.asarray(n_decode, np.int64)], axis=1), axis=0)
        keys = keys[(keys[:, 0] + keys[:, 2]) > 0]
        if not len(keys):
            return
        vals = self.overhead.step_us(_features(keys[:, 0], keys[:, 1], keys[:, 2]), self._L, self._tp)
        vals = np.broadcast_to(np.asarray(vals, dtype=np.float64), (len(keys),))
        self._ovh.update(zip(map(tuple, keys.tolist()), vals.tolist()))

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

    def combine(self, hw_us: np.ndarray, features: dict) -> np.ndarray:
        """Add the overhead to hardware µs and round half away from zero (with the variant's floor)."""
        ovh = 0.0 if self.overhead is None else self.overhead.step_us(features, self._L, self._tp)
        out = round_half_away(hw_us + ovh)
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
        Prefix groups whose prefix is already cached (updated in place).
    fast : bool
        ``False``: the straightforward step-by-step implementation (same results, slower).

    Returns
    -------
    (EngineResult, int)
        Results for all requests (untouched ones NaN) and the index of the first
        request not replayed.
    """
    eng = (_FastEngine if fast else _Engine)(timer, arrival_us, input_tokens, output_tokens, cfg, prefix_tokens,
                                             prefix_group, first, stop_when_idle, prefix_warm)
    return eng.run()


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
        self.running: list[int] = []  # admission order
        self.waiting: deque[int] = deque()  # FCFS; preempted requests go back to the front
        self.free = cfg.kv_blocks
        self.first = first
        self.t = self.arrival[first] if first < n else 0
        self.nxt = first
        self.n_steps = 0
        self.preemptions = 0
        self.hit_cap = False
        self.rec = {"start_us": [], "duration_us": [], "batch_size": [], "prefill_tokens": [],
                    "decode_tokens": []} if cfg.record_steps else None

    # ---- shared pieces ---------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def admit_arrivals(self) -> None:
        n, arrival, t = self.n, self.arrival, self.t
        while self.nxt < n and arrival[self.nxt] <= t:
            r = self.nxt
            self.nxt += 1
            if self.blocks_for(self.inp[r] + self.out[r] - 1) > self.cfg.kv_blocks:
                self.rejected[r] = True  # can never fit: rejected, as vLLM does
                continue
            self.waiting.append(r)

    def cached_tokens(self, r: int) -> int:
        if self.cfg.prefix_cache and self.grp[r] >= 0 and self.grp[r] in self.warm:
            return max(0, min(self.pre[r] // self.bs * self.bs, self.target[r] - 1))
        return 0

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
        cfg = self.cfg
        while True:
            self.admit_arrivals()
            if self.idle():
                if self.nxt >= self.n or self.stop_when_idle:
                    break
                self.t = self.arrival[self.nxt]
                continue
            if self.n_steps >= cfg.max_steps:
                self.hit_cap = True
                break
            self.step()
        return self.result()

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
        dur = self.timer.step_us(hw, len(entries), ptoks, len(d_req))
        if self.rec is not None:
            self.record([self.t], [dur], [len(entries) + len(d_req)], [ptoks], [len(d_req)])
        self.t += dur
        self.n_steps += 1
        finished = []
        for _, chunk, r in entries:
            progress[r] += chunk
            if progress[r] >= target[r]:
                if self.grp[r] >= 0:
                    self.warm.add(self.grp[r])
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
            for r in finished:
                self.set_e2e(r)
                self.free += held[r]
                held[r] = 0
            running = [r for r in running if r not in done]
        return running

    def preempt(self, victim: int) -> None:
        """Free the victim's blocks; it recomputes prompt + generated tokens later (front of the queue)."""
        self.free += self.held[victim]
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
    ``count``, ``Σ c``, a max-heap of ``c``, a min-heap of ``F`` (both with lazy
    deletion) and the number of requests per block phase ``c % block_size``.
    Explicit ``generated``/``held`` of decoding requests are stale while they
    are in the aggregate.  At most one running request is mid-prefill at a time,
    and it is the last admitted one (admission stops when a chunk uses up the
    budget); steps that break that shape or starve decodes of budget
    (``running > max_scheduled_tokens``) go through the explicit step.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.run_order: dict[int, None] = {}  # running requests in admission order
        self.pref: list[int] = []            # running requests mid-prefill (explicit state)
        self.dec_c: dict[int, int] = {}       # decoding request -> c
        self.sum_c = 0
        self.D = 0
        self.phase = [0] * self.bs
        self.fin_heap: list[tuple[int, int]] = []
        self.max_heap: list[tuple[int, int]] = []
        n, first = self.n, self.first
        self.aggregate = bool(getattr(self.timer, "aggregate", False))
        steps = getattr(self.timer, "steps", None)
        q_max = min(self.cfg.max_running, max(n - first, 1))
        if first < n and getattr(steps, "scalar", False):
            kv_max = max(a + b for a, b in zip(self.inp[first:], self.out[first:]))
            steps.reserve(q_max, kv_max, self.cfg.max_scheduled_tokens + q_max)

    # ---- aggregate bookkeeping ---------------------------------------------------------------

    def idle(self) -> bool:
        return not self.run_order and not self.waiting

    def dec_add(self, r: int, c: int) -> None:
        self.dec_c[r] = c
        self.sum_c += c
        self.phase[c % self.bs] += 1
        heapq.heappush(self.fin_heap, (self.out[r] + self.inp[r] - 2 - c, r))
        heapq.heappush(self.max_heap, (-c, r))

    def dec_remove(self, r: int) -> int:
        c = self.dec_c.pop(r)
        self.sum_c -= c
        self.phase[c % self.bs] -= 1
        return c

    def max_c(self) -> int:
        h, dec_c = self.max_heap, self.dec_c
        while dec_c.get(h[0][1]) != -h[0][0]:
            heapq.heappop(h)
        return -h[0][0]

    def min_fin(self) -> int:
        h, dec_c, out, inp = self.fin_heap, self.dec_c, self.out, self.inp
        while True:
            f, r = h[0]
            c = dec_c.get(r)
            if c is not None and out[r] + inp[r] - 2 - c == f:
                return f
            heapq.heappop(h)

    def finish_decoders(self, dur: int) -> None:
        """Finish every decoding request whose last tick was ``D - 1``."""
        h = self.fin_heap
        last_tick = self.D - 1
        while self.dec_c and self.min_fin() <= last_tick:
            _, r = heapq.heappop(h)
            c = self.dec_remove(r)
            self.last[r] = dur
            self.set_e2e(r)
            self.free += self.blocks_for(c + self.D)
            del self.run_order[r]

    def new_blocks(self, k: int) -> int:
        """KV blocks the decoding requests newly need over the next ``k`` ticks."""
        bs, D = self.bs, self.D
        if len(self.dec_c) <= 8:
            return sum((c + D + k + bs - 1) // bs - (c + D + bs - 1) // bs for c in self.dec_c.values())
        cycles, rem = divmod(k, bs)
        ph, phase = (-D) % bs, self.phase
        return cycles * len(self.dec_c) + sum(phase[(ph - j) % bs] for j in range(rem))

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

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> None:
        if not self.pref and self.dec_c and self.decode_run():
            return
        B = self.cfg.max_scheduled_tokens
        q = len(self.dec_c)
        pref = self.pref
        if q <= B and (not pref or (len(pref) == 1 and next(reversed(self.run_order)) == pref[0])):
            self.general_step()
        else:
            self.explicit_fallback()

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
        self.free += self.blocks_for(c + D)
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
        cfg, bs, D = self.cfg, self.bs, self.D
        progress, target, held = self.progress, self.target, self.held
        q = len(self.dec_c)
        budget = cfg.max_scheduled_tokens - q
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
            budget = cfg.max_scheduled_tokens - q
        entries: list[tuple[int, int, int]] = []
        if p >= 0 and budget > 0:
            chunk = min(target[p] - progress[p], budget)
            need_p = self.blocks_for(progress[p] + chunk) - held[p]
            if need_p > self.free - need_d:
                self.preempt_prefiller(p)  # it is the most recently admitted: it preempts itself
                preempted = True
            else:
                self.free -= need_p
                held[p] += need_p
                entries.append((progress[p], chunk, p))
                budget -= chunk
        self.free -= need_d
        if not preempted:
            budget, admitted = self.admit_waiting(budget, entries, len(self.run_order))
            for r in admitted:
                self.run_order[r] = None
            self.pref.extend(admitted)
        if not entries and not q:
            raise ConfigError("no request can be scheduled: the KV cache is too small for the running set",
                              field="kv_blocks")
        p_pi = [e[0] for e in entries]
        p_n = [e[1] for e in entries]
        if q and self.aggregate:
            hw = self.timer.step_hw_us(p_pi, p_n, q, self.max_c() + D, self.sum_c + q * D)
        else:
            hw = self.timer.step_hw_us(p_pi, p_n, d_pis=self.d_pis())
        ptoks = sum(p_n)
        dur = self.timer.step_us(hw, len(entries), ptoks, q)
        if self.rec is not None:
            self.record([self.t], [dur], [len(entries) + q], [ptoks], [q])
        self.t += dur
        self.n_steps += 1
        self.D = D = D + 1
        generated, out, inp = self.generated, self.out, self.inp
        for _, chunk, r in entries:
            progress[r] += chunk
            if progress[r] >= target[r]:
                self.pref.remove(r)
                if self.grp[r] >= 0:
                    self.warm.add(self.grp[r])
                if generated[r] == 0:
                    self.ttft[r] = self.t - self.arrival[r]
                generated[r] += 1
                self.last[r] = dur
                if generated[r] >= out[r]:
                    self.set_e2e(r)
                    self.free += held[r]
                    held[r] = 0
                    del self.run_order[r]
                else:
                    self.dec_add(r, inp[r] + generated[r] - 1 - D)
        if q:
            self.finish_decoders(dur)

    def decode_run(self) -> bool:
        """A run of pure-decode steps until the next event; False if the next step is not one."""
        cfg, bs, D = self.cfg, self.bs, self.D
        q = len(self.dec_c)
        B = cfg.max_scheduled_tokens
        if q > B:
            return False
        phase = self.phase
        ph = (-D) % bs
        need0 = phase[ph]
        if need0 > self.free:
            return False
        room = len(self.run_order) < cfg.max_running and B > q
        if room and self.waiting:  # would the head of the queue be admitted in this step?
            r = self.waiting[0]
            cached = self.cached_tokens(r)
            if self.blocks_for(cached + min(self.target[r] - cached, B - q)) <= self.free - need0:
                return False
        k = min(self.min_fin() - D + 1, cfg.max_steps - self.n_steps)
        if k > 1 and (-(-k // bs)) * q > self.free and self.new_blocks(k) > self.free:
            lo, hi = 1, k - 1  # largest k whose new blocks fit (need0 <= free: k = 1 fits)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self.new_blocks(mid) <= self.free else (lo, mid - 1)
            k = lo
        cut = room and not self.waiting and self.nxt < self.n  # an arrival could join: stop before its step
        arrival_next = self.arrival[self.nxt] if cut else 0
        timer = self.timer
        t0 = self.t
        rec = self.rec
        if self.aggregate:
            M0, S0 = self.max_c() + D, self.sum_c + q * D
            tab = timer.solo_table(M0 + k) if q == 1 and k > 2 else None
        else:
            tab = None
        if tab is not None:  # batch-1 run: durations and their cumulative sums are tabulated per PI
            dur1, cum1 = tab
            base = int(cum1[M0])
            if cut:  # steps j >= 1 start at t0 + cum1[M0 + j] - base; keep those starting before the arrival
                k = min(k, 1 + int(np.searchsorted(cum1[M0 + 1 : M0 + k], arrival_next - t0 + base, side="left")))
            self.t = t0 + int(cum1[M0 + k]) - base
            last = int(dur1[M0 + k - 1])
            durs = dur1[M0 : M0 + k].tolist() if rec is not None else None
        elif self.aggregate and k <= _SCALAR_RUN:
            hw_us = timer.steps.decode_hw_us
            ovh = timer.overhead_us(0, 0, q)
            rnd = round_half_away_scalar if ovh < 0 else _round_pos
            floor = timer._floor
            durs = []
            tt = t0
            for j in range(k):
                d = rnd(hw_us(q, M0 + j, S0 + q * j) + ovh)
                if floor is not None and d < floor:
                    d = floor
                durs.append(d)
                tt += d
                if cut and tt >= arrival_next:
                    break
            k = len(durs)
            self.t = tt
            last = durs[-1]
        else:
            if self.aggregate:
                hw = timer.steps.decode_run_hw_us(q, M0, S0, k)
            else:
                hw = timer.decode_run_us(np.array(self.d_pis(), dtype=np.int64), k)
            durs_np = timer.run_us(hw, q)
            ends = np.cumsum(durs_np)
            if cut:
                if durs_np.min() >= 0:  # step j >= 1 starts at t0 + ends[j - 1]
                    k = min(k, 1 + int(np.searchsorted(ends[: k - 1], arrival_next - t0, side="left")))
                else:  # not monotone: the first step ending at or after the arrival is the last
                    k = min(k, 1 + int(np.argmax(np.append(ends[: k - 1] >= arrival_next - t0, True))))
            self.t = t0 + int(ends[k - 1])
            last = int(durs_np[k - 1])
            durs = durs_np[:k].tolist() if rec is not None else None
        if rec is not None:
            starts = (t0 + np.cumsum([0] + durs[:-1])).tolist()
            self.record(starts, durs, [q] * k, [0] * k, [q] * k)
        self.n_steps += k
        self.free -= need0 if k == 1 else self.new_blocks(k)
        self.D = D + k
        self.finish_decoders(last)
        return True
