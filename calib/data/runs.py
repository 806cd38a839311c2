"""calib's own run format: one small folder per run under load, and the writers that produce it.

A *run* is every request a load generator sent to one vLLM server, with the
server's configuration.  calib stores it in one folder (``docs/data-formats.md``
is the full description)::

    <run>/run.yaml          what the run was: model, TP, server settings, load stages, prefix sharing,
                            fixed output length, row counts by reason, where it was imported from
    <run>/requests.csv.gz   one row per request of the source, in arrival order (gzip CSV, columns
                            :data:`COLUMNS`); failed and unusable rows stay, with a status and a reason
    <run>/models/<name>/config.json   only when the model was given as a Hugging Face config.json

:func:`read_run` turns a folder into a :class:`~calib.data.traces.Trace` (the
same one :func:`~calib.data.traces.load_trace` makes of an inference-perf
folder) plus a :class:`RunInfo` (prefix sharing and context limit, which the
replay needs); :func:`write_run` writes a :class:`RunRecord`, atomically and
without overwriting files calib did not create (:class:`OutputFolder`).  The
importers of users' benchmark outputs (:mod:`calib.data.importers`) build
:class:`RunRecord` objects; :func:`synthetic_trace` builds a trace of Poisson
arrivals for capacity planning.

The shipped dataset (:func:`shipped_dir`) holds the 16 loaded-server runs of
``data/batched`` in this format, written by ``calib import inference-perf``.

Examples
--------
>>> [p.name for p in list_run_folders(shipped_dir())][:1]
['20260217-155451-llama-2-7b-tp1-codegen']
>>> trace, info = read_run(shipped_dir() / "20260218-155500-codellama-34b-tp2-roleplay")
>>> trace.model, trace.tp, len(trace.requests), info.prefix.shared_prompts
('codellama-34b-instruct-hf', 2, 7200, 10)
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from calib.specs._files import write_atomic
from calib.data._io import as_float, as_int, as_str, mapping, need, read_yaml, sequence
from calib.data.traces import DEFAULT_OUTPUT_RULE, OUTPUT_RULES, SHORT_FRACTION, Skipped, Stage, Trace, assemble_trace
from calib.errors import CalibError, ConfigError, DataError

__all__ = [
    "FORMAT",
    "VERSION",
    "RUN_FILE",
    "REQUESTS_FILE",
    "COLUMNS",
    "STATUSES",
    "SERVER_DEFAULTS",
    "Server",
    "Prefix",
    "RunInfo",
    "RunRecord",
    "OutputFolder",
    "shipped_dir",
    "is_run_folder",
    "list_run_folders",
    "find_run",
    "short_name",
    "read_run",
    "write_run",
    "requests_frame",
    "server_config",
    "estimate_kv_blocks",
    "weight_bytes",
    "synthetic_trace",
]

#: ``format:`` key of every ``run.yaml``.
FORMAT = "calib-run"
#: Version of the format this calib writes and reads.
VERSION = 1
RUN_FILE = "run.yaml"
REQUESTS_FILE = "requests.csv.gz"
#: Columns of ``requests.csv.gz``, in this order.
COLUMNS = ("request_index", "arrival_us", "input_tokens", "output_tokens", "ttft_ms", "e2e_ms", "status", "reason",
           "prefix_group")
#: ``ok``: replayed and compared; ``failed``: the source says the request failed (counted as ``excluded``);
#: ``bad``: the row's values cannot be used (counted in ``skipped``, the reason names the field).
STATUSES = ("ok", "failed", "bad")
#: Server settings used when neither the source nor a flag gives them: vLLM V1 ``vllm serve`` on a GPU with
#: >= 70 GiB that is not an A100 (H100: 8192 scheduled tokens per step, 1024 sequences), 16-token KV blocks.
SERVER_DEFAULTS = {"max_num_batched_tokens": 8192, "max_num_seqs": 1024, "block_size": 16}
#: ``gpu_memory_utilization`` (vLLM default) and the memory kept for activations, CUDA graphs and the
#: allocator (GiB per GPU) when the KV-cache size is estimated (:func:`estimate_kv_blocks`).
GPU_MEMORY_UTILIZATION = 0.9
RESERVED_GIB = 1.5
#: Largest ``run.yaml`` read.
_MAX_META_BYTES = 1 << 20


# ======================================================================================= records


@dataclass(frozen=True)
class Server:
    """A vLLM server's scheduler and memory settings.

    ``defaults`` names the settings that were not given (by the source or a flag) and took calib's
    default (:data:`SERVER_DEFAULTS`, :func:`estimate_kv_blocks`).  ``max_model_len`` ``None``: the
    model's ``max_position_embeddings``.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    kv_blocks: int
    block_size: int
    max_model_len: int | None = None
    defaults: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "kv_blocks": self.kv_blocks, "block_size": self.block_size, "max_model_len": self.max_model_len,
                "defaults": list(self.defaults)}


