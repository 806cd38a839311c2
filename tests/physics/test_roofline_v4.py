"""The v4 per-kernel roofline: its physical limits, TP sharding, MoE, and the measured H100 GEMM times."""

from __future__ import annotations

import numpy as np
import pytest

from calib.errors import ConfigError
from calib.metrics import client_ms
from calib.physics import StepModel
from calib.physics.batch import StepBatch
from calib.physics.options import PhysicsOptions
from calib.physics.overhead import PerSequence, make_overhead
from calib.physics.roofline_v4 import V4Terms, gemm_shapes
from calib.specs import load_hardware, load_model

HW = load_hardware("h100")


def terms(model: str, tp: int, **opts) -> V4Terms:
    return V4Terms.build(load_model(model), HW, tp, PhysicsOptions.for_variant("v4", **opts))


def gemms_us(t: V4Terms, M: int) -> float:
    return sum(float(t.gemm_s(np.float64(M), *t.shapes[n], t.gemm_mfu[n])) for n in ("qkv", "o", "up", "down")) * 1e6


#: Measured per-layer time of the four linear ops (µs; ../shared/docs/kernel-evidence.md, Vidur's H100 profiles).
MEASURED = {("llama-2-70b-hf", 1): {1: 593, 8: 575, 64: 600, 256: 719, 1024: 2759, 4096: 10163},
            ("llama-2-7b-hf", 8): {1: 29, 8: 36, 64: 38, 256: 54, 1024: 108, 4096: 317}}


@pytest.mark.parametrize("case", list(MEASURED))
def test_default_gemm_term_tracks_measured_h100_kernels(case):
    """Within 0.55-1.05 of every measured point (v2.3 reaches 1.42, v3 0.31-1.69 on the same points)."""
    t = terms(*case)
    ratios = [gemms_us(t, M) / v for M, v in MEASURED[case].items()]
    assert 0.55 < min(ratios) and max(ratios) < 1.05, ratios


def test_decode_gemms_are_weight_bound_and_prefill_compute_bound():
    t = terms("llama-2-70b-hf", 1, kernel_floor_us=0.0)
    weights = sum(k * n for k, n in (t.shapes[g] for g in ("qkv", "o", "up", "down"))) * t.b
    assert gemms_us(t, 1) == pytest.approx(weights / t.bw * 1e6, rel=1e-3)        # bytes term
    flops = 2.0 * 4096 * weights / t.b
    assert gemms_us(t, 4096) == pytest.approx(flops / (t.peak * t.gemm_mfu["up"]) * 1e6, rel=1e-6)


def test_shapes_are_sharded_and_the_mlp_is_gated():
    s1, s4 = gemm_shapes(load_model("llama-2-70b-hf"), 1), gemm_shapes(load_model("llama-2-70b-hf"), 4)
    assert s1["up"] == (8192.0, 2 * 28672.0) and s4["up"] == (8192.0, 2 * 28672.0 / 4)
    assert s4["down"] == (28672.0 / 4, 8192.0) and s4["o"] == (8192.0 / 4, 8192.0)
    assert "router" in gemm_shapes(load_model("mixtral-8x7b-v0.1"), 2)


def test_kernel_floor_and_allreduce_add_per_layer():
    base = terms("llama-2-7b-hf", 2, kernel_floor_us=0.0, allreduce_us=0.0)
    floor = terms("llama-2-7b-hf", 2, kernel_floor_us=2.0, allreduce_us=0.0)
    ar = terms("llama-2-7b-hf", 2, kernel_floor_us=0.0, allreduce_us=7.0)
    M = np.array([1.0])
    # 4 GEMMs + 4 element-wise kernels + attention = 9 kernels per layer
    assert float(floor.fixed_s(M)[0] - base.fixed_s(M)[0]) * 1e6 == pytest.approx(9 * 2.0 * 32)
    assert float(ar.fixed_s(M)[0] - base.fixed_s(M)[0]) * 1e6 == pytest.approx(2 * 7.0 * 32)
    assert terms("llama-2-7b-hf", 1).allreduce_s == 0.0


