"""calib.replay.prefix: the repeat period of a run, and the per-request prefix arrays of each mode."""

from __future__ import annotations

import numpy as np
import pytest

from calib.errors import DataError
from calib.replay.batched import window_trace
from calib.replay.loaded import load_runs
from calib.replay.prefix import REPEAT_MIN_SHARE, prefix_arrays, repeat_period


def cycling(n, period, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(500, 620, period)
    inp = prompts[np.arange(n) % period]
    flip = rng.random(n) < noise
    inp[flip] = rng.integers(500, 620, int(flip.sum()))
    return np.arange(n), inp


@pytest.mark.parametrize("period", [1, 7, 100, 311])
def test_the_smallest_period_is_found_through_noise(period):
    idx, inp = cycling(4 * period + 200, period, noise=0.03)
    assert repeat_period(idx, inp) == period


def test_no_period_in_independent_lengths_nor_in_too_few_pairs():
    rng = np.random.default_rng(1)
    assert repeat_period(np.arange(5000), rng.integers(500, 620, 5000)) == 0
    idx, inp = cycling(60, 20)  # 40 pairs: too few to say
    assert repeat_period(idx, inp) == 0


def test_gaps_in_the_request_indices_keep_the_period():
    idx, inp = cycling(3000, 100)
    keep = (idx % 1000) < 300  # three windows of 300 requests
    assert repeat_period(idx[keep], inp[keep]) == 100


def test_requests_without_input_are_left_out():
    idx, inp = cycling(1000, 50)
    inp[::3] = 0
    assert repeat_period(idx, inp) == 50


def test_repeats_group_by_slot_and_length_and_cache_the_whole_prompt():
    idx, inp = cycling(400, 100)
    inp[250] += 1  # slot 50 sends another prompt once
    pre, grp, how = prefix_arrays("repeats", request_index=idx, input_tokens=inp)
    assert how.startswith("repeated prompts: 100 prompts")
    assert pre.tolist() == inp.tolist()
    assert grp[150] == grp[50] == grp[350] != grp[250]
    assert len(set(grp.tolist())) == 101


def test_auto_prefers_labels_then_repeats_then_the_profile():
    idx, inp = cycling(400, 100)
    labels = np.where(idx % 2 == 0, "a", "b")
    pre, grp, how = prefix_arrays("auto", request_index=idx, input_tokens=inp, labels=labels, group_prompt_len=64)
    assert how.startswith("prefix_group labels (2 groups") and set(pre.tolist()) == {64}
    _, _, how = prefix_arrays("auto", request_index=idx, input_tokens=inp, shared_prompt_len=100, shared_prompts=4)
    assert how.startswith("repeated prompts")
    rng = np.random.default_rng(2)
    fresh = rng.integers(500, 620, 400)
    pre, grp, how = prefix_arrays("auto", request_index=idx, input_tokens=fresh, shared_prompt_len=100,
                                  shared_prompts=4)
    assert how.startswith("profile: 4 system prompts") and grp[:5].tolist() == [0, 1, 2, 3, 0]
    assert set(pre.tolist()) == {100}
    pre, grp, how = prefix_arrays("auto", request_index=idx, input_tokens=fresh)
    assert how.startswith("none") and (grp == -1).all() and (pre == 0).all()
    _, grp, how = prefix_arrays("none", request_index=idx, input_tokens=inp, labels=labels, group_prompt_len=64)
    assert how.startswith("none") and (grp == -1).all()


@pytest.mark.parametrize("mode, field", [("repeats", "input_tokens"), ("groups", "prefix_group"),
                                         ("profile", "data.shared_prefix.system_prompt_len")])
def test_a_forced_mode_the_run_does_not_support_names_the_file_and_field(mode, field):
    rng = np.random.default_rng(3)
    with pytest.raises(DataError) as err:
        prefix_arrays(mode, request_index=np.arange(300), input_tokens=rng.integers(500, 620, 300), source="runs/x")
    assert err.value.field == field and "runs/x" in str(err.value)


def test_every_shipped_run_cycles_through_100_prompts_and_its_windows_keep_the_groups():
    """The evidence behind ``repeats``: in each shipped run the input length of request i equals that of
    request i - 100 for at least REPEAT_MIN_SHARE of the requests (97-100 % in fact), no shorter period.
    A 30 s window (too short to show the period in the reasoning runs) keeps the full run's groups."""
    runs = load_runs()
    assert len(runs) == 16
    for lr in runs:
        req = lr.trace.requests
        idx, inp = req["request_index"].to_numpy(), req["input_tokens"].to_numpy()
        assert repeat_period(idx, inp) == 100, lr.name
        both = (inp[100:] > 0) & (inp[:-100] > 0)
        assert np.mean(inp[100:][both] == inp[:-100][both]) >= max(REPEAT_MIN_SHARE, 0.97), lr.name
        full = lr.run.inputs()
        assert full.prefix_source.startswith("repeated prompts: 100 prompts"), lr.name
        win = lr.windowed(30.0).inputs()
        rows = np.searchsorted(idx, window_trace(lr.trace, 30.0).requests["request_index"].to_numpy())
        assert win.prefix_group.tolist() == full.prefix_group[rows].tolist(), lr.name
        assert win.prefix_tokens.tolist() == full.prefix_tokens[rows].tolist(), lr.name
        assert win.prefix_source == full.prefix_source
