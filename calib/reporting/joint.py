"""REPORT.md and figures of a ``joint`` study: one calibration for synchronous and loaded serving, held out by model.

The answer comes first: the targets (median over search seeds of the nested held-out figure of the selected
candidate, loaded and synchronous apart), then per-seed and per-fold tables of both datasets, the candidates'
own outer scores (descriptive), per-run figures, runaway replays, the runs no fold holds (Mixtral, overloaded),
the recommended calibration, and evidence plots of what the calibrated step model does.  Every number is read
from ``results.json``; nothing is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calib.reporting import batched_calibration as loaded
from calib.reporting.common import abstract_block, settings_section
from calib.reporting.plots import plt, save
from calib.reporting.tables import md_table, pct

__all__ = ["write", "abstract"]

METRICS = (("tpot", "TPOT"), ("e2e", "E2E"), ("ttft", "TTFT"))
SIDES = (("loaded", "loaded (dense runs)", "mean APE over runs"), ("sync", "synchronous", "mean APE over experiments"))
st = loaded.spread_text


def _summary(r: dict, side: str) -> dict:
    return r["summary_loaded"] if side == "loaded" else r["summary_sync"]


def abstract(r: dict) -> list[str]:
    """Three lines: the nested answer per dataset, the targets met, what is recommended."""
    sl, ss, n = r["summary_loaded"]["selected"]["heldout"], r["summary_sync"]["selected"]["heldout"], \
        len(r["summary"]["seeds"])
    t = r["targets"]
    met = [k for k, v in t.items() if v["met"]]
    rec = r["recommended"]
    k = len(r["candidates"])
    how = (f"chosen by an inner leave-one-model-out among {k} candidates" if k > 1
           else f"the single candidate `{r['candidates'][0]['name']}` fitted per fold")
    return [f"One calibration for both regimes, {how}, predicts an unseen model's loaded runs with TPOT {st(sl['tpot'])}, "
            f"E2E {st(sl['e2e'])}, TTFT {st(sl['ttft'])} (mean APE over runs) and its synchronous experiments with "
            f"TPOT {st(ss['tpot'])}, E2E {st(ss['e2e'])} (mean APE over experiments; median [min–max] over {n} "
            "seeds).",
            f"Targets met: {len(met)} of {len(t)} ({', '.join(met) or 'none'}); every dense run below "
            f"{pct(r['run_target']['target'])} TPOT and E2E: {'yes' if r['run_target']['met'] else 'no'}; a held-out "
            f"replay of the selected candidate ran away where the server was stable: "
            f"{'yes' if r['runaway']['any_selected'] else 'no'}.",
            (f"On all rows SelectBest chooses `{rec['candidate']}` in {rec['votes'][rec['candidate']]} of {n} seeds"
             if k > 1 else f"Fitted on all rows with {n} seeds (the lowest train loss, seed {rec['seed']}, is kept)")
            + " (`calibration.yaml`" + (f", shipped as `{r['ship_to']}`" if r.get("ship_to") else "") + ")."]


def write(r: dict, out: Path) -> list[Path]:
    """Write ``REPORT.md``, ``heldout.png``, ``convergence.png``, ``step_time.png``, ``ttft.png`` and
    ``tpot_inflight.png`` into ``out``."""
    lines = [f"# Study `{r['study']}`: one calibration for synchronous and loaded serving, held out by model", "",
             *abstract_block(abstract(r)), *([r["description"].strip(), ""] if r["description"].strip() else [])]
    for section in (_targets, _method, _nested, _candidates, _runs, _runaway, _others, _recommended, _evidence):
        lines += section(r)
    lines += settings_section(r)
    (out / "REPORT.md").write_text("\n".join(lines))
    return [out / "REPORT.md", _plot_heldout(r, out), loaded._plot_convergence(r, out), _plot_steps(r, out),
            _plot_ttft(r, out), _plot_inflight(r, out)]


def _targets(r: dict) -> list[str]:
    return ["## Targets", "",
            "Measured: median over search seeds of the nested held-out mean APE of the candidate the inner loop "
            "selected (loaded: over dense runs; synchronous: over experiments).", "",
            md_table(["target", "measured", "target", "met"],
                     [[k, pct(v["measured"]), pct(v["target"]), "yes" if v["met"] else "**no**"]
                      for k, v in r["targets"].items()]), ""]


#: how the synchronous experiments' request lengths were made, by the study's ``lengths``
_LENGTHS = {"reference": "the reference simulator's draws (seed 42)",
            "numpy": "a NumPy sample of the workload distributions",
            "quantiles": "the workload distributions' quantiles in a seeded order (calib.data.lengths.quantile_lengths)"}


def _method(r: dict) -> list[str]:
    d, s = r["dataset"], r["settings"]
    ld, sd = d["loaded"], d["sync"]
    w = r["objective"]["weights"]
    return ["## How the numbers are made", "",
            f"- Rows: {len(sd['experiments'])} synchronous experiments ({sd['source']}; replayed in "
            f"**{sd['mode']}** mode: no phantom step, TPOT {sd['tpot_definition']}; request lengths "
            f"{_LENGTHS.get(sd.get('lengths', 'reference'), sd.get('lengths'))}) and the load stages of "
            f"{len(ld['dense_runs'])} dense loaded runs (TPOT per request on both sides). Models and their rows: "
            + "; ".join(f"{m}: {len(v['experiments'])} experiments, {len(v['loaded_runs'])} runs"
                        for m, v in d["models"].items()) + ".",
            f"- Searches replay the first {ld['window_s']:g} s of every load stage and every experiment in full; "
            "held-out scores replay full traces." if ld["window_s"] else "- Searches and scores replay full traces.",
            f"- Outer loop: {s['outer_cv']} ({len(r['nested']['folds'])} folds). Inner: {s['inner_cv']}.",
            "- Objective: " + " + ".join(f"{v:g} × {k.upper()}" for k, v in w.items())
            + f" (APEs capped at {r['objective']['cap']}), {r['objective']['datasets']}.",
            f"- Aggregation: loaded — {r['aggregation']['loaded']}; synchronous — {r['aggregation']['sync']}.", ""]


def _nested(r: dict) -> list[str]:
    out = ["## 1. The nested selection, per dataset (the study's answer)", ""]
    for side, title, agg in SIDES:
        sel = _summary(r, side)["selected"]
        out += [f"### {title}", "",
                md_table([f"metric: held-out {agg}", "median [min–max] over seeds", "per seed"],
                         [[lbl, st(sel["heldout"][m]), ", ".join(pct(v) for v in sel["heldout"][m]["per_seed"])]
                          for m, lbl in METRICS]), "",
                md_table(["held-out model (rows)", "chosen, per seed", *[f"{lbl}: {agg} of the fold" for _, lbl in METRICS]],
                         [[", ".join(f["test_groups"]) + f" ({f['n_test']})", ", ".join(f["chosen"]),
                           *[st(f[m]) for m, _ in METRICS]] for f in sel["per_fold"]]), ""]
    return out + ["![held-out errors](heldout.png)", ""]


def _candidates(r: dict) -> list[str]:
    rows = []
    for c in r["candidates"]:
        n = c["name"]
        overhead = c["overhead_model"] + (" (overlaps the GPU under async scheduling)" if c.get("cpu_overlap") else "")
        rows.append([n, c["variant"], json.dumps(c["physics"]), overhead, c["n_params"], c["n_trials"],
                     *[st(_summary(r, side)["candidates"][n]["heldout"][m]) for side, _, _ in SIDES
                       for m in ("tpot", "e2e")],
                     r["summary"]["selected"]["counts"][n]])
    return ["## 2. Every candidate by its own outer score (descriptive, not a selection)", "",
            md_table(["candidate", "variant", "fixed physics", "overhead model", "searched", "trials",
                      "loaded TPOT", "loaded E2E", "sync TPOT", "sync E2E", "chosen (fold, seed)"], rows), ""]


def _runs(r: dict) -> list[str]:
    t = r["run_target"]
    return ["## 3. Per dense run (held out with its model)", "",
            f"Rule: {t['rule']} ({pct(t['target'])}, {', '.join(t['metrics'])}): **{'met' if t['met'] else 'not met'}**"
            f"; worst: " + ", ".join(f"{m} `{run}`" for m, run in t["worst"].items()) + ".", "",
            md_table(["run", "model", "TPOT APE", "E2E APE", "TTFT APE", "below target"],
                     [[e["run"], e["model"], st(e["tpot"]), st(e["e2e"]), st(e["ttft"]),
                       ", ".join(f"{m}: {'yes' if v else 'no'}" for m, v in e["below"].items())] for e in r["runs"]]),
            "", "Synchronous experiments (selected candidate, TPOT APE, median [min–max] over seeds):", "",
            md_table(["experiment", "TPOT APE", "E2E APE"],
                     [[k, st(v["tpot"]), st(v["e2e"])] for k, v in r["summary_sync"]["selected"]["per_row"].items()]),
            ""]


def _runaway(r: dict) -> list[str]:
    ra = r["runaway"]
    text = ("No held-out replay of the selected candidate saturated where the server was stable."
            if not ra["any_selected"] else
            "Runaway held-out replays of the selected candidate: " + "; ".join(
                f"fold {f['fold']} seed {f['seed']} `{f['row']}`" for f in ra["selected"]) + ".")
    return ["## 4. Runaway replays", "", text,
            f"Any candidate (descriptive): {'yes' if ra['any_candidate'] else 'no'} "
            f"({sum(f['runaway'] for f in r['flags'])} runaway of {len(r['flags'])} saturated held-out replays).", ""]


def _others(r: dict) -> list[str]:
    rec = r["recommended"]
    rows = []
    for e in rec["other_runs"]:
        rows.append([e["run"], e["stage"], f"{e['rate']:g}", e["group"],
                     *([f"{e['predicted'][m]:.1f} / {e['measured'][m]:.1f} ({pct(e['ape'][m])})" for m, _ in METRICS]
                       if e["supported"] else [e["note"], "", ""]),
                     ("runaway" if e["runaway"] else "saturated" if e["saturated"] else "") if e["supported"] else ""])
    figs = rec["other_figures"]
    cand = [[c["name"], c["variant"], loaded._moe(c)] for c in r["candidates"]]
    return ["## 5. Mixtral and overloaded runs (never fitted)", "",
            "Predicted by the recommended calibration fitted on all rows; the overloaded (reasoning) runs are "
            "reported apart from every accuracy figure. Group means (mean APE over runs): "
            + ("; ".join(f"{g}: " + ", ".join(f"{lbl} {pct(v[m])}" for m, lbl in METRICS) for g, v in figs.items())
               or "none supported") + ".", "",
            md_table(["run", "stage", "req/s", "group", "TPOT pred / meas (APE)", "E2E", "TTFT", "replay"], rows), "",
            "Every candidate's fits on all rows on the Mixtral runs (median [min–max] over seeds, TPOT / E2E / TTFT):",
            "", md_table(["candidate", "variant", "Mixtral"], cand), ""]


def _recommended(r: dict) -> list[str]:
    rec = r["recommended"]
    ship = (f"The study names `{r['ship_to']}` as its destination: copy `calibration.yaml` there after reviewing "
            "this report (the study never writes package data)." if r.get("ship_to") else "")
    return ["## 6. The recommended calibration", "",
            md_table(["seed", "chosen", "params", "train loss"],
                     [[p["seed"], p["chosen"], loaded._params(p["params"]), f"{p['train_loss']:.4f}"]
                      for p in rec["per_seed"]]), "",
            f"`calibration.yaml`: **{rec['candidate']}** (seed {rec['seed']}), {loaded._params(rec['params'])}; it "
            "carries the held-out figures of section 1. " + ship, "",
            "![best-so-far train loss per seed](convergence.png)", ""]


def _evidence(r: dict) -> list[str]:
    return ["## 7. Evidence", "", f"Each candidate at its fit on all rows ({r['evidence']['note']}).", "",
            "Decode step time against batch size (hardware + overhead):", "", "![step time](step_time.png)", "",
            "TTFT per request against input length, and stage-mean TTFT against the stage's request rate:", "",
            "![TTFT](ttft.png)", "",
            "TPOT against mean requests in flight (bins of `calib.replay.loaded.batch_profile`):", "",
            "![TPOT vs requests in flight](tpot_inflight.png)", ""]


# ---------------------------------------------------------------------------------------------- figures


def _plot_heldout(r: dict, out: Path) -> Path:
    names = [c["name"] for c in r["candidates"]]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7), squeeze=False)
    for row, (side, title, agg) in enumerate(SIDES):
        sm = _summary(r, side)
        for ax, (m, lbl) in zip(axes[row], METRICS):
            blocks = [sm["candidates"][n]["heldout"][m] for n in names] + [sm["selected"]["heldout"][m]]
            for i, h in enumerate(blocks):
                ax.errorbar([i], [100 * h["median"]], yerr=[[100 * (h["median"] - h["min"])],
                                                            [100 * (h["max"] - h["median"])]],
                            fmt="o", color="tab:red" if i == len(names) else "tab:blue", capsize=5)
                ax.scatter(np.full(len(h["per_seed"]), i + 0.12), [100 * v for v in h["per_seed"]], s=10, color="k")
            key = f"{side}_{m}"
            if key in r["targets"]:
                ax.axhline(100 * r["targets"][key]["target"], color="tab:green", ls="--", lw=1, label="target")
                ax.legend(fontsize=7)
            ax.set_xticks(range(len(names) + 1))
            ax.set_xticklabels([*names, "selected"], rotation=20, ha="right", fontsize=8)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{title}: held-out {lbl}", fontsize=9)
            ax.set_ylabel(f"{agg} (%)", fontsize=8)
    fig.tight_layout()
    save(fig, out / "heldout.png")
    return out / "heldout.png"


def _plot_steps(r: dict, out: Path) -> Path:
    curves = r["evidence"]["step_curves"]
    panels = sorted({(c["model"], c["tp"]) for c in curves})
    names = [c["name"] for c in r["candidates"]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.8), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (model, tp) in zip(axes[0], panels):
        for c in curves:
            if (c["model"], c["tp"]) != (model, tp):
                continue
            k = names.index(c["candidate"])
            ctx_i = r["evidence"]["contexts"].index(c["context"])
            ax.plot(c["batch"], c["step_ms"], styles[k % len(styles)], color=f"C{ctx_i}", marker="os^D"[k % 4], ms=4,
                    label=f"{c['candidate']}, ctx {c['context']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decode batch size")
        ax.set_ylabel("step time (ms)")
        ax.set_title(f"{model} TP{tp}", fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    save(fig, out / "step_time.png")
    return out / "step_time.png"


def _replay_grid(r: dict):
    reps = r["evidence"]["replays"]
    runs = sorted({e["run"] for e in reps})
    names = [c["name"] for c in r["candidates"]]
    return reps, runs, names


def _plot_ttft(r: dict, out: Path) -> Path:
    reps, runs, names = _replay_grid(r)
    n = max(len(runs), 1)
    fig, axes = plt.subplots(2, n, figsize=(3.4 * n, 6.4), squeeze=False)
    for j, run in enumerate(runs):
        top, bottom = axes[0][j], axes[1][j]
        for e in (e for e in reps if e["run"] == run):
            k = names.index(e["candidate"])
            q = e["requests"]
            x = np.asarray(q["input_tokens"], float)
            if k == 0:
                top.scatter(x, [np.nan if v is None else v for v in q["measured_ttft_ms"]], s=5, color="k",
                            label="measured")
                bottom.plot([s["rate"] for s in e["stages"]], [s["measured_ttft_ms"] for s in e["stages"]], "ko-",
                            label="measured")
            top.scatter(x, [np.nan if v is None else v for v in q["predicted_ttft_ms"]], s=5, color=f"C{k}",
                        alpha=0.6, label=e["candidate"])
            bottom.plot([s["rate"] for s in e["stages"]], [s["predicted_ttft_ms"] for s in e["stages"]], "o--",
                        color=f"C{k}", label=e["candidate"])
        top.set_title(run[-32:], fontsize=7)
        top.set_xlabel("input tokens", fontsize=8)
        bottom.set_xlabel("stage rate (req/s)", fontsize=8)
        top.set_yscale("log")
    axes[0][0].set_ylabel("TTFT per request (ms)")
    axes[1][0].set_ylabel("stage mean TTFT (ms)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    save(fig, out / "ttft.png")
    return out / "ttft.png"


def _plot_inflight(r: dict, out: Path) -> Path:
    reps, runs, names = _replay_grid(r)
    n = max(len(runs), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for e in (e for e in reps if e["run"] == run):
            k = names.index(e["candidate"])
            for side, style, color, label in (("measured", "o-", "k", "measured"),
                                              ("predicted", "o--", f"C{k}", e["candidate"])):
                if side == "measured" and k:
                    continue
                pts = [(b[side]["mean_batch"], b[side]["mean_tpot_ms"]) for b in e["batch_profile"]
                       if b[side]["n"]]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, color=color, label=label, ms=3)
        ax.set_title(run[-32:], fontsize=7)
        ax.set_xlabel("mean requests in flight", fontsize=8)
    axes[0][0].set_ylabel("mean TPOT (ms)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    save(fig, out / "tpot_inflight.png")
    return out / "tpot_inflight.png"
