"""A run's context (`Run.run_context`) as a type: read from its JSON once, written back once.

The document holds what outlives a phase: the run's routing data (routing.types.RoutingContext:
its mapping snapshot and its run overrides, which the router reads) and why the run is paused,
when the pause is the router's. `from_json` / `to_json` are the only code that knows the JSON's
keys, apart from the one query that filters on `paused_for` (PAUSED_FOR_QUOTA_LOOKUP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from routing.types import MappedModel, RouteKey, RoutingContext

PAUSED_FOR_QUOTA = "quota"
# A JSON lookup on Run: the runs paused for quota (runs.services.runs_resume_after_quota).
PAUSED_FOR_QUOTA_LOOKUP = {"run_context__paused_for": PAUSED_FOR_QUOTA}


@dataclass(frozen=True)
class RunContext:
    routing: RoutingContext = field(default_factory=RoutingContext)
    # PAUSED_FOR_QUOTA while the run is paused because the router refused every model ("" else).
    paused_for: str = ""
    # With a quota pause: the reset it waits for (the earliest instant a refused model may be
    # called again: a window's reset, a cooldown's end; None: no clock frees one) and the
    # mapping version when it paused (a change of caps or mapping moves it: check at once).
    resume_at: datetime | None = None
    paused_version: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> RunContext:
        data = data or {}
        resume_at = data.get("resume_at")
        version = data.get("paused_version")
        return cls(
            routing=RoutingContext.from_json(data),
            paused_for=str(data.get("paused_for") or ""),
            resume_at=datetime.fromisoformat(resume_at) if isinstance(resume_at, str) else None,
            paused_version=version if isinstance(version, int) else None,
        )

    def to_json(self) -> dict[str, Any]:
        out = self.routing.to_json()
        if self.paused_for:
            out["paused_for"] = self.paused_for
        if self.resume_at is not None:
            out["resume_at"] = self.resume_at.isoformat()
        if self.paused_version is not None:
            out["paused_version"] = self.paused_version
        return out

    def with_snapshot(self, mapping: Mapping[RouteKey, MappedModel]) -> RunContext:
        return replace(self, routing=replace(self.routing, mapping=dict(mapping)))

    def with_override(self, key: RouteKey, model: str) -> RunContext:
        return replace(self, routing=self.routing.with_override(key, model))

    def with_paused_for(
        self, why: str, *, resume_at: datetime | None = None, version: int | None = None
    ) -> RunContext:
        return replace(self, paused_for=why, resume_at=resume_at, paused_version=version)
