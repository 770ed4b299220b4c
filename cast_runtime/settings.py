"""Settings of the three services: one dataclass each, read from flags with environment variables as fallbacks.

A field declared with `setting()` is a flag (`--max-batch` for `max_batch`) and an environment variable
(`CAST_VERIFY_MAX_BATCH`); a flag wins over its variable, which wins over the default. The value is parsed by the
field's type (int, float, str, Path, bool, or one of them `| None`, where an empty value is None), and the dataclass
validates it on creation: a bad value exits with the message that names the field, as `--help` lists them all.
A field of type `tuple[X, ...]` is a repeatable flag; its variable holds the values separated by ';'.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, TypeVar

Config = TypeVar("Config")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def setting(default: Any = MISSING, help: str = "", *, flag: str = "", env: str = "") -> Any:
    """A dataclass field that is also a flag and an environment variable (`flag`/`env` rename them)."""
    return field(default=default, metadata={"help": help, "flag": flag, "env": env})


def parse_bool(text: str) -> bool:
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise ValueError(f"{text!r} is not one of {'/'.join(TRUE + FALSE)}")


def parser_for(annotation: Any) -> Callable[[str], Any]:
    """str -> value for a field's type; `X | None` maps the empty string (and "none") to None."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [a for a in args if a is not type(None)]
        parse = parser_for(inner)
        return lambda text: None if text.lower() in ("", "none") else parse(text)
    if annotation is bool:
        return parse_bool
    if annotation in (int, float, str, Path):
        return annotation
    raise TypeError(f"no parser for settings of type {annotation!r}")


def repeated_type(annotation: Any) -> Any:
    """X for `tuple[X, ...]` (a repeatable setting), else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def flag_name(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def env_name(f: Field, env_prefix: str) -> str:
    return env_prefix + (f.metadata.get("env") or f.name.upper())


def settings_fields(cls: type) -> list[Field]:
    return [f for f in fields(cls) if f.init and "help" in f.metadata]


def parse_settings(cls: type[Config], argv: Sequence[str] | None, *, prog: str, description: str, env_prefix: str,
                   environ: Mapping[str, str] | None = None) -> Config:
    """cls(**settings) from `argv` and `environ` (os.environ by default); exits with a usage message on bad input."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in settings_fields(cls):
        env = env_name(f, env_prefix)
        default = "required" if f.default is MISSING else f.default
        if repeated_type(hints[f.name]) is not None:
            parser.add_argument(flag_name(f), dest=f.name, metavar=f.name.upper(), action="append",
                                help=f"{f.metadata['help']}; repeatable (env {env}, ';'-separated; default {default or 'none'})")
            continue
        parser.add_argument(flag_name(f), dest=f.name, metavar=f.name.upper(),
                            help=f"{f.metadata['help']} (env {env}; default {default})")
        if hints[f.name] is bool:
            parser.add_argument("--no-" + flag_name(f).removeprefix("--"), dest=f.name, action="store_const",
                                const="false", help=f"same as {flag_name(f)} false")
    given = vars(parser.parse_args(argv))
    values = {}
    for f in settings_fields(cls):
        text = given[f.name] if given[f.name] is not None else environ.get(env_name(f, env_prefix))
        if text is None:
            if f.default is MISSING:
                parser.error(f"{flag_name(f)} (or {env_name(f, env_prefix)}) is required")
            continue
        try:
            inner = repeated_type(hints[f.name])
            if inner is None:
                values[f.name] = parser_for(hints[f.name])(text)
            else:  # a list of flags, or the variable's text
                texts = text if isinstance(text, list) else [t for t in text.split(";") if t.strip()]
                values[f.name] = tuple(parser_for(inner)(t) for t in texts)
        except ValueError as e:
            parser.error(f"{flag_name(f)}: {e}")
    try:
        return cls(**values)
    except ValueError as e:
        parser.error(str(e))
