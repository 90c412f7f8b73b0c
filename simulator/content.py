"""What the simulated provider answers: reply text and token counts, deterministic per request.

Everything here is a pure function of (seed, provider, model, system, prompt) so a test can
repeat a request — streamed or not — and get the same text and the same usage back.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from .project import NO_FAULTS, FaultRates, build_phase, pick_fault, read_builder_prompt

# Providers bill cached input only above a minimum prefix length (OpenAI: 1024 tokens).
CACHE_MIN_PROMPT_TOKENS = 1100
CACHE_BLOCK = 128
# Framing tokens a chat request costs on top of its text (role markers, separators).
MESSAGE_OVERHEAD_TOKENS = 8

_ROLE_LINE = re.compile(r"^Autopack-Role:\s*(builder|auditor|agent:[A-Za-z0-9_.-]+)\s*$", re.M)
_ATTEMPT_LINE = re.compile(r"^Attempt:\s*(\d+)\s*$", re.M)
_PHASE_LINE = re.compile(r"^Phase \d+:\s*(.+)$", re.M)
_CATEGORY_LINE = re.compile(r"^Category:\s*(\S+)", re.M)
_FEEDBACK_LINE = re.compile(r"^- \[(minor|major|critical|\?)\]\s*([^:\n]+)", re.M)
# Text taken from the prompt and echoed back is reduced to harmless characters: the
# progress page renders builder output, and only an explicit script rule may inject markup.
_UNSAFE = re.compile(r"[^A-Za-z0-9 .,:;_()/+#-]")


@dataclass(frozen=True)
class RequestInfo:
    provider: str
    model: str
    system: str
    prompt: str
    max_tokens: int
    stream: bool
    thinking: bool = False  # Anthropic extended thinking was requested
    include_usage: bool = False  # OpenAI stream_options.include_usage
    prediction: str | None = None  # OpenAI Predicted Outputs: the predicted content
    cache_ttls: tuple[str, ...] = ()  # Anthropic cache_control TTLs in the request ("5m", "1h")
    tools: bool = False  # Gemini: the request declares tools, so tool-use prompts are billed

    @property
    def full_text(self) -> str:
        return f"{self.system}\n{self.prompt}" if self.system else self.prompt

    @property
    def role(self) -> str | None:
        match = _ROLE_LINE.search(self.full_text)
        return match.group(1) if match else None

    @property
    def attempt(self) -> int | None:
        match = _ATTEMPT_LINE.search(self.full_text)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Plan:
    """One successful reply, before it is put into a provider's wire format."""

    text: str
    prompt_tokens: int  # every input token, cache reads and writes included
    cached_tokens: int  # cache reads
    cache_write_tokens: int  # Anthropic cache creation (both TTLs); 0 elsewhere
    output_tokens: int  # visible output
    reasoning_tokens: int  # hidden reasoning/thinking, billed as output
    finish: str  # "stop" | "length"
    cache_write_1h_tokens: int = 0  # the part of cache_write_tokens written to the 1-hour cache
    # OpenAI Predicted Outputs: prediction tokens that appeared in the reply (part of the
    # visible output) and those that did not (billed as output on top of it).
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    tool_use_prompt_tokens: int = 0  # Gemini: tokens of tool-use prompts, billed as input

    @property
    def completion_tokens(self) -> int:
        return self.output_tokens + self.reasoning_tokens

    @property
    def uncached_input_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens


