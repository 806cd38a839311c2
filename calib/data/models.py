"""The one place that maps model names found in measurement files to calib's names.

calib names a model by the lower-cased last part of its Hugging Face id
(``meta-llama/Llama-2-7b-hf`` -> ``llama-2-7b-hf``), which is also the stem of
``configs/models/<name>.yaml``.  Measurement files use several spellings
(HF ids, ``model_short`` such as ``llama-2-70b``, folder fragments such as
``mixtral-8x7b-v0-1``); :func:`calib_model_name` maps them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from calib.errors import DataError

__all__ = ["HF_TO_CALIB", "MODEL_FAMILY", "calib_model_name", "model_family"]

#: Hugging Face id -> calib model name, for every model with measurements.
HF_TO_CALIB: Mapping[str, str] = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b-hf",
    "meta-llama/Llama-2-70b-hf": "llama-2-70b-hf",
    "codellama/CodeLlama-34b-Instruct-hf": "codellama-34b-instruct-hf",
    "Qwen/Qwen3-14B": "qwen3-14b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b-instruct",
    "mistralai/Mixtral-8x7B-v0.1": "mixtral-8x7b-v0.1",
}

#: calib model name -> model family (the ``family`` column of the HG1 experiments).
MODEL_FAMILY: Mapping[str, str] = {
    "llama-2-7b-hf": "llama2-7b",
    "llama-2-70b-hf": "llama2-70b",
    "codellama-34b-instruct-hf": "codellama-34b",
    "qwen3-14b": "qwen3-14b",
    "qwen2.5-7b-instruct": "qwen2.5-7b",
    "mixtral-8x7b-v0.1": "mixtral-8x7b",
}

#: Other spellings seen in the data (``model_short`` of inference-perf, run folder names).
_SHORT_NAMES: Mapping[str, str] = {
    "llama-2-7b": "llama-2-7b-hf",
    "llama-2-70b": "llama-2-70b-hf",
    "codellama-34b": "codellama-34b-instruct-hf",
    "codellama-34b-instruct": "codellama-34b-instruct-hf",
    "qwen2.5-7b": "qwen2.5-7b-instruct",
    "mixtral-8x7b": "mixtral-8x7b-v0.1",
    "mixtral-8x7b-v0-1": "mixtral-8x7b-v0.1",
}


def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for hf_id, name in HF_TO_CALIB.items():
        table[hf_id.lower()] = name
        table[hf_id.rsplit("/", 1)[-1].lower()] = name
        table[name] = name
    table.update(_SHORT_NAMES)
    return table


_ALIASES = _aliases()


def calib_model_name(name: object, *, file: str | Path | None = None, field: str | None = None) -> str:
    """Map any spelling of a model name to calib's model name.

    Known spellings use the table above; an unknown Hugging Face id or name
    falls back to calib's naming rule (lower-cased last path component), so
    that a new model needs no code change.

    Parameters
    ----------
    name : str
        An HF id, a calib name or a short name.
    file, field : optional
        Named in the :class:`DataError` raised for an empty or non-string name.

    Returns
    -------
    str

    Examples
    --------
    >>> calib_model_name("meta-llama/Llama-2-70b-hf"), calib_model_name("llama-2-70b")
    ('llama-2-70b-hf', 'llama-2-70b-hf')
    >>> calib_model_name("mixtral-8x7b")
    'mixtral-8x7b-v0.1'
    """
    if not isinstance(name, str) or not name.strip().strip("/"):
        raise DataError(f"expected a model name, got {name!r}"[:80], file=file, field=field or "model")
    key = name.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    return key.strip("/").rsplit("/", 1)[-1]


def model_family(model: str) -> str:
    """Family of a calib model name (the name itself when unknown).

    Examples
    --------
    >>> model_family("qwen2.5-7b-instruct")
    'qwen2.5-7b'
    """
    return MODEL_FAMILY.get(model, model)
