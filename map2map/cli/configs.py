"""Parsed arguments -> a stage's frozen config, the same way for every subcommand.

A subcommand's parser names its stage with ``set_defaults(stage=(module,
config class name))``; its option destinations are the config's field names.
`config_from_args` copies every field the namespace has (lists become tuples,
so configs stay immutable), turns ``--no-X`` flags into ``X = not no_X``, and
leaves the rest at the config's defaults.  No stage is ever handed the
namespace itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Any


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of the frozen dataclass `cls` from the parsed `args` (and `overrides`)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(args, f.name):
            values[f.name] = _frozen(getattr(args, f.name))
        elif hasattr(args, f"no_{f.name}"):
            values[f.name] = not getattr(args, f"no_{f.name}")
    return cls(**values)


def stage_of(args: argparse.Namespace) -> tuple[Any, Any]:
    """The stage module a parsed subcommand runs, and its config built from `args`."""
    module_name, config_name = args.stage
    module = importlib.import_module(module_name)
    return module, config_from_args(getattr(module, config_name), args)
