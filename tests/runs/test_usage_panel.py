"""The usage panel (issue 15, item 7): core (builder, auditor) against aux (agents) tokens, the
sortable per-model table, and the 30-day chart per provider with its daily cap, from usage
recorded through the real services and rendered through the test client."""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.template.loader import render_to_string
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs.selectors import usage_context
from tests.factories import set_provider_keys
from usage.selectors import get_usage_overview
from usage.services import UsageRecord, provider_quota_upsert, record_usage, usage_fold
from usage.types import TokenUsage

pytestmark = pytest.mark.django_db
PARTIAL = "/dashboard/usage/partial"
# Agents report usage of their own: these roles are aux, builder and auditor are core.
CODEX, HELPER = "agent:codex", "agent:helper"
# A provider of no price list (its model's cost is unknown) with a cap of our own choosing.
ZETA = "zeta"


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    set_provider_keys(monkeypatch)


@pytest.fixture
def operator() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    return client


def record(
    provider: str,
    model: str,
    role: str,
    prompt: int,
    completion: int,
    *,
    at: datetime | None = None,
) -> None:
    record_usage(
        record=UsageRecord(
            call_id=uuid.uuid4().hex,
            provider=provider,
            model=model,
            role=role,
            usage=TokenUsage(prompt_tokens=prompt, completion_tokens=completion),
            created_at=at,
        )
    )


# Per model: tokens in, out, core (in + out), aux (in + out); each order differs by key.
EXPECTED: dict[str, dict[str, Any]] = {
    "claude-sonnet-4-5": {
        "provider": "anthropic",
        "in": 1700,
        "out": 170,
        "core": 1650,
        "aux": 220,
    },
    "gpt-5": {"provider": "openai", "in": 3000, "out": 30, "core": 0, "aux": 3030},
    "glm-4.6": {"provider": "glm", "in": 800, "out": 900, "core": 1700, "aux": 0},
    "aardvark-1": {"provider": ZETA, "in": 150, "out": 1005, "core": 105, "aux": 1050},
}


@pytest.fixture
def usage() -> None:
    # Some folded into the rollups, some still pending: the split must count both.
    record("anthropic", "claude-sonnet-4-5", "builder", 1000, 100)
    record("anthropic", "claude-sonnet-4-5", "auditor", 500, 50)
    record("openai", "gpt-5", CODEX, 1000, 10)
    usage_fold()
    record("anthropic", "claude-sonnet-4-5", CODEX, 200, 20)
    record("openai", "gpt-5", CODEX, 2000, 20)
    record("glm", "glm-4.6", "builder", 800, 900)
    record(ZETA, "aardvark-1", "builder", 100, 5)
    record(ZETA, "aardvark-1", HELPER, 50, 1000)
    # Caps: zeta's daily one is 6,000 × 0.5 = 3,000 tokens for Autopack.
    provider_quota_upsert(
        provider=ZETA,
        daily_cap_tokens=6_000,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share="0.5",
        soft_limit="0.8",
    )


def panel(client: Client, query: str = "period=month") -> str:
    response = client.get(f"{PARTIAL}?{query}")
    assert response.status_code == 200
    return response.content.decode()


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def card(html: str, provider: str) -> str:
    match = re.search(
        rf'<div class="card"><span class="badge \w+">{re.escape(provider)}</span>(.*?)</div></div>',
        html,
        re.S,
    )
    assert match, provider
    return text(match.group(1)).strip()


def table_models(html: str) -> list[str]:
    return re.findall(r'<tr><td class="model">([^<]*?)(?: <span|</td>)', html)


def header(html: str, key: str) -> tuple[str, str]:
    """(the th's attributes, the sort its link asks for) of a column."""
    match = re.search(rf'<th scope="col"([^>]*)><a id="sort-{key}" href="([^"]*)"', html)
    assert match, key
    (sort,) = re.findall(r"sort=([^&\"]*)", match.group(2).replace("&amp;", "&"))
    return match.group(1), sort


