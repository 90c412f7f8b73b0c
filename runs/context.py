"""A run's context (`Run.run_context`) as a type: read from its JSON once, written back once.

The document holds what outlives a phase: the run's routing data (routing.types.RoutingContext:
its mapping snapshot and its run overrides, which the router reads) and why the run is paused,
when the pause is the router's. `from_json` / `to_json` are the only code that knows the JSON's
keys, apart from the one query that filters on `paused_for` (PAUSED_FOR_QUOTA_LOOKUP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> RunContext:
        data = data or {}
        return cls(
            routing=RoutingContext.from_json(data),
            paused_for=str(data.get("paused_for") or ""),
        )

    def to_json(self) -> dict[str, Any]:
        out = self.routing.to_json()
        if self.paused_for:
            out["paused_for"] = self.paused_for
        return out

    def with_snapshot(self, mapping: Mapping[RouteKey, MappedModel]) -> RunContext:
        return replace(self, routing=replace(self.routing, mapping=dict(mapping)))

    def with_override(self, key: RouteKey, model: str) -> RunContext:
        return replace(self, routing=self.routing.with_override(key, model))

    def with_paused_for(self, why: str) -> RunContext:
        return replace(self, paused_for=why)
