"""The MCP server: run status, usage and run controls as tools an assistant can call.

Built on the official `mcp` SDK (2.x, `MCPServer`). Every tool is a thin caller of a selector or
service in this app; this module only decides who is asking and shortens the answer to a few
plain-text lines a phone screen can show.

Who is asking:
- stdio (a local process an assistant starts): the user named by `manage.py mcp_server --user`.
- streamable HTTP: the REST API's DRF token (`Authorization: Token <key>`), checked by
  `TokenAuthMiddleware` before the MCP transport sees the request; a missing or bad token is a 401.
Reads need an active staff user; pause/resume/stop and a run's budget guards need
`runs.control_run`; a guard for all runs also `runs.add_budgetguard` (removing one
`runs.delete_budgetguard`); a run's model change also needs `routing.override_model`. There
is deliberately no tool for a global model change: that changes every future run and stays a
desk decision (dashboard, admin, REST API).
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import close_old_connections, connections
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from rest_framework import exceptions as drf_exceptions
from rest_framework.authentication import TokenAuthentication
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from routing.mapping import MappingError
from usage import display
from usage.vocabulary import (
    ADD_GLOBAL_GUARD,
    CONTROL_RUN,
    DEFAULT_PERIOD,
    DELETE_GLOBAL_GUARD,
    OVERRIDE_MODEL,
    PERIODS,
    Period,
)

from . import guards, selectors, services
from .models import BudgetGuard, Run
from .plans import GuardInvalid
from .quoting import QUOTE_NAME, one_line, plain_quoted
from .states import RUN_ACTIVE, IllegalTransition, RunState

MCP_PATH = "/mcp"
# Where TokenAuthMiddleware leaves the authenticated user's id for the tools of that request.
USER_SCOPE_KEY = "autopack.user_id"
MAX_LIST = 50
MAX_REASON = 80
MAX_FILES = 3  # file names a status line shows
MAX_PATH = 60
# What a position is read from (selectors.position_of): never the plan or run_context, JSON
# documents that grow with the run.
POSITION_FIELDS = (
    "state",
    "total_tiers",
    "total_phases",
    "completed_phases",
    "current_tier_index",
    "current_phase_index",
)

# The stdio transport has no request to carry a user: the command sets this once per process.
# It is never consulted for an HTTP request (see `_caller_id`), so an HTTP caller cannot borrow it.
_stdio_user_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "autopack_mcp_stdio_user_id", default=None
)

server = MCPServer(
    "autopack",
    title="Autopack control plane",
    instructions=(
        "Watch and steer Autopack build runs: list runs, a run's status, token usage against "
        "provider caps, the model mapping; pause, resume or stop a run, change one run's "
        "model, and add budget guards (stop or pause a run when a provider passes a share of "
        "its cap). Global model changes are not available here."
    ),
)

READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
CONTROL = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
STOP = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)


class Refused(Exception):
    """The tool answers with an error instead: not allowed, or bad input; one line why."""


# --- who is asking ----------------------------------------------------------------------------


def _caller_id(ctx: Context) -> int | None:
    request = ctx.request_context.request
    if request is not None:
        # HTTP: the user the middleware authenticated for *this* POST. Each request carries
        # its own token, so a revoked token stops working mid-session.
        return getattr(request, "scope", {}).get(USER_SCOPE_KEY)
    return _stdio_user_id.get()


def _authorize(user_id: int | None, needs: Sequence[str]) -> AbstractBaseUser:
    if user_id is None:
        raise Refused("refused: anonymous access is not allowed")
    # Loaded per call, not cached for the process: a person deactivated or stripped of a
    # permission in the admin loses access at the next call, also on a long-lived stdio server.
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None or not user.is_staff:
        raise Refused("refused: only active staff users may use Autopack tools")
    for perm in needs:
        if not user.has_perm(perm):
            raise Refused(f"refused: this needs the '{perm}' permission")
    return user


def stdio_user(*, username: str) -> AbstractBaseUser:
    """The user a stdio server acts as; ValueError if it may not use the tools at all."""
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise ValueError(f"user {username!r} does not exist")
    if not user.is_active or not user.is_staff:
        raise ValueError(f"user {username!r} must be an active staff user")
    return user


# --- calling the app --------------------------------------------------------------------------


def _text(text: str, *, error: bool = False) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=error)


def _explain(exc: Exception, *, run_id: int | None, verb: str) -> str:
    if isinstance(exc, IllegalTransition):
        if exc.explained:
            return str(exc)
        return f"cannot {verb} run {run_id}: it is {_state(exc.current)}"
    if isinstance(exc, Run.DoesNotExist):
        return f"run {run_id} does not exist"
    return str(exc)  # MappingError: already one line naming the field


def _answer_sync(
    user_id: int | None,
    action: Callable[[AbstractBaseUser], str],
    needs: Sequence[str],
    run_id: int | None,
    verb: str,
) -> CallToolResult:
    # A server lives for days: treat each call like a Django request, so a connection past
    # CONN_MAX_AGE or broken by a database restart is replaced instead of failing every call.
    close_old_connections()
    try:
        user = _authorize(user_id, needs)
        return _text(action(user))
    except Refused as exc:
        return _text(str(exc), error=True)
    except GuardInvalid as exc:
        return _text(f"guard refused: {exc}", error=True)
    except BudgetGuard.DoesNotExist:
        return _text("no such guard (for that run, or for all runs without run_id)", error=True)
    except (IllegalTransition, Run.DoesNotExist, MappingError) as exc:
        return _text(_explain(exc, run_id=run_id, verb=verb), error=True)
    finally:
        close_old_connections()


async def _answer(
    ctx: Context,
    action: Callable[[AbstractBaseUser], str],
    *,
    needs: Sequence[str] = (),
    run_id: int | None = None,
    verb: str = "",
) -> CallToolResult:
    # The ORM is synchronous: sync_to_async runs every call on Django's one shared thread, so
    # the server holds one database connection, not one per worker thread. Anything other than
    # the domain errors above is left to the SDK, which logs the traceback on the server and
    # tells the client only "Error executing tool <name>".
    return await sync_to_async(_answer_sync)(_caller_id(ctx), action, needs, run_id, verb)


# --- formatting -------------------------------------------------------------------------------


def _short(n: int | None) -> str:
    n = n or 0
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    if n >= 10_000:
        return f"{n / 1000:.0f}k"
    if n >= 1000:
        return f"{n / 1000:.1f}k"
    return str(n)


def _percent(value: float | None) -> str:
    if value is None:
        return "no cap"
    if 0 < value < 1:
        return "<1%"
    return f"{value:.0f}%"


def _name(text: str | None) -> str:
    return one_line(text or "-", limit=QUOTE_NAME)


def _state(state: str) -> str:
    """A run state in the page's words ("pause requested"), never the raw value."""
    return RunState(state).label.lower() if state in RunState.values else _name(state)


