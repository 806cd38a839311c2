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
