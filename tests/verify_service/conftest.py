"""Fixtures for the verify service tests."""

from __future__ import annotations

import pytest

from verify_service.target import TargetModel


@pytest.fixture(scope="session")
def target64(tiny_pair) -> TargetModel:
    """float64 so that tree forwards and HF's generate() agree bit for bit in argmax."""
    return TargetModel.load(tiny_pair[0], dtype="float64", device="cpu")
