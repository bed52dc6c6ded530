# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""The prefix cache: which full pages hold which token chains, and every piece of
prefix-cache state (index, per-sequence chains, statistics, events).

``PrefixIndex`` is the index. ``PrefixCache`` owns one index plus the per-sequence chain
state and the query statistics, and is the only prefix-cache object the page table
holds, through the doors of ``PrefixHooks`` (declared in ``_prefix.pxd``). A table
without prefix caching holds a plain ``PrefixHooks``, whose doors do nothing.

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

Invariants (``PrefixIndex.check``): ``num_indexed`` pages have ``in_index`` set and each
is found by probing from its home slot; the table holds exactly those pages, each once.
``PrefixCache.check`` adds: a page is indexed if and only if the allocator marks it
cached.
"""

import numpy as np

cimport numpy as cnp
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from kvcore._allocator cimport DEFAULT_PRIORITY, Evictor, PageAllocator
from kvcore._args cimport int_arg, page_arg, positive_int32
from kvcore._typedefs cimport NO_PAGE, page_id_t, slot_t

from kvcore.errors import KVCoreError

cnp.import_array()

cdef enum:
    _STORED = 1
    _EVICTED = 2
    _HOST_STORED = 3      # _STORED + 2: the same events for a host-tier page
    _HOST_EVICTED = 4

#: Event kinds reported by ``take_events``: a device page entered / left the index, and
#: a host-tier page did (its id is then a host page id).
EVENT_STORED = _STORED
EVENT_EVICTED = _EVICTED
EVENT_HOST_STORED = _HOST_STORED
EVENT_HOST_EVICTED = _HOST_EVICTED

cdef uint64_t _ROOT_HASH = 0x6A09E667F3BCC908ULL

cdef extern from *:
    """
    /* SHA-256 (FIPS 180-4) of a short message, for the prefix cache's optional
       cryptographic page identity. Plain C, no allocation. */
    #include <stdint.h>
    #include <string.h>
    static const uint32_t kvcore_sha_k[64] = {
      0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,
      0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,
      0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,
      0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,0x06ca6351,0x14292967,
      0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,
      0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,
      0x19a4c116,0x1e376c08,0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,
      0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2};
    #define KVCORE_ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
    static void kvcore_sha_block(uint32_t* st, const uint8_t* p) {
      uint32_t w[64], a, b, c, d, e, f, g, h, t1, t2; int i;
      for (i = 0; i < 16; i++)
        w[i] = ((uint32_t)p[4*i] << 24) | ((uint32_t)p[4*i+1] << 16)
             | ((uint32_t)p[4*i+2] << 8) | (uint32_t)p[4*i+3];
      for (i = 16; i < 64; i++) {
        uint32_t s0 = KVCORE_ROTR(w[i-15], 7) ^ KVCORE_ROTR(w[i-15], 18) ^ (w[i-15] >> 3);
        uint32_t s1 = KVCORE_ROTR(w[i-2], 17) ^ KVCORE_ROTR(w[i-2], 19) ^ (w[i-2] >> 10);
        w[i] = w[i-16] + s0 + w[i-7] + s1;
      }
      a = st[0]; b = st[1]; c = st[2]; d = st[3]; e = st[4]; f = st[5]; g = st[6]; h = st[7];
      for (i = 0; i < 64; i++) {
        t1 = h + (KVCORE_ROTR(e, 6) ^ KVCORE_ROTR(e, 11) ^ KVCORE_ROTR(e, 25))
               + ((e & f) ^ (~e & g)) + kvcore_sha_k[i] + w[i];
        t2 = (KVCORE_ROTR(a, 2) ^ KVCORE_ROTR(a, 13) ^ KVCORE_ROTR(a, 22))
               + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
      }
      st[0] += a; st[1] += b; st[2] += c; st[3] += d;
      st[4] += e; st[5] += f; st[6] += g; st[7] += h;
    }
    /* digest of (parent digest 32 B, namespace int64 LE, n tokens uint32 LE) */
    static void kvcore_page_sha256(const uint8_t* parent, int64_t ns, const int32_t* tokens,
                                   int32_t n, uint8_t* out) {
      uint32_t st[8] = {0x6a09e667,0xbb67ae85,0x3c6ef372,0xa54ff53a,
                        0x510e527f,0x9b05688c,0x1f83d9ab,0x5be0cd19};
      uint8_t buf[64]; int fill = 0, i, k; uint64_t total = 0; uint8_t word[8];
      #define KVCORE_PUT(byte) do { buf[fill++] = (byte); total++; \
          if (fill == 64) { kvcore_sha_block(st, buf); fill = 0; } } while (0)
      for (i = 0; i < 32; i++) KVCORE_PUT(parent[i]);
      for (k = 0; k < 8; k++) KVCORE_PUT((uint8_t)((uint64_t)ns >> (8 * k)));
      for (i = 0; i < n; i++)
        for (k = 0; k < 4; k++) KVCORE_PUT((uint8_t)((uint32_t)tokens[i] >> (8 * k)));
      uint64_t bits = total * 8;
      buf[fill++] = 0x80;
      if (fill > 56) { while (fill < 64) buf[fill++] = 0; kvcore_sha_block(st, buf); fill = 0; }
      while (fill < 56) buf[fill++] = 0;
      for (k = 0; k < 8; k++) buf[56 + k] = (uint8_t)(bits >> (56 - 8 * k));
      kvcore_sha_block(st, buf);
      for (i = 0; i < 8; i++)
        for (k = 0; k < 4; k++) out[4 * i + k] = (uint8_t)(st[i] >> (24 - 8 * k));
      (void)word;
      #undef KVCORE_PUT
    }
    """
    void kvcore_page_sha256(const uint8_t* parent, int64_t ns, const int32_t* tokens,
                            int32_t n, uint8_t* out) nogil

# Kind code of a state group (kvcore.groups.GROUP_STATE): it has no K/V tokens to record.
cdef enum:
    _GROUP_STATE = 2


cdef inline int64_t _companion_namespace(int64_t namespace, int32_t group) noexcept nogil:
    """The namespace a companion page of ``group`` is indexed under: never the
    sequence's own (so a companion is never taken for a chain page) and distinct per
    group. Exactness does not rest on it: a companion's parent is an anchor page."""
    return namespace ^ (<int64_t>(group + 1) << 48)


cdef inline uint64_t _mix(uint64_t x) noexcept nogil:
    """splitmix64 finaliser: every input bit affects every output bit."""
    x ^= x >> 30
    x *= 0xBF58476D1CE4E5B9ULL
    x ^= x >> 27
    x *= 0x94D049BB133111EBULL
    x ^= x >> 31
    return x


