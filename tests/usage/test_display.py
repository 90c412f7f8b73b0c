"""Where usage is shown (admin, the dashboard's usage panel and progress page, the usage API),
the catalogue model comes with the model the provider reported, and estimated usage says so."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from runs import services as run_services
from runs.models import Phase
from runs.plans import parse_plan_bytes
from usage.models import UsageEvent
from usage.services import UsageRecord, in_flight_call_open, in_flight_calls_lose, record_usage

pytestmark = pytest.mark.django_db
MakeRecord = Callable[..., UsageRecord]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
SONNET = "claude-sonnet-4-5"
SNAPSHOTS = ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20251101")


@pytest.fixture
def root() -> User:
    return User.objects.create_superuser("root", "root@example.com", "pw")


@pytest.fixture
def admin_client_(root: User) -> Client:
    client = Client()
    client.force_login(root)
    return client


@pytest.fixture
def sonnet_usage(make_record: MakeRecord) -> list[UsageEvent]:
    """Two snapshots answering for one catalogue model, and one cut stream, today."""
    now = timezone.now()
    return [
        record_usage(
            record=make_record(
                provider="anthropic",
                model=SONNET,
                reported_model=reported,
                prompt=prompt,
                completion=completion,
                cache_write=cache_write_1h,
                cache_write_1h=cache_write_1h,
                estimated=estimated,
                created_at=now,
            )
        )[0]
        for reported, prompt, completion, cache_write_1h, estimated in [
            (SNAPSHOTS[0], 1_000, 100, 0, False),
            (SNAPSHOTS[1], 2_000, 200, 0, False),
            (SNAPSHOTS[0], 700, 3, 500, True),  # cut: what message_start had reported
        ]
    ]


def test_the_admin_lists_and_shows_the_reported_model_and_what_is_estimated(
    admin_client_: Client, sonnet_usage: list[UsageEvent]
) -> None:
    page = admin_client_.get(reverse("admin:usage_usageevent_changelist"))
    assert page.status_code == 200
    html = page.content.decode()
    assert SNAPSHOTS[0] in html and SNAPSHOTS[1] in html
    assert html.count("yes: stream cut (reported before the cut)") == 1

    cut = sonnet_usage[2]
    detail = admin_client_.get(reverse("admin:usage_usageevent_change", args=[cut.pk]))
    assert detail.status_code == 200
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", detail.content.decode()))
    assert SONNET in text
    assert re.search(rf"Reported model:? {re.escape(SNAPSHOTS[0])}", text)
    assert re.search(r"Cache write 1h tokens:? 500", text)
    assert "yes: stream cut (reported before the cut)" in text


def test_the_usage_api_keeps_one_row_per_catalogue_model_with_its_reported_models(
    root: User, sonnet_usage: list[UsageEvent]
) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=root).key}")
    response = client.get("/dashboard/usage?period=day")
    assert response.status_code == 200
    (row,) = [m for m in response.json()["models"] if m["model"] == SONNET]
    assert row["provider"] == "anthropic"
    assert row["reported_models"] == list(SNAPSHOTS)
    assert (row["tokens_in"], row["tokens_out"]) == (3_700, 303)
    assert (row["calls"], row["estimated_calls"]) == (3, 1)
    assert row["cost_usd"] is not None  # the fields it had before are all still there


def test_the_usage_panel_names_the_snapshots_beside_the_catalogue_model(
    admin_client_: Client, sonnet_usage: list[UsageEvent]
) -> None:
    page = admin_client_.get(reverse("dashboard-usage") + "?period=day")
    assert page.status_code == 200
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.content.decode()))
    assert f"{SONNET} ({SNAPSHOTS[0]}, {SNAPSHOTS[1]}) anthropic" in text
    assert "1 of 3 calls estimated" in text


def test_the_progress_page_shows_a_cut_stream_and_a_lost_call_each_as_estimated(
    admin_client_: Client, make_record: MakeRecord
) -> None:
    run = run_services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    phase = Phase.objects.filter(run=run).order_by("position").first()
    assert phase is not None
    record_usage(
        record=make_record(
            provider="anthropic",
            model=SONNET,
            reported_model=SNAPSHOTS[0],
            prompt=1_234,
            completion=5,
            run_id=run.pk,
            phase_id=phase.pk,
            estimated=True,
            created_at=timezone.now(),
        )
    )
    in_flight_call_open(
        call_key="k:1:auditor0",
        provider="glm",
        model="glm-4.6",
        role="auditor",
        system="",
        prompt="x" * 400,
        run_id=run.pk,
        phase_id=phase.pk,
    )
    in_flight_calls_lose(phase_id=phase.pk)

    page = admin_client_.get(reverse("dashboard-progress", args=[run.pk]))
    assert page.status_code == 200
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.content.decode()))
    assert re.search(
        rf"cut stream · builder · anthropic/{SONNET} \({SNAPSHOTS[0]}\) · [\d:]+ "
        r"1,234 tokens in, 5 out \(estimated: reported before the cut\)",
        text,
    )
    assert re.search(
        r"lost call · auditor · glm/glm-4\.6 · [\d:]+ 100 tokens in \(estimated\)", text
    )

    detail = admin_client_.get(reverse("admin:runs_phase_change", args=[phase.pk]))
    assert detail.status_code == 200
    html = detail.content.decode()
    assert f"cut stream: builder to anthropic/{SONNET} ({SNAPSHOTS[0]})" in html
    assert "lost call: auditor to glm/glm-4.6" in html
