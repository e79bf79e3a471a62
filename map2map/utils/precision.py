"""Numeric precision of a run: mixed precision (``--amp``) and TensorFloat-32 (``--tf32``).

Terms:

* *amp mode*: ``off`` (every operation in float32, the only mode whose runs
  repeat bit for bit), ``bf16`` or ``fp16``: under `autocast` the operations
  torch lists as safe (convolutions, matrix products) run in that 16-bit type,
  the others (losses, reductions) stay in float32.  Parameters, gradients and
  optimizer states stay float32 in every mode.
* *loss scaling*: fp16 has a narrow exponent range, so small gradients would
  underflow to zero; a `torch.amp.GradScaler` multiplies the loss before the
  backward pass, divides the gradients before the optimizer step, skips steps
  whose gradients overflowed and adapts its scale.  Its state belongs in
  checkpoints, so a resumed run continues with the same scale.  bf16 has
  float32's exponent range and needs no scaling.
* *TF32*: on NVIDIA GPUs from Ampere on, float32 matrix products and
  convolutions may round their inputs to a 10-bit mantissa (TensorFloat-32):
  several times faster, and results that differ from CPU ones in about the
  third significant digit.  PyTorch's defaults: off for matrix products, on
  for cuDNN convolutions.  No effect on CPU.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator

import torch

from map2map.errors import UserError

AMP_MODES = ("off", "bf16", "fp16")
TF32_MODES = ("on", "off")  # None: PyTorch's own defaults
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str) -> None:
    """Refuse an unknown amp mode (one line)."""
    if amp not in AMP_MODES:
        raise UserError(f"--amp {amp!r}: expected one of {', '.join(AMP_MODES)}")


def autocast(device: torch.device, amp: str) -> ContextManager:
    """The context to run forward passes and losses in: torch's autocast to the amp mode's type on
    `device`'s type, or nothing at all for ``off`` (so float32 runs are untouched)."""
    check_amp(amp)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 on `device`'s type; None for the other modes (which need none)."""
    check_amp(amp)
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def slow_bf16(device: torch.device) -> str | None:
    """Why bf16 would be slow on `device` (a GPU older than Ampere emulates it), or None."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bf16 units: "
            "torch emulates bf16 there, slowly; --amp fp16 is native on it")


def check_tf32(mode: str | None) -> None:
    """Refuse an unknown ``--tf32`` value (one line)."""
    if mode is not None and mode not in TF32_MODES:
        raise UserError(f"--tf32 {mode!r}: expected on or off (leave it out for PyTorch's defaults)")


# The flags are read and set through torch's original `allow_tf32` attributes: torch 2.9 added
# `fp32_precision` attributes, and reading either kind after setting the other raises, while values
# set through `allow_tf32` read back through both.

def tf32_flags() -> tuple[bool, bool]:
    """Whether TF32 is allowed now for (float32 matrix products, cuDNN convolutions)."""
    return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def tf32(mode: str | None) -> Iterator[tuple[bool, bool]]:
    """Allow (``on``) or forbid (``off``) TF32 for matrix products and cuDNN convolutions while inside;
    None keeps PyTorch's settings.  Yields the flags in force (`tf32_flags`); restores the previous ones."""
    check_tf32(mode)
    if mode is None:
        yield tf32_flags()
        return
    before = tf32_flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "on"
    try:
        yield tf32_flags()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def tf32_text(mode: str | None, flags: tuple[bool, bool], device: torch.device) -> str:
    """The TF32 settings in force, for the log: e.g. ``TF32 matmul off, cuDNN conv on (PyTorch's defaults)``."""
    matmul, cudnn = ("on" if f else "off" for f in flags)
    where = "PyTorch's defaults" if mode is None else f"--tf32 {mode}"
    return f"TF32 matmul {matmul}, cuDNN conv {cudnn} ({where}" + ("; no effect on cpu)" if device.type == "cpu"
                                                                   else ")")
