"""The text sent to builder and auditor models, and the parsing of the auditor's verdict."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from routing.text import storable
from usage.vocabulary import SEVERITIES, Severity

from .edits import FORMAT_INSTRUCTIONS
from .models import Phase

BUILDER_INSTRUCTIONS = (
    "You are the builder in an autonomous software build run. Implement the phase described "
    "below by changing files in the run's git repository: the prompt lists its files and shows "
    "the content of those the phase names. Your edits are applied all or nothing and "
    "committed; the plan's checks then run on the result, and an auditor reviews the diff. "
    "After the edit blocks, say briefly what changed and how the acceptance criteria are met."
)
BUILDER_SYSTEM = BUILDER_INSTRUCTIONS + "\n\n" + FORMAT_INSTRUCTIONS
AUDITOR_SYSTEM = (
    "You are the auditor in an autonomous software build run. Review the builder's change "
    "(the diff, as committed, and the results of the plan's checks) against the phase's "
    "acceptance criteria. Reply with ONLY a JSON object: "
    '{"verdict": "approve" | "revise", "summary": "...", "issues": [{"severity": '
    '"minor" | "major" | "critical", "title": "...", "detail": "..."}]}.'
)
# How much of a refusal (an edit error, a failing check's output) goes back to the builder and
# is kept on the attempt: the end of a check's output is where the failure shows.
REFUSAL_LIMIT = 8_000
# The diff and each check's output the auditor sees; the phase page and the patch have all.
AUDIT_DIFF_LIMIT = 40_000
AUDIT_OUTPUT_LIMIT = 2_000
COMMENTARY_LIMIT = 4_000
QUOTE = "| "


class VerdictError(ValueError):
    """The auditor's reply is not a verdict in the agreed format."""


def _criteria(phase: Phase) -> str:
    return "\n".join(f"- {c}" for c in phase.acceptance_criteria) or "- (none given)"


def _task(phase: Phase) -> list[str]:
    """What the phase asks for, the same words for the builder and the auditor."""
    return [
        f"Category: {phase.category}  Complexity: {phase.complexity}",
        "",
        "Description:",
        phase.description or "(none)",
        "",
        "Acceptance criteria:",
        _criteria(phase),
    ]


def quoted(text: str) -> str:
    """Text Autopack did not write (a check's output, an error naming the builder's own
    lines), each line behind '| ': data, never a section or a marker of the prompt."""
    return "\n".join(QUOTE + line for line in text.rstrip("\n").split("\n"))


def tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    kept = text[-limit:]
    return f"[… the first {len(text) - limit:,} characters are left out]\n{kept}"


def checks_refusal(checks: list[dict[str, Any]]) -> str:
    """What the builder is told about checks that did not pass: each command, its outcome and
    the end of its output (bounded in all)."""
    parts = []
    for check in checks:
        if check.get("outcome") == "passed":
            continue
        head = (
            f"Check `{check.get('command', '')}` {str(check.get('outcome', '')).replace('_', ' ')}"
        )
        if check.get("exit_code") is not None:
            head += f" (exit {check['exit_code']})"
        if check.get("reason"):
            head += f": {check['reason']}"
        parts.append(head + "\nIts output (the end):\n" + (check.get("output") or "(none)"))
    return tail("\n\n".join(parts), REFUSAL_LIMIT)


def named_paths(phase: Phase, files: Sequence[str]) -> list[str]:
    """The repository's files that the phase's description or criteria name."""
    text = "\n".join([phase.name, phase.description, *map(str, phase.acceptance_criteria)])
    return [path for path in files if path in text]


