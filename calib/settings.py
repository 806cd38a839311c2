"""Everything a calibration sets, as one typed, validated model.

A :class:`Settings` has three sections:

``physics``
    the step model: variant, MFU rule and scales, switches, constants, hardware;
``overhead``
    the CPU/scheduling time the roofline does not see: a discriminated union
    with one small class per overhead model of :mod:`calib.physics.overhead`
    (``model`` selects it; each field carries its valid range and a doc line);
``replay``
    how a benchmark is replayed: mode, request lengths and their seed, the
    phantom last step, the TPOT definition, the client latency.

This module is the only place a parameter has a name, a default, a range and a
doc line.  Every parameter has a *qualified* name ``section.field``
(``overhead.per_layer_us``) used in search spaces, study files and results,
and a *flat* name — the field name, unique across sections — used as a
scikit-learn hyperparameter (``RooflineRegressor(per_layer_us=80)``).  The
overhead model's discriminator is ``overhead.model``, flat ``overhead_model``.

Examples
--------
>>> s = Settings.from_params({"per_layer_us": 80, "variant": "v2.4"})
>>> s.overhead.per_layer_us, s.physics.variant
(80.0, 'v2.4')
>>> s.with_values({"overhead.per_layer_us": 75}).get("overhead.per_layer_us")
75.0
>>> Settings.from_params({"per_layer_us": -5})
Traceback (most recent call last):
...
calib.errors.ConfigError: overhead.per_layer_us: must be >= 0, got -5
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, fields as dc_fields
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from calib.errors import ConfigError
from calib.metrics import TPOT_DEFINITIONS, client_ms
from calib.physics.options import (DECODE_ATTENTION_RULES, GEMM_MFU_SOURCES, MIXED_RULES, PREFILL_ATTENTION_RULES,
                                   VARIANTS, PhysicsOptions)
from calib.physics.overhead import OVERHEAD_MODELS, OverheadModel

__all__ = ["Physics", "Overhead", "Replay", "Settings", "SECTIONS", "FLAT_NAMES", "qualified_name",
           "flat_name", "OVERHEAD_SETTINGS"]


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, values are immutable, numbers must be finite and be
    numbers (a boolean or a string where a number belongs is an error, not 0/1 or a parsed string)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_lax_numbers(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is None or not isinstance(value, (bool, str)):
                    continue
                args = set(typing.get_args(field.annotation)) | {field.annotation}
                if args & {int, float} and bool not in args:
                    raise PydanticCustomError("not_a_number", "must be a number, got {got}",
                                              {"got": repr(value), "field": name})
        return data


#: Smallest efficiency, MFU or MFU scale (1 %): a value nearer 0 makes step times overflow, not slow.
MIN_FRACTION = 0.01


def _f(default: Any, doc: str, **constraints: Any) -> Any:
    return Field(default=default, description=doc, **constraints)


class Physics(_Section):
    """The step model (``roofline-spec.md`` §3-§7).  ``None`` takes the variant's choice."""

    variant: Literal[VARIANTS] = _f(
        "v2.3", "formula family: v2.3 (HG1 reconstruction), v2.4, v3 (constant MFU), v4 (per-kernel rooflines)")
    hardware: str = _f("h100", "hardware description (configs/hardware/<name>.yaml)", min_length=1)
    mfu_rule: Literal["nearest", "interp"] | None = _f(None, "MFU lookup rule (v2.3: nearest, v2.4: interp)")
    gemm_weight_floor: bool | None = _f(None, "each GEMM takes at least the time to load its weights (v2.4)")
    decode_attention: Literal[DECODE_ATTENTION_RULES] | None = _f(
        None, "decode attention: the batch's longest context (v2.3) or each request's (v2.4)")
    prefill_attention: Literal[PREFILL_ATTENTION_RULES] | None = _f(
        None, "prefill attention at the bucket length (v2.3) or the actual length (v2.4)")
    mixed_rule: Literal[MIXED_RULES] | None = _f(None, "how a step mixing prefill and decode combines them")
    bw_efficiency: float | None = _f(None, "sustained / peak HBM bandwidth (None: hardware's, v3: 1.0)",
                                     ge=MIN_FRACTION, le=1)
    gemm_mfu_scale: float = _f(1.0, "multiplier on every looked-up GEMM MFU (clipped to 1)", ge=MIN_FRACTION,
                               le=100)
    prefill_attention_mfu_scale: float = _f(1.0, "multiplier on the prefill-attention MFU", ge=MIN_FRACTION, le=100)
    decode_attention_mfu_scale: float = _f(1.0, "multiplier on the decode-attention MFU", ge=MIN_FRACTION, le=100)
    mfu_floor: float = _f(0.0, "lower bound on every MFU after scaling", ge=0, lt=1)
    mfu_prefill: float = _f(0.45, "constant prefill MFU of the v3 roofline", ge=MIN_FRACTION, le=1)
    mfu_decode: float = _f(0.30, "constant decode MFU of the v3 roofline", ge=MIN_FRACTION, le=1)
    gemm_mfu_source: Literal[GEMM_MFU_SOURCES] = _f(
        "constant", "v4: GEMM compute efficiency from gemm_mfu (constant) or the MFU table at the sharded shape")
    gemm_mfu: float = _f(0.72, "v4: compute efficiency of every GEMM", ge=MIN_FRACTION, le=1)
    kernel_floor_us: float = _f(3.0, "v4: fixed cost of every kernel (µs)", ge=0, le=1e4)
    prefill_attention_mfu: float = _f(0.6, "v4: compute efficiency of prefill attention", ge=MIN_FRACTION, le=1)
    decode_attention_efficiency: float = _f(0.7, "v4: sustained / peak bandwidth of decode attention",
                                            ge=MIN_FRACTION, le=1)
    allreduce_us: float = _f(10.0, "v4: fixed cost of one tensor-parallel all-reduce (µs)", ge=0, le=1e4)

    def options(self) -> PhysicsOptions:
        """The :class:`~calib.physics.options.PhysicsOptions` these settings describe."""
        values = self.model_dump(exclude={"variant", "hardware"})
        return PhysicsOptions.for_variant(self.variant, **values)


