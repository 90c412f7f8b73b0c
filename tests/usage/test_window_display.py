"""Cap windows in words on every surface (issue 16): the words themselves (usage.display), the
top bar's badges, the usage panel with what each provider last said of its limits, the usage
and status APIs (?window= and its 400), MCP's usage_summary, usage_report and the admin's
"Provider limits" page. Providers like Claude (a rolling 5-hour session and a week anchored on
Thursday 18:00 America/New_York), Gemini (a day from midnight America/Los_Angeles) and GLM (a
5-hour window counted in requests), usage recorded through the real services, the times in
AUTOPACK_TIME_ZONE America/New_York."""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.template.loader import render_to_string
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from routing.models import ProviderLimits
from runs import services as run_services
from runs.plans import parse_plan_bytes
from runs.selectors import provider_badges, usage_context, windows_words
from tests.factories import set_provider_keys
from usage import display
from usage.models import ProviderQuota, ProviderWindow
from usage.selectors import window_usage
from usage.services import UsageRecord, record_usage
from usage.types import TokenUsage

NEW_YORK = ZoneInfo("America/New_York")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
# Thursday 1 January 2026, 18:00 in New York: the week's anchor.
THURSDAY_EVENING = datetime(2026, 1, 1, 18, 0, tzinfo=NEW_YORK)
MODELS = {"anthropic": "claude-sonnet-4-5", "glm": "glm-4.6", "google_gemini": "gemini-2.5-pro"}


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def row(**fields: Any) -> dict[str, Any]:
    """A window_usage row with what display reads; tokens by default."""
    base: dict[str, Any] = {
        "provider": "anthropic",
        "window": "week",
        "kind": "anchored",
        "description": "7 d from Thu 2026-01-01 18:00 America/New_York",
        "start": utc(2026, 3, 5, 23),
        "reset": utc(2026, 3, 12, 22),
        "tokens": 12_400_000,
        "usd": Decimal("0"),
        "requests": 40,
        "caps": {"tokens": 20_000_000, "usd": None, "requests": None},
        "percent": 62.0,
        "unit": "tokens",
        "over_soft": False,
        "over_hard": False,
    }
    return {**base, **fields}


# ---- the words -------------------------------------------------------------------------------


def test_a_week_reads_with_its_percent_cap_and_reset_in_the_site_zone() -> None:
    # Tuesday 10 March 2026 15:00 New York (EDT since the 8th); the reset is Thu 12 March 18:00.
    now = utc(2026, 3, 10, 19)
    words = display.window_words(row(), now=now, zone=NEW_YORK)
    assert words["text"] == "week 62% of 20 M tokens · resets Thu 18:00 (in 2 d 3 h)"
    assert (words["tone"], words["bar"], words["used_text"]) == ("ok", 62, "12.4 M tokens")


def test_a_rolling_window_frees_usage_and_today_is_only_a_time() -> None:
    now = utc(2026, 3, 10, 17, 15)  # 13:15 New York
    session = row(
        window="session",
        kind="rolling",
        reset=utc(2026, 3, 10, 18, 20),
        tokens=350_000,
        caps={"tokens": 1_000_000, "usd": None, "requests": None},
        percent=35.0,
        over_soft=False,
    )
    words = display.window_words(session, now=now, zone=NEW_YORK)
    assert words["text"] == "session 35% of 1 M tokens · frees from 14:20 (in 1 h 5 min)"
    empty = display.window_words({**session, "reset": None}, now=now, zone=NEW_YORK)
    assert empty["text"].endswith("· nothing to free")


