"""KVCache: the facade that owns the page bookkeeping and the device pool.

It checks the layer and routes each call: bookkeeping to the :class:`PageTable`, data
movement to a backend (NumPy, or CUDA speaking torch or CuPy) that reads and checks
its array arguments before anything is written. Every device call runs on the
caller's stream: the ``stream=`` argument, else the framework's current stream.
"""

from __future__ import annotations

import numpy as np

from kvcore import fp8
from kvcore._core import AppendResult, PageAllocator, PageTable
from kvcore._swap import HostTier
from kvcore.backends import make_backend
from kvcore.backends.kernel_abi import (
    ERR_OUTPUT_TOO_SMALL,
    ERR_PAGE_OUT_OF_RANGE,
    ERR_SLOT_OUT_OF_RANGE,
)
from kvcore.config import KVCacheConfig
from kvcore.errors import InvalidPageError, ShapeError
from kvcore.metadata import StepMetadata
from kvcore.transfers import Transfer, Transfers

__all__ = ["KVCache"]

#: What each bit of the device error word means (values in kvcore/backends/kernel_abi.py).
_ERROR_BITS = ((ERR_SLOT_OUT_OF_RANGE, "slots outside the pool"),
               (ERR_PAGE_OUT_OF_RANGE, "page ids outside the pool"),
               (ERR_OUTPUT_TOO_SMALL, "pages that did not fit the gather outputs"))


