"""OpenTelemetry exports (OTLP/HTTP, protobuf or JSON) as usage records (issue 17).

runs.otlp_api receives `POST /v1/logs`, `/v1/metrics` and `/v1/traces`; this module decodes
the body with the maintained `opentelemetry-proto` messages and turns what describes a billed
provider call into a UsageRecord (source "otel"). What counts, one UsageRecord per call:

- Claude Code (`CLAUDE_CODE_ENABLE_TELEMETRY=1`): each `claude_code.api_request` log event
  (the log record's event name, its body, or its `event.name` attribute "api_request" from a
  Claude Code resource or scope) with `model`, `input_tokens`, `output_tokens`,
  `cache_read_tokens`, `cache_creation_tokens` and `cost_usd` → provider anthropic, role
  `agent:claude-code`. Anthropic's `input_tokens` leaves cache reads and writes out; Autopack's
  prompt_tokens holds them (usage.types.TokenUsage), so prompt = input + reads + writes.
  Its metric `claude_code.token.usage` describes the same calls and is never counted: the log
  events are the source. A metric point is a sum over an export interval with no identity of
  the calls in it, so counting it beside the events would count each call twice, counting it
  instead of them would make a replayed export (an exporter's retry) count again, and "only
  for sessions that send no events" cannot be decided when the metrics (every 60 s) arrive
  before the events of the same calls. A person who exports metrics only is told so in the
  answer's partial_success (set OTEL_LOGS_EXPORTER=otlp).
- Codex CLI (`[otel]` in ~/.codex/config.toml): each `codex.sse_event` (or
  `codex.websocket_event`) log event of kind `response.completed` with `input_token_count`,
  `output_token_count`, `cached_token_count`, `reasoning_token_count` and `model` → provider
  openai, role `agent:codex`. OpenAI's counts include the cached and reasoning parts.
- Generic GenAI spans (OpenTelemetry semantic conventions): a span with
  `gen_ai.usage.input_tokens` / `gen_ai.usage.output_tokens` (older `prompt_tokens` /
  `completion_tokens` too), the cache attributes, `gen_ai.request.model` (the model asked for)
  and `gen_ai.response.model` (the one that answered) → the provider named by
  `gen_ai.provider.name` or `gen_ai.system`, role `agent:<service.name>`. Agent and tool spans
  (`invoke_agent`, `execute_tool`, …) sum their children and are not counted; neither are the
  spans of Claude Code and Codex, whose log events are counted.

Everything else (other events, metrics, spans without usage, an unknown provider) is not
stored and is counted in the answer's partial_success with the reasons: the exporter is told,
and does not retry.

A replayed export is not counted again: each call's call_id is derived from what identifies it
in the export (a span's trace and span ids; for an event, its session or conversation, its
sequence number and timestamps, and its model and token counts), so the same export sent
twice yields the same call_ids, which usage.services stores once.

Times are the event's (a span's end); a time ahead of the server's clock is taken as now (the
call happened; the client's clock is off), and a missing one is now.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from .models import UsageSource
from .services import UsageRecord
from .types import TokenUsage
from .vocabulary import AGENT_ROLE_PREFIX

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
CLAUDE_CODE_ROLE = f"{AGENT_ROLE_PREFIX}claude-code"
CODEX_ROLE = f"{AGENT_ROLE_PREFIX}codex"
CALL_ID_PREFIX = "otel:"
# No provider bills more than this for one call (as POST /usage/events holds it); a larger
# count or cost is a sender's bug, and the sums of many must stay far inside the columns.
MAX_COUNT = 10**12
MAX_COST_USD = Decimal(10**6)
# Reasons listed in a partial_success message at most; the counts cover them all.
_MAX_REASONS = 5


class Signal(StrEnum):
    LOGS = "logs"
    METRICS = "metrics"
    TRACES = "traces"


_REQUESTS: dict[Signal, type[Message]] = {
    Signal.LOGS: ExportLogsServiceRequest,
    Signal.METRICS: ExportMetricsServiceRequest,
    Signal.TRACES: ExportTraceServiceRequest,
}

# gen_ai.provider.name / gen_ai.system → Autopack's provider names (DESIGN.md "Contracts").
GENAI_PROVIDERS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gcp.gemini": "google_gemini",
    "gcp.gen_ai": "google_gemini",
    "gcp.vertex_ai": "google_gemini",
    "gemini": "google_gemini",
    "google": "google_gemini",
    "google_gemini": "google_gemini",
    "zai": "glm",
    "z.ai": "glm",
    "zhipu": "glm",
    "glm": "glm",
}
# Spans that sum the model calls under them rather than being one.
_AGGREGATE_OPERATIONS = frozenset(
    {"invoke_agent", "create_agent", "invoke_workflow", "execute_tool"}
)


class OtlpDecodeError(ValueError):
    """A body that is not an export request of its signal (answered 400)."""


class OtlpTooLarge(ValueError):
    """A body over the size limit once decompressed (answered 413)."""


# --- the body -------------------------------------------------------------------------------


def decompress(body: bytes, encoding: str, *, limit: int) -> bytes:
    """The body without its Content-Encoding (gzip or none), at most `limit` bytes unpacked."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise OtlpDecodeError(f"unsupported Content-Encoding {encoding[:32]!r}: gzip or none")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise OtlpDecodeError(f"the gzip body is corrupt ({exc})") from None
    if len(out) > limit:
        raise OtlpTooLarge(f"the body is over {limit:,} bytes once decompressed")
    if not inflater.eof:
        raise OtlpDecodeError("the gzip body is truncated")
    return out


