"""Replay of a synchronous (concurrency-1) benchmark, the way the reference did (spec §10).

Requests arrive open-loop at fixed intervals ``i * int(1e6 / rate)`` µs.  When
every predicted request ends before the next one arrives, the requests are
independent and each one's steps are known in advance: the replay evaluates
the hardware time of all those solo steps once (:class:`SyncReplay` caches
them) and an overhead value then costs a few array operations.  Where a
predicted request runs past the next arrival, the overlapping stretch (a busy
period) is replayed by the continuous-batching engine, which produces the
batch-2 decode and mixed steps the reference saw (one engine, restarted
between the busy periods: :class:`calib.replay.engine.BusyPeriods`).  The
engine's step times come from ``step_model.fast`` (cached per step model, so
shared by every overhead value), and a busy period costs a few operations per
event (arrival, completion), not per step.  The result is identical to
replaying every request through :func:`calib.replay.engine.run_engine`.

The phantom last step only adds each request's last step to its E2E, so a
replay runs without it and adds it afterwards (:meth:`SyncReplay.run`,
``phantom``): one replay serves both replay modes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

import numpy as np

from calib.errors import DataError
from calib.physics.batch import StepBatch
from calib.physics.overhead import OverheadModel
from calib.physics.step_model import StepModel
from calib.replay.engine import BusyPeriods, SchedulerConfig, StepTimer, overhead_keys

__all__ = ["SyncRequests", "SyncReplay", "RequestTimes", "fixed_interval_arrivals"]


def fixed_interval_arrivals(n: int, rate: float) -> np.ndarray:
    """``i * int(1e6 / rate)`` µs for ``i = 0..n-1`` (int64 truncation, spec §6.4).

    >>> fixed_interval_arrivals(3, 0.773634).tolist()
    [0, 1292600, 2585200]
    """
    if not rate > 0:
        raise DataError(f"rate must be > 0, got {rate!r}", field="rate")
    return np.arange(n, dtype=np.int64) * int(1e6 / rate)


@dataclass(frozen=True)
class SyncRequests:
    """The requests of one synchronous experiment.

    ``input_tokens`` includes the shared prefix of ``prefix_tokens`` tokens.
    """

    arrival_us: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    prefix_tokens: int = 0

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, rate: float, prefix_tokens: int = 0) -> "SyncRequests":
        """From an ``(n, 2)`` array of ``[prompt_tokens (without prefix), output_tokens]``."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 2 or lengths.shape[1] != 2 or len(lengths) == 0:
            raise DataError("request lengths must be a non-empty (n, 2) array", field="lengths")
        if (lengths[:, 0] < 0).any() or (lengths[:, 1] < 1).any():
            raise DataError("prompt tokens must be >= 0 and output tokens >= 1", field="lengths")
        inp = lengths[:, 0] + int(prefix_tokens)
        if (inp < 1).any():
            raise DataError("a request needs at least one input token", field="lengths")
        return cls(fixed_interval_arrivals(len(lengths), rate), inp, lengths[:, 1].copy(), int(prefix_tokens))

    @property
    def n(self) -> int:
        return len(self.arrival_us)


@dataclass(frozen=True)
class RequestTimes:
    """Per-request predictions in µs (E2E includes the phantom step when the replay adds it).

    ``phantom_us`` (when known) is what the phantom step would add to each
    request's E2E: its last step's duration where it has more than one output
    token, else 0; :meth:`with_phantom` adds it.
    """

    ttft_us: np.ndarray
    e2e_us: np.ndarray
    output_tokens: np.ndarray
    overlapped: int = 0
    phantom_us: np.ndarray | None = None

    def with_phantom(self) -> "RequestTimes":
        """These times with the phantom step added to E2E (``phantom_us`` must be known)."""
        if self.phantom_us is None:
            raise ValueError("the phantom step of these times is not known (or already added)")
        return replace(self, e2e_us=self.e2e_us + self.phantom_us, phantom_us=None)

    @property
    def itl_us(self) -> np.ndarray:
        """``(E2E - TTFT) / (O - 1)``; NaN where O <= 1 or E2E <= TTFT (spec §6.6)."""
        ok = (self.output_tokens > 1) & (self.e2e_us > self.ttft_us)
        out = np.full(len(self.ttft_us), np.nan)
        out[ok] = (self.e2e_us[ok] - self.ttft_us[ok]) / (self.output_tokens[ok] - 1)
        return out


