"""``calib predict RUN... [--calibration FILE]``: predicted vs measured TTFT/TPOT/E2E of runs under load.

RUN is a run folder (calib's format, written by ``calib import``, or an
inference-perf folder), a folder of runs, or the name of a run of the data
folder (``--data-dir``, else ``$CALIB_DATA``) or of the shipped dataset, full
(``20260217-155451-llama-2-7b-tp1-codegen``) or as the reports print it
(``llama-2-7b-tp1-codegen``).  Each run is replayed through the
continuous-batching engine under the calibration's settings; per run and per
load stage the command prints measured and predicted mean, p50, p90 and p99 of
TTFT, TPOT and E2E and their APEs (fractions: 0.05 is 5 %), over the same
requests on both sides (those the replay finished).  TPOT per request is
(E2E - TTFT) / (O - 1), averaged over requests, on both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["register", "DEFAULT_CALIBRATION", "load_calibration", "resolve_runs", "flat_stats", "ape_of",
           "calibration_entry", "run_prediction"]

#: The calibration ``predict`` and ``capacity`` use without ``--calibration`` (package data).
DEFAULT_CALIBRATION = ("calibrations", "h100-vllm.yaml")
#: Metrics and statistics of the output, in order.
METRICS = ("ttft", "tpot", "e2e")
STATS = ("mean", "p50", "p90", "p99")


def shipped_calibrations() -> list[str]:
    """Names of the calibrations shipped in ``configs/calibrations`` (``--calibration NAME`` loads one)."""
    from calib.resources import config_path

    return sorted(p.stem for p in config_path("calibrations").glob("*.yaml"))


def load_calibration(path: str | None):
    """``(Calibration, label)``: the file given, a shipped calibration by name (``h100-vllm-additive``) when no
    such file exists, else the shipped default (``configs/calibrations``)."""
    from calib.calibration import Calibration
    from calib.resources import config_path

    if path:
        shipped = config_path("calibrations", f"{path}.yaml")
        if not Path(path).exists() and "/" not in str(path) and shipped.is_file():
            return Calibration.load(shipped), f"shipped {path} (calibrations/{path}.yaml)"
        return Calibration.load(path), str(path)
    default = config_path(*DEFAULT_CALIBRATION)
    return Calibration.load(default), f"shipped default ({'/'.join(DEFAULT_CALIBRATION)})"


def calibration_entry(cal, label: str) -> dict:
    """How a calibration is described in the commands' JSON."""
    s = cal.settings
    from calib.replay.loaded import describe_physics

    return {"file": label, "estimator": cal.estimator_class,
            "physics": describe_physics(s.physics_options()), "hardware": s.physics.hardware,
            "overhead": s.overhead.model_dump(), "request_latency_ms": s.replay.request_latency_ms,
            "heldout": cal.heldout or None}


def resolve_runs(items: list[str], data_dir: str | None = None) -> list[Path]:
    """Run folders of ``items`` (folders, folders of runs, or run names); one-line errors for unknown ones."""
    from calib.data.runs import find_run, is_run_folder, list_run_folders, shipped_dir, short_name
    from calib.errors import DataError
    from calib.resources import DATA_ENV

    roots: list[Path] = []
    if data_dir or os.environ.get(DATA_ENV):
        from calib.replay.loaded import resolve_data_dir

        roots.append(resolve_data_dir(data_dir))
    roots.append(shipped_dir())
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir() and (is_run_folder(path) or (path / "requests.json").is_file()):
            out.append(path)
        elif path.is_dir():
            found = list_run_folders(path)
            if not found:
                raise DataError("no run here (a folder with run.yaml or requests.json, or a folder of them)",
                                file=path, field="RUN")
            out += found
        else:
            hit = find_run(item, roots)
            if hit is None:
                known = ", ".join(short_name(p.name) for p in list_run_folders(roots[-1]))
                raise DataError(f"unknown run {item!r}: not a folder, and no run of that name in "
                                f"{', '.join(str(r) for r in roots)} (shipped: {known})", field="RUN")
            out.append(hit)
    seen: dict[str, Path] = {}
    for p in out:
        if p.name in seen and seen[p.name].resolve() != p.resolve():
            raise DataError(f"two runs are called {p.name!r} ({seen[p.name]}, {p})", field="RUN")
        seen[p.name] = p
    return list({p.resolve(): p for p in out}.values())


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def flat_stats(stats: dict) -> dict:
    """``{"ttft": {"mean": ..}, ..}`` -> ``{"ttft_mean_ms": .., "ttft_p50_ms": .., ...}`` (NaN -> None)."""
    return {f"{m}_{s}_ms": _num(stats[m][s]) for m in METRICS for s in STATS}


