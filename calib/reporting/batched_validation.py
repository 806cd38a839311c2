"""REPORT.md and figures of a loaded-server validation study (``kind: batched_validation``).

Written from ``results.json`` only (never recomputed).  The helpers here
(run tables, stage tables, scatter grids, diagnoses) are shared by the
``batched_calibration`` and ``physics`` reports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from calib.metrics import APE_KEYS
from calib.reporting.common import abstract_block
from calib.reporting.plots import plt, save
from calib.reporting.tables import md_table, pct

__all__ = ["write", "runs_table", "stage_table", "group_table", "scatter_grid", "diagnosis_lines", "rule_lines",
           "short", "ms"]

APE_NAMES = {"ttft_mean_ms": "TTFT", "tpot_mean_ms": "TPOT", "e2e_mean_ms": "E2E", "e2e_p90_ms": "E2E p90"}


def short(run: str) -> str:
    """Run name without its timestamp prefix."""
    parts = run.split("-", 2)
    return parts[2] if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit() else run


def ms(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.1f}" if abs(x) < 1000 else f"{x:,.0f}"


def runs_table(entries: Sequence[dict], *, show_calibration: bool = False) -> str:
    """One row per run: measured / predicted / APE of the four headline figures."""
    head = ["run", "model", "TP", "requests", "excl."]
    head += [f"{APE_NAMES[k]} meas / pred (ms)" for k in APE_KEYS]
    head += [f"{APE_NAMES[k]} APE" for k in APE_KEYS] + ["runaway stages", "targets"]
    if show_calibration:
        head.append("calibration")
    rows = []
    for e in entries:
        m, p, a = e["measured"], e.get("predicted"), e.get("ape")
        row = [short(e["run"]), e["model"], e["tp"], e["n_requests"], e["excluded"]]
        if p is None:
            row += [f"{ms(m[k])} / —" for k in APE_KEYS] + ["—"] * 4 + ["—", "unsupported"]
        else:
            row += [f"{ms(m[k])} / {ms(p[k])}" for k in APE_KEYS] + [pct(a[k]) for k in APE_KEYS]
            t = e.get("targets", {})
            verdict = "n/a (overloaded)" if not t.get("applies", True) else ("met" if t.get("all") else "missed")
            row += [", ".join(str(s) for s in e.get("runaway_stages", [])) or "none", verdict]
        if show_calibration:
            row.append(e["calibration"])
        rows.append(row)
    return md_table(head, rows)


def group_table(groups_by_label: dict) -> str:
    """Rows: calibration x group; columns: runs and MAPE of the four headline figures, verdict."""
    rows = []
    for label, groups in groups_by_label.items():
        for g in ("dense", "moe", "overloaded"):
            agg = groups.get(g) or {}
            if not agg.get("n_runs"):
                continue
            mape = agg["mape"]
            met = "all targets met" if agg["targets"]["all"] else "missed"
            verdict = "(reported apart)" if g == "overloaded" else met
            calm = agg.get("mape_without_runaway")
            calm_txt = (f"{pct(calm['tpot_mean_ms'])} / {pct(calm['e2e_mean_ms'])} / {pct(calm['ttft_mean_ms'])} "
                        f"({agg['n_runs_without_runaway']} runs)") if calm else "—"
            rows.append([label, g, agg["n_runs"], *[pct(mape[k]) for k in APE_KEYS],
                         ", ".join(short(r) for r in agg.get("runaway_runs", [])) or "none", calm_txt, verdict])
    table = md_table(["calibration", "runs", "n", *[f"{APE_NAMES[k]} MAPE" for k in APE_KEYS], "runaway runs",
                      "TPOT / E2E / TTFT MAPE without runaway runs", "verdict"], rows)
    named = next((agg["aggregation"] for groups in groups_by_label.values() for agg in groups.values()
                  if agg and agg.get("aggregation")), None)
    return table + (f"\n\nMAPE: {named}." if named else "")


def stage_table(entries: Sequence[dict]) -> str:
    """One row per run and stage: TTFT mean/p50/p99, TPOT mean/p50, E2E mean/p90 (measured / predicted), saturation."""
    rows = []
    for e in entries:
        for s in e.get("stages") or []:
            m, p, sat = s["measured"], s["predicted"], s["saturation"]
            state = "runaway" if sat.get("runaway") else ("saturated" if sat.get("saturated") else "stable")
            rows.append([short(e["run"]), s["stage"], f"{s['rate']:g}", s["n"],
                         f"{ms(m['ttft']['mean'])} / {ms(p['ttft']['mean'])}",
                         f"{ms(m['ttft']['p50'])} / {ms(p['ttft']['p50'])}",
                         f"{ms(m['ttft']['p99'])} / {ms(p['ttft']['p99'])}",
                         f"{ms(m['tpot']['mean'])} / {ms(p['tpot']['mean'])}",
                         f"{ms(m['tpot']['p50'])} / {ms(p['tpot']['p50'])}",
                         f"{ms(m['e2e']['mean'])} / {ms(p['e2e']['mean'])}",
                         f"{ms(m['e2e']['p90'])} / {ms(p['e2e']['p90'])}",
                         pct(s["ape"]["tpot_mean_ms"]), pct(s["ape"]["ttft_mean_ms"]), state])
    return md_table(["run", "stage", "req/s", "n", "TTFT mean", "TTFT p50", "TTFT p99", "TPOT mean", "TPOT p50",
                     "E2E mean", "E2E p90", "TPOT APE", "TTFT APE", "replay"], rows)


def replay_table(entries: Sequence[dict]) -> str:
    rows = []
    for e in entries:
        r = e.get("replay")
        if not r:
            continue
        st = e.get("steps") or {}
        rows.append([short(e["run"]), f"{r['n_steps']:,}", r["n_preemptions"], "**yes**" if r["hit_step_cap"] else "no",
                     r["rejected_context"] + r["rejected_kv"], ms((st.get("batch_size") or {}).get("mean")),
                     ms((st.get("batch_size") or {}).get("p90")), st.get("n_mixed", "n/a"),
                     ms((st.get("decode_only_duration_ms") or {}).get("mean"))])
    return md_table(["run", "steps", "preemptions", "step cap hit", "rejected", "batch mean", "batch p90",
                     "mixed steps", "decode-only step (ms)"], rows)


def diagnosis_lines(entries: Sequence[dict]) -> list[str]:
    """Per-run diagnoses; when there are none, a sentence that says only that (the targets are in the tables)."""
    lines = []
    for e in entries:
        d = e.get("diagnosis") or []
        if d:
            lines.append(f"**{short(e['run'])}** ({e['model']}, TP {e['tp']}):")
            lines += [f"- {x}" for x in d]
            lines.append("")
    return lines or ["No run carries a diagnostic note; whether each run met the targets is in the tables above.",
                     ""]


def abstract(r: dict) -> list[str]:
    """Three lines from the results: the best calibration on the dense runs, how many ran away, the targets."""
    dense = {label: c["groups"]["dense"] for label, c in r["calibrations"].items()
             if c["groups"].get("dense", {}).get("mape")}
    if not dense:
        return ["No calibration produced predictions for the dense runs.", "See the calibration table.",
                "No target can be judged."]
    best = min(dense, key=lambda k: dense[k]["mape"]["tpot_mean_ms"])
    g = dense[best]
    met = [label for label, d in dense.items() if d["targets"].get("all")]
    return [f"On the {g['n_runs']} dense runs (mean APE over runs), the closest calibration is `{best}`: TPOT "
            f"{pct(g['mape']['tpot_mean_ms'])}, E2E {pct(g['mape']['e2e_mean_ms'])}, TTFT "
            f"{pct(g['mape']['ttft_mean_ms'])}.",
            "Runaway queues where the real server was stable: " + "; ".join(
                f"`{label}` {len(d['runaway_runs'])}" for label, d in dense.items()) + ".",
            f"Calibrations meeting every target: {', '.join(f'`{m}`' for m in met) or 'none'} "
            "(every prediction is held out: nothing was fitted to a loaded run)."]


def rule_lines(results: dict) -> list[str]:
    rules = results.get("output_rule") or {}
    lines = ["Output-length rule (recorded output counts far below the profile's fixed length are wrong; "
             "`calib.data.traces`):", ""]
    lines += [f"- `{short(run)}`: {text}" for run, text in rules.items()]
    return lines + [""]


def scatter_grid(entries: Sequence[dict], path: Path, title: str) -> Path | None:
    """Predicted vs measured per-request E2E (every k-th request), one panel per run."""
    ok = [e for e in entries if e.get("scatter")]
    if not ok:
        return None
    n = len(ok)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.1 * rows), squeeze=False)
    for ax, e in zip(axes.flat, ok):
        sc = e["scatter"]
        pts = [(m, p, s) for m, p, s in zip(sc["measured_e2e_ms"], sc["predicted_e2e_ms"], sc["stage"])
               if m is not None and p is not None]
        if pts:
            for stage, color in ((0, "tab:blue"), (1, "tab:orange"), (2, "tab:green")):
                xs = [m / 1e3 for m, p, s in pts if s == stage]
                ys = [p / 1e3 for m, p, s in pts if s == stage]
                if xs:
                    ax.scatter(xs, ys, s=4, alpha=0.5, color=color, label=f"stage {stage}")
            lo = min(min(m, p) for m, p, _ in pts) / 1e3
            hi = max(max(m, p) for m, p, _ in pts) / 1e3
            ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8)
        a = e.get("ape") or {}
        ax.set_title(f"{short(e['run'])}\nE2E APE {pct(a.get('e2e_mean_ms'))}", fontsize=8)
        ax.set_xlabel("measured E2E (s)", fontsize=7)
        ax.set_ylabel("predicted E2E (s)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, markerscale=2)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, path)
    return path


def ape_bars(series: dict[str, Sequence[dict]], key: str, path: Path, title: str) -> Path | None:
    """Per-run APE of ``key`` for several calibrations side by side."""
    labels = [lab for lab, entries in series.items() if any(e.get("ape") for e in entries)]
    if not labels:
        return None
    runs = [e["run"] for e in series[labels[0]]]
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(runs) + 2), 4))
    width = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        by_run = {e["run"]: e for e in series[lab]}
        vals = [100 * by_run[r]["ape"][key] if by_run.get(r, {}).get("ape") and by_run[r]["ape"][key] is not None
                else 0.0 for r in runs]
        ax.bar([j + i * width for j in range(len(runs))], vals, width, label=lab)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(runs))])
    ax.set_xticklabels([short(r) for r in runs], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("symlog", linthresh=10)
    ax.axhline(10 if key != "ttft_mean_ms" else 25, color="k", linestyle=":", linewidth=0.8, label="target")
    ax.set_ylabel(f"{APE_NAMES[key]} APE (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save(fig, path)
    return path


def write(results: dict, out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    r = results
    prim = r["primary"]
    cals = r["calibrations"]
    files = []
    lines = [f"# {r['study']}: loaded-server validation of the synchronous calibrations", "",
             *abstract_block(abstract(r)), r.get("description", "").strip(), "",
             "Every prediction here is held out: no parameter was fitted to a loaded run.  Targets (issue 6): "
             "mean-TPOT and mean-E2E APE < 10 %, mean-TTFT APE < 25 % on the dense non-reasoning runs, and no "
             "runaway queue in a stage where the real server stayed stable.  APE = |predicted − measured| / measured "
             "of the run statistic (mean or p90 over requests).", "",
             f"TPOT definition: {r['settings']['tpot_definition']}.  No phantom last step.", "",
             f"Prefix cache: {_prefix_text(r)}.", ""]
    lines += rule_lines(r)
    # 1. calibrations
    lines += ["## 1. Calibrations", ""]
    crow = []
    for label, c in cals.items():
        d = c["calibration"]
        crow.append([label + (" (primary)" if label == prim else ""),
                     "yes" if d["available"] else "**no**",
                     json.dumps(d["physics"]) if d["physics"] else "—",
                     f"{d['overhead_model']} {json.dumps(d['overhead_params'])}" if d["overhead_model"] else "—",
                     d["source"] + (f" — {d['note']}" if d.get("note") else ""), d["fitted_on"]])
    lines += [md_table(["label", "available", "physics", "overhead", "source", "fitted on"], crow), ""]
    # 2. overall
    lines += ["## 2. Overall (mean APE over runs)", "",
              "`dense` = the 9 dense non-reasoning runs (the accuracy figures); `moe` = Mixtral (only a step model "
              "with mixture-of-experts support can replay it); `overloaded` = the reasoning runs, reported apart, "
              "never averaged in.", "",
              group_table({label: c["groups"] for label, c in cals.items()}), ""]
    # 3. per run, primary
    lines += [f"## 3. Per run — `{prim}`", "", runs_table(r["runs"]), "",
              f"![E2E per request]({_scatter_name(prim)})", ""]
    # 4. per run, other calibrations
    for label, c in cals.items():
        if label == prim or not c["calibration"]["available"]:
            continue
        lines += [f"### Per run — `{label}`", "", runs_table(c["runs"]), "",
                  f"![E2E per request]({_scatter_name(label)})", ""]
    lines += ["![APE per run](ape_per_run.png)", ""]
    # 5. per stage
    lines += [f"## 4. Per load stage — `{prim}` (measured / predicted, ms)", "",
              "A stage *saturates* in the replay when its simulated queue keeps growing (mean wait of its last fifth "
              "> 1 s and growing > 0.005 s per s); it is a *runaway* when the real server stayed stable (TTFT p50 of "
              "the last fifth < 1 s and < 3x the first fifth).", "",
              stage_table([e for e in r["runs"] if e.get("stages")]), ""]
    for label, c in cals.items():
        if label == prim or not c["calibration"]["available"]:
            continue
        lines += [f"### Per load stage — `{label}`", "", stage_table([e for e in c["runs"] if e.get("stages")]), ""]
    # 6. diagnosis
    lines += [f"## 5. What the remaining error is made of — `{prim}`", "",
              "Per run and stage where a target is missed.  *Step-time error*: the replay's TPOT at the measured "
              "mean number of requests in flight, against the measured TPOT (physics + overhead); *batch feedback*: "
              "the rest, because a slower replay keeps more requests in flight, which slows every step further.", ""]
    lines += diagnosis_lines([e for e in r["runs"] if e["group"] != "overloaded"])
    for label, c in cals.items():
        if label == prim or not c["calibration"]["available"]:
            continue
        lines += [f"### `{label}`", ""] + diagnosis_lines([e for e in c["runs"] if e["group"] != "overloaded"])
    # 7. replay counters
    lines += [f"## 6. Replay counters — `{prim}`", "", replay_table(r["runs"]), ""]
    # 8. overloaded and unsupported
    over = [e for e in r["runs"] if e["group"] == "overloaded"]
    lines += ["## 7. Overloaded runs (reasoning; reported apart)", "",
              "The real server's queue grew without bound and most requests failed (`excl.`); the failed requests "
              "are missing from the replayed load, so these replays under-state the load.", ""]
    for label, c in cals.items():
        ov = [e for e in c["runs"] if e["group"] == "overloaded"]
        if any(e.get("predicted") for e in ov):
            lines += [f"`{label}`:", "", runs_table(ov), ""]
    if not over:
        lines += ["No overloaded run in the data set.", ""]
    uns = sorted({(e["run"], e.get("note", "")) for c in cals.values() for e in c["runs"] if not e.get("supported")
                  and c["calibration"]["available"]})
    if uns:
        lines += ["## 8. Unsupported runs", ""] + [f"- `{short(run)}`: {note}" for run, note in uns] + [""]
    lines += ["## Settings (to rerun exactly)", "", "```json", json.dumps(r["settings"], indent=2), "```", ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    files.append(out / "REPORT.md")
    for label, c in cals.items():
        if c["calibration"]["available"]:
            p = scatter_grid(c["runs"], out / _scatter_name(label), f"{r['study']} — {label}: per-request E2E")
            if p:
                files.append(p)
    p = ape_bars({label: c["runs"] for label, c in cals.items()}, "e2e_mean_ms", out / "ape_per_run.png",
                 "mean-E2E APE per run (symlog)")
    if p:
        files.append(p)
    return files


def _scatter_name(label: str) -> str:
    return f"e2e_scatter_{label}.png"


def _prefix_text(r: dict) -> str:
    for c in r["calibrations"].values():
        for e in c["runs"]:
            if e.get("replay"):
                rp = e["replay"]
                return f"{rp['prefix']} (first step of a cached request: PI = {rp['cached_prefill_pi']})"
    return r["settings"].get("prefix", "n/a")