#: Upper limit of an overhead parameter without its own (µs): one second per layer and step is no overhead
#: any server has, so a larger value is a typo (``1e308`` would make every step time infinite).
MAX_OVERHEAD_US = 1e6


def _overhead_section(cls: type[OverheadModel]) -> type[_Section]:
    """A pydantic section for one overhead model, generated from the model's field metadata."""
    spec: dict[str, Any] = {"model": (Literal[cls.name], Field(default=cls.name, description="overhead model"))}
    for f in dc_fields(cls):
        meta = f.metadata
        bounds = {"ge": meta.get("low", 0.0), "le": MAX_OVERHEAD_US if meta.get("high") is None else meta["high"]}
        default = f.default if f.default is not MISSING else None
        spec[f.name] = (float, Field(default=default, description=meta.get("doc", ""), **bounds))
    name = f"{cls.__name__}Settings"
    doc = f"Settings of the ``{cls.name}`` overhead model: {(cls.__doc__ or '').strip().splitlines()[0]}"
    section = create_model(name, __base__=_Section, __doc__=doc, __module__=__name__, **spec)
    globals()[name] = section  # importable by name, so settings pickle

    def build(self) -> OverheadModel:
        return cls(**self.model_dump(exclude={"model"}))

    section.build = build  # the physics object this section describes
    section.physics_class = cls
    return section


#: overhead model name -> its settings section
OVERHEAD_SETTINGS: dict[str, type[_Section]] = {name: _overhead_section(c) for name, c in OVERHEAD_MODELS.items()}

Overhead = Annotated[Union[tuple(OVERHEAD_SETTINGS.values())], Field(discriminator="model")]


