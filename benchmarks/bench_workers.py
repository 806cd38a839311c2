"""Parallel TPE: wall time of a 200-trial study with N worker processes against one serial run.

The study is a real calib search: TPE over the two parameters of the
``per_step_plus_per_layer`` overhead model (``step_us_const``,
``per_layer_us``), minimising the train TPOT MAPE of the 9 HG1 train
experiments (:func:`calib.studies.evaluate.evaluate`, the HG1 objective).
Each run is a
fresh Python process on a fresh journal file (the storage of ``calib study
run --workers N``), timed from start to exit (imports and the first, slow,
evaluations included).  Each run's process is set up as the ``calib`` program
(:func:`calib.cli.as_program`: one OpenBLAS thread, the garbage collector
paused while it imports and then frozen, :func:`calib.cli.finished` at the
end); the parallel run then does what ``calib study run --workers N`` does:
it warms what every worker needs (the train experiments' replays, as
:func:`calib.studies.kinds.hg1.warm`), forks ``N - 1`` workers and works as
the N-th.

Run (on demand, not in CI)::

    python benchmarks/bench_workers.py                 # 200 trials, 2 workers
    python benchmarks/bench_workers.py --trials 100 --workers 3

Prints the serial and parallel wall times, the ratio (target on a 2-core
machine with 2 workers: <= 0.55, issue 15), the trial counts, and how much parallel
CPU the machine offers at that moment (other jobs on a shared machine take
their share: with 2 busy cores elsewhere, 2 workers cannot beat one).
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


ESTIMATOR = {"variant": "v2.3", "mode": "reference", "lengths": "reference", "seed": 42}


def train_experiments():
    from calib.data import load_experiments

    X = load_experiments()
    return X[X["hg1_split"] == "train"]


def objective_factory():
    """The HG1 objective (train mean TPOT APE) of the two-parameter overhead model."""
    from calib.estimators.roofline import RooflineRegressor
    from calib.studies.evaluate import evaluate

    train = train_experiments()
    base = RooflineRegressor(**ESTIMATOR).get_params()

    def objective(params: dict):
        ev = evaluate(train, {**base, "overhead_model": "per_step_plus_per_layer", **params})
        return float(ev["tpot_ape"].mean()), {"train_e2e_mape": float(ev["e2e_ape"].mean())}

    return objective


def warm() -> None:
    """What the lead of ``calib study run --workers N`` does before it forks (``warm`` of the study's kind, here
    :func:`calib.studies.kinds.hg1.warm` of an HG1 study with this estimator): the train experiments' replays
    built and run once, inherited by the workers."""
    from calib.estimators.roofline import RooflineRegressor

    RooflineRegressor(**ESTIMATOR).predict_all(train_experiments())


def space():
    from optuna.distributions import FloatDistribution

    return {"step_us_const": FloatDistribution(0.0, 2000.0), "per_layer_us": FloatDistribution(0.0, 500.0)}


def run_search(url: str, n_trials: int, progress: bool = False) -> int:
    from calib.calibrate.trials import recording, tpe_search
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


def run_study_like(url: str, n_trials: int, workers: int) -> None:
    """What ``calib study run --workers N`` does: import (GC paused, then frozen), warm what the workers need,
    fork N - 1 workers, then work as one."""
    import multiprocessing as mp

    from calib.cli import finished, importing

    with importing():  # the imports a lead has done when it forks
        import calib.calibrate.trials  # noqa: F401
        import calib.estimators.roofline  # noqa: F401
        import calib.studies.evaluate  # noqa: F401
        import calib.studies.runner  # noqa: F401
    if workers > 1:
        warm()
    ctx = mp.get_context("fork")
    children = [ctx.Process(target=_child, args=(url, n_trials)) for _ in range(workers - 1)]
    for c in children:
        c.start()
    n = run_search(url, n_trials)
    for c in children:
        c.join()
    print(f"  lead {os.getpid()}: {n} trials, cpu={time.process_time():.2f} s (imports included)", flush=True)
    finished()


def _child(url: str, n_trials: int) -> None:
    n = run_search(url, n_trials)
    print(f"  worker {os.getpid()}: {n} trials, cpu={time.process_time():.2f} s", flush=True)


def _burn(n: int = 2_000_000) -> float:
    t0, x = time.perf_counter(), 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - t0


def parallel_capacity(workers: int) -> float:
    """Throughput of ``workers`` CPU-bound processes relative to one, now (2.0 on an idle 2-core machine)."""
    import multiprocessing as mp

    one = _burn()
    with mp.get_context("fork").Pool(workers) as pool:
        t0 = time.perf_counter()
        pool.map(_burn, [2_000_000] * workers)
        many = time.perf_counter() - t0
    return workers * one / many


def timed_run(url: str, n_trials: int, workers: int) -> tuple[float, float]:
    """Wall time of a fresh process running the study (imports and first evaluations included), and the
    largest CPU time of one of its processes (its wall time on idle cores)."""
    import re

    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--run", url, "--trials", str(n_trials), "--workers",
                          str(workers)], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    print(out, end="")
    return wall, max(float(x) for x in re.findall(r"cpu=([0-9.]+)", out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--run", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        from calib.cli import as_program

        as_program()  # before anything imports numpy, as the calib program
        run_study_like(args.run, args.trials, args.workers)
        return
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.workers} CPU-bound processes "
          f"get {parallel_capacity(args.workers):.2f}x the throughput of one right now (other jobs skew the ratio)")
    with tempfile.TemporaryDirectory() as tmp:
        serial_url, parallel_url = f"journal:{tmp}/serial.journal", f"journal:{tmp}/parallel.journal"
        serial, serial_cpu = timed_run(serial_url, args.trials, 1)
        print(f"serial   : {serial:7.2f} s  {dict(counts(serial_url))}")
        parallel, parallel_cpu = timed_run(parallel_url, args.trials, args.workers)
        print(f"parallel : {parallel:7.2f} s  {dict(counts(parallel_url))}  ({args.workers} workers)")
    print(f"ratio parallel/serial = {parallel / serial:.3f}  (target <= 0.55 with 2 workers on 2 idle cores; "
          f"parallel capacity now {parallel_capacity(args.workers):.2f}x, load average {os.getloadavg()[0]:.2f})")
    print(f"busiest process CPU time: serial {serial_cpu:.2f} s, parallel {parallel_cpu:.2f} s; ratio "
          f"{parallel_cpu / serial_cpu:.3f} (the wall-time ratio on {args.workers} idle cores, waits aside)")


if __name__ == "__main__":
    main()
