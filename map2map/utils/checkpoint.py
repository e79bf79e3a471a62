"""Training checkpoints: atomic `state_{epoch}.pt` files, the `checkpoint.pt` link, and safe loading.

A state is a dict of tensors and plain Python values only, so that
``torch.load(path, weights_only=True)`` reads it (no arbitrary unpickling):

* ``epoch``: number of complete epochs (``state_3.pt`` holds ``epoch == 3``);
* ``model``: the model's ``state_dict`` (unwrapped from DDP);
* ``optimizer``, ``scheduler``: their ``state_dict`` (``scheduler`` may be None);
* ``rng``: one entry per rank, each ``{"torch", "cuda", "numpy", "python"}`` (see `rng_state`);
* ``scaler``: the fp16 loss scaler's ``state_dict`` (`torch.amp.GradScaler`) with ``--amp fp16``, else None
  (absent in older states);
* ``min_loss``: the best epoch loss so far (validation if any, else training), or None;
* ``losses``: one ``{"epoch", "train", "val", "lr"}`` per epoch so far;
* ``config``: the training config (`map2map.train.TrainConfig`) as JSON-compatible values;
* ``card``: the model card (`map2map.modelfit.ModelCard.to_dict`): what inference needs
  to rebuild the model and its inputs;
* ``adv``: only in runs with a discriminator (``--adv-model``, `map2map.adversary`): its ``model``,
  ``optimizer`` and ``scheduler`` (or None) state dicts and the instance-noise schedule ``noise``
  (``{"init_std", "batches", "drawn"}``).  A state without it resumes such a run with a fresh
  discriminator; inference reads ``model`` alone.

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
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from map2map.errors import UserError
from map2map.utils import durable

CKPT_LINK = "checkpoint.pt"


def state_name(epoch: int) -> str:
    """File name of the state after `epoch` complete epochs."""
    return f"state_{epoch}.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` `obj` to `path` through a temporary file in the same directory, fsynced, then renamed."""
    return Path(durable.atomic_write(path, lambda f: torch.save(obj, f)))


def link_latest(target: str | os.PathLike, link: str | os.PathLike = CKPT_LINK) -> None:
    """Point the symlink `link` at `target` (a name in the same directory), replacing it atomically."""
    link = Path(link)
    tmp = durable.temporary_name(link)
    os.symlink(os.fspath(Path(target).name), tmp)
    os.replace(tmp, link)
    durable.fsync_path(link.parent)


def save_state(state: Mapping[str, Any], directory: str | os.PathLike = ".") -> Path:
    """Write `state` as ``state_{state['epoch']}.pt`` in `directory` and link ``checkpoint.pt`` to it."""
    directory = Path(directory)
    path = atomic_save(dict(state), directory / state_name(int(state["epoch"])))
    link_latest(path.name, directory / CKPT_LINK)
    return path


def remove_stale(directory: str | os.PathLike = ".") -> list[str]:
    """Delete temporary files left by a process killed while writing; returns their names."""
    removed = []
    for tmp in glob.glob(os.path.join(os.fspath(directory), f"{durable.TMP_PREFIX}*")):
        try:
            os.unlink(tmp)
            removed.append(os.path.basename(tmp))
        except OSError:
            pass
    return removed


def load_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (no arbitrary unpickling), with one-line errors for a
    missing file and for a file that is not a checkpoint.  The one checkpoint reader of the package."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated, foreign or unsafe files
        text = " ".join(str(exc).split())
        if not zipfile.is_zipfile(path):
            why = "not a file torch.save wrote, or cut short"
        elif "weights_only" in text or "Unpickl" in type(exc).__name__:
            why = "torch cannot load it safely: it holds objects other than tensors and plain values"
        else:
            why = f"{type(exc).__name__}: {text[:160]}"
        raise UserError(f"{path} is not a readable checkpoint ({why})") from None


def unwrap_ddp(model_state: Mapping[str, Any]) -> dict[str, Any]:
    """A model state dict without the ``module.`` prefix that a `DistributedDataParallel` wrapper adds to
    every key (unchanged if not every key has it)."""
    prefix = "module."
    if model_state and all(k.startswith(prefix) for k in model_state):
        return {k[len(prefix):]: v for k, v in model_state.items()}
    return dict(model_state)


def read_state(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any] | None:
    """Load a training state; None if `path` is missing, a dangling link, or empty (nothing to resume).

    States written by the original toolkit's training are read too (their
    ``rng`` is torch's CPU generator state alone, see `restore_rng`), and the
    model state is unwrapped from DDP (`unwrap_ddp`).
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    state = load_file(path, map_location)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "epoch" not in state:
        raise UserError(f"{str(path)!r} is not a training state (needs 'model' and 'epoch', as m2m train and "
                        "the original toolkit's training write)")
    return dict(state, model=unwrap_ddp(state["model"]))


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
