# cython: language_level=3
"""Fixed-width types shared by the Cython core (same values as cuda/kvcore_common.cuh)."""

from libc.stdint cimport int32_t, int64_t, uint8_t

ctypedef int32_t page_id_t      # a page id, or NO_PAGE
ctypedef int64_t slot_t         # page_id * page_size + offset_in_page, or -1 (padding)
ctypedef int32_t refcount_t     # references to a page from page tables
ctypedef int32_t seq_id_t       # a row of the block table

cdef enum:
    NO_PAGE = -1                # unmapped block-table entry / padding slot
