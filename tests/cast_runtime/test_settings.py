"""One settings mechanism for the three services: a dataclass field is a flag and a CAST_* environment variable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cast_runtime.settings import parse_settings, setting
from draft_service.config import DraftConfig
from orchestrator.config import OrchestratorConfig
from verify_service.config import VerifyConfig


@dataclass
class Example:
    model: Path = setting(help="a directory")
    port: int = setting(50000, "a port")
    ratio: float = setting(0.5, "a ratio")
    limit: int | None = setting(None, "a limit; empty: none")
    profile: bool = setting(True, "a switch")
    grace_s: float = setting(30.0, "a grace period", flag="--grace", env="GRACE")
    internal: int = 7  # not a setting

    def __post_init__(self) -> None:
        if self.port > 65535:
            raise ValueError(f"port: {self.port} is outside [0, 65535]")


def parse(argv, environ=None):
    return parse_settings(Example, argv, prog="example", description="", env_prefix="CAST_EX_", environ=environ or {})


def test_a_flag_wins_over_its_variable_which_wins_over_the_default():
    env = {"CAST_EX_MODEL": "/m", "CAST_EX_PORT": "1", "CAST_EX_RATIO": "0.25", "CAST_EX_GRACE": "3"}
    config = parse(["--port", "2"], env)
    assert (config.model, config.port, config.ratio, config.grace_s) == (Path("/m"), 2, 0.25, 3.0)
    assert (config.limit, config.profile, config.internal) == (None, True, 7)
    assert parse(["--model", "/m", "--grace", "1"]).grace_s == 1.0


def test_booleans_and_optional_values():
    assert parse(["--model", "m", "--no-profile"]).profile is False
    assert parse(["--model", "m", "--profile", "off"]).profile is False
    assert parse(["--model", "m"], {"CAST_EX_PROFILE": "yes"}).profile is True
    assert parse(["--model", "m", "--limit", "5"]).limit == 5
    assert parse(["--model", "m"], {"CAST_EX_LIMIT": ""}).limit is None


@pytest.mark.parametrize("argv, env, message", [
    ([], {}, "--model (or CAST_EX_MODEL) is required"),
    (["--model", "m", "--port", "abc"], {}, "--port: invalid literal"),
    (["--model", "m"], {"CAST_EX_RATIO": "half"}, "--ratio: could not convert"),
    (["--model", "m", "--profile", "maybe"], {}, "--profile: 'maybe' is not one of"),
    (["--model", "m", "--port", "70000"], {}, "port: 70000 is outside"),  # the dataclass's own check
])
def test_bad_input_exits_with_usage_and_a_message_naming_the_setting(argv, env, message, capsys):
    with pytest.raises(SystemExit) as info:
        parse(argv, env)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@dataclass
class Repeated:
    level: tuple[str, ...] = setting((), "a level")
    weight: tuple[int, ...] = setting((1,), "a weight")


def test_a_tuple_setting_is_a_repeatable_flag_or_a_semicolon_separated_variable(capsys):
    def parse(argv, environ):
        return parse_settings(Repeated, argv, prog="example", description="", env_prefix="CAST_EX_", environ=environ)

    assert parse(["--level", "a=1", "--level", "b"], {"CAST_EX_LEVEL": "c"}).level == ("a=1", "b")
    assert parse([], {"CAST_EX_LEVEL": "a=1;b;", "CAST_EX_WEIGHT": "2;3"}) == Repeated(("a=1", "b"), (2, 3))
    assert parse([], {}) == Repeated((), (1,))
    with pytest.raises(SystemExit) as info:
        parse(["--weight", "2", "--weight", "x"], {})
    assert info.value.code == 2 and "--weight: invalid literal" in capsys.readouterr().err


@pytest.mark.parametrize("config, prefix", [(DraftConfig, "CAST_DRAFT_"), (VerifyConfig, "CAST_VERIFY_"),
                                            (OrchestratorConfig, "CAST_ORCH_")])
def test_every_service_lists_each_setting_with_its_variable_in_help(config, prefix, capsys):
    with pytest.raises(SystemExit):
        config.from_args(["--help"], environ={})
    text = " ".join(capsys.readouterr().out.split())
    assert text.count(f"(env {prefix}") >= 10
    assert "--port" in text and "--host" in text


def test_the_orchestrators_flags_keep_their_names(tmp_path):
    config = OrchestratorConfig.from_args(
        ["--tokenizer", str(tmp_path), "--refresh", "2", "--grace", "4", "--rpc-timeout", "9", "--cast-c1", "0.3",
         "--http-port", "8000"], environ={"CAST_ORCH_CAST_R": "4"})
    assert (config.tokenizer_dir, config.refresh_s, config.grace_s, config.rpc_timeout_s) == (tmp_path, 2, 4, 9)
    assert (config.cast.breadth_threshold, config.cast.gain_buffer_size, config.http_port) == (0.3, 4, 8000)
    assert OrchestratorConfig.from_args(["--tokenizer", str(tmp_path)], environ={}).http_port is None
