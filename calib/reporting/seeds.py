"""REPORT.md and figures of a seeds / metric-definition study (numbers from results.json)."""

from __future__ import annotations

from pathlib import Path

from calib.reporting.plots import plt, save
from calib.reporting.common import abstract_block, mode_line, settings_section
from calib.reporting.tables import md_table, pct

__all__ = ["write"]


def abstract(r: dict) -> list[str]:
    """Three lines from the results: how far the optimum and the test error move, and how often the verdict
    changes."""
    lo = min(s["optimum_us"]["min"] for s in r["summary"])
    hi = max(s["optimum_us"]["max"] for s in r["summary"])
    tlo = min(s["test_tpot_mape"]["min"] for s in r["summary"])
    thi = max(s["test_tpot_mape"]["max"] for s in r["summary"])
    runs = sum(s["n_runs"] for s in r["summary"])
    passed = sum(s["verdict_pass_share"] * s["n_runs"] for s in r["summary"])
    return [f"Over {runs} runs (length source × request seed × TPOT definition) the optimum spans {lo:g}–{hi:g} µs.",
            f"Test TPOT (mean APE over the test experiments) spans {pct(tlo)}–{pct(thi)}.",
            f"The accept criteria all pass in {passed:.0f} of {runs} runs."]


def write(r: dict, out: Path) -> list[Path]:
    crit = [c["name"] for c in r["criteria_spec"]]
    h = r["headline"]
    lines = [f"# Study `{r['study']}`: request seeds, length sampler and TPOT definition", "",
             *abstract_block(abstract(r)), mode_line(r), "",
             "The headline HG1 search (published split, HG1 phases) rerun for every request-length source, request "
             "seed and TPOT definition. `itl`: predicted TPOT = mean (E2E−TTFT)/(O−1); `guidellm`: ΣE2E/ΣO, the "
             "quantity GuideLLM measured. Both come from the same replays.", ""]
    if h:
        lines += [f"Headline ({h['lengths']} lengths, seed {h['seed']}, {h['tpot_definition']}): optimum "
                  f"**{h['optimum_us']:g} µs**, test TPOT {pct(h['tpot_mape']['optimum']['test'])}, verdict "
                  f"**{h['verdict']}**.", ""]
    lines += ["## How the optimum and the verdicts move", "",
              md_table(["lengths", "TPOT definition", "runs", "optimum range (µs)", "optimum median",
                        "test TPOT range", "gap range", *[f"{c} pass" for c in crit], "verdict PASS"],
                       [[s["lengths"], s["tpot_definition"], s["n_runs"],
                         f"{s['optimum_us']['min']:g}–{s['optimum_us']['max']:g}", f"{s['optimum_us']['median']:g}",
                         f"{pct(s['test_tpot_mape']['min'])}–{pct(s['test_tpot_mape']['max'])}",
                         f"{100 * s['gap']['min']:+.1f}…{100 * s['gap']['max']:+.1f} pp",
                         *[pct(s["criteria_pass_share"][c]) for c in crit], pct(s["verdict_pass_share"])]
                        for s in r["summary"]]), "", "![optimum by seed](optimum_by_seed.png)", "",
              "## Every run", "",
              md_table(["lengths", "seed", "TPOT def.", "coarse opt.", "optimum (µs)", "train TPOT (mean over exps)",
                        "test TPOT (mean over exps)", "gap", "test E2E (mean over exps)", *crit, "verdict"],
                       [[x["lengths"], x["seed"], x["tpot_definition"] + (" (headline)" if x["headline"] else ""),
                         f"{x.get('coarse_optimum_us', x['optimum_us']):g}", f"{x['optimum_us']:g}",
                         pct(x["tpot_mape"]["optimum"]["train"]), pct(x["tpot_mape"]["optimum"]["test"]),
                         f"{100 * x['gap']:+.1f} pp", pct(x["e2e_mape"]["optimum"]["test"]),
                         *["PASS" if p else "FAIL" for p in x["criteria_passed"]], x["verdict"]] for x in r["runs"]]),
              ""]
    lines += settings_section(r)
    (out / "REPORT.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    combos = [(s["lengths"], s["tpot_definition"]) for s in r["summary"]]
    seeds = r["settings"]["seeds"]["request_seeds"]  # in study-file order, evenly spaced (seeds are labels)
    pos = {s: i for i, s in enumerate(seeds)}
    for k, ((ln, d), mk) in enumerate(zip(combos, "osD^v<>")):
        rs = sorted([x for x in r["runs"] if x["lengths"] == ln and x["tpot_definition"] == d],
                    key=lambda x: pos[x["seed"]])
        xs = [pos[run["seed"]] + 0.06 * (k - (len(combos) - 1) / 2) for run in rs]
        axes[0].plot(xs, [run["optimum_us"] for run in rs], marker=mk, linestyle=":", label=f"{ln}, {d}")
        axes[1].plot(xs, [100 * run["tpot_mape"]["optimum"]["test"] for run in rs], marker=mk, linestyle=":",
                     label=f"{ln}, {d}")
    for ax in axes:
        ax.set_xticks(range(len(seeds)))
        ax.set_xticklabels([str(s) for s in seeds])
    for c in r["criteria_spec"]:
        if c["quantity"] == "test" and c["metric"] == "tpot_mape":
            axes[1].axhline(100 * c["threshold"], color="k", linestyle=":", label=f"{c['name']} threshold")
    axes[0].set_xlabel("request seed")
    axes[0].set_ylabel("optimum (µs)")
    axes[1].set_xlabel("request seed")
    axes[1].set_ylabel("test TPOT MAPE at the optimum (%)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{r['study']} ({r['mode']} mode)", fontsize=10)
    save(fig, out / "optimum_by_seed.png")
    return [out / "REPORT.md", out / "optimum_by_seed.png"]
