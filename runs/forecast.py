"""A run's forecast (issue 16, "Per run"): the tokens its remaining phases still need, when it
would end, and whether that fits each cap window of the providers it will call before the
window resets.

Every figure here is an ESTIMATE, and every word says so ("about", "est."):

- Tokens (and calls, and USD where every sampled call was priced) per remaining phase come
  from finished phases (complete or failed: what was billed, every attempt, builder and
  auditor calls alike), averaged per role over the phases of the same complexity:
  this run's own while it has finished a phase of that complexity; else earlier runs'
  finished phases of the same category and complexity; else earlier runs' of the same
  complexity in any category; else that phase has no estimate, and the words say so (nothing
  is invented). "Earlier runs" are the EARLIER_RUNS runs created just before this one: a
  bounded sample, so the read costs the same however long the history is.
- The provider a remaining phase's calls go to is the run's own mapping (its snapshot and its
  overrides) without quota fallbacks (routing select_model with_quota=False): the question is
  whether the mapped provider holds out, so "unless a fallback takes over".
- A phase in flight is counted whole (what it has used so far is not subtracted), so the
  need errs on the high side.
- ETA: now + the remaining phases × the median duration (started → finished) of this run's
  finished phases, else of the sampled earlier phases of the remaining phases' categories,
  else unknown. Only a running run has an ETA; a pending, paused or pausing one is told the
  work left. A phase in flight counts the part of the median it has not run yet.
- A window fits when the need is within what is left of its effective cap. When it is not,
  the phase near which the cumulative need passes what is left is named by its position
  ("phase 14", as the page numbers phases), unless the window resets (a rolling window: its
  oldest usage frees) before the run reaches that phase by its ETA; then it fits "after the
  reset".

Cost (it runs on every status poll and dashboard tick): a fixed number of aggregate
statements, none reading per-phase rows back, none reading usage events: the run's row; one
aggregate of its phases grouped by (category, complexity), the finished ones' usage included
as the per-phase totals their terminal transition wrote (Phase.builder_tokens …,
models.PHASE_USAGE_FIELDS; services._set_phase_state), so its cost is the run's phases',
however many events the run has; the median duration (a sort in the database, one or two rows
back; none without a timed phase); when some capped window has a need, one statement of
running sums over the remaining phases (window functions) that returns, per window, the
position where the need passes what is left. Only while the run lacks a sample: the same
aggregate over the earlier runs' finished phases, and their median duration. A 1000-phase
run's forecast reads in a few ms (tests/runs/test_forecast.py prints it), window usage
included. Usage recorded against a phase after its terminal state (POST /usage/events naming
a finished phase) is in the usage summaries but not in its totals.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import connection
from django.db.models import DurationField, ExpressionWrapper, F, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from routing.router import RoutingError, router
from routing.types import RouteKey
from usage import display
from usage.selectors import window_usage
from usage.vocabulary import FIXED_ROLES
from usage.windows import CapUnit, WindowKind

from .context import RunContext
from .models import PHASE_USAGE_FIELDS, Phase, Run
from .states import PHASE_IN_FLIGHT, RUN_TERMINAL, PhaseState, RunState

# How many runs created just before this one the fallback samples (see the module docstring).
EARLIER_RUNS = 10
# Billed work: a finished phase's usage is what a phase of its kind costs, all attempts in.
FINISHED = (PhaseState.COMPLETE.value, PhaseState.FAILED.value)
REMAINING = (PhaseState.PENDING.value, *sorted(PHASE_IN_FLIGHT))
# How "what is left" names a window: "left today", "left this week", else "in its session window".
_LEFT_WHERE = {"day": "today", "week": "this week", "month": "this month"}


@dataclass(frozen=True)
class WindowFit:
    """One cap window of a provider against the run's remaining need, in the window's unit
    (tokens, requests or usd). need_estimate is an estimate; left is what the window has left
    now (effective cap − used, never below 0)."""

    window: str
    unit: str
    need_estimate: float
    left: float
    fits: bool
    # The phase (run-wide position, as the page numbers phases) near which the need passes
    # what is left; None when it fits before any reset.
    pause_near_phase: int | None
    # The window resets (a rolling one: its oldest usage frees) before the run reaches that
    # phase by its ETA, so it fits after the reset.
    fits_after_reset: bool
    reset: datetime | None
    text: str


@dataclass(frozen=True)
class ProviderNeed:
    """What the remaining phases' calls mapped to one provider need (estimates)."""

    provider: str
    tokens_estimate: int
    requests_estimate: int
    usd_estimate: Decimal | None  # None: some sampled call had no price
    windows: list[WindowFit] = field(default_factory=list)


