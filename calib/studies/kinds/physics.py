"""Physics study (issue 4, item 3): TPE over physics + overhead parameters for v2.3, v2.4 and v3.

Each *candidate* of the study file is a roofline variant with fixed physics
switches, an overhead model and a search space over physics constants and
switches (MFU rule, GEMM weight-load floor, decode-attention rule, mixed-step
rule, MFU scales and floor, bandwidth efficiency, v3's constant MFUs) and the
overhead parameters.  Every candidate is scored twice, by held-out error:

* **loaded** — leave-one-model-out over the dense non-reasoning loaded-server
  runs: per fold a TPE search on the other models' runs (replayed through the
  continuous-batching engine, optionally cut to ``window_s`` seconds per load
  stage), then a full-trace replay of the held-out model's runs
  (:func:`calib.studies.loaded_search.cross_validate`);
* **synchronous** — leave-one-family-out over the 13 synchronous experiments:
  per fold a TPE search on the other families' experiments with
  :class:`calib.estimators.roofline.RooflineRegressor` (:func:`calib.studies.evaluate.evaluate`),
  then the held-out family's experiments.

Both use the same loss (weighted, capped APEs of the TTFT, TPOT and E2E means;
:class:`~calib.studies.loaded_search.Objective`).  Candidates are
ranked by the mean of the two held-out losses.  The best candidate (and every
v3 candidate, the only variant with mixture-of-experts support) is then fitted
on all dense loaded runs: those are the reproducible settings of the report,
and that fit predicts the Mixtral and overloaded runs (held out by
construction).

For the decode-step plot, every run's requests are binned by the mean number
of requests in flight during their decode phase (measured from the ground
truth, predicted from the replay) and the mean TPOT of each bin is compared;
the step model's pure-decode step time (plus overhead) at the run's typical
context is added as a curve.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from calib.errors import StudyError
from calib.physics.batch import StepBatch
from calib.physics.options import PhysicsOptions
from calib.physics.overhead import OVERHEAD_MODELS
from calib.replay.loaded import LoadedRun, step_model, supports
from calib.settings import Settings
from calib.studies.context import RunContext
from calib.studies.loaded_data import (LoadedData, check_physics, load_runs, output_rule_text, physics_settings,
                                       settings_block, without_scatter)
from calib.studies.loaded_search import (REPLAY_PARAMS, Objective, SearchSettings, cross_validate, final_fit,
                                         parse_space, space_text, split_params, study_key, tpe)
from calib.studies.spec import Strict, StudyBase

KIND = "physics"

_PHYS_FIELDS = {f.name for f in fields(PhysicsOptions)} - {"variant"}
#: RooflineRegressor takes every physics option except these (they follow the variant there).
_NOT_IN_ESTIMATOR = {"min_step_us", "tp_fallback"}
_DECODE_BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


class Candidate(Strict):
    """A roofline variant with fixed physics, an overhead model and a search space."""

    label: str = Field(pattern=r"^[A-Za-z0-9_.@+-]+$")
    physics: dict[str, Any] = Field(default_factory=lambda: {"variant": "v2.3"})
    overhead_model: str = "per_layer"
    search: dict[str, Any] = Field(min_length=1)
    description: str = ""

    @field_validator("physics")
    @classmethod
    def _physics(cls, v: dict) -> dict:
        return check_physics(v)

    @model_validator(mode="after")
    def _check(self) -> "Candidate":
        if self.overhead_model not in OVERHEAD_MODELS:
            raise ValueError(f"unknown overhead model {self.overhead_model!r}; known: {', '.join(OVERHEAD_MODELS)}")
        space = parse_space(self.search, f"candidates.{self.label}.search")
        phys, _, _ = split_params({k: 0 for k in space}, self.overhead_model)
        unknown = sorted(set(phys) - _PHYS_FIELDS)
        if unknown:
            raise ValueError(f"{unknown[0]!r} is neither a physics option nor a parameter of overhead model "
                             f"{self.overhead_model!r}")
        if set(phys) & _NOT_IN_ESTIMATOR:
            raise ValueError(f"{sorted(set(phys) & _NOT_IN_ESTIMATOR)[0]!r} cannot be searched (the synchronous "
                             "estimator has no such parameter)")
        return self

    @property
    def variant(self) -> str:
        return self.physics.get("variant", "v2.3")

    def space(self) -> dict:
        return parse_space(self.search, f"candidates.{self.label}.search")

    def sync_space(self) -> dict:
        """The search space of the synchronous side: without the loaded replay's client latency."""
        return {k: v for k, v in self.space().items() if k not in REPLAY_PARAMS}


