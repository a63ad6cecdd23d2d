"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def float64():
    """torch's default dtype float64 for the test (models drawn in float64), then restored."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
