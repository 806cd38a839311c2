"""Whole-process time of ``calib --help``, ``calib step`` and ``calib hg1`` (fresh output folder).

Usage::

    python benchmarks/bench_startup.py [--repeat 3] [--baseline SRC] [--json]

Each command is a fresh Python process (interpreter start and imports
included), run ``--repeat`` times; the table shows the best wall time and the
best CPU time (user + system, the process and its children) of the repeats.
``calib hg1`` writes into a new temporary folder each time (a full run: its
32 grid trials are evaluated, nothing is resumed).

Each tree is run once per command before the timed repeats (not counted),
with ``PYTHONDONTWRITEBYTECODE`` removed from the environment, so the timed
processes read compiled bytecode (``__pycache__``) as an installed package
does; otherwise every process compiles calib's modules anew (about 0.1 s more
for ``calib hg1``).  ``--no-bytecode`` keeps the inherited environment and
skips the warm-up.

``--baseline SRC`` times another source tree of calib the same way, in the
same run, interleaved with this one (e.g. ``git archive HEAD | tar -x -C
/tmp/base`` for the last commit), and prints the ratios this / baseline: the
ratio is what to compare across machines and loads, the seconds are this
machine's.  ``python -c pass`` is timed too, as the floor of any command.

Targets (issue 15 "Fast at every scale", on the 2-core development machine):
``calib hg1`` <= 2.5 s, ``calib step`` <= 0.6 s, ``calib --help`` <= 0.3 s.
Timings depend on the machine and its load; this is not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": None,
    "calib --help": ["--help"],
    "calib step": ["step", "--model", "llama-2-7b-hf", "--tp", "1", "--decode", "1000", "--overhead-us", "100",
                   "--json"],
    "calib hg1": ["hg1", "--no-progress", "--out", "{out}"],
}
TARGETS = {"calib --help": 0.3, "calib step": 0.6, "calib hg1": 2.5}


def run_once(src: Path, argv: list[str] | None, tmp: Path, bytecode: bool = True) -> tuple[float, float]:
    """Wall and CPU seconds of one process running calib from ``src`` with ``argv``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    if argv is None:
        cmd = [sys.executable, "-c", "pass"]
    else:
        out = tempfile.mkdtemp(dir=tmp)
        cmd = [sys.executable, "-m", "calib", *[a.replace("{out}", out) for a in argv]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another calib source tree, timed the same way in this run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="keep the inherited PYTHONDONTWRITEBYTECODE and run no warm-up")
    args = ap.parse_args()
    bytecode = not args.no_bytecode
    trees = {"this": REPO}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    best: dict[str, dict[str, list[float]]] = {t: {c: [] for c in COMMANDS} for t in trees}
    with tempfile.TemporaryDirectory() as tmp:
        if bytecode:  # writes each tree's __pycache__; not timed
            for name, argv in COMMANDS.items():
                for src in trees.values():
                    run_once(src, argv, Path(tmp))
        for _ in range(args.repeat):
            for name, argv in COMMANDS.items():
                for tree, src in trees.items():  # interleaved: both trees see the same load
                    best[tree][name].append(run_once(src, argv, Path(tmp), bytecode))
    doc: dict = {"load_average": round(os.getloadavg()[0], 2), "repeat": args.repeat, "bytecode": bytecode}
    for tree in trees:
        doc[tree] = {name: {"wall_s": round(min(w for w, _ in runs), 3), "cpu_s": round(min(c for _, c in runs), 3)}
                     for name, runs in best[tree].items()}
    if args.baseline:
        doc["ratio_this_vs_baseline"] = {
            name: {k: round(doc["this"][name][k] / doc["baseline"][name][k], 3) for k in ("wall_s", "cpu_s")}
            for name in COMMANDS}
    doc["targets_met"] = {name: doc["this"][name]["wall_s"] <= t for name, t in TARGETS.items()}
    if args.json:
        print(json.dumps(doc))
        return
    print(f"best of {args.repeat}; load average {doc['load_average']} on {os.cpu_count()} CPUs; "
          f"{'compiled bytecode read' if bytecode else 'environment as inherited, no warm-up'}")
    head = f"{'command':<16}{'wall s':>9}{'CPU s':>9}"
    if args.baseline:
        head += f"{'base wall':>11}{'base CPU':>10}{'ratio wall':>12}{'ratio CPU':>11}"
    print(head + f"  {'target':<12}")
    for name in COMMANDS:
        this = doc["this"][name]
        line = f"{name:<16}{this['wall_s']:>9.3f}{this['cpu_s']:>9.3f}"
        if args.baseline:
            base, ratio = doc["baseline"][name], doc["ratio_this_vs_baseline"][name]
            line += f"{base['wall_s']:>11.3f}{base['cpu_s']:>10.3f}{ratio['wall_s']:>12.3f}{ratio['cpu_s']:>11.3f}"
        target = TARGETS.get(name)
        if target is not None:
            line += f"  <= {target:.1f} s {'ok' if this['wall_s'] <= target else 'MISSED'}"
        print(line)


if __name__ == "__main__":
    main()
