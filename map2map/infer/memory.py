"""How much memory a forward pass takes, and the budget `--crop auto` fills.

Terms:

* a *probe*: one forward pass of the model on zeros of a given window shape
  (batch of one, eval mode, `torch.inference_mode`);
* its *peak*: the most bytes of tensors alive at once during the pass, beyond
  what was alive before it (the model's parameters and the probe's input are
  not in it).  On CUDA this is ``torch.cuda.max_memory_allocated`` (the
  caching allocator's own count: every tensor and every cuDNN workspace).
  Elsewhere, where torch keeps no such count, `LiveBytes` adds up the
  storages of the tensors the aten operators return, while they are
  referenced (a `TorchDispatchMode`).  It counts the same on a shape-only
  'meta' copy of the model as on the CPU, so the count costs no memory and
  no arithmetic at any window size.  Kernel-internal scratch buffers that
  never become tensors (e.g. a CPU convolution's unfolded input) are not
  seen: on the CPU the count is a lower bound, which the default budget's
  share leaves room for;
* a `Footprint`: the peak per input window voxel (see `footprint`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from map2map.errors import UserError

GIB = 1 << 30
CUDA_SHARE = 0.5  # of the GPU's free memory, for the forward passes that share it
CPU_SHARE = 0.4  # of the machine's available memory, for all forward passes of all workers


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages alive during the mode, counting those aten operators return, and their peak.

    Storages of the tensors in `existing` (the parameters, the input) are
    not counted when an operator returns a view of them.
    """

    def __init__(self, existing: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage -> [bytes, live tensors on it]
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()  # the C++ storage's address: unique while it lives
        if nbytes == 0 or key in self._existing:
            return
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [nbytes, 0]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._refs[key]
            self.live -= entry[0]


def probe_peak(model, in_chan: int, window: Sequence[int], device: torch.device) -> tuple[int, int]:
    """The peak (see the module docstring) of one forward pass of `model` (on `device`, "meta" included)
    on zeros of spatial `window`, and the bytes of its output."""
    from map2map.models.build import forward, zero_style

    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((1, in_chan, *window), device=device)
        style = zero_style(model, 1, device)  # a styled model's probe: its cost does not depend on the values
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                y = forward(model, x, style)
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - base
            else:
                counter = LiveBytes([x, *model.parameters(), *model.buffers()])
                with counter:
                    y = forward(model, x, style)
                peak = counter.peak
        return int(peak), y.numel() * y.element_size()
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Footprint:
    """Peak bytes of one forward pass per input window voxel, output bytes per window voxel, and how the
    peak was found."""

    per_voxel: float
    out_per_voxel: float
    how: str


def footprint(model, in_chan: int, large: Sequence[int], small: Sequence[int], device: torch.device) -> Footprint:
    """The `Footprint` for windows up to `large`, where forward passes run on `device`.

    The peak is counted by `LiveBytes` on a shape-only 'meta' copy of the
    model at the `large` window itself (no arithmetic, no memory): the bytes
    per voxel grow slowly with the window (a padding-free model's shrink
    matters less), so the largest window's figure bounds the smaller ones'.
    On CUDA a real probe of the `small` window scales it by what the
    allocator counted beyond the live tensors (workspaces), if more.  A
    model with no meta support gets a real probe of `small` on `device`.
    """
    from map2map.models.stride import meta_copy

    real_model = _on(model, device)
    try:
        meta = meta_copy(model)
        peak, out = probe_peak(meta, in_chan, large, torch.device("meta"))
    except (RuntimeError, TypeError, NotImplementedError):
        meta = None
    if meta is None:
        peak, out = probe_peak(real_model, in_chan, small, device)
        del real_model
        _release(device)
        return Footprint(peak / math.prod(small), out / math.prod(small),
                         f"a real forward pass of a {list(small)} window on {device.type}")
    how = f"live tensor bytes of a shape-only pass of the {list(large)} window"
    per_voxel = peak / math.prod(large)
    if device.type == "cuda":
        real, _ = probe_peak(real_model, in_chan, small, device)
        del real_model
        _release(device)
        counted, _ = probe_peak(meta, in_chan, small, torch.device("meta"))
        if counted and real > counted:
            per_voxel *= real / counted
            how += (f", times {real / counted:.2f}, the CUDA allocator's peak over that count for a "
                    f"{list(small)} window")
    return Footprint(per_voxel, out / math.prod(large), how)


def _release(device: torch.device) -> None:
    """Hand back what a probe cached on a CUDA `device`: the workers, other processes, need it."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _on(model, device: torch.device):
    """`model` if its parameters are on `device`, else a copy there (the caller's model stays where it is)."""
    import copy

    param = next(model.parameters(), None)
    if param is None or param.device == device:
        return model
    return copy.deepcopy(model).to(device)


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (each worker holds its own copy)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def probe_device(requested: str) -> torch.device:
    """Where the probes run: CUDA device 0 of this process if `requested` ("auto", "cuda", "cpu") allows it
    and one is usable, else the CPU."""
    if requested != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def default_budget(device: torch.device) -> tuple[int, str]:
    """Bytes the forward passes on `device` may use together by default, and how that was decided.

    CUDA: `CUDA_SHARE` of the GPU's free memory.  The rest covers what the
    probes cannot foresee: the caching allocator's rounding and
    fragmentation, a cuDNN algorithm with a larger workspace at the large
    size, the CUDA context (not counted by the allocator), the scaling from
    the small probe.
    CPU: `CPU_SHARE` of the memory available now (``MemAvailable``): the
    CPU count misses kernel scratch space and the allocator's overhead (the
    README gives the count against the measured peak resident memory; the
    narrower the model, the larger the shortfall), and the workers also hold
    input windows, outputs and encoded shards in flight.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(CUDA_SHARE * free), (f"{CUDA_SHARE:g} of the {free / GIB:.1f} GiB free on "
                                        f"{torch.cuda.get_device_name(device)}")
    import psutil

    avail = psutil.virtual_memory().available
    return int(CPU_SHARE * avail), f"{CPU_SHARE:g} of the {avail / GIB:.1f} GiB of memory available"


def budget_bytes(tile_memory: float | None, device: torch.device) -> tuple[int, str]:
    """`tile_memory` GiB if given (positive), else `default_budget`; and how it was decided."""
    if tile_memory is None:
        return default_budget(device)
    if not tile_memory > 0 or math.isinf(tile_memory):
        raise UserError(f"--tile-memory {tile_memory!r}: expected a positive number of GiB, e.g. 8")
    return int(tile_memory * GIB), f"--tile-memory {tile_memory:g} GiB"