@dataclass(frozen=True)
class Prefix:
    """Prompt prefixes the requests share (vLLM caches them in full KV blocks).

    ``group_prompt_len``: tokens of the prefix shared by the requests of one ``prefix_group`` label
    (column of ``requests.csv.gz``).  ``shared_prompt_len`` / ``shared_prompts``: without labels, every
    request starts with one of ``shared_prompts`` prefixes of ``shared_prompt_len`` tokens, assigned round
    robin in arrival order (inference-perf's shared system prompts; GuideLLM's ``prefix_tokens``: one).
    """

    group_prompt_len: int = 0
    shared_prompt_len: int = 0
    shared_prompts: int = 0

    def to_dict(self) -> dict:
        return {"group_prompt_len": self.group_prompt_len, "shared_prompt_len": self.shared_prompt_len,
                "shared_prompts": self.shared_prompts}


@dataclass(frozen=True)
class RunInfo:
    """What the replay needs of a run beyond its :class:`~calib.data.traces.Trace`."""

    prefix: Prefix
    max_model_len: int | None
    server_defaults: tuple[str, ...] = ()
    source_format: str = ""
    notes: tuple[str, ...] = ()


@dataclass
class RunRecord:
    """A run ready to be written (:func:`write_run`): metadata and one row per source request.

    Attributes
    ----------
    name : str
        Folder name (letters, digits, ``.``, ``_``, ``-``).
    model : str
        A shipped model name, or the path of a Hugging Face ``config.json`` (copied into the run folder).
    tp : int
    server : Server
    profile : str
        The load profile's name (``codegen``, ``guidellm-constant``, ``csv``...).
    overloaded : bool
        The server's queue grew without bound (inference-perf *reasoning* runs): reported apart.
    output_len : int or None
        The load generator's fixed output length (``ignore_eos``); ``None`` when lengths varied.
    stages : tuple of Stage
    prefix : Prefix
    requests : pandas.DataFrame
        Columns :data:`COLUMNS` (see :func:`requests_frame`).
    source : dict
        Where the run came from: ``format``, ``path``, and anything worth keeping (written as is).
    split : str, optional
    notes : list of str
        Approximations the import made (synthesized arrivals, estimated KV cache...), in words.
    """

    name: str
    model: str
    tp: int
    server: Server
    profile: str
    overloaded: bool
    output_len: int | None
    stages: tuple[Stage, ...]
    prefix: Prefix
    requests: pd.DataFrame
    source: dict
    split: str | None = None
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        """``{"rows", "ok", "failed": {reason: n}, "bad": {reason: n}}`` of :attr:`requests`."""
        return _counts(self.requests)


def _counts(req: pd.DataFrame) -> dict:
    status = req["status"].astype(str)
    out: dict[str, Any] = {"rows": int(len(req)), "ok": int((status == "ok").sum())}
    for st in ("failed", "bad"):
        sel = req.loc[status == st, "reason"].fillna("").astype(str)
        out[st] = {str(k): int(v) for k, v in sel.value_counts().sort_index().items()}
    return out


def requests_frame(rows: Mapping[str, Sequence[Any]] | pd.DataFrame) -> pd.DataFrame:
    """The request table of a :class:`RunRecord`: columns :data:`COLUMNS`, sorted by arrival (stable).

    Missing ``prefix_group``/``reason`` columns are empty; ``arrival_us`` may hold NaN for rows whose
    arrival is unknown (they sort last and must not be ``ok``).
    """
    df = pd.DataFrame(rows).copy()
    for c in ("reason", "prefix_group"):
        if c not in df.columns:
            df[c] = ""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"request table lacks {missing}")
    df = df[list(COLUMNS)]
    df["reason"] = df["reason"].fillna("").astype(str)
    df["prefix_group"] = df["prefix_group"].fillna("").astype(str)
    bad_status = sorted(set(df["status"].astype(str)) - set(STATUSES))
    if bad_status:
        raise ValueError(f"unknown status {bad_status[0]!r}")
    order = np.lexsort((np.arange(len(df)), pd.to_numeric(df["arrival_us"], errors="coerce")
                        .fillna(np.inf).to_numpy()))
    return df.iloc[order].reset_index(drop=True)


