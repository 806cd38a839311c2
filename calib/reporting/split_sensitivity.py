"""REPORT.md and figures of a split-sensitivity study (every number comes from results.json)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calib.reporting.plots import plt, save
from calib.reporting.common import abstract_block, dist_table, mode_line, settings_section
from calib.reporting.tables import md_table, pct

__all__ = ["write", "abstract"]


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def _published_lines(r: dict, crit_names: list[str]) -> list[str]:
    pub = r["published_split"]
    if pub is None:
        return ["- No published split was given (`published: null`)."]
    return [f"- The published split (index {pub['index_in_splits']}, found {pub['occurrences']}×) has optimum "
            f"{pub['optimum_us']:g} µs, train {pct(pub['train_tpot_mape'])}, test {pct(pub['test_tpot_mape'])}, "
            f"gap {_pp(pub['gap'])}: **percentile {r['published_split_percentile']:.1f}** of the gap distribution "
            f"({pub['gap_percentile_strict']:.1f} % of splits have a strictly smaller gap); its test MAPE is at "
            f"percentile {pub['test_tpot_mape_percentile']:.1f}. Criteria: "
            + ", ".join(f"{c} {'PASS' if p else 'FAIL'}" for c, p in zip(crit_names, pub["criteria_passed"])) + "."]


def abstract(r: dict) -> list[str]:
    """Three lines from the results: how large the gap is over splits, how often the criteria pass, the
    published split's place."""
    sm, pub = r["summary"], r["published_split"]
    third = (f"The published split's gap is at percentile {r['published_split_percentile']:.0f} of the "
             f"{sm['n_splits']} splits." if pub else "No published split was given.")
    return [f"Over {sm['n_splits']} train/test splits the gap (test − train mean TPOT APE over experiments) has "
            f"median {_pp(sm['gap']['median'])} (5–95 %: {_pp(sm['gap']['p05'])} … {_pp(sm['gap']['p95'])}).",
            f"Every criterion passes together on {pct(sm['all_criteria_pass_share'])} of splits; the train optimum "
            f"spans {sm['optimum_us']['min']:g}–{sm['optimum_us']['max']:g} µs.", third]


