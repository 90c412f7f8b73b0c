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
from schemathesis.checks import CHECKS as REGISTERED_CHECKS
from schemathesis.checks import is_check_class, load_all_checks
from schemathesis.config import SchemathesisConfig

from tests.security.conftest import new_run

APP = get_wsgi_application()
# Where a schema cannot say everything: a well-formed request these operations refuse with 400
# is still not a schema violation. /api/token/ refuses credentials that do not exist (as
# OAuth2's token endpoint and DRF's do); an override names a role and a model that must be in
# the catalogue in force (data, not schema), and so does a budget guard's provider and the usage
# summary's `window` (a window some provider has: configuration, not schema), and so do a usage
# event's provider, run and phase (they must exist) and its time (not in the future); a plan has
# rules past its JSON shape (no `<` in names, no '..' in a workspace), so an arbitrary object or
# file is no plan. Every other check,
# and this one for every other answer, still applies to them.
ACCEPTED_OR_REFUSED = ["2xx", "3xx", "400", "401", "403", "404", "409", "429"]
CONFIG = SchemathesisConfig.from_dict(
    {
        "operations": [
            {
                "include-operation-id": [
                    "token_obtain",
                    "models_override",
                    "runs_start",
                    "run_guards_create",
                    "guards_create",
                    "usage_summary",
                    "usage_events_record",
                ],
                "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED_OR_REFUSED}},
            }
        ]
    }
)
# The schema the server serves at /api/schema/ (the same generator builds both).
schema = schemathesis.openapi.from_dict(
    SchemaGenerator().get_schema(request=None, public=True), config=CONFIG
)
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


# Every check schemathesis has, none left out: no 500; status code, content type, headers and
# body as documented; data the schema forbids is refused and data it allows is accepted; an
# undocumented method gets 405; an operation that needs credentials refuses a request without.
load_all_checks()
CHECKS = [check for check in REGISTERED_CHECKS.get_all() if not is_check_class(check)]
assert {
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "ignored_auth",
} <= {check.__name__ for check in CHECKS}


# derandomize: the same cases on every run, so a pass is not luck and a failure reproduces.
@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_the_api_matches_its_schema_and_never_answers_500(case: Any, auth: dict[str, str]) -> None:
    response = case.call(headers=auth)
    case.validate_response(
        response, checks=CHECKS, headers=auth, transport_kwargs={"headers": auth}
    )
