"""Maps the project's domain exceptions to HTTP answers for every API view."""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist, RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from routing.mapping import MappingError
from runs.plans import PlanError
from runs.states import IllegalTransition


def _field_errors(message: str, default_field: str) -> dict[str, list[str]]:
    # Domain messages start with the field they are about ("model: 'x' is not ..."); keep the
    # field so a client can put the error beside its input.
    field, sep, _ = message.partition(": ")
    if sep and field.replace("_", "").replace(".", "").replace("[", "").replace("]", "").isalnum():
        return {field.split(".")[0].split("[")[0]: [message]}
    return {default_field: [message]}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, IllegalTransition):
        return Response(
            {"detail": str(exc), "state": exc.current, "requested": exc.target},
            status=status.HTTP_409_CONFLICT,
        )
    if isinstance(exc, ObjectDoesNotExist):
        return Response({"detail": str(exc) or "Not found."}, status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, RequestDataTooBig):
        # Django refuses a body past DATA_UPLOAD_MAX_MEMORY_SIZE before any parser sees it;
        # answer in JSON like every other API error, not with the HTML 400 page.
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return Response(
            {"detail": f"The request body is over the limit of {limit:,} bytes."},
            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    if isinstance(exc, PlanError):
        return Response({"plan": [str(exc)]}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, MappingError):
        return Response(
            _field_errors(str(exc), "non_field_errors"), status=status.HTTP_400_BAD_REQUEST
        )
    return drf_exception_handler(exc, context)


# The REST API's paths (DESIGN.md "Contracts"); the rest of /dashboard/ is the HTML page.
API_PATH = re.compile(
    r"^/(?:runs|api|usage|v1)(?:/|$)|^/dashboard/(?:models|usage|runs/[^/]+/status)(?:/|$)"
)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler404: a path under the API that no view answers (`/runs/abc/pause`, whose id is
    not a number, or `/runs/1/nope`) gets the API's JSON 404, not Django's HTML page."""
    if API_PATH.match(request.path_info):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)