class Replay(_Section):
    """How a benchmark is replayed and its latencies reported."""

    mode: Literal["reference", "corrected"] = _f(
        "reference", "reference: as the HG1 study did (phantom last step, ITL as TPOT); corrected: like with like")
    lengths: Literal["reference", "numpy", "quantiles", "run"] = _f(
        "reference", "request lengths: the reference draws, a NumPy sample, the distributions' quantiles in a "
                     "seeded order, or a GuideLLM run's requests")
    seed: int = _f(42, "seed of the request-length draws", ge=0, le=2**31 - 1)
    phantom_last_step: bool | None = _f(None, "add the reference simulator's extra decode step (None: the mode's)")
    tpot_definition: Literal[TPOT_DEFINITIONS] | None = _f(
        None, "predicted TPOT: itl = mean (E2E-TTFT)/(O-1); guidellm = sum E2E / sum O (None: the mode's)")
    request_latency_ms: float = _f(0.0, "client/API-server latency added to each request's TTFT and E2E (ms)",
                                   ge=0, le=60_000)
    input_token_latency_us: float = _f(0.0, "client/API-server latency per input token (tokenisation) added to "
                                            "each request's TTFT and E2E (µs)", ge=0, le=10_000)
    cpu_overlap: bool = _f(False, "under async scheduling (loaded replays), the step's overhead (CPU) overlaps "
                                  "the GPU work of the step before: a step lasts max(hardware, overhead), the "
                                  "first after an idle engine their sum; synchronous replays always add them")

    @field_validator("seed", mode="before")
    @classmethod
    def _integral_seed(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"must be an integer, got {v!r}")
        return v

    def client_ms(self, input_tokens):
        """Client latency (ms) of requests with these input token counts (:func:`calib.metrics.client_ms`)."""
        return client_ms(self.request_latency_ms, self.input_token_latency_us, input_tokens)

    @property
    def phantom(self) -> bool:
        """Whether the replay adds the phantom last step."""
        return self.mode == "reference" if self.phantom_last_step is None else self.phantom_last_step

    @property
    def tpot(self) -> str:
        """The TPOT definition in force."""
        return self.tpot_definition or ("itl" if self.mode == "reference" else "guidellm")


SECTIONS = ("physics", "overhead", "replay")


def _section_fields() -> dict[str, str]:
    """flat name -> qualified name, for every parameter of every section (names are unique by construction)."""
    out: dict[str, str] = {}

    def add(flat: str, qual: str) -> None:
        if flat in out and out[flat] != qual:
            raise RuntimeError(f"settings parameter {flat!r} is defined twice ({out[flat]}, {qual})")
        out[flat] = qual

    for name in Physics.model_fields:
        add(name, f"physics.{name}")
    add("overhead_model", "overhead.model")
    for section in OVERHEAD_SETTINGS.values():
        for name in section.model_fields:
            if name != "model":
                add(name, f"overhead.{name}")
    for name in Replay.model_fields:
        add(name, f"replay.{name}")
    return out


#: flat name -> qualified name
FLAT_NAMES: dict[str, str] = _section_fields()
_QUALIFIED = {q: f for f, q in FLAT_NAMES.items()}


def qualified_name(name: str) -> str:
    """``per_layer_us`` or ``overhead.per_layer_us`` -> ``overhead.per_layer_us``; unknown names raise."""
    if name in _QUALIFIED:
        return name
    if name in FLAT_NAMES:
        return FLAT_NAMES[name]
    raise ConfigError(f"unknown settings parameter; known: {', '.join(sorted(_QUALIFIED))}", field=name)


def flat_name(name: str) -> str:
    """``overhead.per_layer_us`` or ``per_layer_us`` -> ``per_layer_us``."""
    return _QUALIFIED[qualified_name(name)]


def _check_number(qual: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"must be a finite number, got {value!r}", field=qual)


