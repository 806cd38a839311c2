"""Pure, vectorised step-time physics (no I/O)."""

from calib.physics.batch import StepBatch
from calib.physics.options import PhysicsOptions
from calib.physics.roofline import StepParts, hardware_time, round_half_away, step_time_us
from calib.physics.step_model import StepModel

__all__ = ["PhysicsOptions", "StepBatch", "StepModel", "StepParts", "hardware_time", "round_half_away",
           "step_time_us"]
