"""REPORT.md and figures of a loaded-run calibration study (``kind: batched_calibration``)."""

from __future__ import annotations

import json
from pathlib import Path

from calib.reporting.batched_validation import (APE_KEYS, APE_NAMES, ape_bars, diagnosis_lines, group_table,
                                                rule_lines, runs_table, scatter_grid, short, stage_table)
from calib.reporting.plots import plt, save
from calib.reporting.tables import md_table, pct

__all__ = ["write"]


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def write(results: dict, out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    r = results
    best = r["best_model"]
    s = r["settings"]
    lines = [f"# {r['study']}: overhead models calibrated on loaded runs (leave-one-model-out)", "",
             r.get("description", "").strip(), "",
             f"Physics fixed to `{json.dumps(r['physics'])}`; TPE over each overhead model's parameters, "
             f"{s['search']['n_trials']} trials per fold ({s['search']['n_startup_trials']} random start-up), seed "
             f"{s['search']['seed']}.  Search replays cut to the first "
             f"{s['search']['window_s'] if s['search']['window_s'] else 'all'} s of every load stage; held-out "
             "errors replay full traces.", "",
             f"Search loss per run: Σ w·min(APE, {s['objective']['cap']:g}) / Σ w with weights "
             f"{json.dumps(s['objective']['weights'])} on the mean TTFT, TPOT and E2E; averaged over runs.", "",
             f"Best overhead model (lowest mean held-out loss over the dense runs): **`{best}`**.", ""]
    if s.get("extra_search"):
        lines += [f"Searched with every overhead model: {json.dumps(s['extra_search'])} — `request_latency_ms` is a "
                  "client-side latency added to each predicted TTFT and E2E (HTTP, API server, first-token "
                  "streaming); it does not occupy the engine and does not change TPOT.", ""]
    lines += rule_lines(r)
    # 1. ranking
    def calm(c: dict | None) -> str:
        return f"{pct(c['tpot_mean_ms'])} / {pct(c['e2e_mean_ms'])} / {pct(c['ttft_mean_ms'])}" if c else "—"

    rows = []
    for x in r["ranking"]:
        m = x["heldout_mape"] or {}
        w = x["worst_fold"] or {}
        rows.append([x["overhead_model"], f"{x['heldout_loss']:.3f}", *[pct(m.get(k)) for k in APE_KEYS],
                     f"{w.get('heldout_model', 'n/a')} ({w.get('heldout_loss', float('nan')):.3f})",
                     ", ".join(short(u) for u in x["runaway_runs"]) or "none",
                     calm(x.get("heldout_mape_without_runaway"))])
    base = r.get("baseline")
    if base:
        g = base["groups"]["dense"]
        m = g.get("mape") or {}
        rows.append([f"*synchronous only: {base['calibration']['label']}*",
                     f"{base.get('heldout_loss', float('nan')):.3f}",
                     *[pct(m.get(k)) for k in APE_KEYS], "—",
                     ", ".join(short(u) for u in g.get("runaway_runs", [])) or "none",
                     calm(g.get("mape_without_runaway"))])
    lines += ["## 1. Ranking (held-out errors on the dense runs; every run held out once)", "",
              md_table(["overhead model", "held-out loss", *[f"{APE_NAMES[k]} MAPE" for k in APE_KEYS],
                        "worst fold (loss)", "runaway runs", "TPOT / E2E / TTFT MAPE without runaway runs"], rows),
              ""]
    if base:
        lines += [f"Synchronous-only calibration for comparison: {base['text']}.", ""]
    # 2. folds
    lines += ["## 2. Folds", ""]
    for name, mdl in r["models"].items():
        frows = []
        for f in mdl["folds"]:
            hm = f["heldout_mape"]
            lat = f.get("request_latency_ms") or 0.0
            fitted = _params(f["overhead_params"]) + (f"; request latency {lat:.3g} ms" if lat else "")
            frows.append([f["heldout_model"], fitted, f"{f['train_loss']:.3f}",
                          f"{f['heldout_loss']:.3f}", *[pct(hm.get(k)) for k in APE_KEYS]])
        lines += [f"**{name}** (search space {json.dumps(mdl.get('search_space', {}))})", "",
                  md_table(["held-out model", "fitted parameters", "train loss (windowed)", "held-out loss",
                            *[f"{APE_NAMES[k]} APE" for k in APE_KEYS]], frows), ""]
    # 3. per run, best vs baseline
    lines += [f"## 3. Per run — `{best}` (held out) ", "", runs_table(r["runs"], show_calibration=True), "",
              "![E2E per request](e2e_scatter_best.png)", "", "![APE per run](ape_per_run.png)", ""]
    if base:
        lines += [f"### Per run — synchronous only (`{base['calibration']['label']}`)", "", runs_table(base["runs"]),
                  ""]
    lines += [f"## 4. Per load stage — `{best}` (measured / predicted, ms)", "",
              stage_table([e for e in r["runs"] if e.get("stages")]), ""]
    lines += [f"## 5. What the remaining error is made of — `{best}`", ""] + diagnosis_lines(r["runs"])
    # 6. final fit and other runs
    fin = r.get("final_fit")
    if fin:
        lines += ["## 6. Fit on all dense runs (the calibration to use)", "", f"{fin['text']}.", "",
                  f"Overhead `{fin['overhead_model']}`: {_params(fin['overhead_params'])}; client-side request "
                  f"latency {fin.get('request_latency_ms', 0.0):.3g} ms (train loss {fin['train_loss']:.3f}, "
                  "windowed).", ""]
        other = fin["runs"]
        if other:
            lines += ["Runs no fold held out (mixture-of-experts, overloaded reasoning), replayed with this fit "
                      "(reported apart, never averaged in):", "", runs_table(other), "",
                      group_table({"all-dense fit": fin["groups"]}), ""]
    lines += ["## Settings (to rerun exactly)", "", "```json", json.dumps(s, indent=2), "```", ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    files = [out / "REPORT.md"]
    p = scatter_grid(r["runs"], out / "e2e_scatter_best.png", f"{r['study']} — {best} (held out): per-request E2E")
    if p:
        files.append(p)
    series = {f"{best} (held out)": r["runs"]}
    if base:
        series[f"sync only: {base['calibration']['label']}"] = base["runs"]
    p = ape_bars(series, "e2e_mean_ms", out / "ape_per_run.png", "mean-E2E APE per run (symlog)")
    if p:
        files.append(p)
    p = _loss_plot(r, out / "heldout_loss.png")
    if p:
        files.append(p)
    return files


def _loss_plot(r: dict, path: Path) -> Path | None:
    models = list(r["models"])
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    folds = sorted({f["heldout_model"] for m in models for f in r["models"][m]["folds"]})
    width = 0.8 / max(len(folds), 1)
    for i, fold in enumerate(folds):
        vals = [next((f["heldout_loss"] for f in r["models"][m]["folds"] if f["heldout_model"] == fold), 0.0)
                for m in models]
        ax.bar([j + i * width for j in range(len(models))], vals, width, label=f"held out {fold}")
    ax.set_xticks([j + width * (len(folds) - 1) / 2 for j in range(len(models))])
    ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out loss")
    ax.set_title("held-out loss per overhead model and fold")
    ax.legend(fontsize=7)
    save(fig, path)
    return path
