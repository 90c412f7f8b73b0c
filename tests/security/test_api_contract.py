"""The API keeps to its OpenAPI schema where schemathesis found it did not (issue 12, items 2
and 7), one plain case each; tests/security/test_schema_fuzz.py walks the whole schema."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from runs.models import Run
from runs.parsers import MAX_JSON_DEPTH
from tests.security.conftest import new_run, token_client

pytestmark = pytest.mark.django_db

DEEP = b"[" * 100_000 + b"]" * 100_000


def served_schema(user: User) -> dict[str, Any]:
    response = token_client(user).get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


# --- item 2: one guard for every JSON body ------------------------------------------------------


def test_a_deeply_nested_json_body_to_the_token_endpoint_is_a_400_without_logging_in() -> None:
    response = Client().post("/api/token/", DEEP, content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    assert "nested too deeply" in response.json()["detail"]


def test_a_deeply_nested_json_override_is_a_400(operator: User) -> None:
    api = token_client(operator)
    response = api.post("/dashboard/models/override", DEEP, content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    assert "nested too deeply" in response.json()["detail"]


def test_a_json_body_nested_past_the_limit_is_refused_before_any_view_reads_it(
    operator: User,
) -> None:
    # Deep enough to pass json's own recursion but past the API's limit: the same answer.
    role = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    body = f'{{"role": {role}, "category": "ui", "complexity": "low", "model": "m"}}'
    api = token_client(operator)
    for path in ("/dashboard/models/override", "/api/token/", "/runs/start"):
        response = api.post(path, body, content_type="application/json")
        assert response.status_code == 400, (path, response.content[:300])
        assert "nested too deeply" in response.json()["detail"], path
    assert Run.objects.count() == 0


def test_a_plan_as_deep_as_a_plan_is_still_accepted(operator: User) -> None:
    plan = {
        "name": "P",
        "tiers": [
            {
                "name": "T",
                "phases": [
                    {
                        "name": "p",
                        "category": "ui",
                        "complexity": "low",
                        "acceptance_criteria": ["works"],
                    }
                ],
            }
        ],
    }
    response = token_client(operator).post("/runs/start?start=false", plan, format="json")
    assert response.status_code == 201, response.content[:300]


# --- item 7: what the schema says is what the API does ------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/runs/null%2Cnull/pause",
        "/runs/abc/resume",
        "/runs/-1/cancel",
        "/dashboard/runs/null/status",
        "/runs/1/no-such-thing",
        "/api/no-such-thing",
    ],
)
def test_a_path_under_the_api_that_names_no_run_gets_a_json_404(operator: User, path: str) -> None:
    api = token_client(operator)
    response = api.post(path) if "status" not in path else api.get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Not found."}


def test_a_missing_page_of_the_dashboard_is_still_an_html_404(operator: User) -> None:
    response = token_client(operator).get("/dashboard/no-such-page")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_an_empty_period_is_refused_as_the_schema_says(operator: User) -> None:
    schema = served_schema(operator)
    params = {p["name"]: p for p in schema["paths"]["/dashboard/usage"]["get"]["parameters"]}
    assert set(params) == {"period", "window"}
    period = params["period"]
    assert period["schema"]["enum"] == ["day", "week", "month"]
    response = token_client(operator).get("/dashboard/usage?period=")
    assert response.status_code == 400
    assert "period" in response.json()


@pytest.mark.parametrize(
    "query", ["page_size=null", "page_size=", "page_size=0", "page_size=101", "page=0", "page=x"]
)
def test_a_run_list_query_outside_the_schema_is_refused_with_400(
    operator: User, query: str
) -> None:
    new_run()
    response = token_client(operator).get(f"/runs/?{query}")
    assert response.status_code == 400, (query, response.content[:300])
    assert query.split("=")[0] in response.json()


def test_the_run_list_schema_documents_its_limits_and_its_400(operator: User) -> None:
    operation = served_schema(operator)["paths"]["/runs/"]["get"]
    params = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert params["page_size"]["minimum"] == 1 and params["page_size"]["maximum"] == 100
    assert params["page"]["minimum"] == 1
    assert "400" in operation["responses"]


def test_a_page_size_in_range_is_honoured(operator: User) -> None:
    for _ in range(3):
        new_run()
    response = token_client(operator).get("/runs/?page_size=2")
    assert response.status_code == 200
    assert len(response.json()["results"]) == 2 and response.json()["count"] == 3


def test_the_schema_says_a_mapping_run_id_is_positive_and_the_api_refuses_others(
    operator: User,
) -> None:
    operation = served_schema(operator)["paths"]["/dashboard/models"]["get"]
    (run_id,) = operation["parameters"]
    assert run_id["schema"]["minimum"] == 1
    api = token_client(operator)
    for value in ("-212221", "0", "abc", ""):
        response = api.get(f"/dashboard/models?run_id={value}")
        assert response.status_code == 400, value
        assert "run_id" in response.json()
    assert api.get("/dashboard/models?run_id=999999").status_code == 404
    assert api.get(f"/dashboard/models?run_id={new_run().pk}").status_code == 200


def test_the_schema_says_a_multipart_start_needs_a_file_and_the_api_refuses_none(
    operator: User,
) -> None:
    body = served_schema(operator)["paths"]["/runs/start"]["post"]["requestBody"]
    assert body["content"]["multipart/form-data"]["schema"]["required"] == ["file"]
    response = token_client(operator).post("/runs/start", {}, format="multipart")
    assert response.status_code == 400
    assert Run.objects.count() == 0


def test_an_override_is_json_only_as_the_schema_says(operator: User) -> None:
    body = served_schema(operator)["paths"]["/dashboard/models/override"]["post"]["requestBody"]
    assert list(body["content"]) == ["application/json"]
    form = {"role": "builder", "category": "ui", "complexity": "low", "model": "glm-4.6"}
    api = token_client(operator)
    response = api.post(
        "/dashboard/models/override",
        {**form, "scope": "global", "run_id": "null"},
        format="multipart",
    )
    assert response.status_code == 415
    assert "detail" in response.json()
    ok = api.post(
        "/dashboard/models/override", {**form, "scope": "global", "run_id": None}, format="json"
    )
    assert ok.status_code == 200, ok.content[:300]
