"""``calib step``: the time of one step, from the shell."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

from calib.errors import CalibError

__all__ = ["register", "parse_prefill", "parse_decode"]


def parse_prefill(text: str | None) -> list[tuple[int, int]]:
    """``"PI:N[,PI:N...]"`` -> ``[(PI, N), ...]``.

    >>> parse_prefill("0:512,2048:100")
    [(0, 512), (2048, 100)]
    """
    if not text:
        return []
    out = []
    for item in text.split(","):
        pi, sep, n = item.strip().partition(":")
        if not sep:
            raise CalibError(f"expected PI:N, got {item!r}", field="--prefill")
        out.append((_int(pi, "--prefill PI"), _int(n, "--prefill N")))
    return out


def parse_decode(text: str | None) -> list[int]:
    """``"PI[,PI...]"`` -> ``[PI, ...]``."""
    if not text:
        return []
    return [_int(x, "--decode PI") for x in text.split(",")]


#: Largest token count of one entry (above any model's context; the model's own limit is checked too).
MAX_TOKENS = 1_000_000_000


def _int(text: str, field: str, minimum: int = 0, maximum: int = MAX_TOKENS) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise CalibError(f"expected a whole number, got {text.strip()[:40]!r}", field=field) from None
    if value < minimum:
        raise CalibError(f"must be >= {minimum}, got {value}", field=field)
    if value > maximum:
        raise CalibError(f"must be <= {maximum}, got {value}", field=field)
    return value


def _setting(name: str, value, flag: str):
    """A command-line value checked against the range of the settings parameter ``name``."""
    from calib.settings import Settings

    try:
        return Settings.from_params({name: value}).get(name)
    except CalibError as exc:
        raise CalibError(exc.message, field=flag) from None


class _Variants(Sequence):
    """The step-model variants (:data:`calib.physics.options.VARIANTS`), looked up when argparse first needs
    them: building the parser (``calib --help``) does not import the physics (numpy, pandas)."""

    @staticmethod
    def _all() -> tuple[str, ...]:
        from calib.physics.options import VARIANTS

        return VARIANTS

    def __getitem__(self, index):
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, value) -> bool:
        return value in self._all()


#: How ``--help`` shows the variants (a test checks it names :data:`calib.physics.options.VARIANTS`); an explicit
#: metavar keeps argparse from listing the choices, and so from importing the physics, when the parser is built.
VARIANT_METAVAR = "{v2.3,v2.4,v3,v4}"


def register(subparsers) -> None:
    p = subparsers.add_parser("step", help="time of one step (prefill and/or decode entries)",
                              description="Evaluate the roofline step-time model for one batch.")
    p.add_argument("--model", required=True, help="shipped model name (e.g. llama-2-7b-hf) or path to config.json")
    p.add_argument("--tp", default="1", help="tensor-parallel degree (default 1); must divide the attention heads")
    p.add_argument("--prefill", help="prefill entries PI:N[,PI:N...] (progress index : new tokens)")
    p.add_argument("--decode", help="decode entries PI[,PI...] (KV length before the token)")
    p.add_argument("--hardware", default="h100", help="hardware name in configs/hardware or a YAML path")
    p.add_argument("--variant", default="v2.3", choices=_Variants(), metavar=VARIANT_METAVAR,
                   help="step model form (default v2.3)")
    p.add_argument("--mfu", choices=("nearest", "interp"), help="MFU lookup rule (default: the variant's)")
    p.add_argument("--bw-efficiency", type=float, help="bandwidth efficiency (default: the hardware's)")
    p.add_argument("--overhead-us", type=float, default=0.0, help="perLayerOverhead, µs per layer (x L / TP)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calib.physics import PhysicsOptions, StepBatch, StepModel
    from calib.specs import load_model

    prefill, decode = parse_prefill(args.prefill), parse_decode(args.decode)
    if not prefill and not decode:
        raise CalibError("give at least one --prefill or --decode entry", field="batch")
    tp = _int(str(args.tp), "--tp", minimum=1, maximum=1_000_000)
    per_layer_us = _setting("per_layer_us", args.overhead_us, "--overhead-us")
    if args.bw_efficiency is not None:
        _setting("bw_efficiency", args.bw_efficiency, "--bw-efficiency")
    model = load_model(args.model)
    model.check_tp(tp, field="--tp")
    for pi, n in prefill:
        model.check_context(pi + n, field="--prefill")
    for pi in decode:
        model.check_context(pi + 1, field="--decode")
    options = PhysicsOptions.for_variant(args.variant, mfu_rule=args.mfu, bw_efficiency=args.bw_efficiency)
    sm = StepModel.build(model, tp, hardware=args.hardware, options=options)
    batch = StepBatch.single(prefill, decode)
    parts = sm.parts(batch)
    overhead = sm.per_layer_overhead(per_layer_us)
    step = int(sm.step_us(batch, overhead)[0])
    us = lambda a: round(float(a[0]) * 1e6, 3)  # noqa: E731
    result = {
        "step_us": step,
        "hardware_us": us(parts.hardware_s),
        "overhead_us": round(overhead, 3),
        "prefill_compute_us": us(parts.prefill_compute_s),
        "prefill_memory_us": us(parts.prefill_memory_s),
        "decode_compute_us": us(parts.decode_compute_s),
        "decode_memory_us": us(parts.decode_memory_s),
        "model": sm.model.name,
        "tp": sm.tp,
        "hardware": sm.hardware.name,
        "variant": options.variant,
        "mfu_rule": options.mfu_rule,
        "bw_efficiency": options.bw_efficiency if options.bw_efficiency is not None else sm.hardware.bw_efficiency,
        "prefill": [list(e) for e in prefill],
        "decode": decode,
    }
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad or not 0 <= step < 2**53:
        raise CalibError(f"the step model gives no finite time for this batch ({', '.join(bad) or 'step_us'})",
                         field="batch")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{sm.model.name}  TP={sm.tp}  {sm.hardware.name}  {options.variant}  MFU {options.mfu_rule}")
    rows = [("prefill compute", result["prefill_compute_us"]), ("prefill memory", result["prefill_memory_us"]),
            ("decode compute", result["decode_compute_us"]), ("decode memory", result["decode_memory_us"]),
            ("hardware", result["hardware_us"]), ("overhead", result["overhead_us"])]
    for name, value in rows:
        print(f"  {name:<16}{value:>14,.1f} µs")
    print(f"  {'step':<16}{step:>14,d} µs")
    return 0