def builder_prompt(
    *,
    phase: Phase,
    attempt: int,
    feedback: list[dict[str, Any]],
    human_notes: str = "",
    files: Sequence[str] = (),
    files_total: int | None = None,
    contents: Sequence[Any] = (),
    refusal: str = "",
) -> str:
    """`files`: the repository's file list (shortened when `files_total` is larger);
    `contents`: runs.workspace.FileText of the files the phase names or the last attempt
    touched; `refusal`: why the last attempt went back without an audit."""
    lines = [
        "Autopack-Role: builder",
        f"Attempt: {attempt}",
        f"Run: {phase.run.name}",
        f"Tier {phase.tier.index}: {phase.tier.name}",
        f"Phase {phase.position}: {phase.name}",
        *_task(phase),
        "",
        "Repository files:",
    ]
    lines += [f"- {path}" for path in files] or ["- (none yet)"]
    total = len(files) if files_total is None else files_total
    if total > len(files):
        lines.append(f"- … and {total - len(files):,} more files not listed")
    lines.append("")
    shown = [c for c in contents if c.text]
    if shown:
        lines.append("File contents:")
        for item in shown:
            lines.append(f"----- {item.path}")
            lines.append(item.text.rstrip("\n"))
            lines.append(f"----- end {item.path}")
            if item.note:
                lines.append(f"({item.path}: {item.note})")
    skipped = [c for c in contents if not c.text and c.note]
    if skipped:
        lines += ["", "Not shown:"] + [f"- {c.path}: {c.note}" for c in skipped]
    if refusal.strip():
        lines += [
            "",
            "Your previous attempt was refused:",
            quoted(tail(refusal, REFUSAL_LIMIT)),
            "Nothing of it was kept: the files above are as they were before it. Reply with "
            "the whole change again.",
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


_BLOCK_OPEN = re.compile(r"^<<<<<<< (WRITE|SEARCH|DELETE) ")


def commentary(reply: str) -> str:
    """The builder's reply without its edit blocks (the diff shows those), bounded."""
    out, closing = [], ""
    for line in reply.replace("\r\n", "\n").split("\n"):
        bare = line.rstrip(" \t")
        if closing:
            if bare == closing:
                closing = ""
            continue
        match = _BLOCK_OPEN.match(bare)
        if match:
            kind = match.group(1)
            closing = {"WRITE": ">>>>>>> END", "SEARCH": ">>>>>>> REPLACE"}.get(kind, "")
            continue
        out.append(line)
    text = "\n".join(out).strip()
    if len(text) > COMMENTARY_LIMIT:
        text = text[:COMMENTARY_LIMIT] + "\n[… shortened]"
    return text or "(none)"


def auditor_prompt(
    *,
    phase: Phase,
    attempt: int,
    builder_output: str,
    diff: str = "",
    diff_shortened: bool = False,
    checks: Sequence[dict[str, Any]] = (),
) -> str:
    shown = diff
    note = ""
    if len(diff) > AUDIT_DIFF_LIMIT:
        shown = diff[:AUDIT_DIFF_LIMIT]
        shown = shown[: shown.rfind("\n") + 1] or shown
        note = (
            f"[diff shortened: the first {len(shown):,} of {len(diff):,} characters are shown; "
            "judge what you can see and ask for a smaller change if the rest matters]"
        )
    elif diff_shortened:
        note = "[diff shortened by Autopack: the change is larger than what is shown]"
    lines = [
        "Autopack-Role: auditor",
        f"Attempt: {attempt}",
        f"Phase {phase.position}: {phase.name}",
        *_task(phase),
        "",
        "Diff:",
        shown.rstrip("\n") or "(the change is empty)",
    ]
    if note:
        lines.append(note)
    lines += ["", "Checks:"]
    if not checks:
        lines.append("- (the plan has no checks)")
    for check in checks:
        lines.append(
            f"- `{check.get('command', '')}`: {check.get('outcome', '')}"
            + (f" (exit {check['exit_code']})" if check.get("exit_code") is not None else "")
            + (f", {check['duration_s']:.1f} s" if check.get("duration_s") is not None else "")
        )
        output = (check.get("output") or "").strip()
        if output:
            lines.append(quoted(tail(output, AUDIT_OUTPUT_LIMIT)))
    lines += ["", "Builder's commentary:", commentary(builder_output)]
    return "\n".join(lines)


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
                "severity": severity if severity in SEVERITIES else Severity.MINOR.value,
                "title": storable(str(raw.get("title", ""))[:300]),
                "detail": storable(str(raw.get("detail", ""))[:4000]),
            }
        )
    # The reply's text was made storable where it entered (routing/calls.py), but a JSON
    # escape ("\u0000", "\udfff") becomes a NUL or a lone surrogate only when parsed here, and
    # jsonb refuses a NUL.
    return {
        "verdict": data["verdict"],
        "summary": storable(str(data.get("summary", ""))[:4000]),
        "issues": issues,
    }