def _position(position: selectors.RunPosition, *, names: bool) -> str:
    """The run's place in the progress page's words (selectors.position_text), built from the
    structured position: a phase or tier name (written by a person or a model) goes in quoted,
    or, for a one-line list, not at all."""

    def quoted(name: str | None) -> str | None:
        return plain_quoted(name, limit=QUOTE_NAME) if names and name else None

    return selectors.position_text(
        dataclasses.replace(
            position, phase_name=quoted(position.phase_name), tier_name=quoted(position.tier_name)
        )
    )


def _run_line(run: Run) -> str:
    position = _position(selectors.position_of(run), names=False)
    return f"#{run.pk} {_name(run.name)} · {RunState(run.state).label} · {position}"


def _change_line(status: selectors.RunStatus) -> str:
    """The run's change on one line. Branch and commit are Autopack's (a name it makes, hex);
    file paths were written by a model, so each is quoted."""
    if not status.branch:
        return "Change: no branch yet"
    head = status.head_commit[:12] if status.head_commit else "nothing approved yet"
    files = ", ".join(plain_quoted(f, limit=MAX_PATH) for f in status.files_changed[:MAX_FILES])
    more = status.files_changed_count - min(len(status.files_changed), MAX_FILES)
    if more > 0:
        files += f" +{more} more"
    return (
        f"Change: {status.branch} @ {head} · {status.files_changed_count} files "
        f"+{status.lines_added} -{status.lines_removed}"
        + (f" ({files})" if files else "")
        + f" · checks {status.checks_state}"
    )


