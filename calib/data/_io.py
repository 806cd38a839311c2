"""Small, strict readers shared by the data loaders.

Every helper turns a malformed file or value into a :class:`DataError` that
names the file and the field, so that a loader never lets a ``KeyError``,
``TypeError`` or parser exception escape to the user.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from calib.errors import DataError

__all__ = [
    "read_text",
    "read_json",
    "read_yaml",
    "mapping",
    "sequence",
    "need",
    "as_int",
    "as_float",
    "as_str",
    "dig",
]


def read_text(path: Path) -> str:
    """Read a UTF-8 text file or raise :class:`DataError`.

    The file must be a regular file of at most the data-file limit
    (:func:`calib.specs._files.data_limit`, 256 MB unless ``CALIB_MAX_DATA_MB``
    says otherwise) and hold no NUL byte.
    """
    from calib.specs._files import read_text as read_limited

    return read_limited(path, None, DataError)


def read_json(path: Path) -> Any:
    """Parse a JSON file (``NaN`` literals allowed) or raise :class:`DataError`."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", file=path) from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"invalid JSON: {exc}", file=path) from None


def read_yaml(path: Path) -> Any:
    """Parse a YAML (or JSON) file with the safe loader (a key given twice is an error) or raise
    :class:`DataError` naming the line and column."""
    from calib.specs._files import parse_yaml

    return parse_yaml(read_text(path), path, DataError)


def mapping(value: Any, file: Path | str, field: str) -> dict:
    """Return ``value`` if it is a mapping with string keys, else raise."""
    if not isinstance(value, dict):
        raise DataError(f"expected a mapping, got {_kind(value)}", file=file, field=field or "<top level>")
    return value


def sequence(value: Any, file: Path | str, field: str) -> list:
    """Return ``value`` if it is a list, else raise."""
    if not isinstance(value, list):
        raise DataError(f"expected a list, got {_kind(value)}", file=file, field=field or "<top level>")
    return value


def need(obj: dict, key: str, file: Path | str, prefix: str = "") -> Any:
    """Return ``obj[key]``; a missing key raises :class:`DataError` naming ``prefix.key``."""
    field = f"{prefix}.{key}" if prefix else key
    if key not in obj:
        raise DataError("missing key", file=file, field=field)
    return obj[key]


def dig(obj: Any, *keys: str | int) -> Any:
    """Follow ``keys`` through nested mappings/lists; ``None`` when any step is absent."""
    for key in keys:
        if isinstance(key, int):
            if not isinstance(obj, list) or not -len(obj) <= key < len(obj):
                return None
            obj = obj[key]
        else:
            if not isinstance(obj, dict) or key not in obj:
                return None
            obj = obj[key]
    return obj


def as_float(
    value: Any,
    file: Path | str,
    field: str,
    *,
    minimum: float | None = None,
    positive: bool = False,
    allow_str: bool = False,
) -> float:
    """Convert a number (not a bool) to a finite float, checking its range."""
    if allow_str and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise DataError(f"expected a number, got {value!r}", file=file, field=field) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"expected a number, got {_kind(value)}", file=file, field=field)
    try:
        out = float(value)
    except OverflowError:
        raise DataError("number out of range", file=file, field=field) from None
    if not math.isfinite(out):
        raise DataError(f"expected a finite number, got {out}", file=file, field=field)
    if positive and out <= 0:
        raise DataError(f"must be > 0, got {out:g}", file=file, field=field)
    if minimum is not None and out < minimum:
        raise DataError(f"must be >= {minimum:g}, got {out:g}", file=file, field=field)
    return out


def as_int(
    value: Any,
    file: Path | str,
    field: str,
    *,
    minimum: int | None = None,
    allow_str: bool = False,
) -> int:
    """Convert an integer (or an integral float, not a bool) to ``int``, checking its range."""
    if allow_str and isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            raise DataError(f"expected an integer, got {text!r}", file=file, field=field) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"expected an integer, got {_kind(value)}", file=file, field=field)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise DataError(f"expected an integer, got {value!r}", file=file, field=field)
        value = int(value)
    if abs(value) > 2**62:
        raise DataError("integer out of range", file=file, field=field)
    if minimum is not None and value < minimum:
        raise DataError(f"must be >= {minimum}, got {value}", file=file, field=field)
    return value


def as_str(value: Any, file: Path | str, field: str) -> str:
    """Return a non-empty string, else raise."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"expected a non-empty string, got {_kind(value)}", file=file, field=field)
    return value.strip()


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"[:60]
    if isinstance(value, str):
        return f"string {value!r}"[:60]
    return type(value).__name__
