"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module: tiny models run fastest that way, and on a busy
    2-core runner OpenMP's start-up and spinning make two threads 10-50x slower. Modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")` or by requesting it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
