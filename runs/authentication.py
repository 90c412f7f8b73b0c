"""DRF token authentication in one prebuilt SQL statement, and the status poll's variant of it.

Every API request, and so every status poll, checks its token. DRF's TokenAuthentication does
it through the ORM (`Token.objects.select_related("user").get(key=…)`), which builds and
compiles a 14-column join per request: about 0.4 ms of Python per poll on this machine, more
than the rest of the poll (docs/benchmarks.md). This does the same check with the same answers
— an unknown key and an inactive user are refused, a deleted token fails at once (nothing is
cached) — from one SQL string built once from the models' metadata.

Under load a database round trip costs about 0.2 ms of CPU on the two cores (client, server,
context switches), as much again as DRF's whole request handling. So the status poll, which
needs the token's user and the run's updated_at, gets both from one statement (see
RunPollTokenAuthentication), and that statement also stands in for Django's per-request
connection health check (`first_read`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from django.contrib.auth import get_user_model
from django.db import InterfaceError, OperationalError, connection
from django.utils.translation import gettext as _
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.request import Request

from . import pollcache
from .models import Run
from .rawrows import Converters, convert_row, row_converters

T = TypeVar("T")


@functools.cache
def _query(*, with_run: bool) -> tuple[str, tuple[str, ...], tuple[str, ...], Converters]:
    """The token–user join (with_run: plus the run's updated_at as the last column, None for no
    such run), the user's attnames and the token's in the row's order, and the converters the
    ORM would apply to that row (SQLite returns datetimes as text, say)."""
    user_model = get_user_model()
    q = connection.ops.quote_name
    user_fields = tuple(user_model._meta.concrete_fields)
    token_fields = tuple(Token._meta.concrete_fields)
    columns = [
        *(f"u.{q(f.column)}" for f in user_fields),
        *(f"t.{q(f.column)}" for f in token_fields),
    ]
    if with_run:
        columns.append(
            f"(SELECT r.{q('updated_at')} FROM {q(Run._meta.db_table)} r "  # noqa: S608
            f"WHERE r.{q(Run._meta.pk.column)} = %s)"
        )
    user_fk = Token._meta.get_field("user").column
    key = Token._meta.get_field("key").column
    sql = (
        f"SELECT {', '.join(columns)} FROM {q(Token._meta.db_table)} t "  # noqa: S608 (_meta)
        f"JOIN {q(user_model._meta.db_table)} u ON u.{q(user_model._meta.pk.column)} = "
        f"t.{q(user_fk)} WHERE t.{q(key)} = %s"
    )
    return (
        sql,
        tuple(f.attname for f in user_fields),
        tuple(f.attname for f in token_fields),
        row_converters((*user_fields, *token_fields)),
    )


def first_read(read: Callable[[], T]) -> T:
    """Run `read` (read-only SQL) as the request's first statement, instead of Django's health
    check: with CONN_HEALTH_CHECKS a reused connection is first probed with `SELECT 1`, a round
    trip of its own. Here the read itself is the probe: if the connection turns out to be
    broken (the database restarted since the last request), it is closed, and the read runs
    again on a new one — what the health check would have led to, without its round trip when
    the connection is fine. Anything else (and a second failure) is raised as usual."""
    # django-stubs 5.2 does not declare the CONN_HEALTH_CHECKS flags (Django 4.1+) on
    # BaseDatabaseWrapper, hence the targeted ignores.
    probing = (
        connection.connection is not None
        and connection.health_check_enabled  # type: ignore[attr-defined]
        and not connection.health_check_done  # type: ignore[attr-defined]
        and not connection.in_atomic_block
    )
    if not probing:
        return read()
    connection.health_check_done = True  # type: ignore[attr-defined]
    try:
        return read()
    except (OperationalError, InterfaceError):
        if connection.is_usable():
            raise  # the read failed, not the connection
        connection.close()
        return read()


class FastTokenAuthentication(TokenAuthentication):
    """TokenAuthentication (keyword `Token`) with the lookup as one prebuilt statement."""

    def authenticate_credentials(self, key: str) -> tuple[Any, Token]:
        if not pollcache.LISTENER.ready():
            return self._user_and_token(self._fetch(key, with_run=None))
        # The row, not the objects: each request gets its own user (its permission cache
        # must not outlive the request).
        row = pollcache.auth_row(key)
        if row is None:
            stamp = pollcache.stamp()
            row = self._fetch(key, with_run=None)
            pollcache.AUTH.put(key, stamp, row)
        return self._user_and_token(row)

    def _fetch(self, key: str, *, with_run: int | None) -> list[Any]:
        sql, _users, _tokens, converters = _query(with_run=with_run is not None)
        params = (key,) if with_run is None else (with_run, key)

        def read() -> tuple[Any, ...] | None:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchone()

        fetched = first_read(read)
        if fetched is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        return convert_row(fetched, converters)

    def _user_and_token(self, row: list[Any]) -> tuple[Any, Token]:
        _sql, user_names, token_names, _converters = _query(with_run=False)
        # from_db marks the objects as loaded from the database, as a queryset would.
        user = get_user_model().from_db(connection.alias, user_names, row[: len(user_names)])
        if not user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        end = len(user_names) + len(token_names)
        token = Token.from_db(connection.alias, token_names, row[len(user_names) : end])
        token.user = user  # as select_related would: request.auth.user costs no query
        return user, token


RUN_UPDATED_AT = "autopack_run_updated_at"  # attribute of the request, see below


class RunPollTokenAuthentication(FastTokenAuthentication):
    """For views under a `run_id` URL: reads the run's updated_at in the token's statement and
    leaves it on the request (RUN_UPDATED_AT; None for no such run). A view reads it with
    `polled_run_updated_at`; it is set only when this authenticator authenticated the request,
    before the permission checks, and says nothing about the user's rights."""

    def authenticate(self, request: Request) -> tuple[Any, Token] | None:
        self._run_id = int(request.parser_context["kwargs"]["run_id"])
        self._request = request
        return super().authenticate(request)

    def authenticate_credentials(self, key: str) -> tuple[Any, Token]:
        if pollcache.LISTENER.ready():
            return super().authenticate_credentials(key)  # the view reads the status cache
        row = self._fetch(key, with_run=self._run_id)
        user_and_token = self._user_and_token(row)
        setattr(self._request, RUN_UPDATED_AT, row[-1])
        return user_and_token


_MISSING = object()


def polled_run_updated_at(request: Request, read: Callable[[], Any]) -> Any:
    """The run's updated_at as RunPollTokenAuthentication read it, else from `read()`."""
    value = getattr(request, RUN_UPDATED_AT, _MISSING)
    return read() if value is _MISSING else value
