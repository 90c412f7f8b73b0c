"""The status poll's authentication: DRF's token check, answered from the process's memory
while runs/pollcache.py keeps it exact, else in one statement with the polled run's updated_at
(the status cache's key).

Every other API view uses DRF's TokenAuthentication as it is. The status poll is the one
request made thousands of times a minute, and there DRF's lookup (an ORM join compiled on
every request) plus the ORM's read of the run's updated_at cost more than the rest of the view:
`make bench` measures the plain design beside this one (docs/benchmarks.md). This class answers
exactly as TokenAuthentication does (an unknown key or an inactive user is refused; a revoked
token fails on the next request), through public APIs only: `Manager.raw()` builds the user and
converts its columns as a queryset would, on every database.
"""

from __future__ import annotations

import functools
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection
from django.utils.translation import gettext as _
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.request import Request

from . import pollcache
from .models import Run

MISSING = object()


@functools.cache
def _statement() -> str:
    """The token's user (every column) and the run's updated_at (NULL for no such run);
    parameters: the run's id, the token's key."""
    user_model = get_user_model()
    q = connection.ops.quote_name
    users, user_pk = q(user_model._meta.db_table), q(user_model._meta.pk.column)
    tokens, token_user = q(Token._meta.db_table), q(Token._meta.get_field("user").column)
    token_key = q(Token._meta.get_field("key").column)
    runs, run_pk = q(Run._meta.db_table), q(Run._meta.pk.column)
    updated_at = q(Run._meta.get_field("updated_at").column)
    return (
        f"SELECT u.*, (SELECT r.{updated_at} FROM {runs} r WHERE r.{run_pk} = %s) "  # noqa: S608 (names from _meta)
        f"AS run_updated_at FROM {tokens} t JOIN {users} u ON u.{user_pk} = t.{token_user} "
        f"WHERE t.{token_key} = %s"
    )


class RunPollTokenAuthentication(TokenAuthentication):
    """TokenAuthentication for views under a `run_id` URL that also reads the run's updated_at
    in the token's statement; the view finds it with `polled_run_updated_at`. It says nothing
    about the user's rights: the permission checks come after, as for any view."""

    def authenticate(self, request: Request) -> tuple[Any, Token] | None:
        self._run_id = int(request.parser_context["kwargs"]["run_id"])
        return super().authenticate(request)

    def authenticate_credentials(self, key: str) -> tuple[Any, Token]:
        user_model = get_user_model()
        names = [f.attname for f in user_model._meta.concrete_fields]
        if pollcache.LISTENER.ready():
            # The user's values, not the user: each request gets its own instance (its
            # permission cache must not outlive the request). The view reads the status from
            # memory too, so the run's updated_at is not needed.
            values = pollcache.auth_row(key)
            if values is None:
                stamp = pollcache.stamp()
                read = self._read(key)
                values = [getattr(read, name) for name in names]
                pollcache.AUTH.put(key, stamp, values)
            user = user_model.from_db(connection.alias, names, values)
            updated_at = MISSING
        else:
            user = self._read(key)
            updated_at = user.run_updated_at
        if not user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        # As loaded from the database (its other columns deferred), with its user, as DRF's
        # select_related lookup returns it.
        token = Token.from_db(connection.alias, ["key", "user_id"], [key, user.pk])
        token.user = user
        if updated_at is not MISSING:
            token.run_updated_at = updated_at  # type: ignore[attr-defined]
        return user, token

    def _read(self, key: str) -> Any:
        found = list(get_user_model().objects.raw(_statement(), [self._run_id, key]))
        if not found:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        return found[0]


def polled_run_updated_at(request: Request) -> Any:
    """The run's updated_at as RunPollTokenAuthentication read it (None for no such run), or
    MISSING when another authenticator (the browser's session) authenticated the request."""
    return getattr(request.auth, "run_updated_at", MISSING)
