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

__all__ = ["plt", "save", "subplots", "tight_bbox"]


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


def tight_bbox(fig, dpi: float):
    """The box ``bbox_inches="tight"`` would crop ``fig`` to at ``dpi`` (inches, padded by
    :rc:`savefig.pad_inches`), measured with the Agg renderer the PNG is then drawn with.

    ``savefig(bbox_inches="tight")`` draws the figure once without rendering to
    measure it, then again to render it; the box measured here needs no draw
    (the axes place their ticks, titles and legend while they are measured),
    and the renderer keeps the text it laid out for the drawing that follows.
    The reports' figures use no layout engine (which would need that first
    draw); for one that does, :func:`save` lets Matplotlib measure.
    """
    old = fig.dpi
    fig.dpi = dpi  # the renderer of the saved PNG, so that text is measured as it is drawn
    try:
        box = fig.get_tightbbox(fig.canvas.get_renderer())
    finally:
        fig.dpi = old
    return box.padded(matplotlib.rcParams["savefig.pad_inches"])


def save(fig, path, dpi: int = 110) -> None:
    """Save cropped to the figure's tight box, without timestamps in the PNG metadata (reruns give identical
    files).

    The PNG bytes are those of ``fig.savefig(path, dpi=dpi, bbox_inches="tight")``
    with one drawing instead of two (:func:`tight_bbox`).  The figure goes to
    a temporary file in the same folder, renamed over ``path`` when complete:
    an interrupted save leaves the previous figure, and a symbolic link at
    ``path`` is replaced, never written through.  Ctrl-C and SIGTERM are held
    back while the Agg renderer draws: delivered inside its C code they surface
    as a matplotlib error (``Invalid bounding box``) instead of an interruption;
    delivered after the drawing, they interrupt the report as anywhere else
    (:func:`calib.reporting.commit`).
    """
    from calib.reporting import _signals_held

    buf = io.BytesIO()
    with _signals_held():
        box = "tight" if fig.get_layout_engine() is not None else tight_bbox(fig, dpi)
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches=box, metadata={"Software": None})
    write_atomic(path, buf.getvalue())
