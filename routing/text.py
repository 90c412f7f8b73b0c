"""Text PostgreSQL can store, and names that read as what they are (issue 12, items 1 and 8).

PostgreSQL refuses a NUL in `text` and in `jsonb` strings, and a lone surrogate (U+D800-U+DFFF
on its own: JSON and YAML escapes can produce one) is not UTF-8, so psycopg cannot even send it.
Either would turn an insert into a 500. What a person or a client sends is refused here, with
the problem in words (each caller prefixes the field); what a model or a provider sends is not
ours to refuse, so `storable` replaces it with U+FFFD where it enters (routing/calls.py).

Names (plans, tiers, phases, workspaces, mapping keys) are also shown on pages, phone screens
and in prompts: a right-to-left override or a zero-width character makes one read as something
else ("invoice\u202egpj.exe"), so names allow no control or format characters at all.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TypeGuard

REPLACEMENT = "\ufffd"
# Any surrogate code point in a Python str is a lone one: a valid pair is decoded as a single
# code point by every decoder we use (UTF-8, json, yaml).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


# A task category (a plan's phases, mapping rows, critical categories): a lower-case identifier.
# Always matched whole (fullmatch): with re.match and "$", "ui\n" would pass.
CATEGORY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def is_category(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and CATEGORY_RE.fullmatch(value) is not None


def _code(char: str) -> str:
    return f"U+{ord(char):04X}"


def text_problem(value: str) -> str | None:
    """Why PostgreSQL cannot store this text, or None."""
    match = _UNSTORABLE.search(value)
    if match is None:
        return None
    char = match.group()
    if char == "\x00":
        return "contains a NUL character (U+0000), which cannot be stored"
    return f"contains a lone surrogate ({_code(char)}), which is not valid Unicode text"


def name_problem(value: str) -> str | None:
    """Why this cannot be a name (shown as a label everywhere), or None."""
    problem = text_problem(value)
    if problem is not None:
        return problem
    for char in value:
        category = unicodedata.category(char)
        if category == "Cc":  # tab and newline included: a name is one line
            return f"contains a control character ({_code(char)})"
        if category == "Cf":  # bidi embeddings, overrides and isolates, zero-width, BOM, ...
            return f"contains an invisible or direction-changing character ({_code(char)})"
    return None


def storable(value: str) -> str:
    """The text with every NUL and lone surrogate replaced by U+FFFD (for text we must keep,
    such as a model's reply, rather than refuse)."""
    return _UNSTORABLE.sub(REPLACEMENT, value)
