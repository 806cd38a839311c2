"""Splitters: every k-of-n split exactly once, the fixed HG1 split, scikit-learn compatibility, bad input."""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.dummy import DummyRegressor
from sklearn.model_selection import GroupKFold, LeavePOut, ShuffleSplit, cross_validate

from calib.data import load_experiments
from calib.errors import CalibError
from calib.calibrate.model_selection import (AllKOfNSplit, FixedSplit, group_labels, make_splitter, materialize_splits,
                                   split_key)


@pytest.fixture(scope="module")
def X() -> pd.DataFrame:
    return load_experiments()


def test_all_4_of_13_is_715_distinct_splits_in_combinations_order(X):
    cv = AllKOfNSplit(n_test=4)
    splits = list(cv.split(X))
    assert cv.get_n_splits(X) == len(splits) == 715 == math.comb(13, 4)
    assert [tuple(te) for _, te in splits] == list(combinations(range(13), 4))
    for tr, te in splits:
        assert len(te) == 4 and len(tr) == 9
        assert sorted(np.r_[tr, te].tolist()) == list(range(13))
        assert list(tr) == sorted(tr)
    assert len({tuple(te) for _, te in splits}) == 715
    # the same splits, in the same order, as scikit-learn's LeavePOut
    ref = list(LeavePOut(4).split(X))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(splits, ref))


def test_published_split_is_among_the_715_exactly_once(X):
    (pub_train, pub_test), = list(FixedSplit("hg1_split").split(X))
    assert len(pub_train) == 9 and len(pub_test) == 4
    folds = materialize_splits(AllKOfNSplit(4), X)
    names = [str(i) for i in X.index]
    key = split_key([names[i] for i in pub_test])
    hits = [f for f in folds if split_key(f.test) == key]
    assert len(hits) == 1
    assert set(hits[0].train) == {names[i] for i in pub_train}
    assert "jan30-llama2-7b-tp1-codesweep" in hits[0].test


def test_usable_by_cross_validate():
    rng = np.random.default_rng(0)
    Xa, y = rng.normal(size=(13, 2)), rng.normal(size=13) + 5
    res = cross_validate(DummyRegressor(), Xa, y, cv=AllKOfNSplit(4), scoring="neg_mean_absolute_error")
    assert len(res["test_score"]) == 715
    # each score is the MAE of the train mean on the 4 held-out rows
    for score, te in zip(res["test_score"][:20], combinations(range(13), 4)):
        tr = [i for i in range(13) if i not in te]
        assert score == pytest.approx(-np.mean(np.abs(y[list(te)] - y[tr].mean())))


def test_cross_validate_with_the_roofline_estimator(X):
    from calib.estimators.roofline import RooflineRegressor

    small = X.loc[["jan30-llama2-7b-tp4-chatsweep", "20260210-qwen3-14b-tp2-chatsweep",
                   "jan30-llama2-7b-tp4-codesweep"]]
    res = cross_validate(RooflineRegressor(per_layer_us=80), small, small["tpot_mean_ms"],
                         cv=AllKOfNSplit(1))
    assert len(res["test_score"]) == 3
    pred = RooflineRegressor(per_layer_us=80).fit(small).predict(small)
    ape = np.abs(pred - small["tpot_mean_ms"].to_numpy()) / small["tpot_mean_ms"].to_numpy()
    assert np.allclose(-res["test_score"], ape)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 9), data=st.data())
def test_every_row_is_held_out_equally_often(n, data):
    k = data.draw(st.integers(1, n - 1))
    splits = list(AllKOfNSplit(k).split(np.zeros((n, 1))))
    assert len(splits) == math.comb(n, k)
    counts = Counter(int(i) for _, te in splits for i in te)
    assert set(counts.values()) == {math.comb(n - 1, k - 1)}


def test_fixed_split_from_labels_and_column():
    X = pd.DataFrame({"hg1_split": ["train", "test", "train", "other"]})
    assert [(a.tolist(), b.tolist()) for a, b in FixedSplit().split(X)] == [([0, 2], [1])]
    assert [(a.tolist(), b.tolist()) for a, b in FixedSplit(labels=["test", "train"]).split(np.zeros((2, 1)))] \
        == [([1], [0])]
    assert FixedSplit().get_n_splits() == 1


@pytest.mark.parametrize("n_test", [0, 13, 14, -1])
def test_k_of_n_with_an_empty_fold_is_refused(X, n_test):
    with pytest.raises(CalibError, match="empty"):
        list(AllKOfNSplit(n_test).split(X))
    with pytest.raises(CalibError, match="empty"):
        materialize_splits(AllKOfNSplit(n_test), X)


def test_too_many_splits_and_missing_X_are_refused():
    with pytest.raises(CalibError, match="max_splits"):
        AllKOfNSplit(10, max_splits=1000).get_n_splits(np.zeros((25, 1)))
    with pytest.raises(ValueError):
        AllKOfNSplit(2).get_n_splits()


def test_fixed_split_bad_input():
    with pytest.raises(CalibError, match="no column"):
        list(FixedSplit("nope").split(pd.DataFrame({"a": [1]})))
    with pytest.raises(CalibError, match="empty test"):
        list(FixedSplit().split(pd.DataFrame({"hg1_split": ["train", "train"]})))


def test_group_splitters_and_their_errors(X):
    folds = materialize_splits(make_splitter("leave_one_group_out"), X, group_labels(X, "family"))
    assert len(folds) == 5
    assert sorted(n for f in folds for n in f.test) == sorted(str(i) for i in X.index)
    assert all(not set(f.train) & set(f.test) for f in folds)
    with pytest.raises(CalibError, match="no column 'nope'"):
        group_labels(X, "nope")
    with pytest.raises(CalibError, match="cannot split"):
        materialize_splits(GroupKFold(n_splits=4), X, group_labels(X, "tp"))  # 3 TP groups
    with pytest.raises(CalibError, match="cannot split"):
        materialize_splits(make_splitter("leave_one_group_out"), X, np.array(["a"] * len(X)))  # one group
    with pytest.raises(CalibError, match="unknown splitter"):
        make_splitter("bogus")


def test_shuffle_split_folds_are_checked(X):
    folds = materialize_splits(ShuffleSplit(n_splits=5, test_size=3, random_state=0), X)
    assert len(folds) == 5 and all(len(f.test) == 3 and len(f.train) == 10 for f in folds)

    class Broken:
        def split(self, X, y=None, groups=None):
            yield np.arange(len(X)), np.array([], dtype=int)

    with pytest.raises(CalibError, match="empty test"):
        materialize_splits(Broken(), X)
