"""The CUDA backend: the pool in device memory, kernels from ``cuda/`` via cupy.RawModule.

Only imported when a CUDA device is asked for (``import kvcore`` never imports CuPy).
Modules are compiled once per device (NVRTC) and memoized. Launches are asynchronous on
CuPy's current stream: with device inputs, nothing here blocks the host, so a step can
be captured in a CUDA graph.
"""

from __future__ import annotations

import threading

import numpy as np

from kvcore._interop import bfloat16_as_int16
from kvcore.backends._sources import KERNEL_FILE, kernel_source_dir
from kvcore.backends.numpy_ref import storage_dtype
from kvcore.config import KVCacheConfig
from kvcore.errors import BackendUnavailableError, KernelError

try:
    import cupy
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise BackendUnavailableError(
        "the CUDA backend needs CuPy: pip install 'kvcore[cuda12]' or 'kvcore[cuda13]'"
    ) from exc

__all__ = ["CupyBackend", "load_module", "cuda_device_count"]

LAYOUT_CODE = {"NHD": 0, "HND": 1}
VECTOR_WIDTHS = (16, 8, 4, 2)   # bytes; one extern "C" entry point per width
_MAX_BLOCK = 256

_modules: dict[int, cupy.RawModule] = {}
_modules_lock = threading.Lock()


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


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class CupyBackend:
    """Pool in device memory, data movement as single kernel launches.

    Parameters
    ----------
    config : KVCacheConfig
        Shape of the pool.
    device_id : int
        CUDA device ordinal.
    """

    name = "cupy"
    xp = cupy

    def __init__(self, config: KVCacheConfig, device_id: int):
        self.config = config
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        with cupy.cuda.Device(device_id):
            self.module = load_module(device_id)
            self.kv = cupy.zeros(config.pool_shape, dtype=storage_dtype(config.dtype))
            self.error_word = cupy.zeros(1, dtype=np.int32)
            self.num_sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
        self._functions = {}

    # -- arrays in and out ----------------------------------------------------------------

    def is_native(self, array) -> bool:
        return isinstance(array, cupy.ndarray)

    def is_foreign_device_array(self, array) -> bool:
        return False

    def asarray(self, array):
        """Zero-copy view of a device array from CuPy, torch, JAX, ... (None if not one)."""
        if isinstance(array, cupy.ndarray):
            return array
        array = bfloat16_as_int16(array)
        if hasattr(array, "__cuda_array_interface__"):
            return cupy.asarray(array)
        if hasattr(array, "__dlpack__"):
            device = getattr(array, "__dlpack_device__", None)
            if device is not None and device()[0] not in (2, 3, 13):  # CUDA, pinned, managed
                return None
            return cupy.from_dlpack(array)
        return None

    def to_host(self, array) -> np.ndarray:
        return cupy.asnumpy(array)

    def synchronize(self) -> None:
        cupy.cuda.get_current_stream().synchronize()

    def take_error_word(self) -> int:
        """Read and clear the device error word (this synchronizes)."""
        value = int(self.error_word.get()[0])
        if value:
            self.error_word.fill(0)
        return value

    # -- launch helpers ---------------------------------------------------------------------

    def _function(self, op: str, width: int):
        key = (op, width)
        fn = self._functions.get(key)
        if fn is None:
            fn = self._functions[key] = self.module.get_function(f"kvcore_{op}_w{width}")
        return fn

    def _vector_width(self, row_bytes: int, *addresses_and_strides: int) -> int:
        for width in VECTOR_WIDTHS:
            if width < self.kv.itemsize:
                break
            if row_bytes % width == 0 and all(x % width == 0 for x in addresses_and_strides):
                return width
        return self.kv.itemsize

    def _pool(self, layer: int, which: int):
        return self.kv[layer, which]

    # -- data movement ----------------------------------------------------------------------

    def write(self, layer: int, k, v, slot_mapping) -> None:
        """Scatter ``k``, ``v`` ``[T, H, D]`` (rows contiguous) to slots; one launch."""
        cfg = self.config
        num_tokens = k.shape[0]
        if num_tokens == 0:
            return
        item = self.kv.itemsize
        k_pool, v_pool = self._pool(layer, 0), self._pool(layer, 1)
        row_bytes = cfg.head_dim * item
        width = self._vector_width(row_bytes, k.data.ptr, v.data.ptr, k_pool.data.ptr,
                                   k.strides[0], k.strides[1], v.strides[0], v.strides[1])
        row_vecs = row_bytes // width
        vecs_per_token = cfg.num_kv_heads * row_vecs
        block = min(_MAX_BLOCK, _round_up(vecs_per_token, 32))
        grid = max(1, min(num_tokens, self.num_sms * 32))
        self._function("scatter", width)(
            (grid,), (block,),
            (k, v, np.int64(k.strides[0] // width), np.int64(k.strides[1] // width),
             np.int64(v.strides[0] // width), np.int64(v.strides[1] // width),
             slot_mapping, k_pool, v_pool, np.int64(num_tokens),
             np.int64(cfg.num_pages * cfg.page_size), np.int32(LAYOUT_CODE[cfg.layout]),
             np.int64(cfg.page_size), np.int64(cfg.num_kv_heads), np.int64(row_vecs),
             self.error_word))

    def gather(self, layer: int, page_indptr, page_indices, last_page_len, token_indptr,
               total_tokens: int, nnz: int):
        """K and V of a batch, contiguous ``[total_tokens, H, D]`` device arrays; one launch.

        The index arrays may be NumPy (uploaded here) or already on the device;
        ``total_tokens`` and ``nnz`` (``page_indptr[-1]``) are passed in so that device
        index arrays are never read back.
        """
        cfg = self.config
        shape = (total_tokens, cfg.num_kv_heads, cfg.head_dim)
        k_out = cupy.empty(shape, dtype=self.kv.dtype)
        v_out = cupy.empty(shape, dtype=self.kv.dtype)
        if nnz == 0 or total_tokens == 0:
            return k_out, v_out
        item = self.kv.itemsize
        row_bytes = cfg.head_dim * item
        k_pool, v_pool = self._pool(layer, 0), self._pool(layer, 1)
        width = self._vector_width(row_bytes, k_pool.data.ptr, k_out.data.ptr, v_out.data.ptr)
        row_vecs = row_bytes // width
        block = min(_MAX_BLOCK, _round_up(cfg.num_kv_heads * row_vecs, 32))
        grid = max(1, min(nnz, self.num_sms * 32))
        self._function("gather", width)(
            (grid,), (block,),
            (k_pool, v_pool, cupy.asarray(page_indptr, dtype=np.int32),
             cupy.asarray(page_indices, dtype=np.int32),
             cupy.asarray(last_page_len, dtype=np.int32),
             cupy.asarray(token_indptr, dtype=np.int64), k_out, v_out,
             np.int32(len(last_page_len)), np.int64(cfg.num_pages),
             np.int32(LAYOUT_CODE[cfg.layout]), np.int64(cfg.page_size),
             np.int64(cfg.num_kv_heads), np.int64(row_vecs), self.error_word))
        return k_out, v_out

    def copy_pages(self, src, dst) -> None:
        """Copy page ``src[i]`` to ``dst[i]`` in every layer, K and V; one launch."""
        cfg = self.config
        num_pairs = int(src.shape[0])
        if num_pairs == 0:
            return
        page_bytes = cfg.page_elems * self.kv.itemsize
        width = self._vector_width(page_bytes, self.kv.data.ptr)
        page_vecs = page_bytes // width
        chunks = num_pairs * cfg.num_layers * 2
        block = min(_MAX_BLOCK, _round_up(page_vecs, 32))
        grid = max(1, min(chunks, self.num_sms * 16))
        self._function("copy_pages", width)(
            (grid,), (block,),
            (self.kv, cupy.asarray(src, dtype=np.int32), cupy.asarray(dst, dtype=np.int32),
             np.int64(num_pairs), np.int64(cfg.num_layers), np.int64(cfg.num_pages),
             np.int64(page_vecs), self.error_word))
