"""The providers' own usage APIs against what Autopack metered, over real HTTP: model calls go
through the real SDKs to the simulated provider and are metered as the workers meter them
(routing.services.model_invoke); usage.provider_usage reads the simulator's OpenAI and Anthropic
usage APIs (which count every call they answered, plus usage "from other tools"); and
usage.reconcile compares the two per provider and UTC day."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone

from routing.router import SOFT, RoutingDecision, provider_quota_states
from routing.services import model_invoke
from routing.types import DecisionScope, RouteKey
from tests.sim_fixtures import SimulatedProvider, pointed_at, started_simulator
from usage.models import ProviderReportedUsage, ProviderUsageFetch, UsageEvent
from usage.provider_usage import provider_usage_fetch, provider_usage_fetch_all
from usage.reconcile import reconciliation, reported_excess
from usage.selectors import window_usage
from usage.services import provider_quota_upsert, usage_fold

pytestmark = pytest.mark.django_db

OPENAI_KEY = "sk-admin-sim-0penai-admin-key"
ANTHROPIC_KEY = "sk-ant-admin01-sim-anthropic-admin-key"
MODELS = {"openai": "gpt-5-mini", "anthropic": "claude-haiku-4-5"}


@pytest.fixture(scope="module")
def own_sim_server() -> Iterator[SimulatedProvider]:
    # The usage APIs report every call the simulator answered: a worker left running by an
    # earlier test (finishing a phase after its test ended) must not call this one.
    yield from started_simulator()


@pytest.fixture
def sim(own_sim_server: SimulatedProvider, monkeypatch: pytest.MonkeyPatch) -> SimulatedProvider:
    return pointed_at(own_sim_server, monkeypatch)


@pytest.fixture
def admin_keys(sim: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("OPENAI_ADMIN_KEY", OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_ADMIN_KEY", ANTHROPIC_KEY)
    return sim


# A prompt past the simulator's cache threshold: the reply reads (and, on Anthropic, writes)
# cached input, so the comparison counts the cache parts on both sides.
LONG_SYSTEM = "You are the builder. " + "Keep every change small and tested. " * 160


def invoke(provider: str, n: int, *, stream: bool = False, long: bool = False) -> UsageEvent:
    model = MODELS[provider]
    result = model_invoke(
        decision=RoutingDecision(
            key=RouteKey("builder", "core_backend", "low"),
            model=model,
            provider=provider,
            scope=DecisionScope.BASELINE,
            reason="test",
            candidates=(model,),
        ),
        system=LONG_SYSTEM if long else "You are the builder.",
        prompt=f"Autopack-Role: builder\nAttempt: 1\nPhase {n}: reconcile step {n}\n",
        call_key=f"reconcile:{provider}:{n}",
        stream=stream,
    )
    return UsageEvent.objects.get(pk=result.usage_event_id)


def calls(sim: Any) -> None:
    """A few calls to each provider, plain and streamed; half folded into the rollups."""
    for n in range(3):
        invoke("openai", n, stream=n == 2)
        invoke("anthropic", n, stream=n == 1)
    usage_fold()
    invoke("openai", 3, long=True)
    invoke("anthropic", 3, long=True)


def today(result: dict[str, Any], provider: str) -> dict[str, Any]:
    panel = next(p for p in result["providers"] if p["provider"] == provider)
    return panel["rows"][0]


def usage_api_reads(sim: Any, provider: str) -> list[dict[str, Any]]:
    return [r for r in sim.usage_requests() if r["provider"] == provider]


def test_usage_metered_by_autopack_reconciles_to_zero_with_the_simulated_usage_apis(
    admin_keys: Any,
) -> None:
    calls(admin_keys)
    now = timezone.now()

    results = provider_usage_fetch_all(now=now)
    result = reconciliation(now=now)

    assert [(r.provider, r.error) for r in results] == [("openai", ""), ("anthropic", "")]
    for provider in ("openai", "anthropic"):
        row = today(result, provider)
        assert row["day"] == now.astimezone(UTC).date()
        assert row["metered"] > 0
        assert (row["reported"], row["difference"], row["percent"]) == (row["metered"], 0, 0)
        assert (row["reported_in"], row["reported_out"]) == (row["metered_in"], row["metered_out"])
        assert not row["flagged"]
        assert row["partial_until"] == now
    assert result["flagged"] == 0
    for provider in ("openai", "anthropic"):
        events = UsageEvent.objects.filter(provider=provider)
        assert any(e.cached_input_tokens for e in events)
        assert any(e.cache_write_tokens for e in events) == (provider == "anthropic")
        assert any(e.reasoning_tokens for e in events) == (provider == "openai")
    # Stored per bucket and the model the provider names (the dated snapshot), hour and day.
    day_rows = ProviderReportedUsage.objects.filter(bucket_width="1d")
    assert {(r.provider, r.model) for r in day_rows} == {
        ("openai", "gpt-5-mini-2025-08-07"),
        ("anthropic", "claude-haiku-4-5-20251001"),
    }
    openai_day = day_rows.get(provider="openai")
    assert openai_day.requests == 4
    anthropic_day = day_rows.get(provider="anthropic")
    assert anthropic_day.requests is None  # not in Anthropic's report
    assert anthropic_day.cache_read_tokens > 0 and anthropic_day.cache_write_tokens > 0
    assert openai_day.cache_read_tokens > 0
    hours = ProviderReportedUsage.objects.filter(bucket_width="1h", provider="openai")
    assert sum(h.input_tokens + h.output_tokens for h in hours) == (
        openai_day.input_tokens + openai_day.output_tokens
    )


def test_a_second_read_of_the_same_buckets_changes_nothing(admin_keys: Any) -> None:
    calls(admin_keys)
    now = timezone.now()
    provider_usage_fetch_all(now=now)
    first = sorted(
        ProviderReportedUsage.objects.values_list(
            "provider", "bucket_width", "bucket", "model", "input_tokens", "output_tokens"
        )
    )

    provider_usage_fetch_all(now=now + timedelta(seconds=1))

    again = sorted(
        ProviderReportedUsage.objects.values_list(
            "provider", "bucket_width", "bucket", "model", "input_tokens", "output_tokens"
        )
    )
    assert again == first
    assert reconciliation(now=now + timedelta(seconds=1))["flagged"] == 0


def test_every_page_of_the_usage_apis_is_read(admin_keys: Any) -> None:
    calls(admin_keys)
    now = timezone.now()

    # Two days of hour buckets, five a page: ten pages of hours, one of days.
    for provider in ("openai", "anthropic"):
        assert provider_usage_fetch(provider=provider, now=now, page_size=5).error == ""

    for provider in ("openai", "anthropic"):
        reads = usage_api_reads(admin_keys, provider)
        assert len(reads) > 2
        assert sum("page=" in r["query"] for r in reads) == len(reads) - 2  # all but the firsts
        row = today(reconciliation(now=now), provider)
        assert (row["difference"], row["flagged"]) == (0, False)


def test_usage_from_other_tools_flags_the_day_with_its_difference(admin_keys: Any) -> None:
    calls(admin_keys)
    now = timezone.now()
    yesterday_noon = datetime.combine(
        now.astimezone(UTC).date() - timedelta(days=1), datetime.min.time(), tzinfo=UTC
    ) + timedelta(hours=12)
    admin_keys.control(
        "POST",
        "/_sim/other_usage",
        {
            "provider": "anthropic",
            "model": "claude-sonnet-4-5-20250929",
            "input_tokens": 50_000,
            "cached_tokens": 20_000,
            "cache_write_tokens": 5_000,
            "output_tokens": 4_000,
            "at": now.timestamp() - 1,
        },
    )
    admin_keys.control(
        "POST",
        "/_sim/other_usage",
        {
            "provider": "openai",
            "model": "gpt-5",
            "input_tokens": 1_000,
            "output_tokens": 234,
            "at": yesterday_noon.isoformat(),
        },
    )

    provider_usage_fetch_all(now=now)
    result = reconciliation(now=now)

    row = today(result, "anthropic")
    assert row["difference"] == 54_000
    assert row["reported"] == row["metered"] + 54_000
    assert row["percent"] == pytest.approx(54_000 * 100 / row["reported"])
    assert row["flagged"]
    assert not today(result, "openai")["flagged"]
    openai_rows = next(p for p in result["providers"] if p["provider"] == "openai")["rows"]
    yesterday = openai_rows[1]
    assert yesterday["day"] == yesterday_noon.date()
    assert (yesterday["metered"], yesterday["reported"], yesterday["difference"]) == (0, 1234, 1234)
    assert (yesterday["percent"], yesterday["flagged"]) == (100.0, True)
    assert result["flagged"] == 2
    stored = ProviderReportedUsage.objects.get(
        provider="anthropic", bucket_width="1d", model="claude-sonnet-4-5-20250929"
    )
    assert (stored.input_tokens, stored.cache_read_tokens, stored.cache_write_tokens) == (
        50_000,
        20_000,
        5_000,
    )


def test_a_difference_within_the_threshold_is_not_flagged(admin_keys: Any, settings: Any) -> None:
    event = invoke("anthropic", 1)
    now = timezone.now()
    metered = event.prompt_tokens + event.completion_tokens
    admin_keys.control(
        "POST",
        "/_sim/other_usage",
        {"provider": "anthropic", "model": "x", "input_tokens": 1, "output_tokens": 0},
    )
    provider_usage_fetch(provider="anthropic", now=now)
    settings.AUTOPACK_RECONCILE_THRESHOLD_PERCENT = 100 / (metered + 1) + 0.01

    row = today(reconciliation(now=now), "anthropic")

    assert (row["difference"], row["flagged"]) == (1, False)
    settings.AUTOPACK_RECONCILE_THRESHOLD_PERCENT = 100 / (metered + 1) - 0.01
    assert today(reconciliation(now=now), "anthropic")["flagged"]


def test_usage_after_the_last_read_is_on_neither_side(admin_keys: Any) -> None:
    calls(admin_keys)
    read_at = timezone.now()
    provider_usage_fetch(provider="openai", now=read_at)
    invoke("openai", 10)  # after the read: the provider's figures do not have it yet

    row = today(reconciliation(), "openai")

    assert (row["difference"], row["flagged"], row["partial_until"]) == (0, False, read_at)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ("OPENAI_ADMIN_KEY", "sk-proj-not-an-admin-key-5ecret"),
        ("ANTHROPIC_ADMIN_KEY", "invalid-sk-ant-admin01-5ecret"),
    ],
)
def test_a_bad_admin_key_keeps_the_error_stores_nothing_and_logs_no_key(
    admin_keys: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    env: str,
    key: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = "openai" if env.startswith("OPENAI") else "anthropic"
    invoke(provider, 1)
    monkeypatch.setenv(env, key)

    result = provider_usage_fetch(provider=provider, now=timezone.now())

    assert result.stored == 0
    assert "refused the admin key (401)" in result.error
    assert not ProviderReportedUsage.objects.exists()
    fetch = ProviderUsageFetch.objects.get(provider=provider)
    assert (fetch.error, fetch.succeeded_at) == (result.error, None)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert result.error in logged
    assert "5ecret" not in logged + fetch.error
    panel = next(p for p in reconciliation()["providers"] if p["provider"] == provider)
    assert (panel["error"], panel["rows"]) == (result.error, [])


def test_a_failed_read_keeps_what_the_last_one_stored(admin_keys: Any) -> None:
    calls(admin_keys)
    now = timezone.now()
    provider_usage_fetch(provider="openai", now=now)
    stored = ProviderReportedUsage.objects.count()
    admin_keys.add_fault(kind="500", provider="openai", role="usage_api")

    result = provider_usage_fetch(provider="openai", now=now + timedelta(minutes=10))

    assert result.error.startswith("OpenAI's usage API failed (500)")
    assert ProviderReportedUsage.objects.count() == stored
    fetch = ProviderUsageFetch.objects.get(provider="openai")
    assert (fetch.succeeded_at, fetch.error) == (now, result.error)
    # The model calls never see a usage_api fault, nor the usage API a model call's.
    assert invoke("openai", 20).completion_tokens > 0


def test_a_provider_without_an_admin_key_is_skipped(sim: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("OPENAI_ADMIN_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_ADMIN_KEY", raising=False)

    assert provider_usage_fetch_all() == []
    assert provider_usage_fetch(provider="openai").skipped
    assert not ProviderUsageFetch.objects.exists()
    assert usage_api_reads(sim, "openai") == []
    assert reconciliation()["providers"] == []


def test_the_command_reads_now_and_says_what_it_stored(
    admin_keys: Any, monkeypatch: Any, capsys: Any
) -> None:
    invoke("anthropic", 1)
    monkeypatch.delenv("OPENAI_ADMIN_KEY")

    call_command("provider_usage_fetch")

    out = capsys.readouterr().out
    assert "openai: skipped (OPENAI_ADMIN_KEY is not set)" in out
    assert "anthropic: 2 bucket row(s) stored" in out  # one hour, one day
    monkeypatch.setenv("ANTHROPIC_ADMIN_KEY", "invalid-key")
    with pytest.raises(CommandError, match="1 of 1 usage reads failed"):
        call_command("provider_usage_fetch", "--provider", "anthropic")


def test_beat_reads_the_usage_apis_on_its_interval(settings: Any) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["fetch-provider-usage"]
    assert entry == {
        "task": "usage.tasks.fetch_provider_usage",
        "schedule": settings.AUTOPACK_PROVIDER_USAGE_SECONDS,
    }


def test_the_cap_may_count_the_reported_tokens_where_they_are_larger(
    admin_keys: Any, settings: Any
) -> None:
    # A fixed instant: the other tools' usage and the read are placed, nothing waits on a clock.
    now = datetime.combine(
        timezone.now().astimezone(UTC).date() - timedelta(days=1),
        datetime.min.time(),
        tzinfo=UTC,
    ) + timedelta(hours=15, minutes=30)
    admin_keys.control(
        "POST",
        "/_sim/other_usage",
        {
            "provider": "anthropic",
            "model": "claude-opus-4-5-20251101",
            "input_tokens": 6_000,
            "output_tokens": 1_000,
            "at": (now - timedelta(hours=3)).timestamp(),
        },
    )
    provider_usage_fetch(provider="anthropic", now=now)
    provider_quota_upsert(
        provider="anthropic",
        daily_cap_tokens=10_000,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share=1,
        soft_limit="0.5",
    )
    rows = [r for r in window_usage(now=now, providers=["anthropic"]) if r["window"] == "day"]
    assert rows and rows[0]["tokens"] == 0

    assert reported_excess([("anthropic", rows[0]["start"])], now=now) == [7_000]
    assert rows[0]["reported_extra"] == 0  # the setting is off
    settings.AUTOPACK_CAP_USE_LARGER = True
    (row,) = [r for r in window_usage(now=now, providers=["anthropic"]) if r["window"] == "day"]
    assert (row["tokens"], row["reported_extra"]) == (7_000, 7_000)
    assert (row["percent"], row["over_soft"], row["over_hard"]) == (70.0, True, False)
    # The router follows: past the soft limit, its quota state says so.
    assert provider_quota_states(now=now)["anthropic"].level == SOFT
    # A window starting after that hour does not count it.
    assert reported_excess([("anthropic", now - timedelta(hours=2))], now=now) == [0]


def test_the_usage_page_shows_the_reconciliation_with_flagged_days_marked(
    admin_keys: Any, admin_client: Client
) -> None:
    invoke("openai", 1)
    admin_keys.control(
        "POST",
        "/_sim/other_usage",
        {"provider": "openai", "model": "<b>gpt-x</b>", "input_tokens": 900, "output_tokens": 100},
    )
    provider_usage_fetch(provider="openai", now=timezone.now())

    page = admin_client.get("/dashboard/caps/?period=day")
    tick = admin_client.get("/dashboard/live?page=usage", headers={"HX-Request": "true"})

    for response in (page, tick):
        assert response.status_code == 200
        html = response.content.decode()
        assert 'id="usage-reconcile"' in html
        assert 'class="reconcile-row flagged"' in html
        assert "+1,000" in html


def test_a_usage_api_error_on_the_page_is_text_not_markup(
    admin_keys: Any, admin_client: Client
) -> None:
    ProviderUsageFetch.objects.create(
        provider="openai", attempted_at=timezone.now(), error="<script>alert(1)</script>"
    )

    html = admin_client.get("/dashboard/caps/").content.decode()

    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
