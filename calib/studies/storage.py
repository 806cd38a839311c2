"""Optuna storage: where a study's trials live, and how URLs are shown."""

from __future__ import annotations

import re
from pathlib import Path

import optuna

__all__ = ["default_storage_url", "open_storage", "mask_url"]


def default_storage_url(out_dir: str | Path) -> str:
    """SQLite file ``optuna.db`` in the study's output folder."""
    return f"sqlite:///{Path(out_dir).resolve() / 'optuna.db'}"


def mask_url(url: str | None) -> str | None:
    """Hide a password in a storage URL.

    >>> mask_url("postgresql://calib:s3cret@db:5432/studies")
    'postgresql://calib:***@db:5432/studies'
    """
    if url is None:
        return None
    return re.sub(r"(//[^:/@]+:)[^@]*(@)", r"\1***\2", url)


def open_storage(url: str):
    """An Optuna storage for ``url``: RDB (sqlite/postgresql/...) or ``journal:PATH`` (journal file)."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return optuna.storages.RDBStorage(url, heartbeat_interval=None)