@pytest.mark.usefixtures("usage")
def test_each_provider_card_shows_core_and_agent_tokens_apart(operator: Client) -> None:
    html = panel(operator)
    assert "core 1,500 in / 150 out · agents 200 in / 20 out" in card(html, "anthropic")
    assert "1,700 in / 170 out" in card(html, "anthropic")  # the total, as before
    assert "core 0 in / 0 out · agents 3,000 in / 30 out" in card(html, "openai")
    assert "core 800 in / 900 out · agents 0 in / 0 out" in card(html, "glm")


@pytest.mark.usefixtures("usage")
def test_each_model_row_shows_core_and_agent_tokens_in_and_out(operator: Client) -> None:
    html = panel(operator)
    row = html[html.index('<td class="model">claude-sonnet-4-5') :]
    row = row[: row.index("</tr>")]
    assert '<td>1,700</td><td>170</td><td class="split">1,500 / 150</td>' in row
    assert '<td class="split">200 / 20</td>' in row
    zeta = html[html.index('<td class="model">aardvark-1') :]
    assert (
        '<td class="split">100 / 5</td><td class="split">50 / 1,000</td>'
        '<td class="split outside">0 / 0</td><td>–</td>'
    ) in zeta


@pytest.mark.usefixtures("usage")
def test_the_usage_api_splits_core_and_agent_tokens_too(operator: Client) -> None:
    body = operator.get("/dashboard/usage?period=month").json()
    providers = {row["provider"]: row for row in body["providers"]}
    anthropic = providers["anthropic"]
    assert (anthropic["tokens_in"], anthropic["tokens_out"]) == (1700, 170)
    split = ("core_tokens_in", "core_tokens_out", "aux_tokens_in", "aux_tokens_out")
    assert tuple(anthropic[k] for k in split) == (1500, 150, 200, 20)
    assert anthropic["percent_of_cap"] is not None and anthropic["cap"] > 0
    models = {row["model"]: row for row in body["models"]}
    assert tuple(models["gpt-5"][k] for k in split) == (0, 0, 3000, 30)
    assert models["aardvark-1"]["cost_usd"] is None
    assert set(models["gpt-5"]) >= {"reported_models", "calls", "estimated_calls", "cost_usd"}
    schema = operator.get("/api/schema/?format=json").json()
    component = schema["components"]["schemas"]["UsageModelOutput"]
    assert set(split) <= set(component["properties"])


def expected_order(key: str, descending: bool) -> list[str]:
    names = sorted(EXPECTED, key=lambda m: (EXPECTED[m]["provider"], m))
    if key == "model":
        return sorted(names, reverse=descending)
    if key == "provider":
        return names[::-1] if descending else names
    if key == "cost":
        costs = {r["model"]: r["cost_usd"] for r in get_usage_overview(period="month")["models"]}
        priced = [m for m in names if costs[m] is not None]
        unpriced = [m for m in names if costs[m] is None]
        assert "aardvark-1" in unpriced and len(priced) >= 2
        return sorted(priced, key=lambda m: costs[m], reverse=descending) + unpriced
    return sorted(names, key=lambda m: EXPECTED[m][key], reverse=descending)


@pytest.mark.usefixtures("usage")
@pytest.mark.parametrize("key", ["model", "provider", "in", "out", "core", "aux", "cost"])
def test_the_model_table_sorts_by_each_column_and_reversed(operator: Client, key: str) -> None:
    for descending in (False, True):
        sort = f"-{key}" if descending else key
        html = panel(operator, f"period=month&sort={sort}")
        assert table_models(html) == expected_order(key, descending), sort
        attributes, link = header(html, key)
        # The current column says so, and its link reverses it.
        assert f'aria-sort="{"descending" if descending else "ascending"}"' in attributes
        assert ("▼" if descending else "▲") in html[html.index(f'id="sort-{key}"') :][:400]
        assert link == (key if descending else f"-{key}")
        assert f'<input type="hidden" name="sort" value="{sort}">' in html
        others = [k for k in ("model", "provider", "in", "out", "core", "aux", "cost") if k != key]
        assert all("aria-sort" not in header(html, k)[0] for k in others)


