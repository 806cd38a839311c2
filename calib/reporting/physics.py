"""REPORT.md and figures of a physics study (``kind: physics``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from calib.reporting.batched_validation import diagnosis_lines, rule_lines, runs_table, short, stage_table
from calib.reporting.plots import plt, save
from calib.reporting.tables import md_table, pct

__all__ = ["write"]


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def _loss(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def write(results: dict, out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    r = results
    s = r["settings"]
    best = r["best"]
    cands = r["candidates"]
    lines = [f"# {r['study']}: calibrated physics for v2.3, v2.4 and v3", "", r.get("description", "").strip(), "",
             f"Each candidate is scored by held-out error twice: **loaded** = leave-one-model-out over the dense "
             f"non-reasoning loaded-server runs (TPE, {s['loaded_search']['n_trials']} trials per fold, search replays "
             f"cut to {s['loaded_search']['window_s']} s per load stage, held-out replays on full traces); "
             f"**synchronous** = leave-one-family-out over the 13 synchronous experiments (TPE, "
             f"{s['synchronous']['n_trials']} trials per fold, RooflineRegressor "
             f"`{json.dumps(s['synchronous']['estimator'])}`).  Loss per run/experiment: Σ w·min(APE, "
             f"{s['objective']['cap']:g}) / Σ w, weights {json.dumps(s['objective']['weights'])}.  Rank: "
             f"{s['score']}.", ""]
    lines += rule_lines(r)
    # 1. ranking
    rows = []
    for x in r["ranking"]:
        lm, sm = x["loaded_heldout_mape"] or {}, x["sync_heldout_mape"] or {}
        lw, sw = x["loaded_worst_fold"] or {}, x["sync_worst_fold"] or {}
        rows.append([x["rank"], f"`{x['label']}`", x["variant"], x["overhead_model"],
                     "; ".join(f"{k} {v}" for k, v in x["search_space"].items()),
                     pct(lm.get("ttft_mean_ms")), pct(lm.get("tpot_mean_ms")), pct(lm.get("e2e_mean_ms")),
                     f"{lw.get('heldout_model', 'n/a')} ({_loss(lw.get('heldout_loss'))})",
                     pct(sm.get("ttft")), pct(sm.get("tpot")), pct(sm.get("e2e")),
                     f"{sw.get('heldout_family', 'n/a')} ({_loss(sw.get('heldout_loss'))})",
                     ", ".join(short(u) for u in x["loaded_runaway_runs"]) or "none", _calm(x), _loss(x["score"])])
    lines += ["## 1. Ranking", "",
              md_table(["#", "candidate", "variant", "overhead", "searched parameters", "loaded TTFT MAPE",
                        "loaded TPOT MAPE", "loaded E2E MAPE", "loaded worst fold (loss)", "sync TTFT MAPE",
                        "sync TPOT MAPE", "sync E2E MAPE", "sync worst family (loss)", "runaway runs",
                        "loaded TPOT / E2E / TTFT MAPE without runaway runs", "score"], rows),
              ""]
    # 2. best
    lines += ["## 2. Best calibrated physics", ""]
    blocks = [("Best overall", best)]
    bl = r.get("best_loaded")
    if bl and bl["label"] != best["label"]:
        blocks.append(("Best on the loaded runs alone", bl))
    for title, b in blocks:
        fin = b["final_fit"]
        lm, sm = b["loaded_heldout_mape"] or {}, b["sync_heldout_mape"] or {}
        lines += [f"**{title}: `{b['label']}`** ({b['variant']}; {b.get('rule', '')}).  Held-out errors: loaded TTFT "
                  f"{pct(lm.get('ttft_mean_ms'))}, TPOT {pct(lm.get('tpot_mean_ms'))}, E2E "
                  f"{pct(lm.get('e2e_mean_ms'))}, "
                  f"E2E p90 {pct(lm.get('e2e_p90_ms'))}; synchronous TTFT {pct(sm.get('ttft'))}, TPOT "
                  f"{pct(sm.get('tpot'))}, E2E {pct(sm.get('e2e'))}.", "",
                  "Reproducible settings (TPE fit on all dense loaded runs):", "", "```json",
                  json.dumps({"physics": fin["physics"], "overhead_model": fin["overhead_model"],
                              "overhead_params": fin["overhead_params"],
                              "request_latency_ms": fin.get("request_latency_ms", 0.0)}, indent=2), "```", ""]
    lines += ["`request_latency_ms` is a client-side latency added to each predicted TTFT and E2E of the loaded "
              "replay (HTTP, API server, first-token streaming); it does not occupy the engine, does not change "
              "TPOT and is not used on the synchronous side (RooflineRegressor has no such term).  An MFU scale "
              "near 3 clips most looked-up GEMM MFUs at 1: the fit then treats those GEMMs as memory-bound.", ""]
    trows = []
    for lab, t in (r.get("targets") or {}).items():
        if t:
            trows.append([f"`{lab}`", *["met" if t.get(k) else "**missed**" for k in
                                        ("tpot_mean_ms", "e2e_mean_ms", "ttft_mean_ms", "no_runaway", "all")]])
    if trows:
        lines += ["Issue-6 targets on the held-out dense loaded runs (mean APE over the 9 runs):", "",
                  md_table(["candidate", "TPOT < 10 %", "E2E < 10 %", "TTFT < 25 %", "no runaway", "all"], trows), ""]
    oo = r.get("overhead_only")
    if oo and oo in cands:
        c = cands[oo]
        m = c["loaded"]["overall"].get("mape") or {}
        sm2 = c["synchronous"]["heldout_mape"]
        lines += [f"Next to the overhead-only calibration `{oo}` (same protocol): loaded TTFT "
                  f"{pct(m.get('ttft_mean_ms'))}, TPOT {pct(m.get('tpot_mean_ms'))}, E2E {pct(m.get('e2e_mean_ms'))}; "
                  f"synchronous TTFT {pct(sm2['ttft'])}, TPOT {pct(sm2['tpot'])}, E2E {pct(sm2['e2e'])}.", ""]
    ref = r.get("batched_calibration")
    if ref:
        m = ref.get("heldout_mape") or {}
        lines += [f"Overhead-only calibration of `reports/batched-calibration` (best model `{ref['best_model']}`, "
                  f"physics {json.dumps(ref['physics'])}): held-out loaded TTFT {pct(m.get('ttft_mean_ms'))}, TPOT "
                  f"{pct(m.get('tpot_mean_ms'))}, E2E {pct(m.get('e2e_mean_ms'))}.", ""]
    # 3. per candidate folds
    lines += ["## 3. Folds per candidate", ""]
    for lab, c in cands.items():
        lines += [f"### `{lab}` — {c['variant']}, fixed {json.dumps(c['physics'])}, overhead `{c['overhead_model']}`",
                  ""]
        frows = []
        for f in c["loaded"]["folds"]:
            hm = f["heldout_mape"]
            frows.append(["loaded", f"-{f['heldout_model']}", _params(f["best_params"]), _loss(f["train_loss"]),
                          _loss(f["heldout_loss"]), pct(hm.get("ttft_mean_ms")), pct(hm.get("tpot_mean_ms")),
                          pct(hm.get("e2e_mean_ms"))])
        for f in c["synchronous"]["folds"]:
            hm = f["heldout_mape"]
            frows.append(["sync", f"-{f['heldout_family']}", _params(f["best_params"]), _loss(f["train_loss"]),
                          _loss(f["heldout_loss"]), pct(hm["ttft"]), pct(hm["tpot"]), pct(hm["e2e"])])
        lines += [md_table(["side", "held out", "fitted parameters", "train loss", "held-out loss", "TTFT APE",
                            "TPOT APE", "E2E APE"], frows), ""]
        if "final_fit" in c:
            ff = c["final_fit"]
            lines += [f"Fit on all dense loaded runs: {_params(ff['physics'])}; `{ff['overhead_model']}` "
                      f"{_params(ff['overhead_params'])}; request latency {ff.get('request_latency_ms', 0.0):.3g} ms "
                      f"(train loss {_loss(ff['train_loss'])}).", ""]
    # 4. loaded runs of the best candidate
    bl = cands[best["label"]]["loaded"]["runs"]
    lines += [f"## 4. Loaded-server runs — `{best['label']}` (held out)", "", runs_table(bl, show_calibration=True),
              "",
              stage_table([e for e in bl if e.get("stages")]), "", "What the remaining error is made of:", ""]
    lines += diagnosis_lines(bl)
    # 5. Mixtral and overloaded
    lines += ["## 5. Mixtral (mixture of experts) and overloaded runs", "",
              "Only v3 has mixture-of-experts support (spec §5.3); the v2 candidates report the Mixtral runs as "
              "unsupported.  These runs were never used for fitting (fit on the dense runs only).", ""]
    any_other = False
    for lab, entries in (r.get("other_runs") or {}).items():
        if entries:
            any_other = True
            lines += [f"`{lab}` (fit on all dense runs):", "", runs_table(entries), "",
                      stage_table([e for e in entries if e.get("stages") and e["group"] == "moe"]), ""]
            lines += diagnosis_lines([e for e in entries if e["group"] == "moe"])
    if not any_other:
        lines += ["No candidate could replay them.", ""]
    # 6. decode plot
    lines += ["## 6. Decode step time against batch size", "",
              "Per model: measured TPOT against the mean number of requests in flight during each request's decode "
              "(binned; from the ground truth), the same from the held-out replays of each candidate, and each "
              "candidate's pure-decode step time (hardware + overhead) at the run's typical context (dashed).  "
              "Bins beyond 150 requests in flight (requests queued in a saturated replay) are off the axis.", "",
              "![decode steps](decode_steps.png)", ""]
    lines += ["## Settings (to rerun exactly)", "", "```json", json.dumps(s, indent=2), "```", ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    files = [out / "REPORT.md"]
    p = _decode_plot(r, out / "decode_steps.png")
    if p:
        files.append(p)
    return files


def _calm(x: dict) -> str:
    c = x.get("loaded_heldout_mape_without_runaway")
    return f"{pct(c['tpot_mean_ms'])} / {pct(c['e2e_mean_ms'])} / {pct(c['ttft_mean_ms'])}" if c else "—"


def _decode_plot(r: dict, path: Path) -> Path | None:
    prof = r.get("decode_profiles") or {}
    if not prof:
        return None
    models = list(prof)
    cols = min(2, len(models))
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for ax, model in zip(axes.flat, models):
        p = prof[model]
        meas = [(b["mean_batch"], b["mean_tpot_ms"]) for b in p["measured"] if b["n"]]
        if meas:
            ax.plot(*zip(*meas), "ko-", linewidth=2, label="measured (TPOT vs in-flight)")
        for color, (lab, c) in zip(colors, p["candidates"].items()):
            pts = [(b["mean_batch"], b["mean_tpot_ms"]) for b in c["replay"] if b["n"]]
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, markersize=3, label=f"{lab} replay ({c['source']})")
            curve = [(x["batch"], x["step_ms"]) for x in c["step_curve"]]
            if curve:
                ax.plot(*zip(*curve), "--", color=color, linewidth=0.9, label=f"{lab} decode step")
        ax.set_xlim(0, 150)
        ax.set_title(f"{model} (TP {p['tp']})", fontsize=9)
        ax.set_xlabel("decode batch (requests in flight)")
        ax.set_ylabel("ms per output token / per decode step")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.tight_layout()
    save(fig, path)
    return path
