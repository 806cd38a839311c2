"""A calibration: the :class:`~calib.settings.Settings` a search chose, with its provenance, as a YAML file.

What ``calib predict --calibration FILE``, ``calib capacity`` and users'
scripts consume: the settings (every value named once), and where they came
from — the data rows, the objective, the search and its seeds, the train
loss, and held-out scores when a study measured them.

Examples
--------
>>> import tempfile, pathlib
>>> cal = Calibration(settings=Settings.from_params({"per_layer_us": 80}), objective={"weights": {"tpot": 1}},
...                   train_loss=0.139)
>>> path = pathlib.Path(tempfile.mkdtemp()) / "cal.yaml"
>>> cal.save(path) == path
True
>>> Calibration.load(path).settings.overhead.per_layer_us
80.0
>>> Calibration.load(path).estimator("RooflineRegressor").get_params()["per_layer_us"]
80.0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from calib.errors import ConfigError
from calib.settings import Settings

__all__ = ["Calibration", "CALIBRATION_VERSION"]

CALIBRATION_VERSION = 1
#: Largest calibration file read (a calibration is a few kB).
MAX_BYTES = 4 * 1024 * 1024


class Calibration(BaseModel):
    """Settings + provenance.

    Attributes
    ----------
    settings : Settings
        The calibrated settings.
    estimator : str
        The estimator the settings were fitted for (``RooflineRegressor`` or ``LoadedRegressor``).
    data : dict
        What the rows were: ``rows`` (their names), ``fingerprint`` (of their content), ``source``.
    objective, search : dict
        Descriptions of the loss and the search (algorithm, seeds, budget).
    space : dict
        The searched parameters and their ranges.
    train_loss : float, optional
        The objective at the chosen settings on the rows it was fitted on.
    seeds : list of dict
        Per search seed: best train loss and parameters.
    converged : bool, optional
        Whether the seeds agreed (None: one seed or a grid).
    heldout : dict
        Held-out scores measured by a study (metric -> fraction), with their aggregation named.
    notes : str
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    version: int = CALIBRATION_VERSION
    settings: Settings = Field(default_factory=Settings)
    estimator_class: str = Field(default="RooflineRegressor", alias="estimator")
    data: dict[str, Any] = Field(default_factory=dict)
    objective: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Any] = Field(default_factory=dict)
    train_loss: float | None = None
    seeds: list[dict[str, Any]] = Field(default_factory=list)
    converged: bool | None = None
    heldout: dict[str, Any] = Field(default_factory=dict)
    notes: str = ""
    calib_version: str = ""

    def to_dict(self) -> dict:
        """JSON/YAML-able mapping (settings nested by section)."""
        from calib import __version__

        out = self.model_dump(mode="json", by_alias=True)
        out["calib_version"] = out["calib_version"] or __version__
        return out

    def save(self, path: str | Path) -> Path:
        """Write the calibration as YAML (atomically: a temporary file in the same folder, then a rename)."""
        import yaml

        from calib.specs._files import write_atomic

        path = Path(path)
        text = "# calib calibration file: settings + provenance (calib.Calibration)\n" + yaml.safe_dump(
            self.to_dict(), sort_keys=False, allow_unicode=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read a calibration file (size-limited, UTF-8, no duplicate keys); errors are one line naming the file
        and the key."""
        from calib.specs._files import load_yaml

        return cls.from_dict(load_yaml(path, MAX_BYTES, ConfigError), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> "Calibration":
        if not isinstance(data, dict):
            raise ConfigError("a calibration file must be a mapping at top level", file=source)
        if data.get("version", CALIBRATION_VERSION) != CALIBRATION_VERSION:
            raise ConfigError(f"unsupported version {data.get('version')!r} (this calib reads "
                              f"{CALIBRATION_VERSION})", file=source, field="version")
        data = dict(data)
        settings = Settings.from_mapping(data.pop("settings", {}), source)
        try:
            return cls.model_validate({**data, "settings": settings})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            raise ConfigError(msg, file=source, field=loc) from None

    def estimator(self, cls: str | None = None, **extra: Any):
        """An unfitted estimator (``RooflineRegressor`` or ``LoadedRegressor``) with these settings."""
        import calib.estimators as estimators

        name = cls or self.estimator_class
        klass = getattr(estimators, name, None)
        if klass is None:
            raise ConfigError(f"unknown estimator {name!r}", field="estimator")
        return klass.from_settings(self.settings, **extra)
