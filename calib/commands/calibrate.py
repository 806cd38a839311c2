"""``calib calibrate DATA... --out DIR``: fit a calibration on your own runs, with a held-out report.

DATA are run folders (``calib import`` output or inference-perf folders),
folders of runs, or run names (as ``calib predict`` takes them).  The rows are
the load stages of the runs (:func:`calib.estimators.load_stages`); the fit is
``Calibrator(LoadedRegressor(variant="v4", overhead_model="per_sequence"),
space=..., objective=..., search=TPE(...))`` — the joint study's candidate
(``studies/joint.yaml``, the shipped ``h100-vllm.yaml``), which also times
mixture-of-experts models: a per-GEMM roofline with a constant MFU, bandwidth
efficiency and kernel floor, prefill- and decode-attention efficiencies, the
TP all-reduce latency, a per-step and per-sequence CPU time, and client-side
latencies per request and per input token.  Its objective is the joint
study's: per stage, TPOT, E2E and TTFT APE weighted 1, each capped at 2; mean
over runs.

Held out: with two or more runs (``--cv run``, default) or models (``--cv
model``), ``sklearn.model_selection.cross_validate`` with
``LeaveOneGroupOut`` refits the calibrator without each group and predicts the
left-out runs' full traces.  The final calibration is then fitted on all runs
and written as ``DIR/calibration.yaml`` (with the held-out figures in its
``heldout``), beside ``DIR/report.json`` and the Optuna storage
``DIR/optuna.db`` (``optuna-dashboard sqlite:///DIR/optuna.db``).

Budget: by default TPE, 100 trials, one seed, and search replays cut to the
first 60 s of every load stage (held-out and final predictions replay full
traces) — about 1-3 minutes on 2 cores for 2-3 shipped runs.  ``--trials``,
``--seeds`` and ``--window`` raise it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

__all__ = ["register", "joint_candidate"]

#: The shipped study whose single candidate ``calib calibrate`` fits.
FIT_STUDY = "joint"


def joint_candidate() -> tuple[dict, dict, dict]:
    """``(fixed, space, objective)`` of the shipped joint study's candidate: what ``calib calibrate`` fits.

    ``fixed`` holds the candidate's physics, overhead model and ``cpu_overlap`` (``LoadedRegressor`` parameters),
    ``space`` the searched :class:`~calib.calibrate.Range` by settings name (built by the study's own
    :meth:`~calib.studies.loaded_data.CandidateStudy.space`), ``objective`` the loss weights and cap.
    """
    from calib.resources import study_file
    from calib.studies.spec import load_study_file

    spec = load_study_file(study_file(FIT_STUDY))
    (cand,) = spec.candidates
    fixed = {**cand.physics, "overhead_model": cand.overhead_model, "cpu_overlap": cand.cpu_overlap}
    return fixed, spec.space(cand), spec.objective.model_dump()


def register(subparsers) -> None:
    from calib.commands.import_runs import positive_int

    p = subparsers.add_parser("calibrate", help="fit a calibration on your runs (TPE) with a held-out report",
                              description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", nargs="+", help="run folder, folder of runs, or run name")
    p.add_argument("--out", required=True, help="output folder (calibration.yaml, report.json, optuna.db)")
    p.add_argument("--data-dir", help="folder of runs the names are looked up in first (default: $CALIB_DATA; "
                                      "then the shipped dataset)")
    p.add_argument("--trials", type=positive_int, default=100, help="TPE trials per seed (default 100)")
    p.add_argument("--seeds", type=positive_int, default=1, help="independent TPE seeds (default 1)")
    p.add_argument("--window", type=float, default=60.0, metavar="S",
                   help="search replays keep the first S seconds of every load stage (default 60; 0: full runs)")
    p.add_argument("--cv", choices=("run", "model", "none"), default="run",
                   help="held-out groups: leave one run out (default), one model out, or none")
    p.add_argument("--hardware", default="h100", help="hardware of the replays (default h100)")
    p.add_argument("--output-rule", choices=("profile", "recorded", "exclude"), default="profile",
                   help="output-count rule (calib.data.traces; default profile)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--force", action="store_true", help="overwrite files in --out that calib did not create")
    p.add_argument("--json", action="store_true", help="print report.json")
    p.set_defaults(func=run)


def _stages(folders: list[Path], window_s: float | None, output_rule: str):
    import pandas as pd

    from calib.estimators import load_stages

    by_parent: dict[Path, list[str]] = {}
    for f in folders:
        by_parent.setdefault(f.resolve().parent, []).append(f.name)
    parts = [load_stages(parent, names, window_s=window_s, output_rule=output_rule)
             for parent, names in by_parent.items()]
    X = pd.concat(parts) if len(parts) > 1 else parts[0]
    X.attrs["skipped"] = [s for part in parts for s in part.attrs.get("skipped", [])]
    return X


def run(args: argparse.Namespace) -> int:
    from calib.cli import importing

    with importing():  # imported once and frozen
        import numpy as np
        from sklearn.model_selection import LeaveOneGroupOut, cross_validate

        from calib.calibrate import TPE, Calibrator
        from calib.commands.predict import resolve_runs, run_prediction
        from calib.data.runs import OutputFolder
        from calib.errors import CalibError
        from calib.estimators import LoadedRegressor
        from calib.metrics import APE_KEYS, mean_apes

    if not (math.isfinite(args.window) and args.window >= 0):
        raise CalibError(f"must be >= 0 seconds, got {args.window}", field="--window")
    window = args.window or None
    t0 = time.time()
    folders = resolve_runs(args.data, args.data_dir)
    by_name = {f.name: f for f in folders}
    X = _stages(folders, window, args.output_rule)
    out = OutputFolder(args.out, force=args.force)
    out.check(["calibration.yaml", "report.json", "optuna.db"])
    db = out.claim("optuna.db").resolve()
    storage = f"sqlite:///{db}"
    fixed, space, objective = joint_candidate()
    base = LoadedRegressor(**fixed, hardware=args.hardware)
    cal = Calibrator(base, space=space, objective=objective, search=TPE(n_trials=args.trials, seeds=args.seeds),
                     storage=storage, study_name="calibrate", progress=args.progress)

    models = X["model"].astype(str).map(lambda m: Path(m).parent.name if m.endswith(".json") else m)
    groups = {"run": X["run"].astype(str), "model": models, "none": None}[args.cv]
    heldout_runs, folds = [], []
    if groups is not None and groups.nunique() >= 2:
        cv = cross_validate(cal, X, groups=groups.to_numpy(), cv=LeaveOneGroupOut(), return_estimator=True,
                            return_indices=True, error_score="raise")
        for k, (est, test) in enumerate(zip(cv["estimator"], cv["indices"]["test"])):
            test_runs = sorted(X.iloc[test]["run"].astype(str).unique())
            fold = {"fold": k, "heldout": sorted(groups.iloc[test].unique().tolist()), "runs": test_runs,
                    "best_params": {kk: float(v) for kk, v in est.best_params_.items()},
                    "train_loss": est.best_loss_, "test_score_windowed_stages": float(cv["test_score"][k]),
                    "predictions": []}
            for r in test_runs:
                entry, _ = run_prediction(by_name[r], est.best_settings_, output_rule=args.output_rule)
                fold["predictions"].append(_short(entry))
                heldout_runs.append(_short(entry))
            folds.append(fold)
        agg = mean_apes([e["ape"] for e in heldout_runs], APE_KEYS, over="run")
        heldout = {"aggregation": f"mean APE over held-out runs (cross_validate, LeaveOneGroupOut by {args.cv}; "
                                  "each run's full trace predicted by the fit that left its group out)",
                   **{k: agg["mape"][k] for k in APE_KEYS}, "n_runs": len(heldout_runs)}
    else:
        heldout = {"aggregation": "none", "note": "no held-out estimate: " + (
            "--cv none" if groups is None else f"a single {args.cv} ({groups.iloc[0]}); give runs of two or more")}
    cal.fit(X)
    final = []
    for r in sorted(by_name):
        entry, _ = run_prediction(by_name[r], cal.best_settings_, output_rule=args.output_rule)
        final.append(_short(entry))
    calibration = cal.calibration_.model_copy(update={
        "data": {**cal.calibration_.data, "runs": sorted(by_name), "window_s": window,
                 "source": "calib calibrate: load stages of the runs " + ", ".join(sorted(by_name))},
        "heldout": heldout,
        "notes": "fitted by calib calibrate on the runs listed in data.runs (train APEs in report.json); held-out "
                 "figures in heldout"})
    import yaml

    text = "# calib calibration file: settings + provenance (calib.Calibration)\n" + yaml.safe_dump(
        calibration.to_dict(), sort_keys=False, allow_unicode=True)
    out.write_text("calibration.yaml", text)
    report = {
        "runs": sorted(by_name), "n_stages": len(X), "skipped_stages": X.attrs.get("skipped", []),
        "fixed": fixed, "space": {k: [r.low, r.high] for k, r in space.items()}, "objective": objective,
        "search": {"algorithm": "tpe", "n_trials": args.trials, "seeds": list(range(args.seeds)),
                   "window_s": window, "storage": "optuna.db"},
        "cv": args.cv, "folds": folds, "heldout": heldout,
        "final": {"best_params": {k: float(v) for k, v in cal.best_params_.items()}, "train_loss": cal.best_loss_,
                  "train_predictions": final},
        "elapsed_s": round(time.time() - t0, 1),
        "dashboard": f"pip install optuna-dashboard; optuna-dashboard sqlite:///{db}",
    }
    out.write_text("report.json", json.dumps(report, indent=1, default=_jsonable) + "\n")
    if args.json:
        print(json.dumps(report, indent=1, default=_jsonable))
        return 0
    pct = lambda x: "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f} %"  # noqa: E731
    print(f"calibrated on {len(by_name)} run(s), {len(X)} load stages, in {report['elapsed_s']:.0f} s "
          f"(TPE {args.trials} trials x {args.seeds} seed(s), search window {window or 'full'} s)")
    for f in folds:
        for e in f["predictions"]:
            print(f"  held out {e['run']}: APE TTFT {pct(e['ape']['ttft_mean_ms'])}, "
                  f"TPOT {pct(e['ape']['tpot_mean_ms'])}, E2E {pct(e['ape']['e2e_mean_ms'])}")
    if heldout.get("aggregation") != "none":
        print(f"held-out mean APE over runs: TTFT {pct(heldout['ttft_mean_ms'])}, TPOT {pct(heldout['tpot_mean_ms'])},"
              f" E2E {pct(heldout['e2e_mean_ms'])}")
    else:
        print(heldout["note"])
    print("final fit: " + ", ".join(f"{k.split('.')[-1]}={v:.4g}" for k, v in cal.best_params_.items()))
    for e in final:
        print(f"  train {e['run']}: APE TTFT {pct(e['ape']['ttft_mean_ms'])}, TPOT {pct(e['ape']['tpot_mean_ms'])}, "
              f"E2E {pct(e['ape']['e2e_mean_ms'])}")
    print(f"wrote {out.path / 'calibration.yaml'}, report.json; trials in {db} "
          f"(optuna-dashboard sqlite:///{db})")
    return 0


def _short(entry: dict) -> dict:
    keys = ("ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms", "e2e_p90_ms")
    return {"run": entry["run"], "model": entry["model"], "group": entry["group"],
            "measured": {k: entry["measured"][k] for k in keys}, "predicted": {k: entry["predicted"][k] for k in keys},
            "ape": {k: entry["ape"][k] for k in keys}}


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