# ======================================================================================= output folders


class OutputFolder:
    """A folder calib writes into: atomic writes, and no overwriting of files calib did not create.

    Every file written is listed in the folder's manifest ``.calib-files``; a file that exists and is
    not listed there (nor part of a calib run folder) is refused with a one-line error unless ``force``.

    Examples
    --------
    >>> import tempfile
    >>> out = OutputFolder(tempfile.mkdtemp())
    >>> out.write_text("a.txt", "one").name
    'a.txt'
    >>> out.write_text("a.txt", "two").read_text()   # calib wrote it: rewriting is fine
    'two'
    """

    MANIFEST = ".calib-files"

    def __init__(self, path: str | os.PathLike, force: bool = False):
        self.path = Path(path)
        self.force = bool(force)
        if self.path.exists() and not self.path.is_dir():
            raise CalibError("exists and is not a folder", file=self.path, field="--out")

    def _manifest(self) -> set[str]:
        p = self.path / self.MANIFEST
        if not p.is_file():
            return set()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return set()
        return {str(x) for x in data} if isinstance(data, list) else set()

    def created_by_calib(self, name: str) -> bool:
        """Whether ``name`` (relative) is a file calib wrote here (manifest, or a file of a calib run folder)."""
        if name in self._manifest():
            return True
        target = self.path / name
        return target.name in (RUN_FILE, REQUESTS_FILE) and _is_calib_meta(target.parent / RUN_FILE)

    def check(self, names: Iterable[str]) -> None:
        """Refuse (CalibError) if one of ``names`` exists and calib did not create it, unless ``force``."""
        if self.force:
            return
        for name in names:
            target = self.path / name
            if target.exists() and not self.created_by_calib(name):
                raise CalibError("exists and was not written by calib; refusing to overwrite it (use --force)",
                                 file=target, field="--out")

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``data`` to ``name`` (relative; folders created) atomically: a temporary file, then a rename."""
        self.check([name])
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data)
        known = self._manifest()
        if name not in known:
            write_atomic(self.path / self.MANIFEST, json.dumps(sorted(known | {name}), indent=0).encode())
        return target

    def claim(self, name: str) -> Path:
        """Check ``name`` like a write and list it in the manifest without writing it (a file another library
        creates, such as an Optuna SQLite database)."""
        self.check([name])
        self.path.mkdir(parents=True, exist_ok=True)
        known = self._manifest()
        if name not in known:
            write_atomic(self.path / self.MANIFEST, json.dumps(sorted(known | {name}), indent=0).encode())
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_figure(self, name: str, fig) -> Path:
        """Save a matplotlib figure as PNG (atomically) and close it."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        return self.write_bytes(name, buf.getvalue())


def _is_calib_meta(path: Path) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > _MAX_META_BYTES:
            return False
        import yaml

        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - any unreadable file is simply not calib's
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


# ======================================================================================= folders


def shipped_dir() -> Path:
    """The shipped dataset: the loaded-server runs of ``data/batched`` in calib's format (package data)."""
    from calib.resources import config_path

    return config_path("datasets", "loaded")


def is_run_folder(path: str | os.PathLike) -> bool:
    """A calib run folder (``run.yaml`` and ``requests.csv.gz``)."""
    p = Path(path)
    return (p / RUN_FILE).is_file() and (p / REQUESTS_FILE).is_file()


def list_run_folders(root: str | os.PathLike) -> list[Path]:
    """Run folders directly under ``root`` — calib's format or inference-perf's (``requests.json``) — sorted."""
    base = Path(root)
    if not base.is_dir():
        raise DataError("not a folder", file=base)
    return sorted(p for p in base.iterdir()
                  if p.is_dir() and (is_run_folder(p) or (p / "requests.json").is_file()))