def test_requests_usd_no_cap_and_far_resets_have_their_own_words() -> None:
    now = utc(2026, 3, 10, 17)
    glm = row(
        provider="glm",
        window="prompts",
        kind="rolling",
        reset=utc(2026, 3, 10, 17, 0, 30),
        requests=120,
        caps={"tokens": None, "usd": None, "requests": 120},
        percent=100.0,
        unit="requests",
        over_soft=True,
        over_hard=True,
    )
    words = display.window_words(glm, now=now, zone=NEW_YORK)
    assert words["text"] == "prompts 100% of 120 requests · frees from 13:00 (in under a minute)"
    assert (words["tone"], words["bar"]) == ("full", 100)
    spend = row(
        window="month",
        kind="calendar",
        reset=utc(2026, 4, 1, 4),
        caps={"tokens": None, "usd": Decimal("5"), "requests": None},
        usd=Decimal("4.2"),
        percent=84.0,
        unit="usd",
        over_soft=True,
    )
    words = display.window_words(spend, now=now, zone=NEW_YORK)
    assert words["text"] == "month 84% of $5.00 · resets Apr 1 00:00 (in 21 d 11 h)"
    assert (words["tone"], words["used_text"]) == ("warn", "$4.20")
    none = display.window_words(
        row(percent=None, unit=None, caps=dict.fromkeys(("tokens", "usd", "requests"))),
        now=now,
        zone=NEW_YORK,
    )
    assert none["text"].startswith("week no cap · resets ") and none["bar"] == 0
    assert display.when_text(utc(2027, 1, 2, 5), now=now, zone=NEW_YORK) == "Jan 2, 2027 00:00"
    assert display.percent_text(0.2) == "<1%"
    assert [display.short_number(n) for n in (950, 1200, 500_000, 20_000_000, 1_500_000)] == [
        "950",
        "1.2 k",
        "500 k",
        "20 M",
        "1.5 M",
    ]


def test_a_provider_line_names_each_window_and_its_worst_is_the_badge() -> None:
    now = utc(2026, 3, 10, 17, 15)
    week = display.window_words(row(), now=now, zone=NEW_YORK)
    session = display.window_words(
        row(window="session", kind="rolling", reset=utc(2026, 3, 10, 18, 20), percent=35.0),
        now=now,
        zone=NEW_YORK,
    )
    line = display.provider_line("anthropic", [week, session])
    assert line == (
        "anthropic · week 62% of 20 M tokens · resets Thu 18:00 (in 2 d 4 h) · "
        "session 35% of 20 M tokens · frees from 14:20 (in 1 h 5 min)"
    )
    assert display.worst([session, week]) is week


# ---- the surfaces, from usage recorded through the services -----------------------------------