class SyncSettings(Strict):
    """The synchronous side: leave-one-family-out TPE with RooflineRegressor."""

    n_trials: int = Field(default=30, ge=1, le=2000)
    n_startup_trials: int = Field(default=10, ge=1)
    seed: int = Field(default=1, ge=0)
    estimator: dict[str, Any] = Field(default_factory=lambda: {"mode": "corrected", "lengths": "reference",
                                                               "seed": 42})
    dataset: str | None = None

    @field_validator("estimator")
    @classmethod
    def _known(cls, v: dict) -> dict:
        from calib.estimators.roofline import RooflineRegressor

        known = set(RooflineRegressor().get_params())
        bad = sorted(set(v) - known)
        if bad:
            raise ValueError(f"unknown estimator parameter {bad[0]!r}")
        return v


class PhysicsSchema(StudyBase, LoadedData):
    kind: Literal["physics"]
    candidates: list[Candidate] = Field(min_length=1)
    loaded: SearchSettings = SearchSettings()
    synchronous: SyncSettings = SyncSettings()
    objective: Objective = Objective()
    overhead_only: str | None = None
    batched_calibration_results: str | None = "reports/batched-calibration/results.json"

    @model_validator(mode="after")
    def _labels(self) -> "PhysicsSchema":
        labels = [c.label for c in self.candidates]
        if len(set(labels)) != len(labels):
            raise ValueError("candidate labels must be unique")
        if self.overhead_only is not None and self.overhead_only not in labels:
            raise ValueError(f"overhead_only {self.overhead_only!r} is not a candidate label")
        return self


schema = PhysicsSchema


# ======================================================================================= synchronous side


def estimator_params(base: Mapping[str, Any], physics: Mapping[str, Any], overhead_model: str,
                     overhead_params: Mapping[str, float]) -> dict:
    """RooflineRegressor parameters of a physics + overhead setting."""
    est = dict(base)
    for k, v in physics.items():
        est[k] = v
    est["overhead_model"] = overhead_model
    est.update({k: float(v) for k, v in overhead_params.items()})
    return est


def sync_loss(ev, objective: Objective) -> float:
    """Mean run loss over the experiments of an :func:`~calib.studies.evaluate.evaluate` frame."""
    vals = [objective.run_loss({"ttft_mean_ms": r["ttft_ape"], "tpot_mean_ms": r["tpot_ape"],
                                "e2e_mean_ms": r["e2e_ape"]}) for _, r in ev.iterrows()]
    return float(np.mean(vals))


