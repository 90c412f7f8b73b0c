"""The text sent to builder and auditor models, and the parsing of the auditor's verdict."""

from __future__ import annotations

import json
import re
from typing import Any

from routing.text import storable

from .models import Phase

BUILDER_SYSTEM = (
    "You are the builder in an autonomous software build run. Implement the phase described "
    "below in the run's workspace and reply with a concise description of the change: files "
    "touched, what changed and why, and how the acceptance criteria are met."
)
AUDITOR_SYSTEM = (
    "You are the auditor in an autonomous software build run. Review the builder's change "
    "against the phase's acceptance criteria. Reply with ONLY a JSON object: "
    '{"verdict": "approve" | "revise", "summary": "...", "issues": [{"severity": '
    '"minor" | "major" | "critical", "title": "...", "detail": "..."}]}.'
)
SEVERITIES = ("minor", "major", "critical")


class VerdictError(ValueError):
    """The auditor's reply is not a verdict in the agreed format."""


def _criteria(phase: Phase) -> str:
    return "\n".join(f"- {c}" for c in phase.acceptance_criteria) or "- (none given)"


def builder_prompt(
    *, phase: Phase, attempt: int, feedback: list[dict[str, Any]], human_notes: str = ""
) -> str:
    lines = [
        "Autopack-Role: builder",
        f"Attempt: {attempt}",
        f"Run: {phase.run.name}",
        f"Tier {phase.tier.index}: {phase.tier.name}",
        f"Phase {phase.position}: {phase.name}",
        f"Category: {phase.category}  Complexity: {phase.complexity}",
        "",
        "Description:",
        phase.description or "(none)",
        "",
        "Acceptance criteria:",
        _criteria(phase),
    ]
    if feedback:
        lines += ["", "The auditor asked for a revision. Address these issues:"]
        lines += [
            f"- [{i.get('severity', '?')}] {i.get('title', '')}: {i.get('detail', '')}"
            for i in feedback
        ]
    if human_notes.strip():
        lines += ["", "Notes from the supervisor (follow them):", human_notes.strip()]
    return "\n".join(lines)


def auditor_prompt(*, phase: Phase, attempt: int, builder_output: str) -> str:
    return "\n".join(
        [
            "Autopack-Role: auditor",
            f"Attempt: {attempt}",
            f"Phase {phase.position}: {phase.name}",
            f"Category: {phase.category}  Complexity: {phase.complexity}",
            "",
            "Acceptance criteria:",
            _criteria(phase),
            "",
            "Builder's change:",
            builder_output,
        ]
    )


_FENCE = re.compile(r"```(?:json)?\s*(\{.*\})\s*```", re.DOTALL)


def parse_verdict(text: str) -> dict[str, Any]:
    """Parse and normalise the auditor's JSON verdict; raises VerdictError."""
    match = _FENCE.search(text)
    body = match.group(1) if match else text.strip()
    if not body.startswith("{"):
        start, end = body.find("{"), body.rfind("}")
        if start < 0 or end < start:
            raise VerdictError("the auditor's reply holds no JSON object")
        body = body[start : end + 1]
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise VerdictError(f"the auditor's reply is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or data.get("verdict") not in ("approve", "revise"):
        raise VerdictError("the auditor's verdict must be 'approve' or 'revise'")
    raw_issues = data.get("issues") or []
    if not isinstance(raw_issues, list):
        raise VerdictError("the auditor's issues must be a list")
    issues = []
    for raw in raw_issues[:50]:
        if not isinstance(raw, dict):
            continue
        severity = str(raw.get("severity", "minor")).lower()
        issues.append(
            {
                "severity": severity if severity in SEVERITIES else "minor",
                "title": storable(str(raw.get("title", ""))[:300]),
                "detail": storable(str(raw.get("detail", ""))[:4000]),
            }
        )
    # The reply's text was made storable where it entered (routing/clients.py), but a JSON
    # escape ("\u0000", "\udfff") becomes a NUL or a lone surrogate only when parsed here, and
    # jsonb refuses a NUL.
    return {
        "verdict": data["verdict"],
        "summary": storable(str(data.get("summary", ""))[:4000]),
        "issues": issues,
    }
