"""``calib capacity``: rows per rate, the knee, SLOs, CSV/PNG/JSON outputs, argument errors."""

from __future__ import annotations

import csv
import json

import pytest

from calib.cli import main
from calib.commands.capacity import COLUMNS, parse_rates, parse_slo

ARGS = ["capacity", "--model", "llama-2-7b-hf", "--tp", "1", "--input-len", "512", "--output-len", "128"]


def test_rate_list_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*ARGS, "--rates", "1,2,4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["rate"] for r in doc["rows"]] == [1.0, 2.0, 4.0]
    for r in doc["rows"]:
        assert list(r) == list(COLUMNS)
        for m in ("ttft", "tpot", "e2e"):
            assert 0 < r[f"{m}_mean_ms"] <= r[f"{m}_p99_ms"]
        assert not r["saturated"] and r["throughput_rps"] == pytest.approx(r["rate"], rel=0.2)
    assert doc["knee_rate"] is None and doc["max_stable_rate"] == 4.0
    assert doc["workload"]["seed"] == 0 and "Poisson" in doc["workload"]["arrivals"]
    with open(tmp_path / "calib-capacity" / "capacity.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert (tmp_path / "calib-capacity" / "capacity.png").stat().st_size > 10_000


def test_knee_and_slo(tmp_path, capsys):
    assert main([*ARGS, "--rates", "10:70:20", "--duration", "120", "--warmup", "20", "--slo",
                 "ttft_p90=200ms,tpot_p90=0.05s", "--out", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rates = [r["rate"] for r in doc["rows"]]
    assert rates == [10.0, 30.0, 50.0, 70.0]
    sat = [r["saturated"] for r in doc["rows"]]
    assert not sat[0] and sat[-1] and sat == sorted(sat)  # stable at 10 req/s, saturated at 70, once for good
    knee = rates[sat.index(True)]
    assert doc["knee_rate"] == knee and doc["max_stable_rate"] == rates[sat.index(True) - 1]
    assert doc["slo"] == {"ttft_p90_ms": 200.0, "tpot_p90_ms": 50.0}
    assert doc["max_rate_meeting_slo"] == max(r["rate"] for r in doc["rows"] if r["meets_slo"])
    assert doc["rows"][-1]["saturated"] and not doc["rows"][-1]["meets_slo"]


def test_same_seed_same_rows(tmp_path, capsys):
    runs = []
    for k in range(2):
        assert main([*ARGS, "--rates", "3", "--duration", "60", "--warmup", "10", "--seed", "7", "--json",
                     "--out", str(tmp_path / str(k))]) == 0
        runs.append(json.loads(capsys.readouterr().out)["rows"])
    assert runs[0] == runs[1]


def test_parsers():
    assert parse_rates("1:20")[-1] == 20.0 and len(parse_rates("1:20")) == 20
    assert parse_rates("2:10:4") == [2.0, 6.0, 10.0]
    assert parse_slo("e2e_p99=2s") == {"e2e_p99_ms": 2000.0}


@pytest.mark.parametrize("extra, message", [
    (["--rates", "5:1"], "--rates: STOP 1 is below START 5"),
    (["--rates", "a,b"], "--rates: expected a number, got 'a'"),
    (["--rates", "1", "--slo", "latency=3"], "--slo: expected METRIC_STAT=VALUE"),
    (["--rates", "1", "--warmup", "400"], "--warmup: must be >= 0 and below --duration"),
])
def test_errors(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main([*ARGS, *extra]) == 2
    assert message in capsys.readouterr().err


def test_model_by_config_json(shared_data, tmp_path, capsys):
    config = shared_data / "model_configs" / "llama-2-7b-hf" / "config.json"
    assert main(["capacity", "--model", str(config), "--tp", "1", "--input-len", "256", "--output-len", "64",
                 "--rates", "2", "--duration", "60", "--warmup", "10", "--json", "--out", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "llama-2-7b-hf" and len(doc["rows"]) == 1
