"""REPORT.md and figures of an overhead-models study (every number comes from results.json).

The study's answer is the nested figure — the held-out error of the model the
inner loop chose in each outer fold — shown first; the table of candidates by
their own outer scores follows and is labelled descriptive.  Every held-out
figure is the median over search seeds with its min–max.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calib.reporting.common import abstract_block, mode_line, settings_section
from calib.reporting.plots import plt, save
from calib.reporting.tables import md_table, pct

__all__ = ["write", "abstract", "spread_text"]

METRICS = (("tpot", "TPOT"), ("e2e", "E2E"), ("ttft", "TTFT"))
#: the aggregation, as table headers name it (the full convention is results["aggregation"])
AGG = "mean APE over experiments"
_SCALING = {"us_per_layer": "per layer without the 1/TP factor (µs/layer)",
            "us_per_layer_x_tp": "per layer under the reference L/TP scaling (µs/layer × TP)",
            "us_per_token": "per output token, independent of L and TP (µs/token)"}


def spread_text(d: dict) -> str:
    """``{"median", "min", "max"}`` of fractions as ``10.1 % [7.9–10.7]``."""
    return f"{pct(d['median'])} [{100 * d['min']:.1f}–{100 * d['max']:.1f}]"


def _params(p: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in p.items())


def _groups(f: dict) -> str:
    return ", ".join(f["test_groups"]) + f" ({f['n_test']})"


def abstract(r: dict) -> list[str]:
    """Three lines from the results: the nested answer, what was chosen, the recommended calibration."""
    sm, rec = r["summary"], r["recommended"]
    sel, n_seeds = sm["selected"], len(sm["seeds"])
    base = next(iter(sm["candidates"]))
    counts = ", ".join(f"`{c}` {n} times" for c, n in sorted(sel["counts"].items(), key=lambda kv: -kv[1]) if n)
    return [f"Selecting the overhead model by inner cross-validation and predicting an unseen "
            f"{r['settings']['group']} gives a held-out TPOT error of {spread_text(sel['heldout']['tpot'])} "
            f"(median [min–max] over {n_seeds} seeds; E2E {spread_text(sel['heldout']['e2e'])}), against "
            f"{spread_text(sm['candidates'][base]['heldout']['tpot'])} for the first candidate, `{base}`, in the "
            "same folds.",
            f"Of its {sel['n_choices']} (fold, seed) choices the inner loop took {counts}.",
            f"On all experiments SelectBest chooses `{rec['candidate']}` in {rec['votes'].get(rec['candidate'], 0)} "
            f"of {n_seeds} seeds; its fit with the lowest train loss (seed {rec['seed']}: {_params(rec['params'])}) is "
            "`calibration.yaml`."]


def write(r: dict, out: Path) -> list[Path]:
    sm, rec, s = r["summary"], r["recommended"], r["settings"]
    sel, seeds, agg = sm["selected"], sm["seeds"], AGG
    names = [c["name"] for c in r["candidates"]]
    inner = sorted({c["inner_cv"] for c in r["nested"]["choices"]})
    lines = [f"# Study `{r['study']}` ({r['mode']} mode): which overhead model generalises?", "",
             *abstract_block(abstract(r)), mode_line(r), "",
             "## How the numbers are made", "",
             f"- Outer loop: {s['outer_cv']} ({len(sel['per_fold'])} folds). In every outer fold, for each of "
             f"{len(seeds)} search seeds ({', '.join(map(str, seeds))}), every candidate is calibrated by its own "
             "search on the training groups only; the held-out group is predicted once, afterwards.",
             "- Nested selection: in the same fold and seed, SelectBest chooses one candidate from the training "
             "groups alone, by its inner loss (the objective on each inner held-out fold, averaged over inner "
             f"folds; inner splitter: {' / '.join(inner)}). Its choice, refitted on the fold's training groups, is "
             "scored on the held-out group.",
             f"- Objective: {s['objective']}. Trials per seed: "
             + ", ".join(f"{n} {t}" for n, t in s["trials"].items()) + ".",
             f"- Aggregation of every held-out figure: **{r['aggregation']}** ('{agg}' in the tables: each experiment "
             f"is held out once per seed), then median [min–max] over the {len(seeds)} seeds; per-fold figures "
             "are the mean over the fold's experiments.", ""]
    lines += ["## 1. The selected model, nested (the study's answer)", "",
              md_table([f"metric: held-out {agg}", "median [min–max] over seeds"],
                       [[lbl, spread_text(sel["heldout"][m])] for m, lbl in METRICS]), "",
              md_table(["held-out group (experiments)", "chosen by the inner loop, per seed",
                        *[f"{lbl}: mean APE over the fold's experiments" for _, lbl in METRICS]],
                       [[_groups(f), ", ".join(f["chosen"]), *[spread_text(f[m]) for m, _ in METRICS]]
                        for f in sel["per_fold"]]), "", "![held-out TPOT and E2E](heldout.png)", ""]
    cands = sm["candidates"]
    lines += ["## 2. Every candidate by its outer score (descriptive, not a selection)", "",
              "Study-file order. Reading a winner off this table would choose on the held-out families; the "
              "nested figure above is the one that does not.", "",
              md_table(["candidate", "searched params", "train loss (mean over folds)",
                        *[f"held-out {lbl}: {agg}" for _, lbl in METRICS], "chosen (fold, seed)"],
                       [[n, c["n_params"], spread_text(cands[n]["train_loss"]),
                         *[spread_text(cands[n]["heldout"][m]) for m, _ in METRICS], sel["counts"][n]]
                        for n, c in zip(names, r["candidates"])]), "",
              md_table(["held-out group", *[f"{n}: TPOT mean APE over the fold's experiments" for n in names]],
                       [[_groups(f), *[spread_text(cands[n]["per_fold"][i]["tpot"]) for n in names]]
                        for i, f in enumerate(sel["per_fold"])]), ""]
    lines += ["## 3. The recommended calibration", "",
              f"SelectBest on all experiments (inner splitter: {' / '.join(rec['inner_cv'])}), once per seed; the "
              "candidate most seeds choose is "
              f"recommended, fitted by the seed with the lowest train loss among them (seed {rec['seed']}). Its "
              "expected error on an unseen group is the nested figure of section 1, not its inner losses below "
              "(they chose it).", "",
              md_table(["seed", "chosen", "params (fit on all)", "train loss",
                        *[f"inner loss: {n}" for n in names]],
                       [[p["seed"], p["chosen"], _params(p["params"]), pct(p["train_loss"]),
                         *[pct(-p["inner_mean"][n]) for n in names]] for p in rec["per_seed"]]), "",
              f"`calibration.yaml`: **{rec['candidate']}**, {_params(rec['params'])}, train loss "
              f"{pct(rec['train_loss'])}.", ""]
    io = r["implied_overhead"]
    rows = sel["per_row"]
    lines += ["## 4. Per experiment", "",
              "Held-out TPOT APE when the experiment's family was left out (median [min–max] over seeds), and "
              "the overhead the measurement implies: measured TPOT minus TPOT predicted at zero overhead, per "
              "output token, then × TP / L and ÷ L. Coefficient of variation over experiments: "
              + ", ".join(f"{_SCALING[k]} {v:.2f}" for k, v in io["coefficient_of_variation"].items())
              + f"; flattest: {_SCALING[io['flattest']]}.", "",
              md_table(["experiment", "TP", "L", "selected: held-out TPOT APE",
                        *[f"{n}: held-out TPOT APE (median)" for n in names], "measured TPOT (ms)",
                        "zero-overhead TPOT (ms)", "µs/token", "µs/layer × TP", "µs/layer"],
                       [[e["experiment"], e["tp"], e["num_layers"], spread_text(rows[e["experiment"]]["tpot"]),
                         *[pct(cands[n]["per_row"][e["experiment"]]["tpot"]["median"]) for n in names],
                         f"{e['tpot_measured_ms']:.2f}", f"{e['tpot_zero_overhead_ms']:.2f}",
                         f"{e['us_per_token']:.0f}", f"{e['us_per_layer_x_tp']:.1f}", f"{e['us_per_layer']:.1f}"]
                        for e in io["experiments"]]), "", "![implied overhead](implied_overhead.png)", ""]
    lines += settings_section(r)
    lines += ["Optuna study prefixes (a fingerprint of estimator, data, space, objective and search follows):", "",
              md_table(["candidate", "prefix", "space"],
                       [[c["name"], f"`{c['study_prefix']}`", c["space"]] for c in r["candidates"]]), ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    return [out / "REPORT.md", _plot_heldout(r, out), _plot_implied(r, out)]


def _plot_heldout(r: dict, out: Path) -> Path:
    sm = r["summary"]
    names = [*sm["candidates"], "selected (nested)"]
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.6 * len(names)), 4.2))
    for ax, (m, lbl) in zip(axes, METRICS[:2]):
        blocks = [sm["candidates"][n]["heldout"][m] for n in names[:-1]] + [sm["selected"]["heldout"][m]]
        for i, h in enumerate(blocks):
            nested = i == len(blocks) - 1
            ax.errorbar([i], [100 * h["median"]], yerr=[[100 * (h["median"] - h["min"])],
                                                        [100 * (h["max"] - h["median"])]],
                        fmt="o", color="tab:red" if nested else "tab:blue", capsize=6, markersize=8,
                        label=("nested selection" if nested else "candidate (descriptive)") if i in (0, len(blocks) - 1)
                        else None)
            ax.scatter(np.full(len(h["per_seed"]), i + 0.15), [100 * v for v in h["per_seed"]], s=12, color="k",
                       zorder=5, label="one seed" if i == 0 else None)
        ax.axvline(len(blocks) - 1.5, color="grey", linestyle=":")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"held-out {lbl}, {AGG} (%)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"held-out {lbl}: median and min–max over seeds", fontsize=10)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{r['study']} ({r['mode']} mode)", fontsize=10)
    save(fig, out / "heldout.png")
    return out / "heldout.png"


def _plot_implied(r: dict, out: Path) -> Path:
    ex = r["implied_overhead"]["experiments"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for tp, mk in zip(sorted({e["tp"] for e in ex}), "osD^v"):
        pts = [e for e in ex if e["tp"] == tp]
        ax.scatter([e["num_layers"] / tp for e in pts], [e["us_per_token"] for e in pts], marker=mk, label=f"TP {tp}")
    ax.set_xlabel("L / TP (the reference overhead scaling)")
    ax.set_ylabel("implied overhead per output token (µs)")
    ax.set_title("overhead the measurements imply (measured − zero-overhead TPOT)", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, out / "implied_overhead.png")
    return out / "implied_overhead.png"