def _mapping_key(row: dict[str, Any]) -> str:
    return f"{row['role']} {row['category']}:{row['complexity']}"


# --- tools ------------------------------------------------------------------------------------


@server.tool(annotations=READ, structured_output=False)
async def list_runs(ctx: Context, active_only: bool = False, limit: int = 10) -> CallToolResult:
    """List runs, newest first: id, name, state and where each is (phase and tier, phases
    done). active_only keeps running, pausing, paused and stopping runs. limit is 1-50."""
    limit = max(1, min(limit, MAX_LIST))

    def action(user: AbstractBaseUser) -> str:
        # Each run's current or halted phase in the same query (with_position).
        runs = selectors.with_position(
            Run.objects.only("name", *POSITION_FIELDS).order_by("-created_at", "-pk")
        )
        if active_only:
            runs = runs.filter(state__in=list(RUN_ACTIVE))
        lines = [_run_line(run) for run in runs[:limit]]
        return "\n".join(lines) or ("no active runs" if active_only else "no runs yet")

    return await _answer(ctx, action)


@server.tool(annotations=READ, structured_output=False)
async def run_status(ctx: Context, run_id: int) -> CallToolResult:
    """One run's state (and why it paused, stopped or failed), where it is (phase and tier by
    number and name, phases done), tokens, auditor issues, attempts, and its change: branch,
    head commit, files changed, lines added/removed, checks; then its forecast, all estimates:
    tokens still needed, ETA, and each cap window it would not fit before the reset ("needs
    about 1.2 M more anthropic tokens, 800 k are left this week: it would pause near phase 14
    unless a fallback takes over")."""

    def action(user: AbstractBaseUser) -> str:
        status = selectors.run_status(run_id=run_id)
        # run_status words its position with the names raw; this answer quotes them, so one
        # more read of the run's row with its phase (an index lookup).
        run = selectors.with_position(Run.objects.only(*POSITION_FIELDS).filter(pk=run_id)).get()
        # A reason can carry a provider's error text: quoted, so it can't pose as a line of ours.
        state = status.state_label
        if status.state_reason:
            state += " · reason: " + plain_quoted(status.state_reason, limit=MAX_REASON)
        position = _position(selectors.position_of(run), names=True)
        issues = status.issues
        lines = [
            f"#{status.run_id} {_name(status.name)} · {state}",
            f"{position} ({status.percent_complete}%)",
            f"Tokens: {_short(status.tokens_in)} in / {_short(status.tokens_out)} out",
            f"Issues: {issues['critical']} critical, {issues['major']} major, "
            f"{issues['minor']} minor · {selectors.count_text(status.attempts, 'attempt')}",
        ]
        if status.forecast is not None:
            # The estimate's summary, then each window it would not fit before its reset.
            lines.append(status.forecast.lines[0])
            lines += [
                w.text
                for need in status.forecast.providers
                for w in need.windows
                if w.text and not w.fits
            ]
        lines.append(_change_line(status))
        return "\n".join(lines)

    return await _answer(ctx, action, run_id=run_id, verb="show")


