"""Filters for the words a person reads on the dashboard."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.filter
def thousands(value: Any) -> str:
    """12345678 → "12,345,678": a whole number grouped by thousands, whatever the locale
    settings (the page is in English); anything else is shown as it is."""
    if isinstance(value, bool):
        return str(value)
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return "" if value is None else str(value)
