"""Hardware descriptions (``configs/hardware/<name>.yaml``).

A hardware file gives the dense peak FLOP/s, the HBM peak bandwidth, the
default bandwidth-efficiency factor and the MFU table to use::

    name: h100
    tflops_peak: 989.5        # TFlopsPeak
    bw_peak_tbs: 3.35         # BwPeakTBs
    bw_efficiency: 0.82       # bwEfficiencyFactor (0 means disabled -> 1.0)
    mfu_table: h100           # configs/mfu/<name>.json
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from calib.errors import ConfigError
from calib.resources import config_path
from calib.specs._files import parse_yaml, read_text

__all__ = ["HardwareSpec", "load_hardware", "available_hardware"]

#: The shipped hardware files (``configs/hardware``).
HARDWARE_DIR = config_path("hardware")
#: Upper limits of the numbers of a hardware file (about 1000x today's accelerators: a typo, not a GPU).
MAX_TFLOPS, MAX_TBS, MAX_GIB = 1e6, 1e4, 1e7
_FIELDS = {"name", "tflops_peak", "bw_peak_tbs", "bw_efficiency", "mfu_table", "memory_gib", "tflops_fp8", "description",
           "link_bw_gbs"}


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator.

    Examples
    --------
    >>> hw = load_hardware("h100")
    >>> hw.flops_peak, hw.bw_peak, hw.bw_efficiency
    (989500000000000.0, 3350000000000.0, 0.82)
    """

    name: str
    tflops_peak: float
    bw_peak_tbs: float
    bw_efficiency: float = 1.0
    mfu_table: str = ""
    memory_gib: float = 0.0
    tflops_fp8: float = 0.0
    link_bw_gbs: float = 0.0
    source: str = ""

    @property
    def flops_peak(self) -> float:
        """Peak FLOP/s (``P``)."""
        return self.tflops_peak * 1e12

    @property
    def bw_peak(self) -> float:
        """Peak bytes/s, before any efficiency factor."""
        return self.bw_peak_tbs * 1e12


def available_hardware() -> list[str]:
    """Names of the hardware files in ``configs/hardware``."""
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


def load_hardware(name_or_path: str | Path) -> HardwareSpec:
    """Load a hardware description by name (``h100``) or path.

    Raises
    ------
    ConfigError
        Unknown name, unknown key, or a value out of range (named in the message).
    """
    text = str(name_or_path)
    path = Path(text)
    if not path.exists():
        path = HARDWARE_DIR / f"{text.lower()}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown hardware {text!r}; known: {', '.join(available_hardware())}", field="hardware"
            )
    return _hardware(str(path), read_text(path, error=ConfigError))


@lru_cache(maxsize=64)
def _hardware(file: str, text: str) -> HardwareSpec:
    """The (immutable) spec of a hardware file's ``text``: parsed once per process and content."""
    path = Path(file)
    data = parse_yaml(text, path, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping at top level", file=path)
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown key (allowed: {', '.join(sorted(_FIELDS))})", file=path, field=unknown[0])

    def number(key: str, default: float | None = None, *, positive: bool = True, at_most: float | None = None) -> float:
        value = data.get(key, default)
        if value is None:
            raise ConfigError("required key is missing", file=path, field=key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) > 1e300:
            raise ConfigError(f"must be a number, got {value!r}", file=path, field=key)
        if positive and value <= 0 or value < 0:
            raise ConfigError(f"must be > 0, got {value}", file=path, field=key)
        if at_most is not None and value > at_most:
            raise ConfigError(f"must be <= {at_most}, got {value}", file=path, field=key)
        return float(value)

    eff = number("bw_efficiency", 0.0, positive=False, at_most=1.0)
    return HardwareSpec(
        name=str(data.get("name", path.stem)),
        tflops_peak=number("tflops_peak", at_most=MAX_TFLOPS),
        bw_peak_tbs=number("bw_peak_tbs", at_most=MAX_TBS),
        bw_efficiency=eff if eff > 0 else 1.0,
        mfu_table=str(data.get("mfu_table", path.stem)),
        memory_gib=number("memory_gib", 0.0, positive=False, at_most=MAX_GIB),
        tflops_fp8=number("tflops_fp8", 0.0, positive=False, at_most=MAX_TFLOPS),
        link_bw_gbs=number("link_bw_gbs", 0.0, positive=False, at_most=MAX_TBS * 1e3),
        source=str(path),
    )
