"""``calib calibrate``: a small fit on two shipped runs, the held-out report and the calibration file."""

from __future__ import annotations

import json

from calib.cli import main
from calib.commands.calibrate import joint_candidate


def test_calibrate_two_runs_leave_one_run_out(tmp_path, capsys):
    out = tmp_path / "cal"
    argv = ["calibrate", "llama-2-7b-tp1-codegen", "codellama-34b-tp2-roleplay", "--out", str(out), "--trials", "6",
            "--window", "20", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["folds"]) == 2 and report["heldout"]["n_runs"] == 2
    assert {f["runs"][0] for f in report["folds"]} == set(report["runs"])
    assert set(report["final"]["best_params"]) == set(joint_candidate()[1]) == set(report["space"])
    from calib.calibration import Calibration

    cal = Calibration.load(out / "calibration.yaml")
    assert cal.estimator_class == "LoadedRegressor" and cal.settings.physics.variant == "v4"
    assert cal.heldout["n_runs"] == 2 and "LeaveOneGroupOut" in cal.heldout["aggregation"]
    assert (out / "optuna.db").is_file()
    # the calibration file drives predict
    assert main(["predict", "llama-2-7b-tp1-codegen", "--calibration", str(out / "calibration.yaml"), "--json",
                 "--no-plot", "--out", str(tmp_path / "p")]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["predicted"]["tpot_mean_ms"] > 0
    # a rerun reuses the Optuna storage (calib created it) without --force
    assert main(argv) == 0


def test_one_run_has_no_heldout_estimate(tmp_path, capsys):
    assert main(["calibrate", "codellama-34b-tp2-roleplay", "--out", str(tmp_path), "--trials", "3", "--window",
                 "10"]) == 0
    out = capsys.readouterr().out
    assert "no held-out estimate: a single run" in out and "final fit:" in out


def test_the_fit_is_the_joint_study_candidate():
    """calib calibrate fits what studies/joint.yaml ships: same forms, ranges and loss weights."""
    import yaml

    from calib.resources import study_file

    doc = yaml.safe_load(study_file("joint").read_text())
    (cand,) = doc["candidates"]
    fixed, space, objective = joint_candidate()
    assert fixed == {**cand["physics"], "overhead_model": cand["overhead_model"],
                     "cpu_overlap": cand.get("cpu_overlap", False)}
    assert fixed == {"variant": "v4", "overhead_model": "per_sequence", "cpu_overlap": True}
    assert {k.split(".")[1]: (r.low, r.high) for k, r in space.items()} == {
        k: (v["low"], v["high"]) for k, v in cand["space"].items()}
    assert objective == {"weights": doc["objective"]["weights"], "cap": doc["objective"]["cap"]}
