"""Fixtures shared by the CLI and TLS tests."""

from __future__ import annotations

import pytest


@pytest.fixture()
def fake_serve(monkeypatch):
    """`latentwatch serve` runs up to where the server would start; the list gets the settings it would use."""
    import monitor.server

    got = []

    async def serve(settings, **kwargs):
        got.append(settings)

    monkeypatch.setattr(monitor.server, "serve", serve)
    return got
