"""The model panel and its change dialog (issue 15, item 6): the rows a run uses, what a change
would do said in words, a global change only when confirmed (checked by the server), and a run
that finished meanwhile told so in a sentence."""

from __future__ import annotations

import re
from html import unescape
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from routing.models import CatalogueModel, ModelChange, ModelRoute, RoutingPolicy
from routing.router import router
from routing.types import RouteKey
from runs import selectors, services
from runs.models import Phase, Run
from runs.plans import parse_plan_bytes, validate_plan
from runs.states import PhaseState, RunState
from tests.conftest import ROOT
from tests.factories import set_provider_keys, staff_user

pytestmark = pytest.mark.django_db
EXAMPLE = ROOT / "examples" / "plan.yaml"
HX = {"HX-Request": "true"}


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    set_provider_keys(monkeypatch)


@pytest.fixture
def operator() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    return client


@pytest.fixture
def reloads(django_capture_on_commit_callbacks: Any) -> Any:
    """A mapping change reloads every router on commit; the test's transaction never commits,
    so its on-commit callbacks are run where they are captured."""
    return django_capture_on_commit_callbacks(execute=True)


def example_run(*, start: bool = True) -> Run:
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    if start:
        services.run_start(run_id=run.pk)
    run.refresh_from_db()
    return run


def panel_keys(html: str) -> set[str]:
    return set(re.findall(r'data-key="([^"]+)"', html))


