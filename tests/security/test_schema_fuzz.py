"""Schemathesis walks the served OpenAPI schema against the real API (in process, through the
WSGI app, with the DRF token of a user who may do everything): no answer is a 500, and every
answer matches what the schema documents for it (status code, content type, body)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.contrib.auth.models import User
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.security.conftest import new_run

APP = get_wsgi_application()
# The schema the server serves at /api/schema/ (the same generator builds both).
schema = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True))
schema.config.update(base_url="http://localhost")
schema.app = APP  # requests go to the WSGI app in this process, not over the network


@pytest.fixture
def auth(db: None, settings: Any) -> Iterator[dict[str, str]]:
    # As Django's test client does: a request must not close the test's database connection
    # (and with it the test's transaction) when it ends.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    rates = {"user": "100000/minute", "token": "100000/minute"}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
    new_run(start=True)
    root = User.objects.create_superuser("root", "root@example.com", "x")
    yield {"Authorization": f"Token {Token.objects.create(user=root).key}"}
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


# "No 500 and no schema violation": the status code, content type, headers and body of every
# answer are the documented ones, and an operation that needs credentials refuses a request
# without them. (Whether the API accepts every schema-valid plan is not asked: a plan's rules,
# such as no `<` in names, are more than its JSON schema says; tests/runs/test_plans.py has them.)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
    unsupported_method,
]


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_matches_its_schema_and_never_answers_500(case: Any, auth: dict[str, str]) -> None:
    response = case.call(headers=auth)
    checks = CHECKS
    if case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE:
        # A path parameter that is not a number does not reach the API at all: Django's URL
        # resolver answers its own (HTML) 404. Such requests must still never be a 500.
        checks = [not_a_server_error]
    case.validate_response(
        response, checks=checks, headers=auth, transport_kwargs={"headers": auth}
    )
