"""The OTLP/HTTP receiver (issue 17, OpenTelemetry) over real HTTP against a live server:
Claude Code-, Codex- and GenAI-shaped exports built with the opentelemetry-proto messages, in
protobuf and OTLP/JSON, with and without gzip. Each call is counted once (Claude Code's token
metric beside its api_request events, a replayed export); a malformed body, a wrong token, a
missing permission and an oversized body are refused with nothing stored."""

from __future__ import annotations

import base64
import gzip
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from django.db.models import Sum
from google.protobuf import json_format
from google.protobuf.message import Message
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
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Sum as SumData,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from rest_framework.authtoken.models import Token

from usage import otlp
from usage.models import UsageEvent, UsageRollup, UsageSource
from usage.prices import price_usd
from usage.types import TokenUsage

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# Five minutes ago: the events' own times are kept (they are not in the future).
AT = (datetime.now(UTC) - timedelta(minutes=5)).replace(microsecond=0)
AT_NS = int(AT.timestamp()) * 1_000_000_000


@pytest.fixture(autouse=True)
def fresh_throttles() -> Iterator[None]:
    cache.clear()
    yield


def make_token(username: str, *, permitted: bool = True) -> str:
    user = User.objects.create_user(username)  # not staff: the permission alone
    if permitted:
        user.user_permissions.add(Permission.objects.get(codename="record_usage"))
    return Token.objects.create(user=user).key


@pytest.fixture
def token(transactional_db: None) -> str:
    return make_token("telemetry")


# --- building exports -------------------------------------------------------------------------


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        any_value = AnyValue(bool_value=value)
    elif isinstance(value, int):
        any_value = AnyValue(int_value=value)
    elif isinstance(value, float):
        any_value = AnyValue(double_value=value)
    else:
        any_value = AnyValue(string_value=value)
    return KeyValue(key=key, value=any_value)


def attrs(**values: Any) -> list[KeyValue]:
    return [kv(key.replace("__", "."), value) for key, value in values.items()]


def resource(service: str) -> Resource:
    return Resource(attributes=[kv("service.name", service), kv("service.version", "2.0.14")])


CLAUDE_CALLS = [
    # model, input, output, cache read, cache creation, cost
    ("claude-sonnet-4-5", 1200, 300, 5000, 800, 0.0412),
    ("claude-nonexistent-9", 40, 7, 0, 0, 0.0009),  # no price in the table: Claude Code's cost
]


def claude_code_logs(*, session: str = "sess-1", name_style: str = "attribute") -> Message:
    """Claude Code's log export: its api_request events and others that are not usage."""
    records = []
    for seq, (model, inp, out, read, write, cost) in enumerate(CLAUDE_CALLS, start=1):
        values = {
            "session.id": session,
            "prompt.id": "prompt-7",
            "event.sequence": seq * 2,
            "event.timestamp": (AT + timedelta(seconds=seq)).isoformat().replace("+00:00", "Z"),
            "model": model,
            "input_tokens": inp,
            "output_tokens": out,
            "cache_read_tokens": read,
            "cache_creation_tokens": write,
            "cost_usd": cost,
            "duration_ms": 2345,
        }
        record = LogRecord(
            time_unix_nano=AT_NS + seq * 1_000_000_000,
            attributes=[kv(k, v) for k, v in values.items()],
            trace_id=bytes(range(16)),
            span_id=bytes(range(8)),
        )
        if name_style == "attribute":  # newer versions: event.name = "api_request"
            record.attributes.append(kv("event.name", "api_request"))
        else:  # the log body names the event
            record.body.string_value = "claude_code.api_request"
        records.append(record)
    for seq, event in ((1, "user_prompt"), (5, "tool_result")):
        records.append(
            LogRecord(
                time_unix_nano=AT_NS,
                attributes=[
                    kv("event.name", event),
                    kv("session.id", session),
                    kv("event.sequence", seq),
                ],
            )
        )
    return ExportLogsServiceRequest(
        resource_logs=[
            ResourceLogs(
                resource=resource("claude-code"),
                scope_logs=[
                    ScopeLogs(
                        scope=InstrumentationScope(name="com.anthropic.claude_code.events"),
                        log_records=records,
                    )
                ],
            )
        ]
    )


