"""Generalization-study benchmark (a script, not a test).

    python benchmarks/bench_generalization.py [--quick] [--mode reference|corrected] [--skip-tpe]

1. ``studies/split-sensitivity.yaml``: the HG1 search on all 715 splits, from a
   cold start (empty replay cache, fresh storage), then again on the filled
   storage (no replay), then the selection alone (715 phased searches on the
   APE matrix).  Baseline in the same run: the per-replay cost measured here
   times the replays a split-by-split search would need (715 splits x its
   grid values x the 9 train experiments), so the ratio is what computing the
   APE matrix once saves.  Target: < 20 s.
2. ``studies/overhead-models.yaml``: every overhead model, nested CV over both
   schemes (TPE in each leave-one-family-out fold, pool selection over the 715
   splits), from a cold start.  Prints the total, the TPE trials and pool
   candidates replayed, and the cost per trial split into replay and
   sampler + storage.  Target: < 10 min.  ``--quick`` runs a cut-down copy
   (two models, 10 trials, 16 pool candidates).
3. Storage cost per TPE trial, trivial objective, SQLite in a temp folder:
   :func:`calib.calibrate.trials.tpe_search` (every ask/tell on the storage)
   against :func:`calib.studies.apematrix.tpe_search` (in-memory study,
   trials copied to the storage in batches).

Times are wall-clock and process CPU time (one core: the studies are single-threaded).
"""

from __future__ import annotations

import argparse
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
    return REPO / "studies" / (f"{name}.yaml" if mode == "reference" else f"{name}-corrected.yaml")


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
        r = run_study(path, tmp / "ss", progress=False, report=False)
    with Timer() as warm:
        run_study(path, tmp / "ss", progress=False, report=False)
    spec = load_study_file(path)
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
    from calib.studies.kinds import overhead_models as om

    path = study_file("overhead-models", mode)
    if quick:
        data = yaml.safe_load(path.read_text())
        data["models"] = [{"overhead": "per_layer", "n_trials": 10}, {"overhead": "per_layer_tp_power"}]
        data["sampler"] = {**data.get("sampler", {}), "n_trials": 10, "n_startup_trials": 5}
        data["all_splits"] = {**data.get("all_splits", {}), "pool_size": 16}
        path = tmp / "overhead-models-quick.yaml"
        path.write_text(yaml.safe_dump(data))
    print(f"\n2. overhead models, nested CV ({path.name})")
    stats = {"n": 0, "wall": 0.0}
    real = om._search_eval

    def timed(X, params):
        t = time.perf_counter()
        try:
            return real(X, params)
        finally:
            stats["wall"] += time.perf_counter() - t
            stats["n"] += 1

    om._search_eval = timed
    clear_cache()
    try:
        with Timer() as total:
            r = run_study(path, tmp / "om", progress=False, report=False)
    finally:
        om._search_eval = real
    trials = sum(s["trials"] for s in r["settings"]["samplers"] if s["sampler"].startswith("TPE"))
    pool = sum(s["trials"] for s in r["settings"]["samplers"] if not s["sampler"].startswith("TPE"))
    print(f"   total (all models, both schemes):        {total}   [target < 10 min]")
    print(f"   TPE trials: {trials} ({stats['n']} replayed, {trials - stats['n']} repeated points answered from "
          f"memory); pool candidates replayed on all 13: {pool}")
    if stats["n"]:
        print(f"   per trial: replay of the train experiments {1e3 * stats['wall'] / stats['n']:7.1f} ms")
    print("   ranking (held-out TPOT MAPE, leave one family out / all splits):")
    for e in r["ranking"]:
        h = e["heldout"]
        print(f"     {e['model']:45s} " + " / ".join(f"{100 * h[k]['tpot_mape']:5.1f} %" for k in h))


def bench_storage(tmp: Path, n: int = 30) -> None:
    from optuna.distributions import FloatDistribution

    from calib.studies import search
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-generalization-") as d:
        tmp = Path(d)
        bench_split_sensitivity(args.mode, tmp)
        if not args.skip_tpe:
            bench_overhead_models(args.mode, tmp, args.quick)
        bench_storage(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
