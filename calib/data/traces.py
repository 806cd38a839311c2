"""Loaded-server traces: every request of a run under real load.

A run folder of ``data/batched/`` (inference-perf, vLLM 0.15.1) holds
``requests.json`` (server config and, per request, arrival time and token
counts), ``ground_truth.json`` (per request TTFT, E2E and an error flag),
``profile.yaml`` (load stages and the fixed output length) and
``exp-config.yaml``.  :func:`load_trace` turns one into a :class:`Trace`.

Output-length rule
------------------
The runs used ``ignore_eos`` with a fixed output length (247-251 tokens,
1448 for *reasoning*), but many recorded ``output_tokens`` are far lower.
The recorded count is wrong, not the generation: in every run the decode time
(E2E - TTFT) of a request does not depend on its recorded count.  Llama-2-7B
TP1 codegen: 34.5 % of the requests record fewer than 0.9 x 247 tokens; their
median decode time is 2079 ms against 2084 ms for the others; their TPOT
from the recorded count has median 20.9 ms (absurd) against 8.5 ms, and
8.5 ms from the profile length.  The same holds for Llama-2-7B roleplay (32.5 %
short, 2034 vs 2041 ms) and general (25.5 %, 3908 vs 3899 ms), for Llama-2-70B
(0.7-1.5 % short) and Mixtral (2.5-3.3 %); CodeLlama-34B has none.  Hence the
default rule is ``"profile"``:

* ``"profile"`` (default): a recorded count below ``short_fraction`` (0.9) x
  the profile's ``output_len`` is replaced by ``output_len``; counts at or
  above that are kept (they are within ~2 % of the length: tokenizer
  re-counts).
* ``"recorded"``: recorded counts are used as they are (a count can be 0).
* ``"exclude"``: recorded counts are kept, but the short requests get
  ``tpot_ms = NaN`` so they drop out of TPOT statistics (they stay in the
  trace: they loaded the server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calib.data._io import as_float, as_int, as_str, dig, mapping, need, read_json, read_yaml, sequence
from calib.data.models import calib_model_name
from calib.errors import DataError

__all__ = [
    "OUTPUT_RULES",
    "DEFAULT_OUTPUT_RULE",
    "SHORT_FRACTION",
    "TRACE_COLUMNS",
    "Stage",
    "Skipped",
    "Trace",
    "load_trace",
    "list_traces",
    "assemble_trace",
]

OUTPUT_RULES = ("profile", "recorded", "exclude")
DEFAULT_OUTPUT_RULE = "profile"
#: A recorded output count below this fraction of the profile's length is "short".
SHORT_FRACTION = 0.9

#: Columns of :attr:`Trace.requests`.
TRACE_COLUMNS = (
    "request_index",
    "arrival_us",
    "input_tokens",
    "output_tokens",
    "output_tokens_recorded",
    "short_output",
    "ttft_ms",
    "e2e_ms",
    "tpot_ms",
    "stage",
)


@dataclass(frozen=True)
class Stage:
    """One constant-rate load stage: ``duration_s`` seconds at ``rate`` req/s."""

    duration_s: float
    rate: float


@dataclass(frozen=True)
class Skipped:
    """A request left out of a loaded run, with the reason (never dropped silently)."""

    index: int
    field: str
    reason: str


@dataclass
class Trace:
    """A run under load, ready for a continuous-batching replay.

    Attributes
    ----------
    name : str
        Run name (folder name or ``experiment`` key).
    model : str
        calib model name (``llama-2-70b-hf``, ...).
    tp, max_num_seqs, max_num_batched_tokens : int
        Server configuration (the latter two ``None`` when unknown).
    kv_blocks, block_size : int or None
        GPU KV-cache blocks and tokens per block (``None`` when unknown).
    profile : str
        Load profile (``codegen``, ``general``, ``roleplay``, ``reasoning``, ...).
    overloaded : bool
        ``True`` for the *reasoning* runs (queues grew without bound): keep
        them out of accuracy figures or report them apart.
    requests : pandas.DataFrame
        Sorted by arrival; columns :data:`TRACE_COLUMNS`: ``request_index``
        (index in the source), ``arrival_us`` (int64, relative to the first
        arrival of the run), ``input_tokens``, ``output_tokens`` (after the
        output rule), ``output_tokens_recorded``, ``short_output`` (recorded
        < ``SHORT_FRACTION`` x ``output_len``), ``ttft_ms``, ``e2e_ms``,
        ``tpot_ms`` = (E2E - TTFT)/(O - 1) with O = ``output_tokens`` (NaN
        when O <= 1 or the rule excludes the request), ``stage`` (index into
        :attr:`stages`).
    excluded : int
        Requests left out because the run flagged them as errors.
    output_rule : str
        The output-length rule applied, in words (starts with its name).
    output_rule_name : str
        ``"profile"``, ``"recorded"`` or ``"exclude"``.
    output_len : int or None
        The profile's fixed output length.
    stages : tuple of Stage
    split : str or None
        The run's split label in the source (``train``/``validate``/``test``).
    skipped : list of Skipped
        Requests left out for bad values (not counted in ``excluded``).
    source : str
    """

    name: str
    model: str
    tp: int
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    kv_blocks: int | None
    block_size: int | None
    profile: str
    overloaded: bool
    requests: pd.DataFrame = field(repr=False)
    excluded: int
    output_rule: str
    output_rule_name: str
    output_len: int | None
    stages: tuple[Stage, ...]
    split: str | None = None
    skipped: list[Skipped] = field(default_factory=list)
    source: str = ""

    @property
    def n_short(self) -> int:
        """Requests whose recorded output count is short."""
        return int(self.requests["short_output"].sum())


def assemble_trace(
    *,
    arrival_us: np.ndarray,
    input_tokens: np.ndarray,
    output_recorded: np.ndarray,
    ttft_ms: np.ndarray,
    e2e_ms: np.ndarray,
    request_index: np.ndarray,
    stages: tuple[Stage, ...],
    output_rule: str,
    output_len: int | None,
    short_fraction: float = SHORT_FRACTION,
    file: Path | str = "",
    **meta: Any,
) -> Trace:
    """Build a :class:`Trace` from per-request arrays (arrivals already relative, sorted).

    Examples
    --------
    >>> t = assemble_trace(arrival_us=np.array([0, 10]), input_tokens=np.array([5, 6]),
    ...     output_recorded=np.array([3, 1]), ttft_ms=np.array([1.0, 1.0]), e2e_ms=np.array([5.0, 9.0]),
    ...     request_index=np.array([0, 1]), stages=(Stage(1.0, 2.0),), output_rule="profile", output_len=3,
    ...     name="t", model="m", tp=1, max_num_seqs=1, max_num_batched_tokens=8, kv_blocks=None,
    ...     block_size=None, profile="p", overloaded=False, excluded=0)
    >>> t.requests["tpot_ms"].tolist(), t.requests["output_tokens"].tolist()
    ([2.0, 4.0], [3, 3])
    """
    if output_rule not in OUTPUT_RULES:
        _bad_rule(output_rule)
    recorded = np.asarray(output_recorded, dtype=np.int64)
    kv_blocks, block_size = meta.get("kv_blocks"), meta.get("block_size")
    if kv_blocks and block_size and len(recorded):
        shortest = int(np.min(np.asarray(input_tokens, dtype=np.int64) + np.maximum(recorded, output_len or 0)))
        if kv_blocks * block_size < shortest:  # one request that does not fit is a counted rejection; none fitting
            raise DataError(f"{kv_blocks} KV blocks of {block_size} tokens ({kv_blocks * block_size} tokens) cannot "
                            f"hold even the shortest request ({shortest} tokens): the server could not have run "
                            "this trace", file=file, field="kv_blocks_total_gpu")
    if output_len is None:
        if output_rule != "recorded":
            raise DataError(f"rule {output_rule!r} needs the profile's output length", file=file, field="output_len")
        short = np.zeros(len(recorded), dtype=bool)
    else:
        short = recorded < short_fraction * output_len
    out = np.where(short, output_len, recorded) if output_rule == "profile" else recorded.copy()
    ttft = np.asarray(ttft_ms, dtype=np.float64)
    e2e = np.asarray(e2e_ms, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(out > 1, (e2e - ttft) / (out - 1), np.nan)
    if output_rule == "exclude":
        tpot = np.where(short, np.nan, tpot)
    arrivals = np.asarray(arrival_us, dtype=np.int64)
    with np.errstate(over="ignore"):
        ends = np.cumsum([s.duration_s * 1e6 for s in stages])
    stage = np.minimum(np.searchsorted(ends, arrivals, side="right"), max(len(stages) - 1, 0))
    df = pd.DataFrame(
        {
            "request_index": np.asarray(request_index, dtype=np.int64),
            "arrival_us": arrivals,
            "input_tokens": np.asarray(input_tokens, dtype=np.int64),
            "output_tokens": out.astype(np.int64),
            "output_tokens_recorded": recorded,
            "short_output": short,
            "ttft_ms": ttft,
            "e2e_ms": e2e,
            "tpot_ms": tpot,
            "stage": stage.astype(np.int64),
        }
    )
    n_short = int(short.sum())
    text = {
        "profile": f"profile: recorded output_tokens < {short_fraction:g} x output_len ({output_len}) "
        f"replaced by {output_len} ({n_short} of {len(df)} requests)",
        "recorded": "recorded: output_tokens used as recorded",
        "exclude": f"exclude: recorded output_tokens < {short_fraction:g} x output_len ({output_len}) "
        f"kept but left out of TPOT ({n_short} of {len(df)} requests)",
    }[output_rule]
    return Trace(
        requests=df,
        output_rule=text,
        output_rule_name=output_rule,
        output_len=output_len,
        stages=stages,
        **meta,
    )


def _bad_rule(rule: object) -> None:
    raise DataError(f"unknown output rule {rule!r}; choose one of {', '.join(OUTPUT_RULES)}", field="output_rule")


def _stages(profile: Any, file: Path) -> tuple[Stage, ...]:
    load = mapping(need(mapping(profile, file, ""), "load", file), file, "load")
    stages = sequence(need(load, "stages", file, "load"), file, "load.stages")
    if not stages:
        raise DataError("no load stage", file=file, field="load.stages")
    out = []
    for i, st in enumerate(stages):
        st = mapping(st, file, f"load.stages[{i}]")
        at = f"load.stages[{i}]"
        dur = as_float(need(st, "duration", file, at), file, f"{at}.duration", positive=True)
        rate = as_float(need(st, "rate", file, at), file, f"{at}.rate", positive=True)
        out.append(Stage(dur, rate))
    return tuple(out)


def _model(doc: dict, exp: Any, file: Path, exp_file: Path) -> str:
    for key in ("model_id", "model_short", "model"):
        if doc.get(key) is not None:
            return calib_model_name(doc[key], file=file, field=key)
    if isinstance(exp, dict) and exp.get("model") is not None:
        return calib_model_name(exp["model"], file=exp_file, field="model")
    raise DataError("missing key (no model_id, model_short or model)", file=file, field="model_id")


def _timing(gt: dict, key: str) -> tuple[float | None, str]:
    value = gt.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{key} is {'missing' if value is None else 'not a number'}"
    try:
        value = float(value)
    except OverflowError:
        return None, f"{key} out of range"
    if not np.isfinite(value) or value < 0:
        return None, f"{key} is {value} (needs a finite value >= 0)"
    return value, ""


def load_trace(
    run_dir: str | Path, output_rule: str = DEFAULT_OUTPUT_RULE, short_fraction: float = SHORT_FRACTION
) -> Trace:
    """Load one loaded-server run of ``data/batched/``.

    Parameters
    ----------
    run_dir : str or Path
        Folder with ``requests.json``, ``ground_truth.json``, ``profile.yaml``
        (and optionally ``exp-config.yaml``, cross-checked when present).
    output_rule : {"profile", "recorded", "exclude"}, default "profile"
        How recorded output counts far below the profile's length are
        treated; see the module docstring for the rule and the numbers behind
        the default.
    short_fraction : float, default 0.9
        "Far below" means recorded < ``short_fraction`` x ``output_len``.

    Returns
    -------
    Trace
        Requests flagged ``has_error`` are left out and counted in
        ``excluded`` (in the overloaded *reasoning* runs they are most of the
        requests; the run records no input length for them).  Requests with
        bad timings are left out and listed in ``skipped``.

    Raises
    ------
    DataError
        Missing file or key, negative or unsorted arrivals, ground truth not
        matching the requests (count or index), ``kv_blocks_total_gpu`` < 1,
        ``max_num_seqs`` < 1, unknown ``output_rule``, or no usable request.

    Examples
    --------
    >>> t = load_trace("data/batched/20260217-155451-llama-2-7b-tp1-codegen")  # doctest: +SKIP
    >>> t.model, t.tp, t.excluded, t.n_short, len(t.requests)  # doctest: +SKIP
    ('llama-2-7b-hf', 1, 0, 3101, 9000)
    """
    if output_rule not in OUTPUT_RULES:
        _bad_rule(output_rule)
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError("not a folder", file=run)
    req_file, gt_file, prof_file, exp_file = (
        run / "requests.json",
        run / "ground_truth.json",
        run / "profile.yaml",
        run / "exp-config.yaml",
    )
    doc = mapping(read_json(req_file), req_file, "")
    config = mapping(need(doc, "config", req_file), req_file, "config")

    def cfg(key: str) -> int:
        return as_int(need(config, key, req_file, "config"), req_file, f"config.{key}", minimum=1)

    tp, max_seqs, max_tokens = cfg("tensor_parallelism"), cfg("max_num_seqs"), cfg("max_num_batched_tokens")
    kv_blocks, block_size = cfg("kv_blocks_total_gpu"), cfg("block_size")
    exp = read_yaml(exp_file) if exp_file.is_file() else None
    if isinstance(exp, dict) and exp.get("tensor_parallelism") is not None:
        exp_tp = as_int(exp["tensor_parallelism"], exp_file, "tensor_parallelism", minimum=1)
        if exp_tp != tp:
            raise DataError(f"is {exp_tp}, requests.json config says {tp}", file=exp_file, field="tensor_parallelism")
    model = _model(doc, exp, req_file, exp_file)
    profile_name = as_str(need(doc, "profile", req_file), req_file, "profile")
    name = doc["experiment"] if isinstance(doc.get("experiment"), str) and doc["experiment"] else run.name
    split = doc.get("split") if isinstance(doc.get("split"), str) else None

    prof = mapping(read_yaml(prof_file), prof_file, "")
    stages = _stages(prof, prof_file)
    raw_len = dig(prof, "data", "shared_prefix", "output_len")
    if raw_len is None and output_rule != "recorded":
        message = f"missing key (output rule {output_rule!r} needs it)"
        raise DataError(message, file=prof_file, field="data.shared_prefix.output_len")
    output_len = None if raw_len is None else as_int(raw_len, prof_file, "data.shared_prefix.output_len", minimum=1)

    reqs = sequence(need(doc, "requests", req_file), req_file, "requests")
    if not reqs:
        raise DataError("no request", file=req_file, field="requests")
    gts = sequence(read_json(gt_file), gt_file, "")
    if len(gts) != len(reqs):
        message = f"{len(gts)} entries, requests.json has {len(reqs)} requests"
        raise DataError(message, file=gt_file, field="<top level>")

    n = len(reqs)
    index = np.empty(n, dtype=np.int64)
    arrival = np.empty(n, dtype=np.int64)
    inp = np.empty(n, dtype=np.int64)
    outp = np.empty(n, dtype=np.int64)
    ttft = np.full(n, np.nan)
    e2e = np.full(n, np.nan)
    keep = np.zeros(n, dtype=bool)
    excluded, skipped, seen = 0, [], set()
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
            message = f"entry {i} has index {gi}, requests.json entry {i} has {index[i]}"
            raise DataError(message, file=gt_file, field=f"[{i}].index")
        arrival[i] = as_int(need(r, "arrival_time_us", req_file, at), req_file, f"{at}.arrival_time_us", minimum=0)
        if prev is not None and arrival[i] < prev:
            raise DataError(
                f"arrivals not sorted: {arrival[i]} us is before the previous request's {prev} us",
                file=req_file,
                field=f"{at}.arrival_time_us",
            )
        prev = arrival[i]
        inp[i] = as_int(need(r, "input_tokens", req_file, at), req_file, f"{at}.input_tokens", minimum=0)
        outp[i] = as_int(need(r, "output_tokens", req_file, at), req_file, f"{at}.output_tokens", minimum=0)
        flags = [r.get("has_error", False), g.get("has_error", False)]
        for flag, fname, ffile in zip(flags, (f"{at}.has_error", f"[{i}].has_error"), (req_file, gt_file)):
            if not isinstance(flag, bool):
                raise DataError(f"expected true/false, got {flag!r}"[:80], file=ffile, field=fname)
        if any(flags):
            excluded += 1
            continue
        t, why_t = _timing(g, "ttft_s")
        e, why_e = _timing(g, "e2e_s")
        reason = why_t or why_e
        if not reason and e < t:
            reason = f"e2e_s {e:g} is below ttft_s {t:g}"
        if not reason and inp[i] < 1:
            reason = "input_tokens is 0"
        if reason:
            skipped.append(Skipped(int(index[i]), f"ground_truth.json[{i}]", reason))
            continue
        ttft[i], e2e[i], keep[i] = t * 1000.0, e * 1000.0, True
    if not keep.any():
        raise DataError(
            f"no usable request ({excluded} flagged has_error, {len(skipped)} skipped)", file=gt_file, field="has_error"
        )
    return assemble_trace(
        arrival_us=arrival[keep] - arrival[0],
        input_tokens=inp[keep],
        output_recorded=outp[keep],
        ttft_ms=ttft[keep],
        e2e_ms=e2e[keep],
        request_index=index[keep],
        stages=stages,
        output_rule=output_rule,
        output_len=output_len,
        short_fraction=short_fraction,
        file=prof_file,
        name=name,
        model=model,
        tp=tp,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=max_tokens,
        kv_blocks=kv_blocks,
        block_size=block_size,
        profile=profile_name,
        overloaded=profile_name.lower() == "reasoning",
        excluded=excluded,
        split=split,
        skipped=skipped,
        source=str(run),
    )


def list_traces(root: str | Path) -> list[Path]:
    """Run folders (holding ``requests.json``) directly under ``root``, sorted by name.

    Examples
    --------
    >>> [p.name for p in list_traces("data/batched")][:1]  # doctest: +SKIP
    ['20260217-155451-llama-2-7b-tp1-codegen']
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError("not a folder", file=base)
    return sorted(p for p in base.iterdir() if p.is_dir() and (p / "requests.json").is_file())
