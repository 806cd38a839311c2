"""inference-perf runs (the layout of ``data/batched/<run>/``) -> calib runs.

A run folder holds ``requests.json`` (server config, model, profile name and
per request ``index``, ``arrival_time_us``, ``input_tokens``,
``output_tokens``, ``prefix_group``, ``has_error``), ``ground_truth.json``
(per request ``ttft_s``, ``e2e_s``, ``has_error``), ``profile.yaml`` (load
stages, fixed output length, shared system prompts) and optionally
``exp-config.yaml`` (``max_model_len``; its ``tensor_parallelism`` is
cross-checked).  PATH is one run folder or a folder of them.

The rows are read as :func:`calib.data.traces.load_trace` reads them (same
checks, same arrivals relative to the file's first request), but no row is
left out: a request flagged ``has_error`` is kept with status ``failed``, one
with unusable timings (missing, negative, E2E below TTFT) or no input token
with status ``bad``.  inference-perf's own TPOT/ITL fields (about half the
real value) are not read: TPOT is derived per request from TTFT, E2E and the
output count.  Without ``profile.yaml`` (and without ``--profile``) one load
stage is inferred from the arrivals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calib.data._io import as_int, as_str, mapping, need, read_json, read_yaml, sequence
from calib.data.importers._common import ImportOptions, inferred_stage, make_server, read_profile, reason, run_name
from calib.data.runs import Prefix, RunRecord, requests_frame
from calib.data.traces import _model, _timing
from calib.errors import DataError

__all__ = ["NAME", "DESCRIPTION", "read", "run_folders"]

NAME = "inference-perf"
DESCRIPTION = "inference-perf run folder(s): requests.json, ground_truth.json, profile.yaml[, exp-config.yaml]"


def run_folders(path: Path) -> list[Path]:
    """``path`` itself when it holds ``requests.json``, else its sub-folders that do (sorted)."""
    if (path / "requests.json").is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_dir() and (p / "requests.json").is_file())
        if found:
            return found
        raise DataError("no inference-perf run (a folder with requests.json) here", file=path)
    raise DataError("not a folder (an inference-perf run is a folder with requests.json)", file=path)


def read(path: str | Path, options: ImportOptions) -> list[RunRecord]:
    """The runs of ``path`` (one folder or a folder of run folders)."""
    return [_read_run(folder, options) for folder in run_folders(Path(path))]


def _read_run(run: Path, options: ImportOptions) -> RunRecord:
    req_file, gt_file, prof_file, exp_file = (run / "requests.json", run / "ground_truth.json", run / "profile.yaml",
                                              run / "exp-config.yaml")
    doc = mapping(read_json(req_file), req_file, "")
    config = mapping(need(doc, "config", req_file), req_file, "config")

    def cfg(key: str) -> int:
        return as_int(need(config, key, req_file, "config"), req_file, f"config.{key}", minimum=1)

    tp = cfg("tensor_parallelism")
    source_server = {"max_num_seqs": cfg("max_num_seqs"), "max_num_batched_tokens": cfg("max_num_batched_tokens"),
                     "kv_blocks": cfg("kv_blocks_total_gpu"), "block_size": cfg("block_size")}
    exp = read_yaml(exp_file) if exp_file.is_file() else None
    if isinstance(exp, dict) and exp.get("tensor_parallelism") is not None:
        exp_tp = as_int(exp["tensor_parallelism"], exp_file, "tensor_parallelism", minimum=1)
        if exp_tp != tp:
            raise DataError(f"is {exp_tp}, requests.json config says {tp}", file=exp_file, field="tensor_parallelism")
    if isinstance(exp, dict) and exp.get("max_model_len") is not None:
        source_server["max_model_len"] = as_int(exp["max_model_len"], exp_file, "max_model_len", minimum=1)
    model = options.model or _model(doc, exp, req_file, exp_file)
    if options.model:
        from calib.specs import load_model

        load_model(model)
    profile_name = as_str(need(doc, "profile", req_file), req_file, "profile")
    name = doc["experiment"] if isinstance(doc.get("experiment"), str) and doc["experiment"] else run.name
    split = doc.get("split") if isinstance(doc.get("split"), str) else None
    cfg_len = config.get("system_prompt_len", 0)
    cfg_len = int(cfg_len) if isinstance(cfg_len, (int, float)) and not isinstance(cfg_len, bool) else 0

    reqs = sequence(need(doc, "requests", req_file), req_file, "requests")
    if not reqs:
        raise DataError("no request", file=req_file, field="requests")
    gts = sequence(read_json(gt_file), gt_file, "")
    if len(gts) != len(reqs):
        raise DataError(f"{len(gts)} entries, requests.json has {len(reqs)} requests", file=gt_file,
                        field="<top level>")
    n = len(reqs)
    index = np.empty(n, np.int64)
    arrival = np.empty(n, np.int64)
    inp = np.empty(n, np.int64)
    outp = np.empty(n, np.int64)
    ttft = np.full(n, np.nan)
    e2e = np.full(n, np.nan)
    status = np.full(n, "ok", dtype=object)
    why = np.full(n, "", dtype=object)
    labels = np.full(n, "", dtype=object)
    seen: set[int] = set()
    prev = None
    for i, (r, g) in enumerate(zip(reqs, gts)):
        at = f"requests[{i}]"
        r = mapping(r, req_file, at)
        g = mapping(g, gt_file, f"[{i}]")
        index[i] = as_int(need(r, "index", req_file, at), req_file, f"{at}.index", minimum=0)
        if index[i] in seen:
            raise DataError(f"duplicate request index {index[i]}", file=req_file, field=f"{at}.index")
        seen.add(int(index[i]))
        gi = as_int(need(g, "index", gt_file, f"[{i}]"), gt_file, f"[{i}].index")
        if gi != index[i]:
            raise DataError(f"entry {i} has index {gi}, requests.json entry {i} has {index[i]}", file=gt_file,
                            field=f"[{i}].index")
        arrival[i] = as_int(need(r, "arrival_time_us", req_file, at), req_file, f"{at}.arrival_time_us", minimum=0)
        if prev is not None and arrival[i] < prev:
            raise DataError(f"arrivals not sorted: {arrival[i]} us is before the previous request's {prev} us",
                            file=req_file, field=f"{at}.arrival_time_us")
        prev = arrival[i]
        inp[i] = as_int(need(r, "input_tokens", req_file, at), req_file, f"{at}.input_tokens", minimum=0)
        outp[i] = as_int(need(r, "output_tokens", req_file, at), req_file, f"{at}.output_tokens", minimum=0)
        label = r.get("prefix_group")
        labels[i] = "" if label is None else str(label)
        flags = [r.get("has_error", False), g.get("has_error", False)]
        for flag, fname, ffile in zip(flags, (f"{at}.has_error", f"[{i}].has_error"), (req_file, gt_file)):
            if not isinstance(flag, bool):
                raise DataError(f"expected true/false, got {flag!r}"[:80], file=ffile, field=fname)
        if any(flags):
            status[i], why[i] = "failed", "has_error"
            continue
        t, why_t = _timing(g, "ttft_s")
        e, why_e = _timing(g, "e2e_s")
        bad = why_t or why_e
        if not bad and e < t:
            bad = f"e2e_s {e:g} is below ttft_s {t:g}"
        if not bad and inp[i] < 1:
            bad = "input_tokens is 0"
        if bad:
            status[i], why[i] = "bad", reason(f"ground_truth.json[{i}]", bad)
            continue
        ttft[i], e2e[i] = t * 1000.0, e * 1000.0

    notes = []
    prof_path = options.profile or (prof_file if prof_file.is_file() else None)
    rel = arrival - arrival[0]
    if prof_path is not None:
        prof = read_profile(prof_path)
        stages, output_len, shared = prof.stages, prof.output_len, prof.prefix
    else:
        stage, note = inferred_stage(rel[status == "ok"])
        stages, output_len, shared = (stage,), None, Prefix()
        notes.append(note)
    if options.output_len is not None:
        output_len = options.output_len
    prefix = Prefix(group_prompt_len=cfg_len or shared.shared_prompt_len, shared_prompt_len=shared.shared_prompt_len,
                    shared_prompts=shared.shared_prompts)
    server = make_server(model, tp, options, source_server)
    frame = requests_frame({
        "request_index": index, "arrival_us": rel, "input_tokens": inp, "output_tokens": outp, "ttft_ms": ttft,
        "e2e_ms": e2e, "status": status, "reason": why, "prefix_group": labels})
    return RunRecord(
        name=run_name(options, name), model=model, tp=tp, server=server, profile=profile_name,
        overloaded=profile_name.lower() == "reasoning", output_len=output_len, stages=stages, prefix=prefix,
        requests=frame, split=split, notes=notes,
        source={"format": NAME, "path": run.name,
                "files": sorted(p.name for p in (req_file, gt_file, prof_file, exp_file) if p.is_file()),
                "model_id": doc.get("model_id"), "profile_file": str(prof_path.name) if prof_path else None,
                "arrivals": "requests.json arrival_time_us, relative to the file's first request",
                "times": "ground_truth.json ttft_s, e2e_s (client side); inference-perf's TPOT/ITL fields not used"})
