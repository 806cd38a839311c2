"""What a study run needs besides its file: where to write, which storage, how loud."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calib.studies.storage import default_storage_url, mask_url, open_storage

__all__ = ["RunContext"]


@dataclass
class RunContext:
    out_dir: Path
    storage_url: str | None = None
    progress: bool = True
    study_file: str = ""
    workers: int = 1

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._storage = None

    @property
    def url(self) -> str:
        return self.storage_url or default_storage_url(self.out_dir)

    @property
    def storage(self):
        if self._storage is None:
            self._storage = open_storage(self.url)
        return self._storage

    @property
    def storage_label(self) -> str:
        """Storage as recorded in results: the default is named, others are masked."""
        if self.storage_url is None:
            return "sqlite: optuna.db in the output folder"
        return mask_url(self.storage_url)
