"""KVCache: the facade that owns the page bookkeeping and the device pool.

It validates every argument (shape, dtype, device, layer, slot and page ranges) before
anything is written, then hands plain arrays to a backend that only moves bytes.
"""

from __future__ import annotations

import operator

import numpy as np

from kvcore._core import AppendResult, PageAllocator, PageTable, first_slot_out_of_range
from kvcore.backends import make_backend
from kvcore.backends.numpy_ref import storage_dtype
from kvcore.config import KVCacheConfig
from kvcore.errors import InvalidPageError, ShapeError

__all__ = ["KVCache"]

#: dtypes accepted for K/V besides the cache's own: bfloat16 also arrives as raw words.
_RAW_WORDS = (np.dtype(np.uint16), np.dtype(np.int16))


class KVCache:
    """A paged KV cache for every layer of a model: bookkeeping plus the pool.

    Parameters
    ----------
    config : KVCacheConfig
        Shape of the pool and of the page table.
    device : str
        ``"auto"`` (CUDA when CuPy and a GPU are usable, else CPU), ``"cpu"`` (NumPy),
        ``"cuda"`` (the current CUDA device) or ``"cuda:N"``.

    Attributes
    ----------
    config : KVCacheConfig
    allocator : PageAllocator
    table : PageTable
        The bookkeeping; the methods below pass through to it.
    kv : numpy.ndarray or cupy.ndarray
        The pool, ``config.pool_shape``: NHD ``[L, 2, P, S, H, D]``, HND ``[L, 2, P, H, S, D]``.
        bfloat16 pools are stored as uint16 words (view them as bfloat16 in torch).

    Raises
    ------
    ValueError
        An unknown ``device``.
    BackendUnavailableError
        CUDA asked for where CuPy or a GPU is missing.

    Notes
    -----
    Device-side contract: ``write`` and ``copy_pages`` with device-resident index
    arrays never synchronize with the GPU (so a step can be captured in a CUDA graph);
    their index arrays are then range-checked by the kernels, which skip an offending
    element (nothing outside the pool is ever written) and raise a flag that
    :meth:`synchronize` reports as :class:`InvalidPageError`. Index arrays given as NumPy
    arrays (what :meth:`append` returns) are checked on the host before any launch, and a
    bad one means nothing is written at all.

    Examples
    --------
    >>> cfg = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4,
    ...                     num_pages=16, dtype="float32")
    >>> cache = KVCache(cfg, device="cpu")
    >>> seq = cache.add_sequence()
    >>> step = cache.append([seq], [5])
    >>> k = np.arange(5 * 2 * 4, dtype=np.float32).reshape(5, 2, 4)
    >>> cache.write(0, k, -k, step.slot_mapping)
    >>> k_out, v_out, token_indptr = cache.gather(0, [seq])
    >>> bool((k_out == k).all()), token_indptr.tolist()
    (True, [0, 5])
    """

    def __init__(self, config: KVCacheConfig, device: str = "auto"):
        if not isinstance(config, KVCacheConfig):
            raise TypeError(f"config must be a KVCacheConfig, got {type(config).__name__}")
        self.config = config
        self.backend = make_backend(config, device)
        self.allocator = PageAllocator(config.num_pages)
        self.table = PageTable(self.allocator, config.page_size, config.max_seqs,
                               config.max_pages_per_seq,
                               enable_prefix_cache=config.enable_prefix_cache)
        self._dtype = storage_dtype(config.dtype)
        self._num_slots = config.num_pages * config.page_size

    def __repr__(self) -> str:
        c = self.config
        return (f"KVCache(device={self.device!r}, layers={c.num_layers}, pages={c.num_pages}"
                f"x{c.page_size}, heads={c.num_kv_heads}, head_dim={c.head_dim}, "
                f"dtype={c.dtype}, layout={c.layout}, free={self.allocator.num_free}, "
                f"seqs={self.table.num_seqs})")

    # -- properties -------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"``."""
        return self.backend.device

    @property
    def kv(self):
        """The whole pool (see the class docstring for its shape)."""
        return self.backend.kv

    @property
    def num_seqs(self) -> int:
        """Active sequences."""
        return self.table.num_seqs

    @property
    def num_free_pages(self) -> int:
        """Pages free for allocation."""
        return self.allocator.num_free

    # -- bookkeeping, passed through to the PageTable -----------------------------------------

    def add_sequence(self, tokens=None, *, namespace: int = 0) -> int:
        """Start a sequence (mapping cached prefix pages when prefix caching is on and
        ``tokens`` are given); see :meth:`PageTable.add_sequence`."""
        return self.table.add_sequence(tokens, namespace=namespace)

    def fork(self, seq_id: int) -> int:
        """Share every page of ``seq_id`` with a new sequence; see :meth:`PageTable.fork`."""
        return self.table.fork(seq_id)

    def remove(self, seq_id: int) -> None:
        """End ``seq_id`` and release its pages; see :meth:`PageTable.remove`."""
        self.table.remove(seq_id)

    def append(self, seq_ids, num_new_tokens, token_ids=None) -> AppendResult:
        """Extend sequences (see :meth:`PageTable.append`) and do the copy-on-write copies.

        The page copies reported in ``copy_src`` / ``copy_dst`` are performed on the
        device (every layer, K and V, one launch) before this returns, so the caller can
        write the new tokens through ``slot_mapping`` at once.
        """
        result = self.table.append(seq_ids, num_new_tokens, token_ids)
        if result.copy_src.size:
            self.backend.copy_pages(result.copy_src, result.copy_dst)
        return result

    def pages_needed(self, seq_ids, num_new_tokens) -> int:
        """Pages :meth:`append` would allocate; see :meth:`PageTable.pages_needed`."""
        return self.table.pages_needed(seq_ids, num_new_tokens)

    def num_tokens(self, seq_id: int) -> int:
        """Length of ``seq_id`` in tokens."""
        return self.table.num_tokens(seq_id)

    def pages(self, seq_id: int) -> np.ndarray:
        """Pages of ``seq_id``, int32 [ceil(num_tokens / page_size)]."""
        return self.table.pages(seq_id)

    def slot(self, seq_id: int, token_idx: int) -> int:
        """Slot of token ``token_idx`` of ``seq_id``."""
        return self.table.slot(seq_id, token_idx)

    def flashinfer_metadata(self, seq_ids):
        """FlashInfer index arrays; see :meth:`PageTable.flashinfer_metadata`."""
        return self.table.flashinfer_metadata(seq_ids)

    def block_tables(self, seq_ids) -> np.ndarray:
        """vLLM-style block tables; see :meth:`PageTable.block_tables`."""
        return self.table.block_tables(seq_ids)

    def check_invariants(self) -> None:
        """Check the bookkeeping's invariants (raises :class:`KVCoreError`)."""
        self.table.check_invariants()

    @property
    def prefix_stats(self):
        """Prefix-cache counters (see :attr:`PageTable.prefix_stats`); None when off."""
        return self.table.prefix_stats

    @property
    def num_cached_pages(self) -> int:
        """Pages in the prefix index."""
        return self.table.num_cached_pages

    def take_events(self):
        """Prefix-cache events since the last call; see :meth:`PageTable.take_events`."""
        return self.table.take_events()

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix; see :meth:`PageTable.clear_prefix_cache`."""
        self.table.clear_prefix_cache()

    # -- the pool -------------------------------------------------------------------------------

    def k_cache(self, layer: int):
        """View of layer ``layer``'s K cache: NHD ``[P, S, H, D]``, HND ``[P, H, S, D]``.

        A view, not a copy: writes through it change the pool. FlashInfer's
        ``(k_cache, v_cache)`` tuple form takes it as is.
        """
        return self.backend.kv[self._layer(layer), 0]

    def v_cache(self, layer: int):
        """View of layer ``layer``'s V cache (see :meth:`k_cache`)."""
        return self.backend.kv[self._layer(layer), 1]

    def write(self, layer: int, k, v, slot_mapping) -> None:
        """Scatter new tokens' keys and values into their slots (one launch for K and V).

        Parameters
        ----------
        layer : int
            In ``[0, num_layers)``.
        k, v : array, shape [T, num_kv_heads, head_dim]
            The cache's dtype (bfloat16 also as uint16/int16 words); NumPy for a CPU
            cache, a CUDA array (CuPy, torch, JAX: zero-copy) for a CUDA cache. Not
            modified. Any strides; rows that are not contiguous are copied first.
        slot_mapping : array of int, shape [T]
            Slot of each token (``-1``: skip it), e.g. ``append(...).slot_mapping``.
            NumPy (checked on the host) or, on CUDA, a device int64 array.

        Raises
        ------
        IndexError
            ``layer`` out of range.
        ShapeError
            ``k`` / ``v`` / ``slot_mapping`` of the wrong shape, dtype or device.
        InvalidPageError
            A host ``slot_mapping`` entry outside ``[0, num_pages * page_size)`` and not -1;
            nothing is written.

        Notes
        -----
        Slots should be distinct (apart from -1): if two tokens name one slot, which
        of them lands there is unspecified on the GPU.
        """
        layer = self._layer(layer)
        k = self._kv_array(k, "k")
        v = self._kv_array(v, "v")
        if k.shape != v.shape:
            raise ShapeError(f"k and v differ in shape: {k.shape} != {v.shape}")
        slots = self._slot_array(slot_mapping, k.shape[0])
        self.backend.write(layer, k, v, slots)

    def gather(self, layer: int, seq_ids):
        """Read a batch of sequences out of the pool into contiguous arrays.

        Parameters
        ----------
        layer : int
            In ``[0, num_layers)``.
        seq_ids : array_like of int, shape [B]
            Active sequences (repeats allowed).

        Returns
        -------
        k, v : array, shape [total_tokens, num_kv_heads, head_dim]
            New arrays on the cache's device, in its storage dtype; sequence ``b``'s
            tokens are rows ``token_indptr[b]:token_indptr[b + 1]``.
        token_indptr : numpy.ndarray of int64, shape [B + 1]
        """
        layer = self._layer(layer)
        page_indptr, page_indices, last_page_len = self.table.flashinfer_metadata(seq_ids)
        num_pages = np.diff(page_indptr)
        lengths = np.where(num_pages > 0, (num_pages.astype(np.int64) - 1)
                           * self.config.page_size + last_page_len, 0)
        token_indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=token_indptr[1:])
        k, v = self.backend.gather(layer, page_indptr, page_indices, last_page_len,
                                   token_indptr, int(token_indptr[-1]), int(page_indptr[-1]))
        return k, v, token_indptr

    def copy_pages(self, src, dst) -> None:
        """Copy page ``src[i]`` to page ``dst[i]`` in every layer, K and V (one launch).

        Parameters
        ----------
        src, dst : array of int, shape [n]
            Page ids in ``[0, num_pages)``; ``dst`` distinct and disjoint from ``src``.
            Host arrays are checked before anything is copied; CUDA int32 arrays are
            range-checked by the kernel (see the class Notes).

        Raises
        ------
        InvalidPageError
            A page id out of range; nothing is copied.
        ValueError
            Unequal lengths, or ``dst`` repeats a page or overlaps ``src``.

        Notes
        -----
        This moves bytes only: it does not change refcounts or page tables.
        """
        src_dev = self._device_array_or_none(src)
        if src_dev is not None:
            src_arr, dst_arr = self._device_index_pair(src_dev, self._device_array_or_none(dst))
        else:
            src_arr, dst_arr = self._host_page_pair(src, dst)
        self.backend.copy_pages(src_arr, dst_arr)

    def synchronize(self) -> None:
        """Wait for the device; raise :class:`InvalidPageError` if a kernel refused an index.

        Kernels given device-resident index arrays skip out-of-range entries and raise
        a flag instead of failing; this is where that flag becomes an exception (and is
        cleared).
        """
        self.backend.synchronize()
        flags = self.backend.take_error_word()
        if flags:
            what = []
            if flags & 1:
                what.append("slots outside the pool")
            if flags & 2:
                what.append("page ids outside the pool")
            raise InvalidPageError(f"a kernel skipped {' and '.join(what)} given in device "
                                   "index arrays; those elements were not written")

    # -- validation ---------------------------------------------------------------------------

    def _layer(self, layer) -> int:
        if type(layer) is int and 0 <= layer < self.config.num_layers:   # the common case
            return layer
        if isinstance(layer, (bool, np.bool_)):
            raise TypeError("layer must be an integer, got bool")
        try:
            index = operator.index(layer)
        except Exception as exc:   # TypeError, or whatever a user's __index__ raised
            raise TypeError(f"layer must be an integer, got {type(layer).__name__}") from exc
        if not 0 <= index < self.config.num_layers:
            raise IndexError(f"layer {index} out of range [0, {self.config.num_layers})")
        return index

    def _kv_array(self, array, name: str):
        backend = self.backend
        if type(array) is backend.array_type:   # the common case, checked cheaply
            arr = array
            if backend.xp is not np and backend.device_of(arr) != backend.device_id:
                raise ShapeError(f"{name} is on cuda:{backend.device_of(arr)} but the cache "
                                 f"is on {backend.device}")
        elif backend.xp is np:
            if backend.is_foreign_device_array(array):
                raise ShapeError(f"{name} is on a CUDA device but the cache is on cpu")
            try:
                arr = backend.asarray(array)
            except (TypeError, ValueError) as exc:
                raise ShapeError(f"{name} cannot be read as an array: {exc}") from None
        else:
            arr = backend.asarray(array)
            if arr is None:
                raise ShapeError(f"{name} must be a CUDA array (CuPy, torch, JAX, ...) on "
                                 f"{backend.device}, got {type(array).__name__}")
            if backend.device_of(arr) != backend.device_id:
                raise ShapeError(f"{name} is on cuda:{backend.device_of(arr)} but the cache "
                                 f"is on {backend.device}")
        cfg = self.config
        shape = arr.shape
        if len(shape) != 3 or shape[1] != cfg.num_kv_heads or shape[2] != cfg.head_dim:
            raise ShapeError(f"{name} must have shape [T, {cfg.num_kv_heads}, {cfg.head_dim}], "
                             f"got {tuple(shape)}")
        dtype = arr.dtype
        if dtype is not self._dtype and dtype != self._dtype:
            if cfg.dtype == "bfloat16" and (dtype in _RAW_WORDS or dtype.name == "bfloat16"):
                arr = arr.view(self._dtype)
            else:
                raise ShapeError(f"{name} has dtype {dtype}, the cache holds {cfg.dtype}")
        item = self._dtype.itemsize
        strides = arr.strides
        if strides[2] != item or strides[0] % item or strides[1] % item:
            arr = backend.xp.ascontiguousarray(arr)
        return arr

    def _slot_array(self, slot_mapping, num_tokens: int):
        backend = self.backend
        if type(slot_mapping) is backend.array_type and backend.xp is not np:
            device_slots = slot_mapping           # the common device case, checked cheaply
        else:
            device_slots = self._device_array_or_none(slot_mapping)
        if device_slots is not None:
            slot_mapping = device_slots
            if slot_mapping.dtype != np.int64 or slot_mapping.shape != (num_tokens,):
                raise ShapeError(f"a device slot_mapping must be int64 [{num_tokens}], got "
                                 f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
            if backend.device_of(slot_mapping) != backend.device_id:
                raise ShapeError(f"slot_mapping is on cuda:{backend.device_of(slot_mapping)} "
                                 f"but the cache is on {backend.device}")
            if not slot_mapping.flags.c_contiguous:
                slot_mapping = backend.xp.ascontiguousarray(slot_mapping)
            return slot_mapping
        if backend.is_foreign_device_array(slot_mapping):
            raise ShapeError("slot_mapping is on a CUDA device but the cache is on cpu")
        slots = self._host_int_array(slot_mapping, "slot_mapping")
        if slots.shape != (num_tokens,):
            raise ShapeError(f"slot_mapping must have shape [{num_tokens}] (one slot per "
                             f"token of k), got {slots.shape}")
        bad = first_slot_out_of_range(slots, self._num_slots)
        if bad is not None:
            raise InvalidPageError(f"slot {bad} out of range [0, {self._num_slots}) "
                                   "(-1 marks padding)")
        return slots   # a CUDA backend uploads it without blocking

    @staticmethod
    def _host_int_array(values, name: str) -> np.ndarray:
        if type(values) is np.ndarray and values.dtype == np.int64 and values.ndim == 1:
            return values
        try:
            arr = np.asarray(values)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"{name} must be a 1-D array of integers ({exc})") from None
        if arr.size == 0 and arr.dtype.kind not in "iu":
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ShapeError(f"{name} must be 1-D, got shape {arr.shape}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise InvalidPageError(f"{name} holds a value above the int64 range")
        return arr.astype(np.int64, copy=False)

    def _host_page_pair(self, src, dst):
        src_arr = self._host_int_array(src, "src")
        dst_arr = self._host_int_array(dst, "dst")
        if src_arr.shape != dst_arr.shape:
            raise ValueError(f"src and dst differ in length: {src_arr.size} != {dst_arr.size}")
        num_pages = self.config.num_pages
        for name, arr in (("src", src_arr), ("dst", dst_arr)):
            if arr.size and (arr.min() < 0 or arr.max() >= num_pages):
                bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
                raise InvalidPageError(f"{name} page {bad} out of range [0, {num_pages})")
        if dst_arr.size:
            dst_count = np.bincount(dst_arr, minlength=num_pages)
            if dst_count.max() > 1:
                raise ValueError(f"dst repeats page {int(dst_count.argmax())}")
            overlap = dst_count[src_arr] > 0
            if overlap.any():
                raise ValueError(f"page {int(src_arr[overlap.argmax()])} is both a src and a "
                                 "dst")
        return src_arr.astype(np.int32), dst_arr.astype(np.int32)

    def _device_array_or_none(self, array):
        """``array`` as a backend device array when it is one (CuPy, torch, JAX), else None."""
        if self.backend.xp is np or isinstance(array, (np.ndarray, list, tuple, int)):
            return None
        return self.backend.asarray(array)

    def _device_index_pair(self, src, dst):
        for name, arr in (("src", src), ("dst", dst)):
            if arr is None or arr.dtype != np.int32 or arr.ndim != 1:
                raise ShapeError(f"device page ids must be 1-D int32 device arrays; {name} is "
                                 f"{type(arr).__name__} {getattr(arr, 'dtype', '')}")
            if self.backend.device_of(arr) != self.backend.device_id:
                raise ShapeError(f"{name} is on cuda:{self.backend.device_of(arr)} but the "
                                 f"cache is on {self.backend.device}")
        if src.shape != dst.shape:
            raise ValueError(f"src and dst differ in length: {src.size} != {dst.size}")
        xp = self.backend.xp
        return xp.ascontiguousarray(src), xp.ascontiguousarray(dst)
