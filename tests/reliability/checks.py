"""What every fault scenario checks at its end (docs/reliability.md):

- `assert_completed`: the run is `completed`, every phase `complete`, progress counted once;
- `assert_usage_equals_reported`: the run's usage totals equal the sum of the usage the provider
  put in the answers that reached Autopack (read from the simulator's request log and summed
  here from the raw wire fields, not through the project's own normalisers);
- `assert_no_phase_ran_twice`: one claim per dispatch, one builder call per attempt, one
  approved attempt per phase.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Count

from runs import services
from runs.models import Phase, PhaseAttempt, PhaseEvent, Run
from runs.plans import parse_plan_bytes
from runs.states import PhaseState, RunState
from tests.conftest import wait_for
from usage.models import UsageEvent
from usage.selectors import run_usage_totals

# The reliability workers' provider timeout and retries (tests/reliability/conftest.py):
# short enough that a hang is cut within the test, long enough for a simulated call.
PROVIDER_TIMEOUT = 1.5
PROVIDER_MAX_RETRIES = 2


# --- plans and waiting ------------------------------------------------------------------------


def plan_bytes(
    tag: str,
    *,
    phases: int = 3,
    complexity: str = "low",
    category: str = "core_backend",
    max_attempts: int = 3,
) -> bytes:
    """A plan whose phase names carry `tag`, so the simulator's log can be split per run."""
    lines = [f"name: {tag}", f"max_attempts: {max_attempts}", "tiers:"]
    first = (phases + 1) // 2
    for tier, steps in enumerate((range(1, first + 1), range(first + 1, phases + 1)), start=1):
        if not steps:
            continue
        lines += [f"  - name: Tier {tier}", "    phases:"]
        lines += [
            f"      - {{name: {tag} step {i}, category: {category}, complexity: {complexity}}}"
            for i in steps
        ]
    return "\n".join(lines).encode()


def create_run(tag: str, **kwargs: Any) -> Run:
    return services.run_create(plan=parse_plan_bytes(plan_bytes(tag, **kwargs)))


def start_run(tag: str, **kwargs: Any) -> Run:
    run = create_run(tag, **kwargs)
    services.run_start(run_id=run.pk)
    return run


def state_of(run: Run) -> str:
    run.refresh_from_db()
    return run.state


def wait_state(run: Run, *states: str, timeout: float = 90) -> Run:
    wait_for(lambda: state_of(run) in states, timeout=timeout, what=f"run {run.pk} in {states}")
    return run


def wait_finished(run: Run, timeout: float = 120) -> Run:
    return wait_state(run, RunState.COMPLETED, RunState.FAILED, RunState.STOPPED, timeout=timeout)


# --- the simulator's log ------------------------------------------------------------------------


def calls_of(
    sim: Any, tag: str | None, *, role: str | None = None, outcome: str | None = None
) -> list[dict[str, Any]]:
    """The provider requests of the run whose phases are named after `tag` (None: all of
    them, for a test with a single run)."""
    return [
        r
        for r in sim.requests()
        if (tag is None or f": {tag} step " in (r.get("prompt") or ""))
        and (role is None or r.get("role") == role)
        and (outcome is None or r.get("outcome") == outcome)
    ]


