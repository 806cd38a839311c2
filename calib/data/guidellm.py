"""A GuideLLM run folder: ``guidellm-results.json``, ``profile.yaml``, ``exp-config.yaml``.

The synchronous benchmark gives the experiment's measured means and rate
(spec §6.2, §6.6); the constant-rate benchmarks give loaded traces.

GuideLLM's per-request ``time_per_output_token_ms`` is ``latency / output
tokens`` and so includes the first token; calib keeps it as
``tpot_guidellm_ms`` and derives the inter-token latency ``itl_ms`` =
(E2E - TTFT)/(O - 1) beside it.  ``prompt_tokens`` include the shared prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calib.data._io import as_float, as_int, dig, mapping, need, read_json, read_yaml, sequence
from calib.data.models import calib_model_name
from calib.data.traces import Skipped, Stage, Trace, assemble_trace
from calib.data.workloads import RUN_SH_DEFAULTS, Workload, parse_flat_workload
from calib.errors import DataError

__all__ = ["GuidellmRun", "REQUEST_COLUMNS", "load_guidellm_run"]

#: Columns of :attr:`GuidellmRun.requests`.
REQUEST_COLUMNS = ("prompt_tokens", "output_tokens", "ttft_ms", "e2e_ms", "itl_ms", "tpot_guidellm_ms", "start_s")

#: Aggregate (``metrics.<name>.successful.mean``) and per-request key of each measured mean.
_METRICS = {
    "ttft_mean_ms": ("time_to_first_token_ms", "ttft_ms", 1.0),
    "tpot_mean_ms": ("time_per_output_token_ms", "tpot_guidellm_ms", 1.0),
    "e2e_mean_ms": ("request_latency", "e2e_ms", 1000.0),
}


@dataclass
class _Bench:
    index: int
    strategy: str
    rate: float | None
    duration: float
    requests: pd.DataFrame
    excluded: int
    skipped: list[Skipped]


@dataclass
class GuidellmRun:
    """The synchronous benchmark of a GuideLLM run, plus access to the loaded ones.

    Attributes
    ----------
    experiment : str
        The run folder's name.
    path : Path
    model, hf_model : str
        calib model name and the Hugging Face id of ``exp-config.yaml``.
    tp : int
    max_num_seqs, max_num_batched_tokens, max_model_len : int or None
        Server settings from ``exp-config.yaml``.
    rate : float
        ``len(successful) / duration`` of the synchronous benchmark (spec §6.2).
    duration_s : float
    ttft_mean_ms, tpot_mean_ms, e2e_mean_ms : float
        GuideLLM's aggregates (``metrics.*.successful.mean``; latency x 1000),
        or the mean of the per-request values when an aggregate is missing.
    itl_mean_ms : float
        Mean over requests with O > 1 of (E2E - TTFT)/(O - 1).
    means_from : dict of str to str
        ``"aggregate"`` or ``"requests"`` for each of the three means.
    requests : pandas.DataFrame
        Columns :data:`REQUEST_COLUMNS`: ``prompt_tokens`` (prefix included),
        ``output_tokens``, ``ttft_ms``, ``e2e_ms``, ``itl_ms`` (NaN when O = 1),
        ``tpot_guidellm_ms``, ``start_s`` (seconds after the first request's start; NaN if unknown).
    workload : Workload
        The ``profile.yaml`` figures (named after the run).
    profile_defaults : list of str
        Profile keys missing from ``profile.yaml`` that took the reference
        ``run.sh`` default (spec §6.1).
    skipped : list of Skipped
        Synchronous requests left out, with the reason.
    benchmark_index : int
        Position of the synchronous benchmark in ``benchmarks``.
    """

    experiment: str
    path: Path
    model: str
    hf_model: str
    tp: int
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    max_model_len: int | None
    rate: float
    duration_s: float
    ttft_mean_ms: float
    tpot_mean_ms: float
    e2e_mean_ms: float
    itl_mean_ms: float
    means_from: dict[str, str]
    requests: pd.DataFrame = field(repr=False)
    workload: Workload
    profile_defaults: list[str]
    skipped: list[Skipped]
    benchmark_index: int
    _benches: list[_Bench | DataError] = field(repr=False, default_factory=list)

    def constant_rate_benchmarks(self) -> list[Trace]:
        """Each constant-rate benchmark of the run as a :class:`Trace`.

        Arrivals are the requests' ``request_start`` times (relative to the
        benchmark's first); errored and incomplete requests are counted in
        ``excluded``; output counts are used as recorded (GuideLLM's own).

        Examples
        --------
        >>> run = load_guidellm_run("data/guidellm/jan20-codellama-prefill-1")  # doctest: +SKIP
        >>> [round(t.stages[0].rate, 3) for t in run.constant_rate_benchmarks()]  # doctest: +SKIP
        [0.759, 0.923, 1.086]
        """
        traces = []
        for b in self._benches:
            if isinstance(b, DataError):
                raise b
            df = b.requests.dropna(subset=["start_s"]).sort_values("start_s", kind="stable")
            missing = [
                Skipped(int(i), f"benchmarks[{b.index}].requests.successful[{i}]", "no request start time")
                for i in b.requests.index.difference(df.index)
            ]
            res_file, where = self.path / "guidellm-results.json", f"benchmarks[{b.index}]"
            if df.empty:
                raise DataError("no request with a start time", file=res_file, field=where)
            start = df["start_s"].to_numpy()
            with np.errstate(over="ignore", invalid="ignore"):
                offsets = (start - start[0]) * 1e6
            if not np.isfinite(offsets).all() or offsets.max() > 2**62:
                raise DataError("request start times out of range", file=res_file, field=where)
            rate = b.rate if b.rate is not None else len(b.requests) / b.duration
            if not np.isfinite(rate):
                raise DataError("too small: the rate is not finite", file=res_file, field=f"{where}.duration")
            traces.append(
                assemble_trace(
                    arrival_us=np.round(offsets).astype(np.int64),
                    input_tokens=df["prompt_tokens"].to_numpy(),
                    output_recorded=df["output_tokens"].to_numpy(),
                    ttft_ms=df["ttft_ms"].to_numpy(),
                    e2e_ms=df["e2e_ms"].to_numpy(),
                    request_index=df.index.to_numpy(),
                    stages=(Stage(b.duration, rate),),
                    output_rule="recorded",
                    output_len=None,
                    name=f"{self.experiment}/benchmarks[{b.index}]",
                    model=self.model,
                    tp=self.tp,
                    max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens,
                    kv_blocks=None,
                    block_size=None,
                    profile="guidellm-constant",
                    overloaded=False,
                    excluded=b.excluded,
                    split=None,
                    skipped=[*b.skipped, *missing],
                    source=str(self.path / "guidellm-results.json"),
                )
            )
        return traces


def _strategy(bench: dict) -> str | None:
    for root in ("config", "args"):
        value = dig(bench, root, "strategy", "type_")
        if isinstance(value, str):
            return value
    return None


def _request(r: Any, index: int, at: str, file: Path) -> tuple[dict[str, float] | None, Skipped | None]:
    try:
        r = mapping(r, file, at)
        p = as_int(need(r, "prompt_tokens", file, at), file, f"{at}.prompt_tokens", minimum=1)
        o = as_int(need(r, "output_tokens", file, at), file, f"{at}.output_tokens", minimum=1)
        ttft = as_float(need(r, "time_to_first_token_ms", file, at), file, f"{at}.time_to_first_token_ms", minimum=0)
        lat = as_float(need(r, "request_latency", file, at), file, f"{at}.request_latency", positive=True)
        tpot_key = "time_per_output_token_ms"
        tpot = as_float(need(r, tpot_key, file, at), file, f"{at}.{tpot_key}", minimum=0)
    except DataError as exc:
        return None, Skipped(index, exc.field or at, exc.message)
    e2e = lat * 1000.0
    if not np.isfinite(e2e):
        return None, Skipped(index, f"{at}.request_latency", f"latency {lat:g} s is out of range")
    if e2e < ttft:
        return None, Skipped(index, f"{at}.request_latency", f"latency {e2e:g} ms is below TTFT {ttft:g} ms")
    start = dig(r, "info", "timings", "request_start")
    if start is None:
        start = r.get("request_start_time")
    try:
        start = as_float(start, file, f"{at}.request_start_time")
    except DataError:
        start = np.nan
    itl = (e2e - ttft) / (o - 1) if o > 1 else np.nan
    row = {"prompt_tokens": p, "output_tokens": o, "ttft_ms": ttft, "e2e_ms": e2e, "itl_ms": itl,
           "tpot_guidellm_ms": tpot, "start_s": start}  # fmt: skip
    return row, None


def _bench(bench: Any, k: int, file: Path) -> _Bench:
    at = f"benchmarks[{k}]"
    bench = mapping(bench, file, at)
    duration = as_float(need(bench, "duration", file, at), file, f"{at}.duration", minimum=0)
    if duration == 0:
        raise DataError("is 0: the rate len(successful)/duration is undefined", file=file, field=f"{at}.duration")
    reqs = mapping(need(bench, "requests", file, at), file, f"{at}.requests")
    successful = sequence(need(reqs, "successful", file, f"{at}.requests"), file, f"{at}.requests.successful")
    excluded = sum(len(v) for key in ("errored", "incomplete") if isinstance(v := reqs.get(key), list))
    rows, idx, skipped = [], [], []
    for i, r in enumerate(successful):
        row, skip = _request(r, i, f"{at}.requests.successful[{i}]", file)
        if skip is not None:
            skipped.append(skip)
        else:
            rows.append(row)
            idx.append(i)
    df = pd.DataFrame(rows, columns=list(REQUEST_COLUMNS), index=pd.Index(idx, dtype="int64"))
    df = df.astype({"prompt_tokens": "int64", "output_tokens": "int64"})
    df[list(REQUEST_COLUMNS[2:])] = df[list(REQUEST_COLUMNS[2:])].astype("float64")
    try:
        rate = as_float(dig(bench, "config", "strategy", "rate"), file, f"{at}.config.strategy.rate", positive=True)
    except DataError:
        rate = None  # not a constant-rate strategy, or no usable target rate: use len/duration
    return _Bench(k, _strategy(bench) or "", rate, duration, df, excluded, skipped)


def _profile_data(data: Any, file: Path) -> dict[str, Any]:
    """The ``data:`` block of a ``profile.yaml``: a mapping, or GuideLLM's ``"k=v,k=v"`` string."""
    if data is None:
        return {}
    if isinstance(data, dict):
        return dict(data)
    if isinstance(data, str):
        out: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in data.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise DataError(f"expected key=value, got {part!r}"[:80], file=file, field="data")
            out[key.strip()] = as_float(value, file, f"data.{key.strip()}", allow_str=True)
        return out
    raise DataError("expected a mapping of token-count settings", file=file, field="data")


def _opt_int(doc: Any, key: str, file: Path) -> int | None:
    if not isinstance(doc, dict) or doc.get(key) is None:
        return None
    return as_int(doc[key], file, key, minimum=1)


def load_guidellm_run(run_dir: str | Path) -> GuidellmRun:
    """Load a GuideLLM run folder.

    Parameters
    ----------
    run_dir : str or Path
        Folder (or its ``guidellm-results.json``) holding ``guidellm-results.json``, ``exp-config.yaml`` (model, TP)
        and ``profile.yaml`` (workload figures; missing keys take the
        reference ``run.sh`` defaults, listed in ``profile_defaults``).

    Returns
    -------
    GuidellmRun

    Raises
    ------
    DataError
        Missing file or key, no synchronous benchmark (``config.strategy.type_``),
        a zero ``duration``, an invalid aggregate, or no usable synchronous
        request.  Single bad requests (no output token, missing timing) are
        left out and listed in ``skipped``.

    Examples
    --------
    >>> run = load_guidellm_run("data/guidellm/jan20-prefill-llama7b-tp1-1")  # doctest: +SKIP
    >>> run.model, run.tp, round(run.rate, 5), len(run.requests)  # doctest: +SKIP
    ('codellama-34b-instruct-hf', 1, 1.00723, 40)
    """
    run = Path(run_dir)
    if run.name == "guidellm-results.json" and run.is_file():
        run = run.parent
    if not run.is_dir():
        raise DataError("not a folder", file=run)
    res_file, exp_file, prof_file = run / "guidellm-results.json", run / "exp-config.yaml", run / "profile.yaml"

    exp = mapping(read_yaml(exp_file), exp_file, "")
    hf_model = need(exp, "model", exp_file)
    model = calib_model_name(hf_model, file=exp_file, field="model")
    tp = as_int(need(exp, "tensor_parallelism", exp_file), exp_file, "tensor_parallelism", minimum=1)

    prof = mapping(read_yaml(prof_file), prof_file, "")
    flat = _profile_data(prof.get("data"), prof_file)
    for key in ("max-requests", "random-seed"):
        if prof.get(key) is not None:
            flat[key] = prof[key]
    workload, defaulted = parse_flat_workload(run.name, flat, prof_file, "data", defaults=RUN_SH_DEFAULTS)

    doc = mapping(read_json(res_file), res_file, "")
    benches = sequence(need(doc, "benchmarks", res_file), res_file, "benchmarks")
    strategies = [_strategy(b) if isinstance(b, dict) else None for b in benches]
    if "synchronous" not in strategies:
        found = ", ".join(str(s) for s in strategies) or "none"
        raise DataError(
            f"no synchronous benchmark (strategies found: {found})",
            file=res_file,
            field="benchmarks[*].config.strategy.type_",
        )
    k = strategies.index("synchronous")
    sync = _bench(benches[k], k, res_file)
    loaded: list[_Bench | DataError] = []
    for i, b in enumerate(benches):
        if strategies[i] == "constant":
            try:
                loaded.append(_bench(b, i, res_file))
            except DataError as exc:  # reported by constant_rate_benchmarks(), not here
                loaded.append(exc)
    if sync.requests.empty:
        raise DataError(
            f"no usable synchronous request ({len(sync.skipped)} skipped: "
            f"{sync.skipped[0].field + ': ' + sync.skipped[0].reason if sync.skipped else 'list is empty'})",
            file=res_file,
            field=f"benchmarks[{k}].requests.successful",
        )
    n_successful = len(benches[k]["requests"]["successful"])
    means, means_from = {}, {}
    for attr, (metric, column, scale) in _METRICS.items():
        agg = dig(benches[k], "metrics", metric, "successful", "mean")
        if agg is None:
            means[attr], means_from[attr] = float(sync.requests[column].mean()), "requests"
        else:
            fld = f"benchmarks[{k}].metrics.{metric}.successful.mean"
            means[attr], means_from[attr] = as_float(agg, res_file, fld, positive=True) * scale, "aggregate"
    rate = n_successful / sync.duration
    if not np.isfinite(rate):
        raise DataError("too small: the rate is not finite", file=res_file, field=f"benchmarks[{k}].duration")
    for attr, value in means.items():
        if not np.isfinite(value):
            raise DataError("out of range", file=res_file, field=f"benchmarks[{k}].metrics.{_METRICS[attr][0]}")
    itl = sync.requests["itl_ms"]
    return GuidellmRun(
        experiment=run.name,
        path=run,
        model=model,
        hf_model=str(hf_model),
        tp=tp,
        max_num_seqs=_opt_int(exp, "max_num_seqs", exp_file),
        max_num_batched_tokens=_opt_int(exp, "max_num_batched_tokens", exp_file),
        max_model_len=_opt_int(exp, "max_model_len", exp_file),
        rate=rate,
        duration_s=sync.duration,
        itl_mean_ms=float(itl.mean()) if itl.notna().any() else float("nan"),
        means_from=means_from,
        requests=_relative_start(sync.requests),
        workload=workload,
        profile_defaults=defaulted,
        skipped=sync.skipped,
        benchmark_index=k,
        _benches=loaded,
        **means,
    )


def _relative_start(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if df["start_s"].notna().any():
        df["start_s"] = df["start_s"] - df["start_s"].min()
    return df.reset_index(drop=True)
