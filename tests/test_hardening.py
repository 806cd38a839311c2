"""Issue 14: every bad input one line, nothing stale, nothing lost, nothing written where it should not be.

Bad input reaches calib through the command line, study files, model and
hardware files and datasets.  Each case here must end with one line on stderr
and exit status 2 (or a :class:`calib.errors.CalibError` in-process), never a
traceback, a hang or a silently wrong number.  Hypothesis generates the
inputs where a family of values is at stake; ``CALIB_FUZZ_EXAMPLES`` sets the
number of cases (default 40).  The counts are printed with ``-s`` (lines
starting with ``reliability:``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calib.cli import main
from calib.data.workloads import EMBEDDED_HG1
from calib.errors import ConfigError, DataError, StudyError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("CALIB_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "20260210-qwen3-14b-tp2-chatsweep"]
#: cases per family, printed by the last test
TRIED: Counter = Counter()


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "calib", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


def assert_one_line(proc, *needles: str, status: int = 2) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def in_process(*argv: str) -> tuple[int, str, str]:
    """``calib ARGV`` in this process: (status, stdout, stderr); any exception but SystemExit propagates."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as exc:  # argparse: usage errors and --help
            status = exc.code if isinstance(exc.code, int) else 2
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cut_dataset) -> Path:
    return cut_dataset(tmp_path_factory.mktemp("ds"), KEEP)


def study_doc(dataset: Path, **changes) -> dict:
    doc = {"name": "tiny", "kind": "hg1", "dataset": str(dataset), "estimator": {"mode": "reference"},
           "split": {"train": KEEP[:2], "test": KEEP[2:]},
           "phases": [{"name": "coarse", "grid": {"low": 0, "high": 100, "step": 50}}],
           "validation": ["optimum", 0]}
    doc.update(changes)
    if "modes" in changes:
        doc["estimator"] = {k: v for k, v in doc["estimator"].items() if k != "mode"}
    return doc


def write_study(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------- calib step


@pytest.mark.parametrize("args,needle", [
    (["--overhead-us", "nan"], "--overhead-us: must be a finite number"),
    (["--overhead-us", "inf"], "--overhead-us: must be a finite number"),
    (["--overhead-us", "-50"], "--overhead-us: must be >= 0"),
    (["--overhead-us", "1e308"], "--overhead-us: must be <= "),
    (["--tp", "1e30"], "--tp: expected a whole number"),
    (["--tp", "3"], "--tp: 32 attention heads do not divide among 3 GPUs"),
    (["--tp", "-9223372036854775808"], "--tp: must be >= 1"),
    (["--decode", "100000000"], "--decode: 100000001 tokens exceed llama-2-7b-hf's max_position_embeddings (4096)"),
    (["--decode", "-9223372036854775808"], "--decode PI: must be >= 0"),
    (["--decode", "99999999999999999999999"], "--decode PI: must be <= "),
    (["--prefill", "4000:1000"], "--prefill: 5000 tokens exceed"),
    (["--bw-efficiency", "nan"], "--bw-efficiency: must be a finite number"),
    (["--bw-efficiency", "2.2e-16"], "--bw-efficiency: must be >= 0.01"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_step_bad_values_are_one_line(args, needle):
    proc = run_cli("step", "--model", "llama-2-7b-hf", "--decode", "1000", *args)
    assert_one_line(proc, needle)


def test_step_tp_must_suit_the_kv_heads_too(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 768, "num_attention_heads": 12,
                               "num_key_value_heads": 4, "torch_dtype": "float16"}))
    status, _, err = in_process("step", "--model", str(cfg), "--decode", "10", "--tp", "6")
    assert status == 2 and "4 KV heads can be neither split nor replicated evenly over 6 GPUs" in err
    assert in_process("step", "--model", str(cfg), "--decode", "10", "--tp", "12")[0] == 0  # replicated


def test_step_json_into_a_closed_pipe_is_quiet():
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from calib.cli import main; "
            "sys.exit(main(['step', '--model', 'llama-2-7b-hf', '--decode', '1000', '--json']))")
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -c 60", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.startswith('{"step_us": 4868') and len(proc.stdout) == 60
    assert proc.stderr == "", proc.stderr  # no BrokenPipeError traceback, no "Exception ignored" at exit


@FUZZ
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**80), 2**80),
                       st.text(max_size=12)),
       flag=st.sampled_from(["--overhead-us", "--tp", "--decode", "--prefill", "--bw-efficiency"]))
