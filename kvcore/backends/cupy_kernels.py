"""The CUDA backend: the pool in device memory, kernels from ``cuda/`` via cupy.RawModule.

Only imported when a CUDA device is asked for (``import kvcore`` never imports CuPy).
Modules are compiled once per device (NVRTC) and memoized. Launches are asynchronous on
CuPy's current stream: with device inputs, nothing here blocks the host, so a step can
be captured in a CUDA graph.
"""

from __future__ import annotations

import ctypes
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
_UNROLL = 4     # tokens per block trip in the scatter kernel (kvcore::UNROLL)

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


# Argument kinds of each kernel (extern "C" signatures in cuda/kvcore_kernels.cu):
# p = pointer, q = long long, i = int.
SIGNATURES = {
    "scatter": "ppqqqqpppqqiqiqqp",
    "gather": "ppppppppiqiqqqp",
    "copy_pages": "pppqqqqp",
}
_CTYPES = {"p": ctypes.c_void_p, "q": ctypes.c_int64, "i": ctypes.c_int32}
_NUMPY = {"p": None, "q": np.int64, "i": np.int32}


class DriverLauncher:
    """Launch one kernel through ``cuLaunchKernel`` with a reusable ctypes argument pack.

    CuPy's generic RawKernel call inspects and converts every argument on every launch
    (about a microsecond each); here the pack is built once, its trailing arguments
    (``tail``: values fixed for this cache and vector width) are set once, and a call
    sets only the leading ones. Arguments are Python ints: device pointers
    (``array.data.ptr``) for ``p`` and integers for ``q`` / ``i``. The driver copies
    the pack at launch, so reuse is safe, CUDA-graph capture included; a lock keeps two
    threads from interleaving their values.
    """

    def __init__(self, raw_kernel, signature: str, tail: tuple = ()):
        self._function = int(raw_kernel.kernel.ptr)
        # self._values keeps every holder alive: the pack points into their memory.
        self._values = values = [_CTYPES[kind]() for kind in signature]
        self._params = (ctypes.c_void_p * len(signature))(
            *[ctypes.addressof(v) for v in values])
        self._params_ptr = ctypes.addressof(self._params)
        self._leading = values[:len(signature) - len(tail)]
        for holder, value in zip(values[len(self._leading):], tail, strict=True):
            holder.value = value
        self._lock = threading.Lock()

    def __call__(self, grid: int, block: int, args) -> None:
        stream = cupy.cuda.get_current_stream().ptr
        with self._lock:
            for holder, value in zip(self._leading, args, strict=True):
                holder.value = value
            cupy.cuda.driver.launchKernel(self._function, grid, 1, 1, block, 1, 1, 0, stream,
                                          self._params_ptr, 0)


