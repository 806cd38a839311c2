"""Importers of users' benchmark outputs into calib's run format (:mod:`calib.data.runs`).

One module per format, each with ``NAME``, ``DESCRIPTION`` and
``read(path, options) -> list[RunRecord]``:

=================  ======================================================================
``inference-perf``  a run folder of ``data/batched`` (or a folder of them)
``guidellm``        a GuideLLM ``guidellm-results.json`` (or its folder): one run per benchmark
``vllm-bench``      ``vllm bench serve --save-result --save-detailed`` JSON (or JSON lines)
``csv``             one row per request: ``arrival_s,input_tokens,output_tokens,ttft_ms,e2e_ms,status``
=================  ======================================================================

:func:`importer` fails loudly on an unknown format (and on a registered module
that lacks its entry points); :func:`import_runs` reads every path, refuses two
runs of one name, and writes the runs (:func:`calib.data.runs.write_run`).

Examples
--------
>>> sorted(FORMATS)
['csv', 'guidellm', 'inference-perf', 'vllm-bench']
>>> importer("excel")
Traceback (most recent call last):
...
calib.errors.ConfigError: FORMAT: unknown format 'excel'; known: csv, guidellm, inference-perf, vllm-bench
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Sequence

from calib.data.importers._common import ImportOptions
from calib.data.runs import OutputFolder, RunRecord, write_run
from calib.errors import ConfigError, DataError

__all__ = ["FORMATS", "ImportOptions", "importer", "read_runs", "import_runs"]

#: Format name -> module.
FORMATS = {
    "csv": "calib.data.importers.plain_csv",
    "guidellm": "calib.data.importers.guidellm",
    "inference-perf": "calib.data.importers.inference_perf",
    "vllm-bench": "calib.data.importers.vllm_bench",
}


def importer(fmt: str) -> ModuleType:
    """The importer module of ``fmt``.

    Raises
    ------
    ConfigError
        Unknown format (the message lists the known ones).
    RuntimeError
        A registered module that does not import or lacks ``read``/``NAME`` (a defect, not a user error).
    """
    module_name = FORMATS.get(fmt)
    if module_name is None:
        raise ConfigError(f"unknown format {fmt!r}; known: {', '.join(sorted(FORMATS))}", field="FORMAT")
    module = importlib.import_module(module_name)
    if not callable(getattr(module, "read", None)) or getattr(module, "NAME", None) != fmt:
        raise RuntimeError(f"importer module {module_name} lacks read() or NAME == {fmt!r}")
    return module


def read_runs(fmt: str, paths: Sequence[str | Path], options: ImportOptions | None = None) -> list[RunRecord]:
    """Every run of ``paths`` in format ``fmt`` (nothing written).

    Raises
    ------
    DataError
        A path is missing, a file is malformed (one line naming file and field), or two runs share a name.
    """
    module = importer(fmt)
    options = options or ImportOptions()
    records: list[RunRecord] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise DataError("not found", file=path)
        records += module.read(path, options)
    names: dict[str, int] = {}
    for r in records:
        names[r.name] = names.get(r.name, 0) + 1
    dup = sorted(n for n, k in names.items() if k > 1)
    if dup:
        raise DataError(f"{names[dup[0]]} runs would be called {dup[0]!r}; import them separately or give --name",
                        field="name")
    return records


def import_runs(fmt: str, paths: Sequence[str | Path], out: str | Path, options: ImportOptions | None = None, *,
                force: bool = False) -> list[tuple[Path, RunRecord]]:
    """Read ``paths`` (:func:`read_runs`) and write each run to ``out/<name>/``; returns (folder, record) pairs.

    Every file is checked before the first is written: a file in ``out`` that calib did not create stops
    the import (unless ``force``).
    """
    records = read_runs(fmt, paths, options)
    folder = OutputFolder(out, force=force)
    from calib.data.runs import REQUESTS_FILE, RUN_FILE

    folder.check([f"{r.name}/{f}" for r in records for f in (RUN_FILE, REQUESTS_FILE)])
    return [(write_run(r, folder), r) for r in records]
