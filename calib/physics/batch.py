"""Many steps at once: a ragged set of prefill and decode entries.

A :class:`StepBatch` holds the entries of ``n_steps`` steps.  Each prefill
entry has a step index, a progress index ``PI`` (tokens already computed) and
``n`` new tokens; each decode entry has a step index and ``PI`` (its KV length
before the token).  The physics evaluates all steps in one vectorised call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from calib.errors import ConfigError

__all__ = ["StepBatch"]


def _ints(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1) if len(np.shape(values)) else np.asarray([values], float)
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise ConfigError("must be whole numbers", field=name)
    if arr.size and arr.min() < 0:
        raise ConfigError(f"must be >= 0, got {arr.min():g}", field=name)
    return arr.astype(np.int64)


@dataclass(frozen=True)
class StepBatch:
    """Prefill and decode entries of ``n_steps`` steps.

    Examples
    --------
    One decode step at context 1000 and one prefill step of 512 tokens:

    >>> b = StepBatch.from_arrays(2, prefill_step=[1], prefill_pi=[0], prefill_n=[512],
    ...                           decode_step=[0], decode_pi=[1000])
    >>> b.n_steps, b.decode_count.tolist(), b.prefill_tokens.tolist()
    (2, [1, 0], [0, 512])
    """

    n_steps: int
    prefill_step: np.ndarray
    prefill_pi: np.ndarray
    prefill_n: np.ndarray
    decode_step: np.ndarray
    decode_pi: np.ndarray

    @classmethod
    def from_arrays(cls, n_steps: int, *, prefill_step=(), prefill_pi=(), prefill_n=(),
                    decode_step=(), decode_pi=()) -> "StepBatch":
        """Validate and build; errors name the offending field."""
        if n_steps < 0:
            raise ConfigError("must be >= 0", field="n_steps")
        ps, ppi, pn = _ints(prefill_step, "prefill_step"), _ints(prefill_pi, "PI"), _ints(prefill_n, "n")
        ds, dpi = _ints(decode_step, "decode_step"), _ints(decode_pi, "PI")
        if not (len(ps) == len(ppi) == len(pn)):
            raise ConfigError("prefill_step, prefill_pi and prefill_n differ in length", field="prefill")
        if len(ds) != len(dpi):
            raise ConfigError("decode_step and decode_pi differ in length", field="decode")
        if pn.size and pn.min() < 1:
            raise ConfigError("a prefill entry needs n >= 1 new tokens", field="n")
        for arr, name in ((ps, "prefill_step"), (ds, "decode_step")):
            if arr.size and arr.max() >= n_steps:
                raise ConfigError(f"step index {arr.max()} out of range for {n_steps} steps", field=name)
        return cls(int(n_steps), ps, ppi, pn, ds, dpi)

    @classmethod
    def single(cls, prefill: Sequence[tuple[int, int]] = (), decode: Sequence[int] = ()) -> "StepBatch":
        """One step from ``[(PI, n), ...]`` prefill entries and ``[PI, ...]`` decode entries."""
        prefill = list(prefill)
        decode = list(decode)
        return cls.from_arrays(
            1,
            prefill_step=[0] * len(prefill),
            prefill_pi=[p for p, _ in prefill],
            prefill_n=[n for _, n in prefill],
            decode_step=[0] * len(decode),
            decode_pi=decode,
        )

    @classmethod
    def solo_decode(cls, contexts) -> "StepBatch":
        """One batch-1 decode step per context: ``len(contexts)`` steps."""
        ctx = _ints(contexts, "PI")
        return cls(len(ctx), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                   np.arange(len(ctx), dtype=np.int64), ctx)

    @property
    def decode_count(self) -> np.ndarray:
        """Decode entries per step (``q``)."""
        return np.bincount(self.decode_step, minlength=self.n_steps)

    @property
    def prefill_count(self) -> np.ndarray:
        """Prefill entries per step."""
        return np.bincount(self.prefill_step, minlength=self.n_steps)

    @property
    def prefill_tokens(self) -> np.ndarray:
        """New prefill tokens per step (``p``)."""
        return np.bincount(self.prefill_step, weights=self.prefill_n, minlength=self.n_steps).astype(np.int64)

    @property
    def non_empty(self) -> np.ndarray:
        return (self.decode_count + self.prefill_count) > 0
