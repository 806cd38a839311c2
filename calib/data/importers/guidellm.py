"""GuideLLM benchmark results (``guidellm-results.json``, per-request records) -> calib runs, one per benchmark.

PATH is the JSON file or its folder.  Each entry of ``benchmarks`` (synchronous,
throughput, constant-rate...) becomes one run ``<folder>-b<k>-<strategy>``
with one load stage: the benchmark's ``duration`` at its target rate
(``config.strategy.rate``; else requests / duration).  Per request:
``prompt_tokens`` (the shared prefix included), ``output_tokens``,
``time_to_first_token_ms``, ``request_latency`` (s, the E2E) and the send time
``info.timings.request_start`` (else ``request_start_time``), relative to the
benchmark's first.  ``requests.successful`` rows are ``ok`` (or ``bad`` when a
value is unusable); ``errored`` and ``incomplete`` rows are ``failed``.

GuideLLM's ``time_per_output_token_ms`` includes the first token
(``request_latency / output_tokens``) and is not read: calib derives TPOT per
request as (E2E - TTFT) / (O - 1).  The server settings come from
``exp-config.yaml`` next to the results when present (``model``,
``tensor_parallelism``, ``max_num_seqs``, ``max_num_batched_tokens``,
``max_model_len``); flags win.  ``profile.yaml``'s ``prefix_tokens`` (a prefix
every prompt shares) becomes one shared prompt of that length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calib.data._io import as_int, dig, mapping, need, read_json, read_yaml, sequence
from calib.data.guidellm import _profile_data, _strategy
from calib.data.importers._common import (ImportOptions, check_no_profile, finite_number, make_server, need_tp,
                                          reason, resolve_model, run_name)
from calib.data.models import calib_model_name
from calib.data.runs import Prefix, RunRecord, requests_frame
from calib.data.traces import Stage
from calib.errors import DataError

__all__ = ["NAME", "DESCRIPTION", "read"]

NAME = "guidellm"
DESCRIPTION = "GuideLLM guidellm-results.json (or its folder): one run per benchmark"


def read(path: str | Path, options: ImportOptions) -> list[RunRecord]:
    check_no_profile(options, NAME)
    path = Path(path)
    res_file = path / "guidellm-results.json" if path.is_dir() else path
    folder = res_file.parent
    exp_file, prof_file = folder / "exp-config.yaml", folder / "profile.yaml"
    exp = mapping(read_yaml(exp_file), exp_file, "") if exp_file.is_file() else {}
    source_model = calib_model_name(exp["model"], file=exp_file, field="model") if exp.get("model") else None
    model = resolve_model(options.model, source_model, NAME)
    source_tp = as_int(exp["tensor_parallelism"], exp_file, "tensor_parallelism", minimum=1) \
        if exp.get("tensor_parallelism") is not None else None
    tp = need_tp(options, source_tp, NAME)
    source_server = {k: as_int(exp[k], exp_file, k, minimum=1)
                     for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len") if exp.get(k) is not None}
    server = make_server(model, tp, options, source_server)
    prefix_tokens = 0
    if prof_file.is_file():
        prof = mapping(read_yaml(prof_file), prof_file, "")
        flat = _profile_data(prof.get("data"), prof_file)
        if flat.get("prefix_tokens"):
            prefix_tokens = as_int(flat["prefix_tokens"], prof_file, "data.prefix_tokens", minimum=0)
    prefix = Prefix(0, prefix_tokens, 1 if prefix_tokens else 0)

    doc = mapping(read_json(res_file), res_file, "")
    benches = sequence(need(doc, "benchmarks", res_file), res_file, "benchmarks")
    if not benches:
        raise DataError("no benchmark", file=res_file, field="benchmarks")
    base = folder.name if res_file.name == "guidellm-results.json" else res_file.stem
    records = []
    for k, bench in enumerate(benches):
        records.append(_benchmark(bench, k, res_file, base, options, model, tp, server, prefix,
                                  exp_file if exp else None, prof_file if prof_file.is_file() else None))
    return records


def _times(r: dict, at: str) -> tuple[dict[str, Any], str]:
    """Values of one request and, if one is unusable, the reason (``"<field>: why"``)."""
    vals: dict[str, Any] = {}
    start = dig(r, "info", "timings", "request_start")
    if start is None:
        start = r.get("request_start_time")
    vals["start"] = finite_number(start)
    p, o = r.get("prompt_tokens"), r.get("output_tokens")
    vals["prompt"] = p if isinstance(p, int) and not isinstance(p, bool) else None
    vals["output"] = o if isinstance(o, int) and not isinstance(o, bool) else None
    vals["ttft"] = finite_number(r.get("time_to_first_token_ms"))
    lat = finite_number(r.get("request_latency"))
    vals["e2e"] = lat * 1000.0 if lat is not None else None
    checks = [
        (vals["start"] is None, "request_start_time", "no request start time"),
        (vals["prompt"] is None or vals["prompt"] < 1, "prompt_tokens", f"expected an integer >= 1, got {p!r}"),
        (vals["output"] is None or vals["output"] < 0, "output_tokens", f"expected an integer >= 0, got {o!r}"),
        (vals["ttft"] is None or vals["ttft"] < 0, "time_to_first_token_ms",
         f"expected a number >= 0, got {r.get('time_to_first_token_ms')!r}"),
        (vals["e2e"] is None or vals["e2e"] < 0, "request_latency",
         f"expected a number >= 0, got {r.get('request_latency')!r}"),
    ]
    for bad, fld, why in checks:
        if bad:
            return vals, reason(f"{at}.{fld}", why)
    if vals["e2e"] < vals["ttft"]:
        return vals, reason(f"{at}.request_latency", f"latency {vals['e2e']:g} ms is below TTFT {vals['ttft']:g} ms")
    return vals, ""


def _benchmark(bench: Any, k: int, res_file: Path, base: str, options: ImportOptions, model: str, tp: int, server,
               prefix: Prefix, exp_file: Path | None, prof_file: Path | None) -> RunRecord:
    at = f"benchmarks[{k}]"
    bench = mapping(bench, res_file, at)
    strategy = _strategy(bench) or "unknown"
    duration = finite_number(need(bench, "duration", res_file, at))
    if duration is None or duration <= 0:
        raise DataError(f"must be a number > 0, got {bench.get('duration')!r}"[:80], file=res_file,
                        field=f"{at}.duration")
    reqs = mapping(need(bench, "requests", res_file, at), res_file, f"{at}.requests")
    rows = {c: [] for c in ("request_index", "arrival_s", "input_tokens", "output_tokens", "ttft_ms", "e2e_ms",
                            "status", "reason")}
    n_ok = 0
    for part in ("successful", "errored", "incomplete"):
        entries = reqs.get(part) or []
        entries = sequence(entries, res_file, f"{at}.requests.{part}")
        for i, r in enumerate(entries):
            where = f"{at}.requests.{part}[{i}]"
            r = mapping(r, res_file, where)
            vals, bad = _times(r, where)
            if part == "successful":
                status, why = ("bad", bad) if bad else ("ok", "")
                n_ok += status == "ok"
            else:
                status, why = "failed", part
            rows["request_index"].append(len(rows["status"]))
            rows["arrival_s"].append(vals["start"] if vals["start"] is not None else np.nan)
            rows["input_tokens"].append(vals["prompt"] if vals["prompt"] is not None else np.nan)
            rows["output_tokens"].append(vals["output"] if vals["output"] is not None else np.nan)
            rows["ttft_ms"].append(vals["ttft"] if status == "ok" else np.nan)
            rows["e2e_ms"].append(vals["e2e"] if status == "ok" else np.nan)
            rows["status"].append(status)
            rows["reason"].append(why)
    arr = np.asarray(rows.pop("arrival_s"), dtype=float)
    if not np.isfinite(arr).any():
        raise DataError("no request with a start time", file=res_file, field=f"{at}.requests")
    with np.errstate(invalid="ignore"):
        rows["arrival_us"] = np.round((arr - np.nanmin(arr)) * 1e6)
    n_successful = len(reqs.get("successful") or [])
    rate = finite_number(dig(bench, "config", "strategy", "rate"))
    if rate is None or rate <= 0:
        rate = max(n_successful, 1) / duration
    name = run_name(options, base, f"-b{k}-{strategy}")
    return RunRecord(
        name=name, model=model, tp=tp, server=server, profile=f"guidellm-{strategy}", overloaded=False,
        output_len=options.output_len, stages=(Stage(duration, rate),), prefix=prefix, requests=requests_frame(rows),
        notes=[f"GuideLLM benchmark {k} ({strategy}); TPOT derived per request, not GuideLLM's "
               "time_per_output_token_ms (which includes the first token)"],
        source={"format": NAME, "path": res_file.name, "benchmark": k, "strategy": strategy,
                "exp_config": exp_file.name if exp_file else None, "profile": prof_file.name if prof_file else None,
                "arrivals": "info.timings.request_start (else request_start_time), relative to the benchmark's first",
                "times": "time_to_first_token_ms, request_latency x 1000 (client side)"})
