"""Worker processes sharing one study, with real processes: --workers N, calib study worker, SIGKILL, Ctrl-C.

A tiny HG1 study (three experiments, 28 grid trials in two phases) is run
serially in-process once; every parallel, killed or interrupted run must end
with the same results (the storage label aside) and with each grid value
completed exactly once.  Reliability figures are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from calib.data.workloads import EMBEDDED_HG1
from calib.studies.runner import run_study
from calib.calibrate.trials import tpe_search
from calib.studies.storage import open_storage

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp2-chatsweep"]
TEST = ["jan30-llama2-7b-tp4-codesweep"]
PHASES = {"coarse": 21, "fine": 7}  # grid sizes: 0..300 step 15, then optimum +- 15 step 5
FAST = ["--heartbeat-interval", "1", "--grace-period", "3"]


def tiny_study(folder: Path, name: str = "tinyw", train: list[str] = TRAIN) -> Path:
    """A tiny HG1 study on ``train`` and one test experiment (embedded); returns the study file."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = (EMBEDDED_HG1 / "experiments.csv").read_text().splitlines()
    keep = set(train + TEST)
    (data / "experiments.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:]
                                                                  if ln.split(",")[0] in keep]) + "\n")
    (data / "workloads.yaml").write_text((EMBEDDED_HG1 / "workloads.yaml").read_text())
    study = {"name": name, "kind": "hg1", "dataset": str(data), "estimator": {"mode": "reference"},
             "split": {"train": train, "test": TEST},
             "phases": [{"name": "coarse", "grid": {"low": 0, "high": 300, "step": 15}},
                        {"name": "fine", "around": "coarse", "radius": 15, "step": 5}],
             "validation": ["optimum", 100, 0]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def calib_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "calib.cli", *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [e.get("PYTHONPATH")])])
    return e


def without_storage(results: dict) -> dict:
    r = json.loads(json.dumps(results))
    r["settings"].pop("storage")
    return r


def grid_trials(url: str, prefix: str) -> dict[str, list]:
    """The trials of each phase study (``<prefix>-<fingerprint>-<phase>``) in a storage, by phase."""
    st = open_storage(url)
    return {s.study_name.rsplit("-", 1)[1]: st.get_all_trials(st.get_study_id_from_name(s.study_name), deepcopy=False)
            for s in st.get_all_studies() if s.study_name.startswith(prefix + "-")}


def assert_each_value_completed_once(url: str, prefix: str) -> Counter:
    trials = grid_trials(url, prefix)
    assert set(trials) == set(PHASES)
    total = Counter()
    for phase, ts in trials.items():
        done = [t.params["overhead.per_layer_us"] for t in ts if t.state == TrialState.COMPLETE]
        table = [(t.number, t.state.name, t.params, t.system_attrs) for t in ts]
        assert len(done) == len(set(done)) == PHASES[phase], (phase, table)  # every value, once
        assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)], (phase, table)
        total.update(t.state.name for t in ts)
    return total


