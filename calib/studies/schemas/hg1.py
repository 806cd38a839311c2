"""The results of an HG1 study (``results.json``), as a pydantic schema the runner checks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, model_validator

from calib.studies.results import Typed

__all__ = ["Results", "LandscapePoint", "ExperimentResult"]

_Metrics = dict[str, dict[str, float]]  # metric_mape -> validation point -> value


class LandscapePoint(Typed):
    phase: str
    overhead_us: float
    objective: float
    train_tpot_mape: float
    train_e2e_mape: float
    train_ttft_mape: float
    per_layer_us: float | None = None


class ExperimentResult(Typed):
    experiment: str
    split: Literal["train", "test"]
    family: str
    tp: int
    workload: str
    model: str
    measured: dict[str, float]
    predicted: dict[str, dict[str, float]]
    tpot_ape: dict[str, float]
    e2e_ape: dict[str, float]
    ttft_ape: dict[str, float]
    overlapped_requests: dict[str, int]
    effective_overhead_us_per_step: float | None


class Results(Typed):
    """The results of an HG1 study (``results.json``).  ``<phase>_optimum_us`` holds each phase's optimum
    (``coarse_optimum_us``, ``fine_optimum_us`` for the shipped study)."""

    model_config = ConfigDict(extra="allow")

    study: str
    kind: Literal["hg1"]
    optimum_us: float
    mode: Literal["reference", "corrected"]
    tpot_definition: Literal["itl", "guidellm"]
    phantom_last_step: bool
    landscape: list[LandscapePoint]
    experiments: list[ExperimentResult]
    splits: dict[Literal["train", "test", "all"], _Metrics]
    families: dict[str, dict[str, Any]]
    criteria: list[dict[str, Any]]
    reproduction: dict[str, Any] | None
    verdict: Literal["PASS", "FAIL"]
    worst_experiment: dict[str, Any]
    settings: dict[str, Any]

    @model_validator(mode="after")
    def _only_phase_optima_extra(self) -> "Results":
        extra = [k for k in (self.model_extra or {}) if not k.endswith("_optimum_us")]
        if extra:
            raise ValueError(f"unknown key {extra[0]!r}")
        return self
