"""Loaded-server replay speed of the step-model variants on a 16,800-request run.

Usage::

    python benchmarks/bench_batched.py [--data-dir DIR] [--run NAME] [--variant v2.3 v2.4 v3]
                                       [--repeat 5] [--window S] [--json]

Replays one loaded-server run (default ``20260217-231439-llama-2-7b-tp1-general``:
Llama-2-7B, TP 1, 16,800 requests at 5 then 10 req/s; the other 16,800-request
runs are the ``*-general`` runs of Llama-2-70B, Mixtral-8x7B and CodeLlama-34B)
through :class:`calib.replay.batched.BatchedRun` with the HG1 optimum overhead
(80 µs/layer) under every variant.  Each step model is built once and replayed
once cold (its step-time caches empty); then ``--repeat`` rounds replay every
variant once each, interleaved, so that the ratios compare replays made under the
same machine load.  ``best_s`` is the fastest warm replay.

Output: a table, or with ``--json``::

    {"v2.3": {"best_s": ..., "steps": ..., "us_per_step": ...}, "v2.4": {...}, "v3": {...},
     "ratios_vs_v2.3": {"v2.4": ..., "v3": ...}}

Targets (issue "Fast at every scale"): v2.4 and v3 within 1.5x of v2.3; v2.3 at
<= 3 µs per engine step.  Timings depend on the machine and its load; this is
not part of the test suite.  ``--clock cpu`` times the process's CPU time
instead of the wall clock (steadier on a machine shared with other work).

Data: ``--run`` is a run name or a path to a run folder.  A name is looked up in
``--data-dir`` when given; else in calib's shipped dataset of loaded-server runs
(:func:`calib.data.runs.shipped_dir`, calib's compact format) when it holds the
run; else in ``$CALIB_DATA/batched`` (or ``$CALIB_DATA``).  Nothing is guessed from
where calib is installed.  The run is read by :func:`calib.replay.loaded.load_run`
(either format), the loader every loaded-server study uses.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

from calib.errors import CalibError
from calib.physics.overhead import PerLayer
from calib.physics.step_model import StepModel
from calib.replay.batched import BatchedRun, window_trace
from calib.resources import DATA_ENV

DEFAULT_RUN = "20260217-231439-llama-2-7b-tp1-general"
VARIANTS = ("v2.3", "v2.4", "v3")
TARGET_RATIO = 1.5
TARGET_US_PER_STEP = 3.0


def _is_run(path: Path) -> bool:
    return path.is_dir() and ((path / "requests.json").is_file()
                              or ((path / "run.yaml").is_file() and (path / "requests.csv.gz").is_file()))


def _shipped_dir() -> Path | None:
    try:
        from calib.data.runs import shipped_dir
    except ImportError:  # a calib without a shipped dataset
        return None
    try:
        return Path(shipped_dir())
    except CalibError:
        return None


def find_run(run: str, folder: str | None) -> Path:
    """The run folder: ``run`` itself if it is a run folder, else ``run`` in the first data folder that has it.

    Data folders, in order: ``folder`` (``--data-dir``) when given; else the shipped
    dataset, then ``$CALIB_DATA/batched`` and ``$CALIB_DATA``.
    """
    path = Path(run).expanduser()
    if _is_run(path):
        return path
    if folder:
        roots = [Path(folder).expanduser()]
    else:
        env = os.environ.get(DATA_ENV, "")
        roots = [r for r in (_shipped_dir(),) if r is not None]
        roots += [Path(env).expanduser() / "batched", Path(env).expanduser()] if env else []
    for root in roots:
        if _is_run(root / run):
            return root / run
    if not roots:
        raise SystemExit(f"run {run!r}: no shipped dataset; give --data-dir or set {DATA_ENV}")
    known = sorted(p.name for root in roots if root.is_dir() for p in root.iterdir() if _is_run(p))
    raise SystemExit(f"no run {run!r} in {', '.join(map(str, roots))}" + (f"; runs: {', '.join(known)}"
                                                                          if known else ""))


def load(folder: Path) -> tuple[object, BatchedRun]:
    """``(trace, BatchedRun)`` of a run folder, through the loaded-server loader (either format)."""
    from calib.replay.loaded import load_run

    lr = load_run(folder)
    return lr.trace, lr.run


def time_replays(run: BatchedRun, models: dict[str, StepModel], repeat: int, per_layer_us: float,
                 clock=time.perf_counter) -> dict:
    """Cold replay of each step model, then ``repeat`` interleaved rounds; per variant the timings and steps."""
    overhead = PerLayer(per_layer_us)
    out = {v: {"cold_s": None, "times": [], "steps": 0} for v in models}
    for v, sm in models.items():
        gc.collect()
        t = clock()
        rep = run.run(sm, overhead, record_steps=False)
        out[v]["cold_s"] = clock() - t
        out[v]["steps"] = int(rep.n_steps)
    for _ in range(max(1, repeat)):
        for v, sm in models.items():
            gc.collect()
            t = clock()
            rep = run.run(sm, overhead, record_steps=False)
            out[v]["times"].append(clock() - t)
            assert rep.n_steps == out[v]["steps"]
    return out


def summary(timings: dict) -> dict:
    """The ``--json`` document: best time, steps and µs per step per variant, and ratios to v2.3."""
    doc = {}
    for v, r in timings.items():
        best = min(r["times"])
        doc[v] = {"best_s": round(best, 4), "steps": r["steps"], "us_per_step": round(best / r["steps"] * 1e6, 3)}
    if "v2.3" in doc:
        base = doc["v2.3"]["best_s"]
        doc["ratios_vs_v2.3"] = {v: round(doc[v]["best_s"] / base, 3) for v in timings if v != "v2.3"}
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="folder of loaded-server runs (default: $CALIB_DATA/batched)")
    ap.add_argument("--run", default=DEFAULT_RUN, help=f"run name or run folder (default {DEFAULT_RUN})")
    ap.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--repeat", type=int, default=5, help="warm replays per variant (interleaved rounds)")
    ap.add_argument("--window", type=float, default=None, help="replay only the first S seconds of each stage")
    ap.add_argument("--per-layer-us", type=float, default=80.0)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall clock (default) or this process's CPU time")
    ap.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = ap.parse_args(argv)
    try:
        folder = find_run(args.run, args.data_dir)
        t0 = time.perf_counter()
        trace, run = load(folder)
        if args.window:
            trace = window_trace(trace, args.window)
            run = BatchedRun(trace, **{**run.options, "record_steps": False})
        models = {v: StepModel.build(trace.model, trace.tp, variant=v) for v in args.variant}
        run.inputs(int(getattr(next(iter(models.values())).model, "max_context", 0) or 0))
        t_load = time.perf_counter() - t0
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        timings = time_replays(run, models, args.repeat, args.per_layer_us, clock)
    except CalibError as exc:
        print(exc, file=sys.stderr)
        return 2
    doc = summary(timings)
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"{folder}: {len(trace.requests):,} requests ({trace.model}, TP {trace.tp})")
    print(f"load + inputs {t_load:.2f} s; best of {max(1, args.repeat)} interleaved warm replays ({args.clock} time)")
    print(f"{'variant':8} {'cold (s)':>9} {'best (s)':>9} {'steps':>9} {'µs/step':>8} {'vs v2.3':>8}  target")
    for v, r in timings.items():
        d = doc[v]
        ratio = doc.get("ratios_vs_v2.3", {}).get(v)
        if v == "v2.3":
            target = f"<= {TARGET_US_PER_STEP:g} µs/step: " + ("met" if d["us_per_step"] <= TARGET_US_PER_STEP
                                                              else "MISSED")
        else:
            target = f"<= {TARGET_RATIO:g}x v2.3: " + ("met" if ratio is not None and ratio <= TARGET_RATIO
                                                      else "MISSED" if ratio is not None else "n/a")
        print(f"{v:8} {r['cold_s']:9.3f} {d['best_s']:9.3f} {d['steps']:9,} {d['us_per_step']:8.2f} "
              f"{'' if ratio is None else f'{ratio:.2f}x':>8}  {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
