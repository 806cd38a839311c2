"""Matplotlib set-up shared by the reports (headless, deterministic files)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "save"]


def save(fig, path) -> None:
    """Save without timestamps in the PNG metadata, so reruns give identical files."""
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
