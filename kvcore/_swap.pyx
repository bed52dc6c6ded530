# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Swap bookkeeping: which device page goes to which host page, and back.

A :class:`HostTier` moves whole sequences of a :class:`~kvcore.PageTable` between the
device tier (the table's ``allocator``) and the host tier (its ``host_allocator``). It
decides page ids and refcounts only; the bytes are moved by whoever holds the pools
(:class:`kvcore.KVCache` does both). A move is two calls: :meth:`HostTier.swap_out` or
:meth:`HostTier.swap_in` starts it and returns the page pairs to copy, and
:meth:`HostTier.finish` ends it once the copy has completed (or failed).

While the copy is in flight the sequence holds its pages in *both* tiers (the state
machine is in ``_core.pxd``), so nothing the copy reads or writes can be freed, reused
or mapped by anyone: completion releases the side that is no longer needed, failure the
other side, and a sequence removed meanwhile releases both then.
"""

import numpy as np

cimport cython
cimport numpy as cnp
from libc.stdint cimport INT32_MAX, int32_t, int64_t, uint8_t

from kvcore._allocator cimport PageAllocator
from kvcore._args cimport empty_int32, int64_array, int_arg, page_array
from kvcore._core cimport (
    SEQ_ARRIVING,
    SEQ_DOOMED,
    SEQ_LEAVING,
    SEQ_RESIDENT,
    SEQ_SWAPPED,
    PageTable,
)
from kvcore._typedefs cimport NO_PAGE, page_id_t

from kvcore.errors import OutOfPagesError, UnknownSequenceError

cnp.import_array()

__all__ = ["HostTier"]


@cython.final
cdef class HostTier:
    """Moves sequences of a :class:`~kvcore.PageTable` between its device and host tiers.

    Parameters
    ----------
    table : PageTable
        A table made with ``host_allocator=``.

    Notes
    -----
    Pages shared by several sequences of one call (forks, prefix hits) move once and
    stay shared in the other tier: the call copies each distinct page once and maps the
    copy wherever the original was mapped. Window groups move their live pages only,
    state groups their state pages.

    Sequence states (``PageTable.seq_state``): ``swap_out`` takes resident sequences to
    ``"swapping_out"``, ``finish`` to ``"swapped"`` (or back to ``"resident"`` when the
    copy failed); ``swap_in`` takes swapped ones to ``"swapping_in"``, ``finish`` to
    ``"resident"`` (or back to ``"swapped"``). Only a resident sequence can be appended,
    written, forked, truncated or read; only ``remove``, ``num_tokens`` and
    ``seq_state`` accept the others.

    Examples
    --------
    >>> from kvcore import PageAllocator, PageTable
    >>> table = PageTable(PageAllocator(8), page_size=4, max_seqs=4, max_pages_per_seq=4,
    ...                   host_allocator=PageAllocator(8))
    >>> tier = HostTier(table)
    >>> seq = table.add_sequence()
    >>> _ = table.append([seq], [6])
    >>> device_pages, host_pages = tier.swap_out([seq])    # copy these pairs out ...
    >>> device_pages.tolist(), host_pages.tolist(), table.seq_state(seq)
    ([0, 1], [0, 1], 'swapping_out')
    >>> tier.finish([seq], True)                            # ... then say it completed
    >>> table.seq_state(seq), table.allocator.num_free
    ('swapped', 8)
    """

    cdef PageTable _t
    cdef PageAllocator _device, _host
    cdef page_id_t* _device_map       # [num_pages] scratch, NO_PAGE between calls
    cdef page_id_t* _host_map         # [num_host_pages] scratch, NO_PAGE between calls
    cdef int32_t* _seen               # [max_seqs] duplicate-detection stamps
    cdef int32_t _stamp
    cdef object _owners

    def __cinit__(self, PageTable table not None):
        if table.host_allocator is None:
            raise ValueError("this PageTable has no host tier: make it with "
                             "host_allocator=PageAllocator(num_host_pages)")
        self._t = table
        self._device = table.allocator
        self._host = table.host_allocator
        device_map = np.full(self._device.page_count(), NO_PAGE, dtype=np.int32)
        host_map = np.full(self._host.page_count(), NO_PAGE, dtype=np.int32)
        seen = np.zeros(table._max_seqs, dtype=np.int32)
        self._owners = (device_map, host_map, seen)
        self._device_map = <page_id_t*>cnp.PyArray_DATA(device_map)
        self._host_map = <page_id_t*>cnp.PyArray_DATA(host_map)
        self._seen = <int32_t*>cnp.PyArray_DATA(seen)
        self._stamp = 0

    def __repr__(self):
        return (f"HostTier(device_free={self._device.free_count()}, "
                f"host_free={self._host.free_count()}/{self._host.page_count()})")

    @property
    def table(self):
        """PageTable: the table whose sequences this tier moves."""
        return self._t

    # -- admission ---------------------------------------------------------------------------

    def swap_out_pages(self, seq_ids):
        """Return the host pages :meth:`swap_out` would take for ``seq_ids`` (their
        distinct device pages); checks as it does and changes nothing."""
        return self._count(seq_ids, True)

    def swap_in_pages(self, seq_ids):
        """Return the device pages :meth:`swap_in` would take for ``seq_ids`` (their
        distinct host pages); checks as it does and changes nothing. Admission for a
        swap-in: compare it with ``allocator.num_free``."""
        return self._count(seq_ids, False)

    # -- moves -------------------------------------------------------------------------------

    def swap_out(self, seq_ids):
        """Start moving resident sequences to the host tier.

        Each distinct device page of the sequences' rows (every group's live pages) gets
        a host page; the host rows map them, and the sequences become
        ``"swapping_out"``. Their device pages stay allocated until :meth:`finish`.

        Parameters
        ----------
        seq_ids : array_like of int, shape [B]
            Distinct resident sequences.

        Returns
        -------
        device_pages, host_pages : numpy.ndarray of int32, shape [n]
            Copy device page ``device_pages[i]`` (every layer, K and V) into host page
            ``host_pages[i]``; then call :meth:`finish`. ``host_pages`` are distinct.

        Raises
        ------
        UnknownSequenceError
            A seq id that is not active.
        SequenceStateError
            A sequence that is not resident (:class:`TransferPendingError` when its
            transfer is in flight).
        ValueError
            A seq id given twice.
        OutOfPagesError
            The host tier has fewer free pages than the call needs.
        """
        return self._move(seq_ids, True)

    def swap_in(self, seq_ids):
        """Start bringing swapped-out sequences back into fresh device pages.

        Each distinct host page gets a device page (taken like ``append``'s: clean pages
        first, then evicting cached prefix pages); the device rows map them and the
        sequences become ``"swapping_in"``: not usable until :meth:`finish` says the
        copy arrived. Their host pages stay allocated until then.

        Parameters
        ----------
        seq_ids : array_like of int, shape [B]
            Distinct swapped-out sequences.

        Returns
        -------
        device_pages, host_pages : numpy.ndarray of int32, shape [n]
            Copy host page ``host_pages[i]`` into device page ``device_pages[i]``; then
            call :meth:`finish`. ``device_pages`` are distinct.

        Raises
        ------
        UnknownSequenceError, SequenceStateError, ValueError
            As :meth:`swap_out` (here the sequences must be ``"swapped"``).
        OutOfPagesError
            Fewer free device pages than the call needs (see :meth:`swap_in_pages`).
        """
        return self._move(seq_ids, False)

    def finish(self, seq_ids, ok):
        """End the transfer of ``seq_ids`` (exactly the ones a move call was given).

        Parameters
        ----------
        seq_ids : array_like of int, shape [B]
            The sequences of one finished transfer; those removed meanwhile included.
        ok : bool
            Whether the copy completed. True: a swap-out releases the device pages (the
            sequences are ``"swapped"``), a swap-in the host pages (``"resident"``).
            False: the copy's destination is released instead and the sequences are
            back where they were, their data intact in the tier they left.

        Raises
        ------
        UnknownSequenceError
            A seq id with no transfer in flight (or given twice); nothing changes.
        """
        if not isinstance(ok, (bool, np.bool_)):
            raise TypeError(f"ok must be a bool, got {type(ok).__name__}")
        cdef cnp.ndarray sids = int64_array(seq_ids, "seq_ids")
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef Py_ssize_t i, batch = cnp.PyArray_DIM(sids, 0)
        cdef int64_t s
        cdef uint8_t state
        cdef int32_t stamp = self._next_stamp()
        cdef PageTable t = self._t
        for i in range(batch):
            s = sp[i]
            if (s < 0 or s >= t._max_seqs or self._seen[s] == stamp
                    or not (t._active[s] == SEQ_LEAVING or t._active[s] == SEQ_ARRIVING
                            or t._active[s] == SEQ_DOOMED)):
                raise UnknownSequenceError(f"seq_id {s} has no transfer in flight"
                                           + (" (given twice)" if 0 <= s < t._max_seqs
                                              and self._seen[s] == stamp else ""))
            self._seen[s] = stamp
        t._version += 1
        for i in range(batch):
            s = sp[i]
            state = t._active[s]
            if t._loading[s]:
                self._finish_load(s, ok, state == SEQ_DOOMED)
            elif state == SEQ_DOOMED:
                t._release_row(self._device, t._table, s)
                t._release_row(self._host, t._host_table, s)
                t._num_doomed -= 1
                t._free_seq_id(s)
            elif (state == SEQ_LEAVING) == bool(ok):   # out and done, or in and failed
                t._release_row(self._device, t._table, s)
                t._active[s] = SEQ_SWAPPED
            else:                                       # in and done, or out and failed
                t._release_row(self._host, t._host_table, s)
                t._active[s] = SEQ_RESIDENT
                if state == SEQ_ARRIVING:
                    t._prefix.seq_relocated(s)

    def load_pairs(self, seq_id):
        """Return the copies a sequence arriving from a host-tier prefix hit waits for.

        ``PageTable.add_sequence`` maps a hit on offloaded blocks (see
        :meth:`PageTable.take_writebacks`) into fresh device pages and leaves the
        sequence ``"swapping_in"``; copy each pair host -> device, then :meth:`finish`
        it like a swap-in. If that copy failed, the sequence keeps only the hit before
        its first host page (its length shrinks to it) and the host entries it read
        leave the index.

        Returns
        -------
        device_pages, host_pages : numpy.ndarray of int32, shape [n]
            Empty unless ``seq_id`` is arriving from a prefix hit.
        """
        cdef int64_t s = self._t._live_arg(int_arg(seq_id, "seq_id"))
        cdef PageTable t = self._t
        cdef int64_t c, lo, hi, n = 0
        cdef cnp.ndarray device = None, host = None
        cdef page_id_t* row
        cdef page_id_t* host_row
        while True:   # the allocation may let another thread in: retry if it changed
            if not t._loading[s]:
                return empty_int32(0), empty_int32(0)
            t._live_cols(0, s, &lo, &hi)
            row = t._table + s * t._max_pages_per_seq
            host_row = t._host_table + s * t._max_pages_per_seq
            n = 0
            for c in range(lo, hi):
                n += host_row[c] != NO_PAGE
            if device is not None and cnp.PyArray_DIM(device, 0) == n:
                break
            device = empty_int32(n)
            host = empty_int32(n)
        cdef page_id_t* d = <page_id_t*>cnp.PyArray_DATA(device)
        cdef page_id_t* h = <page_id_t*>cnp.PyArray_DATA(host)
        n = 0
        for c in range(lo, hi):
            if host_row[c] != NO_PAGE:
                d[n] = row[c]
                h[n] = host_row[c]
                n += 1
        return device, host

    def finish_writebacks(self, host_pages, ok):
        """End the copies of offloaded pages (the ``host_pages`` of
        :meth:`PageTable.take_writebacks`): completed (``ok``), the blocks become findable
        in the host tier; failed, they leave the index and are never served.

        Raises
        ------
        InvalidPageError
            A host page id outside the host tier.
        ValueError
            A page that no copy holds (it has no reference); nothing changes.
        """
        if not isinstance(ok, (bool, np.bool_)):
            raise TypeError(f"ok must be a bool, got {type(ok).__name__}")
        cdef cnp.ndarray pages = page_array(host_pages, "host_pages", self._host.page_count())
        cdef const page_id_t* hp = <const page_id_t*>cnp.PyArray_DATA(pages)
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(pages, 0)
        cdef page_id_t* seen = self._host_map      # NO_PAGE between calls; 0 marks "seen"
        cdef bint twice
        for i in range(n):
            if not self._t._prefix.writeback_taken(hp[i]) or seen[hp[i]] == 0:
                twice = seen[hp[i]] == 0
                self._unmark(hp, i, seen)
                raise ValueError(
                    f"host page {hp[i]} " + ("is given twice" if twice else
                                             "has no write-back in flight (only pages "
                                             "take_writebacks returned and not yet "
                                             "finished have)"))
            seen[hp[i]] = 0
        self._unmark(hp, n, seen)
        for i in range(n):
            self._t._prefix.writeback_done(hp[i], bool(ok))

    # -- the work ----------------------------------------------------------------------------

    cdef int64_t _count(self, object seq_ids, bint out) except -1:
        """The distinct pages of the rows that a move of ``seq_ids`` would copy."""
        cdef cnp.ndarray sids = int64_array(seq_ids, "seq_ids")
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef Py_ssize_t batch = cnp.PyArray_DIM(sids, 0)
        cdef cnp.ndarray scratch = None
        cdef int64_t bound
        while True:   # the allocation may let another thread in: retry if the rows grew
            bound = self._upper_bound(sp, batch)
            if scratch is not None and cnp.PyArray_DIM(scratch, 0) >= bound:
                break
            scratch = empty_int32(bound)
        self._check_states(sp, batch, SEQ_RESIDENT if out else SEQ_SWAPPED)
        return self._count_distinct(sp, batch, self._t._table if out else self._t._host_table,
                                    self._device_map if out else self._host_map,
                                    <page_id_t*>cnp.PyArray_DATA(scratch), True)

    cdef void _finish_load(self, int64_t s, bint ok, bint doomed) noexcept:
        """Finish a prefix load of ``s``: each host entry moves to the device page it was
        copied into (or, failed, leaves the index), and the host pages are released.
        Failed: the sequence keeps only the hit before its first host page."""
        cdef PageTable t = self._t
        cdef int64_t c, lo, hi, first
        cdef page_id_t* row = t._table + s * t._max_pages_per_seq
        cdef page_id_t* host_row = t._host_table + s * t._max_pages_per_seq
        t._live_cols(0, s, &lo, &hi)
        first = hi
        for c in range(lo, hi):
            if host_row[c] != NO_PAGE:
                if c < first:
                    first = c
                t._prefix.load_done(host_row[c], row[c], ok)
        t._release_row(self._host, t._host_table, s)
        t._loading[s] = 0
        if doomed:
            t._release_row(self._device, t._table, s)
            t._num_doomed -= 1
            t._free_seq_id(s)
            return
        if not ok:   # the pages it copied into were never served: free them
            for c in range(hi - 1, first - 1, -1):
                self._device.drop_ref(row[c])
                row[c] = NO_PAGE
            t._seq_lens[s] = <int32_t>(first * t._page_size)
            t._prefix.truncated(s, first * t._page_size, row)
        t._active[s] = SEQ_RESIDENT

    cdef tuple _move(self, object seq_ids, bint out):
        cdef cnp.ndarray sids = int64_array(seq_ids, "seq_ids")
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef Py_ssize_t batch = cnp.PyArray_DIM(sids, 0)
        cdef PageTable t = self._t
        cdef PageAllocator src_alloc = self._device if out else self._host
        cdef PageAllocator dst_alloc = self._host if out else self._device
        cdef page_id_t* src_table = t._table if out else t._host_table
        cdef page_id_t* dst_table = t._host_table if out else t._table
        cdef page_id_t* src_map = self._device_map if out else self._host_map
        cdef cnp.ndarray src_pages = None, dst_pages = None
        cdef int64_t bound, n, free
        while True:
            # Outputs are allocated first, so that nothing below can let another thread
            # in between the checks and the changes; retry if the table grew meanwhile.
            bound = self._upper_bound(sp, batch)
            if src_pages is None or cnp.PyArray_DIM(src_pages, 0) < bound:
                src_pages = empty_int32(bound)
                dst_pages = empty_int32(bound)
                continue
            self._check_states(sp, batch, SEQ_RESIDENT if out else SEQ_SWAPPED)
            if (dst_alloc.clean_count() >= bound
                    and self._all_private(sp, batch, src_table, src_alloc)):
                # The common case: no page shared, so no two entries are one page and
                # there is nothing to deduplicate; and clean pages suffice, so nothing is
                # evicted. One pass maps the k-th entry to the k-th page taken.
                n = bound
                self._map_private(sp, batch, src_table, dst_table, dst_alloc,
                                  <page_id_t*>cnp.PyArray_DATA(src_pages),
                                  <page_id_t*>cnp.PyArray_DATA(dst_pages), n)
                break
            n = self._count_distinct(sp, batch, src_table, src_map,
                                     <page_id_t*>cnp.PyArray_DATA(src_pages), False)
            free = dst_alloc.free_count()
            if n > free:
                self._unmark(<page_id_t*>cnp.PyArray_DATA(src_pages), n, src_map)
                raise OutOfPagesError(
                    n, free, f"moving these sequences {'out' if out else 'in'} needs {n} "
                    f"{'host' if out else 'device'} pages but only {free} are free")
            self._map_rows(sp, batch, src_table, dst_table, src_map, dst_alloc,
                           <page_id_t*>cnp.PyArray_DATA(src_pages),
                           <page_id_t*>cnp.PyArray_DATA(dst_pages), n)
            break
        cdef Py_ssize_t i
        t._version += 1
        for i in range(batch):
            t._active[sp[i]] = SEQ_LEAVING if out else SEQ_ARRIVING
        src_pages = src_pages[:n]
        dst_pages = dst_pages[:n]
        return (src_pages, dst_pages) if out else (dst_pages, src_pages)

    cdef int32_t _next_stamp(self):
        if self._stamp == INT32_MAX:
            (<cnp.ndarray>self._owners[2])[:] = 0
            self._stamp = 0
        self._stamp += 1
        return self._stamp

    cdef int _check_states(self, const int64_t* sp, Py_ssize_t batch, uint8_t wanted) except -1:
        """Raise unless every seq id is distinct and in state ``wanted``."""
        cdef Py_ssize_t i
        cdef int64_t s
        cdef PageTable t = self._t
        cdef int32_t stamp = self._next_stamp()
        for i in range(batch):
            s = sp[i]
            if s < 0 or s >= t._max_seqs or t._active[s] != wanted:
                t._raise_state(s, "resident" if wanted == SEQ_RESIDENT else "swapped")
            if self._seen[s] == stamp:
                raise ValueError(f"seq_ids holds seq_id {s} more than once")
            self._seen[s] = stamp
        return 0

    cdef int64_t _upper_bound(self, const int64_t* sp, Py_ssize_t batch) noexcept:
        """Mapped columns over the batch (seq ids out of range count 0)."""
        cdef Py_ssize_t i
        cdef int32_t g
        cdef int64_t lo, hi, total = 0
        cdef PageTable t = self._t
        for i in range(batch):
            if 0 <= sp[i] < t._max_seqs:
                for g in range(t._num_groups):
                    t._live_cols(g, sp[i], &lo, &hi)
                    total += hi - lo
        return total

    cdef int64_t _count_distinct(self, const int64_t* sp, Py_ssize_t batch,
                                 const page_id_t* table, page_id_t* seen_map,
                                 page_id_t* out, bint unmark) noexcept:
        """List the distinct pages of the batch's rows of ``table`` in ``out`` (room for
        ``_upper_bound`` entries), marking each in ``seen_map``; the marks are cleared
        again when ``unmark`` (else ``_map_rows`` or ``_unmark`` clears them)."""
        cdef Py_ssize_t i
        cdef int32_t g
        cdef int64_t c, lo, hi, n = 0, s
        cdef page_id_t page
        cdef const page_id_t* row
        cdef PageTable t = self._t
        cdef page_id_t* listed = out
        for i in range(batch):
            s = sp[i]
            for g in range(t._num_groups):
                t._live_cols(g, s, &lo, &hi)
                row = table + g * t._group_stride + s * t._max_pages_per_seq
                for c in range(lo, hi):
                    page = row[c]
                    if seen_map[page] == NO_PAGE:
                        seen_map[page] = 0
                        listed[n] = page
                        n += 1
        if unmark:
            self._unmark(listed, n, seen_map)
        return n

    cdef bint _all_private(self, const int64_t* sp, Py_ssize_t batch, const page_id_t* table,
                           PageAllocator alloc) noexcept:
        """Whether every page of the batch's rows of ``table`` has refcount 1 (mapped by
        that one entry only: no fork, prefix hit or other sequence shares it)."""
        cdef Py_ssize_t i
        cdef int32_t g
        cdef int64_t c, lo, hi, s
        cdef const page_id_t* row
        cdef PageTable t = self._t
        for i in range(batch):
            s = sp[i]
            for g in range(t._num_groups):
                t._live_cols(g, s, &lo, &hi)
                row = table + g * t._group_stride + s * t._max_pages_per_seq
                for c in range(lo, hi):
                    if alloc.refs(row[c]) != 1:
                        return False
        return True

    cdef void _map_private(self, const int64_t* sp, Py_ssize_t batch,
                           const page_id_t* src_table, page_id_t* dst_table,
                           PageAllocator dst_alloc, page_id_t* src_pages, page_id_t* dst_pages,
                           int64_t n) noexcept:
        """``_map_rows`` for rows whose ``n`` entries are all distinct pages: take ``n``
        pages and pair the k-th entry with the k-th."""
        cdef Py_ssize_t i
        cdef int32_t g
        cdef int64_t c, lo, hi, s, k = 0
        cdef const page_id_t* row
        cdef page_id_t* dst_row
        cdef PageTable t = self._t
        dst_alloc.take(dst_pages, <int32_t>n)
        for i in range(batch):
            s = sp[i]
            for g in range(t._num_groups):
                t._live_cols(g, s, &lo, &hi)
                row = src_table + g * t._group_stride + s * t._max_pages_per_seq
                dst_row = dst_table + g * t._group_stride + s * t._max_pages_per_seq
                for c in range(lo, hi):
                    src_pages[k] = row[c]
                    dst_row[c] = dst_pages[k]
                    k += 1

    cdef void _unmark(self, const page_id_t* pages, int64_t n, page_id_t* seen_map) noexcept:
        cdef int64_t k
        for k in range(n):
            seen_map[pages[k]] = NO_PAGE

    cdef void _map_rows(self, const int64_t* sp, Py_ssize_t batch, const page_id_t* src_table,
                        page_id_t* dst_table, page_id_t* src_map, PageAllocator dst_alloc,
                        const page_id_t* src_pages, page_id_t* dst_pages,
                        int64_t n) noexcept:
        """Take ``n`` pages of the other tier for ``src_pages`` (pair ``k`` is
        ``src_pages[k] -> dst_pages[k]``) and map the copies into the destination rows,
        one reference per row entry; clears ``src_map``."""
        cdef Py_ssize_t i
        cdef int32_t g
        cdef int64_t k, c, lo, hi, s
        cdef page_id_t page, m
        cdef const page_id_t* row
        cdef page_id_t* dst_row
        cdef PageTable t = self._t
        dst_alloc.take(dst_pages, <int32_t>n)
        for k in range(n):
            src_map[src_pages[k]] = dst_pages[k]
        for i in range(batch):
            s = sp[i]
            for g in range(t._num_groups):
                t._live_cols(g, s, &lo, &hi)
                row = src_table + g * t._group_stride + s * t._max_pages_per_seq
                dst_row = dst_table + g * t._group_stride + s * t._max_pages_per_seq
                for c in range(lo, hi):
                    page = row[c]
                    m = src_map[page]
                    if m >= 0:               # first entry: take() gave the copy its reference
                        dst_row[c] = m
                        src_map[page] = -2 - m
                    else:                    # a later entry of a shared page
                        dst_row[c] = -2 - m
                        dst_alloc.add_ref(-2 - m)
        for k in range(n):
            src_map[src_pages[k]] = NO_PAGE
