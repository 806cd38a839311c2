"""Draw docs/figures/gemm-kernels.png: calib's per-layer GEMM time (v2.3, v3, v4) against measured H100 kernels.

The measured times are Vidur's H100 profiles of one transformer block (``data/kernels/h100-mlp`` of the
shared measurement folder; not shipped with calib).  Run from the repository root::

    python docs/figures/kernel_evidence.py [--data ../shared/data] [--out docs/figures/gemm-kernels.png]

The sum of the four linear operators (fused QKV, output projection, fused gate+up, down) per layer is
compared with each variant's time for the same GEMMs at the same TP shard (no overheads).
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np

OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
CASES = (("Llama-2-7b-hf", "llama-2-7b-hf", 1), ("Llama-2-7b-hf", "llama-2-7b-hf", 8),
         ("Llama-2-70b-hf", "llama-2-70b-hf", 1), ("Llama-2-70b-hf", "llama-2-70b-hf", 4))


def measured(data: Path, name: str, tp: int) -> tuple[np.ndarray, np.ndarray]:
    """Token counts and median per-layer µs of the four linear ops (first row of a repeated count)."""
    seen: dict[int, float] = {}
    with open(data / "kernels" / "h100-mlp" / f"{name}.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if int(row["num_tensor_parallel_workers"]) != tp:
                continue
            tokens = int(row["num_tokens"])
            if tokens not in seen:
                seen[tokens] = sum(float(row[f"time_stats.{op}.median"]) for op in OPS) * 1e3
    tokens = np.array(sorted(seen))
    return tokens, np.array([seen[t] for t in tokens])


def predicted(model: str, tp: int, variant: str, tokens: np.ndarray) -> np.ndarray:
    """Per-layer µs of the four GEMMs of ``variant`` at these token counts."""
    from calib.physics import StepModel
    from calib.physics.roofline import _gemm_time
    from calib.physics.roofline_v3 import flops_v3, peak_flops_v3, weight_bytes_v3
    from calib.physics.roofline_v4 import V4Terms

    sm = StepModel.build(model, tp, variant=variant)
    m, hw, o, M = sm.model, sm.hardware, sm.options, tokens.astype(np.float64)
    if variant == "v4":
        t = V4Terms.build(m, hw, tp, o, sm.mfu)
        return sum(t.gemm_s(M, *t.shapes[g], t.gemm_mfu[g]) for g in ("qkv", "o", "up", "down")) * 1e6
    if variant == "v3":  # GEMM part of the v3 crossover: linear FLOPs vs weights (no attention, no KV)
        attn_free = flops_v3(m, np.zeros_like(M), M) - m.num_layers * 2.0 * M * m.hidden_size
        compute = attn_free / (peak_flops_v3(m, hw) * o.mfu_prefill) / tp
        memory = weight_bytes_v3(m, M) / (hw.bw_peak * (o.bw_efficiency or 1.0)) / tp
        return np.maximum(compute, memory) / m.num_layers * 1e6
    # v2: the step's max(compute, memory) restricted to the GEMMs: table-MFU compute vs the layer's weight load
    bw = hw.bw_peak * (o.bw_efficiency if o.bw_efficiency is not None else hw.bw_efficiency)
    weights = m.weight_params_per_layer * m.dtype_bytes / tp / bw
    return np.maximum(_gemm_time(M, m, sm.mfu, o, hw.flops_peak, bw, 1.0 / tp) / m.num_layers, weights) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CALIB_DATA", "../shared/data"))
    ap.add_argument("--out", default="docs/figures/gemm-kernels.png")
    args = ap.parse_args()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, (csv_name, model, tp) in zip(axes, CASES):
        tokens, meas = measured(Path(args.data), csv_name, tp)
        for variant, style in (("v2.3", "C1-"), ("v3", "C2-"), ("v4", "C0-")):
            ratio = predicted(model, tp, variant, tokens) / meas
            ax.plot(tokens, ratio, style, lw=1.2, label=f"{variant} (median ratio {np.median(ratio):.2f})")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 2.6)
        ax.set_title(f"{model} TP{tp}: per-layer GEMM time, predicted / measured", fontsize=9)
        ax.set_xlabel("tokens in the step (GEMM rows M)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