@dataclass(frozen=True)
class RunForecast:
    run_id: int
    remaining_phases: int
    # Of those, the phases with an estimate (the others had nothing to estimate from).
    estimated_phases: int
    tokens_estimate: int
    basis: str  # where the estimate comes from, in words
    basis_run_phases: int  # this run's finished phases the estimate used
    basis_earlier_phases: int  # earlier runs' finished phases it used
    phase_duration_estimate: timedelta | None  # the median phase duration used for the ETA
    work_left_estimate: timedelta | None
    eta_estimate: datetime | None  # None while paused or when no duration is known
    providers: list[ProviderNeed]
    # The forecast in words: the summary, then a line per window that does not fit (or fits
    # only after its reset). Shown as they are by the page, the status API, MCP and the command.
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# --- reads -------------------------------------------------------------------------------------


@dataclass
class _Group:
    """Finished phases of one (category, complexity) and their usage per role: [tokens, calls,
    unpriced calls, usd]."""

    phases: int = 0
    timed: int = 0  # of them, with both a start and a finish (for the median duration)
    roles: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, other: _Group) -> None:
        self.phases += other.phases
        self.timed += other.timed
        for role, sums in other.roles.items():
            into = self.roles.setdefault(role, [0, 0, 0, Decimal(0)])
            for i, value in enumerate(sums):
                into[i] += value


def _in(values: Sequence[Any]) -> str:
    return "(" + ", ".join(["%s"] * len(values)) + ")"


_IN_FLIGHT = tuple(sorted(PHASE_IN_FLIGHT))


@functools.cache
def _sql(complexities: int = 0) -> dict[str, str]:
    """The statements' fixed text (`complexities`: how many the earlier runs' sample asks for):
    only our own table and column names are interpolated, every value is a parameter (in the
    order _this_run_params / _sample_params give them)."""
    q = connection.ops.quote_name
    p: Any = Phase._meta

    def pc(name: str) -> str:
        return "p." + q(p.get_field(name).column)

    phase_table = q(p.db_table)
    state = pc("state")
    timed = f"{pc('started_at')} IS NOT NULL AND {pc('finished_at')} IS NOT NULL"
    finished = f"{state} IN {_in(FINISHED)}"
    # Per (category, complexity): the phases remaining, finished, finished with times, the
    # start of the one in flight, then per fixed role the finished phases' usage totals
    # (PHASE_USAGE_FIELDS, written at their terminal state): no event is read, so the cost is
    # the phases', whatever the number of events. The phases are read by their run (index
    # phase_unique_position).
    usage = [
        f"SUM(CASE WHEN {finished} THEN {pc(column)} ELSE 0 END)"
        for role in FIXED_ROLES
        for column in PHASE_USAGE_FIELDS[role]
    ]
    phases = (
        f"SELECT {pc('category')}, {pc('complexity')}, "  # noqa: S608
        f"SUM(CASE WHEN {state} IN {_in(REMAINING)} THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN {finished} THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN {finished} AND {timed} THEN 1 ELSE 0 END), "
        f"MIN(CASE WHEN {state} IN {_in(_IN_FLIGHT)} THEN {pc('started_at')} END), "
        f"{', '.join(usage)} "
        f"FROM {phase_table} p WHERE {{where}} "
        f"GROUP BY {pc('category')}, {pc('complexity')}"
    )
    run_col = pc("run")
    run_pk, run_table = q(Run._meta.pk.column), q(Run._meta.db_table)
    earlier = (
        f"{run_col} IN (SELECT r.{run_pk} FROM {run_table} r WHERE r.{run_pk} < %s "  # noqa: S608
        f"ORDER BY r.{run_pk} DESC LIMIT {EARLIER_RUNS}) "
        f"AND {state} IN {_in(FINISHED)} AND {pc('complexity')} IN {_in(['x'] * complexities)}"
    )
    return {
        "this_run": phases.format(where=f"{run_col} = %s"),
        "sample": phases.format(where=earlier),
        "remaining_from": (
            f"FROM {phase_table} p WHERE {run_col} = %s AND {state} IN {_in(REMAINING)}"
        ),
        "position": pc("position"),
        "category": pc("category"),
        "complexity": pc("complexity"),
    }


_USAGE_COLUMNS = sum(len(PHASE_USAGE_FIELDS[role]) for role in FIXED_ROLES)


