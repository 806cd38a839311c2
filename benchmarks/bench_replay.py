"""Replay benchmark (a script, not a test).

    python benchmarks/bench_replay.py [--quick] [--shared ../shared/data]

1. The 13 synchronous HG1 experiments (``hg1/experiments.csv`` + ``workloads.yaml``
   + the reference request lengths; rate = round(1000 / gt_e2e_mean_ms, 6), the
   prefix from the workload), replayed with :class:`SyncReplay` for 32 values of
   the per-layer overhead: build time, the whole grid, evaluations per second,
   and the cost of one more overhead value once the caches are warm.
2. Baselines measured in the same run, on the same experiments:
   * ``per-step``: the straightforward step-by-step engine
     (``run_engine(..., fast=False)``) with cached step times;
   * ``per-step, no cache``: the same loop timing every step with a plain
     ``StepModel.parts`` call (``StepTimer(fast=False)``), on a subset (slow).
   Every baseline result is checked to be identical to the fast replay.
3. The loaded-server trace ``batched/20260217-231439-llama-2-7b-tp1-general``
   (16,800 requests, its run config: max_num_seqs, max_num_batched_tokens,
   kv_blocks_total_gpu, block_size) through the engine: cold and warm replay
   time, steps/s and requests/s, against the per-step engine.

Times are process CPU time unless ``--wall`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calib.physics import StepModel  # noqa: E402
from calib.physics.overhead import PerLayer  # noqa: E402
from calib.replay.engine import SchedulerConfig, StepTimer, run_engine  # noqa: E402
from calib.replay.synchronous import SyncReplay, SyncRequests  # noqa: E402

#: the timer: CPU time of this (single-threaded) process by default, robust on a shared machine; --wall for wall-clock
clock = time.process_time

TRACE = "batched/20260217-231439-llama-2-7b-tp1-general/requests.json"
OVERHEADS = np.linspace(0.0, 500.0, 32)


def load_experiments(shared: Path) -> list[dict]:
    import pandas as pd
    import yaml

    from calib.data.lengths import reference_lengths

    hg1 = shared / "hg1"
    df = pd.read_csv(hg1 / "experiments.csv")
    workloads = yaml.safe_load((hg1 / "workloads.yaml").read_text())
    lengths_file = hg1 / "reference_request_lengths.json"
    out = []
    for _, row in df.iterrows():
        wl = workloads[row.workload]
        out.append(dict(
            name=row.experiment, model=row.model_config, tp=int(row.tp),
            rate=round(1000.0 / float(row.gt_e2e_mean_ms), 6), prefix=int(wl.get("prefix_tokens", 0) or 0),
            lengths=reference_lengths(row.workload, 42, path=lengths_file if lengths_file.is_file() else None),
        ))
    return out


def engine_all(sm, req: SyncRequests, overhead, fast_timer: bool):
    """One replay of every request through the straightforward per-step engine."""
    n = req.n
    grp = np.zeros(n, np.int64) if req.prefix_tokens else np.full(n, -1)
    res, _ = run_engine(StepTimer(sm, overhead, fast=fast_timer), req.arrival_us, req.input_tokens,
                        req.output_tokens, SchedulerConfig(), prefix_tokens=np.full(n, req.prefix_tokens),
                        prefix_group=grp, fast=False)
    return res


def same(times, res) -> bool:
    return bool(np.array_equal(times.ttft_us, res.ttft_us) and np.array_equal(times.e2e_us, res.e2e_us))


def bench_sync(shared: Path, quick: bool) -> None:
    exps = load_experiments(shared)
    print(f"== synchronous replay: {len(exps)} experiments x {len(OVERHEADS)} overhead values "
          f"(per-layer overhead {OVERHEADS[0]:g}..{OVERHEADS[-1]:g} µs)")
    t0 = clock()
    reps = []
    for e in exps:
        sm = StepModel.build(e["model"], e["tp"])
        reps.append(SyncReplay(sm, SyncRequests.from_lengths(e["lengths"], e["rate"], e["prefix"])))
    t_build = clock() - t0
    per = np.zeros((len(exps), len(OVERHEADS)))
    overlapped = np.zeros_like(per)
    results = {}
    t1 = clock()
    for j, plo in enumerate(OVERHEADS):
        for i, rep in enumerate(reps):
            a = clock()
            times = rep.run(PerLayer(float(plo)))
            per[i, j] = clock() - a
            overlapped[i, j] = times.overlapped
            results[(i, j)] = times
    t_grid = clock() - t1
    n_eval = per.size
    print(f"build (step models + solo-step caches): {t_build:.2f} s")
    print(f"grid: {t_grid:.2f} s for {n_eval} evaluations = {t_grid / n_eval * 1e3:.2f} ms/evaluation "
          f"({n_eval / t_grid:.0f} evaluations/s, {len(OVERHEADS) / t_grid:.1f} 13-experiment evaluations/s); "
          f"first overhead value (cold caches) {per[:, 0].sum() * 1e3:.0f} ms in all")
    print(f"total build + grid: {t_build + t_grid:.2f} s (target < 10 s); "
          f"requests replayed through the engine: {overlapped.mean() / np.mean([r.requests.n for r in reps]):.0%}")
    # one more overhead value, caches warm
    warm = []
    for rep in reps:
        a = clock()
        rep.run(PerLayer(123.456))
        warm.append(clock() - a)
    warm = np.array(warm)
    print(f"one more overhead value (warm): mean {warm.mean() * 1e3:.2f} ms/experiment, max {warm.max() * 1e3:.2f} ms, "
          f"{warm.sum() * 1e3:.1f} ms for all 13")
    print(f"{'experiment':42s} {'first':>8s} {'mean':>8s} {'max':>8s}  overlapped")
    for e, row, ov in zip(exps, per, overlapped):
        print(f"{e['name']:42s} {row[0] * 1e3:7.1f}ms {row[1:].mean() * 1e3:7.1f}ms {row[1:].max() * 1e3:7.1f}ms  "
              f"{ov.mean():5.1f}/{len(e['lengths'])}")

    # ---- baselines, same run
    cols = [5, 15, 25, 31] if not quick else [15]  # warm columns
    t_b, n_b, ok = 0.0, 0, True
    for i, rep in enumerate(reps):
        for j in cols:
            a = clock()
            res = engine_all(rep.step_model, rep.requests, PerLayer(float(OVERHEADS[j])), fast_timer=True)
            t_b += clock() - a
            n_b += 1
            ok &= same(results[(i, j)], res)
    fast_same = per[:, cols].sum()
    print(f"baseline per-step engine (cached step times): {t_b / n_b * 1e3:.1f} ms/evaluation over {n_b} "
          f"evaluations vs {fast_same / n_b * 1e3:.2f} ms -> x{t_b / fast_same:.1f}; identical results: {ok}")
    # no caches at all: a fresh step model, StepModel.parts per step (slow: a subset)
    subset = [0, 1] if not quick else [1]
    t_c, n_c, ok = 0.0, 0, True
    for i in subset:
        e = exps[i]
        sm = StepModel.build(e["model"], e["tp"])
        a = clock()
        res = engine_all(sm, reps[i].requests, PerLayer(float(OVERHEADS[10])), fast_timer=False)
        t_c += clock() - a
        n_c += 1
        ok &= same(results[(i, 10)], res)
    fast_same = per[subset, 10].sum()
    print(f"baseline per-step engine, no caches (StepModel.parts per step): {t_c / n_c * 1e3:.0f} ms/evaluation "
          f"over {n_c} evaluations vs {fast_same / n_c * 1e3:.2f} ms -> x{t_c / fast_same:.0f}; identical: {ok}")


def bench_trace(shared: Path, quick: bool) -> None:
    doc = json.loads((shared / TRACE).read_text())
    cfg = doc["config"]
    rq = doc["requests"]
    arr = np.array([r["arrival_time_us"] for r in rq], np.int64)
    inp = np.array([r["input_tokens"] for r in rq], np.int64)
    out = np.array([r["output_tokens"] for r in rq], np.int64)
    order = np.argsort(arr, kind="stable")
    arr, inp, out = arr[order], inp[order], out[order]
    sched = SchedulerConfig(max_scheduled_tokens=int(cfg["max_num_batched_tokens"]),
                            max_running=int(cfg["max_num_seqs"]), kv_blocks=int(cfg["kv_blocks_total_gpu"]),
                            block_size=int(cfg["block_size"]), prefix_cache=False, phantom_last_step=False)
    print(f"\n== loaded-server trace {TRACE.split('/')[1]}: {len(arr)} requests over {arr[-1] / 1e6:.0f} s; "
          f"max_num_seqs {sched.max_running}, max_num_batched_tokens {sched.max_scheduled_tokens}, "
          f"{sched.kv_blocks} KV blocks of {sched.block_size}")
    model = "llama-2-7b-hf"
    for plo in (0.0, 100.0):
        sm = StepModel.build(model, 1)
        a = clock()
        res, _ = run_engine(StepTimer(sm, PerLayer(plo)), arr, inp, out, sched)
        cold = clock() - a
        a = clock()
        res, _ = run_engine(StepTimer(sm, PerLayer(plo)), arr, inp, out, sched)
        warm = clock() - a
        print(f"per-layer overhead {plo:g} µs: cold {cold:.2f} s (target < 2 s), warm {warm:.2f} s; "
              f"{res.n_steps} steps ({res.n_steps / warm:,.0f} steps/s, {len(arr) / warm:,.0f} requests/s); "
              f"preemptions {res.n_preemptions}, rejected {res.n_rejected}; TTFT median {np.nanmedian(res.ttft_us) / 1e3:.1f} ms")
        if plo == 0.0 and not quick:
            a = clock()
            ref, _ = run_engine(StepTimer(sm, PerLayer(plo)), arr, inp, out, sched, fast=False)
            t_ref = clock() - a
            ok = np.array_equal(ref.ttft_us, res.ttft_us) and np.array_equal(ref.e2e_us, res.e2e_us)
            print(f"  baseline per-step engine (cached step times): {t_ref:.2f} s -> x{t_ref / warm:.1f}; "
                  f"identical: {ok}")
            n = 500
            sm2 = StepModel.build(model, 1)
            a = clock()
            ref2, _ = run_engine(StepTimer(sm2, PerLayer(plo), fast=False), arr[:n], inp[:n], out[:n], sched,
                                 fast=False)
            t_ref2 = clock() - a
            a = clock()
            new2, _ = run_engine(StepTimer(sm2, PerLayer(plo)), arr[:n], inp[:n], out[:n], sched)
            t_new2 = clock() - a
            ok = np.array_equal(ref2.ttft_us, new2.ttft_us) and np.array_equal(ref2.e2e_us, new2.e2e_us)
            print(f"  baseline per-step engine, no caches, first {n} requests ({ref2.n_steps} steps): {t_ref2:.1f} s "
                  f"vs {t_new2:.3f} s -> x{t_ref2 / t_new2:.0f}; identical: {ok}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=(REPO / ".." / "shared" / "data").resolve(),
                    help="the shared data directory (holding hg1/ and batched/)")
    ap.add_argument("--quick", action="store_true", help="fewer baseline runs")
    ap.add_argument("--skip-trace", action="store_true")
    ap.add_argument("--wall", action="store_true", help="time with the wall clock instead of process CPU time")
    args = ap.parse_args()
    global clock
    if args.wall:
        clock = time.perf_counter
    print(f"timing: {'wall-clock' if args.wall else 'process CPU'} time")
    if not (args.shared / "hg1" / "experiments.csv").is_file():
        sys.exit(f"no HG1 data under {args.shared}")
    bench_sync(args.shared, args.quick)
    if not args.skip_trace:
        bench_trace(args.shared, args.quick)


if __name__ == "__main__":
    main()