def wait_for(predicate, timeout: float, what: str, poll: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def held_value(t, param: str = "overhead.per_layer_us"):
    """The grid value a trial holds: queued (``fixed_params``) or taken (``params``)."""
    return (t.system_attrs.get("fixed_params") or {}).get(param, t.params.get(param))


def running_trial_of(url: str, pid: int, with_params: bool = False):
    """A RUNNING trial evaluated by process ``pid`` that holds its point (``(study, trial)``), or None."""
    st = open_storage(url)
    for s in st.get_all_studies():
        for t in st.get_all_trials(s._study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            holds = t.params if with_params else (t.params or t.system_attrs.get("fixed_params"))
            if str(t.user_attrs.get("calib:worker", "")).endswith(f":{pid}") and holds:
                return s, t
    return None


def kill_mid_trial(url: str, proc, timeout: float = 60.0, with_params: bool = False, finished_ok: bool = False):
    """SIGKILL ``proc`` while it evaluates a trial (stopped first, so the trial is surely unfinished).

    ``finished_ok``: return None when ``proc`` ended first (a fast worker can finish a small study between two
    polls) instead of failing."""
    st = open_storage(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if finished_ok:
                return None
            pytest.fail(f"worker {proc.pid} ended (status {proc.returncode}) before it could be killed")
        hit = running_trial_of(url, proc.pid, with_params)
        if hit is not None:
            os.kill(proc.pid, signal.SIGSTOP)
            trial = st.get_trial(hit[1]._trial_id)
            if trial.state == TrialState.RUNNING:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return hit[0].study_name, trial
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)
    pytest.fail("no running trial of the worker to kill")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The serial run (in-process, SQLite): results.json bytes and the study file."""
    folder = tmp_path_factory.mktemp("ref")
    study = tiny_study(folder)
    out = folder / "out"
    results = run_study(study, out, progress=False, report=False)
    return {"study": study, "results": results, "bytes": (out / "results.json").read_bytes()}


def test_serial_results_record_every_seed(reference):
    s = reference["results"]["settings"]
    assert s["request_seed"] == 42  # the replay's request sampling
    prefix = s["optuna_study_prefix"]  # the study name + a fingerprint of everything that determines the trials
    assert prefix.startswith("tinyw-") and len(prefix) == len("tinyw-") + 12
    assert [(e["study"], e["sampler"], e["seed"], e["trials"]) for e in s["samplers"]] == [
        (f"{prefix}-coarse", "grid", None, 21), (f"{prefix}-fine", "grid", None, 7)]


def test_three_workers_give_the_serial_results(reference, tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(calib_cmd("study", "run", str(reference["study"]), "--out", str(out), "--workers", "3",
                                    "--no-progress"), env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["storage"] == "journal: optuna.journal in the output folder"
    assert without_storage(results) == without_storage(reference["results"])  # identical numbers
    assert (out / "REPORT.md").is_file()
    url = f"journal:{out / 'optuna.journal'}"
    states = assert_each_value_completed_once(url, "tinyw")
    workers = Counter(t.user_attrs["calib:worker"] for ts in grid_trials(url, "tinyw").values() for t in ts
                      if t.state == TrialState.COMPLETE)
    print(f"\nreliability: --workers 3 in {time.monotonic() - t0:.1f} s, trial states {dict(states)}, "
          f"completed per worker {sorted(workers.values(), reverse=True)}")


def test_worker_killed_mid_trial_is_detected_and_its_trial_rerun(reference, tmp_path):
    study = str(reference["study"])
    for attempt in range(5):  # the two workers can finish the 28 grid trials before a poll sees one running
        out = tmp_path / f"out{attempt}"
        out.mkdir()
        url = f"journal:{out / 'optuna.journal'}"
        # two workers join first (one with --storage, one through CALIB_STORAGE), then the lead
        victim = subprocess.Popen(calib_cmd("study", "worker", study, "--storage", url, "--no-progress", *FAST),
                                  env=env(), stdout=subprocess.DEVNULL)
        other = subprocess.Popen(calib_cmd("study", "worker", study, "--no-progress", *FAST),
                                 env={**env(), "CALIB_STORAGE": url}, stdout=subprocess.PIPE, text=True)
        try:
            hit = kill_mid_trial(url, victim, finished_ok=True)
        except BaseException:  # no running trial seen in time: leave no worker behind
            for p in (victim, other):
                p.kill()
            raise
        if hit is not None:
            break
        other.wait(timeout=120)
        other.stdout.close()
    else:
        pytest.fail("the victim worker finished the study before a running trial of it was seen, 5 times")
    try:
        phase, killed = hit
        t_kill = time.monotonic()
        lead = subprocess.run(calib_cmd("study", "run", study, "--out", str(out), "--no-progress", *FAST),
                              env=env(), capture_output=True, text=True, timeout=300)
        assert lead.returncode == 0, lead.stderr
        assert other.wait(timeout=120) == 0
    finally:
        for p in (victim, other):
            if p.poll() is None:
                p.kill()
    assert "trial(s) evaluated here" in other.stdout.read()
    assert without_storage(json.loads((out / "results.json").read_text())) == without_storage(reference["results"])
    states = assert_each_value_completed_once(url, "tinyw")
    trials = grid_trials(url, "tinyw")[phase.rsplit("-", 1)[1]]
    after = {t.number: t for t in trials}
    assert after[killed.number].state == TrialState.FAIL  # failed as stale by a live worker...
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    value = held_value(killed)
    assert any(t.state == TrialState.COMPLETE for t in retries)  # ... and its copy re-run
    assert [held_value(t) for t in retries if t.state == TrialState.COMPLETE] == [value]
    print(f"\nreliability: 1 worker killed (SIGKILL) mid-trial {phase}#{killed.number} "
          f"({value:g} us); {len(retries)} retry, recovered and study complete {time.monotonic() - t_kill:.1f} s "
          f"later; trial states {dict(states)}")


def test_ctrl_c_stops_every_process_cleanly_and_the_next_run_resumes(tmp_path):
    # every embedded experiment but the test one: trials slow enough that the study is still running when the
    # signal lands (on three experiments a warmed worker can finish the whole grid before the lead's report import)
    train = [ln.split(",")[0] for ln in (EMBEDDED_HG1 / "experiments.csv").read_text().splitlines()[1:]
             if ln and ln.split(",")[0] not in TEST]
    reference = {"study": tiny_study(tmp_path / "study", train=train)}
    reference["results"] = run_study(reference["study"], tmp_path / "serial", progress=False, report=False)
    out = tmp_path / "out"
    out.mkdir()
    url = f"journal:{out / 'optuna.journal'}"
    lead = subprocess.Popen(calib_cmd("study", "run", str(reference["study"]), "--out", str(out), "--workers", "2",
                                      "--no-progress"), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def started():
            if not (out / "optuna.journal").exists():
                return False
            ts = grid_trials(url, "tinyw").get("coarse", [])
            return any(t.state == TrialState.COMPLETE for t in ts) and any(t.state == TrialState.RUNNING for t in ts)

        wait_for(started, 120, "a completed and a running trial")
        os.killpg(lead.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        t0 = time.monotonic()
        status = lead.wait(timeout=60)
        stopped_in = time.monotonic() - t0
    finally:
        if lead.poll() is None:
            os.killpg(lead.pid, signal.SIGKILL)
    stderr = lead.stderr.read()
    assert status == 130 and "interrupted" in stderr, stderr
    time.sleep(0.5)  # the workers of the group end too (SIGINT and the lead's SIGTERM)
    with pytest.raises(ProcessLookupError):
        os.killpg(lead.pid, 0)
    before = grid_trials(url, "tinyw")
    assert not [t for ts in before.values() for t in ts if t.state == TrialState.RUNNING]  # no trial left open
    n_before = sum(t.state == TrialState.COMPLETE for ts in before.values() for t in ts)
    assert not (out / "results.json").exists()  # no partial report
    rerun = subprocess.run(calib_cmd("study", "run", str(reference["study"]), "--out", str(out), "--no-progress"),
                           env=env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert without_storage(json.loads((out / "results.json").read_text())) == without_storage(reference["results"])
    states = assert_each_value_completed_once(url, "tinyw")
    print(f"\nreliability: Ctrl-C stopped 2 workers in {stopped_in:.1f} s with {n_before} trials complete; "
          f"resumed run completed, trial states {dict(states)}")


# --------------------------------------------------------------------------- TPE, forked workers


def _tpe_worker(url: str, n: int) -> None:
    def objective(p):
        time.sleep(0.05)
        return (p["x"] - 0.3) ** 2 + p["y"], {"pid": os.getpid()}

    st = open_storage(url, heartbeat_interval=1, grace_period=2)
    tpe_search("tpe", st, {"x": FloatDistribution(-1, 1), "y": FloatDistribution(0, 1)}, objective, n, 11,
               progress=False)


def test_tpe_worker_killed_mid_trial_is_rerun_and_the_count_is_exact(tmp_path):
    journal = tmp_path / "optuna.journal"
    url = f"journal:{journal}"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_tpe_worker, args=(url, 30)) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        victim = procs[0]
        victim.poll = lambda: victim.exitcode  # the Popen-like interface kill_mid_trial uses
        victim.wait = victim.join
        _, killed = kill_mid_trial(url, victim, with_params=True)
        for p in procs[1:]:
            p.join(120)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    st = open_storage(url)
    trials = st.get_all_trials(st.get_study_id_from_name("tpe"), deepcopy=False)
    states = Counter(t.state.name for t in trials)
    assert states["COMPLETE"] == 30 and states["RUNNING"] == 0
    assert trials[killed.number].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert [t.state for t in retry] == [TrialState.COMPLETE]
    assert retry[0].params.items() >= killed.params.items()  # the same point, re-run
    print(f"\nreliability: TPE, 1 of 3 workers killed mid-trial #{killed.number}; its trial re-run as "
          f"#{retry[0].number} with the same parameters; trial states {dict(states)}")