class SyncReplay:
    """A synchronous experiment bound to a step model, with its solo steps cached.

    Parameters
    ----------
    step_model : StepModel
    requests : SyncRequests
    scheduler : SchedulerConfig, optional
        Reference defaults (2048-token chunks, 256 running, 16-token blocks, phantom step on).

    Examples
    --------
    One request of 512 prompt tokens and 4 output tokens (spec §7.5):

    >>> from calib.physics import StepModel
    >>> from calib.physics.overhead import PerLayer
    >>> reqs = SyncRequests.from_lengths([[512, 4]], rate=1.0)
    >>> times = SyncReplay(StepModel.build("llama-2-7b-hf", 1), reqs).run(PerLayer(100.0))
    >>> int(times.ttft_us[0]), int(times.e2e_us[0])
    (16466, 48441)
    """

    def __init__(self, step_model: StepModel, requests: SyncRequests, scheduler: SchedulerConfig | None = None):
        self.step_model = step_model
        self.requests = requests
        self.scheduler = scheduler or SchedulerConfig()
        # the engine replays without the phantom step: run() adds it from each request's last step
        self._engine_cfg = replace(self.scheduler, phantom_last_step=False)
        self._build_solo_steps()

    def _build_solo_steps(self) -> None:
        cfg, req = self.scheduler, self.requests
        block = cfg.block_size
        budget = cfg.max_scheduled_tokens
        p_req, p_pi, p_n, p_first = [], [], [], []
        for i in range(req.n):
            inp = int(req.input_tokens[i])
            cached = 0
            if cfg.prefix_cache and i > 0 and req.prefix_tokens > 0:
                cached = max(0, min(req.prefix_tokens // block * block, inp - 1))
            progress = cached
            first = True
            while progress < inp:
                chunk = min(budget, inp - progress)
                p_pi.append(0 if first and cfg.cached_prefill_pi == "zero" else progress)
                p_n.append(chunk)
                p_req.append(i)
                p_first.append(first)
                progress += chunk
                first = False
        out = req.output_tokens.astype(np.int64)
        n_dec = np.maximum(out - 1, 0)
        d_req = np.repeat(np.arange(req.n), n_dec)
        offsets = np.arange(len(d_req)) - np.repeat(np.cumsum(n_dec) - n_dec, n_dec)
        d_pi = req.input_tokens[d_req] + offsets
        n_p, n_d = len(p_req), len(d_req)
        # steps: all prefill chunks first, then all decode steps (one entry per step)
        batch = StepBatch(
            n_p + n_d,
            np.arange(n_p, dtype=np.int64), np.asarray(p_pi, np.int64), np.asarray(p_n, np.int64),
            np.arange(n_p, n_p + n_d, dtype=np.int64), d_pi.astype(np.int64),
        )
        self._hw_us = self.step_model.parts(batch).hardware_s * 1e6
        # the overhead of a solo step depends on its features only: computed once per distinct feature row
        self._solo_keys, self._solo_features = overhead_keys(
            np.r_[np.ones(n_p, np.int64), np.zeros(n_d, np.int64)],
            np.r_[np.asarray(p_n, np.int64), np.zeros(n_d, np.int64)],
            np.r_[np.zeros(n_p, np.int64), np.ones(n_d, np.int64)])
        index = {k: i for i, k in enumerate(self._solo_keys)}
        self._solo_index = np.array([index[(1, c, 0)] for c in p_n] + [index.get((0, 0, 1), 0)] * n_d, np.int64)
        self._step_req = np.r_[np.asarray(p_req, np.int64), d_req]
        self._is_prefill = np.r_[np.ones(n_p, bool), np.zeros(n_d, bool)]
        # index of each request's last step (for the phantom step)
        last = np.full(req.n, -1, np.int64)
        np.maximum.at(last, self._step_req, np.arange(n_p + n_d))
        self._last_step = last
        self.n_solo_steps = n_p + n_d
        need = -(-(req.input_tokens + np.maximum(out, 1) - 1) // block)
        self._never_fits = bool((need > cfg.kv_blocks).any())
        # step features the overlapping stretches are likely to need: a prefill chunk joined by a few
        # decodes, and small pure-decode batches (their overheads are then computed in one call per run)
        chunks = np.unique(np.asarray(p_n, np.int64))
        few = np.arange(4)
        likely = overhead_keys(np.r_[np.ones(len(chunks) * len(few), np.int64), np.zeros(16, np.int64)],
                               np.r_[np.repeat(chunks, len(few)), np.zeros(16, np.int64)],
                               np.r_[np.tile(few, len(chunks)), np.arange(1, 17)])[0]
        # plus the features earlier runs found missing (the same stretches tend to need the same ones)
        self._primed = set(likely)
        self._prime = overhead_keys(*np.array(sorted(self._primed), np.int64).reshape(-1, 3).T)

    def run(self, overhead: OverheadModel, phantom: bool | None = None) -> RequestTimes:
        """Replay with ``overhead``; reuses the cached solo-step hardware times.

        ``phantom``: add the phantom step to E2E (default: the scheduler's
        ``phantom_last_step``).  Without it the times carry ``phantom_us``, so
        one replay serves both (:meth:`RequestTimes.with_phantom`).
        """
        times = self._times(overhead)
        return times.with_phantom() if (self.scheduler.phantom_last_step if phantom is None else phantom) else times

    def _times(self, overhead: OverheadModel) -> RequestTimes:
        """The times without the phantom step, with ``phantom_us``."""
        timer = StepTimer(self.step_model, overhead)
        req = self.requests
        durs = timer.combine_overhead(self._hw_us, timer.overhead_array(self._solo_features)[self._solo_index])
        durs = durs.astype(np.float64)
        ttft = np.bincount(self._step_req, weights=np.where(self._is_prefill, durs, 0.0), minlength=req.n)
        e2e = np.bincount(self._step_req, weights=durs, minlength=req.n)
        end = req.arrival_us + e2e
        phantom = np.where(req.output_tokens > 1, durs[self._last_step], 0.0)
        # requests that run past the next arrival (every request when the KV cache rejects one: the engine decides)
        overlap = end[:-1] > req.arrival_us[1:]
        starts = list(range(req.n)) if self._never_fits else np.flatnonzero(overlap).tolist()
        if not starts:
            return RequestTimes(ttft, e2e, req.output_tokens, 0, phantom)
        # replay the busy periods that overlap through the engine; between them requests stay independent
        timer.prime_keys(*self._prime)
        grouped = req.prefix_tokens > 0 and self.scheduler.prefix_cache
        group = np.full(req.n, 0 if grouped else -1, np.int64)
        prefix = np.full(req.n, req.prefix_tokens, np.int64)
        i = starts[0]
        warm = {0} if grouped and i > 0 else set()
        periods = BusyPeriods(timer, req.arrival_us, req.input_tokens, req.output_tokens, self._engine_cfg,
                              prefix_tokens=prefix, prefix_group=group, prefix_warm=warm)
        replayed: list[int] = []
        p_ttft: list = []
        p_e2e: list = []
        p_last: list = []
        while True:
            j, a, b, c = periods.run(i)
            replayed.extend(range(i, j))
            p_ttft += a
            p_e2e += b
            p_last += c
            k = bisect.bisect_left(starts, j)  # the next request at or after j that overlaps the next one
            if j >= req.n or k == len(starts):
                break
            i = starts[k]
        ttft[replayed] = p_ttft
        e2e[replayed] = p_e2e
        phantom[replayed] = np.where(req.output_tokens[replayed] > 1, p_last, 0.0)
        self._learn(timer.misses)
        return RequestTimes(ttft, e2e, req.output_tokens, len(replayed), phantom)

    def _learn(self, missed: list) -> None:
        """Prime the step features a run found missing in the next runs too (at most 4096 of them)."""
        new = set(missed) - self._primed
        if new and len(self._primed) < 4096:
            self._primed |= new
            self._prime = overhead_keys(*np.array(sorted(self._primed), np.int64).reshape(-1, 3).T)
