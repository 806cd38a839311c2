"""``calib.reporting.plots.save`` writes the bytes of ``savefig(bbox_inches="tight")`` with one drawing."""

from __future__ import annotations

import io

import pytest

from calib.reporting.plots import plt, save, tight_bbox

KWARGS = dict(format="png", dpi=110, metadata={"Software": None})


def _tight(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, bbox_inches="tight", **KWARGS)
    return buf.getvalue()


def _landscape():
    """Text out of the canvas on every side: rotated tick labels, a long title, a legend; the tight box is larger
    than the figure."""
    fig, ax = plt.subplots(figsize=(4, 2.5))
    ax.plot([0, 10, 20], [3.0, 1.0, 2.0], marker="o", label="train TPOT MAPE")
    ax.plot([0, 10, 20], [2.0, 2.5, 1.5], linestyle="--", label="train E2E MAPE")
    ax.axvline(10, color="k", linestyle=":", label="optimum 10 µs")
    ax.set_xticks(range(0, 21, 5))
    ax.set_xticklabels([f"experiment-with-a-long-name-{i}" for i in range(5)], rotation=60, ha="right")
    ax.set_title("a title long enough to reach beyond both edges of this small figure, and then some more")
    ax.set_ylabel("mean APE (%)")
    ax.legend(fontsize=7)
    return fig


def _laid_out():
    fig, axes = plt.subplots(1, 2, figsize=(6, 3), sharey=True)
    axes[0].bar(["a", "b"], [1, 2])
    axes[1].scatter([1, 2, 3], [3, 1, 2])
    fig.suptitle("tight_layout, then saved")
    fig.tight_layout()
    return fig


@pytest.mark.parametrize("make", [_landscape, _laid_out])
def test_save_writes_the_tight_bytes(tmp_path, make):
    save(make(), tmp_path / "ours.png")
    assert (tmp_path / "ours.png").read_bytes() == _tight(make())


def test_tight_bbox_is_savefigs_and_leaves_the_figure_as_it_was():
    fig = _landscape()
    dpi, size = fig.dpi, tuple(fig.get_size_inches())
    box = tight_bbox(fig, 110)
    assert fig.dpi == dpi and tuple(fig.get_size_inches()) == size
    assert box.width > size[0]  # the rotated labels and the title stick out: the box is not the figure's
    buf = io.BytesIO()
    fig.savefig(buf, bbox_inches=box, **KWARGS)
    assert buf.getvalue() == _tight(_landscape())
