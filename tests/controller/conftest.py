"""Fixtures the controller tests share."""

from __future__ import annotations

import pytest
import torch
from helpers import load_digits


@pytest.fixture(scope="module")
def digits():
    """The digits split of ``helpers.load_digits(0)``: (X_train, y_train, X_test, y_test)."""
    return load_digits(0)


@pytest.fixture
def flush_denormals():
    """Diverging plain-Adam runs produce denormals that make CPU math ~60x slower."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
