"""Generalization-study benchmark (a script, not a test).

    python benchmarks/bench_generalization.py [--quick] [--mode reference|corrected] [--skip-tpe] [--baseline SRC]

1. ``studies/split-sensitivity.yaml``: the HG1 search on all 715 splits, from a
   cold start (empty replay cache, fresh storage), then again on the filled
   storage (no replay), then the selection alone (715 phased searches on the
   APE matrix).  Baseline in the same run: the per-replay cost measured here
   times the replays a split-by-split search would need (715 splits x its
   grid values x the 9 train experiments), so the ratio is what computing the
   APE matrix once saves.  Target: < 20 s.
2. ``studies/overhead-models.yaml`` in one mode: every candidate, nested
   cross-validation (outer leave-one-family-out, SelectBest inside, one TPE
   search per fold, seed and candidate), from a cold start.  Prints the total,
   the Optuna studies and trials, and the cost per trial split into the
   replay (``predict_all``) and the rest (sampler + storage).  Target (issue
   15): both modes together <= 60 s CPU.  ``--quick`` runs a cut-down copy (two
   models, 10 trials per seed).  ``--baseline SRC`` also runs the same study
   file with another calib source tree (e.g. ``git archive HEAD | tar -x -C
   /tmp/base``), then this one, each in a fresh process, and prints their CPU
   times (user + system), the ratio (what to compare across machines and
   loads) and whether their results are identical.
3. Storage cost per TPE trial, trivial objective, SQLite in a temp folder:
   :func:`calib.calibrate.trials.tpe_search` (every ask/tell on the storage)
   against :func:`calib.studies.apematrix.tpe_search` (in-memory study,
   trials copied to the storage in batches).

Times are wall-clock and process CPU time (one core: the studies are single-threaded).
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
import warnings
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calib.estimators.roofline import clear_cache  # noqa: E402
from calib.studies.runner import run_study  # noqa: E402


class Timer:
    """Wall-clock and CPU seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c

    def __str__(self) -> str:
        return f"{self.wall:8.2f} s wall {self.cpu:8.2f} s CPU"


def study_file(name: str, mode: str) -> Path:
    twin = REPO / "studies" / f"{name}-corrected.yaml"  # a study not yet merged into one file with `modes:`
    return twin if mode == "corrected" and twin.exists() else REPO / "studies" / f"{name}.yaml"


def run_mode(path: Path, out: Path, mode: str, **kw):
    """Run one mode of a study file (with ``modes:``) or the file as written."""
    from calib.studies.spec import load_study_file

    return run_study(path, out, mode=mode if load_study_file(path).modes else None, **kw)


def bench_split_sensitivity(mode: str, tmp: Path) -> None:
    import numpy as np

    from calib.data import load_experiments
    from calib.estimators.roofline import RooflineRegressor
    from calib.calibrate.model_selection import AllKOfNSplit, materialize_splits
    from calib.studies.apematrix import CandidateStore, GridApe, phased_optima
    from calib.studies.evaluate import evaluate
    from calib.studies.spec import load_study_file

    path = study_file("split-sensitivity", mode)
    print(f"\n1. split sensitivity ({path.name})")
    clear_cache()
    with Timer() as cold:
        r = run_mode(path, tmp / "ss", mode, progress=False, report=False)
    with Timer() as warm:
        run_mode(path, tmp / "ss", mode, progress=False, report=False)
    spec = load_study_file(path)
    spec = spec.for_mode(mode) if spec.modes else spec
    X = load_experiments(spec.dataset)
    base = RooflineRegressor(**spec.estimator).get_params()
    folds = materialize_splits(AllKOfNSplit(spec.splitter.n_test), X)
    store = CandidateStore(X, base, __import__("optuna").storages.InMemoryStorage(), "bench")
    grid = GridApe(store, spec.parameter)
    phased_optima(grid, spec.phases, [f.train_idx for f in folds])  # fills the matrix (replays)
    with Timer() as select:
        phased_optima(grid, spec.phases, [f.train_idx for f in folds])
    train = X.loc[list(folds[0].train)]
    evaluate(train, {**base, spec.parameter: 80.0})
    reps = 5
    with Timer() as one:
        for v in np.linspace(81, 85, reps):
            evaluate(train, {**base, spec.parameter: float(v)})
    per_eval = one.wall / reps
    n_grid = len(spec.phases[0].grid.values()) + sum(2 * int(round(p.radius / p.step)) + 1 for p in spec.phases[1:])
    baseline = len(folds) * n_grid * per_eval
    print(f"   cold (replays + 715 searches + results): {cold}   [target < 20 s]")
    print(f"   warm (storage filled, no replay):        {warm}")
    print(f"   the 715 phased searches alone:           {select}")
    print(f"   grid values replayed once on all 13:     {r['settings']['grid_values_evaluated']}")
    print(f"   one replay of a train fold (9 exps):     {1e3 * per_eval:8.1f} ms")
    print(f"   baseline, split by split: 715 x {n_grid} grid values x {1e3 * per_eval:.0f} ms = {baseline:8.1f} s "
          f"-> {baseline / cold.wall:.0f}x slower than the cold run")


