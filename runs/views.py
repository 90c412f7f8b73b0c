"""The progress page `/dashboard/` (server-rendered, django-htmx): thin views over the same
services and selectors as the API and the admin."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qs, urlsplit

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.middleware import HtmxDetails

from routing.mapping import MappingError, model_change_check, model_override_global
from usage.vocabulary import (
    ADD_GLOBAL_GUARD,
    CONTROL_RUN,
    DEFAULT_PERIOD,
    DELETE_GLOBAL_GUARD,
    OVERRIDE_MODEL,
    PERIODS,
)

from . import guards, selectors, services
from .models import BudgetGuard, Phase, Run
from .notes import NoteError, run_note_add
from .plans import GuardInvalid, PlanError, guard_validate, parse_plan_upload
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


def _page(request: HtmxHttpRequest, page: str, template: str) -> HttpResponse:
    run = _selected_run(request) if page == "run" else None
    context = selectors.page_context(
        page=page,
        run_id=run.pk if run else None,
        period=_period(request),
        sort=request.GET.get("sort", ""),
        show_all_models=mapping_show_all(request),
        base_url=f"{request.scheme}://{request.get_host()}",
    )
    context["can_control"] = request.user.has_perm(CONTROL_RUN)
    return render(request, template, context)


@staff_member_required
@require_GET
def dashboard(request: HtmxHttpRequest) -> HttpResponse:
    """A run: its progress, models, guards, notes and chat context."""
    return _page(request, "run", "dashboard/page.html")


@staff_member_required
@require_GET
def runs_page(request: HtmxHttpRequest) -> HttpResponse:
    return _page(request, "runs", "dashboard/runs.html")


@staff_member_required
@require_GET
def usage_page(request: HtmxHttpRequest) -> HttpResponse:
    return _page(request, "usage", "dashboard/caps.html")


@staff_member_required
@require_GET
def models_page(request: HtmxHttpRequest) -> HttpResponse:
    return _page(request, "models", "dashboard/routing.html")


@staff_member_required
@require_GET
def guards_page(request: HtmxHttpRequest) -> HttpResponse:
    return _page(request, "guards", "dashboard/guards.html")


@staff_member_required
@require_GET
def live(request: HtmxHttpRequest) -> HttpResponse:
    """One tick of a dashboard page: every panel it shows, each swapped in by its id (htmx
    out-of-band swaps), in one request whose queries tests/runs/test_live.py counts."""
    page = request.GET.get("page", "run")
    if page not in selectors.PAGES:
        return HttpResponse(f"unknown page {page!r}", status=400, content_type="text/plain")
    return _page(request, page, "dashboard/_live_response.html")


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
    if request.htmx:
        return render(request, "dashboard/_changes.html", context)
    context["page"] = "run"  # the navigation marks the run this phase belongs to
    return render(request, "dashboard/changes.html", context)


@staff_member_required
@require_GET
def usage_partial(request: HtmxHttpRequest) -> HttpResponse:
    # A bad sort is the default one (usage_context), never an error page.
    sort = request.GET.get("sort", "")
    context = selectors.usage_context(period=_period(request), sort=sort)
    return render(request, "dashboard/_usage.html", context)


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


def _int_param(raw: str | None) -> int | None:
    return int(raw) if raw and raw.isascii() and raw.isdigit() else None


def mapping_show_all(request: HtmxHttpRequest) -> bool:
    """Whether the model panel lists every row ("models=all"): asked of this request, else of
    the page an htmx request came from (HX-Current-URL, which the "Show all rows" link pushes),
    so that a tick or a saved change keeps what the person chose."""
    if "models" in request.GET:
        return request.GET["models"] == "all"
    current = request.htmx.current_url if request.htmx else None
    if not current:
        return False
    return parse_qs(urlsplit(current).query).get("models") == ["all"]


def _mapping_saved(key: dict[str, str], scope: str, run_id: int | None) -> str:
    category = "any category" if key["category"] == "*" else key["category"]
    row = f"{key['role']} · {category} · {key['complexity']} → {key['model']}"
    if scope == "run":
        return f"{row}, for run #{run_id} only."
    return f"{row}, the global default for runs started from now on."


@staff_member_required
@require_http_methods(["GET", "POST"])
def mapping_change(request: HtmxHttpRequest) -> HttpResponse:
    """GET: the model panel alone (its "Show all rows" link). POST: a change from the change
    dialog's form; a global one only with its confirmation (`confirm`), checked here."""
    if request.method == "GET":
        run_id = _int_param(request.GET.get("run"))
        show_all = mapping_show_all(request)
        if not request.htmx:
            models = "&models=all" if show_all else ""
            return redirect(f"{reverse('dashboard')}?run={run_id or ''}{models}#mapping")
        return render(
            request,
            "dashboard/_mapping.html",
            selectors.mapping_context(run_id=run_id, show_all=show_all),
        )
    _require(request, OVERRIDE_MODEL)
    data = request.POST
    key = {k: data.get(k, "") for k in ("role", "category", "complexity", "model")}
    scope = data.get("scope", "")
    run_id = _int_param(data.get("run"))
    error = ""
    try:
        if scope == "run":
            if run_id is None:
                raise MappingError("run: choose a run to apply this to; nothing was changed.")
            services.run_model_override(
                run_id=run_id, changed_by=request.user, via="dashboard", **key
            )
        elif scope == "global":
            if not data.get("confirm"):
                model_change_check(**key)  # a row or model that is wrong is named first
                raise MappingError(
                    "A global default changes only with “Yes, change the global default” "
                    "ticked; nothing was changed."
                )
            model_override_global(changed_by=request.user, via="dashboard", **key)
        else:
            raise MappingError(
                "scope: apply for this run only or as the global default; nothing was changed."
            )
    except (MappingError, IllegalTransition) as exc:
        error = str(exc)
    except Run.DoesNotExist:
        error = f"Run {run_id} does not exist; nothing was changed."
    if error:
        # The dialog stays open with the error, the form as the run now stands (a run that
        # finished meanwhile is offered the global scope only).
        try:
            context = selectors.mapping_dialog_context(
                role=key["role"],
                category=key["category"],
                complexity=key["complexity"],
                run_id=run_id,
                model=key["model"],
            )
        except MappingError:
            context = {}
        context["mapping_error"] = error
        if request.htmx:
            return render(request, "dashboard/_mapping_form.html", context)
        return render(request, "dashboard/mapping_change.html", context)
    saved = _mapping_saved(key, scope, run_id)
    if not request.htmx:
        messages.success(request, f"Saved: {saved}")
        return redirect(f"{reverse('dashboard')}?run={run_id or ''}#mapping")
    # Into #model-dialog goes nothing (so it closes); the panel, out of band, shows the change.
    context = selectors.mapping_context(run_id=run_id, show_all=mapping_show_all(request))
    context.update(mapping_saved=saved, oob=True)
    return render(request, "dashboard/_mapping.html", context)


