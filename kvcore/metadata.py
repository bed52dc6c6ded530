"""Per-step device metadata: one upload per scheduler step, read by every layer.

A model with L layers writes K/V L times per step through the same ``slot_mapping``,
and its attention reads the same page lists L times. :class:`StepMetadata` keeps all of
it in one persistent device buffer of fixed capacity (like an engine's max batch),
filled once per step by :meth:`StepMetadata.update` with a single host-to-device copy,
so that ``KVCache.write(layer, k, v, meta)`` and a captured CUDA graph read it in place.

Buffer layout (one allocation; each region 256-byte aligned), with ``B = max_batch``,
``T = max_tokens``, ``N = max_pages``, ``W = max_pages_per_seq``:

==================  ======================  =============================================
region              dtype, shape            padding past the live step
==================  ======================  =============================================
``page_indptr``     int32 ``[B + 1]``       repeats the live total (empty sequences)
``last_page_len``   int32 ``[B]``           0
``seq_lens``        int32 ``[B]``           0
``token_indptr``    int64 ``[B + 1]``       repeats the live total
``slot_mapping``    int64 ``[T]``           -1 (kernels skip it)
``page_indices``    int32 ``[N]``           -1
``block_tables``    int32 ``[B, W]``        -1 (rows and columns)
==================  ======================  =============================================

So a graph captured at a padded batch (``B`` sequences, ``T`` tokens) replays correctly
with fewer live sequences: padded tokens write nothing and padded sequences have no
pages. Worked example, page 16, two live sequences of 45 and 16 tokens, ``B = 4``:
``page_indptr = [0, 3, 4, 4, 4]``, ``last_page_len = [13, 16, 0, 0]``,
``seq_lens = [45, 16, 0, 0]``, ``token_indptr = [0, 45, 61, 61, 61]``.
"""

from __future__ import annotations

import operator

import numpy as np

from kvcore._checks import check_host_slots, host_index_array
from kvcore._step import fill_step
from kvcore.errors import CapacityError, ShapeError

__all__ = ["StepMetadata"]

_ALIGN = 256

#: (name, dtype, padding) in buffer order; shapes come from the capacities.
_REGIONS = (("page_indptr", "int32", None), ("last_page_len", "int32", 0),
            ("seq_lens", "int32", 0), ("token_indptr", "int64", None),
            ("slot_mapping", "int64", -1), ("page_indices", "int32", -1),
            ("block_tables", "int32", -1))


