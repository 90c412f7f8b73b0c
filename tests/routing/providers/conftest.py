"""The `canned` fixture: a CannedServer (canned.py) with a key in the environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .canned import CannedServer


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> Iterator[CannedServer]:
    monkeypatch.setenv("FIXTURE_API_KEY", "fixture-key-0123456789")
    monkeypatch.delenv("AUTOPACK_FIXTURE_BASE_URL", raising=False)
    server = CannedServer()
    yield server
    server.close()
