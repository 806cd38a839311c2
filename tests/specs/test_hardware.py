from __future__ import annotations

import pytest

from calib.errors import ConfigError
from calib.specs import load_hardware


def test_h100():
    hw = load_hardware("H100")
    assert (hw.tflops_peak, hw.bw_peak_tbs, hw.bw_efficiency) == (989.5, 3.35, 0.82)


def test_user_file_and_zero_efficiency(tmp_path):
    path = tmp_path / "mygpu.yaml"
    path.write_text("tflops_peak: 100\nbw_peak_tbs: 1\nbw_efficiency: 0\n")
    assert load_hardware(path).bw_efficiency == 1.0  # 0 means disabled (spec §1.2)


@pytest.mark.parametrize("text,field", [
    ("tflops_peak: 0\nbw_peak_tbs: 1\n", "tflops_peak"),
    ("tflops_peak: 10\n", "bw_peak_tbs"),
    ("tflops_peak: 10\nbw_peak_tbs: 1\nbw_efficiency: 1.2\n", "bw_efficiency"),
    ("tflops_peak: 10\nbw_peak_tbs: 1\nflux: 3\n", "flux"),
])
def test_bad_hardware(tmp_path, text, field):
    path = tmp_path / "hw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_hardware(path)
    assert field in str(info.value) and "hw.yaml" in str(info.value)


def test_unknown_name():
    with pytest.raises(ConfigError, match="unknown hardware"):
        load_hardware("tpu9")


def test_a_hardware_file_is_parsed_once_per_content(tmp_path):
    """load_hardware returns the same immutable spec while the file's text is unchanged, and a new one after an edit."""
    assert load_hardware("h100") is load_hardware("H100")
    path = tmp_path / "gpu.yaml"
    path.write_text("tflops_peak: 100\nbw_peak_tbs: 2\n")
    a = load_hardware(path)
    assert load_hardware(str(path)) is a and a.tflops_peak == 100
    path.write_text("tflops_peak: 200\nbw_peak_tbs: 2\n")
    assert load_hardware(path).tflops_peak == 200 and a.tflops_peak == 100
