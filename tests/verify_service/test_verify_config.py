"""VerifyConfig from flags and CAST_VERIFY_* variables, and `python -m verify_service.server` end to end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from verify_service.config import VerifyConfig


def test_flags_win_over_environment_which_wins_over_defaults(tiny_pair):
    env = {"CAST_VERIFY_MODEL": str(tiny_pair[0]), "CAST_VERIFY_PORT": "6000", "CAST_VERIFY_DTYPE": "float64",
           "CAST_VERIFY_MAX_CONTEXT": "128", "CAST_VERIFY_WARMUP": "false", "CAST_VERIFY_FORWARD": "transformers"}
    config = VerifyConfig.from_args(["--port", "7000"], environ=env)
    assert config.model == tiny_pair[0] and config.port == 7000 and config.dtype == "float64"
    assert config.max_context == 128 and config.warmup is False and config.forward == "transformers"
    assert config.host == "0.0.0.0" and config.max_sessions is None and config.device == "auto"
    assert config.cuda_graphs == "auto" and config.max_batch == 32 and config.max_tree_tokens == 128
    # The session cap follows the layout: every live sequence owns one of max_batch slots in the static one.
    assert (config.session_cap(static=False), config.session_cap(static=True)) == (256, 32)
    assert config.static_layout("cuda") and not config.static_layout("cpu")
    assert VerifyConfig.from_args(["--model", str(tiny_pair[0])], environ={}).port == 50053


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--model"),
        (["--model", "/nonexistent"], "no config.json"),
        (["--dtype", "float8"], "dtype"),
        (["--port", "70000"], "port"),
        (["--max-sessions", "0"], "max_sessions"),
        (["--session-ttl-s", "0"], "session_ttl_s"),
        (["--device", "tpu"], "device"),
        (["--attn-implementation", "flash_attention_2"], "attn_implementation"),
        (["--cuda-graphs", "maybe"], "cuda_graphs"),
        (["--forward", "fast"], "forward: 'fast'"),
        (["--max-tree-tokens", "0"], "max_tree_tokens"),
        (["--model-thread", "main"], "model_thread"),
        (["--cuda-graphs", "on", "--max-batch", "4", "--max-sessions", "8"], "exceeds max_batch 4"),
        (["--device", "cuda", "--max-batch", "4", "--max-sessions", "8"], "exceeds max_batch 4"),
    ],
)
def test_bad_settings_exit_with_a_message(tiny_pair, argv, message):
    if argv and argv[0] != "--model":
        argv = ["--model", str(tiny_pair[0]), *argv]
    with pytest.raises(SystemExit, match=re.escape(message)):
        VerifyConfig.from_args(argv, environ={})


def test_module_entry_point_serves_until_sigterm(tiny_pair):
    command = [sys.executable, "-m", "verify_service.server", "--model", str(tiny_pair[0]), "--host", "127.0.0.1",
               "--port", "0", "--dtype", "float32", "--grace-s", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        port, deadline, lines = None, time.monotonic() + 90, []
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"verify service on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        assert port, "".join(lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