def test_decode_attention_reads_every_requests_kv_cache():
    sm = StepModel.build("llama-2-7b-hf", 1, variant="v4")
    short = sm.parts(StepBatch.single(decode=[100] * 16)).hardware_s[0]
    long = sm.parts(StepBatch.single(decode=[4100] * 16)).hardware_s[0]
    kv = load_model("llama-2-7b-hf").kv_bytes_per_token * 16 * 4000
    assert long - short == pytest.approx(kv / (HW.bw_peak * 0.7), rel=1e-9)
    eff = StepModel.build("llama-2-7b-hf", 1, variant="v4", decode_attention_efficiency=0.35)
    assert eff.parts(StepBatch.single(decode=[4100] * 16)).hardware_s[0] > long


def test_prefill_attention_is_causal_and_uses_its_own_efficiency():
    t = terms("llama-2-7b-hf", 1)
    f, _ = t.prefill_attention_parts(0.0, 1024.0)
    assert float(f) == pytest.approx(4 * 32 * 128 * 1024 * (0 + 1025 / 2))
    slow = StepModel.build("llama-2-7b-hf", 1, variant="v4", prefill_attention_mfu=0.2)
    fast = StepModel.build("llama-2-7b-hf", 1, variant="v4", prefill_attention_mfu=0.9)
    b = StepBatch.single(prefill=[(8000, 2048)])
    assert slow.parts(b).hardware_s[0] > fast.parts(b).hardware_s[0]


def test_mixed_step_shares_one_weight_load():
    sm = StepModel.build("llama-2-70b-hf", 4, variant="v4")
    both = sm.parts(StepBatch.single(prefill=[(0, 256)], decode=[1000] * 8)).hardware_s[0]
    alone = sm.parts(StepBatch.single(prefill=[(0, 256)])).hardware_s[0] + \
        sm.parts(StepBatch.single(decode=[1000] * 8)).hardware_s[0]
    assert both < alone


def test_mixture_of_experts_loads_more_experts_with_more_tokens():
    t = terms("mixtral-8x7b-v0.1", 2)
    f = t.fixed_s(np.array([1.0, 2.0, 64.0]))
    assert f[0] < f[1] < f[2]
    assert float(f[2] / f[0]) < 8.0 / 2.0 + 0.5   # at most all 8 experts instead of 2


def test_table_source_reads_the_sharded_shape():
    sm = StepModel.build("llama-2-7b-hf", 2, variant="v4", gemm_mfu_source="table")
    t = V4Terms.build(sm.model, sm.hardware, 2, sm.options, sm.mfu)
    assert all(0 < m <= 1 for m in t.gemm_mfu.values())
    with pytest.raises(ConfigError, match="MFU table"):
        V4Terms.build(sm.model, sm.hardware, 2, sm.options)


def test_options_validate_the_v4_constants():
    with pytest.raises(ConfigError, match="gemm_mfu"):
        PhysicsOptions.for_variant("v4", gemm_mfu=1.5)
    with pytest.raises(ConfigError, match="gemm_mfu_source"):
        PhysicsOptions.for_variant("v4", gemm_mfu_source="guess")
    assert PhysicsOptions.for_variant("v4").bw_efficiency == 0.94


def test_per_sequence_overhead_and_client_terms():
    o = make_overhead("per_sequence", {"step_us_const": 300, "per_seq_us": 5})
    assert isinstance(o, PerSequence)
    feats = {"n_prefill": np.array([2, 0, 0]), "n_decode": np.array([10, 40, 0])}
    assert o.step_us(feats, 80, 4).tolist() == [360.0, 500.0, 0.0]
    assert client_ms(5.0, 1.5, [2000]).tolist() == [8.0]
