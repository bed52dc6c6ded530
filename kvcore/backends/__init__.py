"""Backends that own the pool and move bytes: NumPy (everywhere) and CUDA.

:func:`make_backend` turns a ``device`` string (and, on CUDA, a framework and an
optional adopted pool) into one. CuPy is imported only when a CUDA device is asked for
(or ``"auto"`` probes for one); torch only when the torch framework is chosen.
"""

from __future__ import annotations

import re
import sys

from kvcore.backends.numpy_ref import NumpyBackend
from kvcore.config import KVCacheConfig
from kvcore.errors import BackendUnavailableError

__all__ = ["NumpyBackend", "cuda_available", "make_backend", "resolve_framework"]

_CUDA_DEVICE = re.compile(r"^cuda(?::(\d+))?$")
_INSTALL_HINT = ("install CuPy for your CUDA driver: pip install 'kvcore[cuda12]' or "
                 "'kvcore[cuda13]' (from a checkout: '.[cuda12]' / '.[cuda13]'), or "
                 "cupy-cuda12x / cupy-cuda13x directly")
FRAMEWORKS = ("torch", "cupy")


def _cuda_module():
    try:
        from kvcore.backends import cuda_kernels
    except BackendUnavailableError:
        raise
    except Exception as exc:  # a broken CuPy install raises many kinds of errors
        raise BackendUnavailableError(f"CuPy could not be imported ({exc}); {_INSTALL_HINT}") \
            from exc
    return cuda_kernels


def cuda_available() -> bool:
    """Whether CuPy imports and sees at least one CUDA device."""
    try:
        return _cuda_module().cuda_device_count() > 0
    except BackendUnavailableError:
        return False


def resolve_framework(framework, pool=None) -> str:
    """The framework a CUDA cache speaks: the one asked for; else the pool's (when one
    is adopted); else ``"torch"`` when the caller has imported torch, ``"cupy"`` if not.

    Raises
    ------
    ValueError
        An unknown framework name.
    """
    if framework is not None:
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework must be 'torch', 'cupy' or None, got {framework!r}")
        return framework
    if pool is not None:
        first = pool
        while isinstance(first, (list, tuple)) and first:
            first = first[0]
        return "torch" if type(first).__module__.startswith("torch") else "cupy"
    return "torch" if "torch" in sys.modules else "cupy"


def make_backend(config: KVCacheConfig, device: str = "auto", framework: str | None = None,
                 pool=None):
    """Create the backend for ``device``: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    TypeError
        ``device`` is not a string.
    ValueError
        An unknown device string or framework; a framework or pool for a CPU cache.
    BackendUnavailableError
        CUDA asked for, but CuPy (or torch, for ``framework="torch"``) or a device is
        missing.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a string, got {type(device).__name__}")
    name = device.strip().lower()
    if name == "auto":
        name = "cuda" if cuda_available() else "cpu"
    if name == "cpu":
        if framework not in (None, "numpy") or pool is not None:
            raise ValueError("a CPU cache keeps its pool in NumPy: framework and pool are for "
                             "CUDA caches (device='cuda')")
        return NumpyBackend(config)
    match = _CUDA_DEVICE.match(name)
    if match is None:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    framework = resolve_framework(framework, pool)
    cuda_kernels = _cuda_module()
    count = cuda_kernels.cuda_device_count()
    if count == 0:
        raise BackendUnavailableError(f"device {device!r} asked for, but CuPy sees no CUDA "
                                      f"device (is the driver loaded?); {_INSTALL_HINT}")
    if framework == "torch":
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailableError("framework='torch' needs torch installed") from exc
        if not torch.cuda.is_available():
            raise BackendUnavailableError("framework='torch' needs a CUDA build of torch")
    if match.group(1) is None:
        import cupy

        index = (torch.cuda.current_device() if framework == "torch"
                 else cupy.cuda.Device().id)
    else:
        index = int(match.group(1))
    if index >= count:
        raise BackendUnavailableError(
            f"device {device!r} asked for, but only {count} CUDA device(s) are visible")
    from kvcore.backends.cuda_backend import CudaBackend

    return CudaBackend(config, index, framework, pool)