def call(provider: str, at: datetime, *, tokens: int = 0, calls: int = 1) -> None:
    for _ in range(calls):
        record_usage(
            record=UsageRecord(
                call_id=uuid.uuid4().hex,
                provider=provider,
                model=MODELS[provider],
                role="builder",
                usage=TokenUsage(prompt_tokens=tokens // calls, completion_tokens=0),
                created_at=at,
            )
        )


def window(provider: str, name: str, **fields: Any) -> None:
    made = ProviderWindow(provider=provider, name=name, **fields)
    made.full_clean()
    made.save()


def make_plans(settings: Any, monkeypatch: pytest.MonkeyPatch) -> datetime:
    """The three plans' windows, only them, and usage 30 s ago: anthropic's session 35% of
    1 M tokens and week 70% of 500 k, google_gemini's day 25% of 1 M, glm's prompts 2 of 8
    requests (25%). Returns the usage's instant."""
    settings.TIME_ZONE = "America/New_York"
    set_provider_keys(monkeypatch)
    ProviderWindow.objects.all().delete()
    ProviderQuota.objects.all().delete()
    window("anthropic", "session", kind="rolling", hours=5, cap_tokens=1_000_000)
    window(
        "anthropic",
        "week",
        kind="anchored",
        days=7,
        anchor=THURSDAY_EVENING,
        time_zone="America/New_York",
        cap_tokens=500_000,
    )
    window(
        "google_gemini",
        "day",
        kind="calendar",
        unit="day",
        time_zone="America/Los_Angeles",
        cap_tokens=1_000_000,
    )
    window("glm", "prompts", kind="rolling", hours=5, cap_requests=8)
    at = timezone.now() - timedelta(seconds=30)
    call("anthropic", at, tokens=350_000)
    call("google_gemini", at, tokens=250_000)
    call("glm", at, tokens=2000, calls=2)
    return at


@pytest.fixture
def plans(db: None, settings: Any, monkeypatch: pytest.MonkeyPatch) -> datetime:
    return make_plans(settings, monkeypatch)


def expected_resets(at: datetime) -> dict[tuple[str, str], str]:
    """The start of each window's reset words, read now (the "(in …)" after it moves with the
    clock): the week at a Thursday 18:00 New York, the Los Angeles day at 03:00 New York."""
    now = timezone.now()
    rows = {(r["provider"], r["window"]): r for r in window_usage(now=now)}
    week = rows[("anthropic", "week")]["reset"].astimezone(NEW_YORK)
    assert (week.strftime("%a %H:%M"), rows[("anthropic", "session")]["reset"]) == (
        "Thu 18:00",
        at + timedelta(hours=5),
    )
    day = rows[("google_gemini", "day")]["reset"]
    assert day.astimezone(ZoneInfo("America/Los_Angeles")).strftime("%H:%M") == "00:00"
    assert day.astimezone(NEW_YORK).strftime("%H:%M") == "03:00"
    return {
        key: f"{'frees from' if key[1] in ('session', 'prompts') else 'resets'} "
        f"{display.when_text(r['reset'], now=now)} (in "
        for key, r in rows.items()
    }


WORDS = {
    ("anthropic", "session"): "session 35% of 1 M tokens · ",
    ("anthropic", "week"): "week 70% of 500 k tokens · ",
    ("google_gemini", "day"): "day 25% of 1 M tokens · ",
    ("glm", "prompts"): "prompts 25% of 8 requests · ",
}


def expected(at: datetime) -> dict[tuple[str, str], str]:
    resets = expected_resets(at)
    return {key: WORDS[key] + resets[key] for key in WORDS}


def test_the_windows_read_the_right_percent_and_reset_for_each_plan(plans: datetime) -> None:
    words = windows_words()
    assert list(words) == ["anthropic", "glm", "google_gemini"]
    texts = {(w["provider"], w["window"]): w["text"] for ws in words.values() for w in ws}
    for key, start in expected(plans).items():
        assert texts[key].startswith(start), (key, texts[key])
    assert {w["window"]: w["tone"] for w in words["anthropic"]} == {"session": "ok", "week": "ok"}


def test_the_badges_show_each_providers_worst_window_and_every_window_in_the_title(
    plans: datetime,
) -> None:
    badges = {b["provider"]: b for b in provider_badges()}
    assert (badges["anthropic"]["window"], badges["anthropic"]["percent_text"]) == ("week", "70%")
    assert (badges["glm"]["window"], badges["glm"]["percent_text"]) == ("prompts", "25%")
    want = expected(plans)
    assert badges["anthropic"]["title"].startswith("anthropic · " + want[("anthropic", "session")])
    assert want[("anthropic", "week")] in badges["anthropic"]["title"]
    html = render_to_string("dashboard/_badges.html", {"badges": list(badges.values())})
    assert '<span class="badge-window">week</span> 70%</a>' in html
    assert 'title="anthropic · session 35% of 1 M tokens · frees from ' in html


def operator() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    return client


def test_the_usage_panel_lists_each_window_and_what_the_provider_said(plans: datetime) -> None:
    now = timezone.now()
    ProviderLimits.objects.create(
        provider="anthropic",
        observed_at=now,
        requests_limit=50,
        requests_remaining=0,
        requests_reset_at=now + timedelta(minutes=20),
        tokens_limit=400_000,
        tokens_remaining=120_000,
        cooled_until=now + timedelta(minutes=20),
        reason="429 from anthropic",
    )
    html = operator().get("/dashboard/usage/partial?period=day").content.decode()
    assert html.startswith('<div id="usage">')
    assert html.index('id="usage-providers"') < html.index('class="tabs"')  # above the periods
    assert "Times in America/New_York." in html
    anthropic = html[html.index('aria-label="anthropic"') : html.index('aria-label="glm"')]
    cooled = display.when_text(now + timedelta(minutes=20), now=now)
    assert f"cooled down until {cooled} (429 from anthropic)" in anthropic
    assert "0 of 50 requests left · resets " in anthropic
    assert "120,000 of 400,000 tokens left" in anthropic
    assert re.search(
        r'<li class="usage-window ok" title="last 5 h"><span class="usage-window-name">session'
        r'</span>.*?aria-valuenow="35"><span style="width: 35%"></span></div>\s*'
        r'<span class="usage-window-figures"><strong>35%</strong> · 350 k tokens of 1 M tokens'
        r'</span> <span class="muted usage-window-reset">frees from ',
        anthropic,
        re.S,
    ), anthropic
    assert "<strong>25%</strong> · 2 requests of 8 requests" in html
    resets = expected_resets(plans)
    assert resets[("google_gemini", "day")] in html
    assert resets[("anthropic", "week")] in anthropic


def test_provider_and_reason_text_is_escaped_everywhere(plans: datetime) -> None:
    now = timezone.now()
    ProviderLimits.objects.create(
        provider="<i>evil</i>",
        observed_at=now,
        cooled_until=now + timedelta(hours=1),
        reason='<script>alert("x")</script>',
    )
    ProviderWindow.objects.create(
        provider='<b>"p"</b>', name="week", kind="rolling", hours=5, cap_tokens=10
    )
    html = operator().get("/dashboard/usage/partial?period=day").content.decode()
    assert "<script>" not in html and "<i>evil" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    badges = render_to_string("dashboard/_badges.html", {"badges": provider_badges()})
    assert "<b>" not in badges and 'title="&lt;b&gt;&quot;p&quot;&lt;/b&gt; · week' in badges


def usage_queries(**kwargs: Any) -> int:
    with CaptureQueriesContext(connection) as captured:
        usage_context(**kwargs)
    return len(captured.captured_queries)


def test_the_panel_and_the_badges_cost_a_constant_few_statements(plans: datetime) -> None:
    # usage overview and chart 3, windows 3 (ProviderWindow, ProviderQuota, the usage with every
    # provider's last hour for the forecasts: usage.forecast), limits 1, reconciliation 1 (no
    # provider usage API read yet: usage.reconcile)
    before = usage_queries(period="week")
    assert before == 8
    for n in range(6):
        window("anthropic", f"extra-{n}", kind="rolling", hours=1 + n, cap_tokens=1000)
        ProviderLimits.objects.create(provider=f"p{n}", observed_at=timezone.now())
        call("glm", timezone.now() - timedelta(days=n), tokens=10)
    assert usage_queries(period="week") == before
    with CaptureQueriesContext(connection) as captured:
        provider_badges()
    assert len(captured.captured_queries) == 3


def api() -> APIClient:
    client = APIClient()
    client.force_authenticate(User.objects.create_superuser("api", "api@example.com", "pw"))
    return client


def test_the_usage_api_lists_windows_and_filters_one_by_name(plans: datetime) -> None:
    client = api()
    body = client.get("/dashboard/usage?period=week").json()
    assert body["window"] is None and body["time_zone"] == "America/New_York"
    providers = {p["provider"]: p for p in body["providers"]}
    session, week = providers["anthropic"]["windows"]
    assert (session["name"], session["kind"], session["percent"]) == ("session", "rolling", 35.0)
    assert session["caps"] == {"tokens": 1_000_000, "usd": None, "requests": None}
    assert session["used"]["tokens"] == 350_000
    assert datetime.fromisoformat(session["reset"]) == plans + timedelta(hours=5)
    assert (week["name"], week["kind"], week["percent"], week["unit"]) == (
        "week",
        "anchored",
        70.0,
        "tokens",
    )
    assert datetime.fromisoformat(week["reset"]).astimezone(NEW_YORK).strftime("%a %H:%M") == (
        "Thu 18:00"
    )
    glm = providers["glm"]["windows"][0]
    assert (glm["unit"], glm["used"]["requests"], glm["caps"]["requests"]) == ("requests", 2, 8)
    # A provider with windows and no quota is listed all the same, with its period counts.
    assert providers["google_gemini"]["tokens_in"] == 250_000

    only = client.get("/dashboard/usage?period=day&window=week").json()
    assert only["window"] == "week"
    assert {p["provider"]: [w["name"] for w in p["windows"]] for p in only["providers"]} == {
        "anthropic": ["week"],
        "glm": [],
        "google_gemini": [],
    }
    refused = client.get("/dashboard/usage?window=<fortnight>")
    assert refused.status_code == 400
    assert refused.json() == {
        "window": [
            "no provider has a window '<fortnight>'; the windows are: day, prompts, session, week"
        ]
    }


def test_the_status_api_lists_every_providers_windows(
    plans: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    body = api().get(f"/dashboard/runs/{run.pk}/status").json()
    assert [(w["provider"], w["name"], w["percent"]) for w in body["windows"]] == [
        ("anthropic", "session", 35.0),
        ("anthropic", "week", 70.0),
        ("glm", "prompts", 25.0),
        ("google_gemini", "day", 25.0),
    ]
    assert body["windows"][0]["text"].startswith(WORDS[("anthropic", "session")] + "frees from")


def test_usage_report_lists_each_window_with_percent_cap_and_reset(plans: datetime) -> None:
    out = io.StringIO()
    call_command("usage_report", "--period", "week", stdout=out)
    text = out.getvalue()
    assert "Cap windows (times in America/New_York)" in text
    lines = {tuple(line.split()[:2]): line for line in text.splitlines() if line.split()}
    session = lines[("anthropic", "session")].split(None, 5)
    assert session[2:5] == ["350", "k", "tokens"]  # used, cap and % follow
    assert lines[("anthropic", "session")].split("  ")[-1].strip().startswith("frees from ")
    assert " 70% " in lines[("anthropic", "week")]
    assert "2 requests" in lines[("glm", "prompts")] and "8 requests" in lines[("glm", "prompts")]
    assert expected_resets(plans)[("google_gemini", "day")] in lines[("google_gemini", "day")]
    # The period's tables are still there.
    assert text.startswith("Usage for the week ")


def test_the_admin_shows_provider_limits_read_only(plans: datetime) -> None:
    ProviderLimits.objects.create(
        provider="openai",
        observed_at=timezone.now(),
        tokens_remaining=5,
        reason="429 from openai",
    )
    client = operator()
    page = client.get("/admin/routing/providerlimits/")
    assert page.status_code == 200 and "429 from openai" in page.content.decode()
    assert client.get("/admin/routing/providerlimits/add/").status_code == 403


# ---- MCP ---------------------------------------------------------------------------------------


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "mcp-server.log").open("w+") as log:
        yield log


def test_mcp_usage_summary_has_a_line_per_provider_with_its_windows(
    transactional_db: None,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    server_log: TextIO,
) -> None:
    from tests.runs.test_mcp import make_user, stdio_server

    at = make_plans(settings, monkeypatch)
    monkeypatch.setenv("AUTOPACK_TIME_ZONE", "America/New_York")
    make_user("reader")
    with stdio_server("reader", tmp_path, server_log) as client:
        text = client.text("usage_summary", period="week")
    lines = text.splitlines()
    assert "Cap windows (times in America/New_York):" in lines
    want = expected(at)
    [anthropic] = [line for line in lines if line.startswith("anthropic · ")]
    assert anthropic.startswith("anthropic · " + want[("anthropic", "session")])
    assert want[("anthropic", "week")] in anthropic
    [glm] = [line for line in lines if line.startswith("glm · ")]
    assert glm.startswith("glm · " + want[("glm", "prompts")])