@cython.final
cdef class PrefixIndex(Evictor):
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

    def __cinit__(self, num_pages, page_size, hash_bits=64, event_capacity=65536,
                  num_device_pages=None, hash_algorithm="fast"):
        self._num_pages = positive_int32(num_pages, "num_pages")
        self._num_device = (self._num_pages if num_device_pages is None
                            else positive_int32(num_device_pages, "num_device_pages"))
        if self._num_device > self._num_pages:
            raise ValueError("num_device_pages exceeds num_pages")
        self._page_size = positive_int32(page_size, "page_size")
        hash_bits = int_arg(hash_bits, "prefix_hash_bits")
        event_capacity = int_arg(event_capacity, "prefix_event_capacity")
        if not 1 <= hash_bits <= 64:
            raise ValueError(f"prefix_hash_bits must be in [1, 64], got {hash_bits}")
        if event_capacity < 1:
            raise ValueError(f"event_capacity must be >= 1, got {event_capacity}")
        num_pages, page_size = self._num_pages, self._page_size
        self._hash_mask = 0xFFFFFFFFFFFFFFFFULL if hash_bits == 64 else ((1ULL << hash_bits) - 1)
        cdef int64_t capacity = 1
        while capacity < 2 * <int64_t>self._num_pages:
            capacity *= 2
        owners = dict(
            page_hash=np.zeros(num_pages, np.uint64), parent=np.full(num_pages, -1, np.int32),
            parent_gen=np.zeros(num_pages, np.uint32), gen=np.zeros(num_pages, np.uint32),
            namespace=np.zeros(num_pages, np.int64), in_index=np.zeros(num_pages, np.uint8),
            birth_page=np.full(num_pages, -1, np.int32),
            birth_gen=np.zeros(num_pages, np.uint32), ready=np.zeros(num_pages, np.uint8),
            parent_at=np.full(num_pages, -1, np.int32),
            first_child=np.full(num_pages, -1, np.int32),
            next_sib=np.full(num_pages, -1, np.int32),
            prev_sib=np.full(num_pages, -1, np.int32),
            stack=np.full(num_pages, -1, np.int32),
            slot_tokens=np.zeros(int(num_pages) * int(page_size), np.int32),
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
        self._birth_page = <page_id_t*>cnp.PyArray_DATA(owners["birth_page"])
        self._birth_gen = <uint32_t*>cnp.PyArray_DATA(owners["birth_gen"])
        self._ready = <uint8_t*>cnp.PyArray_DATA(owners["ready"])
        self._parent_at = <page_id_t*>cnp.PyArray_DATA(owners["parent_at"])
        self._first_child = <page_id_t*>cnp.PyArray_DATA(owners["first_child"])
        self._next_sib = <page_id_t*>cnp.PyArray_DATA(owners["next_sib"])
        self._prev_sib = <page_id_t*>cnp.PyArray_DATA(owners["prev_sib"])
        self._stack = <page_id_t*>cnp.PyArray_DATA(owners["stack"])
        self._slot_tokens = <int32_t*>cnp.PyArray_DATA(owners["slot_tokens"])
        self._table = <page_id_t*>cnp.PyArray_DATA(owners["table"])
        self._table_mask = capacity - 1
        self._ev_kind = <uint8_t*>cnp.PyArray_DATA(owners["ev_kind"])
        self._ev_page = <page_id_t*>cnp.PyArray_DATA(owners["ev_page"])
        self._ev_hash = <uint64_t*>cnp.PyArray_DATA(owners["ev_hash"])
        self._ev_capacity = event_capacity
        if hash_algorithm not in ("fast", "sha256"):
            raise ValueError(f"prefix_hash must be 'fast' or 'sha256', got {hash_algorithm!r}")
        self._sha256 = hash_algorithm == "sha256"
        digest = np.zeros(int(num_pages) * 32 if self._sha256 else 0, np.uint8)
        self._owners["digest"] = digest
        self._digest = <uint8_t*>cnp.PyArray_DATA(digest)
        self._zero_digest[:] = [0] * 32

    # -- doors (declared in _prefix.pxd); callers validated everything -------------------

    cdef void evict(self, page_id_t page) noexcept nogil:
        """The allocator reuses ``page``, free and cached: it leaves the index, and its
        descendants with it."""
        self.remove_tree(page)

    cdef uint64_t chain_hash(self, uint64_t parent_hash, page_id_t parent_at, int64_t namespace,
                             const int32_t* tokens) noexcept nogil:
        """Hash of a page given its parent entry's hash and where that entry is (0 and -1
        at the root), its namespace and its tokens. With sha256 identities, the page's
        full digest (chained on the parent's, read at ``parent_at``) is left in
        ``_new_digest`` for ``insert``, and the hash is the digest's first 8 bytes
        (little-endian)."""
        cdef uint64_t word = 0
        cdef int k
        cdef const uint8_t* parent_digest
        if self._sha256:
            parent_digest = &self._zero_digest[0]
            if parent_at != NO_PAGE:
                parent_digest = self._digest + <int64_t>parent_at * 32
            kvcore_page_sha256(parent_digest, namespace, tokens, self._page_size,
                               self._new_digest)
            for k in range(8):
                word |= <uint64_t>self._new_digest[k] << (8 * k)
            return word & self._hash_mask
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
        """The indexed page with exactly this chain link (the parent's identity, see
        ``ident_page``) and these tokens, whose content has arrived; or -1."""
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
                               self._page_size * sizeof(int32_t)) == 0
                    and self._ready[page]):
                return page
            slot = (slot + 1) & self._table_mask

    cdef page_id_t locate(self, uint64_t h, page_id_t ident_page,
                          uint32_t ident_gen) noexcept nogil:
        """Where the entry of hash ``h`` and identity ``(ident_page, ident_gen)`` is now
        (in flight or not), or -1 when it left the index."""
        cdef int64_t slot = <int64_t>(h & <uint64_t>self._table_mask)
        cdef page_id_t page
        while True:
            page = self._table[slot]
            if page == NO_PAGE or (self._birth_page[page] == ident_page
                                   and self._birth_gen[page] == ident_gen
                                   and self._page_hash[page] == h):
                return page
            slot = (slot + 1) & self._table_mask

    cdef void insert(self, page_id_t page, uint64_t h, page_id_t parent, uint32_t parent_gen,
                     int64_t namespace, page_id_t parent_at) noexcept nogil:
        """Index ``page`` (its tokens are already in ``slot_tokens``) under a new
        identity, ``(page, its generation)``, that its children link to. ``parent_at``
        is where the parent entry ``(parent, parent_gen)`` is now (``locate``), which
        must be in the index; -1 with ``parent`` -1 for a root."""
        cdef int64_t slot = <int64_t>(h & <uint64_t>self._table_mask)
        while self._table[slot] != NO_PAGE:
            slot = (slot + 1) & self._table_mask
        self._table[slot] = page
        if self._sha256:
            memcpy(self._digest + <int64_t>page * 32, self._new_digest, 32)
        self._parent_at[page] = parent_at
        self._prev_sib[page] = NO_PAGE
        self._first_child[page] = NO_PAGE
        if parent_at != NO_PAGE:
            self._next_sib[page] = self._first_child[parent_at]
            if self._next_sib[page] != NO_PAGE:
                self._prev_sib[self._next_sib[page]] = page
            self._first_child[parent_at] = page
        else:
            self._next_sib[page] = NO_PAGE
        self._page_hash[page] = h
        self._parent[page] = parent
        self._parent_gen[page] = parent_gen
        self._namespace[page] = namespace
        self._birth_page[page] = page
        self._birth_gen[page] = self._gen[page]
        self._ready[page] = 1
        self._in_index[page] = 1
        self._num_indexed += 1
        self._stored += 1
        self._event(_STORED, page, h)

    cdef void relocate(self, page_id_t src, page_id_t dst, bint ready) noexcept nogil:
        """Move ``src``'s entry, identity and tokens included, to id ``dst`` (not
        indexed): the same block now lives in another page (another tier), and every
        child still links to it. ``ready``: whether ``dst``'s content has arrived."""
        cdef int64_t mask = self._table_mask
        cdef int64_t slot = <int64_t>(self._page_hash[src] & <uint64_t>mask)
        while self._table[slot] != src:
            slot = (slot + 1) & mask
        self._table[slot] = dst
        self._page_hash[dst] = self._page_hash[src]
        self._parent[dst] = self._parent[src]
        self._parent_gen[dst] = self._parent_gen[src]
        self._namespace[dst] = self._namespace[src]
        self._birth_page[dst] = self._birth_page[src]
        self._birth_gen[dst] = self._birth_gen[src]
        memcpy(self._slot_tokens + <int64_t>dst * self._page_size,
               self._slot_tokens + <int64_t>src * self._page_size,
               self._page_size * sizeof(int32_t))
        if self._sha256:
            memcpy(self._digest + <int64_t>dst * 32, self._digest + <int64_t>src * 32, 32)
        self._ready[dst] = ready
        # dst takes src's place in the tree: among its siblings, and as its children's parent.
        cdef page_id_t up = self._parent_at[src], prev = self._prev_sib[src]
        cdef page_id_t nxt = self._next_sib[src], child = self._first_child[src]
        self._parent_at[dst], self._prev_sib[dst], self._next_sib[dst] = up, prev, nxt
        self._first_child[dst] = child
        if prev != NO_PAGE:
            self._next_sib[prev] = dst
        elif up != NO_PAGE:
            self._first_child[up] = dst
        if nxt != NO_PAGE:
            self._prev_sib[nxt] = dst
        while child != NO_PAGE:
            self._parent_at[child] = dst
            child = self._next_sib[child]
        self._parent_at[src] = self._prev_sib[src] = self._next_sib[src] = NO_PAGE
        self._first_child[src] = NO_PAGE
        self._in_index[dst] = 1
        self._in_index[src] = 0
        self._ready[src] = 0
        self._gen[src] += 1
        self._event(_EVICTED, src, self._page_hash[src])
        self._event(_STORED, dst, self._page_hash[dst])

    cdef void remove_tree(self, page_id_t root) noexcept nogil:
        """Take the entry at ``root`` and every entry chained from it out of the index
        (nothing could reach those any more), telling each page's allocator to forget it
        (a free page becomes clean, one in use stays in use). Parents go before children."""
        cdef int64_t top = 1
        cdef page_id_t page, child
        self._unlink_child(root)
        if self._first_child[root] == NO_PAGE:   # a leaf, the usual eviction: no walk
            self._remove_entry(root)
            self._forget(root)
            return
        self._stack[0] = root
        while top:
            top -= 1
            page = self._stack[top]
            child = self._first_child[page]
            while child != NO_PAGE:
                self._stack[top] = child
                top += 1
                child = self._next_sib[child]
            self._first_child[page] = NO_PAGE
            self._parent_at[page] = self._prev_sib[page] = self._next_sib[page] = NO_PAGE
            self._remove_entry(page)
            if page != root:
                self._cascaded += 1
            self._forget(page)

    cdef void _forget(self, page_id_t page) noexcept nogil:
        """Tell ``page``'s allocator (device or host) that it left the index."""
        if page < self._num_device:
            if self._device_alloc is not None:
                self._device_alloc.forget(page)
        elif self._host_alloc is not None:
            self._host_alloc.forget(page - self._num_device)

    cdef void _unlink_child(self, page_id_t page) noexcept nogil:
        """Take ``page`` out of its parent's list of children."""
        cdef page_id_t up = self._parent_at[page], prev = self._prev_sib[page]
        cdef page_id_t nxt = self._next_sib[page]
        if prev != NO_PAGE:
            self._next_sib[prev] = nxt
        elif up != NO_PAGE:
            self._first_child[up] = nxt
        if nxt != NO_PAGE:
            self._prev_sib[nxt] = prev
        self._parent_at[page] = self._prev_sib[page] = self._next_sib[page] = NO_PAGE

    cdef void _remove_entry(self, page_id_t page) noexcept nogil:
        """Take ``page`` alone out of the hash table (its tree links are handled by the
        caller); its generation moves on."""
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
        self._ready[page] = 0
        self._gen[page] += 1
        self._num_indexed -= 1
        self._evictions += 1
        self._event(_EVICTED, page, self._page_hash[page])

    cdef void _event(self, uint8_t kind, page_id_t page, uint64_t h) noexcept nogil:
        cdef int64_t at
        if page >= self._num_device:     # a host-tier page: its own kind and id
            kind += 2
            page -= self._num_device
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
        """dict of the index's counters: stored, evictions (every page that left the
        index), removed_with_ancestor (those among them that left because an ancestor
        did: leaf-first eviction), events_dropped."""
        return {"stored": self._stored, "evictions": self._evictions,
                "removed_with_ancestor": self._cascaded, "events_dropped": self._ev_dropped}

    def take_events(self):
        """Return and clear the events since the last call, oldest first.

        Returns
        -------
        kind : numpy.ndarray of uint8, shape [n]
            ``EVENT_STORED`` (1) or ``EVENT_EVICTED`` (2) for a device page;
            ``EVENT_HOST_STORED`` (3) or ``EVENT_HOST_EVICTED`` (4) for a host-tier page.
            A block offloaded to the host tier is an EVICTED then a HOST_STORED event of
            the same hash; one loaded back, a HOST_EVICTED then a STORED.
        page_id : numpy.ndarray of int32, shape [n]
            A device page id, or a host page id for the HOST kinds.
        page_hash : numpy.ndarray of uint64, shape [n]
            The page's chained hash: equal hashes mean the same prefix to a router.
        """
        cdef cnp.ndarray kind = None, page = None, hashes = None
        cdef cnp.npy_intp dims[1]
        cdef int64_t i, at, n
        while True:
            # Critical part: sizes checked, events copied and cleared with no Python
            # object made in between; an allocation (which may let another thread add
            # or take events) only happens before it, and then everything is re-read.
            n = self._ev_count
            if kind is not None and cnp.PyArray_DIM(kind, 0) == n:
                break
            dims[0] = n
            kind = cnp.PyArray_EMPTY(1, dims, cnp.NPY_UINT8, 0)
            page = cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT32, 0)
            hashes = cnp.PyArray_EMPTY(1, dims, cnp.NPY_UINT64, 0)
        cdef uint8_t* k = <uint8_t*>cnp.PyArray_DATA(kind)
        cdef page_id_t* p = <page_id_t*>cnp.PyArray_DATA(page)
        cdef uint64_t* h = <uint64_t*>cnp.PyArray_DATA(hashes)
        for i in range(n):
            at = (self._ev_start + i) % self._ev_capacity
            k[i] = self._ev_kind[at]
            p[i] = self._ev_page[at]
            h[i] = self._ev_hash[at]
        self._ev_start = 0
        self._ev_count = 0
        return kind, page, hashes

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
        self._check_tree()

    def _check_tree(self):
        """Raise KVCoreError unless every entry is reachable from a root: its parent
        link names an indexed entry, which lists it as a child, and a walk down from the
        roots visits every entry once."""
        cdef page_id_t page, up, child, prev
        where = {}
        for page in range(self._num_pages):
            if self._in_index[page]:
                where[(self._birth_page[page], self._birth_gen[page])] = page
        roots = []
        for page in range(self._num_pages):
            if not self._in_index[page]:
                if (self._parent_at[page] != NO_PAGE or self._first_child[page] != NO_PAGE
                        or self._next_sib[page] != NO_PAGE or self._prev_sib[page] != NO_PAGE):
                    raise KVCoreError(f"page {page} is not indexed but keeps tree links")
                continue
            up = self._parent_at[page]
            if self._parent[page] == NO_PAGE:
                if up != NO_PAGE:
                    raise KVCoreError(f"root entry {page} names a parent at {up}")
                roots.append(page)
                continue
            if where.get((self._parent[page], self._parent_gen[page])) != up or up == NO_PAGE:
                raise KVCoreError(
                    f"entry {page} chains from ({self._parent[page]}, "
                    f"{self._parent_gen[page]}), which is not the indexed entry at {up}: "
                    "nothing can reach it")
        seen = np.zeros(self._num_pages, np.uint8)
        todo = list(roots)
        visited = 0
        while todo:
            page = todo.pop()
            if seen[page]:
                raise KVCoreError(f"entry {page} is reached twice")
            seen[page] = 1
            visited += 1
            child, prev = self._first_child[page], NO_PAGE
            while child != NO_PAGE:
                if self._parent_at[child] != page or self._prev_sib[child] != prev:
                    raise KVCoreError(f"the child list of entry {page} is broken at {child}")
                todo.append(child)
                prev, child = child, self._next_sib[child]
        if visited != self._num_indexed:
            raise KVCoreError(f"{self._num_indexed - visited} indexed entries are not "
                              "reachable from a root")


