"""bench/remote.py, run tiny: one JSON line, every side read the same bits (the bench checks), and ours asks for
fewer requests per window than zarr-python."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT

SCRIPT = ROOT / "bench" / "remote.py"


def test_bench_remote_tiny(capsys, monkeypatch):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from s3server import CREDENTIALS

    for key, value in CREDENTIALS.items():  # the bench sets them; restored after the test
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("bench_remote", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    line = bench.main(["--n", "16", "--crop", "8", "--pad", "2", "--chunk", "4", "--items", "2", "--latency", "0"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == line
    assert line["chunk"] == [4, 4, 4] and line["shard"] == [8, 8, 8] and line["items"] == 2
    for side in ("ours", "zarr"):
        assert line[side]["items_per_s"] > 0
    # a 12^3 window of 4^3 chunks in 8^3 shards touches 8 shards and 64 chunks: ours one range per shard (and
    # each index once), zarr-python an index and a range per shard it reads in part
    assert line["ours"]["requests_per_item"] <= 16 < line["zarr"]["requests_per_item"]