def claude_code_metrics(session: str = "sess-1") -> Message:
    """Its claude_code.token.usage metric for the same calls (and the cost metric)."""
    points = []
    for model, inp, out, read, write, _cost in CLAUDE_CALLS:
        for kind, value in (
            ("input", inp),
            ("output", out),
            ("cacheRead", read),
            ("cacheCreation", write),
        ):
            points.append(
                NumberDataPoint(
                    attributes=[kv("type", kind), kv("model", model), kv("session.id", session)],
                    start_time_unix_nano=AT_NS,
                    time_unix_nano=AT_NS + 60_000_000_000,
                    as_double=float(value),
                )
            )
    delta = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    return ExportMetricsServiceRequest(
        resource_metrics=[
            ResourceMetrics(
                resource=resource("claude-code"),
                scope_metrics=[
                    ScopeMetrics(
                        scope=InstrumentationScope(name="com.anthropic.claude_code"),
                        metrics=[
                            Metric(
                                name="claude_code.token.usage",
                                unit="tokens",
                                sum=SumData(
                                    data_points=points,
                                    aggregation_temporality=delta,
                                    is_monotonic=True,
                                ),
                            ),
                            Metric(
                                name="claude_code.cost.usage",
                                unit="USD",
                                sum=SumData(
                                    data_points=[
                                        NumberDataPoint(
                                            attributes=[kv("model", "claude-sonnet-4-5")],
                                            as_double=0.0421,
                                        )
                                    ],
                                    aggregation_temporality=delta,
                                    is_monotonic=True,
                                ),
                            ),
                        ],
                    )
                ],
            )
        ]
    )


def otlp_json(message: Message) -> bytes:
    """OTLP/JSON as an exporter writes it: protobuf's JSON mapping, ids in hex."""
    data = json_format.MessageToDict(message)

    def hexify(item: Any) -> None:
        if isinstance(item, dict):
            for key, value in item.items():
                if key in ("traceId", "spanId", "parentSpanId"):
                    item[key] = base64.b64decode(value).hex()
                else:
                    hexify(value)
        elif isinstance(item, list):
            for value in item:
                hexify(value)

    hexify(data)
    return json.dumps(data).encode()


# --- HTTP -----------------------------------------------------------------------------------


def post(
    url: str,
    body: bytes,
    *,
    token: str | None,
    content_type: str = PROTOBUF,
    gzipped: bool = False,
    scheme: str = "Bearer",
) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - live server
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def export(
    base: str,
    signal: str,
    message: Message,
    token: str | None,
    *,
    as_json: bool = False,
    gzipped: bool = False,
) -> tuple[int, Any]:
    """POST one export; the answer decoded as the signal's Export*ServiceResponse."""
    body = otlp_json(message) if as_json else message.SerializeToString()
    if gzipped:
        body = gzip.compress(body)
    code, raw, _headers = post(
        f"{base}/v1/{signal}",
        body,
        token=token,
        content_type=JSON if as_json else PROTOBUF,
        gzipped=gzipped,
    )
    response_type: Any = {
        "logs": ExportLogsServiceResponse,
        "metrics": ExportMetricsServiceResponse,
        "traces": ExportTraceServiceResponse,
    }[signal]
    response = response_type()
    if code == 200:
        if as_json:
            json_format.Parse(raw, response)
        else:
            response.ParseFromString(raw)
        return code, response
    return code, raw


def stored() -> dict[str, int]:
    return {
        "events": UsageEvent.objects.count(),
        "rollup_calls": UsageRollup.objects.aggregate(n=Sum("calls"))["n"] or 0,
        "pending": UsageEvent.objects.filter(rolled_up=False).count(),
    }


def status_message(raw: bytes, *, as_json: bool = False) -> tuple[int, str]:
    """An OTLP error body: google.rpc.Status (code 1, message 2)."""
    if as_json:
        data = json.loads(raw)
        return data.get("code", 0), data.get("message", "")
    status: Any = otlp._STATUS()
    status.ParseFromString(raw)
    return status.code, status.message


# --- Claude Code --------------------------------------------------------------------------------


