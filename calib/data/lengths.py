"""Per-request token counts of the synchronous workloads.

Three sources:

* :func:`reference_lengths`: the exact draws of the reference simulator (Go
  ``math/rand`` seeded per run), embedded in
  ``configs/datasets/hg1/request_lengths.json`` for seed 42 and seeds 1-10.
* :func:`sample_lengths`: a NumPy sampler of the same distribution (for other
  seeds or workloads).
* :func:`quantile_lengths`: the distribution's quantiles in a seeded order (no
  sampling noise in the mean).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from calib.data._io import as_int, mapping, read_json, sequence
from calib.data.workloads import EMBEDDED_HG1, Workload
from calib.errors import DataError

__all__ = ["reference_lengths", "sample_lengths", "quantile_lengths", "parse_lengths", "available_seeds",
           "dataset_lengths_file", "LENGTHS_FILES", "file_stamp"]

#: File names of a dataset folder's reference draws: calib's own, then the HG1 study's original.
LENGTHS_FILES = ("request_lengths.json", "reference_request_lengths.json")


def parse_lengths(
    doc: Any, file: Path | str, workloads: dict[str, Workload] | None = None
) -> dict[int, dict[str, list[list[int]]]]:
    """Validate ``{seed: {workload: [[prompt, output], ...]}}``.

    Parameters
    ----------
    doc : object
        The parsed JSON.
    file : Path or str
        Named in errors.
    workloads : dict, optional
        When given, every workload must be known and have ``n_requests`` pairs.

    Returns
    -------
    dict
        Seeds as ``int`` keys, workloads in file order, pairs as lists of two ints.

    Examples
    --------
    >>> parse_lengths({"7": {"w": [[3, 4]]}}, "x.json")
    {7: {'w': [[3, 4]]}}
    """
    doc = mapping(doc, file, "")
    if not doc:
        raise DataError("no seed", file=file, field="<top level>")
    out: dict[int, dict[str, list[list[int]]]] = {}
    for seed_key, per_wl in doc.items():
        seed = as_int(seed_key, file, f"{seed_key!r} (seed)"[:60], allow_str=True)
        per_wl = mapping(per_wl, file, str(seed_key))
        out[seed] = {}
        for wl, pairs in per_wl.items():
            field = f"{seed_key}.{wl}"
            if workloads is not None and wl not in workloads:
                raise DataError(f"unknown workload; known: {', '.join(workloads)}", file=file, field=field)
            pairs = sequence(pairs, file, field)
            if workloads is not None and len(pairs) != workloads[wl].n_requests:
                raise DataError(
                    f"{len(pairs)} requests, the workload has {workloads[wl].n_requests}", file=file, field=field
                )
            clean = []
            for i, pair in enumerate(pairs):
                pair = sequence(pair, file, f"{field}[{i}]")
                if len(pair) != 2:
                    raise DataError("expected [prompt_tokens, output_tokens]", file=file, field=f"{field}[{i}]")
                prompt = as_int(pair[0], file, f"{field}[{i}][0]", minimum=0)
                clean.append([prompt, as_int(pair[1], file, f"{field}[{i}][1]", minimum=1)])
            out[seed][wl] = clean
    return out


@lru_cache(maxsize=8)
def _load(path: str, stamp: tuple) -> dict[int, dict[str, list[list[int]]]]:
    return parse_lengths(read_json(Path(path)), path)


def file_stamp(path: str | Path) -> tuple:
    """What identifies a file's contents cheaply: device, inode, size and modification time (ns).

    A file rewritten in place or replaced by a rename gets a new stamp, so caches keyed by it are never stale.
    """
    try:
        st = Path(path).stat()
    except OSError:
        raise DataError("file not found", file=path) from None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _table(path: str | Path | None) -> tuple[Path, dict[int, dict[str, list[list[int]]]]]:
    file = Path(path) if path is not None else EMBEDDED_HG1 / "request_lengths.json"
    if file.is_dir():
        file = next((file / n for n in LENGTHS_FILES if (file / n).is_file()), file / LENGTHS_FILES[0])
    return file, _load(str(file), file_stamp(file))


_EMBEDDED_SOURCE = "configs/datasets/hg1/experiments.csv"


def dataset_lengths_file(source: str | None, workload: str, figures: dict[str, Any] | None = None) -> Path | None:
    """The reference draws an experiment of ``source`` (its ``source`` column) is replayed with.

    ``None`` means the embedded HG1 draws.  A dataset folder's own
    ``request_lengths.json`` (or the HG1 study's ``reference_request_lengths.json``)
    wins.  A folder without one may use the embedded draws only for a workload
    that the embedded dataset defines with the same figures (``figures``: the
    experiment's workload columns), since draws belong to a distribution;
    otherwise the experiment has no reference draws and that is an error, not a
    silent replay of other requests.

    Raises
    ------
    DataError
        No reference draws exist for the workload of this dataset.
    """
    if not source or source == _EMBEDDED_SOURCE:
        return None
    path = Path(source)
    folder = path.parent if path.suffix else path
    try:
        stamp = folder.stat().st_mtime_ns  # a draws file added or removed changes the folder's time
    except OSError:
        stamp = None
    key = tuple(sorted((k, str(v)) for k, v in (figures or {}).items())) if figures is not None else None
    found = _resolve(str(folder), stamp, workload, key)
    if isinstance(found, DataError):  # a fresh exception each time (the cached one keeps no traceback)
        raise DataError(found.message, file=found.file, field=found.field)
    return found


@lru_cache(maxsize=4096)
def _resolve(folder_text: str, stamp, workload: str, figures: tuple | None) -> Path | None | DataError:
    folder = Path(folder_text)
    try:
        if folder.resolve() == EMBEDDED_HG1.resolve():
            return None
    except OSError:
        pass
    for name in LENGTHS_FILES:
        if (folder / name).is_file():
            return folder / name
    if figures is not None:
        from calib.data.workloads import load_workloads

        embedded = load_workloads().get(workload)
        wanted = dict(figures)
        if embedded is not None and all(_same(wanted.get(k), v) for k, v in embedded.as_columns().items()):
            return None
    return DataError(f"no reference request lengths for workload {workload!r}: the folder has no "
                     f"{LENGTHS_FILES[0]} and the embedded draws are of another workload; add the draws, or "
                     "replay with lengths: numpy", file=folder, field="lengths")


def _same(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def available_seeds(path: str | Path | None = None) -> list[int]:
    """Seeds held by a request-lengths file (default: the embedded one).

    Examples
    --------
    >>> available_seeds()
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42]
    """
    return sorted(_table(path)[1])


def reference_lengths(workload: str, seed: int = 42, path: str | Path | None = None) -> np.ndarray:
    """The reference simulator's request lengths for one workload and seed.

    Parameters
    ----------
    workload : str
        Workload name (``chatsweep``, ``codesweep``, ``summarization``).
    seed : int, default 42
    path : str or Path, optional
        A ``request_lengths.json`` (or its folder); default the embedded HG1 one.

    Returns
    -------
    numpy.ndarray
        ``int64`` array of shape ``(n, 2)``: prompt tokens (shared prefix
        excluded) and output tokens, in request order.

    Raises
    ------
    DataError
        Unknown seed or workload (the message lists what exists).

    Examples
    --------
    >>> a = reference_lengths("chatsweep", seed=42)
    >>> a.shape, a[0].tolist()
    ((50, 2), [130, 212])
    """
    file, table = _table(path)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) not in table:
        have = ", ".join(str(s) for s in sorted(table))
        raise DataError(f"no draws for seed {seed!r}; seeds available: {have}", file=file, field="seed")
    per_wl = table[int(seed)]
    if workload not in per_wl:
        raise DataError(
            f"no draws for workload {workload!r} at seed {seed}; workloads available: {', '.join(per_wl)}",
            file=file,
            field="workload",
        )
    return np.array(per_wl[workload], dtype=np.int64).reshape(-1, 2)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def sample_lengths(workload: Workload, n: int | None = None, seed: int = 42) -> np.ndarray:
    """Draw request lengths from a workload's clipped normal distributions with NumPy.

    For each request the prompt length, then the output length, is
    ``round_half_away_from_zero(clip(N(mean, stdev), min, max))``; when
    ``min == max`` the value is ``min``.  The stream is NumPy's PCG64
    (``numpy.random.default_rng(seed)``), so the draws are *distributionally*
    equivalent to the reference simulator's Go ``math/rand`` draws, not
    bit-identical: use :func:`reference_lengths` to reproduce the reference.

    Parameters
    ----------
    workload : Workload
    n : int, optional
        Number of requests; default ``workload.n_requests``.
    seed : int, default 42

    Returns
    -------
    numpy.ndarray
        ``int64`` array ``(n, 2)``: prompt tokens (prefix excluded), output tokens.

    Examples
    --------
    >>> from calib.data.workloads import load_workloads
    >>> a = sample_lengths(load_workloads()["codesweep"], n=4, seed=1)
    >>> a.shape, bool((a[:, 1] >= 6).all())
    ((4, 2), True)
    """
    z = np.random.default_rng(seed).standard_normal((_count(workload, n), 2))
    return _from_normal(workload, z)


def quantile_lengths(workload: Workload, n: int | None = None, seed: int = 42) -> np.ndarray:
    """Request lengths without sampling noise: the ``n`` quantiles of each distribution, in a seeded order.

    Request ``i`` gets, for its prompt and its output separately, the
    quantile ``(k + 0.5) / n`` of the standard normal, where ``k`` is the rank
    of its :func:`sample_lengths` draw among the ``n`` draws of that seed; the
    quantile is then scaled, clipped and rounded exactly as a draw is.  So the
    lengths have the order (which requests are long) of a NumPy sample and
    the spread of the distribution, while their mean is the distribution's
    mean up to the discretisation, whatever the seed.  A benchmark's 50 drawn
    requests stray from that mean by about ``stdev / sqrt(50)``: 15 % of the
    mean output length for ``codesweep`` (``docs/choices.md``).

    Parameters
    ----------
    workload : Workload
    n : int, optional
        Number of requests; default ``workload.n_requests``.
    seed : int, default 42
        Seed of the order.

    Returns
    -------
    numpy.ndarray
        ``int64`` array ``(n, 2)``: prompt tokens (prefix excluded), output tokens.

    Examples
    --------
    >>> from calib.data.workloads import load_workloads
    >>> a = quantile_lengths(load_workloads()["chatsweep"], seed=1)
    >>> a.shape, sorted(a[:, 1].tolist()) == sorted(quantile_lengths(load_workloads()["chatsweep"], seed=2)[:, 1])
    ((50, 2), True)
    """
    from statistics import NormalDist

    count = _count(workload, n)
    z = np.random.default_rng(seed).standard_normal((count, 2))
    inv = NormalDist().inv_cdf
    quantiles = np.array([inv((k + 0.5) / count) for k in range(count)])
    ranks = np.argsort(np.argsort(z, axis=0, kind="stable"), axis=0, kind="stable")
    return _from_normal(workload, quantiles[ranks])


def _count(workload: Workload, n: int | None) -> int:
    count = workload.n_requests if n is None else n
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise DataError(f"must be an integer >= 0, got {count!r}", field="n")
    return int(count)


def _from_normal(workload: Workload, z: np.ndarray) -> np.ndarray:
    """``round_half_away(clip(mean + stdev * z, min, max))`` per column of standard-normal values ``z`` ``(n, 2)``."""
    out = np.empty(z.shape, dtype=np.int64)
    for col, part in enumerate(("prompt", "output")):
        lo, hi = getattr(workload, f"{part}_min"), getattr(workload, f"{part}_max")
        if lo == hi:
            out[:, col] = lo
            continue
        x = getattr(workload, f"{part}_mean") + getattr(workload, f"{part}_stdev") * z[:, col]
        out[:, col] = _round_half_away(np.clip(x, lo, hi)).astype(np.int64)
    return out
