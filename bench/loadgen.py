"""A small asyncio HTTP/1.1 load client (stdlib only) for the status API figure.

gunicorn's sync workers close the connection after every response, so each request is one
connection: connect, send, read to EOF. Latency is measured from connect to the last byte.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def _request(host: str, port: int, path: str, token: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    if token:
        lines.append(f"Authorization: Token {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _one(host: str, port: int, request: bytes, result: LoadResult) -> None:
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        data = await reader.read(-1)
        writer.close()
    except OSError:
        result.errors += 1
        return
    elapsed = time.perf_counter() - start
    try:
        status = int(data[9:12])
    except ValueError:
        status = 0
    result.statuses[status] = result.statuses.get(status, 0) + 1
    if status == 200:
        result.latencies.append(elapsed)
    else:
        result.errors += 1


async def _closed_loop(
    host: str, port: int, request: bytes, concurrency: int, seconds: float
) -> LoadResult:
    result = LoadResult(seconds=seconds)
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            await _one(host, port, request, result)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


async def _pollers(
    host: str, port: int, request: bytes, pollers: int, interval: float, seconds: float
) -> LoadResult:
    result = LoadResult(seconds=seconds)
    deadline = time.perf_counter() + seconds

    async def poller() -> None:
        # Spread the first polls over one interval, as dashboards opened at random moments.
        await asyncio.sleep(random.uniform(0, interval))
        next_at = time.perf_counter()
        while next_at < deadline:
            await _one(host, port, request, result)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    start = time.perf_counter()
    await asyncio.gather(*(poller() for _ in range(pollers)))
    result.seconds = time.perf_counter() - start
    return result


def closed_loop(
    *, port: int, path: str, token: str | None, concurrency: int, seconds: float
) -> LoadResult:
    """`concurrency` clients each sending the next request as soon as the last is answered:
    the server's saturation throughput."""
    request = _request("127.0.0.1", port, path, token)
    return asyncio.run(_closed_loop("127.0.0.1", port, request, concurrency, seconds))


def pollers(
    *, port: int, path: str, token: str | None, pollers: int, interval: float, seconds: float
) -> LoadResult:
    """`pollers` clients each asking every `interval` seconds: the dashboards' real load."""
    request = _request("127.0.0.1", port, path, token)
    return asyncio.run(_pollers("127.0.0.1", port, request, pollers, interval, seconds))
