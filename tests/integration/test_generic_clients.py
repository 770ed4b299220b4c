"""The README's generic client: `buf curl` (PyPI's buf-bin) calls the orchestrator through server reflection alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cast.v1 import generation_pb2

BUF = Path(sys.executable).parent / "buf"


def buf_curl(address: str, method: str, body: dict | None = None) -> str:
    assert BUF.exists(), f"{BUF} is missing: install the dev extras (buf-bin)"
    args = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    if body is not None:
        args += ["-d", json.dumps(body)]
    done = subprocess.run([*args, f"http://{address}/{method}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_buf_curl_generates_through_reflection(tiny_stack, generation_stub):
    address = tiny_stack.spec.address
    body = {"prompt": "def f(x):", "max_new_tokens": 16}
    reply = json.loads(buf_curl(address, "cast.v1.GenerationService/Generate", body))
    expected = generation_stub.Generate(generation_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=16))
    assert [int(t) for t in reply["tokenIds"]] == list(expected.token_ids)
    assert reply["text"] == expected.text and reply["usage"]["completionTokens"] == 16
    assert json.loads(buf_curl(address, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
