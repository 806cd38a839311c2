"""REPORT.md and figures of a leave-one-group-out / group k-fold study (numbers from results.json)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calib.reporting.plots import plt, save
from calib.reporting.common import abstract_block, mode_line, settings_section
from calib.reporting.tables import md_table, pct

__all__ = ["write"]


def abstract(r: dict) -> list[str]:
    """Three lines from the results: the best and worst held-out grouping, and the all-data reference."""
    schemes = sorted(r["schemes"], key=lambda s: s["overall"]["pooled_tpot_mape"])
    best, worst = schemes[0], schemes[-1]
    return [f"Held-out TPOT (mean APE over the held-out experiments) ranges from "
            f"{pct(best['overall']['pooled_tpot_mape'])} ({best['label']}) to "
            f"{pct(worst['overall']['pooled_tpot_mape'])} ({worst['label']}).",
            f"Worst single fold: {pct(max(s['overall']['worst_fold_tpot_mape'] for s in r['schemes']))} held-out "
            "TPOT.",
            f"For reference, one optimum fitted on all experiments ({r['global_optimum_us']:g} µs, not held out) "
            f"gives {pct(r['global']['tpot_mape'])} TPOT."]


def write(r: dict, out: Path) -> list[Path]:
    refs = r["reference_points"]
    lines = [f"# Study `{r['study']}`: held-out groups", "", *abstract_block(abstract(r)), mode_line(r), "",
             "For each grouping column and group splitter, the HG1 search ran on the train fold and the held-out "
             "groups were predicted at its optimum. Every held-out figure is a mean APE over held-out experiments "
             "(calib's convention); `mean over folds` averages the folds' own means instead (folds of 1–6 "
             "experiments weigh alike) and `worst fold` is the largest fold mean. For comparison, the same folds "
             f"at fixed values ({', '.join(refs)} µs) and at the optimum of all experiments "
             f"({r['global_optimum_us']:g} µs, which has seen the held-out data).", "",
             f"All 13 experiments at the global optimum {r['global_optimum_us']:g} µs: TPOT "
             f"{pct(r['global']['tpot_mape'])}, E2E {pct(r['global']['e2e_mape'])}, "
             f"TTFT {pct(r['global']['ttft_mape'])}.",
             "", "## Overall", ""]
    rows = []
    for s in r["schemes"]:
        o = s["overall"]
        rows.append([s["group"], s["splitter"], s["n_folds"], pct(o["pooled_tpot_mape"]), pct(o["tpot_mape"]),
                     pct(o["worst_fold_tpot_mape"]), pct(o["e2e_mape"]), pct(o["ttft_mape"]),
                     f"{100 * s['mean_gap']:+.1f} pp",
                     *[pct(s[f"overall_at_{p}"]["tpot_mape"]) for p in refs],
                     pct(s["overall_at_global_optimum"]["tpot_mape"])])
    lines += [md_table(["group", "splitter", "folds", "held-out TPOT (mean over experiments)",
                        "TPOT (mean over folds)", "worst fold", "E2E (mean over folds)", "TTFT (mean over folds)",
                        "gap (mean over folds)", *[f"TPOT @ {p} µs (mean over folds)" for p in refs],
                        "TPOT @ global opt. (mean over folds)"], rows),
              "", "![held-out TPOT per fold](heldout_per_fold.png)", ""]
    for s in r["schemes"]:
        lines += [f"## {s['label']}", "",
                  md_table(["held out", "optimum (µs)", "train TPOT (mean over exps)", "held-out TPOT (mean over exps)",
                            "held-out E2E (mean over exps)", "held-out TTFT (mean over exps)",
                            *[f"TPOT @ {p} µs" for p in refs], "experiments"],
                           [[", ".join(f["test_groups"]), f"{f['optimum_us']:g}", pct(f["train_tpot_mape"]),
                             pct(f["heldout"]["tpot_mape"]), pct(f["heldout"]["e2e_mape"]),
                             pct(f["heldout"]["ttft_mape"]), *[pct(f[f"heldout_at_{p}"]["tpot_mape"]) for p in refs],
                             len(f["test"])] for f in s["folds"]]), ""]
    lines += settings_section(r)
    (out / "REPORT.md").write_text("\n".join(lines))

    logo = [s for s in r["schemes"] if s["splitter"] == "leave_one_group_out"] or r["schemes"]
    fig, axes = plt.subplots(1, len(logo), figsize=(4.2 * len(logo), 4), squeeze=False)
    for ax, s in zip(axes[0], logo):
        labels = [", ".join(f["test_groups"]) for f in s["folds"]]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [100 * f["heldout"]["tpot_mape"] for f in s["folds"]], 0.4, label="train optimum")
        ax.bar(x + 0.2, [100 * f["heldout_at_global_optimum"]["tpot_mape"] for f in s["folds"]], 0.4, alpha=0.6,
               label="global optimum")
        for p, mk in zip(refs, "ox^"):
            ax.scatter(x, [100 * f[f"heldout_at_{p}"]["tpot_mape"] for f in s["folds"]], marker=mk, color="k",
                       zorder=5, label=f"{p} µs")
        for i, f in enumerate(s["folds"]):
            ax.text(i - 0.2, 100 * f["heldout"]["tpot_mape"], f"{f['optimum_us']:g}", ha="center", va="bottom",
                    fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{s['label']}", fontsize=9)
        ax.set_ylabel("held-out TPOT MAPE (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{r['study']} ({r['mode']} mode): held-out TPOT per fold; numbers: train optimum (µs)", fontsize=10)
    fig.tight_layout()
    save(fig, out / "heldout_per_fold.png")
    return [out / "REPORT.md", out / "heldout_per_fold.png"]
