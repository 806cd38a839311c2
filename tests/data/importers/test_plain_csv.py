"""The plain-CSV importer (``arrival_s,input_tokens,output_tokens,ttft_ms,e2e_ms,status``) on files written here."""

from __future__ import annotations

import numpy as np
import pytest

from calib.data.importers import ImportOptions, import_runs, read_runs
from calib.data.runs import read_run
from calib.errors import ConfigError, DataError

OPTS = ImportOptions(model="llama-2-7b-hf", tp=1)
HEADER = "arrival_s,input_tokens,output_tokens,ttft_ms,e2e_ms,status"


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_documented_format(tmp_path):
    path = write(tmp_path / "my-bench.csv", [
        HEADER,
        "1700000000.00,512,128,40.0,1310.0,ok",
        "1700000000.50,500,128,42.5,1320.5,ok",
        "1700000001.00,510,0,0,0,timeout",  # a failed request: counted, not replayed
        "1700000001.25,abc,128,41.0,1300.0,ok",  # unusable: kept with its reason
        "1700000001.50,520,128,45.0,30.0,ok",  # E2E below TTFT
        "",
        "1700000002.00,530,1,44.0,44.0,OK",
    ])
    [(folder, rec)] = import_runs("csv", [path], tmp_path / "out", OPTS)
    assert rec.name == "my-bench" and rec.profile == "csv"
    assert rec.counts() == {"rows": 7, "ok": 3, "failed": {"status 'timeout'": 1}, "bad": {
        "line 5: input_tokens: expected an integer >= 1, got 'abc'": 1,
        "line 6: e2e_ms: 30 is below ttft_ms 45": 1,
        "line 7: empty line": 1}}
    trace, info = read_run(folder)
    req = trace.requests
    assert req["arrival_us"].tolist() == [0, 500000, 2000000]  # arrival_s from any origin -> relative
    assert req["output_tokens"].tolist() == [128, 128, 1]
    np.testing.assert_allclose(req["tpot_ms"].to_numpy()[:2], [(1310 - 40) / 127, (1320.5 - 42.5) / 127])
    assert np.isnan(req["tpot_ms"].iloc[2])
    assert trace.excluded == 1 and len(trace.skipped) == 3 and trace.output_rule_name == "recorded"
    assert rec.server.defaults == ("max_num_seqs", "max_num_batched_tokens", "kv_blocks", "block_size")


def test_columns_in_any_order_and_a_profile(tmp_path):
    path = write(tmp_path / "b.csv", ["status,e2e_ms,ttft_ms,output_tokens,input_tokens,arrival_s",
                                      "ok,1310,40,128,512,5.0", "ok,1310,40,128,512,6.5"])
    prof = tmp_path / "profile.yaml"
    prof.write_text("load: {stages: [{duration: 1, rate: 1}, {duration: 1, rate: 2}]}\n"
                    "data: {shared_prefix: {output_len: 128, system_prompt_len: 64, num_unique_system_prompts: 2}}\n")
    [rec] = read_runs("csv", [path], ImportOptions(model="llama-2-7b-hf", tp=1, profile=prof, kv_blocks=500))
    assert [s.rate for s in rec.stages] == [1.0, 2.0] and rec.output_len == 128
    assert rec.prefix.shared_prompts == 2 and rec.server.kv_blocks == 500


@pytest.mark.parametrize("lines, match", [
    ([], "empty file"),
    (["arrival_s,input_tokens,output_tokens,ttft_ms,e2e_ms"], "b.csv: status: missing column"),
    ([HEADER + ",extra"], "b.csv: extra: unknown column"),
    ([HEADER], "no request row"),
    ([HEADER, "x,1,1,1,1,ok"], "b.csv: arrival_s: no row with a usable arrival time"),
])
def test_bad_files_are_one_line_errors(tmp_path, lines, match):
    path = tmp_path / "b.csv"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError, match=match):
        read_runs("csv", [path], OPTS)


def test_all_rows_failed_cannot_be_written(tmp_path):
    path = write(tmp_path / "f.csv", [HEADER, "0,1,1,1,1,error"])
    with pytest.raises(DataError, match="no usable request among 1 rows"):
        import_runs("csv", [path], tmp_path / "out", OPTS)


def test_model_given_as_a_config_json(shared_data, tmp_path):
    path = write(tmp_path / "c.csv", [HEADER, "0,100,10,20,110,ok", "1,100,10,20,110,ok"])
    config = shared_data / "model_configs" / "llama-2-7b-hf" / "config.json"
    [(folder, rec)] = import_runs("csv", [path], tmp_path / "out", ImportOptions(model=str(config), tp=1))
    assert (folder / "models" / "llama-2-7b-hf" / "config.json").read_bytes() == config.read_bytes()
    trace, _ = read_run(folder)
    assert trace.model == str((folder / "models" / "llama-2-7b-hf" / "config.json").resolve())


def test_model_flag_is_required(tmp_path):
    path = write(tmp_path / "c.csv", [HEADER, "0,100,10,20,110,ok"])
    with pytest.raises(ConfigError, match="--model: required for format csv"):
        read_runs("csv", [path])
