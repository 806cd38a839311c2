"""Study-file pieces shared by several kinds (no kind imports another kind; they all import this).

* :class:`SplitSpec` and :func:`resolve_split`: a fixed train/test split of the experiments;
* :class:`Phase` and :class:`GridStudyMixin`: the HG1 search settings (one parameter, grid phases) and their
  translation into the calibration core's :class:`~calib.calibrate.Range` + :class:`~calib.calibrate.PhasedGrid`;
* :func:`distribution`: summary statistics of a sample.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from calib.errors import StudyError
from calib.settings import FLAT_NAMES
from calib.studies.spec import METRICS, Criterion, GridRange, StudyBase, Strict

__all__ = ["SplitSpec", "resolve_split", "Phase", "GridStudyMixin", "distribution"]


class SplitSpec(Strict):
    """Either a column of the experiments table holding ``train``/``test``, or explicit lists."""

    column: str | None = "hg1_split"
    train: list[str] | None = None
    test: list[str] | None = None


def resolve_split(spec: SplitSpec, X: pd.DataFrame, source: str) -> tuple[list[str], list[str]]:
    """Train and test experiment names, in table order; errors name the study file and key."""
    names = [str(i) for i in X.index]
    if spec.train is not None or spec.test is not None:
        train, test = list(spec.train or []), list(spec.test or [])
        for key, lst in (("split.train", train), ("split.test", test)):
            unknown = [e for e in lst if e not in names]
            if unknown:
                raise StudyError(f"unknown experiment {unknown[0]!r}", file=source, field=key)
        if not test:
            test = [e for e in names if e not in train]
    else:
        if spec.column not in X.columns:
            raise StudyError(f"experiments table has no column {spec.column!r}", file=source, field="split.column")
        labels = X[spec.column].astype(str)
        train = [n for n, s in zip(names, labels) if s == "train"]
        test = [n for n, s in zip(names, labels) if s == "test"]
    if not train or not test:
        raise StudyError("the split leaves an empty train or test set", file=source, field="split")
    order = {n: i for i, n in enumerate(names)}
    return sorted(train, key=order.get), sorted(test, key=order.get)


class Phase(Strict):
    """One phase of a grid search: a ``grid``, or ``around`` the previous phase's optimum ± ``radius`` (clipped at
    the first grid's low end)."""

    name: str
    grid: GridRange | None = None
    around: str | None = None
    radius: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    step: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_form(self) -> "Phase":
        if (self.grid is None) == (self.around is None):
            raise ValueError("a phase needs either 'grid' or 'around' (+ 'radius', 'step')")
        if self.around is not None and (self.radius is None or self.step is None):
            raise ValueError("a phase 'around' an optimum needs 'radius' and 'step'")
        return self

    def to_phase(self):
        """The calibration core's :class:`~calib.calibrate.Grid` or :class:`~calib.calibrate.Refine`."""
        from calib.calibrate import Grid, Refine

        if self.grid is not None:
            return Grid(step=self.grid.step, low=self.grid.low, high=self.grid.high, name=self.name)
        return Refine(radius=self.radius, step=self.step, name=self.name)


class GridStudyMixin(StudyBase):
    """Fields shared by every grid-search study (the HG1 search settings)."""

    parameter: str = "per_layer_us"
    objective: str = "tpot_mape"
    phases: list[Phase] = Field(min_length=1)
    criteria: list[Criterion] = []

    @model_validator(mode="after")
    def _check_search(self):
        if self.objective not in METRICS:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(METRICS)}")
        if self.parameter not in FLAT_NAMES and self.parameter not in FLAT_NAMES.values():
            raise ValueError(f"unknown settings parameter {self.parameter!r}")
        if self.phases[0].grid is None:
            raise ValueError("the first phase needs a 'grid'")
        for prev, ph in zip(self.phases, self.phases[1:]):
            if ph.around is not None and ph.around != prev.name:
                raise ValueError(f"phase {ph.name!r} must search around the phase just before it ({prev.name!r})")
        return self

    def search_space(self) -> dict:
        """``{parameter: Range(first grid's low, high)}``."""
        from calib.calibrate import Range

        g = self.phases[0].grid
        return {self.parameter: Range(g.low, g.high)}

    def phased_grid(self):
        """The :class:`~calib.calibrate.PhasedGrid` of the phases."""
        from calib.calibrate import PhasedGrid

        return PhasedGrid([ph.to_phase() for ph in self.phases])


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Summary statistics of a sample (mean, std, min, quantiles, max)."""
    v = np.asarray(values, dtype=float)
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "p05": float(q[0]), "p25": float(q[1]), "median": float(q[2]),
            "p75": float(q[3]), "p95": float(q[4]), "max": float(v.max())}
