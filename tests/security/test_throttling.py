"""Guessing is slow: the admin login and POST /api/token/ lock a username out (per client
address) after AUTOPACK_LOGIN_FAILURE_LIMIT failures, the token endpoint is throttled per
address, and every API user has a request rate."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.security.conftest import make_user, token_client

pytestmark = pytest.mark.django_db
PASSWORD = "a-long-correct-horse-password"


@pytest.fixture(autouse=True)
def fast_hashing(settings: Any) -> None:
    # Dozens of password checks here; the production hasher makes each take a third of a second.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def staff() -> User:
    return make_user("alice", password=PASSWORD)


def admin_login(client: Client, username: str, password: str) -> Any:
    return client.post("/admin/login/?next=/admin/", {"username": username, "password": password})


def test_the_admin_login_locks_a_username_out_after_repeated_failures(staff: User) -> None:
    client = Client()
    limit = settings.AXES_FAILURE_LIMIT
    for _ in range(limit - 1):
        assert admin_login(client, "alice", "wrong").status_code == 200  # the form again
    locked = admin_login(client, "alice", "wrong")
    assert locked.status_code == 429
    # Now even the right password is refused, and no session is made.
    right = admin_login(client, "alice", PASSWORD)
    assert right.status_code == 429
    assert "_auth_user_id" not in client.session
    # Another person's login from the same address is not locked with it.
    make_user("bob", password=PASSWORD)
    assert admin_login(Client(), "bob", PASSWORD).status_code == 302
    # An operator lifts the lockout with django-axes' command.
    call_command("axes_reset_username", "alice", stdout=io.StringIO())
    assert admin_login(client, "alice", PASSWORD).status_code == 302


def test_a_client_sent_x_forwarded_for_does_not_dodge_the_lockout(staff: User) -> None:
    limit = settings.AXES_FAILURE_LIMIT
    for i in range(limit):
        Client(HTTP_X_FORWARDED_FOR=f"10.0.0.{i}").post(
            "/admin/login/", {"username": "alice", "password": "wrong"}
        )
    spoofed = Client(HTTP_X_FORWARDED_FOR="10.9.9.9")
    assert admin_login(spoofed, "alice", PASSWORD).status_code == 429


def obtain(client: APIClient, username: str, password: str) -> Any:
    return client.post("/api/token/", {"username": username, "password": password}, format="json")


def test_the_token_endpoint_gives_a_staff_user_their_token(staff: User) -> None:
    response = obtain(APIClient(), "alice", PASSWORD)
    assert response.status_code == 200
    key = response.json()["token"]
    assert key == Token.objects.get(user=staff).key
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert api.get("/runs/").status_code == 200


def test_the_token_endpoint_refuses_wrong_passwords_and_users_who_are_not_staff(
    staff: User,
) -> None:
    make_user("visitor", staff=False, password=PASSWORD)
    for username, password in (("alice", "wrong"), ("visitor", PASSWORD), ("nobody", "x")):
        response = obtain(APIClient(), username, password)
        assert response.status_code == 400
        assert "Unable to log in" in response.json()["non_field_errors"][0]
    assert not Token.objects.exists()


def test_the_token_endpoint_locks_a_username_out_after_repeated_failures(staff: User) -> None:
    client = APIClient()
    for _ in range(settings.AXES_FAILURE_LIMIT):
        obtain(client, "alice", "wrong")
    locked = obtain(client, "alice", PASSWORD)
    assert locked.status_code == 429
    assert "locked" in locked.json()["detail"]  # JSON, as the schema documents
    assert not Token.objects.exists()


def test_the_token_endpoint_is_throttled_per_address_whatever_the_headers(
    staff: User, settings: Any
) -> None:
    rates = {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "token": "3/minute"}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
    for i in range(3):
        client = APIClient(HTTP_X_FORWARDED_FOR=f"10.0.0.{i}")
        assert obtain(client, f"nobody{i}", "x").status_code == 400
    throttled = obtain(APIClient(HTTP_X_FORWARDED_FOR="10.1.1.1"), "alice", PASSWORD)
    assert throttled.status_code == 429
    assert int(throttled["Retry-After"]) > 0
    assert not Token.objects.exists()


def test_the_default_rates_throttle_the_token_endpoint(staff: User) -> None:
    # The shipped setting, not a test override: AUTOPACK_TOKEN_RATE defaults to 10/minute.
    codes = [obtain(APIClient(), f"nobody{i}", "x").status_code for i in range(11)]
    assert codes[:10] == [400] * 10 and codes[10] == 429


def _user_rate(settings: Any, rate: str) -> None:
    rates = {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": rate}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}


def _start_of_a_window(seconds: float, margin: float) -> None:
    """Wait, if need be, so that the next `margin` seconds lie in one counting window."""
    into = time.time() % seconds
    if seconds - into < margin:
        time.sleep(seconds - into + 0.01)


def test_an_api_user_past_their_rate_gets_429(operator: User, settings: Any) -> None:
    _user_rate(settings, "5/hour")
    _start_of_a_window(3600, margin=30)
    api = token_client(operator)
    assert [api.get("/runs/").status_code for _ in range(5)] == [200] * 5
    throttled = api.get("/dashboard/usage")
    assert throttled.status_code == 429 and int(throttled["Retry-After"]) > 0
    # Another user has their own count.
    assert token_client(make_user("other")).get("/runs/").status_code == 200


def test_the_api_rate_counts_afresh_in_the_next_window(operator: User, settings: Any) -> None:
    _user_rate(settings, "3/second")
    _start_of_a_window(1, margin=1)  # the three requests below take a few milliseconds
    api = token_client(operator)
    assert [api.get("/runs/").status_code for _ in range(3)] == [200] * 3
    throttled = api.get("/runs/")
    assert throttled.status_code == 429 and throttled["Retry-After"] == "1"
    _start_of_a_window(1, margin=1)
    assert api.get("/runs/").status_code == 200
