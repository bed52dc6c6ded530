# cython: language_level=3
"""C-level declarations of the prefix-cache index (see _prefix.pyx for the invariants)."""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from kvcore._typedefs cimport page_id_t


@cython.final
cdef class PrefixIndex:
    cdef int32_t _num_pages
    cdef int32_t _page_size
    cdef uint64_t _hash_mask          # all ones, or fewer bits for collision tests
    # per page
    cdef uint64_t* _page_hash         # [num_pages] chained hash of an indexed page
    cdef page_id_t* _parent           # [num_pages] previous page of the chain, -1 at the root
    cdef uint32_t* _parent_gen        # [num_pages] generation of that parent when linked
    cdef uint32_t* _gen               # [num_pages] bumped whenever the page leaves the index
    cdef int64_t* _namespace          # [num_pages]
    cdef uint8_t* _in_index           # [num_pages]
    cdef int32_t* _slot_tokens        # [num_pages * page_size] token id held by each slot
    # open-addressing hash table: page ids, -1 empty; linear probing, backward-shift delete
    cdef page_id_t* _table
    cdef int64_t _table_mask
    cdef int32_t _num_indexed
    # event ring
    cdef uint8_t* _ev_kind
    cdef page_id_t* _ev_page
    cdef uint64_t* _ev_hash
    cdef int64_t _ev_capacity, _ev_start, _ev_count, _ev_dropped
    # statistics
    cdef int64_t _queries, _queried_tokens, _hit_tokens, _evictions, _stored
    cdef object _owners

    cdef uint64_t chain_hash(self, uint64_t parent_hash, int64_t namespace,
                             const int32_t* tokens) noexcept nogil
    cdef page_id_t find(self, uint64_t h, page_id_t parent, uint32_t parent_gen,
                        int64_t namespace, const int32_t* tokens) noexcept nogil
    cdef void insert(self, page_id_t page, uint64_t h, page_id_t parent, uint32_t parent_gen,
                     int64_t namespace) noexcept nogil
    cdef void remove(self, page_id_t page) noexcept nogil
    cdef void _event(self, uint8_t kind, page_id_t page, uint64_t h) noexcept nogil
