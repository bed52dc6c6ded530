# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""The prefix-cache index: which full pages hold which token chains.

A page's identity is its tokens, the page before it in the chain (by id *and*
generation, so a reused page id never matches a stale child), and a namespace. The
index finds candidates through a 64-bit hash in an open-addressing table, and accepts
a hit only after comparing all of that exactly, so a hash collision can never hand one
request another's KV. The index holds no page references: refcounts stay with the
PageTable, and pages with refcount 0 that are still indexed sit on the allocator's
evictable list.

Memory representation (all C arrays owned by NumPy arrays made at construction):

- per page: ``page_hash`` uint64, ``parent`` int32 (-1 = root), ``parent_gen`` and
  ``gen`` uint32, ``namespace`` int64, ``in_index`` uint8;
- ``slot_tokens`` int32 ``[num_pages * page_size]``: the token id in every slot, so a
  full page's tokens are ``slot_tokens[page * page_size : (page + 1) * page_size]``;
- ``table`` int32 ``[capacity]`` (a power of two >= 2 * num_pages, so the load stays
  <= 1/2): page ids, -1 empty. Linear probing; deletion shifts later entries back, so
  there are no tombstones. Example with capacity 8: a page whose hash ends in 0b101
  lives at slot 5, or the first free slot after it (6, 7, 0, ...).