def ape_of(pred: dict, meas: dict) -> dict:
    """APE (a fraction) of every key of two :func:`flat_stats` (None where undefined)."""
    out = {}
    for k, m in meas.items():
        p = pred.get(k)
        out[k] = abs(p - m) / m if (p is not None and m) else None
    return out


def run_prediction(folder: Path, settings, *, window_s: float | None = None, output_rule: str = "profile"):
    """Replay one run folder under ``settings``: ``(entry, replay)`` (entry as in ``--json``)."""
    from calib.replay.loaded import load_run, replay_run, saturation

    lr = load_run(folder, output_rule=output_rule)
    rep = replay_run(lr, settings, window_s=window_s, record_steps=False)
    whole = rep.summary()
    meas, pred = flat_stats(whole["measured"]), flat_stats(whole["predicted"])
    stages = []
    for k, (mask, stage) in enumerate(zip(rep.stage_masks(), rep.trace.stages)):
        s = rep.summary(mask)
        sat = saturation(rep, mask)
        sm, sp = flat_stats(s["measured"]), flat_stats(s["predicted"])
        stages.append({"stage": k, "rate": stage.rate, "duration_s": stage.duration_s, "n_requests": s["n"],
                       "n_compared": s["n_compared"], "measured": sm, "predicted": sp, "ape": ape_of(sp, sm),
                       "saturated": sat["saturated"], "runaway": sat["runaway"]})
    t = lr.trace
    entry = {
        "run": lr.name, "source": str(folder), "model": Path(t.model).parent.name if t.model.endswith(".json")
        else t.model, "tp": int(t.tp), "profile": t.profile, "group": lr.group,
        "n_requests": int(rep.n), "n_compared": whole["n_compared"], "n_tpot": whole["n_tpot"],
        "excluded": int(t.excluded), "skipped": len(t.skipped), "output_rule": t.output_rule,
        "window_s": window_s, "measured": meas, "predicted": pred, "ape": ape_of(pred, meas), "stages": stages,
        "saturated_stages": [s["stage"] for s in stages if s["saturated"]],
        "runaway_stages": [s["stage"] for s in stages if s["runaway"]],
    }
    if lr.group == "overloaded":
        entry["note"] = "overloaded run (the server's queue grew without bound): report it apart from accuracy figures"
    return entry, rep


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="predicted vs measured TTFT/TPOT/E2E of runs under load (imported or shipped)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", metavar="RUN", nargs="+",
                   help="run folder, folder of runs, or run name (e.g. llama-2-7b-tp1-codegen)")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration file, or the name of one shipped in configs/calibrations (e.g. "
                        "h100-vllm-additive); default: h100-vllm, the joint study's v4 calibration for synchronous "
                        "and loaded serving, mixture-of-experts included")
    p.add_argument("--data-dir", help="folder of runs the names are looked up in first (default: $CALIB_DATA; "
                                      "then the shipped dataset)")
    p.add_argument("--window", type=float, metavar="S",
                   help="replay only the first S seconds of every load stage (faster; default: the full run)")
    p.add_argument("--output-rule", choices=("profile", "recorded", "exclude"), default="profile",
                   help="output-count rule (calib.data.traces; default profile)")
    p.add_argument("--out", default="calib-predict",
                   help="folder for the plots and predict.json (default ./calib-predict)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--force", action="store_true", help="overwrite files in --out that calib did not create")
    p.add_argument("--json", action="store_true", help="print one JSON object {\"runs\": [...]}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calib.data.runs import OutputFolder
    from calib.errors import CalibError

    if args.window is not None and not (math.isfinite(args.window) and args.window > 0):
        raise CalibError(f"must be > 0 seconds, got {args.window}", field="--window")
    cal, label = load_calibration(args.calibration)
    folders = resolve_runs(args.runs, args.data_dir)
    out = OutputFolder(args.out, force=args.force)
    entries = []
    for folder in folders:
        try:
            entry, rep = run_prediction(folder, cal.settings, window_s=args.window, output_rule=args.output_rule)
        except CalibError as exc:
            if exc.field != "physics.variant":
                raise
            entries.append({"run": folder.name, "source": str(folder), "supported": False, "note": exc.message})
            continue
        if not args.no_plot:
            entry["plot"] = str(out.write_figure(f"{entry['run']}.png", _figure(entry, rep, label)))
        entries.append(entry)
    doc = {"calibration": calibration_entry(cal, label),
           "tpot_definition": "per request (E2E - TTFT) / (O - 1), O after the output rule, averaged over requests; "
                              "the same on both sides",
           "ape": "|predicted - measured| / measured, a fraction, of each statistic over the requests the replay "
                  "finished", "runs": entries}
    out.write_text("predict.json", json.dumps(doc, indent=1) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"calibration: {label}")
    for e in entries:
        print()
        if e.get("supported") is False:
            print(f"{e['run']}: not predicted: {e['note']}")
            continue
        print(_table(e))
    print(f"\nwrote {out.path / 'predict.json'}" + ("" if args.no_plot else " and one PNG per run"))
    return 0


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.1f}" if abs(x) < 100_000 else f"{x:,.0f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _table(e: dict) -> str:
    lines = [f"{e['run']}  ({e['model']}, TP {e['tp']}, {e['n_compared']} of {e['n_requests']} requests compared"
             + (f", {e['excluded']} failed" if e["excluded"] else "") + f", group {e['group']})"]
    lines.append(f"  {'ms':<6}" + "".join(f"{h:>12}" for h in ("mean", "p50", "p90", "p99")) + "   APE mean"
                 + "".join(f"{h:>8}" for h in ("p50", "p90", "p99")))
    for m in METRICS:
        for side in ("measured", "predicted"):
            label = m.upper() if side == "measured" else "  pred"
            row = "".join(f"{_fmt(e[side][f'{m}_{s}_ms']):>12}" for s in STATS)
            apes = "" if side == "measured" else "".join(f"{_pct(e['ape'][f'{m}_{s}_ms']):>{11 if s == 'mean' else 8}}"
                                                         for s in STATS)
            lines.append(f"  {label:<6}{row}{apes}")
    for s in e["stages"]:
        flags = " SATURATED" if s["saturated"] else ""
        flags += " (runaway: the real server stayed stable)" if s["runaway"] else ""
        lines.append(f"  stage {s['stage']} ({s['rate']:g} req/s, {s['n_requests']} requests): APE of the means "
                     f"TTFT {_pct(s['ape']['ttft_mean_ms'])}, TPOT {_pct(s['ape']['tpot_mean_ms'])}, "
                     f"E2E {_pct(s['ape']['e2e_mean_ms'])}{flags}")
    if e.get("note"):
        lines.append(f"  note: {e['note']}")
    return "\n".join(lines)


def _figure(entry: dict, rep, label: str):
    import numpy as np

    from calib.reporting.plots import plt

    meas, pred = rep.measured, rep.predicted
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    done = np.isfinite(rep.e2e_ms)
    ax = axes[0]
    x, y = meas["e2e"][done] / 1e3, pred["e2e"][done] / 1e3
    ax.scatter(x, y, s=3, alpha=0.3)
    both = np.concatenate([x, y])
    lo, hi = (float(np.nanmin(both)), float(np.nanmax(both))) if both.size else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("measured E2E (s)")
    ax.set_ylabel("predicted E2E (s)")
    ax.set_title("E2E per request")
    for ax, m in zip(axes[1:], METRICS):
        spans = []
        for side, values, style in (("measured", meas[m], "-"), ("predicted", pred[m], "--")):
            v = np.sort(values[done & np.isfinite(values)])
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, style, label=side)
                spans += [v[0], v[-1]]
        if spans and min(spans) > 0 and max(spans) / min(spans) > 30:
            ax.set_xscale("log")
        ax.set_xlabel(f"{m.upper()} (ms)")
        ax.set_title(f"{m.upper()} CDF (APE of mean {_pct(entry['ape'][f'{m}_mean_ms'])})")
        ax.legend(fontsize=7)
    fig.suptitle(f"{entry['run']} — calibration: {label}", fontsize=9)
    fig.tight_layout()
    return fig
