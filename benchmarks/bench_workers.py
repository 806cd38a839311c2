"""Parallel TPE: wall time of a 200-trial study with N worker processes against one serial run.

The study is a real calib search: TPE over the two parameters of the
``per_step_plus_per_layer`` overhead model (``step_us_const``,
``per_layer_us``), minimising the train TPOT MAPE of the 9 HG1 train
experiments (:func:`calib.studies.evaluate.evaluate`, the HG1 objective).  The serial run
and the parallel run each use a fresh journal file (the storage of
``calib study run --workers N``).  The parallel run starts its workers the way
``calib study run --workers N`` does: ``N - 1`` fresh Python processes
(imports included in the time) joining the study, plus the lead.

Run (on demand, not in CI)::

    python benchmarks/bench_workers.py                 # 200 trials, 2 workers
    python benchmarks/bench_workers.py --trials 100 --workers 3

Prints the serial and parallel wall times, the ratio (target on a 2-core
machine with 2 workers: <= 0.65) and the trial counts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def objective_factory():
    """The HG1 objective (train mean TPOT APE) of the two-parameter overhead model."""
    from calib.data import load_experiments
    from calib.estimator import RooflineRegressor
    from calib.studies.evaluate import evaluate

    X = load_experiments()
    train = X[X["hg1_split"] == "train"]
    base = RooflineRegressor(variant="v2.3", mode="reference", lengths="reference", seed=42).get_params()

    def objective(params: dict):
        ev = evaluate(train, {**base, "overhead_model": "per_step_plus_per_layer", "overhead_params": params})
        return float(ev["tpot_ape"].mean()), {"train_e2e_mape": float(ev["e2e_ape"].mean())}

    return objective


def space():
    from optuna.distributions import FloatDistribution

    return {"step_us_const": FloatDistribution(0.0, 2000.0), "per_layer_us": FloatDistribution(0.0, 500.0)}


def run_search(url: str, n_trials: int, progress: bool = False) -> int:
    from calib.studies.search import recording, tpe_search
    from calib.studies.storage import open_storage

    objective = objective_factory()
    with recording() as log:
        tpe_search("bench-tpe", open_storage(url), space(), objective, n_trials, seed=7, progress=progress,
                   sampler_options={"multivariate": True})
    return log[0]["evaluated"]


def counts(url: str) -> Counter:
    import optuna

    from calib.studies.storage import open_storage

    study = optuna.load_study(study_name="bench-tpe", storage=open_storage(url))
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        n = run_search(args.child, args.trials)
        print(f"  worker {os.getpid()}: {n} trials", flush=True)
        return

    t = time.perf_counter()
    f = objective_factory()
    f({"step_us_const": 0.0, "per_layer_us": 100.0})
    t1 = time.perf_counter()
    f({"step_us_const": 300.0, "per_layer_us": 90.0})
    print(f"objective: first evaluation {t1 - t:.3f} s, then {time.perf_counter() - t1:.3f} s; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other processes skew the ratio)")
    with tempfile.TemporaryDirectory() as tmp:
        serial_url, parallel_url = f"journal:{tmp}/serial.journal", f"journal:{tmp}/parallel.journal"
        t0 = time.perf_counter()
        run_search(serial_url, args.trials)
        serial = time.perf_counter() - t0
        print(f"serial   : {serial:7.2f} s  {dict(counts(serial_url))}")

        t0 = time.perf_counter()
        children = [subprocess.Popen([sys.executable, __file__, "--child", parallel_url, "--trials", str(args.trials)])
                    for _ in range(args.workers - 1)]
        n_lead = run_search(parallel_url, args.trials)
        for c in children:
            c.wait()
        parallel = time.perf_counter() - t0
        print(f"  lead {os.getpid()}: {n_lead} trials")
        print(f"parallel : {parallel:7.2f} s  {dict(counts(parallel_url))}  ({args.workers} workers)")
    print(f"ratio parallel/serial = {parallel / serial:.3f}  (target <= 0.65 with 2 workers on 2 cores; "
          f"{os.cpu_count()} CPUs here, load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