def assert_claude_code_calls_stored(session: str = "sess-1") -> None:
    events = list(UsageEvent.objects.filter(role="agent:claude-code").order_by("created_at"))
    assert len(events) == len(CLAUDE_CALLS)
    for event, (model, inp, out, read, write, cost) in zip(events, CLAUDE_CALLS, strict=True):
        assert (event.provider, event.model, event.source) == ("anthropic", model, "otel")
        # Anthropic's input_tokens leave the cache out; prompt_tokens hold it.
        assert event.prompt_tokens == inp + read + write
        assert event.completion_tokens == out
        assert (event.cached_input_tokens, event.cache_write_tokens) == (read, write)
        assert event.latency_ms == 2345
        assert event.call_id.startswith("otel:claude-code:")
        usage = TokenUsage(
            prompt_tokens=inp + read + write,
            completion_tokens=out,
            cached_input_tokens=read,
            cache_write_tokens=write,
        )
        table = price_usd(provider="anthropic", model=model, usage=usage, at=event.created_at)
        # The price table's cost where it knows the model; Claude Code's own figure elsewhere.
        expected = table if table is not None else Decimal(str(cost))
        assert event.cost_usd == expected
    assert events[0].created_at == AT + timedelta(seconds=1)


def test_a_claude_code_export_is_counted_once_and_a_replay_is_not_counted_again(
    live_server: Any, token: str
) -> None:
    base = live_server.url
    code, answer = export(base, "logs", claude_code_logs(), token)
    assert code == 200, answer
    # The user_prompt and tool_result events are not usage: told, not retried.
    assert answer.partial_success.rejected_log_records == 2
    assert "not counted as usage" in answer.partial_success.error_message
    assert_claude_code_calls_stored()
    after_logs = stored()
    assert after_logs["events"] == 2

    # The token metric describes the same calls: never counted (usage.otlp says why).
    code, answer = export(base, "metrics", claude_code_metrics(), token)
    assert code == 200, answer
    assert answer.partial_success.rejected_data_points == 9
    assert "claude_code.token.usage" in answer.partial_success.error_message
    assert "OTEL_LOGS_EXPORTER=otlp" in answer.partial_success.error_message
    assert stored() == after_logs

    # The exporter retries the same export: nothing is counted again.
    code, answer = export(base, "logs", claude_code_logs(), token)
    assert code == 200
    assert stored() == after_logs
    assert_claude_code_calls_stored()


def test_claude_code_in_otlp_json_and_gzip_is_the_same_as_protobuf(
    live_server: Any, token: str
) -> None:
    base = live_server.url
    # The body names the event (older versions); JSON with hex ids, gzip-compressed.
    message = claude_code_logs(name_style="body")
    code, answer = export(base, "logs", message, token, as_json=True, gzipped=True)
    assert code == 200, answer
    assert answer.partial_success.rejected_log_records == 2
    assert_claude_code_calls_stored()
    before = stored()
    # The same calls again in protobuf (another encoding of the same export): the same ids.
    code, _answer = export(base, "logs", message, token, gzipped=True)
    assert code == 200
    assert stored() == before
    code, answer = export(base, "metrics", claude_code_metrics(), token, as_json=True)
    assert code == 200
    assert answer.partial_success.rejected_data_points == 9
    assert stored() == before


def test_two_sessions_with_the_same_counts_are_two_calls_each(live_server: Any, token: str) -> None:
    base = live_server.url
    assert export(base, "logs", claude_code_logs(session="a"), token)[0] == 200
    assert export(base, "logs", claude_code_logs(session="b"), token)[0] == 200
    assert UsageEvent.objects.filter(role="agent:claude-code").count() == 4


# --- Codex --------------------------------------------------------------------------------------


def codex_logs() -> Message:
    def event(kind: str, **extra: Any) -> LogRecord:
        return LogRecord(
            time_unix_nano=AT_NS,
            attributes=attrs(
                event__name="codex.sse_event",
                event__kind=kind,
                event__timestamp=AT.isoformat(),
                conversation__id="conv-42",
                model="gpt-5-codex",
                **extra,
            ),
        )

    return ExportLogsServiceRequest(
        resource_logs=[
            ResourceLogs(
                resource=resource("codex_cli_rs"),
                scope_logs=[
                    ScopeLogs(
                        log_records=[
                            event("response.created"),
                            event("response.output_text.delta"),
                            event(
                                "response.completed",
                                input_token_count=9000,
                                output_token_count=700,
                                cached_token_count=6000,
                                reasoning_token_count=256,
                                tool_token_count=0,
                                duration_ms=4100,
                            ),
                            LogRecord(
                                time_unix_nano=AT_NS,
                                attributes=attrs(
                                    event__name="codex.api_request", conversation__id="conv-42"
                                ),
                            ),
                        ]
                    )
                ],
            )
        ]
    )


