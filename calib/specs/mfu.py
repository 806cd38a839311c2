"""MFU tables (InferSim ``bench_data``) and the two lookup rules of the roofline spec.

An :class:`MFUDatabase` holds one GPU's GEMM, prefill-attention and
decode-attention MFU tables.  Lookups follow spec §4.2 (``rule="nearest"``,
v2.0-v2.3) or §4.3 (``rule="interp"``, v2.4) and are vectorised with numpy.

calib keeps its own compact JSON copy of the tables (``configs/mfu/<gpu>.json``,
format marker ``calib-mfu/1``), written by :func:`import_bench_data` from a raw
``bench_data`` directory and read back by :func:`load_mfu`.  A JSON file is
parsed and validated once per process and content: :func:`load_mfu` returns the
same (immutable) :class:`MFUDatabase` for the same file and bytes, and reads an
edited file anew.

Tie-breaking, wherever the spec leaves it open: the first row in file order
wins (this is what the reference Go code does with its strict ``<`` scans).
Distances are compared squared, which orders rows exactly like the Euclidean
distance.  A table row counts as "non-zero" when its mfu is >= 1e-4.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from calib.errors import ConfigError
from calib.resources import config_path

__all__ = [
    "MFU_RULES",
    "MFU_FORMAT",
    "MFU_CONFIG_DIR",
    "MFU_ZERO",
    "TP_FALLBACKS",
    "GemmTable",
    "PrefillTable",
    "DecodeTable",
    "MFUDatabase",
    "load_mfu",
    "import_bench_data",
]

MFU_RULES = ("nearest", "interp")
TP_FALLBACKS = ("tp1", "nearest")
MFU_FORMAT = "calib-mfu/1"
#: Results below this are treated as "zero" and trigger the zero fallback (spec §4).
MFU_ZERO = 1e-4
#: Where the embedded tables live: the shipped ``configs/mfu``.
MFU_CONFIG_DIR = config_path("mfu")

_GEMM_COLS = ("m", "k", "n", "mfu")
_PREFILL_COLS = ("seq_len", "mfu")
_DECODE_COLS = ("batch_size", "kv_len", "mfu")
_PREFILL_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)\.csv$")
_DECODE_NAME = re.compile(r"^(\d+-\d+-\d+)-tp(\d+)\.csv$")
_DECODE_KEY = re.compile(r"^(\d+-\d+-\d+)-tp(\d+)$")
_ATTN_KEY = re.compile(r"^(\d+)-(\d+)-(\d+)$")
_BLOCK = 4096  # queries per block in the nearest-row search


# --------------------------------------------------------------------------- tables


def _frozen(values: ArrayLike, dtype) -> np.ndarray:
    arr = np.array(values, dtype=dtype)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class GemmTable:
    """GEMM MFU rows ``(m, k, n) -> mfu`` in the file order of ``gemm/<gpu>/data.csv``."""

    m: np.ndarray
    k: np.ndarray
    n: np.ndarray
    mfu: np.ndarray

    def __post_init__(self):
        for name in ("m", "k", "n"):
            object.__setattr__(self, name, _frozen(getattr(self, name), np.int64))
        object.__setattr__(self, "mfu", _frozen(self.mfu, np.float64))


@dataclass(frozen=True, eq=False)
class PrefillTable:
    """Prefill-attention MFU rows ``seq_len -> mfu`` in file order."""

    seq_len: np.ndarray
    mfu: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "seq_len", _frozen(self.seq_len, np.int64))
        object.__setattr__(self, "mfu", _frozen(self.mfu, np.float64))


@dataclass(frozen=True, eq=False)
class DecodeTable:
    """Decode-attention MFU rows ``(batch_size, kv_len) -> mfu`` in file order."""

    batch_size: np.ndarray
    kv_len: np.ndarray
    mfu: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "batch_size", _frozen(self.batch_size, np.int64))
        object.__setattr__(self, "kv_len", _frozen(self.kv_len, np.int64))
        object.__setattr__(self, "mfu", _frozen(self.mfu, np.float64))

    @cached_property
    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(bs_axis, kv_axis, values)``: sorted unique axes and the mfu grid, absent cells = 0."""
        bs_axis, kv_axis = np.unique(self.batch_size), np.unique(self.kv_len)
        values = np.zeros((bs_axis.size, kv_axis.size))
        values[np.searchsorted(bs_axis, self.batch_size), np.searchsorted(kv_axis, self.kv_len)] = self.mfu
        return bs_axis, kv_axis, values