def _part_params() -> list[Any]:
    """The values of the CASEs before the WHERE."""
    return [*REMAINING, *FINISHED, *FINISHED, *_IN_FLIGHT, *FINISHED * _USAGE_COLUMNS]


def _this_run_params(run_id: int) -> list[Any]:
    return [*_part_params(), run_id]


def _sample_params(run_id: int, complexities: Sequence[str]) -> list[Any]:
    return [*_part_params(), run_id, *FINISHED, *complexities]


def _groups(sql: str, params: Sequence[Any]) -> tuple[dict[tuple[str, str], _Group], dict]:
    """{(category, complexity): _Group} of finished phases, and per (category, complexity) of
    all phases: (remaining, start of the one in flight)."""
    groups: dict[tuple[str, str], _Group] = {}
    remaining: dict[tuple[str, str], tuple[int, datetime | None]] = {}
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    for category, complexity, left, finished, timed, since, *usage in rows:
        if left:
            remaining[(category, complexity)] = (int(left), _instant(since))
        if not finished:
            continue
        group = groups.setdefault((category, complexity), _Group())
        group.phases += int(finished)
        group.timed += int(timed or 0)
        for i, role in enumerate(FIXED_ROLES):
            tokens, calls, unpriced, cost = usage[4 * i : 4 * i + 4]
            group.roles[role] = [
                int(tokens or 0),
                int(calls or 0),
                int(unpriced or 0),
                Decimal(str(cost)) if cost is not None else Decimal(0),
            ]
    return groups, remaining


def _instant(value: Any) -> datetime | None:
    """A raw datetime column as an aware datetime (SQLite returns text)."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    parsed = parse_datetime(str(value))
    return None if parsed is None else parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _median_duration(phases: QuerySet[Phase], count: int) -> timedelta | None:
    """The median of started → finished over `phases` (`count` of them have both): sorted in
    the database, the middle one or two rows read back."""
    if count <= 0:
        return None
    low, high = (count - 1) // 2, count // 2
    durations = list(
        phases.filter(started_at__isnull=False, finished_at__isnull=False)
        .annotate(took=ExpressionWrapper(F("finished_at") - F("started_at"), DurationField()))
        .order_by("took")
        .values_list("took", flat=True)[low : high + 1]
    )
    if not durations:
        return None
    middle = sum(durations, timedelta()) / len(durations)
    return max(middle, timedelta())


# --- the estimate ------------------------------------------------------------------------------


@dataclass
class _PerPhase:
    """One phase's estimate per role: tokens, calls, usd (None: unpriced calls in the sample)."""

    roles: dict[str, tuple[float, float, Decimal | None]]


def _per_phase(group: _Group) -> _PerPhase:
    roles: dict[str, tuple[float, float, Decimal | None]] = {}
    for role in FIXED_ROLES:
        tokens, calls, unpriced, cost = group.roles.get(role, [0, 0, 0, Decimal(0)])
        usd = None if unpriced else cost / group.phases
        roles[role] = (tokens / group.phases, calls / group.phases, usd)
    return _PerPhase(roles)


def _by_complexity(groups: dict[tuple[str, str], _Group]) -> dict[str, _Group]:
    out: dict[str, _Group] = {}
    for (_category, complexity), group in groups.items():
        out.setdefault(complexity, _Group()).add(group)
    return out


@dataclass
class _Need:
    tokens: float = 0.0
    calls: float = 0.0
    usd: Decimal | None = Decimal(0)


