"""The dashboard's pages and their one tick (`/dashboard/live`): each page renders its panels,
and one request refreshes all of them (htmx out-of-band swaps) at a query cost that does not
grow with the run."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from django.test import Client

from runs import services
from tests.factories import set_provider_keys
from tests.runs.test_dashboard import make_run, queries_for, router_caches_held  # noqa: F401

pytestmark = pytest.mark.django_db

# The panels a tick answers with, by page: each must also be on the page it refreshes.
PANELS = {
    "run": [
        "live",
        "provider-badges",
        "run-picker",
        "progress",
        "mapping",
        "guards",
        "note-list",
        "chat-context",
    ],
    "runs": ["live", "provider-badges", "runs-table"],
    "usage": ["live", "provider-badges", "usage"],
    "models": ["live", "provider-badges", "mapping"],
    "guards": ["live", "provider-badges", "guards"],
}
PAGE_URLS = {
    "run": "/dashboard/?run={run}",
    "runs": "/dashboard/runs/",
    "usage": "/dashboard/caps/",
    "models": "/dashboard/routing/",
    "guards": "/dashboard/guards/",
}


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    set_provider_keys(monkeypatch)


@pytest.fixture
def operator() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    return client


def oob_ids(html: str) -> list[str]:
    """The ids of the elements a tick swaps in (those marked hx-swap-oob)."""
    tags = re.findall(r"<[a-z]+\b[^>]*>", html)
    return [
        re.search(r'\bid="([^"]+)"', tag).group(1)  # type: ignore[union-attr]
        for tag in tags
        if 'hx-swap-oob="true"' in tag
    ]


def tick(client: Client, page: str, run: int | None = None) -> str:
    url = f"/dashboard/live?page={page}" + (f"&run={run}" if run else "")
    response = client.get(url, headers={"HX-Request": "true"})
    assert response.status_code == 200, response.content[:300]
    return response.content.decode()


@pytest.mark.parametrize("page", list(PANELS))
def test_each_page_shows_its_panels_and_its_tick_refreshes_every_one(
    operator: Client, page: str
) -> None:
    run = make_run(10, finished=3, events_per_phase=1)
    html = operator.get(PAGE_URLS[page].format(run=run.pk)).content.decode()
    for panel in PANELS[page]:
        assert f'id="{panel}"' in html, (page, panel)
    # The navigation names every page and marks this one.
    assert re.search(r'aria-current="page"', html)
    for url in (
        "/dashboard/runs/",
        "/dashboard/caps/",
        "/dashboard/routing/",
        "/dashboard/guards/",
    ):
        assert f'href="{url}"' in html
    swapped = oob_ids(tick(operator, page, run.pk if page == "run" else None))
    assert sorted(swapped) == sorted(PANELS[page])


def test_a_tick_follows_the_run_in_every_panel(operator: Client) -> None:
    run = make_run(10, finished=3, events_per_phase=1)
    before = tick(operator, "run", run.pk)
    assert 'hx-trigger="every 2s"' in before
    assert "Running" in before
    services.run_pause(run_id=run.pk)
    paused = tick(operator, "run", run.pk)
    assert 'data-state="paused"' in paused and 'hx-trigger="every 2s"' in paused
    services.run_stop(run_id=run.pk)
    after = tick(operator, "run", run.pk)
    # The progress card, the run picker and the chat context all say it stopped.
    progress = after[after.index('id="progress"') : after.index('id="mapping"')]
    assert "Stopped" in progress
    picker = after[
        after.index('id="run-picker"') : after.index("</form>", after.index('id="run-picker"'))
    ]
    assert f"#{run.pk} " in picker and "Stopped" in picker
    chat = after[after.index('id="chat-context"') :]
    assert "State: **Stopped**" in chat
    # A paused run keeps the fast pace (a quota pause resumes by itself); a stopped one has
    # nothing left to move: the page keeps following usage and new runs, at a slower pace.
    assert 'hx-trigger="every 10s"' in after and "every 2s" not in after


@pytest.mark.usefixtures("router_caches_held")
def test_a_tick_costs_the_same_queries_for_a_run_of_10_and_of_1000_phases(
    operator: Client,
) -> None:
    small = make_run(10, finished=5, events_per_phase=2)
    large = make_run(1000, finished=700, events_per_phase=4)
    url = "/dashboard/live?page=run&run={}"
    queries_for(operator, url.format(small.pk))
    small_count = queries_for(operator, url.format(small.pk))
    assert small_count == queries_for(operator, url.format(large.pk))
    for page in ("runs", "usage", "models", "guards"):
        queries_for(operator, f"/dashboard/live?page={page}")
    print(f"\nqueries per tick of a run's page: {small_count}")


def test_an_unknown_page_is_refused(operator: Client) -> None:
    response = operator.get("/dashboard/live?page=secrets")
    assert response.status_code == 400
    assert b"unknown page" in response.content


def test_the_tick_needs_a_staff_login() -> None:
    response = Client().get("/dashboard/live?page=run")
    assert response.status_code == 302
