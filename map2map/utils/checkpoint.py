"""Training checkpoints: atomic `state_{epoch}.pt` files, the `checkpoint.pt` link, and safe loading.

A state is a dict of tensors and plain Python values only, so that
``torch.load(path, weights_only=True)`` reads it (no arbitrary unpickling):

* ``epoch``: number of complete epochs (``state_3.pt`` holds ``epoch == 3``);
* ``model``: the model's ``state_dict`` (unwrapped from DDP);
* ``optimizer``, ``scheduler``: their ``state_dict`` (``scheduler`` may be None);
* ``rng``: one entry per rank, each ``{"torch", "cuda", "numpy", "python"}`` (see `rng_state`);
* ``min_loss``: the best epoch loss so far (validation if any, else training), or None;
* ``args``: the command-line arguments as JSON-compatible values;
* ``meta``: what inference needs to rebuild the model and its inputs (model name,
  channels, pads, scale factor, norms, ...).

Writing: the state goes to a hidden temporary file in the same directory,
is flushed and fsynced, then renamed over ``state_{epoch}.pt``; then a
temporary symlink to it is renamed over ``checkpoint.pt``.  A process killed
at any point leaves ``checkpoint.pt`` pointing at the previous complete state
(plus a stale temporary file, removed by `remove_stale`).
"""

from __future__ import annotations

import glob
import os
import random
import secrets
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from map2map.errors import UserError
from map2map.utils.durable import fsync_path

CKPT_LINK = "checkpoint.pt"
_TMP_PREFIX = ".m2m-tmp."


def state_name(epoch: int) -> str:
    """File name of the state after `epoch` complete epochs."""
    return f"state_{epoch}.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` `obj` to `path` through a temporary file in the same directory, fsynced, then renamed."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # permissions follow the umask
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)
    return path


def link_latest(target: str | os.PathLike, link: str | os.PathLike = CKPT_LINK) -> None:
    """Point the symlink `link` at `target` (a name in the same directory), replacing it atomically."""
    link = Path(link)
    tmp = link.with_name(f"{_TMP_PREFIX}{link.name}.{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.fspath(Path(target).name), tmp)
    os.replace(tmp, link)
    fsync_path(link.parent)


def save_state(state: Mapping[str, Any], directory: str | os.PathLike = ".") -> Path:
    """Write `state` as ``state_{state['epoch']}.pt`` in `directory` and link ``checkpoint.pt`` to it."""
    directory = Path(directory)
    path = atomic_save(dict(state), directory / state_name(int(state["epoch"])))
    link_latest(path.name, directory / CKPT_LINK)
    return path


def remove_stale(directory: str | os.PathLike = ".") -> list[str]:
    """Delete temporary files left by a process killed while writing; returns their names."""
    removed = []
    for tmp in glob.glob(os.path.join(os.fspath(directory), f"{_TMP_PREFIX}*")):
        try:
            os.unlink(tmp)
            removed.append(os.path.basename(tmp))
        except OSError:
            pass
    return removed


def read_state(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any] | None:
    """Load a state with ``weights_only=True``; None if `path` is missing, a dangling link, or empty."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or objects a safe load refuses
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read the state {str(path)!r}: {msg}") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise UserError(f"{str(path)!r} is not a map2map training state (needs 'model' and 'epoch')")
    return state


# ---------------------------------------------------------------- random number generators

def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states, as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "internal": list(py_state[1]), "gauss_next": py_state[2]},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states saved by `rng_state` (CUDA states only where the devices exist)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].cpu().numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


def seed_all(seed_words: list[int]) -> None:
    """Seed torch (all devices), numpy and Python RNGs from a list of non-negative integers."""
    seq = np.random.SeedSequence(seed_words)
    words = seq.generate_state(4, dtype=np.uint32)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(int(words[2]))
    random.seed(int(words[3]))


# ---------------------------------------------------------------- model states

def _shape(v: Any) -> list[int] | None:
    return list(v.shape) if isinstance(v, torch.Tensor) else None


def _summarize(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def match_model_state(model: nn.Module, saved: Mapping[str, Any], strict: bool,
                      source: str = "the state") -> tuple[dict[str, Any], list[str]]:
    """Check `saved` against `model`'s state dict; return the entries to load and notes on the rest.

    Strict: any missing key, unexpected key or shape mismatch raises one
    `UserError` listing them.  Non-strict: only entries whose key and shape
    match are returned, and the notes name what was skipped.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k} {_shape(saved[k])} vs {_shape(own[k])}" for k in own
              if k in saved and _shape(saved[k]) != _shape(own[k])]
    problems = []
    if shapes:
        problems.append(f"shape mismatch (checkpoint vs model): {_summarize(shapes)}")
    if missing:
        problems.append(f"missing in checkpoint: {_summarize(missing)}")
    if unexpected:
        problems.append(f"not in model: {_summarize(unexpected)}")
    if problems and strict:
        raise UserError(f"{source} does not fit the model: {'; '.join(problems)} "
                        "(check --in/--tgt fields, --model and --misc-kwargs, or load the matching "
                        "entries only with --load-state-non-strict)")
    keep = {k: v for k, v in saved.items() if k in own and _shape(v) == _shape(own[k])}
    return keep, problems


def load_model_state(model: nn.Module, saved: Mapping[str, Any], strict: bool,
                     source: str = "the state") -> list[str]:
    """Load `saved` into `model` (see `match_model_state`); returns notes on skipped entries."""
    keep, problems = match_model_state(model, saved, strict, source)
    model.load_state_dict(keep, strict=not problems)
    return problems