def run_forecast(
    *,
    run_id: int,
    now: datetime | None = None,
    window_rows: list[dict[str, Any]] | None = None,
) -> RunForecast | None:
    """The run's forecast (see the module docstring); None for a run that has finished or is
    stopping (nothing more will be called). `window_rows`: usage.selectors.window_usage() read
    for this request already, else read here."""
    at = now if now is not None else timezone.now()
    found = Run.objects.filter(pk=run_id).values_list("state", "run_context").first()
    if found is None:
        raise Run.DoesNotExist(f"run {run_id} does not exist")
    state, run_context = found
    if state in RUN_TERMINAL or state == RunState.STOPPING:
        return None
    sql = _sql()
    groups, remaining = _groups(sql["this_run"], _this_run_params(run_id))
    own = _by_complexity(groups)
    timed_own = sum(g.timed for g in groups.values())
    categories = sorted({category for category, _ in remaining})
    # The earlier runs' sample only while this run lacks one: a remaining complexity it has
    # not finished a phase of, or no timed phase for the ETA.
    lacking = sorted({cx for _, cx in remaining if cx not in own})
    earlier: dict[tuple[str, str], _Group] = {}
    complexities = tuple(lacking or sorted({cx for _, cx in remaining}))
    if remaining and (lacking or not timed_own):
        earlier, _ = _groups(
            _sql(len(complexities))["sample"], _sample_params(run_id, complexities)
        )
    earlier_by_cx = _by_complexity(earlier)

    # Per remaining (category, complexity): its per-phase estimate and where it came from.
    estimates: dict[tuple[str, str], _PerPhase] = {}
    used_own: set[str] = set()
    same_category: set[tuple[str, str]] = set()
    same_complexity: set[tuple[str, str]] = set()
    for category, complexity in remaining:
        if complexity in own:
            estimates[(category, complexity)] = _per_phase(own[complexity])
            used_own.add(complexity)
        elif (category, complexity) in earlier:
            estimates[(category, complexity)] = _per_phase(earlier[(category, complexity)])
            same_category.add((category, complexity))
        elif complexity in earlier_by_cx:
            estimates[(category, complexity)] = _per_phase(earlier_by_cx[complexity])
            same_complexity.update(k for k in earlier if k[1] == complexity)
    basis_own = sum(own[cx].phases for cx in used_own)
    basis_category = sum(earlier[k].phases for k in same_category)
    basis_complexity = sum(earlier[k].phases for k in same_complexity - same_category)

    # Which provider each remaining phase's calls go to: the run's own mapping, no fallbacks.
    context = RunContext.from_json(run_context).routing
    needs: dict[str, _Need] = {}
    per_phase_values: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for pair, estimate in estimates.items():
        count = remaining[pair][0]
        for role, (tokens, calls, usd) in estimate.roles.items():
            try:
                provider = router.select(RouteKey(role, *pair), context, with_quota=False).provider
            except RoutingError:
                continue  # no model for it: its calls cannot be put on any provider's windows
            need = needs.setdefault(provider, _Need())
            need.tokens += tokens * count
            need.calls += calls * count
            need.usd = None if need.usd is None or usd is None else need.usd + usd * count
            for unit, value in (
                (CapUnit.TOKENS.value, tokens),
                (CapUnit.REQUESTS.value, calls),
                (CapUnit.USD.value, float(usd) if usd is not None else 0.0),
            ):
                values = per_phase_values.setdefault((provider, unit), {})
                values[pair] = values.get(pair, 0.0) + value

    remaining_count = sum(n for n, _ in remaining.values())
    estimated_count = sum(remaining[pair][0] for pair in estimates)
    # The ETA: this run's median phase, else the sampled earlier phases' of its categories.
    duration = _median_duration(Phase.objects.filter(run_id=run_id, state__in=FINISHED), timed_own)
    if duration is None and earlier:
        timed_earlier = sum(g.timed for (cat, _), g in earlier.items() if cat in categories)
        earlier_runs = Run.objects.filter(pk__lt=run_id).order_by("-pk").values("pk")[:EARLIER_RUNS]
        duration = _median_duration(
            # The same phases the sample counted (timed_earlier): its complexities too.
            Phase.objects.filter(
                run_id__in=earlier_runs,
                state__in=FINISHED,
                category__in=categories,
                complexity__in=complexities,
            ),
            timed_earlier,
        )
    in_flight_since = min(
        (since for _, since in remaining.values() if since is not None), default=None
    )
    work_left: timedelta | None = None
    if duration is not None and remaining_count:
        done_of_current = (
            min(max(at - in_flight_since, timedelta()), duration)
            if in_flight_since is not None
            else timedelta()
        )
        work_left = duration * remaining_count - done_of_current
    # Only a running run has a clock: a pending one waits for its start, a paused (or pausing)
    # one for its resume; those are told the work left.
    moving = state == RunState.RUNNING
    eta = at + work_left if work_left is not None and moving else None

    # Each capped window of a provider with a need: what is left, and the running sums.
    candidates: list[tuple[str, dict[str, Any], str, float, float]] = []
    rows = window_rows if window_rows is not None else window_usage(now=at, providers=needs)
    for row in rows:
        of = needs.get(row["provider"])
        if of is None:
            continue
        for unit in row["units"]:
            if unit == CapUnit.USD and of.usd is None:
                continue  # unpriced calls in the sample: no USD estimate
            wanted = {
                CapUnit.TOKENS.value: of.tokens,
                CapUnit.REQUESTS.value: of.calls,
                CapUnit.USD.value: float(of.usd or 0),
            }[unit]
            if wanted <= 0:
                continue
            left = max(float(row["caps"][unit]) - float(row[unit]), 0.0)
            candidates.append((row["provider"], row, unit, wanted, left))
    crossings = _crossings(run_id, candidates, per_phase_values, sql) if candidates else []

    fits_by_provider: dict[str, list[WindowFit]] = {}
    for (provider, row, unit, wanted, left), (position, rank) in zip(
        candidates, crossings, strict=True
    ):
        fits_by_provider.setdefault(provider, []).append(
            _window_fit(
                provider, row, unit, wanted, left, position, rank, duration, in_flight_since, at
            )
        )
    providers = [
        ProviderNeed(
            provider=provider,
            tokens_estimate=round(need.tokens),
            requests_estimate=round(need.calls),
            usd_estimate=None if need.usd is None else need.usd.quantize(Decimal("0.01")),
            windows=fits_by_provider.get(provider, []),
        )
        for provider, need in sorted(needs.items())
    ]
    basis = _basis_text(basis_own, basis_category, basis_complexity)
    forecast = RunForecast(
        run_id=run_id,
        remaining_phases=remaining_count,
        estimated_phases=estimated_count,
        tokens_estimate=round(sum(n.tokens for n in needs.values())),
        basis=basis,
        basis_run_phases=basis_own,
        basis_earlier_phases=basis_category + basis_complexity,
        phase_duration_estimate=duration,
        work_left_estimate=work_left,
        eta_estimate=eta,
        providers=providers,
        lines=[],
    )
    forecast.lines.extend(_lines(forecast, at=at))
    return forecast