class Settings(_Section):
    """Physics + overhead + replay: everything a calibration sets.

    Build from nested sections, from flat or qualified names with
    :meth:`from_params`, or from a study file's mapping with
    :meth:`from_mapping`; change values with :meth:`with_values` (validated
    again).  Errors are one-line :class:`~calib.errors.ConfigError` naming the
    qualified parameter.

    Examples
    --------
    >>> Settings().overhead.model, Settings().replay.mode
    ('per_layer', 'reference')
    >>> Settings.from_params({"overhead_model": "batch_linear", "b_us": 2}).overhead.b_us
    2.0
    >>> sorted(Settings().params())[:3]
    ['bw_efficiency', 'decode_attention', 'decode_attention_mfu_scale']
    """

    physics: Physics = Field(default_factory=Physics)
    overhead: Overhead = Field(default_factory=lambda: OVERHEAD_SETTINGS["per_layer"]())
    replay: Replay = Field(default_factory=Replay)

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, source: str | None = None) -> "Settings":
        """Validate a nested mapping (``{"physics": {...}, "overhead": {"model": ..., ...}, "replay": {...}}``)."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise _one_line(exc, source) from None

    @classmethod
    def from_params(cls, params: Mapping[str, Any], source: str | None = None) -> "Settings":
        """Settings from flat (``per_layer_us``) or qualified (``overhead.per_layer_us``) names.

        ``None`` values mean "the default" and are ignored.
        """
        nested: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, value in params.items():
            qual = qualified_name(key)
            if value is None:
                continue
            _check_number(qual, value)
            section, name = qual.split(".", 1)
            nested[section][name] = value
        ovh = nested["overhead"]
        model = ovh.setdefault("model", "per_layer")
        if model in OVERHEAD_SETTINGS:
            allowed = set(OVERHEAD_SETTINGS[model].model_fields)
            extra = sorted(set(ovh) - allowed)
            if extra:
                raise ConfigError(f"not a parameter of overhead model {model!r} (it has: "
                                  f"{', '.join(sorted(allowed - {'model'}))})", file=source,
                                  field=f"overhead.{extra[0]}")
        return cls.from_mapping(nested, source)

    # ---- views ---------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Flat name -> value of every parameter that applies (the overhead model's fields only)."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            for name, value in getattr(self, section).model_dump().items():
                out["overhead_model" if (section, name) == ("overhead", "model") else name] = value
        return out

    def qualified(self) -> dict[str, Any]:
        """Qualified name -> value of every parameter that applies."""
        return {FLAT_NAMES[k]: v for k, v in self.params().items()}

    def get(self, name: str) -> Any:
        """The value of one parameter (flat or qualified name)."""
        section, field = qualified_name(name).split(".", 1)
        return getattr(getattr(self, section), field)

    def with_values(self, values: Mapping[str, Any], source: str | None = None) -> "Settings":
        """A copy with ``values`` (flat or qualified names) applied; changing ``overhead.model`` resets the
        overhead's other fields to that model's defaults."""
        flat = self.params()
        if any(qualified_name(k) == "overhead.model" for k in values):
            flat = {k: v for k, v in flat.items() if not FLAT_NAMES[k].startswith("overhead.")}
        flat.update({flat_name(k): v for k, v in values.items()})
        return Settings.from_params(flat, source)

    def physics_options(self) -> PhysicsOptions:
        return self.physics.options()

    def overhead_model(self) -> OverheadModel:
        return self.overhead.build()


def _one_line(exc: ValidationError, source: str | None) -> ConfigError:
    err = exc.errors()[0]
    # drop the union's tag from the location: ("overhead", "per_layer", "per_layer_us") -> overhead.per_layer_us
    parts = list(err["loc"])
    if len(parts) > 2 and parts[0] == "overhead" and parts[1] in OVERHEAD_SETTINGS:
        del parts[1]
    loc = ".".join(str(p) for p in parts)
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        msg = "unknown parameter"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        limit = next(iter(err.get("ctx", {}).values()), "?")
        msg = f"must be {op} {limit:g}, got {got!r}" if isinstance(limit, (int, float)) else msg
    elif kind == "finite_number":
        msg = f"must be a finite number, got {got!r}"
    elif kind == "literal_error":
        msg = f"unknown value {got!r}; {msg}"
    elif kind == "not_a_number":
        loc = f"{parts[0]}.{err['ctx']['field']}" if parts else err["ctx"]["field"]
    elif kind == "union_tag_invalid":
        msg = f"unknown overhead model {err.get('ctx', {}).get('tag', got)!r}; known: {', '.join(OVERHEAD_SETTINGS)}"
        loc = "overhead.model"
    return ConfigError(msg, file=source, field=loc or None)
