"""Workload profiles: the token-count distributions behind the synchronous runs.

A :class:`Workload` holds the figures of one GuideLLM ``data`` profile:
request count, seed, shared prefix, and a clipped normal distribution for the
prompt (prefix excluded) and output lengths.  Two file layouts are read:

* calib's own (``configs/datasets/hg1/workloads.yaml``)::

      workloads:
        chatsweep:
          requests: 50
          seed: 42
          prefix_tokens: 284
          prompt_tokens: {mean: 70, stdev: 35, min: 2, max: 200}
          output_tokens: {mean: 215, stdev: 80, min: 1, max: 512}

* GuideLLM's flat keys, as in the HG1 study's ``workloads.yaml`` and in a
  run's ``profile.yaml`` ``data:`` block (``prompt_tokens``,
  ``prompt_tokens_stdev``, ``..._min``, ``..._max``, ``max_requests``,
  ``random_seed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from calib.data._io import as_float, as_int, mapping, read_yaml
from calib.errors import DataError
from calib.resources import config_path

__all__ = [
    "EMBEDDED_HG1",
    "Workload",
    "WORKLOAD_COLUMNS",
    "RUN_SH_DEFAULTS",
    "load_workloads",
    "parse_flat_workload",
    "workloads_yaml",
]

#: The embedded HG1 dataset folder (shipped ``configs/datasets/hg1``, written by ``calib import-hg1``).
EMBEDDED_HG1 = config_path("datasets", "hg1")

#: DataFrame columns that :meth:`Workload.as_columns` fills.
WORKLOAD_COLUMNS = (
    "n_requests",
    "seed",
    "prefix_tokens",
    "prompt_mean",
    "prompt_stdev",
    "prompt_min",
    "prompt_max",
    "output_mean",
    "output_stdev",
    "output_min",
    "output_max",
)

#: Defaults of the reference ``run.sh`` for keys missing from a ``profile.yaml`` (spec §6.1).
RUN_SH_DEFAULTS: dict[str, float] = {
    "max_requests": 50,
    "random_seed": 42,
    "prefix_tokens": 0,
    "prompt_tokens": 512,
    "prompt_tokens_stdev": 256,
    "prompt_tokens_min": 2,
    "prompt_tokens_max": 7000,
    "output_tokens": 512,
    "output_tokens_stdev": 256,
    "output_tokens_min": 2,
    "output_tokens_max": 7000,
}


@dataclass(frozen=True)
class Workload:
    """Token-count distributions of one workload (clipped normal, shared prefix).

    Attributes
    ----------
    name : str
    n_requests : int
        ``max_requests`` of the GuideLLM profile.
    seed : int
        ``random_seed`` of the profile.
    prefix_tokens : int
        Tokens shared by every request (not part of the prompt figures).
    prompt_mean, prompt_stdev : float
    prompt_min, prompt_max : int
    output_mean, output_stdev : float
    output_min, output_max : int

    Examples
    --------
    >>> w = Workload("w", 2, 42, 0, 10.0, 0.0, 10, 10, 5.0, 0.0, 5, 5)
    >>> w.as_columns()["prompt_max"]
    10
    """

    name: str
    n_requests: int
    seed: int
    prefix_tokens: int
    prompt_mean: float
    prompt_stdev: float
    prompt_min: int
    prompt_max: int
    output_mean: float
    output_stdev: float
    output_min: int
    output_max: int

    def as_columns(self) -> dict[str, Any]:
        """The figures as a ``{column: value}`` dict (keys of :data:`WORKLOAD_COLUMNS`)."""
        return {col: getattr(self, col) for col in WORKLOAD_COLUMNS}

    @classmethod
    def from_columns(cls, name: str, columns: Mapping[str, Any], file: Path | str = "") -> "Workload":
        """The inverse of :meth:`as_columns`, validated (a :class:`~calib.errors.DataError` names ``file`` and
        the column).

        >>> w = Workload("w", 2, 42, 0, 10.0, 0.0, 10, 10, 5.0, 0.0, 5, 5)
        >>> Workload.from_columns("w", w.as_columns()) == w
        True
        """
        return _build(name, dict(columns), file, "", {c: c for c in WORKLOAD_COLUMNS})


def _build(name: str, values: dict[str, Any], file: Path | str, prefix: str, keys: dict[str, str]) -> Workload:
    """Validate ``values`` (keyed by Workload attribute) into a Workload; ``keys`` maps attribute -> file key."""

    def fld(attr: str) -> str:
        return f"{prefix}.{keys[attr]}" if prefix else keys[attr]

    ints = {
        "n_requests": 1,
        "seed": None,
        "prefix_tokens": 0,
        "prompt_min": 0,
        "prompt_max": 0,
        "output_min": 1,
        "output_max": 1,
    }
    out: dict[str, Any] = {}
    for attr, low in ints.items():
        out[attr] = as_int(values[attr], file, fld(attr), minimum=low)
    for attr in ("prompt_mean", "prompt_stdev", "output_mean", "output_stdev"):
        out[attr] = as_float(values[attr], file, fld(attr), minimum=0.0)
    for part in ("prompt", "output"):
        if out[f"{part}_max"] < out[f"{part}_min"]:
            raise DataError(
                f"max {out[f'{part}_max']} is below min {out[f'{part}_min']}", file=file, field=fld(f"{part}_max")
            )
    if out["prefix_tokens"] + out["prompt_min"] < 1:
        raise DataError("a request would have no input tokens (prefix 0 and min 0)", file=file, field=fld("prompt_min"))
    return Workload(name=name, **out)


_FLAT_KEYS = {
    "n_requests": "max_requests",
    "seed": "random_seed",
    "prefix_tokens": "prefix_tokens",
    "prompt_mean": "prompt_tokens",
    "prompt_stdev": "prompt_tokens_stdev",
    "prompt_min": "prompt_tokens_min",
    "prompt_max": "prompt_tokens_max",
    "output_mean": "output_tokens",
    "output_stdev": "output_tokens_stdev",
    "output_min": "output_tokens_min",
    "output_max": "output_tokens_max",
}


def parse_flat_workload(
    name: str, data: Any, file: Path | str, prefix: str = "", *, defaults: dict[str, float] | None = None
) -> tuple[Workload, list[str]]:
    """Read GuideLLM's flat keys (``prompt_tokens_stdev`` ...) into a Workload.

    Parameters
    ----------
    name : str
    data : dict
        The flat keys; ``max_requests`` / ``random_seed`` may also be spelt with hyphens.
    file, prefix :
        Used in error messages (``prefix.key``).
    defaults : dict, optional
        Values for missing keys (e.g. :data:`RUN_SH_DEFAULTS`); without it a missing key is an error.

    Returns
    -------
    (Workload, list of str)
        The workload and the keys that took a default.

    Examples
    --------
    >>> w, used = parse_flat_workload("x", {"prompt_tokens": 8}, "p.yaml", defaults=RUN_SH_DEFAULTS)
    >>> w.prompt_mean, w.output_max, "output_tokens" in used
    (8.0, 7000, True)
    """
    data = mapping(data, file, prefix)
    values: dict[str, Any] = {}
    defaulted: list[str] = []
    for attr, key in _FLAT_KEYS.items():
        for spelling in (key, key.replace("_", "-")):
            if spelling in data and data[spelling] is not None:
                values[attr] = data[spelling]
                break
        else:
            if defaults is None or key not in defaults:
                raise DataError("missing key", file=file, field=f"{prefix}.{key}" if prefix else key)
            values[attr] = defaults[key]
            defaulted.append(key)
    return _build(name, values, file, prefix, _FLAT_KEYS), defaulted


def _parse_calib_workload(name: str, data: Any, file: Path | str, prefix: str) -> Workload:
    data = mapping(data, file, prefix)
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for attr, key in (("n_requests", "requests"), ("seed", "seed"), ("prefix_tokens", "prefix_tokens")):
        if key not in data:
            raise DataError("missing key", file=file, field=f"{prefix}.{key}")
        values[attr], keys[attr] = data[key], key
    for part in ("prompt", "output"):
        block_key = f"{part}_tokens"
        if block_key not in data:
            raise DataError("missing key", file=file, field=f"{prefix}.{block_key}")
        block = mapping(data[block_key], file, f"{prefix}.{block_key}")
        for stat in ("mean", "stdev", "min", "max"):
            if stat not in block:
                raise DataError("missing key", file=file, field=f"{prefix}.{block_key}.{stat}")
            values[f"{part}_{stat}"] = block[stat]
            keys[f"{part}_{stat}"] = f"{block_key}.{stat}"
    return _build(name, values, file, prefix, keys)


def load_workloads(path: str | Path | None = None) -> dict[str, Workload]:
    """Load the workload profiles of a dataset.

    Parameters
    ----------
    path : str or Path, optional
        A ``workloads.yaml`` or the dataset folder holding one; ``None`` is
        the embedded HG1 dataset.  Both calib's layout (top-level
        ``workloads:``) and the flat GuideLLM layout are accepted.

    Returns
    -------
    dict of str to Workload
        In file order.

    Raises
    ------
    DataError
        Unreadable file, missing key, or a figure out of range (names file and key).

    Examples
    --------
    >>> w = load_workloads()["chatsweep"]
    >>> w.n_requests, w.prefix_tokens, w.output_max
    (50, 284, 512)
    """
    file = Path(path) if path is not None else EMBEDDED_HG1
    if file.is_dir():
        file = file / "workloads.yaml"
    doc = mapping(read_yaml(file), file, "")
    calib_layout = "workloads" in doc
    entries = mapping(doc["workloads"], file, "workloads") if calib_layout else doc
    if not entries:
        raise DataError("no workload defined", file=file, field="workloads" if calib_layout else None)
    out: dict[str, Workload] = {}
    for name, body in entries.items():
        if not isinstance(name, str) or not name.strip():
            message = f"workload name must be a non-empty string, got {name!r}"[:80]
            raise DataError(message, file=file, field="workloads")
        prefix = f"workloads.{name}" if calib_layout else name
        if calib_layout:
            out[name] = _parse_calib_workload(name, body, file, prefix)
        else:
            out[name] = parse_flat_workload(name, body, file, prefix)[0]
    return out


def workloads_yaml(workloads: dict[str, Workload], header: str = "") -> str:
    """Serialise workloads in calib's layout (deterministic text).

    Examples
    --------
    >>> print(workloads_yaml({"w": Workload("w", 2, 42, 0, 10.0, 0.0, 10, 10, 5.0, 0.0, 5, 5)}))
    workloads:
      w:
        requests: 2
        seed: 42
        prefix_tokens: 0
        prompt_tokens: {mean: 10, stdev: 0, min: 10, max: 10}
        output_tokens: {mean: 5, stdev: 0, min: 5, max: 5}
    <BLANKLINE>
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    lines.append("workloads:")
    for name, w in workloads.items():
        lines += [
            f"  {name}:",
            f"    requests: {w.n_requests}",
            f"    seed: {w.seed}",
            f"    prefix_tokens: {w.prefix_tokens}",
        ]
        for part in ("prompt", "output"):
            mean, stdev = getattr(w, f"{part}_mean"), getattr(w, f"{part}_stdev")
            lo, hi = getattr(w, f"{part}_min"), getattr(w, f"{part}_max")
            lines.append(f"    {part}_tokens: {{mean: {_num(mean)}, stdev: {_num(stdev)}, min: {lo}, max: {hi}}}")
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
