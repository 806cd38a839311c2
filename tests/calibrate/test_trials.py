"""calib.calibrate.trials and .storage: grid and TPE searches shared by processes, resumed, deterministic.

Objectives here are synthetic (microseconds), so the tests exercise the
bookkeeping: each grid value evaluated once in total, exactly ``n_trials``
completed TPE trials, FAIL on an interrupt, the same results as a serial run.
Concurrency tests fork real processes sharing a journal file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from calib.errors import StudyError
from calib.calibrate.trials import grid_search, objective_attrs, recording, tpe_search
from calib.studies.storage import (
    HeartbeatJournalStorage,
    check_shareable,
    default_storage_url,
    describe_storage,
    mask_url,
    open_storage,
)

GRID = [float(v) for v in range(0, 300, 10)]
SPACE = {"x": FloatDistribution(-3.0, 3.0), "n": IntDistribution(1, 8), "c": CategoricalDistribution(["a", "b"])}


def parabola(v: float):
    return (v - 123.0) ** 2, {"twice": 2 * v}


def tpe_objective(p: dict):
    return (p["x"] - 1.0) ** 2 + 0.1 * p["n"] + (0.5 if p["c"] == "b" else 0.0), {"n": p["n"]}


def journal(tmp_path: Path, name: str = "optuna.journal", **kw):
    return open_storage(f"journal:{tmp_path / name}", **kw)


def states(storage, name: str) -> Counter:
    return Counter(t.state.name for t in optuna.load_study(study_name=name, storage=storage).get_trials())


# --------------------------------------------------------------------------- grid, one process


def test_grid_serial_follows_the_grid_and_resumes_without_evaluating(tmp_path):
    st = journal(tmp_path)
    calls = []
    out = grid_search("g", st, "x", GRID, lambda v: (calls.append(v), parabola(v))[1], progress=False)
    assert list(out) == GRID and calls == GRID
    assert [out[v].value for v in GRID] == [parabola(v)[0] for v in GRID]
    assert objective_attrs(out[20.0]) == {"twice": 40.0}
    trials = optuna.load_study(study_name="g", storage=st).get_trials()
    assert [t.params["x"] for t in trials] == GRID  # trial numbers follow the grid
    again = grid_search("g", journal(tmp_path), "x", GRID, lambda v: pytest.fail("re-evaluated"), progress=False)
    assert {v: t.value for v, t in again.items()} == {v: t.value for v, t in out.items()}


def test_grid_interrupt_marks_the_trial_failed_and_the_rerun_resumes(tmp_path):
    st = journal(tmp_path)
    seen = []

    def flaky(v):
        if len(seen) == 3:
            seen.append("boom")
            raise KeyboardInterrupt
        seen.append(v)
        return parabola(v)

    with pytest.raises(KeyboardInterrupt):
        grid_search("g", st, "x", GRID, flaky, progress=False)
    assert states(st, "g") == Counter({"COMPLETE": 3, "FAIL": 1})
    out = grid_search("g", journal(tmp_path), "x", GRID, flaky, progress=False)
    assert list(out) == GRID
    assert states(st, "g") == Counter({"COMPLETE": len(GRID), "FAIL": 1})
    assert seen[:3] == GRID[:3] and seen[4:] == GRID[3:]  # nothing completed is evaluated again


def test_grid_rejects_a_non_finite_objective(tmp_path):
    with pytest.raises(StudyError, match="objective is nan"):
        grid_search("g", journal(tmp_path), "x", GRID, lambda v: (float("nan"), {}), progress=False)


def test_grid_ignores_stale_queue_entries_and_foreign_values(tmp_path):
    st = journal(tmp_path)
    study = optuna.create_study(study_name="g", storage=st)
    for v in (10.0, 10.0, 999.0):  # a duplicate and a value of no grid, queued by someone else
        study.enqueue_trial({"x": v})
    calls = Counter()
    grid_search("g", st, "x", GRID, lambda v: (calls.update([v]), parabola(v))[1], progress=False)
    assert set(calls) == set(GRID) and max(calls.values()) == 1
    reasons = [t.user_attrs.get("calib:discarded") for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert len(reasons) == 2 and all(reasons)


# --------------------------------------------------------------------------- TPE, one process


def _tpe(storage, n=25, seed=5, name="t", objective=tpe_objective, **kw):
    return tpe_search(name, storage, SPACE, objective, n, seed, progress=False, **kw)


def _summary(trials):
    return [(t.number, t.params, t.value) for t in trials]


def test_tpe_serial_is_deterministic_and_exact(tmp_path):
    a = _tpe(journal(tmp_path, "a.journal"))
    assert len(a) == 25 and _summary(a) == _summary(_tpe(journal(tmp_path, "b.journal")))
    # the serial default storage (SQLite) gives the same trials; fewer trials are a prefix of more
    assert _summary(_tpe(open_storage(f"sqlite:///{tmp_path / 'c.db'}"), n=8)) == _summary(a[:8])
    assert _summary(_tpe(journal(tmp_path, "d.journal"), n=12, seed=6)) != _summary(a[:12])
    assert min(t.value for t in a) < 0.5  # TPE does find the region of the optimum


def test_tpe_resumed_after_an_interrupt_gives_the_uninterrupted_trials(tmp_path):
    reference = _tpe(journal(tmp_path, "ref.journal"))
    st = journal(tmp_path)
    calls = {"n": 0}

    def flaky(p):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return tpe_objective(p)

    with pytest.raises(KeyboardInterrupt):
        _tpe(st, objective=flaky)
    assert states(st, "t") == Counter({"COMPLETE": 11, "FAIL": 1})
    resumed = _tpe(journal(tmp_path), objective=flaky)
    assert [(t.params, t.value) for t in resumed] == [(t.params, t.value) for t in reference]
    assert _tpe(journal(tmp_path), n=30, objective=flaky)[:25] == resumed  # more trials: continue, not redo


def test_tpe_failed_trials_do_not_count_and_too_many_stop(tmp_path):
    st = journal(tmp_path)
    n = {"k": 0}

    def sometimes_nan(p):
        n["k"] += 1
        return (float("nan") if n["k"] % 3 == 0 else tpe_objective(p)[0]), {}

    assert len(_tpe(st, n=10, objective=sometimes_nan)) == 10
    assert states(st, "t")["COMPLETE"] == 10 and states(st, "t")["FAIL"] >= 4
    with pytest.raises(StudyError, match="in a row"):
        _tpe(st, n=20, name="u", objective=lambda p: (float("inf"), {}))


def test_tpe_multi_objective_and_argument_checks(tmp_path):
    st = journal(tmp_path)
    trials = tpe_search("mo", st, SPACE, lambda p: ((p["x"] ** 2, p["n"]), {}), 12, 0,
                        directions=["minimize", "maximize"], progress=False)
    assert len(trials) == 12 and all(len(t.values) == 2 for t in trials)
    for kwargs, field in (({"n_trials": 0}, "n_trials"), ({"seed": -1}, "seed"), ({"space": {}}, "space"),
                          ({"directions": ["up"]}, "directions"), ({"sampler_options": {"seed": 1}}, "seed")):
        args = {"study_name": "z", "storage": st, "space": SPACE, "objective": tpe_objective, "n_trials": 3,
                "seed": 0, "progress": False, **kwargs}
        with pytest.raises(StudyError, match=field):
            tpe_search(**args)
    with pytest.raises(StudyError, match="directions"):
        tpe_search("mo", st, SPACE, tpe_objective, 3, 0, progress=False)  # exists with two directions


def test_searches_are_recorded_for_results(tmp_path):
    st = journal(tmp_path)
    with recording() as log:
        grid_search("g", st, "x", GRID[:3], parabola, progress=False)
        _tpe(st, n=4, seed=9)
    assert [(e["study"], e["sampler"], e["seed"], e["trials"], e["evaluated"]) for e in log] == [
        ("g", "grid", None, 3, 3), ("t", "TPESampler", 9, 4, 4)]


# --------------------------------------------------------------------------- several processes (fork)


def _grid_worker(url: str, log: str, values: list[float]) -> None:
    def objective(v):
        with open(log, "a") as fh:  # O_APPEND: one line per evaluation, from every process
            fh.write(f"{v} {os.getpid()}\n")
        time.sleep(0.003)
        return parabola(v)

    grid_search("g", open_storage(url), "x", values, objective, progress=False)


def _tpe_worker(url: str, n: int) -> None:
    def objective(p):
        time.sleep(0.002)
        return tpe_objective(p)

    tpe_search("t", open_storage(url), SPACE, objective, n, 3, progress=False)


def _run_all(target, args, n: int) -> None:
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=target, args=args) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n


def test_grid_with_four_processes_evaluates_every_value_once(tmp_path):
    url, log = f"journal:{tmp_path / 'optuna.journal'}", str(tmp_path / "evaluations.txt")
    values = [float(v) for v in range(60)]
    _run_all(_grid_worker, (url, log, values), 4)
    evaluated = [float(line.split()[0]) for line in Path(log).read_text().splitlines()]
    workers = {line.split()[1] for line in Path(log).read_text().splitlines()}
    st = open_storage(url)
    print(f"\nreliability: grid of {len(values)} values, 4 processes ({len(workers)} evaluated), "
          f"{len(evaluated)} evaluations, trial states {dict(states(st, 'g'))}")
    assert sorted(evaluated) == values  # each value evaluated exactly once in total
    serial = grid_search("g", journal(tmp_path, "serial.journal"), "x", values, parabola, progress=False)
    shared = grid_search("g", st, "x", values, lambda v: pytest.fail("re-evaluated"), progress=False)
    assert [(v, t.value, objective_attrs(t)) for v, t in shared.items()] == [
        (v, t.value, objective_attrs(t)) for v, t in serial.items()]


def test_tpe_with_three_processes_completes_exactly_n_trials(tmp_path):
    url = f"journal:{tmp_path / 'optuna.journal'}"
    _run_all(_tpe_worker, (url, 40), 3)
    st = open_storage(url)
    got = states(st, "t")
    print(f"\nreliability: TPE 40 trials, 3 processes, trial states {dict(got)}")
    assert got["COMPLETE"] == 40 and got["RUNNING"] == 0 and got["WAITING"] == 0
    workers = Counter(t.user_attrs["calib:worker"] for t in
                      optuna.load_study(study_name="t", storage=st).get_trials(states=(TrialState.COMPLETE,)))
    assert sum(workers.values()) == 40


def _pop_all(url: str, out: str) -> None:
    st = open_storage(url)
    study = optuna.load_study(study_name="q", storage=st)
    mine = []
    while True:
        trial = study.ask()
        fixed = st.get_trial(trial._trial_id).system_attrs.get("fixed_params")
        if fixed is None:  # the queue is empty: ask created a fresh trial
            study.tell(trial, state=TrialState.FAIL)
            break
        mine.append(fixed["k"])
        study.tell(trial, 0.0)
    with open(out, "a") as fh:
        fh.write("".join(f"{k}\n" for k in mine))


def test_journal_storage_hands_each_queued_trial_to_one_process(tmp_path):
    """What the grid relies on: a WAITING trial is popped once, also from a journal file."""
    url, out = f"journal:{tmp_path / 'optuna.journal'}", str(tmp_path / "popped.txt")
    study = optuna.create_study(study_name="q", storage=open_storage(url))
    for k in range(150):
        study.enqueue_trial({"k": k})
    _run_all(_pop_all, (url, out), 4)
    popped = sorted(int(line) for line in Path(out).read_text().split())
    assert popped == list(range(150))


# --------------------------------------------------------------------------- storage


def test_stale_running_trial_is_failed_and_queued_again(tmp_path):
    url = f"journal:{tmp_path / 'optuna.journal'}"
    st = open_storage(url, heartbeat_interval=1, grace_period=2)
    assert isinstance(st, HeartbeatJournalStorage)
    study = optuna.create_study(study_name="s", storage=st)
    study.enqueue_trial({"x": 1.5})
    with pytest.warns(UserWarning, match="Heartbeat"):
        dead = study.ask()  # a worker that pops a trial, beats once, then dies
    dead.suggest_float("x", 1.5, 1.5)
    st.record_heartbeat(dead._trial_id)
    assert st._get_stale_trial_ids(study._study_id) == []
    time.sleep(2.5)
    assert st._get_stale_trial_ids(study._study_id) == [dead._trial_id]
    out = grid_search("s", open_storage(url, heartbeat_interval=1, grace_period=2), "x", [1.5], parabola,
                      progress=False)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].system_attrs["failed_trial"] == 0 and out[1.5].number == 1  # the copy was re-run


def test_mask_url_hides_every_password_form():
    cases = {
        "postgresql://calib:s3cret@db:5432/studies": "postgresql://calib:***@db:5432/studies",
        "postgresql+psycopg2://u:p%40ss%2Fw@127.0.0.1/db": "postgresql+psycopg2://u:***@127.0.0.1/db",
        "postgresql://u:a@b@host/db": "postgresql://u:***@host/db",
        "redis://:tok@host:6379": "redis://:***@host:6379",
        "postgresql://host/db?user=u&password=pw&x=1": "postgresql://host/db?user=u&password=***&x=1",
        "sqlite:///tmp/x.db": "sqlite:///tmp/x.db",
        "journal:/tmp/x.journal": "journal:/tmp/x.journal",
    }
    for url, masked in cases.items():
        assert mask_url(url) == masked
    assert mask_url(None) is None


def test_storage_errors_never_show_the_password(tmp_path):
    for url in ("postgresql+psycopg2://u:TopSecret1@127.0.0.1:1/db", "nosuchdialect://u:TopSecret1@h/db",
                "postgresql+nosuchdriver://u:TopSecret1@h/db", "postgresql://u:TopSecret1@h:notaport/db"):
        with pytest.raises(StudyError) as info:
            open_storage(url)
        assert "TopSecret1" not in str(info.value) and "***" in str(info.value)
    with pytest.raises(StudyError, match="does not exist"):
        open_storage(f"journal:{tmp_path}/missing/x.journal")
    with pytest.raises(StudyError, match="heartbeat_interval"):
        open_storage(f"journal:{tmp_path}/x.journal", heartbeat_interval=0)


def test_default_storage_and_labels(tmp_path):
    assert default_storage_url(tmp_path) == f"journal:{tmp_path.resolve() / 'optuna.journal'}"
    assert default_storage_url(tmp_path, workers=2) == f"journal:{tmp_path.resolve() / 'optuna.journal'}"
    db = f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
    assert default_storage_url(tmp_path, serial="sqlite") == db
    assert describe_storage(db, tmp_path) == "sqlite: optuna.db in the output folder"
    (tmp_path / "optuna.db").touch()
    assert default_storage_url(tmp_path) == db  # a serial run resumes a folder's optuna.db
    assert default_storage_url(tmp_path, workers=2).startswith("journal:")  # SQLite cannot be shared
    (tmp_path / "optuna.journal").touch()
    assert default_storage_url(tmp_path, serial="sqlite").startswith("journal:")  # a parallel study resumes serially
    assert describe_storage(default_storage_url(tmp_path), tmp_path) == "journal: optuna.journal in the output folder"
    assert describe_storage("postgresql://a:b@h/d", tmp_path) == "postgresql://a:***@h/d"
    with pytest.raises(StudyError, match="SQLite"):
        check_shareable("sqlite:///x.db")
    check_shareable("journal:/x")
    check_shareable("postgresql://h/d")


# --------------------------------------------------------------------------- a storage that fails (issue 14)


def _lost(message: str = "server closed the connection unexpectedly"):
    import sqlalchemy

    return sqlalchemy.exc.OperationalError("SELECT trials", {}, Exception(message))


def _flaky(method, failures: list[int], exc_factory):
    """``method`` raising ``exc_factory()`` on the calls numbered in ``failures`` (1-based)."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in failures or (failures and failures[-1] == -1 and calls["n"] >= failures[0]):
            raise exc_factory()
        return method(*args, **kwargs)

    return wrapper