def short_name(run: str) -> str:
    """A run name without its ``YYYYMMDD-HHMMSS-`` prefix (the name the reports print).

    >>> short_name("20260217-155451-llama-2-7b-tp1-codegen")
    'llama-2-7b-tp1-codegen'
    """
    parts = run.split("-", 2)
    return parts[2] if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit() else run


def find_run(name: str, roots: Sequence[str | os.PathLike]) -> Path | None:
    """The run folder called ``name`` (full or :func:`short_name`) in the first of ``roots`` that has it.

    Raises
    ------
    DataError
        A short name matches several runs of one folder.
    """
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        folders = list_run_folders(root)
        exact = [p for p in folders if p.name == name]
        if exact:
            return exact[0]
        short = [p for p in folders if short_name(p.name) == name]
        if len(short) > 1:
            raise DataError(f"run name {name!r} is ambiguous: {', '.join(p.name for p in short)}", file=root,
                            field="run")
        if short:
            return short[0]
    return None


# ======================================================================================= reading


def _opt_int(value: Any, file: Path, fld: str, minimum: int = 1) -> int | None:
    return None if value is None else as_int(value, file, fld, minimum=minimum)


def _read_meta(folder: Path) -> dict:
    path = folder / RUN_FILE
    try:
        size = path.stat().st_size
    except OSError:
        raise DataError("file not found", file=path) from None
    if size > _MAX_META_BYTES:
        raise DataError(f"larger than {_MAX_META_BYTES} bytes; not a calib run file", file=path)
    doc = mapping(read_yaml(path), path, "")
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise DataError(f"expected format: {FORMAT}, got {fmt!r}", file=path, field="format")
    version = doc.get("version")
    if version != VERSION:
        raise DataError(f"unsupported version {version!r} (this calib reads {VERSION})", file=path, field="version")
    return doc


def _meta_fields(doc: dict, folder: Path) -> dict:
    path = folder / RUN_FILE
    server = mapping(need(doc, "server", path), path, "server")

    def srv(key: str) -> int:
        return as_int(need(server, key, path, "server"), path, f"server.{key}", minimum=1)

    model_text = as_str(need(doc, "model", path), path, "model")
    if model_text.endswith(".json") or "/" in model_text:
        model_path = (folder / model_text).resolve()
        if not model_path.is_file():
            raise DataError(f"model file {model_text} not found in the run folder", file=path, field="model")
        model = str(model_path)
    else:
        model = model_text
    stages = []
    for i, st in enumerate(sequence(need(doc, "stages", path), path, "stages")):
        st = mapping(st, path, f"stages[{i}]")
        stages.append(Stage(as_float(need(st, "duration_s", path, f"stages[{i}]"), path, f"stages[{i}].duration_s",
                                     positive=True),
                            as_float(need(st, "rate", path, f"stages[{i}]"), path, f"stages[{i}].rate",
                                     positive=True)))
    if not stages:
        raise DataError("no load stage", file=path, field="stages")
    pre = mapping(doc.get("prefix") or {}, path, "prefix")
    prefix = Prefix(*(as_int(pre.get(k, 0), path, f"prefix.{k}", minimum=0)
                      for k in ("group_prompt_len", "shared_prompt_len", "shared_prompts")))
    defaults = server.get("defaults") or []
    overloaded = doc.get("overloaded", False)
    if not isinstance(overloaded, bool):
        raise DataError(f"expected true/false, got {overloaded!r}"[:80], file=path, field="overloaded")
    notes = doc.get("notes") or []
    return {
        "name": as_str(need(doc, "name", path), path, "name"),
        "model": model,
        "tp": as_int(need(doc, "tp", path), path, "tp", minimum=1),
        "max_num_seqs": srv("max_num_seqs"),
        "max_num_batched_tokens": srv("max_num_batched_tokens"),
        "kv_blocks": srv("kv_blocks"),
        "block_size": srv("block_size"),
        "max_model_len": _opt_int(server.get("max_model_len"), path, "server.max_model_len"),
        "defaults": tuple(str(d) for d in sequence(defaults, path, "server.defaults")),
        "profile": as_str(need(doc, "profile", path), path, "profile"),
        "overloaded": overloaded,
        "output_len": _opt_int(doc.get("output_len"), path, "output_len"),
        "stages": tuple(stages),
        "prefix": prefix,
        "split": doc["split"] if isinstance(doc.get("split"), str) else None,
        "source_format": str((doc.get("source") or {}).get("format", "")) if isinstance(doc.get("source"), dict)
        else "",
        "notes": tuple(str(n) for n in sequence(notes, path, "notes")),
    }