# OTLP/JSON writes trace and span ids as hex; protobuf's JSON mapping reads bytes as base64.
_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})
_HEX = re.compile(r"[0-9a-fA-F]*")


def _hex_ids_to_base64(data: Any) -> None:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in _ID_KEYS and isinstance(value, str):
                    if len(value) % 2 or not _HEX.fullmatch(value):
                        raise OtlpDecodeError(f"{key} {value[:40]!r} is not hex")
                    item[key] = base64.b64encode(binascii.unhexlify(value)).decode()
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))


def parse_export(signal: Signal, body: bytes, content_type: str) -> Message:
    """The export request in `body` (OTLP protobuf, or OTLP/JSON), or OtlpDecodeError."""
    request = _REQUESTS[signal]()
    if content_type == PROTOBUF:
        try:
            request.ParseFromString(body)
        except (DecodeError, RecursionError, ValueError) as exc:
            raise OtlpDecodeError(f"not an OTLP {signal} protobuf message ({exc})") from None
        return request
    try:
        data = json.loads(body)
    except RecursionError:
        raise OtlpDecodeError("the JSON body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise OtlpDecodeError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OtlpDecodeError(f"an OTLP/JSON {signal} export is an object")
    _hex_ids_to_base64(data)
    try:
        # Unknown fields are ignored, as the OTLP specification requires of a receiver.
        json_format.ParseDict(data, request, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, ValueError, TypeError) as exc:
        raise OtlpDecodeError(f"not an OTLP/JSON {signal} export ({exc})") from None
    return request


# --- answers ----------------------------------------------------------------------------------


def _status_class() -> type[Message]:
    """google.rpc.Status (code, message), the body of an OTLP error answer. Declared here in a
    private descriptor pool: the message is not in opentelemetry-proto, and a private pool
    cannot clash with googleapis-common-protos if that is installed too."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="autopack/google_rpc_status.proto", package="google.rpc", syntax="proto3"
    )
    message = proto.message_type.add(name="Status")
    fields = descriptor_pb2.FieldDescriptorProto
    message.field.add(name="code", number=1, type=fields.TYPE_INT32, label=fields.LABEL_OPTIONAL)
    message.field.add(
        name="message", number=2, type=fields.TYPE_STRING, label=fields.LABEL_OPTIONAL
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))


_STATUS = _status_class()
# HTTP status → the gRPC code a Status carries.
_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 413: 8, 415: 3, 429: 8, 503: 14}


def _encode(message: Message, content_type: str) -> bytes:
    if content_type == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


def error_body(http_status: int, text: str, content_type: str) -> bytes:
    """An OTLP error answer: a google.rpc.Status in the request's encoding."""
    status = _STATUS(code=_GRPC_CODES.get(http_status, 2), message=text)  # 2: UNKNOWN
    return _encode(status, content_type)


def success_body(signal: Signal, *, rejected: int, message: str, content_type: str) -> bytes:
    """The Export*ServiceResponse: partial_success when some records were not stored."""
    response: Message
    if signal == Signal.LOGS:
        response = ExportLogsServiceResponse()
        if rejected:
            response.partial_success.rejected_log_records = rejected
            response.partial_success.error_message = message
    elif signal == Signal.METRICS:
        response = ExportMetricsServiceResponse()
        if rejected:
            response.partial_success.rejected_data_points = rejected
            response.partial_success.error_message = message
    else:
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = message
    return _encode(response, content_type)


# --- decoding -----------------------------------------------------------------------------------


@dataclass
class Decoded:
    """The usage records of one export, and what was not taken, with the reasons."""

    noun: str  # "log records", "data points", "spans"
    records: list[UsageRecord] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())

    def reject(self, reason: str, count: int = 1) -> None:
        if count:
            self.reasons[reason] += count

    def message(self) -> str:
        """The partial_success message: how many were not taken, and why (first reasons)."""
        if not self.reasons:
            return ""
        parts = [f"{n} {reason}" for reason, n in self.reasons.most_common(_MAX_REASONS)]
        more = len(self.reasons) - _MAX_REASONS
        tail = f"; and {more} other reasons" if more > 0 else ""
        return f"{self.rejected} {self.noun} not counted as usage: " + "; ".join(parts) + tail


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind in ("array_value", "kvlist_value", "bytes_value"):
        return None  # never needed here
    return getattr(value, kind)


