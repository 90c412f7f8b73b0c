"""Shared set-up of the security suite: users by role, clients by authentication, and provider
keys with values unique enough to grep every log, page and answer for."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from routing.router import router
from runs import services
from runs.models import Run
from runs.plans import parse_plan_bytes

# The real `manage.py mcp_server --http` subprocess, shared with the MCP tests.
from tests.runs.test_mcp import http_url  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "plan.yaml"
# Values that occur nowhere else, so finding one anywhere means it leaked.
SECRET_KEYS = {
    "OPENAI_API_KEY": "sk-sec-openai-7f3a9c1e5b",
    "ANTHROPIC_API_KEY": "sk-ant-sec-2d8e4f6a0c",
    "GEMINI_API_KEY": "AIza-sec-gemini-9b1d3f5e7a",
    "GLM_API_KEY": "glm-sec-4c6e8a0b2d",
}


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in SECRET_KEYS.items():
        monkeypatch.setenv(name, value)
    router.invalidate()
    return SECRET_KEYS


@pytest.fixture(autouse=True)
def fresh_throttles() -> None:
    # Throttle counters live in the cache; each test starts with none.
    cache.clear()


def make_user(username: str, *perms: str, staff: bool = True, password: str = "") -> User:
    user = User.objects.create_user(username, password=password or None, is_staff=staff)
    user.user_permissions.add(*(Permission.objects.get(codename=p) for p in perms))
    return user


READ_ONLY_PERMS = (
    "view_run",
    "view_phase",
    "view_modelroute",
    "view_providerquota",
    "view_humannote",
)


@pytest.fixture
def operator(db: None) -> User:
    return make_user("operator", "control_run", "override_model")


@pytest.fixture
def reader(db: None) -> User:
    """Staff who may look at everything and change nothing."""
    return make_user("reader", *READ_ONLY_PERMS)


def token_client(user: User) -> APIClient:
    token, _ = Token.objects.get_or_create(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def session_client(user: User, *, enforce_csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=enforce_csrf)
    client.force_login(user)
    return client


def new_run(*, start: bool = False) -> Run:
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    if start:
        services.run_start(run_id=run.pk)
        run.refresh_from_db()
    return run
