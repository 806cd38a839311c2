"""Markdown table helpers."""

from __future__ import annotations

__all__ = ["md_table", "pct"]


def pct(x) -> str:
    """A fraction as a percentage with one decimal (``0.139`` -> ``13.9 %``)."""
    if x is None or x != x:
        return "n/a"
    return f"{100 * x:.1f} %"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
