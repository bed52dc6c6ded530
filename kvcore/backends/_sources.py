"""Where the CUDA kernel sources are, without importing CuPy.

Installed wheel: ``kvcore/_cuda/`` (copied there by setup.py). Editable install or
source checkout: ``cuda/`` beside the ``kvcore`` package.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["KERNEL_FILE", "kernel_source_dir"]

KERNEL_FILE = "kvcore_kernels.cu"


def kernel_source_dir() -> Path | None:
    """Return the folder holding ``kvcore_kernels.cu``, or None when it cannot be found."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_cuda", package.parent / "cuda"):
        if (candidate / KERNEL_FILE).is_file():
            return candidate
    return None
