"""The results of a ``batched_calibration`` study (``results.json``), as a pydantic schema the runner checks.

The ``physics`` kind has the same layout (:mod:`calib.studies.schemas.physics`).  Keys:

``candidates``
    per candidate: what it fixes and searches, and ``fit``: every seed of its search on all the dense search rows
    (train loss, ``converged``, per seed the best-so-far curve and the predictions of the runs no fold holds).
``summary``, ``nested``
    :func:`calib.calibrate.nested.summarize` and ``NestedResult.to_dict()``: the held-out figures per (outer fold,
    seed, candidate) and of the inner choice per (fold, seed).
``flags``, ``agreement``
    held-out stages whose replay saturated (``runaway``: the measured stage was stable), and per (fold, candidate)
    whether the seeds agreed on the train loss.
``recommended``
    SelectBest on all dense runs, per seed, and the calibration written to ``calibration.yaml``.
"""

from __future__ import annotations

from typing import Any, Literal

from calib.studies.results import Typed

__all__ = ["Spread", "RowPrediction", "SeedFit", "CandidateFit", "Candidate", "Flag", "Agreement", "Dataset",
           "Recommended", "LoadedResults", "Results"]


class Spread(Typed):
    """A figure over seeds: median, min, max and the number of seeds."""

    median: float
    min: float
    max: float
    n: int


class RowPrediction(Typed):
    """One load stage predicted by a fit that never saw it (``predicted`` None: unsupported, see ``note``)."""

    row: str
    run: str
    model: str
    group: Literal["dense", "moe", "overloaded"]
    stage: int
    rate: float
    supported: bool
    note: str
    measured: dict[str, float]
    predicted: dict[str, float] | None
    ape: dict[str, float] | None
    saturated: bool | None
    runaway: bool | None


class SeedFit(Typed):
    seed: int
    best_loss: float
    params: dict[str, Any]
    curve: list[float]
    other_runs: list[RowPrediction]


class CandidateFit(Typed):
    """Every seed of the candidate's search on all dense search rows."""

    params: dict[str, Any]
    train_loss: float
    converged: bool | None
    study: str
    seeds: list[SeedFit]
    other_runs: dict[str, dict[str, Spread]]


class Candidate(Typed):
    name: str
    description: str
    variant: str
    physics: dict[str, Any]
    overhead_model: str
    cpu_overlap: bool = False
    space: dict[str, Any]
    n_params: int
    n_trials: int
    search: dict[str, Any]
    study_prefix: str
    fit: CandidateFit


class Flag(Typed):
    fold: int
    seed: int
    candidate: str
    row: str
    run: str
    runaway: bool


class Agreement(Typed):
    fold: int
    test_groups: list[str]
    candidate: str
    train_loss: Spread
    converged: bool | None


class Dataset(Typed):
    data_dir: str
    dense_runs: list[str]
    other_runs: dict[str, list[str]]
    models: list[str]
    window_s: float | None
    search_rows: int
    heldout_rows: int
    skipped: list[dict[str, Any]]
    output_rule: dict[str, str]
    other_runs_rule: str


class Recommended(Typed):
    candidate: str
    seed: int
    votes: dict[str, int]
    mean_inner_score: dict[str, float]
    inner_cv: list[str]
    params: dict[str, Any]
    train_loss: float
    per_seed: list[dict[str, Any]]
    heldout: dict[str, Any]
    settings: dict[str, Any]
    other_runs: list[RowPrediction]
    other_figures: dict[str, dict[str, float]]


class LoadedResults(Typed):
    """What a nested calibration on the loaded runs reports (both calibrating kinds)."""

    study: str
    kind: str
    description: str
    aggregation: str
    objective: dict[str, Any]
    dataset: Dataset
    candidates: list[Candidate]
    summary: dict[str, Any]
    nested: dict[str, Any]
    flags: list[Flag]
    agreement: list[Agreement]
    recommended: Recommended
    settings: dict[str, Any]


class Results(LoadedResults):
    kind: Literal["batched_calibration"]