def write(r: dict, out: Path) -> list[Path]:
    sm, pub = r["summary"], r["published_split"]
    crit_names = [c["name"] for c in r["criteria"]]
    verdict = (lambda ok: "PASS" if ok else "FAIL") if pub else (lambda ok: "n/a")
    pub_passed = pub["criteria_passed"] if pub else [None] * len(crit_names)
    lines = [f"# Study `{r['study']}`: split sensitivity", "", *abstract_block(abstract(r)), mode_line(r), "",
             f"The HG1 search ({', '.join(p['name'] for p in r['settings']['phases'])} grid on the train fold, "
             f"objective {r['settings']['objective']}, ties to the smaller value) was run on each of the "
             f"**{sm['n_splits']}** splits of `{r['splitter']}`. Per-experiment APEs at each grid value were "
             f"computed once ({r['settings']['grid_values_evaluated']} grid values × {len(r['experiments'])} "
             "experiments); every split is then an array operation. At a given optimum, n_train × train MAPE + "
             "n_test × test MAPE is the same for every split, so the gap mostly says which experiments landed in "
             "the test fold (see the per-experiment table).", ""]
    lines += ["## Headline", "",
              f"- The gap (test − train TPOT MAPE at the train optimum) has median {_pp(sm['gap']['median'])}, "
              f"5–95 % range {_pp(sm['gap']['p05'])} … {_pp(sm['gap']['p95'])}.",
              f"- The train optimum ranges {sm['optimum_us']['min']:g}–{sm['optimum_us']['max']:g} µs "
              f"(median {sm['optimum_us']['median']:g}, 5–95 %: {sm['optimum_us']['p05']:g}–"
              f"{sm['optimum_us']['p95']:g} µs).",
              *[f"- `{c}` passes on {pct(sm['criteria_pass_share'][c])} of splits." for c in crit_names],
              f"- All criteria pass on {pct(sm['all_criteria_pass_share'])} of splits.",
              *_published_lines(r, crit_names), ""]
    lines += ["## Distributions over splits", "",
              dist_table([("gap (test − train TPOT MAPE)", sm["gap"]), ("absolute gap", sm["abs_gap"]),
                          ("train TPOT MAPE (mean over the fold's experiments)", sm["train_tpot_mape"]),
                          ("test TPOT MAPE (mean over the fold's experiments)", sm["test_tpot_mape"])]),
              "", dist_table([("train optimum (µs)", sm["optimum_us"])], as_pct=False), "",
              "![gap histogram](gap_histogram.png)", "", "![train vs test](train_vs_test.png)", "",
              "### Optimum spread", "",
              md_table(["optimum (µs)", "splits", "share"],
                       [[f"{o['optimum_us']:g}", o["n_splits"], pct(o["n_splits"] / sm["n_splits"])]
                        for o in sm["optimum_counts"]]), "", "![optima](optimum_spread.png)", ""]
    lines += ["## Criteria", "",
              md_table(["criterion", "rule", "share of splits passing", "published split"],
                       [[c["name"], f"{c['quantity']} {c['metric']} {c['op']} {pct(c['threshold'])}",
                         pct(sm["criteria_pass_share"][c["name"]]), verdict(p)]
                        for c, p in zip(r["criteria"], pub_passed)]
                       + [["all", "", pct(sm["all_criteria_pass_share"]), verdict(pub and pub["all_passed"])]]), ""]
    lines += ["## Per experiment (TPOT APE at each split's train optimum)", "",
              md_table(["experiment", "family", "TP", "workload", "splits testing it", "mean test APE",
                        "max test APE", "mean train APE"],
                       [[e["experiment"], e["family"], e["tp"], e["workload"], e["n_test_splits"],
                         pct(e["mean_test_tpot_ape"]), pct(e["max_test_tpot_ape"]), pct(e["mean_train_tpot_ape"])]
                        for e in r["experiments"]]), ""]
    if r["extra"]:
        lines += ["## Other splitters", "",
                  md_table(["splitter", "splits", "median gap", "p95 gap", "optimum range (µs)",
                            *[f"{c} pass" for c in crit_names], "all pass"],
                           [[e["splitter"], e["summary"]["n_splits"], _pp(e["summary"]["gap"]["median"]),
                             _pp(e["summary"]["gap"]["p95"]),
                             f"{e['summary']['optimum_us']['min']:g}–{e['summary']['optimum_us']['max']:g}",
                             *[pct(e["summary"]["criteria_pass_share"][c]) for c in crit_names],
                             pct(e["summary"]["all_criteria_pass_share"])] for e in r["extra"]]), ""]
    lines += settings_section(r)
    (out / "REPORT.md").write_text("\n".join(lines))

    gaps = np.array([s["gap"] for s in r["splits"]]) * 100
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(gaps, bins=r["settings"]["histogram_bins"], color="tab:blue", alpha=0.8, edgecolor="k", linewidth=0.3)
    if pub:
        ax.axvline(100 * pub["gap"], color="tab:red", linewidth=2,
                   label=f"published split: {100 * pub['gap']:+.1f} pp (pct {r['published_split_percentile']:.0f})")
    for c in r["criteria"]:
        if c["metric"] == "tpot_mape" and c["quantity"] in ("gap", "abs_gap"):
            ax.axvline(100 * c["threshold"], color="k", linestyle=":", linewidth=1)
            if c["quantity"] == "abs_gap":
                ax.axvline(-100 * c["threshold"], color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("gap: test − train TPOT MAPE at the train optimum (pp)")
    ax.set_ylabel("splits")
    ax.set_title(f"{r['study']}: {len(gaps)} splits ({r['mode']} mode); dotted: criteria thresholds")
    if pub:
        ax.legend(fontsize=8)
    save(fig, out / "gap_histogram.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    oc = sm["optimum_counts"]
    ax.bar([o["optimum_us"] for o in oc], [o["n_splits"] for o in oc],
           width=0.8 * min(np.diff([o["optimum_us"] for o in oc]).min() if len(oc) > 1 else 5.0, 25.0),
           color="tab:green", edgecolor="k", linewidth=0.3)
    if pub:
        ax.axvline(pub["optimum_us"], color="tab:red", label=f"published split: {pub['optimum_us']:g} µs")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"train optimum of {r['settings']['parameter']} (µs)")
    ax.set_ylabel("splits")
    ax.set_title("spread of the train optimum over splits")
    save(fig, out / "optimum_spread.png")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    tr = np.array([s["train_tpot_mape"] for s in r["splits"]]) * 100
    te = np.array([s["test_tpot_mape"] for s in r["splits"]]) * 100
    ok = np.array([s["all_passed"] for s in r["splits"]], dtype=bool)
    ax.scatter(tr[~ok], te[~ok], s=8, alpha=0.5, label="fails a criterion")
    ax.scatter(tr[ok], te[ok], s=8, alpha=0.7, color="tab:green", label="passes all")
    if pub:
        ax.scatter([100 * pub["train_tpot_mape"]], [100 * pub["test_tpot_mape"]], s=80, marker="*", color="tab:red",
                   label="published split", zorder=5)
    lim = [0, max(tr.max(), te.max()) * 1.05]
    ax.plot(lim, lim, "k:", linewidth=1)
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("train TPOT MAPE (%)")
    ax.set_ylabel("test TPOT MAPE (%)")
    ax.set_title("train vs test at the train optimum")
    ax.legend(fontsize=8)
    save(fig, out / "train_vs_test.png")
    return [out / "REPORT.md", out / "gap_histogram.png", out / "optimum_spread.png", out / "train_vs_test.png"]
