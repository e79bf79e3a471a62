"""Normalization functions, looked up by dotted name such as ``cosmology.dis``.

A norm is ``f(x, undo=False, **kwargs)`` acting on a numpy array or torch
tensor, possibly in place, and returning it; ``undo=True`` is its exact
inverse.  Norms accept and ignore keyword arguments they do not use, because
the command line passes the same extra arguments to every norm.
"""

from . import cosmology, field

__all__ = ["cosmology", "field"]
