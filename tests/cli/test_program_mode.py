"""Run as a program, calib tunes the garbage collector and closes its storages when a command has finished;
called from Python, it leaves the collector alone (checked by state, never by timing)."""

from __future__ import annotations

import gc
import subprocess
import sys

from calib.cli import finished, importing


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_from_python_the_collector_is_left_alone():
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    with importing():
        assert gc.isenabled()
        import json  # noqa: F401
    finished()
    assert gc.isenabled() and gc.get_threshold() == threshold and gc.get_freeze_count() == frozen


def test_as_a_program_imports_pause_the_collector_and_are_frozen():
    code = """
import gc, os
import calib.cli as cli
cli.as_program()
assert os.environ["OPENBLAS_NUM_THREADS"]
assert gc.get_threshold()[0] == cli.YOUNG_GC_THRESHOLD
seen = []
with cli.importing():
    seen.append(gc.isenabled())
    import fractions
try:
    with cli.importing():
        raise ImportError("a missing dependency")
except ImportError:
    pass
print(seen, gc.isenabled(), gc.get_freeze_count() > 0)
"""
    assert _python(code) == "[False] True True"


def test_a_finished_command_closes_its_sqlite_storage(tmp_path):
    db = tmp_path / "optuna.db"
    code = f"""
import optuna
import calib.cli as cli
from calib.studies.storage import open_storage
cli.as_program()
storage = open_storage("sqlite:///{db}")
study = optuna.create_study(study_name="s", storage=storage)
study.enqueue_trial({{"x": 1.0}})
cli.finished()
import os
left = sorted(p for p in os.listdir("{tmp_path}") if p.startswith("optuna.db-"))
assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1  # still usable
print(left)
"""
    assert _python(code) == "[]"
    assert db.is_file()


def test_a_finished_calib_study_run_leaves_no_sqlite_log(tmp_path):
    """The whole program: a study run into SQLite ends with the database closed (no -wal or -shm file)."""
    import yaml

    from calib.data.workloads import EMBEDDED_HG1

    data = tmp_path / "data"
    data.mkdir()
    keep = {"jan30-llama2-7b-tp4-chatsweep", "jan30-llama2-7b-tp4-codesweep"}
    lines = (EMBEDDED_HG1 / "experiments.csv").read_text().splitlines()
    (data / "experiments.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:]
                                                                  if ln.split(",")[0] in keep]) + "\n")
    (data / "workloads.yaml").write_text((EMBEDDED_HG1 / "workloads.yaml").read_text())
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump({
        "name": "tiny", "kind": "hg1", "dataset": str(data), "estimator": {"mode": "reference"},
        "split": {"train": ["jan30-llama2-7b-tp4-chatsweep"], "test": ["jan30-llama2-7b-tp4-codesweep"]},
        "phases": [{"name": "coarse", "grid": {"low": 0, "high": 100, "step": 50}}],
        "validation": ["optimum", 100, 0], "criteria": []}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "calib", "study", "run", str(study), "--out", str(out),
                           "--no-progress", "--storage", f"sqlite:///{out / 'optuna.db'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "results.json").is_file() and (out / "REPORT.md").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("optuna.db")) == ["optuna.db"]


def test_ctrl_c_is_held_while_a_program_imports_and_delivered_after():
    """An interrupt during a command's imports (C extensions initialising) lands after them, as KeyboardInterrupt."""
    code = """
import os, signal
import calib.cli as cli
cli.as_program()
state = []
try:
    with cli.importing():
        state.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        os.kill(os.getpid(), signal.SIGINT)  # held: the imports go on
        import fractions
        state.append("imported")
except KeyboardInterrupt:
    state.append("interrupted after")
state.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
print(state)
"""
    assert _python(code) == "[True, 'imported', 'interrupted after', False]"


def test_the_lead_imports_the_report_with_signals_held(monkeypatch):
    import importlib
    import signal

    from calib.studies import runner

    seen = []
    monkeypatch.setattr(importlib, "import_module",
                        lambda name: seen.append((name, signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))))
    runner._import_report("hg1")
    assert seen == [("calib.reporting.hg1", True)]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
