"""Matplotlib set-up shared by the reports (headless, deterministic files).

Figures are drawn with :class:`matplotlib.figure.Figure` on an Agg canvas,
without :mod:`matplotlib.pyplot`: pyplot's import and its figure manager cost
a report about 0.1-0.2 s and give nothing to a headless writer of PNG files.
``plt`` keeps the two pyplot calls the reports use (``plt.subplots``,
``plt.close``), so a report module reads as before; the PNG bytes are the
ones pyplot would write (the same rcParams, the same Agg renderer; a test
compares them).
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")  # for code that still imports pyplot (headless, the same renderer)
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from calib.specs._files import write_atomic  # noqa: E402

__all__ = ["plt", "save", "subplots"]


def subplots(nrows: int = 1, ncols: int = 1, *, sharex=False, sharey=False, squeeze: bool = True,
             width_ratios=None, height_ratios=None, subplot_kw=None, gridspec_kw=None, **fig_kw):
    """``pyplot.subplots`` without pyplot: a new :class:`Figure` on an Agg canvas and its axes."""
    fig = Figure(**fig_kw)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=squeeze, width_ratios=width_ratios,
                        height_ratios=height_ratios, subplot_kw=subplot_kw, gridspec_kw=gridspec_kw)
    return fig, axes


def close(fig=None) -> None:
    """Nothing to release: a figure made here is not registered with pyplot (garbage collected as any object)."""


#: The pyplot calls the reports use, drawn without pyplot.
plt = SimpleNamespace(subplots=subplots, close=close)


def save(fig, path) -> None:
    """Save without timestamps in the PNG metadata, so reruns give identical files.

    The figure goes to a temporary file in the same folder, renamed over
    ``path`` when complete: an interrupted save leaves the previous figure, and
    a symbolic link at ``path`` is replaced, never written through.  Ctrl-C
    and SIGTERM are held back while the Agg renderer draws: delivered inside
    its C code they surface as a matplotlib error (``Invalid bounding box``)
    instead of an interruption; delivered after the drawing, they interrupt the
    report as anywhere else (:func:`calib.reporting.commit`).
    """
    from calib.reporting import _signals_held

    buf = io.BytesIO()
    with _signals_held():
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    write_atomic(path, buf.getvalue())