def _attrs(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in attributes}


def _count(value: Any) -> int | None:
    """A token count from an attribute: an int, a whole double, or digits in a string; None
    for anything else, a negative number, or more than MAX_COUNT."""
    result: int | None = None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    elif isinstance(value, str) and value.strip().isdigit() and len(value.strip()) < 20:
        result = int(value.strip())
    return result if result is not None and 0 <= result <= MAX_COUNT else None


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        result = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return result if result.is_finite() and 0 <= result <= MAX_COST_USD else None


def _text(value: Any, limit: int) -> str:
    return str(value)[:limit] if isinstance(value, str | int | float) else ""


_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


def _time(nanos: int, *, now: datetime) -> datetime | None:
    """An OTLP timestamp (ns since the epoch); None when unset or before 2000."""
    if nanos <= 0:
        return None
    seconds, rest = divmod(nanos, 1_000_000_000)
    try:
        at = datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=rest // 1000)
    except (OverflowError, OSError, ValueError):
        return now
    return at if at >= _EARLIEST else None


def _iso_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None and at >= _EARLIEST else None


def _when(*candidates: datetime | None, now: datetime) -> datetime:
    for at in candidates:
        if at is not None:
            return min(at, now)  # ahead of the server's clock: the client's clock is off
    return now


def _call_id(kind: str, material: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    return f"{CALL_ID_PREFIX}{kind}:{digest[:40]}"


def _usage(
    *,
    input_: int,
    output: int,
    cache_read: int,
    cache_write: int,
    reasoning: int,
    input_includes_cache: bool,
) -> TokenUsage:
    """TokenUsage from reported counts. When the input count cannot include the cache parts
    (they are larger), it is taken as leaving them out; the same for output and reasoning."""
    if not input_includes_cache or cache_read + cache_write > input_:
        input_ += cache_read + cache_write
    if reasoning > output:
        output += reasoning
    return TokenUsage(
        prompt_tokens=input_,
        completion_tokens=output,
        cached_input_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
    )


def _service(resource_attrs: Mapping[str, Any]) -> str:
    return _text(resource_attrs.get("service.name"), 200).lower()


def _is_claude_code(service: str, scope: str) -> bool:
    return service.startswith(("claude-code", "claude_code")) or "claude_code" in scope


def _is_codex(service: str) -> bool:
    return service.startswith("codex")


def _event_names(record: Any, attrs: Mapping[str, Any]) -> set[str]:
    names = {record.event_name, _text(attrs.get("event.name"), 100)}
    if record.body.WhichOneof("value") == "string_value":
        names.add(record.body.string_value[:100])
    names.discard("")
    return names


def logs_usage(request: ExportLogsServiceRequest, *, now: datetime) -> Decoded:
    """The Claude Code api_request events and Codex response.completed events of an export."""
    out = Decoded("log records")
    for resource_logs in request.resource_logs:
        resource = _attrs(resource_logs.resource.attributes)
        service = _service(resource)
        for scope_logs in resource_logs.scope_logs:
            scope = scope_logs.scope.name.lower()
            for record in scope_logs.log_records:
                attrs = _attrs(record.attributes)
                names = _event_names(record, attrs)
                at = _when(
                    _time(record.time_unix_nano, now=now),
                    _iso_time(attrs.get("event.timestamp")),
                    _time(record.observed_time_unix_nano, now=now),
                    now=now,
                )
                if "claude_code.api_request" in names or (
                    "api_request" in names and _is_claude_code(service, scope)
                ):
                    _claude_code_event(out, record, attrs, at)
                elif names & {"codex.sse_event", "codex.websocket_event"}:
                    if attrs.get("event.kind") != "response.completed":
                        out.reject("Codex events other than response.completed")
                    else:
                        _codex_event(out, record, attrs, at)
                else:
                    out.reject(
                        "are not a call's usage (counted: Claude Code's api_request and "
                        "Codex's response.completed events)"
                    )
    return out


def _claude_code_event(out: Decoded, record: Any, attrs: Mapping[str, Any], at: datetime) -> None:
    counts = {
        name: _count(attrs.get(name, 0))
        for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens")
    }
    model = _text(attrs.get("model"), 200)
    if not model or any(v is None for v in counts.values()) or "input_tokens" not in attrs:
        out.reject("Claude Code api_request events without a model or token counts")
        return
    identity = {
        name: attrs.get(name)
        for name in (
            "session.id",
            "prompt.id",
            "event.sequence",
            "event.timestamp",
            "request_id",
            "request.id",
            "model",
            *counts,
        )
    }
    identity["time"] = record.time_unix_nano
    usage = _usage(
        input_=counts["input_tokens"] or 0,
        output=counts["output_tokens"] or 0,
        cache_read=counts["cache_read_tokens"] or 0,
        cache_write=counts["cache_creation_tokens"] or 0,
        reasoning=0,
        input_includes_cache=False,  # Anthropic's input_tokens leaves the cache out
    )
    duration = _count(attrs.get("duration_ms"))
    out.records.append(
        UsageRecord(
            call_id=_call_id("claude-code", identity),
            provider="anthropic",
            model=model,
            role=CLAUDE_CODE_ROLE,
            usage=usage,
            provider_request_id=_text(attrs.get("request_id") or attrs.get("request.id"), 255),
            latency_ms=min(duration or 0, 2**31 - 1),
            created_at=at,
            source=UsageSource.OTEL,
            reported_cost_usd=_decimal(attrs.get("cost_usd")),
        )
    )


def _codex_event(out: Decoded, record: Any, attrs: Mapping[str, Any], at: datetime) -> None:
    names = (
        "input_token_count",
        "output_token_count",
        "cached_token_count",
        "reasoning_token_count",
    )
    counts = {name: _count(attrs.get(name, 0)) for name in names}
    model = _text(attrs.get("model"), 200)
    if not model or any(v is None for v in counts.values()) or "input_token_count" not in attrs:
        out.reject("Codex response.completed events without a model or token counts")
        return
    identity = {
        name: attrs.get(name)
        for name in ("conversation.id", "event.timestamp", "response.id", "model", *names)
    }
    identity["time"] = record.time_unix_nano
    usage = _usage(
        input_=counts["input_token_count"] or 0,
        output=counts["output_token_count"] or 0,
        cache_read=counts["cached_token_count"] or 0,
        cache_write=0,
        reasoning=counts["reasoning_token_count"] or 0,
        input_includes_cache=True,  # OpenAI's input_tokens include the cached ones
    )
    duration = _count(attrs.get("duration_ms"))
    out.records.append(
        UsageRecord(
            call_id=_call_id("codex", identity),
            provider="openai",
            model=model,
            role=CODEX_ROLE,
            usage=usage,
            provider_request_id=_text(attrs.get("response.id"), 255),
            latency_ms=min(duration or 0, 2**31 - 1),
            created_at=at,
            source=UsageSource.OTEL,
        )
    )


def metrics_usage(request: ExportMetricsServiceRequest, *, now: datetime) -> Decoded:
    """No metric is counted (see the module docstring); each data point is reported."""
    out = Decoded("data points")
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                points = len(getattr(metric, kind).data_points) if kind else 0
                if metric.name == "claude_code.token.usage":
                    out.reject(
                        "of claude_code.token.usage (Claude Code's api_request log events are "
                        "counted instead: set OTEL_LOGS_EXPORTER=otlp)",
                        points,
                    )
                else:
                    out.reject("of metrics (usage is counted from log events and spans)", points)
    return out


_ROLE_CHARS = re.compile(r"[^a-z0-9._-]+")


def agent_role(service: str) -> str:
    """`agent:<service.name>`, reduced to lower-case letters, digits, '.', '_' and '-'."""
    name = _ROLE_CHARS.sub("-", service.lower()).strip("-._")[:60].strip("-._")
    if not name or name.startswith("unknown_service") or name.startswith("unknown-service"):
        name = "otel"
    return f"{AGENT_ROLE_PREFIX}{name}"


def _first_count(attrs: Mapping[str, Any], *names: str) -> int | None:
    """The first of `names` present; None when it is not a count, 0 when none is present."""
    for name in names:
        if name in attrs:
            return _count(attrs[name])
    return 0


def traces_usage(request: ExportTraceServiceRequest, *, now: datetime) -> Decoded:
    """The GenAI spans with token usage of an export."""
    out = Decoded("spans")
    for resource_spans in request.resource_spans:
        resource = _attrs(resource_spans.resource.attributes)
        service = _service(resource)
        own_events = _is_claude_code(service, "") or _is_codex(service)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attrs = _attrs(span.attributes)
                has_usage = any(
                    name in attrs
                    for name in (
                        "gen_ai.usage.input_tokens",
                        "gen_ai.usage.output_tokens",
                        "gen_ai.usage.prompt_tokens",
                        "gen_ai.usage.completion_tokens",
                    )
                )
                if not has_usage:
                    out.reject("have no gen_ai.usage attributes")
                elif own_events:
                    out.reject("of Claude Code or Codex (their log events are counted instead)")
                elif _text(attrs.get("gen_ai.operation.name"), 64) in _AGGREGATE_OPERATIONS:
                    out.reject("of agents or tools (the model calls under them are counted)")
                else:
                    _genai_span(out, span, attrs, service, now=now)
    return out


def _genai_span(
    out: Decoded, span: Any, attrs: Mapping[str, Any], service: str, *, now: datetime
) -> None:
    system = _text(attrs.get("gen_ai.provider.name") or attrs.get("gen_ai.system"), 64).lower()
    provider = GENAI_PROVIDERS.get(system)
    if provider is None:
        out.reject(f"name an unknown provider {system or '(none)'!r}")
        return
    requested = _text(attrs.get("gen_ai.request.model"), 200)
    answered = _text(attrs.get("gen_ai.response.model"), 200)
    model = requested or answered
    counts = {
        "input": _first_count(attrs, "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"),
        "output": _first_count(
            attrs, "gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"
        ),
        "cache_read": _first_count(
            attrs,
            "gen_ai.usage.cache_read.input_tokens",
            "gen_ai.usage.cache_read_input_tokens",
        ),
        "cache_write": _first_count(
            attrs,
            "gen_ai.usage.cache_creation.input_tokens",
            "gen_ai.usage.cache_creation_input_tokens",
        ),
        "reasoning": _first_count(
            attrs, "gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens"
        ),
    }
    ids_ok = len(span.trace_id) == 16 and len(span.span_id) == 8
    if not model or any(v is None for v in counts.values()) or not ids_ok:
        out.reject("have no model, a token count that is not one, or no trace and span id")
        return
    usage = _usage(
        input_=counts["input"] or 0,
        output=counts["output"] or 0,
        cache_read=counts["cache_read"] or 0,
        cache_write=counts["cache_write"] or 0,
        reasoning=counts["reasoning"] or 0,
        input_includes_cache=True,  # the conventions' input_tokens include the cached ones
    )
    start = _time(span.start_time_unix_nano, now=now)
    end = _time(span.end_time_unix_nano, now=now)
    latency = int((end - start) / timedelta(milliseconds=1)) if start and end else 0
    out.records.append(
        UsageRecord(
            # A span's ids name it uniquely: a replayed export carries the same ones.
            call_id=f"{CALL_ID_PREFIX}span:{span.trace_id.hex()}:{span.span_id.hex()}",
            provider=provider,
            model=model,
            reported_model=answered if answered != model else "",
            role=agent_role(service),
            usage=usage,
            provider_request_id=_text(attrs.get("gen_ai.response.id"), 255),
            latency_ms=max(0, min(latency, 2**31 - 1)),
            created_at=_when(end, start, now=now),
            source=UsageSource.OTEL,
        )
    )


def export_usage(signal: Signal, request: Message, *, now: datetime) -> Decoded:
    """The usage records of a parsed export, each call once (a call_id repeated within the
    export is taken once)."""
    if signal == Signal.LOGS:
        assert isinstance(request, ExportLogsServiceRequest)
        decoded = logs_usage(request, now=now)
    elif signal == Signal.METRICS:
        assert isinstance(request, ExportMetricsServiceRequest)
        decoded = metrics_usage(request, now=now)
    else:
        assert isinstance(request, ExportTraceServiceRequest)
        decoded = traces_usage(request, now=now)
    decoded.records = list(_unique(decoded.records))
    return decoded


def _unique(records: list[UsageRecord]) -> Iterator[UsageRecord]:
    seen: set[str] = set()
    for record in records:
        if record.call_id not in seen:
            seen.add(record.call_id)
            yield record
