"""The global bypass: adding the (narrowed) input to a model's output.

With in_chan == out_chan a model can learn the correction to its input (e.g.
N-body minus Zel'dovich displacement) rather than the whole field, which
trains faster.  `bypass=None` means "on exactly when the channels match".
"""

from __future__ import annotations


def resolve_bypass(bypass: bool | None, in_chan: int, out_chan: int) -> bool:
    """Return whether to add the input to the output; an explicit bypass needs in_chan == out_chan."""
    if bypass is None:
        return in_chan == out_chan
    if bypass and in_chan != out_chan:
        raise ValueError(f"bypass needs in_chan == out_chan, got {in_chan} and {out_chan}")
    return bool(bypass)