class CupyLauncher:
    """The same interface through CuPy's RawKernel call (a fallback if the driver path
    is unavailable in some CuPy build)."""

    def __init__(self, raw_kernel, signature: str, tail: tuple = ()):
        self._kernel = raw_kernel
        self._kinds = signature
        self._tail = tuple(tail)

    def __call__(self, grid: int, block: int, args) -> None:
        converted = tuple(
            ctypes.c_void_p(a) if kind == "p" else _NUMPY[kind](a)
            for kind, a in zip(self._kinds, (*args, *self._tail), strict=True))
        self._kernel((grid,), (block,), converted)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class PinnedUploader:
    """Copies small host index arrays to the device without blocking the host.

    A synchronous copy from pageable memory would wait for every kernel already queued
    (and take tens of µs); instead each array is copied into a pinned host ring and sent
    with one ``cudaMemcpyAsync`` into the matching region of a device ring, on the
    current stream. The ring has ``NUM_SEGMENTS`` segments; on leaving a segment an event
    is recorded, and before a segment is written again (one lap later) that event is
    waited for, so neither the pinned bytes nor the device bytes are overwritten while
    a queued copy or kernel may still read them. Kernels must run on the stream that
    was current for the upload (kvcore always launches on CuPy's current stream).

    Parameters
    ----------
    nbytes : int
        Ring size; arrays above a quarter of it fall back to ``cupy.asarray``.
    """

    NUM_SEGMENTS = 8
    ALIGN = 256

    def __init__(self, nbytes: int = 4 << 20):
        self._nbytes = nbytes
        self._segment = nbytes // self.NUM_SEGMENTS
        self._pinned = cupy.cuda.alloc_pinned_memory(nbytes)
        self._host = np.frombuffer(self._pinned, dtype=np.uint8, count=nbytes)
        self._device = cupy.empty(nbytes, dtype=np.uint8)
        self._offset = 0
        self._events: list = [None] * self.NUM_SEGMENTS

    def upload(self, array: np.ndarray):
        """Return a device copy of the C-contiguous NumPy ``array`` (same dtype and shape)."""
        nbytes = array.nbytes
        if nbytes > self._segment:
            return cupy.asarray(array)
        start = -(-self._offset // self.ALIGN) * self.ALIGN
        seg_of_start = start // self._segment
        if start + nbytes > (seg_of_start + 1) * self._segment:  # do not straddle segments
            start = (seg_of_start + 1) * self._segment
        if start + nbytes > self._nbytes:
            start = 0
        seg = start // self._segment
        prev_seg = max(self._offset - 1, 0) // self._segment
        if seg != prev_seg:
            event = cupy.cuda.Event(block=False, disable_timing=True)
            event.record()
            self._events[prev_seg] = event
            pending = self._events[seg]
            if pending is not None:
                pending.synchronize()
                self._events[seg] = None
        self._host[start:start + nbytes] = array.reshape(-1).view(np.uint8)
        stream = cupy.cuda.get_current_stream()
        cupy.cuda.runtime.memcpyAsync(self._device.data.ptr + start, self._pinned.ptr + start,
                                      nbytes, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
        self._offset = start + nbytes
        # ndarray over the ring's memory directly: CuPy slicing costs ~10 µs per call
        return cupy.ndarray(array.shape, array.dtype, memptr=self._device.data + start)


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
    array_type = cupy.ndarray

    def __init__(self, config: KVCacheConfig, device_id: int):
        self.config = config
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        with cupy.cuda.Device(device_id):
            self.module = load_module(device_id)
            self.kv = cupy.zeros(config.pool_shape, dtype=storage_dtype(config.dtype))
            self.error_word = cupy.zeros(1, dtype=np.int32)
            self.num_sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
            self.uploader = PinnedUploader()
            # Views made once: indexing a CuPy array costs microseconds per call.
            self._layer_pools = [(self.kv[layer, 0], self.kv[layer, 1])
                                 for layer in range(config.num_layers)]
        ps = config.page_size
        self._page_shift = ps.bit_length() - 1 if ps & (ps - 1) == 0 else -1
        self._functions = {}

    # -- arrays in and out ----------------------------------------------------------------

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
        """The launcher of ``kvcore_<op>_w<width>``, its per-cache arguments bound."""
        key = (op, width)
        fn = self._functions.get(key)
        if fn is None:
            cfg = self.config
            row_vecs = cfg.head_dim * self.kv.itemsize // width
            error_word = self.error_word.data.ptr
            tail = {
                "scatter": (cfg.num_pages * cfg.page_size, LAYOUT_CODE[cfg.layout],
                            cfg.page_size, self._page_shift, cfg.num_kv_heads, row_vecs,
                            error_word),
                "gather": (cfg.num_pages, LAYOUT_CODE[cfg.layout], cfg.page_size,
                           cfg.num_kv_heads, row_vecs, error_word),
                "copy_pages": (cfg.num_layers, cfg.num_pages,
                               cfg.page_elems * self.kv.itemsize // width, error_word),
            }[op]
            raw = self.module.get_function(f"kvcore_{op}_w{width}")
            with cupy.cuda.Device(self.device_id):
                try:
                    fn = DriverLauncher(raw, SIGNATURES[op], tail)
                except (AttributeError, TypeError):  # pragma: no cover - older CuPy
                    fn = CupyLauncher(raw, SIGNATURES[op], tail)
            self._functions[key] = fn
        return fn

    def _vector_width(self, row_bytes: int, *addresses_and_strides: int) -> int:
        """Widest vector (bytes) dividing the row and every pointer and stride."""
        combined = row_bytes
        for x in addresses_and_strides:
            combined |= x
        for width in VECTOR_WIDTHS:
            if width < self.kv.itemsize:
                break
            if combined % width == 0:
                return width
        return self.kv.itemsize

    def device_of(self, array) -> int:
        """CUDA ordinal that holds ``array`` (a CuPy array)."""
        return array.data.device_id

    def upload(self, array):
        """Device copy of a host index array (no host-device synchronization)."""
        if isinstance(array, cupy.ndarray):
            return array
        return self.uploader.upload(np.ascontiguousarray(array))

    # -- data movement ----------------------------------------------------------------------

    def write(self, layer: int, k, v, slot_mapping) -> None:
        """Scatter ``k``, ``v`` ``[T, H, D]`` (rows contiguous) to slots; one launch."""
        cfg = self.config
        num_tokens = k.shape[0]
        if num_tokens == 0:
            return
        if not isinstance(slot_mapping, cupy.ndarray):
            slot_mapping = self.upload(slot_mapping)
        k_pool, v_pool = self._layer_pools[layer]
        row_bytes = cfg.head_dim * self.kv.itemsize
        k_strides, v_strides = k.strides, v.strides
        width = self._vector_width(row_bytes, k.data.ptr, v.data.ptr, k_pool.data.ptr,
                                   k_strides[0], k_strides[1], v_strides[0], v_strides[1])
        row_vecs = row_bytes // width
        vecs_per_token = cfg.num_kv_heads * row_vecs
        block = min(_MAX_BLOCK, _round_up(vecs_per_token, 32))
        grid = max(1, min(-(-num_tokens // _UNROLL), self.num_sms * 32))
        self._function("scatter", width)(
            grid, block,
            (k.data.ptr, v.data.ptr, k_strides[0] // width, k_strides[1] // width,
             v_strides[0] // width, v_strides[1] // width, slot_mapping.data.ptr,
             k_pool.data.ptr, v_pool.data.ptr, num_tokens))

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
        k_pool, v_pool = self._layer_pools[layer]
        width = self._vector_width(row_bytes, k_pool.data.ptr, k_out.data.ptr, v_out.data.ptr)
        row_vecs = row_bytes // width
        block = min(_MAX_BLOCK, _round_up(cfg.num_kv_heads * row_vecs, 32))
        grid = max(1, min(nnz, self.num_sms * 32))
        indexes = [self.upload(a) for a in (page_indptr, page_indices, last_page_len,
                                            token_indptr)]
        self._function("gather", width)(
            grid, block,
            (k_pool.data.ptr, v_pool.data.ptr, *(a.data.ptr for a in indexes),
             k_out.data.ptr, v_out.data.ptr, len(last_page_len)))
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
        block = min(_MAX_BLOCK, _round_up(-(-page_vecs // _UNROLL), 32))
        grid = max(1, min(chunks, self.num_sms * 16))
        src_dev, dst_dev = self.upload(src), self.upload(dst)
        self._function("copy_pages", width)(
            grid, block,
            (self.kv.data.ptr, src_dev.data.ptr, dst_dev.data.ptr, num_pairs))
