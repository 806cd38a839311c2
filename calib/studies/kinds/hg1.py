"""The HG1 protocol: grid-search one settings parameter on a fixed train split, validate on all.

A composition: the experiments, a :class:`~calib.calibrate.Calibrator` over
:class:`~calib.RooflineRegressor` with the study's phased grid
(:class:`~calib.calibrate.PhasedGrid`: a grid, then ``optimum ± radius`` of the
phase before it, clipped to the first grid's range; the optimum of a phase is
its lowest train objective, ties to the smaller value), fitted on the train
rows only; then predictions of every experiment at the optimum and at fixed
validation points, and the pre-registered criteria.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from calib.calibrate import Calibrator
from calib.data import load_experiments
from calib.estimators.roofline import RooflineRegressor
from calib.errors import CalibError
from calib.settings import Settings, flat_name
from calib.specs import load_model
from calib.studies.common import GridStudyMixin, SplitSpec, resolve_split
from calib.studies.context import RunContext
from calib.studies.criteria import evaluate_criteria
from calib.studies.schemas.hg1 import Results
from calib.studies.spec import Strict
from calib.studies.evaluate import evaluate

__all__ = ["KIND", "schema", "run", "warm", "Results"]  # Results: the schema the runner checks results against

KIND = "hg1"


class Published(Strict):
    """The published study's figures, to say whether calib reproduces them (separate from the criteria)."""

    coarse_optimum_us: float
    fine_optimum_us: float
    train_tpot_mape: float = Field(ge=0)
    test_tpot_mape: float = Field(ge=0)
    train_tolerance: float = Field(default=0.005, ge=0, description="|reproduced - published| train MAPE allowed")
    mode: Literal["reference", "corrected"] = Field(default="reference",
                                                   description="the mode the published figures were made in")
    source: str = ""
    test_note: str = ""


class HG1Schema(GridStudyMixin):
    kind: Literal["hg1"]
    split: SplitSpec = SplitSpec()
    validation: list[float | Literal["optimum"]] = ["optimum", 100.0, 0.0]
    published: Published | None = None

    @model_validator(mode="after")
    def _check_validation(self) -> "HG1Schema":
        if "optimum" not in self.validation:
            raise ValueError("validation must include 'optimum' (the criteria and tables are read there)")
        settings = Settings.from_params({k: v for k, v in self.estimator.items() if k != "target"})
        for point in self.validation:
            if point != "optimum":
                try:
                    settings.with_values({self.parameter: point})
                except CalibError as exc:
                    raise ValueError(f"validation point {point!r}: {exc.message}") from None
        return self


schema = HG1Schema

def _key(v: float) -> str:
    return f"{v:g}"


def reproduction(pub: Published, optima: dict[str, float], splits: dict) -> dict:
    """Published vs reproduced: the optima must match exactly and the train MAPE within the tolerance; the test
    MAPE is shown beside them with the study file's note on why it may differ."""
    got = {"coarse_optimum_us": optima.get("coarse"), "fine_optimum_us": optima.get("fine"),
           "train_tpot_mape": splits["train"]["tpot_mape"]["optimum"],
           "test_tpot_mape": splits["test"]["tpot_mape"]["optimum"]}
    same_optima = got["coarse_optimum_us"] == pub.coarse_optimum_us and got["fine_optimum_us"] == pub.fine_optimum_us
    train_ok = abs(got["train_tpot_mape"] - pub.train_tpot_mape) <= pub.train_tolerance
    return {"published": pub.model_dump(exclude={"train_tolerance", "source", "test_note", "mode"}), "reproduced": got,
            "optima_match": same_optima, "train_within_tolerance": train_ok, "train_tolerance": pub.train_tolerance,
            "verdict": "yes" if same_optima and train_ok else "no", "source": pub.source,
            "test_note": pub.test_note}


def warm(spec: HG1Schema, ctx: RunContext) -> None:
    """What every worker of a parallel run needs before its first trial, done once by the lead before it forks
    them (:func:`calib.studies.runner.run_study`): the experiments read, and the replays of the train
    experiments built and run once at the estimator's own settings (the first evaluation in a process costs
    about ten later ones).  Nothing is stored; the grid's numbers do not depend on it."""
    X = load_experiments(spec.dataset)
    train, _ = resolve_split(spec.split, X, ctx.study_file)
    RooflineRegressor(**spec.estimator).predict_all(X.loc[train])