def test_step_any_value_runs_or_is_one_line(value, flag):
    TRIED["calib step flag values"] += 1
    text = str(value)
    if flag == "--prefill":
        text = f"{text}:{text}"
    status, out, err = in_process("step", "--model", "llama-2-7b-hf", "--decode", "100", f"{flag}={text}", "--json")
    assert status in (0, 2), (status, err)
    if status == 0:
        result = json.loads(out)
        assert all(math.isfinite(v) for v in result.values() if isinstance(v, float))
        assert isinstance(result["step_us"], int) and 0 < result["step_us"] < 10**13
    else:
        assert len(err.strip().splitlines()) == 1 and "error" in err, err


# --------------------------------------------------------------------------- study files


def _bad_studies(dataset: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (study file, text the one-line error must hold)."""
    cases: dict[str, tuple[Path, str]] = {}

    def add(name: str, doc_or_text, needle: str) -> None:
        path = tmp / f"{name}.yaml"
        if isinstance(doc_or_text, dict):
            write_study(path, doc_or_text)
        elif isinstance(doc_or_text, bytes):
            path.write_bytes(doc_or_text)
        else:
            path.write_text(doc_or_text)
        cases[name] = (path, needle)

    base = study_doc(dataset)
    text = yaml.safe_dump(base, sort_keys=False)
    add("threshold-nan", text + "criteria: [{name: a, quantity: test, threshold: .nan}]\n",
        "criteria.0.threshold: must be a finite number, got nan")
    add("validation-1e308", {**base, "validation": ["optimum", 1e308, -5]}, "validation point 1e+308")
    add("validation-negative", {**base, "validation": ["optimum", -5]}, "validation point -5")
    add("validation-inf", text.replace("- 0\n", "- .inf\n"), "validation.1: must be a finite number")
    add("grid-nan", text.replace("high: 100", "high: .nan"), "phases.0.grid.high: must be a finite number")
    add("grid-min-int", text.replace("low: 0", "low: -9223372036854775808"),
        "phases.0.grid.low: integer out of range")
    add("radius-1e15", {**base, "phases": [*base["phases"], {"name": "fine", "around": "coarse", "radius": 1e15,
                                                            "step": 5}]}, "phases.1.radius")
    add("duplicate-key", text + "name: other\n",
        f"line {text.count(chr(10)) + 1}, column 1: duplicate key 'name' (first given at line 1)")
    add("nested-duplicate", text.replace("  mode: reference\n", "  mode: reference\n  mode: corrected\n"),
        "duplicate key 'mode'")
    add("yaml-syntax", "name: x\nkind: hg1\n  bad: [\n", "invalid YAML at line 3, column 6")
    add("utf16", text.encode("utf-16"), "UTF-16 text; save the file as UTF-8")
    add("latin1", (text + "description: caf\xe9\n").encode("latin-1"), "not UTF-8 text")
    add("nul-byte", text.replace("kind: hg1", "kind: hg1\x00"), "NUL byte at line 2, column 10")
    add("name-300", {**base, "name": "a" * 300}, "name: 300 characters, at most 64 allowed")
    add("name-dotdot", {**base, "name": ".."}, "name: '..' is not a study name")
    add("name-slash", {**base, "name": "../../etc"}, "is not a study name")
    add("estimator-seed", {**base, "estimator": {"mode": "reference", "seed": 1.5}}, "estimator.replay.seed")
    add("estimator-unknown", {**base, "estimator": {"mode": "reference", "bogus": 1}}, "estimator.bogus")
    add("estimator-list", {**base, "estimator": {"mode": "reference", "per_layer_us": [1]}},
        "estimator.overhead.per_layer_us")
    add("huge-int", {**base, "validation": ["optimum", 2**63]}, "integer out of range")
    big = tmp / "huge.yaml"
    with open(big, "wb") as fh:
        fh.write(text.encode())
        fh.write(b"# " + b"x" * (5 * 2**20) + b"\n")
    cases["huge-file"] = (big, "larger than the limit of 4 MB")
    cases["dev-zero"] = (Path("/dev/zero"), "/dev/zero: not a regular file")
    cases["folder"] = (tmp, "is a directory")
    return cases


def test_bad_study_files_are_one_line_naming_file_and_key(dataset, tmp_path):
    from calib.studies.spec import load_study_file

    cases = _bad_studies(dataset, tmp_path)
    for name, (path, needle) in cases.items():
        with pytest.raises(StudyError) as info:
            load_study_file(path)
        message = str(info.value)
        assert needle in message and str(path) in message and "\n" not in message, (name, message)
    TRIED["bad study files (in-process)"] += len(cases)
    # the same through the command line, for a few of them: one line, status 2, nothing written
    for name in ("threshold-nan", "duplicate-key", "utf16", "dev-zero", "name-dotdot"):
        path, needle = cases[name]
        proc = run_cli("study", "run", str(path), "--out", str(tmp_path / f"out-{name}"), "--no-progress")
        assert_one_line(proc, needle)
        assert not (tmp_path / f"out-{name}").exists()
    TRIED["bad study files (command line)"] += 5


def test_shipped_studies_still_load():
    from calib.resources import study_dir
    from calib.studies.spec import load_study_file

    files = sorted(Path(study_dir()).glob("*.yaml"))
    assert files and all(load_study_file(f) for f in files)


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
                    st.sampled_from([float("nan"), float("inf"), -float("inf"), 2**63, -(2**63), 1e308, -1e308]))


def _leaves(doc, path=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def _set(doc, path, value):
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


@FUZZ
@given(data=st.data())
def test_any_number_anywhere_in_a_study_file_loads_finite_or_is_refused(dataset, tmp_path, data):
    """Replace one value of a valid study file by a number: it loads (and then nothing in it is NaN, inf or
    beyond 2**53) or it is refused with a StudyError; never another exception."""
    from calib.studies.spec import MAX_INTEGER, load_study_file

    doc = study_doc(dataset, criteria=[{"name": "c", "quantity": "test", "threshold": 0.2}])
    paths = list(_leaves(doc))
    path = data.draw(st.sampled_from(paths))
    value = data.draw(numbers)
    _set(doc, path, value)
    file = tmp_path / "fuzz.yaml"
    file.write_text(yaml.safe_dump(doc))
    TRIED["numbers put into study files"] += 1
    try:
        spec = load_study_file(file)
    except StudyError as exc:
        assert "\n" not in str(exc) and str(file) in str(exc)
        TRIED["... refused"] += 1
        return
    dumped = spec.model_dump()
    for leaf in _leaves(dumped):
        v = dumped
        for k in leaf:
            v = v[k]
        if isinstance(v, float):
            assert math.isfinite(v), (leaf, v)
        if isinstance(v, int) and not isinstance(v, bool):
            assert abs(v) <= MAX_INTEGER


@FUZZ
@given(key=st.sampled_from(["name", "kind", "dataset", "phases", "validation", "split", "estimator"]),
       text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_a_key_given_twice_is_always_refused_with_its_line(dataset, tmp_path, key, text):
    from calib.studies.spec import load_study_file

    body = yaml.safe_dump(study_doc(dataset), sort_keys=False)
    file = tmp_path / "dup.yaml"
    file.write_text(body + f"{key}: {json.dumps(text)}\n")
    TRIED["duplicate keys"] += 1
    with pytest.raises(StudyError, match=rf"duplicate key '{key}'") as info:
        load_study_file(file)
    assert f"line {body.count(chr(10)) + 1}, column 1" in str(info.value)


# --------------------------------------------------------------------------- model, hardware, data files


@pytest.mark.parametrize("key,value,needle", [
    ("num_hidden_layers", 1e18, "num_hidden_layers: must be <= 10000"),
    ("hidden_size", 2**62, "hidden_size: must be <="),
    ("max_position_embeddings", -9223372036854775808, "max_position_embeddings: must be >= 0"),
    ("num_attention_heads", float("nan"), "num_attention_heads: must be an integer"),
    ("intermediate_size", float("inf"), "intermediate_size: must be an integer"),
])
def test_model_config_numbers_are_bounded(tmp_path, key, value, needle):
    from calib.specs import load_model

    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "torch_dtype": "float16", key: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=needle):
        load_model(path)
    proc = run_cli("step", "--model", str(path), "--decode", "5")
    assert_one_line(proc, needle, str(path))


def test_model_and_hardware_files_refuse_duplicate_keys(tmp_path):
    from calib.specs import load_hardware, load_model

    model = tmp_path / "m.yaml"
    model.write_text("num_hidden_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\ntorch_dtype: float16\n"
                     "num_hidden_layers: 200\n")
    with pytest.raises(ConfigError, match="line 5, column 1: duplicate key 'num_hidden_layers'"):
        load_model(model)
    cfg = tmp_path / "config.json"
    cfg.write_text('{"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, '
                   '"torch_dtype": "float16", "hidden_size": 128}')
    with pytest.raises(ConfigError, match="hidden_size: key given twice"):
        load_model(cfg)
    hw = tmp_path / "hw.yaml"
    hw.write_text("tflops_peak: 1\nbw_peak_tbs: 1\ntflops_peak: 2\n")
    with pytest.raises(ConfigError, match="line 3, column 1: duplicate key 'tflops_peak'"):
        load_hardware(hw)
    hw.write_text("tflops_peak: 1.0e+300\nbw_peak_tbs: 1\n")
    with pytest.raises(ConfigError, match="tflops_peak: must be <="):
        load_hardware(hw)


def test_a_nul_byte_in_experiments_csv_is_refused(dataset, tmp_path):
    from calib.data import load_experiments

    bad = tmp_path / "ds"
    bad.mkdir()
    text = (dataset / "experiments.csv").read_text()
    (bad / "experiments.csv").write_text(text.replace("chatsweep,train", "chat\x00sweep,train", 1))
    (bad / "workloads.yaml").write_text((dataset / "workloads.yaml").read_text())
    with pytest.raises(DataError, match=r"experiments.csv: NUL byte at line 2, column \d+"):
        load_experiments(bad)
    proc = run_cli("study", "run", str(write_study(tmp_path / "s.yaml", study_doc(bad))), "--out",
                   str(tmp_path / "out"), "--no-progress")
    assert_one_line(proc, "NUL byte")


def test_data_files_are_size_limited(tmp_path, monkeypatch):
    from calib.data._io import read_json

    big = tmp_path / "big.json"
    big.write_bytes(b"[" + b"1," * (2**20) + b"1]")
    monkeypatch.setenv("CALIB_MAX_DATA_MB", "1")
    with pytest.raises(DataError, match=r"larger than the limit of 1 MB \(set CALIB_MAX_DATA_MB to raise it\)"):
        read_json(big)
    monkeypatch.setenv("CALIB_MAX_DATA_MB", "3")
    assert len(read_json(big)) == 2**20 + 1
    with pytest.raises(DataError, match="not a regular file"):
        read_json(Path("/dev/zero"))


def test_estimator_seed_must_be_an_integer():
    from calib import RooflineRegressor
    from calib.data import load_experiments

    with pytest.raises(ConfigError, match="replay.seed"):
        RooflineRegressor(seed="abc").fit(load_experiments())


# --------------------------------------------------------------------------- a dataset's own request lengths


def _lengths_doc(scale: float) -> dict:
    doc = json.loads((EMBEDDED_HG1 / "request_lengths.json").read_text())
    return {seed: {wl: [[max(0, int(p * scale)), max(1, int(o * scale))] for p, o in pairs]
                   for wl, pairs in per.items()} for seed, per in doc.items()}


def test_a_dataset_folder_request_lengths_are_the_ones_replayed(dataset, tmp_path):
    """The draws come from the dataset's own request_lengths.json, not silently from the embedded one."""
    from calib import RooflineRegressor
    from calib.data import load_experiments

    own = tmp_path / "own"
    own.mkdir()
    for name in ("experiments.csv", "workloads.yaml"):
        (own / name).write_text((dataset / name).read_text())
    embedded = RooflineRegressor(per_layer_us=80).fit(load_experiments(dataset)).predict(load_experiments(dataset))
    (own / "request_lengths.json").write_text(json.dumps(_lengths_doc(0.5)))
    X = load_experiments(own)
    halved = RooflineRegressor(per_layer_us=80).fit(X).predict(X)
    assert not np.allclose(embedded, halved)  # other requests, other predictions
    # the same file again, rewritten in place: the cache sees the new draws (nothing stale)
    (own / "request_lengths.json").write_text(json.dumps(_lengths_doc(1.0)))
    again = RooflineRegressor(per_layer_us=80).fit(X).predict(X)
    assert np.allclose(again, embedded)


def test_a_dataset_without_draws_for_its_own_workload_is_an_error(dataset, tmp_path):
    from calib import RooflineRegressor
    from calib.data import load_experiments

    other = tmp_path / "other"
    other.mkdir()
    (other / "experiments.csv").write_text((dataset / "experiments.csv").read_text())
    (other / "workloads.yaml").write_text((dataset / "workloads.yaml").read_text().replace("mean: 70", "mean: 90"))
    X = load_experiments(other)
    with pytest.raises(DataError, match="no reference request lengths for workload 'chatsweep'") as info:
        RooflineRegressor().fit(X).predict(X)
    assert str(other) in str(info.value)
    assert len(RooflineRegressor(lengths="numpy").fit(X).predict(X)) == len(X)  # sampled lengths need no file


def test_too_few_draws_is_an_error(dataset, tmp_path):
    from calib import RooflineRegressor
    from calib.data import load_experiments

    short = tmp_path / "short"
    short.mkdir()
    for name in ("experiments.csv", "workloads.yaml"):
        (short / name).write_text((dataset / name).read_text())
    doc = _lengths_doc(1.0)
    doc["42"]["chatsweep"] = doc["42"]["chatsweep"][:10]
    (short / "request_lengths.json").write_text(json.dumps(doc))
    X = load_experiments(short)
    with pytest.raises(DataError, match="10 reference draws for workload 'chatsweep' at seed 42, the experiment has"):
        RooflineRegressor().fit(X).predict(X)


# --------------------------------------------------------------------------- where calib writes


def test_out_naming_a_file_or_an_unwritable_place_is_one_line(dataset, tmp_path):
    study = write_study(tmp_path / "s.yaml", study_doc(dataset))
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert_one_line(run_cli("study", "run", str(study), "--out", str(afile), "--no-progress"), "is a file, not a folder")
    assert afile.read_text() == "keep me"
    assert_one_line(run_cli("study", "run", str(study), "--out", "/proc/calib-nope/x", "--no-progress"),
                    "cannot create the output folder")
    assert_one_line(run_cli("study", "run", str(study), "--out", str(afile / "sub"), "--no-progress"),
                    "cannot create the output folder")


def test_reports_never_write_through_a_link_out_of_out(dataset, tmp_path):
    study = write_study(tmp_path / "s.yaml", study_doc(dataset, modes=["reference"]))
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("per_experiment.png", "REPORT.md", "results.json", "landscape.png"):
        (out / name).symlink_to(victim)
    proc = run_cli("study", "run", str(study), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious"
    for name in ("per_experiment.png", "REPORT.md", "results.json", "landscape.png"):
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0
    # a storage file linked out of the folder is refused (SQLite or the journal would write through it)
    for name in ("optuna.db", "optuna.journal"):
        out2 = tmp_path / f"out2-{name}"
        out2.mkdir()
        (out2 / name).symlink_to(victim)
        assert_one_line(run_cli("study", "run", str(study), "--out", str(out2), "--no-progress"),
                        "is a symbolic link to", "out of the output folder")
        assert victim.read_text() == "precious"


def test_results_and_reports_are_world_readable(dataset, tmp_path):
    study = write_study(tmp_path / "s.yaml", study_doc(dataset, modes=["reference"]))
    out = tmp_path / "out"
    proc = subprocess.run(f"umask 022; {sys.executable} -m calib study run {study} --out {out} --no-progress",
                          shell=True, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("results.json", "REPORT.md", "landscape.png", "per_experiment.png", "calibration.yaml"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert not list(out.glob(".*"))  # no temporary or staging file left


def test_importers_refuse_to_overwrite_what_they_did_not_write(tmp_path, shared_data):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# my project\n")
    assert_one_line(run_cli("import-hg1", str(shared_data / "hg1"), "--out", str(repo)),
                    "README.md: exists and was not written by calib import-hg1", "--force")
    assert (repo / "README.md").read_text() == "# my project\n" and not (repo / "experiments.csv").exists()
    ours = tmp_path / "ours"
    for _ in range(2):  # an import may rewrite its own files
        assert run_cli("import-hg1", str(shared_data / "hg1"), "--out", str(ours)).returncode == 0
    assert run_cli("import-hg1", str(shared_data / "hg1"), "--out", str(repo), "--force").returncode == 0
    assert (repo / "README.md").read_text().startswith("# Embedded HG1 dataset")
    target = repo / "notes.json"
    target.write_text("{}")
    assert_one_line(run_cli("import-mfu", str(shared_data / "bench_data"), "--gpu", "h100", "--out", str(target)),
                    "exists and is not an MFU file calib wrote")
    assert target.read_text() == "{}"
    mfu = tmp_path / "h100.json"
    for _ in range(2):
        assert run_cli("import-mfu", str(shared_data / "bench_data"), "--gpu", "h100", "--out", str(mfu)).returncode == 0


def test_study_run_reads_the_storage_from_calib_storage(dataset, tmp_path):
    study = write_study(tmp_path / "s.yaml", study_doc(dataset, modes=["reference"]))
    url = f"journal:{tmp_path / 'shared.journal'}"
    proc = run_cli("study", "run", str(study), "--out", str(tmp_path / "out"), "--no-progress",
                   env={"CALIB_STORAGE": url})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["storage"] == url
    assert (tmp_path / "shared.journal").is_file()
    assert not (tmp_path / "out" / "optuna.db").exists() and not (tmp_path / "out" / "optuna.journal").exists()
    proc = run_cli("study", "worker", str(study), env={"CALIB_STORAGE": ""})
    assert_one_line(proc, "set CALIB_STORAGE")


def test_a_resumed_study_says_so(dataset, tmp_path):
    study = write_study(tmp_path / "s.yaml", study_doc(dataset, modes=["reference"]))
    out = tmp_path / "out"
    first = run_cli("study", "run", str(study), "--out", str(out))
    assert first.returncode == 0 and "resumed 3 of" not in first.stderr
    again = run_cli("study", "run", str(study), "--out", str(out))
    assert again.returncode == 0
    assert "calib: study tiny resumed 3 of 3 trials from the storage (journal: optuna.journal in the output " \
           "folder); 0 evaluated in this run" in again.stderr


def test_report_counts():
    print(f"\nreliability: hardening inputs tried: {dict(TRIED)}")
