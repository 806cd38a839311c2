"""A plain CSV with one row per request -> a calib run.

The header names exactly these columns, in any order::

    arrival_s,input_tokens,output_tokens,ttft_ms,e2e_ms,status

``arrival_s``: when the request was sent, in seconds from any origin (the
earliest arrival becomes 0); ``input_tokens``: prompt tokens (>= 1);
``output_tokens``: generated tokens (>= 0); ``ttft_ms``, ``e2e_ms``: time to
first token and end-to-end latency, client side; ``status``: ``ok`` for a
request that completed, anything else for one that failed (counted, kept in
the run with status ``failed``, not replayed).  An ``ok`` row with an
unusable value (not a number, negative, E2E below TTFT, no input token, an
empty line) is kept with status ``bad`` and its reason.  ``--model`` and
``--tp`` are required; ``--profile`` gives load stages (else one stage spans
the arrivals).  TPOT is derived per request as (E2E - TTFT) / (O - 1).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from calib.data._io import read_text
from calib.data.importers._common import (ImportOptions, inferred_stage, make_server, need_tp, read_profile, reason,
                                          resolve_model, run_name)
from calib.data.runs import Prefix, RunRecord, requests_frame
from calib.errors import DataError

__all__ = ["NAME", "DESCRIPTION", "HEADER", "read"]

NAME = "csv"
DESCRIPTION = "CSV, one row per request: arrival_s,input_tokens,output_tokens,ttft_ms,e2e_ms,status"
#: The columns of the format.
HEADER = ("arrival_s", "input_tokens", "output_tokens", "ttft_ms", "e2e_ms", "status")


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read(path: str | Path, options: ImportOptions) -> list[RunRecord]:
    path = Path(path)
    if path.is_dir():
        raise DataError("expected a CSV file, got a folder", file=path)
    model = resolve_model(options.model, None, NAME)
    tp = need_tp(options, None, NAME)
    text = read_text(path)
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError("empty file: expected the header " + ",".join(HEADER), file=path)
        header = [h.strip() for h in header]
        missing = [c for c in HEADER if c not in header]
        if missing:
            raise DataError(f"missing column (the header must be {','.join(HEADER)})", file=path, field=missing[0])
        unknown = [c for c in header if c not in HEADER]
        if unknown:
            raise DataError(f"unknown column (the header must be {','.join(HEADER)})", file=path, field=unknown[0])
        if len(set(header)) != len(header):
            raise DataError("a column appears twice", file=path, field="header")
        col = {c: header.index(c) for c in HEADER}
        rows = {c: [] for c in ("request_index", "arrival_s", "input_tokens", "output_tokens", "ttft_ms", "e2e_ms",
                                "status", "reason")}
        for k, fields in enumerate(reader):
            line = k + 2
            where = f"line {line}"
            vals = {c: (fields[col[c]].strip() if col[c] < len(fields) else "") for c in HEADER}
            arrival = _number(vals["arrival_s"])
            inp = _number(vals["input_tokens"])
            out = _number(vals["output_tokens"])
            ttft = _number(vals["ttft_ms"])
            e2e = _number(vals["e2e_ms"])
            status, why = "ok", ""
            if not any(f.strip() for f in fields):
                status, why = "bad", reason(where, "empty line")
            elif len(fields) != len(header):
                status, why = "bad", reason(where, f"{len(fields)} fields, the header has {len(header)}")
            elif vals["status"].lower() != "ok":
                status, why = "failed", f"status {vals['status'][:40]!r}"
            else:
                checks = [
                    (arrival is None, "arrival_s", f"expected a number, got {vals['arrival_s']!r}"),
                    (inp is None or inp < 1 or inp != int(inp), "input_tokens",
                     f"expected an integer >= 1, got {vals['input_tokens']!r}"),
                    (out is None or out < 0 or out != int(out), "output_tokens",
                     f"expected an integer >= 0, got {vals['output_tokens']!r}"),
                    (ttft is None or ttft < 0, "ttft_ms", f"expected a number >= 0, got {vals['ttft_ms']!r}"),
                    (e2e is None or e2e < 0, "e2e_ms", f"expected a number >= 0, got {vals['e2e_ms']!r}"),
                ]
                for bad, fld, text_ in checks:
                    if bad:
                        status, why = "bad", reason(f"{where}: {fld}", text_)
                        break
                if status == "ok" and e2e < ttft:
                    status, why = "bad", reason(f"{where}: e2e_ms", f"{e2e:g} is below ttft_ms {ttft:g}")
            whole = lambda v: v if v is not None and v >= 0 and v == int(v) else np.nan  # noqa: E731
            rows["request_index"].append(k)
            rows["arrival_s"].append(arrival if arrival is not None else np.nan)
            rows["input_tokens"].append(whole(inp))
            rows["output_tokens"].append(whole(out))
            rows["ttft_ms"].append(ttft if status == "ok" else np.nan)
            rows["e2e_ms"].append(e2e if status == "ok" else np.nan)
            rows["status"].append(status)
            rows["reason"].append(why)
    except csv.Error as exc:
        raise DataError(f"not a valid CSV: {exc}", file=path) from None
    if not rows["status"]:
        raise DataError("no request row after the header", file=path)
    arr = np.asarray(rows.pop("arrival_s"), dtype=float)
    if not np.isfinite(arr).any():
        raise DataError("no row with a usable arrival time", file=path, field="arrival_s")
    with np.errstate(invalid="ignore"):
        rows["arrival_us"] = np.round((arr - np.nanmin(arr)) * 1e6)
    ok = np.asarray(rows["status"]) == "ok"
    notes = []
    if options.profile is not None:
        prof = read_profile(options.profile)
        stages, output_len, prefix = prof.stages, prof.output_len, prof.prefix
    else:
        stage, note = inferred_stage(np.asarray(rows["arrival_us"])[ok])
        stages, output_len, prefix = (stage,), None, Prefix()
        notes.append(note)
    if options.output_len is not None:
        output_len = options.output_len
    server = make_server(model, tp, options, {})
    return [RunRecord(
        name=run_name(options, path.name.split(".")[0] or "run"), model=model, tp=tp, server=server, profile="csv",
        overloaded=False, output_len=output_len, stages=stages, prefix=prefix, requests=requests_frame(rows),
        notes=notes,
        source={"format": NAME, "path": path.name, "profile": str(options.profile) if options.profile else None,
                "arrivals": "arrival_s, relative to the earliest", "times": "ttft_ms, e2e_ms (client side)"})]
