"""Search algorithms of calib.calibrate.search (toy objectives, in-memory storage)."""

import math

import optuna
import pytest

from calib.calibrate import TPE, CmaEs, Choice, Grid, PhasedGrid, Range, Refine, make_space, parse_search
from calib.calibrate.search import MAX_GRID_POINTS, budget
from calib.errors import ConfigError


def bowl(values):
    x = values["x"]
    return (x - 1.3) ** 2 + 0.1 * (values.get("y", 0.0) + 0.5) ** 2, {"x": x}


def mem():
    return optuna.storages.InMemoryStorage()


def test_phased_grid_refines_around_the_coarse_optimum_and_ties_go_low():
    res = PhasedGrid([Grid(step=1.0), Refine(radius=1.0, step=0.5)]).run(bowl, {"x": Range(0, 4)}, storage=mem(),
                                                                       name="t")
    coarse = [t["params"]["x"] for t in res.trials if t["stage"] == "phase0"]
    fine = [t["params"]["x"] for t in res.trials if t["stage"] == "phase1"]
    assert coarse == [0, 1, 2, 3, 4] and fine == [0, 0.5, 1, 1.5, 2]
    assert res.best_params == {"x": 1.5} and res.converged is None
    flat = PhasedGrid([Grid(step=1.0)]).run(lambda v: (1.0, {}), {"x": Range(0, 3)}, storage=mem(), name="f")
    assert flat.best_params == {"x": 0.0}


def test_refine_is_clipped_at_the_low_end_only():
    res = PhasedGrid([Grid(step=1.0), Refine(radius=1.0, step=1.0)]).run(
        lambda v: (-v["x"], {}), {"x": Range(0, 2)}, storage=mem(), name="r")
    assert [t["params"]["x"] for t in res.trials if t["stage"] == "phase1"] == [1, 2, 3]


@pytest.mark.parametrize("phases", [
    [Refine(radius=1, step=1)],
    [Grid(step=0)],
    [Grid(step=1e-300)],
    [Grid(step=1, high=1e12)],
    [Grid(step=float("nan"))],
])
def test_bad_or_unbounded_grids_fail_at_once(phases):
    with pytest.raises(ConfigError):
        PhasedGrid(phases).run(bowl, {"x": Range(0, 4)}, storage=mem(), name="b")
    assert MAX_GRID_POINTS == 100_000


def test_phased_grid_needs_exactly_one_range():
    with pytest.raises(ConfigError, match="exactly one"):
        PhasedGrid([Grid(step=1)]).run(bowl, {"x": Range(0, 1), "y": Range(0, 1)}, storage=mem(), name="two")


def test_tpe_seeds_are_independent_reproducible_and_converge_on_a_bowl():
    space = {"x": Range(0, 4), "y": Range(-1, 1)}
    a = TPE(n_trials=40, seeds=3).run(bowl, space, storage=mem(), name="a")
    b = TPE(n_trials=40, seeds=3).run(bowl, space, storage=mem(), name="a")
    assert [s["best_loss"] for s in a.seeds] == [s["best_loss"] for s in b.seeds]
    assert len({s["best_loss"] for s in a.seeds}) == 3  # different seeds, different draws
    assert a.best_loss == min(s["best_loss"] for s in a.seeds) < 0.05
    assert TPE(n_trials=40, seeds=3, tolerance=1.0).run(bowl, space, storage=mem(), name="c").converged is True
    assert TPE(n_trials=5, seeds=3, tolerance=0.0).run(bowl, space, storage=mem(), name="d").converged is False


def test_refinement_improves_or_keeps_the_tpe_point():
    space = {"x": Range(0, 4), "y": Range(-1, 1)}
    plain = TPE(n_trials=15, seeds=1).run(bowl, space, storage=mem(), name="p")
    refined = TPE(n_trials=15, seeds=1, refine=30).run(bowl, space, storage=mem(), name="p")
    assert refined.best_loss <= plain.best_loss
    assert sum(t["stage"] == "refine" for t in refined.trials) == 30


def test_cmaes_and_choices():
    res = CmaEs(n_trials=30, seeds=1).run(bowl, {"x": Range(0, 4), "y": Range(-1, 1)}, storage=mem(), name="c")
    assert res.best_loss < 0.5
    pick = TPE(n_trials=10, seeds=1).run(lambda v: (0.0 if v["m"] == "b" else 1.0, {}), {"m": Choice(["a", "b"])},
                                         storage=mem(), name="ch")
    assert pick.best_params == {"m": "b"}


def test_budget_grows_with_the_dimension_and_parse_search_reads_study_files():
    assert budget(1) < budget(6) < budget(12)
    assert parse_search({"algorithm": "tpe", "n_trials": 10, "seeds": 2}) == TPE(n_trials=10, seeds=2)
    grid = parse_search({"algorithm": "phased_grid", "phases": [{"grid": {"step": 25}},
                                                                {"refine": {"radius": 25, "step": 5}}]})
    assert grid.describe()["phases"][1] == {"refine": {"radius": 25, "step": 5}}
    for bad in ({"algorithm": "simplex"}, {"algorithm": "tpe", "n_trials": 0}, {"algorithm": "tpe", "seeds": 4.5},
                {"algorithm": "tpe", "bogus": 1}, {"algorithm": "phased_grid", "phases": [{"line": {}}]}):
        with pytest.raises(ConfigError):
            parse_search(bad)


def test_space_checks_both_ends_against_the_settings():
    assert list(make_space({"per_layer_us": Range(0, 500), "gemm_mfu_scale": Range(0.5, 3)})) == [
        "overhead.per_layer_us", "physics.gemm_mfu_scale"]
    with pytest.raises(ConfigError, match="physics.bw_efficiency"):
        make_space({"bw_efficiency": Range(0.5, 1.5)})
    with pytest.raises(ConfigError):
        Range(1, 0)
    with pytest.raises(ConfigError):
        Range(0, 1, log=True)
    assert math.isfinite(Range(1, 2, log=True).distribution().high)
