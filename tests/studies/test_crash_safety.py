"""Issue 14, with real processes: SIGKILL, SIGINT and damaged storages leave nothing stale, lose nothing.

* A serial TPE search SIGKILLed mid-trial and restarted at once (while the
  killed trial is still inside its heartbeat grace period) gives the trials
  of an uninterrupted run, without waiting for the grace period.
* A process killed between taking a trial and its first heartbeat (a trial
  ``RUNNING`` with no heartbeat row) does not make the next run wait forever.
* A torn last record of ``optuna.journal`` (power cut) is cut on open; a
  damaged record in the middle is one line.  A SQLite file with damaged
  pages is one line or, where the damage misses what calib reads, the
  same results.
* Ctrl-C while the report is written leaves the previous report or a
  complete new one, never half of one, and the command exits with 130.
* ``--workers 2`` into a folder holding a serial ``optuna.db`` resumes from it.

Every process is bounded in time (``timeout``) and touches only files under
pytest's temporary folder.  Figures are printed with ``-s`` (``reliability:``);
``CALIB_CRASH_REPEATS=N`` multiplies the kill points, cuts, damaged files and
interrupt moments for a longer campaign.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[2]
REPEATS = max(1, int(os.environ.get("CALIB_CRASH_REPEATS", "1")))
KEEP = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep", "20260210-qwen3-14b-tp2-chatsweep"]

TPE_SCRIPT = """
import json, sys, time
from optuna.distributions import FloatDistribution, IntDistribution, CategoricalDistribution
from calib.calibrate.trials import tpe_search
from calib.studies.storage import open_storage

url, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
SPACE = {"x": FloatDistribution(-3.0, 3.0), "n": IntDistribution(1, 8), "c": CategoricalDistribution(["a", "b"])}
count = [0]

def objective(p):
    count[0] += 1
    if count[0] == kill_at:  # tell the test we are inside trial number kill_at, then wait to be killed
        open(out + ".inside", "w").close()
        time.sleep(120)
    return (p["x"] - 1.0) ** 2 + 0.1 * p["n"] + (0.5 if p["c"] == "b" else 0.0), {"n": p["n"]}

trials = tpe_search("t", open_storage(url), SPACE, objective, 24, 11, progress=False)
json.dump([[t.params, t.value] for t in trials], open(out, "w"))
"""


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tpe_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "tpe_run.py"
    path.write_text(TPE_SCRIPT)
    return path


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_serial_tpe_killed_and_resumed_at_once_gives_the_uninterrupted_trials(tpe_script, tmp_path, storage):
    def url(name: str) -> str:
        return f"sqlite:///{tmp_path / name}.db" if storage == "sqlite" else f"journal:{tmp_path / name}.journal"

    ref = tmp_path / "ref.json"
    assert python(str(tpe_script), url("ref"), str(ref), "0").returncode == 0
    reference = json.loads(ref.read_text())
    kills = []
    points = (1, 19) if REPEATS == 1 else random.Random(REPEATS).sample(range(1, 25), min(24, 3 * REPEATS))
    for kill_at in points:  # the first trial, a TPE trial near the end (the startup trials are 1-10)
        name, out = f"killed{kill_at}", tmp_path / f"killed{kill_at}.json"
        proc = subprocess.Popen([sys.executable, str(tpe_script), url(name), str(out), str(kill_at)], env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: Path(f"{out}.inside").exists() or proc.poll() is not None, 120, "the trial to start")
            assert proc.poll() is None, proc.stderr.read()
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        t0 = time.monotonic()
        again = python(str(tpe_script), url(name), str(out), "0")
        took = time.monotonic() - t0
        assert again.returncode == 0, again.stderr
        assert json.loads(out.read_text()) == reference  # the same 24 trials, the same order
        assert took < 20, took  # not the 20 s grace period of the default heartbeat: the dead trial re-ran at once
        study = optuna.load_study(study_name="t", storage=_open(url(name)))
        failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
        assert len(failed) == 1 and not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
        kills.append(round(took, 1))
    print(f"\nreliability: serial TPE ({storage}) SIGKILLed in trials {sorted(points)} of 24 and restarted at once: "
          f"the uninterrupted trials each time, resumed runs took {kills} s (grace period 20 s)")


def _open(url: str):
    from calib.studies.storage import open_storage

    return open_storage(url)


POP_AND_DIE = """
import os, signal, sys, warnings
import optuna
from calib.studies.storage import open_storage
warnings.simplefilter("ignore")
study = optuna.create_study(study_name="g", storage=open_storage(sys.argv[1], heartbeat_interval=1, grace_period=2),
                            load_if_exists=True)
