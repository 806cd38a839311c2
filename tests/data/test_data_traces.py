"""Loaded-server traces: real runs of data/batched and synthetic bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from calib.data import TRACE_COLUMNS, list_traces, load_trace

CODEGEN_7B = "20260217-155451-llama-2-7b-tp1-codegen"


@pytest.fixture
def batched(shared):
    return shared / "batched"


def test_real_7b_codegen(batched):
    t = load_trace(batched / CODEGEN_7B)
    r = t.requests
    assert (t.model, t.tp, t.max_num_seqs, t.max_num_batched_tokens) == ("llama-2-7b-hf", 1, 128, 2048)
    assert (t.kv_blocks, t.block_size, t.profile, t.overloaded) == (7462, 16, "codegen", False)
    assert list(r.columns) == list(TRACE_COLUMNS)
    assert len(r) == 9000 and t.excluded == 0 and not t.skipped
    assert r.arrival_us.dtype == np.int64 and r.arrival_us.iloc[0] == 0 and r.arrival_us.is_monotonic_increasing
    assert [(s.duration_s, s.rate) for s in t.stages] == [(600.0, 5.0), (600.0, 10.0)]
    assert r.stage.value_counts().sort_index().tolist() == [3000, 6000]
    # about a third of the recorded output counts are far below the fixed length (247)
    assert t.output_len == 247 and t.n_short == 3101
    assert (r.output_tokens[r.short_output] == 247).all()
    assert (r.output_tokens_recorded < 0.9 * 247).sum() == 3101
    assert t.output_rule.startswith("profile:") and "3101 of 9000" in t.output_rule
    assert 8.0 < r.tpot_ms.median() < 9.0 and r.tpot_ms.notna().all()


def test_output_rules_on_real_run(batched):
    rec = load_trace(batched / CODEGEN_7B, output_rule="recorded")
    exc = load_trace(batched / CODEGEN_7B, output_rule="exclude")
    prof = load_trace(batched / CODEGEN_7B)
    assert (rec.requests.output_tokens == rec.requests.output_tokens_recorded).all()
    assert rec.requests.tpot_ms.mean() > 4 * prof.requests.tpot_ms.mean()  # the absurd TPOTs
    assert exc.requests.tpot_ms.notna().sum() == 9000 - 3101
    # the short requests' decode time is the same as the others': the count is wrong, not the generation
    r = prof.requests
    decode = r.e2e_ms - r.ttft_ms
    assert abs(decode[r.short_output].median() - decode[~r.short_output].median()) < 20


def test_real_excluded_counts_and_names(batched):
    runs = {p.name: p for p in list_traces(batched)}
    assert len(runs) == 16
    reasoning = load_trace(runs["20260217-170634-llama-2-7b-tp1-reasoning"], output_rule="recorded")
    assert reasoning.overloaded and reasoning.excluded == 4068 and len(reasoning.requests) == 732
    t70 = load_trace(runs["20260217-203421-llama-2-70b-hf-tp4-codegen"], output_rule="recorded")
    assert t70.model == "llama-2-70b-hf" and t70.tp == 4 and t70.excluded == 0
    mix = load_trace(runs["20260218-130541-mixtral-8x7b-v0-1-tp2-general"], output_rule="recorded")
    assert mix.model == "mixtral-8x7b-v0.1" and mix.kv_blocks == 27510


def test_synthetic_trace(tmp_path, builders):
    t = load_trace(builders.write_trace(tmp_path / "t"))
    r = t.requests
    assert t.name == "synthetic-run" and t.model == "llama-2-70b-hf" and t.split == "train"
    assert t.excluded == 1 and len(r) == 4
    assert r.arrival_us.tolist() == [0, 400_000, 800_000, 1_200_000]
    assert r.stage.tolist() == [0, 0, 0, 1]
    assert r.output_tokens_recorded.tolist() == [10, 2, 10, 9]
    assert r.output_tokens.tolist() == [10, 10, 10, 9]  # 2 < 0.9 * 10 -> 10; 9 is kept
    assert r.tpot_ms.tolist() == pytest.approx([10.0, 10.0, 10.0, 11.25])
    rec = load_trace(tmp_path / "t", output_rule="recorded")
    assert rec.requests.tpot_ms.tolist() == pytest.approx([10.0, 90.0, 10.0, 11.25])
    exc = load_trace(tmp_path / "t", output_rule="exclude")
    assert np.isnan(exc.requests.tpot_ms.iloc[1]) and exc.requests.output_tokens.iloc[1] == 2


def _set(path, value):
    def edit(docs):
        obj = docs
        for key in path[:-1]:
            obj = obj[key]
        if value is KeyError:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "file", "field", "extra"),
    [
        (_set(("requests.json", "requests", 0, "arrival_time_us"), -5), "requests.json", "requests[0].arrival_time_us", ">= 0"),
        (_set(("requests.json", "requests", 2, "arrival_time_us"), 10), "requests.json", "requests[2].arrival_time_us", "not sorted"),
        (_set(("ground_truth.json", 2, "index"), 7), "ground_truth.json", "[2].index", "7"),
        (_set(("requests.json", "config", "kv_blocks_total_gpu"), 0), "requests.json", "config.kv_blocks_total_gpu", ">= 1"),
        (_set(("requests.json", "config", "max_num_seqs"), 0), "requests.json", "config.max_num_seqs", ">= 1"),
        (_set(("requests.json", "config", "block_size"), KeyError), "requests.json", "config.block_size", "missing"),
        (_set(("requests.json", "requests", 1, "input_tokens"), KeyError), "requests.json", "requests[1].input_tokens", "missing"),
        (_set(("requests.json", "profile"), KeyError), "requests.json", "profile", "missing"),
        (_set(("requests.json", "requests", 1, "index"), 0), "requests.json", "requests[1].index", "duplicate"),
        (_set(("requests.json", "requests", 1, "has_error"), "no"), "requests.json", "requests[1].has_error", "true/false"),
        (_set(("profile.yaml", "load", "stages"), []), "profile.yaml", "load.stages", "no load stage"),
        (_set(("profile.yaml", "data"), KeyError), "profile.yaml", "data.shared_prefix.output_len", "missing"),
        (_set(("exp-config.yaml", "tensor_parallelism"), 2), "exp-config.yaml", "tensor_parallelism", "says 4"),
    ],
)
def test_bad_trace_files(tmp_path, builders, edit, file, field, extra):
    docs = builders.trace_docs()
    edit(docs)
    folder = builders.write_trace(tmp_path / "t", docs)
    builders.expect_error(lambda: load_trace(folder), file, field, extra)


def test_ground_truth_count_mismatch(tmp_path, builders):
    docs = builders.trace_docs()
    docs["ground_truth.json"] = docs["ground_truth.json"][:-1]
    folder = builders.write_trace(tmp_path / "t", docs)
    builders.expect_error(lambda: load_trace(folder), "ground_truth.json", "<top level>", "4 entries", "5 requests")


def test_bad_timings_are_skipped_and_all_bad_is_an_error(tmp_path, builders):
    docs = builders.trace_docs()
    docs["ground_truth.json"][0]["ttft_s"] = None
    docs["ground_truth.json"][1]["e2e_s"] = 0.01
    t = load_trace(builders.write_trace(tmp_path / "a", docs))
    assert len(t.requests) == 2 and [s.index for s in t.skipped] == [0, 1]
    assert "ttft_s is missing" in t.skipped[0].reason and "below ttft_s" in t.skipped[1].reason
    for g in docs["ground_truth.json"]:
        g["has_error"] = True
    for r in docs["requests.json"]["requests"]:
        r["has_error"] = True
    folder = builders.write_trace(tmp_path / "b", docs)
    builders.expect_error(lambda: load_trace(folder), "ground_truth.json", "has_error", "no usable request")


def test_recorded_rule_needs_no_output_len_and_unknown_rule(tmp_path, builders):
    docs = builders.trace_docs()
    del docs["profile.yaml"]["data"]
    folder = builders.write_trace(tmp_path / "t", docs)
    assert load_trace(folder, output_rule="recorded").output_len is None
    builders.expect_error(lambda: load_trace(folder, output_rule="clip"), "", "output_rule", "profile, recorded, exclude")


def test_missing_files_and_list_traces(tmp_path, builders):
    folder = builders.write_trace(tmp_path / "root" / "run-a")
    (tmp_path / "root" / "not-a-run").mkdir()
    assert list_traces(tmp_path / "root") == [folder]
    (folder / "ground_truth.json").unlink()
    builders.expect_error(lambda: load_trace(folder), "ground_truth.json", "file not found")
    builders.expect_error(lambda: list_traces(tmp_path / "nope"), "nope", "not a folder")


def test_a_kv_cache_too_small_for_every_request_is_refused():
    import numpy as np

    from calib.data.traces import Stage, assemble_trace
    from calib.errors import DataError

    args = dict(arrival_us=np.array([0, 10]), input_tokens=np.array([5, 60]), output_recorded=np.array([3, 3]),
                ttft_ms=np.array([1.0, 1.0]), e2e_ms=np.array([5.0, 9.0]), request_index=np.array([0, 1]),
                stages=(Stage(1.0, 2.0),), output_rule="profile", output_len=3, name="t", model="m", tp=1,
                max_num_seqs=1, max_num_batched_tokens=8, block_size=16, profile="p", overloaded=False, excluded=0)
    assert len(assemble_trace(**args, kv_blocks=1).requests) == 2  # 16 tokens hold 5 + 3: the other is rejected
    with pytest.raises(DataError, match="kv_blocks_total_gpu.*cannot hold even the shortest request"):
        assemble_trace(**{**args, "block_size": 4}, kv_blocks=1, file="requests.json")
