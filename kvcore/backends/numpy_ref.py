"""The NumPy backend: clear, obviously correct data movement; the oracle for the GPU.

A backend reads and checks its own array arguments (with the shared checkers of
:mod:`kvcore._checks`, so both backends reject the same mistakes the same way) and
moves bytes. bfloat16 is stored and moved as uint16 words, so NumPy needs no bfloat16
dtype. ``stream`` arguments exist for the common interface and are ignored.
"""

from __future__ import annotations

import numpy as np

from kvcore import fp8
from kvcore._checks import (
    check_host_slots,
    check_kv_shape,
    host_page_pair,
    kv_dtype_ok,
    takes,
)
from kvcore._interop import bfloat16_as_int16
from kvcore.backends.arrays import stream_handle
from kvcore.config import KVCacheConfig
from kvcore.errors import ShapeError

__all__ = ["NumpyBackend"]


class NumpyBackend:
    """Pool in host memory, operations as NumPy indexing.

    Parameters
    ----------
    config : KVCacheConfig
        Shape of the pool.
    """

    name = "numpy"
    device = "cpu"
    framework_name = "numpy"
    adopted = False
    scatter_fast_path = None
    array_type = np.ndarray

    def __init__(self, config: KVCacheConfig):
        self.config = config
        self.kv = np.zeros(config.pool_shape, dtype=config.storage_dtype)
        # Layer l lives in pool slot layer_slot(l) (slot l without layer groups).
        self._slots = tuple(config.layer_slot(layer) for layer in range(config.num_layers))
        self.k_views = tuple(self.kv[slot, 0] for slot in self._slots)
        self.v_views = (tuple(self.kv[slot, 1] for slot in self._slots)
                        if not config.key_only else (None,) * config.num_layers)
        self._dtype = self.kv.dtype
        # What write takes and gather returns unless raw: the model dtype's storage (the
        # pool's own, except for an fp8 pool).
        self._in_dtype = config.model_storage_dtype
        # fp8 pools: per (layer, K/V) float32 scales, real value = code value x scale.
        self.scales = (np.ones((config.num_layers, 2), dtype=np.float32)
                       if config.quantized else None)
        # The host tier: page-major, [H, num_slots, 2, *page_shape] (None without one).
        self.host_kv = (np.zeros(config.host_pool_shape, dtype=config.storage_dtype)
                        if config.num_host_pages else None)
        # Per-(token, head) scales: float32 [num_slots, 2, P, S, H] beside the pages, and
        # its host-tier twin [num_host_pages, num_slots, 2, S, H]. Every scale starts at
        # 1.0, so a slot never written dequantizes its zero codes to zeros.
        self.scale_pool = self.host_scales = None
        self.scale_views = (None,) * config.num_layers
        if config.token_head_scales:
            self.scale_pool = np.ones(config.scale_pool_shape, dtype=np.float32)
            self.scale_views = tuple(self.scale_pool[slot] for slot in self._slots)
            if config.num_host_pages:
                self.host_scales = np.ones(config.host_scale_pool_shape, dtype=np.float32)

    # -- arrays in and out ----------------------------------------------------------------

    def current_stream(self) -> None:
        return None

    def is_device_array(self, array) -> bool:
        """True for arrays that live on a GPU (which this backend cannot read)."""
        if hasattr(array, "__cuda_array_interface__"):
            return True
        device = getattr(array, "device", None)
        return getattr(device, "type", None) == "cuda"

    def _kv_input(self, array, name: str) -> np.ndarray:
        if type(array) is not np.ndarray:
            if self.is_device_array(array):
                raise ShapeError(f"{name} is on a CUDA device but the cache is on cpu")
            try:
                array = np.asarray(bfloat16_as_int16(array))
            except Exception as exc:   # a caller's __array__ may raise anything
                raise ShapeError(f"{name} cannot be read as an array: {exc!r}") from None
        check_kv_shape(array.shape, self.config, name)
        if array.dtype != self._in_dtype:
            if array.dtype.byteorder == ">" or not kv_dtype_ok(self.config.model_dtype,
                                                                array.dtype.name):
                raise ShapeError(f"{name} has dtype {array.dtype}, "
                                 f"{takes(self.config)}")
            array = array.view(self._in_dtype)
        return array

    def _kv_pair(self, k, v):
        """``k`` and ``v`` read and checked; ``v`` must be None exactly when key-only."""
        k = self._kv_input(k, "k")
        if self.config.key_only:
            if v is not None:
                raise ShapeError("v must be None: the cache is key-only (key_only=True, one "
                                 "tensor per token)")
            return k, None
        if v is None:
            raise ShapeError("v is None, but the cache holds K and V (key_only=False)")
        v = self._kv_input(v, "v")
        if k.shape != v.shape:
            raise ShapeError(f"k and v differ in shape: {k.shape} != {v.shape}")
        return k, v

    # -- fp8 scales -----------------------------------------------------------------------

    def set_scales(self, layer: int, k_scale: np.float32, v_scale: np.float32) -> None:
        """Set layer ``layer``'s scales (already checked by the facade)."""
        self.scales[layer] = (k_scale, v_scale)

    @property
    def scale_table(self) -> np.ndarray:
        """float32 ``[num_layers, 2]``: the scales themselves on the CPU."""
        return self.scales

    def amax(self, array, name: str) -> float:
        """Largest magnitude of a K or V input (float32; NaN if it holds one)."""
        values = fp8._as_float32(self._kv_input(array, name), self.config.model_dtype)
        return float(np.max(np.abs(values))) if values.size else 0.0

    def to_host(self, array) -> np.ndarray:
        return np.asarray(array)

    def from_host(self, array: np.ndarray) -> np.ndarray:
        """``array`` as an array of this backend (here: itself)."""
        return np.asarray(array)

    def synchronize(self, stream=None) -> int:
        """Nothing to wait for; host inputs were checked, so no error word."""
        return 0

    # -- step metadata buffers (kvcore.metadata): host memory is the "device" ------------

    def resolve_stream(self, stream) -> None:
        """Checks ``stream`` as a CUDA cache would (so code moves between them), then
        drops it: the CPU has no streams."""
        stream_handle(stream)
        return None

    def refuse_capture(self, stream, what: str) -> None:
        """Nothing is ever captured on the CPU."""

    def metadata_storage(self, nbytes: int, count: int):
        """One host buffer that is both the staging and the "device" copy."""
        device = np.zeros(nbytes, dtype=np.uint8)
        return device, [device]

    @staticmethod
    def address(array) -> int:
        return array.ctypes.data

    @staticmethod
    def typed_view(buffer: np.ndarray, offset: int, dtype: str, shape):
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return buffer[offset:offset + count].view(dtype).reshape(shape)

    def record_event(self, stream, event=None) -> None:
        return None

    def wait_event(self, event) -> None:
        """Host work is done when it returns."""

    def destroy_event(self, event) -> None:
        """No events on the CPU."""

    def upload_bytes(self, dst_ptr: int, staging: np.ndarray, nbytes: int, stream) -> None:
        """The staging buffer is the device buffer here: nothing to copy."""

    # -- data movement ----------------------------------------------------------------------

    def write(self, layer: int, k, v, slot_mapping, stream=None, metadata=None) -> None:
        """Scatter ``k``, ``v`` ``[T, H, D]`` to the slots in ``slot_mapping`` (-1 skipped);
        an fp8 pool stores ``fp8.quantize(k, k_scale)`` (and V likewise)."""
        k, v = self._kv_pair(k, v)
        if metadata is not None:
            slots = metadata.slot_mapping_view(k.shape[0])
        else:
            if self.is_device_array(slot_mapping):
                raise ShapeError("slot_mapping is on a CUDA device but the cache is on cpu")
            slots = check_host_slots(slot_mapping, k.shape[0],
                                     self.config.num_pages * self.config.page_size)
        ps = self.config.page_size
        keep = slots >= 0
        pages, offsets = np.divmod(slots[keep], ps)
        for which, src in enumerate((k, v)[:self.config.tensors_per_token]):
            pool = self.kv[self._slots[layer], which]
            if self.scale_pool is not None:
                # per (token, head): computed from the row, stored beside its codes
                row_scales = fp8.token_head_scales(src, self.config.model_dtype)
                src = fp8.quantize(src, row_scales[:, :, None], self.config.model_dtype)
                self.scale_pool[self._slots[layer], which][pages, offsets] = row_scales[keep]
            elif self.scales is not None:
                src = fp8.quantize(src, self.scales[layer, which], self.config.model_dtype)
            if self.config.layout == "NHD":
                pool[pages, offsets] = src[keep]          # pool [P, S, H, D]
            else:
                pool[pages, :, offsets] = src[keep]       # pool [P, H, S, D] -> [n, H, D]

    def gather(self, layer: int, index, out=None, stream=None, raw: bool = False):
        """K and V of every token of a batch into ``out`` or new ``[total, H, D]`` arrays.

        ``index``: ``(page_indptr, page_indices, last_page_len, token_indptr, total, nnz)``
        host arrays, or a StepMetadata (its live batch). An fp8 pool's codes come back
        dequantized to the model dtype, or as they are (uint8) with ``raw``. A key-only
        pool gives ``(k, None)``.
        """
        cfg = self.config
        if not isinstance(index, tuple):
            index = index.host_gather_index()
        page_indptr, page_indices, last_page_len, token_indptr, total, _ = index
        raw = raw or not cfg.quantized
        out_dtype, out_name = (self._dtype, cfg.dtype) if raw else (self._in_dtype,
                                                                    cfg.model_dtype)
        out = self._gather_outputs(out, total, out_dtype, out_name)
        outs = [a.view(out_dtype) for a in out[:cfg.tensors_per_token]]
        for b in range(len(last_page_len)):
            pages = page_indices[page_indptr[b]:page_indptr[b + 1]]
            start, stop = int(token_indptr[b]), int(token_indptr[b + 1])
            for which, dst in enumerate(outs):
                chunk = self.kv[self._slots[layer], which][pages]  # [n, S, H, D] / [n, H, S, D]
                if cfg.layout == "HND":
                    chunk = chunk.transpose(0, 2, 1, 3)           # -> [n, S, H, D]
                chunk = chunk.reshape(-1, cfg.num_kv_heads, cfg.head_dim)[: stop - start]
                if out_dtype is not self._dtype:
                    if self.scale_pool is not None:
                        scale = self.scale_pool[self._slots[layer], which][pages].reshape(
                            -1, cfg.num_kv_heads)[: stop - start, :, None]
                    else:
                        scale = self.scales[layer, which]
                    chunk = fp8.dequantize(chunk, scale, cfg.model_dtype)
                dst[start:stop] = chunk
        return out

    def _gather_outputs(self, out, total: int, dtype: np.dtype, dtype_name: str):
        """``out`` checked (or new arrays): ``(k_out, v_out)``, ``v_out`` None when
        key-only."""
        cfg = self.config
        if out is None:
            k_out = np.empty((total, cfg.num_kv_heads, cfg.head_dim), dtype=dtype)
            return (k_out, None if cfg.key_only else np.empty_like(k_out))
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ShapeError("out must be a (k_out, v_out) pair")
        if cfg.key_only and out[1] is not None:
            raise ShapeError("out must be (k_out, None): the cache is key-only")
        names = ("k_out", "v_out")[:cfg.tensors_per_token]
        for name, array in zip(names, out[:cfg.tensors_per_token], strict=True):
            if type(array) is not np.ndarray:
                raise ShapeError(f"{name} must be a NumPy array on a cpu cache")
            check_kv_shape(array.shape, cfg, name)
            if array.shape[0] < total:
                raise ShapeError(f"{name} has {array.shape[0]} rows, the batch holds {total} "
                                 "tokens")
            if array.dtype.byteorder == ">" or (
                    array.dtype != dtype and not kv_dtype_ok(dtype_name, array.dtype.name)):
                raise ShapeError(f"{name} has dtype {array.dtype}, the gather gives "
                                 f"{dtype_name}")
            if not array.flags.writeable:
                raise ShapeError(f"{name} is read-only")
        return out

    def copy_pages(self, src, dst, stream=None) -> None:
        """Copy page ``src[i]`` to ``dst[i]`` in every layer slot, K and V (host ids,
        checked)."""
        if self.is_device_array(src) or self.is_device_array(dst):
            raise ShapeError("page ids are on a CUDA device but the cache is on cpu")
        src, dst = host_page_pair(src, dst, self.config.num_pages)
        self.kv[:, :, dst] = self.kv[:, :, src]
        if self.scale_pool is not None:     # scale pages move with their K/V pages
            self.scale_pool[:, :, dst] = self.scale_pool[:, :, src]

    # -- the host tier --------------------------------------------------------------------

    def swap_copy(self, direction: str, device_pages: np.ndarray, host_pages: np.ndarray,
                  stream=None) -> None:
        """Copy device page ``device_pages[i]`` to host page ``host_pages[i]``
        (``direction="out"``) or back (``"in"``): every layer slot, K and V.

        The page table chose the ids (in range, destinations distinct), so they are not
        checked again. Synchronous here: the returned event (None) is already complete.
        """
        if direction == "out":
            self.host_kv[host_pages] = self.kv[:, :, device_pages].transpose(2, 0, 1, 3, 4, 5)
            if self.scale_pool is not None:
                self.host_scales[host_pages] = self.scale_pool[:, :, device_pages].transpose(
                    2, 0, 1, 3, 4)
        else:
            self.kv[:, :, device_pages] = self.host_kv[host_pages].transpose(1, 2, 0, 3, 4, 5)
            if self.scale_pool is not None:
                self.scale_pool[:, :, device_pages] = self.host_scales[host_pages].transpose(
                    1, 2, 0, 3, 4)

    @staticmethod
    def transfer_done(event) -> bool:
        """Whether the copy behind ``event`` finished (always, on the CPU)."""
        return True

    @staticmethod
    def wait_transfer(event) -> None:
        """Block until the copy behind ``event`` finished (it has, on the CPU)."""
