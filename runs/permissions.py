"""API permissions: staff may read; controlling runs and changing models need a permission a
person grants in the admin (runs.control_run, routing.override_model). Also the login lockout
and the API's throttles."""

from __future__ import annotations

from typing import Any

from axes.backends import AxesStandaloneBackend
from axes.helpers import get_lockout_message
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import AnonRateThrottle, UserRateThrottle

from usage.vocabulary import CONTROL_RUN, OVERRIDE_MODEL, RECORD_USAGE


class IsStaffReader(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.is_authenticated and request.user.is_staff)


def requires(perm: str) -> type[BasePermission]:
    class HasPermission(BasePermission):
        message = f"You need the '{perm}' permission for this."

        def has_permission(self, request: Request, view: Any) -> bool:
            user = request.user
            return bool(user and user.is_authenticated and user.is_staff and user.has_perm(perm))

    HasPermission.__name__ = f"Has_{perm.replace('.', '_')}"
    return HasPermission


CanControlRuns = requires(CONTROL_RUN)
CanOverrideModels = requires(OVERRIDE_MODEL)


class CanRecordUsage(BasePermission):
    """POST /usage/events: usage.record_usage, without staff status. An agent's token should
    be able to report its calls and do nothing else (read no run, see no page)."""

    message = f"You need the '{RECORD_USAGE}' permission for this."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.has_perm(RECORD_USAGE))


class LoginLockoutBackend(AxesStandaloneBackend):
    """django-axes' lockout check for logins that come with a request (the admin login form,
    POST /api/token/). A login without one (a shell, the test client's `login()`) has no client
    address to count failures against, so it is left to the next backend instead of failing."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> None:
        if request is None:
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None, credentials: Any = None
) -> HttpResponse:
    """django-axes' answer to a locked-out login (AXES_LOCKOUT_CALLABLE): JSON where the login
    was an API call (POST /api/token/, documented as {"detail": ...}), text on the admin form."""
    message = get_lockout_message()
    status = settings.AXES_HTTP_RESPONSE_CODE
    content_type = original_response.get("Content-Type", "") if original_response else ""
    if content_type.startswith("application/json"):
        return JsonResponse({"detail": message}, status=status)
    return HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")


class _RateFromSettings:
    # DRF copies DEFAULT_THROTTLE_RATES into a class attribute at import; read the setting per
    # request instead, so a changed setting takes effect without a restart.
    scope: str | None

    def get_rate(self) -> str | None:
        # drf-stubs type the rates as numbers; DRF's settings hold strings like "600/minute".
        rate = api_settings.DEFAULT_THROTTLE_RATES.get(self.scope or "")
        return rate if isinstance(rate, str) else None


class ApiUserThrottle(_RateFromSettings, UserRateThrottle):
    """Every API call of an authenticated user counts against AUTOPACK_API_RATE, in fixed
    windows of the rate's period (a minute for `600/minute`): one cache increment per request.

    DRF's own throttle keeps the time of every request of the last period in one cached list
    that is read, copied and written back on each request: 600 entries at the default rate,
    and its cost grows with the rate, which made a lifted rate cost more than the status poll
    itself (docs/benchmarks.md). A fixed window counts in constant time; the price is that a
    burst straddling two windows can reach twice the rate for a moment."""

    # Set by SimpleRateThrottle.__init__ from the rate (parse_rate); not declared by drf-stubs.
    num_requests: int
    duration: int

    def allow_request(self, request: Request, view: Any) -> bool:
        if self.rate is None:
            return True
        ident = self.get_cache_key(request, view)
        if ident is None:
            return True
        self.now = self.timer()
        window = int(self.now // self.duration)
        self.window_ends = (window + 1) * self.duration
        key = f"{ident}:{window}"
        try:
            count = self.cache.incr(key)
        except ValueError:  # the window's first request (or its key expired)
            # add() is atomic: of two first requests in two processes one creates the key
            # and the other counts on it.
            count = 1 if self.cache.add(key, 1, self.duration + 1) else self.cache.incr(key)
        return count <= self.num_requests

    def wait(self) -> float:
        return max(self.window_ends - self.now, 1.0)


class TokenObtainThrottle(_RateFromSettings, AnonRateThrottle):
    """POST /api/token/ counts per client address against AUTOPACK_TOKEN_RATE."""

    scope = "token"

    def get_cache_key(self, request: Request, view: Any) -> str:
        # Per address whoever asks: sending some credentials must not skip the count.
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}
