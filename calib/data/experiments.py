"""Experiment summaries: the measured means of synchronous GuideLLM runs.

calib embeds the 13 experiments of the HG1 study in its own compact files
(``configs/datasets/hg1/``), written by :func:`import_hg1` from the study's
published figures.  :func:`load_experiments` returns one row per experiment
from that dataset, from another dataset folder, or from a single GuideLLM run.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from calib.data._io import as_float, as_int, read_json, read_text
from calib.data.models import calib_model_name, model_family
from calib.data.workloads import EMBEDDED_HG1, WORKLOAD_COLUMNS, Workload, load_workloads, workloads_yaml
from calib.errors import DataError

__all__ = [
    "EMBEDDED_HG1",
    "EXPERIMENT_COLUMNS",
    "COLUMNS",
    "Workload",
    "load_workloads",
    "load_experiments",
    "import_hg1",
]

#: Columns of calib's ``experiments.csv`` (in file order).
EXPERIMENT_COLUMNS = (
    "experiment",
    "model",
    "family",
    "tp",
    "workload",
    "hg1_split",
    "ttft_mean_ms",
    "tpot_mean_ms",
    "e2e_mean_ms",
)

#: Columns of the DataFrame returned by :func:`load_experiments`.
COLUMNS = (*EXPERIMENT_COLUMNS, "itl_mean_ms", "rate", *WORKLOAD_COLUMNS, "source")

#: Column names of the HG1 study's own CSV, mapped to calib's.
_SOURCE_NAMES = {
    "model_config": "model",
    "gt_ttft_mean_ms": "ttft_mean_ms",
    "gt_tpot_mean_ms": "tpot_mean_ms",
    "gt_e2e_mean_ms": "e2e_mean_ms",
}
_SPLITS = ("train", "test")
_MEANS = ("ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms")


def _read_csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV as ``(line number, {column: text})``; header names normalised."""
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [_SOURCE_NAMES.get(c.strip(), c.strip()) for c in cells]
                dupes = sorted({c for c in header if header.count(c) > 1})
                if dupes:
                    raise DataError(f"duplicate column(s) {', '.join(dupes)}", file=path, field="header")
                missing = [c for c in EXPERIMENT_COLUMNS if c not in header]
                if missing:
                    raise DataError("missing column", file=path, field=", ".join(missing))
                continue
            if len(cells) != len(header):
                raise DataError(f"{len(cells)} fields, header has {len(header)}", file=path, field=f"line {line}")
            rows.append((line, dict(zip(header, cells))))
    except csv.Error as exc:
        raise DataError(f"invalid CSV at line {reader.line_num}: {exc}", file=path) from None
    if header is None:
        raise DataError("empty file (no header)", file=path)
    if not rows:
        raise DataError("no experiment rows", file=path)
    return rows


def _row(line: int, cells: dict[str, str], path: Path, workloads: dict[str, Workload], source: str) -> dict[str, Any]:
    name = cells["experiment"].strip()
    where = f"line {line} (experiment {name!r})"
    if not name:
        raise DataError(f"line {line}: empty experiment name", file=path, field="experiment")

    def conv(col: str, fn, **kw):
        try:
            return fn(cells[col], path, col, allow_str=True, **kw)
        except DataError as exc:
            raise DataError(f"{where}: {exc.message}", file=path, field=col) from None

    out: dict[str, Any] = {"experiment": name}
    out["model"] = calib_model_name(cells["model"], file=path, field="model") if cells["model"].strip() else None
    if out["model"] is None:
        raise DataError(f"{where}: empty model name", file=path, field="model")
    out["family"] = cells["family"].strip() or model_family(out["model"])
    out["tp"] = conv("tp", as_int, minimum=1)
    wl = cells["workload"].strip()
    if wl not in workloads:
        known = ", ".join(workloads)
        message = f"{where}: unknown workload {wl!r}; workloads.yaml defines {known}"
        raise DataError(message, file=path, field="workload")
    out["workload"] = wl
    split = cells["hg1_split"].strip().lower()
    if split not in _SPLITS:
        raise DataError(f"{where}: must be 'train' or 'test', got {split!r}", file=path, field="hg1_split")
    out["hg1_split"] = split
    for col in _MEANS:
        out[col] = conv(col, as_float, positive=True)
    out["itl_mean_ms"] = float("nan")
    out["rate"] = round(1000.0 / out["e2e_mean_ms"], 6)
    if not math.isfinite(out["rate"]):
        raise DataError(f"{where}: too small to give a finite rate", file=path, field="e2e_mean_ms")
    out.update(workloads[wl].as_columns())
    out["source"] = source
    return out


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    ints = ["tp", "n_requests", "seed", "prefix_tokens", "prompt_min", "prompt_max", "output_min", "output_max"]
    df[ints] = df[ints].astype("int64")
    floats = [*_MEANS, "itl_mean_ms", "rate", "prompt_mean", "prompt_stdev", "output_mean", "output_stdev"]
    df[floats] = df[floats].astype("float64")
    # The index holds the experiment names but stays unnamed: an index level and a
    # column both called "experiment" would make groupby/merge/sort_values ambiguous.
    df.index = pd.Index(df["experiment"].tolist(), name=None)
    return df


