"""Compiling kvcore's kernels (CuPy's NVRTC, once per device) and launching them.

Only imported when a CUDA device is asked for (``import kvcore`` never imports CuPy).
Launches go through :class:`kvcore._launch.KernelLauncher`, which calls the driver's
``cuLaunchKernel`` from C on the stream it is given; CuPy is used to compile and to find
the ``CUfunction`` handles, never to pick a stream.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

from kvcore._launch import KernelLauncher
from kvcore.backends._sources import KERNEL_FILE, kernel_source_dir
from kvcore.backends.kernel_abi import KERNELS
from kvcore.errors import BackendUnavailableError, KernelError

try:
    import cupy
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise BackendUnavailableError(
        "the CUDA backend needs CuPy: pip install 'kvcore[cuda12]' or 'kvcore[cuda13]' "
        "(from a checkout: '.[cuda12]' / '.[cuda13]')"
    ) from exc

__all__ = ["cuda_device_count", "launcher", "load_module"]

_modules: dict[int, cupy.RawModule] = {}
_modules_lock = threading.Lock()
_launch_kernel_address: int | None = None


def cuda_device_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


def load_module(device_id: int) -> cupy.RawModule:
    """Compile (once per device) and return the kvcore kernel module."""
    with _modules_lock:
        module = _modules.get(device_id)
        if module is not None:
            return module
        source_dir = kernel_source_dir()
        if source_dir is None:
            raise KernelError(f"cannot find {KERNEL_FILE}: neither kvcore/_cuda/ nor cuda/ "
                              "beside the package holds it (a broken install?)")
        code = (source_dir / KERNEL_FILE).read_text()
        with cupy.cuda.Device(device_id):
            try:
                module = cupy.RawModule(code=code, options=("-std=c++17", f"-I{source_dir}"))
                module.compile()
            except Exception as exc:  # NVRTC errors come as several CuPy types
                raise KernelError(f"compiling {source_dir / KERNEL_FILE} failed: {exc}") from exc
        _modules[device_id] = module
        return module


def launch_kernel_address() -> int:
    """Address of the driver's ``cuLaunchKernel`` (libcuda is already loaded by CuPy)."""
    global _launch_kernel_address
    if _launch_kernel_address is None:
        names = ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")]
        for name in filter(None, names):
            try:
                library = ctypes.CDLL(name)
            except OSError:
                continue
            _launch_kernel_address = ctypes.cast(library.cuLaunchKernel, ctypes.c_void_p).value
            break
        else:
            raise BackendUnavailableError("cannot load the CUDA driver library (libcuda.so.1)")
    return _launch_kernel_address


def _raise_launch_error(status: int) -> None:
    try:
        name = str(cupy.cuda.driver.CUDADriverError(status))   # "CUDA_ERROR_...: text"
    except Exception:
        name = f"CUresult {status}"
    hint = (" (is the cache's device the current CUDA device?)"
            if status in (400, 201) else "")    # INVALID_HANDLE, INVALID_CONTEXT
    raise KernelError(f"cuLaunchKernel failed: {name}{hint}")


def launcher(device_id: int, op: str, width: int, bound: dict) -> KernelLauncher:
    """A launcher for ``kvcore_<op>_w<width>`` with its bound arguments set.

    ``bound`` maps every bound argument name of ``KERNELS[op]`` to its value.
    """
    abi = KERNELS[op]
    if set(bound) != set(abi.bound_names):
        raise ValueError(f"{op}: bound arguments {sorted(bound)} != {sorted(abi.bound_names)}")
    function = load_module(device_id).get_function(f"kvcore_{op}_w{width}")
    values = tuple(int(bound[name]) for name in abi.bound_names)
    return KernelLauncher(launch_kernel_address(), int(function.kernel.ptr), abi.kinds, values,
                          _raise_launch_error)
