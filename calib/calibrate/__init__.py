"""The calibration core: search spaces, searches, the loss, ``Calibrator`` and ``SelectBest``, splitters.

>>> from calib.calibrate import Calibrator, TPE, Range
>>> Calibrator(None, space={"per_layer_us": Range(0, 500)}, search=TPE(n_trials=50)).search
TPE(n_trials=50, seeds=[0, 1, 2, 3, 4], refine=0, tolerance=0.005, options={})
"""

from calib.calibrate.calibrator import Calibrator, SelectBest, fingerprint
from calib.calibrate.objective import Objective
from calib.calibrate.search import TPE, CmaEs, Grid, PhasedGrid, Refine, Search, SearchResult, parse_search
from calib.calibrate.space import Choice, Range, make_space

__all__ = ["Calibrator", "SelectBest", "Objective", "Search", "SearchResult", "PhasedGrid", "Grid", "Refine",
           "TPE", "CmaEs", "Range", "Choice", "make_space", "parse_search", "fingerprint"]
