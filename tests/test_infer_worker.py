"""The workers' state on a long-lived Dask cluster: one plugin per worker across runs, models kept
(the two latest), readers of earlier runs dropped, statistics per run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from map2map import store
from map2map.infer import cluster as infer_cluster
from map2map.infer.worker import PLUGIN_NAME, WorkerState

from test_infer import make_store, run_infer

CONV = '''
from torch import nn


class Conv(nn.Module):
    def __init__(self, in_chan, out_chan, **kwargs):
        super().__init__()
        self.conv = nn.Conv3d(in_chan, out_chan, 3)

    def forward(self, x):
        return self.conv(x)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker-state")
    (root / "cb").mkdir()
    (root / "cb" / "conv.py").write_text(CONV)
    x = np.random.default_rng(0).standard_normal((1, 2, 16, 16, 16)).astype(np.float32)
    data = make_store(root, "in", {"disp": x}, crop=8)
    ckpts, refs = [], []
    for seed in range(3):  # three checkpoints: three models as far as a worker is concerned
        torch.manual_seed(seed)
        conv = torch.nn.Conv3d(2, 2, 3)
        path = root / f"conv{seed}.pt"
        torch.save({"model": {"conv.weight": conv.weight.detach(), "conv.bias": conv.bias.detach()}}, path)
        ckpts.append(str(path))
        with torch.no_grad():
            padded = torch.from_numpy(np.pad(x[0], [(0, 0)] + [(1, 1)] * 3, mode="wrap"))[None]
            refs.append(conv(padded)[0].numpy())
    return root, data, ckpts, refs


def worker_view(address: str) -> dict[str, dict]:
    """What each worker's state holds: its identity, models, readers' runs and runs with statistics."""
    from distributed import Client

    def view(dask_worker):
        state = dask_worker.plugins[PLUGIN_NAME]
        return {"id": id(state), "models": [m.checkpoint for m, _ in state.models],
                "reader_runs": sorted({k[0] for k in state.stacks}), "token": state.token}

    with Client(address, set_as_default=False) as client:
        return client.run(view)


def test_runs_share_the_workers_state(setup, cluster):
    root, data, ckpts, refs = setup
    order = [0, 0, 1, 2]
    seen = []
    for i, k in enumerate(order):
        out = root / f"out{i}.zarr"
        s = run_infer(cluster, data=data, in_fields=["disp"], model="conv.Conv", callback_at=str(root / "cb"),
                      load_state=ckpts[k], out=str(out), crop=[8], device="cpu")
        np.testing.assert_allclose(store.open_store(out).field("prediction")[0], refs[k], atol=1e-5, rtol=0)
        loads = sum(w["model_loads"] for w in s.workers.values())
        assert sum(w["tiles"] for w in s.workers.values()) == 8 and set(s.workers) <= set(worker_view(cluster))
        assert loads == (0 if i == 1 else len(s.workers))  # the second run of checkpoint 0 loads nothing
        seen.append(worker_view(cluster))
    for address, first in seen[0].items():
        assert {v[address]["id"] for v in seen} == {first["id"]}  # one state per worker, across runs
        last = seen[-1][address]
        assert last["models"] == [ckpts[1], ckpts[2]]  # the two latest
        assert last["reader_runs"] in ([], [last["token"]])  # readers of earlier runs are gone


def test_register_is_idempotent_and_stats_cover_only_the_run(cluster):
    from distributed import Client

    assert WorkerState.idempotent and WorkerState.name == PLUGIN_NAME
    with Client(cluster, set_as_default=False) as client:
        infer_cluster.register_state(client)
        before = client.run(lambda dask_worker: id(dask_worker.plugins[PLUGIN_NAME]))
        infer_cluster.register_state(client)
        assert client.run(lambda dask_worker: id(dask_worker.plugins[PLUGIN_NAME])) == before
        assert infer_cluster.collect_stats(client, "no-such-run") == {}
