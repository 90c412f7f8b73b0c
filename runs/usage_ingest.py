"""POST /usage/events: agents and scripts outside the workers record their provider calls.

The body is one event, or a batch `{"events": [event, ...]}`. An event is what
usage.services.UsageRecord holds, under the same names: provider, model, role, optional run and
phase ids, the token parts of usage.types.TokenUsage, the call's `call_id` and its `time`.

Checked whole before anything is stored: each event's fields (a DRF serializer: types,
limits, the role, the parts adding up), then the batch against the database (the provider is
one the router knows, each run and phase exists and the phase is in the run: one query each
for the whole batch). Errors are DRF field errors, keyed `events[3].role` in a batch and
`role` for a single event; a refused batch stores nothing. The events are then stored by
usage.ingest.usage_events_record (one transaction, idempotent per call_id).

This lives in runs, not usage: checking a run, a phase and a provider needs runs and routing
(DESIGN.md: runs → routing → usage). runs.metering checks a response metered in process
through the same function (usage_events_check).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from django.conf import settings
from django.core.validators import (
    MaxLengthValidator,
    MaxValueValidator,
    MinValueValidator,
    ProhibitNullCharactersValidator,
)
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from drf_spectacular.utils import OpenApiResponse, PolymorphicProxySerializer, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, ParseError
from rest_framework.fields import empty
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.validators import ProhibitSurrogateCharactersValidator
from rest_framework.views import APIView

from routing.router import router
from routing.text import name_problem, text_problem
from usage.ingest import IngestRaced, IngestRefused, usage_events_record
from usage.models import LOST_CALL_PREFIX, UsageSource
from usage.services import UsageRecord
from usage.types import TokenUsage
from usage.vocabulary import AGENT_ROLE_PREFIX, FIXED_ROLES, is_valid_role

from .api import AUTH_ERRORS, BAD_INPUT, ErrorOutput
from .models import Phase, Run
from .parsers import MAX_JSON_DEPTH, TOO_DEEP, json_depth_exceeds
from .permissions import CanRecordUsage

# No provider bills more than this for one call; a bigger number is a client's bug, and a sum
# of many of them must stay far inside the rollups' 64-bit columns.
MAX_TOKENS = 10**12
MAX_ID = 2**63 - 1


class PayloadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "too_large"


class UsageEventsParser(BaseParser):
    """A JSON body held to AUTOPACK_USAGE_MAX_BODY_BYTES. Reads at most one byte past the
    limit, so an oversized body (with or without a Content-Length) is never loaded.

    Not a subclass of DRF's JSONParser: DRF reads the body of those through request.body,
    which holds it to DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB) instead of this view's own limit.
    Nesting is refused as runs.parsers.JSONParser refuses it."""

    media_type = "application/json"

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        limit = settings.AUTOPACK_USAGE_MAX_BODY_BYTES
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise PayloadTooLarge(
                f"The request body is over the limit of {limit:,} bytes "
                "(AUTOPACK_USAGE_MAX_BODY_BYTES): send the events in smaller batches."
            )
        try:
            data = json.loads(raw)
        except RecursionError:
            raise ParseError(TOO_DEEP) from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise ParseError(f"JSON parse error - {exc}") from None
        if json_depth_exceeds(data, MAX_JSON_DEPTH):
            raise ParseError(TOO_DEEP)
        return data


class AwareDateTimeField(serializers.DateTimeField):
    """ISO 8601 with a UTC offset: a time without one would be read in the server's zone,
    which the client cannot know."""

    def to_internal_value(self, value: Any) -> datetime:
        result = super().to_internal_value(value)
        # DRF makes a naive input aware in the current zone; refuse it instead.
        parsed = value if isinstance(value, datetime) else None
        if parsed is None and isinstance(value, str):
            from django.utils.dateparse import parse_datetime

            try:
                parsed = parse_datetime(value)
            except ValueError:
                parsed = None
        if parsed is not None and timezone.is_naive(parsed):
            raise serializers.ValidationError(
                "give the time zone offset, e.g. 2025-03-12T15:30:00Z or +01:00"
            )
        return result


def _tokens(help_text: str, *, required: bool = False) -> serializers.IntegerField:
    if required:
        return serializers.IntegerField(min_value=0, max_value=MAX_TOKENS, help_text=help_text)
    return serializers.IntegerField(
        min_value=0, max_value=MAX_TOKENS, default=0, help_text=help_text
    )


class UsageEventInput(serializers.Serializer):
    """One provider call: usage.services.UsageRecord's fields, TokenUsage's parts flat."""

    provider = serializers.CharField(
        max_length=64, help_text="a configured provider: openai, anthropic, google_gemini, glm…"
    )
    model = serializers.CharField(max_length=200, help_text="the model asked for")
    reported_model = serializers.CharField(
        max_length=200,
        required=False,
        allow_blank=True,
        default="",
        help_text="the model the provider says answered (a dated snapshot), if it said one",
    )
    role = serializers.CharField(
        max_length=100, help_text=f"{', '.join(FIXED_ROLES)} or {AGENT_ROLE_PREFIX}<name>"
    )
    run = serializers.IntegerField(
        min_value=1, max_value=MAX_ID, required=False, allow_null=True, help_text="a run's id"
    )
    phase = serializers.IntegerField(
        min_value=1,
        max_value=MAX_ID,
        required=False,
        allow_null=True,
        help_text="a phase's id (of `run` when both are given)",
    )
    call_id = serializers.CharField(
        max_length=255,
        help_text="the call's own id, unique across everything recorded: a call_id already "
        "recorded is not counted again",
    )
    prompt_tokens = _tokens(
        "every billed input token, cache reads and writes included", required=True
    )
    completion_tokens = _tokens("every billed output token, reasoning included", required=True)
    cached_input_tokens = _tokens("cache reads (part of prompt_tokens)")
    cache_write_tokens = _tokens("cache writes (part of prompt_tokens)")
    cache_write_1h_tokens = _tokens("1-hour cache writes (part of cache_write_tokens)")
    reasoning_tokens = _tokens("reasoning/thinking tokens (part of completion_tokens)")
    provider_request_id = serializers.CharField(
        max_length=255, required=False, allow_blank=True, default=""
    )
    time = AwareDateTimeField(
        required=False,
        help_text="when the call was made, with its offset (default: now); not in the future",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        errors: dict[str, str] = {}
        for name in ("provider", "model", "reported_model", "call_id", "provider_request_id"):
            problem = text_problem(attrs.get(name, ""))
            if problem:
                errors[name] = f"{name} {problem}"
        if attrs["call_id"].startswith(LOST_CALL_PREFIX):
            errors["call_id"] = f"call_id may not start with {LOST_CALL_PREFIX!r}: Autopack's own"
        role = attrs["role"]
        if not is_valid_role(role):
            errors["role"] = (
                f"{role!r} is not a role: a role is {' or '.join(FIXED_ROLES)}, "
                f"or {AGENT_ROLE_PREFIX}<name> for an agent (e.g. {AGENT_ROLE_PREFIX}planner)"
            )
        elif problem := name_problem(role):
            errors["role"] = f"role {problem}"
        prompt, completion = attrs["prompt_tokens"], attrs["completion_tokens"]
        cached, written = attrs["cached_input_tokens"], attrs["cache_write_tokens"]
        if cached + written > prompt:
            errors["cached_input_tokens"] = (
                f"cached_input_tokens + cache_write_tokens ({cached + written:,}) is more than "
                f"prompt_tokens ({prompt:,}), which includes them"
            )
        if attrs["cache_write_1h_tokens"] > written:
            errors["cache_write_1h_tokens"] = (
                "cache_write_1h_tokens is more than cache_write_tokens, which includes them"
            )
        if attrs["reasoning_tokens"] > completion:
            errors["reasoning_tokens"] = (
                f"reasoning_tokens ({attrs['reasoning_tokens']:,}) is more than "
                f"completion_tokens ({completion:,}), which includes them"
            )
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


class UsageEventBatchInput(serializers.Serializer):
    # Schema only: the view checks the events one by one (usage_events_check), to key each
    # error by its index and to check the batch's size before looking at any event.
    events = serializers.ListField(
        child=UsageEventInput(),
        min_length=1,
        max_length=settings.AUTOPACK_USAGE_BATCH_MAX,
        help_text=f"at most AUTOPACK_USAGE_BATCH_MAX ({settings.AUTOPACK_USAGE_BATCH_MAX:,}) "
        "events; a batch is stored whole or not at all",
    )


class UsageEventsOutput(serializers.Serializer):
    new = serializers.ListField(
        child=serializers.CharField(), help_text="call_ids stored by this request"
    )
    already_recorded = serializers.ListField(
        child=serializers.CharField(),
        help_text="call_ids recorded before (a replay): not counted again",
    )


# What DRF itself adds to these fields' validators: the plain path below applies each of them.
_PLAIN_VALIDATORS = (
    MaxLengthValidator,
    ProhibitNullCharactersValidator,
    ProhibitSurrogateCharactersValidator,
    MaxValueValidator,
    MinValueValidator,
)


class _PlainField(NamedTuple):
    name: str
    kind: str  # "text", "int" or "time"
    required: bool
    default: Any  # DRF's `empty`: left out when not sent
    allow_empty: bool  # text: allow_blank; int and time: allow_null
    low: int  # text: 1 (0 with allow_blank); int: min_value
    high: int  # text: max_length; int: max_value
    field: serializers.Field


def _plain_fields(checker: UsageEventInput) -> list[_PlainField]:
    """UsageEventInput's fields as the plain path checks them, read from the fields themselves
    so the two cannot drift; a field of a shape the plain path does not copy is an error here,
    at the first request, rather than a difference in what is accepted."""
    spec = []
    for name, f in checker.fields.items():
        if (
            f.source != name
            or (f.default is not empty and callable(f.default))  # DRF's `empty` is a class
            or hasattr(checker, f"validate_{name}")
            or not all(isinstance(v, _PLAIN_VALIDATORS) for v in f.validators)
        ):
            raise TypeError(f"UsageEventInput.{name}: no plain check for this field")
        if isinstance(f, serializers.CharField):
            if f.allow_null or f.min_length is not None or not f.trim_whitespace:
                raise TypeError(f"UsageEventInput.{name}: no plain check for this field")
            low, high = (0 if f.allow_blank else 1), (f.max_length or MAX_ID)
            spec.append(
                _PlainField(name, "text", f.required, f.default, f.allow_blank, low, high, f)
            )
        elif isinstance(f, serializers.IntegerField):
            low = -MAX_ID if f.min_value is None else int(f.min_value)
            high = MAX_ID if f.max_value is None else int(f.max_value)
            spec.append(_PlainField(name, "int", f.required, f.default, f.allow_null, low, high, f))
        elif isinstance(f, AwareDateTimeField):
            spec.append(_PlainField(name, "time", f.required, f.default, f.allow_null, 0, 0, f))
        else:
            raise TypeError(f"UsageEventInput.{name}: no plain check for this field")
    return spec


def _plain_event(item: Any, spec: list[_PlainField]) -> dict[str, Any] | None:
    """What UsageEventInput's fields make of an event in the plain shape clients send (JSON
    strings that need no trimming, integers as numbers, times with their offset), or None to
    leave the event to the serializer, which then accepts it just the same or words its errors.

    DRF's per-field machinery (get_value, empty checks, to_internal_value, a validator loop)
    cost about 60 µs an event, most of a 500-event batch's time in the view; this is the same
    checks inline. The serializer's validate() still runs on the result."""
    if type(item) is not dict:
        return None
    attrs: dict[str, Any] = {}
    for p in spec:
        if p.name not in item:
            if p.required:
                return None
            if p.default is not empty:
                attrs[p.name] = p.default
            continue
        value = item[p.name]
        if value is None:
            if not p.allow_empty or p.kind == "text":
                return None
            attrs[p.name] = None
        elif p.kind == "text":
            if (
                type(value) is not str
                or not p.low <= len(value) <= p.high
                or value.strip() != value
                or text_problem(value) is not None
            ):
                return None
            attrs[p.name] = value
        elif p.kind == "int":
            if type(value) is not int or not p.low <= value <= p.high:
                return None
            attrs[p.name] = value
        else:
            if type(value) is not str:
                return None
            try:
                parsed = parse_datetime(value)
            except ValueError:
                return None
            if parsed is None or timezone.is_naive(parsed):
                return None
            try:
                attrs[p.name] = cast(serializers.DateTimeField, p.field).enforce_timezone(parsed)
            except serializers.ValidationError:
                return None
    return attrs