def text(html: str) -> str:
    """What a person reads: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def mapping_state() -> tuple[int, list[tuple[Any, ...]]]:
    routes = sorted(ModelRoute.objects.values_list("layer", "role", "category", "model_id"))
    return ModelChange.objects.count(), routes


def change(client: Client, run: Run | None, **fields: str) -> Any:
    data = {"role": "builder", "category": "ui", "complexity": "low", "model": "gpt-6-luna"}
    data.update(fields)
    if run is not None:
        data.setdefault("run", str(run.pk))
    return client.post("/dashboard/mapping", data, headers=HX)


# --- the panel --------------------------------------------------------------------------------


def test_a_runs_panel_shows_exactly_the_rows_its_phases_use(operator: Client) -> None:
    run = example_run()
    pairs = set(run.phases.values_list("category", "complexity"))
    assert len(pairs) == 8  # nine phases; core_backend:medium twice
    response = operator.get(f"/dashboard/mapping?run={run.pk}", headers=HX)
    assert response.status_code == 200
    html = response.content.decode()
    assert panel_keys(html) == {f"{r}:{c}:{x}" for r in ("builder", "auditor") for c, x in pairs}
    # grouped by category, each row with its model, where it comes from, and one Change
    groups = [g["label"] for g in response.context["mapping_groups"]]
    assert groups == sorted({c for c, _ in pairs})
    assert html.count('class="map-change"') == 16
    assert "Apply as global default" not in html and "<select" not in html
    assert 'id="mapping-show-all"' in html


def test_show_all_lists_every_row_and_the_global_page_lists_them_without_a_run(
    operator: Client,
) -> None:
    run = example_run()
    used = panel_keys(operator.get(f"/dashboard/mapping?run={run.pk}", headers=HX).content.decode())
    every = operator.get(f"/dashboard/mapping?run={run.pk}&models=all", headers=HX)
    every_keys = panel_keys(every.content.decode())
    assert used < every_keys and "builder:*:low" in every_keys
    assert 'id="mapping-show-used"' in every.content.decode()
    glob = operator.get("/dashboard/mapping", headers=HX)
    assert glob.context["mapping_run"] is None
    assert panel_keys(glob.content.decode()) == every_keys
    assert "any category" in text(glob.content.decode())


def test_the_panel_says_where_each_model_comes_from(operator: Client, reloads: Any) -> None:
    run = example_run()
    with reloads:
        services.run_model_override(
            run_id=run.pk, role="auditor", category="ui", complexity="low", model="glm-5.3"
        )
    groups = selectors.mapping_context(run_id=run.pk)["mapping_groups"]
    rows = {(r["role"], r["category"], r["complexity"]): r for g in groups for r in g["rows"]}
    assert rows[("auditor", "ui", "low")]["model"] == "glm-5.3"
    assert rows[("auditor", "ui", "low")]["source_label"] == "run override"
    assert rows[("builder", "ui", "low")]["source_label"] == "default"


def test_the_full_list_stays_while_the_page_address_asks_for_it(operator: Client) -> None:
    run = example_run()
    page = f"http://testserver/dashboard/?run={run.pk}&models=all"
    # A request without its own `models` (a tick, a saved change) follows the page's address,
    # which the "Show all rows" link pushes; the link back says models=used.
    kept = operator.get(f"/dashboard/mapping?run={run.pk}", headers={**HX, "HX-Current-URL": page})
    assert kept.context["mapping_show_all"] is True
    back = operator.get(
        f"/dashboard/mapping?run={run.pk}&models=used", headers={**HX, "HX-Current-URL": page}
    )
    assert back.context["mapping_show_all"] is False


def test_the_page_without_javascript_goes_to_the_full_list(operator: Client) -> None:
    run = example_run()
    response = operator.get(f"/dashboard/mapping?run={run.pk}&models=all")
    assert response.status_code == 302
    assert response["Location"].endswith(f"?run={run.pk}&models=all#mapping")


# --- the dialog -------------------------------------------------------------------------------


def dialog(client: Client, run: Run | None, **params: str) -> Any:
    query = {"role": "builder", "category": "core_backend", "complexity": "medium", **params}
    if run is not None:
        query["run"] = str(run.pk)
    return client.get("/dashboard/mapping/dialog", query, headers=HX)


def test_the_dialog_says_what_each_scope_changes_with_names_and_counts(operator: Client) -> None:
    run = example_run()
    Phase.objects.filter(run=run, position=1).update(state=PhaseState.COMPLETE)
    response = dialog(operator, run)
    assert response.status_code == 200
    words = text(response.content.decode())
    model = router.select(RouteKey("builder", "core_backend", "medium"), with_quota=False).model
    # two core_backend/medium phases; the first is done, so one is still to start
    assert (
        f"For run #{run.pk} only: its 1 phase not yet started with category core_backend, "
        f"complexity medium will use {model} for the builder; phases already done or in "
        "progress keep their model."
    ) in words
    assert (
        f"Global default: runs started from now on use {model} for the builder on category "
        f"core_backend, complexity medium; the one run under way keeps its own (run #{run.pk})."
    ) in words
    html = response.content.decode()
    assert 'id="model-apply-run"' in html and 'name="confirm"' in html
    assert 'hx-post="/dashboard/mapping"' in html and 'method="post"' in html


def test_the_dialog_without_a_run_offers_the_global_default_only(operator: Client) -> None:
    example_run(start=False)
    words = text(dialog(operator, None, category="*", complexity="low").content.decode())
    assert "For run" not in words
    assert (
        "runs started from now on use gpt-6-luna for the builder on every category without a "
        "row of its own, complexity low, and so does the one run not started yet; runs under "
        "way keep theirs (none is now)."
    ) in words


def test_without_javascript_the_dialog_is_a_page_with_a_plain_form(operator: Client) -> None:
    run = example_run()
    page = operator.get(
        "/dashboard/mapping/dialog",
        {"role": "auditor", "category": "ui", "complexity": "low", "run": str(run.pk)},
    )
    html = page.content.decode()
    assert page.status_code == 200 and "<!doctype html>" in html
    assert 'method="post" action="/dashboard/mapping"' in html
    assert f'href="/dashboard/?run={run.pk}" id="model-cancel"' in html
    saved = operator.post(
        "/dashboard/mapping",
        {"role": "auditor", "category": "ui", "complexity": "low", "model": "glm-5.3"}
        | {"run": str(run.pk), "scope": "run"},
    )
    assert saved.status_code == 302
    run.refresh_from_db()
    assert run.run_context["model_overrides"]["auditor"]["ui:low"] == "glm-5.3"
    refused = operator.post(
        "/dashboard/mapping",
        {"role": "auditor", "category": "ui", "complexity": "low", "model": "glm-5.3"}
        | {"scope": "global"},
    )
    assert refused.status_code == 200 and "<!doctype html>" in refused.content.decode()
    assert "nothing was changed" in text(refused.content.decode())


def test_the_dialog_refuses_a_row_that_is_not_one(operator: Client) -> None:
    response = dialog(operator, None, category="<script>alert(1)</script>")
    html = response.content.decode()
    assert response.status_code == 200
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert 'class="model-form"' not in html and "model-refused" in html


# --- saving -----------------------------------------------------------------------------------


def test_a_global_change_without_its_confirmation_is_refused_and_changes_nothing(
    operator: Client, reloads: Any
) -> None:
    run = example_run()
    before = mapping_state()
    with reloads:
        response = change(operator, run, scope="global")
    assert response.status_code == 200
    assert response.context["mapping_error"] == (
        "A global default changes only with “Yes, change the global default” ticked; "
        "nothing was changed."
    )
    html = response.content.decode()
    assert 'id="model-dialog-error"' in html and 'class="model-form"' in html  # stays open
    assert 'hx-swap-oob="true"' not in html
    assert mapping_state() == before
    assert not ModelRoute.objects.filter(layer=ModelRoute.Layer.GLOBAL_OVERRIDE).exists()


def test_a_confirmed_global_change_is_applied_and_the_panel_shows_it(
    operator: Client, reloads: Any
) -> None:
    before_changes = ModelChange.objects.count()
    with reloads:
        response = change(operator, None, scope="global", confirm="yes", model="glm-5.3")
    assert response.status_code == 200
    html = response.content.decode()
    # The dialog gets nothing (it closes); the panel comes out of band with the change.
    assert html.lstrip().startswith('<div id="mapping" class="mapping" hx-swap-oob="true">')
    assert "Saved: builder · ui · low → glm-5.3, the global default" in text(html)
    # The router reloads on commit (here: when `reloads` ends; on a server: before the panel).
    panel = operator.get("/dashboard/mapping", headers=HX).content.decode()
    assert re.search(r'data-key="builder:ui:low">.*?glm-5\.3.*?global override', panel, re.S)
    assert ModelChange.objects.count() == before_changes + 1
    route = ModelRoute.objects.get(
        layer=ModelRoute.Layer.GLOBAL_OVERRIDE, role="builder", category="ui", complexity="low"
    )
    assert route.model.name == "glm-5.3"
    new = example_run()
    assert new.run_context["mapping"]["builder"]["ui:low"]["model"] == "glm-5.3"


def test_a_run_change_applies_to_that_run_only(operator: Client, reloads: Any) -> None:
    run = example_run()
    before = ModelRoute.objects.count()
    with reloads:
        response = change(operator, run, scope="run", model="glm-5.3")
    html = response.content.decode()
    assert f"Saved: builder · ui · low → glm-5.3, for run #{run.pk} only." in text(html)
    assert re.search(r'data-key="builder:ui:low">.*?glm-5\.3.*?run override', html, re.S)
    run.refresh_from_db()
    assert run.run_context["model_overrides"]["builder"]["ui:low"] == "glm-5.3"
    assert ModelRoute.objects.count() == before


def test_a_run_change_for_a_run_that_finished_meanwhile_is_refused_in_a_sentence(
    operator: Client, reloads: Any
) -> None:
    run = example_run()
    services.run_stop(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == RunState.STOPPED
    before = mapping_state()
    with reloads:
        response = change(operator, run, scope="run")
    assert response.context["mapping_error"] == (
        f"Run {run.pk} has stopped, so a change for it alone no longer applies; "
        "nothing was changed."
    )
    html = response.content.decode()
    # The dialog stays open with the error, and offers the global scope only now.
    assert 'id="model-dialog-error"' in html and 'id="model-apply-run"' not in html
    assert 'id="model-apply-global"' in html and 'id="model-run-finished"' in html
    run.refresh_from_db()
    assert mapping_state() == before and "model_overrides" not in run.run_context
    # Opened afresh, the dialog offers the global scope only too.
    fresh = dialog(operator, run).content.decode()
    assert 'id="model-apply-run"' not in fresh and "has stopped" in text(fresh)


# --- untrusted text, permissions, cost ---------------------------------------------------------


def test_a_model_name_or_category_with_html_stays_escaped(operator: Client) -> None:
    evil = '<img src=x onerror="alert(1)">'
    model = CatalogueModel.objects.create(name=evil, provider="openai")
    ModelRoute.objects.create(
        layer=ModelRoute.Layer.GLOBAL_OVERRIDE,
        role="builder",
        category="",
        complexity="low",
        model=model,
    )
    RoutingPolicy.objects.filter(pk=1).update(version=RoutingPolicy.objects.get(pk=1).version + 1)
    router.invalidate()
    run = example_run()
    Phase.objects.filter(run=run, position=1).update(category="<b>bold</b>")
    panel = operator.get(f"/dashboard/mapping?run={run.pk}", headers=HX).content.decode()
    glob = operator.get("/dashboard/mapping", headers=HX).content.decode()
    form = dialog(operator, run, category="*", complexity="low").content.decode()
    for html in (panel, glob, form):
        assert "<img" not in html and "<b>bold" not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in panel
    assert "&lt;b&gt;bold&lt;/b&gt;" in panel
    assert "&lt;img" in form


def test_a_reader_sees_no_change_link_and_cannot_open_the_dialog() -> None:
    run = example_run()
    reader = Client()
    reader.force_login(staff_user("reader"))
    panel = reader.get(f"/dashboard/mapping?run={run.pk}", headers=HX)
    assert panel.status_code == 200 and b"map-change" not in panel.content
    assert dialog(reader, run).status_code == 403


def test_the_panel_costs_the_same_queries_for_any_run(settings: Any) -> None:
    settings.AUTOPACK_ROUTER_REFRESH_SECONDS = 3600.0
    router.invalidate()
    small = example_run()
    plan = {
        "name": "300 phases",
        "tiers": [
            {
                "name": f"Tier {t}",
                "phases": [
                    {
                        "name": f"Phase {t}.{i}",
                        "category": ["core_backend", "ui", "tests", "docs"][i % 4],
                        "complexity": ["low", "medium", "high"][i % 3],
                    }
                    for i in range(10)
                ],
            }
            for t in range(30)
        ],
    }
    large = services.run_create(plan=validate_plan(plan))
    services.run_start(run_id=large.pk)
    selectors.mapping_context(run_id=small.pk)  # the router's mapping, loaded once
    counts = {}
    for name, kwargs in (
        ("run", {"run_id": small.pk}),
        ("large run", {"run_id": large.pk}),
        ("run, every row", {"run_id": small.pk, "show_all": True}),
        ("global", {"run_id": None}),
    ):
        with CaptureQueriesContext(connection) as captured:
            selectors.mapping_context(**kwargs)
        counts[name] = len(captured.captured_queries)
    assert counts == {"run": 2, "large run": 2, "run, every row": 3, "global": 1}
    row = {"role": "auditor", "category": "ui", "complexity": "low"}
    for run_id, expected in ((small.pk, 4), (large.pk, 4), (None, 2)):
        with CaptureQueriesContext(connection) as captured:
            selectors.mapping_dialog_context(**row, run_id=run_id)
        assert len(captured.captured_queries) == expected, run_id
    router.invalidate()
