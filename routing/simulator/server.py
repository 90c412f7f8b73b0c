"""The HTTP side of the simulated provider (stdlib only, so it starts anywhere in a second)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from . import wire
from .content import Plan, RequestInfo, edit_fault, plan_reply, reply_text, rng_for, split_text
from .state import Config, RuleError, SimState, parse_fault, parse_script, rates_problem

_GEMINI_PATH = re.compile(r"/models/([^/]+):(generateContent|streamGenerateContent)$")
MAX_BODY = 32 * 1024 * 1024


class SimError(Exception):
    """A request the simulator answers with a provider error instead of a reply."""


def _text_of(content: Any) -> str:
    """Text of an OpenAI/Anthropic message content: a string or a list of typed blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
    return ""


def _gemini_text(content: Any) -> str:
    if not isinstance(content, dict):
        return ""
    return "\n".join(
        str(p.get("text", "")) for p in content.get("parts") or [] if isinstance(p, dict)
    )


def parse_request(provider: str, body: Any, *, model: str, stream: bool) -> RequestInfo:
    if not isinstance(body, dict):
        raise SimError("the request body is not a JSON object")
    if provider == "google_gemini":
        contents = body.get("contents") or []
        if not isinstance(contents, list) or not contents:
            raise SimError("contents is required")
        system = _gemini_text(body.get("systemInstruction") or body.get("system_instruction"))
        config = body.get("generationConfig") or {}
        max_tokens = config.get("maxOutputTokens") or 8192
        prompt = "\n".join(_gemini_text(c) for c in contents)
        return RequestInfo(provider, model, system, prompt, int(max_tokens), stream)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SimError("messages is required")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise SimError("model is required")
    stream = body.get("stream") is True
    if provider == "anthropic":
        if not isinstance(body.get("max_tokens"), int):
            raise SimError("max_tokens is required")
        system = _text_of(body.get("system"))
        prompt = "\n".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
        thinking = (body.get("thinking") or {}).get("type") in ("enabled", "adaptive")
        return RequestInfo(
            provider, model, system, prompt, body["max_tokens"], stream, thinking=thinking
        )
    system_parts, prompt_parts = [], []
    for m in messages:
        if isinstance(m, dict):
            target = system_parts if m.get("role") in ("system", "developer") else prompt_parts
            target.append(_text_of(m.get("content")))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 4096
    options = body.get("stream_options") or {}
    return RequestInfo(
        provider,
        model,
        "\n".join(system_parts),
        "\n".join(prompt_parts),
        int(max_tokens),
        stream,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )


class SimServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung response must never keep the process alive on exit
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: SimState) -> None:
        super().__init__(address, SimHandler)
        self.state = state


class SimHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as the real APIs
    # Headers and body go out in separate writes; with Nagle's algorithm the body waits for
    # the client's delayed ACK of the headers, 40 ms on a kept-alive connection.
    disable_nagle_algorithm = True
    server_version = "simulated-provider/1.0"
    server: SimServer

    def log_message(self, format: str, *args: Any) -> None:
        # The request log is served at /_sim/requests; stdout/stderr stay quiet because the
        # parent process (devstack, the test fixture) may not drain them.
        pass

    # --- plumbing -------------------------------------------------------------------------

    @property
    def state(self) -> SimState:
        return self.server.state

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise SimError("request body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self._send_bytes(status, data, headers)

    def _send_bytes(
        self,
        status: int,
        data: bytes,
        headers: dict[str, str] | None = None,
        *,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data) if length is None else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, headers: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _abort(self) -> None:
        """Drop the connection mid-body: the client sees an incomplete read."""
        self.wfile.flush()
        self.close_connection = True

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # The client gave up (its timeout, a test's hang fault): nothing left to answer.
            self.close_connection = True

    # --- routing --------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/_sim/requests":
            self._send_json(200, self.state.requests())
        elif path == "/_sim/config":
            self._send_json(200, self.state.snapshot().as_dict())
        elif path in ("/_sim/rules", "/_sim/faults", "/_sim/script"):
            self._send_json(200, self.state.pending())
        elif path in ("/_sim/health", "/"):
            self._send_json(200, {"ok": True, "service": "simulated provider"})
        else:
            self._send_json(404, {"error": {"message": f"no route for GET {path}"}})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/_sim/"):
            self._control(path)
        elif path.endswith("/chat/completions"):
            self._model_call("glm" if path.startswith("/glm/") else "openai", path)
        elif path.endswith("/v1/messages"):
            self._model_call("anthropic", path)
        elif match := _GEMINI_PATH.search(path):
            self._model_call(
                "google_gemini",
                path,
                model=unquote(match.group(1)),
                stream=match.group(2) == "streamGenerateContent",
            )
        else:
            self._read_body()
            self._send_json(404, {"error": {"message": f"no route for POST {path}"}})

    def _control(self, path: str) -> None:
        try:
            raw = self._read_body()
            data = json.loads(raw) if raw.strip() else {}
            if not isinstance(data, dict):
                raise RuleError("expected a JSON object")
            if path == "/_sim/config":
                self._send_json(200, self.state.configure(data).as_dict())
            elif path == "/_sim/faults":
                rule = parse_fault(data)
                self.state.add(rule)
                self._send_json(200, {"queued": rule.as_dict()})
            elif path == "/_sim/script":
                rule = parse_script(data)
                self.state.add(rule)
                self._send_json(200, {"queued": rule.as_dict()})
            elif path == "/_sim/reset":
                self.state.reset()
                self._send_json(200, {"reset": True, "config": self.state.snapshot().as_dict()})
            else:
                self._send_json(404, {"error": {"message": f"no control route {path}"}})
        except (RuleError, json.JSONDecodeError, SimError) as exc:
            self._send_json(400, {"error": {"message": str(exc)}})

    # --- model calls ----------------------------------------------------------------------

    def _api_key(self, provider: str) -> str | None:
        auth = self.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if provider == "anthropic":
            return self.headers.get("x-api-key") or bearer
        if provider == "google_gemini":
            query = parse_qs(urlsplit(self.path).query)
            return self.headers.get("x-goog-api-key") or (query.get("key") or [None])[0]
        return bearer

    def _model_call(
        self, provider: str, path: str, *, model: str = "", stream: bool = False
    ) -> None:
        config = self.state.snapshot()
        ids = wire.new_ids(provider)
        started = time.monotonic()
        try:
            raw = self._read_body()
            info = parse_request(provider, json.loads(raw or b"null"), model=model, stream=stream)
        except (SimError, json.JSONDecodeError, ValueError, TypeError) as exc:
            info, raw = None, b""
            problem = str(exc)
        entry: dict[str, Any] = {
            "provider": provider,
            "path": path,  # never the query: Gemini may carry the key in ?key=
            "model": info.model if info else model or None,
            "role": info.role if info else None,
            "attempt": info.attempt if info else None,
            "stream": info.stream if info else stream,
            "max_tokens": info.max_tokens if info else None,
            "system": info.system[:500] if info else "",
            "prompt": info.prompt[:2000] if info else "",
            "request_id": ids.request_id,
            "status": None,
            "outcome": None,
            "fault": None,
            "edit_fault": None,  # the builder's injected edit fault (project.py), if any
            "scripted": False,
            "usage": None,
        }
        key = self._api_key(provider)
        model_name = entry["model"] or "unknown"
        if not key or key.startswith("invalid"):
            self._error(entry, provider, "missing_key" if not key else "auth", model_name, ids)
            return
        if info is None:
            entry["detail"] = problem
            self._error(entry, provider, "bad_request", model_name, ids)
            return
        role = info.role
        haystacks = (info.full_text, raw.decode("utf-8", "replace"))
        fault = self.state.take("fault", provider=provider, role=role, haystacks=haystacks)
        if fault and fault.kind in ("429", "500", "insufficient_quota", "auth", "bad_request"):
            entry["fault"] = fault.kind
            self._error(
                entry,
                provider,
                fault.kind,
                model_name,
                ids,
                retry_after=fault.retry_after,
                message=fault.message,
            )
            return
        script = self.state.take("script", provider=provider, role=role, haystacks=haystacks)
        if script is not None:
            text = script.text if script.text is not None else json.dumps(script.verdict)
            entry["scripted"] = True
        else:
            faults = config.faults()
            text = reply_text(info, seed=config.seed, revise_rate=config.revise_rate, faults=faults)
            entry["edit_fault"] = edit_fault(info, seed=config.seed, faults=faults)
        plan = plan_reply(info, seed=config.seed, text=text)
        kind = fault.kind if fault else None
        entry.update(
            fault=kind,
            outcome=kind or "ok",
            status=200,
            usage=None if kind in ("malformed", "cut_stream") else self._usage_of(provider, plan),
        )
        self.state.record(entry)
        if fault is not None and fault.kind == "hang":
            self.state.sleep(fault.hang_seconds)
        if info.stream:
            self._stream(provider, info, plan, ids, config, kind, started)
        else:
            self.state.sleep(config.delay)
            self._reply(provider, info, plan, ids, kind, started)

    @staticmethod
    def _usage_of(provider: str, plan: Plan) -> dict[str, Any]:
        """The usage block exactly as this provider reports it (for tests to compare)."""
        if provider == "anthropic":
            return wire.anthropic_usage(plan)
        if provider == "google_gemini":
            return wire.gemini_usage(plan)
        return wire.openai_usage(plan, glm=provider == "glm")

    def _error(
        self,
        entry: dict[str, Any],
        provider: str,
        kind: str,
        model: str,
        ids: wire.Ids,
        *,
        retry_after: float = 1.0,
        message: str | None = None,
    ) -> None:
        reply = wire.error_reply(
            provider, kind, model=model, ids=ids, retry_after=retry_after, message=message
        )
        outcome = "unauthorized" if kind in ("auth", "missing_key") else kind
        entry.update(status=reply.status, outcome=outcome)
        self.state.record(entry)
        self._send_json(reply.status, reply.body, reply.headers)

    def _reply(
        self,
        provider: str,
        info: RequestInfo,
        plan: Plan,
        ids: wire.Ids,
        fault: str | None,
        started: float,
    ) -> None:
        headers = wire.success_headers(provider, ids, int((time.monotonic() - started) * 1000))
        if fault == "malformed":
            self._send_bytes(200, wire.malformed_body(provider, ids), headers)
            return
        if provider == "anthropic":
            body = wire.anthropic_message(plan, model=info.model, ids=ids)
        elif provider == "google_gemini":
            body = wire.gemini_response(plan, model=info.model, ids=ids)
        else:
            body = wire.openai_completion(plan, model=info.model, ids=ids, glm=provider == "glm")
        data = json.dumps(body).encode()
        if fault == "cut_stream":
            self._send_bytes(200, data[: len(data) // 2], headers, length=len(data))
            self._abort()
            return
        self._send_bytes(200, data, headers)

    def _stream(
        self,
        provider: str,
        info: RequestInfo,
        plan: Plan,
        ids: wire.Ids,
        config: Config,
        fault: str | None,
        started: float,
    ) -> None:
        pieces = split_text(plan.text, rng_for(config.seed, "split", plan.text))
        frames: list[bytes]
        if provider == "anthropic":
            events = wire.anthropic_stream(plan, pieces, model=info.model, ids=ids)
            frames = [
                f"event: {event}\ndata: {json.dumps(data)}\n\n".encode() for event, data in events
            ]
            bad = b'event: content_block_delta\ndata: {"type": "content_block_delta", "ind\n\n'
        elif provider == "google_gemini":
            chunks = wire.gemini_stream(plan, pieces, model=info.model, ids=ids)
            frames = [f"data: {json.dumps(c)}\r\n\r\n".encode() for c in chunks]
            bad = b'data: {"candidates": [{"content": {"parts": [{"te\r\n\r\n'
        else:
            chunks = wire.openai_stream(
                plan,
                pieces,
                model=info.model,
                ids=ids,
                glm=provider == "glm",
                include_usage=info.include_usage,
            )
            frames = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks]
            frames.append(b"data: [DONE]\n\n")
            bad = b'data: {"id": "x", "choices": [{"delta": {"cont\n\n'
        if fault == "malformed":
            frames = [*frames[:1], bad, *frames[-1:]]
        # Time to first token is part of the delay; the rest is spread over the stream.
        self.state.sleep(config.delay * 0.3)
        latency = int((time.monotonic() - started) * 1000)
        self._start_stream(wire.success_headers(provider, ids, latency))
        per_frame = config.delay * 0.7 / max(1, len(frames))
        cut = len(frames) // 2 if fault == "cut_stream" else None
        for frame in frames[:cut]:
            self._write_chunk(frame)
            self.state.sleep(per_frame)
        if cut is not None:
            self._abort()
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def build_server(host: str, port: int, config: Config) -> SimServer:
    return SimServer((host, port), SimState(startup=config))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m routing.simulator",
        description="Simulated LLM provider (OpenAI, Anthropic, Gemini and GLM wire formats).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds per response")
    parser.add_argument("--revise-rate", type=float, default=0.2)
    parser.add_argument(
        "--edit-miss-rate",
        type=float,
        default=0.0,
        help="share of the builder's first tries whose SEARCH text does not match",
    )
    parser.add_argument(
        "--edit-malformed-rate",
        type=float,
        default=0.0,
        help="share of the builder's first tries with a malformed edit block",
    )
    parser.add_argument(
        "--check-fail-rate",
        type=float,
        default=0.0,
        help="share of the builder's first tries whose test asserts a wrong value",
    )
    args = parser.parse_args(argv)
    if args.delay < 0 or not 0 <= args.revise_rate <= 1:
        parser.error("--delay must be >= 0 and --revise-rate between 0 and 1")
    rates = {
        "edit_miss_rate": args.edit_miss_rate,
        "edit_malformed_rate": args.edit_malformed_rate,
        "check_fail_rate": args.check_fail_rate,
    }
    if problem := rates_problem(rates):
        parser.error(problem)
    server = build_server(
        args.host,
        args.port,
        Config(delay=args.delay, revise_rate=args.revise_rate, seed=args.seed, **rates),
    )
    port = server.server_address[1]
    # The one line on stdout: parents wait for it to learn the (possibly picked) port.
    print(f"simulated provider listening on http://{args.host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
