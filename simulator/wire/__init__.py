"""What every wire module provides, and the pieces they share.

One module per wire protocol (`openai` for OpenAI, GLM and any OpenAI-compatible server,
`anthropic`, `gemini`), each a `Wire` object that owns its paths, its request parsing, its
response bodies, its stream events, its usage block and its error bodies. server.py picks the
wire by the URL prefix (its ROUTES table) and never looks at a provider's name.

A new wire protocol is one module here with one `Wire` subclass, plus a row in server.ROUTES.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from enum import Enum
from typing import Any

from ..content import Plan, RequestInfo
from ..state import LimitView

_ALNUM = string.ascii_letters + string.digits


class RequestError(Exception):
    """A request the simulator answers with the protocol's 400 instead of a reply."""


def rand(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def text_of(content: Any) -> str:
    """Text of an OpenAI/Anthropic message content: a string or a list of typed blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
    return ""


@dataclass(frozen=True)
class Ids:
    """Identifiers of one response; random, as real request ids are never reused."""

    request_id: str
    message_id: str
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class Route:
    """What the path of a model call says: the model (Gemini names it in the path) and
    whether the reply streams (Gemini: the method; the others: the body's `stream`)."""

    model: str = ""
    stream: bool = False


@dataclass(frozen=True)
class ErrorReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


class Part(Enum):
    """Where a stream frame sits, for the `cut_stream` fault: the head (e.g. Anthropic's
    message_start) always goes out, the content is cut part-way, the tail (final usage,
    finish reason, end marker) never goes out."""

    HEAD = "head"
    CONTENT = "content"
    TAIL = "tail"


@dataclass(frozen=True)
class Frame:
    data: bytes
    part: Part
    usage: dict[str, Any] | None = None  # the usage block this frame carries, if any


def reset_duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3s" (whole seconds above one)."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rfc3339(unix: float) -> str:
    """Anthropic's reset format: an RFC 3339 instant in UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def sse(data: Any, *, event: str | None = None, crlf: bool = False) -> bytes:
    """One server-sent event; Gemini ends its events with CRLF pairs, as the real API."""
    end = "\r\n\r\n" if crlf else "\n\n"
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {body}{end}".encode()


class Wire(ABC):
    """One wire protocol (or one dialect of it, like GLM's of OpenAI's)."""

    #: The provider name in the request log and in fault/script rules' `provider`.
    provider: str
    #: Model names the provider answers with another (a dated snapshot): the model it reports.
    snapshots: Mapping[str, str] = {}
    #: A cut stream's last frame before the cut is never a complete event (see server.py).
    malformed_frame: bytes

    # --- the request --------------------------------------------------------------------

    @abstractmethod
    def route(self, path: str) -> Route | None:
        """The route if `path` is one of this protocol's model calls, else None."""

    @abstractmethod
    def api_key(self, headers: Message, query: Mapping[str, list[str]]) -> str | None:
        """The key the client sent, wherever this protocol carries it."""

    @abstractmethod
    def parse(self, body: Any, route: Route) -> RequestInfo:
        """The request's text and options; RequestError when the real API would refuse it."""

    # --- the reply ----------------------------------------------------------------------

    def reported_model(self, model: str) -> str:
        """The model the reply names: the dated snapshot the real API reports for an alias,
        else the name asked for."""
        return self.snapshots.get(model, model)

    def reasons(self, info: RequestInfo) -> bool:
        """Whether the model spends hidden reasoning tokens on this request."""
        return info.thinking

    def plan(self, info: RequestInfo, plan: Plan) -> Plan:
        """The protocol's own share of the usage (cache TTLs, predictions, tool prompts)."""
        return plan

    #: Whether the protocol reports cache writes beside cache reads (Anthropic).
    cache_writes: bool = False

    @abstractmethod
    def new_ids(self) -> Ids: ...

    @abstractmethod
    def headers(self, ids: Ids, latency_ms: int) -> dict[str, str]: ...

    def limit_headers(self, view: LimitView, now: float) -> dict[str, str]:
        """The protocol's rate-limit headers for these counters (none by default: Gemini
        sends none; its 429 says retryDelay in the error's details)."""
        return {}

    @abstractmethod
    def usage(self, plan: Plan) -> dict[str, Any]:
        """The usage block exactly as the provider reports it (the request log keeps it)."""

    @abstractmethod
    def body(self, plan: Plan, info: RequestInfo, ids: Ids) -> dict[str, Any]: ...

    @abstractmethod
    def stream(self, plan: Plan, pieces: list[str], info: RequestInfo, ids: Ids) -> list[Frame]: ...

    @abstractmethod
    def malformed_body(self, ids: Ids) -> bytes:
        """A 200 body cut off mid-object: a valid start, not valid JSON."""

    @abstractmethod
    def error(
        self, kind: str, *, model: str, ids: Ids, retry_after: float, message: str | None
    ) -> ErrorReply:
        """kind: auth | missing_key | 429 | insufficient_quota | 500 | bad_request.
        `message` replaces the provider's usual wording."""
