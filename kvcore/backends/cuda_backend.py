"""The CUDA backend: the pool in device memory, moved by kvcore's kernels.

Every operation takes the stream to run on (a ``cudaStream_t`` int, already resolved
by :class:`kvcore.KVCache` from the call's ``stream=`` or the framework's current
stream) and only enqueues work there. Nothing on a call's path waits for the device,
apart from :meth:`synchronize` and the rare wait for a staging buffer's earlier copy
(the pinned ring, StepMetadata); construction waits once. So a step with
device-resident index arrays can be captured in a CUDA graph (torch's or CuPy's).

Arrays come in as whatever the caller has (torch, CuPy, anything with
``__cuda_array_interface__`` or DLPack) and are read, not converted: a torch tensor
costs a handful of attribute reads. Temporaries (contiguous copies, large uploads,
``gather`` outputs) come from the framework's stream-ordered allocator on the stream of
the call, so their reuse is ordered after the kernels that read them.
"""

from __future__ import annotations

import ctypes

import numpy as np

from kvcore._checks import (
    check_host_slots,
    check_kv_shape,
    host_page_pair,
    kv_dtype_ok,
    takes,
)
from kvcore._launch import TorchScatter
from kvcore.backends.arrays import CupyFramework, TorchFramework, describe, stream_handle
from kvcore.backends.cuda_kernels import cupy, launcher, load_module
from kvcore.backends.kernel_abi import FP8_WIDTHS, VECTOR_WIDTHS
from kvcore.backends.pool_layout import adopt_layers
from kvcore.backends.uploads import PinnedRing, refuse_capture
from kvcore.config import KVCacheConfig
from kvcore.errors import BackendUnavailableError, KernelError, ShapeError

__all__ = ["CudaBackend"]

LAYOUT_CODE = {"NHD": 0, "HND": 1}
_MAX_BLOCK = 256
_UNROLL = 4     # tokens per block trip in the scatter kernel (kvcore::UNROLL)
_COPY_UNROLL = 8   # vectors per thread per trip of the page copies (kvcore::COPY_UNROLL)
_D2H = 2        # cudaMemcpyDeviceToHost
# swap_pages blocks per SM. PCIe, not the SMs, bounds a swap: on the H200, 1 to 16 blocks
# per SM (each with up to 32 KiB of loads in flight) all moved 52 GB/s out and 51 GB/s
# in, 93-95% of one contiguous cudaMemcpyAsync (benchmarks/bench_swap.py). Two keep a
# margin for host-read latency while leaving most of every SM to the kernels a swap
# overlaps with.
_SWAP_BLOCKS_PER_SM = 2
_SWAP_DIRECTIONS = {"out": 1, "in": 0}     # the kernel's to_host flag
_HOST_ALLOC_PORTABLE = 1    # cudaHostAllocPortable: pinned for every CUDA context
_HOST_ALLOC_MAPPED = 2      # cudaHostAllocMapped: addressable by the device
_EVENT_DISABLE_TIMING = 2   # cudaEventDisableTiming
_CUDA_SUCCESS = 0
_CUDA_ERROR_NOT_READY = 600


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _runtime_error(status: int) -> str:
    """``"cudaError...: text"`` for a CUDA runtime status."""
    try:
        return str(cupy.cuda.runtime.CUDARuntimeError(status))
    except Exception:
        return f"cudaError_t {status}"


