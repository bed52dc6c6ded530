"""Small helpers for arrays that come from other frameworks (torch, JAX, CuPy)."""

from __future__ import annotations

__all__ = ["bfloat16_as_int16"]


def bfloat16_as_int16(array):
    """Return a torch bfloat16 tensor as an int16 view of the same memory; else ``array``.

    NumPy and CuPy have no bfloat16 dtype of their own, and kvcore moves bfloat16 as
    2-byte words, so reinterpreting keeps DLPack / ``__array__`` interop zero-copy.
    """
    if type(array).__module__.startswith("torch") and str(getattr(array, "dtype", "")) == \
            "torch.bfloat16":
        import torch  # only reached when the caller already uses torch

        return array.view(torch.int16)
    return array
