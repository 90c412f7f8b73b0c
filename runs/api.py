"""REST API for runs (DESIGN.md "Contracts"): thin views over runs.services and selectors."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate
from django.core.cache import cache
from django.http import HttpResponse, HttpResponseBase
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
)
from rest_framework import serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import BaseParser, FormParser, MultiPartParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from routing.mapping import model_override_global
from routing.models import Scope
from routing.reach import Reach, provider_reach
from usage.display import api_row, zone_name
from usage.selectors import get_usage_overview
from usage.vocabulary import (
    ADD_GLOBAL_GUARD,
    COMPLEXITIES,
    DEFAULT_PERIOD,
    DELETE_GLOBAL_GUARD,
    PERIODS,
)
from usage.windows import CapUnit, WindowKind

from . import guards, pollcache, selectors, services
from .authentication import MISSING, RunPollTokenAuthentication, polled_run_updated_at
from .models import BudgetGuard, ChecksState, Run
from .parsers import JSONParser
from .permissions import (
    CanControlRuns,
    CanOverrideModels,
    IsStaffReader,
    TokenObtainThrottle,
    requires,
)
from .plans import GuardInvalid, PlanError, parse_plan_upload, validate_plan
from .states import RUN_ACTIVE


class WindowAmountsOutput(serializers.Serializer):
    tokens = serializers.IntegerField(allow_null=True, help_text="in + out")
    usd = serializers.FloatField(allow_null=True)
    requests = serializers.IntegerField(allow_null=True, help_text="calls")


class BurnRateOutput(serializers.Serializer):
    tokens = serializers.FloatField(help_text="in + out tokens per hour")
    usd = serializers.FloatField(help_text="USD per hour (priced calls only)")
    requests = serializers.FloatField(
        allow_null=True, help_text="calls per hour; null unless the window caps requests"
    )


class WindowOutput(serializers.Serializer):
    """One cap window of a provider (usage.display.api_row), with its burn rates and forecast
    (usage.forecast; null where the window was read without them)."""

    provider = serializers.CharField()
    name = serializers.CharField(help_text="e.g. session, week, day")
    kind = serializers.ChoiceField(choices=WindowKind.choices)
    description = serializers.CharField(help_text='e.g. "last 5 h", "day in America/New_York"')
    percent = serializers.FloatField(
        allow_null=True, help_text="of the effective cap of `unit`; null: no cap"
    )
    unit = serializers.ChoiceField(
        choices=CapUnit.choices, allow_null=True, help_text="the unit nearest its cap"
    )
    caps = WindowAmountsOutput(
        help_text="effective caps (plan cap × autopack_share; the whole plan cap when `counts` "
        "is everything); null: none"
    )
    counts = serializers.ChoiceField(
        choices=["autopack", "everything"],
        help_text="autopack: `used` is Autopack's usage (workers and agents), outside tools' "
        "usage left out (the provider's outside_usage: share); everything: outside tools' "
        "usage too, against the whole cap (outside_usage: whole_cap)",
    )
    used = WindowAmountsOutput(help_text="used in [start, now)")
    start = serializers.DateTimeField()
    reset = serializers.DateTimeField(
        allow_null=True,
        help_text="when it starts again; a rolling window: when its oldest usage leaves it "
        "(null: it holds none)",
    )
    over_soft = serializers.BooleanField()
    over_hard = serializers.BooleanField()
    text = serializers.CharField(
        help_text="in words, times in the site's zone, e.g. week 62% of 20 M tokens · resets "
        "Thu 18:00 (in 2 d 3 h)"
    )
    burn_last_hour = BurnRateOutput(
        allow_null=True, required=False, help_text="the pace over the last hour"
    )
    burn_so_far = BurnRateOutput(
        allow_null=True, required=False, help_text="the pace over the window so far (start → now)"
    )
    cap_reached_at = serializers.DateTimeField(
        allow_null=True,
        required=False,
        help_text="an estimate: when a cap is reached if the last hour's pace goes on; null when "
        "the pace is zero or the window resets first (a rolling window: stays under its cap)",
    )
    cap_reached_unit = serializers.ChoiceField(
        choices=CapUnit.choices,
        allow_null=True,
        required=False,
        help_text="the unit whose cap is reached first at that pace",
    )
    before_reset_seconds = serializers.IntegerField(
        allow_null=True,
        required=False,
        help_text="how long before the reset cap_reached_at is (null: not reached, or rolling)",
    )
    pace_text = serializers.CharField(
        required=False,
        help_text="in words: burning 1.2 M tokens/h (last hour), 0.8 M/h this week · at this "
        "pace the cap is reached Wed 09:10, 1 d 9 h before the reset",
    )


@extend_schema_field(OpenApiTypes.NUMBER)
class SecondsField(serializers.Field):
    """A duration as seconds (a number), or null."""

    def to_representation(self, value: Any) -> float:
        return float(value.total_seconds())


class WindowFitOutput(serializers.Serializer):
    window = serializers.CharField(help_text="the provider's cap window, e.g. week")
    unit = serializers.ChoiceField(choices=CapUnit.choices)
    need_estimate = serializers.FloatField(
        help_text="estimated need of the remaining phases, in `unit`"
    )
    left = serializers.FloatField(help_text="left in the window now (effective cap − used)")
    fits = serializers.BooleanField(
        help_text="the estimated need fits before the reset (or after it, see fits_after_reset)"
    )
    pause_near_phase = serializers.IntegerField(
        allow_null=True,
        help_text="the phase (run-wide position) near which the need passes what is left",
    )
    fits_after_reset = serializers.BooleanField(
        help_text="it resets (a rolling window: frees) before the run reaches that phase"
    )
    reset = serializers.DateTimeField(allow_null=True)
    text = serializers.CharField(
        allow_blank=True, help_text="in words; empty when it fits before the reset"
    )


class ProviderNeedOutput(serializers.Serializer):
    provider = serializers.CharField()
    tokens_estimate = serializers.IntegerField(help_text="estimated tokens (in + out) still needed")
    requests_estimate = serializers.IntegerField(help_text="estimated calls still needed")
    usd_estimate = serializers.DecimalField(
        max_digits=18,
        decimal_places=2,
        allow_null=True,
        coerce_to_string=False,
        help_text="estimated USD still needed; null when some sampled call had no price",
    )
    windows = WindowFitOutput(many=True, help_text="each capped window with a need")


class ForecastOutput(serializers.Serializer):
    """runs.forecast.RunForecast: every figure an estimate."""

    remaining_phases = serializers.IntegerField()
    estimated_phases = serializers.IntegerField(
        help_text="remaining phases with an estimate (the rest had nothing to estimate from)"
    )
    tokens_estimate = serializers.IntegerField(help_text="estimated tokens still needed")
    basis = serializers.CharField(help_text='e.g. "from 6 finished phases of this run"')
    basis_run_phases = serializers.IntegerField()
    basis_earlier_phases = serializers.IntegerField()
    phase_duration_estimate = SecondsField(
        allow_null=True, help_text="median phase duration used for the ETA, seconds"
    )
    work_left_estimate = SecondsField(allow_null=True, help_text="seconds")
    eta_estimate = serializers.DateTimeField(
        allow_null=True, help_text="null while paused or when no phase duration is known"
    )
    providers = ProviderNeedOutput(many=True)
    lines = serializers.ListField(child=serializers.CharField(), help_text="the forecast in words")


class RunStatusOutput(serializers.Serializer):
    run_id = serializers.IntegerField()
    name = serializers.CharField()
    state = serializers.CharField()
    state_reason = serializers.CharField()
    current_tier_name = serializers.CharField(allow_null=True)
    current_phase_name = serializers.CharField(allow_null=True)
    current_tier_index = serializers.IntegerField(allow_null=True)
    current_phase_index = serializers.IntegerField(allow_null=True)
    total_tiers = serializers.IntegerField()
    total_phases = serializers.IntegerField()
    completed_tiers = serializers.IntegerField()
    completed_phases = serializers.IntegerField()
    percent_complete = serializers.IntegerField()
    position_label = serializers.CharField()
    tokens_in = serializers.IntegerField()
    tokens_out = serializers.IntegerField()
    issues = serializers.DictField(child=serializers.IntegerField())
    attempts = serializers.IntegerField()
    guards = serializers.ListField(child=serializers.DictField())
    workspace_path = serializers.CharField(
        allow_blank=True, help_text="the run's git working tree ('' until its first phase starts)"
    )
    branch = serializers.CharField(allow_blank=True, help_text="autopack/run-<id>: approved work")
    base_commit = serializers.CharField(allow_blank=True, help_text="where the run started")
    head_commit = serializers.CharField(allow_blank=True, help_text="the last approved commit")
    files_changed_count = serializers.IntegerField(
        help_text="distinct files the approved phases changed"
    )
    files_changed = serializers.ListField(
        child=serializers.CharField(allow_blank=True),
        max_length=selectors.STATUS_FILES,
        help_text=f"the first {selectors.STATUS_FILES} of them, by path",
    )
    lines_added = serializers.IntegerField(help_text="summed over the approved commits")
    lines_removed = serializers.IntegerField(help_text="summed over the approved commits")
    checks_state = serializers.ChoiceField(
        choices=ChecksState.choices, help_text="the worst of the finished phases' checks"
    )
    phase_checks = serializers.DictField(
        child=serializers.IntegerField(), help_text="finished phases per checks state"
    )
    windows = serializers.ListField(
        child=WindowOutput(),
        help_text="every provider's cap windows (the run's next phase may go to any of them, "
        "fallbacks included), by provider then window",
    )
    forecast = ForecastOutput(
        allow_null=True,
        help_text="tokens still needed, ETA and fit per cap window, all estimated from finished "
        "phases (runs.forecast); null once the run has finished or is stopping",
    )


class ErrorOutput(serializers.Serializer):
    detail = serializers.CharField()


class ConflictOutput(ErrorOutput):
    state = serializers.CharField()
    requested = serializers.CharField()


# The answers an operation gives besides its success, so the schema documents every response
# the API really sends (tests/security/test_schema_fuzz.py holds it to that).
AUTH_ERRORS = {
    401: OpenApiResponse(ErrorOutput, description="No credentials, or a bad or revoked token."),
    403: OpenApiResponse(
        ErrorOutput, description="Not staff, without the permission needed, or a CSRF failure."
    ),
    429: OpenApiResponse(ErrorOutput, description="Throttled; retry after Retry-After seconds."),
}
BAD_INPUT = {
    400: OpenApiResponse(
        OpenApiTypes.OBJECT, description="Refused input: {field: [message, ...]} or {detail}."
    )
}
NOT_FOUND = {404: OpenApiResponse(ErrorOutput, description="No such run.")}
# Run ids are positive 64-bit integers; a path segment that is not one is an unknown run (a
# JSON 404, runs.api_errors.page_not_found).
RUN_ID_SCHEMA = {"type": "integer", "format": "int64", "minimum": 1, "maximum": 2**63 - 1}
RUN_ID = OpenApiParameter("run_id", RUN_ID_SCHEMA, OpenApiParameter.PATH, description="the run")


def _query(serializer: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    """The validated query parameters (400 with field errors otherwise). A plain dict, not the
    QueryDict: as a form, DRF would read `?x=` as "not given" and take the default, where the
    schema says an empty value is not allowed."""
    params = serializer(data=request.query_params.dict())
    params.is_valid(raise_exception=True)
    return dict(params.validated_data)


PATCH_MEDIA_TYPE = "text/x-patch"
CONFLICT = {
    409: OpenApiResponse(ConflictOutput, description="Not allowed in the run's current state.")
}


def _status_response(run_id: int, code: int = status.HTTP_200_OK) -> Response:
    return Response(
        RunStatusOutput(selectors.run_status(run_id=run_id).as_dict()).data, status=code
    )


class RunStatusApi(APIView):
    """The polled endpoint. On PostgreSQL it answers from memory kept exact by notifications
    (runs/pollcache.py), no query at all; otherwise (SQLite, inside a transaction, or while the
    notification session is down) from a cache keyed by the run's updated_at, which every state
    and progress change moves, read in the token's statement (runs/authentication.py) or, for
    a browser's session, by a primary-key read. Either way state and progress are never stale;
    counts that change without touching the run (tokens, issues) may lag by
    AUTOPACK_STATUS_CACHE_SECONDS."""

    authentication_classes = [RunPollTokenAuthentication, SessionAuthentication]

    @extend_schema(
        parameters=[RUN_ID],
        responses={200: RunStatusOutput, **NOT_FOUND, **AUTH_ERRORS},
        operation_id="run_status",
    )
    def get(self, request: Request, run_id: int) -> Response:
        max_age = settings.AUTOPACK_STATUS_CACHE_SECONDS
        if pollcache.LISTENER.ready():
            data = pollcache.status_data(run_id, max_age=max_age)
            if data is None:
                stamp = pollcache.stamp()
                data = _status_data(run_id)
                pollcache.STATUS.put(run_id, stamp, data)
            return Response(data)
        updated = polled_run_updated_at(request)
        if updated is MISSING:
            updated = selectors.run_updated_at(run_id=run_id)
        if updated is None:
            raise Run.DoesNotExist(f"run {run_id} does not exist")
        key = f"runs:status:{run_id}:{updated}".replace(" ", "T")
        data = cache.get(key)
        if data is None:
            data = _status_data(run_id)
            cache.set(key, data, max_age)
        return Response(data)


def _status_data(run_id: int) -> Any:
    status = selectors.run_status(run_id=run_id, window_rows=selectors.status_window_rows())
    return RunStatusOutput(status.as_dict()).data


class FirstRendererNegotiation(BaseContentNegotiation):
    """The first renderer whatever the client accepts: an error of the patch download is JSON
    (as documented) also for a client that asked for text/x-patch, never a 406."""

    def select_parser(self, request: Request, parsers: Iterable[BaseParser]) -> BaseParser | None:
        return next(iter(parsers), None)

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        first = next(iter(renderers))
        return first, first.media_type


class RunPatchApi(APIView):
    """The run's approved change as a patch series (`git format-patch` mbox, base..head of the
    run's branch): `git am` applies it to the commit the run started from. Empty (200) while
    no phase has been approved; 409 before the run's first phase starts (there is no branch
    yet) or when its repository can no longer be read."""

    permission_classes = [IsStaffReader]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = FirstRendererNegotiation

    @extend_schema(
        parameters=[RUN_ID],
        responses={
            (200, PATCH_MEDIA_TYPE): OpenApiResponse(
                OpenApiTypes.STR,
                description="The patch series (empty while no phase has been approved).",
            ),
            **NOT_FOUND,
            409: OpenApiResponse(
                ConflictOutput,
                description="No branch yet (the run has not started a phase), or its "
                "repository cannot be read.",
            ),
            **AUTH_ERRORS,
        },
        operation_id="run_patch",
    )
    def get(self, request: Request, run_id: int) -> HttpResponseBase:
        try:
            patch = selectors.run_patch(run_id=run_id)
        except selectors.PatchUnavailable as exc:
            return Response(
                {"detail": str(exc), "state": exc.state, "requested": "patch"},
                status=status.HTTP_409_CONFLICT,
            )
        response = HttpResponse(patch, content_type=f"{PATCH_MEDIA_TYPE}; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="autopack-run-{run_id}.patch"'
        return response


class RunListApi(APIView):
    permission_classes = [IsStaffReader]

    class Pagination(PageNumberPagination):
        page_size = 20
        page_size_query_param = "page_size"
        max_page_size = 100

    class OutputSerializer(serializers.ModelSerializer):
        run_id = serializers.IntegerField(source="pk")
        percent_complete = serializers.IntegerField()
        position_label = serializers.CharField()

        class Meta:
            model = Run
            fields = [
                "run_id",
                "name",
                "state",
                "state_reason",
                "percent_complete",
                "position_label",
                "created_at",
                "started_at",
                "finished_at",
            ]

    class InputSerializer(serializers.Serializer):
        page = serializers.IntegerField(min_value=1, required=False, help_text="1-based page")
        page_size = serializers.IntegerField(
            min_value=1,
            max_value=100,  # Pagination.max_page_size
            required=False,
            help_text="runs per page (default 20)",
        )
        active = serializers.CharField(
            required=False, allow_blank=True, help_text="1 or true: only unfinished runs"
        )

        class Meta:
            ref_name = "RunListQuery"

    class PageOutput(serializers.Serializer):
        count = serializers.IntegerField()
        next = serializers.URLField(allow_null=True)
        previous = serializers.URLField(allow_null=True)
        results = serializers.ListField(child=serializers.DictField())

    @extend_schema(
        parameters=[InputSerializer],
        responses={
            200: PageOutput,
            **BAD_INPUT,
            404: OpenApiResponse(ErrorOutput, description="No such page."),
            **AUTH_ERRORS,
        },
        operation_id="runs_list",
    )
    def get(self, request: Request) -> Response:
        # Refused here, not left to the paginator, which falls back to the default page size
        # for a page_size it cannot read.
        _query(self.InputSerializer, request)
        # with_position: each run's position_label names its phase, in the list's own query.
        runs = selectors.with_position(Run.objects.order_by("-created_at"))
        if request.query_params.get("active") in ("1", "true"):
            runs = runs.filter(state__in=list(RUN_ACTIVE))
        paginator = self.Pagination()
        page = paginator.paginate_queryset(runs, request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


class PlanJSONParser(JSONParser):
    """A JSON plan body, held to the same byte limit as a plan file. Reads at most one byte
    past the limit, so an oversized body (with or without a Content-Length) is never loaded.
    (Nesting is refused by the parser it extends, as for every JSON body.)"""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        limit = settings.AUTOPACK_MAX_PLAN_BYTES
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise PlanError(f"plan: the request body is over the limit of {limit:,} bytes")
        return super().parse(io.BytesIO(raw), media_type, parser_context)


class RunStartApi(APIView):
    """Start a run from a plan: the plan as the JSON body, or a YAML/JSON file upload
    (multipart field `file`). `?start=false` creates it without starting."""

    permission_classes = [CanControlRuns]
    parser_classes = [PlanJSONParser, MultiPartParser, FormParser]

    @extend_schema(
        request={
            "application/json": OpenApiTypes.OBJECT,
            "multipart/form-data": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            },
        },
        parameters=[OpenApiParameter("start", str, description="false: create, don't start")],
        responses={
            201: RunStatusOutput,
            **BAD_INPUT,
            413: OpenApiResponse(ErrorOutput, description="The request body is too large."),
            **AUTH_ERRORS,
        },
        operation_id="runs_start",
    )
    def post(self, request: Request) -> Response:
        upload = request.FILES.get("file")
        if upload is not None:
            spec = parse_plan_upload(upload)
        elif isinstance(request.data, dict) and request.data:
            # {"plan": {...}} or the plan itself; a plan with a "plan" field is refused by
            # validate_plan as an unknown field.
            data: Any = request.data
            spec = validate_plan(data["plan"] if set(data) == {"plan"} else data)
        else:
            raise PlanError("plan: send the plan as a JSON body or upload it as 'file'")
        run = services.run_create(plan=spec, created_by=request.user)
        if request.query_params.get("start", "true") not in ("0", "false"):
            services.run_start(run_id=run.pk)
        return _status_response(run.pk, status.HTTP_201_CREATED)


class _RunControlApi(APIView):
    permission_classes = [CanControlRuns]
    service: Any = None

    @extend_schema(
        request=None,
        parameters=[RUN_ID],
        responses={200: RunStatusOutput, **NOT_FOUND, **CONFLICT, **AUTH_ERRORS},
    )
    def post(self, request: Request, run_id: int) -> Response:
        type(self).service(run_id=run_id)
        return _status_response(run_id)


class RunPauseApi(_RunControlApi):
    service = staticmethod(services.run_pause)


class RunResumeApi(_RunControlApi):
    service = staticmethod(services.run_resume)


class RunCancelApi(_RunControlApi):
    service = staticmethod(services.run_stop)


def model_mapping_output(*, run_id: int | None) -> dict[str, Any]:
    """The mapping as GET /dashboard/models answers it, each provider's `configured` on the
    workers' report (routing.reach: the processes that make the calls), never this web
    process's environment. POST /dashboard/models/override answers the same."""
    data = selectors.model_mapping(run_id=run_id)
    reach = provider_reach()
    data["choices"]["providers"] = {
        name: {"configured": reach.reach(name).configured, "reach": reach.reach(name).value}
        for name in data["choices"]["providers"]
    }
    return data


