"""Arguments of `m2m infer` and `m2m test`; the work happens in `map2map.infer`."""

from __future__ import annotations

import argparse
import os

from map2map.cli.types import ints as _ints
from map2map.cli.types import json_object as _json_dict
from map2map.cli.types import names as _names
from map2map.cli.types import pad as _pad
from map2map.cli.types import positive as _positive
from map2map.cli.types import positive_float as _positive_float


def _crop(text: str):
    """``auto`` or integers (`map2map.cli.types.ints`)."""
    return "auto" if text.strip() == "auto" else _ints(text)


def _add_model_and_tiling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the checkpoint's model card; options given here override it)")
    g.add_argument("--load-state", required=True, metavar="CKPT",
                   help="checkpoint to load: a state from m2m train (its model card supplies the model, fields, "
                        "norms and arguments), a state_dict, or a dict with a 'model' state_dict")
    g.add_argument("--model", default=None, help="model name in map2map.models (e.g. UNet, VNet, G) or "
                                                  "module.Name in --callback-at (needed for a checkpoint without "
                                                  "a model card)")
    g.add_argument("--misc-kwargs", type=_json_dict, default=None, metavar="JSON",
                   help="extra keyword arguments passed to the model and to the norms, as in m2m train, "
                        "e.g. '{\"width\": 32}' (scale_factor and dim are passed already)")
    g.add_argument("--model-kwargs", type=_json_dict, default=None, metavar="JSON",
                   help="keyword arguments for the model only, on top of --misc-kwargs")
    g.add_argument("--scale-factor", type=_positive, default=None,
                   help="output grid is this many times finer than the input grid (super-resolution; "
                        "without a card: 1)")
    g.add_argument("--callback-at", type=os.path.abspath, default=None, metavar="DIR",
                   help="directory of user modules for models, norms and criteria named module.Name")
    g.add_argument("--in-norms", type=_names, default=None, metavar="NORM[,NORM]",
                   help="norm of each input field (e.g. cosmology.dis), applied before the model")
    g.add_argument("--tgt-norms", type=_names, default=None, metavar="NORM[,NORM]",
                   help="norm of each target field; undone on the prediction before it is written")
    g.add_argument("--norm-kwargs", type=_json_dict, default=None, metavar="JSON",
                   help="keyword arguments for the norms only, on top of --misc-kwargs, e.g. '{\"z\": 0}'")
    g.add_argument("--style", default=None, metavar="NAME=VALUE[,...]",
                   help="for a styled model (its card names style parameters): give every sample these physical "
                        "values, e.g. Om=0.31,D=0.72, all of the model's parameters and no other (default: each "
                        "sample's own styles from the input store)%(default).0s")
    g.add_argument("--criterion", default="MSELoss",
                   help="loss reported against the target (torch.nn name or module.Name), on normalized fields")
    t = p.add_argument_group("tiling and output")
    t.add_argument("--crop", type=_crop, default=None, metavar="auto|N[,N,N]",
                   help="tile size in input voxels: a multiple of the model's total stride (and, times the "
                        "scale factor, of --out-shard); the last tile along an axis may be smaller; 'auto': the "
                        "largest tile that fits --tile-memory (default: the input store's shard, i.e. the "
                        "training crop, rounded down to the stride)%(default).0s")
    t.add_argument("--tile-memory", type=_positive_float, default=None, metavar="GiB",
                   help="memory budget of one forward pass for --crop auto (default: a safe share of the GPU's "
                        "memory, or of the RAM per worker on CPU)%(default).0s")
    t.add_argument("--tta", choices=["none", "flips", "all"], default="none",
                   help="test-time augmentation: average each forward pass over the reflections of the grid "
                        "(flips: 8 in 3D, 4 in 2D) or all its symmetries (all: 48 in 3D, 8 in 2D), each "
                        "output transformed back and vector components turned with space; costs as many "
                        "forward passes")
    t.add_argument("--in-pad", type=_pad, default="auto", metavar="auto|N[,...]",
                   help="halo read around each tile, periodic: 'auto' asks the model (smallest pad whose output "
                        "covers the tile), or N, one per axis, or one per side lo0,hi0,...")
    t.add_argument("--batch-size", type=_positive, default=1, help="tiles per task and forward pass")
    t.add_argument("--out-field", default=None,
                   help="name of the prediction field (default: the --tgt name if one, else 'prediction')%(default).0s")
    t.add_argument("--out-chan", type=_positive, default=None,
                   help="output channels of the model (default: the target's, else the input's)%(default).0s")
    t.add_argument("--out-shard", type=_ints, default=None, metavar="N[,N,N]",
                   help="output shard in output voxels; must divide crop x scale factor (default: equal to it, "
                        "so each tile writes exactly one shard)%(default).0s")
    t.add_argument("--out-chunk", type=_ints, default=None, metavar="N[,N,N]",
                   help="output inner chunk, dividing the shard (default: the largest divisor of the shard "
                        "up to 32, which zarr writes about 8x faster than 8^3 chunks)%(default).0s")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a complete OUTPUT (the new one is swapped in when it is complete); refused for "
                        "an OUTPUT in object storage, which cannot swap a store in: write to a new URL")
    t.add_argument("--storage-options", default=None, metavar="JSON",
                   help="keyword arguments of the fsspec filesystem for --data and --out URLs (s3://, gs://, "
                        "...), e.g. '{\"endpoint_url\": \"https://s3.example.org\"}'; credentials come from the "
                        "environment as usual. Every worker gets them. --load-state stays a local file")
    c = p.add_argument_group("where it runs")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs on each worker (auto: cuda if the worker has a GPU)")
    c.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="mixed precision: forward passes under autocast in bf16 or fp16 (faster on GPUs, "
                        "about three significant digits); predictions are written as float32 in every mode")
    where = c.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="use the running Dask cluster at this scheduler address (e.g. tcp://host:8786)")
    where.add_argument("--scheduler-file", default=None, metavar="FILE",
                       help="use the running Dask cluster described by this scheduler file")
    c.add_argument("--workers", type=_positive, default=None,
                   help="worker processes of the local cluster, started while the run plans (default: one per "
                        "GPU with cuda, else 1); 1 starts none: the tiles run in this process, the model on "
                        "every core while other threads read and write%(default).0s")
    c.add_argument("--threads-per-worker", type=_positive, default=1,
                   help="streams of tiles run at once per worker (each a read/model/write pipeline)")
    c.add_argument("--torch-threads", type=_positive, default=None,
                   help="torch threads per worker (default on a local CPU cluster: cores / (workers x threads); "
                        "an existing cluster keeps its own)%(default).0s")
    c.add_argument("--connect-timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                   help="give up on an unreachable --scheduler after this long")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_infer(sub: argparse._SubParsersAction) -> None:
    """Register `m2m infer`."""
    p = sub.add_parser("infer", help="predict whole boxes of a store, tile by tile on a Dask cluster",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Run a trained model over every sample of a store in tiles (crop + periodic "
                                   "halo) as Dask tasks, writing a prediction store with the same dims and "
                                   "coordinates; the result equals one pass over the periodically padded box. "
                                   "Rerunning an interrupted command resumes it.")
    p.add_argument("--data", required=True, metavar="STORE",
                   help="input store (from m2m convert): a local path or a URL (s3://bucket/in.zarr, gs://, "
                        "file://; see --storage-options)")
    p.add_argument("--in", dest="in_fields", type=_names, default=None, metavar="NAME[,NAME]",
                   help="input field(s) of the store, concatenated along channels (default: the model card's)")
    p.add_argument("--tgt", type=_names, default=None, metavar="NAME[,NAME]",
                   help="target field(s) of the store: report the per-sample loss against them (default: the "
                        "model card's, when the store has them)")
    p.add_argument("--out", required=True, metavar="OUTPUT",
                   help="prediction store to write: a local path or a URL (see --storage-options); rerunning "
                        "an interrupted command resumes it, in object storage too")
    p.add_argument("--velocity", action="store_true",
                   help="for a model of displacements styled by the growth factor D: also write the field 'vel', "
                        "the peculiar velocity a H f D dpsi/dD in km/s, dpsi/dD by forward-mode differentiation "
                        "in the same pass (see --velocity-input)")
    p.add_argument("--velocity-input", default="scales", metavar="scales|fixed",
                   help="with --velocity, how the input depends on D: 'scales' (proportional to D, as the "
                        "Zel'dovich displacement at the sample's D is; the derivative runs through the input "
                        "and the style) or 'fixed' (the same at every D, e.g. the linear field at z = 0; "
                        "through the style alone) (default: scales)")
    _add_model_and_tiling(p)
    p.set_defaults(stage=("map2map.infer", "InferConfig"))


def add_test(sub: argparse._SubParsersAction) -> None:
    """Register `m2m test`."""
    p = sub.add_parser("test", help="the original toolkit's test: predict .npy inputs, write <target>_out.npy",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Predict every sample given by .npy glob patterns with the same tiled "
                                   "engine as m2m infer, report the loss against the targets, and write each "
                                   "prediction next to its target file as <target>_out.npy.")
    p.add_argument("--test-in-patterns", type=_names, required=True, metavar="GLOB[,GLOB]",
                   help="input .npy glob pattern(s), one per field (files sorted by path pair up)")
    p.add_argument("--test-tgt-patterns", type=_names, required=True, metavar="GLOB[,GLOB]",
                   help="target .npy glob pattern(s), one per field")
    p.add_argument("--out", default=None, metavar="OUTPUT",
                   help="also keep the predictions as a store here (default: a temporary store beside the "
                        "first target, removed at the end)%(default).0s")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="predict inputs with NaN/Inf values instead of refusing them (as m2m convert)")
    _add_model_and_tiling(p)
    p.set_defaults(stage=("map2map.infer.npy", "InferConfig"))
