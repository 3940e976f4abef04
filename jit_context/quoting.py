"""How an error message quotes what a client sent: its repr, cut short."""

from __future__ import annotations

from typing import Any

QUOTE_CHARS = 200  # an error message quotes at most this much of a value a client sent


def quote(value: Any) -> str:
    """repr of a client's value, cut to QUOTE_CHARS (a 400 KB value must not make a 400 KB error message)."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"
