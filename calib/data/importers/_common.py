"""What the importers share: the server flags, an inference-perf style profile, the single inferred stage."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calib.data._io import as_int, dig, mapping, read_yaml
from calib.data.runs import Prefix, Server, server_config
from calib.data.traces import Stage, _stages
from calib.errors import ConfigError, DataError

__all__ = ["ImportOptions", "Profile", "read_profile", "inferred_stage", "make_server", "resolve_model",
           "run_name", "reason", "first_line", "finite_number", "need_tp", "check_no_profile"]


@dataclass(frozen=True)
class ImportOptions:
    """The flags of ``calib import`` that describe the server and the load (``None``: not given).

    Attributes
    ----------
    model : str, optional
        A shipped model name or the path of a Hugging Face ``config.json`` (required when the source
        does not name the model).
    tp : int, optional
        Tensor-parallel degree (required when the source does not give it).
    max_num_seqs, max_num_batched_tokens, kv_blocks, block_size, max_model_len : int, optional
        Server settings; a value given here wins over the source's.  Missing ones take
        :data:`calib.data.runs.SERVER_DEFAULTS` and :func:`calib.data.runs.estimate_kv_blocks`.
    profile : Path, optional
        An inference-perf style ``profile.yaml`` (``load.stages``; optional ``data.shared_prefix``
        ``output_len``, ``system_prompt_len``, ``num_unique_system_prompts``).
    output_len : int, optional
        The load generator's fixed output length (``ignore_eos``), if there was one.
    name : str, optional
        Run name (default: from the source).
    hardware : str
        Hardware of the KV-cache estimate.
    """

    model: str | None = None
    tp: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_blocks: int | None = None
    block_size: int | None = None
    max_model_len: int | None = None
    profile: Path | None = None
    output_len: int | None = None
    name: str | None = None
    hardware: str = "h100"


@dataclass(frozen=True)
class Profile:
    """The figures of an inference-perf style ``profile.yaml``."""

    stages: tuple[Stage, ...]
    output_len: int | None
    prefix: Prefix
    file: str


def read_profile(path: str | os.PathLike) -> Profile:
    """Load stages, fixed output length and shared system prompts of an inference-perf ``profile.yaml``.

    ``data.shared_prefix.system_prompt_len`` and ``num_unique_system_prompts`` that are not integers
    >= 0 count as absent (as the replay reads them).

    Raises
    ------
    DataError
        No ``load.stages``, or a bad stage or ``output_len`` (naming the file and the key).
    """
    path = Path(path)
    prof = mapping(read_yaml(path), path, "")
    stages = _stages(prof, path)
    raw_len = dig(prof, "data", "shared_prefix", "output_len")
    output_len = None if raw_len is None else as_int(raw_len, path, "data.shared_prefix.output_len", minimum=1)
    sp = dig(prof, "data", "shared_prefix") or {}
    length = sp.get("system_prompt_len", 0) if isinstance(sp, dict) else 0
    groups = sp.get("num_unique_system_prompts", 0) if isinstance(sp, dict) else 0
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (length, groups))
    prefix = Prefix(0, int(length), int(groups)) if ok else Prefix()
    return Profile(stages, output_len, prefix, str(path))


def inferred_stage(arrival_us: np.ndarray) -> tuple[Stage, str]:
    """One load stage spanning the arrivals: duration = span x n / (n - 1), rate = n / duration.

    A burst (all arrivals at one instant) is a 1 s stage at ``n`` req/s.  Returns the stage and a note.
    """
    a = np.sort(np.asarray(arrival_us, dtype=float))
    n = len(a)
    span = (a[-1] - a[0]) / 1e6 if n else 0.0
    if n < 2 or span <= 0:
        duration = 1.0
        return Stage(duration, max(n, 1) / duration), (f"no load profile: one stage inferred, a burst of {n} "
                                                        "request(s) (1 s)")
    duration = span * n / (n - 1)
    return Stage(duration, n / duration), (f"no load profile: one stage inferred from the arrivals "
                                           f"({duration:.1f} s at {n / duration:.3g} req/s)")


def resolve_model(flag: str | None, from_source: str | None, fmt: str) -> str:
    """The model: the ``--model`` flag, else the source's; a one-line error when neither names one."""
    from calib.specs import load_model

    model = flag if flag else from_source
    if not model:
        raise ConfigError(f"required for format {fmt} (the source does not name the model): a shipped model "
                          "name or the path of a config.json", field="--model")
    load_model(model)  # an unknown name or a bad config.json fails here, naming it
    return str(model)


def make_server(model: str, tp: int, options: ImportOptions, source: dict[str, Any] | None = None) -> Server:
    """The server settings: a flag wins, then the source's value, then calib's default (recorded as such)."""
    source = source or {}
    keys = ("max_num_seqs", "max_num_batched_tokens", "kv_blocks", "block_size", "max_model_len")
    values = {k: getattr(options, k) if getattr(options, k) is not None else source.get(k) for k in keys}
    return server_config(model, tp, hardware=options.hardware, **values)


def run_name(options: ImportOptions, default: str, suffix: str = "") -> str:
    """``--name`` (plus ``suffix`` when one source gives several runs), else ``default``; made folder-safe."""
    text = f"{options.name or default}{suffix}"
    safe = "".join(c if (c.isalnum() or c in "._-") else "-" for c in text).strip(".-") or "run"
    return safe


def first_line(text: Any, limit: int = 80) -> str:
    """The first non-empty line of ``text``, whitespace collapsed, cut to ``limit`` characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = " ".join(lines[0].split()) if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def reason(fld: str, why: str) -> str:
    """The ``reason`` of a ``bad`` row: ``"<field>: <why>"``."""
    return f"{fld}: {first_line(why, 100)}"


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (booleans and strings are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


def need_tp(options: ImportOptions, from_source: int | None, fmt: str) -> int:
    tp = options.tp if options.tp is not None else from_source
    if tp is None:
        raise ConfigError(f"required for format {fmt} (the source does not give the tensor-parallel degree)",
                          field="--tp")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"must be an integer >= 1, got {tp!r}", field="--tp")
    return int(tp)


def check_no_profile(options: ImportOptions, fmt: str) -> None:
    if options.profile is not None:
        raise DataError(f"not used by format {fmt} (its load stages come from the benchmark file)", field="--profile")
