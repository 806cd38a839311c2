"""Which prompt tokens of a loaded run the server could serve from its prefix cache.

vLLM caches full KV blocks of every prompt it has computed and serves a later
prompt's longest cached run of leading blocks (the engine keeps the cache and
evicts from it, :func:`calib.replay.engine.run_engine`).  What the replay must
know is which requests share which leading tokens.  A run says so in one of
three ways, tried in this order by the default mode ``"auto"``:

``groups``
    ``prefix_group`` labels on the requests: the requests of a label share a
    ``group_prompt_len``-token prefix.
``repeats``
    The run sends the same prompts over and over.  inference-perf's
    shared-prefix generator builds a fixed list of prompts and sends them in
    turn (request ``i`` gets prompt ``i mod P``); every shipped run shows it:
    the input length of request ``i`` equals that of request ``i - 100`` for
    98-99 % of the requests, and each length occurs a multiple of ``N / 100``
    times.  A repeat is the same prompt, so all of it is a shared prefix.
    :func:`repeat_period` finds ``P`` from the request indices and input
    lengths alone; a request is in the group of its slot ``index mod P`` and
    its length (a slot whose length changed is another prompt), and its whole
    prompt is the prefix.  A prompt's first occurrence finds nothing cached
    (what it shares with other prompts, a system prompt, is not modelled:
    that is at most ``P`` requests of a run).
``profile``
    The load generator's profile declares ``num_unique_system_prompts``
    system prompts of ``system_prompt_len`` tokens; requests are assigned to
    them round robin in arrival order (the assignment is not recorded).

``"none"`` turns the prefix cache off; naming a mode forces it (and fails when
the run does not support it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from calib.errors import DataError

__all__ = ["PREFIX_MODES", "REPEAT_MIN_SHARE", "repeat_period", "prefix_arrays"]

#: Prefix-cache assumptions of a loaded replay (module docstring).
PREFIX_MODES = ("auto", "groups", "repeats", "profile", "none")
#: Share of requests whose input length equals that of the request ``P`` earlier for ``P`` to be a period.
REPEAT_MIN_SHARE = 0.9
#: Fewest such request pairs a period needs (a short window says nothing).
REPEAT_MIN_PAIRS = 50
#: Longest period looked for.
REPEAT_MAX_PERIOD = 2000


def repeat_period(request_index: Sequence[int], input_tokens: Sequence[int]) -> int:
    """The smallest ``P`` such that request ``i`` and request ``i - P`` have the same input length.

    Same means for at least :data:`REPEAT_MIN_SHARE` of the pairs present
    (``request_index`` may have gaps, e.g. a windowed trace), over at least
    :data:`REPEAT_MIN_PAIRS` pairs; requests with no input are left out.
    Returns 0 when no period qualifies.

    Examples
    --------
    >>> repeat_period(range(300), [500, 510, 520] * 100)
    3
    >>> repeat_period(range(300), list(range(300)))
    0
    """
    idx = np.asarray(request_index, dtype=np.int64)
    inp = np.asarray(input_tokens, dtype=np.int64)
    if idx.size < 2 or idx.min() < 0:
        return 0
    slots = np.zeros(int(idx.max()) + 1, np.int64)  # 0: no request (or no input)
    slots[idx] = np.maximum(inp, 0)
    for p in range(1, min(REPEAT_MAX_PERIOD, slots.size - REPEAT_MIN_PAIRS) + 1):
        a, b = slots[:-p], slots[p:]
        both = (a > 0) & (b > 0)
        pairs = int(both.sum())
        if pairs >= REPEAT_MIN_PAIRS and int((a[both] == b[both]).sum()) >= REPEAT_MIN_SHARE * pairs:
            return p
    return 0


def prefix_arrays(mode: str, *, request_index, input_tokens, labels=None, group_prompt_len: int = 0,
                  shared_prompt_len: int = 0, shared_prompts: int = 0, source: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-request shared-prefix length and group (``-1``: none) under ``mode``, and where they came from.

    Parameters
    ----------
    mode : str
        One of :data:`PREFIX_MODES` (checked by the caller).
    request_index, input_tokens : array-like of int
        Per request, in arrival order.
    labels : array-like of str, optional
        ``prefix_group`` labels (``""``: none).
    group_prompt_len : int
        Prefix tokens shared by the requests of one label.
    shared_prompt_len, shared_prompts : int
        The profile's system prompts: their length and number.
    source : str, optional
        The run's file or folder, named in errors.

    Raises
    ------
    DataError
        A forced mode the run does not support.

    Examples
    --------
    >>> pre, grp, how = prefix_arrays("auto", request_index=range(200), input_tokens=[40, 50] * 100)
    >>> pre[:3].tolist(), grp[:3].tolist(), how
    ([40, 50, 40], [0, 1, 0], 'repeated prompts: 2 prompts sent in turn, each cached whole')
    """
    idx = np.asarray(request_index, dtype=np.int64)
    inp = np.asarray(input_tokens, dtype=np.int64)
    n = len(inp)
    labels = np.full(n, "", dtype=object) if labels is None else np.asarray(labels, dtype=object)
    has_labels = bool((labels != "").any())
    none = np.zeros(n, np.int64), np.full(n, -1, np.int64), "none (prefix caching off)"
    if mode == "none":
        return none
    if mode == "groups" or (mode == "auto" and has_labels):
        if not has_labels or group_prompt_len < 1:
            raise DataError("no prefix_group labels (or no prefix length) in the run", file=source,
                            field="prefix_group")
        codes = {g: i for i, g in enumerate(sorted(set(labels.tolist()) - {""}))}
        grp = np.array([codes.get(label, -1) for label in labels], np.int64)
        pre = np.where(grp >= 0, group_prompt_len, 0).astype(np.int64)
        return (np.minimum(pre, inp), grp,
                f"prefix_group labels ({len(codes)} groups of a {group_prompt_len}-token prefix)")
    if mode in ("auto", "repeats"):
        period = repeat_period(idx, inp)
        if period:
            keys = list(zip((idx % period).tolist(), inp.tolist()))
            codes = {k: i for i, k in enumerate(dict.fromkeys(keys))}
            grp = np.array([codes[k] for k in keys], np.int64)
            return inp.copy(), grp, f"repeated prompts: {period} prompts sent in turn, each cached whole"
        if mode == "repeats":
            raise DataError(f"no request repeats the input length of the one P earlier for "
                            f"{REPEAT_MIN_SHARE:.0%} of the requests, for any P <= {REPEAT_MAX_PERIOD}",
                            file=source, field="input_tokens")
    if shared_prompt_len > 0 and shared_prompts > 0:
        grp = np.arange(n, dtype=np.int64) % shared_prompts
        pre = np.minimum(np.full(n, shared_prompt_len, np.int64), inp)
        return pre, grp, (f"profile: {shared_prompts} system prompts of {shared_prompt_len} tokens, assigned "
                          "round robin (the run has no prefix_group labels and no repeated prompts)")
    if mode == "profile":
        raise DataError("the run declares no shared system prompt", file=source,
                        field="data.shared_prefix.system_prompt_len")
    return none