@staff_member_required
@require_GET
def mapping_dialog(request: HtmxHttpRequest) -> HttpResponse:
    """One mapping row's change form: loaded into #model-dialog by the panel's "Change"
    (htmx), or, without JavaScript, a page of its own posting the same form."""
    _require(request, OVERRIDE_MODEL)
    params = request.GET
    try:
        context = selectors.mapping_dialog_context(
            role=params.get("role", ""),
            category=params.get("category", ""),
            complexity=params.get("complexity", ""),
            run_id=_int_param(params.get("run")),
            model=params.get("model", ""),
        )
    except MappingError as exc:
        context = {"mapping_error": str(exc)}
    if request.htmx:
        return render(request, "dashboard/_mapping_form.html", context)
    return render(request, "dashboard/mapping_change.html", context)


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


# --- budget guards (the panel dashboard/_guards.html, the form dashboard/_guard_form.html) ------
GUARD_FIELDS = {
    "scope": "Scope",
    "run": "Run",
    "action": "Action",
    "provider": "Provider",
    "threshold_percent": "Percent",
    "window": "Window",
    "period": "Period",
}


def _run_field(request: HttpRequest) -> int | None:
    raw = request.POST.get("run", "")
    return int(raw) if raw.isascii() and raw.isdigit() else None


def _percent_field(raw: str) -> object:
    # guard_validate takes numbers; the form sends text. Anything that is not a plain finite
    # number of sane size is passed on as the text itself, for guard_validate to refuse by name.
    try:
        value = Decimal(raw.strip())
    except (InvalidOperation, ValueError):
        return raw
    return value if value.is_finite() and abs(value) < 1000 else raw


def _guards_back(run_id: int | None) -> HttpResponse:
    if run_id is None:
        return redirect("dashboard-guards")
    return redirect(f"{reverse('dashboard')}?run={run_id}")


def _guards_forbidden(verb: str) -> HttpResponse:
    # Said in words (Django's own 403 page says nothing); the page shows no form to such a
    # person, so only a hand-made request gets here.
    return HttpResponseForbidden(
        f"You need the '{CONTROL_RUN}' permission to {verb} a budget guard.",
        content_type="text/plain; charset=utf-8",
    )