# --------------------------------------------------------------------------- lookup kernels


def _closest_rows(queries, cols, *, among=None, floor_first=False) -> np.ndarray:
    """Index of the table row nearest to each query point (squared Euclidean; ties -> first row in file order).

    ``queries`` and ``cols`` are matching tuples of 1-D float arrays (query
    coordinates, table columns).  ``among`` restricts the candidate rows.  With
    ``floor_first``, the nearest row whose every coordinate is <= the query's
    wins whenever such a row exists.

    Exact but fast: rows are grouped by all coordinates but the last; inside a
    group the nearest row is one of the two neighbours of the query along the
    last coordinate (the lower one for floor rows).  So each query scores at most
    two candidates per group, never the whole table.  One binary search on the
    union of last-coordinate values serves every group, and queries go in blocks
    so the temporaries stay in cache.
    """
    union, groups = _row_groups(cols, among)

    def search(q_head, q_line, floor):
        u = np.searchsorted(union, q_line, side="right") - 1
        best = _Best(q_line.shape)
        for key, has_below, below_val, below_row, above_val, above_row in groups:
            offset = sum((h - q) ** 2 for h, q in zip(key, q_head))
            ok = has_below[u]
            if floor:
                ok = np.logical_and.reduce([ok, *(h <= q for h, q in zip(key, q_head))])
            best.offer(np.where(ok, offset + (below_val[u] - q_line) ** 2, np.inf), below_row[u])
            if not floor:
                best.offer(offset + (above_val[u] - q_line) ** 2, above_row[u])
        return best

    *q_head, q_line = queries
    out = np.empty(q_line.shape, dtype=np.intp)
    for s in range(0, q_line.size, _BLOCK):
        qh, ql = [q[s : s + _BLOCK] for q in q_head], q_line[s : s + _BLOCK]
        if floor_first:
            best = search(qh, ql, floor=True)
            found, idx = np.isfinite(best.d2), best.row
            if not found.all():
                idx[~found] = search([q[~found] for q in qh], ql[~found], floor=False).row
        else:
            idx = search(qh, ql, floor=False).row
        out[s : s + _BLOCK] = idx
    return out


_GROUPS: dict = {}


def _row_groups(cols, among):
    """The per-group neighbour tables of :func:`_closest_rows`, built once per (table columns, mask).

    Keyed on the columns' contents (tables are small), so equal tables share an entry.
    """
    key = (tuple(np.ascontiguousarray(c).tobytes() for c in cols),
           None if among is None else np.asarray(among, bool).tobytes())
    hit = _GROUPS.get(key)
    if hit is not None:
        return hit[1], hit[2]
    rows = np.arange(cols[0].size) if among is None else np.flatnonzero(among)
    line = cols[-1]
    union = np.unique(line[rows])
    keys = np.stack([c[rows] for c in cols[:-1]], axis=1) if len(cols) > 1 else np.zeros((rows.size, 0))
    groups = []
    for gkey in np.unique(keys, axis=0):
        members = rows[(keys == gkey).all(axis=1)]
        members = members[np.argsort(line[members], kind="stable")]
        # for union position u (u = -1: below every value), the group's neighbours of union[u]
        below = np.append(np.searchsorted(line[members], union, side="right") - 1, -1)
        above = np.minimum(below + 1, members.size - 1)
        has_below = below >= 0
        below = np.maximum(below, 0)
        groups.append((gkey, has_below, line[members][below], members[below], line[members][above],
                       members[above]))
    if len(_GROUPS) > 4096:
        _GROUPS.clear()
    _GROUPS[key] = (None, union, groups)
    return union, groups


class _Best:
    """Running minimum of (distance, row index) per query; ties go to the smaller row index."""

    def __init__(self, shape):
        self.d2 = np.full(shape, np.inf)
        self.row = np.full(shape, np.iinfo(np.intp).max)

    def offer(self, d2: np.ndarray, row: np.ndarray) -> None:
        better = (d2 < self.d2) | ((d2 == self.d2) & (row < self.row))
        self.d2 = np.where(better, d2, self.d2)
        self.row = np.where(better, row, self.row)


