"""Solo decode steps per second: one vectorised NumPy call, a plain Python loop, and the fast one-step path.

Run on demand: ``python benchmarks/bench_step.py [--steps 100000] [--loop-steps 2000] [--variant v2.3 v2.4 v3]``.
For each variant, the same batch-1 decode steps (contexts 1..8191) are timed

* vectorised: one ``StepModel.step_us`` call on all of them;
* Python loop: one ``StepModel.step_us`` call per step (timed on a subset, scaled per step);
* fast path: one :meth:`calib.physics.fast.FastSteps.decode_hw_us` call per step (what a replay
  uses), plus the overhead and rounding.

All three are checked to give the same integer µs.  Targets (issue 2): the vectorised
path >= 50x faster per step than the loop; the fast path is what makes replays fast.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from calib.physics import StepBatch, StepModel
from calib.physics.fast import round_half_away_scalar


def bench(model: str, variant: str, n_steps: int, n_loop: int) -> None:
    sm = StepModel.build(model, 1, variant=variant)
    ctx = np.random.default_rng(0).integers(1, 8192, size=n_steps)
    overhead = sm.per_layer_overhead(100.0)

    sm.step_us(StepBatch.solo_decode(ctx[:100]), overhead)  # warm-up
    t0 = time.perf_counter()
    vec = sm.step_us(StepBatch.solo_decode(ctx), overhead)
    t_vec = time.perf_counter() - t0

    n_loop = min(n_loop, n_steps)
    t0 = time.perf_counter()
    loop = [int(sm.step_us(StepBatch.single(decode=[int(c)]), overhead)[0]) for c in ctx[:n_loop]]
    t_loop = time.perf_counter() - t0
    assert loop == vec[:n_loop].tolist(), "vectorised and loop results differ"

    fast = sm.fast.decode_hw_us
    contexts = ctx.tolist()
    fast(1, 8191, 8191, sm.fast.fm_of(1, [8191]) if sm.fast.needs_contexts else 0.0)  # fill the caches
    fms = [sm.fast.fm_of(1, [c]) for c in contexts] if sm.fast.needs_contexts else [0.0] * len(contexts)
    t0 = time.perf_counter()
    got = [round_half_away_scalar(fast(1, c, c, fm) + overhead) for c, fm in zip(contexts, fms)]
    t_fast = time.perf_counter() - t0
    assert got == vec.tolist(), "fast path and vectorised results differ"

    vec_rate, loop_rate, fast_rate = n_steps / t_vec, n_loop / t_loop, n_steps / t_fast
    print(f"{model}, {variant}: solo decode steps (batch 1), contexts 1..8191")
    print(f"  vectorised : {n_steps:,} steps in {t_vec * 1e3:8.1f} ms -> {vec_rate:12,.0f} steps/s")
    print(f"  python loop: {n_loop:,} steps in {t_loop * 1e3:8.1f} ms -> {loop_rate:12,.0f} steps/s")
    print(f"  fast path  : {n_steps:,} steps in {t_fast * 1e3:8.1f} ms -> {fast_rate:12,.0f} steps/s "
          f"({t_fast / n_steps * 1e6:.2f} µs per step)")
    print(f"  vectorised vs loop: {vec_rate / loop_rate:,.0f}x (target >= 50x); results identical")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--loop-steps", type=int, default=2_000)
    ap.add_argument("--model", default="llama-2-7b-hf")
    ap.add_argument("--variant", nargs="+", default=["v2.3", "v2.4", "v3"])
    args = ap.parse_args()
    for variant in args.variant:
        bench(args.model, variant, args.steps, args.loop_steps)


if __name__ == "__main__":
    main()