@pytest.mark.usefixtures("usage")
def test_a_column_not_sorted_by_sorts_text_a_to_z_and_numbers_largest_first(
    operator: Client,
) -> None:
    html = panel(operator)  # the default: provider, then model
    assert table_models(html) == expected_order("provider", False)
    assert header(html, "provider") == (' aria-sort="ascending"', "-provider")
    assert header(html, "model")[1] == "model"
    assert {header(html, k)[1] for k in ("in", "out", "core", "aux", "cost")} == {
        "-in",
        "-out",
        "-core",
        "-aux",
        "-cost",
    }
    # Every link keeps the period; the period tabs keep the sort.
    assert 'hx-get="/dashboard/usage/partial?period=month&amp;sort=-in"' in html
    assert 'href="/dashboard/caps/?period=month&amp;sort=-in"' in html
    week = panel(operator, "period=month&sort=-out")
    assert 'id="period-week"' in week
    assert 'hx-get="/dashboard/usage/partial?period=week&amp;sort=-out"' in week


@pytest.mark.usefixtures("usage")
@pytest.mark.parametrize("sort", ["bogus", "--in", "-", "in-", "<script>", "password"])
def test_a_bad_sort_is_the_default_sort_not_an_error(operator: Client, sort: str) -> None:
    html = panel(operator, f"period=month&sort={sort}")
    assert table_models(html) == expected_order("provider", False)
    assert '<input type="hidden" name="sort" value="provider">' in html
    assert "<script>" not in html


def chart(html: str, provider: str) -> str:
    for figure in re.findall(r'<figure class="usage-chart.*?</figure>', html, re.S):
        if re.search(rf"<figcaption>.*?</span>{re.escape(provider)} ", figure):
            return str(figure)
    raise AssertionError(f"no chart for {provider}")


def y_of(figure: str, value: int) -> float:
    """The y a value has on the chart's axis, from its labelled ticks (0 and the top)."""
    ticks = {
        int(v): float(y)
        for y, v in re.findall(
            r'<text class="y-tick" x="[^"]*" y="([^"]*)"[^>]*data-value="(\d+)"', figure
        )
    }
    assert 0 in ticks and len(ticks) == 3, ticks
    top = max(ticks)
    return ticks[0] + (ticks[top] - ticks[0]) * value / top


@pytest.mark.usefixtures("usage")
def test_the_chart_draws_a_providers_daily_cap_at_its_height_and_dates_on_its_axis(
    operator: Client,
) -> None:
    record(ZETA, "aardvark-1", "builder", 400, 0, at=timezone.now() - timedelta(days=3))
    html = panel(operator)
    figure = chart(html, ZETA)
    assert 'role="img"' in figure
    assert re.search(r'aria-label="zeta: tokens per day [^"]*daily cap 3,000"', figure)
    assert '<svg viewBox="0 0 360 150" width="100%"' in figure
    (cap_y,) = re.findall(r'class="cap-line"[^>]* y1="([^"]*)"', figure)
    assert abs(float(cap_y) - y_of(figure, 3_000)) < 0.11
    assert re.search(r'stroke-dasharray="[^"]+"[^>]*data-value="3000"', figure)
    assert "cap 3,000" in figure
    # y labels with thousands separators: 0, 2,500 and 5,000 (the cap is inside the scale).
    assert re.findall(r'data-value="\d+">([\d,]+)</text>', figure) == ["0", "2,500", "5,000"]
    # Today's bar: its height is its tokens on the same scale; the tooltip says the day.
    today = timezone.now().date()
    (bar_y, tokens) = re.findall(
        rf'class="usage-bar"[^>]* y="([^"]*)"[^>]*data-day="{today:%Y-%m-%d}" data-tokens="(\d+)"',
        figure,
    )[0]
    assert int(tokens) == 1_155
    assert abs(float(bar_y) - y_of(figure, 1_155)) < 0.11
    title = "1,155 tokens (core 105 · agents 1,050 · outside tools 0)"
    assert f"<title>{label(today)}: {title}</title>" in figure
    earlier = today - timedelta(days=3)
    title = "400 tokens (core 400 · agents 0 · outside tools 0)"
    assert f"<title>{label(earlier)}: {title}</title>" in figure
    # Dates under every seventh day, the last one today's, at the right end.
    dates = re.findall(r'class="x-tick"[^>]*data-date="([^"]+)">([^<]+)</text>', figure)
    assert [d for d, _ in dates] == [
        f"{today - timedelta(days=n):%Y-%m-%d}" for n in (28, 21, 14, 7, 0)
    ]
    assert dates[-1][1] == label(today)
    assert f'text-anchor="end" data-date="{today:%Y-%m-%d}"' in figure
    # The legend names every charted provider beside its colour, and the cap's dash.
    legend = html[html.index('<ul class="usage-legend"') :]
    legend = legend[: legend.index("</ul>")]
    for provider in ("anthropic", "glm", "openai", ZETA):
        swatch = r'<li class="usage-series-\d"><span class="usage-swatch"[^>]*></span>'
        assert re.search(rf"{swatch}{provider}</li>", legend)
    assert "daily cap" in text(legend)


