# cython: language_level=3
"""C-level declarations of the prefix cache (see _prefix.pyx for the invariants).

Two walls meet here. ``PrefixIndex`` is the hash index of full pages; its cdef methods
are the doors ``PrefixCache`` uses. ``PrefixHooks`` is what the page table sees of the
prefix cache: the cdef methods listed on it are the page table's only doors into any
prefix-cache state. The base class is prefix caching switched off (every door a no-op),
``PrefixCache`` the real one, so the page table never branches on whether caching is on.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from kvcore._allocator cimport Evictor, PageAllocator
from kvcore._typedefs cimport page_id_t, slot_t


@cython.final
cdef class PrefixIndex(Evictor):
    cdef int32_t _num_pages           # ids: device pages, then host pages (see _num_device)
    cdef int32_t _num_device          # ids >= this are host page (id - _num_device)
    cdef int32_t _page_size
    cdef uint64_t _hash_mask          # all ones, or fewer bits for collision tests
    # per page
    cdef uint64_t* _page_hash         # [num_pages] chained hash of an indexed page
    cdef page_id_t* _parent           # [num_pages] previous page of the chain, -1 at the root
    cdef uint32_t* _parent_gen        # [num_pages] generation of that parent when linked
    cdef uint32_t* _gen               # [num_pages] bumped whenever the page leaves the index
    cdef int64_t* _namespace          # [num_pages]
    cdef uint8_t* _in_index           # [num_pages]
    # An entry's identity, which its children link to: the (page, generation) it was
    # indexed at. It moves with the entry when the block moves between tiers.
    cdef page_id_t* _birth_page       # [num_pages]
    cdef uint32_t* _birth_gen         # [num_pages]
    cdef uint8_t* _ready              # [num_pages] 0 while the page's content is in flight
    # The tree of entries, by where each entry is now (moves keep it): the parent's
    # page, and the children as an intrusive doubly linked sibling list. Leaf-first
    # eviction walks it: an entry leaves the index with all its descendants, so no
    # entry is ever left that no lookup can reach.
    cdef page_id_t* _parent_at        # [num_pages] where the parent entry is, -1 at a root
    cdef page_id_t* _first_child      # [num_pages]
    cdef page_id_t* _next_sib         # [num_pages]
    cdef page_id_t* _prev_sib         # [num_pages]
    cdef page_id_t* _stack            # [num_pages] scratch of remove_tree
    # Who is told when remove_tree drops an entry: the device pages' allocator (ids
    # below _num_device) and the host tier's (the rest); either may be None.
    cdef PageAllocator _device_alloc
    cdef PageAllocator _host_alloc
    cdef int32_t* _slot_tokens        # [num_pages * page_size] token id held by each slot
    # sha256 identities (PageTable(prefix_hash="sha256")): each entry's full digest,
    # which its children's digests chain on; the 64-bit hash is its first 8 bytes.
    cdef bint _sha256
    cdef uint8_t* _digest             # [num_pages * 32] (empty in fast mode)
    cdef uint8_t _new_digest[32]      # chain_hash's digest, which insert stores
    cdef uint8_t _zero_digest[32]     # the root's parent
    # open-addressing hash table: page ids, -1 empty; linear probing, backward-shift delete
    cdef page_id_t* _table
    cdef int64_t _table_mask
    cdef int32_t _num_indexed
    # event ring
    cdef uint8_t* _ev_kind
    cdef page_id_t* _ev_page
    cdef uint64_t* _ev_hash
    cdef int64_t _ev_capacity, _ev_start, _ev_count, _ev_dropped
    # statistics of the index itself (query statistics live in PrefixCache)
    cdef int64_t _evictions, _stored, _cascaded
    cdef object _owners

    cdef uint64_t chain_hash(self, uint64_t parent_hash, page_id_t parent_at, int64_t namespace,
                             const int32_t* tokens) noexcept nogil
    cdef page_id_t find(self, uint64_t h, page_id_t parent, uint32_t parent_gen,
                        int64_t namespace, const int32_t* tokens) noexcept nogil
    cdef page_id_t locate(self, uint64_t h, page_id_t ident_page,
                          uint32_t ident_gen) noexcept nogil
    cdef void insert(self, page_id_t page, uint64_t h, page_id_t parent, uint32_t parent_gen,
                     int64_t namespace, page_id_t parent_at) noexcept nogil
    cdef void remove_tree(self, page_id_t page) noexcept nogil
    cdef void _remove_entry(self, page_id_t page) noexcept nogil
    cdef void _unlink_child(self, page_id_t page) noexcept nogil
    cdef void _forget(self, page_id_t page) noexcept nogil
    cdef void relocate(self, page_id_t src, page_id_t dst, bint ready) noexcept nogil
    cdef void _event(self, uint8_t kind, page_id_t page, uint64_t h) noexcept nogil

    cdef inline int32_t size(self) noexcept nogil:
        """Pages in the index."""
        return self._num_indexed

    cdef inline bint in_index(self, page_id_t page) noexcept nogil:
        return self._in_index[page] != 0

    cdef inline page_id_t ident_page(self, page_id_t page) noexcept nogil:
        """Identity of the entry at ``page`` (with ``ident_gen``): what children link to."""
        return self._birth_page[page]

    cdef inline uint32_t ident_gen(self, page_id_t page) noexcept nogil:
        return self._birth_gen[page]

    cdef inline bint at_birth(self, page_id_t page, uint32_t gen) noexcept nogil:
        """Whether ``page`` holds the entry whose identity is ``(page, gen)``."""
        return (self._in_index[page] != 0 and self._birth_page[page] == page
                and self._birth_gen[page] == gen)

    cdef inline uint64_t hash_of(self, page_id_t page) noexcept nogil:
        return self._page_hash[page]

    cdef inline const int32_t* tokens_of(self, page_id_t page) noexcept nogil:
        """The ``page_size`` recorded token ids of ``page``."""
        return self._slot_tokens + <int64_t>page * self._page_size

    cdef inline void record_token(self, slot_t slot, int32_t token) noexcept nogil:
        self._slot_tokens[slot] = token

    cdef inline int32_t token_at(self, slot_t slot) noexcept nogil:
        return self._slot_tokens[slot]


cdef enum:
    MAX_RETENTION_RANGES = 8    # token ranges of one request with their own priority


cdef class PrefixHooks:
    """The page table's doors into the prefix cache; this base is caching switched off."""
    cdef bint enabled(self) noexcept
    cdef void set_retention(self, int64_t seq_id, int32_t priority, int64_t duration,
                            int32_t num_ranges, const int64_t* starts, const int64_t* ends,
                            const int32_t* priorities, const int64_t* durations) noexcept nogil
    cdef int64_t lookup(self, const int32_t* tokens, int64_t max_pages, int64_t namespace,
                        page_id_t* hits) noexcept nogil
    cdef void seq_started(self, int64_t seq_id, int64_t namespace, const page_id_t* hits,
                          int64_t num_hits) noexcept nogil
    cdef void companion_hit(self, int64_t seq_id, int64_t block, page_id_t page) noexcept nogil
    cdef void count_query(self, int64_t num_tokens, int64_t num_hit_tokens) noexcept nogil
    cdef void seq_forked(self, int64_t child, int64_t parent) noexcept nogil
    cdef void page_copied(self, page_id_t src, page_id_t dst) noexcept nogil
    cdef void appended(self, const int64_t* seq_ids, const int64_t* counts, Py_ssize_t batch,
                       const slot_t* slots, int64_t slot_stride, const int32_t* tokens,
                       const page_id_t* tables, int64_t group_stride, int64_t width,
                       const int32_t* first_live, int64_t max_seqs, const int32_t* kinds,
                       int32_t num_groups, int32_t anchor, const int32_t* seq_lens) noexcept nogil
    cdef page_id_t find_companion(self, int32_t group, page_id_t anchor_page,
                                  const int32_t* tokens, int64_t namespace) noexcept nogil
    cdef void unregister(self, page_id_t page) noexcept nogil
    cdef void truncated(self, int64_t seq_id, int64_t new_len,
                        const page_id_t* anchor_row) noexcept nogil
    cdef void seq_relocated(self, int64_t seq_id) noexcept nogil
    cdef int64_t num_writebacks(self) noexcept nogil
    cdef int64_t take_writebacks(self, page_id_t* device_pages,
                                 page_id_t* host_pages) noexcept nogil
    cdef void writeback_done(self, page_id_t host_page, bint ok) noexcept nogil
    cdef bint writeback_holds(self, page_id_t host_page) noexcept nogil
    cdef bint writeback_taken(self, page_id_t host_page) noexcept nogil
    cdef void page_loaded(self, page_id_t hit, page_id_t device_page) noexcept nogil
    cdef void load_done(self, page_id_t host_page, page_id_t device_page, bint ok) noexcept nogil
    cdef void clear(self) noexcept nogil
    cdef int32_t num_cached(self) noexcept nogil
    cdef object stats(self)
    cdef tuple take_events(self)
    cdef int check(self) except -1
    cdef int32_t slot_token(self, slot_t slot) noexcept nogil


