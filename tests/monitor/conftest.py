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


@pytest.fixture()
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: user errors are caught before it loads."""
    from monitor.runner import ModelRunner

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ModelRunner, "load", load)