def _guards_panel_context(run_id: int | None) -> dict[str, Any]:
    try:
        return selectors.guards_context(run_id=run_id)
    except Run.DoesNotExist:
        return selectors.guards_context(run_id=None)


@staff_member_required
@require_POST
def guard_add(request: HtmxHttpRequest) -> HttpResponse:
    """Add a guard for the page's run (scope=run) or for all runs (scope=all, which also needs
    the admin's add-guard permission, as the API's POST /runs/guards does). A refusal names the
    fields and writes nothing."""
    if not request.user.has_perm(CONTROL_RUN):
        return _guards_forbidden("add")
    data = request.POST
    run_id = _run_field(request)
    scope = data.get("scope", "")
    names = ("provider", "window", "period", "threshold_percent", "action")
    values = {k: data.get(k, "") for k in names}
    errors: dict[str, str] = {}
    if scope == "all":
        if not request.user.has_perm(ADD_GLOBAL_GUARD):
            errors["scope"] = (
                f"a guard for all runs needs the '{ADD_GLOBAL_GUARD}' permission; "
                "add one for this run instead"
            )
    elif scope == "run":
        if run_id is None:
            errors["run"] = "choose a run for this guard (or all runs)"
    else:
        errors["scope"] = "this run or all runs"
    fields = {**values, "threshold_percent": _percent_field(values["threshold_percent"])}
    try:
        # Every bad field at once, before anything is written.
        guard_validate(**fields)
    except GuardInvalid as exc:
        errors.update(exc.errors)
    sentence = ""
    if not errors:
        target = run_id if scope == "run" else None
        try:
            guard = guards.guard_create(run_id=target, **fields)
        except GuardInvalid as exc:
            errors.update(exc.errors)
        except Run.DoesNotExist:
            errors["run"] = f"run {run_id} does not exist"
        except IllegalTransition as exc:
            errors["run"] = f"run {run_id} is {exc.current}: a finished run takes no new guard"
        else:
            sentence = guards.guard_text(guard)
    # The fields in the form's order, each with its label: "Percent: a number above 0 …".
    refused = "; ".join(
        f"{GUARD_FIELDS.get(k, k)}: {errors[k]}" for k in GUARD_FIELDS if k in errors
    )
    if not request.htmx:
        if errors:
            messages.error(request, f"The guard was refused. {refused}")
        else:
            messages.success(request, f"Guard added: {sentence}.")
        return _guards_back(run_id)
    context = _guards_panel_context(run_id)
    context.update(
        guard_form_errors=errors,
        guard_form_refused=refused,
        guard_form_saved=sentence,
        # Kept on a refusal so the person corrects a field rather than starting again.
        guard_form_values={**values, "scope": scope} if errors else {},
    )
    # The form, swapped in place of itself, and the panel out of band with the new guard.
    form = render_to_string("dashboard/_guard_form.html", context, request=request)
    panel = render_to_string("dashboard/_guards.html", {**context, "oob": True}, request=request)
    return HttpResponse(form + panel)


@staff_member_required
@require_POST
def guard_remove(request: HtmxHttpRequest, guard_id: int) -> HttpResponse:
    """Remove a guard: a run's own with runs.control_run, one for all runs also with the admin's
    delete-guard permission (as the API's DELETE /runs/guards/{id})."""
    if not request.user.has_perm(CONTROL_RUN):
        return _guards_forbidden("remove")
    run_id = _run_field(request)
    error = notice = ""
    guard = BudgetGuard.objects.filter(pk=guard_id).first()
    if guard is None:
        error = f"guard {guard_id} does not exist (removed already?)"
    elif guard.run_id is None and not request.user.has_perm(DELETE_GLOBAL_GUARD):
        error = f"removing a guard for all runs needs the '{DELETE_GLOBAL_GUARD}' permission"
    else:
        try:
            guards.guard_delete(guard_id=guard.pk, run_id=guard.run_id)
        except BudgetGuard.DoesNotExist:
            error = f"guard {guard_id} does not exist (removed already?)"
        else:
            notice = f"Removed: {guards.guard_text(guard)}"
    if not request.htmx:
        if error:
            messages.error(request, f"The guard was not removed: {error}")
        else:
            messages.success(request, f"{notice}.")
        return _guards_back(run_id)
    context = _guards_panel_context(run_id)
    context.update(guards_error=error, guards_notice=notice)
    return render(request, "dashboard/_guards.html", context)