@server.tool(annotations=READ, structured_output=False)
async def usage_summary(ctx: Context, period: str = DEFAULT_PERIOD.value) -> CallToolResult:
    """Tokens used per provider against its cap in the current calendar day, week or month
    (UTC), as Autopack metered them from the providers' responses; then one line per provider
    with each of its cap windows' percent, cap and reset ("anthropic · week 62% of 20 M tokens
    · resets Thu 18:00 (in 2 d 3 h) · session 35% of 1 M tokens · frees from 14:20 (in 1 h)"),
    each window then with its burn rate and forecast ("  week: burning 1.2 M tokens/h (last
    hour), 0.8 M/h this week · at this pace the cap is reached Wed 09:10, 1 d 9 h before the
    reset")."""

    def action(user: AbstractBaseUser) -> str:
        if period not in PERIODS:
            raise Refused(f"period must be one of {', '.join(PERIODS)}")
        adjective = Period(period).adjective
        summary = selectors.usage_summary(period=period)
        lines = []
        for row in summary["providers"]:
            used = f"{_short(row['tokens_in'])} in / {_short(row['tokens_out'])} out"
            share = _percent(row["percent_of_cap"])
            cap = f"{share} of {adjective} cap" if row["percent_of_cap"] is not None else share
            if row["cap_window"]:
                cap = f"{adjective} cap counted on its {row['cap_window']} window below"
            split = ""
            outside = row["outside_tokens_in"] or row["outside_tokens_out"]
            if row["aux_tokens_in"] or row["aux_tokens_out"] or outside:
                # Core is the builder and the auditor; aux Autopack's agents; outside a
                # person's own tools (Claude Code, Codex, … over OpenTelemetry).
                split = (
                    f"; core {_short(row['core_tokens_in'])} in / "
                    f"{_short(row['core_tokens_out'])} out, agents "
                    f"{_short(row['aux_tokens_in'])} in / {_short(row['aux_tokens_out'])} out"
                )
            if outside:
                split += (
                    f", outside tools {_short(row['outside_tokens_in'])} in / "
                    f"{_short(row['outside_tokens_out'])} out"
                )
            if row["counts"] == "everything":
                split += "; the caps count everything seen, outside tools too"
            elif outside:
                split += "; outside tools not counted against the caps"
            lines.append(f"{row['provider']}: {cap} ({used}{split})")
        costs = [row["cost_usd"] for row in summary["models"] if row["cost_usd"] is not None]
        if costs:
            lines.append(f"cost this {period}: ${sum(costs, Decimal(0)):.2f}")
        if summary["windows"]:
            lines.append(f"Cap windows (times in {summary['time_zone']}):")
            for provider, words in summary["windows"].items():
                lines.append(display.provider_line(provider, words))
                # Burn rates and forecast per window (usage.forecast): "  week: burning …".
                lines += [f"  {w['window']}: {w['pace_text']}" for w in words if w["pace_text"]]
        return "\n".join(lines) or f"no usage this {period}"

    return await _answer(ctx, action)


@server.tool(annotations=READ, structured_output=False)
async def current_mapping(ctx: Context, run_id: int | None = None) -> CallToolResult:
    """The model each role uses per category:complexity, and why (baseline, global or run
    override). Without run_id: the mapping new runs get, showing only the categories that
    differ from the role's default (*). With run_id: that run's own mapping."""

    def action(user: AbstractBaseUser) -> str:
        rows = selectors.model_mapping(run_id=run_id)["rows"]
        # The global table is every role x category x complexity; a phone needs the defaults
        # and the exceptions, not dozens of identical lines.
        default = {(r["role"], r["complexity"]): r["model"] for r in rows if r["category"] == "*"}
        lines = [
            f"{_mapping_key(r)} → {r['model']} ({r['scope']})"
            for r in rows
            if r["category"] == "*"
            or r["scope"] != "baseline"
            or default.get((r["role"], r["complexity"])) != r["model"]
        ]
        if not lines and run_id is not None:
            # A run takes its snapshot of the mapping when it starts.
            return f"run {run_id} has not started: it will use the global mapping"
        return "\n".join(lines) or "no mapping"

    return await _answer(ctx, action, run_id=run_id, verb="show the mapping of")


