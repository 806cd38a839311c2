"""Splitters of the experiments table, with the scikit-learn splitter interface.

Every splitter here yields ``(train, test)`` arrays of *row positions*, in a
fixed order, and works wherever scikit-learn takes a ``cv`` object
(:func:`sklearn.model_selection.cross_validate`, ``GridSearchCV``, ...).

:class:`AllKOfNSplit`
    Every one of the ``C(n, k)`` ways to hold out ``k`` of ``n`` experiments
    (715 for 4 of 13), test sets in :func:`itertools.combinations` order.
:class:`FixedSplit`
    The one split a label column describes (``hg1_split``: ``train``/``test``).

:func:`make_splitter` builds these and scikit-learn's ``ShuffleSplit``,
``GroupShuffleSplit``, ``LeaveOneGroupOut`` and ``GroupKFold`` by name, and
:func:`materialize_splits` lists a splitter's folds, refusing any fold with an
empty train or test set, before a study does any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import (BaseCrossValidator, GroupKFold, GroupShuffleSplit, LeaveOneGroupOut,
                                     ShuffleSplit)
from sklearn.utils.validation import _num_samples

from calib.errors import CalibError

__all__ = ["AllKOfNSplit", "FixedSplit", "Fold", "SPLITTER_TYPES", "make_splitter", "materialize_splits",
           "group_labels", "split_key"]

#: splitter names accepted by :func:`make_splitter`
SPLITTER_TYPES = ("all_k_of_n", "fixed", "shuffle", "group_shuffle", "leave_one_group_out", "group_kfold")


class AllKOfNSplit(BaseCrossValidator):
    """All ``C(n, n_test)`` train/test splits that hold out ``n_test`` rows.

    The test sets come in :func:`itertools.combinations` order over row
    positions (the order of :class:`sklearn.model_selection.LeavePOut`); the
    train set of a split is its complement, ascending.

    Parameters
    ----------
    n_test : int, default 4
        Rows held out per split (``1 <= n_test < n``).
    max_splits : int, default 100_000
        Refuse to enumerate more splits than this (``C(n, k)`` grows fast).

    Examples
    --------
    >>> import numpy as np
    >>> cv = AllKOfNSplit(n_test=4)
    >>> cv.get_n_splits(np.zeros((13, 1)))
    715
    >>> train, test = next(cv.split(np.zeros((5, 1))))
    >>> train.tolist(), test.tolist()
    ([4], [0, 1, 2, 3])
    >>> from sklearn.dummy import DummyRegressor
    >>> from sklearn.model_selection import cross_validate
    >>> X, y = np.zeros((6, 1)), np.arange(6.0)
    >>> len(cross_validate(DummyRegressor(), X, y, cv=AllKOfNSplit(2))["test_score"])
    15
    """

    def __init__(self, n_test: int = 4, max_splits: int = 100_000):
        self.n_test = n_test
        self.max_splits = max_splits

    def _check(self, n: int) -> None:
        k = self.n_test
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise CalibError(f"must be an integer >= 1 (an empty test fold otherwise), got {k!r}",
                             field="n_test")
        if k >= n:
            raise CalibError(f"holding out {k} of {n} experiments leaves an empty train fold", field="n_test")
        if math.comb(n, k) > self.max_splits:
            raise CalibError(f"C({n}, {k}) = {math.comb(n, k)} splits exceeds max_splits={self.max_splits}",
                             field="n_test")

    def _iter_test_indices(self, X=None, y=None, groups=None) -> Iterator[np.ndarray]:
        n = _num_samples(X)
        self._check(n)
        for combo in combinations(range(n), self.n_test):
            yield np.array(combo, dtype=np.int64)

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        """``C(n, n_test)``; ``X`` is required (its number of rows is ``n``)."""
        if X is None:
            raise ValueError("The 'X' parameter should not be None.")
        n = _num_samples(X)
        self._check(n)
        return math.comb(n, self.n_test)


class FixedSplit(BaseCrossValidator):
    """The single split a label column describes.

    Parameters
    ----------
    column : str, default "hg1_split"
        Column of the experiments ``DataFrame`` passed as ``X``; rows labelled
        ``train_label`` train, rows labelled ``test_label`` test, others are
        left out.
    train_label, test_label : str
    labels : sequence of str, optional
        The labels themselves (then ``X`` need not be a DataFrame).

    Examples
    --------
    >>> import pandas as pd
    >>> X = pd.DataFrame({"hg1_split": ["train", "test", "train"]})
    >>> [(tr.tolist(), te.tolist()) for tr, te in FixedSplit().split(X)]
    [([0, 2], [1])]
    """

    def __init__(self, column: str = "hg1_split", train_label: str = "train", test_label: str = "test",
                 labels: Sequence[str] | None = None):
        self.column = column
        self.train_label = train_label
        self.test_label = test_label
        self.labels = labels

    def _labels(self, X) -> np.ndarray:
        if self.labels is not None:
            labels = np.asarray([str(v) for v in self.labels])
            if X is not None and len(labels) != _num_samples(X):
                raise CalibError(f"{len(labels)} labels for {_num_samples(X)} rows", field="labels")
            return labels
        if not isinstance(X, pd.DataFrame) or self.column not in X.columns:
            raise CalibError(f"experiments table has no column {self.column!r}", field="column")
        return X[self.column].astype(str).to_numpy()

    def split(self, X, y=None, groups=None):
        labels = self._labels(X)
        train = np.flatnonzero(labels == self.train_label)
        test = np.flatnonzero(labels == self.test_label)
        if len(train) == 0 or len(test) == 0:
            raise CalibError(f"column labels leave an empty {'train' if len(train) == 0 else 'test'} fold",
                             field=self.column)
        yield train, test

    def _iter_test_indices(self, X=None, y=None, groups=None):  # pragma: no cover - split is overridden
        yield next(self.split(X))[1]

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return 1


@dataclass(frozen=True)
class Fold:
    """One train/test split of an experiments table (positions and names)."""

    train_idx: np.ndarray
    test_idx: np.ndarray
    train: tuple[str, ...]
    test: tuple[str, ...]


def split_key(test: Sequence[str]) -> tuple[str, ...]:
    """A split's identity: its sorted test experiment names."""
    return tuple(sorted(test))