class ProviderChoiceOutput(serializers.Serializer):
    configured = serializers.BooleanField(
        help_text=(
            "true when a running Celery worker reports this provider's API key set in its own "
            "environment (workers report at start and with every heartbeat; a report older than "
            "AUTOPACK_WORKER_LOST_AFTER_SECONDS is a lost worker's and does not count). Never "
            "this web process's environment: the workers make the calls. A model change accepts "
            "a provider that is configured."
        )
    )
    reach = serializers.ChoiceField(
        choices=[r.value for r in Reach],
        help_text=(
            "why: reported (a running worker has the key), no_worker (no worker has reported: "
            "none is running, so nobody can tell), no_key (running workers report no key for it)"
        ),
    )


class MappingRowOutput(serializers.Serializer):
    role = serializers.CharField()
    category = serializers.CharField(help_text='"*" is the any-category row')
    complexity = serializers.CharField()
    model = serializers.CharField()
    provider = serializers.CharField()
    scope = serializers.CharField(help_text="baseline, global or run: where the model comes from")
    reason = serializers.CharField()


class MappingChoicesOutput(serializers.Serializer):
    roles = serializers.ListField(child=serializers.CharField())
    categories = serializers.ListField(child=serializers.CharField())
    complexities = serializers.ListField(child=serializers.CharField())
    models_by_provider = serializers.DictField(child=serializers.ListField())
    providers = serializers.DictField(
        child=ProviderChoiceOutput(),
        help_text="each provider by name, with whether the workers can call it",
    )
    scopes = serializers.ListField(child=serializers.CharField())


