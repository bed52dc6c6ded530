# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""The page allocator: a LIFO stack of free page ids, a refcount per page, and the
evictable list of freed pages that still hold cached prefixes.

The allocator knows nothing about hashes or tokens. A prefix cache marks the pages it
indexes with :meth:`PageAllocator.retain` and unmarks them with ``forget``; the
allocator parks a freed marked page on the evictable list and, when it reuses one,
tells the cache through the attached :class:`Evictor`. Its doors (the cdef methods
declared in ``_allocator.pxd``) are the only way other classes reach its state.
"""

import numpy as np

cimport cython
cimport numpy as cnp
from libc.stdint cimport INT32_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from kvcore._args cimport empty_int32, int_arg, page_arg, page_array, positive_int32, readonly_view
from kvcore._typedefs cimport NO_PAGE, page_id_t, refcount_t
from kvcore._allocator cimport DEFAULT_PRIORITY, MAX_PRIORITY, _NUM_LEVELS

from kvcore.errors import InvalidPageError, KVCoreError, OutOfPagesError, RefcountError

cnp.import_array()

__all__ = ["PageAllocator"]


cdef class Evictor:
    """What the allocator tells when it reuses a cached page (one door, ``evict``).

    A prefix cache subclasses it and attaches itself with ``PageAllocator.attach``.
    This base is what an allocator without a cache holds: it is never called, since no
    page is ever marked cached then.
    """

    cdef void evict(self, page_id_t page) noexcept nogil:
        """``page`` was free and cached and is being handed out again: forget it."""
        pass


cdef Evictor _NO_EVICTOR = Evictor()


cdef inline int64_t _now_ns() noexcept nogil:
    """CLOCK_MONOTONIC in nanoseconds: what retention durations are measured on."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef extern from *:
    """
    static inline int kvcore_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    """
    int kvcore_ctz64(uint64_t x) nogil


