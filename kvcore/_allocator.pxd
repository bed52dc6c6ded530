# cython: language_level=3
"""C-level declarations of the page allocator (see _allocator.pyx for the invariants).

The cdef methods below without a leading underscore are the allocator's *doors*: the
only ways the page table and the prefix cache reach its state. The inline ones compile
into the caller, so a door costs no more than the field access it replaces.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

from kvcore._typedefs cimport page_id_t, refcount_t


cdef enum:
    MAX_PRIORITY = 100          # retention priorities are 0 .. MAX_PRIORITY
    DEFAULT_PRIORITY = 35       # TensorRT-LLM's default; an expired priority drops to it
    _NUM_LEVELS = MAX_PRIORITY + 1


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
    # page is parked on the evictable list of its retention priority, an intrusive
    # doubly linked list in freeing order, head = least recently freed. Eviction takes
    # the head of the lowest non-empty priority (found from a bitmap in O(1)).
    cdef uint8_t* _cached            # [num_pages]; 1 while a prefix cache indexes the page
    cdef int32_t _num_cached
    cdef page_id_t* _lru_prev        # [num_pages], -1 at the head / when not listed
    cdef page_id_t* _lru_next        # [num_pages], -1 at the tail / when not listed
    cdef page_id_t _lru_head[_NUM_LEVELS]
    cdef page_id_t _lru_tail[_NUM_LEVELS]
    cdef uint64_t _levels[2]         # bit p: the list of priority p is not empty
    cdef int32_t _num_evictable
    # Retention: a page's priority, and how long it keeps it once freed (ns, 0: for
    # good). A freed page with a duration waits in a binary min-heap of expiry times;
    # an expired page drops to its floor (at the tail of that list when an eviction finds it).
    cdef uint8_t* _priority          # [num_pages]
    cdef uint8_t* _floor             # [num_pages] what the priority drops to on expiry: the
                                     # strongest level any request asked for after its own
                                     # duration (its priority if it had none, else 35)
    cdef int64_t* _duration          # [num_pages]
    cdef int64_t* _expiry            # [num_pages], valid while in the heap
    cdef page_id_t* _heap            # [num_pages]
    cdef int32_t* _heap_pos          # [num_pages], -1 when not in the heap
    cdef int32_t _heap_size
    cdef int64_t _evicted[_NUM_LEVELS]   # evictions per priority
    cdef Evictor _evictor            # told about evictions; the no-op base when none attached
    cdef bint _has_cache
    cdef object _owners              # NumPy owners of the C arrays above
    cdef object _refcount_view       # read-only view handed to users
    cdef object _priority_view

    cdef void _release(self, page_id_t page) noexcept nogil
    cdef void _lru_append(self, page_id_t page) noexcept nogil
    cdef void _lru_unlink(self, page_id_t page) noexcept nogil
    cdef page_id_t _lowest(self) noexcept nogil
    cdef void _demote_expired(self) noexcept nogil
    cdef void _heap_push(self, page_id_t page) noexcept nogil
    cdef void _heap_remove(self, page_id_t page) noexcept nogil
    cdef void _heap_sift(self, int32_t at) noexcept nogil

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

    cdef void set_retention(self, page_id_t page, int32_t priority, int64_t duration,
                            int32_t floor) noexcept nogil
    cdef inline void raise_retention(self, page_id_t page, int32_t priority,
                                     int64_t duration, int32_t floor) noexcept nogil:
        """Keep ``page`` at least as long as (``priority`` for ``duration``, then
        ``floor``) asks, besides what it keeps already: the higher floor, and the
        stronger of the two current priorities (higher, or equal and longer; 0 is
        longest). Pages shared by requests keep the strongest any of them asked for.
        Inline: a prefix hit calls it per page."""
        # The usual case (a hit at the level the page has, for good) reads two bytes.
        cdef int32_t cur = self._priority[page], fl = self._floor[page]
        if priority > cur:
            self.set_retention(page, priority, duration, floor if floor > fl else fl)
            return
        if floor > fl:
            if floor > cur:   # a timed priority below the new floor: the floor, for good
                self.set_retention(page, floor, 0, floor)
                return
            self._floor[page] = <uint8_t>floor
        if (duration != 0 and priority == cur and self._duration[page] != 0
                and duration > self._duration[page]):   # the same level, for longer
            self.set_retention(page, priority, duration, self._floor[page])

    cdef inline int32_t priority_of(self, page_id_t page) noexcept nogil:
        return self._priority[page]

    cdef inline int64_t duration_of(self, page_id_t page) noexcept nogil:
        return self._duration[page]

    cdef inline int32_t floor_of(self, page_id_t page) noexcept nogil:
        return self._floor[page]
