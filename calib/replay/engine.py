"""A small continuous-batching engine: the replay owns time.

The engine replays requests through a vLLM/BLIS-like scheduler: every step
runs each running request's next token (decode) or next prefill chunk within a
token budget, then admits waiting requests first-come-first-served while the
budget, the running-request cap and the KV-cache blocks allow.  A step lasts
the step model's time plus the overhead model's; progress, TTFT and output
tokens are credited at the end of the step (``roofline-spec.md`` §6.5).

Runs of pure-decode steps between two events (an arrival that can be admitted,
a completion) are evaluated as one vectorised batch of steps, so a replay
costs a few NumPy calls per event rather than per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from calib.errors import ConfigError
from calib.physics.batch import StepBatch
from calib.physics.overhead import OverheadModel
from calib.physics.roofline import round_half_away
from calib.physics.step_model import StepModel

__all__ = ["SchedulerConfig", "EngineResult", "StepTimer", "run_engine"]


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
        KV-cache capacity in blocks; when a running request needs a block and
        none is free, the most recently admitted request is preempted and
        recomputed later (vLLM's recompute preemption).
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


class StepTimer:
    """Step model + overhead model -> integer µs per step, with a memo of hardware times.

    The hardware time of a step does not depend on the overhead, so it is
    memoised by the step's composition and shared across overhead values
    (pass the same ``memo`` dict to timers of the same step model).  Under the
    ``max_context`` decode-attention rule a decode-only step is fully
    determined by ``(q, max PI, sum PI)``, which makes the memo hit often.
    """

    def __init__(self, step_model: StepModel, overhead: OverheadModel | None, memo: dict | None = None):
        self.step_model = step_model
        self.overhead = overhead
        self.memo = {} if memo is None else memo
        self._reduced = step_model.options.decode_attention == "max_context" and step_model.options.variant != "v3"

    def hardware_us(self, batch: StepBatch) -> np.ndarray:
        """Hardware µs of every step of ``batch`` (no memo)."""
        return self.step_model.parts(batch).hardware_s * 1e6

    def decode_run_us(self, pis: np.ndarray, k: int) -> np.ndarray:
        """Hardware µs of ``k`` consecutive pure-decode steps starting at contexts ``pis`` (+1 per step)."""
        q = len(pis)
        j = np.arange(k, dtype=np.int64)
        if self._reduced:
            keys = list(zip([q] * k, (int(pis.max()) + j).tolist(), (int(pis.sum()) + q * j).tolist()))
        else:
            base = np.sort(pis)
            keys = [(q, *(base + jj).tolist()) for jj in range(k)] if q <= 8 else [(q, int(base.sum()) + q * jj,
                                                                                      jj, tuple(base.tolist())) for jj in range(k)]
        memo = self.memo
        out = np.empty(k)
        miss = []
        for idx, key in enumerate(keys):
            v = memo.get(key)
            if v is None:
                miss.append(idx)
            else:
                out[idx] = v
        if miss:
            m = np.asarray(miss, dtype=np.int64)
            steps = np.repeat(np.arange(len(m), dtype=np.int64), q)
            dpi = (pis[None, :] + m[:, None]).reshape(-1)
            empty = np.zeros(0, np.int64)
            vals = self.hardware_us(StepBatch(len(m), empty, empty, empty, steps, dpi))
            out[m] = vals
            for idx, v in zip(miss, vals.tolist()):
                memo[keys[idx]] = v
        return out

    def single_us(self, p_pi: list, p_n: list, d_pi: list) -> float:
        """Hardware µs of one step (memoised)."""
        if self._reduced and d_pi:
            dkey = (len(d_pi), max(d_pi), sum(d_pi))
        else:
            dkey = tuple(sorted(d_pi))
        key = ("s", tuple(sorted(zip(p_pi, p_n))), dkey)
        v = self.memo.get(key)
        if v is None:
            batch = StepBatch.from_arrays(1, prefill_step=[0] * len(p_pi), prefill_pi=p_pi, prefill_n=p_n,
                                          decode_step=[0] * len(d_pi), decode_pi=d_pi)
            v = float(self.hardware_us(batch)[0])
            self.memo[key] = v
        return v

    def combine(self, hw_us: np.ndarray, features: dict) -> np.ndarray:
        """Add the overhead to hardware µs and round half away from zero (with the variant's floor)."""
        ovh = self.overhead.step_us(features, self.step_model.model.num_layers, self.step_model.tp)
        out = round_half_away(hw_us + ovh)
        floor = self.step_model.options.min_step_us
        if floor > 0:
            out = np.maximum(out, int(math.ceil(floor)))
        return out

    def __call__(self, batch: StepBatch) -> np.ndarray:
        feats = {"n_prefill": batch.prefill_count, "prefill_tokens": batch.prefill_tokens,
                 "n_decode": batch.decode_count}
        return np.where(batch.non_empty, self.combine(self.hardware_us(batch), feats), 0)


@dataclass
class EngineResult:
    """Per-request outcome (µs; NaN where a request never got there)."""

    ttft_us: np.ndarray
    e2e_us: np.ndarray
    start_us: np.ndarray
    rejected: np.ndarray
    n_steps: int = 0
    n_preemptions: int = 0
    hit_step_cap: bool = False
    steps: dict = field(default_factory=dict)


def run_engine(timer: StepTimer, arrival_us, input_tokens, output_tokens, cfg: SchedulerConfig,
               prefix_tokens=None, prefix_group=None, first: int = 0, stop_when_idle: bool = False,
               prefix_warm: set | None = None) -> tuple[EngineResult, int]:
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

    Returns
    -------
    (EngineResult, int)
        Results for all requests (untouched ones NaN) and the index of the first
        request not replayed.
    """
    arrival = np.asarray(arrival_us, dtype=np.int64)
    inp = np.asarray(input_tokens, dtype=np.int64)
    out = np.asarray(output_tokens, dtype=np.int64)
    n = len(arrival)
    pre = np.zeros(n, np.int64) if prefix_tokens is None else np.asarray(prefix_tokens, np.int64)
    grp = np.full(n, -1, np.int64) if prefix_group is None else np.asarray(prefix_group, np.int64)
    warm = prefix_warm if prefix_warm is not None else set()
    bs = cfg.block_size
    ttft = np.full(n, np.nan)
    e2e = np.full(n, np.nan)
    start = np.full(n, np.nan)
    rejected = np.zeros(n, bool)

    # per-request mutable state (Python lists: scalar access is faster than NumPy)
    progress = [0] * n        # tokens of the current prefill target already in KV
    target = [int(x) for x in inp]  # prefill target: the prompt, or prompt + generated after a preemption
    generated = [0] * n       # output tokens produced
    blocks_held = [0] * n
    last_step = [0] * n
    running: list[int] = []
    waiting: list[int] = []   # FCFS; preempted requests go back to the front
    free_blocks = cfg.kv_blocks
    t = int(arrival[first]) if first < n else 0
    nxt = first
    n_steps = 0
    preemptions = 0
    hit_cap = False
    rec: dict[str, list[int]] = {"start_us": [], "duration_us": [], "batch_size": [], "prefill_tokens": [],
                                 "decode_tokens": []}

    def blocks_for(tokens: int) -> int:
        return -(-tokens // bs)

    def record(starts, durs, batch_sizes, ptoks, dtoks) -> None:
        if cfg.record_steps:
            rec["start_us"].extend(starts)
            rec["duration_us"].extend(durs)
            rec["batch_size"].extend(batch_sizes)
            rec["prefill_tokens"].extend(ptoks)
            rec["decode_tokens"].extend(dtoks)

    def finish(r: int) -> None:
        nonlocal free_blocks
        running.remove(r)
        e2e[r] = t - arrival[r] + (last_step[r] if cfg.phantom_last_step and out[r] > 1 else 0)
        free_blocks += blocks_held[r]
        blocks_held[r] = 0

    def preempt(victim: int) -> None:
        nonlocal free_blocks, preemptions
        running.remove(victim)
        free_blocks += blocks_held[victim]
        blocks_held[victim] = 0
        progress[victim] = 0
        target[victim] = int(inp[victim] + generated[victim])
        waiting.insert(0, victim)
        preemptions += 1

    while True:
        while nxt < n and arrival[nxt] <= t:
            r = nxt
            nxt += 1
            if blocks_for(int(inp[r] + out[r])) > cfg.kv_blocks:
                rejected[r] = True  # can never fit: rejected, as vLLM does
                continue
            waiting.append(r)
        if not running and not waiting:
            if nxt >= n or stop_when_idle:
                break
            t = int(arrival[nxt])
            continue
        if n_steps >= cfg.max_steps:
            hit_cap = True
            break

        # ---- fast path: a run of pure-decode steps until the next event ----------
        admissible = bool(waiting) and len(running) < cfg.max_running
        if running and not admissible and all(progress[r] >= target[r] for r in running):
            gen = np.array([generated[r] for r in running], dtype=np.int64)
            lens = np.array([int(inp[r]) for r in running], dtype=np.int64) + gen  # KV tokens after next step
            held = np.array([blocks_held[r] for r in running], dtype=np.int64)
            k = int(min(int(out[r]) - generated[r] for r in running))
            k = min(k, cfg.max_steps - n_steps)
            # largest k whose extra KV blocks fit in the free ones
            extra = lambda kk: int(np.maximum(-(-(lens + kk - 1) // bs) - held, 0).sum())  # noqa: E731
            if extra(k) > free_blocks:
                lo, hi = 0, k
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if extra(mid) <= free_blocks else (lo, mid - 1)
                k = lo
            if k >= 1:
                q = len(running)
                feats = {"n_prefill": np.zeros(k, np.int64), "prefill_tokens": np.zeros(k, np.int64),
                         "n_decode": np.full(k, q, np.int64)}
                durs = timer.combine(timer.decode_run_us(lens - 1, k), feats)
                ends = t + np.cumsum(durs)
                if nxt < n:  # an arrival that could be admitted ends the run at the step it would join
                    starts = ends - durs
                    k = max(1, min(k, int(np.searchsorted(starts, arrival[nxt], side="left"))))
                    durs, ends = durs[:k], ends[:k]
                record((ends - durs).tolist(), durs.tolist(), [q] * k, [0] * k, [q] * k)
                t = int(ends[-1])
                n_steps += k
                done = []
                for r in running:
                    generated[r] += k
                    last_step[r] = int(durs[-1])
                    need = blocks_for(int(inp[r] + generated[r] - 1))
                    if need > blocks_held[r]:
                        free_blocks -= need - blocks_held[r]
                        blocks_held[r] = need
                    if generated[r] >= out[r]:
                        done.append(r)
                for r in done:
                    finish(r)
                continue

        # ---- general step -----------------------------------------------------------
        budget = cfg.max_scheduled_tokens
        p_pi: list[int] = []
        p_n: list[int] = []
        p_req: list[int] = []
        d_req: list[int] = []
        for r in list(running):  # running requests first, in admission order
            if budget <= 0:
                break
            if r not in running:  # preempted earlier in this loop
                continue
            if progress[r] >= target[r]:
                need = blocks_for(int(inp[r] + generated[r]))
                while need - blocks_held[r] > free_blocks and len(running) > 1:
                    victim = running[-1] if running[-1] != r else running[-2]
                    if victim in d_req:
                        d_req.remove(victim)
                        budget += 1
                    if victim in p_req:
                        i = p_req.index(victim)
                        budget += p_n[i]
                        del p_req[i], p_pi[i], p_n[i]
                    preempt(victim)
                if need > blocks_held[r]:
                    free_blocks -= need - blocks_held[r]
                    blocks_held[r] = need
                d_req.append(r)
                budget -= 1
            else:
                chunk = min(target[r] - progress[r], budget)
                p_pi.append(progress[r])
                p_n.append(chunk)
                p_req.append(r)
                budget -= chunk
        while waiting and budget > 0 and len(running) < cfg.max_running:  # then waiting ones, FCFS
            r = waiting[0]
            cached = 0
            if cfg.prefix_cache and grp[r] >= 0 and int(grp[r]) in warm:
                cached = max(0, min(int(pre[r]) // bs * bs, target[r] - 1))
            chunk = min(target[r] - cached, budget)
            blocks_needed = blocks_for(cached + chunk)
            if blocks_needed > free_blocks:
                break
            waiting.pop(0)
            running.append(r)
            if np.isnan(start[r]):
                start[r] = t
            free_blocks -= blocks_needed
            blocks_held[r] = blocks_needed
            progress[r] = cached
            p_pi.append(0 if cfg.cached_prefill_pi == "zero" else cached)
            p_n.append(chunk)
            p_req.append(r)
            budget -= chunk
        if not p_req and not d_req:
            raise ConfigError("no request can be scheduled: the KV cache is too small for the running set",
                              field="kv_blocks")
        hw = timer.single_us(p_pi, p_n, [int(inp[r] + generated[r] - 1) for r in d_req])
        feats = {"n_prefill": np.array([len(p_req)]), "prefill_tokens": np.array([sum(p_n)]),
                 "n_decode": np.array([len(d_req)])}
        dur = int(timer.combine(np.array([hw]), feats)[0])
        record([t], [dur], [len(p_req) + len(d_req)], [sum(p_n)], [len(d_req)])
        t += dur
        n_steps += 1
        finished = []
        for r, chunk in zip(p_req, p_n):
            progress[r] += chunk
            need = blocks_for(progress[r])
            if need > blocks_held[r]:
                free_blocks -= need - blocks_held[r]
                blocks_held[r] = need
            if progress[r] >= target[r]:
                if grp[r] >= 0:
                    warm.add(int(grp[r]))
                if generated[r] == 0:
                    ttft[r] = t - arrival[r]
                    generated[r] = 1
                last_step[r] = dur
                if generated[r] >= out[r]:
                    finished.append(r)
        for r in d_req:
            generated[r] += 1
            last_step[r] = dur
            if generated[r] >= out[r]:
                finished.append(r)
        for r in finished:
            finish(r)

    steps = {k: np.array(v, np.int64) for k, v in rec.items()} if cfg.record_steps else {}
    return EngineResult(ttft, e2e, start, rejected, n_steps, preemptions, hit_cap, steps), nxt