@cython.final
cdef class PageAllocator:
    """A LIFO free-list stack of page ids with a reference count per page.

    Parameters
    ----------
    num_pages : int
        Pages in the pool, in ``[1, 2**31 - 1]``. Page ids are ``0 .. num_pages - 1``.

    Notes
    -----
    Memory representation: ``free_stack`` is an int32 C array of ``num_pages``
    entries whose first ``num_clean`` entries are the clean free pages, the next page to
    hand out last. A fresh allocator of 4 pages holds ``[3, 2, 1, 0]``, so
    ``allocate(2)`` returns ``[0, 1]`` and leaves ``[3, 2]``; ``decref([0])`` then
    pushes 0 back: ``[3, 2, 0]``. ``refcount`` is an int32 C array, 0 for free pages.

    With a prefix cache attached (``PageTable(..., enable_prefix_cache=True)``), a page
    that reaches refcount 0 while it is cached (``cached`` uint8 ``[num_pages]``, set by
    the cache while it indexes the page) goes on an *evictable* list instead: one
    intrusive doubly linked list (``lru_prev`` / ``lru_next`` int32 arrays) per
    retention priority (0 .. 100, ``priority`` uint8 ``[num_pages]``), in freeing order.
    Allocation takes clean pages first, then evicts the head (least recently freed) of
    the lowest non-empty priority, found in a two-word bitmap, and tells the cache; a
    prefix hit takes a page off its list in O(1). Evictable pages count as free. A page
    whose priority lasts a limited time (``duration`` ns) waits, while evictable, in a
    binary min-heap of expiry times; eviction first drops every expired page to its
    floor (``floor`` uint8: 35 unless a request asked for another level for good), at
    the tail of that list: O(log n) each.

    Invariants (checked by :meth:`check_invariants`):

    - ``num_free + num_used == num_pages``, ``num_free = num_clean + num_evictable``;
    - a page has refcount 0 if and only if it is free, and a free page is on exactly one
      of the clean stack (not cached) and the evictable list (cached), once;
    - no refcount is negative; ``num_cached`` pages are marked cached;
    - a listed page is on the list of its own priority; the bitmap marks exactly the
      non-empty lists; the heap holds exactly the listed pages with a duration.

    Examples
    --------
    >>> alloc = PageAllocator(8)
    >>> alloc.allocate(3)
    array([0, 1, 2], dtype=int32)
    >>> alloc.decref([1])
    array([1], dtype=int32)
    >>> alloc.num_free
    6
    """

    def __cinit__(self, num_pages):
        cdef int32_t n = positive_int32(num_pages, "num_pages")
        self._num_pages = n
        free_stack = np.arange(n - 1, -1, -1, dtype=np.int32)
        refcount = np.zeros(n, dtype=np.int32)
        cached = np.zeros(n, dtype=np.uint8)
        lru_prev = np.full(n, NO_PAGE, dtype=np.int32)
        lru_next = np.full(n, NO_PAGE, dtype=np.int32)
        self._owners = (free_stack, refcount, cached, lru_prev, lru_next)
        self._free_stack = <page_id_t*>cnp.PyArray_DATA(free_stack)
        self._refcount = <refcount_t*>cnp.PyArray_DATA(refcount)
        self._cached = <uint8_t*>cnp.PyArray_DATA(cached)
        self._num_cached = 0
        self._lru_prev = <page_id_t*>cnp.PyArray_DATA(lru_prev)
        self._lru_next = <page_id_t*>cnp.PyArray_DATA(lru_next)
        cdef int32_t level
        for level in range(_NUM_LEVELS):
            self._lru_head[level] = self._lru_tail[level] = NO_PAGE
            self._evicted[level] = 0
        self._levels[0] = self._levels[1] = 0
        self._num_evictable = 0
        priority = np.full(n, DEFAULT_PRIORITY, dtype=np.uint8)
        floor = np.full(n, DEFAULT_PRIORITY, dtype=np.uint8)
        duration = np.zeros(n, dtype=np.int64)
        expiry = np.zeros(n, dtype=np.int64)
        heap = np.full(n, NO_PAGE, dtype=np.int32)
        heap_pos = np.full(n, -1, dtype=np.int32)
        self._owners += (priority, duration, expiry, heap, heap_pos, floor)
        self._priority = <uint8_t*>cnp.PyArray_DATA(priority)
        self._floor = <uint8_t*>cnp.PyArray_DATA(floor)
        self._duration = <int64_t*>cnp.PyArray_DATA(duration)
        self._expiry = <int64_t*>cnp.PyArray_DATA(expiry)
        self._heap = <page_id_t*>cnp.PyArray_DATA(heap)
        self._heap_pos = <int32_t*>cnp.PyArray_DATA(heap_pos)
        self._heap_size = 0
        self._priority_view = readonly_view(priority)
        self._refcount_view = readonly_view(refcount)
        self._num_clean = n
        self._evictor = _NO_EVICTOR
        self._has_cache = False

    def __repr__(self):
        return (f"PageAllocator(num_pages={self._num_pages}, num_free={self.num_free}, "
                f"num_used={self.num_used})")

    @property
    def num_pages(self):
        """int: pages in the pool."""
        return self._num_pages

    @property
    def num_free(self):
        """int: pages with refcount 0 (clean plus evictable)."""
        return self._num_clean + self._num_evictable

    @property
    def num_evictable(self):
        """int: free pages that still hold cached prefixes (evicted on demand)."""
        return self._num_evictable

    @property
    def num_used(self):
        """int: pages with refcount >= 1 (``num_pages - num_free``)."""
        return self._num_pages - self._num_clean - self._num_evictable

    @property
    def priorities(self):
        """numpy.ndarray of uint8, shape [num_pages]: read-only view of every page's
        retention priority (0 .. 100; 35 unless a prefix cache set another)."""
        return self._priority_view

    @property
    def evictions_by_priority(self):
        """dict of int to int: cached pages evicted so far, per retention priority
        (priorities with none left out)."""
        return {level: self._evicted[level] for level in range(_NUM_LEVELS)
                if self._evicted[level]}

    @property
    def refcounts(self):
        """numpy.ndarray of int32, shape [num_pages]: read-only view of every page's refcount."""
        return self._refcount_view

    # -- doors (declared in _allocator.pxd); callers have validated everything ----------

    cdef void take(self, page_id_t* out, int32_t n) noexcept nogil:
        """Hand out ``n`` pages with refcount 1: clean ones first, then evicted ones.

        The caller has checked ``n <= free_count()``.
        """
        # Locals, not attributes, in the loop: stores through int32 pointers could alias
        # self._num_clean, which would stop the compiler from keeping it in a register.
        cdef int32_t i, top = self._num_clean
        cdef int32_t from_clean = n if n <= top else top
        cdef page_id_t page
        cdef const page_id_t* stack = self._free_stack
        cdef refcount_t* rc = self._refcount
        for i in range(from_clean):
            top -= 1
            page = stack[top]
            rc[page] = 1
            out[i] = page
        self._num_clean = top
        if from_clean < n and self._heap_size:
            self._demote_expired()
        for i in range(from_clean, n):
            if self._num_clean:
                # An eviction dropped cached descendants (leaf-first eviction): they are
                # clean now, and taking them spares other cached pages.
                self._num_clean -= 1
                page = stack[self._num_clean]
            else:   # evict the least recently freed page of the lowest priority
                page = self._lowest()
                self._evicted[self._priority[page]] += 1
                self._lru_unlink(page)
                self._cached[page] = 0
                self._num_cached -= 1
                self._evictor.evict(page)   # reads its retention when it offloads it
                self._priority[page] = self._floor[page] = DEFAULT_PRIORITY
                self._duration[page] = 0
            rc[page] = 1
            out[i] = page

    cdef int ensure_unattached(self) except -1:
        """Raise ValueError when a prefix cache is attached already (one per allocator)."""
        if self._has_cache:
            raise ValueError("this allocator already serves a prefix-caching PageTable")
        return 0

    cdef int attach(self, Evictor evictor) except -1:
        """Make ``evictor`` the prefix cache that ``take`` tells about evictions."""
        self.ensure_unattached()
        self._evictor = evictor
        self._has_cache = True
        return 0

    cdef void retain(self, page_id_t page) noexcept nogil:
        """Mark ``page`` (in use) cached: when freed it waits on the evictable list."""
        if not self._cached[page]:
            self._cached[page] = 1
            self._num_cached += 1

    cdef void forget(self, page_id_t page) noexcept nogil:
        """Unmark ``page``; if it waits on the evictable list it becomes clean. Its
        retention goes back to the default."""
        if not self._cached[page]:
            return
        self._cached[page] = 0
        self._num_cached -= 1
        if self._refcount[page] == 0:
            self._lru_unlink(page)
            self._free_stack[self._num_clean] = page
            self._num_clean += 1
        self._priority[page] = self._floor[page] = DEFAULT_PRIORITY
        self._duration[page] = 0

    cdef void set_retention(self, page_id_t page, int32_t priority, int64_t duration,
                            int32_t floor) noexcept nogil:
        """Give ``page`` retention ``priority`` (0 .. 100) for ``duration`` ns after it
        is freed (0: for good), then ``floor``; for good means at least ``floor``. An
        evictable page moves to the tail of its new list."""
        cdef bint listed = self._refcount[page] == 0 and self._cached[page]
        if duration == 0 and floor > priority:
            priority = floor
        if listed:
            self._lru_unlink(page)
        self._priority[page] = <uint8_t>priority
        self._duration[page] = duration
        self._floor[page] = <uint8_t>(priority if duration == 0 else floor)
        if listed:
            self._lru_append(page)

    # -- private helpers -------------------------------------------------------------------

    cdef void _release(self, page_id_t page) noexcept nogil:
        """A page whose refcount just reached 0: evictable if cached, else clean."""
        if self._cached[page]:
            self._lru_append(page)
        else:
            self._free_stack[self._num_clean] = page
            self._num_clean += 1

    cdef void _lru_append(self, page_id_t page) noexcept nogil:
        """Put ``page`` at the tail of its priority's list (and in the expiry heap when
        its priority lasts a limited time)."""
        cdef int32_t level = self._priority[page]
        cdef page_id_t tail = self._lru_tail[level]
        self._lru_prev[page] = tail
        self._lru_next[page] = NO_PAGE
        if tail != NO_PAGE:
            self._lru_next[tail] = page
        else:
            self._lru_head[level] = page
            self._levels[level >> 6] |= 1ULL << (level & 63)
        self._lru_tail[level] = page
        self._num_evictable += 1
        if self._duration[page] != 0:
            self._expiry[page] = _now_ns() + self._duration[page]
            self._heap_push(page)

    cdef void _lru_unlink(self, page_id_t page) noexcept nogil:
        cdef int32_t level = self._priority[page]
        cdef page_id_t prev = self._lru_prev[page], nxt = self._lru_next[page]
        if prev != NO_PAGE:
            self._lru_next[prev] = nxt
        else:
            self._lru_head[level] = nxt
        if nxt != NO_PAGE:
            self._lru_prev[nxt] = prev
        else:
            self._lru_tail[level] = prev
        if self._lru_head[level] == NO_PAGE:
            self._levels[level >> 6] &= ~(1ULL << (level & 63))
        self._lru_prev[page] = self._lru_next[page] = NO_PAGE
        self._num_evictable -= 1
        if self._heap_pos[page] >= 0:
            self._heap_remove(page)

    cdef page_id_t _lowest(self) noexcept nogil:
        """The next page to evict: head of the lowest non-empty priority list."""
        if self._levels[0]:
            return self._lru_head[kvcore_ctz64(self._levels[0])]
        return self._lru_head[64 + kvcore_ctz64(self._levels[1])]

    cdef void _demote_expired(self) noexcept nogil:
        """Every evictable page whose retention expired drops to its floor (35 unless a
        request asked for another level for good), at the tail of that list."""
        cdef int64_t now = _now_ns()
        cdef page_id_t page
        while self._heap_size and self._expiry[self._heap[0]] <= now:
            page = self._heap[0]
            self._lru_unlink(page)          # leaves the heap too
            self._priority[page] = self._floor[page]
            self._duration[page] = 0
            self._lru_append(page)

    cdef void _heap_push(self, page_id_t page) noexcept nogil:
        cdef int32_t at = self._heap_size
        self._heap_size += 1
        self._heap[at] = page
        self._heap_pos[page] = at
        self._heap_sift(at)

    cdef void _heap_remove(self, page_id_t page) noexcept nogil:
        cdef int32_t at = self._heap_pos[page]
        cdef page_id_t last
        self._heap_size -= 1
        self._heap_pos[page] = -1
        if at == self._heap_size:
            return
        last = self._heap[self._heap_size]
        self._heap[at] = last
        self._heap_pos[last] = at
        self._heap_sift(at)

    cdef void _heap_sift(self, int32_t at) noexcept nogil:
        """Restore the heap order around position ``at`` (up, then down)."""
        cdef page_id_t* heap = self._heap
        cdef const int64_t* key = self._expiry
        cdef page_id_t page = heap[at]
        cdef int32_t parent, child
        while at > 0:
            parent = (at - 1) >> 1
            if key[heap[parent]] <= key[page]:
                break
            heap[at] = heap[parent]
            self._heap_pos[heap[at]] = at
            at = parent
        while True:
            child = 2 * at + 1
            if child >= self._heap_size:
                break
            if child + 1 < self._heap_size and key[heap[child + 1]] < key[heap[child]]:
                child += 1
            if key[page] <= key[heap[child]]:
                break
            heap[at] = heap[child]
            self._heap_pos[heap[at]] = at
            at = child
        heap[at] = page
        self._heap_pos[page] = at

    # -- public API ----------------------------------------------------------------------

    def allocate(self, n):
        """Take ``n`` free pages, each with refcount 1.

        Parameters
        ----------
        n : int
            Pages to allocate, ``>= 0``.

        Returns
        -------
        numpy.ndarray of int32, shape [n]
            The page ids, an owned copy.

        Raises
        ------
        OutOfPagesError
            ``n > num_free``; nothing is allocated.
        ValueError, TypeError
            ``n`` negative or not an integer.
        """
        cdef int64_t count = int_arg(n, "n")
        if count < 0:
            raise ValueError(f"n must be >= 0, got {count}")
        if count > self._num_pages:   # never possible: no NumPy MemoryError for it
            raise OutOfPagesError(count, self._num_clean + self._num_evictable)
        cdef cnp.ndarray out = empty_int32(<Py_ssize_t>count)
        # Checked after the allocation, which may let another thread take pages.
        if count > self._num_clean + self._num_evictable:
            raise OutOfPagesError(count, self._num_clean + self._num_evictable)
        self.take(<page_id_t*>cnp.PyArray_DATA(out), <int32_t>count)
        return out

    def incref(self, pages):
        """Add one reference to each page (a page listed twice gains two).

        Parameters
        ----------
        pages : array_like of int, shape [k]
            Pages in use (refcount >= 1).

        Raises
        ------
        InvalidPageError
            A page id outside ``[0, num_pages)``.
        RefcountError
            A page is free; nothing is changed.
        """
        cdef cnp.ndarray arr = page_array(pages, "pages", self._num_pages)
        cdef const page_id_t* p = <const page_id_t*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(arr, 0)
        for i in range(n):
            if self._refcount[p[i]] == 0:
                raise RefcountError(f"incref of free page {p[i]}")
            if self._refcount[p[i]] >= INT32_MAX - n:
                raise RefcountError(f"refcount of page {p[i]} would overflow int32")
        for i in range(n):
            self._refcount[p[i]] += 1

    def decref(self, pages):
        """Drop one reference from each page; pages that reach 0 become free.

        Parameters
        ----------
        pages : array_like of int, shape [k]
            Pages in use; a page listed m times loses m references.

        Returns
        -------
        numpy.ndarray of int32, shape [freed]
            The pages that became free, in the order they were freed (an owned copy).

        Raises
        ------
        InvalidPageError
            A page id outside ``[0, num_pages)``.
        RefcountError
            A page would drop below 0 (a double free); nothing is changed.
        """
        cdef cnp.ndarray arr = page_array(pages, "pages", self._num_pages)
        cdef const page_id_t* p = <const page_id_t*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t i, j, n = cnp.PyArray_DIM(arr, 0)
        cdef cnp.ndarray freed = empty_int32(n)
        cdef page_id_t* f = <page_id_t*>cnp.PyArray_DATA(freed)
        cdef Py_ssize_t num_freed = 0
        cdef refcount_t* rc = self._refcount
        # Decrement, undoing everything on the first page that was already free, so a
        # page listed more often than it is referenced is caught before any change. A
        # page reaches 0 at most once in this loop (one more sighting would be the error).
        # ``pages`` may be the caller's own int32 array, which another thread could have
        # changed while ``freed`` was allocated: the range is checked again, here.
        cdef uint32_t num_pages = <uint32_t>self._num_pages
        for i in range(n):
            if <uint32_t>p[i] >= num_pages or rc[p[i]] == 0:
                for j in range(i):
                    rc[p[j]] += 1
                if <uint32_t>p[i] >= num_pages:
                    raise InvalidPageError(f"page {p[i]} out of range [0, {self._num_pages})")
                raise RefcountError(f"decref of free page {p[i]} (double free)")
            rc[p[i]] -= 1
            if rc[p[i]] == 0:
                f[num_freed] = p[i]
                num_freed += 1
        cdef int32_t top
        if self._num_cached == 0:   # nothing cached: every freed page is clean
            top = self._num_clean
            for i in range(num_freed):
                self._free_stack[top] = f[i]
                top += 1
            self._num_clean = top
        else:
            for i in range(num_freed):
                self._release(f[i])
        return freed if num_freed == n else freed[:num_freed].copy()

    def evictable_order(self):
        """Return the evictable pages in the order they would be evicted.

        Returns
        -------
        numpy.ndarray of int32, shape [num_evictable]
            Lowest retention priority first, least recently freed first within a
            priority. Expired priorities count as expired only once an allocation
            evicts (they drop then).
        """
        out = np.empty(self._num_evictable, np.int32)
        cdef int32_t[::1] o = out
        cdef int32_t level, k = 0
        cdef page_id_t page
        for level in range(_NUM_LEVELS):
            page = self._lru_head[level]
            while page != NO_PAGE:
                o[k] = page
                k += 1
                page = self._lru_next[page]
        return out

    def refcount(self, page_id):
        """Return the refcount of ``page_id`` (0 when free).

        Raises
        ------
        InvalidPageError
            ``page_id`` outside ``[0, num_pages)``.
        """
        return self._refcount[page_arg(page_id, "page_id", self._num_pages)]

    def check_invariants(self):
        """Raise :class:`KVCoreError` describing the first violated invariant."""
        cdef int32_t i, page, num_zero = 0, count = 0, num_cached = 0
        cdef page_id_t prev
        if self._num_clean < 0 or self._num_clean + self._num_evictable > self._num_pages:
            raise KVCoreError(f"num_free {self.num_free} outside [0, {self._num_pages}]")
        seen = np.zeros(self._num_pages, dtype=np.uint8)
        cdef uint8_t[::1] where = seen   # 1: clean stack, 2: evictable list
        for i in range(self._num_clean):
            page = self._free_stack[i]
            if page < 0 or page >= self._num_pages:
                raise KVCoreError(f"free stack entry {i} is page {page}, outside the pool")
            if where[page]:
                raise KVCoreError(f"page {page} is on the free stack twice")
            where[page] = 1
            if self._refcount[page] != 0:
                raise KVCoreError(
                    f"page {page} is on the free stack with refcount {self._refcount[page]}")
            if self._cached[page]:
                raise KVCoreError(f"page {page} is on the clean stack but still indexed")
        cdef int32_t level, timed = 0
        for level in range(_NUM_LEVELS):
            if bool(self._levels[level >> 6] & (1ULL << (level & 63))) != (
                    self._lru_head[level] != NO_PAGE):
                raise KVCoreError(f"the bitmap disagrees with the list of priority {level}")
            page, prev = self._lru_head[level], NO_PAGE
            while page != NO_PAGE:
                if page < 0 or page >= self._num_pages or where[page]:
                    raise KVCoreError(f"evictable list reaches page {page} twice or off the pool")
                where[page] = 2
                count += 1
                if self._lru_prev[page] != prev:
                    raise KVCoreError(f"evictable list links of page {page} disagree")
                if self._refcount[page] != 0:
                    raise KVCoreError(f"evictable page {page} has refcount {self._refcount[page]}")
                if not self._cached[page]:
                    raise KVCoreError(f"evictable page {page} is not in the prefix index")
                if self._priority[page] != level:
                    raise KVCoreError(f"page {page} of priority {self._priority[page]} is on "
                                      f"the list of priority {level}")
                if (self._heap_pos[page] >= 0) != (self._duration[page] != 0):
                    raise KVCoreError(f"evictable page {page} is {'' if self._heap_pos[page] >= 0 else 'not '}"
                                      "in the expiry heap against its duration")
                timed += self._duration[page] != 0
                prev, page = page, self._lru_next[page]
            if prev != self._lru_tail[level]:
                raise KVCoreError(f"the tail of the list of priority {level} is wrong")
        if count != self._num_evictable:
            raise KVCoreError(f"evictable lists have {count} pages, num_evictable says "
                              f"{self._num_evictable}")
        if timed != self._heap_size:
            raise KVCoreError(f"the expiry heap holds {self._heap_size} pages, {timed} expected")
        for i in range(self._heap_size):
            if self._heap_pos[self._heap[i]] != i:
                raise KVCoreError(f"expiry heap position {i} is not recorded")
            if i and self._expiry[self._heap[(i - 1) >> 1]] > self._expiry[self._heap[i]]:
                raise KVCoreError(f"expiry heap order broken at {i}")
        for page in range(self._num_pages):
            if self._refcount[page] < 0:
                raise KVCoreError(f"page {page} has negative refcount {self._refcount[page]}")
            if self._refcount[page] == 0:
                num_zero += 1
                if not where[page]:
                    raise KVCoreError(f"page {page} has refcount 0 but is not free")
            if self._cached[page]:
                num_cached += 1
        if num_zero != self.num_free:
            raise KVCoreError(f"{num_zero} pages have refcount 0 but num_free is {self.num_free}")
        if num_cached != self._num_cached:
            raise KVCoreError(f"{num_cached} pages are marked cached but num_cached is "
                              f"{self._num_cached}")


