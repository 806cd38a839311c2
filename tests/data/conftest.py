"""Fixtures for the data-loader tests: the shared measurements and small synthetic runs."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # let `pytest` run without an installed calib
    sys.path.insert(0, str(REPO))


def _shared_data() -> Path | None:
    for cand in (os.environ.get("CALIB_SHARED_DATA"), REPO / ".." / "shared" / "data", Path("/work/shared/data")):
        if cand and (Path(cand) / "hg1" / "experiments.csv").is_file():
            return Path(cand).resolve()
    return None


SHARED = _shared_data()


@pytest.fixture
def shared() -> Path:
    """The read-only measurement folder (``../shared/data``); skip when absent."""
    if SHARED is None:
        pytest.skip("../shared/data (the measurement folder) is not available")
    return SHARED


# --------------------------------------------------------------------------- synthetic GuideLLM run


def guidellm_doc(n: int = 4, strategies=("synchronous", "throughput", "constant")) -> dict:
    """A minimal valid ``guidellm-results.json`` with ``n`` requests per benchmark."""
    benches = []
    for strategy in strategies:
        reqs = []
        for i in range(n):
            out, ttft = 10 + i, 50.0 + i
            latency = (ttft + (out - 1) * 5.0) / 1000.0
            reqs.append(
                {
                    "prompt_tokens": 100 + i,
                    "output_tokens": out,
                    "time_to_first_token_ms": ttft,
                    "request_latency": latency,
                    "time_per_output_token_ms": latency * 1000.0 / out,
                    "info": {"timings": {"request_start": 1000.0 + 0.5 * i}},
                }
            )
        cfg = {"type_": strategy, **({"rate": 2.0} if strategy == "constant" else {})}
        benches.append(
            {
                "config": {"strategy": cfg},
                "duration": float(n),
                "requests": {"successful": reqs, "errored": [{}] if strategy == "constant" else [], "incomplete": []},
                "metrics": {
                    "time_to_first_token_ms": {"successful": {"mean": 51.5}},
                    "time_per_output_token_ms": {"successful": {"mean": 9.0}},
                    "request_latency": {"successful": {"mean": 0.11}},
                },
            }
        )
    return {"benchmarks": benches}


EXP_CONFIG = {"model": "meta-llama/Llama-2-7b-hf", "tensor_parallelism": 1, "max_num_seqs": 8, "max_num_batched_tokens": 2048}
PROFILE = {
    "rate-type": "sweep",
    "max-requests": 4,
    "random-seed": 42,
    "data": {
        "prefix_tokens": 0,
        "prompt_tokens": 100,
        "prompt_tokens_stdev": 1,
        "prompt_tokens_min": 90,
        "prompt_tokens_max": 110,
        "output_tokens": 12,
        "output_tokens_stdev": 2,
        "output_tokens_min": 10,
        "output_tokens_max": 14,
    },
}


def write_guidellm_run(folder: Path, doc=None, exp=None, profile=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "guidellm-results.json").write_text(json.dumps(guidellm_doc() if doc is None else doc))
    (folder / "exp-config.yaml").write_text(yaml.safe_dump(EXP_CONFIG if exp is None else exp))
    (folder / "profile.yaml").write_text(yaml.safe_dump(PROFILE if profile is None else profile))
    return folder


# --------------------------------------------------------------------------- synthetic loaded trace


def trace_docs(n: int = 5) -> dict[str, object]:
    """Valid contents of a small ``batched/<run>/`` folder (file name -> document)."""
    requests = {
        "experiment": "synthetic-run",
        "model_id": "meta-llama/Llama-2-70b-hf",
        "model_short": "llama-2-70b",
        "profile": "codegen",
        "split": "train",
        "config": {
            "tensor_parallelism": 4,
            "max_num_seqs": 128,
            "max_num_batched_tokens": 2048,
            "kv_blocks_total_gpu": 100,
            "block_size": 16,
        },
        "requests": [
            {"index": i, "arrival_time_us": 1000 + 400_000 * i, "input_tokens": 100 + i,
             "output_tokens": [10, 2, 10, 9, 10][i % 5], "prefix_group": "", "has_error": i == n - 1}
            for i in range(n)
        ],  # fmt: skip
    }
    truth = [
        {"index": i, "has_error": i == n - 1, "e2e_s": 0.05 + 0.09, "ttft_s": float("nan") if i == n - 1 else 0.05}
        for i in range(n)
    ]
    profile = {
        "data": {"shared_prefix": {"output_len": 10}, "type": "shared_prefix"},
        "load": {"stages": [{"duration": 1, "rate": 2}, {"duration": 1, "rate": 3}], "type": "constant"},
    }
    exp = {"model": "meta-llama/Llama-2-70b-hf", "tensor_parallelism": 4, "max_num_seqs": 128}
    return {"requests.json": requests, "ground_truth.json": truth, "profile.yaml": profile, "exp-config.yaml": exp}


def write_trace(folder: Path, docs: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, doc in (trace_docs() if docs is None else docs).items():
        if name.endswith(".json"):
            (folder / name).write_text(json.dumps(doc))
        else:
            (folder / name).write_text(yaml.safe_dump(doc))
    return folder


def deep(doc):
    return copy.deepcopy(doc)


def expect_error(fn, file: str, field: str, *more: str):
    """Call ``fn``; assert it raises DataError whose message names ``file``, ``field`` and ``more``."""
    from calib.errors import DataError

    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    for part in (file, field, *more):
        assert part in message, f"{part!r} not in {message!r}"
    return info.value


@pytest.fixture(scope="session")
def builders():
    """The synthetic-data builders above, as one namespace (session scope: usable with hypothesis)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        guidellm_doc=guidellm_doc,
        write_guidellm_run=write_guidellm_run,
        exp_config=lambda: deep(EXP_CONFIG),
        profile=lambda: deep(PROFILE),
        trace_docs=trace_docs,
        write_trace=write_trace,
        expect_error=expect_error,
    )