study.enqueue_trial({"x": float(sys.argv[2])})
study.ask()  # popped: RUNNING, and no heartbeat yet
os.kill(os.getpid(), signal.SIGKILL)
"""

GRID = """
import json, sys
from calib.calibrate.trials import grid_search
from calib.studies.storage import open_storage
out = grid_search("g", open_storage(sys.argv[1], heartbeat_interval=1, grace_period=2), "x", [0.0, 10.0, 20.0, 30.0],
                  lambda v: ((v - 7.0) ** 2, {}), progress=False)
print(json.dumps({str(k): t.value for k, t in out.items()}))
"""


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_trial_popped_by_a_process_killed_before_its_first_heartbeat_is_rerun(tmp_path, storage):
    url = f"sqlite:///{tmp_path / 'g.db'}" if storage == "sqlite" else f"journal:{tmp_path / 'g.journal'}"
    for value in ("10.0", "20.0"):
        died = python("-c", POP_AND_DIE, url, value)
        assert died.returncode == -signal.SIGKILL, died.stderr
    t0 = time.monotonic()
    done = python("-c", GRID, url, timeout=60)  # before the fix: waited forever on the RUNNING trials (SQLite)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"0.0": 49.0, "10.0": 9.0, "20.0": 169.0, "30.0": 529.0}
    trials = optuna.load_study(study_name="g", storage=_open(url)).get_trials()
    assert sorted(t.state.name for t in trials).count("FAIL") == 2
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    print(f"\nreliability: 2 trials popped by processes killed before their first heartbeat ({storage}): failed "
          f"and re-run, the next run done in {time.monotonic() - t0:.1f} s")


def test_a_torn_journal_end_is_cut_and_a_damaged_middle_is_one_line(tmp_path):
    url = f"journal:{tmp_path / 'g.journal'}"
    assert python("-c", GRID, url).returncode == 0
    whole = (tmp_path / "g.journal").read_bytes()
    expected = {"0.0": 49.0, "10.0": 9.0, "20.0": 169.0, "30.0": 529.0}
    rng = random.Random(14)
    cuts = sorted(rng.sample(range(len(whole) // 2, len(whole) - 1), 4 * REPEATS))
    for cut in cuts:  # a power cut: the file ends anywhere inside its last records
        (tmp_path / "g.journal").write_bytes(whole[:cut])
        run = python("-c", GRID, url)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == expected
        assert "Traceback" not in run.stderr
    for tail in (b"\x00" * 700, b'{"op_code": 5, "worker_id"'):  # zeros after a crash, a half record
        (tmp_path / "g.journal").write_bytes(whole + tail)
        run = python("-c", GRID, url)
        assert run.returncode == 0 and json.loads(run.stdout) == expected, run.stderr
        assert "half-written last record" in run.stderr
    lines = whole.split(b"\n")
    lines[3] = lines[3][: len(lines[3]) // 2]
    (tmp_path / "g.journal").write_bytes(b"\n".join(lines))
    study = _study_file(tmp_path, journal=True)
    proc = subprocess.run([sys.executable, "-m", "calib", "study", "run", str(study), "--out", str(tmp_path / "o"),
                           "--storage", url, "--no-progress"], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "journal file damaged at byte " + str(sum(len(x) + 1 for x in lines[:3])) + ", with whole records after it; "
        "restore it from a backup or start the study over in another folder")
    print(f"\nreliability: journal file cut at {len(cuts)} random points inside its last records and 2 broken tails: "
          "each cut back on open, each run complete with the right values; a damaged middle record: one line")


def _study_file(folder: Path, journal: bool = False, name: str = "crash") -> Path:
    from calib.data.workloads import EMBEDDED_HG1

    data = folder / "data"
    data.mkdir(exist_ok=True)
    lines = (EMBEDDED_HG1 / "experiments.csv").read_text().splitlines()
    (data / "experiments.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:]
                                                                  if ln.split(",")[0] in KEEP]) + "\n")
    (data / "workloads.yaml").write_text((EMBEDDED_HG1 / "workloads.yaml").read_text())
    doc = {"name": name, "kind": "hg1", "dataset": str(data), "estimator": {"mode": "reference"},
           "split": {"train": KEEP[:2], "test": KEEP[2:]},
           "phases": [{"name": "coarse", "grid": {"low": 0, "high": 200, "step": 25}},
                      {"name": "fine", "around": "coarse", "radius": 10, "step": 5}],
           "validation": ["optimum", 0]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def in_process(*argv: str) -> tuple[int, str, str]:
    """``calib ARGV`` in this process: (status, stdout, stderr)."""
    import contextlib
    import io

    from calib.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def test_damaged_sqlite_pages_are_one_line_or_harmless(tmp_path):
    study = _study_file(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    first = subprocess.run([sys.executable, "-m", "calib", "study", "run", str(study), "--out", str(base),
                            "--storage", f"sqlite:///{base / 'optuna.db'}", "--no-progress"], env=env(),
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr  # (a process that ended: the SQLite write-ahead log is merged)
    assert not (base / "optuna.db-wal").exists()
    reference = json.loads((base / "results.json").read_text())
    outcomes = {"refused in one line": 0, "same results": 0}
    rng = random.Random(7)
    n = 8 * REPEATS
    for i in range(n):
        out = tmp_path / f"d{i}"
        out.mkdir()
        raw = bytearray((base / "optuna.db").read_bytes())
        for _ in range(3):  # three runs of random bytes in random pages (the first page, the header, kept)
            page = rng.randrange(1, len(raw) // 4096)
            at, size = page * 4096 + rng.randrange(0, 3500), rng.choice([8, 64, 512])
            raw[at:at + size] = rng.randbytes(size)
        (out / "optuna.db").write_bytes(bytes(raw))  # the default storage of a folder holding an optuna.db
        status, _, err = in_process("study", "run", str(study), "--out", str(out), "--no-progress")
        if status == 2:
            lines = [ln for ln in err.splitlines() if ln.startswith("calib study: error")]
            assert len(lines) == 1 and "optuna.db" in lines[0], err
            assert "damaged" in lines[0] or "cannot be opened" in lines[0], lines[0]
            assert not (out / "results.json").exists()
            outcomes["refused in one line"] += 1
        else:
            assert status == 0, err
            got = json.loads((out / "results.json").read_text())
            assert {k: v for k, v in got.items() if k != "settings"} == \
                {k: v for k, v in reference.items() if k != "settings"}
            outcomes["same results"] += 1
    (tmp_path / "header").mkdir()
    (tmp_path / "header" / "optuna.db").write_bytes(b"\x00" * 100 + (base / "optuna.db").read_bytes()[100:])
    proc = subprocess.run([sys.executable, "-m", "calib", "study", "run", str(study), "--out", str(tmp_path / "header"),
                           "--no-progress"], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "is damaged" in proc.stderr
    print(f"\nreliability: {n} SQLite files with 3 damaged runs of bytes each: {outcomes}; a zeroed header: one line")


SIGINT_AFTER = """
import glob, signal, subprocess, sys, time
out, delay = sys.argv[1], float(sys.argv[2])
p = subprocess.Popen(sys.argv[3:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
deadline = time.monotonic() + 120
while not glob.glob(out + "/.calib-staging-*") and p.poll() is None and time.monotonic() < deadline:
    time.sleep(0.002)
time.sleep(delay)
if p.poll() is None:
    p.send_signal(signal.SIGINT)
err = p.communicate(timeout=120)[1]
print(p.returncode)
sys.stderr.write(err)
"""


def test_ctrl_c_while_the_report_is_written_leaves_a_whole_report_and_exits_130(tmp_path):
    study = _study_file(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "calib", "study", "run", str(study), "--out", str(out), "--no-progress"]
    assert subprocess.run(cmd, env=env(), capture_output=True, timeout=120).returncode == 0
    names = ("REPORT.md", "landscape.png", "per_experiment.png", "results.json")
    outcomes = {"previous report kept": 0, "new report complete": 0, "finished before the signal": 0}
    delays = [0.0, 0.1, 0.4] if REPEATS == 1 else [random.Random(i).uniform(0, 1.5) for i in range(6 * REPEATS)]
    extra = 5  # on a loaded machine the report can be written before the signal lands: then try again at once
    i = 0
    while i < len(delays) or (not outcomes["previous report kept"] and extra):
        if i == len(delays):
            extra -= 1
            delays.append(0.0)
        delay, i = delays[i], i + 1
        (out / "REPORT.md").write_text((out / "REPORT.md").read_text() + "\nPREVIOUS\n")
        before = {n: (out / n).read_bytes() for n in names}
        proc = python("-c", SIGINT_AFTER, str(out), str(delay), *cmd, timeout=200)
        status = int(proc.stdout.split()[-1])
        assert "Traceback" not in proc.stderr, proc.stderr
        assert not glob.glob(str(out / ".*")), os.listdir(out)  # no staging folder or temporary file left
        after = {n: (out / n).read_bytes() for n in names}
        if status == 0:
            outcomes["finished before the signal"] += 1
            continue
        assert status in (130, -signal.SIGINT), proc.stderr  # stopped, not swallowed
        if after == before:
            outcomes["previous report kept"] += 1
        else:  # every file replaced by the new run's (the same numbers, without the marker)
            assert b"PREVIOUS" not in after["REPORT.md"] and all(after[n] for n in names)
            assert after["results.json"] == before["results.json"]
            outcomes["new report complete"] += 1
    assert outcomes["previous report kept"] >= 1
    print(f"\nreliability: SIGINT at {len(delays)} moments while the report was written: {outcomes}, never half a "
          "report")


def test_a_killed_report_writer_leaves_no_staging_folder_behind(tmp_path):
    study = _study_file(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "calib", "study", "run", str(study), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: glob.glob(str(out / ".calib-staging-*")) or proc.poll() is not None, 120, "staging")
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "results.json").exists() and not (out / "REPORT.md").exists()
    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert not glob.glob(str(out / ".calib-staging-*")) and (out / "REPORT.md").is_file()


def test_workers_into_a_folder_of_a_serial_run_resume_from_its_database(tmp_path):
    study = _study_file(tmp_path)
    out = tmp_path / "out"
    base = [sys.executable, "-m", "calib", "study", "run", str(study), "--out", str(out), "--no-progress"]
    out.mkdir()
    serial_run = [*base, "--storage", f"sqlite:///{out / 'optuna.db'}"]  # a serial run into SQLite (not the default)
    assert subprocess.run(serial_run, env=env(), capture_output=True, timeout=120).returncode == 0
    serial = json.loads((out / "results.json").read_text())
    proc = subprocess.run([*base, "--workers", "2"], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "completed trials were copied to" in proc.stderr
    parallel = json.loads((out / "results.json").read_text())
    assert parallel["settings"].pop("storage") == "journal: optuna.journal in the output folder"
    serial["settings"].pop("storage")
    assert parallel == serial
    journal = _open(f"journal:{out / 'optuna.journal'}")
    evaluated = [t for s in journal.get_all_studies()
                 for t in optuna.load_study(study_name=s.study_name, storage=journal).get_trials()
                 if t.state == TrialState.COMPLETE and t.datetime_complete.timestamp() > (out / "optuna.db").stat().st_mtime]
    assert not evaluated  # nothing was evaluated again


@pytest.mark.parametrize("losses, opens", [(6, True), (7, False)])
def test_a_connection_lost_while_opening_is_retried_like_a_search_step(monkeypatch, losses, opens):
    """Opening a database storage survives as many lost connections as a search step does
    (``calib.studies.storage.RETRY_DELAYS``), then stops with one line."""
    import sqlalchemy.exc

    import calib.studies.storage as storage_module
    from calib.errors import StudyError
    from calib.studies.storage import RETRY_DELAYS

    assert len(RETRY_DELAYS) == 6
    calls, slept = [], []

    class Flaky:
        def __init__(self, url, **kw):
            calls.append(url)
            if len(calls) <= losses:
                raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection "
                                                                                 "unexpectedly"))
            self.engine = sqlalchemy.create_engine("sqlite://")

    monkeypatch.setattr(storage_module.optuna.storages, "RDBStorage", Flaky)
    monkeypatch.setattr(storage_module.time, "sleep", slept.append)
    url = "postgresql+psycopg2://u:secret@127.0.0.1:1/db"
    if opens:
        assert isinstance(storage_module.open_storage(url), Flaky)
        assert slept == list(RETRY_DELAYS)
    else:
        with pytest.raises(StudyError, match="cannot be opened: .*server closed the connection") as err:
            storage_module.open_storage(url)
        assert "secret" not in str(err.value) and len(calls) == len(RETRY_DELAYS) + 1
