"""Shared by the provider tests (the `canned` fixture is in conftest.py): a tiny HTTP server
answering with fixed bytes (a provider's real response shape, built in the test), and a strict
check of a fixture against the SDK's own type.

The canned server is "the outside world" for shapes the simulated provider does not produce
(a stream cut at an exact event, a connection reset mid-body): the SDK under test reaches it
over real HTTP exactly as it reaches a provider.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydantic

from routing.providers import Endpoint, make_endpoint


@dataclass
class Canned:
    """One HTTP answer. `chunks` are sent as HTTP/1.1 chunks, each flushed at once; with
    `complete=False` the connection is dropped before the body's last chunk (a reset mid-body)."""

    chunks: list[bytes]
    status: int = 200
    content_type: str = "application/json"
    complete: bool = True
    headers: dict[str, str] = field(default_factory=dict)


class CannedServer:
    def __init__(self) -> None:
        self.replies: list[Canned] = []
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with server._lock:
                    server.requests.append({"path": self.path, "body": json.loads(body or b"{}")})
                    reply = server.replies.pop(0)
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Transfer-Encoding", "chunked")
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                for chunk in reply.chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                if reply.complete:
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                else:
                    # No terminating chunk: the client reads a body cut short (a reset).
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, *replies: Canned) -> None:
        self.replies.extend(replies)

    def endpoint(self, protocol: str, path: str = "") -> Endpoint:
        return make_endpoint(
            name="fixture",
            protocol=protocol,
            api_key_env="FIXTURE_API_KEY",
            base_url=f"{self.url}{path}",
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def strict(sdk_type: type[pydantic.BaseModel], data: Any) -> Any:
    """`data` validated by the SDK's own type, refusing any field the type does not declare
    (the OpenAI and Anthropic types keep unknown fields as extras, so a misspelt usage field
    would otherwise pass unnoticed)."""
    obj = sdk_type.model_validate(data)
    _no_extras(obj, sdk_type.__name__)
    return obj


def _no_extras(obj: Any, where: str) -> None:
    if isinstance(obj, pydantic.BaseModel):
        extra = obj.model_extra or {}
        assert not extra, f"{where}: fields {sorted(extra)} are not in the SDK's type"
        for name in type(obj).model_fields:
            _no_extras(getattr(obj, name), f"{where}.{name}")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            _no_extras(item, f"{where}[{i}]")


def sse(data: Any, *, event: str | None = None, crlf: bool = False) -> bytes:
    end = "\r\n\r\n" if crlf else "\n\n"
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {body}{end}".encode()
