"""A run's change is model-written (file names and contents, the builder's reply) or written by
code the model wrote (check output): every page that shows it escapes it, and the patch
download is never rendered as a page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.urls import reverse

from runs.models import Phase, PhaseAttempt
from tests.runs.changes import PASSED_CHECK, record_change
from tests.security.conftest import new_run, session_client

pytestmark = pytest.mark.django_db
SCRIPT = "<script>alert(1)</script>"
IMG = '<img src=x onerror="alert(2)">'
CLOSE_PRE = "</pre></details><script>alert(3)</script>"


@pytest.fixture
def hostile_run(settings: Any, tmp_path: Path) -> Any:
    settings.AUTOPACK_WORKSPACE_ROOT = tmp_path / "workspaces"
    run = new_run(start=True)
    phase = run.phases.get(position=1)
    record_change(
        run,
        phase,
        {f"app/{SCRIPT}.py": f"x = '{SCRIPT}'\n", "app/b.html": f"{IMG}\n{CLOSE_PRE}\n"},
        prompt=f"Autopack-Role: builder\n{CLOSE_PRE}\n",
        reply=f"WRITE app/b.html\n{SCRIPT}",
        checks=[{**PASSED_CHECK, "command": f"echo '{SCRIPT}'", "output": f"{IMG}\n{SCRIPT}"}],
        verdict={
            "decision": "approve",
            "summary": SCRIPT,
            "issues": [{"severity": "minor", "title": IMG, "detail": CLOSE_PRE}],
        },
    )
    PhaseAttempt.objects.filter(phase=phase).update(edit_error=f"block 1: {SCRIPT}")
    return run, phase


def assert_escaped(html: str) -> None:
    assert "alert(" in html  # the hostile text is shown ...
    for raw in (SCRIPT, IMG, "<script>", 'onerror="alert', CLOSE_PRE):
        assert raw not in html, raw  # ... never as markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_diff_checks_and_file_names_show_escaped_on_the_progress_page_and_changes_view(
    hostile_run: Any,
) -> None:
    run, phase = hostile_run
    web = session_client(User.objects.create_superuser("root", "root@example.com", "x"))
    page = web.get(f"/dashboard/?run={run.pk}")
    assert page.status_code == 200
    html = page.content.decode()
    assert "app/&lt;script&gt;alert(1)&lt;/script&gt;.py" in html  # the file list
    assert_escaped(html)
    for headers in ({}, {"HX-Request": "true"}):
        changes = web.get(f"/dashboard/phases/{phase.pk}/changes", headers=headers)
        assert changes.status_code == 200
        html = changes.content.decode()
        assert "+x = &#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;" in html  # the diff
        assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in html  # the check output
        assert_escaped(html)


def test_the_prompt_reply_diff_checks_and_verdict_show_escaped_in_the_admin(
    hostile_run: Any,
) -> None:
    _, phase = hostile_run
    web = session_client(User.objects.create_superuser("root", "root@example.com", "x"))
    page = web.get(reverse("admin:runs_phase_change", args=[phase.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "&lt;/pre&gt;&lt;/details&gt;&lt;script&gt;alert(3)" in html  # the prompt
    assert_escaped(html)


def test_the_patch_download_is_an_attachment_a_browser_will_not_sniff_as_a_page(
    hostile_run: Any,
) -> None:
    run, _ = hostile_run
    web = session_client(User.objects.create_superuser("root", "root@example.com", "x"))
    response = web.get(f"/runs/{run.pk}/patch", HTTP_ACCEPT="text/html")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/x-patch; charset=utf-8"
    assert response["Content-Disposition"].startswith("attachment;")
    assert response["X-Content-Type-Options"] == "nosniff"
    assert SCRIPT in response.content.decode()  # the patch itself is the change, unaltered
    assert Phase.objects.get(pk=hostile_run[1].pk).files_changed[0].startswith("app/")