def sync_cv(ctx: RunContext, name: str, cand: Candidate, sync: SyncSettings, objective: Objective, key: str
            ) -> dict:
    """Leave-one-family-out TPE on the synchronous experiments."""
    from calib.data import load_experiments
    from calib.studies.evaluate import evaluate

    X = load_experiments(sync.dataset)
    families = sorted(X["family"].astype(str).unique())
    if len(families) < 2:
        raise StudyError("leave-one-family-out needs experiments of at least two families", field="synchronous")
    space = cand.sync_space()
    folds, rows = [], []
    for fam in families:
        train = X[X["family"].astype(str) != fam]
        test = X[X["family"].astype(str) == fam]

        def objective_fn(params: dict, train=train) -> tuple[float, dict]:
            phys, ovh, _ = split_params(params, cand.overhead_model)
            physics_settings({**cand.physics, **phys}).physics_options()  # validates (a CalibError: the penalty)
            ev = evaluate(train, estimator_params(sync.estimator, {**cand.physics, **phys}, cand.overhead_model, ovh))
            return sync_loss(ev, objective), {"tpot_mape": float(ev["tpot_ape"].mean()),
                                              "e2e_mape": float(ev["e2e_ape"].mean()),
                                              "ttft_mape": float(ev["ttft_ape"].mean())}

        trials = tpe(ctx.storage, f"{name}-sync-{fam}-{key}", space, objective_fn, n_trials=sync.n_trials,
                     n_startup=sync.n_startup_trials, seed=sync.seed, progress=ctx.progress,
                     desc=f"{cand.label} sync -{fam}")
        best = min(trials, key=lambda t: (t["loss"], t["index"]))
        phys, ovh, _ = split_params(best["params"], cand.overhead_model)
        ev = evaluate(test, estimator_params(sync.estimator, {**cand.physics, **phys}, cand.overhead_model, ovh))
        for exp, r in ev.iterrows():
            rows.append({"experiment": str(exp), "family": fam, "ttft_ape": float(r["ttft_ape"]),
                         "tpot_ape": float(r["tpot_ape"]), "e2e_ape": float(r["e2e_ape"]),
                         "predicted": {"ttft_ms": float(r["ttft"]), "tpot_ms": float(r["tpot"]),
                                       "e2e_ms": float(r["e2e"])}})
        _drop_sync_cache()
        folds.append({"heldout_family": fam, "n_train": int(len(train)), "test": [str(i) for i in test.index],
                      "best_params": best["params"], "train_loss": best["loss"],
                      "heldout_loss": sync_loss(ev, objective),
                      "heldout_mape": {"ttft": float(ev["ttft_ape"].mean()), "tpot": float(ev["tpot_ape"].mean()),
                                       "e2e": float(ev["e2e_ape"].mean())}})
    mape = {m: float(np.mean([r[f"{m}_ape"] for r in rows])) for m in ("ttft", "tpot", "e2e")}
    loss = float(np.mean([objective.run_loss({"ttft_mean_ms": r["ttft_ape"], "tpot_mean_ms": r["tpot_ape"],
                                              "e2e_mean_ms": r["e2e_ape"]}) for r in rows]))
    worst = max(folds, key=lambda f: f["heldout_loss"])
    return {"folds": folds, "experiments": rows, "heldout_mape": mape, "heldout_loss": loss,
            "worst_fold": {"heldout_family": worst["heldout_family"], "heldout_loss": worst["heldout_loss"],
                           "heldout_mape": worst["heldout_mape"]},
            "estimator": dict(sync.estimator)}


def _drop_sync_cache() -> None:
    """Forget the estimator's cached synchronous replays (each trial's new physics adds a dozen)."""
    from calib.estimators.roofline import clear_cache

    clear_cache()


# ======================================================================================= decode profiles


def pool_profiles(entries: Sequence[dict]) -> list[dict]:
    """Pool the per-run batch profiles (same bins) of several runs: n-weighted means per bin and side."""
    bins: dict[tuple, dict] = {}
    for e in entries:
        for row in e.get("batch_profile") or []:
            key = (row["batch_from"], row["batch_to"])
            acc = bins.setdefault(key, {s: [0, 0.0, 0.0] for s in ("measured", "predicted")})
            for side in ("measured", "predicted"):
                n = row[side]["n"]
                if n:
                    acc[side][0] += n
                    acc[side][1] += n * row[side]["mean_batch"]
                    acc[side][2] += n * row[side]["mean_tpot_ms"]
    out = []
    for (lo, hi), acc in sorted(bins.items(), key=lambda kv: kv[0][0]):
        row = {"batch_from": lo, "batch_to": hi}
        for side in ("measured", "predicted"):
            n, sb, st = acc[side]
            row[side] = {"n": n, "mean_batch": sb / n if n else None, "mean_tpot_ms": st / n if n else None}
        out.append(row)
    return out


def decode_curve(rd: LoadedRun, settings: Settings) -> list[dict]:
    """Pure-decode step time (hardware + overhead, ms) at :data:`_DECODE_BATCHES` and the run's typical context.

    The context is the mean prompt plus half the mean output length (the mean
    KV length over a decode phase).
    """
    req = rd.trace.requests
    ctx_len = int(round(float(req["input_tokens"].mean()) + float(req["output_tokens"].mean()) / 2))
    sm = step_model(rd.model, rd.trace.tp, settings.physics_options(), settings.physics.hardware)
    overhead = settings.overhead_model()
    out = []
    for b in _DECODE_BATCHES:
        if b > (rd.trace.max_num_seqs or 128):
            break
        batch = StepBatch.single(decode=[ctx_len] * b)
        hw = float(sm.parts(batch).hardware_s[0]) * 1e6
        ovh = float(overhead.step_us({"n_prefill": np.array([0]), "prefill_tokens": np.array([0]),
                                      "n_decode": np.array([b])}, sm.model.num_layers, sm.tp)[0])
        out.append({"batch": b, "step_ms": (hw + ovh) / 1e3, "hardware_ms": hw / 1e3})
    return out


