"""The results of a ``physics`` study (``results.json``): the layout of
:mod:`calib.studies.schemas.batched_calibration`, the candidates being physics variants and switches."""

from __future__ import annotations

from typing import Literal

from calib.studies.schemas.batched_calibration import LoadedResults

__all__ = ["Results"]


class Results(LoadedResults):
    kind: Literal["physics"]
