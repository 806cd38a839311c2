"""Typed results of the study kinds: one module per kind, checked by the runner before results are written."""
