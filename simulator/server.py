"""The HTTP side of the simulated provider (stdlib only, so it starts anywhere in a second).

A model call is dispatched by its URL prefix through ROUTES to the protocol's wire module
(simulator/wire/), which parses the request and shapes every body, stream and error; this
module only runs the faults, scripts, delays and the request log around it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .content import Plan, RequestInfo, edit_fault, plan_reply, reply_text, rng_for, split_text
from .env import simulated_provider_env
from .state import Config, RuleError, SimState, parse_fault, parse_script, rates_problem
from .usage_api import (
    USAGE_API_ROLE,
    UsageApiError,
    UsageCounters,
    check_key,
    counts_from_usage,
    fault_error,
    parse_other_usage,
    usage_report,
    usage_route,
)
from .wire import Frame, Ids, Part, RequestError, Route, Wire
from .wire.anthropic import ANTHROPIC
from .wire.gemini import GEMINI
from .wire.openai import GLM, OPENAI

# URL prefix → wire protocol (simulated_provider_env gives each provider its prefix). A path
# under any other prefix goes to the first protocol whose paths it matches: another
# OpenAI-compatible server is just another prefix.
ROUTES: tuple[tuple[str, Wire], ...] = (
    ("/openai/", OPENAI),
    ("/glm/", GLM),
    ("/anthropic/", ANTHROPIC),
    ("/gemini/", GEMINI),
)
PROVIDERS = tuple(wire.provider for _prefix, wire in ROUTES)
ERROR_FAULTS = ("429", "500", "insufficient_quota", "auth", "bad_request")
MAX_BODY = 32 * 1024 * 1024


def dispatch(path: str) -> tuple[Wire, Route] | None:
    """The wire protocol and route of a model call's path, or None (404)."""
    for prefix, wire in ROUTES:
        if path.startswith(prefix):
            route = wire.route(path)
            return (wire, route) if route else None
    for _prefix, wire in ROUTES:
        if route := wire.route(path):
            return wire, route
    return None


class SimServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung response must never keep the process alive on exit
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: SimState) -> None:
        super().__init__(address, SimHandler)
        self.state = state
        # What the usage APIs report (simulator/usage_api.py): every answered call's usage.
        self.usage = UsageCounters()


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
            raise RequestError("request body too large")
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
            # The model calls only: a usage API read (beat's, at a worker's start) is no call.
            self._send_json(200, [r for r in self.state.requests() if r["role"] != USAGE_API_ROLE])
        elif path == "/_sim/usage_requests":
            self._send_json(200, [r for r in self.state.requests() if r["role"] == USAGE_API_ROLE])
        elif path == "/_sim/config":
            self._send_json(200, self.state.snapshot().as_dict())
        elif path in ("/_sim/rules", "/_sim/faults", "/_sim/script"):
            self._send_json(200, self.state.pending())
        elif path == "/_sim/env":
            # What points a process's providers at this simulator (fake keys included).
            # The address the caller reached it at (Host), as that is what works for it.
            host, port = self.server.server_address[:2]
            address = self.headers.get("Host") or f"{host!s}:{port}"
            self._send_json(200, simulated_provider_env(f"http://{address}"))
        elif path in ("/_sim/health", "/"):
            self._send_json(200, {"ok": True, "service": "simulated provider"})
        elif provider := usage_route(path):
            self._usage_api(provider)
        else:
            self._send_json(404, {"error": {"message": f"no route for GET {path}"}})

    def _usage_api(self, provider: str) -> None:
        """A provider's usage API (usage_api.py): the admin key, a usage_api fault, the
        report. Logged with role "usage_api" and no model, apart: GET /_sim/usage_requests."""
        entry: dict[str, Any] = {
            "provider": provider,
            "path": urlsplit(self.path).path,
            "model": None,
            "role": USAGE_API_ROLE,
            "query": urlsplit(self.path).query,
            "status": None,
            "outcome": None,
        }
        try:
            check_key(provider, self.headers)
            fault = self.state.take_for_role(provider=provider, role=USAGE_API_ROLE)
            if fault is not None and fault.kind == "hang":
                entry["fault"] = "hang"
                self.state.sleep(fault.hang_seconds)
            elif fault is not None:
                raise fault_error(provider, fault.kind, fault.retry_after)
            body = usage_report(provider, self.server.usage, parse_qs(urlsplit(self.path).query))
        except UsageApiError as exc:
            entry.update(status=exc.status, outcome="error")
            self.state.record(entry)
            self._send_json(exc.status, exc.body)
            return
        entry.update(status=200, outcome="ok")
        self.state.record(entry)
        self._send_json(200, body)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/_sim/"):
            self._control(path)
        elif found := dispatch(path):
            self._model_call(*found, path)
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
                self._send_json(200, self.state.configure(data, providers=PROVIDERS).as_dict())
            elif path == "/_sim/exhaust":
                provider = data.get("provider")
                if provider not in PROVIDERS:
                    raise RuleError(f"provider: one of {', '.join(PROVIDERS)}, got {provider!r}")
                seconds = data.get("seconds", 60)
                if (
                    isinstance(seconds, bool)
                    or not isinstance(seconds, int | float)
                    or seconds <= 0
                ):
                    raise RuleError(f"seconds: expected a number > 0, got {seconds!r}")
                view = self.state.exhaust(provider, float(seconds))
                self._send_json(200, {"exhausted": provider, "limits": view.as_dict()})
            elif path == "/_sim/faults":
                rule = parse_fault(data, providers=PROVIDERS)
                self.state.add(rule)
                self._send_json(200, {"queued": rule.as_dict()})
            elif path == "/_sim/script":
                rule = parse_script(data, providers=PROVIDERS)
                self.state.add(rule)
                self._send_json(200, {"queued": rule.as_dict()})
            elif path == "/_sim/other_usage":
                provider, model, counts, at = parse_other_usage(data)
                self.server.usage.add(provider, model, counts, at=at)
                self._send_json(200, {"added": {"provider": provider, "model": model, "at": at}})
            elif path == "/_sim/release":
                self.state.release()
                self._send_json(200, {"released": True})
            elif path == "/_sim/reset":
                self.state.reset()
                self.server.usage.reset()
                self._send_json(200, {"reset": True, "config": self.state.snapshot().as_dict()})
            else:
                self._send_json(404, {"error": {"message": f"no control route {path}"}})
        except (RuleError, json.JSONDecodeError, RequestError) as exc:
            self._send_json(400, {"error": {"message": str(exc)}})

    # --- model calls ----------------------------------------------------------------------

    def _model_call(self, wire: Wire, route: Route, path: str) -> None:
        config = self.state.snapshot()
        ids = wire.new_ids()
        started = time.monotonic()
        info: RequestInfo | None = None
        raw, problem = b"", ""
        try:
            raw = self._read_body()
            info = wire.parse(json.loads(raw or b"null"), route)
        except (RequestError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raw = b""
            problem = str(exc)
        provider = wire.provider
        entry: dict[str, Any] = {
            "provider": provider,
            "path": path,  # never the query: Gemini may carry the key in ?key=
            "model": info.model if info else route.model or None,
            "reported_model": None,  # the model the reply names (a dated snapshot)
            "role": info.role if info else None,
            "attempt": info.attempt if info else None,
            "stream": info.stream if info else route.stream,
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
            # The last usage a cut stream carried before the cut (what the client could see).
            "partial_usage": None,
            # The rate-limit counters this response announced (state.LimitView), if any.
            "limits": None,
        }
        query = parse_qs(urlsplit(self.path).query)
        key = wire.api_key(self.headers, query)
        model_name = entry["model"] or "unknown"
        if not key or key.startswith("invalid"):
            self._error(entry, wire, "missing_key" if not key else "auth", model_name, ids)
            return
        if info is None:
            entry["detail"] = problem
            self._error(entry, wire, "bad_request", model_name, ids)
            return
        role = info.role
        spent = self.state.limit_check(provider)
        if spent is not None:
            # Told to exhaust, or the window's counters are used up: 429 until the reset.
            now = time.time()
            entry["limits"] = spent.as_dict()
            self._error(
                entry,
                wire,
                "429",
                model_name,
                ids,
                retry_after=max(1.0, float(int(spent.reset_at - now + 0.999))),
                extra_headers=wire.limit_headers(spent, now),
                outcome="exhausted",
            )
            return
        haystacks = (info.full_text, raw.decode("utf-8", "replace"))
        fault = self.state.take("fault", provider=provider, role=role, haystacks=haystacks)
        if fault and fault.kind in ERROR_FAULTS:
            entry["fault"] = fault.kind
            self._error(
                entry,
                wire,
                fault.kind,
                model_name,
                ids,
                retry_after=fault.retry_after,
                message=fault.message,
            )
            return
        script = self.state.take("script", provider=provider, role=role, haystacks=haystacks)
        text = None
        if script is not None:
            if script.text is not None or script.verdict is not None:
                text = script.text if script.text is not None else json.dumps(script.verdict)
            if script.cache_ttl is not None:
                info = replace(info, cache_ttls=(script.cache_ttl,))
            entry["scripted"] = True
        if text is None:
            faults = config.faults()
            text = reply_text(info, seed=config.seed, revise_rate=config.revise_rate, faults=faults)
            entry["edit_fault"] = edit_fault(info, seed=config.seed, faults=faults)
        plan = plan_reply(
            info,
            seed=config.seed,
            text=text,
            reasons=wire.reasons(info),
            cache_writes=wire.cache_writes,
        )
        plan = wire.plan(info, plan)
        kind = fault.kind if fault else None
        counters = self.state.limit_consume(
            provider, tokens=plan.prompt_tokens + plan.completion_tokens
        )
        entry["limits"] = counters.as_dict()
        limit_headers = wire.limit_headers(counters, time.time())
        entry.update(
            fault=kind,
            outcome=kind or "ok",
            status=200,
            reported_model=wire.reported_model(info.model),
            usage=None if kind in ("malformed", "cut_stream") else wire.usage(plan),
        )
        # The usage APIs count every call answered 200, a cut or broken one too: the
        # provider did the work whether or not the client read its usage.
        if served := counts_from_usage(provider, wire.usage(plan)):
            self.server.usage.add(provider, entry["reported_model"], served)
        frames = wire.stream(plan, self._pieces(plan, config), info, ids) if info.stream else []
        cut = _cut_point(frames, fault.after if fault else None)
        if kind == "cut_stream" and info.stream:
            entry["partial_usage"] = next(
                (f.usage for f in reversed(frames[:cut]) if f.usage is not None), None
            )
        self.state.record(entry)
        if fault is not None and fault.kind == "hang":
            self.state.sleep(fault.hang_seconds)
        if info.stream:
            self._stream(wire, frames, ids, config, kind, cut, started, limit_headers)
        else:
            self.state.sleep(config.delay)
            self._reply(wire, info, plan, ids, kind, started, limit_headers)

    @staticmethod
    def _pieces(plan: Plan, config: Config) -> list[str]:
        return split_text(plan.text, rng_for(config.seed, "split", plan.text))

    def _error(
        self,
        entry: dict[str, Any],
        wire: Wire,
        kind: str,
        model: str,
        ids: Ids,
        *,
        retry_after: float = 1.0,
        message: str | None = None,
        extra_headers: dict[str, str] | None = None,
        outcome: str | None = None,
    ) -> None:
        reply = wire.error(kind, model=model, ids=ids, retry_after=retry_after, message=message)
        outcome = outcome or ("unauthorized" if kind in ("auth", "missing_key") else kind)
        entry.update(status=reply.status, outcome=outcome)
        self.state.record(entry)
        self._send_json(reply.status, reply.body, {**reply.headers, **(extra_headers or {})})

    def _reply(
        self,
        wire: Wire,
        info: RequestInfo,
        plan: Plan,
        ids: Ids,
        fault: str | None,
        started: float,
        limit_headers: dict[str, str],
    ) -> None:
        headers = wire.headers(ids, int((time.monotonic() - started) * 1000)) | limit_headers
        if fault == "malformed":
            self._send_bytes(200, wire.malformed_body(ids), headers)
            return
        data = json.dumps(wire.body(plan, info, ids)).encode()
        if fault == "cut_stream":
            self._send_bytes(200, data[: len(data) // 2], headers, length=len(data))
            self._abort()
            return
        self._send_bytes(200, data, headers)

    def _stream(
        self,
        wire: Wire,
        frames: list[Frame],
        ids: Ids,
        config: Config,
        fault: str | None,
        cut: int,
        started: float,
        limit_headers: dict[str, str],
    ) -> None:
        data = [frame.data for frame in frames]
        if fault == "malformed":
            data = [*data[:1], wire.malformed_frame, *data[-1:]]
        # Time to first token is part of the delay; the rest is spread over the stream.
        self.state.sleep(config.delay * 0.3)
        latency = int((time.monotonic() - started) * 1000)
        self._start_stream(wire.headers(ids, latency) | limit_headers)
        per_frame = config.delay * 0.7 / max(1, len(data))
        if fault == "cut_stream":
            data = data[:cut]
        for chunk in data:
            self._write_chunk(chunk)
            self.state.sleep(per_frame)
        if fault == "cut_stream":
            self._abort()
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _cut_point(frames: list[Frame], after: int | None) -> int:
    """How many frames a cut stream sends: every head frame, then `after` content frames
    (None: half of them, at least one), never a tail frame."""
    content = [i for i, f in enumerate(frames) if f.part is Part.CONTENT]
    heads = [i for i, f in enumerate(frames) if f.part is Part.HEAD]
    sent = max(1, len(content) // 2) if after is None else after
    sent = min(sent, len(content))
    if sent:
        return content[sent - 1] + 1
    return heads[-1] + 1 if heads else 0


def build_server(host: str, port: int, config: Config) -> SimServer:
    return SimServer((host, port), SimState(startup=config))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
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
