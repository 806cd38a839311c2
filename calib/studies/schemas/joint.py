"""The results of a ``joint`` study (``results.json``), as a pydantic schema the runner checks.

Pieces shared with the loaded-server calibrations (candidates and their fits, flags, seed agreement, the
recommendation, the predictions of runs no fold holds) are those of :mod:`calib.studies.schemas.batched_calibration`.
Keys of its own:

``summary``, ``summary_loaded``, ``summary_sync``
    :func:`calib.calibrate.nested.summarize` of the nested result: over all held-out rows with the estimator's
    weights (each fold's synchronous and loaded means averaged; descriptive), and restricted to the dense load
    stages (mean APE over runs) and to the synchronous experiments (mean APE over experiments).
``targets``
    per target (``loaded_tpot``, ``loaded_e2e``, ``loaded_ttft``, ``sync_tpot``, ``sync_e2e``): ``measured``
    (median over search seeds of the nested held-out mean APE of the selected candidate), ``target``, ``met``.
``runs``, ``run_target``, ``runaway``
    per dense run its held-out APEs (the selected candidate, spread over seeds), whether every run stays below
    ``run_target``, and the held-out replays that ran away where the server was stable.
``evidence``
    what the report's evidence plots draw: decode step times per candidate, model and context, and per candidate
    and dense run a replay at the candidate's fit on all rows (per-request TTFT, per-stage means, TPOT by
    requests in flight).
"""

from __future__ import annotations

from typing import Any, Literal

from calib.studies.results import Typed
from calib.studies.schemas.batched_calibration import Agreement, Candidate, Dataset, Flag, Recommended, Spread

__all__ = ["Target", "RunFigure", "RunTarget", "Runaway", "SyncDataset", "JointDataset", "StepCurve",
           "ReplayEvidence", "Evidence", "Results"]

TARGET_KEYS = ("loaded_tpot", "loaded_e2e", "loaded_ttft", "sync_tpot", "sync_e2e")


class Target(Typed):
    measured: float
    target: float
    met: bool


class RunFigure(Typed):
    """One dense run's held-out APEs (mean over its stages) for the selected candidate, over seeds."""

    run: str
    model: str
    tpot: Spread
    e2e: Spread
    ttft: Spread
    below: dict[str, bool]


class RunTarget(Typed):
    target: float
    metrics: list[str]
    rule: str
    met: bool
    worst: dict[str, str]


class Runaway(Typed):
    """Held-out replays of stable stages that saturated: ``selected`` (the inner choice's) and any candidate's."""

    any_selected: bool
    any_candidate: bool
    selected: list[Flag]


class SyncDataset(Typed):
    source: str
    experiments: list[str]
    mode: str
    tpot_definition: str
    phantom_last_step: bool
    lengths: str = "reference"  # results written before the setting existed replayed the reference draws


class JointDataset(Typed):
    loaded: Dataset
    sync: SyncDataset
    models: dict[str, dict[str, list[str]]]
    groups: str


class StepCurve(Typed):
    candidate: str
    model: str
    tp: int
    context: int
    batch: list[int]
    step_ms: list[float]
    overhead_ms: list[float]


class ReplayEvidence(Typed):
    candidate: str
    run: str
    model: str
    requests: dict[str, list[Any]]
    stages: list[dict[str, Any]]
    batch_profile: list[dict[str, Any]]


class Evidence(Typed):
    contexts: list[int]
    batches: list[int]
    step_curves: list[StepCurve]
    replays: list[ReplayEvidence]
    note: str


class Results(Typed):
    study: str
    kind: Literal["joint"]
    description: str
    aggregation: dict[str, str]
    objective: dict[str, Any]
    dataset: JointDataset
    candidates: list[Candidate]
    summary: dict[str, Any]
    summary_loaded: dict[str, Any]
    summary_sync: dict[str, Any]
    nested: dict[str, Any]
    flags: list[Flag]
    agreement: list[Agreement]
    targets: dict[Literal[TARGET_KEYS], Target]
    runs: list[RunFigure]
    run_target: RunTarget
    runaway: Runaway
    recommended: Recommended
    evidence: Evidence
    ship_to: str | None
    settings: dict[str, Any]
