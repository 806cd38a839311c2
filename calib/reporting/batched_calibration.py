"""REPORT.md and figures of a nested calibration on the loaded runs (``batched_calibration``; ``physics`` too).

The study's answer is the nested figure — the held-out error of the candidate the inner loop chose in each outer
fold and seed — shown first; the candidates' own outer scores follow, labelled descriptive.  Every held-out figure
is a mean APE over runs, then the median [min–max] over search seeds.  Every sentence is generated from
``results.json``; nothing is recomputed here.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from calib.reporting.common import abstract_block, settings_section
from calib.reporting.plots import plt, save
from calib.reporting.tables import md_table, pct

__all__ = ["write", "abstract", "spread_text", "TITLES"]

METRICS = (("tpot", "TPOT"), ("e2e", "E2E"), ("ttft", "TTFT"))
#: the aggregation as table headers name it (the full convention is results["aggregation"])
AGG = "mean APE over runs"
TITLES = {"batched_calibration": "which overhead model generalises to an unseen model under load?",
          "physics": "which roofline physics generalises to an unseen model under load?"}


def spread_text(d: dict | None) -> str:
    """``{"median", "min", "max"}`` of fractions as ``10.1 % [7.9–10.7]``."""
    if not d:
        return "n/a"
    return f"{pct(d['median'])} [{100 * d['min']:.1f}–{100 * d['max']:.1f}]"


def _params(p: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in p.items())


def _moe(c: dict) -> str:
    """The candidate's Mixtral figures (fits on all dense runs) or why it has none."""
    fig = c["fit"]["other_runs"].get("moe")
    if fig:
        return " / ".join(spread_text(fig[m]) for m, _ in METRICS)
    notes = {e["note"] for s in c["fit"]["seeds"] for e in s["other_runs"] if e["group"] == "moe"}
    return "; ".join(sorted(notes)) or "no MoE run"


def abstract(r: dict) -> list[str]:
    """Three lines from the results: the nested answer, what the inner loop chose, what is recommended."""
    sm, rec, n = r["summary"], r["recommended"], len(r["summary"]["seeds"])
    sel, cands = sm["selected"], sm["candidates"]
    counts = ", ".join(f"`{c}` {k}×" for c, k in sorted(sel["counts"].items(), key=lambda kv: -kv[1]) if k)
    med = {c: cands[c]["heldout"]["tpot"]["median"] for c in cands}
    lo, hi = min(med, key=med.get), max(med, key=med.get)
    conv = sum(c["fit"]["converged"] is True for c in r["candidates"])
    moe = rec["other_figures"].get("moe")
    moe_text = (f"it predicts the Mixtral runs (never fitted) with TPOT {pct(moe['tpot'])}, E2E {pct(moe['e2e'])}, "
                f"TTFT {pct(moe['ttft'])} ({AGG})" if moe else "its variant cannot time the Mixtral runs (MoE)")
    return [f"Choosing among {len(cands)} candidates by an inner leave-one-model-out and predicting an unseen "
            f"model's loaded runs gives held-out TPOT {spread_text(sel['heldout']['tpot'])}, E2E "
            f"{spread_text(sel['heldout']['e2e'])}, TTFT {spread_text(sel['heldout']['ttft'])} ({AGG}; median "
            f"[min–max] over {n} seeds).",
            f"Of its {sel['n_choices']} (fold, seed) choices the inner loop took {counts}; by their own outer scores "
            f"(descriptive) the candidates' median held-out TPOT runs from {pct(med[lo])} (`{lo}`) to "
            f"{pct(med[hi])} (`{hi}`).",
            f"On all dense runs SelectBest chooses `{rec['candidate']}` in {rec['votes'][rec['candidate']]} of {n} "
            f"seeds (`calibration.yaml`); {moe_text}; the seeds of {conv} of {len(cands)} candidates converged "
            "on all dense runs."]