@pytest.fixture
def fast_retries(monkeypatch):
    import calib.studies.storage as storage

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.01, 0.02, 0.04))


def test_a_storage_lost_for_a_while_is_retried_and_the_search_completes(tmp_path, fast_retries, caplog):
    reference = grid_search("g", journal(tmp_path, "ref.journal"), "x", GRID[:8], parabola, progress=False)
    st = journal(tmp_path)
    st.get_all_trials = _flaky(st.get_all_trials, [5, 15, 30], _lost)
    st.set_trial_state_values = _flaky(st.set_trial_state_values, [3], _lost)
    out = grid_search("g", st, "x", GRID[:8], parabola, progress=False)
    assert [(v, t.value) for v, t in out.items()] == [(v, t.value) for v, t in reference.items()]
    assert states(st, "g")["RUNNING"] == 0 and states(st, "g")["WAITING"] == 0
    assert "retry 1 of 3" in caplog.text and "server closed the connection unexpectedly" in caplog.text
    st2 = journal(tmp_path, "t.journal")
    st2.get_all_trials = _flaky(st2.get_all_trials, [4, 20, 50], _lost)
    same = [(t.params, t.value) for t in _tpe(journal(tmp_path, "tref.journal"), n=12)]
    assert [(t.params, t.value) for t in _tpe(st2, n=12)] == same  # the serial trials (numbers may shift)


