"""calib.settings: one typed model of everything a calibration sets."""

import math
import pickle

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from calib.errors import ConfigError
from calib.physics.overhead import OVERHEAD_MODELS
from calib.settings import FLAT_NAMES, OVERHEAD_SETTINGS, Settings, flat_name, qualified_name


def test_defaults_reproduce_the_v23_reference():
    s = Settings()
    opts = s.physics_options()
    assert (s.physics.variant, opts.mfu_rule, opts.mixed_rule, opts.bw_efficiency) == ("v2.3", "nearest", "weighted",
                                                                                       None)
    assert s.overhead_model().params == {"per_layer_us": 100.0}
    assert (s.replay.mode, s.replay.phantom, s.replay.tpot, s.replay.seed) == ("reference", True, "itl", 42)


def test_every_parameter_has_one_flat_and_one_qualified_name():
    assert len(FLAT_NAMES) == len(set(FLAT_NAMES.values()))
    for flat, qual in FLAT_NAMES.items():
        assert qualified_name(flat) == qual == qualified_name(qual)
        assert flat_name(qual) == flat
    assert FLAT_NAMES["overhead_model"] == "overhead.model"


def test_every_overhead_model_has_a_section_with_documented_ranged_fields():
    assert set(OVERHEAD_SETTINGS) == set(OVERHEAD_MODELS)
    for name, section in OVERHEAD_SETTINGS.items():
        fields = {k: f for k, f in section.model_fields.items() if k != "model"}
        assert fields and all(f.description for f in fields.values()), name
        built = section().build()
        assert type(built) is OVERHEAD_MODELS[name]
        assert set(built.ranges()) == set(fields)


@pytest.mark.parametrize("params,field", [
    ({"per_layer_us": -50}, "overhead.per_layer_us"),
    ({"per_layer_us": math.nan}, "overhead.per_layer_us"),
    ({"per_layer_us": math.inf}, "overhead.per_layer_us"),
    ({"seed": 4.5}, "replay.seed"),
    ({"seed": [42]}, "replay.seed"),
    ({"seed": True}, "replay.seed"),
    ({"variant": ["v2.3"]}, "physics.variant"),
    ({"bw_efficiency": 0}, "physics.bw_efficiency"),
    ({"mfu_floor": 1.0}, "physics.mfu_floor"),
    ({"overhead_model": "magic"}, "overhead.model"),
    ({"overhead_model": "batch_linear", "per_layer_us": 1}, "overhead.per_layer_us"),
    ({"alpha": 0.5}, "overhead.alpha"),
    ({"no_such_thing": 1}, "no_such_thing"),
])
def test_invalid_values_are_one_line_errors_naming_the_parameter(params, field):
    with pytest.raises(ConfigError) as info:
        Settings.from_params(params, source="study.yaml")
    text = str(info.value)
    assert "\n" not in text and field in text


def test_with_values_revalidates_and_a_new_overhead_model_starts_from_its_defaults():
    s = Settings.from_params({"per_layer_us": 80})
    assert s.with_values({"overhead.per_layer_us": 75}).get("per_layer_us") == 75.0
    other = s.with_values({"overhead_model": "per_step_plus_per_layer", "step_us_const": 300})
    assert other.overhead.per_layer_us == 100.0 and other.overhead.step_us_const == 300.0
    with pytest.raises(ConfigError, match="overhead.per_layer_us"):
        s.with_values({"per_layer_us": -1})


def test_round_trips_through_params_mapping_and_pickle():
    s = Settings.from_params({"overhead_model": "batch_linear", "a_us": 3, "b_us": 0.5, "variant": "v2.4",
                              "mode": "corrected", "request_latency_ms": 12})
    assert Settings.from_params(s.params()) == s
    assert Settings.from_mapping(s.model_dump()) == s
    assert pickle.loads(pickle.dumps(s)) == s
    assert set(s.qualified()) <= set(FLAT_NAMES.values())


@hsettings(max_examples=60, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=3),
                 st.booleans(), st.none()))
def test_per_layer_us_accepts_exactly_the_finite_non_negative_numbers(value):
    from calib.settings import MAX_OVERHEAD_US

    ok = (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                            and math.isfinite(value) and 0 <= value <= MAX_OVERHEAD_US))
    try:
        Settings.from_params({"per_layer_us": value})
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == ok
