"""Experiment summaries: the embedded HG1 dataset, the import, and bad inputs."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calib.data import COLUMNS, EMBEDDED_HG1, import_hg1, load_experiments, load_workloads
from calib.errors import DataError


def test_embedded_dataset_shape_and_split():
    df = load_experiments()
    assert len(df) == 13
    assert list(df.columns) == list(COLUMNS)
    assert (df.hg1_split == "train").sum() == 9 and (df.hg1_split == "test").sum() == 4
    assert set(df[df.hg1_split == "test"].index) == {
        "jan30-llama2-7b-tp1-codesweep",
        "jan30-llama2-7b-tp2-chatsweep",
        "jan30-llama2-7b-tp4-codesweep",
        "20260210-llama2-70b-tp4-codesweep",
    }
    assert list(df.index) == list(df.experiment) and df.index.name is None
    assert df.tp.dtype == np.int64 and df.n_requests.dtype == np.int64
    assert set(df.family) == {"llama2-7b", "codellama-34b", "llama2-70b", "qwen3-14b", "qwen2.5-7b"}
    assert (df.source == "configs/datasets/hg1/experiments.csv").all()


def test_embedded_rates_and_workload_columns():
    df = load_experiments()
    row = df.loc["jan30-llama2-7b-tp1-chatsweep"]
    assert row.rate == round(1000 / 1292.6, 6) == 0.773635
    assert (row.model, row.tp, row.workload) == ("llama-2-7b-hf", 1, "chatsweep")
    assert (row.ttft_mean_ms, row.tpot_mean_ms, row.e2e_mean_ms) == (13.9, 6.2, 1292.6)
    assert (row.n_requests, row.prefix_tokens, row.prompt_mean, row.output_max) == (50, 284, 70.0, 512)
    np.testing.assert_allclose(df.rate, (1000 / df.e2e_mean_ms).round(6))
    summ = df.loc["dec17-tp1-qwen7-summarization"]
    assert (summ.n_requests, summ.prefix_tokens, summ.model) == (40, 820, "qwen2.5-7b-instruct")
    assert df.itl_mean_ms.isna().all()


def test_source_layout_loads_to_the_same_figures(shared):
    ours = load_experiments().drop(columns="source")
    theirs = load_experiments(shared / "hg1").drop(columns="source")
    pd.testing.assert_frame_equal(ours, theirs)
    assert load_workloads(shared / "hg1") == load_workloads()


def test_import_is_deterministic_and_matches_embedded(shared, tmp_path):
    a = import_hg1(shared / "hg1", tmp_path / "a")
    b = import_hg1(shared / "hg1", tmp_path / "b")
    assert [p.name for p in a] == ["experiments.csv", "workloads.yaml", "request_lengths.json", "README.md"]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.read_bytes() == (EMBEDDED_HG1 / pa.name).read_bytes(), f"embedded {pa.name} is stale"
    src = shared / "hg1"
    assert (tmp_path / "a/experiments.csv").read_bytes() != (src / "experiments.csv").read_bytes()
    assert (tmp_path / "a/workloads.yaml").read_bytes() != (src / "workloads.yaml").read_bytes()
    ours = json.loads((tmp_path / "a/request_lengths.json").read_text())
    assert ours == json.loads((src / "reference_request_lengths.json").read_text())
    assert (tmp_path / "a/request_lengths.json").read_bytes() != (src / "reference_request_lengths.json").read_bytes()


def test_import_command_registers(tmp_path, shared):
    from calib.commands.import_experiments import register

    parser = argparse.ArgumentParser(prog="calib")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["import-hg1", str(shared / "hg1"), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert len(load_experiments(tmp_path / "out")) == 13
    default = parser.parse_args(["import-hg1", "x"])
    assert default.out == Path("configs/datasets/hg1") and not default.out.is_absolute()


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture
def dataset(tmp_path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(EMBEDDED_HG1, out)
    return out


def _edit_csv(folder: Path, old: str, new: str) -> None:
    path = folder / "experiments.csv"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "field", "extra"),
    [
        (",ttft_mean_ms,", ",ttft_ms,", "ttft_mean_ms", "missing column"),
        ("train,13.9,6.2", "train,13.9,0.0", "tpot_mean_ms", "jan30-llama2-7b-tp1-chatsweep"),
        ("train,13.9,6.2", "train,-1,6.2", "ttft_mean_ms", "line 2"),
        ("train,13.9,6.2,1292.6", "train,13.9,6.2,abc", "e2e_mean_ms", "abc"),
        ("llama2-7b,1,chatsweep", "llama2-7b,0,chatsweep", "tp", "must be >= 1"),
        ("llama2-7b,1,chatsweep", "llama2-7b,1.5,chatsweep", "tp", "integer"),
        ("llama2-7b,1,chatsweep", "llama2-7b,1,nosuchload", "workload", "nosuchload"),
        ("chatsweep,train", "chatsweep,validate", "hg1_split", "validate"),
        ("jan30-llama2-7b-tp1-codesweep,", "jan30-llama2-7b-tp1-chatsweep,", "experiment", "duplicate"),
        ("1292.6\n", "1292.6,extra\n", "line 2", "fields"),
    ],
)
def test_bad_experiments_csv(dataset, builders, old, new, field, extra):
    _edit_csv(dataset, old, new)
    builders.expect_error(lambda: load_experiments(dataset), "experiments.csv", field, extra)


def test_empty_and_missing_files(dataset, tmp_path, builders):
    (dataset / "experiments.csv").write_text("")
    builders.expect_error(lambda: load_experiments(dataset), "experiments.csv", "")
    (dataset / "experiments.csv").write_text("experiment,model,family,tp,workload,hg1_split,ttft_mean_ms,tpot_mean_ms,e2e_mean_ms\n")
    builders.expect_error(lambda: load_experiments(dataset), "experiments.csv", "no experiment rows")
    (dataset / "workloads.yaml").unlink()
    builders.expect_error(lambda: load_experiments(dataset), "workloads.yaml", "not found")
    builders.expect_error(lambda: load_experiments(tmp_path / "nowhere"), "nowhere", "no such")
    (tmp_path / "empty").mkdir()
    builders.expect_error(lambda: load_experiments(tmp_path / "empty"), "empty", "neither")


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("    requests: 50\n", "", "workloads.chatsweep.requests"),
        ("stdev: 35,", "stdev: -3,", "workloads.chatsweep.prompt_tokens.stdev"),
        ("min: 2, max: 200", "min: 300, max: 200", "workloads.chatsweep.prompt_tokens.max"),
        ("requests: 50", "requests: fifty", "workloads.chatsweep.requests"),
        ("prompt_tokens: {mean: 70, stdev: 35, min: 2, max: 200}", "prompt_tokens: [70, 35]", "workloads.chatsweep.prompt_tokens"),
        ("workloads:\n", "workloads: [\n", "line"),
    ],
)
def test_bad_workloads_yaml(dataset, builders, old, new, field):
    path = dataset / "workloads.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    builders.expect_error(lambda: load_workloads(dataset), "workloads.yaml", field)


def test_source_column_names_accepted(dataset):
    text = (dataset / "experiments.csv").read_text()
    text = text.replace("experiment,model,", "experiment,model_config,").replace(",ttft_mean_ms,", ",gt_ttft_mean_ms,")
    (dataset / "experiments.csv").write_text(text)
    assert load_experiments(dataset / "experiments.csv").ttft_mean_ms.iloc[0] == 13.9


def test_import_rejects_bad_lengths(shared, tmp_path, builders):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("experiments.csv", "workloads.yaml"):
        (src / name).write_text((shared / "hg1" / name).read_text())
    doc = json.loads((shared / "hg1" / "reference_request_lengths.json").read_text())
    doc["42"]["chatsweep"] = doc["42"]["chatsweep"][:-1]
    (src / "reference_request_lengths.json").write_text(json.dumps(doc))
    builders.expect_error(lambda: import_hg1(src, tmp_path / "out"), "reference_request_lengths.json", "42.chatsweep", "49")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError):
        import_hg1(tmp_path / "absent", tmp_path / "out")
