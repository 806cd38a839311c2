"""Sections every report shares: the abstract, the mode line, distribution tables, the settings section."""

from __future__ import annotations

import json

from calib.reporting.tables import md_table, pct

__all__ = ["abstract_block", "mode_line", "settings_section", "dist_table"]


def abstract_block(lines: list[str]) -> list[str]:
    """A report's opening: exactly three lines generated from its results, as a quote block."""
    if len(lines) != 3:
        raise ValueError(f"an abstract has three lines, got {len(lines)}")
    return [*(f"> {line}  " for line in lines), ""]


def mode_line(r: dict) -> str:
    """One sentence on what is compared (mode, TPOT definition, phantom step)."""
    d = r.get("tpot_definition")
    what = "mean (E2E−TTFT)/(O−1)" if d == "itl" else "ΣE2E/ΣO, like GuideLLM"
    return (f"Mode **{r['mode']}**: predicted TPOT is the **{d}** definition ({what}), phantom last step "
            f"{'on' if r.get('phantom_last_step') else 'off'}; measured TPOT is GuideLLM's `time_per_output_token_ms`."
            " Errors are APEs of experiment means; MAPEs are means over experiments.")


def _text(v) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def settings_section(r: dict) -> list[str]:
    """The 'rerun exactly' section: sampler, seeds, trials, storage, then every setting as JSON."""
    s = r["settings"]
    lines = ["## Settings (to rerun exactly)", "",
             f"- sampler: {s.get('sampler')}",
             f"- seeds: {json.dumps(s.get('seeds', {'request_seed': s.get('request_seed')}), sort_keys=True)}",
             f"- trials: {_text(s.get('trials', 'exhaustive grid'))}",
             f"- storage: {s.get('storage')} (Optuna study names below; a rerun on the same storage resumes)",
             f"- rerun: `calib study run studies/{s.get('study_file')}`", "", "```json",
             json.dumps(s, indent=2, sort_keys=True), "```", ""]
    return lines


def dist_table(rows: list[tuple[str, dict]], as_pct: bool = True) -> str:
    """Distribution summaries (``distribution()`` dicts) as one table."""
    f = pct if as_pct else (lambda x: f"{x:.1f}")
    keys = ["mean", "std", "min", "p05", "p25", "median", "p75", "p95", "max"]
    return md_table(["quantity", *keys], [[name, *[f(d[k]) for k in keys]] for name, d in rows])
