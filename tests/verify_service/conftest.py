"""Fixtures for the verify service tests."""

from __future__ import annotations

import pytest

from verify_service.target import TargetModel


@pytest.fixture(scope="session")
def target64(tiny_pair) -> TargetModel:
    """The service's target (our fused Llama forward), float64 so that tree forwards and HF's generate() agree bit
    for bit in argmax."""
    return TargetModel.load(tiny_pair[0], dtype="float64", device="cpu")


@pytest.fixture(scope="session")
def oracle64(tiny_pair) -> TargetModel:
    """The same checkpoint with transformers' own forward: the oracle the fused forward is checked against."""
    return TargetModel.load(tiny_pair[0], dtype="float64", device="cpu", fused=False)
