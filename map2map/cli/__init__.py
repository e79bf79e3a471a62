"""Command-line parsing for every `m2m` subcommand: arguments become a stage's config, nothing else.

Each subcommand's parser names its stage (``set_defaults(stage=...)``);
`map2map.cli.configs` turns the parsed arguments into that stage's frozen
config, `main` calls the stage's ``run(config)`` and prints the summary's
lines.  Small subcommands are parsed here; the larger ones have a module of
their own (`convert_args`, `synth_args`, `train_args`, `infer_args`).

Every failure is one line on stderr (`main` is the one place that says what
went wrong; stages raise, they never print errors):

* a `UserError` (bad input): ``m2m CMD: error: ...``, exit status 2; argparse's
  own errors are shortened to one line too;
* an exception raised in the user's code (a ``--callback-at`` module, a
  model, a norm; see `map2map.errors`): ``m2m CMD: error in your code at
  FILE:LINE: Type: message``, exit status 2;
* the machine running out of memory or disk space: ``m2m CMD: error: out
  of ...``, exit status 1;
* ``Ctrl-C``: ``m2m CMD: interrupted``, exit status 130;
* a closed output pipe (``m2m info STORE | head -1``): nothing, exit status
  141 (128 + SIGPIPE, as a program the signal ends);
* anything else is a bug in map2map: ``m2m CMD: internal error (a bug in
  map2map): Type: message; traceback in LOG``, exit status 1, the traceback
  written to a new file under ``$XDG_STATE_HOME/map2map`` (default
  ``~/.local/state/map2map``; the temporary directory if that cannot be
  written).

``m2m --debug CMD ...`` or ``M2M_DEBUG=1`` prints the full traceback on stderr
as well, for every kind, and writes no log file.
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from typing import Callable, Sequence

from map2map.cli.configs import stage_of
from map2map.errors import UserCodeError, UserError, describe, is_resource_error, one_line, user_code_error

EXIT_USER = 2  # bad input, or the user's code failed (as argparse exits for bad arguments)
EXIT_FAILED = 1  # a bug in map2map, or the machine ran out of memory or space
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
MESSAGE_MOST = 600  # characters of another's exception message shown in the line (all of it in the log)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as every user error
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a store (fields, shapes, chunks, sizes, completeness) or a "
                                    "checkpoint (model card, epoch, losses, parameters)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", metavar="STORE|CHECKPOINT",
                   help="path or URL (s3://bucket/train.zarr, ...) of a store, or path of a checkpoint file")
    p.add_argument("--storage-options", metavar="JSON", default=None,
                   help="keyword arguments of the object storage backend for a URL STORE, as a JSON object, "
                        "e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'")
    p.set_defaults(stage=("map2map.info", "InfoConfig"))


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from map2map.demo import DEFAULTS, SR_DEFAULTS, SR_FACTOR, DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="run the whole pipeline on example data: synth, convert, train, infer, report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Synthesize 1LPT/2LPT displacement boxes, convert them, train a small V-Net, "
                                   "predict the held-out box with Dask, and compare it with the truth and with "
                                   "the trivial prediction (the input).  With --sr F: synthesize coarse and F "
                                   "times finer 2LPT displacements, train the super-resolution generator G, and "
                                   "compare its prediction on the fine grid with the truth and with the coarse "
                                   "field interpolated trilinearly.")

    def sized(option: str, kind: type, what: str) -> None:
        """An option whose default depends on --sr (left out of the namespace when not given)."""
        key = option[2:].replace("-", "_")
        p.add_argument(option, type=kind, default=argparse.SUPPRESS,
                       help=f"{what} (default: {DEFAULTS[key]}; with --sr {SR_DEFAULTS[key]})")

    p.add_argument("outdir", nargs="?", default=d.outdir, help="directory for everything the demo writes")
    sized("--ngrid", int, "grid cells per box side (with --sr, of the coarse grid)")
    sized("--boxsize", float, "box side in Mpc/h")
    sized("--train-boxes", int, "training boxes")
    sized("--crop", int, "training crop and inference tile (with --sr, in coarse cells)")
    sized("--width", int, "V-Net width (channels of its first level); with --sr, G's channels per level")
    sized("--epochs", int, "training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data and the training")
    p.add_argument("--workers", type=int, default=d.workers, help="Dask workers for inference")
    p.add_argument("--sr", type=int, nargs="?", const=SR_FACTOR, default=None, metavar="F",
                   help=f"run the super-resolution demo with refinement factor F (a power of 2; {SR_FACTOR} "
                        f"without a value)")
    p.add_argument("--adv", action="store_true",
                   help="with --sr: train G against a PatchGAN discriminator (m2m train --adv-model PatchGAN)")
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
    parser.add_argument("--debug", action="store_true",
                        help="on failure, also print the full traceback (as M2M_DEBUG=1 does)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in _subcommands():
        add(sub)
    return parser


def debug_wanted(args: argparse.Namespace) -> bool:
    """``--debug`` given, or M2M_DEBUG set to anything but empty, 0, false, no or off."""
    env = os.environ.get("M2M_DEBUG", "").strip().lower()
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "no", "off")


def crash_log_dir() -> str:
    """Where tracebacks of bugs are written: ``$XDG_STATE_HOME/map2map``, default ``~/.local/state/map2map``."""
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the XDG rule: a relative value is ignored
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "map2map")


def save_traceback(exc: BaseException, argv: Sequence[str]) -> str:
    """Write `exc`'s traceback, with the command line and versions, to a new file; return its path.

    An `OSError` if neither `crash_log_dir()` nor the temporary directory can
    take it.
    """
    from map2map import __version__

    text = (f"m2m {shlex.join(argv)}\n"
            f"map2map {__version__}, Python {platform.python_version()}, {platform.platform()}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}, pid {os.getpid()}\n\n"
            + "".join(traceback.format_exception(exc)))
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-"
    try:
        os.makedirs(crash_log_dir(), mode=0o700, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=name, suffix=".log", dir=crash_log_dir())
    except OSError:
        fd, path = tempfile.mkstemp(prefix=f"map2map-{name}", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _clip(text: str, most: int = MESSAGE_MOST) -> str:
    """`text` cut to `most` characters, saying so (an exception's message can be a whole tensor dump)."""
    return text if len(text) <= most else text[:most - 15] + " ... (cut short)"


def _say(line: str) -> None:
    """Write `line` on stderr; if stderr is gone (a closed pipe), there is no one left to tell."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # ValueError: stderr already closed
        pass


def _quiet_broken_pipe() -> None:
    """Point the closed stream (stdout, else stderr) at /dev/null, so that Python's own flush at exit
    does not report the closed pipe again (as the `signal` module's documentation advises)."""
    try:
        sys.stdout.flush()
        stream = sys.stderr  # stdout takes output: the closed pipe was stderr
    except (BrokenPipeError, ValueError):
        stream = sys.stdout
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a real file (e.g. captured by a test): nothing flushes it at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def failure(prog: str, exc: BaseException, argv: Sequence[str], debug: bool) -> int:
    """Say in one line on stderr what `exc` means (see the module docstring); return the exit status."""
    if isinstance(exc, BrokenPipeError):
        _quiet_broken_pipe()
        return EXIT_BROKEN_PIPE
    if debug:
        _say("".join(traceback.format_exception(exc)).rstrip())
    if isinstance(exc, KeyboardInterrupt):
        _say(f"{prog}: interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, UserCodeError):
        _say(f"{prog}: {exc}")
        return EXIT_USER
    if isinstance(exc, UserError):
        _say(f"{prog}: error: {one_line(exc)}")
        return EXIT_USER
    code_error = user_code_error(exc)
    if code_error is not None:
        _say(f"{prog}: {_clip(str(code_error))}")
        return EXIT_USER
    if is_resource_error(exc):
        what = "memory" if isinstance(exc, MemoryError) or exc.errno == errno.ENOMEM else "disk space or quota"
        _say(f"{prog}: error: out of {what}: {_clip(describe(exc))}")
        return EXIT_FAILED
    if debug:
        where = "traceback above"
    else:
        try:
            where = f"traceback in {save_traceback(exc, argv)}"
        except OSError as err:
            where = f"traceback not saved ({describe(err)}); rerun with m2m --debug to see it"
    _say(f"{prog}: internal error (a bug in map2map): {_clip(describe(exc))}; {where}")
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    prog = f"m2m {args.command}"
    try:
        module, config = stage_of(args)
        summary = module.run(config)
        for line in summary.lines():
            print(line)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at interpreter exit
    except (Exception, KeyboardInterrupt) as exc:  # the one place that reports failures (module docstring)
        return failure(prog, exc, argv, debug_wanted(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