def _pin_host_pool(config: KVCacheConfig, shape=None, dtype=None):
    """The host tier: ``(owner, array)``, a zero-filled NumPy view of ``shape`` (default
    ``config.host_pool_shape``) of ``dtype`` (default the storage dtype) over
    page-locked, device-mapped memory.

    Raises
    ------
    BackendUnavailableError
        The memory cannot be pinned, or the device does not see it at the host's address.
    """
    from cupy.cuda import pinned_memory

    shape = config.host_pool_shape if shape is None else shape
    dtype = np.dtype(config.storage_dtype if dtype is None else dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    # One cudaHostAlloc of our own, not torch's pinned allocator (which rounds every
    # block up to a power of two: a 24 GiB tier would pin 32 GiB) nor CuPy's pinned pool
    # (which keeps freed blocks pinned after the cache is gone). The tier is one
    # allocation for the cache's life, so a caching pool gives nothing; PinnedMemory
    # frees it with cudaFreeHost once the last view of it is dropped.
    try:
        memory = pinned_memory.PinnedMemory(nbytes, _HOST_ALLOC_PORTABLE | _HOST_ALLOC_MAPPED)
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise BackendUnavailableError(
            f"cannot pin {nbytes / 2**30:.2f} GiB of host memory for the host tier "
            f"(num_host_pages={config.num_host_pages}): {exc}") from exc
    # Under unified addressing (every 64-bit platform CUDA supports) the device reaches
    # mapped pinned memory at the host's own address; the swap kernel relies on it.
    attributes = cupy.cuda.runtime.pointerGetAttributes(memory.ptr)
    device_ptr = getattr(attributes, "devicePointer", memory.ptr)
    if device_ptr != memory.ptr:
        raise BackendUnavailableError("the host tier's pinned memory is mapped at another "
                                      "device address (no unified addressing)")
    owner = pinned_memory.PinnedMemoryPointer(memory, 0)
    ctypes.memset(memory.ptr, 0, nbytes)    # cudaHostAlloc does not promise zeroed memory
    host = np.frombuffer(owner, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)
    return owner, host


def _check_aligned(view, name: str) -> None:
    """Kernels read whole elements: an address that is not a multiple of the element
    size would fault (and take the CUDA context with it)."""
    if view.ptr % view.itemsize:
        raise ShapeError(f"{name} starts at address {view.ptr:#x}, not a multiple of its "
                         f"{view.itemsize}-byte element")


class CudaBackend:
    """Pool in device memory, data movement as single kernel launches.

    Parameters
    ----------
    config : KVCacheConfig
        Shape of the pool.
    device_id : int
        CUDA ordinal.
    framework : {"torch", "cupy"}
        Who allocates the pool, outputs and kvcore's device buffers, and whose current
        stream calls run on by default.
    pool : optional
        Per-layer tensors to adopt instead of allocating (see
        :func:`kvcore.backends.pool_layout.adopt_layers`); kvcore never frees them.
    """

    name = "cuda"

    def __init__(self, config: KVCacheConfig, device_id: int, framework: str, pool=None):
        self.config = config
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        self.framework = fw = (TorchFramework if framework == "torch" else CupyFramework)(
            device_id)
        self.array_type = fw.tensor_type
        with cupy.cuda.Device(device_id):
            load_module(device_id)
            self.num_sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
        if pool is None:
            self.kv = fw.zeros(config.pool_shape, config.dtype)
            layers = adopt_layers(config, self.kv)
        else:
            self.kv = None
            layers = adopt_layers(config, pool)
            if layers.device != device_id:
                raise ShapeError(f"the adopted pool is on device {layers.device}, the cache "
                                 f"on {self.device}")
        self.adopted = pool is not None
        self._layers = layers
        self.k_views, self.v_views = layers.k_views, layers.v_views
        self._k_ptrs, self._v_ptrs = layers.k_ptrs, layers.v_ptrs
        self._item = config.itemsize
        self._row_bytes = config.head_dim * self._item
        self._page_stride_bytes = layers.page_stride * self._item
        # Alignment every pool address and the page stride share, folded in once.
        self._pool_align = self._page_stride_bytes
        for ptr in (*layers.k_ptrs, *layers.v_ptrs):
            self._pool_align |= ptr
        self.error_word = fw.zeros((1,), "int32")
        self._error_ptr = describe(self.error_word).ptr
        # copy_pages copies each distinct pool once: layers of different groups may share
        # a slot (docs/groups.md), and a page id belongs to one group at a time. A
        # key-only pool's V pointers are 0: there is no V to copy.
        pools = np.array(list(dict.fromkeys(
            p for pair in zip(layers.k_ptrs, layers.v_ptrs, strict=True) for p in pair if p)),
            dtype=np.uint64)
        self._num_pools = int(pools.size)
        self._pool_table = fw.empty((pools.size,), "int64")
        cupy.cuda.runtime.memcpy(describe(self._pool_table).ptr, pools.ctypes.data,
                                 pools.nbytes, 1)
        self.uploader = PinnedRing(fw)
        self._init_scales(config)
        self._init_scale_pool(config)
        self._init_host_tier(config, layers)
        # The pool's zero fill and the buffers above were enqueued on the stream current
        # now; wait once, so first use on any other stream cannot race them.
        cupy.cuda.runtime.deviceSynchronize()
        ps = config.page_size
        self._page_shift = ps.bit_length() - 1 if ps & (ps - 1) == 0 else -1
        self._launchers: dict = {}
        # The framework's current-stream reader itself: one call per lookup.
        self.current_stream = fw.current_stream
        self.framework_name = fw.name
        # The C hot path moves K and V of a 16/32-bit pool as they are.
        plain = not (config.quantized or config.key_only)
        self.scatter_fast_path = (self._make_torch_scatter() if fw.name == "torch" and plain
                                  else None)

    def _init_scales(self, config: KVCacheConfig) -> None:
        """fp8 pools: the float32 ``[num_layers, 2]`` scale table the kernels read (every
        scale 1.0), and its host copy ``scales``."""
        self.scales = self.scale_table = None
        self._scale_ptr = 0
        if not config.quantized:
            return
        self.scales = np.ones((config.num_layers, 2), dtype=np.float32)
        self.scale_table = self.framework.empty((config.num_layers, 2), "float32")
        self._scale_ptr = describe(self.scale_table).ptr
        cupy.cuda.runtime.memcpy(self._scale_ptr, self.scales.ctypes.data, self.scales.nbytes,
                                 1)

    def _init_scale_pool(self, config: KVCacheConfig) -> None:
        """Per-(token, head) scales: the float32 side pool ``config.scale_pool_shape``
        (every scale 1.0), kvcore's own even when the K/V pool is adopted, and the
        table of its (slot, K/V) page-0 addresses that ``copy_pages`` / ``swap_pages``
        move scale pages with (a scale page is ``S * H * 4`` contiguous bytes)."""
        self.scale_pool = None
        self.scale_views = (None,) * config.num_layers
        self._k_scale_ptrs = self._v_scale_ptrs = (0,) * config.num_layers
        self._scale_pools = None
        if not config.token_head_scales:
            return
        shape = config.scale_pool_shape
        fw = self.framework
        if fw.name == "torch":
            self.scale_pool = fw.torch.ones(shape, dtype=fw.torch.float32, device=fw.device)
        else:
            with cupy.cuda.Device(self.device_id):
                self.scale_pool = cupy.ones(shape, dtype=np.float32)
        slots = [config.layer_slot(layer) for layer in range(config.num_layers)]
        self.scale_views = tuple(self.scale_pool[slot] for slot in slots)
        base = describe(self.scale_pool).ptr
        self._scale_page_bytes = config.page_size * config.num_kv_heads * 4
        chunk = config.num_pages * self._scale_page_bytes      # one (slot, K/V) pool
        kvs = config.tensors_per_token
        self._k_scale_ptrs = tuple(base + slot * kvs * chunk for slot in slots)
        self._v_scale_ptrs = (tuple(p + chunk for p in self._k_scale_ptrs) if kvs == 2
                              else (0,) * config.num_layers)
        pools = np.array([base + i * chunk for i in range(config.num_slots * kvs)],
                         dtype=np.uint64)
        self._scale_pools = fw.empty((pools.size,), "int64")
        cupy.cuda.runtime.memcpy(describe(self._scale_pools).ptr, pools.ctypes.data,
                                 pools.nbytes, 1)
        self._scale_width = next(w for w in VECTOR_WIDTHS if self._scale_page_bytes % w == 0)

    def _scale_launcher(self, op: str):
        """``copy_pages`` / ``swap_pages`` bound to the scale side pool (and its host
        tier): the same kernels, other pools and page sizes."""
        key = (op, "scales")
        fn = self._launchers.get(key)
        if fn is None:
            cfg = self.config
            width = self._scale_width
            vecs = self._scale_page_bytes // width
            common = {"page_stride": vecs, "error_word": self._error_ptr,
                      "num_pages": cfg.num_pages, "page_vecs": vecs,
                      "num_pools": cfg.num_slots * cfg.tensors_per_token}
            bound = (common if op == "copy_pages" else
                     dict(common, pools=describe(self._scale_pools).ptr,
                          host_pool=self.host_scales.ctypes.data,
                          num_host_pages=cfg.num_host_pages))
            with cupy.cuda.Device(self.device_id):
                fn = launcher(self.device_id, op, width, bound)
            self._launchers[key] = fn
        return fn

    def set_scales(self, layer: int, k_scale: np.float32, v_scale: np.float32) -> None:
        """Set layer ``layer``'s scales (checked by the facade) on the host and the device.

        The device is synchronized before the copy (work already queued on any stream
        used the old scales) and after it (work queued next uses the new ones).
        """
        runtime = cupy.cuda.runtime
        with cupy.cuda.Device(self.device_id):
            runtime.deviceSynchronize()
            self.scales[layer] = (k_scale, v_scale)
            row = self.scales[layer]
            runtime.memcpy(self._scale_ptr + layer * 8, row.ctypes.data, 8, 1)
            runtime.deviceSynchronize()

    def amax(self, array, name: str) -> float:
        """Largest magnitude of a float16 / bfloat16 K or V input (NaN if it holds one);
        waits for the device."""
        view = self._on_device(array, name)
        check_kv_shape(view.shape, self.config, name)
        if not kv_dtype_ok(self.config.model_dtype, view.dtype):
            raise ShapeError(f"{name} has dtype {view.dtype}, {takes(self.config)}")
        _check_aligned(view, name)
        with cupy.cuda.Device(self.device_id):
            cupy.cuda.runtime.deviceSynchronize()    # the caller's stream made the data
            if 0 in view.shape:
                return 0.0
            extent = 1 + sum((n - 1) * st for n, st in zip(view.shape, view.strides,
                                                            strict=True))
            memory = cupy.cuda.UnownedMemory(view.ptr, extent * 2, view.owner, self.device_id)
            words = cupy.ndarray(view.shape, dtype=np.uint16,
                                 memptr=cupy.cuda.MemoryPointer(memory, 0),
                                 strides=tuple(2 * st for st in view.strides))
            if self.config.model_dtype == "bfloat16":
                values = (words.astype(np.uint32) << 16).view(np.float32)
            else:
                values = words.view(np.float16).astype(np.float32)
            result = float(cupy.abs(values).max())
            cupy.cuda.runtime.deviceSynchronize()
        return result

    def _init_host_tier(self, config: KVCacheConfig, layers) -> None:
        """Pin the host tier (``host_kv``) and upload the (slot, K/V) pool table that
        ``swap_pages`` reads; no host tier when ``num_host_pages == 0``."""
        self.host_kv = self.host_scales = None
        self._host_owner = self._host_scales_owner = None
        self._host_ptr = 0
        self._swap_table = None
        self._swap_table_ptr = 0
        self._swap_pools = config.tensors_per_token * config.num_slots
        if not config.num_host_pages:
            return
        # Host page h holds slot j's K and V: for slot j, the pools of the first layer in
        # it. Layers of other groups in slot j must be that same memory (kvcore's own
        # pool always is): a page id belongs to one group at a time, but swap_copy is not
        # told which, so pools apart would leave one group's data behind.
        table = []
        first: dict[int, int] = {}
        for layer in range(config.num_layers):
            slot = config.layer_slot(layer)
            if slot not in first:
                first[slot] = layer
                continue
            other = first[slot]
            if (layers.k_ptrs[layer], layers.v_ptrs[layer]) != (layers.k_ptrs[other],
                                                                 layers.v_ptrs[other]):
                raise ShapeError(
                    f"layers {other} and {layer} share pool slot {slot} but not memory: a "
                    "host tier (num_host_pages > 0) needs the layers of one slot to be the "
                    "same K and V tensors")
        for slot in range(config.num_slots):
            layer = first[slot]
            table += [layers.k_ptrs[layer], layers.v_ptrs[layer]][:config.tensors_per_token]
        table = np.array(table, dtype=np.uint64)
        self._swap_table = self.framework.empty((table.size,), "int64")
        self._swap_table_ptr = describe(self._swap_table).ptr
        cupy.cuda.runtime.memcpy(self._swap_table_ptr, table.ctypes.data, table.nbytes, 1)
        with cupy.cuda.Device(self.device_id):
            self._host_owner, self.host_kv = _pin_host_pool(config)
            if config.token_head_scales:
                self._host_scales_owner, self.host_scales = _pin_host_pool(
                    config, config.host_scale_pool_shape, np.float32)
                self.host_scales.fill(1.0)
        self._host_ptr = self.host_kv.ctypes.data
        chunk = config.page_elems * self._item
        combined = chunk | self._pool_align | self._host_ptr
        self._swap_width = next((w for w in VECTOR_WIDTHS if w >= self._item and
                                 combined % w == 0), self._item)
        self._swap_block = min(_MAX_BLOCK, _round_up(
            -(-(chunk // self._swap_width) // _COPY_UNROLL), 32))

    # -- streams and launches -------------------------------------------------------------

    def _make_torch_scatter(self):
        """The C hot path of ``write`` for torch tensors (see :class:`TorchScatter`)."""
        torch = self.framework.torch
        launchers = tuple(self._launcher("scatter", w) if w >= self._item else None
                          for w in VECTOR_WIDTHS if w >= 2)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float32": torch.float32}[self.config.dtype]
        return TorchScatter(torch.Tensor, dtype, torch.int64, self.device_id,
                            self.config.num_kv_heads, self.config.head_dim, self._item,
                            self._pool_align, tuple(self._k_ptrs), tuple(self._v_ptrs),
                            launchers, self.num_sms * 32)

    def _launcher(self, op: str, width: int):
        key = (op, width)
        fn = self._launchers.get(key)
        if fn is None:
            cfg = self.config
            row_vecs = self._row_bytes // width
            page_stride = self._page_stride_bytes // width
            common = {"page_stride": page_stride, "error_word": self._error_ptr}
            bound = {
                "scatter": dict(common, num_slots=cfg.num_pages * cfg.page_size,
                                layout=LAYOUT_CODE[cfg.layout], page_size=cfg.page_size,
                                page_shift=self._page_shift, num_heads=cfg.num_kv_heads,
                                row_vecs=row_vecs),
                "gather": dict(common, num_pages=cfg.num_pages,
                               layout=LAYOUT_CODE[cfg.layout], page_size=cfg.page_size,
                               num_heads=cfg.num_kv_heads, row_vecs=row_vecs),
                "copy_pages": dict(common, num_pools=self._num_pools,
                                   num_pages=cfg.num_pages,
                                   page_vecs=cfg.page_elems * self._item // width),
                "scatter_fp8": dict(common, num_slots=cfg.num_pages * cfg.page_size,
                                    layout=LAYOUT_CODE[cfg.layout], page_size=cfg.page_size,
                                    page_shift=self._page_shift, num_heads=cfg.num_kv_heads,
                                    head_dim=cfg.head_dim,
                                    bf16=int(cfg.model_dtype == "bfloat16"),
                                    page_stride=self._page_stride_bytes),
                "scatter_fp8_th": dict(common, num_slots=cfg.num_pages * cfg.page_size,
                                       layout=LAYOUT_CODE[cfg.layout],
                                       page_size=cfg.page_size, page_shift=self._page_shift,
                                       num_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                       bf16=int(cfg.model_dtype == "bfloat16"),
                                       page_stride=self._page_stride_bytes),
                "gather_fp8": dict(common, num_pages=cfg.num_pages,
                                   layout=LAYOUT_CODE[cfg.layout], page_size=cfg.page_size,
                                   num_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                   bf16=int(cfg.model_dtype == "bfloat16"),
                                   page_stride=self._page_stride_bytes),
                "swap_pages": dict(common, pools=self._swap_table_ptr,
                                   host_pool=self._host_ptr, num_pools=self._swap_pools,
                                   num_pages=cfg.num_pages,
                                   num_host_pages=cfg.num_host_pages,
                                   page_vecs=cfg.page_elems * self._item // width),
            }[op]
            with cupy.cuda.Device(self.device_id):
                fn = launcher(self.device_id, op, width, bound)
            self._launchers[key] = fn
        return fn

    def _vector_width(self, combined: int) -> int:
        """Widest vector (bytes) dividing ``combined`` (rows, pointers, strides OR-ed)."""
        combined |= self._row_bytes | self._pool_align
        for width in VECTOR_WIDTHS:
            if width < self._item:
                break
            if combined % width == 0:
                return width
        return self._item

    # -- arrays in ------------------------------------------------------------------------

    def _kv_input(self, array, name: str, stream: int):
        """``(ptr, rows, stride_t, stride_h, keepalive)`` of a K or V ``[T, H, D]`` input;
        strides in elements. Rows must be contiguous: a copy is made (on ``stream``)
        otherwise."""
        view = self._on_device(array, name)
        check_kv_shape(view.shape, self.config, name)
        if not kv_dtype_ok(self.config.model_dtype, view.dtype):
            raise ShapeError(f"{name} has dtype {view.dtype}, {takes(self.config)}")
        array, view = self._last_axis_contiguous(array, view, name, stream)
        return view.ptr, view.shape[0], view.strides[0], view.strides[1], array

    def _on_device(self, array, name: str, view=None):
        """``array``'s ArrayView (``view`` when already read), which must be on this
        cache's device."""
        if view is None:
            view = describe(array, name)
        if view.device != self.device_id:
            where = "host memory" if view.device < 0 else f"cuda:{view.device}"
            raise ShapeError(f"{name} must be a CUDA array on {self.device}, got an array in "
                             f"{where} ({type(array).__name__})")
        return view

    def _last_axis_contiguous(self, array, view, name: str, stream: int):
        """``(array, view)`` with an aligned start and a contiguous last axis (a copy,
        made on ``stream``, when the last axis is strided)."""
        _check_aligned(view, name)
        if view.strides[-1] != 1 and view.shape[-1] > 1:
            array = self._contiguous(array, name, stream)
            view = describe(array, name)
        return array, view

    def _contiguous(self, array, name: str, stream: int):
        module = type(array).__module__
        if module.startswith("torch") or module.startswith("cupy"):
            fw = (self.framework if self.framework.tensor_type is type(array) else
                  (TorchFramework if module.startswith("torch") else CupyFramework)(
                      self.device_id))
            return fw.contiguous(array, stream)
        raise ShapeError(f"{name} has a non-contiguous last axis; make it contiguous first")

    def _device_index(self, array, name: str, dtype: str, length: int | None, stream: int,
                      view=None):
        """``(ptr, length, keepalive)`` of a 1-D device index array of ``dtype``
        (``view``: its ArrayView, when the caller has read it already)."""
        view = self._on_device(array, name, view)
        if view.dtype != dtype or len(view.shape) != 1 or (
                length is not None and view.shape[0] != length):
            want = f"[{length}]" if length is not None else "1-D"
            raise ShapeError(f"a device {name} must be {dtype} {want}, got {view.dtype} "
                             f"{view.shape}")
        array, view = self._last_axis_contiguous(array, view, name, stream)
        return view.ptr, view.shape[0], array

    def _device_view(self, array):
        """``array``'s ArrayView when it lives on a device (read once, reused by the
        caller), else None: lists, NumPy and anything that is not an array are host data."""
        if isinstance(array, (np.ndarray, list, tuple, int)):
            return None
        try:
            view = describe(array)
        except ShapeError:
            return None
        return view if view.device >= 0 else None

    def is_device_array(self, array) -> bool:
        """Whether ``array`` should be read as a device array (not a host index array)."""
        return self._device_view(array) is not None

    # -- data movement ----------------------------------------------------------------------

    def write(self, layer: int, k, v, slot_mapping, stream: int, metadata=None) -> None:
        """Scatter ``k``, ``v`` ``[T, H, D]`` to their slots on ``stream``; one launch.

        ``slot_mapping``: a device int64 ``[T]`` array, a host array (checked, then
        uploaded), or None with ``metadata`` (a StepMetadata: its slot buffer, whose
        entries past the step's tokens are -1).
        """
        fast = self.scatter_fast_path
        if fast is not None:     # plain torch tensors: checked and launched in C
            if metadata is not None:
                if fast.write(layer, k, v, None, metadata.slot_ptr, metadata.max_tokens,
                              stream):
                    return
            elif type(slot_mapping) is self.array_type and fast.write(
                    layer, k, v, slot_mapping, 0, 0, stream):
                return
        k_ptr, rows, k_st, k_sh, k_keep = self._kv_input(k, "k", stream)
        if self.config.key_only:
            if v is not None:
                raise ShapeError("v must be None: the cache is key-only (key_only=True, one "
                                 "tensor per token)")
            v_ptr, v_st, v_sh, v_keep = 0, 0, 0, None
        else:
            if v is None:
                raise ShapeError("v is None, but the cache holds K and V (key_only=False)")
            v_ptr, v_rows, v_st, v_sh, v_keep = self._kv_input(v, "v", stream)
            if v_rows != rows:
                raise ShapeError(f"k and v differ in shape: {rows} != {v_rows} tokens")
        keep = None
        if metadata is not None:
            slots_ptr = metadata.slot_mapping_ptr(rows)
        elif (slots_view := self._device_view(slot_mapping)) is not None:
            slots_ptr, _, keep = self._device_index(slot_mapping, "slot_mapping", "int64", rows,
                                                    stream, slots_view)
        else:
            slots = check_host_slots(slot_mapping, rows, self.config.num_pages *
                                     self.config.page_size)
            if rows == 0:
                return
            (slots_ptr,), keep = self.uploader.upload([np.ascontiguousarray(slots)], stream)
        if rows == 0:
            return
        if self.config.quantized:
            self._scatter_fp8(layer, stream, rows, slots_ptr, k_ptr, k_st, k_sh, v_ptr, v_st,
                              v_sh)
            del k_keep, v_keep, keep
            return
        item = self._item
        width = self._vector_width(k_ptr | v_ptr | (k_st * item) | (k_sh * item)
                                   | (v_st * item) | (v_sh * item))
        cfg = self.config
        vecs_per_token = cfg.num_kv_heads * (self._row_bytes // width)
        block = min(_MAX_BLOCK, _round_up(vecs_per_token, 32))
        grid = max(1, min(-(-rows // _UNROLL), self.num_sms * 32))
        self._launcher("scatter", width)(
            grid, block, stream, k_ptr, v_ptr, k_st * item // width, k_sh * item // width,
            v_st * item // width, v_sh * item // width, slots_ptr, self._k_ptrs[layer],
            self._v_ptrs[layer], rows)
        del k_keep, v_keep, keep

    def _fp8_width(self, combined_in: int, combined_out: int) -> int:
        """Most fp8 codes per vector ``E``: 2E-byte float16 / bfloat16 vectors must divide
        ``combined_in`` (pointers and strides in bytes, OR-ed) and E-byte code vectors
        ``combined_out``; rows and the pool's alignment are folded in here."""
        head_dim = self.config.head_dim
        combined_in |= 2 * head_dim
        combined_out |= head_dim | self._pool_align
        return next(e for e in FP8_WIDTHS
                    if combined_in % (2 * e) == 0 and combined_out % e == 0)

    def _scatter_fp8(self, layer, stream, rows, slots_ptr, k_ptr, k_st, k_sh, v_ptr, v_st,
                     v_sh) -> None:
        """Quantizing scatter: strides in elements of the 2-byte inputs."""
        cfg = self.config
        width = self._fp8_width(k_ptr | v_ptr | 2 * (k_st | k_sh | v_st | v_sh), 0)
        if cfg.token_head_scales:
            # one warp per (token, head) row, 8 warps per block
            grid = max(1, min(-(-rows * cfg.num_kv_heads // 8), self.num_sms * 32))
            self._launcher("scatter_fp8_th", width)(
                grid, 256, stream, k_ptr, v_ptr, k_st, k_sh, v_st, v_sh, slots_ptr,
                self._k_ptrs[layer], self._v_ptrs[layer], self._k_scale_ptrs[layer],
                self._v_scale_ptrs[layer], rows)
            return
        vecs_per_token = cfg.num_kv_heads * (cfg.head_dim // width)
        block = min(_MAX_BLOCK, _round_up(vecs_per_token, 32))
        grid = max(1, min(-(-rows // _UNROLL), self.num_sms * 32))
        self._launcher("scatter_fp8", width)(
            grid, block, stream, k_ptr, v_ptr, k_st, k_sh, v_st, v_sh, slots_ptr,
            self._k_ptrs[layer], self._v_ptrs[layer], self._scale_ptr + layer * 8, rows)

    def gather(self, layer: int, index, out, stream: int, raw: bool = False):
        """K and V of a batch into ``out`` (or new ``[total_tokens, H, D]`` arrays).

        ``index`` is either ``(page_indptr, page_indices, last_page_len, token_indptr,
        total_tokens, nnz)`` of host arrays (uploaded in one copy) or a StepMetadata
        (device buffers at their padded capacity; nothing is read back).
        """
        cfg = self.config
        keep = None
        if isinstance(index, tuple):
            page_indptr, page_indices, last_page_len, token_indptr, total, nnz = index
            batch = len(last_page_len)
            max_entries = nnz
        else:
            total, batch, max_entries = None, index.max_batch, index.max_pages
        dequantize = cfg.quantized and not raw
        out_dtype = cfg.model_dtype if dequantize else cfg.dtype
        if out is None:
            # with a StepMetadata, sized by its live step (known on the host)
            rows = total if total is not None else index.num_live_tokens
            shape = (rows, cfg.num_kv_heads, cfg.head_dim)
            out = (self.framework.empty(shape, out_dtype, stream),
                   None if cfg.key_only else self.framework.empty(shape, out_dtype, stream))
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ShapeError("out must be a (k_out, v_out) pair")
        k_out, v_out = out
        k_ptr, rows = self._out_array(k_out, "k_out", total, out_dtype)
        if cfg.key_only:
            if v_out is not None:
                raise ShapeError("out must be (k_out, None): the cache is key-only")
            v_ptr = 0
        else:
            v_ptr, v_rows = self._out_array(v_out, "v_out", total, out_dtype)
            if rows != v_rows:
                raise ShapeError(f"k_out and v_out differ in rows: {rows} != {v_rows}")
        if max_entries == 0 or batch == 0 or (total is not None and total == 0):
            return out
        if isinstance(index, tuple):
            (indptr_p, indices_p, last_p, tok_p), keep = self.uploader.upload(
                [np.ascontiguousarray(page_indptr, dtype=np.int32),
                 np.ascontiguousarray(page_indices, dtype=np.int32),
                 np.ascontiguousarray(last_page_len, dtype=np.int32),
                 np.ascontiguousarray(token_indptr, dtype=np.int64)], stream)
        else:
            indptr_p, indices_p, last_p, tok_p = index.gather_pointers()
        grid = max(1, min(max_entries, self.num_sms * 32))
        if dequantize:
            width = self._fp8_width(k_ptr | v_ptr, 0)
            block = min(_MAX_BLOCK, _round_up(cfg.num_kv_heads * (cfg.head_dim // width), 32))
            self._launcher("gather_fp8", width)(
                grid, block, stream, self._k_ptrs[layer], self._v_ptrs[layer], indptr_p,
                indices_p, last_p, tok_p, k_ptr, v_ptr, self._scale_ptr + layer * 8,
                self._k_scale_ptrs[layer], self._v_scale_ptrs[layer], batch, rows)
            del keep
            return out
        width = self._vector_width(k_ptr | v_ptr)
        block = min(_MAX_BLOCK, _round_up(cfg.num_kv_heads * (self._row_bytes // width), 32))
        self._launcher("gather", width)(
            grid, block, stream, self._k_ptrs[layer], self._v_ptrs[layer], indptr_p,
            indices_p, last_p, tok_p, k_ptr, v_ptr, batch, rows)
        del keep
        return out

    def _out_array(self, array, name: str, rows: int | None, dtype: str):
        view = self._on_device(array, name)
        check_kv_shape(view.shape, self.config, name)
        if rows is not None and view.shape[0] < rows:
            raise ShapeError(f"{name} has {view.shape[0]} rows, the batch holds {rows} tokens")
        if not kv_dtype_ok(dtype, view.dtype):
            what = ("the cache holds" if dtype == self.config.dtype else "the gather gives")
            raise ShapeError(f"{name} has dtype {view.dtype}, {what} {dtype}")
        if not view.is_contiguous():
            raise ShapeError(f"{name} must be contiguous, got strides {view.strides}")
        _check_aligned(view, name)
        return view.ptr, view.shape[0]

    def copy_pages(self, src, dst, stream: int) -> None:
        """Copy page ``src[i]`` to ``dst[i]`` in every layer, K and V, on ``stream``.

        Host ids are checked (nothing is copied on error); device int32 ids are
        range-checked by the kernel.
        """
        keep = None
        src_view, dst_view = self._device_view(src), self._device_view(dst)
        if src_view is not None or dst_view is not None:
            src_ptr, n, keep_s = self._device_index(src, "src", "int32", None, stream, src_view)
            dst_ptr, n_dst, keep_d = self._device_index(dst, "dst", "int32", None, stream,
                                                        dst_view)
            if n != n_dst:
                raise ValueError(f"src and dst differ in length: {n} != {n_dst}")
            keep = (keep_s, keep_d)
        else:
            src_arr, dst_arr = host_page_pair(src, dst, self.config.num_pages)
            n = src_arr.size
            if n == 0:
                return
            (src_ptr, dst_ptr), keep = self.uploader.upload([src_arr, dst_arr], stream)
        if n == 0:
            return
        cfg = self.config
        page_bytes = cfg.page_elems * self._item
        width = self._vector_width(page_bytes)
        page_vecs = page_bytes // width
        chunks = n * self._num_pools
        block = min(_MAX_BLOCK, _round_up(-(-page_vecs // _UNROLL), 32))
        grid = max(1, min(chunks, self.num_sms * 16))
        self._launcher("copy_pages", width)(
            grid, block, stream, describe(self._pool_table).ptr, src_ptr, dst_ptr, n)
        if self.scale_pool is not None:     # scale pages move with their K/V pages
            chunks = n * self.config.num_slots * self.config.tensors_per_token
            self._scale_launcher("copy_pages")(
                max(1, min(chunks, self.num_sms * 16)), 32, stream,
                describe(self._scale_pools).ptr, src_ptr, dst_ptr, n)
        del keep

    # -- the host tier ----------------------------------------------------------------------

    def swap_copy(self, direction: str, device_pages: np.ndarray, host_pages: np.ndarray,
                  stream: int):
        """Copy device page ``device_pages[i]`` to host page ``host_pages[i]``
        (``direction="out"``) or back (``"in"``): every layer slot, K and V; one launch
        on ``stream``.

        The page table chose the ids (in range, destinations distinct), so they are not
        checked here; the kernel still skips an id outside its pool and sets
        ``ERR_PAGE_OUT_OF_RANGE`` in the error word, so no id can touch memory outside
        the two pools.

        Returns
        -------
        event : int or None
            A CUDA event (timing disabled) recorded after the copy; None when there is
            nothing to copy. Release it with :meth:`destroy_event`.
        """
        if self.host_kv is None:
            raise ValueError("this cache has no host tier (num_host_pages == 0)")
        to_host = _SWAP_DIRECTIONS.get(direction)
        if to_host is None:
            raise ValueError(f"direction must be 'out' or 'in', got {direction!r}")
        device_pages = np.ascontiguousarray(device_pages, dtype=np.int32).reshape(-1)
        host_pages = np.ascontiguousarray(host_pages, dtype=np.int32).reshape(-1)
        n = device_pages.size
        if host_pages.size != n:
            raise ValueError(f"device_pages and host_pages differ in length: {n} != "
                             f"{host_pages.size}")
        if n == 0:
            return None
        (device_ptr, host_ptr), keep = self.uploader.upload([device_pages, host_pages], stream)
        grid = max(1, min(n * self._swap_pools, self.num_sms * _SWAP_BLOCKS_PER_SM))
        self._launcher("swap_pages", self._swap_width)(
            grid, self._swap_block, stream, device_ptr, host_ptr, n, to_host)
        if self.host_scales is not None:    # scale pages travel with their K/V pages
            chunks = n * self.config.num_slots * self.config.tensors_per_token
            self._scale_launcher("swap_pages")(
                max(1, min(chunks, self.num_sms * _SWAP_BLOCKS_PER_SM)), 32, stream,
                device_ptr, host_ptr, n, to_host)
        del keep
        return self.record_event(stream)

    def transfer_done(self, event) -> bool:
        """Whether the copy behind ``event`` has finished (None: nothing was copied);
        never blocks.

        Raises
        ------
        KernelError
            The device reported an error (a fault in this or earlier work), which is
            not "not finished yet".
        """
        if event is None:
            return True
        try:
            status = cupy.cuda.runtime.eventQuery(event)
        except cupy.cuda.runtime.CUDARuntimeError as exc:   # CuPy versions that raise
            status = exc.status
        if status == _CUDA_SUCCESS:
            return True
        if status == _CUDA_ERROR_NOT_READY:
            return False
        raise KernelError(f"a host-tier transfer failed: {_runtime_error(status)}")

    def wait_transfer(self, event) -> None:
        """Block until the copy behind ``event`` has finished (None: return at once).

        Raises
        ------
        KernelError
            The device reported an error while waiting.
        """
        if event is None:
            return
        try:
            cupy.cuda.runtime.eventSynchronize(event)
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise KernelError(f"a host-tier transfer failed: {exc}") from exc

    # -- waiting and errors ---------------------------------------------------------------

    def synchronize(self, stream: int) -> int:
        """Wait for ``stream``; return and clear the device error word."""
        runtime = cupy.cuda.runtime
        runtime.streamSynchronize(stream)
        word = np.zeros(1, dtype=np.int32)
        runtime.memcpyAsync(word.ctypes.data, self._error_ptr, 4, _D2H, stream)
        runtime.streamSynchronize(stream)
        value = int(word[0])
        if value:
            runtime.memsetAsync(self._error_ptr, 0, 4, stream)
            runtime.streamSynchronize(stream)
        return value

    # -- step metadata buffers (kvcore.metadata) -----------------------------------------

    def resolve_stream(self, stream) -> int:
        handle = stream_handle(stream)
        return self.framework.current_stream() if handle is None else handle

    def refuse_capture(self, stream: int, what: str) -> None:
        refuse_capture(cupy.cuda.runtime, stream, what)

    def metadata_storage(self, nbytes: int, count: int):
        """A device buffer and ``count`` pinned host staging buffers of ``nbytes``."""
        device = self.framework.empty((nbytes,), "uint8")
        staging = [np.frombuffer(cupy.cuda.alloc_pinned_memory(nbytes), dtype=np.uint8,
                                 count=nbytes) for _ in range(count)]
        return device, staging

    @staticmethod
    def address(array) -> int:
        return describe(array).ptr

    def typed_view(self, buffer, offset: int, dtype: str, shape):
        return self.framework.view_as(buffer, offset, dtype, shape)

    def record_event(self, stream: int, event=None) -> int:
        """Record ``event`` (a new one when None) on ``stream``; return it."""
        runtime = cupy.cuda.runtime
        if event is None:
            event = runtime.eventCreateWithFlags(_EVENT_DISABLE_TIMING)
        runtime.eventRecord(event, stream)
        return event

    def wait_event(self, event) -> None:
        if event is not None:
            cupy.cuda.runtime.eventSynchronize(event)

    def destroy_event(self, event) -> None:
        if event is not None:
            cupy.cuda.runtime.eventDestroy(event)

    def upload_bytes(self, dst_ptr: int, staging: np.ndarray, nbytes: int, stream: int) -> None:
        cupy.cuda.runtime.memcpyAsync(dst_ptr, staging.ctypes.data, nbytes, 1, stream)

    # -- arrays out -------------------------------------------------------------------------

    def to_host(self, array) -> np.ndarray:
        """A NumPy copy (bfloat16 as uint16 words) of a device array of this cache."""
        if self.framework.name == "torch" and isinstance(array, self.framework.tensor_type):
            torch = self.framework.torch
            if array.dtype == torch.bfloat16:
                return array.view(torch.int16).cpu().numpy().view(np.uint16)
            if array.dtype == torch.float8_e4m3fn:
                return array.view(torch.uint8).cpu().numpy()
            return array.cpu().numpy()
        return cupy.asnumpy(array)

    def from_host(self, array: np.ndarray):
        """A device copy of a NumPy array in this cache's framework (uint16 words become
        ``torch.bfloat16`` in a torch bfloat16 cache). Synchronous; for tests and tools."""
        array = np.ascontiguousarray(array)
        if self.framework.name == "torch":
            torch = self.framework.torch
            words = array.dtype == np.uint16
            tensor = torch.from_numpy(array.view(np.int16) if words else array)
            tensor = tensor.to(self.framework.device)
            if words and self.config.model_dtype == "bfloat16":
                tensor = tensor.view(torch.bfloat16)
            return tensor
        with cupy.cuda.Device(self.device_id):
            return cupy.asarray(array)

    def fill_bytes(self, array, host: np.ndarray) -> None:
        """Overwrite a device array of this cache with ``host``'s bytes (tests, tools)."""
        view = describe(array)
        if not view.is_contiguous():
            raise ShapeError("fill_bytes needs a contiguous array")
        cupy.cuda.runtime.memcpy(view.ptr, np.ascontiguousarray(host).ctypes.data,
                                 host.nbytes, 1)
