"""DraftConfig from flags and CAST_DRAFT_* variables; `python -m draft_service.server` serves until SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_service.config import DraftConfig

REPO = Path(__file__).resolve().parents[2]


def test_flags_override_env_and_env_overrides_defaults(draft_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CAST_DRAFT_PORT", "6000")
    monkeypatch.setenv("CAST_DRAFT_SESSION_TTL_S", "2.5")
    monkeypatch.setenv("CAST_DRAFT_MODEL", str(draft_model_dir))
    config = DraftConfig.from_args(["--port", "7000", "--top-k", "4", "--cache-dir", str(tmp_path)])
    assert (config.model, config.port, config.top_k, config.session_ttl_s) == (draft_model_dir, 7000, 4, 2.5)
    assert (config.provider, config.dtype, config.max_sessions, config.max_context) == ("auto", "auto", 1024, 0)
    assert config.cache_dir == tmp_path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--port", "70000"], "port"),
        (["--provider", "tpu"], "provider"),
        (["--dtype", "int4"], "dtype"),
        (["--top-k", "0"], "top_k"),
        (["--max-sessions", "0"], "max_sessions"),
        (["--session-ttl-s", "0"], "session_ttl_s"),
    ],
)
def test_bad_values_exit_with_a_message_naming_the_setting(draft_model_dir, argv, message, capsys):
    with pytest.raises(SystemExit):
        DraftConfig.from_args(["--model", str(draft_model_dir), *argv])
    assert message in capsys.readouterr().err


def test_model_is_required_and_must_be_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("CAST_DRAFT_MODEL", raising=False)
    with pytest.raises(SystemExit):
        DraftConfig.from_args([])
    with pytest.raises(ValueError, match="model"):
        DraftConfig(model=tmp_path)
    with pytest.raises(SystemExit):
        DraftConfig.from_args(["--model", str(tmp_path), "--port", "abc"])


def test_draft_levels_come_from_repeated_flags_or_the_variable(draft_model_dir, capsys):
    """--model is optional once a model level is given; --draft-level repeats, CAST_DRAFT_DRAFT_LEVEL splits on ';'."""
    config = DraftConfig.from_args(["--draft-level", f"sparse={draft_model_dir},layers=1", "--draft-level", "lookup"],
                                   environ={})
    assert config.model is None
    assert [(spec.name, spec.path, spec.layers) for spec in config.levels] == [("sparse", draft_model_dir, 1),
                                                                              ("lookup", None, 0)]
    config = DraftConfig.from_args(["--model", str(draft_model_dir)], environ={"CAST_DRAFT_DRAFT_LEVEL": "lookup"})
    assert [spec.name for spec in config.levels] == ["small", "lookup"]
    for argv in (["--draft-level", "lookup"], ["--model", str(draft_model_dir), "--draft-level", "medium=x"]):
        with pytest.raises(SystemExit) as info:
            DraftConfig.from_args(argv, environ={})
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "a draft model (--model) or a model level" in err and "draft_level: 'medium' is not one of" in err


def test_the_replica_reports_the_runner_it_serves_with(draft_model_dir, onnx_cache_dir):
    """On the CPU provider: growing buffers, no graphs; the buffers hold the configured context and a tree."""
    import numpy as np

    from draft_service.expansion import Budget, SequenceInput
    from draft_service.runner import TREE_ROOM
    from draft_service.server import build_expander

    expander, replica = build_expander(DraftConfig(model=draft_model_dir, provider="cpu", top_k=8, dtype="float32",
                                                   max_context=300, profile=False))
    assert replica.backend == "onnxruntime:CPUExecutionProvider+growing" and replica.max_context == 300
    assert expander.models["small"].runner.capacity == 300 + TREE_ROOM
    [e], _ = expander.expand([SequenceInput("a", np.array([5, 17, 99]), 0)], Budget(top_k=2, max_depth=2,
                                                                                   max_breadth=2))
    assert len(e.tree) == 1 + 2 + 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_module_entry_point_serves_until_sigterm(draft_model_dir, onnx_cache_dir, exported):
    port = free_port()
    env = {**os.environ, "CAST_CACHE_DIR": str(onnx_cache_dir)}
    cmd = [sys.executable, "-m", "draft_service.server", "--model", str(draft_model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--provider", "cpu", "--grace-s", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service="cast.v1.DraftService"), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the service did not become SERVING"
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cached_start_imports_no_torch(draft_model_dir, onnx_cache_dir, exported):
    """With the export cached, the service process never imports torch (nor transformers)."""
    code = (
        "import asyncio, sys\n"
        "from draft_service.config import DraftConfig\n"
        "from draft_service.server import start_server\n"
        "async def go():\n"
        f"    server, port = await start_server(DraftConfig(model={str(draft_model_dir)!r}, port=0, host='127.0.0.1',"
        f" provider='cpu', cache_dir={str(onnx_cache_dir)!r}))\n"
        "    await server.stop(None)\n"
        "asyncio.run(go())\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