def test_a_storage_lost_for_good_is_one_line_after_the_retries(tmp_path, fast_retries):
    st = journal(tmp_path)
    st.get_all_trials = _flaky(st.get_all_trials, [3, -1], _lost)
    with pytest.raises(StudyError) as info:
        grid_search("g", st, "x", GRID[:5], parabola, progress=False)
    message = str(info.value)
    assert message.startswith(f"storage: lost the storage journal:{tmp_path / 'optuna.journal'} (still failing "
                              "after 3 retries") and "OperationalError: server closed the connection" in message
    assert "\n" not in message


def test_a_damaged_storage_is_not_retried(tmp_path, fast_retries):
    import sqlalchemy

    st = journal(tmp_path)
    st.get_all_trials = _flaky(st.get_all_trials, [2, -1], lambda: sqlalchemy.exc.DatabaseError(
        "SELECT", {}, Exception("database disk image is malformed")))
    t0 = time.monotonic()
    with pytest.raises(StudyError, match="is damaged: DatabaseError: database disk image is malformed"):
        _tpe(st, n=4)
    assert time.monotonic() - t0 < 5


def test_errors_of_the_objective_are_never_taken_for_the_storage(tmp_path, fast_retries):
    st = journal(tmp_path)
    calls = []

    def objective(v):
        calls.append(v)
        raise OSError(28, "No space left on device")  # an OSError, as the journal file's would be

    with pytest.raises(OSError, match="No space left"):
        grid_search("g", st, "x", GRID[:3], objective, progress=False)
    assert len(calls) == 1  # not retried
    assert states(st, "g") == Counter({"FAIL": 1})


