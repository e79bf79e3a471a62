"""Arguments of `m2m convert`; the work happens in `map2map.convert` (destinations are `ConvertConfig` fields)."""

from __future__ import annotations

import argparse

from map2map.cli.types import ints as _ints
from map2map.cli.types import names as _names


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert .npy fields into a crop-aligned Zarr store",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Stream .npy fields (channel-first, one file per sample) into a Zarr store "
                                   "whose shards line up with training crops.")
    p.add_argument("output", help="path or URL of the store to write (s3://bucket/train.zarr, file://...; "
                                  "object storage needs the backend's package, e.g. s3fs)")
    p.add_argument("--field", action="append", required=True, metavar="NAME=PATTERN",
                   help="a field and the glob pattern of its .npy files (sorted by path; the i-th files of "
                        "all fields form sample i); repeat for more fields")
    keep = argparse.SUPPRESS  # left out: None in the config (the defaults for a new store, the store's on --append)
    p.add_argument("--crop", type=_ints, default=keep,
                   help="training crop size N or N,N,N in voxels of the first field's grid (default: min(128, "
                        "grid), or the store's with --append); shards equal the crop")
    p.add_argument("--clamp-crop", action="store_true",
                   help="use the whole grid on axes where --crop is larger than the grid (refused otherwise)")
    p.add_argument("--pad", type=int, default=keep,
                   help="halo pad the crops will be read with; sets the inner chunk (default: 3/8 of the crop, "
                        "or the store's with --append)")
    p.add_argument("--boxsize", type=float, default=None,
                   help="box side length (e.g. Mpc/h), finite and positive; coordinates are cell centres in this "
                        "unit (with --append it must equal the store's, or be left out)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true",
                      help="replace an existing map2map store (built beside it and swapped in at the end; refused "
                           "in object storage, which has no rename: write to a new URL)")
    mode.add_argument("--append", action="store_true", help="add the files as new samples to a complete store")
    p.add_argument("--chunk", type=_ints, default=keep,
                   help="inner chunk N or N,N,N (must divide the shard; default: the largest divisor of the "
                        "crop that keeps read amplification of a crop+pad window at or below 1.5, or the store's "
                        "with --append)")
    p.add_argument("--shard-mult", type=int, default=keep,
                   help="shards are this many crops wide per axis (default: 1, or the store's with --append)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=keep,
                   help="stored dtype (default: float32, or the store's with --append)")
    p.add_argument("--compressor", choices=["none", "zstd", "blosc"], default=keep,
                   help="lossless codec (saves little on these fields and slows reads; see README) "
                        "(default: none, or the store's with --append)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="keep NaN/Inf values (and values too large for the dtype, as Inf) instead of refusing them")
    p.add_argument("--styles", metavar="TABLE", default=None,
                   help="per-sample style parameters (e.g. Om, D) from a CSV table: a header of names, then one "
                        "row of numbers per sample in the sorted order of the field files; stored as the array "
                        "'style' (sample, param)")
    p.add_argument("--style-pattern", metavar="GLOB", default=None,
                   help="styles from one text file of whitespace-separated numbers per sample (files sorted and "
                        "paired with the samples like --field's); needs --style-names")
    p.add_argument("--style-names", type=_names, default=None, metavar="NAME,NAME",
                   help="names of the numbers in each --style-pattern file, in order, e.g. Om,D")
    p.add_argument("--storage-options", metavar="JSON", default=None,
                   help="keyword arguments of the object storage backend for a URL OUTPUT, as a JSON object, "
                        "e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (credentials come from the "
                        "environment as the backend reads them)")
    p.add_argument("--workers", type=int, default=2, help="processes converting shards in parallel (at least 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(stage=("map2map.convert", "ConvertConfig"))
