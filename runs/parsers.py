"""The JSON parser of every API view (REST_FRAMEWORK's DEFAULT_PARSER_CLASSES, and the views
that name their parsers): one guard for every JSON body, not one per view."""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

# No body the API takes is more than a few levels deep (a plan: plan → tiers → tier → phases →
# phase → criteria). Python's json module recurses once per level, so `[` × 100,000 would raise
# RecursionError (a 500) before any view saw it; a body deeper than this is refused instead, and
# well before the interpreter's own limit, so the answer does not depend on how deep the stack
# already is.
MAX_JSON_DEPTH = 32
TOO_DEEP = f"JSON parse error - nested too deeply (more than {MAX_JSON_DEPTH} levels)"


def json_depth_exceeds(data: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit` (iterative: a deep value cannot recurse)."""
    stack = [(data, 1)] if isinstance(data, dict | list) else []
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser that answers 400 for a body nested past MAX_JSON_DEPTH."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(TOO_DEEP) from None
        if json_depth_exceeds(data, MAX_JSON_DEPTH):
            raise ParseError(TOO_DEEP)
        return data
