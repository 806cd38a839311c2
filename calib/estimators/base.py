"""What every calib estimator shares: hyperparameters generated from :class:`calib.settings.Settings`.

Every parameter of :class:`~calib.settings.Settings` is a hyperparameter of
the estimator under its flat name (``per_layer_us``, ``variant``, ``mode``),
with the default ``None`` ("the settings default"), so that a value is named
and defaulted in one place only.  ``get_params``/``set_params``/``clone`` see
them as ordinary keyword arguments: the ``__init__`` signature is generated.
``fit`` validates them through :meth:`Settings.from_params` (one-line
:class:`~calib.errors.ConfigError` naming the qualified parameter).
"""

from __future__ import annotations

import inspect
import typing
from numbers import Integral, Real
from typing import Any

from calib.settings import FLAT_NAMES, OVERHEAD_SETTINGS, Physics, Replay, Settings

__all__ = ["settings_init", "settings_constraints", "SettingsMixin", "MEASURED", "check_y"]

#: predicted quantity -> measured column of an experiments or stages table
MEASURED = {"ttft": "ttft_mean_ms", "tpot": "tpot_mean_ms", "e2e": "e2e_mean_ms"}


def settings_init(**extra: Any):
    """An ``__init__`` storing every settings parameter (default ``None``) plus ``extra`` (name=default).

    The returned function has an explicit signature, so scikit-learn's
    ``get_params`` finds the parameters; it only stores them.
    """
    names = list(FLAT_NAMES) + list(extra)

    def __init__(self, **params):
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}")
        for name in FLAT_NAMES:
            setattr(self, name, params.get(name))
        for name, default in extra.items():
            setattr(self, name, params.get(name, default))

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in FLAT_NAMES]
    parameters += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in extra.items()]
    __init__.__signature__ = inspect.Signature(parameters)
    return __init__


def _type_constraint(annotation) -> list:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [str]
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return _type_constraint(inner[0]) if len(inner) == 1 else ["no_validation"]
    if annotation is bool:
        return ["boolean"]
    if annotation is int:
        return [Integral]
    if annotation is float:
        return [Real]
    if annotation is str:
        return [str]
    return ["no_validation"]


def settings_constraints() -> dict[str, list]:
    """``_parameter_constraints`` for scikit-learn's tooling: the type of each settings parameter (or None).

    Ranges and choices are checked by :class:`~calib.settings.Settings` in ``fit``.
    """
    out: dict[str, list] = {}
    sections = [Physics, Replay, *OVERHEAD_SETTINGS.values()]
    for flat, qual in FLAT_NAMES.items():
        field = qual.split(".", 1)[1]
        for section in sections:
            if field in section.model_fields:
                out[flat] = [*_type_constraint(section.model_fields[field].annotation), None]
                break
    return out


def check_y(y, n_rows: int) -> None:
    """Check a measured target passed to ``fit``: ``n_rows`` finite, positive means (ms), or ``None``."""
    if y is None:
        return
    import numpy as np

    y = np.asarray(y, dtype=float)
    if y.shape != (n_rows,):
        raise ValueError(f"y has shape {y.shape}, expected ({n_rows},)")
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("y must hold finite, positive measured means (ms)")


class SettingsMixin:
    """What every calib estimator shares: ``settings()``, ``from_settings()``, ``predict`` of the ``target``
    column of ``predict_all``, ``score`` = minus the MAPE, and the scikit-learn tags.

    The estimator's ``__init__`` comes from :func:`settings_init`; ``_fitted_attr`` names the attribute its
    ``fit`` sets (checked before predicting).  List this mixin before ``RegressorMixin``.
    """

    _fitted_attr = "settings_"

    def predict(self, X):
        """Predicted means of ``target`` (ms), one per row of ``X``."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, self._fitted_attr)
        return self.predict_all(X)[self.target].to_numpy()

    def score(self, X, y, sample_weight=None) -> float:
        """Negative mean absolute percentage error (a fraction; higher is better)."""
        from sklearn.metrics import mean_absolute_percentage_error

        return -mean_absolute_percentage_error(y, self.predict(X), sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.target_tags.required = True
        tags.target_tags.positive_only = True
        tags.non_deterministic = False
        return tags

    def settings(self) -> Settings:
        """The validated :class:`~calib.settings.Settings` of the current hyperparameters."""
        return Settings.from_params({n: getattr(self, n) for n in FLAT_NAMES})

    def resolved_params(self) -> dict[str, Any]:
        """``get_params()`` with every settings default made explicit (``None`` -> the value in force)."""
        params = {k: v for k, v in self.get_params().items() if k not in FLAT_NAMES}
        return {**self.settings().params(), **params}

    @classmethod
    def from_settings(cls, settings: Settings, **extra: Any):
        """An estimator whose hyperparameters are ``settings`` (every value explicit) and ``extra``."""
        return cls(**settings.params(), **extra)