def _read_requests(folder: Path) -> pd.DataFrame:
    path = folder / REQUESTS_FILE
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError("empty file (no header)", file=path)
            header = [h.strip() for h in header]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise DataError("missing column", file=path, field=missing[0])
            unknown = [c for c in header if c not in COLUMNS]
            if unknown:
                raise DataError("unknown column", file=path, field=unknown[0])
            rows = []
            for line, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise DataError(f"line {line} has {len(row)} fields, the header {len(header)}", file=path)
                rows.append(row)
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read gzip CSV: {exc}".splitlines()[0][:160], file=path) from None
    df = pd.DataFrame(rows, columns=header, dtype=str)
    return df[list(COLUMNS)]


def _column(df: pd.DataFrame, name: str, sel: np.ndarray, path: Path, *, integer: bool, minimum: float) -> np.ndarray:
    text = df[name].to_numpy()[sel]
    values = pd.to_numeric(pd.Series(text), errors="coerce").to_numpy(dtype=float)
    lines = np.flatnonzero(sel) + 2
    bad = ~np.isfinite(values) | (values < minimum)
    if integer:
        bad |= values != np.round(values)
    if bad.any():
        k = int(np.argmax(bad))
        raise DataError(f"line {lines[k]}: expected {'an integer' if integer else 'a number'} >= {minimum:g}, "
                        f"got {text[k]!r}"[:160], file=path, field=name)
    return values.astype(np.int64) if integer else values


def read_run(folder: str | os.PathLike, output_rule: str = DEFAULT_OUTPUT_RULE,
             short_fraction: float = SHORT_FRACTION) -> tuple[Trace, RunInfo]:
    """Read a calib run folder into a :class:`~calib.data.traces.Trace` and its :class:`RunInfo`.

    Parameters
    ----------
    folder : str or path-like
    output_rule : {"profile", "recorded", "exclude"}
        As :func:`~calib.data.traces.load_trace`.  A run without a fixed output length
        (``output_len: null``) has nothing to correct: ``"profile"`` then means ``"recorded"``.
    short_fraction : float

    Returns
    -------
    (Trace, RunInfo)
        The trace holds the ``ok`` rows (its ``requests`` gain a ``prefix_group`` column);
        ``failed`` rows are counted in ``excluded`` and ``bad`` rows listed in ``skipped``.

    Raises
    ------
    DataError
        A missing or malformed file, key or value (one line naming the file and the field or line).
    """
    if output_rule not in OUTPUT_RULES:
        raise DataError(f"unknown output rule {output_rule!r}; choose one of {', '.join(OUTPUT_RULES)}",
                        field="output_rule")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("not a folder", file=folder)
    meta = _meta_fields(_read_meta(folder), folder)
    df = _read_requests(folder)
    path = folder / REQUESTS_FILE
    status = df["status"].str.strip().to_numpy()
    unknown = sorted(set(status) - set(STATUSES))
    if unknown:
        line = int(np.flatnonzero(status == unknown[0])[0]) + 2
        raise DataError(f"line {line}: unknown status {unknown[0]!r}; one of {', '.join(STATUSES)}"[:160], file=path,
                        field="status")
    ok = status == "ok"
    if not ok.any():
        raise DataError(f"no usable request (status ok) among {len(df)} rows", file=path, field="status")
    index_all = _column(df, "request_index", np.ones(len(df), bool), path, integer=True, minimum=0)
    if len(np.unique(index_all)) != len(index_all):
        raise DataError("duplicate request_index", file=path, field="request_index")
    arrival = _column(df, "arrival_us", ok, path, integer=True, minimum=0)
    back = np.flatnonzero(np.diff(arrival) < 0)
    if back.size:
        line = int(np.flatnonzero(ok)[back[0] + 1]) + 2
        raise DataError(f"line {line}: arrivals not sorted", file=path, field="arrival_us")
    inp = _column(df, "input_tokens", ok, path, integer=True, minimum=1)
    out = _column(df, "output_tokens", ok, path, integer=True, minimum=0)
    ttft = _column(df, "ttft_ms", ok, path, integer=False, minimum=0)
    e2e = _column(df, "e2e_ms", ok, path, integer=False, minimum=0)
    below = np.flatnonzero(e2e < ttft)
    if below.size:
        line = int(np.flatnonzero(ok)[below[0]]) + 2
        raise DataError(f"line {line}: e2e_ms is below ttft_ms", file=path, field="e2e_ms")
    rule = output_rule
    if meta["output_len"] is None and rule == "profile":
        rule = "recorded"
    reasons = df["reason"].to_numpy()
    skipped = []
    for i in np.flatnonzero(status == "bad"):
        fld, sep, why = str(reasons[i]).partition(": ")
        skipped.append(Skipped(int(index_all[i]), fld if sep else "", why if sep else str(reasons[i])))
    trace = assemble_trace(
        arrival_us=arrival, input_tokens=inp, output_recorded=out, ttft_ms=ttft, e2e_ms=e2e,
        request_index=index_all[ok], stages=meta["stages"], output_rule=rule, output_len=meta["output_len"],
        short_fraction=short_fraction, file=folder / RUN_FILE, name=meta["name"], model=meta["model"], tp=meta["tp"],
        max_num_seqs=meta["max_num_seqs"], max_num_batched_tokens=meta["max_num_batched_tokens"],
        kv_blocks=meta["kv_blocks"], block_size=meta["block_size"], profile=meta["profile"],
        overloaded=meta["overloaded"], excluded=int((status == "failed").sum()), split=meta["split"],
        skipped=skipped, source=str(folder))
    if rule != output_rule:
        trace = replace(trace, output_rule=f"profile (not applicable: the run has no fixed output length): "
                                           f"{trace.output_rule}")
    trace.requests["prefix_group"] = df["prefix_group"].fillna("").astype(str).to_numpy()[ok]
    info = RunInfo(meta["prefix"], meta["max_model_len"], meta["defaults"], meta["source_format"], meta["notes"])
    return trace, info


