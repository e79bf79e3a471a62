"""`m2m demo` with its defaults, as the README's first command runs it, and the analysis notebook on its output.

This is the slowest test (a few minutes on 2 cores): it trains the demo's V-Net for real and checks the
claim the demo makes, that the trained model beats the trivial prediction (the ZA input) on r(k).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, run_m2m


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    res = run_m2m("demo", str(out), timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("1/5 synthesize", "2/5 convert", "3/5 train", "4/5 tiled inference", "5/5 report"):
        assert stage in res.stdout
    return out


def test_demo_beats_trivial_baseline(demo_dir):
    summary = json.loads((demo_dir / "report" / "summary.json").read_text())
    assert summary["mean_r_model"] > summary["mean_r_za"] and summary["beat_baseline"]
    report = (demo_dir / "report" / "report.md").read_text()
    assert "BEATS the trivial baseline" in report and "| k [h/Mpc] |" in report
    for name in ("spectra.png", "transfer_correlation.png", "slices.png"):
        assert (demo_dir / "report" / name).stat().st_size > 10_000
    assert (demo_dir / "run" / "checkpoint.pt").exists() and any((demo_dir / "run" / "runs").iterdir())


def test_notebook_runs_on_demo_output(demo_dir, monkeypatch, tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    monkeypatch.setenv("M2M_DEMO_DIR", str(demo_dir))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "mean r(k) up to half Nyquist" in printed
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images == 3
