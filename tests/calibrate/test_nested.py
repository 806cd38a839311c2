"""Nested cross-validation: no outer test row reaches a fit or a choice, the choice is the inner argmax, every
seed is its own search, the pooled figures are what the rows say, row weights count."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import KFold, LeaveOneGroupOut

from calib import RooflineRegressor
from calib.calibrate import TPE, Calibrator, Grid, PhasedGrid, Range, SelectBest
from calib.calibrate import nested as nested_mod
from calib.calibrate.nested import (inner_splitter, nested_cross_validate, recommend, select_on_all, spread,
                                    summarize, with_seed)
from calib.data import load_experiments
from calib.errors import CalibError, ConfigError

FAMILIES = ["llama2-7b", "qwen3-14b", "llama2-70b", "codellama-34b"]


@pytest.fixture(scope="module")
def X():
    X = load_experiments()
    keep = X[X.family.isin(FAMILIES)]
    # two experiments per family keeps it quick
    return keep.groupby("family", sort=False).head(2)


def grid(overhead="per_layer", **space):
    return Calibrator(RooflineRegressor(overhead_model=overhead), space=space or {"per_layer_us": Range(0, 200)},
                      search=PhasedGrid([Grid(step=50)]))


def tpe(overhead="per_layer_tp_power", n=4):
    return Calibrator(RooflineRegressor(overhead_model=overhead),
                      space={"per_layer_us": Range(0, 300), "alpha": Range(0, 1.5)}, search=TPE(n_trials=n, seeds=5))


class Recording(LeaveOneGroupOut):
    """LeaveOneGroupOut that says which fold is being worked on (None outside the outer loop)."""

    current: list | None = None

    def split(self, X, y=None, groups=None):
        for tr, te in super().split(X, y, groups):
            Recording.current = [str(i) for i in X.index[te]]
            yield tr, te
        Recording.current = None


@pytest.fixture
def spied(monkeypatch):
    """Every Calibrator.fit and SelectBest.fit: (outer test rows at the time, rows fitted, search seeds)."""
    seen = {"calibrator": [], "select": []}
    real_cal, real_sel = Calibrator.fit, SelectBest.fit

    def cal_fit(self, X, y=None):
        seen["calibrator"].append((Recording.current, set(map(str, X.index)), getattr(self.search, "seeds", None)))
        return real_cal(self, X, y)

    def sel_fit(self, X, y=None):
        seen["select"].append((Recording.current, set(map(str, X.index))))
        return real_sel(self, X, y)

    monkeypatch.setattr(Calibrator, "fit", cal_fit)
    monkeypatch.setattr(SelectBest, "fit", sel_fit)
    return seen


def test_no_outer_test_row_reaches_a_fit_or_a_choice(X, spied):
    cands = [("per_layer", grid()), ("tp_power", tpe())]
    res = nested_cross_validate(cands, X, outer_cv=Recording(), groups="family", seeds=[0, 1])
    assert len(res.folds) == 4 and Recording.current is None
    assert spied["calibrator"] and spied["select"]
    for test, rows, _ in spied["calibrator"]:
        assert test is not None and not rows & set(test)
    for test, rows in spied["select"]:
        assert not rows & set(test)
    # inside a fold the inner searches leave one more family out: 3 inner + 1 refit per candidate per SelectBest
    family = dict(zip(map(str, X.index), X.family))
    held_two = [rows for _, rows, _ in spied["calibrator"] if len({family[r] for r in rows}) == 2]
    assert len(held_two) == 4 * 2 * 2 * 3  # folds x seeds x candidates x inner folds
    # every TPE fit runs exactly one seed
    assert {tuple(s) for _, _, s in spied["calibrator"] if s is not None} == {(0,), (1,)}


def test_records_choices_and_pooled_figures(X):
    cands = [("per_layer", grid()), ("zero", grid(per_layer_us=Range(0, 0))), ("tp_power", tpe())]
    res = nested_cross_validate(cands, X, outer_cv=LeaveOneGroupOut(), groups="family", seeds=[0, 3])
    assert len(res.records) == 4 * 2 * 3 and len(res.choices) == 4 * 2
    assert {(r["fold"], r["seed"], r["candidate"]) for r in res.records} == {
        (f, s, c) for f in range(4) for s in (0, 3) for c in ("per_layer", "zero", "tp_power")}
    for ch in res.choices:
        assert ch["selected"] == max(ch["inner_mean"], key=ch["inner_mean"].get)
        assert ch["inner_cv"] == "LeaveOneGroupOut by family" and all(len(v) == 3 for v in ch["inner_scores"].values())
        rec = res.record(ch["fold"], ch["seed"], ch["selected"])
        assert ch["test"] == pytest.approx(rec["test"], rel=1e-12) and ch["params"] == rec["params"]
    for seed in (0, 3):
        for cand in ("per_layer", "tp_power", None):
            per_row = res.per_row("tpot", seed, cand)
            assert sorted(per_row) == sorted(map(str, X.index))  # every experiment held out once per seed
            assert res.pooled("tpot", seed, cand) == pytest.approx(np.mean(list(per_row.values())), rel=1e-12)
    # the held-out APEs are those of a direct replay at the fitted parameters
    rec = res.record(2, 3, "tp_power")
    test = X.loc[res.folds[2]["test"]]
    est = RooflineRegressor(overhead_model="per_layer_tp_power",
                            **{k.split(".")[1]: v for k, v in rec["params"].items()}).fit(test)
    pred = est.predict_all(test)["tpot"].to_numpy()
    assert rec["test"]["tpot"] == pytest.approx(np.mean(np.abs(pred - test.tpot_mean_ms) / test.tpot_mean_ms))
    sm = summarize(res)
    assert sum(sm["selected"]["counts"].values()) == 8
    assert sm["candidates"]["tp_power"]["heldout"]["tpot"]["per_seed"] == [res.pooled("tpot", s, "tp_power")
                                                                           for s in (0, 3)]
    assert [len(f["chosen"]) for f in sm["selected"]["per_fold"]] == [2] * 4
    assert res.to_dict()["aggregation"].startswith("mean APE over the held-out experiments")


def test_same_inputs_same_result(X):
    cands = [("per_layer", grid()), ("tp_power", tpe(n=3))]
    a = nested_cross_validate(cands, X, outer_cv=LeaveOneGroupOut(), groups="family", seeds=[1])
    b = nested_cross_validate(cands, X, outer_cv=LeaveOneGroupOut(), groups="family", seeds=[1])
    assert a.to_dict() == b.to_dict()


def test_too_few_groups_fall_back_to_kfold(X):
    two = X[X.family.isin(FAMILIES[:3])]  # an outer fold keeps 2 families
    res = nested_cross_validate([("a", grid()), ("b", grid(per_layer_us=Range(0, 0)))], two,
                                outer_cv=LeaveOneGroupOut(), groups="family", seeds=[0])
    assert {c["inner_cv"] for c in res.choices} == {"KFold(3)"}
    cv, by_groups = inner_splitter(X, "family", min_groups=3)
    assert isinstance(cv, LeaveOneGroupOut) and by_groups
    cv, by_groups = inner_splitter(X, "family", min_groups=5)
    assert isinstance(cv, KFold) and cv.n_splits == 3 and not by_groups
    given = KFold(2)
    assert inner_splitter(X, None, given) == (given, False)


def test_with_seed_leaves_the_original_alone():
    cal = tpe()
    seeded = with_seed(cal, 7)
    assert seeded.search.seeds == [7] and cal.search.seeds == [0, 1, 2, 3, 4]
    assert seeded.search.n_trials == cal.search.n_trials
    g = grid()
    assert with_seed(g, 3).search.describe() == g.search.describe()


def test_select_on_all_and_recommend(X):
    cands = [("per_layer", grid()), ("huge", grid(per_layer_us=Range(400, 400)))]
    sels = select_on_all(cands, X, groups="family", seeds=[0, 1])
    rec, chosen = recommend(sels, [0, 1])
    assert rec["candidate"] == "per_layer" and rec["votes"] == {"per_layer": 2, "huge": 0}
    assert chosen.best_name_ == "per_layer" and rec["params"] == chosen.best_estimator_.best_params_
    assert [p["seed"] for p in rec["per_seed"]] == [0, 1]
    assert rec["mean_inner_score"]["per_layer"] > rec["mean_inner_score"]["huge"]


class FamilyWeighted(RooflineRegressor):
    """Rows weighted so that a mean over rows is a mean over families (like a loaded estimator's runs)."""

    @staticmethod
    def row_weights(X):
        from calib.metrics import group_weights

        return group_weights(X["family"])


def test_row_weights_are_used(X):
    three = X[X.family.isin(FAMILIES[:3])].copy()
    cal = Calibrator(FamilyWeighted(), space={"per_layer_us": Range(0, 100)}, search=PhasedGrid([Grid(step=50)]))
    res = nested_cross_validate([("w", cal)], three, outer_cv=KFold(2), seeds=[0], metrics=("tpot",))
    rows = [row for r in res.records for row in r["rows"]]
    assert {row["weight"] for row in rows} != {1.0}
    w = np.array([row["weight"] for row in rows])
    a = np.array([row["ape"]["tpot"] for row in rows])
    assert res.pooled("tpot", 0, "w") == pytest.approx(float((w * a).sum() / w.sum()))


def test_bad_input(X):
    with pytest.raises(ConfigError, match="seeds"):
        nested_cross_validate([("a", grid())], X, outer_cv=LeaveOneGroupOut(), groups="family", seeds=[1, 1])
    with pytest.raises(ConfigError, match="not a Calibrator"):
        nested_cross_validate([("a", RooflineRegressor())], X, outer_cv=LeaveOneGroupOut(), groups="family")
    with pytest.raises(CalibError, match="no column 'vendor'"):
        nested_cross_validate([("a", grid())], X, outer_cv=LeaveOneGroupOut(), groups="vendor")
    with pytest.raises(ConfigError, match="distinct names"):
        nested_cross_validate([("a", grid()), ("a", grid())], X, outer_cv=LeaveOneGroupOut(), groups="family")


def test_spread():
    assert spread([0.3]) == {"median": 0.3, "min": 0.3, "max": 0.3, "n": 1}
    assert nested_mod.AGGREGATION in nested_mod.NestedResult(["a"], [0]).to_dict().values()