def group_labels(X: pd.DataFrame, column: str) -> np.ndarray:
    """The group label of each row (as strings), or a clear error for a missing column.

    Raises
    ------
    CalibError
        ``X`` has no column ``column``.
    """
    if column not in X.columns:
        raise CalibError(f"experiments table has no column {column!r}; columns: {', '.join(map(str, X.columns))}",
                         field=column)
    return X[column].astype(str).to_numpy()


def make_splitter(kind: str, *, n_test: int | None = None, n_splits: int | None = None,
                  test_size: float | int | None = None, seed: int = 0, column: str | None = None):
    """A splitter by name (see :data:`SPLITTER_TYPES`).

    Parameters
    ----------
    kind : str
        ``all_k_of_n`` (``n_test``), ``fixed`` (``column``), ``shuffle``
        (``n_splits``, ``test_size``, ``seed``), ``group_shuffle`` (same, with
        ``test_size`` counting groups when an int), ``leave_one_group_out``,
        ``group_kfold`` (``n_splits``).
    n_test, n_splits, test_size, seed, column
        As the chosen splitter needs them.

    Returns
    -------
    splitter
        An object with ``split(X, y, groups)`` and ``get_n_splits``.
    """
    if kind == "all_k_of_n":
        return AllKOfNSplit(n_test=4 if n_test is None else n_test)
    if kind == "fixed":
        return FixedSplit(column=column or "hg1_split")
    if kind == "shuffle":
        return ShuffleSplit(n_splits=n_splits or 10, test_size=test_size, random_state=seed)
    if kind == "group_shuffle":
        return GroupShuffleSplit(n_splits=n_splits or 10, test_size=test_size, random_state=seed)
    if kind == "leave_one_group_out":
        return LeaveOneGroupOut()
    if kind == "group_kfold":
        return GroupKFold(n_splits=n_splits or 5)
    raise CalibError(f"unknown splitter {kind!r}; choose one of {', '.join(SPLITTER_TYPES)}", field="type")


def materialize_splits(splitter, X: pd.DataFrame, groups: np.ndarray | None = None) -> list[Fold]:
    """All folds of ``splitter`` on ``X``, checked: no empty train or test fold, no overlap.

    Raises
    ------
    CalibError
        The splitter cannot split ``X`` (scikit-learn's message is kept) or a
        fold has an empty train or test set.
    """
    names = np.asarray([str(i) for i in X.index])
    try:
        raw = list(splitter.split(X, None, groups))
    except CalibError:
        raise
    except ValueError as exc:
        raise CalibError(f"{type(splitter).__name__} cannot split {len(X)} experiments: {exc}",
                         field="splitter") from None
    if not raw:
        raise CalibError(f"{type(splitter).__name__} yields no split", field="splitter")
    folds = []
    for i, (tr, te) in enumerate(raw):
        tr, te = np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64)
        if len(tr) == 0 or len(te) == 0:
            raise CalibError(f"{type(splitter).__name__} fold {i} has an empty {'train' if len(tr) == 0 else 'test'}"
                             " set", field="splitter")
        if np.intersect1d(tr, te).size:
            raise CalibError(f"{type(splitter).__name__} fold {i} trains and tests on the same experiment",
                             field="splitter")
        tr, te = np.sort(tr), np.sort(te)
        folds.append(Fold(tr, te, tuple(names[tr]), tuple(names[te])))
    return folds