def write(r: dict, out: Path, extra=()) -> list[Path]:
    """Write ``REPORT.md``, ``heldout.png`` and ``convergence.png`` into ``out``; ``extra``: functions
    ``results -> lines`` of sections placed before the method (a kind's own)."""
    lines = [f"# Study `{r['study']}`: {TITLES.get(r['kind'], 'nested calibration on the loaded runs')}", "",
             *abstract_block(abstract(r)), r["description"].strip(), ""]
    for section in (*extra, _method, _nested, _candidates, _moe_section, _convergence, _runaway, _per_stage,
                    _recommended, _output_rule):
        lines += section(r)
    lines += settings_section(r)
    lines += ["Optuna study prefixes (a fingerprint of estimator, data, space, objective and search follows):", "",
              md_table(["candidate", "prefix", "space"],
                       [[c["name"], f"`{c['study_prefix']}`", json.dumps(c["space"])] for c in r["candidates"]]), ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    return [out / "REPORT.md", _plot_heldout(r, out), _plot_convergence(r, out)]


def _method(r: dict) -> list[str]:
    d, s, seeds = r["dataset"], r["settings"], r["summary"]["seeds"]
    window = (f"the first {d['window_s']:g} s of every load stage ({d['search_rows']} stage rows)" if d["window_s"]
              else f"full traces ({d['search_rows']} stage rows)")
    w = r["objective"]["weights"]
    return ["## How the numbers are made", "",
            f"- Rows: the load stages of the {len(d['dense_runs'])} dense non-reasoning runs of "
            f"{len(d['models'])} models ({', '.join(d['models'])}); per stage the measured means of TTFT, TPOT per "
            "request ((E2E − TTFT) / (O − 1), the same definition on both sides) and E2E. "
            f"Other runs: {d['other_runs_rule']}.",
            f"- Searches replay {window}; every held-out score replays full traces ({d['heldout_rows']} stage rows).",
            f"- Outer loop: {s['outer_cv']} ({len(r['nested']['folds'])} folds). In every outer fold, for each of "
            f"{len(seeds)} search seeds ({', '.join(map(str, seeds))}), every candidate is calibrated by its own "
            "search on the training models only; the held-out model is predicted once, afterwards.",
            f"- Nested selection: in the same fold and seed, SelectBest chooses one candidate from the training "
            f"models alone by its mean inner loss ({s['inner_cv']}); its choice, refitted on the fold's training "
            "rows, is scored on the held-out model. No winner is read off an outer held-out score.",
            "- Objective: " + " + ".join(f"{v:g} × {k.upper()}" for k, v in w.items())
            + f" of the run-weighted mean APE of the training stages (each APE capped at {r['objective']['cap']}), "
            f"divided by {sum(w.values()):g}. Trials per seed and fit: "
            + ", ".join(f"{n} {t}" for n, t in s["trials"].items()) + f" ({s['search']['algorithm'].upper()}).",
            f"- Aggregation of every held-out figure: **{r['aggregation']}** ('{AGG}' in the tables), then median "
            f"[min–max] over the {len(seeds)} seeds.", ""]


def _nested(r: dict) -> list[str]:
    sel, n = r["summary"]["selected"], len(r["summary"]["seeds"])
    return ["## 1. The nested selection (the study's answer)", "",
            md_table([f"metric: held-out {AGG}", f"median [min–max] over {n} seeds", "per seed"],
                     [[lbl, spread_text(sel["heldout"][m]), ", ".join(pct(v) for v in sel["heldout"][m]["per_seed"])]
                      for m, lbl in METRICS]), "",
            md_table(["held-out model (stages)", "chosen by the inner loop, per seed",
                      *[f"{lbl}: {AGG} of the fold" for _, lbl in METRICS]],
                     [[", ".join(f["test_groups"]) + f" ({f['n_test']})", ", ".join(f["chosen"]),
                       *[spread_text(f[m]) for m, _ in METRICS]] for f in sel["per_fold"]]), "",
            "![held-out errors](heldout.png)", ""]


def _candidates(r: dict) -> list[str]:
    sm, sel = r["summary"], r["summary"]["selected"]
    names = [c["name"] for c in r["candidates"]]
    return ["## 2. Every candidate by its own outer score (descriptive, not a selection)", "",
            "Study-file order. Reading a winner off this table would choose on the held-out models; the nested "
            "figure above is the one that does not.", "",
            md_table(["candidate", "variant", "searched params", "trials per seed", "train loss (mean over folds)",
                      *[f"held-out {lbl}: {AGG}" for _, lbl in METRICS], "chosen (fold, seed)"],
                     [[c["name"], c["variant"], c["n_params"], c["n_trials"],
                       spread_text(sm["candidates"][c["name"]]["train_loss"]),
                       *[spread_text(sm["candidates"][c["name"]]["heldout"][m]) for m, _ in METRICS],
                       sel["counts"][c["name"]]] for c in r["candidates"]]), "",
            md_table(["held-out model", *[f"{n}: TPOT {AGG} of the fold" for n in names]],
                     [[", ".join(f["test_groups"]),
                       *[spread_text(sm["candidates"][n]["per_fold"][i]["tpot"]) for n in names]]
                      for i, f in enumerate(sel["per_fold"])]), ""]


def _moe_section(r: dict) -> list[str]:
    sm = r["summary"]["candidates"]
    rec = r["recommended"]
    rows = [[c["name"], c["variant"], " / ".join(f"{pct(sm[c['name']]['heldout'][m]['median'])}" for m, _ in METRICS),
             _moe(c)] for c in r["candidates"]]
    other, seen = [], set()
    for e in rec["other_runs"]:
        note = e["note"] if e["note"] not in seen else "unsupported (as above)"
        seen.add(e["note"])
        other.append([e["run"], e["stage"], f"{e['rate']:g}", e["group"],
                      *([f"{e['predicted'][m]:.1f} / {e['measured'][m]:.1f}" for m, _ in METRICS] if e["supported"]
                        else [note, "", ""]),
                      ("runaway" if e["runaway"] else "saturated" if e["saturated"] else "") if e["supported"] else ""])
    return ["## 3. Mixtral beside the dense runs", "",
            f"Dense: nested held-out median over seeds (leave-one-model-out). MoE: every seed of the candidate's "
            f"search fitted on all dense runs predicts the Mixtral runs, which no fit saw; {AGG}, median [min–max] "
            "over seeds.", "",
            md_table(["candidate", "variant", f"dense held-out TPOT / E2E / TTFT ({AGG}, median)",
                      f"Mixtral TPOT / E2E / TTFT ({AGG}, fits on all dense runs)"], rows), "",
            f"The recommended calibration (`{rec['candidate']}`) on every run outside the folds, per stage "
            "(predicted / measured mean, ms; overloaded runs apart from accuracy figures):", "",
            md_table(["run", "stage", "req/s", "group", "TPOT", "E2E", "TTFT", "replay"], other), ""]


def _convergence(r: dict) -> list[str]:
    tol = r["candidates"][0]["search"].get("tolerance")
    agree = Counter((a["candidate"], a["converged"]) for a in r["agreement"])
    n_folds = len(r["nested"]["folds"])
    rows = [[c["name"], spread_text_loss(c["fit"]["seeds"]), _yes(c["fit"]["converged"]),
             f"{agree[(c['name'], True)]} of {n_folds}", _params(c["fit"]["params"])] for c in r["candidates"]]
    return ["## 4. Did the seeds converge?", "",
            f"Seeds converge when their best train losses differ by at most {tol} (`Calibrator.converged_`), here "
            "for every seed of each candidate's search on all dense runs, and per outer fold for the seeds of the "
            "nested fits.", "",
            md_table(["candidate", "best train loss on all dense runs: median [min–max] over seeds",
                      "seeds converged (all dense runs)", "outer folds whose seeds agree", "best parameters"],
                     rows), "",
            "![best-so-far train loss per seed](convergence.png)", ""]


def spread_text_loss(seeds: list[dict]) -> str:
    v = [s["best_loss"] for s in seeds]
    return f"{np.median(v):.4f} [{min(v):.4f}–{max(v):.4f}]"


def _yes(v) -> str:
    return "n/a (one seed)" if v is None else ("yes" if v else "no")


def _runaway(r: dict) -> list[str]:
    flags, seeds = r["flags"], len(r["summary"]["seeds"])
    out = ["## 5. Runaway and saturated replays", "",
           "A held-out stage *saturates* when the replay's queue grows without bound; it is a *runaway* when the "
           "measured stage stayed stable (`calib.replay.loaded.saturation`): its mean error then says little.", ""]
    if not flags:
        return out + [f"No held-out replay saturated, for any candidate, fold or seed ({seeds} seeds).", ""]
    rows = []
    for c in r["candidates"]:
        mine = [f for f in flags if f["candidate"] == c["name"]]
        by_row = Counter((f["row"], f["runaway"]) for f in mine)
        rows.append([c["name"], len(mine), sum(f["runaway"] for f in mine),
                     "; ".join(f"{row} ({'runaway' if rw else 'saturated'}, {k} of {seeds} seeds)"
                               for (row, rw), k in sorted(by_row.items())) or "none"])
    return out + [md_table(["candidate", "saturated held-out (stage, seed) replays", "of which runaway",
                            "stages"], rows), ""]


def _per_stage(r: dict) -> list[str]:
    sm = r["summary"]
    names = [c["name"] for c in r["candidates"]]
    measured = {}
    for rec in r["nested"]["records"]:
        for row in rec["rows"]:
            measured.setdefault(row["row"], row["measured"])
    rows = [[row, f"{measured[row]['tpot']:.2f}", spread_text(v["tpot"]),
             *[pct(sm["candidates"][n]["per_row"][row]["tpot"]["median"]) for n in names]]
            for row, v in sm["selected"]["per_row"].items()]
    return ["## 6. Per held-out stage (full traces)", "",
            "TPOT APE of each stage when its model was held out: the nested selection (median [min–max] over seeds) "
            "and each candidate (median over seeds).", "",
            md_table(["stage", "measured TPOT (ms)", "selected: TPOT APE", *[f"{n}: TPOT APE" for n in names]],
                     rows), ""]


def _recommended(r: dict) -> list[str]:
    rec = r["recommended"]
    names = [c["name"] for c in r["candidates"]]
    return ["## 7. The recommended calibration", "",
            f"SelectBest on all dense runs ({' / '.join(rec['inner_cv'])}), once per seed; the candidate most seeds "
            f"choose is recommended, fitted by the seed with the lowest train loss among them (seed {rec['seed']}). "
            "Its expected error on an unseen model is the nested figure of section 1, not the inner losses below "
            "(they chose it).", "",
            md_table(["seed", "chosen", "params (fit on all dense runs)", "train loss",
                      *[f"inner loss: {n}" for n in names]],
                     [[p["seed"], p["chosen"], _params(p["params"]), f"{p['train_loss']:.4f}",
                       *[f"{-p['inner_mean'][n]:.4f}" for n in names]] for p in rec["per_seed"]]), "",
            f"`calibration.yaml`: **{rec['candidate']}**, {_params(rec['params'])}, train loss "
            f"{rec['train_loss']:.4f}.", ""]


def _output_rule(r: dict) -> list[str]:
    return ["## 8. Output-length rule", "",
            "Recorded output counts far below the profile's fixed length are wrong (`calib.data.traces`); per run:",
            "", *[f"- `{run}`: {text}" for run, text in r["dataset"]["output_rule"].items()], ""]


def _plot_heldout(r: dict, out: Path) -> Path:
    sm = r["summary"]
    names = [*sm["candidates"], "selected (nested)"]
    fig, axes = plt.subplots(1, 3, figsize=(max(12.0, 3.2 * len(names)), 4.2))
    for ax, (m, lbl) in zip(axes, METRICS):
        blocks = [sm["candidates"][n]["heldout"][m] for n in names[:-1]] + [sm["selected"]["heldout"][m]]
        for i, h in enumerate(blocks):
            nested = i == len(blocks) - 1
            ax.errorbar([i], [100 * h["median"]], yerr=[[100 * (h["median"] - h["min"])],
                                                        [100 * (h["max"] - h["median"])]],
                        fmt="o", color="tab:red" if nested else "tab:blue", capsize=6, markersize=8,
                        label=("nested selection" if nested else "candidate (descriptive)")
                        if i in (0, len(blocks) - 1) else None)
            ax.scatter(np.full(len(h["per_seed"]), i + 0.15), [100 * v for v in h["per_seed"]], s=12, color="k",
                       zorder=5, label="one seed" if i == 0 else None)
        ax.axvline(len(blocks) - 1.5, color="grey", linestyle=":")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(f"held-out {lbl}, {AGG} (%)")
        values = [v for h in blocks for v in h["per_seed"] if v > 0]
        if values and max(values) > 20 * min(values):  # runaway replays: errors over orders of magnitude
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(f"held-out {lbl}: median and min–max over seeds", fontsize=10)
    axes[0].legend(fontsize=7)
    fig.subplots_adjust(wspace=0.35)
    fig.suptitle(f"{r['study']}: leave-one-model-out on the dense loaded runs (full traces)", fontsize=10)
    save(fig, out / "heldout.png")
    return out / "heldout.png"


def _plot_convergence(r: dict, out: Path) -> Path:
    cands = r["candidates"]
    fig, axes = plt.subplots(1, len(cands), figsize=(3.4 * len(cands), 3.6), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], cands):
        for s in c["fit"]["seeds"]:
            ax.plot(np.arange(1, len(s["curve"]) + 1), s["curve"], label=f"seed {s['seed']}", lw=1.2)
        ax.set_title(f"{c['name']} (converged: {_yes(c['fit']['converged'])})", fontsize=9)
        ax.set_xlabel("trial")
    axes[0][0].set_ylabel("best train loss so far (all dense runs)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{r['study']}: best-so-far train loss per seed", fontsize=10)
    save(fig, out / "convergence.png")
    return out / "convergence.png"
