"""Descriptions calib reads: models, hardware, MFU tables (validated, immutable)."""

from calib.specs.hardware import HardwareSpec, available_hardware, load_hardware
from calib.specs.mfu import MFUDatabase, import_bench_data, load_mfu
from calib.specs.model import ModelSpec, available_models, load_model

__all__ = [
    "HardwareSpec",
    "MFUDatabase",
    "ModelSpec",
    "available_hardware",
    "available_models",
    "import_bench_data",
    "load_hardware",
    "load_mfu",
    "load_model",
]
