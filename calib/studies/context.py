"""What a study run needs besides its file: where to write, which storage, how loud, which role."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calib.studies.storage import default_storage_url, describe_storage

__all__ = ["RunContext"]


@dataclass
class RunContext:
    """Settings of one study run, handed to the study's kind.

    Attributes
    ----------
    out_dir : Path
        Output folder (created).  Workers get a scratch folder.
    storage_url : str, optional
        Optuna storage URL; ``None`` means the default in ``out_dir``
        (see :func:`calib.studies.storage.default_storage_url`).
    progress : bool
        Show progress bars.
    study_file : str
        Name of the study file, as recorded in results.
    workers : int
        Worker processes on this machine (this process included).
    heartbeat_interval, grace_period : int, optional
        Heartbeat settings of the storage (seconds); ``None`` means the defaults.
    role : str
        ``"lead"`` (writes results and report) or ``"worker"`` (only
        evaluates trials; a kind may skip work whose result only the lead
        needs).
    """

    out_dir: Path
    storage_url: str | None = None
    progress: bool = True
    study_file: str = ""
    workers: int = 1
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    role: str = "lead"

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._storage = None
        self._default_url = None if self.storage_url else default_storage_url(self.out_dir, self.workers)

    @property
    def url(self) -> str:
        """The storage URL in use (fixed when the context is made)."""
        return self.storage_url or self._default_url

    @property
    def storage(self):
        """The opened Optuna storage (opened once, on first use)."""
        if self._storage is None:
            from calib.calibrate.trials import forget_storage, open_storage_cached

            forget_storage(self.url)  # a new run opens its storage anew (the file may have been removed)
            self._storage = open_storage_cached(self.url, heartbeat_interval=self.heartbeat_interval,
                                                grace_period=self.grace_period)
        return self._storage

    @property
    def is_worker(self) -> bool:
        return self.role == "worker"

    @property
    def storage_label(self) -> str:
        """Storage as recorded in results: the defaults are named, others are masked."""
        return describe_storage(self.url, self.out_dir)