def _fold_setting(cv: dict, model: str) -> tuple[dict, str, dict] | None:
    """``(physics, overhead model, overhead params)`` of the fold that held ``model`` out."""
    for f in cv["folds"]:
        if f["heldout_model"] == model:
            return f["physics"], f["overhead_model"], f["overhead_params"]
    return None


# ======================================================================================= run


def run(spec: PhysicsSchema, ctx: RunContext) -> dict:
    runs = load_runs(spec, ctx.study_file)
    names = [rd.name for rd in runs]
    results: dict[str, dict] = {}
    for cand in spec.candidates:
        space = cand.space()
        base_key = (cand.physics, cand.overhead_model, {k: repr(v) for k, v in space.items()},
                    spec.objective.model_dump())
        lkey = study_key(*base_key, spec.loaded.model_dump(), names, spec.output_rule, spec.prefix,
                         spec.cached_prefill_pi)
        loaded = cross_validate(ctx, f"{spec.name}-{cand.label}", runs, dict(cand.physics), cand.overhead_model,
                                space, spec.loaded, spec.objective, spec.hardware, spec.scatter_points, lkey)
        skey = study_key(cand.physics, cand.overhead_model, {k: repr(v) for k, v in cand.sync_space().items()},
                         spec.objective.model_dump(), spec.synchronous.model_dump())
        sync = sync_cv(ctx, f"{spec.name}-{cand.label}", cand, spec.synchronous, spec.objective, skey)
        results[cand.label] = {
            "label": cand.label, "variant": cand.variant, "description": cand.description,
            "physics": dict(cand.physics), "overhead_model": cand.overhead_model,
            "search_space": {k: space_text(v) for k, v in space.items()},
            "loaded": {**{k: v for k, v in loaded.items() if k != "runs"}, "runs": without_scatter(loaded["runs"])},
            "synchronous": sync,
            "score": 0.5 * (loaded["heldout_loss"] + sync["heldout_loss"]),
        }
    order = sorted(results, key=lambda lab: (results[lab]["score"], lab))
    best = order[0]
    best_loaded = min(results, key=lambda lab: (results[lab]["loaded"]["heldout_loss"], lab))
    # final fits: the best candidate (both rankings), and every candidate able to time the MoE runs
    has_moe = any(rd.group == "moe" for rd in runs)
    for cand in spec.candidates:
        if cand.label not in (best, best_loaded) and not (has_moe and cand.variant == "v3"):
            continue
        space = cand.space()
        fkey = study_key(cand.physics, cand.overhead_model, {k: repr(v) for k, v in space.items()},
                         spec.objective.model_dump(), spec.loaded.model_dump(), names, spec.output_rule, spec.prefix,
                         spec.cached_prefill_pi, "all")
        fit = final_fit(ctx, f"{spec.name}-{cand.label}", runs, dict(cand.physics), cand.overhead_model, space,
                        spec.loaded, spec.objective, spec.hardware, spec.scatter_points, fkey)
        fit["runs"] = without_scatter(fit["runs"])
        results[cand.label]["final_fit"] = fit
    profiles = decode_profiles(spec, runs, results)
    ranking = [{
        "rank": i + 1, "label": lab, "variant": results[lab]["variant"], "overhead_model":
        results[lab]["overhead_model"], "search_space": results[lab]["search_space"],
        "fixed_physics": results[lab]["physics"], "score": results[lab]["score"],
        "loaded_heldout_loss": results[lab]["loaded"]["heldout_loss"],
        "loaded_heldout_mape": results[lab]["loaded"]["overall"].get("mape"),
        "loaded_heldout_mape_without_runaway": results[lab]["loaded"]["overall"].get("mape_without_runaway"),
        "loaded_worst_fold": results[lab]["loaded"]["worst_fold"],
        "loaded_runaway_runs": results[lab]["loaded"]["overall"].get("runaway_runs", []),
        "sync_heldout_loss": results[lab]["synchronous"]["heldout_loss"],
        "sync_heldout_mape": results[lab]["synchronous"]["heldout_mape"],
        "sync_worst_fold": results[lab]["synchronous"]["worst_fold"],
    } for i, lab in enumerate(order)]
    moe = {lab: r["final_fit"]["runs"] for lab, r in results.items() if "final_fit" in r}
    reference = batched_calibration_reference(spec.batched_calibration_results)
    return {
        "study": spec.name,
        "kind": KIND,
        "description": spec.description,
        "ranking": ranking,
        "best": _best_block(results, best, "lowest score (mean of the loaded and synchronous held-out losses)"),
        "best_loaded": _best_block(results, best_loaded, "lowest loaded held-out loss (the issue-6 targets are on "
                                                         "the loaded runs)"),
        "targets": {lab: r["loaded"]["overall"].get("targets") for lab, r in results.items()},
        "overhead_only": spec.overhead_only,
        "batched_calibration": reference,
        "candidates": results,
        "other_runs": moe,
        "decode_profiles": profiles,
        "output_rule": output_rule_text(runs),
        "settings": settings_block(spec, ctx, runs) | {
            "score": "mean of the loaded (leave-one-model-out) and synchronous (leave-one-family-out) held-out "
                     "losses",
            "loaded_search": spec.loaded.model_dump(),
            "synchronous": spec.synchronous.model_dump(),
            "objective": spec.objective.model_dump(),
            "candidates": [c.model_dump() for c in spec.candidates],
            "storage": ctx.storage_label,
            "sampler": "optuna TPESampler(multivariate=True) via calib.calibrate.trials.tpe_search",
        },
    }


