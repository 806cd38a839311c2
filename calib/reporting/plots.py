"""Matplotlib set-up shared by the reports (headless, deterministic files)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "save"]


def save(fig, path) -> None:
    """Save without timestamps in the PNG metadata, so reruns give identical files.

    The figure goes to a temporary file in the same folder, renamed over
    ``path`` when complete: an interrupted save leaves the previous figure, and
    a symbolic link at ``path`` is replaced, never written through.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