def reported_tokens(entry: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens as the provider reported them on the wire, summed here by the
    providers' documented rules rather than by routing.providers."""
    usage = entry["usage"]
    if entry["provider"] == "anthropic":
        prompt = usage["input_tokens"]
        prompt += usage.get("cache_read_input_tokens", 0) + usage.get(
            "cache_creation_input_tokens", 0
        )
        return prompt, usage["output_tokens"]
    if entry["provider"] == "google_gemini":
        return (
            usage["promptTokenCount"] + usage.get("toolUsePromptTokenCount", 0),
            usage.get("candidatesTokenCount", 0) + usage.get("thoughtsTokenCount", 0),
        )
    return usage["prompt_tokens"], usage["completion_tokens"]


def phase_of(entry: dict[str, Any]) -> int:
    """The phase position a builder or auditor prompt names ("Phase 3: <name>")."""
    line = next(line for line in entry["prompt"].splitlines() if line.startswith("Phase "))
    return int(line.split()[1].rstrip(":"))


# --- the three checks ---------------------------------------------------------------------------


def assert_completed(run: Run) -> None:
    run.refresh_from_db()
    assert run.state == RunState.COMPLETED, run.state_reason
    phases = list(run.phases.all())
    assert {p.state for p in phases} == {PhaseState.COMPLETE}
    assert run.completed_phases == run.total_phases == len(phases)
    assert run.completed_tiers == run.total_tiers
    for tier in run.tiers.all():
        assert tier.completed_phases == tier.total_phases


def assert_usage_equals_reported(
    run: Run, sim: Any, tag: str | None, *, unanswered: int = 0, lost: int = 0
) -> None:
    """Usage totals = the sum of what the provider reported in the answers Autopack received,
    plus the estimates of the calls lost in flight.

    `unanswered`: answered requests whose answer never reached Autopack (the worker was killed
    while waiting); the provider logged usage for them that nobody could read. `lost`: calls a
    killed worker was waiting on, each metered as one estimated lost call (input estimated,
    no output, no request id)."""
    answered = [c for c in calls_of(sim, tag, outcome="ok") if c.get("usage") is not None]
    by_id = {c["request_id"]: c for c in answered}
    estimated = list(UsageEvent.objects.filter(run_id=run.pk, estimated=True))
    assert len(estimated) == lost, f"lost calls: {[e.call_id for e in estimated]}"
    assert all(e.completion_tokens == 0 and not e.provider_request_id for e in estimated)
    events = list(UsageEvent.objects.filter(run_id=run.pk, estimated=False))
    metered_ids = [e.provider_request_id for e in events]
    assert len(metered_ids) == len(set(metered_ids)), "a provider call was metered twice"
    for event in events:
        entry = by_id.get(event.provider_request_id)
        assert entry is not None, f"metered call {event.call_id} has no answered request"
        assert (event.prompt_tokens, event.completion_tokens) == reported_tokens(entry)
        assert (event.provider, event.model, event.role) == (
            entry["provider"],
            entry["model"],
            entry["role"],
        )
    unmetered = [c for c in answered if c["request_id"] not in set(metered_ids)]
    assert len(unmetered) == unanswered, f"answered but not metered: {unmetered}"
    # Failed requests (errors, hangs, malformed or cut bodies) recorded no usage at all.
    failed_ids = {c["request_id"] for c in calls_of(sim, tag) if c.get("outcome") != "ok"}
    assert not failed_ids & set(metered_ids)

    totals = run_usage_totals(run_id=run.pk)
    metered = [by_id[i] for i in metered_ids]
    assert totals["calls"] == len(metered) + lost
    assert totals["tokens_in"] == sum(reported_tokens(c)[0] for c in metered) + sum(
        e.prompt_tokens for e in estimated
    )
    assert totals["tokens_out"] == sum(reported_tokens(c)[1] for c in metered)


def assert_no_phase_ran_twice(
    run: Run, sim: Any, tag: str | None, *, killed_in_builder: int = 0
) -> None:
    """Per phase: one claim per dispatch (a first one, and one per lost worker), attempts
    numbered once each, one builder answer per attempt that got past the builder, and at most
    one approved attempt; in the simulator's log, one answered builder request per attempt."""
    builder_answers: dict[int, int] = {}
    for call in calls_of(sim, tag, role="builder", outcome="ok"):
        position = phase_of(call)
        builder_answers[position] = builder_answers.get(position, 0) + 1
    for phase in Phase.objects.filter(run=run).order_by("position"):
        claims = phase.events.filter(kind=PhaseEvent.Kind.CLAIMED).count()
        started = phase.attempts.exists()  # a stopped run leaves phases never claimed
        assert claims == (1 + phase.lost_worker_count if started else 0), (phase.position, claims)
        kept = phase.attempts.exclude(outcome=PhaseAttempt.Outcome.ABANDONED)
        numbers = sorted(kept.values_list("number", flat=True))
        assert numbers == list(range(1, phase.attempt_count + 1)), (phase.position, numbers)
        assert phase.attempts.filter(outcome=PhaseAttempt.Outcome.APPROVED).count() <= 1
        assert not phase.attempts.filter(outcome=PhaseAttempt.Outcome.IN_PROGRESS).exists()
        built = phase.attempts.exclude(builder_model="").count()
        metered = UsageEvent.objects.filter(
            phase_id=phase.pk, role="builder", estimated=False
        ).count()
        assert metered == built, (phase.position, metered, built)
        assert builder_answers.get(phase.position, 0) >= built
    total_built = PhaseAttempt.objects.filter(phase__run=run).exclude(builder_model="").count()
    assert sum(builder_answers.values()) == total_built + killed_in_builder
    # No phase was completed twice (two VERDICT approvals, or progress counted twice).
    approvals = (
        PhaseAttempt.objects.filter(phase__run=run, outcome=PhaseAttempt.Outcome.APPROVED)
        .values("phase_id")
        .annotate(n=Count("id"))
    )
    assert all(row["n"] == 1 for row in approvals)
