"""Arguments of `m2m infer` and `m2m test` (placeholder until inference lands)."""

import argparse


def add_infer(sub: argparse._SubParsersAction) -> None:
    """Register `m2m infer`."""


def add_test(sub: argparse._SubParsersAction) -> None:
    """Register `m2m test`."""