def label(day: date) -> str:
    return f"{day:%b} {day.day}"


def test_a_provider_without_a_daily_cap_gets_no_cap_line(operator: Client) -> None:
    record("nocap", "m-1", CODEX, 10, 1)
    figure = chart(panel(operator), "nocap")
    assert "cap-line" not in figure and "no daily cap" in figure


def test_providers_keep_their_own_colour(operator: Client) -> None:
    record("anthropic", "claude-sonnet-4-5", "builder", 10, 1)
    record("openai", "gpt-5", "builder", 10, 1)
    html = panel(operator)
    assert 'class="usage-chart usage-series-1"' in chart(html, "anthropic")
    assert 'class="usage-chart usage-series-0"' in chart(html, "openai")


def test_a_model_or_provider_name_with_markup_stays_text(operator: Client) -> None:
    model = "<img src=x onerror=alert(1)>"
    provider = '<b onmouseover="alert(2)">evil</b>'
    record(provider, model, CODEX, 10, 1)
    html = panel(operator)
    assert "<img src=x" not in html and "<b onmouseover" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;b onmouseover=&quot;alert(2)&quot;&gt;evil&lt;/b&gt;" in html
    sorted_html = panel(operator, "period=month&sort=model")
    assert "<img src=x" not in sorted_html


def test_the_panel_keeps_the_contract_the_live_tick_relies_on(operator: Client) -> None:
    html = panel(operator, "period=day&sort=-aux")
    assert html.startswith('<div id="usage">')
    assert (
        '<span id="usage-params" hidden><input type="hidden" name="period" value="day">'
        '<input type="hidden" name="sort" value="-aux"></span>'
    ) in html
    oob = render_to_string("dashboard/_usage.html", {**usage_context(period="day"), "oob": True})
    assert oob.startswith('<div id="usage" hx-swap-oob="true">')
    assert "<dialog" not in html and "<form" not in html and "<details" not in html


def test_usage_context_still_takes_only_a_period(operator: Client) -> None:
    context = usage_context(period="week")
    assert context["sort"] == "provider" and context["period"] == "week"


def usage_queries(**kwargs: Any) -> int:
    with CaptureQueriesContext(connection) as captured:
        usage_context(**kwargs)
    return len(captured.captured_queries)


@pytest.mark.usefixtures("usage")
def test_the_panel_costs_eight_queries_however_many_models_and_days(
    django_assert_max_num_queries: Any,
) -> None:
    # The period's usage and the chart 3; the cap windows 3 (ProviderWindow, ProviderQuota, their
    # usage and every provider's last hour in one statement, usage.forecast), the providers'
    # latest limits 1 (runs.selectors.provider_panels) and the reconciliation 1 (no provider
    # usage API read yet: usage.reconcile).
    with django_assert_max_num_queries(8):
        usage_context(period="month", sort="-cost")
    before = usage_queries(period="week", sort="-core")
    for n in range(40):  # more models, providers, agents and days
        at = timezone.now() - timedelta(days=n % 29)
        record(f"p{n % 7}", f"model-{n}", f"agent:a{n}", 10 + n, n, at=at)
    usage_fold()
    record("p1", "model-x", "builder", 1, 1)
    # One more only when a rolling window's oldest usage lies in a folded hour (its reset to the
    # second); the committed windows' rolling ones read it here once there is usage.
    assert usage_queries(period="week", sort="-core") == before <= 9