@cython.final
cdef class PrefixCache(PrefixHooks):
    cdef PrefixIndex _index
    cdef PageAllocator _alloc
    cdef int32_t _page_size
    # The host tier (None: evicted pages are dropped). Index ids >= _num_device are host
    # page (id - _num_device). A device page evicted while cached is offloaded: its entry
    # moves to a host page, and the pair waits in the write-back buffer until the
    # table's caller takes it and copies the page.
    cdef PageAllocator _host
    cdef int32_t _num_device
    cdef page_id_t* _wb_device        # [num_device] write-back buffer
    cdef page_id_t* _wb_host
    cdef uint8_t* _wb_held            # [num_host_pages] a write-back holds the page: 1 in
                                      # the buffer, 2 taken (its copy owed), 0 none
    cdef int64_t _wb_count
    cdef int64_t _offloaded, _loaded
    # per sequence [max_seqs]: the chain of its leading full pages
    cdef int64_t* _seq_ns             # namespace of each sequence
    cdef uint8_t* _chain_ok           # every token id so far is known
    cdef int32_t* _num_chained        # leading full pages already registered
    cdef page_id_t* _chain_page       # indexed page of the last registered one (-1: none)
    cdef uint32_t* _chain_gen         # its generation then
    cdef uint64_t* _chain_hash        # its chained hash (0 at the root)
    # per sequence [max_seqs, max_pages_per_seq]: the chain's page and its generation at
    # every registered block, so truncate can resume the chain from any kept block
    cdef int32_t _width
    cdef page_id_t* _history_page
    cdef uint32_t* _history_gen
    # query statistics
    cdef int64_t _queries, _queried_tokens, _hit_tokens
    cdef object _owners

    # per sequence: its retention (priority, duration ns) and up to MAX_RETENTION_RANGES
    # token ranges [start, end) with their own ([max_seqs, MAX_RETENTION_RANGES])
    cdef int32_t* _seq_prio
    cdef int64_t* _seq_dur
    cdef int32_t* _num_ranges
    cdef int64_t* _rng_start
    cdef int64_t* _rng_end
    cdef int32_t* _rng_prio
    cdef int64_t* _rng_dur

    cdef void _block_retention(self, int64_t seq_id, int64_t block, int32_t* prio,
                               int64_t* dur, int32_t* floor) noexcept nogil
    cdef void _register_companion(self, int32_t group, page_id_t page, page_id_t anchor_page,
                                  int64_t namespace, int32_t prio, int64_t dur,
                                  int32_t floor) noexcept nogil
    cdef void offload(self, page_id_t page) noexcept nogil
    cdef void _carry_retention(self, PageAllocator src_alloc, page_id_t src,
                               PageAllocator dst_alloc, page_id_t dst) noexcept nogil


cdef PrefixCache new_prefix_cache(PageAllocator allocator, int32_t page_size, int32_t max_seqs,
                                  int32_t max_pages_per_seq, object hash_bits,
                                  object event_capacity, PageAllocator host_allocator,
                                  object hash_algorithm=*)
