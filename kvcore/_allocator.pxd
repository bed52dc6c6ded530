# cython: language_level=3
"""C-level declarations of the page allocator (see _allocator.pyx for the invariants).

The cdef methods below without a leading underscore are the allocator's *doors*: the
only ways the page table and the prefix cache reach its state. The inline ones compile
into the caller, so a door costs no more than the field access it replaces.
"""

cimport cython
from libc.stdint cimport int32_t, uint8_t

from kvcore._typedefs cimport page_id_t, refcount_t


cdef class Evictor:
    """Told when the allocator reuses a cached page; this base is told nothing."""
    cdef void evict(self, page_id_t page) noexcept nogil


@cython.final
cdef class PageAllocator:
    cdef int32_t _num_pages
    cdef int32_t _num_clean          # pages on the clean free stack
    cdef page_id_t* _free_stack      # [num_pages]; [0, _num_clean) are free, top last
    cdef refcount_t* _refcount       # [num_pages]; 0 means free
    # Cached pages (their content is still findable by a prefix cache): a freed cached
    # page is parked on the evictable list, an intrusive doubly linked list in freeing
    # order, head = least recently freed = evicted first.
    cdef uint8_t* _cached            # [num_pages]; 1 while a prefix cache indexes the page
    cdef int32_t _num_cached
    cdef page_id_t* _lru_prev        # [num_pages], -1 at the head / when not listed
    cdef page_id_t* _lru_next        # [num_pages], -1 at the tail / when not listed
    cdef page_id_t _lru_head, _lru_tail
    cdef int32_t _num_evictable
    cdef Evictor _evictor            # told about evictions; the no-op base when none attached
    cdef bint _has_cache
    cdef object _owners              # NumPy owners of the C arrays above
    cdef object _refcount_view       # read-only view handed to users

    cdef void _release(self, page_id_t page) noexcept nogil
    cdef void _lru_append(self, page_id_t page) noexcept nogil
    cdef void _lru_unlink(self, page_id_t page) noexcept nogil

    # -- doors for the page table (it validated everything; none of them fails) --------

    cdef inline int32_t page_count(self) noexcept nogil:
        """Pages in the pool."""
        return self._num_pages

    cdef inline int32_t free_count(self) noexcept nogil:
        """Pages that ``take`` can hand out: clean plus evictable."""
        return self._num_clean + self._num_evictable

    cdef inline int32_t clean_count(self) noexcept nogil:
        """Free pages that are not cached: ``take`` hands out that many without evicting."""
        return self._num_clean

    cdef inline refcount_t refs(self, page_id_t page) noexcept nogil:
        """Refcount of ``page`` (0 when free)."""
        return self._refcount[page]

    cdef void take(self, page_id_t* out, int32_t n) noexcept nogil

    cdef inline void add_ref(self, page_id_t page) noexcept nogil:
        """One more reference to ``page``: one in use, or a free cached page found by a
        prefix hit (which leaves the evictable list). The caller checked for overflow."""
        if self._refcount[page] == 0:
            self._lru_unlink(page)
        self._refcount[page] += 1

    cdef inline void drop_ref(self, page_id_t page) noexcept nogil:
        """One reference fewer; at 0 the page is free (evictable if cached, else clean)."""
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            self._release(page)

    # -- doors for the prefix cache ------------------------------------------------------

    cdef int ensure_unattached(self) except -1
    cdef int attach(self, Evictor evictor) except -1
    cdef void retain(self, page_id_t page) noexcept nogil
    cdef void forget(self, page_id_t page) noexcept nogil

    cdef inline bint is_cached(self, page_id_t page) noexcept nogil:
        """Whether ``page`` is marked cached (see ``retain``)."""
        return self._cached[page] != 0
