"""What `m2m infer` / `m2m test` are given (`Options`), and the small specs sent with every task."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from map2map import tiles

DONE_DIR = ".m2m-done"  # tile markers inside an output store while it is being written
PARTIAL = ".m2m-partial"  # suffix of the store --overwrite builds beside the old one


@dataclass
class Options:
    """Everything `m2m infer` / `m2m test` take, as plain values (the CLI fills it)."""

    out: str | None
    model: str
    load_state: str
    data: str | None = None
    in_fields: Sequence[str] = ()
    tgt: Sequence[str] | None = None
    in_patterns: Sequence[str] | None = None
    tgt_patterns: Sequence[str] | None = None
    crop: Sequence[int] | None = None
    in_pad: Sequence[int] | str = "auto"
    scale_factor: int = 1
    in_norms: Sequence[str] | None = None
    tgt_norms: Sequence[str] | None = None
    out_field: str | None = None
    out_chan: int | None = None
    out_shard: Sequence[int] | None = None
    out_chunk: Sequence[int] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    callback_at: str | None = None
    criterion: str = "MSELoss"
    batch_size: int = 1
    device: str = "auto"
    scheduler: str | None = None
    scheduler_file: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    torch_threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    connect_timeout: float = 5.0
    wait_workers: float = 60.0


@dataclass(frozen=True)
class SourceSpec:
    """How a worker opens one field: ("zarr", store path, array name, nsample) or ("npy", paths)."""

    kind: str
    path: str = ""
    name: str = ""
    nsample: int = 0
    paths: tuple[str, ...] = ()

    def open(self):
        from map2map.data.windows import NpyField, ZarrField

        if self.kind == "zarr":
            return ZarrField(self.path, self.name, self.nsample)
        return NpyField(list(self.paths))


@dataclass(frozen=True)
class ModelSpec:
    """A model by name and constructor arguments, and the checkpoint it loads (with a stamp of the file)."""

    name: str
    checkpoint: str
    stamp: tuple[int, int]
    in_chan: int
    out_chan: int
    scale_factor: int
    ndim: int
    kwargs_json: str
    callback_at: str | None

    @property
    def kwargs(self) -> dict[str, Any]:
        return json.loads(self.kwargs_json)


@dataclass(frozen=True)
class Job:
    """Everything a tile task needs, small enough to send with every task."""

    token: str
    out_path: str
    out_field: str
    inputs: tuple[SourceSpec, ...]
    targets: tuple[SourceSpec, ...]
    in_chans: tuple[int, ...]
    tgt_chans: tuple[int, ...]
    in_norms: tuple[str, ...] | None
    tgt_norms: tuple[str, ...] | None
    norm_kwargs_json: str
    model: ModelSpec
    plan: tiles.TilePlan
    offsets: tuple[int, ...]
    out_shape: tuple[int, ...]
    criterion: str | None
    device: str
    torch_threads: int | None

    @property
    def done_dir(self) -> str:
        return os.path.join(self.out_path, DONE_DIR)

    @property
    def out_chans(self) -> tuple[int, ...]:
        return self.tgt_chans if self.tgt_chans else (self.model.out_chan,)