class ModelMappingOutput(serializers.Serializer):
    run_id = serializers.IntegerField(allow_null=True)
    rows = MappingRowOutput(many=True)
    choices = MappingChoicesOutput()


class ModelMappingApi(APIView):
    """Every (role, category, complexity, model, scope) row in force, globally or for a run
    (`?run_id=`), and the allowed choices, with each provider's `configured` as the running
    workers report it."""

    permission_classes = [IsStaffReader]

    class InputSerializer(serializers.Serializer):
        run_id = serializers.IntegerField(
            min_value=1, max_value=2**63 - 1, required=False, help_text="that run's own mapping"
        )

        class Meta:
            ref_name = "ModelMappingQuery"

    @extend_schema(
        parameters=[InputSerializer],
        responses={200: ModelMappingOutput, **BAD_INPUT, **NOT_FOUND, **AUTH_ERRORS},
        operation_id="models_mapping",
    )
    def get(self, request: Request) -> Response:
        run_id = _query(self.InputSerializer, request).get("run_id")
        if run_id is not None:
            Run.objects.get(pk=run_id)  # 404 for an unknown run
        return Response(model_mapping_output(run_id=run_id))


class ModelOverrideApi(APIView):
    permission_classes = [CanOverrideModels]
    # JSON only: a form cannot say "no run" (null) for a global change the way the schema does;
    # the dashboard's own form posts to /dashboard/mapping.
    parser_classes = [JSONParser]

    class InputSerializer(serializers.Serializer):
        role = serializers.CharField(max_length=100)
        # "*" is the any-category row, as GET /dashboard/models lists it.
        category = serializers.RegexField(r"^(\*|[a-z][a-z0-9_]{0,63})\Z", max_length=64)
        complexity = serializers.ChoiceField(choices=COMPLEXITIES)
        model = serializers.CharField(max_length=100)
        scope = serializers.ChoiceField(choices=Scope.choices)
        run_id = serializers.IntegerField(required=False, allow_null=True, min_value=1)

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            if attrs["scope"] == Scope.RUN and not attrs.get("run_id"):
                raise serializers.ValidationError({"run_id": ["required when scope is run"]})
            if attrs["scope"] == Scope.GLOBAL and attrs.get("run_id"):
                raise serializers.ValidationError(
                    {"run_id": ["only with scope run; a global change applies to new runs"]}
                )
            return attrs

    @extend_schema(
        request=InputSerializer,
        responses={
            200: ModelMappingOutput,
            **BAD_INPUT,
            **NOT_FOUND,
            **CONFLICT,
            **AUTH_ERRORS,
        },
        operation_id="models_override",
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        key = {
            "role": v["role"],
            "category": v["category"],
            "complexity": v["complexity"],
            "model": v["model"],
        }
        if v["scope"] == Scope.RUN:
            services.run_model_override(
                run_id=v["run_id"], changed_by=request.user, via="api", **key
            )
            return Response(model_mapping_output(run_id=v["run_id"]))
        model_override_global(changed_by=request.user, via="api", **key)
        return Response(model_mapping_output(run_id=None))


_CORE_AUX_HELP = {
    "core_tokens_in": "prompt tokens of the builder and the auditor (core)",
    "core_tokens_out": "completion tokens of the builder and the auditor (core)",
    "aux_tokens_in": "prompt tokens of Autopack's agents (agent:<name>; aux)",
    "aux_tokens_out": "completion tokens of Autopack's agents (agent:<name>; aux)",
    "outside_tokens_in": "prompt tokens of outside tools (Claude Code, Codex, … over "
    "OpenTelemetry)",
    "outside_tokens_out": "completion tokens of outside tools (Claude Code, Codex, … over "
    "OpenTelemetry)",
}
_COUNTS_HELP = (
    "what the caps hold: autopack (Autopack's usage against cap × autopack_share, outside "
    "tools left out) or everything (outside tools' usage too, against the whole cap)"
)


_USAGE_COUNTS = ("tokens_in", "tokens_out", *_CORE_AUX_HELP)


class UsageProviderOutput(serializers.Serializer):
    provider = serializers.CharField()
    period = serializers.ChoiceField(choices=PERIODS)
    tokens_in = serializers.IntegerField()
    tokens_out = serializers.IntegerField()
    core_tokens_in = serializers.IntegerField(help_text=_CORE_AUX_HELP["core_tokens_in"])
    core_tokens_out = serializers.IntegerField(help_text=_CORE_AUX_HELP["core_tokens_out"])
    aux_tokens_in = serializers.IntegerField(help_text=_CORE_AUX_HELP["aux_tokens_in"])
    aux_tokens_out = serializers.IntegerField(help_text=_CORE_AUX_HELP["aux_tokens_out"])
    outside_tokens_in = serializers.IntegerField(help_text=_CORE_AUX_HELP["outside_tokens_in"])
    outside_tokens_out = serializers.IntegerField(help_text=_CORE_AUX_HELP["outside_tokens_out"])
    counts = serializers.ChoiceField(choices=["autopack", "everything"], help_text=_COUNTS_HELP)
    percent_of_cap = serializers.FloatField(
        allow_null=True, help_text="of what `counts` holds against the cap; null: no cap"
    )
    cap = serializers.IntegerField(
        allow_null=True,
        help_text="effective cap (plan cap × autopack_share; the whole cap when `counts` is "
        "everything), in + out tokens",
    )
    cap_window = serializers.CharField(
        allow_null=True,
        required=False,
        help_text="when a configured cap window of the period's name (day, week, month) counts "
        "this cap instead of the calendar period in UTC: its name (see `windows`); cap and "
        "percent_of_cap are then null",
    )
    over_soft_limit = serializers.BooleanField()
    over_hard_limit = serializers.BooleanField()
    windows = WindowOutput(
        many=True, help_text="the provider's cap windows (only `window`'s when it is given)"
    )


class UsageModelOutput(serializers.Serializer):
    provider = serializers.CharField()
    model = serializers.CharField(help_text="the catalogue model")
    reported_models = serializers.ListField(
        child=serializers.CharField(), help_text="the snapshots the provider said answered"
    )
    tokens_in = serializers.IntegerField()
    tokens_out = serializers.IntegerField()
    core_tokens_in = serializers.IntegerField(help_text=_CORE_AUX_HELP["core_tokens_in"])
    core_tokens_out = serializers.IntegerField(help_text=_CORE_AUX_HELP["core_tokens_out"])
    aux_tokens_in = serializers.IntegerField(help_text=_CORE_AUX_HELP["aux_tokens_in"])
    aux_tokens_out = serializers.IntegerField(help_text=_CORE_AUX_HELP["aux_tokens_out"])
    outside_tokens_in = serializers.IntegerField(help_text=_CORE_AUX_HELP["outside_tokens_in"])
    outside_tokens_out = serializers.IntegerField(help_text=_CORE_AUX_HELP["outside_tokens_out"])
    cost_usd = serializers.FloatField(allow_null=True, help_text="null: no call had a price")
    calls = serializers.IntegerField()
    estimated_calls = serializers.IntegerField(help_text="calls whose tokens are estimated")


class UsageSummaryOutput(serializers.Serializer):
    period = serializers.ChoiceField(choices=PERIODS)
    window = serializers.CharField(allow_null=True, help_text="the window asked for, or null")
    time_zone = serializers.CharField(help_text="the zone of the windows' `text`")
    providers = UsageProviderOutput(many=True)
    models = UsageModelOutput(many=True)


class UsageSummaryApi(APIView):
    """Tokens per provider against its effective cap, and per model with cost; each also split
    into core (builder and auditor), aux (Autopack's agents) and outside (outside tools)
    tokens. Each provider also lists its cap windows (percent, caps, used, start, reset);
    `window` keeps only the windows of that name (a provider without one lists none), and an
    unknown name is a 400 naming those there are."""

    permission_classes = [IsStaffReader]

    class InputSerializer(serializers.Serializer):
        period = serializers.ChoiceField(choices=PERIODS, default=DEFAULT_PERIOD.value)
        window = serializers.CharField(
            required=False, max_length=64, help_text="a cap window's name, e.g. week or session"
        )

    @extend_schema(
        parameters=[InputSerializer],
        responses={200: UsageSummaryOutput, **BAD_INPUT, **AUTH_ERRORS},
        operation_id="usage_summary",
    )
    def get(self, request: Request) -> Response:
        query = _query(self.InputSerializer, request)
        period, window = query["period"], query.get("window")
        windows = selectors.windows_words(forecast=True)
        if window is not None:
            names = sorted({w["window"] for ws in windows.values() for w in ws})
            if window not in names:
                known = ", ".join(names) or "none"
                raise serializers.ValidationError(
                    {"window": [f"no provider has a window {window!r}; the windows are: {known}"]}
                )
        overview = get_usage_overview(period=period)
        rows = {row["provider"]: row for row in overview["providers"]}
        for provider in windows.keys() - rows.keys():  # cap windows, no usage nor quota
            rows[provider] = {
                "provider": provider,
                "period": period,
                **dict.fromkeys(_USAGE_COUNTS, 0),
                "counts": "autopack",
                "percent_of_cap": None,
                "cap": None,
                "cap_window": None,
                "over_soft_limit": False,
                "over_hard_limit": False,
            }
        for provider, row in rows.items():
            row["windows"] = [
                api_row(w)
                for w in windows.get(provider, [])
                if window is None or w["window"] == window
            ]
        summary = {
            **overview,
            "providers": [rows[p] for p in sorted(rows)],
            "window": window,
            "time_zone": zone_name(),
        }
        return Response(UsageSummaryOutput(summary).data)


# --- budget guards ------------------------------------------------------------------------------
# A run's guard pauses or stops that run, as a person with runs.control_run may. A guard for all
# runs acts on every run, also those not started yet: it needs, besides, the admin's own
# permission to add (or delete) budget guards, which is what making one in the admin asks of a
# person today; granted separately, a phone can steer one run without steering them all.
GUARD_ID = OpenApiParameter("guard_id", int, OpenApiParameter.PATH, description="the guard")
GUARD_NOT_FOUND = {404: OpenApiResponse(ErrorOutput, description="No such run or guard.")}


class GuardOutput(serializers.Serializer):
    guard_id = serializers.IntegerField()
    run_id = serializers.IntegerField(allow_null=True, help_text="null: a guard for all runs")
    scope = serializers.ChoiceField(choices=["run", "all runs"])
    rule = serializers.CharField(help_text="e.g. anthropic > 80% week → stop")
    provider = serializers.CharField()
    window = serializers.CharField(help_text="the provider's cap window watched, e.g. week")
    period = serializers.CharField(
        allow_blank=True, help_text="day, week or month when given as a period; else empty"
    )
    threshold_percent = serializers.DecimalField(
        max_digits=5, decimal_places=2, coerce_to_string=False
    )
    action = serializers.ChoiceField(choices=BudgetGuard.Action.choices)
    enabled = serializers.BooleanField()
    fired = serializers.BooleanField(help_text="fired for this run (always false without one)")
    message = serializers.CharField(allow_blank=True, help_text="what it said when it fired")


class GuardInput(serializers.Serializer):
    provider = serializers.CharField(
        max_length=50, help_text="a configured provider: openai, anthropic, google_gemini, glm"
    )
    window = serializers.CharField(
        max_length=64,
        required=False,
        help_text="a cap window of the provider (e.g. session, week); or give period",
    )
    period = serializers.ChoiceField(
        choices=PERIODS,
        required=False,
        help_text="legacy: day, week or month, the provider's window of that name",
    )
    # A JSON number (DRF's DecimalField would also take a string); guard_validate keeps two
    # decimals, as the column does.
    threshold_percent = serializers.FloatField(
        min_value=0.01, max_value=100, help_text="percent of the provider's cap, above 0, ≤ 100"
    )
    action = serializers.ChoiceField(choices=BudgetGuard.Action.choices)


def _guard_create(request: Request, run_id: int | None) -> Response:
    data = GuardInput(data=request.data)
    data.is_valid(raise_exception=True)
    try:
        guard = guards.guard_create(run_id=run_id, **data.validated_data)
    except GuardInvalid as exc:
        raise serializers.ValidationError({k: [v] for k, v in exc.errors.items()}) from None
    listed = guards.guards_list(run_id=run_id)
    row = next(g for g in listed if g["guard_id"] == guard.pk)
    return Response(GuardOutput(row).data, status=status.HTTP_201_CREATED)


class RunGuardsApi(APIView):
    """A run's budget guards: GET lists those watching it (its own and those for all runs),
    POST adds one of its own ("stop this run if anthropic passes 80% of its weekly cap")."""

    parser_classes = [JSONParser]

    def get_permissions(self) -> list[Any]:
        return [CanControlRuns() if self.request.method == "POST" else IsStaffReader()]

    @extend_schema(
        parameters=[RUN_ID],
        responses={200: GuardOutput(many=True), **NOT_FOUND, **AUTH_ERRORS},
        operation_id="run_guards_list",
    )
    def get(self, request: Request, run_id: int) -> Response:
        return Response(GuardOutput(guards.guards_list(run_id=run_id), many=True).data)

    @extend_schema(
        parameters=[RUN_ID],
        request=GuardInput,
        responses={201: GuardOutput, **BAD_INPUT, **NOT_FOUND, **CONFLICT, **AUTH_ERRORS},
        operation_id="run_guards_create",
    )
    def post(self, request: Request, run_id: int) -> Response:
        return _guard_create(request, run_id)


class RunGuardDeleteApi(APIView):
    permission_classes = [CanControlRuns]

    @extend_schema(
        parameters=[RUN_ID, GUARD_ID],
        responses={204: None, **GUARD_NOT_FOUND, **AUTH_ERRORS},
        operation_id="run_guards_delete",
    )
    def delete(self, request: Request, run_id: int, guard_id: int) -> Response:
        guards.guard_delete(guard_id=guard_id, run_id=run_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class GuardsApi(APIView):
    """Budget guards for all runs: every run running now and every run started later. GET
    lists them; POST adds one (runs.control_run and runs.add_budgetguard)."""

    parser_classes = [JSONParser]

    def get_permissions(self) -> list[Any]:
        if self.request.method == "POST":
            return [CanControlRuns(), requires(ADD_GLOBAL_GUARD)()]
        return [IsStaffReader()]

    @extend_schema(
        responses={200: GuardOutput(many=True), **AUTH_ERRORS},
        operation_id="guards_list",
    )
    def get(self, request: Request) -> Response:
        return Response(GuardOutput(guards.guards_list(run_id=None), many=True).data)

    @extend_schema(
        request=GuardInput,
        responses={201: GuardOutput, **BAD_INPUT, **AUTH_ERRORS},
        operation_id="guards_create",
    )
    def post(self, request: Request) -> Response:
        return _guard_create(request, None)


class GuardDeleteApi(APIView):
    permission_classes = [CanControlRuns, requires(DELETE_GLOBAL_GUARD)]

    @extend_schema(
        parameters=[GUARD_ID],
        responses={204: None, **GUARD_NOT_FOUND, **AUTH_ERRORS},
        operation_id="guards_delete",
    )
    def delete(self, request: Request, guard_id: int) -> Response:
        guards.guard_delete(guard_id=guard_id, run_id=None)
        return Response(status=status.HTTP_204_NO_CONTENT)


class TokenObtainApi(APIView):
    """Exchange a staff user's username and password for their API token (made on first use;
    `manage.py drf_create_token -r USER` or deleting it in the admin revokes it). Throttled per
    client address (AUTOPACK_TOKEN_RATE) and, like the admin login, locked out per username and
    address after AUTOPACK_LOGIN_FAILURE_LIMIT failures."""

    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []
    throttle_classes = [TokenObtainThrottle]

    class InputSerializer(serializers.Serializer):
        username = serializers.CharField(max_length=150)
        password = serializers.CharField(max_length=4096, trim_whitespace=False)

        class Meta:
            ref_name = "TokenObtainInput"

    class OutputSerializer(serializers.Serializer):
        token = serializers.CharField()

        class Meta:
            ref_name = "TokenObtainOutput"

    @extend_schema(
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            **BAD_INPUT,
            429: OpenApiResponse(
                ErrorOutput, description="Throttled, or this username is locked out for now."
            ),
        },
        auth=[],
        operation_id="token_obtain",
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        # The Django request, not DRF's wrapper: django-axes marks a locked-out attempt on it
        # and its middleware answers 429.
        user = authenticate(request._request, **data.validated_data)
        if user is None or not user.is_staff:
            # One answer for a wrong password and a user who may not use the API.
            raise serializers.ValidationError(
                {"non_field_errors": ["Unable to log in with the provided credentials."]}
            )
        token, _ = Token.objects.get_or_create(user=user)
        return Response(self.OutputSerializer({"token": token.key}).data)
