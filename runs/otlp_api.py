"""OTLP/HTTP receiver: `POST /v1/logs`, `/v1/metrics`, `/v1/traces` (issue 17, OpenTelemetry).

Claude Code, Codex CLI and any program exporting GenAI spans report their provider calls here;
usage.otlp decodes the export and says which records are a call's usage. As the OTLP
specification has it: protobuf (`application/x-protobuf`) or JSON (`application/json`), gzip
or no Content-Encoding; 200 with the signal's Export*ServiceResponse, its partial_success
counting the records not taken and why; errors (400 a body that is not an export, 401, 403,
413 over AUTOPACK_OTLP_MAX_BODY_BYTES, 415, 503 retry) with a google.rpc.Status body in the
request's encoding.

The token is the API's (DRF's token, `manage.py drf_create_token`), sent as
`Authorization: Bearer <token>` (what OTEL_EXPORTER_OTLP_HEADERS sets) or `Token <token>`, and
its user needs usage.record_usage, as for POST /usage/events. The records of one request are
stored in one transaction through usage.ingest.usage_events_record (idempotent per call_id;
all or nothing), so a replayed export is not counted again and a failed one leaves nothing.

This lives in runs, beside runs.usage_ingest, for the same reason: the token check and the
providers the router knows are above usage (DESIGN.md: runs → routing → usage).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any, ClassVar

from django.conf import settings
from django.db import transaction
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, status
from rest_framework.authentication import TokenAuthentication
from rest_framework.request import Request
from rest_framework.views import APIView

from routing.router import router
from routing.text import name_problem, text_problem
from usage import otlp
from usage.ingest import IngestRaced, IngestRefused, usage_events_record
from usage.services import UsageRecord

from .permissions import CanRecordUsage

_SLICE = 5_000  # records per usage_events_record call


class BearerTokenAuthentication(TokenAuthentication):
    """The API token under the keyword OpenTelemetry exporters are configured with."""

    keyword = "Bearer"


class _Refused(exceptions.APIException):
    def __init__(self, http_status: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = http_status


def _request_type(request: Any) -> str:
    media = request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    return otlp.JSON if media == otlp.JSON else otlp.PROTOBUF


def _problem(record: UsageRecord, known: Container[str]) -> str | None:
    """Why a decoded record cannot be stored (the router does not know its provider, or a
    text PostgreSQL cannot hold), or None."""
    if record.provider not in known:
        return f"are for provider {record.provider!r}, which is not configured"
    for value in (record.model, record.reported_model, record.provider_request_id):
        if text_problem(value):
            return "carry a model or request id that cannot be stored"
    if name_problem(record.role):
        return "come from a service.name that cannot be a role"
    return None


class _OtlpExportApi(APIView):
    signal: ClassVar[otlp.Signal]
    authentication_classes = [BearerTokenAuthentication, TokenAuthentication]
    permission_classes = [CanRecordUsage]
    parser_classes = ()  # the body is read and decoded here

    # The OTLP protocol (its protobuf messages) is its own specification, not this API's
    # schema; fuzzing it as JSON would test nothing of it.
    @extend_schema(exclude=True)
    def post(self, request: Request) -> HttpResponse:
        content_type = request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type not in (otlp.PROTOBUF, otlp.JSON):
            raise _Refused(
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type {content_type[:64]!r}: send {otlp.PROTOBUF} or {otlp.JSON}",
            )
        limit = settings.AUTOPACK_OTLP_MAX_BODY_BYTES
        # At most one byte past the limit is read: an oversized body is never loaded whole.
        raw = request._request.read(limit + 1)
        if len(raw) > limit:
            raise _Refused(
                status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                f"The body is over the limit of {limit:,} bytes (AUTOPACK_OTLP_MAX_BODY_BYTES): "
                "export in smaller batches.",
            )
        try:
            body = otlp.decompress(raw, request.META.get("HTTP_CONTENT_ENCODING", ""), limit=limit)
            export = otlp.parse_export(self.signal, body, content_type)
        except otlp.OtlpTooLarge as exc:
            raise _Refused(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, str(exc)) from None
        except otlp.OtlpDecodeError as exc:
            raise _Refused(status.HTTP_400_BAD_REQUEST, str(exc)) from None
        decoded = otlp.export_usage(self.signal, export, now=timezone.now())
        if decoded.records:
            known = router.state().providers
            keep: list[UsageRecord] = []
            for record in decoded.records:
                problem = _problem(record, known)
                if problem is None:
                    keep.append(record)
                else:
                    decoded.reject(problem)
            try:
                # One transaction for the whole export (all or nothing), in slices so that no
                # statement carries more parameters than PostgreSQL takes (65,535).
                with transaction.atomic():
                    for start in range(0, len(keep), _SLICE):
                        usage_events_record(records=keep[start : start + _SLICE])
            except IngestRaced as exc:
                raise _Refused(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
            except IngestRefused as exc:  # not expected: call_ids are unique and "otel:…"
                raise _Refused(status.HTTP_400_BAD_REQUEST, str(exc)) from None
        return HttpResponse(
            otlp.success_body(
                self.signal,
                rejected=decoded.rejected,
                message=decoded.message(),
                content_type=content_type,
            ),
            content_type=content_type,
        )

    # DRF's stubs say Response; APIView.finalize_response takes any HttpResponse.
    def handle_exception(self, exc: Exception) -> HttpResponse:  # type: ignore[override]
        """Every error as a google.rpc.Status in the request's encoding (OTLP's error body),
        with DRF's status code and headers (WWW-Authenticate on a 401, Retry-After)."""
        response = super().handle_exception(exc)
        detail = getattr(exc, "detail", None)
        text = str(detail) if detail is not None else str(exc)
        content_type = _request_type(self.request)
        out = HttpResponse(
            otlp.error_body(response.status_code, text, content_type),
            status=response.status_code,
            content_type=content_type,
        )
        for header in ("WWW-Authenticate", "Retry-After"):
            if header in response:
                out[header] = response[header]
        if response.status_code == status.HTTP_503_SERVICE_UNAVAILABLE and "Retry-After" not in out:
            out["Retry-After"] = "1"
        return out


class OtlpLogsApi(_OtlpExportApi):
    """POST /v1/logs: Claude Code's api_request and Codex's response.completed events."""

    signal = otlp.Signal.LOGS


class OtlpMetricsApi(_OtlpExportApi):
    """POST /v1/metrics: accepted and answered; no metric is counted (usage.otlp says why)."""

    signal = otlp.Signal.METRICS


class OtlpTracesApi(_OtlpExportApi):
    """POST /v1/traces: GenAI spans with token usage."""

    signal = otlp.Signal.TRACES
