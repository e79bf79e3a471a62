"""Argument types shared by the subcommands: each turns one command-line string into a value or says why not."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any


def names(text: str) -> list[str]:
    """Comma-separated names, e.g. ``za,dens``."""
    out = [v.strip() for v in text.split(",") if v.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return out


def ints(text: str) -> list[int]:
    """Comma-separated integers, e.g. ``128`` or ``64,64,32``."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def pad(text: str) -> str | list[int]:
    """``auto`` or a pad in one of the integer forms."""
    return "auto" if text.strip().lower() == "auto" else ints(text)


def positive(text: str) -> int:
    """An integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number greater than 0, e.g. ``2.5``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def json_object(text: str) -> dict[str, Any]:
    """A JSON object, e.g. ``'{"width": 8}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON, expected a JSON object such as '{{\"width\": 8}}' "
                                         f"({exc.msg} at column {exc.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 8}}', got {text!r}")
    return value
