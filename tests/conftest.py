"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: shared CI machines oversubscribe cores, and one thread keeps small runs
    fast and predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