# ======================================================================================= writing


def _fmt_int(values: pd.Series) -> list[str]:
    num = pd.to_numeric(values, errors="coerce")
    return ["" if not np.isfinite(v) else str(int(v)) for v in num.to_numpy(dtype=float)]


def _fmt_ms(values: pd.Series) -> list[str]:
    num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    return ["" if not np.isfinite(v) else f"{v:.3f}" for v in num]


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _requests_bytes(req: pd.DataFrame) -> bytes:
    cols = {
        "request_index": _fmt_int(req["request_index"]),
        "arrival_us": _fmt_int(req["arrival_us"]),
        "input_tokens": _fmt_int(req["input_tokens"]),
        "output_tokens": _fmt_int(req["output_tokens"]),
        "ttft_ms": _fmt_ms(req["ttft_ms"]),
        "e2e_ms": _fmt_ms(req["e2e_ms"]),
        "status": req["status"].astype(str).tolist(),
        "reason": [_one_line(r) for r in req["reason"].astype(str)],
        "prefix_group": req["prefix_group"].astype(str).tolist(),
    }
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(zip(*(cols[c] for c in COLUMNS)))
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:  # reproducible bytes
        gz.write(text.getvalue().encode("utf-8"))
    return raw.getvalue()


def _check_name(name: str) -> str:
    ok = name and all(c.isalnum() or c in "._-" for c in name) and not name.startswith(".")
    if not ok:
        raise DataError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-'", field="name")
    return name


