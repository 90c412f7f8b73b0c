"""Rows read by hand-written SQL (runs/authentication.py, runs/claiming.py), converted as the
ORM would convert them, so the objects made from them equal what a queryset returns."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connection

# (column index, converter, column) for each conversion the ORM applies to a row, in order.
Converters = tuple[tuple[int, Any, Any], ...]


def row_converters(fields: Iterable[Any]) -> Converters:
    """The converters for a row whose columns are these model fields, in this order (SQLite
    returns datetimes as text, say, and JSON arrives as text). Build once per statement."""
    converters = []
    for i, field in enumerate(fields):
        col = field.get_col(field.model._meta.db_table)
        for convert in (*connection.ops.get_db_converters(col), *col.get_db_converters(connection)):
            converters.append((i, convert, col))
    return tuple(converters)


def convert_row(row: Sequence[Any], converters: Converters) -> list[Any]:
    values = list(row)
    for i, convert, col in converters:
        values[i] = convert(values[i], col, connection)
    return values