@server.tool(annotations=CONTROL, structured_output=False)
async def override_model_for_run(
    ctx: Context, run_id: int, role: str, category: str, complexity: str, model: str
) -> CallToolResult:
    """Use another model for one role (builder, auditor) x category x complexity (low, medium,
    high) in this run only. Phases not started yet use it; the phase in flight keeps its model."""

    def action(user: AbstractBaseUser) -> str:
        run = services.run_model_override(
            run_id=run_id,
            role=role,
            category=category,
            complexity=complexity,
            model=model,
            changed_by=user,
            via="mcp",
        )
        return f"run {run.pk}: {role} {category}:{complexity} → {model} (run override)"

    return await _answer(
        ctx,
        action,
        needs=(CONTROL_RUN, OVERRIDE_MODEL),
        run_id=run_id,
        verb="change the model of",
    )


def _control(service: Callable[..., Run], run_id: int) -> Callable[[AbstractBaseUser], str]:
    def action(user: AbstractBaseUser) -> str:
        run = service(run_id=run_id)
        return f"run {run.pk}: {_state(run.state)}"

    return action


@server.tool(annotations=CONTROL, structured_output=False)
async def pause_run(ctx: Context, run_id: int) -> CallToolResult:
    """Pause a run. With a phase in flight it becomes pause_requested and pauses when that
    phase ends."""
    return await _answer(
        ctx,
        _control(services.run_pause, run_id),
        needs=(CONTROL_RUN,),
        run_id=run_id,
        verb="pause",
    )


@server.tool(annotations=CONTROL, structured_output=False)
async def resume_run(ctx: Context, run_id: int) -> CallToolResult:
    """Resume a paused run (or withdraw a pause not yet taken effect)."""
    return await _answer(
        ctx,
        _control(services.run_resume, run_id),
        needs=(CONTROL_RUN,),
        run_id=run_id,
        verb="resume",
    )


@server.tool(annotations=STOP, structured_output=False)
async def stop_run(ctx: Context, run_id: int) -> CallToolResult:
    """Stop a run for good. A phase in flight is cancelled at its next checkpoint."""
    return await _answer(
        ctx,
        _control(services.run_stop, run_id),
        needs=(CONTROL_RUN,),
        run_id=run_id,
        verb="stop",
    )


# The permission a guard for all runs needs besides runs.control_run (as in the REST API): the
# admin's own, granted to whoever may make one there.


def _guard_line(row: dict[str, Any]) -> str:
    scope = f"run {row['run_id']}" if row["run_id"] else "all runs"
    line = f"guard {row['guard_id']}: {row['rule']} ({scope})"
    if not row["enabled"]:
        line += " · disabled"
    if row["fired"]:
        line += " · fired"
    return line


@server.tool(annotations=CONTROL, structured_output=False)
async def add_budget_guard(
    ctx: Context,
    provider: str,
    threshold_percent: float,
    action: str,
    window: str | None = None,
    period: str | None = None,
    run_id: int | None = None,
) -> CallToolResult:
    """Stop or pause a run when a provider passes a share of one of its cap windows. "Stop the
    run if Anthropic exceeds 80% of its week window" is provider="anthropic", window="week",
    threshold_percent=80, action="stop", run_id=<the run>. provider: a configured provider
    name, lower case (openai, anthropic, google_gemini, glm). window: one of the provider's cap
    windows (e.g. session, week, day; a wrong name is refused with the provider's list);
    period (instead of window): day, week or month, the window of that name.
    threshold_percent: above 0, at most 100. action: stop (for good) or pause (after the
    current phase). Without run_id the guard is for all runs, running and future (needs the
    runs.add_budgetguard permission too). It acts at the next call that takes the provider
    past the threshold, once per run."""

    def action_(user: AbstractBaseUser) -> str:
        guard = guards.guard_create(
            run_id=run_id,
            provider=provider,
            window=window,
            period=period,
            threshold_percent=threshold_percent,
            action=action,
        )
        scope = f"run {run_id}" if run_id is not None else "all runs"
        return f"guard {guard.pk} added for {scope}: {guard}"

    needs = (CONTROL_RUN,) if run_id is not None else (CONTROL_RUN, ADD_GLOBAL_GUARD)
    return await _answer(ctx, action_, needs=needs, run_id=run_id, verb="add a guard to")