def _best_block(results: dict, label: str, rule: str) -> dict:
    r = results[label]
    return {"label": label, "rule": rule, "variant": r["variant"],
            "final_fit": {k: v for k, v in r["final_fit"].items() if k != "runs"},
            "loaded_heldout_mape": r["loaded"]["overall"].get("mape"),
            "loaded_targets": r["loaded"]["overall"].get("targets"),
            "sync_heldout_mape": r["synchronous"]["heldout_mape"]}


def batched_calibration_reference(path: str | None) -> dict | None:
    """Held-out errors of the overhead-only loaded calibration (``reports/batched-calibration``), when present.

    A relative ``path`` is taken from the current folder.
    """
    if not path:
        return None
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        doc = None
    if not isinstance(doc, dict):
        return None
    if doc.get("kind") != "batched_calibration":
        return None
    return {"file": path, "best_model": doc.get("best_model"), "physics": doc.get("physics"),
            "heldout_mape": (doc.get("overall") or {}).get("mape"),
            "heldout_loss": next((x["heldout_loss"] for x in doc.get("ranking", [])
                                  if x.get("overhead_model") == doc.get("best_model")), None)}


def decode_profiles(spec: PhysicsSchema, runs: Sequence[LoadedRun], results: dict) -> dict:
    """Per model: measured and predicted TPOT by in-flight batch, and step-model decode curves per candidate."""
    out = {}
    for model in sorted({rd.model for rd in runs if rd.group in ("dense", "moe")}):
        mruns = [rd for rd in runs if rd.model == model and rd.group in ("dense", "moe")]
        per_cand = {}
        measured = None
        for lab, r in results.items():
            entries = [e for e in r["loaded"]["runs"] if e["model"] == model and e.get("batch_profile")]
            setting = _fold_setting(r["loaded"], model)
            source = "held-out fold"
            if not entries and "final_fit" in r:
                entries = [e for e in r["final_fit"]["runs"] if e["model"] == model and e.get("batch_profile")]
                fit = r["final_fit"]
                setting = (fit["physics"], fit["overhead_model"], fit["overhead_params"])
                source = "fit on all dense runs"
            if not entries or setting is None:
                continue
            ok, _ = supports(model, setting[0]["variant"])
            if not ok:
                continue
            pooled = pool_profiles(entries)
            if measured is None:
                measured = [{"batch_from": p["batch_from"], "batch_to": p["batch_to"], **p["measured"]}
                            for p in pooled]
            settings = physics_settings(setting[0], hardware=spec.hardware, overhead_model=setting[1],
                                        overhead_params=setting[2])
            rd = mruns[0]
            per_cand[lab] = {"source": source,
                             "replay": [{"batch_from": p["batch_from"], "batch_to": p["batch_to"], **p["predicted"]}
                                        for p in pooled],
                             "step_curve": decode_curve(rd, settings),
                             "context_run": rd.name}
        if measured is not None:
            out[model] = {"tp": int(mruns[0].trace.tp), "measured": measured, "candidates": per_cand}
    return out

