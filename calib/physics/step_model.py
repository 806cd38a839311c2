"""A step model bound to one model, hardware, MFU table, TP and set of options."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from calib.physics.batch import StepBatch
from calib.physics.options import PhysicsOptions
from calib.physics.roofline import StepParts, hardware_time, step_time_us

__all__ = ["StepModel"]


@dataclass(frozen=True)
class StepModel:
    """Everything a step time depends on except the batch and the overhead.

    Examples
    --------
    >>> sm = StepModel.build("llama-2-7b-hf", tp=1)
    >>> int(sm.step_us(StepBatch.single(decode=[1000]), sm.per_layer_overhead(100.0))[0])
    8068
    """

    model: object
    hardware: object
    mfu: object
    tp: int
    options: PhysicsOptions

    @classmethod
    def build(cls, model, tp: int, *, hardware="h100", mfu=None, options: PhysicsOptions | None = None,
              **option_overrides) -> "StepModel":
        """Resolve names/paths into specs. ``option_overrides`` go to ``PhysicsOptions.for_variant``."""
        from calib.specs import load_hardware, load_mfu, load_model

        m = load_model(model) if isinstance(model, str) else model
        hw = load_hardware(hardware) if isinstance(hardware, str) else hardware
        db = mfu if mfu is not None and not isinstance(mfu, str) else load_mfu(mfu or hw.mfu_table or hw.name)
        if options is None:
            options = PhysicsOptions.for_variant(option_overrides.pop("variant", "v2.3"), **option_overrides)
        elif option_overrides:
            options = options.replace(**option_overrides)
        if isinstance(tp, bool) or int(tp) != tp or tp < 1:
            from calib.errors import ConfigError

            raise ConfigError(f"must be an integer >= 1, got {tp!r}", field="tp")
        return cls(m, hw, db, int(tp), options)

    @cached_property
    def fast(self):
        """:class:`calib.physics.fast.FastSteps` of this step model: cached step-at-a-time evaluation for replays."""
        from calib.physics.fast import FastSteps

        return FastSteps(self, plain_parts=type(self).parts is StepModel.parts)

    def __getstate__(self):  # pickles and copies leave out the (rebuildable) caches of ``fast``
        state = dict(self.__dict__)
        state.pop("fast", None)
        return state

    def per_layer_overhead(self, per_layer_us: float) -> float:
        """``per_layer_us * L / TP`` (the reference overhead rule)."""
        return per_layer_us * self.model.num_layers / self.tp

    def parts(self, batch: StepBatch) -> StepParts:
        """Hardware seconds of every step of ``batch``, with its parts."""
        if self.options.variant == "v3":
            from calib.physics.roofline_v3 import hardware_time_v3

            return hardware_time_v3(batch, model=self.model, hardware=self.hardware, tp=self.tp, options=self.options)
        if self.options.variant == "v4":
            from calib.physics.roofline_v4 import hardware_time_v4

            return hardware_time_v4(batch, model=self.model, hardware=self.hardware, tp=self.tp, options=self.options,
                                    mfu=self.mfu)
        return hardware_time(batch, model=self.model, hardware=self.hardware, mfu=self.mfu, tp=self.tp,
                             options=self.options)

    def step_us(self, batch: StepBatch, overhead_us: float | np.ndarray = 0.0, *, overlap: bool = False) -> np.ndarray:
        """Integer µs per step (hardware + overhead, rounded half away from zero; ``overlap``: their maximum,
        see :func:`calib.physics.roofline.step_time_us`)."""
        return step_time_us(self.parts(batch), overhead_us, min_step_us=self.options.min_step_us, overlap=overlap)
