"""REPORT.md and figures of an overhead-model study (numbers from results.json)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calib.reporting.plots import plt, save
from calib.reporting.common import mode_line, settings_section
from calib.reporting.tables import md_table, pct

__all__ = ["write"]


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


_SCALING = {
    "implied_per_layer_us": "The implied overhead is flattest per layer *without* the 1/TP factor: the data ask for an "
                            "overhead that does not shrink with TP (TP^-alpha with alpha near 0, or a per-step term).",
    "implied_per_layer_us_x_tp": "The implied overhead is flattest under the reference scaling L/TP.",
    "implied_overhead_us_per_token": "The implied overhead is flattest per step, independent of L and TP: a per-step "
                                     "constant fits the data best.",
}


def _pp(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} pp"


def write(r: dict, out: Path) -> list[Path]:
    rk = r["ranking"]
    schemes = [s for s in ("leave_one_family_out", "all_splits") if s in rk[0]["heldout"]]
    schemes += [s for s in rk[0]["heldout"] if s not in schemes]
    s = r["settings"]
    lines = [f"# Study `{r['study']}`: overhead models, nested cross-validation", "", mode_line(r), "",
             f"Ranked by {r['ranked_by']} (lower is better). Search: {s['sampler']}; trials per search: "
             f"{', '.join(f'{k} {v}' for k, v in s['trials'].items())}.", "",
             "**What is nested.** `leave_one_family_out`: one TPE study per model and fold, whose objective replays "
             "only the fold's train experiments; the held-out family is predicted once, at the selected trial. "
             "`all_splits` (all C(13, 4) splits): the inner search is a selection, on the train experiments only, "
             "from a fixed pool of scrambled-Sobol candidates drawn from the search space and a seed (no data); "
             "each candidate is replayed once on every experiment, and the test columns are read only after the "
             "selection. Neither scheme lets a held-out experiment influence the parameters it is scored with. "
             "Two-objective models select the Pareto trial with the lowest mean of the two train MAPEs.", ""]
    head = ["rank", "model", "n params", "params (fit on all)"]
    for sc in schemes:
        head += [f"{sc}: TPOT", "TTFT", "E2E", "gap"]
    head += ["fit on all: TPOT"]
    rows = []
    for e in rk:
        row = [e["rank"], e["model"], e["n_params"], _params(e["params"])]
        for sc in schemes:
            h = e["heldout"][sc]
            row += [*[f"{pct(h[f'{m}_mape'])} ({pct(h[f'worst_fold_{m}_mape'])})" for m in ("tpot", "ttft", "e2e")],
                    _pp(h["gap"])]
        row.append(pct(e["fit_all"].get("tpot_mape")))
        rows.append(row)
    lines += ["## Ranking", "", "Held-out MAPE: mean over folds (worst fold); gap: held-out − train TPOT MAPE, mean "
              "over folds; fit on all: train TPOT MAPE of the shipped parameters on all experiments.", "",
              md_table(head, rows), "", "![ranking](ranking.png)", ""]
    lofo = "leave_one_family_out" if "leave_one_family_out" in schemes else None
    if lofo and any(f"pool_{lofo}" in e for e in rk):
        lines += ["Pool selection on the leave-one-family-out folds (same candidate pool as `all_splits`), next to "
                  "TPE inside the folds:", "",
                  md_table(["model", "TPE in fold: TPOT", "pool selection: TPOT", "pool: worst fold"],
                           [[e["model"], pct(e["heldout"][lofo]["tpot_mape"]), pct(e[f"pool_{lofo}"]["tpot_mape"]),
                             pct(e[f"pool_{lofo}"]["worst_fold_tpot_mape"])] for e in rk if f"pool_{lofo}" in e]),
                  ""]
    d = r["diagnosis"]
    lines += ["## Does the best model reach the target?", ""]
    if d["heldout_tpot_mape"] is not None:
        lines += [f"Best model **{d['best_model']}**: {d['heldout_scheme']} held-out TPOT MAPE "
                  f"**{pct(d['heldout_tpot_mape'])}** against a target of {pct(d['target_tpot_mape'])}: "
                  f"**{'met' if d['meets_target'] else 'not met'}**. Experiments at or above the target when held "
                  f"out: {', '.join(f'`{x}`' for x in d['experiments_over_target']) or 'none'}.", ""]
    lines += ["Per experiment: held-out APE of the best model (signed: + over-predicts), and the overhead per output "
              "token the measurement implies (measured TPOT − TPOT predicted with zero overhead), expressed per "
              "layer under the reference scaling (× TP / L) and without TP (÷ L). Whichever column is flatter across "
              "experiments is the scaling the data supports; coefficient of variation: "
              + ", ".join(f"{k} {v:.2f}" for k, v in d["implied_overhead_spread"].items() if v is not None) + ". "
              + _SCALING.get(d.get("flattest_scaling"), ""), "",
              md_table(["experiment", "TP", "L", "measured TPOT (ms)", "zero-overhead TPOT (ms)",
                        "implied µs/token", "implied µs/layer × TP", "implied µs/layer", "held-out APE (signed)"],
                       [[x["experiment"], x["tp"], x["num_layers"], f"{x['tpot_meas_ms']:.2f}",
                         f"{x['tpot_pred_zero_overhead_ms']:.2f}", f"{x['implied_overhead_us_per_token']:.0f}",
                         f"{x['implied_per_layer_us_x_tp']:.1f}", f"{x['implied_per_layer_us']:.1f}",
                         "n/a" if x["heldout_tpot_signed"] is None else f"{100 * x['heldout_tpot_signed']:+.1f} %"]
                        for x in d["experiments"]]), "", "![implied overhead](implied_overhead.png)", ""]
    if lofo:
        lines += ["## Leave one family out, per fold", ""]
        for e in rk:
            lines += [f"**{e['model']}**", "",
                      md_table(["held-out family", "params (fit without it)", "train TPOT", "held-out TPOT",
                                "held-out TTFT", "held-out E2E"],
                               [[", ".join(f["test_groups"]), _params(f["params"]), pct(f["train_mapes"]["tpot_mape"]),
                                 pct(f["heldout"]["tpot_mape"]), pct(f["heldout"]["ttft_mape"]),
                                 pct(f["heldout"]["e2e_mape"])] for f in e["folds"][lofo]]), ""]
    multi = [e for e in rk if e.get("pareto_front")]
    if multi:
        lines += ["## Pareto fronts (fit on all experiments; train MAPE)", ""]
        for e in multi:
            o = e["objectives"]
            lines += [f"**{e['model']}** ({len(e['pareto_front'])} non-dominated trials)", "",
                      md_table(["trial", "params", *o],
                               [[p["trial"], _params(p["params"]), *[pct(p[k]) for k in o]]
                                for p in sorted(e["pareto_front"], key=lambda p: p[o[0]])]), ""]
        lines += ["![Pareto fronts](pareto.png)", ""]
    lines += settings_section(r)
    lines += ["Optuna studies per model:", "", md_table(["model", "studies"], [
        [e["model"], ", ".join(f"`{v}`" for v in e["optuna_studies"].values())] for e in rk]), ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    files = [out / "REPORT.md"]

    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(rk)), 4.5))
    x = np.arange(len(rk))
    w = 0.8 / max(len(schemes), 1)
    for i, sc in enumerate(schemes):
        mean = [100 * e["heldout"][sc]["tpot_mape"] for e in rk]
        worst = [100 * e["heldout"][sc]["worst_fold_tpot_mape"] for e in rk]
        ax.bar(x + i * w, mean, w, label=f"{sc}: mean")
        ax.scatter(x + i * w, worst, marker="v", color="k", zorder=5, label="worst fold" if i == 0 else None)
    ax.axhline(10, color="tab:red", linestyle=":", label="10 % target")
    ax.set_xticks(x + w * (len(schemes) - 1) / 2)
    ax.set_xticklabels([e["model"] for e in rk], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("held-out TPOT MAPE (%)")
    ax.set_title(f"{r['study']} ({r['mode']} mode): nested cross-validation")
    ax.legend(fontsize=7)
    save(fig, out / "ranking.png")
    files.append(out / "ranking.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ex = d["experiments"]
    lt = np.array([x["num_layers"] / x["tp"] for x in ex])
    imp = np.array([x["implied_overhead_us_per_token"] for x in ex])
    for tp, mk in zip(sorted({x["tp"] for x in ex}), "osD^"):
        sel = np.array([x["tp"] == tp for x in ex])
        ax.scatter(lt[sel], imp[sel], marker=mk, label=f"TP {tp}")
    ax.set_xlabel("L / TP (the reference overhead scaling)")
    ax.set_ylabel("implied overhead per output token (µs)")
    ax.set_title("overhead the measurements imply (measured − zero-overhead TPOT)")
    ax.legend(fontsize=8)
    save(fig, out / "implied_overhead.png")
    files.append(out / "implied_overhead.png")

    if multi:
        fig, axes = plt.subplots(1, len(multi), figsize=(5 * len(multi), 4), squeeze=False)
        for ax, e in zip(axes[0], multi):
            o = e["objectives"]
            pts = sorted(e["pareto_front"], key=lambda p: p[o[0]])
            ax.plot([100 * p[o[0]] for p in pts], [100 * p[o[1]] for p in pts], "o-")
            ax.set_xlabel(f"train {o[0]} (%)")
            ax.set_ylabel(f"train {o[1]} (%)")
            ax.set_title(e["model"], fontsize=9)
        save(fig, out / "pareto.png")
        files.append(out / "pareto.png")
    return files
