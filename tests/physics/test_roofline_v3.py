"""The v3 roofline (roofline-spec.md §5.3) against §7.4 and hand-computed cases."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.errors import ConfigError
from calib.physics import PhysicsOptions, StepBatch, StepModel
from calib.physics.roofline_v3 import (effective_experts, flops_v3, hardware_time_v3, moe_layer_counts,
                                       weight_bytes_v3)
from calib.specs import load_model
from calib.specs.hardware import HardwareSpec
from calib.specs.model import ModelSpec

V3 = PhysicsOptions.for_variant("v3")
# 1 TFLOP/s dense, 2 TFLOP/s FP8, 1 TB/s: seconds are FLOPs/1e12 and bytes/1e12
HW = HardwareSpec(name="toy", tflops_peak=1.0, bw_peak_tbs=1.0, bw_efficiency=0.5, tflops_fp8=2.0)
TINY = ModelSpec(name="tiny", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 dtype_bytes=2, dense_intermediate_size=128)
# L=2, d=64, nH=4, nKV=2, dh=16, dkv=32, dff=128, b=2
TINY_W = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 2 * 64 * 128) * 2   # 2-matrix MLP weights, bytes
TINY_KTOK = 2 * 2 * 2 * 16 * 2                                     # 2 L nKV dh b
TINY_ACT = 2 * 64 * 2                                              # L d b per token


def tiny_flops(pi, n, mlp_width=128, L=2):
    """v1 GEMM-class + vector FLOPs with a 2-matrix MLP, by hand."""
    d, nH, dh, dkv = 64, 4, 16, 32
    c = pi if n == 1 else pi + (n - 1) / 2
    gemm = 2 * n * (d * d + 2 * d * dkv) + 2 * n * d * d + 4 * nH * n * c * dh + 2 * n * 2 * d * mlp_width
    vector = 5 * nH * n * c + 2 * n * d
    return L * (gemm + vector)


def run(batch, model=TINY, hardware=HW, tp=1, options=V3):
    return hardware_time_v3(batch, model=model, hardware=hardware, tp=tp, options=options)


def us(arr):
    return float(arr[0]) * 1e6


# ---- spec §7.4 -----------------------------------------------------------------

@pytest.fixture(scope="module")
def sm_v3():
    return StepModel.build("llama-2-7b-hf", 1, variant="v3")


def test_spec_7_4_decode(sm_v3):
    batch = StepBatch.single(decode=[1000])
    parts = sm_v3.parts(batch)
    assert us(parts.decode_memory_s) == pytest.approx(3161.6, abs=0.05)
    assert us(parts.decode_compute_s) < us(parts.decode_memory_s)
    assert int(sm_v3.step_us(batch, 0.0)[0]) == 3162


def test_spec_7_4_prefill(sm_v3):
    batch = StepBatch.single(prefill=[(0, 512)])
    parts = sm_v3.parts(batch)
    assert us(parts.prefill_compute_s) == pytest.approx(11730.6, abs=0.05)
    assert us(parts.prefill_compute_s) > us(parts.prefill_memory_s)
    assert int(sm_v3.step_us(batch, 0.0)[0]) == 11731


def test_spec_7_4_weights_use_two_matrix_mlp(llama7b):
    # W2 = 32 * 2 * (4096*(4096+8192) + 4096^2 + 2*4096*11008)
    assert weight_bytes_v3(llama7b, [1])[0] == 10_066_329_600


def test_v3_ignores_hardware_bw_efficiency(llama7b, h100):
    """The H100 file says 0.82 (a v2 default); v3 uses raw peak unless options set it."""
    assert h100.bw_efficiency == 0.82
    batch = StepBatch.single(decode=[1000])
    raw = hardware_time_v3(batch, model=llama7b, hardware=h100, tp=1, options=PhysicsOptions(variant="v3"))
    assert us(raw.hardware_s) == pytest.approx(3161.6, abs=0.05)
    slow = hardware_time_v3(batch, model=llama7b, hardware=h100, tp=1, options=V3.replace(bw_efficiency=0.5))
    assert slow.decode_memory_s[0] == pytest.approx(2 * raw.decode_memory_s[0], rel=1e-12)


# ---- hand-computed dense cases -------------------------------------------------

def test_tiny_decode_by_hand():
    # per layer: 2(64^2 + 2*64*32) + 2*64^2 + 4*4*10*16 + 2*2*64*128 = 16384 + 8192 + 2560 + 32768 = 59904
    # vector per layer: 5*4*10 + 2*64 = 328; total 2 * (59904 + 328) = 120464
    assert tiny_flops(10, 1) == 120464
    assert TINY_W == 114688 and TINY_KTOK == 256 and TINY_ACT == 256
    parts = run(StepBatch.single(decode=[10]))
    assert parts.decode_compute_s[0] == pytest.approx(120464 / (1e12 * 0.30), rel=1e-12)
    dyn = 256 * 1 + 256 * 10 + 256 * 1  # KV write + KV read + activations = 3072
    assert parts.decode_memory_s[0] == pytest.approx((114688 + dyn) / 1e12, rel=1e-12)
    # on the toy 1 TFLOP/s part this step is compute-bound: 4.015e-7 s > 1.178e-7 s
    assert parts.hardware_s[0] == pytest.approx(max(120464 / 0.30, 114688 + 3072) / 1e12, rel=1e-12)
    assert parts.hardware_s[0] == parts.decode_compute_s[0] == parts.decode_s[0]
    # on a 1000x faster compute part it is memory-bound
    fast = run(StepBatch.single(decode=[10]), hardware=replace(HW, tflops_peak=1000.0))
    assert fast.hardware_s[0] == pytest.approx((114688 + 3072) / 1e12, rel=1e-12)
    assert fast.hardware_s[0] == fast.decode_memory_s[0] > fast.decode_compute_s[0]
    assert parts.prefill_compute_s[0] == 0 and parts.prefill_memory_s[0] == 0 and parts.prefill_s[0] == 0


def test_tiny_prefill_by_hand():
    pi, n = 5, 8  # c = 5 + 7/2 = 8.5
    expected_flops = 2 * (2 * 8 * (4096 + 4096) + 2 * 8 * 4096 + 4 * 4 * 8 * 8.5 * 16 + 2 * 8 * 2 * 64 * 128
                          + 5 * 4 * 8 * 8.5 + 2 * 8 * 64)
    assert tiny_flops(pi, n) == expected_flops
    assert flops_v3(TINY, [pi], [n])[0] == pytest.approx(expected_flops, rel=1e-15)
    parts = run(StepBatch.single(prefill=[(pi, n)]))
    compute = expected_flops / (1e12 * 0.45)
    memory = (TINY_W + TINY_KTOK * n + TINY_KTOK * pi + TINY_ACT * n) / 1e12
    assert parts.prefill_compute_s[0] == pytest.approx(compute, rel=1e-12)
    assert parts.prefill_memory_s[0] == pytest.approx(memory, rel=1e-12)
    assert parts.hardware_s[0] == pytest.approx(max(compute, memory), rel=1e-12)


def test_one_token_prefill_uses_context_pi_but_prefill_mfu():
    """c keys on n == 1 (not on phase), while the MFU keys on the phase."""
    parts = run(StepBatch.single(prefill=[(7, 1)]))
    assert parts.prefill_compute_s[0] == pytest.approx(tiny_flops(7, 1) / (1e12 * 0.45), rel=1e-12)


def test_mixed_step_single_crossover_and_one_weight_load():
    pre, dec = [(0, 16), (32, 4)], [10, 100, 1000]
    parts = run(StepBatch.single(pre, dec))
    compute = (sum(tiny_flops(p, n) for p, n in pre) / 0.45 + sum(tiny_flops(c, 1) for c in dec) / 0.30) / 1e12
    dyn = sum(TINY_KTOK * n + TINY_KTOK * p + TINY_ACT * n for p, n in pre) + sum(
        TINY_KTOK + TINY_KTOK * c + TINY_ACT for c in dec)
    memory = (TINY_W + dyn) / 1e12  # weights once, not once per phase
    assert parts.hardware_s[0] == pytest.approx(max(compute, memory), rel=1e-12)
    # the phase parts decompose the totals
    assert parts.prefill_compute_s[0] + parts.decode_compute_s[0] == pytest.approx(compute, rel=1e-12)
    assert parts.prefill_memory_s[0] + parts.decode_memory_s[0] == pytest.approx(memory, rel=1e-12)
    # weights split by new tokens: 20 prefill, 3 decode
    p_dyn = sum(TINY_KTOK * n + TINY_KTOK * p + TINY_ACT * n for p, n in pre)
    assert parts.prefill_memory_s[0] == pytest.approx((TINY_W * 20 / 23 + p_dyn) / 1e12, rel=1e-12)
    # the two phases run apart load the weights twice: exactly one W more
    a, b = run(StepBatch.single(pre)), run(StepBatch.single(decode=dec))
    apart = a.prefill_memory_s[0] + b.decode_memory_s[0]
    assert apart - memory == pytest.approx(TINY_W / 1e12, rel=1e-9)


def test_empty_steps_are_zero():
    batch = StepBatch.from_arrays(3, decode_step=[1], decode_pi=[5])
    parts = run(batch)
    assert parts.non_empty.tolist() == [False, True, False]
    assert parts.hardware_s[0] == 0 and parts.hardware_s[2] == 0 and parts.hardware_s[1] > 0
    assert run(StepBatch.from_arrays(0)).hardware_s.shape == (0,)


@pytest.mark.parametrize("tp", [0, -1, 1.5, True])
def test_bad_tp(tp):
    with pytest.raises(ConfigError):
        run(StepBatch.single(decode=[1]), tp=tp)


# ---- MoE -------------------------------------------------------------------------

MOE = replace(TINY, name="tiny-moe", num_experts=8, experts_per_token=2, moe_intermediate_size=32)


def test_effective_experts_by_hand():
    assert effective_experts(MOE, [1])[0] == pytest.approx(2.0, rel=1e-15)
    assert effective_experts(MOE, [3])[0] == pytest.approx(8 * (1 - (6 / 8) ** 3), rel=1e-15)  # 4.625
    assert effective_experts(MOE, [3])[0] == pytest.approx(4.625, rel=1e-15)
    assert effective_experts(MOE, [0])[0] == 0
    assert effective_experts(MOE, [10_000])[0] == pytest.approx(8.0)
    assert effective_experts(replace(MOE, experts_per_token=8), [1, 5]).tolist() == [8.0, 8.0]
    assert effective_experts(TINY, [1, 5]).tolist() == [0.0, 0.0]


def test_moe_weights_and_flops_by_hand():
    attn = 2 * (64 * (64 + 2 * 32) + 64 * 64)  # params over 2 layers
    for B in (1, 3):
        n_eff = 8 * (1 - (6 / 8) ** B)
        expected = (attn + 2 * 2 * 64 * 32 * n_eff) * 2
        assert weight_bytes_v3(MOE, [B])[0] == pytest.approx(expected, rel=1e-15)
    # FLOPs: the MoE MLP is k experts of width 32 -> same as a dense MLP of width 64
    assert flops_v3(MOE, [10], [1])[0] == pytest.approx(tiny_flops(10, 1, mlp_width=2 * 32), rel=1e-15)


def test_moe_step_uses_total_new_tokens():
    """B = prefill tokens + decode count of the whole step."""
    parts = run(StepBatch.single([(0, 2)], [10]), model=MOE)  # B = 3
    n_eff = 8 * (1 - (6 / 8) ** 3)
    W = (2 * (64 * 128 + 64 * 64) + 2 * 2 * 64 * 32 * n_eff) * 2
    dyn = TINY_KTOK * 2 + TINY_ACT * 2 + TINY_KTOK + TINY_KTOK * 10 + TINY_ACT
    memory = (W + dyn) / 1e12
    assert parts.prefill_memory_s[0] + parts.decode_memory_s[0] == pytest.approx(memory, rel=1e-12)


def test_shared_experts_always_loaded():
    shared = replace(MOE, shared_expert_intermediate_size=48)
    for B in (1, 3, 50):
        extra = 2 * 2 * 64 * 48 * 2  # 2 MoE layers * 2 matrices * d * 48, bytes at b = 2
        assert weight_bytes_v3(shared, [B])[0] - weight_bytes_v3(MOE, [B])[0] == pytest.approx(extra, rel=1e-12)
    extra_flops = 2 * 2 * 1 * 2 * 64 * 48  # L * 2n * 2 d * width, n = 1
    assert flops_v3(shared, [10], [1])[0] - flops_v3(MOE, [10], [1])[0] == pytest.approx(extra_flops, rel=1e-12)


def test_interleaved_moe_layer_count():
    inter = replace(MOE, num_layers=7, moe_layer_step=2, dense_intermediate_size=256)
    assert moe_layer_counts(inter) == (7 // 3, 5)  # L // (s + 1) MoE layers
    assert moe_layer_counts(replace(inter, moe_layer_step=1)) == (7, 0)
    assert moe_layer_counts(replace(inter, moe_layer_step=0)) == (7, 0)
    assert moe_layer_counts(TINY) == (0, 2)
    # weights: attention on all 7 layers, 5 dense MLPs of width 256, 2 MoE layers of n_eff experts of width 32
    B = 3
    n_eff = 8 * (1 - (6 / 8) ** B)
    expected = (7 * (64 * 128 + 64 * 64) + 5 * 2 * 64 * 256 + 2 * 2 * 64 * 32 * n_eff) * 2
    assert weight_bytes_v3(inter, [B])[0] == pytest.approx(expected, rel=1e-15)
    # FLOPs for n = 1: attention/vector on 7 layers + MLPs 5 * (2*2*64*256) + 2 * 2 * (2*2*64*32)
    d, c = 64, 10
    per_layer = 2 * (d * d + 2 * d * 32) + 2 * d * d + 4 * 4 * c * 16 + 5 * 4 * c + 2 * d
    expected_f = 7 * per_layer + 5 * 2 * 2 * d * 256 + 2 * 2 * (2 * 2 * d * 32)
    assert flops_v3(inter, [c], [1])[0] == pytest.approx(expected_f, rel=1e-15)


def test_mixtral_decode_memory_bound_and_weight_factor(h100):
    mix = load_model("mixtral-8x7b-v0.1")
    assert (mix.num_experts, mix.experts_per_token, mix.moe_intermediate_size) == (8, 2, 14336)
    ctx = 1000
    one = hardware_time_v3(StepBatch.single(decode=[ctx]), model=mix, hardware=h100, tp=1, options=V3)
    many = hardware_time_v3(StepBatch.single(decode=[ctx] * 32), model=mix, hardware=h100, tp=1, options=V3)
    for parts in (one, many):
        assert parts.decode_memory_s[0] > parts.decode_compute_s[0]
        assert parts.hardware_s[0] == parts.decode_memory_s[0]
    assert many.hardware_s[0] > one.hardware_s[0]
    # the growth is the extra experts loaded (2 -> 8(1 - 0.75^32)) plus 31 more requests' KV/activations
    bw = 3.35e12
    expert_bytes = 32 * 2 * 4096 * 14336 * 2  # all layers, one expert, 2 matrices, bf16
    n1, n32 = 2.0, 8 * (1 - 0.75 ** 32)
    dyn_one = mix.kv_bytes_per_token * (1 + ctx) + 32 * 4096 * 2
    expected_gap = (expert_bytes * (n32 - n1) + 31 * dyn_one) / bw
    assert many.hardware_s[0] - one.hardware_s[0] == pytest.approx(expected_gap, rel=1e-9)
    # weights at batch 1 hold 2 of the 8 experts: far below a dense 8-expert count
    attn = 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096) * 2
    assert weight_bytes_v3(mix, [1])[0] == pytest.approx(attn + 2 * expert_bytes, rel=1e-15)
    assert weight_bytes_v3(mix, [32])[0] / weight_bytes_v3(mix, [1])[0] == pytest.approx(
        (attn + n32 * expert_bytes) / (attn + 2 * expert_bytes), rel=1e-12)


# ---- FP8, TP, vectorisation -----------------------------------------------------

def test_fp8_peak_for_one_byte_weights():
    fp8 = replace(TINY, dtype_bytes=1)
    batch = StepBatch.single(prefill=[(0, 64)])
    on = run(batch, model=fp8)
    off = run(batch, model=fp8, hardware=replace(HW, tflops_fp8=0.0))
    assert on.prefill_compute_s[0] == pytest.approx(tiny_flops(0, 64) / (2e12 * 0.45), rel=1e-12)
    assert off.prefill_compute_s[0] == pytest.approx(2 * on.prefill_compute_s[0], rel=1e-12)
    assert on.prefill_memory_s[0] == off.prefill_memory_s[0]
    # 2-byte weights never take the FP8 peak
    assert run(batch).prefill_compute_s[0] == pytest.approx(off.prefill_compute_s[0], rel=1e-12)


contexts = st.integers(0, 4000)
chunks = st.integers(1, 2048)


@settings(max_examples=40, deadline=None)
@given(ctx=st.lists(contexts, min_size=0, max_size=6), pre=st.lists(st.tuples(contexts, chunks), max_size=3),
       tp=st.sampled_from([2, 4, 8]), name=st.sampled_from(["llama-2-7b-hf", "mixtral-8x7b-v0.1"]))
def test_time_scales_as_one_over_tp(h100, ctx, pre, tp, name):
    if not ctx and not pre:
        ctx = [1]
    model = load_model(name)
    batch = StepBatch.single(pre, ctx)
    one = hardware_time_v3(batch, model=model, hardware=h100, tp=1, options=V3)
    many = hardware_time_v3(batch, model=model, hardware=h100, tp=tp, options=V3)
    for field in ("prefill_compute_s", "prefill_memory_s", "decode_compute_s", "decode_memory_s", "hardware_s"):
        np.testing.assert_allclose(getattr(many, field) * tp, getattr(one, field), rtol=1e-12)


@pytest.mark.parametrize("name", ["llama-2-7b-hf", "mixtral-8x7b-v0.1"])
def test_vectorised_equals_one_by_one(h100, name):
    model = load_model(name)
    rng = np.random.default_rng(7)
    n_steps = 40
    pre_step, pre_pi, pre_n, dec_step, dec_pi = [], [], [], [], []
    for i in range(n_steps):
        if i % 7 == 3:
            continue  # leave some steps empty
        for _ in range(rng.integers(0, 3)):
            pre_step.append(i), pre_pi.append(int(rng.integers(0, 3000))), pre_n.append(int(rng.integers(1, 1500)))
        for _ in range(rng.integers(0, 20)):
            dec_step.append(i), dec_pi.append(int(rng.integers(1, 5000)))
    batch = StepBatch.from_arrays(n_steps, prefill_step=pre_step, prefill_pi=pre_pi, prefill_n=pre_n,
                                  decode_step=dec_step, decode_pi=dec_pi)
    for tp in (1, 2):
        sm = StepModel.build(model, tp, variant="v3")
        all_parts = sm.parts(batch)
        all_us = sm.step_us(batch, 0.0)
        for i in range(n_steps):
            pre = [(p, n) for s, p, n in zip(pre_step, pre_pi, pre_n) if s == i]
            dec = [p for s, p in zip(dec_step, dec_pi) if s == i]
            one = sm.parts(StepBatch.single(pre, dec))
            for field in ("prefill_compute_s", "prefill_memory_s", "decode_compute_s", "decode_memory_s",
                          "prefill_s", "decode_s", "hardware_s"):
                assert getattr(all_parts, field)[i] == pytest.approx(getattr(one, field)[0], rel=1e-12, abs=0)
            assert bool(all_parts.non_empty[i]) == bool(pre or dec)
            assert int(all_us[i]) == int(sm.step_us(StepBatch.single(pre, dec), 0.0)[0])


@settings(max_examples=40, deadline=None)
@given(ctx=st.lists(contexts, min_size=1, max_size=6), pre=st.lists(st.tuples(contexts, chunks), max_size=4),
       seed=st.integers(0, 2**31 - 1))
def test_order_of_entries_does_not_matter(ctx, pre, seed):
    sm = StepModel.build("mixtral-8x7b-v0.1", 2, variant="v3")
    rng = np.random.default_rng(seed)
    a = sm.step_us(StepBatch.single(pre, ctx), 0.0)[0]
    b = sm.step_us(StepBatch.single([pre[i] for i in rng.permutation(len(pre))],
                                    [ctx[i] for i in rng.permutation(len(ctx))]), 0.0)[0]
    assert a == b


def test_overhead_is_added_by_the_caller(sm_v3):
    batch = StepBatch.solo_decode([100, 1000, 3000])
    base = sm_v3.step_us(batch, 0.0)
    assert (sm_v3.step_us(batch, 250.0) - base).tolist() == [250, 250, 250]
