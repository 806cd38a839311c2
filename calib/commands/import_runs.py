"""``calib import FORMAT PATH... --out DIR``: users' benchmark outputs -> calib run folders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register", "server_flags", "positive_int"]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def server_flags(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """The server flags shared by ``import`` and ``capacity`` (defaults: :data:`calib.data.runs.SERVER_DEFAULTS`)."""
    p.add_argument("--model", required=required,
                   help="shipped model name (e.g. llama-2-7b-hf) or path to a Hugging Face config.json")
    p.add_argument("--tp", type=positive_int, required=required, help="tensor-parallel degree")
    p.add_argument("--max-num-batched-tokens", type=positive_int, metavar="N",
                   help="vLLM max_num_batched_tokens (default 8192: vLLM V1 `vllm serve` on an H100)")
    p.add_argument("--max-num-seqs", type=positive_int, metavar="N",
                   help="vLLM max_num_seqs (default 1024: vLLM V1 `vllm serve` on an H100)")
    p.add_argument("--kv-blocks", type=positive_int, metavar="N",
                   help="GPU KV-cache blocks (default: estimated as (0.9 x GPU memory - weights/TP - 1.5 GiB) / "
                        "block bytes per GPU; vLLM logs the real number as 'GPU KV cache size' / num_gpu_blocks)")
    p.add_argument("--block-size", type=positive_int, metavar="N", help="tokens per KV block (default 16)")
    p.add_argument("--max-model-len", type=positive_int, metavar="N",
                   help="server context limit (default: the model's max_position_embeddings)")


#: The formats, as :data:`calib.data.importers.FORMATS` registers them (listed here so ``calib --help`` does
#: not import the importers; a test checks the two agree).
FORMAT_HELP = {
    "csv": "a CSV, one row per request: arrival_s,input_tokens,output_tokens,ttft_ms,e2e_ms,status",
    "guidellm": "GuideLLM guidellm-results.json (or its folder), one run per benchmark",
    "inference-perf": "inference-perf run folder(s): requests.json, ground_truth.json, profile.yaml",
    "vllm-bench": "vllm bench serve --save-result --save-detailed JSON (one object, or one per line)",
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="import benchmark outputs (GuideLLM, inference-perf, vllm bench, CSV) as calib runs",
        description="Read benchmark outputs and write one calib run folder per run (run.yaml + requests.csv.gz, "
                    "docs/data-formats.md) under --out.  Rows that cannot be used are kept, counted and reported "
                    "by reason.  --model and --tp are required where the source does not give them (csv, "
                    "vllm-bench).  Formats: " + "; ".join(f"{k}: {v}" for k, v in FORMAT_HELP.items()))
    p.add_argument("format", metavar="FORMAT", help=f"one of {', '.join(FORMAT_HELP)}")
    p.add_argument("paths", metavar="PATH", nargs="+", help="files or folders to import")
    p.add_argument("--out", required=True, help="folder to write the runs into (one sub-folder per run)")
    server_flags(p)
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="inference-perf style profile.yaml: load.stages (duration, rate) and optional "
                        "data.shared_prefix (output_len, system_prompt_len, num_unique_system_prompts); "
                        "without one, a run is one load stage spanning its arrivals")
    p.add_argument("--output-len", type=positive_int, metavar="N",
                   help="the load generator's fixed output length, if it had one (enables the 'profile' output "
                        "rule: recorded counts below 0.9 x N are replaced by N)")
    p.add_argument("--name", help="run name (default: from the source; several runs get -<k> suffixes)")
    p.add_argument("--hardware", default="h100", help="hardware of the KV-cache estimate (default h100)")
    p.add_argument("--force", action="store_true", help="overwrite files in --out that calib did not create")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calib.data.importers import ImportOptions, import_runs

    options = ImportOptions(model=args.model, tp=args.tp, max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens, kv_blocks=args.kv_blocks,
                            block_size=args.block_size, max_model_len=args.max_model_len, profile=args.profile,
                            output_len=args.output_len, name=args.name, hardware=args.hardware)
    written = import_runs(args.format, args.paths, args.out, options, force=args.force)
    entries = [_entry(folder, rec) for folder, rec in written]
    if args.json:
        print(json.dumps({"format": args.format, "out": str(args.out), "runs": entries}, indent=1))
        return 0
    for e in entries:
        rows = e["rows"]
        print(f"{e['run']}: {e['model']} TP {e['tp']}, {rows['ok']} of {rows['rows']} requests usable -> {e['folder']}")
        for status in ("failed", "bad"):
            for why, n in rows[status].items():
                print(f"  {status:<6} {n:>6}  {why}")
        stages = ", ".join(f"{s['duration_s']:g} s at {s['rate']:g} req/s" for s in e["stages"])
        print(f"  stages: {stages}")
        if e["server_defaults"]:
            srv = e["server"]
            print("  server defaults used: " + ", ".join(f"{k}={srv[k]}" for k in e["server_defaults"]))
        for note in e["notes"]:
            print(f"  note: {note}")
    print(f"wrote {len(entries)} run(s) to {args.out}")
    return 0


def _entry(folder: Path, rec) -> dict:
    return {"run": rec.name, "folder": str(folder), "model": rec.model, "tp": rec.tp, "profile": rec.profile,
            "rows": rec.counts(), "stages": [{"duration_s": s.duration_s, "rate": s.rate} for s in rec.stages],
            "output_len": rec.output_len, "server": rec.server.to_dict(), "server_defaults": list(rec.server.defaults),
            "notes": list(rec.notes)}
