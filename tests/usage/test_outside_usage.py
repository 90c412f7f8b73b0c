"""Outside tools apart (issue 17): a person's own Claude Code reporting over OTLP is usage from
outside tools (source otel). Per provider, `outside_usage` says what its cap windows count:
`share` (the default) Autopack's usage (workers and agents) against cap × autopack_share,
outside tools left out; `whole_cap` everything seen against the whole cap. The usage panel, the
usage API and MCP's summary keep core (builder, auditor), agents and outside tools apart.

A Claude Code-shaped export is POSTed to the live server (built as tests/usage/test_otlp.py
builds it) beside worker and agent usage recorded through the services; some of it folded,
some pending."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db.models import Sum
from django.test import Client

from routing.admin import ProviderQuotaForm
from routing.config import OUTSIDE_USAGE_MODES, ModelsConfigError, parse_models_config
from routing.mapping import models_export, models_import
from routing.models import RoutingPolicy
from runs.selectors import usage_summary
from tests.factories import set_provider_keys
from tests.usage.test_otlp import AT, claude_code_logs, export, make_token
from usage.models import (
    OutsideUsage,
    ProviderQuota,
    ProviderWindow,
    UsageEvent,
    UsageMinuteRollup,
    UsageRollup,
    UsageSource,
)
from usage.selectors import get_provider_usage_summary, window_usage
from usage.services import UsageRecord, provider_quota_upsert, record_usage, usage_fold
from usage.types import TokenUsage

MODELS_YAML = Path(__file__).resolve().parents[2] / "config" / "models.yaml"
PLAN_CAP = 1_000_000  # the session window's plan cap; Autopack's share is half of it
SHARE = Decimal("0.5")
# Autopack's own: the builder (core) and an agent over POST /usage/events (aux).
BUILDER = (1000, 100)
PLANNER = (200, 20)


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    set_provider_keys(monkeypatch)
    cache.clear()  # the OTLP route's throttles
    yield


def record(role: str, tokens: tuple[int, int], *, source: str, at: datetime) -> None:
    record_usage(
        record=UsageRecord(
            call_id=uuid.uuid4().hex,
            provider="anthropic",
            model="claude-sonnet-4-5",
            role=role,
            usage=TokenUsage(prompt_tokens=tokens[0], completion_tokens=tokens[1]),
            created_at=at,
            source=source,
        )
    )


@pytest.fixture
def seen(live_server: Any, transactional_db: None) -> dict[str, tuple[int, int]]:
    """anthropic with a 5-hour session window (cap 1 M, share 0.5), the builder's and an
    agent's usage, and Claude Code's calls exported over OTLP. Returns the tokens (in, out) of
    each part: core, aux, outside."""
    ProviderWindow.objects.filter(provider="anthropic").delete()
    provider_quota_upsert(
        provider="anthropic",
        daily_cap_tokens=None,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share=SHARE,
        soft_limit="0.8",
    )
    ProviderWindow.objects.create(
        provider="anthropic", name="session", kind="rolling", hours=5, cap_tokens=PLAN_CAP
    )
    record("builder", BUILDER, source=UsageSource.WORKER, at=AT)
    usage_fold()  # folded; the agent's call stays pending
    record("agent:planner", PLANNER, source=UsageSource.API, at=AT + timedelta(seconds=30))
    code, answer = export(live_server.url, "logs", claude_code_logs(), make_token("cc"))
    assert code == 200, answer
    outside = UsageEvent.objects.filter(source=UsageSource.OTEL).aggregate(
        tin=Sum("prompt_tokens"), tout=Sum("completion_tokens")
    )
    assert UsageEvent.objects.filter(source=UsageSource.OTEL, role="agent:claude-code").count()
    return {"core": BUILDER, "aux": PLANNER, "outside": (outside["tin"], outside["tout"])}


def session(now: datetime | None = None) -> dict[str, Any]:
    [row] = window_usage(now=now, providers=["anthropic"])
    return row


def set_mode(mode: str) -> None:
    ProviderQuota.objects.filter(provider="anthropic").update(outside_usage=mode)


def test_the_rollups_keep_outside_tools_usage_apart(seen: dict[str, tuple[int, int]]) -> None:
    usage_fold()
    tin, tout = seen["outside"]
    hourly = UsageRollup.objects.filter(outside=True).aggregate(
        tin=Sum("prompt_tokens"), tout=Sum("completion_tokens")
    )
    assert (hourly["tin"], hourly["tout"]) == (tin, tout)
    assert set(UsageRollup.objects.filter(outside=True).values_list("role", flat=True)) == {
        "agent:claude-code"
    }
    minutes = UsageMinuteRollup.objects.filter(outside=True).aggregate(
        tin=Sum("prompt_tokens"), tout=Sum("completion_tokens")
    )
    assert (minutes["tin"], minutes["tout"]) == (tin, tout)
    autopack = UsageRollup.objects.filter(outside=False).aggregate(t=Sum("prompt_tokens"))["t"]
    assert autopack == BUILDER[0] + PLANNER[0]


@pytest.mark.parametrize("fold", [False, True])
def test_share_counts_only_autopacks_usage_against_its_share_of_the_cap(
    seen: dict[str, tuple[int, int]], fold: bool
) -> None:
    if fold:
        usage_fold()
    row = session()
    autopack = sum(seen["core"]) + sum(seen["aux"])
    assert row["counts"] == "autopack"
    assert row["tokens"] == autopack  # Claude Code's calls are not held against the cap
    assert row["requests"] == 2
    assert row["caps"]["tokens"] == int(PLAN_CAP * SHARE)
    assert row["percent"] == pytest.approx(autopack * 100 / int(PLAN_CAP * SHARE))
    # A rolling window's reset: its oldest counted usage (the builder's call) + 5 h.
    assert row["reset"] == AT + timedelta(hours=5)


@pytest.mark.parametrize("fold", [False, True])
def test_whole_cap_counts_everything_seen_against_the_whole_cap(
    seen: dict[str, tuple[int, int]], fold: bool
) -> None:
    set_mode(OutsideUsage.WHOLE_CAP)
    if fold:
        usage_fold()
    row = session()
    everything = sum(seen["core"]) + sum(seen["aux"]) + sum(seen["outside"])
    assert row["counts"] == "everything"
    assert row["tokens"] == everything
    assert row["requests"] == 2 + UsageEvent.objects.filter(source=UsageSource.OTEL).count()
    # The whole plan cap, the share not applied: what is left is the cap less everything seen.
    assert row["caps"]["tokens"] == PLAN_CAP
    assert row["percent"] == pytest.approx(everything * 100 / PLAN_CAP)
    # Back to share: the same usage, Autopack's part only, against half the cap.
    set_mode(OutsideUsage.SHARE)
    again = session()
    assert (again["tokens"], again["caps"]["tokens"]) == (
        sum(seen["core"]) + sum(seen["aux"]),
        int(PLAN_CAP * SHARE),
    )


def test_the_legacy_period_caps_follow_the_mode_too(seen: dict[str, tuple[int, int]]) -> None:
    ProviderQuota.objects.filter(provider="anthropic").update(monthly_cap_tokens=PLAN_CAP)
    autopack = sum(seen["core"]) + sum(seen["aux"])
    everything = autopack + sum(seen["outside"])
    [row] = [r for r in get_provider_usage_summary(period="month") if r["provider"] == "anthropic"]
    assert (row["counts"], row["counted_tokens"], row["cap"]) == (
        "autopack",
        autopack,
        int(PLAN_CAP * SHARE),
    )
    assert row["total_tokens"] == everything  # everything seen is still shown
    assert (row["outside_tokens_in"], row["outside_tokens_out"]) == seen["outside"]
    set_mode(OutsideUsage.WHOLE_CAP)
    [row] = [r for r in get_provider_usage_summary(period="month") if r["provider"] == "anthropic"]
    assert (row["counts"], row["counted_tokens"], row["cap"]) == (
        "everything",
        everything,
        PLAN_CAP,
    )


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_the_panel_the_api_and_mcp_show_the_three_parts(
    seen: dict[str, tuple[int, int]],
) -> None:
    client = Client()
    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    (core_in, core_out), (aux_in, aux_out) = seen["core"], seen["aux"]
    out_in, out_out = seen["outside"]

    html = client.get("/dashboard/usage/partial?period=month").content.decode()
    card = re.search(
        r'<div class="card"><span class="badge \w+">anthropic</span>(.*?)</div></div>', html, re.S
    )
    assert card
    words = text(card.group(1))
    assert (
        f"core {core_in:,} in / {core_out:,} out · agents {aux_in:,} in / {aux_out:,} out · "
        f"outside tools {out_in:,} in / {out_out:,} out"
    ) in words
    assert "outside tools not counted" in words
    sonnet = UsageEvent.objects.filter(
        source=UsageSource.OTEL, model="claude-sonnet-4-5"
    ).aggregate(tin=Sum("prompt_tokens"), tout=Sum("completion_tokens"))
    row = html[html.index('<td class="model">claude-sonnet-4-5') :]
    row = row[: row.index("</tr>")]
    assert f'<td class="split outside">{sonnet["tin"]:,} / {sonnet["tout"]:,}</td>' in row
    assert '<a id="sort-outside"' in html

    body = client.get("/dashboard/usage?period=month").json()
    [provider] = [p for p in body["providers"] if p["provider"] == "anthropic"]
    assert (provider["outside_tokens_in"], provider["outside_tokens_out"]) == (out_in, out_out)
    assert (provider["aux_tokens_in"], provider["core_tokens_in"]) == (aux_in, core_in)
    assert provider["counts"] == "autopack"
    [window] = provider["windows"]
    autopack = core_in + core_out + aux_in + aux_out
    assert (window["counts"], window["used"]["tokens"]) == ("autopack", autopack)
    models = [m for m in body["models"] if m["provider"] == "anthropic"]
    assert sum(m["outside_tokens_in"] for m in models) == out_in
    schema = client.get("/api/schema/?format=json").json()["components"]["schemas"]
    for name in ("UsageProviderOutput", "UsageModelOutput"):
        assert {"outside_tokens_in", "outside_tokens_out"} <= set(schema[name]["properties"])
    assert "counts" in schema["WindowOutput"]["properties"]

    set_mode(OutsideUsage.WHOLE_CAP)
    summary = usage_summary(period="month")
    [provider] = [p for p in summary["providers"] if p["provider"] == "anthropic"]
    assert provider["counts"] == "everything"
    assert (provider["outside_tokens_in"], provider["outside_tokens_out"]) == (out_in, out_out)
    html = client.get("/dashboard/usage/partial?period=month").content.decode()
    assert "The caps count everything seen, outside tools too" in text(html)


# --- the setting ------------------------------------------------------------------------------


def committed() -> dict[str, Any]:
    return yaml.safe_load(MODELS_YAML.read_text())


def test_the_modes_are_the_models_choices() -> None:
    assert tuple(OutsideUsage.values) == OUTSIDE_USAGE_MODES


@pytest.mark.django_db
def test_outside_usage_is_read_from_models_yaml_applied_and_exported() -> None:
    data = committed()
    assert data["providers"]["anthropic"]["outside_usage"] == "share"
    data["providers"]["openai"]["outside_usage"] = "whole_cap"
    models_import(data=data)
    modes = dict(ProviderQuota.objects.values_list("provider", "outside_usage"))
    assert modes["openai"] == "whole_cap" and modes["anthropic"] == "share"
    # Not given: share, as before.
    assert all(mode == "share" for provider, mode in modes.items() if provider != "openai")
    exported = models_export()["providers"]
    assert exported["openai"]["outside_usage"] == "whole_cap"
    assert parse_models_config(models_export()).providers["openai"].outside_usage == "whole_cap"


@pytest.mark.parametrize("bad", ["all", "", True, 1, ["share"]])
def test_a_bad_mode_is_refused_with_its_key(bad: Any) -> None:
    data = committed()
    data["providers"]["anthropic"]["outside_usage"] = bad
    with pytest.raises(
        ModelsConfigError, match=r"^providers\.anthropic\.outside_usage: one of share, whole_cap"
    ):
        parse_models_config(data)


@pytest.mark.django_db
def test_the_admin_edits_the_mode_and_refuses_a_bad_one() -> None:
    quota = provider_quota_upsert(
        provider="anthropic",
        daily_cap_tokens=None,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share="0.5",
        soft_limit="0.8",
    )
    fields = {
        "provider": "anthropic",
        "autopack_share": "0.5",
        "soft_limit": "0.8",
    }
    bad = ProviderQuotaForm(data={**fields, "outside_usage": "all"}, instance=quota)
    assert not bad.is_valid()
    assert list(bad.errors) == ["outside_usage"]
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    version = RoutingPolicy.objects.get(pk=1).version
    caps = {"daily_cap_tokens": "", "weekly_cap_tokens": "", "monthly_cap_tokens": ""}
    response = client.post(
        f"/admin/usage/providerquota/{quota.pk}/change/",
        {**fields, **caps, "outside_usage": "whole_cap"},
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert ProviderQuota.objects.get(provider="anthropic").outside_usage == "whole_cap"
    # The router re-reads its quota state: the save moved the version.
    assert RoutingPolicy.objects.get(pk=1).version > version
