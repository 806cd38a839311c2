"""``calib capacity``: predicted latencies and throughput of a vLLM server against the request rate.

For each rate, a run of Poisson arrivals (``--duration`` seconds, seeded:
``numpy.random.default_rng(seed)``, the same random numbers at every rate) with
fixed or normally distributed input and output lengths is replayed through
the continuous-batching engine under the calibration's settings and the
server settings (vLLM V1 ``vllm serve`` defaults on an H100 unless given).
Statistics are over the requests that arrive after ``--warmup`` seconds:
TTFT, TPOT = (E2E - TTFT) / (O - 1) per request, and E2E (mean, p90, p99, ms),
and the throughput (requests and output tokens completed per second during the
measured window).

The *knee* is the lowest rate at which the server saturates: its simulated
queue grows without bound (:func:`calib.replay.loaded.saturation`: the mean
wait of the last fifth of the requests exceeds 1 s and grows by more than
5 ms per second), or it completes fewer than 95 % as many requests as arrive
during the measured window, or some requests never finish.  With ``--slo``,
the highest rate below the knee that meets every objective is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import re

__all__ = ["register", "parse_rates", "parse_slo", "capacity_rows", "knee"]

#: Output columns (CSV and JSON rows), in order.
COLUMNS = ("rate", "n_requests", "n_finished", "throughput_rps", "output_tokens_per_s", "ttft_mean_ms", "ttft_p90_ms",
           "ttft_p99_ms", "tpot_mean_ms", "tpot_p90_ms", "tpot_p99_ms", "e2e_mean_ms", "e2e_p90_ms", "e2e_p99_ms",
           "mean_wait_ms", "saturated", "meets_slo")
_SLO_KEY = re.compile(r"^(ttft|tpot|e2e)_(mean|p50|p90|p99)$")
_MAX_RATES = 200


def parse_rates(text: str) -> list[float]:
    """``"1:20"`` (step 1), ``"1:20:2"``, or a list ``"1,2,4"`` -> rates (req/s).

    >>> parse_rates("1:4"), parse_rates("0.5:2:0.5"), parse_rates("1,2,4")
    ([1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0], [1.0, 2.0, 4.0])
    """
    from calib.errors import CalibError

    def num(x: str) -> float:
        try:
            v = float(x)
        except ValueError:
            raise CalibError(f"expected a number, got {x.strip()!r}", field="--rates") from None
        if not (math.isfinite(v) and v > 0):
            raise CalibError(f"rates must be > 0, got {x.strip()!r}", field="--rates")
        return v

    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise CalibError(f"expected START:STOP[:STEP], got {text!r}", field="--rates")
        start, stop = num(parts[0]), num(parts[1])
        step = num(parts[2]) if len(parts) == 3 else 1.0
        if stop < start:
            raise CalibError(f"STOP {stop:g} is below START {start:g}", field="--rates")
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        if n > _MAX_RATES:
            raise CalibError(f"{n} rates; at most {_MAX_RATES}", field="--rates")
        return [round(start + i * step, 9) for i in range(n)]
    rates = [num(x) for x in text.split(",") if x.strip()]
    if not rates:
        raise CalibError("no rate given", field="--rates")
    if len(rates) > _MAX_RATES:
        raise CalibError(f"{len(rates)} rates; at most {_MAX_RATES}", field="--rates")
    return sorted(set(rates))


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft_p90=200ms,tpot_p90=50ms"`` -> ``{"ttft_p90_ms": 200.0, "tpot_p90_ms": 50.0}`` (``s`` also accepted).

    >>> parse_slo("ttft_p90=0.2s,e2e_mean=3000")
    {'ttft_p90_ms': 200.0, 'e2e_mean_ms': 3000.0}
    """
    from calib.errors import CalibError

    if not text:
        return {}
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if not sep or not _SLO_KEY.match(key):
            raise CalibError(f"expected METRIC_STAT=VALUE (metric ttft, tpot or e2e; stat mean, p50, p90 or p99), "
                             f"got {item.strip()!r}", field="--slo")
        scale = 1.0
        if value.endswith("ms"):
            value = value[:-2]
        elif value.endswith("s"):
            value, scale = value[:-1], 1000.0
        try:
            ms = float(value) * scale
        except ValueError:
            raise CalibError(f"expected a time like 200ms or 0.2s, got {item.strip()!r}", field="--slo") from None
        if not (math.isfinite(ms) and ms > 0):
            raise CalibError(f"must be > 0, got {item.strip()!r}", field="--slo")
        out[f"{key}_ms"] = ms
    return out


