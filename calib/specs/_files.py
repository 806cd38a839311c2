"""Reading users' files safely: bounded size, regular files only, UTF-8, strict YAML.

Every loader of calib (model, hardware and MFU descriptions, study files, the
data loaders of :mod:`calib.data`) reads through these helpers, so that

* a file that is not a regular file (``/dev/zero``, a FIFO, a folder) or is
  larger than a limit is refused with one line naming the file and the limit,
  before anything is read into memory;
* a file that is not UTF-8 (a UTF-16 or latin-1 study file) or holds a NUL byte
  is refused with one line naming the byte offset;
* YAML is parsed with the safe loader, a key given twice in one mapping is an
  error (the later value would silently win), and every YAML error names the
  line and column.

Errors are raised as the caller's :class:`~calib.errors.CalibError` subclass.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import yaml

from calib.errors import CalibError

__all__ = ["write_atomic", "MAX_CONFIG_BYTES", "MAX_DATA_BYTES", "DATA_LIMIT_ENV", "data_limit", "read_bytes", "read_text",
           "decode_text", "load_yaml", "parse_yaml"]

#: Largest description or study file calib reads (model, hardware, study, workloads files are a few kB).
MAX_CONFIG_BYTES = 4 * 2**20
#: Largest measurement-data file calib reads by default (the largest shipped GuideLLM result is 4 MB).
MAX_DATA_BYTES = 256 * 2**20
#: Environment variable raising :data:`MAX_DATA_BYTES` (in MB) for larger data files.
DATA_LIMIT_ENV = "CALIB_MAX_DATA_MB"


def data_limit() -> int:
    """The size limit of a data file in bytes: :data:`MAX_DATA_BYTES`, or ``$CALIB_MAX_DATA_MB`` MB."""
    raw = os.environ.get(DATA_LIMIT_ENV, "").strip()
    if not raw:
        return MAX_DATA_BYTES
    try:
        mb = float(raw)
    except ValueError:
        raise CalibError(f"must be a number of MB, got {raw!r}", field=DATA_LIMIT_ENV) from None
    if not 0 < mb <= 2**20:
        raise CalibError(f"must be > 0 and <= {2**20} MB, got {raw!r}", field=DATA_LIMIT_ENV)
    return int(mb * 2**20)


def _limit_text(limit: int) -> str:
    return f"{limit / 2**20:g} MB" if limit >= 2**20 else f"{limit} bytes"


def read_bytes(path: str | Path, limit: int | None = MAX_CONFIG_BYTES, error: type[CalibError] = CalibError
               ) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, else ``error`` naming the file and the limit.

    ``limit=None`` means the data-file limit (:func:`data_limit`), which the error says how to raise.
    """
    path = Path(path)
    hint = ""
    if limit is None:
        limit, hint = data_limit(), f" (set {DATA_LIMIT_ENV} to raise it)"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error("file not found", file=path) from None
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", file=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise error("is a directory, expected a file", file=path)
    if not stat.S_ISREG(st.st_mode):
        raise error("not a regular file (a device, FIFO or socket)", file=path)
    if st.st_size > limit:
        raise error(f"{st.st_size} bytes, larger than the limit of {_limit_text(limit)}{hint}", file=path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", file=path) from None
    if len(raw) > limit:  # grew while being read
        raise error(f"larger than the limit of {_limit_text(limit)}{hint}", file=path)
    return raw


def decode_text(raw: bytes, path: str | Path, error: type[CalibError] = CalibError) -> str:
    """``raw`` as UTF-8 text without NUL bytes (a UTF-8 byte-order mark is dropped), else ``error``."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise error("UTF-16 text; save the file as UTF-8", file=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8 text (byte {exc.start}: 0x{raw[exc.start]:02x}); save the file as UTF-8",
                    file=path) from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        col = nul - (text.rfind("\n", 0, nul) + 1) + 1
        raise error(f"NUL byte at line {line}, column {col}: not a text file", file=path)
    return text.removeprefix("\ufeff")


def read_text(path: str | Path, limit: int | None = MAX_CONFIG_BYTES, error: type[CalibError] = CalibError) -> str:
    """A UTF-8 text file of at most ``limit`` bytes (see :func:`read_bytes`, :func:`decode_text`)."""
    return decode_text(read_bytes(path, limit, error), path, error)


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (merge keys ``<<`` may be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: the safe loader reports it below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given at line {first.line + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, path: str | Path, error: type[CalibError] = CalibError) -> Any:
    """Parse YAML ``text`` of ``path``; errors name the line and column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or type(exc).__name__
        raise error(f"invalid YAML{where}: {problem}", file=path) from None
    except yaml.YAMLError as exc:
        raise error(f"invalid YAML: {(str(exc) or type(exc).__name__).splitlines()[0]}", file=path) from None
    except RecursionError:
        raise error("invalid YAML: nested too deeply", file=path) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp out of range
        raise error(f"invalid YAML value: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                    file=path) from None


def load_yaml(path: str | Path, limit: int | None = MAX_CONFIG_BYTES, error: type[CalibError] = CalibError) -> Any:
    """Read and parse a YAML file (size-limited, UTF-8, no duplicate keys)."""
    return parse_yaml(read_text(path, limit, error), path, error)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``path`` through a temporary file in its folder and a rename (text as UTF-8).

    A reader, a crash or Ctrl-C sees the old file or the new one, never half
    of one; a symbolic link at ``path`` is replaced, never followed (nothing
    is written out of the folder through it).  The file is readable as the
    umask allows (0644 usually), like any file the user writes.  The one place
    calib writes a file it produces.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