def _load_dataset(csv_path: Path) -> pd.DataFrame:
    folder = csv_path.parent
    workloads = load_workloads(folder / "workloads.yaml")
    embedded = folder.resolve() == EMBEDDED_HG1.resolve()
    source = "configs/datasets/hg1/experiments.csv" if embedded else str(csv_path)
    rows, seen = [], {}
    for line, cells in _read_csv(csv_path):
        row = _row(line, cells, csv_path, workloads, source)
        if row["experiment"] in seen:
            raise DataError(
                f"duplicate experiment name {row['experiment']!r} (lines {seen[row['experiment']]} and {line})",
                file=csv_path,
                field="experiment",
            )
        seen[row["experiment"]] = line
        rows.append(row)
    return _frame(rows)


def _load_run(run_dir: Path) -> pd.DataFrame:
    from calib.data.guidellm import load_guidellm_run

    run = load_guidellm_run(run_dir)
    row = {
        "experiment": run.experiment,
        "model": run.model,
        "family": model_family(run.model),
        "tp": run.tp,
        "workload": run.workload.name,
        "hg1_split": None,
        "ttft_mean_ms": run.ttft_mean_ms,
        "tpot_mean_ms": run.tpot_mean_ms,
        "e2e_mean_ms": run.e2e_mean_ms,
        "itl_mean_ms": run.itl_mean_ms,
        "rate": run.rate,
        **run.workload.as_columns(),
        "source": str(run.path / "guidellm-results.json"),
    }
    return _frame([row])


def load_experiments(source: str | Path | None = None) -> pd.DataFrame:
    """Load experiment summaries, one row per experiment.

    Parameters
    ----------
    source : str or Path, optional
        ``None``: the embedded HG1 dataset (``configs/datasets/hg1``).
        A folder with ``experiments.csv`` (and ``workloads.yaml``), or that
        CSV file: that dataset; calib's column names and the HG1 study's
        (``model_config``, ``gt_*_mean_ms``) are both accepted.
        A GuideLLM run folder (with ``guidellm-results.json``): one row from
        its synchronous benchmark (see :func:`calib.data.guidellm.load_guidellm_run`).

    Returns
    -------
    pandas.DataFrame
        Indexed by experiment name (unnamed index), with the columns of
        :data:`COLUMNS`: ``experiment, model, family, tp, workload,
        hg1_split`` ('train'/'test'; missing for a GuideLLM run),
        ``ttft_mean_ms, tpot_mean_ms, e2e_mean_ms`` (measured means; TPOT is
        GuideLLM's ``time_per_output_token_ms``, which includes the first
        token), ``itl_mean_ms`` (mean of (E2E - TTFT)/(O - 1) over requests,
        only known for a GuideLLM run, else NaN), ``rate`` (req/s:
        ``round(1000 / e2e_mean_ms, 6)`` for summaries, spec §10.1; the
        GuideLLM synchronous rate for a run), the workload figures
        ``n_requests, seed, prefix_tokens, prompt_mean, prompt_stdev,
        prompt_min, prompt_max, output_mean, output_stdev, output_min,
        output_max``, and ``source``.

    Raises
    ------
    DataError
        Missing file or column, non-positive mean, ``tp`` < 1, unknown
        workload, bad split, duplicate experiment (names file, field and line).

    Examples
    --------
    >>> df = load_experiments()
    >>> len(df), int((df.hg1_split == "train").sum())
    (13, 9)
    >>> df.loc["jan30-llama2-7b-tp1-chatsweep", "rate"]
    np.float64(0.773635)
    """
    if source is None:
        return _load_dataset(EMBEDDED_HG1 / "experiments.csv")
    path = Path(source)
    if path.is_dir():
        if (path / "guidellm-results.json").is_file():
            return _load_run(path)
        if (path / "experiments.csv").is_file():
            return _load_dataset(path / "experiments.csv")
        raise DataError("folder holds neither experiments.csv nor guidellm-results.json", file=path)
    if path.is_file():
        if path.name == "guidellm-results.json":
            return _load_run(path.parent)
        return _load_dataset(path)
    raise DataError("no such file or folder", file=path)


# --------------------------------------------------------------------------- import


_WORKLOADS_HEADER = """\
Workload profiles of the 13 HG1 experiments (generated by `calib import-hg1`; do not edit).
Token counts per request: N(mean, stdev) clipped to [min, max], rounded half away from zero;
prefix_tokens are shared by every request and excluded from the prompt figures.
Figures from the HG1 perLayerOverhead study (BLIS project, Apache-2.0)."""


def _fmt(x: float) -> str:
    return repr(float(x))