def capacity_rows(*, model: str, tp: int, server, settings, rates, duration_s: float, warmup_s: float,
                  input_len: int, output_len: int, input_std: float = 0.0, output_std: float = 0.0, seed: int = 0,
                  slo: dict | None = None) -> list[dict]:
    """One row per rate (:data:`COLUMNS`)."""
    import numpy as np

    from calib.data.runs import synthetic_trace
    from calib.metrics import stats
    from calib.replay.batched import BatchedRun
    from calib.replay.loaded import LoadedRun, replay_run, run_group, saturation
    from calib.specs import load_model

    moe = load_model(model).is_moe
    rows = []
    for rate in rates:
        trace = synthetic_trace(model=model, tp=tp, server=server, rate=rate, duration_s=duration_s,
                                input_len=input_len, output_len=output_len, input_std=input_std,
                                output_std=output_std, seed=seed)
        opts = {"prefix": "none"}
        if server.max_model_len is not None:
            opts["max_model_len"] = server.max_model_len
        lr = LoadedRun(trace.name, trace, BatchedRun(trace, **opts), run_group(trace, moe), moe)
        rep = replay_run(lr, settings, record_steps=False)
        arr_s = trace.requests["arrival_us"].to_numpy(float) / 1e6
        sel = arr_s >= warmup_s
        if not sel.any():
            sel = np.ones(len(arr_s), bool)
        done = sel & np.isfinite(rep.e2e_ms)
        end_s = arr_s + rep.e2e_ms / 1e3
        window = max(duration_s - warmup_s, 1e-9)
        in_window = np.isfinite(end_s) & (end_s >= warmup_s) & (end_s < duration_s)
        out_tok = trace.requests["output_tokens"].to_numpy(float)
        row = {"rate": float(rate), "n_requests": int(sel.sum()), "n_finished": int(done.sum()),
               "throughput_rps": float(in_window.sum() / window),
               "output_tokens_per_s": float(out_tok[in_window].sum() / window)}
        for m, values in (("ttft", rep.ttft_ms), ("tpot", rep.tpot_ms), ("e2e", rep.e2e_ms)):
            st = stats(values[done])
            for s in ("mean", "p90", "p99"):
                row[f"{m}_{s}_ms"] = st[s] if math.isfinite(st[s]) else None
            row[f"_{m}_p50"] = st["p50"]
        waits = rep.wait_ms[done]
        row["mean_wait_ms"] = float(np.mean(waits)) if waits.size else None
        sat = saturation(rep, np.ones(rep.n, bool))
        arrived = int(((arr_s >= warmup_s) & (arr_s < duration_s)).sum())
        row["saturated"] = bool(sat["saturated"] or in_window.sum() < 0.95 * arrived
                                or int(done.sum()) < int(sel.sum()))
        if slo:
            ok = True
            for key, limit in slo.items():
                m, s, _ = key.split("_")
                value = row.get(key) if s != "p50" else row[f"_{m}_p50"]
                ok &= value is not None and value <= limit
            row["meets_slo"] = bool(ok and not row["saturated"])
        else:
            row["meets_slo"] = None
        rows.append({k: row[k] for k in COLUMNS})
    return rows


def knee(rows: list[dict]) -> tuple[float | None, float | None]:
    """``(knee_rate, max_stable_rate)``: the lowest saturated rate and the highest rate below it."""
    knee_rate = next((r["rate"] for r in rows if r["saturated"]), None)
    below = [r["rate"] for r in rows if knee_rate is None or r["rate"] < knee_rate]
    return knee_rate, (max(below) if below else None)


