"""Physics options: defaults reproduce v2.3, one switch changes one thing, bad values are named."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from calib.errors import ConfigError
from calib.physics import PhysicsOptions, StepBatch, StepModel

SWITCHES = {
    "mfu_rule": "interp",
    "gemm_weight_floor": True,
    "decode_attention": "per_request",
    "prefill_attention": "actual",
    "mixed_rule": "max",
    "min_step_us": 1.0,
    "tp_fallback": "nearest",
    "bw_efficiency": 0.7,
    "gemm_mfu_scale": 1.3,
    "prefill_attention_mfu_scale": 0.8,
    "decode_attention_mfu_scale": 2.0,
    "mfu_floor": 0.05,
}


def test_default_is_v23():
    assert PhysicsOptions() == PhysicsOptions.for_variant("v2.3")
    sm = StepModel.build("llama-2-7b-hf", 1, options=PhysicsOptions())
    assert int(sm.step_us(StepBatch.single(decode=[1000]), 3200.0)[0]) == 8068
    assert int(sm.step_us(StepBatch.single(prefill=[(0, 512)]), 3200.0)[0]) == 16466


def test_neutral_values_reproduce_v23():
    """Scales of 1, a zero floor and the hardware's own efficiency leave every step unchanged."""
    batch = StepBatch.from_arrays(3, prefill_step=[1, 2], prefill_pi=[0, 300], prefill_n=[900, 40],
                                  decode_step=[0, 0, 2], decode_pi=[100, 2000, 50])
    ref = StepModel.build("qwen3-14b", 2).step_us(batch, 1000.0)
    neutral = PhysicsOptions.for_variant("v2.3", gemm_mfu_scale=1.0, prefill_attention_mfu_scale=1.0,
                                         decode_attention_mfu_scale=1.0, mfu_floor=0.0, bw_efficiency=0.82)
    assert np.array_equal(StepModel.build("qwen3-14b", 2, options=neutral).step_us(batch, 1000.0), ref)


@pytest.mark.parametrize("name,value", sorted(SWITCHES.items()))
def test_one_switch_changes_one_field(name, value):
    base = PhysicsOptions.for_variant("v2.3")
    changed = PhysicsOptions.for_variant("v2.3", **{name: value})
    diff = {k for k, v in asdict(changed).items() if asdict(base)[k] != v}
    assert diff == {name}


def test_v24_differs_from_v23_exactly_in_its_switches():
    a, b = asdict(PhysicsOptions.for_variant("v2.3")), asdict(PhysicsOptions.for_variant("v2.4"))
    assert {k for k in a if a[k] != b[k]} == {"variant", "mfu_rule", "gemm_weight_floor", "decode_attention",
                                              "prefill_attention", "mixed_rule", "min_step_us", "tp_fallback"}


@pytest.mark.parametrize("name,value", [
    ("gemm_mfu_scale", 0.0), ("decode_attention_mfu_scale", -1.0), ("prefill_attention_mfu_scale", 0),
    ("bw_efficiency", 1.01), ("bw_efficiency", 0.0), ("mfu_floor", 1.0), ("mfu_rule", "cubic"),
    ("mixed_rule", "average"), ("decode_attention", "mean"), ("gemm_weight_floor", "yes"),
    ("mfu_decode", 0.0), ("variant", "v9"),
])
def test_bad_values_name_the_parameter(name, value):
    with pytest.raises(ConfigError) as info:
        PhysicsOptions.for_variant("v2.3", **{name: value}) if name != "variant" else PhysicsOptions.for_variant(
            value)
    assert name in str(info.value)


def test_unknown_parameter_named():
    with pytest.raises(ConfigError, match="mfu_scale_gemm"):
        PhysicsOptions.for_variant("v2.3", mfu_scale_gemm=2.0)


def test_scales_move_the_right_part():
    batch = StepBatch.single(decode=[3000] * 4)
    base = StepModel.build("llama-2-7b-hf", 1).parts(batch)
    faster = StepModel.build("llama-2-7b-hf", 1, gemm_mfu_scale=2.0).parts(batch)
    assert faster.decode_compute_s[0] < base.decode_compute_s[0]
    assert faster.decode_memory_s[0] == base.decode_memory_s[0]
    slower_bw = StepModel.build("llama-2-7b-hf", 1, bw_efficiency=0.41).parts(batch)
    assert slower_bw.decode_memory_s[0] == pytest.approx(2 * base.decode_memory_s[0])
