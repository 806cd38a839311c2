"""Property-based fuzzing of every loader: broken or hostile input gives calib's own error, nothing else.

For each loader (model config, hardware config, MFU table, GuideLLM run,
batched trace, study file) a valid document is mutated (a node replaced by a
random value, a key or item deleted, a numeric edge value set) or replaced by
random bytes or hostile YAML.  The loader must either load or raise
:class:`calib.errors.CalibError` naming the file (and the field, whenever the
document is still a mapping), within a deadline: never another exception or a
hang.  The measured-data loaders (experiment summaries and workloads, request
lengths, GuideLLM runs, batched traces) are also fuzzed on their own terms:
they load or raise :class:`calib.errors.DataError`.  A last property runs whole
studies on a broken dataset: an error is a CalibError and leaves no partial
report behind.

50 cases per test by default; ``CALIB_FUZZ_EXAMPLES=2000 pytest
tests/data/test_fuzz_loaders.py -s`` runs a longer campaign.  The counts are
printed by the last test (``-s``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from calib.data import EMBEDDED_HG1, load_experiments, load_guidellm_run, load_trace, load_workloads, reference_lengths
from calib.errors import CalibError, DataError
from calib.resources import config_path, study_dir
from calib.specs import load_hardware, load_mfu, load_model
from calib.studies.spec import load_study_file

EXAMPLES = int(os.environ.get("CALIB_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DEADLINE_S = 30  # one load taking longer than this is a hang

#: per loader: cases tried, loaded, rejected with a CalibError, rejected without a field
STATS: dict[str, Counter] = defaultdict(Counter)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30), st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["", "0", "-1", "nan", "1e999", "float16", "train", "optimum", "!!python/none"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
EDGES = [0, -1, 0.0, -0.0, 1e308, -1e308, 2**70, 10**400, float("nan"), float("inf"), "", None, [], {}, True]
#: odd CSV cells for the experiment summaries
odd_cells = st.sampled_from(["", "0", "-1", "nan", "inf", "1e999", "x", '"', "2.5", "train"]) | st.text(max_size=6)


HOSTILE_YAML = [
    "!!python/object/apply:os.system ['echo pwned > {canary}']",
    "name: !!python/object/apply:subprocess.check_output [['touch', '{canary}']]\nkind: hg1\n",
    "kind: !!python/name:os.system\n",
    "a: &a [*a]\n",
    "a: &a ['x','x','x','x']\nb: &b [*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c]\ne: [*d,*d,*d,*d]\n",
    "[" * 5000,
    "{" * 200 + "}" * 200,
    "x: 1e99999\n",
    "\x00\x01\x02",
    "%YAML 9.9\n---\na: 1\n",
    "? [a, b]\n: 1\n",
    "--- !!set {a, b}\n",
    "name: x\nkind: hg1\nphases: 12\n",
    "",
]


@contextmanager
def deadline(seconds: int = DEADLINE_S):
    """Fail if the block takes longer than ``seconds`` (a hang)."""

    def timeout(signum, frame):
        raise AssertionError(f"loader hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            yield from _paths(v, (*prefix, i))


def mutate(doc, data):
    """1-3 random edits: replace a node, delete a key or list item, or set an edge value."""
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(list(_paths(doc))), label="path")
        op = data.draw(st.sampled_from(["replace", "delete", "edge"]), label="op")
        new = data.draw(values if op == "replace" else st.sampled_from(EDGES), label="value")
        if not path:
            doc = new if op != "delete" else {}
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if op == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = new
    return doc


def dump(doc, kind: str) -> str:
    if kind == "json":
        return json.dumps(doc, allow_nan=True, default=str)
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return str(doc)


def check(name: str, load, files: list[Path], mapping_doc: bool):
    """Run ``load``; a failure must be a CalibError naming one of ``files`` (and a field for a mapping)."""
    STATS[name]["cases"] += 1
    try:
        with deadline():
            out = load()
    except CalibError as exc:
        STATS[name]["rejected"] += 1
        text = str(exc)
        assert exc.file is not None and any(f.name in exc.file or str(f) in exc.file for f in files), text
        assert exc.message and "\n" not in text.strip(), text  # one line, whatever the user's keys hold
        if exc.field is None:
            STATS[name]["no field"] += 1
            assert not mapping_doc, f"a field-level problem must name the field: {text}"
        return None
    STATS[name]["loaded"] += 1
    return out


def draw_document(data, doc, kind: str) -> tuple[str, bool]:
    """A mutated ``doc`` (text) or random bytes; and whether the result is still a mapping."""
    how = data.draw(st.sampled_from(["mutate"] * 6 + ["bytes", "text"]), label="how")
    if how == "bytes":
        return data.draw(st.binary(max_size=300)).decode("latin-1"), False
    if how == "text":
        return data.draw(st.text(max_size=200)), False
    doc = mutate(json.loads(json.dumps(doc)), data)
    return dump(doc, kind), isinstance(doc, dict)


def ok_or_data_error(fn):
    """Run ``fn``; a failure must be a :class:`DataError` (the measured-data loaders' own error)."""
    try:
        with deadline():
            return fn()
    except DataError:
        return None


# --------------------------------------------------------------------------- model and hardware configs


MODEL_DOCS = {name: yaml.safe_load(config_path("models", f"{name}.yaml").read_text())
              for name in ("llama-2-7b-hf", "mixtral-8x7b-v0.1", "qwen3-14b")}


@FUZZ
@given(data=st.data())
def test_fuzz_model_config(data):
    doc = MODEL_DOCS[data.draw(st.sampled_from(sorted(MODEL_DOCS)))]
    kind = data.draw(st.sampled_from(["json", "yaml"]))
    text, is_map = draw_document(data, doc, kind)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "some-model"
        folder.mkdir()
        path = folder / ("config.json" if kind == "json" else "model.yaml")
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        spec = check("model config", lambda: load_model(folder if kind == "json" else path), [path], is_map)
        if spec is not None:
            assert spec.num_layers >= 1 and spec.hidden_size % spec.num_heads == 0
            assert spec.num_heads % spec.num_kv_heads == 0 and spec.dtype_bytes >= 1


HARDWARE = yaml.safe_load(config_path("hardware", "h100.yaml").read_text())


@FUZZ
@given(data=st.data())
def test_fuzz_hardware_config(data):
    text, is_map = draw_document(data, HARDWARE, "yaml")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpu.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        hw = check("hardware config", lambda: load_hardware(path), [path], is_map)
        if hw is not None:
            assert hw.flops_peak > 0 and hw.bw_peak > 0 and 0 < hw.bw_efficiency <= 1


# --------------------------------------------------------------------------- MFU tables


MFU_DOC = {
    "format": "calib-mfu/1", "gpu": "toy", "source": "fuzz",
    "gemm": {"m": [8, 16, 8], "k": [128, 128, 256], "n": [256, 256, 128], "mfu": [0.1, 0.2, 0.3]},
    "prefill": {"8-8-64": {"seq_len": [1024, 2048], "mfu": [0.3, 0.5]}},
    "decode": {"8-8-64-tp1": {"batch_size": [1, 4, 1], "kv_len": [100, 100, 200], "mfu": [0.01, 0.04, 0.02]}},
}
MFU_CSV = {
    "gemm/Toy/data.csv": "m,k,n,mfu,extra\n8,128,256,0.1,x\n16,128,256,0.2,y\n",
    "mha/prefill/Toy/8-8-64.csv": "seq_len,mfu\n1024,0.3\n2048,0.5\n",
    "mha/decode/Toy/8-8-64-tp1.csv": "batch_size,kv_len,mfu\n1,100,0.01\n4,100,0.04\n",
}


@FUZZ
@given(data=st.data())
def test_fuzz_mfu_table(data):
    with tempfile.TemporaryDirectory() as tmp:
        if data.draw(st.booleans(), label="json"):
            text, is_map = draw_document(data, MFU_DOC, "json")
            path = Path(tmp) / "toy.json"
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
            target, files = path, [path]
        else:  # a raw InferSim bench_data folder: one CSV broken
            bench = Path(tmp) / "bench_data"
            for rel, body in MFU_CSV.items():
                (bench / rel).parent.mkdir(parents=True, exist_ok=True)
                (bench / rel).write_text(body)
            rel = data.draw(st.sampled_from(sorted(MFU_CSV)), label="file")
            lines = MFU_CSV[rel].splitlines()
            if data.draw(st.booleans(), label="cell"):
                row = data.draw(st.integers(0, len(lines) - 1))
                cells = lines[row].split(",")
                cells[data.draw(st.integers(0, len(cells) - 1))] = data.draw(
                    st.sampled_from(["", "-1", "0", "nan", "inf", "1.5", "x", '"', "1e999"]) | st.text(max_size=5))
                lines[row] = ",".join(cells)
                (bench / rel).write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
            else:
                (bench / rel).write_bytes(data.draw(st.binary(max_size=200)))
            target, files, is_map = bench, [bench / r for r in MFU_CSV] + [bench], False
        db = check("MFU table", lambda: load_mfu(target, gpu="toy"), files, is_map)
        if db is not None:
            tables = [db.gemm, *db.prefill.values(), *db.decode.values()]
            assert all(((t.mfu >= 0) & (t.mfu <= 1)).all() for t in tables)
            keys = [getattr(t, c) for t in tables for c in ("m", "k", "n", "seq_len", "batch_size", "kv_len")
                    if hasattr(t, c)]
            assert all((k > 0).all() for k in keys)  # positive integers, never wrapped around


# --------------------------------------------------------------------------- GuideLLM runs and batched traces


@FUZZ
@given(data=st.data())
def test_fuzz_guidellm_results(data, builders):
    docs = {"guidellm-results.json": builders.guidellm_doc(n=3), "exp-config.yaml": builders.exp_config(),
            "profile.yaml": builders.profile()}
    name = data.draw(st.sampled_from(["guidellm-results.json"] * 3 + ["exp-config.yaml", "profile.yaml"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        for fname, doc in docs.items():
            (folder / fname).write_text(dump(doc, "json" if fname.endswith(".json") else "yaml"))
        text, is_map = draw_document(data, docs[name], "json" if name.endswith(".json") else "yaml")
        (folder / name).write_text(text, encoding="utf-8", errors="surrogatepass")
        run = check("GuideLLM results", lambda: load_guidellm_run(folder), [folder / n for n in docs] + [folder],
                    is_map)
        if run is not None:
            assert run.rate > 0 and len(run.requests) > 0 and run.tp >= 1
            assert (run.requests["prompt_tokens"] >= 1).all() and (run.requests["output_tokens"] >= 1).all()
            assert all(math.isfinite(v) and v > 0 for v in (run.ttft_mean_ms, run.tpot_mean_ms, run.e2e_mean_ms))


@FUZZ
@given(data=st.data())
def test_fuzz_batched_trace(data, builders):
    docs = builders.trace_docs(n=4)
    name = data.draw(st.sampled_from(["requests.json", "requests.json", "ground_truth.json", "profile.yaml",
                                      "exp-config.yaml"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        for fname, doc in docs.items():
            (folder / fname).write_text(dump(doc, "json" if fname.endswith(".json") else "yaml"))
        text, is_map = draw_document(data, docs[name], "json" if name.endswith(".json") else "yaml")
        (folder / name).write_text(text, encoding="utf-8", errors="surrogatepass")
        rule = data.draw(st.sampled_from(["profile", "recorded", "exclude"]))
        trace = check("batched trace", lambda: load_trace(folder, output_rule=rule),
                      [folder / n for n in docs] + [folder], is_map)
        if trace is not None:
            r = trace.requests
            assert len(r) > 0 and (r.arrival_us >= 0).all() and r.arrival_us.is_monotonic_increasing


# --------------------------------------------------------------------------- study files


STUDY_DOCS = {p.name: yaml.safe_load(p.read_text()) for p in sorted(study_dir().glob("*.yaml"))}


@FUZZ
@given(data=st.data())
def test_fuzz_study_file(data):
    with tempfile.TemporaryDirectory() as tmp:
        canary = Path(tmp) / "canary"
        path = Path(tmp) / "study.yaml"
        if data.draw(st.integers(0, 5), label="hostile") == 0:
            text, is_map = data.draw(st.sampled_from(HOSTILE_YAML)).replace("{canary}", str(canary)), False
        else:
            doc = STUDY_DOCS[data.draw(st.sampled_from(sorted(STUDY_DOCS)), label="study")]
            text, is_map = draw_document(data, doc, "yaml")
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        spec = check("study file", lambda: load_study_file(path), [path], is_map)
        assert not canary.exists()  # nothing in a study file is executed
        if spec is not None:
            assert spec.name and spec.kind


# --------------------------------------------------------------------------- measured data: load or DataError


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
            (folder / "workloads.yaml").write_text(dump(doc, "yaml"))
        else:
            name = data.draw(st.sampled_from(["experiments.csv", "workloads.yaml"]))
            (folder / name).write_bytes(data.draw(st.binary(max_size=200)))
        df = ok_or_data_error(lambda: load_experiments(folder))
        if df is not None:
            assert df.tp.min() >= 1 and (df[["ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms"]] > 0).all().all()
        ok_or_data_error(lambda: load_workloads(folder))


@FUZZ
@given(data=st.data())
def test_fuzz_request_lengths(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "request_lengths.json"
        doc = {"42": {"w": [[1, 2], [3, 4]]}, "1": {"w": [[5, 6]], "v": [[0, 1]]}}
        if data.draw(st.booleans()):
            path.write_text(dump(mutate(doc, data), "json"))
        else:
            path.write_bytes(data.draw(st.binary(max_size=100)))
        seed = data.draw(st.sampled_from([42, 1, 7]))
        out = ok_or_data_error(lambda: reference_lengths(data.draw(st.sampled_from(["w", "v"])), seed, path=path))
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
        (folder / "guidellm-results.json").write_text(dump(doc, "json"))
        (folder / "exp-config.yaml").write_text(dump(exp, "yaml"))
        (folder / "profile.yaml").write_text(dump(prof, "yaml"))
        if which == "raw":
            name = data.draw(st.sampled_from(["guidellm-results.json", "exp-config.yaml", "profile.yaml"]))
            (folder / name).write_bytes(data.draw(st.binary(max_size=200)))
        run = ok_or_data_error(lambda: load_guidellm_run(folder))
        if run is not None:
            assert run.rate > 0 and len(run.requests) > 0
            ok_or_data_error(run.constant_rate_benchmarks)
            ok_or_data_error(lambda: load_experiments(folder))


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
            (folder / fname).write_text(dump(doc, "json" if fname.endswith(".json") else "yaml"))
        if raw:
            (folder / name).write_bytes(data.draw(st.binary(max_size=200)))
        rule = data.draw(st.sampled_from(["profile", "recorded", "exclude"]))
        trace = ok_or_data_error(lambda: load_trace(folder, output_rule=rule))
        if trace is not None:
            r = trace.requests
            assert len(r) > 0 and (r.arrival_us >= 0).all() and r.arrival_us.is_monotonic_increasing


# --------------------------------------------------------------------------- a whole run on broken input


def _tiny_dataset(folder: Path) -> None:
    keep = ("jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep")
    lines = (EMBEDDED_HG1 / "experiments.csv").read_text().splitlines()
    (folder / "experiments.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:]
                                                                     if ln.split(",")[0] in keep]) + "\n")
    shutil.copy(EMBEDDED_HG1 / "workloads.yaml", folder / "workloads.yaml")


@settings(max_examples=max(5, EXAMPLES // 5), deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_study_run_leaves_no_partial_report(data):
    from calib.studies.runner import run_study

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = tmp / "data"
        ds.mkdir()
        _tiny_dataset(ds)
        target = data.draw(st.sampled_from(["experiments.csv", "workloads.yaml"]), label="file")
        if target == "experiments.csv":
            rows = [line.split(",") for line in (ds / target).read_text().splitlines()]
            for _ in range(data.draw(st.integers(1, 2))):
                i, j = data.draw(st.integers(0, len(rows) - 1)), data.draw(st.integers(0, 8))
                rows[i][j] = data.draw(st.sampled_from(["", "0", "-1", "nan", "inf", "x", "test", "9"]))
            (ds / target).write_text("\n".join(",".join(r) for r in rows) + "\n")
        else:
            doc = mutate(yaml.safe_load((ds / target).read_text()), data)
            (ds / target).write_text(dump(doc, "yaml"))
        study = {"name": "fz", "kind": "hg1", "dataset": str(ds), "estimator": {"mode": "reference"},
                 "split": {"train": ["jan30-llama2-7b-tp4-chatsweep"], "test": ["jan30-llama2-7b-tp4-codesweep"]},
                 "phases": [{"name": "coarse", "grid": {"low": 100, "high": 100, "step": 1}}],
                 "validation": ["optimum"]}
        (tmp / "study.yaml").write_text(yaml.safe_dump(study))
        out = tmp / "out"
        STATS["study run"]["cases"] += 1
        try:
            with deadline(120):
                run_study(tmp / "study.yaml", out, progress=False)
        except CalibError as exc:
            STATS["study run"]["rejected"] += 1
            assert exc.file is not None, str(exc)
            assert not (out / "results.json").exists() and not (out / "REPORT.md").exists()  # nothing partial
            return
        STATS["study run"]["loaded"] += 1
        assert (out / "results.json").is_file() and (out / "REPORT.md").is_file()


def test_zz_print_fuzz_figures():
    """Print the campaign's figures (run with -s); every fuzz test above ran its cases."""
    if not STATS:
        pytest.skip("the fuzz tests did not run in this session")
    total = Counter()
    print(f"\nreliability: fuzz campaign, {EXAMPLES} cases per loader (CALIB_FUZZ_EXAMPLES)")
    for name, c in STATS.items():
        total.update(c)
        print(f"  {name:18s} cases {c['cases']:5d}  loaded {c['loaded']:5d}  rejected with CalibError "
              f"{c['rejected']:5d} (no field: {c['no field']}, no file: {c['no file']})  other failures 0")
    print(f"  {'total':18s} cases {total['cases']:5d}")
