"""Statistics sized for calib's small samples: a rank test by permutation, and confounding between groupings.

With 13 experiments in 2–5 groups, normal-theory intervals and bootstraps
over two points say nothing.  What does: the per-experiment optima, a
Kruskal–Wallis statistic (ranks, so no distribution is assumed) whose
p-value comes from permuting the group labels, and a plain statement of which
groupings cannot be told apart in the data (a family seen at one TP only).

Examples
--------
>>> r = rank_test([40, 55, 70, 90, 120, 145, 160, 250, 325], ["1"] * 3 + ["2"] * 3 + ["4"] * 3,
...               n_permutations=2000, seed=0)
>>> r["groups"], round(r["statistic"], 2), r["p_value"] < 0.01
(3, 7.2, True)
>>> rank_test([1.0, 2.0], ["a", "b"])["p_value"] is None
True
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["kruskal_h", "rank_test", "confounding"]


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based; ties share their mean rank)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def kruskal_h(ranks: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Kruskal–Wallis H without the tie correction (a constant factor under permutation) per row of ``codes``.

    ``ranks``: ranks of the N values; ``codes``: (P, N) or (N,) integer group codes.
    """
    codes = np.atleast_2d(codes)
    n = ranks.size
    sums = np.zeros((codes.shape[0], n_groups))
    counts = np.zeros((codes.shape[0], n_groups))
    rows = np.repeat(np.arange(codes.shape[0]), n)
    np.add.at(sums, (rows, codes.ravel()), np.tile(ranks, codes.shape[0]))
    np.add.at(counts, (rows, codes.ravel()), 1.0)
    return 12.0 / (n * (n + 1)) * np.sum(sums ** 2 / np.maximum(counts, 1), axis=1) - 3.0 * (n + 1)


def rank_test(values: Sequence[float], labels: Sequence[str], *, n_permutations: int = 20_000,
              seed: int = 0) -> dict:
    """Do the values differ between groups?  Kruskal–Wallis H with a Monte-Carlo permutation p-value.

    Returns ``{"statistic", "p_value", "n_permutations", "seed", "groups", "n", "method"}`` (``statistic``: H
    with the tie correction, as tabulated in the literature); ``p_value`` is
    ``None`` when fewer than two groups hold two or more values (nothing to compare).  The p-value is
    ``(1 + #{H_perm >= H_obs}) / (1 + n_permutations)``.
    """
    values = np.asarray(values, dtype=float)
    labels = np.asarray([str(x) for x in labels])
    uniq, codes = np.unique(labels, return_inverse=True)
    sizes = np.bincount(codes)
    out = {"statistic": None, "p_value": None, "n_permutations": int(n_permutations), "seed": int(seed),
           "groups": int(len(uniq)), "n": int(values.size),
           "method": "Kruskal-Wallis H, Monte-Carlo permutation of the group labels"}
    if len(uniq) < 2 or np.sum(sizes >= 2) < 2:
        return out
    ranks = _ranks(values)
    _, ties = np.unique(values, return_counts=True)
    correction = 1.0 - np.sum(ties ** 3 - ties) / (values.size ** 3 - values.size)
    correction = correction if correction > 0 else 1.0  # all values equal: H is 0 anyway
    observed = float(kruskal_h(ranks, codes, len(uniq))[0] / correction)
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, n_permutations, 5000):
        block = min(5000, n_permutations - start)
        perms = np.array([rng.permutation(codes) for _ in range(block)])
        exceed += int(np.sum(kruskal_h(ranks, perms, len(uniq)) / correction >= observed - 1e-12))
    out.update(statistic=observed, p_value=(1 + exceed) / (1 + n_permutations))
    return out


def confounding(table, groupings: Sequence[str]) -> list[str]:
    """Sentences naming where one grouping cannot be separated from another in ``table`` (a DataFrame).

    A group of ``a`` is confounded with ``b`` when all its rows share one value of ``b`` while ``b`` takes
    other values elsewhere (e.g. Llama-2-70B is only seen at TP 4).

    >>> import pandas as pd
    >>> t = pd.DataFrame({"family": ["a", "a", "b", "b", "c"], "tp": [1, 4, 1, 4, 4]})  # c: only TP 4
    >>> confounding(t, ["family", "tp"])
    ["family 'c' is only seen at tp=4: its effect cannot be told apart from that tp"]
    """
    out = []
    for a in groupings:
        for b in groupings:
            if a == b:
                continue
            levels = table.groupby(table[a].astype(str))[b].agg(lambda s: sorted(set(map(str, s))))
            for group, seen in levels.items():
                if len(seen) == 1 and table[b].astype(str).nunique() > 1:
                    out.append(f"{a} {group!r} is only seen at {b}={seen[0]}: its effect cannot be told apart "
                               f"from that {b}")
    return out