def _is_indexed_py(PrefixIndex index not None, page_id):
    """Test entry point: whether ``page_id`` is in ``index``.

    Raises
    ------
    InvalidPageError
        ``page_id`` outside ``[0, num_pages)``.
    TypeError, ValueError
        ``page_id`` not an integer, or outside int64.
    """
    return index.in_index(page_arg(page_id, "page_id", index._num_pages))


# --------------------------------------------------------------------------------------
# What the page table sees: PrefixHooks (caching off) and PrefixCache
# --------------------------------------------------------------------------------------

cdef tuple _NO_EVENTS():
    return (np.empty(0, np.uint8), np.empty(0, np.int32), np.empty(0, np.uint64))


cdef class PrefixHooks:
    """The page table's doors into the prefix cache, as no-ops: prefix caching off.

    Every door of the page table into prefix-cache state is a cdef method of this class
    (declared in ``_prefix.pxd``). A table without prefix caching holds an instance of
    this base, so its hot paths call the same doors and find nothing: ``lookup`` hits
    nothing, registration records nothing, ``stats`` is None and there are no events.
    """

    cdef bint enabled(self) noexcept:
        """Whether this is a real prefix cache."""
        return False

    cdef void set_retention(self, int64_t seq_id, int32_t priority, int64_t duration,
                            int32_t num_ranges, const int64_t* starts, const int64_t* ends,
                            const int32_t* priorities, const int64_t* durations) noexcept nogil:
        """The retention of ``seq_id``'s cached pages: ``priority`` (0 .. 100) kept for
        ``duration`` ns after a page is freed (0: for good), and ``num_ranges`` token
        ranges ``[starts[i], ends[i])`` (sorted, disjoint) with their own. Validated."""
        pass

    cdef int64_t lookup(self, const int32_t* tokens, int64_t max_pages, int64_t namespace,
                        page_id_t* hits) noexcept nogil:
        """Leading full pages of ``tokens`` (``max_pages * page_size`` of them are read)
        found in the cache, in order, written to ``hits`` (unless NULL); changes nothing."""
        return 0

    cdef void seq_started(self, int64_t seq_id, int64_t namespace, const page_id_t* hits,
                          int64_t num_hits) noexcept nogil:
        """``seq_id`` starts in ``namespace`` with the ``num_hits`` pages of ``hits``."""
        pass

    cdef void companion_hit(self, int64_t seq_id, int64_t block, page_id_t page) noexcept nogil:
        """``seq_id`` (started) maps companion ``page`` (a device page of another group)
        at ``block`` from a hit: it keeps at least this sequence's retention for it."""
        pass

    cdef void count_query(self, int64_t num_tokens, int64_t num_hit_tokens) noexcept nogil:
        """Count one lookup of ``num_tokens`` tokens that hit ``num_hit_tokens``."""
        pass

    cdef void seq_forked(self, int64_t child, int64_t parent) noexcept nogil:
        """``child`` shares every page of ``parent``: it continues the same chain."""
        pass

    cdef void page_copied(self, page_id_t src, page_id_t dst) noexcept nogil:
        """Copy-on-write: ``dst`` now holds what ``src`` held."""
        pass

    cdef void appended(self, const int64_t* seq_ids, const int64_t* counts, Py_ssize_t batch,
                       const slot_t* slots, int64_t slot_stride, const int32_t* tokens,
                       const page_id_t* tables, int64_t group_stride, int64_t width,
                       const int32_t* first_live, int64_t max_seqs, const int32_t* kinds,
                       int32_t num_groups, int32_t anchor, const int32_t* seq_lens) noexcept nogil:
        """An append is done: record ``tokens`` (NULL: ids unknown) and register full pages.

        Group ``g``'s slots are ``slots[g * slot_stride ...]``, its block table
        ``tables[g * group_stride ...]`` (``[max_seqs, width]``), its first live columns
        ``first_live[g * max_seqs ...]``; ``kinds`` are the groups' kind codes and
        ``anchor`` the group whose pages form the chains (the others register
        companions). ``seq_lens`` are the lengths after the append. All read only
        during the call.
        """
        pass

    cdef page_id_t find_companion(self, int32_t group, page_id_t anchor_page,
                                  const int32_t* tokens, int64_t namespace) noexcept nogil:
        """The page of ``group`` registered for the block whose anchor page is
        ``anchor_page`` with these ``page_size`` tokens, or -1; changes nothing."""
        return NO_PAGE

    cdef void unregister(self, page_id_t page) noexcept nogil:
        """Take ``page`` out of the index if it is there (its content will change)."""
        pass

    cdef void truncated(self, int64_t seq_id, int64_t new_len,
                        const page_id_t* anchor_row) noexcept nogil:
        """``seq_id`` was cut to ``new_len`` tokens: its chain continues from its last
        whole kept block (``anchor_row`` is its row of the anchor group's table)."""
        pass

    cdef void seq_relocated(self, int64_t seq_id) noexcept nogil:
        """``seq_id``'s pages were replaced by fresh copies (a swap-in)."""
        pass

    cdef int64_t num_writebacks(self) noexcept nogil:
        """Offloaded pages whose copy to the host tier nobody has taken yet."""
        return 0

    cdef int64_t take_writebacks(self, page_id_t* device_pages,
                                 page_id_t* host_pages) noexcept nogil:
        """Move the write-back buffer into the two arrays (``num_writebacks`` entries
        each): copy device page ``device_pages[i]`` to host page ``host_pages[i]``."""
        return 0

    cdef void writeback_done(self, page_id_t host_page, bint ok) noexcept nogil:
        """The copy into ``host_page`` completed (``ok``) or failed: the offloaded block
        becomes findable, or leaves the index. Releases the copy's hold on the page."""
        pass

    cdef bint writeback_holds(self, page_id_t host_page) noexcept nogil:
        """Whether a write-back (taken or not) holds a reference to ``host_page``."""
        return False

    cdef bint writeback_taken(self, page_id_t host_page) noexcept nogil:
        """Whether ``host_page``'s write-back was taken and is not finished."""
        return False

    cdef void page_loaded(self, page_id_t hit, page_id_t device_page) noexcept nogil:
        """A prefix hit on host entry ``hit`` (an index id) is being copied into
        ``device_page``: record its tokens there."""
        pass

    cdef void load_done(self, page_id_t host_page, page_id_t device_page, bint ok) noexcept nogil:
        """The copy of ``host_page`` into ``device_page`` completed: the block's entry
        moves to the device page. Failed: the host entry leaves the index, never served.
        The table drops its own references afterwards."""
        pass

    cdef void clear(self) noexcept nogil:
        """Forget every cached prefix."""
        pass

    cdef int32_t num_cached(self) noexcept nogil:
        """Pages in the index."""
        return 0

    cdef object stats(self):
        """The counters of ``PageTable.prefix_stats`` (a new dict), or None."""
        return None

    cdef tuple take_events(self):
        """Return and clear the events (see ``PageTable.take_events``)."""
        return _NO_EVENTS()

    cdef int check(self) except -1:
        """Raise KVCoreError unless the cache's invariants hold."""
        return 0

    cdef int32_t slot_token(self, slot_t slot) noexcept nogil:
        """Token id recorded for ``slot`` (-1 when nothing is recorded)."""
        return -1