def test_a_codex_export_counts_its_completed_responses(live_server: Any, token: str) -> None:
    code, answer = export(live_server.url, "logs", codex_logs(), token)
    assert code == 200, answer
    assert answer.partial_success.rejected_log_records == 3
    (event,) = UsageEvent.objects.all()
    assert (event.provider, event.model, event.role, event.source) == (
        "openai",
        "gpt-5-codex",
        "agent:codex",
        "otel",
    )
    # OpenAI's counts include their cached and reasoning parts.
    assert (event.prompt_tokens, event.cached_input_tokens) == (9000, 6000)
    assert (event.completion_tokens, event.reasoning_tokens) == (700, 256)
    assert event.created_at == AT
    assert event.cost_usd is not None and event.cost_usd > 0
    code, _answer = export(live_server.url, "logs", codex_logs(), token, as_json=True)
    assert code == 200
    assert UsageEvent.objects.count() == 1


# --- GenAI spans --------------------------------------------------------------------------------


def span(number: int, **values: Any) -> Span:
    return Span(
        trace_id=bytes([7] * 15 + [number]),
        span_id=bytes([1] * 7 + [number]),
        name=f"chat {number}",
        start_time_unix_nano=AT_NS,
        end_time_unix_nano=AT_NS + 1_500_000_000,
        attributes=attrs(**values),
    )


def genai_traces() -> Message:
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=resource("Release Notes Bot!"),
                scope_spans=[
                    ScopeSpans(
                        spans=[
                            span(
                                1,
                                gen_ai__operation__name="chat",
                                gen_ai__provider__name="openai",
                                gen_ai__request__model="gpt-5-mini",
                                gen_ai__response__model="gpt-5-mini-2025-08-07",
                                gen_ai__response__id="chatcmpl-1",
                                gen_ai__usage__input_tokens=800,
                                gen_ai__usage__output_tokens=120,
                                gen_ai__usage__cache_read__input_tokens=500,
                            ),
                            span(
                                2,
                                gen_ai__system="anthropic",  # the older attribute
                                gen_ai__request__model="claude-sonnet-4-5",
                                gen_ai__usage__input_tokens=100,
                                gen_ai__usage__output_tokens=20,
                                gen_ai__usage__cache_read_input_tokens=4000,
                                gen_ai__usage__cache_creation_input_tokens=300,
                            ),
                            span(
                                3,
                                gen_ai__operation__name="invoke_agent",
                                gen_ai__provider__name="openai",
                                gen_ai__request__model="gpt-5-mini",
                                gen_ai__usage__input_tokens=900,
                                gen_ai__usage__output_tokens=140,
                            ),
                            span(
                                4,
                                gen_ai__provider__name="aws.bedrock",
                                gen_ai__request__model="anthropic.claude",
                                gen_ai__usage__input_tokens=5,
                                gen_ai__usage__output_tokens=5,
                            ),
                            span(5, http__method="GET"),
                        ]
                    )
                ],
            ),
            # Claude Code's own spans (traces beta): its log events are what counts.
            ResourceSpans(
                resource=resource("claude-code"),
                scope_spans=[
                    ScopeSpans(
                        spans=[
                            span(
                                6,
                                gen_ai__system="anthropic",
                                gen_ai__request__model="claude-sonnet-4-5",
                                gen_ai__usage__input_tokens=10,
                                gen_ai__usage__output_tokens=1,
                            )
                        ]
                    )
                ],
            ),
        ]
    )