def write_run(record: RunRecord, out: str | os.PathLike | OutputFolder, *, force: bool = False) -> Path:
    """Write ``record`` as ``<out>/<name>/`` (``run.yaml``, ``requests.csv.gz``, the model's config.json).

    Each file is written atomically; a file calib did not create is not overwritten unless ``force``
    (:class:`OutputFolder`).  Returns the run folder.

    Raises
    ------
    DataError
        No ``ok`` row, or a bad name.
    CalibError
        A file in the way.
    """
    import yaml

    folder = out if isinstance(out, OutputFolder) else OutputFolder(out, force=force)
    name = _check_name(record.name)
    req = requests_frame(record.requests)
    counts = _counts(req)
    if counts["ok"] == 0:
        raise DataError(f"no usable request among {counts['rows']} rows", field=f"{name}: requests")
    model = record.model
    files: dict[str, bytes] = {}
    src = Path(model)
    if src.exists():  # a config.json (or a folder holding one), as load_model reads it: copied into the run
        from calib.specs import load_model

        src = (src / "config.json" if src.is_dir() else src).resolve()
        spec = load_model(src)  # validates the config before it is copied
        rel = f"models/{_check_name(spec.name or 'model')}/config.json"
        files[rel] = src.read_bytes()
        model = rel
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "model": model,
        "tp": int(record.tp),
        "server": record.server.to_dict(),
        "profile": record.profile,
        "overloaded": bool(record.overloaded),
        "output_len": record.output_len,
        "stages": [{"duration_s": float(s.duration_s), "rate": float(s.rate)} for s in record.stages],
        "prefix": record.prefix.to_dict(),
        "split": record.split,
        "rows": counts,
        "tpot": "not stored: derived per request as (e2e_ms - ttft_ms) / (output_tokens - 1)",
        "notes": list(record.notes),
        "source": _plain(record.source),
    }
    files[RUN_FILE] = ("# calib run (docs/data-formats.md); rows in requests.csv.gz\n"
                       + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)).encode("utf-8")
    files[REQUESTS_FILE] = _requests_bytes(req)
    folder.check([f"{name}/{rel}" for rel in files])
    for rel in (*[r for r in files if r not in (RUN_FILE,)], RUN_FILE):  # run.yaml last: a run is whole or absent
        folder.write_bytes(f"{name}/{rel}", files[rel])
    return folder.path / name


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Path):
        return str(value)
    return value


# ======================================================================================= server settings


def weight_bytes(model) -> float:
    """Bytes of a model's weights (all layers, all experts, embeddings and LM head), before tensor parallelism."""
    d, dkv, L = float(model.hidden_size), float(model.kv_dim), model.num_layers
    attn = d * (d + 2 * dkv) + d * d
    if model.is_moe:
        moe_layers = L if model.moe_layer_step <= 1 else L // model.moe_layer_step
        experts = 3 * d * (model.moe_intermediate_size * model.num_experts + model.shared_expert_intermediate_size)
        mlp = moe_layers * experts + (L - moe_layers) * 3 * d * model.dense_intermediate_size
    else:
        mlp = L * 3 * d * model.intermediate_size
    return (L * attn + mlp + 2 * model.vocab_size * d) * model.dtype_bytes


def estimate_kv_blocks(model, tp: int, block_size: int = 16, hardware: str = "h100") -> int:
    """KV-cache blocks vLLM would allocate: ``(0.9 x memory - weights / TP - 1.5 GiB) / block bytes per GPU``.

    On the 16 shipped runs the estimate is within 3 % of the recorded ``kv_blocks_total_gpu``.

    Raises
    ------
    ConfigError
        The weights leave no room for a KV cache (the model does not fit at this TP).
    """
    from calib.specs import load_hardware, load_model

    m = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    hw = load_hardware(hardware)
    if not hw.memory_gib:
        raise ConfigError(f"hardware {hw.name} declares no memory_gib; give --kv-blocks", field="kv_blocks")
    free = GPU_MEMORY_UTILIZATION * hw.memory_gib * 2**30 - weight_bytes(m) / tp - RESERVED_GIB * 2**30
    per_block = block_size * m.kv_bytes_per_token / tp
    blocks = int(free // per_block) if free > 0 else 0
    if blocks < 1:
        raise ConfigError(f"{m.name} at TP {tp} leaves no memory for a KV cache on {hw.name} "
                          f"({weight_bytes(m) / tp / 2**30:.1f} GiB of weights per GPU); give --kv-blocks",
                          field="kv_blocks")
    return blocks


def server_config(model, tp: int, *, max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                  kv_blocks: int | None = None, block_size: int | None = None, max_model_len: int | None = None,
                  hardware: str = "h100") -> Server:
    """A :class:`Server` from the values given; the rest take :data:`SERVER_DEFAULTS` or the KV estimate.

    >>> s = server_config("llama-2-7b-hf", 1)
    >>> s.max_num_batched_tokens, s.max_num_seqs, s.block_size, s.defaults
    (8192, 1024, 16, ('max_num_seqs', 'max_num_batched_tokens', 'kv_blocks', 'block_size'))
    """
    given = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
             "kv_blocks": kv_blocks, "block_size": block_size}
    for key, value in [*given.items(), ("max_model_len", max_model_len), ("tp", tp)]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ConfigError(f"must be an integer >= 1, got {value!r}", field=key.replace("_", "-"))
    defaults = tuple(k for k, v in given.items() if v is None)
    bs = int(block_size or SERVER_DEFAULTS["block_size"])
    return Server(
        max_num_seqs=int(max_num_seqs or SERVER_DEFAULTS["max_num_seqs"]),
        max_num_batched_tokens=int(max_num_batched_tokens or SERVER_DEFAULTS["max_num_batched_tokens"]),
        kv_blocks=int(kv_blocks) if kv_blocks is not None else estimate_kv_blocks(model, int(tp), bs, hardware),
        block_size=bs, max_model_len=int(max_model_len) if max_model_len is not None else None, defaults=defaults)


