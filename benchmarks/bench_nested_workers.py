"""A full nested, multi-seed loaded-server calibration with 1 and 2 worker processes: wall and CPU time, ratio.

The study is ``studies/physics.yaml`` cut down in a temporary copy (the
protocol is the study's: outer leave-one-model-out, SelectBest's inner
leave-one-model-out per outer fold and search seed, every candidate fitted on
all dense runs, held-out scores on full traces; only the sizes are smaller):
three dense runs of three models and one overloaded run, two candidates, ``--trials`` TPE trials per
seed and fit, ``--seeds`` search seeds and a ``--window`` second search window.
Each configuration is one fresh ``calib study run`` process (imports included)
into a fresh folder (the default storage: the journal file that workers
share); CPU time is the process's and its workers' (``RUSAGE_CHILDREN``).
The benchmark also says whether the two runs wrote the same results (storage
label aside): with TPE they need not, by design (a trial drawn while another
worker's trial runs is seeded with its trial number too, see
:mod:`calib.calibrate.trials`; grids give a serial run's numbers).

Run (on demand, not in CI)::

    python benchmarks/bench_nested_workers.py                   # 4 trials, 2 seeds, 10 s window
    python benchmarks/bench_nested_workers.py --trials 8 --seeds 3 --json

Prints, per configuration, wall and CPU seconds, then the wall ratio
``2 workers / 1 worker`` (lower is better; on 2 idle cores the floor is about
0.5 plus the serial parts: imports, the held-out replays of full traces, the
report) and how much parallel CPU the machine offered meanwhile.
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

from bench_workers import parallel_capacity  # the same machine-capacity probe as the 200-trial benchmark

REPO = Path(__file__).resolve().parents[1]
RUNS = ["20260217-162547-llama-2-7b-tp1-roleplay", "20260218-084319-llama-2-70b-tp4-roleplay",
        "20260218-155500-codellama-34b-tp2-roleplay",
        # an overloaded run, predicted by the fits on all dense runs (the study's "other runs"; a study without
        # any other run fails in calib.studies.loaded_data.predict_rows on an empty table at the time of writing)
        "20260217-170634-llama-2-7b-tp1-reasoning"]
CANDIDATES = ("v2.3-overhead-only", "v2.4-physics")


def small_study(folder: Path, trials: int, seeds: int, window: float) -> Path:
    """``studies/physics.yaml`` with three runs, two candidates and a small search, written into ``folder``."""
    import yaml

    doc = yaml.safe_load((REPO / "studies" / "physics.yaml").read_text())
    doc["name"] = "bench-nested"
    doc["runs"] = RUNS
    doc["candidates"] = [c for c in doc["candidates"] if c["label"] in CANDIDATES]
    doc["search"] = {**doc["search"], "n_trials": trials, "seeds": seeds, "window_s": window}
    path = folder / "bench-nested.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def timed(study: Path, out: Path, workers: int) -> tuple[float, float]:
    """Wall and CPU seconds (this process's children: the run and its workers) of one ``calib study run``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "calib", "study", "run", str(study), "--out", str(out), "--no-progress",
           "--workers", str(workers)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"calib study run failed ({proc.returncode}):\n{proc.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def comparable(out: Path) -> dict:
    """results.json without what may differ between a serial and a parallel run (storage, software)."""
    r = json.loads((out / "results.json").read_text())
    r.pop("software", None)
    if isinstance(r.get("settings"), dict):
        r["settings"].pop("storage", None)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4, help="TPE trials per seed and fit (default 4)")
    ap.add_argument("--seeds", type=int, default=2, help="search seeds (default 2)")
    ap.add_argument("--window", type=float, default=10.0, help="search window, seconds of each stage (default 10)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    capacity = parallel_capacity(2)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        study = small_study(Path(tmp), args.trials, args.seeds, args.window)
        for workers in (1, 2):
            wall, cpu = timed(study, Path(tmp) / f"w{workers}", workers)
            rows[workers] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
            if not args.json:
                print(f"{workers} worker(s): wall {wall:7.2f} s   CPU {cpu:7.2f} s", flush=True)
        same = comparable(Path(tmp) / "w1") == comparable(Path(tmp) / "w2")
    doc = {"study": {"runs": RUNS, "candidates": list(CANDIDATES), "trials": args.trials, "seeds": args.seeds,
                     "window_s": args.window},
           "serial": rows[1], "two_workers": rows[2],
           "ratio_wall": round(rows[2]["wall_s"] / rows[1]["wall_s"], 3),
           "ratio_cpu": round(rows[2]["cpu_s"] / rows[1]["cpu_s"], 3),
           "same_results": same, "parallel_capacity": round(capacity, 2),
           "load_average": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"ratio 2 workers / 1: wall {doc['ratio_wall']:.3f}, CPU {doc['ratio_cpu']:.3f}; same results: "
              f"{same} (TPE with workers draws other trials than a serial run, by design); "
              f"parallel capacity before the runs {capacity:.2f}x, load average {doc['load_average']}")


if __name__ == "__main__":
    main()
