"""The original toolkit's Python import paths work unchanged, for users' scripts and the modules they pass
with ``--callback-at``.

Every case runs in a process of its own in which no map2map module was imported before, so an import
cycle that bites only when its module is imported first shows up.  To keep that cheap, one interpreter
imports the third-party libraries (torch, numpy, scipy, zarr) once and forks one child per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, NamedTuple

import pytest

from conftest import ROOT

MODULE = "class (torch.nn.Module)"
FUNCTION = "function"


class Case(NamedTuple):
    """An import statement, the kind of every name it binds, and optionally code run after it that
    sets `result` (with `torch` and `np` at hand) and the result expected (JSON values)."""

    statement: str
    kinds: dict[str, str]
    check: str | None = None
    expect: Any = None


CASES = {
    "data.FieldDataset": Case("from map2map.data import FieldDataset", {"FieldDataset": "class (Dataset)"}),
    "data.DistFieldSampler": Case(
        "from map2map.data import DistFieldSampler", {"DistFieldSampler": "class (Sampler)"},
        "result = list(DistFieldSampler(2, (2,), shuffle=False))", [0, 1, 2, 3]),
    "models": Case(
        "from map2map.models import UNet, VNet, G, narrow_by, narrow_like, narrow_cast, resample, Resampler, "
        "lag2eul, power",
        {"UNet": MODULE, "VNet": MODULE, "G": MODULE, "Resampler": MODULE, "narrow_by": FUNCTION,
         "narrow_like": FUNCTION, "narrow_cast": FUNCTION, "resample": FUNCTION, "lag2eul": FUNCTION,
         "power": FUNCTION}),
    "models.narrow_by": Case(
        "from map2map.models import narrow_by", {"narrow_by": FUNCTION},
        "x = torch.arange(2 * 36.0).reshape(1, 2, 6, 6)\n"
        "result = [torch.equal(narrow_by(x, 1), x[:, :, 1:-1, 1:-1]), list(narrow_by(x, 2).shape)]",
        [True, [1, 2, 2, 2]]),
    "models.narrow_like+resample": Case(
        "from map2map.models import narrow_like, resample", {"narrow_like": FUNCTION, "resample": FUNCTION},
        "y = resample(torch.ones(1, 1, 4, 4, 4), 2)\n"  # 8 voxels per axis, less one at each (inexact) end
        "z = narrow_like(torch.zeros(1, 3, 10, 10), y[:, :, 0])\n"
        "result = [list(y.shape), bool((y == 1).all()), list(z.shape)]",
        [[1, 1, 6, 6, 6], True, [1, 3, 6, 6]]),
    # --model NAME (and the original's module.NAME spelling) is looked up in map2map.models
    "models by name": Case(
        "from map2map.models import UNet, VNet, G", {"UNet": MODULE, "VNet": MODULE, "G": MODULE},
        "from map2map.utils.imports import import_attr\n"
        "names = ['UNet', 'VNet', 'G', 'unet.UNet', 'vnet.VNet', 'srsgan.G']\n"
        "result = [import_attr(n, ['map2map.models']) is {'UNet': UNet, 'VNet': VNet, 'G': G}[n.split('.')[-1]]\n"
        "          for n in names]",
        [True] * 6),
    "models.srsgan": Case("from map2map.models.srsgan import G", {"G": MODULE}),
    "models.unet": Case("from map2map.models.unet import UNet", {"UNet": MODULE}),
    "models.vnet": Case("from map2map.models.vnet import VNet", {"VNet": MODULE}),
    "models.conv": Case("from map2map.models.conv import ConvBlock, ResBlock",
                        {"ConvBlock": MODULE, "ResBlock": MODULE}),
    "models.narrow": Case("from map2map.models.narrow import narrow_by, narrow_cast, narrow_like",
                          {"narrow_by": FUNCTION, "narrow_cast": FUNCTION, "narrow_like": FUNCTION}),
    "models.resample": Case("from map2map.models.resample import resample, Resampler",
                            {"resample": FUNCTION, "Resampler": MODULE}),
    "models.lag2eul": Case("from map2map.models.lag2eul import lag2eul", {"lag2eul": FUNCTION}),
    "models.power": Case("from map2map.models.power import power", {"power": FUNCTION}),
    "data.fields": Case("from map2map.data.fields import FieldDataset", {"FieldDataset": "class (Dataset)"}),
    "data.sampler": Case("from map2map.data.sampler import DistFieldSampler",
                         {"DistFieldSampler": "class (Sampler)"}),
    "data.norms": Case("from map2map.data.norms import cosmology", {"cosmology": "module"}),
    # --in-norms cosmology.dis: looked up in map2map.data.norms; a norm divides in place and undoes exactly
    "norms.cosmology": Case(
        "from map2map.data.norms.cosmology import dis, vel", {"dis": FUNCTION, "vel": FUNCTION},
        "from map2map.utils.imports import import_attr\n"
        "x = np.ones(3)\n"
        "same = dis(x) is x\n"
        "forward = bool(np.allclose(x, 1 / 6, rtol=1e-12))\n"  # dis_std 6 Mpc/h times D(z=0) = 1
        "dis(x, undo=True)\n"
        "result = [same, forward, bool(np.allclose(x, 1, rtol=1e-12)),\n"
        "          import_attr('cosmology.dis', ['map2map.data.norms']) is dis,\n"
        "          import_attr('cosmology.vel', ['map2map.data.norms']) is vel]",
        [True] * 5),
}

DRIVER = r'''
import inspect, json, os, sys

import numpy as np, scipy.integrate, scipy.special, torch, zarr  # third-party only: shared by the children

assert not [m for m in sys.modules if m == "map2map" or m.startswith("map2map.")], "map2map imported early"


def kind(obj):
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        for base, label in ((torch.nn.Module, "torch.nn.Module"), (torch.utils.data.Dataset, "Dataset"),
                            (torch.utils.data.Sampler, "Sampler")):
            if issubclass(obj, base):
                return f"class ({label})"
        return "class"
    return "function" if inspect.isfunction(obj) or inspect.isbuiltin(obj) else type(obj).__name__


for name, statement, check in json.load(sys.stdin):
    pid = os.fork()
    if pid == 0:
        try:
            ns = {}
            exec(statement, ns)
            out = {"kinds": {k: kind(v) for k, v in ns.items() if not k.startswith("__")}}
            if check:
                ns.update(torch=torch, np=np)
                exec(check, ns)
                out["result"] = ns["result"]
        except BaseException as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps([name, out]), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
'''


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict]:
    """Each case's outcome: the kind of every name bound, the check's result, or the error raised."""
    cases = [[name, c.statement, c.check] for name, c in CASES.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("["))


@pytest.mark.parametrize("name", list(CASES))
def test_original_import_path(outcomes, name):
    case = CASES[name]
    got = outcomes.get(name)
    assert got is not None, f"{case.statement!r}: the child process reported nothing"
    assert "error" not in got, f"{case.statement!r} failed: {got['error']}"
    assert got["kinds"] == case.kinds
    if case.check is not None:
        assert got["result"] == case.expect


def test_driver_reports_a_broken_import():
    """The harness itself: a statement that cannot import is reported as an error, not as a pass."""
    cases = [["broken", "from map2map.models import NoSuchModel", None]]
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("[")]
    assert line[0] == "broken" and "ImportError" in line[1]["error"] and "NoSuchModel" in line[1]["error"]