# ======================================================================================= synthetic runs


def _lengths(rng: np.random.Generator, n: int, mean: int, std: float, what: str) -> np.ndarray:
    if isinstance(mean, bool) or not isinstance(mean, (int, np.integer)) or mean < 1:
        raise ConfigError(f"must be an integer >= 1, got {mean!r}", field=what)
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std >= 0):
        raise ConfigError(f"must be a number >= 0, got {std!r}", field=f"{what}-std")
    z = rng.standard_normal(n)
    if std == 0:
        return np.full(n, int(mean), np.int64)
    return np.maximum(np.round(mean + std * z), 1).astype(np.int64)


def synthetic_trace(*, model: str, tp: int, server: Server, rate: float, duration_s: float, input_len: int,
                    output_len: int, input_std: float = 0.0, output_std: float = 0.0, seed: int = 0,
                    name: str | None = None) -> Trace:
    """A run of Poisson arrivals at ``rate`` req/s for ``duration_s`` s, with fixed or normal lengths.

    The arrival gaps are unit exponentials of ``numpy.random.default_rng(seed)`` divided by ``rate``,
    so runs at different rates share their random numbers (a higher rate is the same sequence,
    compressed in time).  Lengths: ``input_len``/``output_len`` when the standard deviation is 0, else
    normal draws rounded and clipped to >= 1.  Measured times are NaN (there is nothing to compare).

    >>> s = Server(max_num_seqs=8, max_num_batched_tokens=512, kv_blocks=100, block_size=16)
    >>> t = synthetic_trace(model="llama-2-7b-hf", tp=1, server=s, rate=2.0, duration_s=10, input_len=100,
    ...                     output_len=20, seed=0)
    >>> len(t.requests), t.stages[0].rate, int(t.requests["output_tokens"].iloc[0])
    (15, 2.0, 20)
    """
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ConfigError(f"must be a rate > 0 (req/s), got {rate!r}", field="rates")
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError(f"must be > 0 seconds, got {duration_s!r}", field="duration")
    rng = np.random.default_rng(seed)
    horizon_us = duration_s * 1e6
    gaps = rng.standard_exponential(int(rate * duration_s * 1.5) + 64)
    while gaps.sum() / rate * 1e6 < horizon_us:  # pragma: no cover - the first draw nearly always suffices
        gaps = np.concatenate([gaps, rng.standard_exponential(len(gaps))])
    times = np.concatenate([[0.0], np.cumsum(gaps)[:-1]]) / rate * 1e6
    arrival = np.round(times[times < horizon_us]).astype(np.int64)
    n = len(arrival)
    lrng = np.random.default_rng([seed, 1])
    inp = _lengths(lrng, n, input_len, input_std, "input-len")
    out = _lengths(lrng, n, output_len, output_std, "output-len")
    nan = np.full(n, np.nan)
    trace = assemble_trace(
        arrival_us=arrival, input_tokens=inp, output_recorded=out, ttft_ms=nan, e2e_ms=nan.copy(),
        request_index=np.arange(n), stages=(Stage(float(duration_s), float(rate)),), output_rule="recorded",
        output_len=None, name=name or f"poisson-{rate:g}", model=model, tp=int(tp), max_num_seqs=server.max_num_seqs,
        max_num_batched_tokens=server.max_num_batched_tokens, kv_blocks=server.kv_blocks,
        block_size=server.block_size, profile="synthetic-poisson", overloaded=False, excluded=0, source="")
    trace.requests["prefix_group"] = ""
    return trace