def _floor_or_first(axis: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index in sorted unique ``axis`` of the largest value <= x, else of the smallest value."""
    return np.maximum(np.searchsorted(axis, x, side="right") - 1, 0)


def _bracket(axis: np.ndarray, x: np.ndarray):
    """Spec §4.3 bracketing on a sorted unique axis: ``(lo, hi, t)``.

    Targets at or below the minimum (above the maximum) use the minimum
    (maximum); exact hits use themselves (lo == hi, t == 0); anything else
    takes floor and ceiling with t = (x - x0) / (x1 - x0).
    """
    hi = np.minimum(np.searchsorted(axis, x, side="left"), axis.size - 1)
    lo = np.where(axis[hi] <= x, hi, np.maximum(hi - 1, 0))
    x0, x1 = axis[lo].astype(float), axis[hi].astype(float)
    t = np.where(hi > lo, (x - x0) / np.where(hi > lo, x1 - x0, 1.0), 0.0)
    return lo, hi, t


def _lerp(a, b, t):
    return a + (b - a) * t


def _floats(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _check_rule(rule: str) -> None:
    if rule not in MFU_RULES:
        raise ConfigError(f"unknown rule {rule!r}; expected one of {', '.join(MFU_RULES)}", field="rule")


# --------------------------------------------------------------------------- database


@dataclass(frozen=True, eq=False)
class MFUDatabase:
    """One GPU's MFU tables plus the spec §4 lookup rules.

    Parameters
    ----------
    gpu : str
        GPU name, lower case (``"h100"``).
    gemm : GemmTable
        GEMM rows in the file order of ``data.csv``.
    prefill : Mapping[str, PrefillTable]
        Prefill tables keyed ``"nH-nKV-hd"``.
    decode : Mapping[tuple[str, int], DecodeTable]
        Decode tables keyed ``(attention key, tp)``.
    source : str
        The file or directory the tables were loaded from.

    Notes
    -----
    Use :func:`load_mfu` or :func:`import_bench_data` to build one; they
    validate the tables.  Lookups return float64 arrays of the broadcast shape
    of the query (0-d for scalar queries).  Query values are not validated:
    non-positive queries simply clamp to the smallest grid point.

    Examples
    --------
    >>> db = load_mfu("h100")
    >>> db.gpu, len(db.gemm.m), sorted(db.prefill)[:2]
    ('h100', 112, ['28-4-128', '32-32-128'])
    """

    gpu: str
    gemm: GemmTable
    prefill: Mapping[str, PrefillTable]
    decode: Mapping[tuple[str, int], DecodeTable]
    source: str

    def __post_init__(self):
        # plain sorted dicts (not MappingProxyType) so that the database pickles for worker processes
        object.__setattr__(self, "prefill", dict(sorted(self.prefill.items())))
        object.__setattr__(self, "decode", dict(sorted(self.decode.items())))

    # ---- attention key

    def attention_key(self, n_heads: int, n_kv_heads: int, head_dim: int) -> str:
        """Attention table key for a model shape (spec §4.1).

        The exact ``"{nH}-{nKV}-{hd}"`` if a prefill table exists for it, else the
        prefill key with the smallest unweighted Euclidean distance on
        ``(nH, nKV, hd)``.  Ties go to the first key in sorted (string) key order,
        as the reference scan over a sorted glob does.  The same key serves both
        the prefill and the decode tables.

        Examples
        --------
        >>> db = load_mfu("h100")
        >>> db.attention_key(40, 8, 128), db.attention_key(64, 8, 128)
        ('32-8-128', '64-8-128')
        """
        shape = (n_heads, n_kv_heads, head_dim)
        for name, value in zip(("n_heads", "n_kv_heads", "head_dim"), shape):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"must be a positive integer, got {value!r}", file=self.source, field=name)
        key = "-".join(str(int(v)) for v in shape)
        if key in self.prefill:
            return key
        keys = list(self.prefill)  # sorted
        dist = [sum((a - b) ** 2 for a, b in zip(shape, map(int, k.split("-")))) for k in keys]
        return keys[int(np.argmin(dist))]

    # ---- GEMM

    def gemm_mfu(self, m: ArrayLike, k: int, n: int, rule: str = "nearest") -> np.ndarray:
        """GEMM MFU for shapes ``(m, k, n)``, vectorised over ``m`` (spec §4.2 / §4.3).

        Stage 1 picks one table ``(k, n)``: among pairs with k >= K and n >= N the
        closest to ``(K, N)`` (ties: first in file order).  If none qualifies,
        ``nearest`` uses the ``(k, n)`` of the last file row and ``interp`` the pair
        with the largest k² + n² (ties: first in file order).  Stage 2, within
        that pair: ``nearest`` takes the mfu of the largest m <= M (else of the
        smallest m); ``interp`` interpolates linearly in m, clamped at the ends.
        Results < 1e-4 fall back to the first file row with mfu >= 1e-4
        (``nearest``) or to the non-zero row nearest in squared ``(m, k, n)``
        distance to the query (``interp``; ties: first in file order).

        Examples
        --------
        >>> db = load_mfu("h100")
        >>> [float(db.gemm_mfu(1, k, n)) for k, n in [(4096, 4096), (4096, 11008), (11008, 4096)]]
        [0.013, 0.015, 0.017]
        >>> db.gemm_mfu([512, 768], 4096, 4096, rule="interp").round(4).tolist()
        [0.495, 0.544]
        """
        _check_rule(rule)
        g = self.gemm
        m = _floats(m)
        shape, m = m.shape, m.ravel()
        fits = (g.k >= k) & (g.n >= n)
        if fits.any():
            d2 = (g.k - k).astype(float) ** 2 + (g.n - n).astype(float) ** 2
            row = int(np.argmin(np.where(fits, d2, np.inf)))
        elif rule == "nearest":
            row = g.m.size - 1
        else:
            row = int(np.argmax(g.k.astype(float) ** 2 + g.n.astype(float) ** 2))
        rows = np.flatnonzero((g.k == g.k[row]) & (g.n == g.n[row]))
        rows = rows[np.argsort(g.m[rows], kind="stable")]
        m_axis, mfu_axis = g.m[rows], g.mfu[rows]
        if rule == "nearest":
            out = mfu_axis[_floor_or_first(m_axis, m)]
        else:
            lo, hi, t = _bracket(m_axis, m)
            out = _lerp(mfu_axis[lo], mfu_axis[hi], t)
        low = out < MFU_ZERO
        if low.any():
            nonzero = g.mfu >= MFU_ZERO
            if rule == "nearest":
                out = np.where(low, g.mfu[np.argmax(nonzero)], out)
            else:
                q = m[low]
                idx = _closest_rows(
                    (np.full_like(q, k), np.full_like(q, n), q),
                    (g.k.astype(float), g.n.astype(float), g.m.astype(float)),
                    among=nonzero,
                )
                out = out.copy()
                out[low] = g.mfu[idx]
        return out.reshape(shape)

    # ---- prefill attention

    def prefill_mfu(self, key: str, seq: ArrayLike, rule: str = "nearest") -> np.ndarray:
        """Prefill-attention MFU at sequence length(s) ``seq``, vectorised (spec §4.2 / §4.3).

        ``nearest``: floor-preferring nearest neighbour (the largest seq_len <= seq,
        else the smallest seq_len).  ``interp``: linear in seq_len, clamped at the
        ends.  Results < 1e-4 fall back to the non-zero row nearest in
        ``|seq_len - seq|`` (ties: first in file order).

        Examples
        --------
        >>> db = load_mfu("h100")
        >>> float(db.prefill_mfu("32-32-128", 512)), float(db.prefill_mfu("32-32-128", 512, rule="interp"))
        (0.224, 0.224)
        """
        _check_rule(rule)
        if key not in self.prefill:
            raise ConfigError(
                f"unknown attention key {key!r}; available: {', '.join(self.prefill)} (see attention_key())",
                file=self.source,
                field="key",
            )
        table = self.prefill[key]
        seq = _floats(seq)
        shape, seq = seq.shape, seq.ravel()
        order = np.argsort(table.seq_len, kind="stable")
        axis, vals = table.seq_len[order], table.mfu[order]
        if rule == "nearest":
            out = vals[_floor_or_first(axis, seq)]
        else:
            lo, hi, t = _bracket(axis, seq)
            out = _lerp(vals[lo], vals[hi], t)
        low = out < MFU_ZERO
        if low.any():
            out = out.copy()
            idx = _closest_rows((seq[low],), (table.seq_len.astype(float),), among=table.mfu >= MFU_ZERO)
            out[low] = table.mfu[idx]
        return out.reshape(shape)

    # ---- decode attention

    def decode_table(self, key: str, tp: int, tp_fallback: str = "tp1") -> DecodeTable:
        """The decode table for ``(key, tp)``, with the spec §3.7 fallback when it is absent.

        ``tp_fallback="tp1"`` (v2.0-2.3) uses the tp1 table; ``"nearest"`` (v2.4)
        uses the available TP closest to ``tp`` (ties: the smaller TP).

        Examples
        --------
        >>> db = load_mfu("h100")
        >>> db.decode_table("32-32-128", 8, "nearest") is db.decode[("32-32-128", 4)]
        True
        """
        if tp_fallback not in TP_FALLBACKS:
            raise ConfigError(
                f"unknown tp_fallback {tp_fallback!r}; expected one of {', '.join(TP_FALLBACKS)}", field="tp_fallback"
            )
        if (key, tp) in self.decode:
            return self.decode[(key, tp)]
        tps = sorted(t for k, t in self.decode if k == key)
        if not tps:
            raise ConfigError(f"no decode table for attention key {key!r}", file=self.source, field="key")
        if tp_fallback == "tp1":
            if 1 not in tps:
                raise ConfigError(f"no decode table for {key}-tp{tp} nor {key}-tp1", file=self.source, field="tp")
            return self.decode[(key, 1)]
        return self.decode[(key, min(tps, key=lambda t: abs(t - tp)))]

    def decode_mfu(
        self,
        key: str,
        tp: int,
        batch_size: ArrayLike,
        kv_len: ArrayLike,
        rule: str = "nearest",
        tp_fallback: str | None = None,
    ) -> np.ndarray:
        """Decode-attention MFU at ``(batch_size, kv_len)``, broadcast and vectorised (spec §4.2 / §4.3).

        ``nearest``: floor-preferring nearest neighbour on ``(bs, kv)`` in raw
        units: the closest row with bs_row <= bs and kv_row <= kv if one exists,
        else the closest row (ties: first in file order).  ``interp``: bilinear
        on the grid of the table's unique bs and kv values (bs first, then kv),
        clamped at the edges, absent cells counting as 0.  Results < 1e-4 fall
        back to the non-zero row nearest to the query in 2-D Euclidean distance
        (ties: first in file order).  A missing TP table is replaced per
        ``tp_fallback`` (see :meth:`decode_table`); ``None`` means ``"tp1"`` for
        ``nearest`` and ``"nearest"`` for ``interp``.

        Examples
        --------
        >>> db = load_mfu("h100")
        >>> float(db.decode_mfu("32-32-128", 1, 1, 1000)), float(db.decode_mfu("32-32-128", 1, 1, 512))
        (0.001, 0.003)
        >>> round(float(db.decode_mfu("32-32-128", 1, 1, 1000, rule="interp")), 6)
        0.000953
        """
        _check_rule(rule)
        if tp_fallback is None:
            tp_fallback = "tp1" if rule == "nearest" else "nearest"
        table = self.decode_table(key, tp, tp_fallback)
        bs, kv = np.broadcast_arrays(_floats(batch_size), _floats(kv_len))
        shape, bs, kv = bs.shape, bs.ravel(), kv.ravel()
        cols = (table.batch_size.astype(float), table.kv_len.astype(float))
        if rule == "nearest":
            out = table.mfu[_closest_rows((bs, kv), cols, floor_first=True)]
        else:
            bs_axis, kv_axis, grid = table.grid
            i0, i1, tb = _bracket(bs_axis, bs)
            j0, j1, tk = _bracket(kv_axis, kv)
            top = _lerp(grid[i0, j0], grid[i1, j0], tb)
            bottom = _lerp(grid[i0, j1], grid[i1, j1], tb)
            out = _lerp(top, bottom, tk)
        low = out < MFU_ZERO
        if low.any():
            out = out.copy()
            out[low] = table.mfu[_closest_rows((bs[low], kv[low]), cols, among=table.mfu >= MFU_ZERO)]
        return out.reshape(shape)


# --------------------------------------------------------------------------- validation


def _columns(raw: Mapping[str, Sequence], names: Sequence[str], file, where: str, row_label: Callable[[int], str]):
    """Validate raw column values and return ``{name: array}``.

    Checks: every column present and of equal length, at least one row,
    finite numbers, key columns positive integers, 0 <= mfu <= 1, no duplicate
    keys and at least one mfu >= 1e-4.  ``where`` prefixes field names.
    """
    import pandas as pd  # only to validate tables (a cached load_mfu, ``calib --help`` never get here)

    out: dict[str, np.ndarray] = {}
    for name in names:
        field = where + name
        if name not in raw:
            raise ConfigError("missing column", file=file, field=field)
        values = list(raw[name])
        if not values:
            raise ConfigError("table has no rows", file=file, field=field)
        floats = pd.to_numeric(pd.Series([None if isinstance(v, int) and abs(v) > 2**62 else v for v in values],
                                         dtype=object), errors="coerce").to_numpy(dtype=float)  # huge ints: NaN
        if isinstance(raw[name], list):  # JSON: reject booleans and strings outright
            floats = np.where([isinstance(v, bool) or not isinstance(v, (int, float)) for v in values], np.nan, floats)
        bad = ~np.isfinite(floats)
        if name == "mfu":
            bad |= (floats < 0) | (floats > 1)
            expect = "a number in [0, 1]"
        else:
            bad |= (floats <= 0) | (floats != np.round(floats)) | (floats > 2**62)  # > 2**62: no int64
            expect = "a positive integer"
        if bad.any():
            i = int(np.argmax(bad))
            raise ConfigError(f"{row_label(i)}: expected {expect}, got {values[i]!r}", file=file, field=field)
        out[name] = floats.astype(np.int64) if name != "mfu" else floats
    lengths = {len(v) for v in out.values()}
    if len(lengths) != 1:
        raise ConfigError(f"columns {', '.join(names)} differ in length", file=file, field=where.rstrip(".") or None)
    keys = [n for n in names if n != "mfu"]
    dup = pd.DataFrame({n: out[n] for n in keys}).duplicated().to_numpy()
    if dup.any():
        i = int(np.argmax(dup))
        raise ConfigError(f"{row_label(i)}: duplicate row for this {','.join(keys)}", file=file, field=where + keys[-1])
    if not (out["mfu"] >= MFU_ZERO).any():
        raise ConfigError(f"every mfu is < {MFU_ZERO}", file=file, field=where + "mfu")
    return out


def _read_csv(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    import io

    import pandas as pd

    from calib.specs._files import read_text

    text = read_text(path, None, ConfigError)
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, skipinitialspace=True, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise ConfigError(f"cannot parse CSV ({exc})", file=path) from None
    df.columns = [str(c).strip() for c in df.columns]
    raw = {c: df[c].str.strip().to_numpy(dtype=object) for c in names if c in df.columns}
    return _columns(raw, names, path, "", lambda i: f"line {i + 2}")


def _gpu_dir(parent: Path, gpu: str) -> Path:
    if not parent.is_dir():
        raise ConfigError("directory not found", file=parent)
    hits = sorted(d for d in parent.iterdir() if d.is_dir() and d.name.lower() == gpu.lower())
    if len(hits) != 1:
        names = sorted(d.name for d in parent.iterdir() if d.is_dir())
        what = "no data" if not hits else "several directories"
        raise ConfigError(f"{what} for GPU {gpu!r}; available: {', '.join(names) or 'none'}", file=parent, field="gpu")
    return hits[0]


# --------------------------------------------------------------------------- import / write / load


def import_bench_data(bench_dir: str | Path, gpu: str, out: str | Path | None = None, *,
                      force: bool = False) -> MFUDatabase:
    """Read one GPU's tables from a raw InferSim ``bench_data`` directory.

    Reads ``gemm/<gpu>/data.csv``, ``mha/prefill/<gpu>/<nH>-<nKV>-<hd>.csv`` and
    ``mha/decode/<gpu>/<nH>-<nKV>-<hd>-tp<T>.csv`` (GPU directories matched
    case-insensitively; other files without a ``.csv`` suffix are ignored),
    validates them and keeps only the key columns and ``mfu`` in file order.

    Parameters
    ----------
    bench_dir : str or Path
        The ``bench_data`` directory.
    gpu : str
        GPU name, any case (``"h100"``).
    out : str or Path, optional
        If given, write calib's compact JSON there (deterministic bytes).
    force : bool
        Overwrite ``out`` even when it is not an MFU file calib wrote (by
        default that is an error: ``--out`` naming the wrong file destroys
        nothing).

    Returns
    -------
    MFUDatabase
        With ``source`` set to ``bench_dir``.

    Raises
    ------
    ConfigError
        Naming the file and column of the first problem found.

    Examples
    --------
    >>> db = import_bench_data("data/bench_data", "H100")  # doctest: +SKIP
    >>> len(db.decode)  # doctest: +SKIP
    18
    """
    bench = Path(bench_dir)
    if not bench.is_dir():
        raise ConfigError("bench_data directory not found", file=bench)
    if out is not None and not force:
        target = Path(out)
        if target.is_symlink() or (target.exists() and not (target.is_file() and _written_by_import(target))):
            raise ConfigError("exists and is not an MFU file calib wrote; refusing to overwrite it (choose another "
                              "--out, or give --force)", file=target)
    gemm = GemmTable(**_read_csv(_gpu_dir(bench / "gemm", gpu) / "data.csv", _GEMM_COLS))

    prefill_dir = _gpu_dir(bench / "mha" / "prefill", gpu)
    prefill = {}
    for path in sorted(prefill_dir.glob("*.csv")):
        if not _PREFILL_NAME.match(path.name):
            raise ConfigError("prefill file name must be <nH>-<nKV>-<hd>.csv", file=path, field="file name")
        prefill[path.stem] = PrefillTable(**_read_csv(path, _PREFILL_COLS))
    if not prefill:
        raise ConfigError("no prefill tables <nH>-<nKV>-<hd>.csv", file=prefill_dir)

    decode_dir = _gpu_dir(bench / "mha" / "decode", gpu)
    decode = {}
    for path in sorted(decode_dir.glob("*.csv")):
        match = _DECODE_NAME.match(path.name)
        if not match or int(match[2]) < 1:
            raise ConfigError("decode file name must be <nH>-<nKV>-<hd>-tp<T>.csv, T >= 1", file=path, field="file name")
        decode[(match[1], int(match[2]))] = DecodeTable(**_read_csv(path, _DECODE_COLS))
    if not decode:
        raise ConfigError("no decode tables <nH>-<nKV>-<hd>-tp<T>.csv", file=decode_dir)

    db = MFUDatabase(gpu=gpu.lower(), gemm=gemm, prefill=prefill, decode=decode, source=str(bench))
    if out is not None:
        _write_json(db, Path(out))
    return db


def _json_number_list(values: np.ndarray) -> str:
    return "[" + ", ".join(json.dumps(v.item()) for v in values) + "]"


def _json_table(columns: dict[str, np.ndarray], indent: str) -> str:
    body = ",\n".join(f'{indent}  "{name}": {_json_number_list(v)}' for name, v in columns.items())
    return "{\n" + body + "\n" + indent + "}"


def _write_json(db: MFUDatabase, out: Path) -> None:
    """Write calib's compact JSON: tables sorted by key, rows in file order, one column per line."""

    def tables(items):
        return ",\n".join(f'    "{name}": {_json_table(cols, "    ")}' for name, cols in items)

    gemm = {c: getattr(db.gemm, c) for c in _GEMM_COLS}
    prefill = [(k, {c: getattr(t, c) for c in _PREFILL_COLS}) for k, t in db.prefill.items()]
    decode = sorted((f"{k}-tp{tp}", {c: getattr(t, c) for c in _DECODE_COLS}) for (k, tp), t in db.decode.items())
    source = (
        f"InferSim bench_data for {db.gpu}: gemm/{db.gpu}/data.csv, mha/prefill/{db.gpu}/*.csv, "
        f"mha/decode/{db.gpu}/*-tp*.csv; only the key columns and mfu kept, rows in file order"
    )
    text = (
        "{\n"
        f'  "format": {json.dumps(MFU_FORMAT)},\n'
        f'  "gpu": {json.dumps(db.gpu)},\n'
        f'  "source": {json.dumps(source)},\n'
        f'  "gemm": {_json_table(gemm, "  ")},\n'
        f'  "prefill": {{\n{tables(prefill)}\n  }},\n'
        f'  "decode": {{\n{tables(decode)}\n  }}\n'
        "}\n"
    )
    from calib.specs._files import write_atomic

    try:
        if out.exists() and not out.is_file():
            raise ConfigError("is not a file", file=out, field="--out")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text)  # whole or not at all; a link at ``out`` is replaced, not written through
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc.strerror or exc}", file=out) from None