def _flat(prefix: str, detail: Any) -> dict[str, list[str]]:
    """DRF's nested errors as {"events[3].role": [...]}: one level, keyed as a client reads."""
    if isinstance(detail, Mapping):
        out: dict[str, list[str]] = {}
        for field, inner in detail.items():
            name = "" if field == "non_field_errors" else str(field)
            key = f"{prefix}.{name}" if prefix and name else (prefix or str(field))
            out.update(_flat(key, inner))
        return out
    return {prefix: [str(m) for m in detail] if isinstance(detail, list) else [str(detail)]}


def usage_events_check(
    items: Sequence[Any], *, batch: bool, now: datetime | None = None
) -> list[UsageRecord]:
    """The events of a body (or of runs.metering) as UsageRecords, or ValidationError with every
    problem found, keyed `events[i].field` (`field` when not `batch`). Nothing is written."""
    now = now or timezone.now()
    skew = timedelta(seconds=settings.AUTOPACK_USAGE_FUTURE_SKEW_SECONDS)

    def key(index: int, field: str) -> str:
        return f"events[{index}].{field}" if batch else field

    errors: dict[str, list[str]] = {}
    valid: list[tuple[int, dict[str, Any]]] = []
    # One serializer for every event, as a ListSerializer does it: a serializer deep-copies its
    # declared fields once per instance, which one per event made most of a batch's cost.
    # Not a ListSerializer itself: that keeps no event when one is bad, and the batch checks
    # below should still report the others' problems.
    checker = UsageEventInput()
    spec = _plain_fields(checker)
    for index, item in enumerate(items):
        plain = _plain_event(item, spec)
        if plain is not None:
            try:
                valid.append((index, checker.validate(plain)))
                continue
            except serializers.ValidationError:
                pass  # reported below, by the serializer, in its own words
        try:
            valid.append((index, dict(checker.run_validation(item))))
        except serializers.ValidationError as exc:
            errors.update(_flat(f"events[{index}]" if batch else "", exc.detail))
    # The whole batch against the database and the router: one query per kind, not per event.
    known = router.state().providers
    run_ids = {a["run"] for _i, a in valid if a.get("run")}
    phase_ids = {a["phase"] for _i, a in valid if a.get("phase")}
    runs = (
        set(Run.objects.filter(pk__in=run_ids).order_by().values_list("pk", flat=True))
        if run_ids
        else set()
    )
    phase_runs = (
        dict(Phase.objects.filter(pk__in=phase_ids).order_by().values_list("pk", "run_id"))
        if phase_ids
        else {}
    )
    records: list[UsageRecord] = []
    first_of: dict[str, int] = {}
    for index, attrs in valid:
        problems: dict[str, str] = {}
        first = first_of.setdefault(attrs["call_id"], index)
        if first != index:
            # One call_id is one call: which of the two to keep would be a guess.
            problems["call_id"] = f"the same call_id as events[{first}]"
        if attrs["provider"] not in known:
            names = ", ".join(sorted(known)) or "none"
            problems["provider"] = (
                f"unknown provider {attrs['provider']!r}; the providers are: {names}"
            )
        run_id, phase_id = attrs.get("run"), attrs.get("phase")
        if run_id and run_id not in runs:
            problems["run"] = f"no run {run_id}"
        if phase_id:
            owner = phase_runs.get(phase_id)
            if owner is None:
                problems["phase"] = f"no phase {phase_id}"
            elif run_id and owner != run_id:
                problems["phase"] = f"phase {phase_id} is in run {owner}, not run {run_id}"
            else:
                run_id = owner
        at = attrs.get("time") or now
        if at > now + skew:
            problems["time"] = (
                f"{at.isoformat()} is in the future (the server's time is {now.isoformat()}; "
                f"AUTOPACK_USAGE_FUTURE_SKEW_SECONDS allows {skew.total_seconds():g} s ahead)"
            )
        if problems:
            errors.update({key(index, f): [m] for f, m in problems.items()})
            continue
        records.append(
            UsageRecord(
                call_id=attrs["call_id"],
                provider=attrs["provider"],
                model=attrs["model"],
                role=attrs["role"],
                usage=TokenUsage(
                    prompt_tokens=attrs["prompt_tokens"],
                    completion_tokens=attrs["completion_tokens"],
                    cached_input_tokens=attrs["cached_input_tokens"],
                    cache_write_tokens=attrs["cache_write_tokens"],
                    reasoning_tokens=attrs["reasoning_tokens"],
                    cache_write_1h_tokens=attrs["cache_write_1h_tokens"],
                ),
                reported_model=attrs["reported_model"],
                run_id=run_id or None,
                phase_id=phase_id or None,
                provider_request_id=attrs["provider_request_id"],
                created_at=at,
                source=UsageSource.API,
            )
        )
    if errors:
        raise serializers.ValidationError(errors)
    return records


