"""A study on a real PostgreSQL server with three worker processes (the documented cluster set-up).

``.ci/run`` starts a loopback PostgreSQL, creates a throw-away database and
user, and exports ``CALIB_TEST_POSTGRES_URL`` (and ``CALIB_CI=1``).  Outside CI
the test is skipped, with the reason shown, when the variable is unset or the
server unreachable; in CI it always runs and fails loudly if it cannot connect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from calib.data.workloads import EMBEDDED_HG1
from calib.studies.runner import run_study
from calib.studies.storage import mask_url, open_storage, scrub

URL_ENV = "CALIB_TEST_POSTGRES_URL"
REPO = Path(__file__).resolve().parents[2]
TRAIN = ["jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp2-chatsweep"]
TEST = ["jan30-llama2-7b-tp4-codesweep"]
PHASES = {"coarse": 11, "fine": 5}  # 0..300 step 30, then optimum +- 10 step 5


def in_ci() -> bool:
    return bool(os.environ.get("CALIB_CI") or os.environ.get("CI"))


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = os.environ.get(URL_ENV)
    if not url:
        if in_ci():
            pytest.fail(f"{URL_ENV} is not set in CI: .ci/run should start PostgreSQL and export it")
        pytest.skip(f"{URL_ENV} is not set: no PostgreSQL server to run the cluster test against "
                    "(.ci/run starts one; see docs/scaling.md)")
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10})
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # unreachable, bad credentials, missing driver
        reason = f"PostgreSQL at {mask_url(url)} is unreachable: {scrub(str(exc), url).splitlines()[0]}"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return url


def tiny_study(folder: Path, name: str) -> Path:
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = (EMBEDDED_HG1 / "experiments.csv").read_text().splitlines()
    keep = set(TRAIN + TEST)
    (data / "experiments.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:]
                                                                  if ln.split(",")[0] in keep]) + "\n")
    (data / "workloads.yaml").write_text((EMBEDDED_HG1 / "workloads.yaml").read_text())
    study = {"name": name, "kind": "hg1", "dataset": str(data), "estimator": {"mode": "reference"},
             "split": {"train": TRAIN, "test": TEST},
             "phases": [{"name": "coarse", "grid": {"low": 0, "high": 300, "step": 30}},
                        {"name": "fine", "around": "coarse", "radius": 10, "step": 5}],
             "validation": ["optimum", 100, 0]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_three_workers_on_postgresql(pg_url, tmp_path):
    name = f"pg-{uuid.uuid4().hex[:8]}"  # the database may hold earlier runs
    study = tiny_study(tmp_path, name)
    serial = run_study(study, tmp_path / "serial", progress=False, report=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cli = [sys.executable, "-m", "calib.cli", "study"]
    out = tmp_path / "out"
    # one worker joins "from another machine" (calib study worker), the lead runs two more (--workers 2)
    joiner = subprocess.Popen([*cli, "worker", str(study), "--storage", pg_url, "--no-progress"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lead = subprocess.run([*cli, "run", str(study), "--out", str(out), "--storage", pg_url, "--workers", "2",
                               "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
        j_out, j_err = joiner.communicate(timeout=300)
    finally:
        if joiner.poll() is None:
            joiner.kill()
    assert lead.returncode == 0, lead.stderr
    assert joiner.returncode == 0, j_err

    results = json.loads((out / "results.json").read_text())
    storage_label = results["settings"].pop("storage")
    serial["settings"].pop("storage")
    assert results == json.loads(json.dumps(serial)), (lead.stderr, j_err)  # the serial run's numbers, exactly
    assert (out / "REPORT.md").is_file()

    secret = pg_url.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
    assert storage_label == mask_url(pg_url) and (not secret or secret not in storage_label)
    if secret:
        for text in (lead.stdout, lead.stderr, j_out, j_err, (out / "results.json").read_text(),
                     (out / "REPORT.md").read_text()):
            assert secret not in text  # the password never reaches a log or a report

    st = open_storage(pg_url)
    states, workers = Counter(), Counter()
    studies = {s.study_name.rsplit("-", 1)[1]: s.study_name for s in st.get_all_studies()
               if s.study_name.startswith(f"{name}-")}
    for phase, size in PHASES.items():
        trials = optuna.load_study(study_name=studies[phase], storage=st).get_trials(deepcopy=False)
        done = [t.params["overhead.per_layer_us"] for t in trials if t.state == TrialState.COMPLETE]
        table = [(t.number, t.state.name, t.params, t.system_attrs) for t in trials]
        assert len(done) == len(set(done)) == size, table  # every grid value, exactly once
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], table
        states.update(t.state.name for t in trials)
        workers.update(t.user_attrs["calib:worker"] for t in trials if t.state == TrialState.COMPLETE)
    print(f"\nreliability: PostgreSQL, 3 worker processes, trial states {dict(states)}, "
          f"completed per worker {sorted(workers.values(), reverse=True)}")
    for phase in PHASES:
        optuna.delete_study(study_name=studies[phase], storage=st)
