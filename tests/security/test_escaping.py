"""Markup a model writes is shown as text: builder output, auditor summaries and issue titles
with HTML and script, from a real run on a worker, are escaped on every page that shows them."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from runs import services
from runs.models import HumanNote, Phase, Run
from runs.plans import parse_plan_bytes
from runs.states import RunState
from tests.conftest import WorkerProcess, wait_for
from tests.security.conftest import session_client
from tests.sim_fixtures import write_reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.needs_broker]

XSS = '<script>alert("xss")</script><img src=x onerror=alert(1)>'
RAW = ("<script>alert", "<img src=x")
ESCAPED = "&lt;script&gt;alert("

PLAN = b"""
name: Escaping check
max_attempts: 2
tiers:
  - name: Only
    phases:
      - {name: Alpha step, category: ui, complexity: low}
      - {name: Beta step, category: ui, complexity: low}
"""


def verdict(kind: str, where: str) -> dict[str, Any]:
    return {
        "verdict": kind,
        "summary": f"{where} summary {XSS}",
        "issues": [{"severity": "major", "title": f"{where} title {XSS}", "detail": XSS}],
    }


def assert_escaped(client: Client, path: str, *, expect: bool = True) -> str:
    response = client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    html = response.content.decode()
    for raw in RAW:
        assert raw not in html, f"{path} shows unescaped markup {raw!r}"
    if expect:
        # The text did reach the page (escaped), so the check above is not vacuous.
        assert ESCAPED in html, f"{path} does not show the model's text at all"
    return html


def test_model_output_with_html_and_script_is_escaped_on_every_page(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    sim.add_script(
        role="builder", text=write_reply({"notes.md": "x\n"}, note=f"Built it. {XSS}"), count=-1
    )
    sim.add_script(role="auditor", match="Alpha step", verdict=verdict("revise", "A1"), count=1)
    sim.add_script(role="auditor", match="Alpha step", verdict=verdict("approve", "A2"), count=1)
    sim.add_script(role="auditor", match="Beta step", verdict=verdict("revise", "B"), count=-1)
    run = services.run_create(plan=parse_plan_bytes(PLAN))
    services.run_start(run_id=run.pk)
    wait_for(
        lambda: Run.objects.get(pk=run.pk).state in (RunState.FAILED, RunState.COMPLETED),
        timeout=90,
        what="the run to finish",
    )
    alpha, beta = Phase.objects.filter(run=run).order_by("position")
    assert alpha.auditor_verdict is not None
    assert XSS in alpha.builder_output and XSS in alpha.auditor_verdict["summary"]
    assert beta.state == "failed"

    root = User.objects.create_superuser("root", "root@example.com", "x")
    web = session_client(root)
    # A note with markup, through the dashboard like a person would.
    note = web.post(
        f"/dashboard/runs/{run.pk}/notes", {"text": f"note {XSS}"}, HTTP_HX_REQUEST="true"
    )
    assert note.status_code == 200 and HumanNote.objects.filter(run=run).count() == 1
    for raw in RAW:
        assert raw not in note.content.decode()
    assert ESCAPED in note.content.decode()

    dashboard = assert_escaped(web, f"/dashboard/?run={run.pk}")
    assert "A2 title &lt;script&gt;" in dashboard  # an auditor issue title, in the chat block
    assert "note &lt;script&gt;" in dashboard  # the note
    assert_escaped(web, f"/dashboard/runs/{run.pk}/progress")
    assert_escaped(web, f"/admin/runs/run/{run.pk}/change/")
    assert_escaped(web, "/admin/runs/humannote/")
    assert_escaped(web, "/admin/runs/phase/", expect=False)
    for phase in (alpha, beta):
        page = assert_escaped(web, f"/admin/runs/phase/{phase.pk}/change/")
        assert "Built it. &lt;script&gt;" in page  # the builder output
    assert_escaped(web, "/admin/runs/phaseroutingdecision/", expect=False)
    assert_escaped(web, "/admin/runs/guardfiring/", expect=False)
    assert_escaped(web, f"/admin/runs/humannote/{HumanNote.objects.get().pk}/change/")
