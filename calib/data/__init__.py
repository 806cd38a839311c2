"""Measured data: experiment summaries, GuideLLM runs, loaded-server traces, request lengths.

Examples
--------
>>> from calib.data import load_experiments
>>> len(load_experiments())
13
"""

from calib.data.experiments import COLUMNS, EXPERIMENT_COLUMNS, import_hg1, load_experiments
from calib.data.guidellm import REQUEST_COLUMNS, GuidellmRun, load_guidellm_run
from calib.data.lengths import available_seeds, quantile_lengths, reference_lengths, sample_lengths
from calib.data.models import HF_TO_CALIB, MODEL_FAMILY, calib_model_name, model_family
from calib.data.traces import (
    DEFAULT_OUTPUT_RULE,
    OUTPUT_RULES,
    SHORT_FRACTION,
    TRACE_COLUMNS,
    Skipped,
    Stage,
    Trace,
    list_traces,
    load_trace,
)
from calib.data.workloads import EMBEDDED_HG1, Workload, load_workloads

__all__ = [
    "COLUMNS",
    "DEFAULT_OUTPUT_RULE",
    "EMBEDDED_HG1",
    "EXPERIMENT_COLUMNS",
    "HF_TO_CALIB",
    "MODEL_FAMILY",
    "OUTPUT_RULES",
    "REQUEST_COLUMNS",
    "SHORT_FRACTION",
    "TRACE_COLUMNS",
    "GuidellmRun",
    "Skipped",
    "Stage",
    "Trace",
    "Workload",
    "available_seeds",
    "calib_model_name",
    "import_hg1",
    "list_traces",
    "load_experiments",
    "load_guidellm_run",
    "load_trace",
    "load_workloads",
    "model_family",
    "reference_lengths",
    "sample_lengths",
    "quantile_lengths",
]
