"""Token authentication of the API, pinned through HTTP: the status poll
(runs.authentication.RunPollTokenAuthentication) and the other API views (DRF's
TokenAuthentication).

Each contract is checked twice: `cached` (outside a transaction: the status poll's caches,
kept exact by PostgreSQL notifications, answer) and `database` (inside the test's transaction:
every request reads the database). A revoked token, an inactive user or a paused run must show
on the very next request either way. tests/runs/test_pollcache.py has the cache's own tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from runs import pollcache, services
from runs.models import Run
from runs.plans import parse_plan_bytes
from runs.states import RunState
from tests.factories import set_provider_keys

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
NOT_PROVIDED = "Authentication credentials were not provided."


@pytest.fixture(
    params=[
        pytest.param("cached", marks=pytest.mark.django_db(transaction=True)),
        pytest.param("database", marks=pytest.mark.django_db),
    ]
)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    set_provider_keys(monkeypatch)
    cache.clear()  # throttle counters
    # The mode is what the test thinks it is.
    assert pollcache.LISTENER.ready() is (request.param == "cached")
    return str(request.param)


@pytest.fixture
def user(mode: str) -> User:
    user = User.objects.create_user("poller", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="control_run"))
    return user


@pytest.fixture
def token(user: User) -> str:
    return Token.objects.create(user=user).key


@pytest.fixture
def run(mode: str) -> Run:
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)
    return run


def client(header: str | None) -> APIClient:
    api = APIClient()
    if header is not None:
        api.credentials(HTTP_AUTHORIZATION=header)
    return api


def status_path(run: Run) -> str:
    return f"/dashboard/runs/{run.pk}/status"


PATHS = ["status", "runs"]


def path_of(which: str, run: Run) -> str:
    return status_path(run) if which == "status" else "/runs/"


def refused(response: object, detail: str) -> None:
    assert response.status_code == 401, response.content  # type: ignore[attr-defined]
    assert response["WWW-Authenticate"] == "Token"  # type: ignore[index]
    assert response.json() == {"detail": detail}  # type: ignore[attr-defined]


@pytest.mark.parametrize("which", PATHS)
def test_a_valid_token_is_answered(token: str, run: Run, which: str) -> None:
    response = client(f"Token {token}").get(path_of(which, run))
    assert response.status_code == 200
    if which == "status":
        assert response.json()["state"] == RunState.RUNNING
    else:
        assert [r["run_id"] for r in response.json()["results"]] == [run.pk]


@pytest.mark.parametrize("which", PATHS)
def test_a_deleted_token_is_refused_on_the_very_next_request(
    user: User, token: str, run: Run, which: str
) -> None:
    path = path_of(which, run)
    for _ in range(5):  # a race would show in some of these
        assert client(f"Token {token}").get(path).status_code == 200
        Token.objects.filter(key=token).delete()
        refused(client(f"Token {token}").get(path), "Invalid token.")
        token = Token.objects.create(user=user).key
        assert client(f"Token {token}").get(path).status_code == 200


@pytest.mark.parametrize("which", PATHS)
def test_an_inactive_users_token_is_refused_and_accepted_again_once_active(
    user: User, token: str, run: Run, which: str
) -> None:
    path = path_of(which, run)
    assert client(f"Token {token}").get(path).status_code == 200
    User.objects.filter(pk=user.pk).update(is_active=False)
    refused(client(f"Token {token}").get(path), "User inactive or deleted.")
    User.objects.filter(pk=user.pk).update(is_active=True)
    assert client(f"Token {token}").get(path).status_code == 200


@pytest.mark.parametrize("which", PATHS)
def test_a_user_no_longer_staff_is_authenticated_but_refused_403(
    user: User, token: str, run: Run, which: str
) -> None:
    path = path_of(which, run)
    assert client(f"Token {token}").get(path).status_code == 200
    User.objects.filter(pk=user.pk).update(is_staff=False)
    assert client(f"Token {token}").get(path).status_code == 403


def test_a_permission_taken_away_is_missing_on_the_very_next_request(
    user: User, token: str, run: Run
) -> None:
    """Each request gets its own user: a permission cache does not outlive its request."""
    api = client(f"Token {token}")
    assert api.post(f"/runs/{run.pk}/pause").status_code == 200
    assert api.post(f"/runs/{run.pk}/resume").status_code == 200
    user.user_permissions.clear()
    assert api.post(f"/runs/{run.pk}/pause").status_code == 403
    assert Run.objects.get(pk=run.pk).state == RunState.RUNNING


@pytest.mark.parametrize("which", PATHS)
@pytest.mark.parametrize(
    ("header", "detail"),
    [
        (None, NOT_PROVIDED),
        ("", NOT_PROVIDED),
        ("Bearer {token}", NOT_PROVIDED),  # another scheme is not this one's to judge
        ("Token", "Invalid token header. No credentials provided."),
        ("Token {token} extra", "Invalid token header. Token string should not contain spaces."),
        (
            "Token caf\xe9",
            "Invalid token header. Token string should not contain invalid characters.",
        ),
        ("Token 0123456789abcdef0123456789abcdef01234567", "Invalid token."),
    ],
    ids=["none", "empty", "bearer", "no-key", "spaces", "not-utf8", "unknown-key"],
)
def test_a_missing_or_malformed_header_is_401(
    token: str, run: Run, which: str, header: str | None, detail: str
) -> None:
    sent = None if header is None else header.format(token=token)
    refused(client(sent).get(path_of(which, run)), detail)


def test_the_keyword_is_not_case_sensitive(token: str, run: Run) -> None:
    assert client(f"token {token}").get(status_path(run)).status_code == 200


def test_the_status_of_an_unknown_run_is_404_for_a_valid_token_and_401_for_a_deleted_one(
    token: str, run: Run
) -> None:
    unknown = f"/dashboard/runs/{run.pk + 1000}/status"
    assert client(f"Token {token}").get(unknown).status_code == 404
    Token.objects.filter(key=token).delete()
    refused(client(f"Token {token}").get(unknown), "Invalid token.")


def test_a_run_paused_through_the_api_shows_paused_on_the_very_next_poll(
    token: str, run: Run
) -> None:
    api = client(f"Token {token}")
    for _ in range(3):
        assert api.get(status_path(run)).json()["state"] == RunState.RUNNING
        assert api.post(f"/runs/{run.pk}/pause").status_code == 200
        assert api.get(status_path(run)).json()["state"] == RunState.PAUSED
        assert api.post(f"/runs/{run.pk}/resume").status_code == 200
    assert api.post(f"/runs/{run.pk}/cancel").status_code == 200
    assert api.get(status_path(run)).json()["state"] == RunState.STOPPED


def test_a_staff_session_without_a_token_may_poll_the_status(user: User, run: Run) -> None:
    api = APIClient()
    assert api.get(status_path(run)).status_code == 401
    api.force_login(user)
    assert api.get(status_path(run)).json()["state"] == RunState.RUNNING
