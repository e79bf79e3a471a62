"""Arguments of `m2m train` (placeholder until training lands)."""

import argparse


def add_train(sub: argparse._SubParsersAction) -> None:
    """Register `m2m train`."""
