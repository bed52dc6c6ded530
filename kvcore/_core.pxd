# cython: language_level=3
"""C-level declarations of the host core (see _core.pyx for the invariants)."""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from kvcore._prefix cimport PrefixIndex
from kvcore._typedefs cimport page_id_t, refcount_t, seq_id_t, slot_t


@cython.final
cdef class PageAllocator:
    cdef int32_t _num_pages
    cdef int32_t _num_clean          # pages on the clean free stack
    cdef page_id_t* _free_stack      # [num_pages]; [0, _num_clean) are free, top last
    cdef refcount_t* _refcount       # [num_pages]; 0 means free
    # Evictable pages (refcount 0 but still in the prefix index): an intrusive doubly
    # linked list in freeing order, head = least recently freed = evicted first.
    cdef page_id_t* _lru_prev        # [num_pages], -1 at the head / when not listed
    cdef page_id_t* _lru_next        # [num_pages], -1 at the tail / when not listed
    cdef page_id_t _lru_head, _lru_tail
    cdef int32_t _num_evictable
    cdef PrefixIndex _index          # None unless a prefix-caching PageTable is attached
    cdef object _owners              # NumPy owners of the C arrays above
    cdef object _refcount_view       # read-only view handed to users

    cdef void _pop(self, page_id_t* out, int32_t n) noexcept nogil
    cdef bint _decref_one(self, page_id_t page) noexcept nogil
    cdef void _release(self, page_id_t page) noexcept nogil
    cdef void _lru_append(self, page_id_t page) noexcept nogil
    cdef void _lru_unlink(self, page_id_t page) noexcept nogil
    cdef void _reclaim(self, page_id_t page) noexcept nogil
    cdef object _page_array(self, object pages, str name)


@cython.final
cdef class PageTable:
    cdef readonly PageAllocator allocator
    cdef int32_t _page_size
    cdef int _page_shift             # log2(page_size) when a power of two, else -1
    cdef int32_t _max_seqs
    cdef int32_t _max_pages_per_seq
    cdef int32_t _num_seqs
    cdef page_id_t* _table           # [max_seqs * max_pages_per_seq], NO_PAGE when unmapped
    cdef int32_t* _seq_lens          # [max_seqs]; 0 for inactive rows
    cdef uint8_t* _active            # [max_seqs]
    cdef seq_id_t* _free_seqs        # [max_seqs]; [0, _num_free_seqs) are free, top last
    cdef int32_t _num_free_seqs
    cdef int32_t* _seen              # [max_seqs] duplicate-detection stamps
    cdef int32_t _stamp
    cdef int32_t* _cow_pending       # [num_pages] scratch for pages_needed; all 0 between calls
    cdef object _owners              # NumPy arrays that own the C arrays above
    # prefix caching (all None / NULL when off)
    cdef PrefixIndex _prefix
    cdef int64_t* _seq_ns            # [max_seqs] namespace of each sequence
    cdef uint8_t* _chain_ok          # [max_seqs] every token id so far is known
    cdef int32_t* _num_chained       # [max_seqs] leading full pages already registered
    cdef page_id_t* _chain_page      # [max_seqs] indexed page of the last registered one
    cdef uint32_t* _chain_gen        # [max_seqs] its generation then
    cdef uint64_t* _chain_hash       # [max_seqs] its chained hash (0 at the root)
    cdef object _prefix_owners
    cdef object _block_table_view
    cdef object _seq_lens_view

    cdef int64_t _seq_arg(self, object seq_id) except -1
    cdef int _check_active(self, const int64_t* seq_ids, Py_ssize_t batch,
                           bint allow_duplicates) except -1
    cdef tuple _batch_args(self, object seq_ids, object num_new_tokens)
    cdef int64_t _new_seq(self, int64_t namespace)
    cdef void _start_chain(self, int64_t s, int64_t namespace) noexcept nogil
    cdef void _register(self, const int64_t* seq_ids, const int64_t* counts, Py_ssize_t batch,
                        const slot_t* slots, const int32_t* tokens) noexcept
    cdef void _append_unchecked(self, const int64_t* seq_ids, const int64_t* counts,
                                Py_ssize_t batch, slot_t* slots, page_id_t* copy_src,
                                page_id_t* copy_dst) noexcept nogil
    cdef int64_t _check_batch(self, const int64_t* seq_ids, const int64_t* counts,
                              Py_ssize_t batch) except -1
    cdef int64_t _count_new_pages(self, const int64_t* seq_ids, const int64_t* counts,
                                  Py_ssize_t batch, int64_t* num_copies) noexcept nogil
