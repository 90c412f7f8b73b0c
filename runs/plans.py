"""Plan files (YAML or JSON, format in DESIGN.md), validated whole before anything is written."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from django.conf import settings

from routing.router import router
from routing.text import is_category, name_problem, text_problem
from usage.vocabulary import COMPLEXITIES, PERIODS

from .models import BudgetGuard
from .workspace import RUNS_DIR, ProtectedPaths, source_roots

GUARD_ACTIONS = tuple(BudgetGuard.Action.values)
MAX_NAME = 200
MAX_TEXT = 20_000
MAX_CRITERIA = 50
MAX_ATTEMPTS_LIMIT = 10
MAX_CHECKS = 20
MAX_CHECK_COMMAND = 2000
MAX_PROTECTED = 200


# A small file of nested brackets makes both parsers recurse past Python's limit; a plan is a
# few levels deep.
TOO_DEEP = "plan: nested too deeply to be a plan"


class PlanError(ValueError):
    """A plan is refused; the message names the field and where it is."""


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    category: str
    complexity: str
    description: str
    acceptance_criteria: list[str]
    checks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TierSpec:
    name: str
    phases: list[PhaseSpec]


@dataclass(frozen=True)
class PlanSpec:
    name: str
    tiers: list[TierSpec]
    workspace: str = ""
    max_attempts: int = 3
    guards: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    protected_paths: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    @property
    def phase_count(self) -> int:
        return sum(len(t.phases) for t in self.tiers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "workspace": self.workspace,
            "max_attempts": self.max_attempts,
            "guards": self.guards,
            "source": self.source,
            "protected_paths": self.protected_paths,
            "checks": self.checks,
            "tiers": [
                {
                    "name": t.name,
                    "phases": [
                        {
                            "name": p.name,
                            "category": p.category,
                            "complexity": p.complexity,
                            "description": p.description,
                            "acceptance_criteria": p.acceptance_criteria,
                            "checks": p.checks,
                        }
                        for p in t.phases
                    ],
                }
                for t in self.tiers
            ],
        }


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases.

    A "billion laughs" plan nests aliases so that a small file expands to billions of nodes as
    soon as anything walks it; plans have no need for aliases, so any alias is refused.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise PlanError(
                f"line {event.start_mark.line + 1}: YAML anchors and aliases are not allowed "
                "in plan files"
            )
        return super().compose_node(parent, index)


def parse_plan_bytes(raw: bytes | str, *, filename: str = "") -> PlanSpec:
    """Decode a YAML or JSON plan and validate it; raises PlanError."""
    limit = settings.AUTOPACK_MAX_PLAN_BYTES
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > limit:
        raise PlanError(f"plan: file is {size:,} bytes; the limit is {limit:,} bytes")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise PlanError(f"plan: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if filename.endswith(".json") or text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        except RecursionError:
            raise PlanError(TOO_DEEP) from None
    else:
        try:
            data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f"line {mark.line + 1}" if mark else "plan"
            raise PlanError(f"plan: not valid YAML ({where}: {exc.problem})") from exc
        except yaml.YAMLError as exc:
            raise PlanError(f"plan: not valid YAML ({exc})") from exc
        except RecursionError:
            raise PlanError(TOO_DEEP) from None
    return validate_plan(data)


def parse_plan_upload(upload: Any) -> PlanSpec:
    """An uploaded plan file (Django's UploadedFile): refused by its size before it is read, so
    a huge upload is never loaded into memory."""
    limit = settings.AUTOPACK_MAX_PLAN_BYTES
    if upload.size > limit:
        raise PlanError(f"plan: file is {upload.size:,} bytes; the limit is {limit:,} bytes")
    return parse_plan_bytes(upload.read(limit + 1), filename=upload.name or "")


_MARKUP = re.compile(r"[<>]")


def _name(value: Any, where: str) -> str:
    name = _text(value, where, required=True, limit=MAX_NAME)
    # Names are labels shown everywhere (pages, phone screens, prompts): plain text only, and
    # reading as what they are (no control, bidi or zero-width characters).
    if _MARKUP.search(name):
        raise PlanError(f"{where}: must be plain text (no < or >)")
    if problem := name_problem(name):
        raise PlanError(f"{where}: {problem}")
    return name


def _text(value: Any, where: str, *, required: bool, limit: int) -> str:
    if value is None:
        if required:
            raise PlanError(f"{where}: required")
        return ""
    if not isinstance(value, str):
        raise PlanError(f"{where}: expected text, got {type(value).__name__}")
    if problem := text_problem(value):
        raise PlanError(f"{where}: {problem}")
    value = value.strip()
    if required and not value:
        raise PlanError(f"{where}: must not be empty")
    if len(value) > limit:
        raise PlanError(f"{where}: longer than {limit} characters")
    return value


def _workspace(value: Any) -> str:
    ws = _text(value, "workspace", required=False, limit=300)
    if not ws:
        return ""
    if problem := name_problem(ws):
        raise PlanError(f"workspace: {problem}")
    ws = _under_root(ws)
    path = PurePosixPath(ws)
    # Workspaces live under AUTOPACK_WORKSPACE_ROOT; a plan cannot point a run (and the notes
    # it writes) at an arbitrary place on the machine.
    if path.is_absolute() or ".." in path.parts or "\\" in ws:
        raise PlanError(
            "workspace: must be a relative path without '..' (it is placed under "
            "AUTOPACK_WORKSPACE_ROOT)"
        )
    # "." or "./." is the root itself: every such run would share one folder (and notes file).
    if not path.parts:
        raise PlanError(
            "workspace: must name a folder under AUTOPACK_WORKSPACE_ROOT, not the root itself "
            "(leave it out for a folder of the run's own)"
        )
    if path.parts[0] == RUNS_DIR:
        raise PlanError(
            f"workspace: {RUNS_DIR} is where Autopack keeps the runs' own working trees; "
            "choose another name"
        )
    return str(path)


def _under_root(ws: str) -> str:
    """A workspace written as the root's own path plus a folder (`.autopack/workspaces/x`, as
    the root is shown relative to the project) means that folder: read under the root again it
    was `.autopack/workspaces/.autopack/workspaces/x`, a path nobody was shown."""
    root = Path(settings.AUTOPACK_WORKSPACE_ROOT)
    prefixes = {str(PurePosixPath(root))}
    for base in (settings.BASE_DIR, Path.cwd()):
        try:
            prefixes.add(str(PurePosixPath(root.resolve().relative_to(Path(base).resolve()))))
        except ValueError:
            continue
    for prefix in sorted(prefixes, key=len, reverse=True):
        if prefix not in ("", ".") and ws.startswith(prefix.rstrip("/") + "/"):
            return ws[len(prefix.rstrip("/")) + 1 :]
    return ws


def _source(value: Any) -> str:
    """A local git repository under one of AUTOPACK_SOURCE_ROOTS (checked again, with the
    repository itself, when a phase prepares the run's tree)."""
    src = _text(value, "source", required=False, limit=1000)
    if not src:
        return ""
    if problem := name_problem(src):
        raise PlanError(f"source: {problem}")
    path = PurePosixPath(src)
    if not path.is_absolute() or ".." in path.parts or "\\" in src:
        raise PlanError("source: must be an absolute path without '..' to a local git repository")
    roots = source_roots()
    if not roots:
        raise PlanError(
            "source: no local repositories are allowed here; set AUTOPACK_SOURCE_ROOTS to the "
            "folders that may hold them, or use workspace"
        )
    resolved = Path(src).resolve()
    if not any(resolved == root or root in resolved.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise PlanError(
            f"source: {src} is not under an allowed root (AUTOPACK_SOURCE_ROOTS: {allowed})"
        )
    return str(path)


def _protected_paths(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_PROTECTED:
        raise PlanError(f"protected_paths: a list of at most {MAX_PROTECTED} glob patterns")
    patterns = []
    for i, raw in enumerate(value):
        pattern = _text(raw, f"protected_paths[{i}]", required=True, limit=500)
        if problem := name_problem(pattern):
            raise PlanError(f"protected_paths[{i}]: {problem}")
        try:
            ProtectedPaths.compile([pattern])
        except (ValueError, re.error) as exc:
            raise PlanError(f"protected_paths[{i}]: {exc}") from exc
        patterns.append(pattern)
    return patterns


def _checks(value: Any, where: str) -> list[str]:
    """Commands run with /bin/sh -c in the run's tree (sandboxed) after each change."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_CHECKS:
        raise PlanError(f"{where}: a list of at most {MAX_CHECKS} commands")
    commands = []
    for i, raw in enumerate(value):
        command = _text(raw, f"{where}[{i}]", required=True, limit=MAX_CHECK_COMMAND)
        # One line: a command is shown, stored and logged as one; a script belongs in a file.
        if problem := name_problem(command):
            raise PlanError(f"{where}[{i}]: {problem}")
        commands.append(command)
    return commands


class GuardInvalid(ValueError):
    """A budget guard's fields refused: {field: message}, every bad field at once."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors.items()))


@dataclass(frozen=True)
class GuardSpec:
    """A budget guard's fields as guard_validate accepted them."""

    provider: str
    window: str  # the cap window watched
    period: str  # day, week or month when given as a period (the window of that name); ""
    threshold_percent: Decimal
    action: str


def guard_provider_problem(provider: str) -> str | None:
    """Why a guard cannot watch this provider, or None: a guard for a provider the catalogue
    does not have would never fire ("Anthropic" is not "anthropic")."""
    known = sorted(router.state().providers)
    if provider in known:
        return None
    # repr: a control or bidi character shows as an escape, not as itself.
    quoted = repr(provider if len(provider) <= 60 else provider[:60] + "…")
    problem = f"{quoted} is not a provider in the catalogue (one of {', '.join(known)})"
    near = [name for name in known if name.lower() == provider.strip().lower()]
    if near:
        problem += f"; did you mean {near[0]!r}?"
    return problem


def guard_window_problem(provider: str, window: str) -> str | None:
    """Why a guard of `provider` cannot watch `window`, or None: the provider has no cap window
    of that name (usage.selectors.provider_windows: its configured windows, then the legacy
    day/week/month caps; two statements)."""
    from usage.selectors import provider_windows

    names = [w.name for w in provider_windows(provider=provider)]
    if window in names:
        return None
    quoted = repr(window if len(window) <= 60 else window[:60] + "…")
    if not names:
        return f"{provider} has no cap window (no {quoted} window)"
    return f"{provider} has no {quoted} window (its windows: {', '.join(names)})"


def guard_validate(
    *,
    provider: object,
    threshold_percent: object,
    action: object,
    period: object = None,
    window: object = None,
) -> GuardSpec:
    """The one check of a budget guard, wherever it is made (plan file, admin, REST API, MCP).
    It names a cap window of its provider (`window`), or a `period` (day, week, month: the
    legacy UTC windows of those names, accepted as before without checking the provider has
    it). GuardInvalid names every bad field."""
    errors: dict[str, str] = {}
    provider_ok = False
    if not isinstance(provider, str) or not provider:
        errors["provider"] = "a provider name such as anthropic"
    elif problem := guard_provider_problem(provider):
        errors["provider"] = problem
    else:
        provider_ok = True
    if window in (None, ""):
        # No window: the legacy period (missing too: refused as before, by the period).
        if period not in PERIODS:
            errors["period"] = f"one of {', '.join(PERIODS)}"
    elif not isinstance(window, str):
        errors["window"] = "a window name such as week"
    elif period not in (None, "") and period != window:
        errors["period"] = f"give a window or a period, not both (window {window!r})"
    elif provider_ok:
        assert isinstance(provider, str)
        if problem := guard_window_problem(provider, window):
            errors["window"] = problem
    threshold: Decimal | None = None
    if not isinstance(threshold_percent, bool) and isinstance(
        threshold_percent, int | float | Decimal
    ):
        # The column keeps two decimals; finite() refuses NaN and infinities, and a number
        # out of range is refused before quantize (which cannot hold 1e300 to two places).
        raw = Decimal(str(threshold_percent))
        if raw.is_finite() and 0 < raw <= 100:
            threshold = raw.quantize(Decimal("0.01"))
    if threshold is None or not (0 < threshold <= 100):
        errors["threshold_percent"] = "a number above 0 and at most 100 (percent of the cap)"
        threshold = None
    if action not in GUARD_ACTIONS:
        errors["action"] = f"one of {', '.join(GUARD_ACTIONS)}"
    if errors:
        raise GuardInvalid(errors)
    assert isinstance(provider, str) and isinstance(action, str)
    assert threshold is not None
    name = window if isinstance(window, str) and window else str(period)
    legacy = str(period) if period in PERIODS and name == period else ""
    return GuardSpec(
        provider=provider,
        window=name,
        period=legacy,
        threshold_percent=threshold,
        action=action,
    )


def _guards(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PlanError("guards: expected a list")
    guards = []
    for i, raw in enumerate(value):
        where = f"guards[{i}]"
        if not isinstance(raw, dict):
            raise PlanError(f"{where}: expected a mapping")
        unknown = set(raw) - {"provider", "window", "period", "threshold_percent", "action"}
        if unknown:
            raise PlanError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        try:
            spec = guard_validate(
                provider=raw.get("provider"),
                window=raw.get("window"),
                period=raw.get("period"),
                threshold_percent=raw.get("threshold_percent"),
                action=raw.get("action"),
            )
        except GuardInvalid as exc:
            field_name, message = next(iter(exc.errors.items()))
            raise PlanError(f"{where}.{field_name}: {message}") from None
        guards.append(
            {
                "provider": spec.provider,
                "window": spec.window,
                "period": spec.period,
                "threshold_percent": raw["threshold_percent"],
                "action": spec.action,
            }
        )
    return guards


def validate_plan(data: Any) -> PlanSpec:
    if not isinstance(data, dict):
        raise PlanError("plan: expected a mapping with name and tiers")
    unknown = set(data) - {
        "name",
        "workspace",
        "source",
        "protected_paths",
        "checks",
        "max_attempts",
        "guards",
        "tiers",
    }
    if unknown:
        raise PlanError(f"plan: unknown field {sorted(map(str, unknown))[0]!r}")
    name = _name(data.get("name"), "name")
    max_attempts = data.get("max_attempts", 3)
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not (1 <= max_attempts <= MAX_ATTEMPTS_LIMIT)
    ):
        raise PlanError(f"max_attempts: a whole number from 1 to {MAX_ATTEMPTS_LIMIT}")
    raw_tiers = data.get("tiers")
    if not isinstance(raw_tiers, list) or not raw_tiers:
        raise PlanError("tiers: required, a non-empty list")

    limit = settings.AUTOPACK_MAX_PLAN_PHASES
    count = 0
    tiers: list[TierSpec] = []
    for t, raw_tier in enumerate(raw_tiers):
        where = f"tiers[{t}]"
        if not isinstance(raw_tier, dict):
            raise PlanError(f"{where}: expected a mapping with name and phases")
        unknown = set(raw_tier) - {"name", "phases"}
        if unknown:
            raise PlanError(f"{where}: unknown field {sorted(map(str, unknown))[0]!r}")
        tier_name = _name(raw_tier.get("name"), f"{where}.name")
        raw_phases = raw_tier.get("phases")
        if not isinstance(raw_phases, list) or not raw_phases:
            raise PlanError(f"{where} ({tier_name!r}).phases: a tier needs at least one phase")
        count += len(raw_phases)
        if count > limit:
            raise PlanError(f"tiers: more than {limit:,} phases in one plan")
        phases = [_phase(raw, f"{where}.phases[{p}]") for p, raw in enumerate(raw_phases)]
        tiers.append(TierSpec(name=tier_name, phases=phases))

    workspace = _workspace(data.get("workspace"))
    source = _source(data.get("source"))
    if workspace and source:
        raise PlanError(
            "source: a plan works either on a workspace or on a source repository, not both"
        )
    return PlanSpec(
        name=name,
        tiers=tiers,
        workspace=workspace,
        max_attempts=max_attempts,
        guards=_guards(data.get("guards")),
        source=source,
        protected_paths=_protected_paths(data.get("protected_paths")),
        checks=_checks(data.get("checks"), "checks"),
    )


def _phase(raw: Any, where: str) -> PhaseSpec:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a mapping")
    unknown = set(raw) - {
        "name",
        "category",
        "complexity",
        "description",
        "acceptance_criteria",
        "checks",
    }
    if unknown:
        raise PlanError(f"{where}: unknown field {sorted(map(str, unknown))[0]!r}")
    name = _name(raw.get("name"), f"{where}.name")
    category = raw.get("category")
    if not is_category(category):
        raise PlanError(
            f"{where}.category: a lower-case identifier such as core_backend, got {category!r}"
        )
    complexity = raw.get("complexity")
    if complexity not in COMPLEXITIES:
        raise PlanError(
            f"{where}.complexity: unknown complexity {complexity!r} "
            f"(one of {', '.join(COMPLEXITIES)})"
        )
    description = _text(
        raw.get("description"), f"{where}.description", required=False, limit=MAX_TEXT
    )
    criteria = raw.get("acceptance_criteria", [])
    if isinstance(criteria, str):
        criteria = [criteria]
    if not isinstance(criteria, list) or len(criteria) > MAX_CRITERIA:
        raise PlanError(
            f"{where}.acceptance_criteria: a list of at most {MAX_CRITERIA} items of text"
        )
    items = [
        _text(c, f"{where}.acceptance_criteria[{i}]", required=True, limit=2000)
        for i, c in enumerate(criteria)
    ]
    checks = _checks(raw.get("checks"), f"{where}.checks")
    return PhaseSpec(name, category, complexity, description, items, checks)
