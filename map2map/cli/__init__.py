"""Command-line parsing for every `m2m` subcommand: arguments become a stage's config, nothing else.

Each subcommand's parser names its stage (``set_defaults(stage=...)``);
`map2map.cli.configs` turns the parsed arguments into that stage's frozen
config, `main` calls the stage's ``run(config)`` and prints the summary's
lines.  Small subcommands are parsed here; the larger ones have a module of
their own (`convert_args`, `synth_args`, `train_args`, `infer_args`).

A `UserError` from any subcommand is printed as one line on stderr with exit
status 2 and no traceback; argparse's own errors are shortened to one line too.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from map2map.cli.configs import stage_of
from map2map.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as every user error
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a store (fields, shapes, chunks, sizes, completeness) or a "
                                    "checkpoint (model card, epoch, losses, parameters)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", metavar="STORE|CHECKPOINT", help="path of a store or of a checkpoint file")
    p.set_defaults(stage=("map2map.info", "InfoConfig"))


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from map2map.demo import DemoConfig

    d = DemoConfig()
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
    p.set_defaults(stage=("map2map.demo", "DemoConfig"))


def _subcommands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Every subcommand's parser builder; larger ones live in their own module of this package."""
    from map2map.cli import convert_args, infer_args, synth_args, train_args

    return [_add_demo, synth_args.add_synth, convert_args.add_convert, _add_info, train_args.add_train, infer_args.add_infer,
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
        module, config = stage_of(args)
        summary = module.run(config)
        for line in summary.lines():
            print(line)
    except UserError as exc:
        sys.stderr.write(f"m2m {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"m2m {args.command}: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