def run(spec: HG1Schema, ctx: RunContext) -> dict:
    X = load_experiments(spec.dataset)
    train, test = resolve_split(spec.split, X, ctx.study_file)
    estimator = RooflineRegressor(**spec.estimator)
    param = flat_name(spec.parameter)
    cal = Calibrator(estimator, space=spec.search_space(), objective=spec.objective, search=spec.phased_grid(),
                     storage=ctx.url, study_name=spec.name, progress=ctx.progress)
    cal.fit(X.loc[train])
    if ctx.is_worker:  # the search is complete (a worker's share of it is done); what follows only the lead reports
        return {}
    phase_names = [ph.name for ph in spec.phases]
    landscape: list[dict] = []
    optima: dict[str, float] = {}
    for row in cal.search_result_.trials:
        v = float(next(iter(row["params"].values())))
        landscape.append({"phase": row["stage"], param: v, "overhead_us": v, "objective": row["loss"],
                          **{k: float(row["attrs"][k]) for k in ("train_tpot_mape", "train_e2e_mape",
                                                                  "train_ttft_mape")}})
    for phase in phase_names:
        rows = [r for r in landscape if r["phase"] == phase]
        optima[phase] = min(rows, key=lambda r: (r["objective"], r[param]))[param]
    optimum = float(next(iter(cal.best_params_.values())))
    base = estimator.get_params()

    # validation on every experiment at the optimum and the fixed points
    points = {("optimum" if p == "optimum" else _key(float(p))): (optimum if p == "optimum" else float(p))
              for p in spec.validation}
    evals = {k: evaluate(X, {**base, param: v}) for k, v in points.items()}
    split_of = {n: ("train" if n in train else "test") for n in X.index}
    cells = {k: ev.to_dict("index") for k, ev in evals.items()}  # experiment -> column -> value, per point
    experiments = []
    for name, row in X.iterrows():
        L = load_model(str(row["model"])).num_layers
        at = {k: c[name] for k, c in cells.items()}
        experiments.append({
            "experiment": str(name), "split": split_of[name], "family": str(row["family"]), "tp": int(row["tp"]),
            "workload": str(row["workload"]), "model": str(row["model"]),
            "measured": {"ttft_ms": float(row["ttft_mean_ms"]), "tpot_ms": float(row["tpot_mean_ms"]),
                         "e2e_ms": float(row["e2e_mean_ms"])},
            "predicted": {k: {"ttft_ms": float(v["ttft"]), "tpot_ms": float(v["tpot"]), "e2e_ms": float(v["e2e"])}
                          for k, v in at.items()},
            **{f"{m}_ape": {k: float(v[f"{m}_ape"]) for k, v in at.items()} for m in ("tpot", "e2e", "ttft")},
            "overlapped_requests": {k: int(v["overlapped"]) for k, v in at.items()},
            "effective_overhead_us_per_step": optimum * L / int(row["tp"]) if param == "per_layer_us" else None,
        })
    members = {"train": train, "test": test, "all": [str(i) for i in X.index]}
    splits = {s: {f"{m}_mape": {k: float(ev.loc[names, f"{m}_ape"].mean()) for k, ev in evals.items()}
                  for m in ("tpot", "e2e", "ttft")} for s, names in members.items()}
    families = {}
    for fam in sorted(X["family"].astype(str).unique()):
        names = [str(n) for n in X.index[X["family"].astype(str) == fam]]
        families[fam] = {"experiments": names, **{f"{m}_mape": {k: float(ev.loc[names, f"{m}_ape"].mean())
                                                                  for k, ev in evals.items()}
                                                   for m in ("tpot", "e2e", "ttft")}}
    at_opt = {f"{m}_mape": {s: splits[s][f"{m}_mape"]["optimum"] for s in members} for m in ("tpot", "e2e", "ttft")}
    criteria = evaluate_criteria(spec.criteria, at_opt) if "optimum" in points else []
    worst = max(experiments, key=lambda e: e["tpot_ape"].get("optimum", 0.0))
    phase_optima = {f"{ph}_optimum_us": v for ph, v in optima.items()}
    settings = estimator.settings()
    if ctx.role == "lead":
        cal.calibration_.model_copy(update={"heldout": {
            "test_tpot_mape": splits["test"]["tpot_mape"]["optimum"],
            "test_e2e_mape": splits["test"]["e2e_mape"]["optimum"],
            "test_ttft_mape": splits["test"]["ttft_mape"]["optimum"],
            "aggregation": "mean APE over the test experiments"},
            "notes": f"study {spec.name}: the HG1 grid search on the {len(train)} train experiments"}).save(
            ctx.out_dir / "calibration.yaml")
    return {
        "study": spec.name,
        "kind": KIND,
        **phase_optima,
        "optimum_us": optimum,
        "mode": settings.replay.mode,
        "tpot_definition": settings.replay.tpot,
        "phantom_last_step": settings.replay.phantom,
        "landscape": landscape,
        "experiments": experiments,
        "splits": splits,
        "families": families,
        "criteria": criteria,
        "reproduction": (reproduction(spec.published, optima, splits)
                         if spec.published and spec.published.mode == settings.replay.mode else None),
        "verdict": "PASS" if criteria and all(c["passed"] for c in criteria) else "FAIL",
        "worst_experiment": {"experiment": worst["experiment"], "tpot_ape": worst["tpot_ape"].get("optimum")},
        "settings": {
            "study_file": ctx.study_file,
            "dataset": spec.dataset or "embedded hg1 (configs/datasets/hg1)",
            "estimator": spec.estimator,
            "settings": settings.qualified(),
            "parameter": param,
            "objective": f"train mean {spec.objective}",
            "phases": [ph.model_dump(exclude_none=True) for ph in spec.phases],
            "validation": list(points),
            "split": {"train": train, "test": test},
            "sampler": "grid: every value enqueued once as an Optuna trial (calib.calibrate.PhasedGrid)",
            "optuna_study_prefix": cal.study_name_,
            "storage": ctx.storage_label,
            "request_seed": settings.replay.seed,
            "lengths": settings.replay.lengths,
        },
    }
