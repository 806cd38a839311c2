"""User-facing errors.

Every failure that a user can cause (a bad file, a bad value, an unknown
name) is raised as :class:`CalibError` or a subclass.  The message names the
file and the field so that the command line can print one line and exit
non-zero without a traceback.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CalibError", "ConfigError", "DataError", "StudyError"]


class CalibError(Exception):
    """Base class of every error calib reports to a user.

    Parameters
    ----------
    message : str
        What is wrong, in one sentence.
    file : str or Path, optional
        The file the problem was found in.
    field : str, optional
        The key, column or parameter that is wrong.

    Examples
    --------
    >>> err = CalibError("must be > 0", file="config.json", field="num_attention_heads")
    >>> str(err)
    'config.json: num_attention_heads: must be > 0'
    """

    def __init__(self, message: str, *, file: str | Path | None = None, field: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [_one_line(p) for p in (self.file, self.field) if p]
        return ": ".join([*parts, _one_line(self.message)])


def _one_line(text: str) -> str:
    """Escape control characters (a user's key may hold a newline) so an error stays on one line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class ConfigError(CalibError):
    """A model, hardware or MFU description is missing, malformed or invalid."""


class DataError(CalibError):
    """Measured data (experiments, GuideLLM runs, traces) is malformed."""


class StudyError(CalibError):
    """A study file or a study's storage is invalid."""