Invariants (``check``): ``num_indexed`` pages have ``in_index`` set and each is found
by probing from its home slot; the table holds exactly those pages, each once.
"""

import numpy as np

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp

from kvcore._typedefs cimport NO_PAGE, page_id_t

from kvcore.errors import KVCoreError

cnp.import_array()

cdef enum:
    _STORED = 1
    _EVICTED = 2

#: Event kinds reported by ``take_events``.
EVENT_STORED = _STORED
EVENT_EVICTED = _EVICTED

cdef uint64_t _ROOT_HASH = 0x6A09E667F3BCC908ULL


cdef inline uint64_t _mix(uint64_t x) noexcept nogil:
    """splitmix64 finaliser: every input bit affects every output bit."""
    x ^= x >> 30
    x *= 0xBF58476D1CE4E5B9ULL
    x ^= x >> 27
    x *= 0x94D049BB133111EBULL
    x ^= x >> 31
    return x


cdef class PrefixIndex:
    """Hash index of full pages keyed by (token chain, namespace); see the module doc.

    Parameters
    ----------
    num_pages, page_size : int
        Those of the pool.
    hash_bits : int
        Bits of the hash that are kept (64). Fewer make collisions common: for tests
        that prove lookups verify exactly.
    event_capacity : int
        Events kept until ``take_events``; older ones are dropped (and counted).
    """

    def __cinit__(self, int32_t num_pages, int32_t page_size, int hash_bits=64,
                  int64_t event_capacity=65536):
        if not 1 <= hash_bits <= 64:
            raise ValueError(f"prefix_hash_bits must be in [1, 64], got {hash_bits}")
        if event_capacity < 1:
            raise ValueError(f"event_capacity must be >= 1, got {event_capacity}")
        self._num_pages = num_pages
        self._page_size = page_size
        self._hash_mask = 0xFFFFFFFFFFFFFFFFULL if hash_bits == 64 else ((1ULL << hash_bits) - 1)
        cdef int64_t capacity = 1
        while capacity < 2 * <int64_t>num_pages:
            capacity *= 2
        owners = dict(
            page_hash=np.zeros(num_pages, np.uint64), parent=np.full(num_pages, -1, np.int32),
            parent_gen=np.zeros(num_pages, np.uint32), gen=np.zeros(num_pages, np.uint32),
            namespace=np.zeros(num_pages, np.int64), in_index=np.zeros(num_pages, np.uint8),
            slot_tokens=np.zeros(<int64_t>num_pages * page_size, np.int32),
            table=np.full(capacity, -1, np.int32),
            ev_kind=np.zeros(event_capacity, np.uint8),
            ev_page=np.zeros(event_capacity, np.int32),
            ev_hash=np.zeros(event_capacity, np.uint64))
        self._owners = owners
        self._page_hash = <uint64_t*>cnp.PyArray_DATA(owners["page_hash"])
        self._parent = <page_id_t*>cnp.PyArray_DATA(owners["parent"])
        self._parent_gen = <uint32_t*>cnp.PyArray_DATA(owners["parent_gen"])
        self._gen = <uint32_t*>cnp.PyArray_DATA(owners["gen"])
        self._namespace = <int64_t*>cnp.PyArray_DATA(owners["namespace"])
        self._in_index = <uint8_t*>cnp.PyArray_DATA(owners["in_index"])
        self._slot_tokens = <int32_t*>cnp.PyArray_DATA(owners["slot_tokens"])
        self._table = <page_id_t*>cnp.PyArray_DATA(owners["table"])
        self._table_mask = capacity - 1
        self._ev_kind = <uint8_t*>cnp.PyArray_DATA(owners["ev_kind"])
        self._ev_page = <page_id_t*>cnp.PyArray_DATA(owners["ev_page"])
        self._ev_hash = <uint64_t*>cnp.PyArray_DATA(owners["ev_hash"])
        self._ev_capacity = event_capacity

    # -- C-level operations (callers validated everything) ------------------------------

    cdef uint64_t chain_hash(self, uint64_t parent_hash, int64_t namespace,
                             const int32_t* tokens) noexcept nogil:
        """Hash of a page given its parent's hash, its namespace and its tokens."""
        cdef uint64_t h = _mix(parent_hash ^ _mix(<uint64_t>namespace + 0x9E3779B97F4A7C15ULL))
        cdef int32_t i = 0, n = self._page_size
        # Two tokens per 64-bit step halves the chain of dependent multiplies.
        while i + 1 < n:
            h = (h ^ (<uint64_t><uint32_t>tokens[i] | (<uint64_t><uint32_t>tokens[i + 1] << 32)))
            h = (h ^ (h >> 29)) * 0xBF58476D1CE4E5B9ULL
            i += 2
        if i < n:
            h = (h ^ <uint32_t>tokens[i]) * 0x94D049BB133111EBULL
        return _mix(h ^ <uint64_t>n) & self._hash_mask

    cdef page_id_t find(self, uint64_t h, page_id_t parent, uint32_t parent_gen,
                        int64_t namespace, const int32_t* tokens) noexcept nogil:
        """The indexed page with exactly this chain link and these tokens, or -1."""
        cdef int64_t slot = <int64_t>(h & <uint64_t>self._table_mask)
        cdef page_id_t page
        while True:
            page = self._table[slot]
            if page == NO_PAGE:
                return NO_PAGE
            if (self._page_hash[page] == h and self._parent[page] == parent
                    and self._parent_gen[page] == parent_gen
                    and self._namespace[page] == namespace
                    and memcmp(self._slot_tokens + <int64_t>page * self._page_size, tokens,
                               self._page_size * sizeof(int32_t)) == 0):
                return page
            slot = (slot + 1) & self._table_mask

    cdef void insert(self, page_id_t page, uint64_t h, page_id_t parent, uint32_t parent_gen,
                     int64_t namespace) noexcept nogil:
        """Index ``page`` (its tokens are already in ``slot_tokens``)."""
        cdef int64_t slot = <int64_t>(h & <uint64_t>self._table_mask)
        while self._table[slot] != NO_PAGE:
            slot = (slot + 1) & self._table_mask
        self._table[slot] = page
        self._page_hash[page] = h
        self._parent[page] = parent
        self._parent_gen[page] = parent_gen
        self._namespace[page] = namespace
        self._in_index[page] = 1
        self._num_indexed += 1
        self._stored += 1
        self._event(_STORED, page, h)

    cdef void remove(self, page_id_t page) noexcept nogil:
        """Take ``page`` out of the index (eviction); its generation moves on."""
        cdef int64_t mask = self._table_mask
        cdef int64_t slot = <int64_t>(self._page_hash[page] & <uint64_t>mask)
        cdef int64_t hole, probe, home
        while self._table[slot] != page:
            slot = (slot + 1) & mask
        # Backward-shift deletion: move later entries of the run into the hole when
        # their home slot does not lie (cyclically) after the hole.
        hole = slot
        probe = (hole + 1) & mask
        while self._table[probe] != NO_PAGE:
            home = <int64_t>(self._page_hash[self._table[probe]] & <uint64_t>mask)
            if ((probe - home) & mask) >= ((probe - hole) & mask):
                self._table[hole] = self._table[probe]
                hole = probe
            probe = (probe + 1) & mask
        self._table[hole] = NO_PAGE
        self._in_index[page] = 0
        self._gen[page] += 1
        self._num_indexed -= 1
        self._evictions += 1
        self._event(_EVICTED, page, self._page_hash[page])

    cdef void _event(self, uint8_t kind, page_id_t page, uint64_t h) noexcept nogil:
        cdef int64_t at
        if self._ev_count == self._ev_capacity:   # full: drop the oldest
            self._ev_start = (self._ev_start + 1) % self._ev_capacity
            self._ev_count -= 1
            self._ev_dropped += 1
        at = (self._ev_start + self._ev_count) % self._ev_capacity
        self._ev_kind[at] = kind
        self._ev_page[at] = page
        self._ev_hash[at] = h
        self._ev_count += 1

    # -- Python-level views --------------------------------------------------------------

    @property
    def num_indexed(self):
        """int: pages in the index."""
        return self._num_indexed

    def stats(self):
        """dict of counters: queries, queried_tokens, hit_tokens, stored, evictions, events_dropped."""
        return {"queries": self._queries, "queried_tokens": self._queried_tokens,
                "hit_tokens": self._hit_tokens, "stored": self._stored,
                "evictions": self._evictions, "events_dropped": self._ev_dropped}

    def take_events(self):
        """Return and clear the events since the last call, oldest first.

        Returns
        -------
        kind : numpy.ndarray of uint8, shape [n]
            ``EVENT_STORED`` (1) or ``EVENT_EVICTED`` (2).
        page_id : numpy.ndarray of int32, shape [n]
        page_hash : numpy.ndarray of uint64, shape [n]
            The page's chained hash: equal hashes mean the same prefix to a router.
        """
        order = (np.arange(self._ev_count) + self._ev_start) % self._ev_capacity
        owners = self._owners
        out = (owners["ev_kind"][order], owners["ev_page"][order], owners["ev_hash"][order])
        self._ev_start = 0
        self._ev_count = 0
        return out

    def is_indexed(self, page_id):
        return bool(self._in_index[page_id])

    def check(self):
        """Raise KVCoreError unless the table and the per-page flags agree."""
        cdef int64_t slot, count = 0, probe
        cdef page_id_t page
        seen = np.zeros(self._num_pages, np.uint8)
        for slot in range(self._table_mask + 1):
            page = self._table[slot]
            if page == NO_PAGE:
                continue
            count += 1
            if page < 0 or page >= self._num_pages or not self._in_index[page] or seen[page]:
                raise KVCoreError(f"prefix table slot {slot} holds page {page}, which is not "
                                  "indexed exactly once")
            seen[page] = 1
        if count != self._num_indexed or int(seen.sum()) != int(
                np.count_nonzero(self._owners["in_index"])):
            raise KVCoreError(f"prefix table holds {count} pages but {self._num_indexed} are "
                              "indexed")
        for page in range(self._num_pages):
            if not self._in_index[page]:
                continue
            probe = <int64_t>(self._page_hash[page] & <uint64_t>self._table_mask)
            while self._table[probe] != page:
                if self._table[probe] == NO_PAGE:
                    raise KVCoreError(f"indexed page {page} is not reachable from its hash")
                probe = (probe + 1) & self._table_mask
