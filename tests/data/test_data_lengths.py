"""Request lengths: the embedded reference draws and the NumPy sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calib.data import Workload, available_seeds, load_workloads, quantile_lengths, reference_lengths, sample_lengths
from calib.errors import DataError


def test_reference_lengths_embedded():
    assert available_seeds() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42]
    wls = load_workloads()
    for name, wl in wls.items():
        for seed in (42, 1, 10):
            a = reference_lengths(name, seed)
            assert a.dtype == np.int64 and a.shape == (wl.n_requests, 2)
            assert (a[:, 0] >= wl.prompt_min).all() and (a[:, 0] <= wl.prompt_max).all()
            assert (a[:, 1] >= wl.output_min).all() and (a[:, 1] <= wl.output_max).all()
    assert reference_lengths("chatsweep")[:2].tolist() == [[130, 212], [97, 246]]
    a = reference_lengths("codesweep")
    a[0, 0] = -1  # a copy: the cache is not modified
    assert reference_lengths("codesweep")[0, 0] != -1


def test_reference_lengths_match_source(shared):
    src = json.loads((shared / "hg1" / "reference_request_lengths.json").read_text())
    for seed, per_wl in src.items():
        for wl, pairs in per_wl.items():
            assert reference_lengths(wl, int(seed)).tolist() == pairs


def test_reference_lengths_unknown(builders):
    err = builders.expect_error(lambda: reference_lengths("chatsweep", seed=7777), "request_lengths.json", "seed", "42")
    assert "1, 2, 3" in str(err)
    builders.expect_error(lambda: reference_lengths("nope"), "request_lengths.json", "workload", "chatsweep, codesweep, summarization")
    builders.expect_error(lambda: reference_lengths("chatsweep", seed="42"), "request_lengths.json", "seed")


def test_reference_lengths_bad_file(tmp_path, builders):
    path = tmp_path / "request_lengths.json"
    path.write_text('{"42": {"w": [[1, 0]]}}')
    builders.expect_error(lambda: reference_lengths("w", path=path), "request_lengths.json", "42.w[0][1]", ">= 1")
    path.write_text('{"x": {}}')
    builders.expect_error(lambda: reference_lengths("w", path=tmp_path), "request_lengths.json", "seed")


def _wl(**kw) -> Workload:
    base = dict(name="w", n_requests=20, seed=42, prefix_tokens=0, prompt_mean=100.0, prompt_stdev=50.0,
                prompt_min=60, prompt_max=140, output_mean=10.0, output_stdev=0.0, output_min=5, output_max=5)  # fmt: skip
    base.update(kw)
    return Workload(**base)


def test_sample_lengths_rules():
    a = sample_lengths(_wl(), seed=3)
    assert a.shape == (20, 2) and a.dtype == np.int64
    assert a[:, 0].min() >= 60 and a[:, 0].max() <= 140
    assert (a[:, 1] == 5).all()  # min == max -> min
    assert np.array_equal(a, sample_lengths(_wl(), seed=3))
    assert not np.array_equal(a, sample_lengths(_wl(), seed=4))
    assert sample_lengths(_wl(), n=0).shape == (0, 2)
    # stdev 0: the mean, rounded half away from zero
    assert (sample_lengths(_wl(prompt_mean=100.5, prompt_stdev=0.0), n=3)[:, 0] == 101).all()
    with pytest.raises(DataError):
        sample_lengths(_wl(), n=-1)


def test_sample_lengths_distribution():
    wl = load_workloads()["chatsweep"]
    a = sample_lengths(wl, n=20000, seed=1)
    ref = reference_lengths("chatsweep", 42)
    assert abs(a[:, 0].mean() - 70) < 1.5 and abs(a[:, 1].mean() - 215) < 3
    assert a[:, 1].min() >= 1 and a[:, 1].max() <= 512
    assert abs(ref[:, 1].mean() - 215) < 40  # the reference draws come from the same law


def test_quantile_lengths_are_the_quantiles_in_the_sample_order():
    from statistics import NormalDist

    wl = load_workloads()["codesweep"]
    q, s = quantile_lengths(wl, seed=7), sample_lengths(wl, seed=7)
    assert q.shape == s.shape == (50, 2) and q.dtype == np.int64
    # the same requests are long and short as in the NumPy sample of that seed (ties aside)
    for col in (0, 1):
        shorter = s[:, None, col] < s[None, :, col]
        assert (q[:, None, col] <= q[None, :, col])[shorter].all()
    # the values are the clipped, rounded normal quantiles (k + 0.5) / n, whatever the seed
    z = np.array([NormalDist().inv_cdf((k + 0.5) / 50) for k in range(50)])
    want = np.sign(x := np.clip(28 + 60 * z, 6, 200)) * np.floor(np.abs(x) + 0.5)
    assert sorted(q[:, 1]) == sorted(want.astype(int)) == sorted(quantile_lengths(wl, seed=8)[:, 1])
    # no sampling noise: the mean is the clipped normal's (42.4 output tokens), where a 50-request draw strays
    assert abs(q[:, 1].mean() - 42.4) < 0.5
    assert (q[:, 1] >= 6).all() and (q[:, 1] <= 200).all()
    assert (quantile_lengths(_wl(), n=4)[:, 1] == 5).all()  # min == max -> min
    assert quantile_lengths(_wl(), n=0).shape == (0, 2)
    with pytest.raises(DataError):
        quantile_lengths(_wl(), n=-1)