class StepMetadata:
    """Persistent device buffers for one step's slot mapping and attention metadata.

    Made by :meth:`kvcore.KVCache.step_metadata`; see the module docstring for the
    layout and padding.

    Attributes
    ----------
    page_indptr, last_page_len, seq_lens, token_indptr, slot_mapping, page_indices, block_tables
        Device arrays of the cache's framework (torch tensors for a torch cache, CuPy
        arrays for a CuPy one, NumPy on CPU) at full capacity, valid on the stream of
        the last :meth:`update`. Never reallocated, so a captured graph may read them.
        ``block_tables`` is None when made with ``block_tables=False``.
    batch_size, num_tokens, num_page_entries : int
        The live step: sequences, tokens and ``page_indptr[batch_size]``.
    max_batch, max_tokens, max_pages, max_pages_per_seq : int
        Capacities.

    Notes
    -----
    Ordering: :meth:`update` enqueues its copy on the cache's current stream (or the
    ``stream`` given); the writes, gathers and attention kernels that read the buffers
    must run on that stream, or the caller orders them after it. An update overwrites
    buffers that kernels queued earlier on the same stream still read in queue order,
    which is safe. ``update`` refuses to run while its stream captures a CUDA graph:
    run it eagerly before each replay. A captured graph holds the buffers' addresses,
    not the object: keep the StepMetadata (and its cache) alive as long as the graph.
    """

    NUM_STAGING = 3

    def serves(self, layer) -> bool:
        """Whether ``layer``'s writes and attention read this metadata (its group's)."""
        return layer in self._layers

    def __init__(self, cache, max_tokens: int, max_batch: int | None = None,
                 max_pages: int | None = None, block_tables: bool = True,
                 max_pages_per_seq: int | None = None, group: int = 0):
        cfg = cache.config
        if isinstance(group, (bool, np.bool_)):
            raise TypeError("group must be an integer, got bool")
        group = operator.index(group)
        if not 0 <= group < len(cfg.groups):
            raise IndexError(f"group {group} out of range [0, {len(cfg.groups)})")
        if cfg.groups[group].kind == "state":
            raise ValueError(f"group {group} holds a recurrent state: it has no attention "
                             "metadata")
        #: The layer group whose slots and pages this metadata holds (its layers' writes
        #: and attention read it; a window group's pages are its live window).
        self.group = group
        self._layers = frozenset(cfg.groups[group].layers)
        self._multi_group = len(cfg.groups) > 1
        self._cache = cache
        self._table = cache.table
        self._backend = backend = cache.backend
        self.max_tokens = _capacity(max_tokens, "max_tokens")
        self.max_batch = _capacity(cfg.max_seqs if max_batch is None else max_batch,
                                   "max_batch")
        self.max_pages_per_seq = _capacity(cfg.max_pages_per_seq if max_pages_per_seq is None
                                           else max_pages_per_seq, "max_pages_per_seq")
        default_pages = min(cfg.num_pages, self.max_batch * self.max_pages_per_seq)
        self.max_pages = _capacity(default_pages if max_pages is None else max_pages,
                                   "max_pages")
        shapes = {"page_indptr": (self.max_batch + 1,), "last_page_len": (self.max_batch,),
                  "seq_lens": (self.max_batch,), "token_indptr": (self.max_batch + 1,),
                  "slot_mapping": (self.max_tokens,), "page_indices": (self.max_pages,),
                  "block_tables": (self.max_batch, self.max_pages_per_seq)}
        regions = [r for r in _REGIONS if block_tables or r[0] != "block_tables"]
        self._offsets, offset = {}, 0
        for name, dtype, _ in regions:
            self._offsets[name] = offset
            offset += -(-int(np.prod(shapes[name])) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
        self._nbytes = offset
        self._last_region = regions[-1][0]
        self._device, self._staging = backend.metadata_storage(self._nbytes, self.NUM_STAGING)
        self._device_ptr = backend.address(self._device)
        #: Device address of ``slot_mapping`` (what a write reads).
        self.slot_ptr = self._device_ptr + self._offsets["slot_mapping"]
        for name, dtype, _ in _REGIONS:
            view = (backend.typed_view(self._device, self._offsets[name], dtype, shapes[name])
                    if name in self._offsets else None)
            setattr(self, name, view)
        # Host views of each staging buffer, region by region.
        self._host = [{name: stage[self._offsets[name]:self._offsets[name]
                                   + int(np.prod(shapes[name])) * np.dtype(dtype).itemsize]
                       .view(dtype).reshape(shapes[name]) for name, dtype, _ in regions}
                      for stage in self._staging]
        # How far each staging buffer holds non-padding (slot_mapping, page_indices,
        # block_tables rows and columns); everything past it is padding already.
        self._high = [np.zeros(4, dtype=np.int64) for _ in self._staging]
        for host in self._host:
            for name, _, pad in regions:
                host[name][...] = 0 if pad is None else pad
        self._device_rows = self.max_batch      # block_tables rows the device may hold
        self._events = [None] * len(self._staging)
        self._current = 0
        self.batch_size = self.num_tokens = self.num_page_entries = 0
        self._total_tokens = 0
        stream = backend.current_stream()
        self._upload(self._current, self._nbytes, stream)
        self._events[self._current] = backend.record_event(stream, None)
        # The buffers are ready before first use, on whatever stream that is.
        backend.wait_event(self._events[self._current])

    # -- update -------------------------------------------------------------------------------

    def update(self, seq_ids=None, slot_mapping=None, *, stream=None) -> None:
        """Fill the buffers for one step with one host-to-device copy.

        Parameters
        ----------
        seq_ids : array_like of int, shape [batch], optional
            Active sequences whose pages attention reads this step, in the order of the
            attention batch; at most ``max_batch``. None: an empty batch.
        slot_mapping : array_like of int or AppendResult, shape [num_tokens], optional
            Where this step's new tokens go (``append(...).slot_mapping``, or the
            ``AppendResult`` itself); at most ``max_tokens``, each -1 or a valid slot.
            None: no tokens.
        stream : optional
            A torch or CuPy stream, or a ``cudaStream_t`` int; default: the cache's
            current stream.

        Raises
        ------
        UnknownSequenceError
            ``seq_ids`` names an inactive sequence (repeats are allowed, as in
            :meth:`PageTable.flashinfer_metadata`).
        CapacityError
            The step exceeds a capacity.
        InvalidPageError, ShapeError
            A bad ``slot_mapping``.
        KernelError
            Called while ``stream`` captures a CUDA graph.

        Notes
        -----
        Everything is validated before anything changes: a call that raises leaves the
        buffers and the live counts as they were.
        """
        seq_arr = _seq_id_array(seq_ids)
        indptr, indices, last_page_len = self._table.flashinfer_metadata(seq_arr,
                                                                          group=self.group)
        self._fill(indptr, indices, last_page_len, slot_mapping, stream)

    def _fill(self, indptr, indices, last_page_len, slot_mapping, stream) -> None:
        """:meth:`update` from the batch's FlashInfer triple (int32 host arrays, as
        ``PageTable.flashinfer_metadata`` returns them) instead of its seq ids: what a
        tensor-parallel worker, which holds no page table, fills its buffers from
        (``kvcore.distributed``). Validates and raises as :meth:`update`."""
        cfg = self._cache.config
        batch, nnz = len(last_page_len), int(indptr[-1])
        if slot_mapping is None:
            slots = _NO_SLOTS
        else:
            slots = getattr(slot_mapping, "slot_mapping", slot_mapping)
            if self._multi_group and getattr(slots, "ndim", 1) == 2:
                slots = slots[self.group]       # append's [num_groups, T]: this group's row
            if self._backend.is_device_array(slots):
                raise ShapeError("StepMetadata.update takes the step's slot_mapping on the "
                                 "host (what append returns), not a device array")
            slots = np.ascontiguousarray(check_host_slots(slots, None,
                                                          cfg.num_pages * cfg.page_size))
        if batch > self.max_batch:
            raise CapacityError(f"batch of {batch} sequences exceeds max_batch {self.max_batch}")
        if nnz > self.max_pages:
            raise CapacityError(f"the batch maps {nnz} pages, above max_pages {self.max_pages}")
        if slots.size > self.max_tokens:
            raise CapacityError(f"{slots.size} tokens exceed max_tokens {self.max_tokens}")
        handle = self._backend.resolve_stream(stream)
        self._backend.refuse_capture(handle, "StepMetadata.update")
        current = (self._current + 1) % len(self._staging)
        self._backend.wait_event(self._events[current])
        # fill_step checks the block-table width before it writes anything
        total = fill_step(indptr, indices, last_page_len, slots, cfg.page_size,
                          self._host[current], self._high[current])
        # -- from here on nothing raises for the caller's input
        span = self._nbytes
        if self.block_tables is not None:
            rows = max(batch, self._device_rows)
            span = self._offsets["block_tables"] + rows * self.max_pages_per_seq * 4
        self._upload(current, span, handle)
        # Guard this staging copy with an event on the stream of its copy: it is
        # rewritten (NUM_STAGING updates later) only once that copy has run.
        self._events[current] = self._backend.record_event(handle, self._events[current])
        if self.block_tables is not None:
            self._device_rows = batch
        self._current = current
        self.batch_size, self.num_tokens, self.num_page_entries = batch, slots.size, nnz
        self._total_tokens = total

    def _upload(self, which: int, nbytes: int, stream) -> None:
        self._backend.upload_bytes(self._device_ptr, self._staging[which], nbytes, stream)

    # -- read by the backends ---------------------------------------------------------------

    @property
    def cache(self):
        """The :class:`kvcore.KVCache` these buffers belong to."""
        return self._cache

    @property
    def num_live_tokens(self) -> int:
        """Tokens of the live batch's sequences (``token_indptr[batch_size]``)."""
        return self._total_tokens

    def slot_mapping_ptr(self, rows: int) -> int:
        """Device address of ``slot_mapping`` for a write of ``rows`` tokens."""
        if rows > self.max_tokens:
            raise ShapeError(f"k has {rows} rows, above this StepMetadata's max_tokens "
                             f"{self.max_tokens}")
        return self._device_ptr + self._offsets["slot_mapping"]

    def slot_mapping_view(self, rows: int) -> np.ndarray:
        """Host view of the first ``rows`` slots (CPU caches, where the buffer is host)."""
        self.slot_mapping_ptr(rows)
        return np.asarray(self.slot_mapping)[:rows]

    def gather_pointers(self) -> tuple[int, int, int, int]:
        """Device addresses of page_indptr, page_indices, last_page_len, token_indptr."""
        base, off = self._device_ptr, self._offsets
        return (base + off["page_indptr"], base + off["page_indices"],
                base + off["last_page_len"], base + off["token_indptr"])

    def host_gather_index(self):
        """The live batch as host arrays, in the form the backends' ``gather`` takes."""
        host = self._host[self._current]
        b, nnz = self.batch_size, self.num_page_entries
        return (host["page_indptr"][:b + 1], host["page_indices"][:nnz],
                host["last_page_len"][:b], host["token_indptr"][:b + 1],
                self._total_tokens, nnz)

    def __del__(self):
        try:
            for event in self._events:
                self._backend.destroy_event(event)
        except Exception:   # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (f"StepMetadata(batch={self.batch_size}/{self.max_batch}, tokens="
                f"{self.num_tokens}/{self.max_tokens}, pages={self.num_page_entries}/"
                f"{self.max_pages}, block_tables={self.block_tables is not None})")


_NO_SLOTS = np.zeros(0, dtype=np.int64)


def _seq_id_array(seq_ids) -> np.ndarray:
    """``seq_ids`` as a 1-D int64 array, converted once (list conversion is the costly
    part of a step with a Python list of ids)."""
    if seq_ids is None:
        return _NO_SLOTS
    if type(seq_ids) is np.ndarray and seq_ids.ndim == 1 and seq_ids.dtype.kind == "i" \
            and seq_ids.dtype.isnative:
        return seq_ids
    return host_index_array(seq_ids, "seq_ids")


def _capacity(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
