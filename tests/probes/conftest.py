"""Fixtures shared by the SAE training and SAE-feature tests (tiny random llama)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_runner


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on two shared cores run far faster on one thread than on two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama(one_torch_thread):
    return tiny_runner("llama")