cdef bint _from_factory = False


cdef PrefixCache new_prefix_cache(PageAllocator allocator, int32_t page_size, int32_t max_seqs,
                                  int32_t max_pages_per_seq, object hash_bits,
                                  object event_capacity, PageAllocator host_allocator,
                                  object hash_algorithm="fast"):
    """The one way to make a PrefixCache (from Cython: PageTable's constructor)."""
    global _from_factory
    _from_factory = True
    try:
        return PrefixCache(allocator, page_size, max_seqs, max_pages_per_seq, hash_bits,
                           event_capacity, host_allocator, hash_algorithm)
    finally:
        _from_factory = False


@cython.final
cdef class PrefixCache(PrefixHooks):
    """The prefix cache of one PageTable: its index, per-sequence chains and statistics.

    Parameters
    ----------
    allocator : PageAllocator
        The table's allocator; the cache attaches its index as the allocator's evictor
        (``ValueError`` if another cache is attached already).
    page_size, max_seqs : int
        Those of the table (validated by it).
    hash_bits, event_capacity : int
        See ``PrefixIndex``.
    host_allocator : PageAllocator or None
        The host tier to offload evicted pages into (see the module doc), or None.

    Notes
    -----
    Per sequence (int arrays ``[max_seqs]``): ``seq_ns`` its namespace, ``chain_ok``
    whether every token id so far is known, ``num_chained`` its leading full pages
    already looked up or registered, and ``chain_page`` / ``chain_gen`` / ``chain_hash``
    the last of those pages (as indexed: another sequence's page when the same prefix
    was computed twice), its generation then and its chained hash. A sequence of 10
    tokens with page size 4, all ids known, has ``num_chained`` 2 and ``chain_page`` its
    second page's indexed twin; its third page is registered when it fills up.

    Invariants (``check``): those of the index, and a page is indexed if and only if
    the allocator marks it cached (so an evictable page is always findable, and a
    clean one never).
    """

    def __cinit__(self, PageAllocator allocator not None, int32_t page_size, int32_t max_seqs,
                  int32_t max_pages_per_seq, hash_bits, event_capacity,
                  PageAllocator host_allocator=None, hash_algorithm="fast"):
        if not _from_factory:   # it attaches to the allocator for good: only PageTable may
            raise TypeError("a PrefixCache is made by PageTable(..., enable_prefix_cache=True)")
        allocator.ensure_unattached()
        if host_allocator is not None:
            host_allocator.ensure_unattached()
        cdef int32_t num_device = allocator.page_count()
        cdef int64_t num_ids = num_device + (host_allocator.page_count()
                                             if host_allocator is not None else 0)
        if num_ids > 2**31 - 1:
            raise ValueError(f"device plus host pages ({num_ids}) exceed 2**31 - 1")
        self._index = PrefixIndex(num_ids, page_size,
                                  int_arg(hash_bits, "prefix_hash_bits"),
                                  int_arg(event_capacity, "prefix_event_capacity"),
                                  num_device, hash_algorithm)
        self._num_device = num_device
        self._host = host_allocator
        wb_device = np.full(num_device, NO_PAGE, np.int32)
        wb_host = np.full(num_device, NO_PAGE, np.int32)
        wb_held = np.zeros(host_allocator.page_count() if host_allocator is not None else 0,
                           np.uint8)
        self._wb_device = <page_id_t*>cnp.PyArray_DATA(wb_device)
        self._wb_host = <page_id_t*>cnp.PyArray_DATA(wb_host)
        self._wb_held = <uint8_t*>cnp.PyArray_DATA(wb_held)
        self._page_size = page_size
        owners = (np.zeros(max_seqs, np.int64), np.zeros(max_seqs, np.uint8),
                  np.zeros(max_seqs, np.int32), np.full(max_seqs, NO_PAGE, np.int32),
                  np.zeros(max_seqs, np.uint32), np.zeros(max_seqs, np.uint64),
                  np.full((max_seqs, max_pages_per_seq), NO_PAGE, np.int32),
                  np.zeros((max_seqs, max_pages_per_seq), np.uint32))
        self._owners = owners
        self._width = max_pages_per_seq
        self._history_page = <page_id_t*>cnp.PyArray_DATA(owners[6])
        self._history_gen = <uint32_t*>cnp.PyArray_DATA(owners[7])
        self._seq_ns = <int64_t*>cnp.PyArray_DATA(owners[0])
        self._chain_ok = <uint8_t*>cnp.PyArray_DATA(owners[1])
        self._num_chained = <int32_t*>cnp.PyArray_DATA(owners[2])
        self._chain_page = <page_id_t*>cnp.PyArray_DATA(owners[3])
        self._chain_gen = <uint32_t*>cnp.PyArray_DATA(owners[4])
        self._chain_hash = <uint64_t*>cnp.PyArray_DATA(owners[5])
        retention = (np.full(max_seqs, DEFAULT_PRIORITY, np.int32), np.zeros(max_seqs, np.int64),
                     np.zeros(max_seqs, np.int32),
                     np.zeros(max_seqs * MAX_RETENTION_RANGES, np.int64),
                     np.zeros(max_seqs * MAX_RETENTION_RANGES, np.int64),
                     np.zeros(max_seqs * MAX_RETENTION_RANGES, np.int32),
                     np.zeros(max_seqs * MAX_RETENTION_RANGES, np.int64))
        self._seq_prio = <int32_t*>cnp.PyArray_DATA(retention[0])
        self._seq_dur = <int64_t*>cnp.PyArray_DATA(retention[1])
        self._num_ranges = <int32_t*>cnp.PyArray_DATA(retention[2])
        self._rng_start = <int64_t*>cnp.PyArray_DATA(retention[3])
        self._rng_end = <int64_t*>cnp.PyArray_DATA(retention[4])
        self._rng_prio = <int32_t*>cnp.PyArray_DATA(retention[5])
        self._rng_dur = <int64_t*>cnp.PyArray_DATA(retention[6])
        self._owners = owners + (wb_device, wb_host, wb_held) + retention
        self._alloc = allocator
        self._index._device_alloc = allocator
        self._index._host_alloc = host_allocator
        if host_allocator is None:
            allocator.attach(self._index)
        else:
            allocator.attach(_Offloader(self))
            host_allocator.attach(_HostEvictor(self._index, num_device))

    cdef bint enabled(self) noexcept:
        return True

    cdef void set_retention(self, int64_t seq_id, int32_t priority, int64_t duration,
                            int32_t num_ranges, const int64_t* starts, const int64_t* ends,
                            const int32_t* priorities, const int64_t* durations) noexcept nogil:
        cdef int64_t at = seq_id * MAX_RETENTION_RANGES
        cdef int32_t i
        self._seq_prio[seq_id] = priority
        self._seq_dur[seq_id] = duration
        self._num_ranges[seq_id] = num_ranges
        for i in range(num_ranges):
            self._rng_start[at + i] = starts[i]
            self._rng_end[at + i] = ends[i]
            self._rng_prio[at + i] = priorities[i]
            self._rng_dur[at + i] = durations[i]

    cdef void _block_retention(self, int64_t seq_id, int64_t block, int32_t* prio,
                               int64_t* dur, int32_t* floor) noexcept nogil:
        """The retention of ``seq_id``'s block ``block``: the strongest of the ranges
        that overlap its tokens, and of the request's own if a token is in no range;
        ``floor``, the strongest level among them once their durations are over (a
        timed one's is 35)."""
        cdef int64_t lo = block * self._page_size, hi = lo + self._page_size
        cdef int64_t at = seq_id * MAX_RETENTION_RANGES, covered = 0, a, b, d
        cdef int32_t i, p
        cdef int32_t best = -1, best_floor = 0
        cdef int64_t best_dur = 0
        for i in range(self._num_ranges[seq_id]):
            a = self._rng_start[at + i] if self._rng_start[at + i] > lo else lo
            b = self._rng_end[at + i] if self._rng_end[at + i] < hi else hi
            if b <= a:
                continue
            covered += b - a
            p, d = self._rng_prio[at + i], self._rng_dur[at + i]
            if p > best or (p == best and best_dur != 0 and (d == 0 or d > best_dur)):
                best, best_dur = p, d
            # after its duration a timed priority drops to 35
            if (p if d == 0 else DEFAULT_PRIORITY) > best_floor:
                best_floor = p if d == 0 else DEFAULT_PRIORITY
        if covered < hi - lo:
            p, d = self._seq_prio[seq_id], self._seq_dur[seq_id]
            if p > best or (p == best and best_dur != 0 and (d == 0 or d > best_dur)):
                best, best_dur = p, d
            # after its duration a timed priority drops to 35
            if (p if d == 0 else DEFAULT_PRIORITY) > best_floor:
                best_floor = p if d == 0 else DEFAULT_PRIORITY
        prio[0] = best
        dur[0] = best_dur
        floor[0] = best_floor

    cdef int64_t lookup(self, const int32_t* tokens, int64_t max_pages, int64_t namespace,
                        page_id_t* hits) noexcept nogil:
        cdef int64_t i, ps = self._page_size
        cdef page_id_t parent = NO_PAGE, page, prev = NO_PAGE
        cdef uint32_t parent_gen = 0
        cdef uint64_t h = 0, hh
        for i in range(max_pages):
            hh = self._index.chain_hash(h, prev, namespace, tokens + i * ps)
            page = self._index.find(hh, parent, parent_gen, namespace, tokens + i * ps)
            if page == NO_PAGE:
                return i
            if hits != NULL:
                hits[i] = page
            parent, parent_gen, prev, h = (self._index.ident_page(page),
                                           self._index.ident_gen(page), page, hh)
        return max_pages

    cdef void seq_started(self, int64_t seq_id, int64_t namespace, const page_id_t* hits,
                          int64_t num_hits) noexcept nogil:
        cdef page_id_t last = hits[num_hits - 1] if num_hits > 0 else NO_PAGE
        cdef int64_t j
        cdef int32_t prio, floor
        cdef int64_t dur
        self._block_retention(seq_id, 0, &prio, &dur, &floor)
        cdef bint ranges = self._num_ranges[seq_id] != 0
        for j in range(num_hits):
            # A hit keeps the page at least as long as this request asks for its block.
            if ranges:
                self._block_retention(seq_id, j, &prio, &dur, &floor)
            if hits[j] < self._num_device:
                self._alloc.raise_retention(hits[j], prio, dur, floor)
            else:
                self._host.raise_retention(hits[j] - self._num_device, prio, dur, floor)
            self._history_page[seq_id * self._width + j] = self._index.ident_page(hits[j])
            self._history_gen[seq_id * self._width + j] = self._index.ident_gen(hits[j])
        self._seq_ns[seq_id] = namespace
        self._chain_ok[seq_id] = 1
        self._num_chained[seq_id] = <int32_t>num_hits
        # The chain continues from the last hit's identity; a hit's hash is the one the
        # lookup computed (find compares it exactly).
        self._chain_page[seq_id] = self._index.ident_page(last) if last != NO_PAGE else NO_PAGE
        self._chain_gen[seq_id] = self._index.ident_gen(last) if last != NO_PAGE else 0
        self._chain_hash[seq_id] = self._index.hash_of(last) if last != NO_PAGE else 0

    cdef void companion_hit(self, int64_t seq_id, int64_t block, page_id_t page) noexcept nogil:
        cdef int32_t prio, floor
        cdef int64_t dur
        self._block_retention(seq_id, block, &prio, &dur, &floor)
        self._alloc.raise_retention(page, prio, dur, floor)

    cdef void count_query(self, int64_t num_tokens, int64_t num_hit_tokens) noexcept nogil:
        self._queries += 1
        self._queried_tokens += num_tokens
        self._hit_tokens += num_hit_tokens

    cdef void seq_forked(self, int64_t child, int64_t parent) noexcept nogil:
        memcpy(self._history_page + child * self._width,
               self._history_page + parent * self._width,
               self._num_chained[parent] * sizeof(page_id_t))
        memcpy(self._history_gen + child * self._width,
               self._history_gen + parent * self._width,
               self._num_chained[parent] * sizeof(uint32_t))
        self.set_retention(child, self._seq_prio[parent], self._seq_dur[parent],
                           self._num_ranges[parent],
                           self._rng_start + parent * MAX_RETENTION_RANGES,
                           self._rng_end + parent * MAX_RETENTION_RANGES,
                           self._rng_prio + parent * MAX_RETENTION_RANGES,
                           self._rng_dur + parent * MAX_RETENTION_RANGES)
        self._seq_ns[child] = self._seq_ns[parent]
        self._chain_ok[child] = self._chain_ok[parent]
        self._num_chained[child] = self._num_chained[parent]
        self._chain_page[child] = self._chain_page[parent]
        self._chain_gen[child] = self._chain_gen[parent]
        self._chain_hash[child] = self._chain_hash[parent]

    cdef void page_copied(self, page_id_t src, page_id_t dst) noexcept nogil:
        cdef int64_t ps = self._page_size, t
        cdef const int32_t* from_tokens = self._index.tokens_of(src)
        for t in range(ps):
            self._index.record_token(<slot_t>dst * ps + t, from_tokens[t])

    cdef void appended(self, const int64_t* seq_ids, const int64_t* counts, Py_ssize_t batch,
                       const slot_t* slots, int64_t slot_stride, const int32_t* tokens,
                       const page_id_t* tables, int64_t group_stride, int64_t width,
                       const int32_t* first_live, int64_t max_seqs, const int32_t* kinds,
                       int32_t num_groups, int32_t anchor, const int32_t* seq_lens) noexcept nogil:
        """Record the new token ids and index every page that just became full.

        A full page whose chain link and tokens are already indexed (another sequence
        computed the same prefix) is not indexed twice: the sequence's chain continues
        from the indexed page, so its later pages still link to what lookups will find.
        Each other K/V group's page of the same block is indexed as a companion of the
        chain's page (see ``find_companion``).
        """
        cdef Py_ssize_t i
        cdef int64_t s, t, j = 0, page_idx, full, ps = self._page_size
        cdef int32_t g
        cdef page_id_t page, found, parent_at
        cdef const int32_t* page_tokens
        cdef const page_id_t* block_table = tables + anchor * group_stride
        cdef uint64_t h
        cdef int32_t prio = DEFAULT_PRIORITY, floor = DEFAULT_PRIORITY
        cdef int64_t dur = 0
        for i in range(batch):
            if counts[i] == 0:
                continue
            s = seq_ids[i]
            if tokens == NULL:
                self._chain_ok[s] = 0
                j += counts[i]
                continue
            for g in range(num_groups):
                if kinds[g] != _GROUP_STATE:
                    for t in range(counts[i]):
                        self._index.record_token(slots[g * slot_stride + j + t], tokens[j + t])
            j += counts[i]
            if not self._chain_ok[s]:
                continue
            full = seq_lens[s] // ps
            if self._num_chained[s] >= full:
                continue
            # Where the chain's last entry is now. It may have left the index (evicted
            # with its ancestors while another sequence's twin stood in for this one's
            # page): pages chained from it could never be reached, so registering stops.
            parent_at = NO_PAGE
            if self._chain_page[s] != NO_PAGE:
                parent_at = self._index.locate(self._chain_hash[s], self._chain_page[s],
                                               self._chain_gen[s])
                if parent_at == NO_PAGE:
                    self._chain_ok[s] = 0
                    continue
            self._block_retention(s, self._num_chained[s], &prio, &dur, &floor)
            for page_idx in range(self._num_chained[s], full):
                page = block_table[s * width + page_idx]
                page_tokens = self._index.tokens_of(page)
                h = self._index.chain_hash(self._chain_hash[s], parent_at, self._seq_ns[s],
                                           page_tokens)
                found = self._index.find(h, self._chain_page[s], self._chain_gen[s],
                                   self._seq_ns[s], page_tokens)
                if self._num_ranges[s]:
                    self._block_retention(s, page_idx, &prio, &dur, &floor)
                if found == NO_PAGE:
                    self._index.insert(page, h, self._chain_page[s], self._chain_gen[s],
                                       self._seq_ns[s], parent_at)
                    self._alloc.retain(page)
                    self._alloc.set_retention(page, prio, dur, floor)
                    found = page
                elif found >= self._num_device:
                    # The block was offloaded and this sequence computed it again: the
                    # device copy serves later hits without a load, so the entry (its
                    # identity and retention too) moves back to it and the host page is
                    # let go.
                    self._index.relocate(found, page, True)
                    self._alloc.retain(page)
                    self._carry_retention(self._host, found - self._num_device,
                                          self._alloc, page)
                    self._alloc.raise_retention(page, prio, dur, floor)
                    self._host.forget(found - self._num_device)
                    found = page
                else:
                    self._alloc.raise_retention(found, prio, dur, floor)
                parent_at = found
                self._chain_page[s] = self._index.ident_page(found)
                self._chain_gen[s] = self._index.ident_gen(found)
                self._chain_hash[s] = h
                self._history_page[s * self._width + page_idx] = self._chain_page[s]
                self._history_gen[s * self._width + page_idx] = self._chain_gen[s]
                for g in range(num_groups):
                    if g != anchor and kinds[g] != _GROUP_STATE \
                            and page_idx >= first_live[g * max_seqs + s]:
                        self._register_companion(
                            g, tables[g * group_stride + s * width + page_idx], found,
                            self._seq_ns[s], prio, dur, floor)
            self._num_chained[s] = <int32_t>full

    cdef void _register_companion(self, int32_t group, page_id_t page, page_id_t anchor_page,
                                  int64_t namespace, int32_t prio, int64_t dur,
                                  int32_t floor) noexcept nogil:
        """Index ``page`` of ``group`` as the companion (a child) of the entry at
        ``anchor_page`` (unless that block already has one), with the block's retention."""
        cdef int64_t ns = _companion_namespace(namespace, group)
        cdef const int32_t* page_tokens = self._index.tokens_of(page)
        cdef uint64_t h = self._index.chain_hash(self._index.hash_of(anchor_page), anchor_page,
                                                 ns, page_tokens)
        cdef page_id_t anchor = self._index.ident_page(anchor_page)
        cdef uint32_t gen = self._index.ident_gen(anchor_page)
        cdef page_id_t found = self._index.find(h, anchor, gen, ns, page_tokens)
        if found == NO_PAGE:
            self._index.insert(page, h, anchor, gen, ns, anchor_page)
            self._alloc.retain(page)
            self._alloc.set_retention(page, prio, dur, floor)
        elif found < self._num_device:
            self._alloc.raise_retention(found, prio, dur, floor)

    cdef page_id_t find_companion(self, int32_t group, page_id_t anchor_page,
                                  const int32_t* tokens, int64_t namespace) noexcept nogil:
        cdef int64_t ns = _companion_namespace(namespace, group)
        cdef uint64_t h = self._index.chain_hash(self._index.hash_of(anchor_page), anchor_page,
                                                 ns, tokens)
        return self._index.find(h, self._index.ident_page(anchor_page),
                                self._index.ident_gen(anchor_page), ns, tokens)

    cdef void unregister(self, page_id_t page) noexcept nogil:
        if self._index.in_index(page):
            self._index.remove_tree(page)

    cdef void truncated(self, int64_t seq_id, int64_t new_len,
                        const page_id_t* anchor_row) noexcept nogil:
        cdef int64_t kept = new_len // self._page_size
        cdef page_id_t page
        cdef uint32_t gen
        if kept >= self._num_chained[seq_id]:
            return
        self._num_chained[seq_id] = <int32_t>kept
        if kept == 0:
            self._chain_page[seq_id] = NO_PAGE
            self._chain_gen[seq_id] = 0
            self._chain_hash[seq_id] = 0
            return
        # The chain's page at the last whole kept block (the sequence's own page, or an
        # equal one another sequence registered first), as recorded when it was chained.
        page = self._history_page[seq_id * self._width + kept - 1]
        gen = self._history_gen[seq_id * self._width + kept - 1]
        if page != NO_PAGE and self._index.at_birth(page, gen):
            self._chain_page[seq_id] = page
            self._chain_gen[seq_id] = gen
            self._chain_hash[seq_id] = self._index.hash_of(page)
        else:
            # That page left the index since (evicted, cleared, rolled back): nothing
            # can be found through it, so stop registering this sequence's pages.
            self._chain_ok[seq_id] = 0

    cdef void seq_relocated(self, int64_t seq_id) noexcept nogil:
        """``seq_id`` came back from the host tier into fresh pages, whose token records
        are not this sequence's (only the copied bytes are), so stop registering its
        pages. Those registered before it left stay findable where they are."""
        self._chain_ok[seq_id] = 0

    # -- the host tier ------------------------------------------------------------------

    cdef void _carry_retention(self, PageAllocator src_alloc, page_id_t src,
                               PageAllocator dst_alloc, page_id_t dst) noexcept nogil:
        """A block moved between tiers keeps its retention (a duration counts again
        from when the page is next freed in its new tier)."""
        dst_alloc.set_retention(dst, src_alloc.priority_of(src), src_alloc.duration_of(src),
                                src_alloc.floor_of(src))

    cdef void offload(self, page_id_t page) noexcept nogil:
        """The device allocator reuses cached ``page``: move its entry to a host page
        (taking the least recently used one when none is clean) and queue the copy, or,
        with no host page to spare, drop it."""
        cdef page_id_t host_page
        if self._host.free_count() == 0 or self._wb_count == self._num_device:
            self._index.remove_tree(page)
            return
        self._host.take(&host_page, 1)   # its reference is the pending copy's hold
        if not self._index.in_index(page):
            # Making room on the host evicted an ancestor of this block, and the block
            # with it: nothing to move.
            self._host.drop_ref(host_page)
            return
        self._index.relocate(page, self._num_device + host_page, False)
        self._host.retain(host_page)
        self._carry_retention(self._alloc, page, self._host, host_page)
        self._wb_held[host_page] = 1
        self._wb_device[self._wb_count] = page
        self._wb_host[self._wb_count] = host_page
        self._wb_count += 1
        self._offloaded += 1

    cdef int64_t num_writebacks(self) noexcept nogil:
        return self._wb_count

    cdef int64_t take_writebacks(self, page_id_t* device_pages,
                                 page_id_t* host_pages) noexcept nogil:
        cdef int64_t i, n = self._wb_count
        memcpy(device_pages, self._wb_device, n * sizeof(page_id_t))
        memcpy(host_pages, self._wb_host, n * sizeof(page_id_t))
        for i in range(n):
            self._wb_held[host_pages[i]] = 2
        self._wb_count = 0
        return n

    cdef void writeback_done(self, page_id_t host_page, bint ok) noexcept nogil:
        cdef page_id_t entry = self._num_device + host_page
        if self._index.in_index(entry):
            if ok:
                self._index._ready[entry] = 1
            else:
                self._index.remove_tree(entry)
        self._wb_held[host_page] = 0
        self._host.drop_ref(host_page)   # cached: it waits on the host's evictable list

    cdef bint writeback_holds(self, page_id_t host_page) noexcept nogil:
        return self._host is not None and self._wb_held[host_page] != 0

    cdef bint writeback_taken(self, page_id_t host_page) noexcept nogil:
        return self._host is not None and self._wb_held[host_page] == 2

    cdef void page_loaded(self, page_id_t hit, page_id_t device_page) noexcept nogil:
        self.page_copied(hit, device_page)

    cdef void load_done(self, page_id_t host_page, page_id_t device_page, bint ok) noexcept nogil:
        cdef page_id_t entry = self._num_device + host_page
        if not self._index.in_index(entry):
            return   # cleared, or moved already by another sequence's load
        if ok:
            self._index.relocate(entry, device_page, True)
            self._alloc.retain(device_page)
            self._carry_retention(self._host, host_page, self._alloc, device_page)
            self._loaded += 1
            self._host.forget(host_page)
        else:
            self._index.remove_tree(entry)

    cdef void clear(self) noexcept nogil:
        cdef page_id_t page
        for page in range(self._index._num_pages):
            if self._index.in_index(page):
                self._index.remove_tree(page)

    cdef int32_t num_cached(self) noexcept nogil:
        return self._index.size()

    cdef object stats(self):
        stats = {"queries": self._queries, "queried_tokens": self._queried_tokens,
                 "hit_tokens": self._hit_tokens, **self._index.stats()}
        stats["num_cached_pages"] = self._index.size()
        stats["evictions_by_priority"] = self._alloc.evictions_by_priority
        if self._host is not None:
            stats["host_cached_pages"] = int(np.count_nonzero(
                self._index._owners["in_index"][self._num_device:]))
            stats["offloaded"] = self._offloaded
            stats["host_evictions_by_priority"] = self._host.evictions_by_priority
            stats["loaded"] = self._loaded
        # Python division of the two counts, as the stats are Python ints (cdivision
        # would truncate C integers).
        stats["hit_rate"] = (stats["hit_tokens"] / stats["queried_tokens"]
                             if stats["queried_tokens"] else 0.0)
        return stats

    cdef tuple take_events(self):
        return self._index.take_events()

    cdef int check(self) except -1:
        self._index.check()
        cdef page_id_t page
        for page in range(self._alloc.page_count()):
            if self._alloc.is_cached(page) != self._index.in_index(page):
                raise KVCoreError(
                    f"page {page} is {'' if self._index.in_index(page) else 'not '}indexed "
                    f"but the allocator {'' if self._alloc.is_cached(page) else 'does not '}"
                    "mark it cached")
            if self._index.in_index(page) and not self._index._ready[page]:
                raise KVCoreError(f"indexed device page {page} is marked in flight")
        if self._host is None:
            return 0
        cdef page_id_t h
        pending = set(self._wb_host[i] for i in range(self._wb_count))
        for h in range(self._host.page_count()):
            page = self._num_device + h
            if self._host.is_cached(h) != self._index.in_index(page):
                raise KVCoreError(
                    f"host page {h} is {'' if self._index.in_index(page) else 'not '}indexed "
                    f"but the host allocator {'' if self._host.is_cached(h) else 'does not '}"
                    "mark it cached")
            if self._index.in_index(page) and not self._index._ready[page] \
                    and self._host.refs(h) < 1:
                raise KVCoreError(f"host page {h} is in flight but nothing holds it")
            if h in pending and self._host.refs(h) < 1:
                raise KVCoreError(f"host page {h} awaits its write-back but is free")
        return 0

    cdef int32_t slot_token(self, slot_t slot) noexcept nogil:
        return self._index.token_at(slot)


@cython.final
cdef class _Offloader(Evictor):
    """The device allocator's evictor when there is a host tier: offload, not forget."""

    cdef PrefixCache _cache

    def __cinit__(self, PrefixCache cache not None):
        self._cache = cache

    cdef void evict(self, page_id_t page) noexcept nogil:
        self._cache.offload(page)


@cython.final
cdef class _HostEvictor(Evictor):
    """The host allocator's evictor: a reused host page's block leaves the index (its
    least recently freed entry goes first: the host tier's LRU)."""

    cdef PrefixIndex _index
    cdef int32_t _offset

    def __cinit__(self, PrefixIndex index not None, int32_t offset):
        self._index = index
        self._offset = offset

    cdef void evict(self, page_id_t page) noexcept nogil:
        self._index.remove_tree(self._offset + page)