def _experiments_csv(df: pd.DataFrame) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(EXPERIMENT_COLUMNS)
    for rec in df.itertuples(index=False):
        writer.writerow(
            [
                rec.experiment,
                rec.model,
                rec.family,
                int(rec.tp),
                rec.workload,
                rec.hg1_split,
                *(_fmt(getattr(rec, c)) for c in _MEANS),
            ]
        )
    return buf.getvalue()


def _lengths_json(lengths: dict[int, dict[str, list[list[int]]]]) -> str:
    blocks = []
    for seed in sorted(lengths):
        inner = ",\n".join(
            f" {json.dumps(wl)}: {json.dumps(pairs, separators=(',', ':'))}" for wl, pairs in lengths[seed].items()
        )
        blocks.append(f'"{seed}": {{\n{inner}\n}}')
    return "{\n" + ",\n".join(blocks) + "\n}\n"


_README = """\
# Embedded HG1 dataset (generated; do not edit)

Written by `calib import-hg1 SOURCE_DIR` from the HG1 study's figures
(13 synchronous GuideLLM experiments, vLLM 0.11, H100-80GB).

- `experiments.csv`: one row per experiment: model (calib name), family, tp,
  workload, hg1_split, and the measured means ttft_mean_ms, tpot_mean_ms
  (GuideLLM `time_per_output_token_ms`, first token included), e2e_mean_ms.
- `workloads.yaml`: token-count distributions of each workload (clipped normal).
- `request_lengths.json`: `{seed: {workload: [[prompt_tokens, output_tokens], ...]}}`,
  the draws of the reference simulator (Go math/rand); prompt tokens exclude the prefix.
"""


def _looks_ours(name: str, path: Path) -> bool:
    """Whether the existing ``path`` is a file ``import_hg1`` wrote (so rewriting it loses nothing of the user's)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    if name == "README.md":
        return head.startswith(_README.splitlines()[0])
    if name == "workloads.yaml":
        return head.startswith(f"# {_WORKLOADS_HEADER.splitlines()[0]}")
    if name == "experiments.csv":
        return head.splitlines()[:1] == [",".join(EXPERIMENT_COLUMNS)]
    if name == "request_lengths.json":
        lines = head.splitlines()
        return len(lines) > 1 and lines[0] == "{" and lines[1].startswith('"') and lines[1].endswith('": {')
    return False


def check_overwrite(targets: dict[str, Path], force: bool, what: str) -> None:
    """Refuse (one line) to replace an existing file that ``what`` did not write, unless ``force``."""
    if force:
        return
    for name, path in targets.items():
        if path.is_symlink() or (path.exists() and not (path.is_file() and _looks_ours(name, path))):
            raise DataError(f"exists and was not written by {what}; refusing to overwrite it (choose another --out, "
                            "or give --force)", file=path)


def _write_files(texts: dict[str, str], out: Path) -> list[Path]:
    """Write each file through a temporary file and a rename (a link is replaced, never written through)."""
    from calib.specs._files import write_atomic

    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            written.append(write_atomic(out / name, text))
    except OSError as exc:
        raise DataError(f"cannot write: {exc.strerror or exc}", file=out) from None
    return written


def import_hg1(source_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> list[Path]:
    """Write calib's compact HG1 dataset from the study's files.

    Reads ``experiments.csv``, ``workloads.yaml`` and
    ``reference_request_lengths.json`` from ``source_dir``, validates them,
    and writes ``experiments.csv``, ``workloads.yaml``,
    ``request_lengths.json`` and ``README.md`` in calib's own layout to
    ``out_dir``.  The output bytes depend only on the figures.

    Parameters
    ----------
    source_dir : str or Path
    out_dir : str or Path
        Output folder (``configs/datasets/hg1`` of the source tree updates
        the embedded dataset).
    force : bool
        Overwrite files of ``out_dir`` that an earlier import did not write
        (by default such a file is an error, so that ``--out`` naming the
        wrong folder destroys nothing).

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    DataError
        Any source file is missing or invalid, or an output file exists that
        an import did not write (without ``force``).

    Examples
    --------
    >>> import_hg1("data/hg1", "/tmp/hg1")  # doctest: +SKIP
    [PosixPath('/tmp/hg1/experiments.csv'), ...]
    """
    from calib.data.lengths import parse_lengths

    src, out = Path(source_dir), Path(out_dir)
    if not src.is_dir():
        raise DataError("not a folder", file=src)
    workloads = load_workloads(src / "workloads.yaml")
    df = _load_dataset(src / "experiments.csv")
    lengths_file = src / "reference_request_lengths.json"
    lengths = parse_lengths(read_json(lengths_file), lengths_file, workloads)
    texts = {
        "experiments.csv": _experiments_csv(df),
        "workloads.yaml": workloads_yaml(workloads, header=_WORKLOADS_HEADER),
        "request_lengths.json": _lengths_json(lengths),
        "README.md": _README,
    }
    if out.exists() and not out.is_dir():
        raise DataError("is a file, not a folder", file=out, field="--out")
    check_overwrite({name: out / name for name in texts}, force, "calib import-hg1")
    return _write_files(texts, out)

