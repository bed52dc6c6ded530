"""Backends that own the pool and move bytes: NumPy (everywhere) and CuPy (CUDA).

:func:`make_backend` turns a ``device`` string into one. CuPy is imported only when a
CUDA device is asked for (or ``"auto"`` probes for one).
"""

from __future__ import annotations

import re

from kvcore.backends.numpy_ref import NumpyBackend
from kvcore.config import KVCacheConfig
from kvcore.errors import BackendUnavailableError

__all__ = ["NumpyBackend", "make_backend", "cuda_available"]

_CUDA_DEVICE = re.compile(r"^cuda(?::(\d+))?$")
_INSTALL_HINT = "pip install 'kvcore[cuda12]' or 'kvcore[cuda13]' (matching your CUDA driver)"


def _cupy_module():
    try:
        from kvcore.backends import cupy_kernels
    except BackendUnavailableError:
        raise
    except Exception as exc:  # a broken CuPy install raises many kinds of errors
        raise BackendUnavailableError(f"CuPy could not be imported ({exc}); {_INSTALL_HINT}") \
            from exc
    return cupy_kernels


def cuda_available() -> bool:
    """Whether CuPy imports and sees at least one CUDA device."""
    try:
        return _cupy_module().cuda_device_count() > 0
    except BackendUnavailableError:
        return False


def make_backend(config: KVCacheConfig, device: str = "auto"):
    """Create the backend for ``device``: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    TypeError
        ``device`` is not a string.
    ValueError
        An unknown device string.
    BackendUnavailableError
        CUDA asked for, but CuPy or a device (that device) is missing.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a string, got {type(device).__name__}")
    name = device.strip().lower()
    if name == "cpu":
        return NumpyBackend(config)
    if name == "auto":
        return make_backend(config, "cuda") if cuda_available() else NumpyBackend(config)
    match = _CUDA_DEVICE.match(name)
    if match is None:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    cupy_kernels = _cupy_module()
    count = cupy_kernels.cuda_device_count()
    if count == 0:
        raise BackendUnavailableError(f"device {device!r} asked for, but CuPy sees no CUDA "
                                      f"device (is the driver loaded?); {_INSTALL_HINT}")
    if match.group(1) is None:
        import cupy

        index = cupy.cuda.Device().id
    else:
        index = int(match.group(1))
    if index >= count:
        raise BackendUnavailableError(
            f"device {device!r} asked for, but only {count} CUDA device(s) are visible")
    return cupy_kernels.CupyBackend(config, index)