def test_genai_spans_are_counted_per_model_call(live_server: Any, token: str) -> None:
    code, answer = export(live_server.url, "traces", genai_traces(), token)
    assert code == 200, answer
    assert answer.partial_success.rejected_spans == 4
    message = answer.partial_success.error_message
    assert "'aws.bedrock'" in message and "agents or tools" in message
    events = {e.provider: e for e in UsageEvent.objects.all()}
    assert set(events) == {"openai", "anthropic"}
    openai, anthropic = events["openai"], events["anthropic"]
    assert openai.role == anthropic.role == "agent:release-notes-bot"
    assert (openai.model, openai.reported_model) == ("gpt-5-mini", "gpt-5-mini-2025-08-07")
    assert (openai.prompt_tokens, openai.cached_input_tokens, openai.completion_tokens) == (
        800,
        500,
        120,
    )
    assert openai.provider_request_id == "chatcmpl-1"
    assert openai.latency_ms == 1500 and openai.created_at == AT + timedelta(seconds=1.5)
    assert openai.call_id == f"otel:span:{'07' * 15}01:{'01' * 7}01"
    # Cache parts larger than the input count: the input count left them out.
    assert (anthropic.prompt_tokens, anthropic.cached_input_tokens) == (4400, 4000)
    assert anthropic.cache_write_tokens == 300
    before = stored()
    code, _answer = export(live_server.url, "traces", genai_traces(), token, as_json=True)
    assert code == 200
    assert stored() == before


# --- bad input --------------------------------------------------------------------------------


