"""REST API for runs (DESIGN.md "Contracts"): thin views over runs.services and selectors."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from routing.mapping import model_override_global
from routing.models import Scope

from . import selectors, services
from .models import Run
from .permissions import CanControlRuns, CanOverrideModels, IsStaffReader
from .plans import PlanError, parse_plan_bytes, validate_plan
from .states import RUN_ACTIVE


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


def _status_response(run_id: int, code: int = status.HTTP_200_OK) -> Response:
    return Response(
        RunStatusOutput(selectors.run_status(run_id=run_id).as_dict()).data, status=code
    )


class RunStatusApi(APIView):
    permission_classes = [IsStaffReader]

    @extend_schema(responses=RunStatusOutput, operation_id="run_status")
    def get(self, request: Request, run_id: int) -> Response:
        return _status_response(run_id)


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

    @extend_schema(responses=OutputSerializer(many=True), operation_id="runs_list")
    def get(self, request: Request) -> Response:
        runs = Run.objects.order_by("-created_at")
        if request.query_params.get("active") in ("1", "true"):
            runs = runs.filter(state__in=list(RUN_ACTIVE))
        paginator = self.Pagination()
        page = paginator.paginate_queryset(runs, request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


class RunStartApi(APIView):
    """Start a run from a plan: the plan as the JSON body, or a YAML/JSON file upload
    (multipart field `file`). `?start=false` creates it without starting."""

    permission_classes = [CanControlRuns]
    parser_classes = [JSONParser, MultiPartParser, FormParser]

    @extend_schema(
        request={"application/json": dict, "multipart/form-data": dict},
        responses={201: RunStatusOutput},
        operation_id="runs_start",
    )
    def post(self, request: Request) -> Response:
        upload = request.FILES.get("file")
        if upload is not None:
            spec = parse_plan_bytes(upload.read(), filename=upload.name or "")
        elif isinstance(request.data, dict) and request.data:
            data: Any = request.data.get("plan", request.data)
            spec = validate_plan(data)
        else:
            raise PlanError("plan: send the plan as a JSON body or upload it as 'file'")
        run = services.run_create(plan=spec, created_by=request.user)
        if request.query_params.get("start", "true") not in ("0", "false"):
            services.run_start(run_id=run.pk)
        return _status_response(run.pk, status.HTTP_201_CREATED)


class _RunControlApi(APIView):
    permission_classes = [CanControlRuns]
    service: Any = None

    @extend_schema(request=None, responses=RunStatusOutput)
    def post(self, request: Request, run_id: int) -> Response:
        type(self).service(run_id=run_id)
        return _status_response(run_id)


class RunPauseApi(_RunControlApi):
    service = staticmethod(services.run_pause)


class RunResumeApi(_RunControlApi):
    service = staticmethod(services.run_resume)


class RunCancelApi(_RunControlApi):
    service = staticmethod(services.run_stop)


class ModelMappingApi(APIView):
    """Every (role, category, complexity, model, scope) row in force, globally or for a run
    (`?run_id=`), and the allowed choices."""

    permission_classes = [IsStaffReader]

    @extend_schema(operation_id="models_mapping")
    def get(self, request: Request) -> Response:
        run_id = request.query_params.get("run_id")
        if run_id is not None:
            if not run_id.isdigit():
                return Response({"run_id": ["a run id is a whole number"]}, status=400)
            Run.objects.get(pk=int(run_id))  # 404 for an unknown run
        return Response(selectors.model_mapping(run_id=int(run_id) if run_id else None))


class ModelOverrideApi(APIView):
    permission_classes = [CanOverrideModels]

    class InputSerializer(serializers.Serializer):
        role = serializers.CharField(max_length=100)
        category = serializers.RegexField(r"^[a-z][a-z0-9_]{0,63}$", max_length=64)
        complexity = serializers.ChoiceField(choices=["low", "medium", "high"])
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

    @extend_schema(request=InputSerializer, operation_id="models_override")
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
            return Response(selectors.model_mapping(run_id=v["run_id"]))
        model_override_global(changed_by=request.user, via="api", **key)
        return Response(selectors.model_mapping(run_id=None))


class UsageSummaryApi(APIView):
    """Tokens per provider against its effective cap, and per model with cost."""

    permission_classes = [IsStaffReader]

    class InputSerializer(serializers.Serializer):
        period = serializers.ChoiceField(choices=["day", "week", "month"], default="week")

    @extend_schema(parameters=[InputSerializer], operation_id="usage_summary")
    def get(self, request: Request) -> Response:
        params = self.InputSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        period = params.validated_data["period"]
        return Response(selectors.usage_summary(period=period))
