"""Progress bars: one rule for counting the last step, shared by every stage that shows a bar."""

from __future__ import annotations


def advance(bar, n: int) -> None:
    """Count `n` more units on the tqdm `bar`; the step that completes it is drawn only by closing the bar
    (tqdm draws the final line again on close, so drawing it here too would print it twice)."""
    if bar.total is not None and bar.n + n >= bar.total:
        bar.n += n
    else:
        bar.update(n)
