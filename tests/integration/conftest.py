"""Stacks of the three services, started once per test session and shared by the integration tests."""

from __future__ import annotations

import grpc
import pytest

from cast.v1 import generation_pb2_grpc
from orchestrator.stack import REFERENCE_PAIR
from tests.integration.stacks import start_stack


@pytest.fixture(scope="session")
def stack_factory(tiny_pair, onnx_cache_dir, tmp_path_factory):
    """stack_factory("tiny-draft" | "target-as-draft" | "target-only" | "reference") -> a running Stack (float64
    verifier, so that argmax never flips between a tree forward and the reference's one-token decode). Each draft
    service also serves the sparse and lookup levels; "target-only" has no draft model, only those."""
    running = {}

    def get(kind: str):
        if kind not in running:
            target, draft = tiny_pair
            if kind == "target-as-draft":
                draft = target
            elif kind == "target-only":
                draft = None
            elif kind == "reference":
                target, draft = REFERENCE_PAIR / "target", REFERENCE_PAIR / "draft"
            # The reference pair's tests measure its draft: no sparse level to build at its start.
            levels = {"draft_levels": ("lookup",)} if kind == "reference" else {}
            running[kind] = start_stack(target, draft, tmp_path_factory.mktemp(f"logs-{kind}"), **levels)
        return running[kind]

    yield get
    for stack in running.values():
        stack.stop()


@pytest.fixture(scope="session")
def tiny_stack(stack_factory):
    return stack_factory("tiny-draft")


@pytest.fixture(scope="session")
def generation_stub(tiny_stack):
    with grpc.insecure_channel(tiny_stack.spec.address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)