def usage_events_store(records: Sequence[UsageRecord]) -> dict[str, list[str]]:
    """Store checked records: {"new": [...], "already_recorded": [...]}; a refusal of the batch
    as a whole (a call_id twice) is a ValidationError naming the event."""
    try:
        result = usage_events_record(records=records)
    except IngestRefused as exc:
        field, _sep, message = str(exc).partition(": ")
        raise serializers.ValidationError({field: [message]}) from None
    return {"new": result.new, "already_recorded": result.already_recorded}


class ServiceBusy(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "busy"


class UsageEventsRecordApi(APIView):
    """Record provider calls made outside Autopack's workers (an agent's own calls): one event,
    or `{"events": [...]}`. All or nothing: a refused batch stores nothing. Idempotent per
    `call_id`: a call_id recorded before is not counted again and is listed under
    `already_recorded`. 201 when the request stored at least one event, 200 when every event
    had been recorded before (a replay). Needs the permission usage.record_usage."""

    permission_classes = [CanRecordUsage]
    parser_classes = [UsageEventsParser]

    @extend_schema(
        request=PolymorphicProxySerializer(
            component_name="UsageEventsInput",
            serializers=[UsageEventInput, UsageEventBatchInput],
            resource_type_field_name=None,
        ),
        responses={
            201: OpenApiResponse(UsageEventsOutput, description="At least one event was new."),
            200: OpenApiResponse(
                UsageEventsOutput, description="Every event had been recorded before."
            ),
            **BAD_INPUT,
            413: OpenApiResponse(
                ErrorOutput,
                description="The body is over AUTOPACK_USAGE_MAX_BODY_BYTES (a batch over "
                "AUTOPACK_USAGE_BATCH_MAX events is a 400 on `events`).",
            ),
            503: OpenApiResponse(
                ErrorOutput,
                description="Other requests kept recording the same call_ids at that moment; "
                "nothing was stored: send it again.",
            ),
            **AUTH_ERRORS,
        },
        operation_id="usage_events_record",
    )
    def post(self, request: Request) -> Response:
        data: Any = request.data
        if not isinstance(data, Mapping):
            raise serializers.ValidationError(
                {"non_field_errors": ['send one event (an object) or {"events": [...]}']}
            )
        batch = "events" in data
        if batch:
            if set(data) != {"events"}:
                extra = ", ".join(sorted(str(k) for k in set(data) - {"events"}))
                raise serializers.ValidationError(
                    {extra: ['a batch is {"events": [...]} and nothing else']}
                )
            items = data["events"]
            if not isinstance(items, list) or not items:
                raise serializers.ValidationError({"events": ["a non-empty list of events"]})
            limit = settings.AUTOPACK_USAGE_BATCH_MAX
            if len(items) > limit:
                # Before any event is looked at: the cost of a refusal must not grow with it.
                # 400 as for any input the schema forbids (maxItems), not 413.
                raise serializers.ValidationError(
                    {
                        "events": [
                            f"a batch holds at most {limit:,} events (AUTOPACK_USAGE_BATCH_MAX); "
                            f"this one has {len(items):,}: send them in batches of {limit:,} "
                            "or fewer"
                        ]
                    }
                )
        else:
            items = [data]
        records = usage_events_check(items, batch=batch)
        try:
            answer = usage_events_store(records)
        except IngestRaced as exc:
            raise ServiceBusy(str(exc)) from None
        code = status.HTTP_201_CREATED if answer["new"] else status.HTTP_200_OK
        return Response(answer, status=code)
