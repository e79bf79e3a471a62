"""The original toolkit's models as reference data: ``../shared/original_models`` beside the project (or
the folder named by ``M2M_ORIGINAL_MODELS``), described in that folder's README.

A test that needs a golden file gets it through `golden`: skipped where the folder is missing, except on
CI (env ``CI``), where a missing folder fails the test instead of hiding it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(os.environ.get("M2M_ORIGINAL_MODELS",
                                 Path(__file__).resolve().parents[2] / "shared" / "original_models"))


def golden(name: str) -> Path:
    """The golden file `name` (e.g. ``VNet.state.pt``)."""
    path = GOLDEN_DIR / name
    if not path.exists():
        why = f"golden file {path} is missing (set M2M_ORIGINAL_MODELS to the folder)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path