def bench_overhead_models(mode: str, tmp: Path, quick: bool) -> None:
    import optuna

    from calib.estimators.roofline import RooflineRegressor
    from calib.studies.storage import default_storage_url, open_storage

    path = overhead_models_file(tmp, quick)
    print(f"\n2. overhead models, nested CV ({path.name}, {mode} mode)")
    stats = {"n": 0, "wall": 0.0}
    real = RooflineRegressor.predict_all

    def timed(self, X):
        t = time.perf_counter()
        try:
            return real(self, X)
        finally:
            stats["wall"] += time.perf_counter() - t
            stats["n"] += 1

    RooflineRegressor.predict_all = timed
    clear_cache()
    try:
        with Timer() as total:
            r = run_study(path, tmp / "om", mode=mode, progress=False, report=False)
    finally:
        RooflineRegressor.predict_all = real
    studies = optuna.get_all_study_summaries(open_storage(default_storage_url(tmp / "om")))
    trials = sum(s.n_trials for s in studies)
    print(f"   total (outer x inner x seeds x candidates): {total}   [target: both modes well under 15 min]")
    print(f"   Optuna studies: {len(studies)}, trials: {trials}; per trial {1e3 * total.wall / max(trials, 1):6.1f} ms "
          f"of which predict_all {1e3 * stats['wall'] / max(trials, 1):6.1f} ms ({stats['n']} calls)")
    sm = r["summary"]
    fmt = lambda h: f"{100 * h['median']:5.1f} % [{100 * h['min']:.1f}-{100 * h['max']:.1f}]"  # noqa: E731
    print("   held-out TPOT, mean APE over experiments, median [min-max] over seeds:")
    for name, c in sm["candidates"].items():
        print(f"     {name:40s} {fmt(c['heldout']['tpot'])}   (descriptive)")
    print(f"     {'selected (nested SelectBest)':40s} {fmt(sm['selected']['heldout']['tpot'])}")


def overhead_models_file(tmp: Path, quick: bool) -> Path:
    """``studies/overhead-models.yaml``, or with ``quick`` a cut-down copy of it in ``tmp``."""
    path = REPO / "studies" / "overhead-models.yaml"
    if quick:
        data = yaml.safe_load(path.read_text())
        data["models"] = [{"overhead": "per_layer", "n_trials": 10}, {"overhead": "per_layer_tp_power"}]
        data["search"] = {**data.get("search", {}), "n_trials": 10}
        path = tmp / "overhead-models-quick.yaml"
        path.write_text(yaml.safe_dump(data))
    return path


def study_process(src: Path, path: Path, out: Path) -> float:
    """CPU seconds (user + system) of ``calib study run`` of ``path`` (every mode) into ``out`` in a fresh process
    running calib from the source tree ``src``."""
    cmd = [sys.executable, "-m", "calib", "study", "run", str(path), "--out", str(out), "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=out.parent, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True,
                          text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} (PYTHONPATH={src}) failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def study_numbers(out: Path) -> list[str]:
    """The ``summary``, ``candidates`` and ``nested`` blocks of every ``results.json`` under ``out`` (as JSON)."""
    return [json.dumps({k: json.loads(f.read_text())[k] for k in ("summary", "candidates", "nested")},
                       sort_keys=True) for f in sorted(out.rglob("results.json"))]


def bench_against_baseline(baseline: Path, tmp: Path, quick: bool) -> None:
    """The overhead-model study (both modes) with the baseline tree, then with this one: CPU, ratio, identical
    results."""
    path = overhead_models_file(tmp, quick)
    print(f"\n2b. overhead models ({path.name}, both modes), fresh processes: baseline {baseline} against {REPO}")
    cpu = {}
    for name, src in (("baseline", baseline.resolve()), ("this", REPO)):
        cpu[name] = study_process(src, path, tmp / f"om-{name}")
        print(f"   {name:9s} {cpu[name]:8.1f} s CPU")
    same = study_numbers(tmp / "om-this") == study_numbers(tmp / "om-baseline")
    print(f"   ratio this / baseline: {cpu['this'] / cpu['baseline']:.3f}   [target: both modes <= 60 s CPU]   "
          f"results {'identical' if same else 'DIFFERENT'} (summary, candidates, nested)")


def bench_storage(tmp: Path, n: int = 30) -> None:
    from optuna.distributions import FloatDistribution

    from calib.calibrate import trials as search
    from calib.studies.apematrix import SearchParam, tpe_search
    from calib.studies.storage import open_storage

    print(f"\n3. storage cost per TPE trial ({n} trials, trivial objective, SQLite)")

    def objective(p):
        return [p["a"] ** 2 + p["b"]], {"train_tpot_mape": 0.1, "train_ttft_mape": 0.2, "train_e2e_mape": 0.3}

    st = open_storage(f"sqlite:///{tmp / 'bench-storage.db'}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Timer() as direct:
            search.tpe_search("direct", st, {"a": FloatDistribution(0, 1), "b": FloatDistribution(0, 1)},
                              lambda p: (objective(p)[0][0], objective(p)[1]), n, seed=0, progress=False,
                              sampler_options={"n_startup_trials": 10, "multivariate": True})
        with Timer() as mirror:
            tpe_search("mirror", st, {"a": SearchParam(low=0, high=1), "b": SearchParam(low=0, high=1)}, objective,
                       n_trials=n, seed=0, n_startup_trials=10)
    print(f"   calib.calibrate.trials.tpe_search:    {1e3 * direct.wall / n:7.1f} ms/trial")
    print(f"   calib.studies.apematrix.tpe_search: {1e3 * mirror.wall / n:7.1f} ms/trial "
          f"({direct.wall / mirror.wall:.1f}x less)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("reference", "corrected"), default="corrected")
    ap.add_argument("--quick", action="store_true", help="a cut-down overhead-model study")
    ap.add_argument("--skip-tpe", action="store_true", help="only the split-sensitivity part")
    ap.add_argument("--baseline", type=Path, help="another calib source tree: the overhead-model study (both "
                    "modes) timed with it and with this tree, in fresh processes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-generalization-") as d:
        tmp = Path(d)
        bench_split_sensitivity(args.mode, tmp)
        if not args.skip_tpe:
            bench_overhead_models(args.mode, tmp, args.quick)
            if args.baseline:
                bench_against_baseline(args.baseline, tmp, args.quick)
        bench_storage(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
