"""Matplotlib set-up shared by the reports (headless, deterministic files)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from calib.specs._files import write_atomic  # noqa: E402

__all__ = ["plt", "save"]


def save(fig, path) -> None:
    """Save without timestamps in the PNG metadata, so reruns give identical files.

    The figure goes to a temporary file in the same folder, renamed over
    ``path`` when complete: an interrupted save leaves the previous figure, and
    a symbolic link at ``path`` is replaced, never written through.
    """
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    write_atomic(path, buf.getvalue())
