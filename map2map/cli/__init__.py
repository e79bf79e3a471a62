"""Command-line parsing for every `m2m` subcommand; the work happens in the modules it calls.

Small subcommands are parsed here; `train_args` and `infer_args` hold the larger ones.

A `UserError` from any subcommand is printed as one line on stderr with exit
status 2 and no traceback; argparse's own errors are shortened to one line too.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from map2map.cli.types import ints as _ints
from map2map.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as every user error
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert .npy fields into a crop-aligned Zarr store",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Stream .npy fields (channel-first, one file per sample) into a Zarr store "
                                   "whose shards line up with training crops.")
    p.add_argument("output", help="path of the store to write")
    p.add_argument("--field", action="append", required=True, metavar="NAME=PATTERN",
                   help="a field and the glob pattern of its .npy files (sorted by path; the i-th files of "
                        "all fields form sample i); repeat for more fields")
    p.add_argument("--crop", type=_ints, default=None,
                   help="training crop size N or N,N,N in voxels of the first field's grid "
                        "(default: min(128, grid)); shards equal the crop")
    p.add_argument("--pad", type=int, default=None,
                   help="halo pad the crops will be read with; sets the inner chunk (default: 3/8 of the crop)")
    p.add_argument("--boxsize", type=float, default=None,
                   help="box side length (e.g. Mpc/h); coordinates are cell centres in this unit")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing store (swapped in at the end)")
    mode.add_argument("--append", action="store_true", help="add the files as new samples to a complete store")
    p.add_argument("--chunk", type=_ints, default=None,
                   help="inner chunk N or N,N,N (must divide the shard; default: the largest divisor of the "
                        "crop that keeps read amplification of a crop+pad window at or below 1.5)")
    p.add_argument("--shard-mult", type=int, default=1, help="shards are this many crops wide per axis")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="stored dtype")
    p.add_argument("--compressor", choices=["none", "zstd", "blosc"], default="none",
                   help="lossless codec (saves little on these fields and slows reads; see README)")
    p.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf values instead of refusing them")
    p.add_argument("--workers", type=int, default=2, help="processes converting shards in parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from map2map import convert

    summary = convert.convert(convert.Options(
        output=args.output, fields=args.field, crop=args.crop, pad=args.pad, boxsize=args.boxsize,
        overwrite=args.overwrite, append=args.append, chunk=args.chunk, shard_mult=args.shard_mult,
        dtype=args.dtype, compressor=args.compressor, allow_nonfinite=args.allow_nonfinite,
        workers=args.workers, progress=not args.no_progress))
    for note in summary["notes"]:
        print(f"note: {note}")
    for lay in summary["layouts"]:
        print(f"{lay.name}: {lay.channels} x {lay.spatial}, shard {lay.shard}, inner chunk {lay.chunk}, {lay.dtype}")
    verb = f"appended {summary['appended']} samples, now" if "appended" in summary else "wrote"
    print(f"{summary['output']}: {verb} {summary['nsample']} samples, complete")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a store: fields, shapes, chunks, sizes, completeness",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("store", help="path of the store")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from map2map import info

    print(info.describe(args.store))


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate example fields: Zel'dovich (1LPT) and 2LPT displacements",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Write Gaussian-random-field initial conditions evolved to 1LPT (input) and "
                                   "2LPT (target) displacements as channel-first .npy files, one directory "
                                   "per sample, deterministically from the seed.")
    p.add_argument("outdir", help="directory to write the samples into")
    p.add_argument("--num-samples", type=int, default=1, help="number of boxes")
    p.add_argument("--ngrid", type=int, default=32, help="grid cells per side")
    p.add_argument("--boxsize", type=float, default=128.0, help="box side in Mpc/h")
    p.add_argument("--seed", type=int, default=0, help="random seed; sample i uses (seed, i)")
    p.add_argument("--redshift", type=float, default=0.0, help="redshift of the fields")
    p.add_argument("--density", action="store_true", help="also write CIC-painted overdensities")
    p.add_argument("--prefix", default="", help="prefix of the sample directory names")
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> None:
    from map2map import synth

    paths = synth.synthesize(args.outdir, nsamples=args.num_samples, ngrid=args.ngrid, boxsize=args.boxsize,
                             seed=args.seed, redshift=args.redshift, density=args.density, prefix=args.prefix)
    for name, files in paths.items():
        print(f"{name}: {len(files)} files, e.g. {files[0]}")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from map2map.demo import DemoOptions

    d = DemoOptions()
    p = sub.add_parser("demo", help="run the whole pipeline on example data: synth, convert, train, infer, report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Synthesize 1LPT/2LPT displacement boxes, convert them, train a small V-Net, "
                                   "predict the held-out box with Dask, and compare it with the truth and with "
                                   "the trivial prediction (the input).")
    p.add_argument("outdir", nargs="?", default=d.outdir, help="directory for everything the demo writes")
    p.add_argument("--ngrid", type=int, default=d.ngrid, help="grid cells per box side")
    p.add_argument("--boxsize", type=float, default=d.boxsize, help="box side in Mpc/h")
    p.add_argument("--train-boxes", type=int, default=d.train_boxes, help="training boxes")
    p.add_argument("--crop", type=int, default=d.crop, help="training crop and inference tile")
    p.add_argument("--width", type=int, default=d.width, help="V-Net width (channels of its first level)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data and the training")
    p.add_argument("--workers", type=int, default=d.workers, help="Dask workers for inference")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from map2map import demo

    opts = {k: getattr(args, k) for k in ("ngrid", "boxsize", "train_boxes", "crop", "width", "epochs",
                                          "batch_size", "lr", "seed", "workers")}
    demo.run(demo.DemoOptions(outdir=args.outdir, **opts))


def _subcommands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Every subcommand's parser builder; larger ones live in their own module of this package."""
    from map2map.cli import infer_args, train_args

    return [_add_demo, _add_synth, _add_convert, _add_info, train_args.add_train, infer_args.add_infer,
            infer_args.add_test]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="m2m", description="map2map: neural-network emulators for large gridded fields")
    from map2map import __version__

    parser.add_argument("--version", action="version", version=f"map2map {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in _subcommands():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as exc:
        sys.stderr.write(f"m2m {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"m2m {args.command}: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