def _crossings(
    run_id: int,
    candidates: Sequence[tuple[str, dict[str, Any], str, float, float]],
    values: dict[tuple[str, str], dict[tuple[str, str], float]],
    sql: dict[str, str],
) -> list[tuple[int | None, int | None]]:
    """Per candidate window: the position of the first remaining phase whose running need
    passes what the window has left, and its rank among the remaining phases (1: the next);
    (None, None) when the need stays within it. One statement: a running SUM per (provider,
    unit) over the remaining phases in order, each phase's value from a CASE on its
    (category, complexity); the database returns one row."""
    columns: dict[tuple[str, str], int] = {}
    sums: list[str] = []
    params: list[Any] = []
    for provider, _row, unit, _wanted, _left in candidates:
        if (provider, unit) in columns:
            continue
        columns[(provider, unit)] = len(sums)
        whens = []
        for (category, complexity), value in sorted(values.get((provider, unit), {}).items()):
            whens.append(f"WHEN {sql['category']} = %s AND {sql['complexity']} = %s THEN %s")
            params += [category, complexity, float(value)]
        case = f"CASE {' '.join(whens)} ELSE 0.0 END" if whens else "0.0"
        sums.append(f"SUM({case}) OVER (ORDER BY {sql['position']}) AS c{len(sums)}")
    picks: list[str] = []
    pick_params: list[Any] = []
    for provider, _row, unit, _wanted, left in candidates:
        column = f"c{columns[(provider, unit)]}"
        picks.append(f"MIN(CASE WHEN {column} > %s THEN pos END)")
        picks.append(f"MIN(CASE WHEN {column} > %s THEN rn END)")
        pick_params += [left, left]
    statement = (
        f"SELECT {', '.join(picks)} FROM (SELECT {sql['position']} AS pos, "  # noqa: S608
        f"ROW_NUMBER() OVER (ORDER BY {sql['position']}) AS rn, {', '.join(sums)} "
        f"{sql['remaining_from']}) t"
    )
    with connection.cursor() as cursor:
        cursor.execute(statement, [*pick_params, *params, run_id, *REMAINING])
        row = cursor.fetchone()
    return [
        (int(row[i]) if row[i] is not None else None, int(row[i + 1]) if row[i + 1] else None)
        for i in range(0, len(picks), 2)
    ]


# --- words -------------------------------------------------------------------------------------


def _amount(value: float, unit: str) -> str:
    if unit == CapUnit.USD:
        return f"${value:,.2f}"
    return display.short_number(round(value))


def _left_words(window: str, left: float, unit: str) -> str:
    verb = "is" if unit == CapUnit.USD else "are"
    where = _LEFT_WHERE.get(window, f"in its {window} window")
    return f"{_amount(left, unit)} {verb} left {where}"


