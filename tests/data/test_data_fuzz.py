"""Fuzz the loaders: mutated or random files either load or raise DataError, nothing else."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calib.data import (
    EMBEDDED_HG1,
    load_experiments,
    load_guidellm_run,
    load_trace,
    load_workloads,
    reference_lengths,
)
from calib.errors import DataError

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
odd_cells = st.sampled_from(["", "0", "-1", "nan", "inf", "1e999", "x", '"', "2.5", "train"]) | st.text(max_size=6)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):  # the first few items are enough
            yield from _paths(v, (*prefix, i))


def mutate(doc, data):
    """Apply 1-3 random edits (replace a node, delete a key or item, set a numeric edge value)."""
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = list(_paths(doc))
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["replace", "delete", "edge"]), label="op")
        new = data.draw(values if op == "replace" else st.sampled_from([0, -1, 0.0, 1e308, 2**70, "", None, [], {}]))
        if not path:
            doc = new
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if op == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = new
    return doc


def _ok_or_data_error(fn):
    try:
        return fn()
    except DataError:
        return None


def _dump(doc, kind: str) -> str:
    if kind == "json":
        return json.dumps(doc, allow_nan=True)
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return str(doc)


@FUZZ
@given(data=st.data())
def test_fuzz_experiments_csv_and_workloads(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(EMBEDDED_HG1 / "experiments.csv", folder)
        shutil.copy(EMBEDDED_HG1 / "workloads.yaml", folder)
        lines = (folder / "experiments.csv").read_text().splitlines()
        rows = [line.split(",") for line in lines]
        target = data.draw(st.sampled_from(["cell", "line", "yaml", "raw"]))
        if target == "cell":
            for _ in range(data.draw(st.integers(1, 3))):
                i, j = data.draw(st.integers(0, len(rows) - 1)), data.draw(st.integers(0, 8))
                rows[i][j] = data.draw(odd_cells)
            (folder / "experiments.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
        elif target == "line":
            i = data.draw(st.integers(0, len(lines) - 1))
            lines[i] = data.draw(st.text(max_size=40))
            (folder / "experiments.csv").write_text("\n".join(lines))
        elif target == "yaml":
            doc = mutate(yaml.safe_load((folder / "workloads.yaml").read_text()), data)
            (folder / "workloads.yaml").write_text(_dump(doc, "yaml"))
        else:
            name = data.draw(st.sampled_from(["experiments.csv", "workloads.yaml"]))
            (folder / name).write_bytes(data.draw(st.binary(max_size=200)))
        df = _ok_or_data_error(lambda: load_experiments(folder))
        if df is not None:
            assert df.tp.min() >= 1 and (df[["ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms"]] > 0).all().all()
        _ok_or_data_error(lambda: load_workloads(folder))


@FUZZ
@given(data=st.data())
def test_fuzz_request_lengths(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "request_lengths.json"
        doc = {"42": {"w": [[1, 2], [3, 4]]}, "1": {"w": [[5, 6]], "v": [[0, 1]]}}
        if data.draw(st.booleans()):
            path.write_text(_dump(mutate(doc, data), "json"))
        else:
            path.write_bytes(data.draw(st.binary(max_size=100)))
        seed = data.draw(st.sampled_from([42, 1, 7]))
        out = _ok_or_data_error(lambda: reference_lengths(data.draw(st.sampled_from(["w", "v"])), seed, path=path))
        if out is not None:
            assert out.ndim == 2 and out.shape[1] == 2


@FUZZ
@given(data=st.data())
def test_fuzz_guidellm_run(data, builders):
    with tempfile.TemporaryDirectory() as tmp:
        doc, exp, prof = builders.guidellm_doc(n=3), builders.exp_config(), builders.profile()
        which = data.draw(st.sampled_from(["results", "results", "exp", "profile", "raw"]))
        if which == "results":
            doc = mutate(doc, data)
        elif which == "exp":
            exp = mutate(exp, data)
        elif which == "profile":
            prof = mutate(prof, data)
        folder = Path(tmp) / "run"
        folder.mkdir()
        (folder / "guidellm-results.json").write_text(_dump(doc, "json"))
        (folder / "exp-config.yaml").write_text(_dump(exp, "yaml"))
        (folder / "profile.yaml").write_text(_dump(prof, "yaml"))
        if which == "raw":
            name = data.draw(st.sampled_from(["guidellm-results.json", "exp-config.yaml", "profile.yaml"]))
            (folder / name).write_bytes(data.draw(st.binary(max_size=200)))
        run = _ok_or_data_error(lambda: load_guidellm_run(folder))
        if run is not None:
            assert run.rate > 0 and len(run.requests) > 0
            _ok_or_data_error(run.constant_rate_benchmarks)
            _ok_or_data_error(lambda: load_experiments(folder))


@FUZZ
@given(data=st.data())
def test_fuzz_trace(data, builders):
    with tempfile.TemporaryDirectory() as tmp:
        docs = builders.trace_docs(n=4)
        names = ["requests.json", "requests.json", "ground_truth.json", "profile.yaml", "exp-config.yaml"]
        name = data.draw(st.sampled_from(names))
        raw = data.draw(st.integers(0, 9)) == 0
        if not raw:
            docs[name] = mutate(docs[name], data)
        folder = Path(tmp) / "run"
        folder.mkdir()
        for fname, doc in docs.items():
            (folder / fname).write_text(_dump(doc, "json" if fname.endswith(".json") else "yaml"))
        if raw:
            (folder / name).write_bytes(data.draw(st.binary(max_size=200)))
        rule = data.draw(st.sampled_from(["profile", "recorded", "exclude"]))
        trace = _ok_or_data_error(lambda: load_trace(folder, output_rule=rule))
        if trace is not None:
            r = trace.requests
            assert len(r) > 0 and (r.arrival_us >= 0).all() and r.arrival_us.is_monotonic_increasing