def test_a_trial_left_running_by_this_process_is_failed_and_rerun_at_once(tmp_path):
    """A tell lost with the connection leaves this process's trial RUNNING: the next step re-runs it, without
    waiting for the grace period."""
    st = journal(tmp_path, heartbeat_interval=1, grace_period=60)
    study = optuna.create_study(study_name="g", storage=st)
    study.enqueue_trial({"x": 10.0})
    with pytest.warns(UserWarning, match="Heartbeat"):
        orphan = study.ask()
    orphan.suggest_float("x", 10.0, 20.0)
    orphan.set_user_attr("calib:worker", f"{__import__('socket').gethostname()}:{os.getpid()}")
    t0 = time.monotonic()
    out = grid_search("g", st, "x", [10.0, 20.0], parabola, progress=False)
    assert time.monotonic() - t0 < 10 and sorted(out) == [10.0, 20.0]
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and out[10.0].system_attrs["failed_trial"] == 0
    assert "calib:worker" not in trials[1].user_attrs or trials[1].user_attrs["calib:worker"].endswith(
        f":{os.getpid()}")  # the copy is this live worker's, not the dead one's


def test_journal_storage_finds_stale_trials_through_the_public_api():
    import inspect

    from calib.studies import storage

    source = inspect.getsource(storage) + inspect.getsource(__import__("calib.calibrate.trials").calibrate.trials)
    assert "._trial_id" not in source and "._study_id" not in source and "._storage" not in source