@server.tool(annotations=READ, structured_output=False)
async def list_budget_guards(ctx: Context, run_id: int | None = None) -> CallToolResult:
    """The budget guards watching a run (its own and those for all runs) and whether each has
    fired for it; without run_id, the guards for all runs. Each line starts with the guard's
    id, for remove_budget_guard."""

    def action(user: AbstractBaseUser) -> str:
        rows = guards.guards_list(run_id=run_id)
        return "\n".join(_guard_line(row) for row in rows) or "no budget guards"

    return await _answer(ctx, action, run_id=run_id, verb="list the guards of")


@server.tool(annotations=CONTROL, structured_output=False)
async def remove_budget_guard(
    ctx: Context, guard_id: int, run_id: int | None = None
) -> CallToolResult:
    """Remove a budget guard by the id list_budget_guards shows: with run_id, one of that
    run's own guards; without, a guard for all runs (needs runs.delete_budgetguard too)."""

    def action(user: AbstractBaseUser) -> str:
        guards.guard_delete(guard_id=guard_id, run_id=run_id)
        return f"guard {guard_id} removed"

    needs = (CONTROL_RUN,) if run_id is not None else (CONTROL_RUN, DELETE_GLOBAL_GUARD)
    return await _answer(ctx, action, needs=needs, run_id=run_id, verb="remove a guard of")


# --- transports -------------------------------------------------------------------------------


class Denied(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def token_user_id(*, header: bytes) -> int:
    """The id of the user an `Authorization` header names; Denied (401/403) otherwise."""
    close_old_connections()
    try:
        # Same scheme and checks as the REST API (DRF's TokenAuthentication): keyword "Token",
        # one key, an existing token of an active user.
        parts = header.split()
        if not parts or parts[0].lower() != b"token":
            raise Denied(401, "Authentication credentials were not provided.")
        if len(parts) != 2:
            raise Denied(401, "Invalid token header.")
        try:
            user, _ = TokenAuthentication().authenticate_credentials(parts[1].decode())
        except (UnicodeError, drf_exceptions.AuthenticationFailed):
            raise Denied(401, "Invalid token.") from None
        if not user.is_staff:
            raise Denied(403, "Only staff users may use Autopack tools.")
        return int(user.pk)
    finally:
        close_old_connections()


class TokenAuthMiddleware:
    """Refuses an HTTP request without a valid DRF token before the MCP transport runs, and
    hands the user's id to the tools of that request through the ASGI scope.

    The SDK's own auth hook is OAuth bearer tokens (TokenVerifier + AuthSettings); the REST API's
    `Token <key>` scheme does not fit it, so the check sits in front of the whole ASGI app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Starts and stops the SDK's session manager; carries no request.
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        try:
            user_id = await sync_to_async(token_user_id)(header=header)
        except Denied as exc:
            # DRF answers the same way: 401 with the scheme to use, 403 for a known user.
            headers = {"WWW-Authenticate": "Token"} if exc.status == 401 else None
            response = JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)
            await response(scope, receive, send)
            return
        await self.app({**scope, USER_SCOPE_KEY: user_id}, receive, send)


def http_app(*, host: str) -> ASGIApp:
    """The streamable-HTTP app at /mcp behind token auth. `host` lets the SDK turn on its
    DNS-rebinding protection when bound to localhost."""
    return TokenAuthMiddleware(server.streamable_http_app(streamable_http_path=MCP_PATH, host=host))


def serve_stdio(*, user_id: int) -> None:
    _stdio_user_id.set(user_id)
    # The command looked the user up on this thread; tools use Django's sync thread instead,
    # so don't keep this thread's connection open for the life of the process.
    connections.close_all()
    server.run("stdio")


def serve_http(*, host: str, port: int) -> None:
    import uvicorn  # installed with the mcp SDK, which serves streamable HTTP through it

    connections.close_all()
    uvicorn.run(http_app(host=host), host=host, port=port, log_level="info")
