"""Loaded-server replay speed: steps per second and requests per second on the 16,800-request run.

Usage::

    python benchmarks/bench_batched.py [--run DIR] [--variant v2.3 v2.4 v3] [--repeat 3] [--window S]

Replays ``20260217-231439-llama-2-7b-tp1-general`` (16,800 requests, 5 -> 20 req/s; the
largest run of ``../shared/data/batched``) through :class:`calib.replay.batched.BatchedRun`
with the HG1 optimum (80 µs/layer) and prints, per variant, the best wall time of
``--repeat`` replays (first one with cold step-time caches, reported apart), steps per
second and requests per second.  Target (issue 6): under 2 s for this run on one core.
Not part of CI; timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from calib.data.traces import load_trace
from calib.physics.overhead import PerLayer
from calib.physics.step_model import StepModel
from calib.replay.batched import BatchedRun, window_trace

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO.parent / "shared" / "data" / "batched" / "20260217-231439-llama-2-7b-tp1-general"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run folder (default: the 16,800-request run)")
    ap.add_argument("--variant", nargs="+", default=["v2.3", "v2.4", "v3"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--window", type=float, default=None, help="replay only the first S seconds of each stage")
    ap.add_argument("--per-layer-us", type=float, default=80.0)
    args = ap.parse_args(argv)
    if not args.run.is_dir():
        print(f"run folder {args.run} not found")
        return 2
    t0 = time.perf_counter()
    trace = load_trace(args.run)
    if args.window:
        trace = window_trace(trace, args.window)
    run = BatchedRun(trace, record_steps=False)
    run.inputs(0)
    print(f"{trace.name}: {len(trace.requests):,} requests, load + inputs {time.perf_counter() - t0:.2f} s")
    head = f"{'variant':8} {'cold (s)':>9} {'best (s)':>9} {'steps':>9} {'steps/s':>10} {'requests/s':>11}"
    print(head + "  target < 2 s")
    for variant in args.variant:
        times = []
        rep = None
        sm = StepModel.build(trace.model, trace.tp, variant=variant)  # built once: later runs reuse its caches
        for _ in range(max(1, args.repeat)):
            t = time.perf_counter()
            rep = run.run(sm, PerLayer(args.per_layer_us))
            times.append(time.perf_counter() - t)
        best = min(times[1:]) if len(times) > 1 else times[0]
        print(f"{variant:8} {times[0]:9.2f} {best:9.2f} {rep.n_steps:9,} {rep.n_steps / best:10,.0f} "
              f"{len(trace.requests) / best:11,.0f}  {'met' if best < 2 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