def _written_by_import(path: Path) -> bool:
    """Whether ``path`` holds calib's MFU JSON (the ``format`` marker in its first lines)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(200).decode("utf-8", errors="replace")
    except OSError:
        return False
    return f'"format": {json.dumps(MFU_FORMAT)}' in head


#: (path as given, digest of the file's bytes) -> MFUDatabase: one parse per process and content
_LOADED: dict[tuple[str, bytes], MFUDatabase] = {}
_MAX_LOADED = 32


def _read_json(path: Path) -> MFUDatabase:
    """The database of a calib MFU JSON file, parsed and validated once per content.

    The file is read every time (a few tens of microseconds) and the cache is
    keyed by its bytes, not its modification time: an edit within the file
    system's timestamp granularity is never missed.  The database is immutable
    (read-only arrays, frozen dataclasses), so callers share it.
    """
    from calib.specs._files import read_text

    text = read_text(path, None, ConfigError)
    key = (str(path), hashlib.blake2b(text.encode("utf-8"), digest_size=20).digest())
    db = _LOADED.get(key)
    if db is None:
        db = _parse_json(path, text)
        if len(_LOADED) >= _MAX_LOADED:
            _LOADED.clear()
        _LOADED[key] = db
    return db


def _parse_json(path: Path, text: str) -> MFUDatabase:
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"cannot read JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                          file=path) from None
    if not isinstance(doc, dict) or doc.get("format") != MFU_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise ConfigError(f"expected format {MFU_FORMAT!r}, got {got!r}", file=path, field="format")
    for name, kind in (("gpu", str), ("gemm", dict), ("prefill", dict), ("decode", dict)):
        if not isinstance(doc.get(name), kind):
            raise ConfigError(f"missing or not a {kind.__name__}", file=path, field=name)

    def table(raw, names, where):
        if not isinstance(raw, dict):
            raise ConfigError("expected an object of columns", file=path, field=where.rstrip("."))
        cols = {n: raw[n] for n in names if n in raw}
        for n, v in cols.items():
            if not isinstance(v, list):
                raise ConfigError("expected a list of numbers", file=path, field=where + n)
        return _columns(cols, names, path, where, lambda i: f"entry {i}")

    prefill, decode = {}, {}
    for key, raw in doc["prefill"].items():
        if not _ATTN_KEY.match(key):
            raise ConfigError("key must be <nH>-<nKV>-<hd>", file=path, field=f"prefill.{key}")
        prefill[key] = PrefillTable(**table(raw, _PREFILL_COLS, f"prefill.{key}."))
    for key, raw in doc["decode"].items():
        match = _DECODE_KEY.match(key)
        if not match or int(match[2]) < 1:
            raise ConfigError("key must be <nH>-<nKV>-<hd>-tp<T>, T >= 1", file=path, field=f"decode.{key}")
        decode[(match[1], int(match[2]))] = DecodeTable(**table(raw, _DECODE_COLS, f"decode.{key}."))
    if not prefill or not decode:
        raise ConfigError("no tables", file=path, field="prefill" if not prefill else "decode")
    gemm = GemmTable(**table(doc["gemm"], _GEMM_COLS, "gemm."))
    return MFUDatabase(gpu=doc["gpu"], gemm=gemm, prefill=prefill, decode=decode, source=str(path))


def _embedded_names() -> list[str]:
    return sorted(p.stem for p in MFU_CONFIG_DIR.glob("*.json"))


def load_mfu(name_or_path: str | Path, *, gpu: str | None = None) -> MFUDatabase:
    """Load an MFU database by GPU name, calib JSON file or raw ``bench_data`` directory.

    Parameters
    ----------
    name_or_path : str or Path
        A short GPU name such as ``"h100"`` (case-insensitive), read from
        the shipped ``configs/mfu/<name>.json``; or the path of a calib MFU JSON file;
        or the path of a raw ``bench_data`` directory, imported in memory.
    gpu : str, optional
        Which GPU to import from a ``bench_data`` directory.  Needed only when
        the directory holds several GPUs (matched case-insensitively).

    Raises
    ------
    ConfigError
        Unknown GPU name (the message lists the available ones), missing file,
        or invalid tables.

    Examples
    --------
    >>> db = load_mfu("H100")
    >>> db.gpu, db.source.endswith("h100.json")
    ('h100', True)
    """
    text = str(name_or_path)
    is_name = isinstance(name_or_path, str) and not re.search(r"[/\\]", text) and not text.endswith(".json")
    if is_name and (MFU_CONFIG_DIR / f"{text.lower()}.json").is_file():
        return _read_json(MFU_CONFIG_DIR / f"{text.lower()}.json")
    path = Path(name_or_path)
    if path.is_dir():
        gpus = sorted(d.name for d in (path / "gemm").iterdir() if d.is_dir()) if (path / "gemm").is_dir() else []
        if gpu is None:
            if len(gpus) != 1:
                raise ConfigError(
                    f"pass gpu=...: bench_data holds {len(gpus)} GPUs ({', '.join(gpus) or 'none'})", file=path, field="gpu"
                )
            gpu = gpus[0]
        return import_bench_data(path, gpu)
    if path.is_file():
        return _read_json(path)
    if is_name:
        raise ConfigError(
            f"unknown GPU {text!r}; available: {', '.join(_embedded_names()) or 'none'}", file=MFU_CONFIG_DIR, field="gpu"
        )
    raise ConfigError("file not found", file=path)
