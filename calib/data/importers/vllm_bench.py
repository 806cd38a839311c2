"""vLLM ``bench serve`` results saved with per-request details -> calib runs.

``vllm bench serve ... --save-result --save-detailed`` (and the older
``benchmarks/benchmark_serving.py``) writes one JSON object per benchmark
(``--append-result``: one per line).  Per request, aligned lists:

* ``input_lens``, ``output_lens`` (tokens), ``ttfts`` (s), ``itls`` (s, a list per request),
  ``errors`` (``""`` for a success);
* E2E: ``latencies`` or ``e2els`` (s) when present, else TTFT + the sum of the request's ITLs
  (the time of its last token);
* arrival: ``start_times`` (s, ``time.perf_counter``) when present.  Older versions do not save
  send times: the arrivals are then synthesized as vLLM's client draws them — gamma gaps of shape
  ``burstiness`` (1: Poisson) at ``request_rate`` (``inf``: all at once), seed 0 — and the run
  says so in its notes.

A request with a non-empty error is ``failed``; one with an unusable value
(no first token, a negative time, E2E below TTFT, no input token) is ``bad``.
``--model`` and ``--tp`` are required (the file names the model only as served).
``--profile`` gives load stages; else one stage spans the arrivals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from calib.data._io import mapping, read_text
from calib.data.importers._common import (ImportOptions, finite_number, first_line, inferred_stage, make_server,
                                          need_tp, read_profile, reason, resolve_model, run_name)
from calib.data.runs import Prefix, RunRecord, requests_frame
from calib.errors import DataError

__all__ = ["NAME", "DESCRIPTION", "read", "synthesized_arrivals_s"]

NAME = "vllm-bench"
DESCRIPTION = "vllm bench serve --save-result --save-detailed JSON (one object, or one per line)"
_REQUIRED = ("input_lens", "output_lens", "ttfts")


def _documents(path: Path) -> list[dict]:
    text = read_text(path)
    try:
        doc = json.loads(text)
        docs = doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:
        docs = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON (nor JSON lines) at line {line_no} column {exc.colno}: {exc.msg}",
                                file=path) from None
    if not docs:
        raise DataError("no benchmark result", file=path)
    return [mapping(d, path, f"[{k}]" if len(docs) > 1 else "") for k, d in enumerate(docs)]


def synthesized_arrivals_s(n: int, request_rate: Any, burstiness: Any, seed: int = 0) -> np.ndarray:
    """Send times (s) as vLLM's client draws them: gamma(shape=burstiness, scale=1/(rate x burstiness)) gaps.

    >>> synthesized_arrivals_s(3, "inf", 1.0).tolist()
    [0.0, 0.0, 0.0]
    >>> len(synthesized_arrivals_s(4, 2.0, 1.0))
    4
    """
    rate = finite_number(request_rate)
    if rate is None or rate <= 0:
        return np.zeros(n)
    shape = finite_number(burstiness) or 1.0
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else np.zeros(0)


def read(path: str | Path, options: ImportOptions) -> list[RunRecord]:
    path = Path(path)
    if path.is_dir():
        raise DataError("expected the result JSON file, got a folder", file=path)
    docs = _documents(path)
    model = resolve_model(options.model, None, NAME)
    tp = need_tp(options, None, NAME)
    server = make_server(model, tp, options, {})
    prof = read_profile(options.profile) if options.profile is not None else None
    out = []
    for k, doc in enumerate(docs):
        suffix = f"-{k}" if len(docs) > 1 else ""
        out.append(_record(doc, f"[{k}]." if len(docs) > 1 else "", path, options, model, tp, server, prof,
                           run_name(options, path.stem, suffix)))
    return out


def _list(doc: dict, key: str, n: int | None, path: Path, at: str) -> list | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(f"expected a list, got {type(value).__name__}", file=path, field=f"{at}{key}")
    if n is not None and len(value) != n:
        raise DataError(f"{len(value)} entries, input_lens has {n}", file=path, field=f"{at}{key}")
    return value


def _record(doc: dict, at: str, path: Path, options: ImportOptions, model: str, tp: int, server, prof,
            name: str) -> RunRecord:
    for key in _REQUIRED:
        if key not in doc:
            raise DataError("missing key (save the benchmark with --save-result --save-detailed)", file=path,
                            field=f"{at}{key}")
    inputs = _list(doc, "input_lens", None, path, at)
    n = len(inputs)
    if n == 0:
        raise DataError("no request", file=path, field=f"{at}input_lens")
    outputs = _list(doc, "output_lens", n, path, at)
    ttfts = _list(doc, "ttfts", n, path, at)
    itls = _list(doc, "itls", n, path, at)
    lat_key = "latencies" if doc.get("latencies") is not None else ("e2els" if doc.get("e2els") is not None else None)
    latencies = _list(doc, lat_key, n, path, at) if lat_key else None
    if latencies is None and itls is None:
        raise DataError("neither latencies nor itls: E2E cannot be derived", file=path, field=f"{at}itls")
    errors = _list(doc, "errors", n, path, at) or [""] * n
    starts = _list(doc, "start_times", n, path, at)
    notes = []
    if starts is None:
        starts = synthesized_arrivals_s(n, doc.get("request_rate"), doc.get("burstiness"), seed=0).tolist()
        notes.append(f"arrivals synthesized (the file has no start_times): request_rate {doc.get('request_rate')!r}, "
                     f"burstiness {doc.get('burstiness', 1.0)!r}, seed 0")
    if doc.get("max_concurrency") is not None:
        notes.append(f"the client capped concurrency at {doc['max_concurrency']}; the replay sends each request at "
                     "its recorded start time" + ("" if "start_times" in doc else " (here synthesized: less exact)"))
    rows = {c: [] for c in ("request_index", "arrival_s", "input_tokens", "output_tokens", "ttft_ms", "e2e_ms",
                            "status", "reason")}
    for i in range(n):
        p, o, t = inputs[i], outputs[i], finite_number(ttfts[i])
        s = finite_number(starts[i])
        err = errors[i]
        if lat_key:
            e = finite_number(latencies[i])
        else:
            gaps = itls[i] if isinstance(itls[i], list) else None
            vals = [finite_number(g) for g in gaps] if gaps is not None else [None]
            e = (t + sum(vals)) if t is not None and all(v is not None for v in vals) else None
        status, why = "ok", ""
        if err not in (None, ""):
            lines = [ln for ln in str(err).splitlines() if ln.strip()]  # a traceback's last line names the error
            status, why = "failed", "error: " + first_line(lines[-1] if lines else err, 60)
        else:
            checks = [
                (s is None, "start_times", f"expected a number, got {starts[i]!r}"),
                (not (isinstance(p, int) and not isinstance(p, bool) and p >= 1), "input_lens",
                 f"expected an integer >= 1, got {p!r}"),
                (not (isinstance(o, int) and not isinstance(o, bool) and o >= 0), "output_lens",
                 f"expected an integer >= 0, got {o!r}"),
                (t is None or t <= 0, "ttfts", f"expected a number > 0 (s), got {ttfts[i]!r}"),
                (e is None or e < 0, lat_key or "itls", "unusable end-to-end latency"),
            ]
            for bad, fld, text in checks:
                if bad:
                    status, why = "bad", reason(f"{at}{fld}[{i}]", text)
                    break
            if status == "ok" and e < t:
                status, why = "bad", reason(f"{at}{lat_key or 'itls'}[{i}]", f"E2E {e:g} s is below TTFT {t:g} s")
        rows["request_index"].append(i)
        rows["arrival_s"].append(s if s is not None else np.nan)
        rows["input_tokens"].append(p if isinstance(p, int) and not isinstance(p, bool) else np.nan)
        rows["output_tokens"].append(o if isinstance(o, int) and not isinstance(o, bool) else np.nan)
        rows["ttft_ms"].append(t * 1000.0 if status == "ok" else np.nan)
        rows["e2e_ms"].append(e * 1000.0 if status == "ok" else np.nan)
        rows["status"].append(status)
        rows["reason"].append(why)
    arr = np.asarray(rows.pop("arrival_s"), dtype=float)
    if not np.isfinite(arr).any():
        raise DataError("no request with a start time", file=path, field=f"{at}start_times")
    with np.errstate(invalid="ignore"):
        rows["arrival_us"] = np.round((arr - np.nanmin(arr)) * 1e6)
    ok = np.asarray(rows["status"]) == "ok"
    if prof is not None:
        stages, output_len, prefix = prof.stages, prof.output_len, prof.prefix
    else:
        stage, note = inferred_stage(np.asarray(rows["arrival_us"])[ok])
        stages, output_len, prefix = (stage,), None, Prefix()
        notes.append(note)
    if options.output_len is not None:
        output_len = options.output_len
    return RunRecord(
        name=name, model=model, tp=tp, server=server, profile="vllm-bench", overloaded=False, output_len=output_len,
        stages=stages, prefix=prefix, requests=requests_frame(rows), notes=notes,
        source={"format": NAME, "path": path.name, "model_id": doc.get("model_id"), "date": doc.get("date"),
                "request_rate": doc.get("request_rate"), "burstiness": doc.get("burstiness"),
                "max_concurrency": doc.get("max_concurrency"), "profile": str(options.profile) if prof else None,
                "e2e": f"{lat_key} (s)" if lat_key else "ttfts + sum(itls) (s)",
                "arrivals": "start_times (s)" if "start_times" in doc else "synthesized"})
