"""Shared fixtures: the shipped specs and the location of ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared measurement data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama7b():
    from calib.specs import load_model

    return load_model("llama-2-7b-hf")


@pytest.fixture(scope="session")
def h100():
    from calib.specs import load_hardware

    return load_hardware("h100")


@pytest.fixture(scope="session")
def mfu_h100():
    from calib.specs import load_mfu

    return load_mfu("h100")


def _cut_dataset(dest: Path, keep) -> Path:
    """Write the embedded HG1 dataset cut down to the experiments in ``keep`` into ``dest`` (fast replays)."""
    from calib.data.workloads import EMBEDDED_HG1

    lines = (EMBEDDED_HG1 / "experiments.csv").read_text().splitlines()
    dest.mkdir(parents=True, exist_ok=True)
    dest.joinpath("experiments.csv").write_text(
        "\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in keep]) + "\n")
    dest.joinpath("workloads.yaml").write_text((EMBEDDED_HG1 / "workloads.yaml").read_text())
    return dest


@pytest.fixture(scope="session")
def cut_dataset():
    """``cut_dataset(dest, keep)``: a small copy of the embedded dataset holding only ``keep``."""
    return _cut_dataset
