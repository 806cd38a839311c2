"""REPORT.md and figures of a per-family calibration study (numbers from results.json)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calib.reporting.plots import plt, save
from calib.reporting.common import abstract_block, mode_line, settings_section
from calib.reporting.tables import md_table, pct

__all__ = ["write", "abstract"]


def abstract(r: dict) -> list[str]:
    """Three lines generated from the results: the global optimum, which groupings differ, what is confounded."""
    g = r["global"]
    differ = [gr["grouping"] for gr in r["groupings"] if gr["differ"]]
    same = [gr["grouping"] for gr in r["groupings"] if not gr["differ"]]
    conf = sum(len(gr["confounding"]) for gr in r["groupings"])
    return [f"One optimum for all {len(r['experiments'])} experiments: **{g['optimum_us']:g} µs** "
            f"(mean TPOT APE over experiments {pct(g['tpot_mape'])}).",
            f"Per-experiment optima differ by: **{', '.join(differ) or 'none'}**; not detectably by: "
            f"{', '.join(same) or 'none'} (permutation rank test, α = {r['settings']['test']['alpha']:g}).",
            f"{conf} confounding statement(s) below: a difference by one grouping may be another's."]


def write(r: dict, out: Path) -> list[Path]:
    b, t = r["settings"]["bootstrap"], r["settings"]["test"]
    lines = [f"# Study `{r['study']}`: does the optimum depend on the group?", "", *abstract_block(abstract(r)),
             mode_line(r), "",
             "**Method.** The HG1 search runs on each experiment alone (its *per-experiment optimum*) and on each "
             "group's experiments together (the *group optimum*). Whether the optimum depends on a grouping is "
             f"tested on the per-experiment optima: Kruskal–Wallis H, p-value from {t['n_permutations']:,} "
             f"random permutations of the group labels (seed {t['seed']}). With 1–4 experiments per group a "
             "bootstrap interval would only be the [min, max] of a few optima, so intervals "
             f"({100 * b['level']:g} % bootstrap percentile, {b['n']} resamples) are given only for groups of "
             f"{b['min_interval_members']} or more experiments. Error columns: mean APE over the group's "
             "experiments.", ""]
    lines += ["## Verdicts", "",
              md_table(["grouping", "groups", "H", "p-value", "verdict"],
                       [[gr["grouping"], gr["test"]["groups"],
                         "n/a" if gr["test"]["statistic"] is None else f"{gr['test']['statistic']:.2f}",
                         "n/a" if gr["test"]["p_value"] is None else f"{gr['test']['p_value']:.2g}",
                         gr["verdict"]] for gr in r["groupings"]]), ""]
    conf = [c for gr in r["groupings"] for c in gr["confounding"]]
    if conf:
        lines += ["**Confounding** (from the experiment table):", "", *[f"- {c}" for c in conf], ""]
    for gr in r["groupings"]:
        lines += [f"## By {gr['grouping']}", "",
                  md_table(["group", "n", "per-experiment optima (µs)", "group optimum (µs)", "interval (µs)",
                            "TPOT @ own opt. (mean over exps)", "TPOT @ global opt. (mean over exps)"],
                           [[e["group"], e["n_experiments"], ", ".join(f"{v:g}" for v in e["experiment_optima_us"]),
                             f"{e['optimum_us']:g}",
                             f"[{e['interval_us'][0]:g}, {e['interval_us'][1]:g}]" if e["interval_us"]
                             else f"n/a (n < {b['min_interval_members']})",
                             pct(e["tpot_mape_at_own_optimum"]), pct(e["tpot_mape_at_global_optimum"])]
                            for e in gr["groups"]]), ""]
    lines += ["![per-experiment optima by group](optima.png)", ""]
    lines += settings_section(r)
    (out / "REPORT.md").write_text("\n".join(lines))

    grs = r["groupings"]
    fig, axes = plt.subplots(1, len(grs), figsize=(4.2 * len(grs), 4), squeeze=False, sharey=True)
    for ax, gr in zip(axes[0], grs):
        es = gr["groups"]
        for i, e in enumerate(es):
            ys = np.array(e["experiment_optima_us"])
            xs = i + np.linspace(-0.12, 0.12, len(ys)) if len(ys) > 1 else np.array([i])
            ax.scatter(xs, ys, s=18, color="tab:blue", zorder=3, label="one experiment's optimum" if i == 0 else None)
            ax.plot([i - 0.25, i + 0.25], [e["optimum_us"]] * 2, color="tab:red", lw=2,
                    label="group optimum" if i == 0 else None)
        ax.axhline(r["global"]["optimum_us"], color="k", linestyle=":", label=f"all: {r['global']['optimum_us']:g} µs")
        ax.set_xticks(range(len(es)))
        ax.set_xticklabels([e["group"] for e in es], rotation=40, ha="right", fontsize=8)
        p = gr["test"]["p_value"]
        ax.set_title(f"by {gr['grouping']}: p = {p:.2g}" if p is not None else f"by {gr['grouping']}: no test",
                     fontsize=9)
    axes[0][0].set_ylabel(f"optimum of {r['settings']['parameter']} (µs)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{r['study']} ({r['mode']} mode)", fontsize=10)
    save(fig, out / "optima.png")
    return [out / "REPORT.md", out / "optima.png"]
