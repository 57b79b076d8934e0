"""Shared test set-up. The tests mirror the package (``tests/radius/``,
``tests/evaluation/``, ...); ``tests/`` itself is put on ``sys.path`` so that every test
module can ``from helpers import ...``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread per test: the models are tiny, and the suite runs two pytest
    workers on two cores, where torch's own thread pools would oversubscribe them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