# -- test entry points: the prefix cache's doors, from Python ------------------------------

def _retain_py(PageAllocator alloc not None, page):
    """Test entry point: mark an in-use page cached (what a prefix cache does)."""
    cdef page_id_t p = page_arg(page, "page", alloc._num_pages)
    if alloc._refcount[p] == 0:
        raise RefcountError(f"page {p} is free")
    alloc.retain(p)


def _forget_py(PageAllocator alloc not None, page):
    """Test entry point: unmark a cached page."""
    alloc.forget(page_arg(page, "page", alloc._num_pages))


def _set_retention_py(PageAllocator alloc not None, page, priority, duration_ns=0,
                      bint only_raise=False, floor=None):
    """Test entry point: the set_retention / raise_retention doors (``floor`` by
    default what a request's retention drops to: its priority if for good, else 35)."""
    cdef page_id_t p = page_arg(page, "page", alloc._num_pages)
    cdef int64_t prio = int_arg(priority, "priority"), dur = int_arg(duration_ns, "duration_ns")
    cdef int64_t fl = (prio if dur == 0 else DEFAULT_PRIORITY) if floor is None else int_arg(
        floor, "floor")
    if not (0 <= prio <= MAX_PRIORITY and 0 <= fl <= MAX_PRIORITY) or dur < 0:
        raise ValueError("priority or floor outside [0, 100], or a negative duration")
    if only_raise:
        alloc.raise_retention(p, <int32_t>prio, dur, <int32_t>fl)
    else:
        alloc.set_retention(p, <int32_t>prio, dur, <int32_t>fl)
