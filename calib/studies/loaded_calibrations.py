"""Calibrations replayed on the loaded runs: where each comes from, and its per-run entries.

A study file names a calibration by its *source* (:class:`CalibrationSpec`);
:func:`resolve_calibration` turns it into a :class:`Calibration` — a
:class:`~calib.settings.Settings` with its provenance — *without looking at
the loaded runs*, and :func:`evaluate_calibration` replays every run with it.
Used by the ``batched_validation`` kind (every calibration) and the
``batched_calibration`` kind (its synchronous baseline).

Relative paths (``calibration``, ``study``) are taken from the current folder,
like every path of a study file.  Synchronous calibrations come in as
calibration files (:class:`calib.Calibration`), never by reading keys of
another study's results.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields as dc_fields
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import ConfigDict, Field, field_validator, model_validator

from calib.errors import CalibError, StudyError
from calib.physics.overhead import OVERHEAD_MODELS
from calib.replay.loaded import LoadedRun, describe_physics, replay_run, supports
from calib.settings import Settings
from calib.studies.context import RunContext
from calib.studies.loaded_data import check_physics, physics_settings, run_entry
from calib.studies.spec import GridRange, Strict

__all__ = ["CalibrationSpec", "Calibration", "resolve_calibration", "evaluate_calibration"]



def _overhead_names(model: str) -> list[str]:
    return [f.name for f in dc_fields(OVERHEAD_MODELS[model])]


class CalibrationSpec(Strict):
    """Where a calibration comes from.

    ``source``:

    * ``fixed``: ``physics`` + ``overhead_model`` and its parameters, given
      as flat keys (``per_layer_us: 100``);
    * ``file``: a calibration file (:class:`calib.Calibration`, the
      ``calibration.yaml`` a calibrating study writes) at ``calibration``;
      skipped with a note when it does not exist yet;
    * ``study``: the calibration a study recommends: ``calibration`` when that
      file exists, else the study ``study`` (a file or a shipped study's name,
      in ``mode``) is run in a scratch folder and its ``calibration.yaml`` read;
    * ``sync_grid``: grid-search ``per_layer_us`` over ``grid`` on the
      HG1 train split of the 13 synchronous experiments with the
      :class:`~calib.estimators.roofline.RooflineRegressor` settings ``estimator`` and the
      physics ``physics`` (lowest train TPOT MAPE; ties to the smaller value).

    ``request_latency_ms`` (client-side latency per request) applies to every source.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    label: str = Field(pattern=r"^[A-Za-z0-9_.@+-]+$")
    source: Literal["fixed", "file", "study", "sync_grid"] = "fixed"
    physics: dict[str, Any] = Field(default_factory=dict)
    overhead_model: str = "per_layer"
    request_latency_ms: float = Field(default=0.0, ge=0.0)
    calibration: str | None = None
    study: str | None = None
    mode: Literal["reference", "corrected"] | None = None
    estimator: dict[str, Any] = Field(default_factory=dict)
    grid: GridRange | None = None
    description: str = ""

    @field_validator("physics")
    @classmethod
    def _physics(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_physics(v)

    @model_validator(mode="after")
    def _check(self) -> "CalibrationSpec":
        if self.overhead_model not in OVERHEAD_MODELS:
            raise ValueError(f"unknown overhead model {self.overhead_model!r}; known: {', '.join(OVERHEAD_MODELS)}")
        extra = sorted(self.model_extra or {})
        if "overhead_params" in extra:
            raise ValueError("overhead_params is gone: give the overhead parameters as keys of the calibration "
                             "(e.g. per_layer_us: 100)")
        names = _overhead_names(self.overhead_model)
        bad = [k for k in extra if k not in names]
        if bad:
            raise ValueError(f"unknown key {bad[0]!r} (the parameters of overhead model {self.overhead_model!r} are "
                             f"{', '.join(names)})")
        if extra and self.source != "fixed":
            raise ValueError(f"overhead parameters ({', '.join(extra)}) only apply to source 'fixed'")
        if self.source == "fixed":
            try:
                physics_settings(self.physics, overhead_model=self.overhead_model,
                                 overhead_params=self.overhead_params).overhead_model()
            except CalibError as exc:
                raise ValueError(str(exc)) from None
        if self.source == "sync_grid" and self.grid is None:
            raise ValueError("a sync_grid calibration needs 'grid'")
        if self.source == "file" and not self.calibration:
            raise ValueError("a 'file' calibration needs 'calibration' (the path of a calibration.yaml)")
        if self.source == "study" and not (self.study or self.calibration):
            raise ValueError("a 'study' calibration needs 'study' (and optionally 'calibration')")
        return self

    @property
    def overhead_params(self) -> dict[str, Any]:
        """The overhead parameters given as keys of the calibration."""
        return dict(self.model_extra or {})


@dataclass
class Calibration:
    """A resolved calibration: its settings (``None`` when unavailable) and where they came from."""

    label: str
    settings: Settings | None
    provenance: str
    fitted_on: str
    available: bool = True
    note: str = ""
    extra: dict | None = None

    @property
    def request_latency_ms(self) -> float:
        return self.settings.replay.request_latency_ms if self.settings is not None else 0.0

    def describe(self) -> dict:
        s = self.settings
        overhead = s.overhead_model() if s is not None else None
        return {
            "label": self.label,
            "available": self.available,
            "physics": describe_physics(s.physics_options()) if s is not None else None,
            "overhead_model": overhead.name if overhead is not None else None,
            "overhead_params": overhead.params if overhead is not None else None,
            "request_latency_ms": self.request_latency_ms,
            "source": self.provenance,
            "fitted_on": self.fitted_on,
            "note": self.note,
            **({"details": self.extra} if self.extra else {}),
        }

    def summary_text(self) -> str:
        """One line: physics + overhead + provenance."""
        if not self.available:
            return f"{self.label}: unavailable ({self.note})"
        p = describe_physics(self.settings.physics_options())
        phys = ", ".join(f"{k}={v}" for k, v in p.items())
        overhead = self.settings.overhead_model()
        ovh = ", ".join(f"{k}={_fmt(v)}" for k, v in overhead.params.items())
        lat = f"; request latency {self.request_latency_ms:.4g} ms" if self.request_latency_ms else ""
        return (f"{self.label}: {phys}; {overhead.name}({ovh}){lat}; from {self.provenance}; fitted on "
                f"{self.fitted_on}")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ======================================================================================= sources


def _from_file(c: CalibrationSpec, hardware: str, path: Path, origin: str) -> Calibration:
    """A resolved calibration from a calibration file; ``physics`` of the spec override the file's."""
    from calib.calibration import Calibration as CalibrationFile

    cal = CalibrationFile.load(path)
    settings = cal.settings
    if c.physics or hardware != settings.physics.hardware:
        settings = settings.with_values({**c.physics, "hardware": hardware})
    rows = cal.data.get("rows") or []
    return Calibration(c.label, settings, origin, f"{len(rows)} rows ({', '.join(rows[:3])}{', ...' if len(rows) > 3 else ''})"
                       if rows else "see the calibration file",
                       extra={"calibration_file": str(path), "train_loss": cal.train_loss, "notes": cal.notes})


def _file(c: CalibrationSpec, hardware: str) -> Calibration:
    path = Path(c.calibration)
    if not path.is_file():
        return Calibration(c.label, None, str(path), "-", available=False,
                           note=f"{path} does not exist yet (run the study that writes it)")
    return _from_file(c, hardware, path, f"calibration file {path}")


def _study(c: CalibrationSpec, hardware: str) -> Calibration:
    if c.calibration and Path(c.calibration).is_file():
        return _from_file(c, hardware, Path(c.calibration), f"calibration file {c.calibration}")
    from calib.resources import available_studies, study_file
    from calib.studies.runner import run_study

    study = None
    if c.study:
        study = Path(c.study) if Path(c.study).is_file() or c.study not in available_studies() else study_file(c.study)
    if study is None or not study.is_file():
        raise StudyError(f"neither the calibration file {c.calibration} nor the study {c.study!r} exists",
                         field=f"calibrations.{c.label}")
    with tempfile.TemporaryDirectory() as tmp:
        run_study(study, tmp, mode=c.mode, progress=False, report=False)
        return _from_file(c, hardware, Path(tmp) / "calibration.yaml",
                          f"study {c.study} run now ({Path(c.calibration).name if c.calibration else 'no file'} "
                          "absent)")


def _sync_grid(c: CalibrationSpec, hardware: str) -> Calibration:
    from calib.data import load_experiments
    from calib.estimators.roofline import RooflineRegressor
    from calib.studies.evaluate import evaluate

    X = load_experiments()
    train = [str(i) for i, s in zip(X.index, X["hg1_split"].astype(str)) if s == "train"]
    base = RooflineRegressor(**{**c.estimator, **c.physics}).get_params()
    scores = []
    for v in c.grid.values():
        ev = evaluate(X.loc[train], {**base, "per_layer_us": v})
        scores.append((float(ev["tpot_ape"].mean()), v))
    best_score, best = min(scores)
    fitted = RooflineRegressor(**{**base, "per_layer_us": best}).settings()
    physics = {k: v for k, v in fitted.physics.model_dump().items() if k != "hardware"}
    mode = fitted.replay.mode
    return Calibration(c.label, physics_settings(physics, hardware=hardware, overhead_params={"per_layer_us": best}),
                       f"grid {c.grid.low:g}..{c.grid.high:g} step {c.grid.step:g} µs/layer on the HG1 train split "
                       f"(train TPOT MAPE {100 * best_score:.1f} %, mode {mode})",
                       f"the {len(train)} HG1 train synchronous experiments",
                       extra={"optimum_us": best, "train_tpot_mape": best_score, "mode": mode})


def resolve_calibration(c: CalibrationSpec, hardware: str = "h100", ctx: RunContext | None = None) -> Calibration:
    """Resolve a :class:`CalibrationSpec` on ``hardware`` (reads or computes the synchronous calibration)."""
    if c.source == "fixed":
        cal = Calibration(c.label, physics_settings(c.physics, hardware=hardware, overhead_model=c.overhead_model,
                                                    overhead_params=c.overhead_params),
                          c.description or "fixed in the study file", "none (fixed values)")
    elif c.source == "file":
        cal = _file(c, hardware)
    elif c.source == "study":
        cal = _study(c, hardware)
    else:
        cal = _sync_grid(c, hardware)
    if cal.settings is not None:
        cal.settings = cal.settings.with_values({"request_latency_ms": float(c.request_latency_ms)})
    return cal


# ======================================================================================= replays


def evaluate_calibration(cal: Calibration, runs: Sequence[LoadedRun], *, scatter_points: int = 200,
                         heldout: bool = True) -> list[dict]:
    """Replay every run under one calibration; one entry per run (unsupported ones without prediction)."""
    entries = []
    where = f"{cal.label}: {cal.provenance}; fitted on {cal.fitted_on}"
    for rd in runs:
        if not cal.available:
            entries.append(run_entry(rd, None, where, heldout, note=cal.note))
            continue
        ok, why = supports(rd.model, cal.settings.physics.variant)
        if not ok:
            entries.append(run_entry(rd, None, where, heldout, note=f"unsupported: {why}"))
            continue
        rep = replay_run(rd, cal.settings)
        note = ""
        if rep.hit_step_cap:
            note = f"hit the step cap ({rep.inputs.scheduler.max_steps} steps): {rep.n_unfinished} requests unfinished"
        if rd.group == "overloaded":
            note = (note + "; " if note else "") + (f"overloaded run: {rd.trace.excluded} requests failed on the real "
                                                     "server and are missing from the replayed load")
        entries.append(run_entry(rd, rep, where, heldout, scatter_points=scatter_points, note=note))
    return entries