def rng_for(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def count_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _safe(text: str, limit: int = 80) -> str:
    return _UNSAFE.sub("", text).strip()[:limit] or "unnamed"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "change"


_FILE_POOLS = {
    "backend": ["{pkg}/services.py", "{pkg}/models.py", "{pkg}/selectors.py", "{pkg}/api.py"],
    "frontend": ["web/src/components/{Name}.tsx", "web/src/pages/{name}.tsx", "web/src/api.ts"],
    "database": ["{pkg}/migrations/0007_{name}.py", "{pkg}/models.py", "{pkg}/queries.py"],
    "docs": ["docs/{name}.md", "README.md", "docs/index.md"],
    "tests": ["tests/test_{name}.py", "tests/conftest.py", "tests/factories.py"],
    "security": ["{pkg}/permissions.py", "{pkg}/auth.py", "{pkg}/settings.py"],
}
_GENERAL_FILES = ["{pkg}/{name}.py", "{pkg}/services.py", "{pkg}/config.py", "{pkg}/utils.py"]
_SUMMARIES = [
    "The change keeps the existing public interface and moves the new behaviour behind a "
    "single service function, so the API view, the admin action and the task share one path.",
    "I split the work into a small pure function that is easy to test and a thin caller that "
    "does the I/O; the pure part carries the rules the acceptance criteria name.",
    "The implementation follows the patterns already in the codebase: settings come from the "
    "environment, writes happen inside one transaction and errors surface as typed exceptions.",
    "Existing callers are untouched; the new code path is reached only through the entry "
    "point the phase describes, which keeps the blast radius of this change small.",
]
_TEST_NOTES = [
    "Added tests for the happy path, the empty input and the error path; all pass locally.",
    "New tests cover each acceptance criterion by name; the existing suite still passes.",
    "Tests exercise the boundary values and a concurrent update; the suite runs in under a second.",
]
_ISSUES = [
    ("Missing test for the error path", "The failure branch is not covered by any test."),
    ("Unvalidated input", "The new entry point accepts values without checking their range."),
    ("Empty input not handled", "An empty list reaches a division and raises at runtime."),
    ("Docstring out of date", "The docstring still describes the behaviour before the change."),
    ("Magic number", "The timeout is hard-coded; it belongs in settings."),
    ("Log message lacks context", "The warning does not name the object it is about."),
    ("Read-then-write race", "Two workers can read the same row before either updates it."),
    ("Error swallowed", "The exception is caught and ignored, so the caller never learns of it."),
]


def builder_text(info: RequestInfo, rng: random.Random) -> str:
    text = info.full_text
    phase_match = _PHASE_LINE.search(text)
    phase = _safe(phase_match.group(1)) if phase_match else "the requested change"
    category_match = _CATEGORY_LINE.search(text)
    category = _safe(category_match.group(1), 30).lower() if category_match else "general"
    name = _slug(phase)
    pool = [*_FILE_POOLS.get(category, _GENERAL_FILES), "tests/test_{name}.py"]
    files = sorted(
        {p.format(pkg="app", name=name, Name=name.title().replace("_", "")) for p in pool}
    )
    touched = rng.sample(files, k=min(len(files), rng.randint(2, 4)))
    attempt = info.attempt or 1
    role = info.role or "builder"
    lines = [
        f"Implemented phase {phase} (attempt {attempt}, {role}).",
        "",
        "Files touched:",
    ]
    verbs = ["added", "updated", "refactored", "extended"]
    lines += [f"- {path}: {rng.choice(verbs)} ({rng.randint(4, 160)} lines)" for path in touched]
    lines += ["", "Summary:", rng.choice(_SUMMARIES)]
    feedback = [_safe(title) for _sev, title in _FEEDBACK_LINE.findall(text)]
    if feedback:
        lines += ["", "Auditor feedback addressed:"]
        lines += [f"- {title}: fixed and covered by a test." for title in feedback[:10]]
    lines += ["", "Tests:", rng.choice(_TEST_NOTES)]
    return "\n".join(lines)


def auditor_verdict(info: RequestInfo, *, seed: int, revise_rate: float) -> dict[str, Any]:
    # The verdict depends on seed + prompt only, so the same review gives the same verdict
    # whichever model or provider the router picked for it.
    rng = rng_for(seed, "verdict", info.full_text)
    roll = rng.random()
    if info.attempt == 1 and roll < revise_rate:
        picked = rng.sample(_ISSUES, k=rng.randint(1, 3))
        severities = ["major"] + [rng.choice(["minor", "major", "critical"]) for _ in picked[1:]]
        return {
            "verdict": "revise",
            "summary": "The change is close, but the issues below must be fixed first.",
            "issues": [
                {"severity": sev, "title": title, "detail": detail}
                for sev, (title, detail) in zip(severities, picked, strict=True)
            ],
        }
    minor = rng.sample(_ISSUES, k=rng.choice([0, 0, 1, 2]))
    return {
        "verdict": "approve",
        "summary": "The change meets the acceptance criteria.",
        "issues": [{"severity": "minor", "title": t, "detail": d} for t, d in minor],
    }


def edit_fault(info: RequestInfo, *, seed: int, faults: FaultRates) -> str | None:
    """The fault a builder request gets (project.py): rolled on seed + prompt, like the
    auditor's verdict, so the same request gets the same fault whichever model answers."""
    if info.role != "builder":
        return None
    roll = rng_for(seed, "edit-fault", info.full_text).random()
    return pick_fault(read_builder_prompt(info.prompt), roll=roll, rates=faults)


def reply_text(
    info: RequestInfo, *, seed: int, revise_rate: float, faults: FaultRates = NO_FAULTS
) -> str:
    rng = rng_for(seed, "text", info.provider, info.model, info.full_text)
    role = info.role
    if role == "auditor":
        return json.dumps(auditor_verdict(info, seed=seed, revise_rate=revise_rate))
    if role == "builder":
        # The builder changes the repository with edit blocks (project.py).
        # Read from the prompt only: the system prompt's instructions may quote its headings.
        request = read_builder_prompt(info.prompt)
        fault = edit_fault(info, seed=seed, faults=faults)
        return build_phase(request, seed=seed, fault=fault).text
    if role is not None:
        return builder_text(info, rng)
    return (
        "This is the simulated provider. The prompt carried no Autopack-Role line, so this "
        f"is a generic reply from {_safe(info.model, 60)}."
    )


def plan_reply(
    info: RequestInfo, *, seed: int, text: str, reasons: bool, cache_writes: bool
) -> Plan:
    """The reply's token counts. `reasons`: the model spends hidden reasoning tokens;
    `cache_writes`: the protocol reports the cache writes of the uncached rest (Anthropic)."""
    rng = rng_for(seed, "tokens", info.provider, info.model, info.full_text)
    prompt_tokens = count_tokens(info.full_text) + MESSAGE_OVERHEAD_TOKENS
    cached = write = 0
    if prompt_tokens >= CACHE_MIN_PROMPT_TOKENS:
        share = rng.uniform(0.5, 0.9)
        cached = max(1024, int(prompt_tokens * share) // CACHE_BLOCK * CACHE_BLOCK)
        if cache_writes:
            # Anthropic reports the prefix it read from cache and the part it wrote for next time.
            rest = prompt_tokens - cached
            write = max(1, int(rest * rng.uniform(0.6, 0.9)))
    reasoning = 0
    if reasons:
        reasoning = rng.randint(2, 24) * 32
    budget = max(0, info.max_tokens - reasoning)
    output = count_tokens(text)
    finish = "stop"
    if output > budget:
        text, output, finish = text[: budget * 4], budget, "length"
    return Plan(
        text=text,
        prompt_tokens=prompt_tokens,
        cached_tokens=cached,
        cache_write_tokens=write,
        output_tokens=output,
        reasoning_tokens=reasoning,
        finish=finish,
    )


def split_text(text: str, rng: random.Random) -> list[str]:
    """Stream deltas: a few words each, like a real token stream grouped by the network."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + rng.randint(12, 48))
        while end < len(text) and not text[end].isspace() and end - start < 64:
            end += 1
        pieces.append(text[start:end])
        start = end
    return pieces or [""]
