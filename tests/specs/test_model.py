"""Model descriptions: shipped names, HF config.json files, and each bad input."""

from __future__ import annotations

import json

import pytest

from calib.errors import ConfigError
from calib.specs import available_models, load_model

GOOD = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "torch_dtype": "bfloat16"}


def write(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def test_six_models_shipped():
    assert {"llama-2-7b-hf", "llama-2-70b-hf", "codellama-34b-instruct-hf", "qwen3-14b", "qwen2.5-7b-instruct",
            "mixtral-8x7b-v0.1"} <= set(available_models())


@pytest.mark.parametrize("name,shape,layers,dff", [
    ("llama-2-7b-hf", (32, 32, 128), 32, 11008),
    ("llama-2-70b-hf", (64, 8, 128), 80, 28672),
    ("codellama-34b-instruct-hf", (64, 8, 128), 48, 22016),
    ("qwen3-14b", (40, 8, 128), 40, 17408),
    ("qwen2.5-7b-instruct", (28, 4, 128), 28, 18944),
])
def test_shipped_shapes(name, shape, layers, dff):
    m = load_model(name)
    assert (m.attention_shape, m.num_layers, m.intermediate_size) == (shape, layers, dff)


def test_shipped_matches_hf_config(shared_data):
    for folder in (shared_data / "model_configs").iterdir():
        assert load_model(folder) == load_model(folder.name).__class__(**{
            **load_model(folder.name).__dict__, "source": str(folder / "config.json")})


def test_mixtral_moe_fields():
    m = load_model("mixtral-8x7b-v0.1")
    assert (m.num_experts, m.experts_per_token, m.moe_intermediate_size) == (8, 2, 14336)


def test_defaults(tmp_path):
    cfg = dict(GOOD)
    del cfg["num_key_value_heads"]
    cfg["intermediate_size"] = 0
    m = load_model(write(tmp_path, cfg))
    assert m.num_kv_heads == 4 and m.intermediate_size == 256 and m.head_dim == 16


def test_folder_accepted(tmp_path):
    write(tmp_path, GOOD)
    assert load_model(tmp_path).num_layers == 2


@pytest.mark.parametrize("change,field", [
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": 66}, "hidden_size"),
    ({"torch_dtype": "float13"}, "torch_dtype"),
    ({"torch_dtype": None}, "torch_dtype"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_local_experts": 8}, "num_experts_per_tok"),
])
def test_bad_config(tmp_path, change, field):
    cfg = {**GOOD, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = write(tmp_path, cfg)
    with pytest.raises(ConfigError) as info:
        load_model(path)
    assert field in str(info.value) and str(path) in str(info.value)


def test_unknown_name_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        load_model("gpt-17")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(bad)


def test_a_model_file_is_parsed_once_per_content(tmp_path):
    """load_model returns the same immutable spec while the file's text is unchanged, and a new one after an edit."""
    first = load_model("llama-2-7b-hf")
    assert load_model("LLAMA-2-7B-HF") is first
    src = tmp_path / "m" / "config.json"
    src.parent.mkdir()
    base = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
            "intermediate_size": 11008, "vocab_size": 32000, "torch_dtype": "float16"}
    src.write_text(json.dumps(base))
    a = load_model(src.parent)
    assert load_model(src) is a and a.num_layers == 32
    src.write_text(json.dumps({**base, "num_hidden_layers": 16}))
    b = load_model(src.parent)
    assert b is not a and b.num_layers == 16 and a.num_layers == 32
