# cython: language_level=3
"""C-level declarations of the page table (see _core.pyx for the invariants).

``PageTable`` holds the allocator and a prefix-cache object (``PrefixHooks``: the no-op
base when caching is off, a ``PrefixCache`` when on) and reaches their state only through
the doors declared in ``_allocator.pxd`` and ``_prefix.pxd``.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

from kvcore._allocator cimport PageAllocator
from kvcore._prefix cimport PrefixHooks
from kvcore._typedefs cimport page_id_t, seq_id_t, slot_t


# A seq id's state (PageTable._active). Which rows are valid in each: the device row in
# RESIDENT, LEAVING, ARRIVING and DOOMED; the host row in SWAPPED, LEAVING, ARRIVING and
# DOOMED (during a transfer both are, and its completion releases one of them).
cdef enum:
    SEQ_FREE = 0        # on the free seq-id stack
    SEQ_RESIDENT = 1    # its pages are on the device: every call may use it
    SEQ_SWAPPED = 2     # its pages are in the host tier
    SEQ_LEAVING = 3     # swap-out in flight
    SEQ_ARRIVING = 4    # swap-in in flight
    SEQ_DOOMED = 5      # removed while a transfer was in flight; freed when it completes


@cython.final
cdef class PageTable:
    cdef readonly PageAllocator allocator
    cdef int32_t _page_size
    cdef int _page_shift             # log2(page_size) when a power of two, else -1
    cdef int32_t _max_seqs
    cdef int32_t _max_pages_per_seq
    cdef int32_t _num_seqs
    cdef page_id_t* _table           # [num_groups, max_seqs, max_pages_per_seq], NO_PAGE
                                     # when unmapped; group g's rows at g * _group_stride
    cdef int32_t _num_groups
    cdef int32_t _anchor             # the group whose pages form the prefix chains
    cdef int64_t _group_stride       # max_seqs * max_pages_per_seq
    cdef int32_t* _kind              # [num_groups] GROUP_FULL / GROUP_WINDOW / GROUP_STATE
    cdef int32_t* _window            # [num_groups] window of a window group, else 0
    cdef int32_t* _state_pages       # [num_groups] pages per sequence of a state group
    cdef int32_t* _first_live        # [num_groups, max_seqs] first mapped column (windows)
    cdef int32_t* _release_pending   # [num_pages] scratch for pages_needed; 0 between calls
    cdef page_id_t* _touched         # [2 * num_pages] scratch: pages whose scratch is set
    cdef int64_t* _scratch           # [2 * max_seqs] a call's own copy of its arguments
    cdef int64_t _max_copies_per_seq # copy-on-write pairs one sequence can cause in a call
    cdef bint _has_state, _has_window, _has_kv
    cdef object _groups              # tuple of LayerGroup
    cdef object _group_views         # read-only [max_seqs, max_pages_per_seq] view per group
    cdef int32_t* _seq_lens          # [max_seqs]; 0 for inactive rows
    cdef uint8_t* _active            # [max_seqs]
    cdef seq_id_t* _free_seqs        # [max_seqs]; [0, _num_free_seqs) are free, top last
    cdef int32_t _num_free_seqs
    cdef int32_t* _seen              # [max_seqs] duplicate-detection stamps
    cdef int32_t _stamp
    cdef int32_t* _cow_pending       # [num_pages] scratch for pages_needed; all 0 between calls
    cdef object _owners              # NumPy arrays that own the C arrays above
    cdef PrefixHooks _prefix         # never None: a no-op PrefixHooks when caching is off
    cdef object _block_table_view
    cdef object _seq_lens_view
    cdef uint64_t _version           # bumped by every call that changes the table
    # The host tier (None / NULL without one): its allocator and the host rows,
    # [num_groups, max_seqs, max_pages_per_seq] like _table, NO_PAGE where unmapped.
    cdef readonly PageAllocator host_allocator
    cdef page_id_t* _host_table
    cdef int32_t _num_doomed         # seq ids removed while in flight, not yet freed
    cdef uint8_t* _loading           # [max_seqs] 1 while arriving from a host-tier prefix hit

    cdef int64_t _seq_arg(self, object seq_id) except -1
    cdef int64_t _active_arg(self, int64_t s) except -1
    cdef int64_t _live_arg(self, int64_t s) except -1
    cdef int _raise_state(self, int64_t s, str wanted=*) except -1
    cdef void _release_row(self, PageAllocator alloc, page_id_t* base, int64_t s) noexcept nogil
    cdef void _free_seq_id(self, int64_t s) noexcept nogil
    cdef int64_t _sum_pages(self, const int64_t* seq_ids, Py_ssize_t batch, int32_t g) noexcept
    cdef int64_t _max_row_pages(self, const int64_t* seq_ids, Py_ssize_t batch,
                                int32_t g) noexcept
    cdef int _check_active(self, const int64_t* seq_ids, Py_ssize_t batch,
                           bint allow_duplicates) except -1
    cdef tuple _batch_args(self, object seq_ids, object num_new_tokens,
                           str name=*, bint lengths=*)
    cdef int64_t _new_seq(self)
    cdef int64_t _recount(self, const int64_t* counts, Py_ssize_t batch) noexcept nogil
    cdef int64_t _max_prefix_pages(self, int64_t num_tokens) noexcept nogil
    cdef int64_t _append_unchecked(self, const int64_t* seq_ids, const int64_t* counts,
                                   Py_ssize_t batch, slot_t* slots, page_id_t* copy_src,
                                   page_id_t* copy_dst) noexcept nogil
    cdef int64_t _check_batch(self, const int64_t* seq_ids, const int64_t* counts,
                              Py_ssize_t batch) except -1
    cdef int64_t _count_new_pages(self, const int64_t* seq_ids, const int64_t* counts,
                                  Py_ssize_t batch, int64_t* num_copies,
                                  int64_t* num_freed) noexcept nogil
    cdef void _live_cols(self, int32_t g, int64_t s, int64_t* lo, int64_t* hi) noexcept nogil
    cdef int32_t _group_arg(self, object group) except -1
    cdef int64_t _hit_start(self, int32_t g, int64_t num_hits) noexcept nogil
    cdef int64_t _host_hits(self, const page_id_t* hits, int64_t num_hits) noexcept nogil
    cdef int64_t _servable_hits(self, const page_id_t* hits, int64_t num_hits,
                                int64_t num_host_hits, int64_t* host_hits_kept) noexcept nogil
    cdef void _map_host_hits(self, int64_t s, const page_id_t* hits, int64_t num_hits,
                             int64_t num_host_hits, page_id_t* fresh) noexcept nogil
    cdef int64_t _resolve_hits(self, const int32_t* tokens, int64_t num_hits, int64_t namespace,
                               const page_id_t* hits, page_id_t* companions,
                               int64_t stride) noexcept nogil
    cdef void _release_windows(self, const int64_t* seq_ids, const int64_t* counts,
                               Py_ssize_t batch) noexcept nogil