def test_a_malformed_body_is_a_400_and_stores_nothing(live_server: Any, token: str) -> None:
    base = live_server.url
    valid = claude_code_logs().SerializeToString()
    for body, content_type, gzipped in (
        (valid[: len(valid) // 2], PROTOBUF, False),  # cut in the middle of a field
        (b"\xff\xff\xff\xff\xff", PROTOBUF, False),
        (b'{"resourceLogs": [', JSON, False),
        (b'{"resourceLogs": "no"}', JSON, False),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}', JSON, False),
        (gzip.compress(valid)[:-10], PROTOBUF, True),  # truncated gzip
        (b"not gzip at all", PROTOBUF, True),
    ):
        code, raw, headers = post(
            f"{base}/v1/logs", body, token=token, content_type=content_type, gzipped=gzipped
        )
        assert code == 400, (body[:40], raw)
        assert headers["Content-Type"] == content_type
        grpc_code, message = status_message(raw, as_json=content_type == JSON)
        assert grpc_code == 3 and message
    assert stored()["events"] == 0


def test_an_unsupported_content_type_is_a_415(live_server: Any, token: str) -> None:
    code, _raw, _headers = post(
        f"{live_server.url}/v1/logs", b"x", token=token, content_type="text/plain"
    )
    assert code == 415


def test_a_missing_or_wrong_token_is_a_401(live_server: Any, token: str) -> None:
    body = claude_code_logs().SerializeToString()
    url = f"{live_server.url}/v1/logs"
    for sent, scheme in ((None, "Bearer"), ("f" * 40, "Bearer"), (token[::-1], "Token")):
        code, raw, headers = post(url, body, token=sent, scheme=scheme)
        assert code == 401
        assert headers["WWW-Authenticate"] == "Bearer"
        assert status_message(raw)[0] == 16  # UNAUTHENTICATED
    # DRF's own keyword works too.
    code, _raw, _headers = post(url, body, token=token, scheme="Token")
    assert code == 200
    assert stored()["events"] == 2


def test_a_token_without_the_permission_is_a_403(live_server: Any, transactional_db: None) -> None:
    plain = make_token("someone", permitted=False)
    code, raw, _headers = post(
        f"{live_server.url}/v1/logs", claude_code_logs().SerializeToString(), token=plain
    )
    assert code == 403
    assert "usage.record_usage" in status_message(raw)[1]
    assert stored()["events"] == 0


def test_a_50_mb_body_and_a_gzip_bomb_are_a_413(live_server: Any, token: str) -> None:
    url = f"{live_server.url}/v1/logs"
    big = claude_code_logs()
    big.resource_logs[0].scope_logs[0].log_records[-1].body.string_value = "x" * (50 * 2**20)
    body = big.SerializeToString()
    code, raw, _headers = post(url, body, token=token)
    assert code == 413
    assert "over the limit of 8,000,000 bytes" in status_message(raw)[1]
    # 50 MB that gzip makes 50 kB: refused once unpacked past the limit, never unpacked whole.
    code, raw, _headers = post(url, gzip.compress(body), token=token, gzipped=True)
    assert code == 413
    assert "once decompressed" in status_message(raw)[1]
    assert stored()["events"] == 0


# --- decoding without HTTP ------------------------------------------------------------------------


def test_a_time_ahead_of_the_server_is_taken_as_now() -> None:
    now = datetime(2025, 3, 12, 15, 30, tzinfo=UTC)
    message = claude_code_logs()
    for record in message.resource_logs[0].scope_logs[0].log_records:
        record.time_unix_nano = int((now + timedelta(hours=3)).timestamp()) * 10**9
    decoded = otlp.export_usage(otlp.Signal.LOGS, message, now=now)
    assert [r.created_at for r in decoded.records] == [now, now]
    assert all(r.source == UsageSource.OTEL for r in decoded.records)


def test_agent_roles_from_service_names() -> None:
    assert otlp.agent_role("Release Notes Bot!") == "agent:release-notes-bot"
    assert otlp.agent_role("unknown_service:python") == "agent:otel"
    assert otlp.agent_role("\u202egpj.exe") == "agent:gpj.exe"
    assert otlp.agent_role("") == "agent:otel"


def test_the_queries_of_an_export_do_not_grow_with_its_calls(db: None) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {make_token('counted')}")

    def queries(sessions: int, name: str) -> int:
        message = ExportLogsServiceRequest()
        for n in range(sessions):
            message.MergeFrom(claude_code_logs(session=f"{name}-{n}"))
        with CaptureQueriesContext(connection) as captured:
            answer = client.post("/v1/logs", message.SerializeToString(), content_type=PROTOBUF)
        assert answer.status_code == 200, answer.content
        return len(captured)

    queries(1, "warm")  # the first request fills the per-process caches (router state, token)
    small, large = queries(1, "small"), queries(100, "large")
    assert UsageEvent.objects.count() == 2 * (1 + 1 + 100)
    assert large == small, (small, large)


def test_hostile_values_are_refused_per_record_never_a_500(live_server: Any, token: str) -> None:
    def api_request(n: int, **values: Any) -> LogRecord:
        base = {
            "event.name": "api_request",
            "session.id": "hostile",
            "event.sequence": n,
            "model": "claude-nonexistent-9",
            "input_tokens": 10,
            "output_tokens": 1,
            "cache_read_tokens": 0,
            "cache_creation_tokens": 0,
        }
        base.update(values)
        return LogRecord(time_unix_nano=AT_NS, attributes=[kv(k, v) for k, v in base.items()])

    message = ExportLogsServiceRequest(
        resource_logs=[
            ResourceLogs(
                resource=resource("claude-code"),
                scope_logs=[
                    ScopeLogs(
                        log_records=[
                            api_request(1, input_tokens=2**62, cache_read_tokens=2**62),
                            api_request(2, output_tokens=-5),
                            api_request(3, model="claude\x00evil"),
                            api_request(4, cost_usd=1e30),  # stored, its cost not believed
                            api_request(5, cost_usd="0.25"),
                        ]
                    )
                ],
            )
        ]
    )
    code, answer = export(live_server.url, "logs", message, token)
    assert code == 200, answer
    assert answer.partial_success.rejected_log_records == 3
    costs = list(UsageEvent.objects.values_list("cost_usd", flat=True))
    assert sorted(costs, key=str) == [Decimal("0.25"), None]


def test_an_export_of_many_calls_is_stored_whole(live_server: Any, token: str) -> None:
    # 12,000 calls: three of runs.otlp_api's slices of 5,000, stored in one transaction.
    message = claude_code_logs(session="bulk-0")
    records = message.resource_logs[0].scope_logs[0].log_records
    template = list(records[:2])
    del records[:]
    for n in range(6_000):
        for call in template:
            record = records.add()
            record.CopyFrom(call)
            record.attributes.append(kv("request_id", f"req_{n}_{call.time_unix_nano}"))
    code, answer = export(live_server.url, "logs", message, token, gzipped=True)
    assert code == 200, answer
    assert answer.partial_success.rejected_log_records == 0
    assert stored()["events"] == 12_000
    assert UsageEvent.objects.filter(provider_request_id="req_5999_" + str(AT_NS + 2 * 10**9))
