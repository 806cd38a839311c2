"""REPORT.md and figures of a per-family calibration study (numbers from results.json)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calib.reporting.plots import plt, save
from calib.reporting.split_sensitivity import mode_line, settings_section
from calib.reporting.tables import md_table, pct

__all__ = ["write"]


def write(r: dict, out: Path) -> list[Path]:
    b = r["settings"]["bootstrap"]
    g = r["global"]
    lines = [f"# Study `{r['study']}`: a separate optimum per group", "", mode_line(r), "",
             f"Each group's optimum is the HG1 search on that group's experiments alone. Intervals: "
             f"{100 * b['level']:g} % bootstrap percentile intervals over the group's experiments ({b['n']} resamples, "
             f"seed {b['seed']}). Two optima *differ beyond their uncertainty* when the bootstrap interval of their "
             "difference excludes 0; groups of one experiment have no interval and are left out of the verdict. "
             "With 1–2 experiments per family the intervals are coarse: they show what these data can and cannot "
             "tell apart.", "",
             f"All experiments: optimum **{g['optimum_us']:g} µs** [{g['ci_low_us']:g}, {g['ci_high_us']:g}], TPOT "
             f"{pct(g['tpot_mape'])}.", ""]
    lines += ["## Verdicts", "",
              md_table(["grouping", "verdict", "pairs compared", "pairs differing", "groups whose interval excludes "
                        "the global optimum"],
                       [[gr["grouping"], gr["verdict"], gr["n_eligible_pairs"], gr["n_differing_pairs"],
                         ", ".join(gr["global_optimum_outside_ci"]) or "none"] for gr in r["groupings"]]), ""]
    for gr in r["groupings"]:
        lines += [f"## By {gr['grouping']}", "",
                  md_table(["group", "experiments", "optimum (µs)", "interval (µs)", "bootstrap sd", "TPOT @ own opt.",
                            "TPOT @ global opt.", "E2E @ own opt.", "global opt. in interval"],
                           [[e["group"], e["n_experiments"], f"{e['optimum_us']:g}",
                             (f"[{e['ci_low_us']:g}, {e['ci_high_us']:g}]" if e["has_interval"]
                              else "n/a (1 experiment)"),
                             f"{e['bootstrap_std_us']:.1f}", pct(e["tpot_mape_at_own_optimum"]),
                             pct(e["tpot_mape_at_global_optimum"]), pct(e["e2e_mape_at_own_optimum"]),
                             ("yes" if e["global_optimum_in_ci"] else "**no**") if e["has_interval"] else "n/a"]
                            for e in gr["groups"]]), ""]
        pairs = [p for p in gr["pairs"] if p["eligible"]]
        if pairs:
            lines += [md_table(["a", "b", "difference (µs)", "interval of the difference", "differ",
                                "intervals overlap"],
                               [[p["a"], p["b"], f"{p['difference_us']:+g}",
                                 f"[{p['diff_ci_low_us']:+g}, {p['diff_ci_high_us']:+g}]",
                                 "**yes**" if p["differ"] else "no", "yes" if p["intervals_overlap"] else "no"]
                                for p in pairs]), ""]
    lines += ["![optima with intervals](optima.png)", ""]
    lines += settings_section(r)
    (out / "REPORT.md").write_text("\n".join(lines))

    grs = r["groupings"]
    fig, axes = plt.subplots(1, len(grs), figsize=(4.2 * len(grs), 4), squeeze=False, sharey=True)
    for ax, gr in zip(axes[0], grs):
        es = gr["groups"]
        x = np.arange(len(es))
        opt = np.array([e["optimum_us"] for e in es])
        lo = np.array([e["ci_low_us"] for e in es])
        hi = np.array([e["ci_high_us"] for e in es])
        ax.axhspan(g["ci_low_us"], g["ci_high_us"], color="grey", alpha=0.2, label="all: interval")
        ax.axhline(g["optimum_us"], color="k", linestyle=":", label=f"all: {g['optimum_us']:g} µs")
        ax.errorbar(x, opt, yerr=[opt - lo, hi - opt], fmt="o", capsize=4, color="tab:blue",
                    label=f"group optimum, {100 * b['level']:g} % interval")
        for i, e in enumerate(es):
            ax.text(i, hi[i], f" n={e['n_experiments']}", fontsize=7, va="bottom", ha="center")
        ax.set_xticks(x)
        ax.set_xticklabels([e["group"] for e in es], rotation=40, ha="right", fontsize=8)
        ax.set_title(f"by {gr['grouping']}: {gr['verdict']}", fontsize=8)
    axes[0][0].set_ylabel(f"optimum of {r['settings']['parameter']} (µs)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{r['study']} ({r['mode']} mode)", fontsize=10)
    save(fig, out / "optima.png")
    return [out / "REPORT.md", out / "optima.png"]
