"""The layering the design promises: stages are functions of frozen configs, the CLI only builds configs,
library code keeps no working-directory state and never imports the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from map2map.cli import build_parser
from map2map.cli.configs import config_from_args


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_reaches_the_stage_config(command):
    """Each subcommand names a stage whose frozen config has a field for every option (``--no-X`` -> X)."""
    sub = _subparsers()[command]
    module_name, config_name = sub.get_default("stage")
    module = importlib.import_module(module_name)
    cls = getattr(module, config_name)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert callable(getattr(module, "run"))
    fields = {f.name for f in dataclasses.fields(cls)}
    dests = {a.dest for a in sub._actions if a.dest not in ("help", argparse.SUPPRESS)}
    for dest in dests:
        assert dest in fields or (dest.startswith("no_") and dest[3:] in fields), (command, dest)


def test_config_builder_freezes_lists_and_inverts_no_flags():
    @dataclasses.dataclass(frozen=True)
    class C:
        crop: tuple[int, ...] | None = None
        progress: bool = True
        left: int = 7

    c = config_from_args(C, argparse.Namespace(crop=[8, 8], no_progress=True, unrelated=1))
    assert c == C(crop=(8, 8), progress=False, left=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.crop = (1,)


def test_demo_does_not_import_the_cli():
    code = "import map2map.demo, sys; assert 'map2map.cli' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_library_code_keeps_no_working_directory_state():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "map2map").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bos\.chdir\b", line)]
    assert offenders == []
    assert not any("import map2map.cli" in p.read_text() or "from map2map.cli" in p.read_text()
                   for p in (ROOT / "map2map").rglob("*.py") if "cli" not in p.relative_to(ROOT / "map2map").parts)
