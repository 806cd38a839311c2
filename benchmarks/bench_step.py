"""Solo decode steps per second: one vectorised NumPy call vs a plain Python loop over the same steps.

Run on demand: ``python benchmarks/bench_step.py [--steps 100000] [--loop-steps 2000]``.
Both paths are measured in the same run; the loop is timed on a subset and scaled
per step.  Target (issue 2): the vectorised path is >= 50x faster per step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from calib.physics import StepBatch, StepModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--loop-steps", type=int, default=2_000)
    ap.add_argument("--model", default="llama-2-7b-hf")
    ap.add_argument("--variant", default="v2.3")
    args = ap.parse_args()
    sm = StepModel.build(args.model, 1, variant=args.variant)
    ctx = np.random.default_rng(0).integers(1, 8192, size=args.steps)
    overhead = sm.per_layer_overhead(100.0)

    sm.step_us(StepBatch.solo_decode(ctx[:100]), overhead)  # warm-up
    t0 = time.perf_counter()
    vec = sm.step_us(StepBatch.solo_decode(ctx), overhead)
    t_vec = time.perf_counter() - t0

    n_loop = min(args.loop_steps, args.steps)
    t0 = time.perf_counter()
    loop = [int(sm.step_us(StepBatch.single(decode=[int(c)]), overhead)[0]) for c in ctx[:n_loop]]
    t_loop = time.perf_counter() - t0
    assert loop == vec[:n_loop].tolist(), "vectorised and loop results differ"

    vec_rate = args.steps / t_vec
    loop_rate = n_loop / t_loop
    print(f"model {args.model}, {args.variant}, solo decode steps (batch 1), contexts 1..8191")
    print(f"vectorised: {args.steps:,} steps in {t_vec * 1e3:.1f} ms  -> {vec_rate:,.0f} steps/s")
    print(f"python loop: {n_loop:,} steps in {t_loop * 1e3:.1f} ms  -> {loop_rate:,.0f} steps/s")
    print(f"speed-up: {vec_rate / loop_rate:,.0f}x (target >= 50x); results identical on the {n_loop:,} compared")


if __name__ == "__main__":
    main()