def _need_words(provider: str, wanted: float, unit: str) -> str:
    if unit == CapUnit.USD:
        return f"needs about {_amount(wanted, unit)} more of {provider}"
    noun = "requests" if unit == CapUnit.REQUESTS else "tokens"
    return f"needs about {_amount(wanted, unit)} more {provider} {noun}"


def _window_fit(
    provider: str,
    row: dict[str, Any],
    unit: str,
    wanted: float,
    left: float,
    position: int | None,
    rank: int | None,
    duration: timedelta | None,
    in_flight_since: datetime | None,
    at: datetime,
) -> WindowFit:
    window, reset = row["window"], row["reset"]
    head = f"{_need_words(provider, wanted, unit)}, {_left_words(window, left, unit)}"
    if position is None or rank is None:
        return WindowFit(window, unit, wanted, left, True, None, False, reset, "")
    # When the run gets to that phase: the phases before it at the median duration each.
    reach: datetime | None = None
    if duration is not None:
        ahead = duration * (rank - 1)
        if in_flight_since is not None and rank > 1:
            ahead -= min(max(at - in_flight_since, timedelta()), duration)
        reach = at + max(ahead, timedelta())
    phase = f"phase {position:,}"
    if reset is not None and reach is not None and reset <= reach:
        freed = "frees from" if row["kind"] == WindowKind.ROLLING else "resets"
        text = (
            f"{head}, and it {freed} {display.when_text(reset, now=at)} "
            f"(in {display.duration_text(reset - at)}) before the run reaches {phase}: "
            "it fits after the reset"
        )
        return WindowFit(window, unit, wanted, left, True, position, True, reset, text)
    text = f"{head}: it would pause near {phase} unless a fallback takes over"
    if reset is not None and reach is None:
        text += f" or the window resets first ({display.reset_text(row, now=at)})"
    return WindowFit(window, unit, wanted, left, False, position, False, reset, text)


def _basis_text(own: int, same_category: int, same_complexity: int) -> str:
    """ "from 6 finished phases of this run", "… and 40 of earlier runs of the same categories",
    "from 3 finished phases of earlier runs of the same complexity (other categories)"."""
    parts = [
        (n, where)
        for n, where in (
            (own, "of this run"),
            (same_category, "of earlier runs of the same categories"),
            (same_complexity, "of earlier runs of the same complexity (other categories)"),
        )
        if n
    ]
    if not parts:
        return "no finished phase to estimate from yet"
    (first, where), rest = parts[0], parts[1:]
    words = f"from {first:,} finished phase{'' if first == 1 else 's'} {where}"
    return words + "".join(f" and {n:,} {where}" for n, where in rest)


def _lines(forecast: RunForecast, *, at: datetime) -> list[str]:
    """The summary ("Forecast: about 800 k more tokens (anthropic 640 k, openai 160 k) for 16
    phases left · ETA about 00:10 (in 1 h 40 min) · est. from 4 finished phases of this run"),
    then a line per window that does not fit, or fits only after its reset."""
    if not forecast.remaining_phases:
        return ["Forecast: no phase left to run"]
    phases = f"{forecast.remaining_phases:,} phase{'' if forecast.remaining_phases == 1 else 's'}"
    if not forecast.estimated_phases:
        return [f"Forecast: {phases} left, {forecast.basis}"]
    head = f"Forecast: about {display.short_number(forecast.tokens_estimate)} more tokens"
    split = [
        f"{p.provider} {display.short_number(p.tokens_estimate)}"
        for p in forecast.providers
        if p.tokens_estimate
    ]
    if len(split) > 1:
        head += f" ({', '.join(split)})"
    elif len(split) == 1:
        head += " of " + split[0].partition(" ")[0]
    head += f" for {phases} left"
    missing = forecast.remaining_phases - forecast.estimated_phases
    if missing:
        head += f", not counting {missing:,} with nothing to estimate from"
    if forecast.eta_estimate is not None:
        head += (
            f" · ETA about {display.when_text(forecast.eta_estimate, now=at)} "
            f"(in {display.duration_text(forecast.eta_estimate - at)})"
        )
    elif forecast.work_left_estimate is not None:
        head += f" · about {display.duration_text(forecast.work_left_estimate)} of work left"
    else:
        head += " · ETA unknown (no phase duration to go by)"
    head += f" · est. {forecast.basis}"
    windows = [w for p in forecast.providers for w in p.windows]
    if windows and all(w.fits and not w.fits_after_reset for w in windows):
        head += " · fits every cap window before its reset"
    return [head, *(w.text for w in windows if w.text)]