def register(subparsers) -> None:
    from calib.commands.import_runs import positive_int, server_flags

    p = subparsers.add_parser("capacity", help="predicted latency and throughput vs request rate (Poisson arrivals)",
                              description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    server_flags(p, required=True)
    p.add_argument("--input-len", type=positive_int, required=True, metavar="L", help="prompt tokens per request")
    p.add_argument("--output-len", type=positive_int, required=True, metavar="O", help="output tokens per request")
    p.add_argument("--input-std", type=float, default=0.0, metavar="S",
                   help="standard deviation of the prompt length (normal, rounded, >= 1; default 0: fixed)")
    p.add_argument("--output-std", type=float, default=0.0, metavar="S",
                   help="standard deviation of the output length (default 0: fixed)")
    p.add_argument("--rates", required=True,
                   help="request rates (req/s): START:STOP[:STEP] (step 1 by default) or a list 1,2,4")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration file, or the name of one shipped in configs/calibrations (e.g. "
                        "h100-vllm-additive); default: h100-vllm")
    p.add_argument("--slo", help="objectives, e.g. ttft_p90=200ms,tpot_p90=50ms (metric ttft|tpot|e2e, stat "
                                 "mean|p50|p90|p99, value in ms or s)")
    p.add_argument("--duration", type=float, default=300.0, metavar="S",
                   help="seconds of arrivals per rate (default 300)")
    p.add_argument("--warmup", type=float, default=60.0, metavar="S",
                   help="leave out the requests of the first S seconds (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals and lengths (default 0)")
    p.add_argument("--hardware", default=None,
                   help="hardware (default: the calibration's, h100 for the shipped one)")
    p.add_argument("--out", default="calib-capacity", help="folder for capacity.csv and capacity.png "
                                                             "(default ./calib-capacity)")
    p.add_argument("--force", action="store_true", help="overwrite files in --out that calib did not create")
    p.add_argument("--json", action="store_true", help="print one JSON object {\"rows\": [...], ...}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calib.commands.predict import calibration_entry, load_calibration
    from calib.data.runs import OutputFolder, server_config
    from calib.errors import CalibError
    from calib.specs import load_model

    rates = parse_rates(args.rates)
    slo = parse_slo(args.slo)
    for name, value in (("--duration", args.duration), ("--input-std", args.input_std),
                        ("--output-std", args.output_std)):
        if not math.isfinite(value) or value < 0 or (name == "--duration" and value <= 0):
            raise CalibError(f"must be {'> 0' if name == '--duration' else '>= 0'}, got {value}", field=name)
    if not (math.isfinite(args.warmup) and 0 <= args.warmup < args.duration):
        raise CalibError(f"must be >= 0 and below --duration ({args.duration:g}), got {args.warmup}", field="--warmup")
    if args.seed < 0:
        raise CalibError(f"must be >= 0, got {args.seed}", field="--seed")
    cal, label = load_calibration(args.calibration)
    settings = cal.settings
    if args.hardware:
        settings = settings.with_values({"hardware": args.hardware})
    spec = load_model(args.model)
    server = server_config(args.model, args.tp, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens, kv_blocks=args.kv_blocks,
                           block_size=args.block_size, max_model_len=args.max_model_len,
                           hardware=settings.physics.hardware)
    rows = capacity_rows(model=args.model, tp=args.tp, server=server, settings=settings, rates=rates,
                         duration_s=args.duration, warmup_s=args.warmup, input_len=args.input_len,
                         output_len=args.output_len, input_std=args.input_std, output_std=args.output_std,
                         seed=args.seed, slo=slo)
    knee_rate, stable = knee(rows)
    meeting = [r["rate"] for r in rows if r["meets_slo"] and (knee_rate is None or r["rate"] < knee_rate)]
    doc = {
        "model": spec.name, "tp": args.tp, "server": server.to_dict(), "calibration": calibration_entry(cal, label),
        "workload": {"arrivals": f"Poisson, numpy.random.default_rng({args.seed}), same random numbers at every rate",
                     "duration_s": args.duration, "warmup_s": args.warmup, "input_len": args.input_len,
                     "input_std": args.input_std, "output_len": args.output_len, "output_std": args.output_std,
                     "seed": args.seed},
        "tpot_definition": "per request (E2E - TTFT) / (O - 1), averaged over requests",
        "rows": rows, "knee_rate": knee_rate, "max_stable_rate": stable,
        "slo": {k: v for k, v in slo.items()} or None,
        "max_rate_meeting_slo": (max(meeting) if meeting else None) if slo else None,
    }
    out = OutputFolder(args.out, force=args.force)
    out.write_text("capacity.csv", _csv(rows))
    out.write_text("capacity.json", json.dumps(doc, indent=1) + "\n")
    out.write_figure("capacity.png", _figure(doc))
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{spec.name} TP {args.tp}, input {args.input_len} / output {args.output_len} tokens; calibration: {label}")
    print(f"server: max_num_batched_tokens {server.max_num_batched_tokens}, max_num_seqs {server.max_num_seqs}, "
          f"{server.kv_blocks} KV blocks of {server.block_size}"
          + (f" (defaults: {', '.join(server.defaults)})" if server.defaults else ""))
    print(f"{'rate':>6} {'req/s':>7} {'tok/s':>8} {'TTFT mean/p90/p99 ms':>26} {'TPOT mean/p90/p99 ms':>22} "
          f"{'E2E mean/p90/p99 ms':>28}  state")
    for r in rows:
        three = lambda m: "/".join("n/a" if r[f"{m}_{s}_ms"] is None else f"{r[f'{m}_{s}_ms']:.0f}"  # noqa: E731
                                   for s in ("mean", "p90", "p99"))
        state = "SATURATED" if r["saturated"] else "stable"
        if r["meets_slo"] is not None:
            state += ", meets SLO" if r["meets_slo"] else ", misses SLO"
        print(f"{r['rate']:>6g} {r['throughput_rps']:>7.2f} {r['output_tokens_per_s']:>8.0f} {three('ttft'):>26} "
              f"{three('tpot'):>22} {three('e2e'):>28}  {state}")
    print(f"knee: {knee_rate if knee_rate is not None else 'none in the range'}"
          f"; highest stable rate: {stable if stable is not None else 'none'}")
    if slo:
        print(f"highest rate meeting {args.slo}: {doc['max_rate_meeting_slo']}")
    print(f"wrote {out.path / 'capacity.csv'}, capacity.json, capacity.png")
    return 0


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def _figure(doc: dict):
    from calib.reporting.plots import plt

    rows = doc["rows"]
    rates = [r["rate"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, m in zip(axes[:3], ("ttft", "tpot", "e2e")):
        for s, style in (("mean", "-o"), ("p90", "--"), ("p99", ":")):
            ys = [r[f"{m}_{s}_ms"] if r[f"{m}_{s}_ms"] is not None else float("nan") for r in rows]
            ax.plot(rates, ys, style, label=s, ms=3)
        for key, limit in (doc.get("slo") or {}).items():
            if key.startswith(m + "_"):
                ax.axhline(limit, color="red", lw=0.8, label=f"SLO {key[:-3]}")
        values = [r[f"{m}_{s}_ms"] for r in rows for s in ("mean", "p99") if r[f"{m}_{s}_ms"]]
        if values and max(values) / min(values) > 30:
            ax.set_yscale("log")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{m.upper()} (ms)")
        ax.set_title(m.upper())
        ax.legend(fontsize=7)
    ax = axes[3]
    ax.plot(rates, [r["throughput_rps"] for r in rows], "-o", ms=3, label="completed")
    ax.plot(rates, rates, "k--", lw=0.8, label="offered")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("throughput (req/s)")
    ax.set_title("throughput")
    for a in axes:
        if doc["knee_rate"] is not None:
            a.axvline(doc["knee_rate"], color="grey", lw=0.8)
    ax.legend(fontsize=7)
    fig.suptitle(f"{doc['model']} TP {doc['tp']}: input {doc['workload']['input_len']}, output "
                 f"{doc['workload']['output_len']} tokens (knee: {doc['knee_rate']})", fontsize=9)
    fig.tight_layout()
    return fig
