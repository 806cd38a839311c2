"""Model descriptions: a validated, immutable :class:`ModelSpec`.

A spec is read from a Hugging Face ``config.json`` (a file or a folder that
holds one) or from calib's own model file (``configs/models/<name>.yaml``,
which uses the same key names).  Defaults and derivations follow
``roofline-spec.md`` §1.1: missing or zero ``num_key_value_heads`` means
``num_attention_heads``; a zero ``intermediate_size`` means ``4 * hidden_size``;
the head dimension used by the v2 physics is always
``hidden_size // num_attention_heads`` (the HF ``head_dim`` key is kept apart
as ``hf_head_dim``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from calib.errors import ConfigError
from calib.resources import config_path
from calib.specs._files import parse_yaml, read_text

__all__ = ["ModelSpec", "load_model", "available_models", "DTYPE_BYTES", "EXPERT_COUNT_KEYS"]

#: The shipped model files (``configs/models``).
MODELS_DIR = config_path("models")

#: Bytes per parameter for each ``torch_dtype`` (spec §1.1).
DTYPE_BYTES: Mapping[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "uint8": 1,
    "fp8": 1,
    "float8_e4m3fn": 1,
    "int4": 1,
    "nf4": 1,
}

#: Keys that give the routed expert count, in the order v3 resolves them (spec §1.1).
EXPERT_COUNT_KEYS = ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts", "num_routed_experts")

#: Largest value accepted for an integer key of a model description (generous: about 100x the largest models
#: published), so that a typo such as ``num_hidden_layers: 1e18`` is an error, not hours of arithmetic.
MAX_VALUES: Mapping[str, int] = {
    "num_hidden_layers": 10_000,
    "num_attention_heads": 100_000,
    "num_key_value_heads": 100_000,
    "hidden_size": 10_000_000,
    "head_dim": 100_000,
    "vocab_size": 100_000_000,
    "max_position_embeddings": 1_000_000_000,
    "interleave_moe_layer_step": 10_000,
    "num_experts_per_tok": 1_000_000,
    **{key: 1_000_000 for key in EXPERT_COUNT_KEYS},
}
#: The limit of every other integer key (FFN widths and the like).
MAX_INTEGER = 1_000_000_000


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer, as the roofline model sees it.

    Attributes
    ----------
    name : str
        Short name (folder or file stem).
    num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size : int
        ``L``, ``d``, ``nH``, ``nKV``, ``dff`` of the spec.
    dtype_bytes : int
        Bytes per weight/KV element ``b``.
    vocab_size : int
        Parsed but unused by the step time (spec §1.1).
    max_context : int
        ``max_position_embeddings`` (0 when unknown).
    num_experts, experts_per_token : int
        Mixture-of-experts routing; 0 for dense models.
    moe_intermediate_size, shared_expert_intermediate_size : int
        Expert FFN width (defaults to ``intermediate_size``) and shared-expert width (0: none).
    moe_layer_step : int
        ``interleave_moe_layer_step``; 0 or 1 means every layer is MoE.
    dense_intermediate_size : int
        FFN width of the dense layers of an interleaved MoE model.
    hf_head_dim : int
        The HF ``head_dim`` key (0 when absent); the v2 physics ignores it.
    source : str
        Where the description was read from.

    Examples
    --------
    >>> m = load_model("llama-2-7b-hf")
    >>> m.num_layers, m.head_dim, m.kv_dim, m.dtype_bytes
    (32, 128, 4096, 2)
    >>> m.weight_params_per_layer
    202375168
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    dtype_bytes: int
    vocab_size: int = 0
    max_context: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layer_step: int = 0
    dense_intermediate_size: int = 0
    hf_head_dim: int = 0
    source: str = ""

    @property
    def head_dim(self) -> int:
        """``d // nH`` (integer division, as the reference does)."""
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        """``nKV * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def weight_params_per_layer(self) -> int:
        """Q, K, V, O and a 3-matrix SwiGLU MLP (spec §3.1)."""
        d, dkv, dff = self.hidden_size, self.kv_dim, self.intermediate_size
        return d * (d + 2 * dkv) + d * d + 3 * d * dff

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies over all layers: ``2 L nKV dh b``."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attention_shape(self) -> tuple[int, int, int]:
        """``(nH, nKV, head_dim)``, the key of the attention MFU tables."""
        return (self.num_heads, self.num_kv_heads, self.head_dim)

    def check_tp(self, tp: Any, field: str = "tp") -> int:
        """``tp`` as an int if this model can be split over that many GPUs, else a one-line ConfigError.

        As in vLLM: the attention heads must divide evenly among the GPUs, and
        the KV heads too, or (fewer KV heads than GPUs) be replicated evenly.

        Examples
        --------
        >>> load_model("llama-2-7b-hf").check_tp(4)
        4
        >>> load_model("llama-2-7b-hf").check_tp(3)
        Traceback (most recent call last):
        ...
        calib.errors.ConfigError: tp: 32 attention heads do not divide among 3 GPUs (llama-2-7b-hf)
        """
        if isinstance(tp, bool) or not isinstance(tp, (int, float)) or tp != tp or tp != int(tp) or tp < 1:
            raise ConfigError(f"must be a whole number >= 1, got {tp!r}", field=field)
        tp = int(tp)
        if self.num_heads % tp:
            raise ConfigError(f"{self.num_heads} attention heads do not divide among {tp} GPUs ({self.name})",
                              field=field)
        kv = self.num_kv_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise ConfigError(f"{kv} KV heads can be neither split nor replicated evenly over {tp} GPUs "
                              f"({self.name})", field=field)
        return tp

    def check_context(self, tokens: int, field: str = "context") -> int:
        """``tokens`` if a sequence that long fits the model (``max_position_embeddings``), else a ConfigError."""
        limit = self.max_context or MAX_VALUES["max_position_embeddings"]
        if tokens > limit:
            what = f"{self.name}'s max_position_embeddings" if self.max_context else "the largest context calib models"
            raise ConfigError(f"{tokens} tokens exceed {what} ({limit})", field=field)
        return tokens

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], *, name: str, source: str = "") -> "ModelSpec":
        """Validate an HF-style mapping and build a spec; errors name ``source`` and the key."""
        if not isinstance(cfg, Mapping):
            raise ConfigError("expected a JSON/YAML object at top level", file=source)

        def integer(key: str, default: int | None = None, *, minimum: int = 0) -> int:
            value = cfg.get(key, default)
            if value is None:
                if default is None:
                    raise ConfigError("required key is missing", file=source, field=key)
                value = default
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or (isinstance(value, float) and not math.isfinite(value)) or value != int(value)):
                raise ConfigError(f"must be an integer, got {value!r}", file=source, field=key)
            value = int(value)
            if value < minimum:
                raise ConfigError(f"must be >= {minimum}, got {value}", file=source, field=key)
            limit = MAX_VALUES.get(key, MAX_INTEGER)
            if value > limit:
                raise ConfigError(f"must be <= {limit}, got {value}", file=source, field=key)
            return value

        layers = integer("num_hidden_layers", minimum=1)
        hidden = integer("hidden_size", minimum=1)
        heads = integer("num_attention_heads", minimum=1)
        kv_heads = integer("num_key_value_heads", 0) or heads
        if hidden % heads:
            raise ConfigError(
                f"hidden_size {hidden} is not divisible by num_attention_heads {heads}", file=source, field="hidden_size"
            )
        if kv_heads > heads or heads % kv_heads:
            raise ConfigError(
                f"num_key_value_heads {kv_heads} must divide num_attention_heads {heads}",
                file=source,
                field="num_key_value_heads",
            )
        inter = integer("intermediate_size", 0) or 4 * hidden
        dtype = cfg.get("torch_dtype", cfg.get("dtype"))
        if dtype is None:
            raise ConfigError("required key is missing (weight dtype)", file=source, field="torch_dtype")
        dtype_name = str(dtype).removeprefix("torch.").lower()
        if dtype_name not in DTYPE_BYTES:
            raise ConfigError(
                f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}", file=source, field="torch_dtype"
            )

        experts = 0
        for key in EXPERT_COUNT_KEYS:
            if cfg.get(key):
                experts = integer(key, minimum=1)
                break
        per_token = 0
        if experts:
            if not cfg.get("num_experts_per_tok"):
                raise ConfigError(
                    f"a mixture-of-experts model ({experts} experts) needs the experts-per-token key",
                    file=source,
                    field="num_experts_per_tok",
                )
            per_token = integer("num_experts_per_tok", minimum=1)
            if per_token > experts:
                raise ConfigError(
                    f"{per_token} experts per token exceed the {experts} experts", file=source, field="num_experts_per_tok"
                )
        shared = integer("shared_expert_intermediate_size", 0)
        if not shared and cfg.get("n_shared_experts"):
            shared = integer("n_shared_experts", minimum=1) * (integer("moe_intermediate_size", 0) or inter)
        return cls(
            name=name,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            intermediate_size=inter,
            dtype_bytes=DTYPE_BYTES[dtype_name],
            vocab_size=integer("vocab_size", 0),
            max_context=integer("max_position_embeddings", 0),
            num_experts=experts,
            experts_per_token=per_token,
            moe_intermediate_size=(integer("moe_intermediate_size", 0) or inter) if experts else 0,
            shared_expert_intermediate_size=shared,
            moe_layer_step=integer("interleave_moe_layer_step", 0),
            dense_intermediate_size=integer("intermediate_size_mlp", 0) or inter,
            hf_head_dim=integer("head_dim", 0),
            source=source,
        )


def available_models() -> list[str]:
    """Names of the model descriptions shipped in ``configs/models``.

    Examples
    --------
    >>> "qwen3-14b" in available_models()
    True
    """
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def _parse_mapping(path: Path, text: str) -> Any:
    if path.suffix != ".json":
        return parse_yaml(text, path, ConfigError)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", file=path) from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"not valid JSON: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                          file=path) from None


def _unique_keys(path: Path):
    """A ``json.loads`` hook refusing a key given twice in one object."""

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError("key given twice", file=path, field=key)
            out[key] = value
        return out

    return hook


def load_model(name_or_path: str | Path) -> ModelSpec:
    """Load a model description by shipped name or by path.

    Parameters
    ----------
    name_or_path : str or Path
        A shipped name (see :func:`available_models`, case-insensitive), an HF
        ``config.json``, a folder holding one, or a calib model ``.yaml``.

    Raises
    ------
    ConfigError
        Unknown name, unreadable file, or an invalid field (named in the message).

    Examples
    --------
    >>> load_model("qwen3-14b").attention_shape
    (40, 8, 128)
    """
    text = str(name_or_path)
    shipped = MODELS_DIR / f"{text.lower()}.yaml"
    path = Path(text)
    if not path.exists() and shipped.exists():
        path = shipped
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise ConfigError("folder has no config.json", file=path.parent)
    if not path.exists():
        raise ConfigError(
            f"unknown model {text!r}: not a file and not one of {', '.join(available_models())}", field="model"
        )
    name = path.parent.name if path.name == "config.json" else path.stem
    return _model(str(path), read_text(path, error=ConfigError), name)


@lru_cache(maxsize=256)
def _model(path: str, text: str, name: str) -> ModelSpec:
    """The (immutable) spec of a model file's ``text``: parsed once per process and content."""
    return ModelSpec.from_dict(_parse_mapping(Path(path), text), name=name, source=path)
