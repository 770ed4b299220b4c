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
           "CAST_VERIFY_MAX_CONTEXT": "128", "CAST_VERIFY_MAX_BATCH": "8", "CAST_VERIFY_SESSION_TTL_S": "20"}
    config = VerifyConfig.from_args(["--port", "7000", "--max-batch", "4"], environ=env)
    assert config.model == tiny_pair[0] and config.port == 7000 and config.dtype == "float64"
    assert config.max_context == 128 and config.max_batch == 4 and config.session_ttl_s == 20
    assert config.expire_interval_s == 5  # a quarter of the TTL...
    assert config.host == "0.0.0.0" and config.device == "auto" and config.max_tree_tokens == 128
    defaults = VerifyConfig.from_args(["--model", str(tiny_pair[0])], environ={})
    assert defaults.port == 50053 and defaults.max_batch == 32
    assert defaults.expire_interval_s == 10  # ...and at most 10 s


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--model"),
        (["--model", "/nonexistent"], "no config.json"),
        (["--dtype", "float8"], "dtype"),
        (["--port", "70000"], "port"),
        (["--max-batch", "0"], "max_batch"),
        (["--session-ttl-s", "0"], "session_ttl_s"),
        (["--device", "tpu"], "device"),
        (["--max-tree-tokens", "0"], "max_tree_tokens"),
        (["--max-context", "0"], "max_context"),
        (["--grace-s", "-1"], "grace_s"),
    ],
)
def test_bad_settings_exit_with_a_message(tiny_pair, argv, message, capsys):
    if argv and argv[0] != "--model":
        argv = ["--model", str(tiny_pair[0]), *argv]
    with pytest.raises(SystemExit):
        VerifyConfig.from_args(argv, environ={})
    assert message in capsys.readouterr().err


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
