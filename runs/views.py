"""The progress page `/dashboard/` (server-rendered, django-htmx): thin views over the same
services and selectors as the API and the admin."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.middleware import HtmxDetails

from routing.mapping import MappingError, model_override_global
from usage.vocabulary import CONTROL_RUN, DEFAULT_PERIOD, OVERRIDE_MODEL, PERIODS

from . import selectors, services
from .models import Phase, Run
from .notes import NoteError, run_note_add
from .plans import PlanError, parse_plan_upload
from .states import RUN_ACTIVE, IllegalTransition


class HtmxHttpRequest(HttpRequest):
    # django-htmx's middleware sets `htmx` on every request; its documentation types views so.
    htmx: HtmxDetails


CONTROLS: dict[str, Callable[..., Any]] = {
    "start": services.run_start,
    "pause": services.run_pause,
    "resume": services.run_resume,
    "stop": services.run_stop,
}


def _period(request: HttpRequest) -> str:
    period = request.GET.get("period") or request.POST.get("period") or DEFAULT_PERIOD.value
    return period if period in PERIODS else DEFAULT_PERIOD.value


def _selected_run(request: HttpRequest) -> Run | None:
    raw = request.GET.get("run") or request.POST.get("run")
    if raw and raw.isascii() and raw.isdigit():
        return Run.objects.filter(pk=int(raw)).first()
    return (
        Run.objects.filter(state__in=list(RUN_ACTIVE)).order_by("-created_at").first()
        or Run.objects.order_by("-created_at").first()
    )


def _require(request: HttpRequest, perm: str) -> None:
    if not request.user.has_perm(perm):
        raise PermissionDenied(f"You need the '{perm}' permission for this.")


@staff_member_required
@require_GET
def dashboard(request: HtmxHttpRequest) -> HttpResponse:
    run = _selected_run(request)
    period = _period(request)
    context = selectors.dashboard_context(
        run_id=run.pk if run else None,
        period=period,
        base_url=f"{request.scheme}://{request.get_host()}",
    )
    context.update(
        can_control=request.user.has_perm(CONTROL_RUN),
        can_override=request.user.has_perm(OVERRIDE_MODEL),
    )
    return render(request, "dashboard/page.html", context)


def _render_progress(request: HtmxHttpRequest, run_id: int) -> HttpResponse:
    get_object_or_404(Run, pk=run_id)
    context = selectors.progress_context(run_id=run_id)
    context["can_control"] = request.user.has_perm(CONTROL_RUN)
    return render(request, "dashboard/_progress.html", context)


@staff_member_required
@require_GET
def progress_partial(request: HtmxHttpRequest, run_id: int) -> HttpResponse:
    return _render_progress(request, run_id)


@staff_member_required
@require_GET
def phase_changes(request: HtmxHttpRequest, phase_id: int) -> HttpResponse:
    """A phase's attempts: diff, checks, refusal and verdict. The progress table loads it into
    the page on demand (HTMX); without JavaScript the link opens it as a page of its own."""
    try:
        context = selectors.phase_changes_context(phase_id=phase_id)
    except Phase.DoesNotExist:
        raise Http404(f"phase {phase_id} does not exist") from None
    template = "dashboard/_changes.html" if request.htmx else "dashboard/changes.html"
    return render(request, template, context)


@staff_member_required
@require_GET
def usage_partial(request: HtmxHttpRequest) -> HttpResponse:
    return render(
        request, "dashboard/_usage.html", selectors.usage_context(period=_period(request))
    )


@staff_member_required
@require_POST
def run_control(request: HtmxHttpRequest, run_id: int) -> HttpResponse:
    _require(request, CONTROL_RUN)
    action = request.POST.get("action", "")
    if action not in CONTROLS:
        messages.error(request, f"Unknown action {action!r}.")
    else:
        try:
            CONTROLS[action](run_id=run_id)
        except IllegalTransition as exc:
            messages.error(request, f"Cannot {action} run {run_id}: it is {exc.current}.")
        except Run.DoesNotExist:
            messages.error(request, f"Run {run_id} does not exist.")
    if request.htmx:
        # The partial the control was posted from is swapped for the run's new state.
        return _render_progress(request, run_id)
    return redirect(f"{reverse('dashboard')}?run={run_id}")


@staff_member_required
@require_POST
def run_start_view(request: HtmxHttpRequest) -> HttpResponse:
    _require(request, CONTROL_RUN)
    upload = request.FILES.get("plan")
    if upload is None:
        messages.error(request, "Choose a plan file (YAML or JSON) to start a run.")
        return redirect("dashboard")
    try:
        spec = parse_plan_upload(upload)
    except PlanError as exc:
        messages.error(request, f"The plan was refused: {exc}")
        return redirect("dashboard")
    run = services.run_create(plan=spec, created_by=request.user)
    services.run_start(run_id=run.pk)
    messages.success(request, f"Run {run.pk} started.")
    return redirect(f"{reverse('dashboard')}?run={run.pk}")


@staff_member_required
@require_POST
def mapping_change(request: HtmxHttpRequest) -> HttpResponse:
    _require(request, OVERRIDE_MODEL)
    data = request.POST
    key = {k: data.get(k, "") for k in ("role", "category", "complexity", "model")}
    scope = data.get("scope")
    run = data.get("run", "")
    run_id = int(run) if run.isascii() and run.isdigit() else None
    error = ""
    try:
        if scope == "run":
            if run_id is None:
                raise MappingError("run: choose a run to apply this to")
            services.run_model_override(
                run_id=run_id, changed_by=request.user, via="dashboard", **key
            )
        elif scope == "global":
            model_override_global(changed_by=request.user, via="dashboard", **key)
        else:
            raise MappingError("scope: apply as global default or for this run only")
    except (MappingError, IllegalTransition, Run.DoesNotExist) as exc:
        error = str(exc)
    context: dict[str, Any] = selectors.mapping_context(run_id=run_id)
    context.update(
        can_override=True,
        mapping_error=error,
        mapping_saved=""
        if error
        else f"{key['role']} {key['category']}:{key['complexity']} → {key['model']} ({scope})",
    )
    if request.htmx:
        return render(request, "dashboard/_mapping.html", context)
    if error:
        messages.error(request, error)
    return redirect(f"{reverse('dashboard')}?run={run_id or ''}")


@staff_member_required
@require_POST
def note_add(request: HtmxHttpRequest, run_id: int) -> HttpResponse:
    _require(request, CONTROL_RUN)
    error = ""
    try:
        run_note_add(run_id=run_id, text=request.POST.get("text", ""), author=request.user)
    except NoteError as exc:
        error = str(exc)
    except Run.DoesNotExist:
        error = f"run {run_id} does not exist"
    context = selectors.notes_context(run_id=run_id)
    context.update(note_error=error, can_control=True)
    if request.htmx:
        return render(request, "dashboard/_notes.html", context)
    if error:
        messages.error(request, error)
    return redirect(f"{reverse('dashboard')}?run={run_id}")