class KVCache:
    """A paged KV cache for every layer of a model: bookkeeping plus the pool.

    Parameters
    ----------
    config : KVCacheConfig
        Shape of the pool and of the page table.
    device : str
        ``"auto"`` (CUDA when CuPy and a GPU are usable, else CPU), ``"cpu"`` (NumPy),
        ``"cuda"`` (the current CUDA device) or ``"cuda:N"``.
    framework : {"torch", "cupy"} or None
        CUDA only: who allocates the pool and new outputs (torch tensors, bfloat16 as
        ``torch.bfloat16``; or CuPy arrays, bfloat16 as uint16 words) and whose current
        stream device calls use when they are not given ``stream=``. None picks the
        adopted pool's framework, else ``"torch"`` when the caller has imported torch,
        else ``"cupy"``. A CuPy program that also imports torch should say
        ``framework="cupy"``.
    pool : optional
        CUDA only: adopt tensors an engine already allocated instead of allocating. A
        list of ``num_layers`` entries, each a ``[2, P, ...]`` or ``[P, 2, ...]`` tensor
        (vLLM's per-layer layouts) or a ``(k, v)`` pair of ``[P, ...]`` tensors, where
        ``...`` is ``[S, H, D]`` (NHD) or ``[H, S, D]`` (HND) and each page block is
        contiguous; or one ``config.pool_shape`` tensor. Validated once here; kvcore
        never frees them (keep them alive as long as the cache).

    Attributes
    ----------
    config : KVCacheConfig
    allocator : PageAllocator
    table : PageTable
        The bookkeeping; the methods below pass through to it.
    host_tier : HostTier or None
        The swap bookkeeping when ``config.num_host_pages > 0`` (see :meth:`swap_out`).
    kv : numpy.ndarray, torch.Tensor or cupy.ndarray
        The pool, ``config.pool_shape``: NHD ``[L, 2, P, S, H, D]``, HND ``[L, 2, P, H, S, D]``.
        bfloat16 pools are uint16 words in NumPy and CuPy (view them as bfloat16 in
        torch) and ``torch.bfloat16`` with ``framework="torch"``. Absent (an
        ``AttributeError``) for an adopted pool.

    Raises
    ------
    ValueError
        An unknown ``device`` or ``framework``; ``framework`` / ``pool`` on a CPU cache.
    BackendUnavailableError
        CUDA asked for where CuPy, torch (for ``framework="torch"``) or a GPU is missing.
    ShapeError
        An adopted ``pool`` that does not fit the config.

    Notes
    -----
    Device-side contract: every device operation (``write``, ``gather``,
    ``copy_pages``, the copy-on-write copies of ``append``, uploads, ``synchronize``)
    is enqueued on the caller's stream and never waits for the device (``synchronize``
    excepted). ``write``, ``copy_pages`` with device ids and ``gather`` from a
    :class:`StepMetadata` into given outputs are capturable in ``torch.cuda.graph`` and
    CuPy graph capture; calls that would upload host index arrays refuse to run while
    their stream captures (a replay would not upload them again). Device index arrays
    are range-checked by the kernels, which skip an offending element (nothing outside
    the pool is ever written) and raise a flag that :meth:`synchronize` reports as
    :class:`InvalidPageError`. Host index arrays (what :meth:`append` returns) are
    checked before any launch, and a bad one means nothing is written at all.

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

    def __init__(self, config: KVCacheConfig, device: str = "auto", *,
                 framework: str | None = None, pool=None):
        if not isinstance(config, KVCacheConfig):
            raise TypeError(f"config must be a KVCacheConfig, got {type(config).__name__}")
        self.config = config
        self.backend = make_backend(config, device, framework, pool)
        self.allocator = PageAllocator(config.num_pages)
        host_allocator = (PageAllocator(config.num_host_pages) if config.num_host_pages
                          else None)
        self.table = PageTable(self.allocator, config.page_size, config.max_seqs,
                               config.max_pages_per_seq,
                               enable_prefix_cache=config.enable_prefix_cache,
                               groups=config.groups, host_allocator=host_allocator,
                               prefix_hash=config.prefix_hash)
        self.host_tier = HostTier(self.table) if host_allocator is not None else None
        self._transfers = (Transfers(self.host_tier, self.backend, config.page_bytes)
                           if host_allocator is not None else None)
        # Whether evicted prefix pages are offloaded to the host tier (one full group).
        self._offloads = (host_allocator is not None and config.enable_prefix_cache
                          and len(config.groups) == 1 and config.groups[0].kind == "full")
        self._single_group = len(config.groups) == 1
        # Per layer: its group, and whether that group holds K/V (not a recurrent state).
        self._layer_groups = tuple(config.layer_group(layer)
                                   for layer in range(config.num_layers))
        self._state_layers = frozenset(layer for group in config.groups
                                       if group.kind == "state" for layer in group.layers)
        self._current_stream = self.backend.current_stream
        self._torch_scatter = self.backend.scatter_fast_path

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
        """The whole pool (see the class docstring for its shape).

        Raises
        ------
        AttributeError
            The pool was adopted (``pool=``): there is no single array; use
            :meth:`k_cache` / :meth:`v_cache`.
        """
        if self.backend.adopted:
            raise AttributeError("this cache adopted per-layer tensors (pool=...), so it has "
                                 "no single kv array; use k_cache(layer) and v_cache(layer)")
        return self.backend.kv

    @property
    def framework(self) -> str:
        """``"numpy"`` (CPU), ``"torch"`` or ``"cupy"``: the type of the pool and of new
        outputs, and whose current stream device calls use."""
        return self.backend.framework_name

    @property
    def num_seqs(self) -> int:
        """Active sequences."""
        return self.table.num_seqs

    @property
    def num_free_pages(self) -> int:
        """Pages free for allocation."""
        return self.allocator.num_free

    # -- bookkeeping, passed through to the PageTable -----------------------------------------

    def add_sequence(self, tokens=None, *, namespace: int = 0, retention=None,
                     stream=None) -> int:
        """Start a sequence (mapping cached prefix pages when prefix caching is on and
        ``tokens`` are given); see :meth:`PageTable.add_sequence`. ``retention`` (an int
        priority 0 .. 100 or a :class:`~kvcore.Retention`) decides which cached pages
        are evicted first (docs/prefix_cluster.md).

        With a host tier, a hit may include blocks offloaded there: they are copied
        into fresh device pages on the caller's stream (``stream``, as in
        :meth:`write`), and the sequence is ``"swapping_in"``, usable once :meth:`poll`
        or :meth:`wait` has finished that copy (its :class:`Transfer` is the last of
        :attr:`pending_transfers`). Should the copy fail, the sequence keeps only the
        hit before its first offloaded block: check :meth:`num_tokens` then.
        """
        if not self._offloads:
            return self.table.add_sequence(tokens, namespace=namespace, retention=retention)
        handle = self._stream(stream)
        self.backend.refuse_capture(handle, "add_sequence")   # it may enqueue copies
        seq = self.table.add_sequence(tokens, namespace=namespace, retention=retention)
        self._transfers.load(seq, handle)     # never raises for a failed launch
        return seq

    def match_prefix(self, tokens, *, namespace: int = 0) -> int:
        """Leading tokens of ``tokens`` that :meth:`add_sequence` would map from the prefix
        cache (0 when caching is off), changing nothing; see :meth:`PageTable.match_prefix`."""
        return self.table.match_prefix(tokens, namespace=namespace)

    def fork(self, seq_id: int) -> int:
        """Share every page of ``seq_id`` with a new sequence; see :meth:`PageTable.fork`."""
        return self.table.fork(seq_id)

    def remove(self, seq_id: int) -> None:
        """End ``seq_id`` and release its pages, in either tier; see
        :meth:`PageTable.remove` (a sequence whose transfer is in flight releases its
        pages when :meth:`poll` or :meth:`wait` finishes the transfer)."""
        self.table.remove(seq_id)

    def seq_state(self, seq_id: int) -> str:
        """``"resident"``, ``"swapped"``, ``"swapping_out"`` or ``"swapping_in"``; see
        :meth:`PageTable.seq_state`."""
        return self.table.seq_state(seq_id)

    def append(self, seq_ids, num_new_tokens, token_ids=None, *, stream=None) -> AppendResult:
        """Extend sequences (see :meth:`PageTable.append`) and do the copy-on-write copies.

        The page copies reported in ``copy_src`` / ``copy_dst`` are enqueued on the
        device (every layer, K and V, one launch) on the caller's stream (``stream``, or
        the framework's current stream) before this returns, so writes of the new tokens
        queued after it on that stream see the copied pages.

        Raises
        ------
        KernelError
            On CUDA, while ``stream`` captures a CUDA graph (the copies' page ids are
            host data); nothing changes.
        """
        handle = self._stream(stream)
        self.backend.refuse_capture(handle, "append")
        result = self.table.append(seq_ids, num_new_tokens, token_ids)
        if self._offloads and self.table.num_writebacks:
            self._transfers.offload(handle)      # before anything overwrites those pages
        if result.copy_src.size:
            self.backend.copy_pages(result.copy_src, result.copy_dst, handle)
        return result

    def truncate(self, seq_ids, num_tokens) -> None:
        """Shorten sequences (speculative-decoding rollback); see :meth:`PageTable.truncate`.

        Host bookkeeping only: nothing moves on the device (the dropped tokens' slots
        are simply no longer mapped).
        """
        self.table.truncate(seq_ids, num_tokens)

    def pages_needed(self, seq_ids, num_new_tokens) -> int:
        """Pages :meth:`append` would allocate; see :meth:`PageTable.pages_needed`."""
        return self.table.pages_needed(seq_ids, num_new_tokens)

    def num_tokens(self, seq_id: int) -> int:
        """Length of ``seq_id`` in tokens."""
        return self.table.num_tokens(seq_id)

    def pages(self, seq_id: int, *, group: int = 0) -> np.ndarray:
        """Pages of ``seq_id`` in ``group``: int32 [ceil(num_tokens / page_size)] in a
        full-attention group (see :meth:`PageTable.pages`)."""
        return self.table.pages(seq_id, group=group)

    def first_page(self, seq_id: int, *, group: int = 0) -> int:
        """First mapped column of ``seq_id`` in ``group`` (see :meth:`PageTable.first_page`)."""
        return self.table.first_page(seq_id, group=group)

    def slot(self, seq_id: int, token_idx: int, *, group: int = 0) -> int:
        """Slot of token ``token_idx`` of ``seq_id`` in ``group``."""
        return self.table.slot(seq_id, token_idx, group=group)

    def flashinfer_metadata(self, seq_ids, *, group: int = 0):
        """FlashInfer index arrays; see :meth:`PageTable.flashinfer_metadata`."""
        return self.table.flashinfer_metadata(seq_ids, group=group)

    def block_tables(self, seq_ids, *, group: int = 0) -> np.ndarray:
        """vLLM-style block tables; see :meth:`PageTable.block_tables`."""
        return self.table.block_tables(seq_ids, group=group)

    @property
    def num_groups(self) -> int:
        """Layer groups (see ``KVCacheConfig.layer_groups``)."""
        return self.table.num_groups

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

    def cached_hashes(self):
        """Hashes of every prefix-cached page, both tiers; see :meth:`PageTable.cached_hashes`."""
        return self.table.cached_hashes()

    def take_events(self):
        """Prefix-cache events since the last call; see :meth:`PageTable.take_events`."""
        return self.table.take_events()

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix; see :meth:`PageTable.clear_prefix_cache`."""
        self.table.clear_prefix_cache()

    # -- the host tier ---------------------------------------------------------------------------

    @property
    def host_kv(self):
        """The host tier's pool, ``config.host_pool_shape`` (page-major:
        ``[num_host_pages, num_slots, 2, *page_shape]``), a NumPy array (page-locked
        memory on CUDA; bfloat16 as uint16 words); None without a host tier. Read it
        only for pages of sequences that are ``"swapped"``: a page in flight is being
        written."""
        return self.backend.host_kv

    @property
    def num_free_host_pages(self) -> int:
        """Free pages of the host tier (0 without one)."""
        return self.table.host_allocator.num_free if self.host_tier is not None else 0

    def swap_out(self, seq_ids, *, stream=None) -> Transfer:
        """Move resident sequences to the host tier (preemption without recompute).

        The bookkeeping happens now (see :meth:`HostTier.swap_out`) and one batched
        copy of their pages (every layer, K and V; pages shared between them once) is
        enqueued on the caller's stream; the sequences are ``"swapping_out"`` until
        :meth:`poll` or :meth:`wait` sees the copy complete, and their device pages are
        freed only then. Meanwhile only :meth:`remove` accepts them. A sequence keeps
        its length and, after :meth:`swap_in`, its tokens, byte for byte.

        Parameters
        ----------
        seq_ids : array_like of int, shape [B]
            Distinct resident sequences.
        stream : optional
            As in :meth:`write`.

        Returns
        -------
        Transfer
            ``status`` ``"pending"``; ``device_pages`` / ``host_pages`` are its pairs.

        Raises
        ------
        ValueError
            No host tier (``config.num_host_pages == 0``); a seq id given twice.
        UnknownSequenceError, SequenceStateError
            A sequence that is not active, or not resident (:class:`TransferPendingError`
            while its own transfer is in flight).
        OutOfPagesError
            Too few free host pages (see :meth:`swap_out_pages`).
        KernelError
            On CUDA, while ``stream`` captures a graph (the page ids are host data), or
            the copy could not be enqueued (the move is undone). Nothing changed in
            every case, except that a ``swap_in`` whose copy could not be enqueued may
            have offloaded cached pages to find room (those offloads stand).
        """
        return self._start("out", seq_ids, stream)

    def swap_in(self, seq_ids, *, stream=None) -> Transfer:
        """Bring swapped-out sequences back into fresh device pages.

        One batched copy on the caller's stream; the sequences are ``"swapping_in"``,
        refused by every call but :meth:`remove` (nothing reads pages that have not
        arrived), until :meth:`poll` or :meth:`wait` sees the copy complete; their host
        pages are freed then. Admission: :meth:`swap_in_pages` device pages must be
        free. Raises as :meth:`swap_out` (the sequences must be ``"swapped"``;
        ``OutOfPagesError`` counts device pages).
        """
        return self._start("in", seq_ids, stream)

    def swap_out_pages(self, seq_ids) -> int:
        """Host pages :meth:`swap_out` would take; see :meth:`HostTier.swap_out_pages`."""
        return self._tier().swap_out_pages(seq_ids)

    def swap_in_pages(self, seq_ids) -> int:
        """Device pages :meth:`swap_in` would take; see :meth:`HostTier.swap_in_pages`."""
        return self._tier().swap_in_pages(seq_ids)

    def poll(self) -> list[Transfer]:
        """Finish every transfer whose copy has completed; never blocks.

        Call it once per scheduler step. A finished swap-out frees its device pages; a
        finished swap-in makes its sequences resident. A transfer whose copy failed is
        returned with ``status == "failed"`` and its ``error``: its sequences are back
        in the tier they left, with their data, and the failed copy's pages were never
        mapped. Returns the transfers finished by this call, oldest first ([] without a
        host tier).
        """
        return self._transfers.poll() if self._transfers is not None else []

    def wait(self, transfer: Transfer | None = None) -> list[Transfer]:
        """Block until ``transfer`` (default: every one in flight) completes, then finish
        it and any other complete one (see :meth:`poll`).

        Raises
        ------
        ValueError
            ``transfer`` is not in flight on this cache.
        """
        if self._transfers is None:
            if transfer is not None:
                raise ValueError(f"{transfer!r} is not in flight on this cache")
            return []
        return self._transfers.wait(transfer)

    @property
    def pending_transfers(self) -> tuple[Transfer, ...]:
        """Transfers in flight, oldest first."""
        return self._transfers.pending if self._transfers is not None else ()

    def _start(self, direction: str, seq_ids, stream) -> Transfer:
        self._tier()
        handle = self._stream(stream)
        self.backend.refuse_capture(handle, f"swap_{direction}")
        return self._transfers.start(direction, seq_ids, handle)

    def _tier(self) -> HostTier:
        if self.host_tier is None:
            raise ValueError("this cache has no host tier: set KVCacheConfig(num_host_pages=...)")
        return self.host_tier

    # -- the pool -------------------------------------------------------------------------------

    def to_host(self, array) -> np.ndarray:
        """A NumPy copy of an array of this cache's device and framework (a pool view, a
        ``gather`` output); bfloat16 comes back as uint16 words. Synchronous: for tests,
        tools and checks, not for a serving loop."""
        return self.backend.to_host(array)

    def from_host(self, array: np.ndarray):
        """``array`` as an array of this cache's device and framework (NumPy on the CPU;
        a torch tensor or CuPy array on CUDA, uint16 words as ``torch.bfloat16`` in a
        torch bfloat16 cache). Synchronous: for tests, tools and checks."""
        return self.backend.from_host(np.asarray(array))

    def k_cache(self, layer: int):
        """View of layer ``layer``'s K cache: NHD ``[P, S, H, D]``, HND ``[P, H, S, D]``.

        A view, not a copy (of kvcore's pool or of the adopted tensor): writes through it
        change the pool. FlashInfer's ``(k_cache, v_cache)`` tuple form takes it as is.
        """
        return self.backend.k_views[self._layer(layer)]

    def scale_cache(self, layer: int):
        """View of layer ``layer``'s per-(token, head) scales: float32 ``[2, P, S, H]``
        (``[1, P, S, H]`` key-only), ``[0]`` K's and ``[1]`` V's, whatever the layout:
        ``scale_cache(l)[kv, p, s, h]`` is the scale of head ``h`` of the token in slot
        ``p * page_size + s`` (real value = fp8 value x that scale). A view of the side
        pool (:attr:`scale_pool`), not a copy; the cache's device and framework.

        Raises
        ------
        ValueError
            The pool has no side pool (``kv_scale_granularity`` is not ``"token_head"``).
        """
        layer = self._layer(layer)
        self._side_pool("scale_cache")
        return self.backend.scale_views[layer]

    @property
    def scale_pool(self):
        """The whole scale side pool, float32 ``config.scale_pool_shape`` ``[num_slots,
        2, P, S, H]`` (see :meth:`scale_cache`); None unless
        ``kv_scale_granularity="token_head"``. Read-only by contract: :meth:`write`
        computes the scales."""
        return self.backend.scale_pool

    @property
    def host_scales(self):
        """The host tier's scale pool, ``config.host_scale_pool_shape`` ``[num_host_pages,
        num_slots, 2, S, H]`` float32 NumPy (page-locked on CUDA): host page ``h``'s
        scales beside ``host_kv[h]``; None without a host tier or a side pool."""
        return self.backend.host_scales

    def _side_pool(self, what: str) -> None:
        if not self.config.token_head_scales:
            raise ValueError(f"{what}: the pool has no per-(token, head) scales "
                             "(kv_scale_granularity='token_head' on an fp8 pool)")

    def v_cache(self, layer: int):
        """View of layer ``layer``'s V cache (see :meth:`k_cache`).

        Raises
        ------
        ValueError
            The cache is key-only (``config.key_only``): it has no V.
        """
        layer = self._layer(layer)
        if self.config.key_only:
            raise ValueError("the cache is key-only (key_only=True): it has no V cache; "
                             "k_cache(layer) holds each token's one tensor")
        return self.backend.v_views[layer]

    # -- fp8 scales -------------------------------------------------------------------------------

    def set_kv_scales(self, layer: int, k_scale, v_scale=None) -> None:
        """Set the static scales of layer ``layer`` of an fp8 pool (as engines load them
        from checkpoints): real value = fp8 value x scale.

        Parameters
        ----------
        layer : int
            In ``[0, num_layers)``.
        k_scale, v_scale : float
            Finite float32 values >= :data:`kvcore.fp8.MIN_SCALE` (2**-116: the GPU
            flushes subnormals, see there); ``v_scale`` is required for K/V pools and
            must be None for a key-only pool. Every scale starts at 1.0.

        Raises
        ------
        ValueError
            The pool is not fp8 or has per-(token, head) scales
            (``kv_scale_granularity="token_head"``), or a scale is missing, not finite
            or below ``MIN_SCALE``; nothing changes.
        TypeError
            A scale that is not a real number.

        Notes
        -----
        Scales apply to later writes and gathers: tokens written before a change were
        quantized with the old scale (set scales before writing). On CUDA the new
        scales reach the device's scale table (:attr:`scale_table`) synchronously (the
        device is synchronized around the copy): a once-per-load call, not a per-step
        one.
        """
        layer = self._layer(layer)
        self._quantized("set_kv_scales")
        k_scale = _scale(k_scale, "k_scale")
        if self.config.key_only:
            if v_scale is not None:
                raise ValueError("v_scale must be None: the cache is key-only")
            v_scale = np.float32(1.0)
        else:
            if v_scale is None:
                raise ValueError("v_scale is required: the cache holds K and V")
            v_scale = _scale(v_scale, "v_scale")
        self.backend.set_scales(layer, k_scale, v_scale)

    def calibrate_kv_scales(self, layer: int, k, v=None) -> tuple[float, float | None]:
        """Compute layer ``layer``'s scales from sample K and V and set them.

        Each scale is ``fp8.scale_for_amax(max |x|)``: ``amax / 448`` in float32, so the
        largest sample element lands on +-448 exactly (1.0 for an all-zero sample or one
        holding inf / NaN).

        Parameters
        ----------
        layer : int
        k, v : array, shape [T, num_kv_heads, head_dim]
            ``model_dtype`` arrays, as :meth:`write` takes (``v`` None when key-only).
            Not modified.

        Returns
        -------
        (k_scale, v_scale) : floats, ``v_scale`` None when key-only.

        Raises
        ------
        ValueError
            The pool is not fp8.
        ShapeError
            ``k`` / ``v`` as :meth:`write` refuses them; nothing changes.

        Notes
        -----
        Waits for the device (the maxima are read back): a calibration call, not a
        per-step one.
        """
        layer = self._layer(layer)
        self._quantized("calibrate_kv_scales")
        if self.config.key_only:
            if v is not None:
                raise ShapeError("v must be None: the cache is key-only")
            arrays = (k,)
        else:
            if v is None:
                raise ShapeError("v is None, but the cache holds K and V")
            arrays = (k, v)
        amax = [self.backend.amax(a, name) for a, name in zip(arrays, "kv", strict=False)]
        scales = [fp8.scale_for_amax(a) for a in amax] + [np.float32(1.0)]
        self.backend.set_scales(layer, scales[0], scales[1])
        return (float(scales[0]), None if self.config.key_only else float(scales[1]))

    def kv_scales(self, layer: int) -> tuple[float, float | None]:
        """Layer ``layer``'s ``(k_scale, v_scale)`` as Python floats (what FlashInfer's
        ``run(..., k_scale=, v_scale=)`` and vLLM's ``_k_scale_float`` take); ``v_scale``
        None when key-only.

        Raises
        ------
        ValueError
            The pool is not fp8.
        """
        layer = self._layer(layer)
        self._quantized("kv_scales")
        k_scale, v_scale = (float(s) for s in self.backend.scales[layer])
        return k_scale, None if self.config.key_only else v_scale

    @property
    def scale_table(self):
        """The scales the kernels read: float32 ``[num_layers, 2]``, row ``l`` is layer
        ``l``'s ``(k_scale, v_scale)`` (``v_scale`` unused when key-only), on the cache's
        device and in its framework (vLLM keeps them as tensors, ``layer._k_scale``).
        Read-only by contract: change scales with :meth:`set_kv_scales`.

        Raises
        ------
        ValueError
            The pool is not fp8.
        """
        self._quantized("scale_table")
        return self.backend.scale_table

    def _quantized(self, what: str) -> None:
        if not self.config.quantized:
            raise ValueError(f"{what}: the pool holds {self.config.dtype}, which has no "
                             "scales (only dtype='float8_e4m3fn' pools do)")
        if self.config.token_head_scales:
            raise ValueError(f"{what}: the pool computes a scale per token and head when "
                             "it writes (kv_scale_granularity='token_head'); it has no "
                             "per-layer scales (see scale_cache)")

    def step_metadata(self, max_tokens: int, *, max_batch: int | None = None,
                      max_pages: int | None = None, block_tables: bool = True,
                      max_pages_per_seq: int | None = None, group: int = 0) -> StepMetadata:
        """Persistent device buffers for one step's slot mapping and attention metadata.

        Call :meth:`StepMetadata.update` once per step, then pass the object as the
        ``slot_mapping`` of every layer's :meth:`write` (and to :meth:`gather`); its
        device arrays (``page_indptr``, ``page_indices``, ``last_page_len``,
        ``seq_lens``, ``block_tables``, ``slot_mapping``, ``token_indptr``) feed
        attention kernels. See :mod:`kvcore.metadata` for the layout and padding.

        Parameters
        ----------
        max_tokens : int
            Most new tokens in one step (an engine's max batched tokens).
        max_batch : int, optional
            Most sequences in one step's attention batch; default ``config.max_seqs``.
        max_pages : int, optional
            Most page entries over the batch; default
            ``min(num_pages, max_batch * max_pages_per_seq)``.
        block_tables : bool
            Also keep vLLM-style ``block_tables [max_batch, max_pages_per_seq]``.
        group : int
            The layer group it serves (default 0): with ``layer_groups``, make one per
            K/V group; each layer's ``write`` takes its group's. A window group's
            metadata covers the live window (its pages from ``first_page`` on, lengths
            counted from there).
        max_pages_per_seq : int, optional
            Columns of ``block_tables``; default ``config.max_pages_per_seq``.
        """
        return StepMetadata(self, max_tokens, max_batch, max_pages, block_tables,
                            max_pages_per_seq, group)

    def write(self, layer: int, k, v, slot_mapping, *, stream=None) -> None:
        """Scatter new tokens' keys and values into their slots (one launch for K and V).

        Parameters
        ----------
        layer : int
            In ``[0, num_layers)``.
        k, v : array, shape [T, num_kv_heads, head_dim]
            The cache's dtype (bfloat16 also as uint16/int16 words; an fp8 pool takes
            its ``model_dtype`` and stores ``fp8.quantize(k, k_scale)``, V likewise, see
            :meth:`set_kv_scales`); NumPy for a CPU cache, a CUDA array (torch, CuPy,
            JAX: read in place, never converted) for a CUDA cache. Not modified. Any
            strides over T and heads; a last axis that is not contiguous is copied first
            (on ``stream``). ``v`` is None for a key-only cache (and only then).
        slot_mapping : array of int, shape [T], or StepMetadata
            Slot of each token (``-1``: skip it), e.g. ``append(...).slot_mapping``:
            NumPy (checked on the host, then uploaded) or, on CUDA, a device int64
            array. Or this cache's :class:`StepMetadata`: its uploaded slots (``T`` may
            exceed the step's tokens, up to ``max_tokens``: the rest are -1, so a padded
            batch writes nothing for its padding).
        stream : optional
            A torch or CuPy stream or a ``cudaStream_t`` int; default: the framework's
            current stream.

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
        fast = self._torch_scatter
        if (fast is not None and type(slot_mapping) is StepMetadata and stream is None
                and type(layer) is int and slot_mapping.cache is self
                and (self._single_group or slot_mapping.serves(layer))
                and fast.write(layer, k, v, None, slot_mapping.slot_ptr,
                               slot_mapping.max_tokens, self._current_stream())):
            return   # a decode step's plain case, checked and launched in C
        layer = self._layer(layer)
        handle = self._stream(stream)
        if type(slot_mapping) is StepMetadata:
            self._own(slot_mapping, layer)
            self.backend.write(layer, k, v, None, handle, slot_mapping)
        else:
            self.backend.write(layer, k, v, self._group_slots(slot_mapping, layer), handle)

    def gather(self, layer: int, seq_ids, *, out=None, stream=None, raw: bool = False):
        """Read a batch of sequences out of the pool into contiguous arrays.

        Parameters
        ----------
        layer : int
            In ``[0, num_layers)``.
        seq_ids : array_like of int, shape [B], or StepMetadata
            Active sequences (repeats allowed); or this cache's :class:`StepMetadata`,
            whose uploaded batch is read with nothing going back to the host (the
            capturable form: give ``out``).
        out : (k_out, v_out), optional
            Contiguous ``[rows, num_kv_heads, head_dim]`` arrays of the output dtype (the
            cache's dtype; an fp8 pool's ``model_dtype``, or its fp8 codes with ``raw``)
            on its device to fill in place; ``rows`` at least the batch's tokens;
            ``v_out`` None for a key-only cache. Default: new arrays from the cache's
            framework (on CUDA, allocated on ``stream``).
        stream : optional
            As in :meth:`write`.
        raw : bool
            fp8 pools: return the stored e4m3 codes (uint8 in NumPy and CuPy,
            ``torch.float8_e4m3fn`` in torch) instead of dequantizing them to
            ``model_dtype`` (``fp8.dequantize(code, scale)``). Ignored otherwise.

        Returns
        -------
        k, v : array, shape [total_tokens, num_kv_heads, head_dim]
            ``out`` or new arrays; sequence ``b``'s tokens are rows
            ``token_indptr[b]:token_indptr[b + 1]``. ``v`` is None for a key-only
            cache.
        token_indptr : int64 array, shape [B + 1]
            NumPy for ``seq_ids``; the StepMetadata's device ``token_indptr`` (padded to
            ``max_batch + 1``) for a StepMetadata.

        Raises
        ------
        ShapeError
            ``out`` of the wrong shape, dtype, device or too few rows (with a
            StepMetadata, rows too few are skipped by the kernel and reported by
            :meth:`synchronize`).
        """
        layer = self._layer(layer)
        handle = self._stream(stream)
        if type(seq_ids) is StepMetadata:
            self._own(seq_ids, layer)
            k, v = self.backend.gather(layer, seq_ids, out, handle, raw)
            return k, v, seq_ids.token_indptr
        self._kv_layer(layer)
        page_indptr, page_indices, last_page_len = self.table.flashinfer_metadata(
            seq_ids, group=self._layer_groups[layer])
        num_pages = np.diff(page_indptr)
        lengths = np.where(num_pages > 0, (num_pages.astype(np.int64) - 1)
                           * self.config.page_size + last_page_len, 0)
        token_indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=token_indptr[1:])
        index = (page_indptr, page_indices, last_page_len, token_indptr,
                 int(token_indptr[-1]), int(page_indptr[-1]))
        k, v = self.backend.gather(layer, index, out, handle, raw)
        return k, v, token_indptr

    def copy_pages(self, src, dst, *, stream=None) -> None:
        """Copy page ``src[i]`` to page ``dst[i]`` in every layer, K and V (one launch;
        the raw bytes, so an fp8 pool's codes move as they are).

        Parameters
        ----------
        src, dst : array of int, shape [n]
            Page ids in ``[0, num_pages)``; ``dst`` distinct and disjoint from ``src``.
            Host arrays are checked before anything is copied; CUDA int32 arrays are
            range-checked by the kernel (see the class Notes) and capturable.
        stream : optional
            As in :meth:`write`.

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
        handle = self._stream(stream)
        self.backend.copy_pages(src, dst, handle)

    def synchronize(self, *, stream=None) -> None:
        """Wait for the caller's stream; raise :class:`InvalidPageError` if a kernel
        refused an index.

        Kernels given device-resident index arrays skip out-of-range entries (and
        :meth:`gather` into outputs with too few rows skips those pages) and raise a
        flag instead of failing; this is where that flag becomes an exception (and is
        cleared). Work queued on other streams is not waited for.
        """
        handle = self._stream(stream)
        flags = self.backend.synchronize(handle)
        if flags:
            what = [text for bit, text in _ERROR_BITS if flags & bit]
            raise InvalidPageError(f"a kernel skipped {' and '.join(what)} given in device "
                                   "arrays; those elements were not written")

    # -- validation ---------------------------------------------------------------------------

    def _stream(self, stream):
        """The caller's stream: ``stream`` when given, else the framework's current one."""
        return self._current_stream() if stream is None else self.backend.resolve_stream(stream)

    def _own(self, metadata: StepMetadata, layer: int | None = None) -> None:
        if metadata.cache is not self:
            raise ValueError("this StepMetadata belongs to another KVCache")
        if layer is not None and not self._single_group:
            self._kv_layer(layer)
            if not metadata.serves(layer):
                raise ValueError(f"this StepMetadata holds group {metadata.group}; layer "
                                 f"{layer} is in group {self._layer_groups[layer]}")

    def _kv_layer(self, layer: int) -> None:
        """Refuse a layer of a state group (it holds a recurrent state, not K/V)."""
        if layer in self._state_layers:
            raise ValueError(f"layer {layer} is in a state group: it holds a recurrent "
                             "state in its pages, not per-token K/V")

    def _group_slots(self, slot_mapping, layer: int):
        """``slot_mapping`` for ``layer``: an AppendResult's or a ``[num_groups, T]`` array's
        row of the layer's group; a 1-D array as given."""
        if type(slot_mapping) is AppendResult:
            slot_mapping = slot_mapping.slot_mapping
        if self._single_group:
            return slot_mapping
        self._kv_layer(layer)
        if getattr(slot_mapping, "ndim", 1) == 2:
            if slot_mapping.shape[0] != len(self.config.groups):
                raise ShapeError(f"a 2-D slot_mapping must be [num_groups, T] with "
                                 f"num_groups = {len(self.config.groups)}, got "
                                 f"{tuple(slot_mapping.shape)}")
            return slot_mapping[self._layer_groups[layer]]
        return slot_mapping

    def _layer(self, layer) -> int:
        if type(layer) is int and 0 <= layer < self.config.num_layers:   # the common case
            return layer
        return self.config.layer_index(layer)


def _scale(value, name: str) -> np.float32:
    """A scale as float32: a real number, finite and >= ``fp8.MIN_SCALE`` after the
    float32 rounding (the GPU flushes subnormals; see :data:`kvcore.fp8.MIN_SCALE`)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, np.complexfloating):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    with np.errstate(over="ignore"):
        scale = np.float32(value)
    if not (np.isfinite(scale) and scale >= np.float32(fp8.MIN_SCALE)):
        raise ValueError(f"{name} must be finite and >= 2**-116 (kvcore.fp8.MIN_SCALE) as a "
                         f"float32, got {value!r}")
    return scale
