"""Where calib's files are: the shipped configs and study files, and the user's data folders.

This module is the only place that knows the layout.  The top-level folders
``configs/`` and ``studies/`` of the source tree ship as the packages
``calib.configs`` and ``calib.study_files`` (``package-dir`` in
``pyproject.toml``), so :mod:`importlib.resources` finds them in an editable
install (``pip install -e .``) and in a regular one (``pip install .``) alike.
Measured data that does not ship with calib (loaded-server runs, GuideLLM runs)
is never looked for next to the source: it comes from an explicit argument or
the ``CALIB_DATA`` environment variable.

Examples
--------
>>> config_path("hardware", "h100.yaml").name
'h100.yaml'
>>> study_file("hg1").name
'hg1.yaml'
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from calib.errors import ConfigError

__all__ = [
    "CONFIGS_PACKAGE",
    "DATA_ENV",
    "STUDIES_PACKAGE",
    "available_studies",
    "config_path",
    "data_dir",
    "study_dir",
    "study_file",
]

#: Package holding the shipped ``configs/`` (models, hardware, MFU tables, the HG1 dataset).
CONFIGS_PACKAGE = "calib.configs"
#: Package holding the shipped ``studies/*.yaml``.
STUDIES_PACKAGE = "calib.study_files"
#: Environment variable naming the folder of the user's measured data.
DATA_ENV = "CALIB_DATA"


def _package_dir(package: str) -> Path:
    """The folder of a data package, as a file-system path.

    Raises
    ------
    ConfigError
        The package is not installed (a stale editable install) or not on a
        file system (a zipped install).
    """
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise ConfigError(f"calib's package data {package} is not installed; reinstall calib "
                          "(pip install -e . or pip install .)", field=package) from None
    if not isinstance(root, Path):
        raise ConfigError(f"calib's package data {package} is not on a file system ({type(root).__name__}); "
                          "install calib unzipped", field=package)
    return root


def config_path(*parts: str) -> Path:
    """Path of a shipped config file or folder: ``config_path("mfu", "h100.json")``.

    With no ``parts``, the configs folder itself.  The path need not exist
    (callers check and name what is missing).

    Examples
    --------
    >>> config_path("models").is_dir()
    True
    """
    return _package_dir(CONFIGS_PACKAGE).joinpath(*parts)


def study_dir() -> Path:
    """The folder of the shipped study files (``studies/`` in the source tree)."""
    return _package_dir(STUDIES_PACKAGE)


def available_studies() -> list[str]:
    """Names of the shipped study files (without ``.yaml``), sorted.

    Examples
    --------
    >>> "hg1" in available_studies()
    True
    """
    return sorted(p.stem for p in study_dir().glob("*.yaml"))


def study_file(name: str) -> Path:
    """The shipped study file ``studies/<name>.yaml`` (``name`` with or without ``.yaml``).

    Raises
    ------
    ConfigError
        No shipped study has that name (the message lists the known ones).
    """
    stem = name[:-5] if name.endswith(".yaml") else name
    path = study_dir() / f"{stem}.yaml"
    if "/" in stem or "\\" in stem or not path.is_file():
        raise ConfigError(f"no shipped study {name!r}; known: {', '.join(available_studies())}", field="study")
    return path


def data_dir(explicit: str | os.PathLike | None = None, *, what: str = "loaded-server runs",
             subdir: str | None = None, flag: str = "data_dir") -> Path:
    """The folder of the user's ``what``: ``explicit`` if given, else ``$CALIB_DATA[/subdir]``.

    Nothing is guessed from where calib is installed; whether the folder
    exists and holds the right files is for the caller to check.

    Parameters
    ----------
    explicit : str or path-like, optional
        A folder given on the command line or in a study file; used as is
        (``~`` expanded).  ``None`` or ``""`` means not given.
    what : str
        What the folder holds, for the error message.
    subdir : str, optional
        Joined to ``$CALIB_DATA`` (not to ``explicit``) when the environment
        variable names the root of several data folders, e.g. ``"batched"``.
    flag : str
        The option or study-file key that gives ``explicit``, for the error
        message (and the error's ``field``).

    Returns
    -------
    Path

    Raises
    ------
    ConfigError
        Neither ``explicit`` nor ``CALIB_DATA`` is set (one line naming both).

    Examples
    --------
    >>> data_dir("/data/batched")
    PosixPath('/data/batched')
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    root = os.environ.get(DATA_ENV, "")
    if root:
        path = Path(root).expanduser()
        return path / subdir if subdir else path
    where = f" (its {subdir}/ folder)" if subdir else ""
    raise ConfigError(f"no folder of {what} given: set {flag} or the environment variable {DATA_ENV}{where}",
                      field=flag)
