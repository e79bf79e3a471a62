"""What `m2m infer` / `m2m test` are given (`InferConfig`), and the small specs sent with every task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from map2map import storage, store, tiles
from map2map.modelfit import ModelSpec

DONE_DIR = ".m2m-done"  # tile markers inside an output store while it is being written (a key prefix remotely)
PARTIAL = store.PARTIAL  # suffix of the store --overwrite builds beside the old one
VEL_FIELD = "vel"  # the velocity field --velocity writes beside the prediction


@dataclass(frozen=True)
class InferConfig:
    """Everything `m2m infer` / `m2m test` take; field names are the command line's option names.

    Fields left None are filled from the checkpoint's model card
    (`map2map.infer.defaults`), then from the defaults the help text states;
    a value given explicitly overrides the card, and the run says so.
    `misc_kwargs` (model and norms), `model_kwargs` and `norm_kwargs` add up
    as on the command line: model arguments are the card's (or
    ``misc_kwargs``), updated with ``model_kwargs``.  `amp` is the mixed
    precision of the forward passes (`map2map.utils.precision`; ``off``
    keeps float32 throughout); predictions are written as float32 in every
    mode.  `tta` averages each forward pass over a group of symmetries of the
    grid (`map2map.infer.tta`); `crop` ``"auto"`` and `tile_memory` (GiB) let
    the planner choose the tile (`map2map.infer.planning`).  A styled model
    (its card names style parameters) takes each sample's styles from the
    input store, or `style` (``Om=0.31,D=0.72``) for every sample; `velocity`
    also writes the field `VEL_FIELD` (`map2map.infer.styles`), differentiating
    through the input too when `velocity_input` is ``"scales"`` (an input
    proportional to D) and not when it is ``"fixed"``.  `data` and
    `out` may be URLs (`map2map.storage`); `storage_options` (a dict, or the
    ``--storage-options`` JSON text, which the stage parses) apply to both,
    and `load_state` stays a local file.
    """

    load_state: str
    out: str | None = None
    data: str | None = None
    in_fields: tuple[str, ...] | None = None
    tgt: tuple[str, ...] | None = None
    test_in_patterns: tuple[str, ...] | None = None
    test_tgt_patterns: tuple[str, ...] | None = None
    model: str | None = None
    crop: tuple[int, ...] | str | None = None
    in_pad: Any = "auto"
    scale_factor: int | None = None
    in_norms: tuple[str, ...] | None = None
    tgt_norms: tuple[str, ...] | None = None
    out_field: str | None = None
    out_chan: int | None = None
    out_shard: tuple[int, ...] | None = None
    out_chunk: tuple[int, ...] | None = None
    misc_kwargs: Mapping[str, Any] | None = None
    model_kwargs: Mapping[str, Any] | None = None
    norm_kwargs: Mapping[str, Any] | None = None
    callback_at: str | None = None
    criterion: str = "MSELoss"
    batch_size: int = 1
    device: str = "auto"
    amp: str = "off"
    tta: str = "none"
    tile_memory: float | None = None
    scheduler: str | None = None
    scheduler_file: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    torch_threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    connect_timeout: float = 5.0
    wait_workers: float = 60.0
    allow_nonfinite: bool = False
    style: str | None = None
    velocity: bool = False
    velocity_input: str = "scales"
    storage_options: Mapping[str, Any] | str | None = None


@dataclass(frozen=True)
class SourceSpec:
    """How a worker opens one field: ("zarr", store location, array name, nsample, storage options of a
    URL) or ("npy", paths)."""

    kind: str
    path: str = ""
    name: str = ""
    nsample: int = 0
    paths: tuple[str, ...] = ()
    storage_options: Mapping[str, Any] | None = None

    def open(self):
        from map2map.data.windows import NpyField, ZarrField

        if self.kind == "zarr":
            if storage.is_remote(self.path):
                return ZarrField(self.path, self.name, self.nsample, storage_options=dict(self.storage_options or {}))
            return ZarrField(self.path, self.name, self.nsample)
        return NpyField(list(self.paths))


@dataclass(frozen=True)
class Job:
    """Everything a tile task needs, small enough to send with every task; `amp` is the autocast mode of its
    forward passes (`map2map.utils.precision.autocast`), `tta` the symmetry group they are averaged over
    (`map2map.infer.tta`).  For a styled model `styles` holds each sample's physical style values in the
    order of `style_norm` (the model card's); with ``--velocity`` `vel_field` names the velocity output and
    `vel_factors` holds each sample's factor from d(output)/dD, as the model gives it, to km/s
    (`map2map.infer.styles`), and `vel_input_scales` whether the input is proportional to D.
    `out_path` is a local path or a URL, written with `storage_options`
    (travelling with every task to every worker, in this process or another)."""

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
    amp: str = "off"
    tta: str = "none"
    styles: tuple[tuple[float, ...], ...] = ()
    style_norm: Any = None  # a `map2map.data.styles.StyleNorm`, None for an unstyled model
    vel_field: str | None = None
    vel_factors: tuple[float, ...] = ()
    vel_input_scales: bool = True
    storage_options: Mapping[str, Any] | None = None

    @property
    def remote(self) -> bool:
        """Whether the output is in object storage (`map2map.storage.is_remote`)."""
        return storage.is_remote(self.out_path)

    @property
    def done_dir(self) -> str:
        return storage.join(self.out_path, DONE_DIR)

    @property
    def out_chans(self) -> tuple[int, ...]:
        return self.tgt_chans if self.tgt_chans else (self.model.out_chan,)
