# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Host bookkeeping of kvcore: the per-sequence page tables.

The host core is four extension modules, one job each, with ``.pxd`` files as the walls
between them: ``_args`` (the shared argument checkers), ``_allocator``
(``PageAllocator``), ``_prefix`` (every piece of prefix-cache state) and this one
(``PageTable``). ``PageTable`` reaches the allocator and the prefix cache only through
the cdef doors their ``.pxd`` files declare. This module also keeps the public names
other code imports from ``kvcore._core``.

All state lives in C arrays (owned by NumPy arrays created once at construction);
the hot loops run in C. Every public method validates its arguments completely
before it changes anything, so a call that raises leaves the state exactly as it
was. No method releases the GIL while it mutates, so each call is atomic with
respect to other Python threads.
"""

from collections import namedtuple
import operator

import numpy as np

cimport cython
cimport numpy as cnp
from libc.stdint cimport INT32_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from kvcore._allocator cimport MAX_PRIORITY, PageAllocator
from kvcore._args cimport (
    empty_int32,
    empty_int64,
    int64_array,
    int_arg,
    is_fast_int64,
    page_arg,
    positive_int32,
    readonly_view,
    token_array,
)
from kvcore._prefix cimport MAX_RETENTION_RANGES, PrefixCache, PrefixHooks, new_prefix_cache
from kvcore._typedefs cimport NO_PAGE, page_id_t, seq_id_t, slot_t

from kvcore._args import first_slot_out_of_range
from kvcore.errors import (
    CapacityError,
    KVCoreError,
    OutOfPagesError,
    RefcountError,
    RollbackError,
    SequenceStateError,
    TransferPendingError,
    UnknownSequenceError,
)
from kvcore.groups import LayerGroup, group_codes
from kvcore.retention import retention_arg

cnp.import_array()

cdef extern from *:
    """
    #if defined(__clang__)
    #define KVCORE_COMPILER "clang " __clang_version__
    #elif defined(__GNUC__)
    #define KVCORE_COMPILER "gcc " __VERSION__
    #elif defined(_MSC_VER)
    #define KVCORE_COMPILER "msvc"
    #else
    #define KVCORE_COMPILER "unknown compiler"
    #endif
    """
    const char* KVCORE_COMPILER
    long CYTHON_HEX_VERSION


def _cython_version(long hex_version):
    return f"{hex_version >> 24}.{(hex_version >> 16) & 0xFF}.{(hex_version >> 8) & 0xFF}"


#: The Cython and C compiler that built this extension (``kvcore info`` shows them).
CYTHON_VERSION = _cython_version(CYTHON_HEX_VERSION)
COMPILER = KVCORE_COMPILER.decode()

__all__ = ["AppendResult", "PageAllocator", "PageTable"]

# The cimport above makes PageAllocator a C-level name only; publish it here too, since
# code imports it from kvcore._core.
globals()["PageAllocator"] = PageAllocator

# PageAllocator lives in _allocator; its docstring examples are run with this module's.
__test__ = {"PageAllocator": PageAllocator}

# ``module`` because namedtuple would otherwise record the caller frame's module,
# which a Cython module does not have: pickle must find the class here.
AppendResult = namedtuple("AppendResult", ["slot_mapping", "copy_src", "copy_dst"],
                          module="kvcore._core")
AppendResult.__doc__ = """What :meth:`PageTable.append` did.

Attributes
----------
slot_mapping : numpy.ndarray of int64, shape [sum(num_new_tokens)]
    Slot of every new token, sequence by sequence in call order, tokens in order.
copy_src, copy_dst : numpy.ndarray of int32, shape [num_copies]
    Copy-on-write page pairs: the device must copy page ``copy_src[i]`` to
    ``copy_dst[i]`` (every layer, K and V) *before* writing the new tokens.
"""

# namedtuple's own __new__ is a Python function (~0.5 us); tuple.__new__ builds the
# same object directly, as namedtuple._make does.
cdef object _new_tuple = tuple.__new__



# --------------------------------------------------------------------------------------
# Page arithmetic
# --------------------------------------------------------------------------------------

cdef inline int64_t _ceil_div(int64_t a, int64_t b) noexcept nogil:
    return (a + b - 1) // b


# Token positions are < 2**31, so page arithmetic runs on uint32 (a 64-bit division
# costs several times a 32-bit one), and on shifts and masks when page_size is a power
# of two: ``shift`` is log2(page_size) then, else -1.

cdef inline uint32_t _div(uint32_t a, uint32_t ps, int shift) noexcept nogil:
    return a >> shift if shift >= 0 else a // ps


cdef inline uint32_t _mod(uint32_t a, uint32_t ps, int shift) noexcept nogil:
    return a & (ps - 1) if shift >= 0 else a % ps


cdef inline uint32_t _num_pages_for(uint32_t num_tokens, uint32_t ps, int shift) noexcept nogil:
    """Pages that hold ``num_tokens`` tokens: ceil(num_tokens / page_size)."""
    return _div(num_tokens + ps - 1, ps, shift)


# What PageTable.seq_state says of each SEQ_* state (_core.pxd); DOOMED ids are unknown.
_STATE_NAMES = ("free", "resident", "swapped", "swapping_out", "swapping_in", "removed")

# Group kinds (kvcore.groups.GROUP_*).
cdef enum:
    _FULL = 0
    _WINDOW = 1
    _STATE = 2


cdef inline int64_t _window_start(int64_t length, int64_t window, int64_t ps) noexcept nogil:
    """First column a window group still needs at ``length`` tokens: the next token
    attends to the ``window - 1`` before it, so page ``j`` is dead once
    ``(j + 1) * page_size <= length - window + 1``."""
    cdef int64_t first_needed = length - window + 1
    return first_needed // ps if first_needed > 0 else 0


cdef int _log2_or_minus_one(int32_t n):
    cdef int shift = 0
    if n & (n - 1):
        return -1
    while (1 << shift) != n:
        shift += 1
    return shift


# --------------------------------------------------------------------------------------
# PageTable
# --------------------------------------------------------------------------------------

cdef bint _ndim_is_zero(object obj):
    """Whether ``obj`` reads as a 0-d value; False when reading it raises (a caller's
    ``__array__`` may raise anything: ``int64_array`` then reports it as a TypeError)."""
    try:
        return np.ndim(obj) == 0
    except Exception:
        return False


cdef class _RowCheck:
    """Counts one tier's table references for ``check_invariants`` and checks each row:
    pages in range where the row is valid, -1 elsewhere, a page in one group only and
    at most once per row; then compares the counts with the allocator's refcounts."""

    cdef PageAllocator alloc
    cdef str tier
    cdef object refs, owner, last_row

    def __cinit__(self, PageAllocator alloc, str tier):
        self.alloc = alloc
        self.tier = tier
        self.refs = np.zeros(alloc.page_count(), dtype=np.int64)
        self.owner = np.full(alloc.page_count(), -1, dtype=np.int32)
        self.last_row = np.full(alloc.page_count(), -1, dtype=np.int64)

    cdef int row(self, const page_id_t* row, int64_t width, int64_t s, int32_t g,
                 int64_t length, int64_t lo, int64_t hi, bint sparse=False) except -1:
        """Check one row; ``sparse``: entries in ``[lo, hi)`` may be -1 too (the host row
        of a prefix load maps only its host hits)."""
        cdef int64_t[::1] refs = self.refs
        cdef int32_t[::1] owner = self.owner
        cdef int64_t[::1] last_row = self.last_row
        cdef int32_t num_pages = self.alloc.page_count()
        cdef int64_t c, key = (<int64_t>g << 32) | s
        cdef page_id_t page
        for c in range(width):
            page = row[c]
            if lo <= c < hi and not (sparse and page == NO_PAGE):
                if page < 0 or page >= num_pages:
                    raise KVCoreError(f"seq_id {s} position {c} of group {g} maps {self.tier} "
                                      f"page {page}, outside the pool")
                refs[page] += 1
                if owner[page] != -1 and owner[page] != g:
                    raise KVCoreError(f"{self.tier} page {page} is mapped in groups "
                                      f"{owner[page]} and {g}")
                if last_row[page] == key:
                    raise KVCoreError(f"seq_id {s} maps {self.tier} page {page} twice in "
                                      f"group {g}")
                owner[page] = g
                last_row[page] = key
            elif page != NO_PAGE:
                raise KVCoreError(
                    f"seq_id {s} of {length} tokens maps {self.tier} page {page} at position "
                    f"{c} of group {g}, outside its mapped columns [{lo}, {hi})")
        return 0

    cdef int refcounts(self, PrefixHooks prefix=None) except -1:
        """Compare with the allocator; ``prefix``: also count its write-backs' holds
        (host tier)."""
        cdef int64_t[::1] refs = self.refs
        cdef page_id_t page
        for page in range(self.alloc.page_count()):
            if prefix is not None and prefix.writeback_holds(page):
                refs[page] += 1
            if refs[page] != self.alloc.refs(page):
                raise KVCoreError(f"{self.tier} page {page} has refcount "
                                  f"{self.alloc.refs(page)} but {refs[page]} table references")
        return 0


@cython.final
cdef class _Retention:
    """A validated ``retention`` argument in C values, made before any state is read."""
    cdef int32_t priority, num_ranges
    cdef int64_t duration
    cdef int64_t starts[MAX_RETENTION_RANGES]
    cdef int64_t ends[MAX_RETENTION_RANGES]
    cdef int32_t priorities[MAX_RETENTION_RANGES]
    cdef int64_t durations[MAX_RETENTION_RANGES]

    def __cinit__(self, retention):
        priority, duration, starts, ends, priorities, durations = \
            retention_arg(retention)._core_args()
        # Checked again where C arrays are indexed with them (retention_arg validated).
        if not (0 <= priority <= MAX_PRIORITY and duration >= 0
                and len(starts) <= MAX_RETENTION_RANGES
                and all(0 <= p <= MAX_PRIORITY for p in priorities)
                and all(d >= 0 for d in durations)
                and all(0 <= a < b <= 2**62 for a, b in zip(starts, ends, strict=True))):
            raise ValueError(f"invalid retention {retention!r}")
        self.priority, self.duration, self.num_ranges = priority, duration, len(starts)
        cdef int32_t i
        for i in range(self.num_ranges):
            self.starts[i], self.ends[i] = starts[i], ends[i]
            self.priorities[i], self.durations[i] = priorities[i], durations[i]

    cdef inline void apply(self, PrefixHooks prefix, int64_t seq_id) noexcept nogil:
        prefix.set_retention(seq_id, self.priority, self.duration, self.num_ranges,
                             self.starts, self.ends, self.priorities, self.durations)


cdef _Retention _DEFAULT_RETENTION = _Retention(None)


cdef class PageTable:
    """Per-sequence page tables and lengths over one :class:`PageAllocator`.

    Parameters
    ----------
    allocator : PageAllocator
        Where pages come from. The table assumes it is the allocator's only user
        (``check_invariants`` compares refcounts with table references).
    page_size : int
        Tokens per page, ``>= 1``.
    max_seqs : int
        Sequence slots; seq ids are rows ``0 .. max_seqs - 1`` of ``block_table``.
    max_pages_per_seq : int
        Columns of ``block_table``; ``max_pages_per_seq * page_size`` must fit int32.
    enable_prefix_cache : bool, keyword-only
        Reuse full pages across sequences with equal token prefixes (see
        :meth:`add_sequence`). Attaches a prefix index to ``allocator``, which may serve
        only one prefix-caching table.
    prefix_hash_bits : int, keyword-only
        Bits of the 64-bit page hash that are kept. Only for tests: fewer bits make
        collisions common, which lookups must (and do) survive, since every hit is
        verified exactly.
    prefix_event_capacity : int, keyword-only
        Events kept for :meth:`take_events`; older ones are dropped and counted.
    prefix_hash : {"fast", "sha256"}, keyword-only
        The page identity's hash (``docs/prefix_cluster.md``): ``"fast"`` (splitmix64
        mixing, the default) or ``"sha256"``, a SHA-256 chain over the parent's full
        digest, the namespace and the tokens, for routers that need a cryptographic
        hash; its first 8 bytes are the 64-bit hash events carry. Both reproduce in
        Python (``kvcore.page_hash``); every hit is verified token for token in both.
    groups : sequence of LayerGroup, keyword-only
        Layer groups (full attention, sliding window, state pages; see
        ``docs/groups.md``), each with its own rows over the one allocator; default one
        full-attention group. Only the kinds matter here, not the layers.
    host_allocator : PageAllocator, keyword-only
        The host tier's pages (see :class:`kvcore.HostTier`, which moves sequences
        between the tiers); None, the default, means no host tier. Like ``allocator``
        it must serve this table only.

    Notes
    -----
    Memory representation: ``block_table`` is an int32 C array
    ``[max_seqs, max_pages_per_seq]``, ``-1`` where unmapped; ``seq_lens`` an int32
    C array ``[max_seqs]``. With ``page_size`` 16, a sequence of 45 tokens maps
    ``ceil(45 / 16) = 3`` pages, say ``[7, 2, 9, -1, ...]``; its token 40 lives at
    slot ``9 * 16 + 40 % 16 = 152`` and its ``last_page_len`` is ``45 - 2 * 16 = 13``.

    Invariants (checked by :meth:`check_invariants`, which also checks the allocator's):

    - in a full-attention group, an active sequence of ``n`` tokens maps exactly
      ``ceil(n / page_size)`` pages in columns ``0 ..``, each in use, and ``-1`` after
      (a window group: ``-1`` before its first live column too; a state group: its
      ``state_pages`` pages once ``n > 0``); an inactive row is all ``-1`` with length 0;
    - a page is mapped by one group only, and at most once in a row;
    - every page's refcount equals the number of block-table entries that map it;
    - each seq id is either active or on the free seq-id stack, never both.

    Examples
    --------
    >>> table = PageTable(PageAllocator(64), page_size=16, max_seqs=8, max_pages_per_seq=8)
    >>> seq = table.add_sequence()
    >>> int(table.append([seq], [45]).slot_mapping[-1])
    44
    >>> table.flashinfer_metadata([seq])
    (array([0, 3], dtype=int32), array([0, 1, 2], dtype=int32), array([13], dtype=int32))
    """

    def __cinit__(self, PageAllocator allocator not None, page_size, max_seqs, max_pages_per_seq,
                  *, enable_prefix_cache=False, prefix_hash_bits=64,
                  prefix_event_capacity=65536, groups=None, host_allocator=None,
                  prefix_hash="fast"):
        cdef int32_t ps = positive_int32(page_size, "page_size")
        cdef int32_t ms = positive_int32(max_seqs, "max_seqs")
        if not (isinstance(prefix_hash, str) and prefix_hash in ("fast", "sha256")):
            raise ValueError(f"prefix_hash must be 'fast' or 'sha256', got {prefix_hash!r}")
        cdef int32_t mp = positive_int32(max_pages_per_seq, "max_pages_per_seq")
        if not isinstance(enable_prefix_cache, (bool, np.bool_)):   # as KVCacheConfig
            raise TypeError(f"enable_prefix_cache must be a bool, got "
                            f"{type(enable_prefix_cache).__name__}")
        if <int64_t>mp * ps > INT32_MAX:
            raise ValueError(
                f"max_pages_per_seq * page_size = {<int64_t>mp * ps} tokens exceeds {INT32_MAX}")
        group_list, kinds, windows, states = group_codes(
            [LayerGroup()] if groups is None else groups)
        if int(states.max()) > mp:
            raise ValueError(f"a state group's state_pages ({int(states.max())}) exceeds "
                             f"max_pages_per_seq ({mp})")
        if bool(enable_prefix_cache) and (kinds == _STATE).any():
            raise ValueError("prefix caching cannot serve a state group: a recurrent state "
                             "cannot be shared by a prefix hit without a snapshot")
        if host_allocator is not None and not isinstance(host_allocator, PageAllocator):
            raise TypeError(f"host_allocator must be a PageAllocator or None, got "
                            f"{type(host_allocator).__name__}")
        if host_allocator is not None and host_allocator is allocator:
            raise ValueError("host_allocator must be a second PageAllocator, not allocator")
        self.allocator = allocator
        self._page_size = ps
        self._page_shift = _log2_or_minus_one(ps)
        self._max_seqs = ms
        self._max_pages_per_seq = mp
        self._num_seqs = 0
        cdef int32_t ng = <int32_t>len(group_list)
        table = np.full((ng, ms, mp), NO_PAGE, dtype=np.int32)
        seq_lens = np.zeros(ms, dtype=np.int32)
        active = np.zeros(ms, dtype=np.uint8)
        free_seqs = np.arange(ms - 1, -1, -1, dtype=np.int32)
        seen = np.zeros(ms, dtype=np.int32)
        cow_pending = np.zeros(allocator.page_count(), dtype=np.int32)
        release_pending = np.zeros(allocator.page_count(), dtype=np.int32)
        touched = np.zeros(2 * allocator.page_count(), dtype=np.int32)
        first_live = np.zeros((ng, ms), dtype=np.int32)
        scratch = np.zeros(2 * ms, dtype=np.int64)
        self._owners = (table, seq_lens, active, free_seqs, seen, cow_pending, release_pending,
                        touched, first_live, kinds, windows, states, scratch)
        self._scratch = <int64_t*>cnp.PyArray_DATA(scratch)
        self._num_groups = ng
        self._groups = group_list
        self._kind = <int32_t*>cnp.PyArray_DATA(kinds)
        self._window = <int32_t*>cnp.PyArray_DATA(windows)
        self._state_pages = <int32_t*>cnp.PyArray_DATA(states)
        self._first_live = <int32_t*>cnp.PyArray_DATA(first_live)
        self._release_pending = <int32_t*>cnp.PyArray_DATA(release_pending)
        self._touched = <page_id_t*>cnp.PyArray_DATA(touched)
        self._group_stride = <int64_t>ms * mp
        self._has_state = bool((kinds == _STATE).any())
        self._has_window = bool((kinds == _WINDOW).any())
        self._has_kv = bool((kinds != _STATE).any())
        # The anchor: the first full-attention group, else group 0 (docs/groups.md).
        full_groups = np.flatnonzero(kinds == _FULL)
        self._anchor = int(full_groups[0]) if len(full_groups) else 0
        self._max_copies_per_seq = int((kinds != _STATE).sum()) + int(states.sum())
        self._table = <page_id_t*>cnp.PyArray_DATA(table)
        self._seq_lens = <int32_t*>cnp.PyArray_DATA(seq_lens)
        self._active = <uint8_t*>cnp.PyArray_DATA(active)
        self._free_seqs = <seq_id_t*>cnp.PyArray_DATA(free_seqs)
        self._num_free_seqs = ms
        self._seen = <int32_t*>cnp.PyArray_DATA(seen)
        self._stamp = 0
        self._cow_pending = <int32_t*>cnp.PyArray_DATA(cow_pending)
        self._group_views = tuple(readonly_view(table[g]) for g in range(ng))
        self._block_table_view = self._group_views[0]
        self._seq_lens_view = readonly_view(seq_lens)
        # The one place that decides whether prefix caching is on: every other use of
        # self._prefix goes through its doors, which do nothing on a plain PrefixHooks.
        # Evicted prefix pages are offloaded to the host tier when there is one and the
        # table has one full-attention group (docs/host_tier.md says why not otherwise).
        self._prefix = (new_prefix_cache(allocator, ps, ms, mp, prefix_hash_bits,
                                         prefix_event_capacity,
                                         host_allocator if ng == 1 and kinds[0] == _FULL
                                         else None, prefix_hash)
                        if bool(enable_prefix_cache) else PrefixHooks())
        self._version = 0
        self.host_allocator = host_allocator
        self._num_doomed = 0
        self._host_table = NULL
        loading = np.zeros(ms, dtype=np.uint8)
        self._loading = <uint8_t*>cnp.PyArray_DATA(loading)
        self._owners += (loading,)
        if host_allocator is not None:
            host_table = np.full((ng, ms, mp), NO_PAGE, dtype=np.int32)
            self._owners += (host_table,)
            self._host_table = <page_id_t*>cnp.PyArray_DATA(host_table)

    def __repr__(self):
        groups = "" if self._num_groups == 1 else f"num_groups={self._num_groups}, "
        return (f"PageTable(page_size={self._page_size}, max_seqs={self._max_seqs}, "
                f"max_pages_per_seq={self._max_pages_per_seq}, num_seqs={self._num_seqs}, "
                f"{groups}allocator={self.allocator!r})")

    # -- properties ------------------------------------------------------------------------

    @property
    def page_size(self):
        """int: tokens per page."""
        return self._page_size

    @property
    def max_seqs(self):
        """int: sequence slots (rows of ``block_table``)."""
        return self._max_seqs

    @property
    def max_pages_per_seq(self):
        """int: columns of ``block_table``."""
        return self._max_pages_per_seq

    @property
    def num_seqs(self):
        """int: active sequences."""
        return self._num_seqs

    @property
    def block_table(self):
        """numpy.ndarray of int32, shape [max_seqs, max_pages_per_seq]: read-only view of
        group 0's table, -1 unmapped."""
        return self._block_table_view

    @property
    def num_groups(self):
        """int: layer groups (1 unless made with ``groups``)."""
        return self._num_groups

    @property
    def groups(self):
        """tuple of LayerGroup: the groups (one full-attention group by default)."""
        return self._groups

    def group_block_table(self, group):
        """Read-only int32 view ``[max_seqs, max_pages_per_seq]`` of ``group``'s table:
        -1 unmapped, and before :meth:`first_page` in a window group."""
        return self._group_views[self._group_arg(group)]

    cdef int32_t _group_arg(self, object group) except -1:
        cdef int64_t g = int_arg(group, "group")
        if g < 0 or g >= self._num_groups:
            raise IndexError(f"group {g} out of range [0, {self._num_groups})")
        return <int32_t>g

    cdef void _live_cols(self, int32_t g, int64_t s, int64_t* lo, int64_t* hi) noexcept nogil:
        """Columns ``[lo, hi)`` of ``s``'s row in group ``g`` that map pages."""
        cdef uint32_t n = <uint32_t>self._seq_lens[s]
        if self._kind[g] == _STATE:
            lo[0] = 0
            hi[0] = self._state_pages[g] if n > 0 else 0
        else:
            lo[0] = self._first_live[<int64_t>g * self._max_seqs + s]
            hi[0] = _num_pages_for(n, <uint32_t>self._page_size, self._page_shift)

    @property
    def seq_lens(self):
        """numpy.ndarray of int32, shape [max_seqs]: read-only view of every row's length."""
        return self._seq_lens_view

    # -- validation helpers ----------------------------------------------------------------

    cdef int64_t _seq_arg(self, object seq_id) except -1:
        return self._active_arg(int_arg(seq_id, "seq_id"))

    cdef int64_t _active_arg(self, int64_t s) except -1:
        """``s`` when it is a resident sequence; else raise (see ``_raise_state``)."""
        if s < 0 or s >= self._max_seqs or self._active[s] != SEQ_RESIDENT:
            self._raise_state(s)
        return s

    cdef int64_t _live_arg(self, int64_t s) except -1:
        """``s`` when it is an active sequence in either tier; else UnknownSequenceError."""
        if s < 0 or s >= self._max_seqs or not SEQ_RESIDENT <= self._active[s] <= SEQ_ARRIVING:
            raise UnknownSequenceError(f"seq_id {s} is not active")
        return s

    cdef int _raise_state(self, int64_t s, str wanted="resident") except -1:
        """Raise the error that says why ``s`` is not in state ``wanted``."""
        if s < 0 or s >= self._max_seqs or not SEQ_RESIDENT <= self._active[s] <= SEQ_ARRIVING:
            raise UnknownSequenceError(f"seq_id {s} is not active")
        state = _STATE_NAMES[self._active[s]]
        if self._active[s] == SEQ_LEAVING or self._active[s] == SEQ_ARRIVING:
            raise TransferPendingError(
                s, state, f"seq_id {s} is {state.replace('_', ' ')}: its transfer is in "
                "flight; call poll() or wait() until it has completed")
        if wanted == "resident":
            raise SequenceStateError(
                s, state, f"seq_id {s} is swapped out to the host tier; swap_in() it first")
        raise SequenceStateError(s, state, f"seq_id {s} is {state}, not {wanted}")

    cdef int _check_active(self, const int64_t* seq_ids, Py_ssize_t batch,
                           bint allow_duplicates) except -1:
        """Raise unless every seq id is resident (and, unless allowed, distinct).

        Distinctness uses stamps: ``_seen[s] == stamp`` means s was already seen in this
        call, so nothing has to be cleared between calls.
        """
        cdef Py_ssize_t i
        cdef int64_t s
        cdef int64_t max_seqs = self._max_seqs
        cdef const uint8_t* active = self._active
        cdef int32_t* seen = self._seen
        cdef int32_t stamp
        if allow_duplicates:
            for i in range(batch):
                s = seq_ids[i]
                if s < 0 or s >= max_seqs or active[s] != SEQ_RESIDENT:
                    self._raise_state(s)
            return 0
        if self._stamp == INT32_MAX:
            (<cnp.ndarray>self._owners[4])[:] = 0
            self._stamp = 0
        self._stamp += 1
        stamp = self._stamp   # a local: stores into seen[] could otherwise alias it
        for i in range(batch):
            s = seq_ids[i]
            if s < 0 or s >= max_seqs or active[s] != SEQ_RESIDENT:
                self._raise_state(s)
            if seen[s] == stamp:
                raise ValueError(f"seq_ids holds seq_id {s} more than once")
            seen[s] = stamp
        return 0

    cdef int64_t _check_batch(self, const int64_t* seq_ids, const int64_t* counts,
                              Py_ssize_t batch) except -1:
        """Validate an append batch against the state: active, distinct seq ids, and no
        sequence past ``max_pages_per_seq * page_size``. Creates no Python object unless
        it raises (see :meth:`append` for why that matters)."""
        cdef Py_ssize_t i
        cdef int64_t s, new_len
        cdef int64_t max_tokens = <int64_t>self._max_pages_per_seq * self._page_size
        cdef const int32_t* lens = self._seq_lens
        self._check_active(seq_ids, batch, False)
        for i in range(batch):
            s = seq_ids[i]
            new_len = lens[s] + counts[i]
            if new_len > max_tokens:
                raise CapacityError(
                    f"seq_id {s} would hold {new_len} tokens, more than max_pages_per_seq * "
                    f"page_size = {self._max_pages_per_seq} * {self._page_size} = {max_tokens}")
        return 0

    cdef int64_t _count_new_pages(self, const int64_t* seq_ids, const int64_t* counts,
                                  Py_ssize_t batch, int64_t* num_copies,
                                  int64_t* num_freed) noexcept nogil:
        """Pages an (already validated) append would allocate, copy-on-write included, in
        every group; ``num_freed`` gets the pages its window releases free first.

        Replays the call without touching refcounts, in its order: first every window
        release (``_release_pending[p]``: references to page ``p`` the releases drop),
        then the copy-on-write decisions (``_cow_pending[p]``: sharers of ``p`` that
        already copied away from it earlier in the batch). A page's live references at
        a decision are ``refs - released - pending``: a release can leave a shared
        partial page with one owner, who then writes in place. Both scratch arrays are
        zeroed again (through the ``_touched`` list) before returning.
        """
        cdef Py_ssize_t i
        cdef int64_t s, total = 0, copies = 0, freed = 0, num_touched = 0, c, lo, hi
        cdef int32_t g, kind
        cdef uint32_t cur, new_len
        cdef page_id_t page
        cdef uint32_t ps = <uint32_t>self._page_size
        cdef int shift = self._page_shift
        cdef int32_t* pending = self._cow_pending
        cdef int32_t* released = self._release_pending
        cdef page_id_t* touched = self._touched
        cdef const int32_t* lens = self._seq_lens
        cdef const page_id_t* table
        cdef int64_t width = self._max_pages_per_seq
        if self._has_window:
            for g in range(self._num_groups):
                if self._kind[g] != _WINDOW:
                    continue
                table = self._table + g * self._group_stride
                for i in range(batch):
                    if counts[i] == 0:
                        continue
                    s = seq_ids[i]
                    lo = self._first_live[<int64_t>g * self._max_seqs + s]
                    hi = _window_start(lens[s], self._window[g], ps)
                    for c in range(lo, hi):
                        page = table[s * width + c]
                        if released[page] == 0:
                            touched[num_touched] = page
                            num_touched += 1
                        released[page] += 1
                        if released[page] == self.allocator.refs(page):
                            freed += 1
        for g in range(self._num_groups):
            kind = self._kind[g]
            table = self._table + g * self._group_stride
            for i in range(batch):
                if counts[i] == 0:
                    continue
                s = seq_ids[i]
                cur = <uint32_t>lens[s]
                if kind == _STATE:
                    if cur == 0:
                        total += self._state_pages[g]    # the state's pages, once
                        continue
                    for c in range(self._state_pages[g]):   # every token rewrites the state
                        page = table[s * width + c]
                        if self.allocator.refs(page) - released[page] - pending[page] > 1:
                            if pending[page] == 0 and released[page] == 0:
                                touched[num_touched] = page
                                num_touched += 1
                            pending[page] += 1
                            copies += 1
                    continue
                new_len = cur + <uint32_t>counts[i]
                total += _num_pages_for(new_len, ps, shift) - _num_pages_for(cur, ps, shift)
                if _mod(cur, ps, shift) != 0:
                    page = table[s * width + _div(cur, ps, shift)]
                    if self.allocator.refs(page) - released[page] - pending[page] > 1:
                        if pending[page] == 0 and released[page] == 0:
                            touched[num_touched] = page
                            num_touched += 1
                        pending[page] += 1
                        copies += 1
        for c in range(num_touched):
            pending[touched[c]] = 0
            released[touched[c]] = 0
        num_copies[0] = copies
        num_freed[0] = freed
        return total + copies

    cdef tuple _batch_args(self, object seq_ids, object num_new_tokens,
                           str name="num_new_tokens", bint lengths=False):
        """(seq ids int64 [B], counts int64 [B], sum of counts), checked without the state.

        ``lengths``: the counts are target lengths (``truncate``), so a value above a
        row's capacity is a ValueError (it exceeds any current length), not a
        CapacityError.
        """
        cdef cnp.ndarray sids = int64_array(seq_ids, "seq_ids")
        cdef cnp.ndarray counts
        if is_fast_int64(num_new_tokens):
            counts = <cnp.ndarray>num_new_tokens
        elif (type(num_new_tokens) is not list and type(num_new_tokens) is not tuple
                and (cnp.PyArray_NDIM(<cnp.ndarray>num_new_tokens) == 0
                     if isinstance(num_new_tokens, cnp.ndarray)
                     else hasattr(type(num_new_tokens), "__index__")
                     or _ndim_is_zero(num_new_tokens))):
            # One count for every sequence: checked as an integer, so 1.5 or True is the
            # TypeError of any integer argument, not a complaint about its shape.
            counts = np.full(cnp.PyArray_DIM(sids, 0),
                             int_arg(num_new_tokens[()] if isinstance(num_new_tokens, cnp.ndarray)
                                     else num_new_tokens, name), dtype=np.int64)
        else:
            counts = int64_array(num_new_tokens, name)
        cdef Py_ssize_t i, batch = cnp.PyArray_DIM(sids, 0)
        if batch != cnp.PyArray_DIM(counts, 0):
            raise ValueError(f"seq_ids and {name} differ in length: "
                             f"{batch} != {cnp.PyArray_DIM(counts, 0)}")
        # Checks that need no state; each count <= max_tokens (< 2**31) keeps the sum exact.
        cdef const int64_t* cp = <const int64_t*>cnp.PyArray_DATA(counts)
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef int64_t total = 0
        cdef int64_t max_tokens = <int64_t>self._max_pages_per_seq * self._page_size
        for i in range(batch):
            if cp[i] < 0:
                raise ValueError(f"{name}[{i}] is {cp[i]}, must be >= 0")
            if cp[i] > max_tokens and lengths:
                raise ValueError(f"{name}[{i}] is {cp[i]}, longer than any sequence can be")
            if cp[i] > max_tokens:
                raise CapacityError(
                    f"seq_id {sp[i]} would hold over {cp[i]} tokens, more than "
                    f"max_pages_per_seq * page_size = {self._max_pages_per_seq} * "
                    f"{self._page_size} = {max_tokens}")
            total += cp[i]
        return sids, counts, total

    # -- sequences -------------------------------------------------------------------------

    def add_sequence(self, tokens=None, *, namespace=0, retention=None):
        """Start a sequence and return its seq id; with prefix caching, map cached pages.

        Parameters
        ----------
        tokens : array_like of int, shape [n], optional
            The prompt's token ids (``[0, 2**31 - 1]``). With prefix caching on, the
            longest run of cached *full* pages that match them from the start, within
            ``namespace``, is mapped into the new sequence, leaving at least one token
            uncached: at most ``n - 1`` tokens, rounded down to whole pages.
            ``num_tokens(seq)`` then says how many are cached; append the rest (with
            their ``token_ids``). Ignored when prefix caching is off.
        namespace : int
            Tenant, adapter or cache salt: sequences of different namespaces never share
            cached pages.
        retention : int or Retention, optional
            Retention priority of the sequence's cached pages (0 .. 100, default 35),
            optionally for a limited time and per token range (:class:`Retention`):
            eviction takes the lowest priority first. Pages it hits keep at least this
            retention for their blocks. A fork inherits it. Ignored when prefix caching
            is off.

        Returns
        -------
        int
            The seq id, a row of ``block_table`` in ``[0, max_seqs)``.

        Raises
        ------
        CapacityError
            ``max_seqs`` sequences are active.
        ValueError, TypeError
            Bad ``tokens`` or ``namespace``. Nothing is changed on any error.

        Notes
        -----
        With page size 4 and a cached chain for tokens ``[5, 6, 7, 8, 9, 10, 11, 12]``,
        ``add_sequence([5, 6, 7, 8, 9, 10, 11, 12, 13])`` maps 2 pages (8 tokens) while
        ``add_sequence([5, 6, 7, 8, 9, 10, 11, 12])`` maps 1: the last token is always
        left to compute.
        """
        # Every argument is converted (running whatever user code that takes) and every
        # Python object made before the first read of the state; from that read to the
        # return only C runs, so no other thread and no re-entrant call can come between.
        cdef int64_t ns = int_arg(namespace, "namespace")
        cdef cnp.ndarray tok
        cdef int64_t s
        cdef _Retention ret = _DEFAULT_RETENTION if retention is None else _Retention(retention)
        if tokens is None or not self._prefix.enabled():   # tokens are ignored when off
            if self._num_free_seqs == 0:
                raise CapacityError(f"all {self._max_seqs} sequence slots are in use (by active "
                                    "sequences or removed ones whose transfer is in flight)")
            s = self._new_seq()
            ret.apply(self._prefix, s)
            self._prefix.seq_started(s, ns, NULL, 0)
            return s
        tok = token_array(tokens, "tokens")
        if tok is tokens:   # the caller's own array: another thread could write to it
            tok = cnp.PyArray_NewCopy(tok, cnp.NPY_CORDER)
        cdef const int32_t* tp = <const int32_t*>cnp.PyArray_DATA(tok)
        cdef int64_t n = cnp.PyArray_DIM(tok, 0)
        cdef int64_t max_hits = self._max_prefix_pages(n)
        # The anchor's hits, then each group's companions: [num_groups + 1, max_hits].
        # The anchor's hits, each group's companions, then fresh pages for host hits.
        cdef cnp.ndarray hits_arr = empty_int32(max_hits * (self._num_groups + 2))
        cdef page_id_t* hits = <page_id_t*>cnp.PyArray_DATA(hits_arr)
        cdef page_id_t* companions = hits + max_hits
        cdef page_id_t* fresh = hits + max_hits * (self._num_groups + 1)
        # The critical part starts here. Look up first (nothing changes), then map.
        if self._num_free_seqs == 0:
            raise CapacityError(f"all {self._max_seqs} sequence slots are in use (by active "
                                    "sequences or removed ones whose transfer is in flight)")
        cdef int64_t i, lo, num_hits = self._prefix.lookup(tp, max_hits, ns, hits)
        cdef int32_t g
        cdef page_id_t page
        cdef page_id_t* row
        if self._num_groups > 1 and num_hits > 0:
            num_hits = self._resolve_hits(tp, num_hits, ns, hits, companions, max_hits)
        cdef PageAllocator alloc = self.allocator
        cdef int32_t num_device = alloc.page_count()
        cdef int64_t num_host_hits = self._host_hits(hits, num_hits)
        if num_host_hits:
            num_hits = self._servable_hits(hits, num_hits, num_host_hits, &num_host_hits)
        for g in range(self._num_groups):
            lo = self._hit_start(g, num_hits)
            for i in range(lo, num_hits):
                page = hits[i] if g == self._anchor else companions[g * max_hits + i]
                if page >= num_device:
                    if self.host_allocator.refs(page - num_device) == INT32_MAX:
                        raise RefcountError(f"refcount of host page {page - num_device} "
                                            "would overflow int32")
                elif alloc.refs(page) == INT32_MAX:
                    raise RefcountError(f"refcount of page {page} would overflow int32")
        s = self._new_seq()
        if num_host_hits:   # one group only (host hits come from offloads, docs/host_tier.md)
            self._map_host_hits(s, hits, num_hits, num_host_hits, fresh)
        else:
            for g in range(self._num_groups):
                row = self._table + g * self._group_stride + s * self._max_pages_per_seq
                lo = self._hit_start(g, num_hits)
                self._first_live[<int64_t>g * self._max_seqs + s] = <int32_t>lo
                for i in range(lo, num_hits):
                    page = hits[i] if g == self._anchor else companions[g * max_hits + i]
                    row[i] = page
                    alloc.add_ref(page)
        self._seq_lens[s] = <int32_t>(num_hits * self._page_size)
        ret.apply(self._prefix, s)
        self._prefix.seq_started(s, ns, hits, num_hits)
        if self._num_groups > 1:   # companions keep the request's retention too
            for g in range(self._num_groups):
                if g != self._anchor:
                    for i in range(self._hit_start(g, num_hits), num_hits):
                        page = companions[g * max_hits + i]
                        if page != NO_PAGE and page < num_device:
                            self._prefix.companion_hit(s, i, page)
        self._prefix.count_query(n, num_hits * self._page_size)
        return s

    def match_prefix(self, tokens, *, namespace=0):
        """Return how many leading tokens of ``tokens`` are cached; change nothing.

        A side-effect-free probe of the prefix cache: the number it returns is exactly
        ``num_tokens(seq)`` after ``seq = add_sequence(tokens, namespace=namespace)`` on
        the same state, that is ``k * page_size`` for the longest run of ``k`` leading
        full pages cached in ``namespace``, with ``k <= (n - 1) // page_size`` (at least
        one token is left uncached; 0 for an empty prompt) and ``k <= max_pages_per_seq``.

        Parameters
        ----------
        tokens : array_like of int, shape [n]
            Token ids in ``[0, 2**31 - 1]``; validated as by :meth:`add_sequence`, also
            when prefix caching is off.
        namespace : int
            As for :meth:`add_sequence`.

        Returns
        -------
        int
            Cached leading tokens, a multiple of ``page_size`` in ``[0, n)`` (0 when
            ``n == 0``); always 0 when prefix caching is off.

        Raises
        ------
        ValueError, TypeError
            Bad ``tokens`` or ``namespace`` (the errors of :meth:`add_sequence`).

        Notes
        -----
        Nothing changes: no page is taken or referenced, the evictable list keeps its
        order, and ``prefix_stats`` and the events are untouched. Unlike
        :meth:`add_sequence` it needs no free sequence slot and does not check
        refcount overflow. With page size 4 and a cached chain for
        ``[5, 6, 7, 8, 9, 10, 11, 12]``, ``match_prefix([5, 6, 7, 8, 9, 10, 11, 12, 13])``
        is 8 and ``match_prefix([5, 6, 7, 8, 9, 10, 11, 12])`` is 4.
        """
        cdef int64_t ns = int_arg(namespace, "namespace")
        cdef cnp.ndarray tok = token_array(tokens, "tokens")
        cdef int64_t n = cnp.PyArray_DIM(tok, 0)
        cdef const int32_t* tp = <const int32_t*>cnp.PyArray_DATA(tok)
        cdef int64_t max_hits = self._max_prefix_pages(n), num_hits
        if self._num_groups == 1 or not self._prefix.enabled():
            return self._prefix.lookup(tp, max_hits, ns, NULL) * self._page_size
        cdef cnp.ndarray hits_arr = empty_int32(max_hits * (self._num_groups + 1))
        cdef page_id_t* hits = <page_id_t*>cnp.PyArray_DATA(hits_arr)
        num_hits = self._prefix.lookup(tp, max_hits, ns, hits)
        if num_hits > 0:
            num_hits = self._resolve_hits(tp, num_hits, ns, hits, hits + max_hits, max_hits)
        return num_hits * self._page_size

    cdef int64_t _host_hits(self, const page_id_t* hits, int64_t num_hits) noexcept nogil:
        """How many of the (anchor) hits are host-tier entries (ids past the device's)."""
        cdef int64_t i, n = 0
        cdef int32_t num_device = self.allocator.page_count()
        if self.host_allocator is None:
            return 0
        for i in range(num_hits):
            n += hits[i] >= num_device
        return n

    cdef int64_t _servable_hits(self, const page_id_t* hits, int64_t num_hits,
                                int64_t num_host_hits, int64_t* host_hits_kept) noexcept nogil:
        """The hit cut where fresh device pages for its host hits run out: every host hit
        needs one, and the device hits about to be referenced are not free for it."""
        cdef int64_t i, idle = 0
        cdef int32_t num_device = self.allocator.page_count()
        for i in range(num_hits):
            if hits[i] < num_device and self.allocator.refs(hits[i]) == 0:
                idle += 1       # evictable now, but the hit will reference it
        if num_host_hits <= self.allocator.free_count() - idle:
            host_hits_kept[0] = num_host_hits
            return num_hits
        for i in range(num_hits):   # keep the device hits before the first host one
            if hits[i] >= num_device:
                host_hits_kept[0] = 0
                return i
        return num_hits

    cdef void _map_host_hits(self, int64_t s, const page_id_t* hits, int64_t num_hits,
                             int64_t num_host_hits, page_id_t* fresh) noexcept nogil:
        """Map the host hits of new sequence ``s``: a fresh device page each (taken after
        the device hits are referenced, so none of them is evicted), the host page held
        in its host row until the copy arrives; ``s`` is arriving until then."""
        cdef int64_t i, k = 0
        cdef int32_t num_device = self.allocator.page_count()
        cdef page_id_t* row = self._table + s * self._max_pages_per_seq
        cdef page_id_t* host_row = self._host_table + s * self._max_pages_per_seq
        for i in range(num_hits):   # hold the host pages first: offloads may take others
            if hits[i] >= num_device:
                host_row[i] = hits[i] - num_device
                self.host_allocator.add_ref(hits[i] - num_device)
            else:
                row[i] = hits[i]
                self.allocator.add_ref(hits[i])
        self.allocator.take(fresh, <int32_t>num_host_hits)
        for i in range(num_hits):
            if hits[i] >= num_device:
                row[i] = fresh[k]
                self._prefix.page_loaded(hits[i], fresh[k])
                k += 1
        self._active[s] = SEQ_ARRIVING
        self._loading[s] = 1

    cdef int64_t _hit_start(self, int32_t g, int64_t num_hits) noexcept nogil:
        """First column group ``g`` maps for a prefix hit of ``num_hits`` pages."""
        if self._kind[g] == _WINDOW:
            return _window_start(num_hits * self._page_size, self._window[g], self._page_size)
        return 0

    cdef int64_t _resolve_hits(self, const int32_t* tokens, int64_t num_hits, int64_t namespace,
                               const page_id_t* hits, page_id_t* companions,
                               int64_t stride) noexcept nogil:
        """The longest hit, at most ``num_hits`` anchor pages, for which every other group
        has the companion pages its attention needs; they go to
        ``companions[g * stride + j]``.

        A hit of ``k`` pages needs, in group ``g``, blocks ``[_hit_start(g, k), k)``. A
        missing block ``b`` rules out every ``k > b`` whose range holds it, so the next
        candidate is ``k = b``.
        """
        cdef int64_t k = num_hits, j, bad
        cdef int32_t g
        cdef page_id_t page
        while k > 0:
            bad = -1
            for g in range(self._num_groups):
                if g == self._anchor:
                    continue
                j = k - 1
                while j >= self._hit_start(g, k):
                    page = self._prefix.find_companion(g, hits[j], tokens + j * self._page_size,
                                                       namespace)
                    if page == NO_PAGE:
                        bad = j
                        break
                    companions[g * stride + j] = page
                    j -= 1
                if bad >= 0:
                    break
            if bad < 0:
                return k
            k = bad
        return 0

    cdef int64_t _max_prefix_pages(self, int64_t num_tokens) noexcept nogil:
        """Most pages a prompt of ``num_tokens`` tokens may hit: whole pages of the first
        ``num_tokens - 1`` (the last token is always computed), at most a row's width."""
        cdef int64_t k = (num_tokens - 1) // self._page_size if num_tokens > 0 else 0
        return k if k < self._max_pages_per_seq else self._max_pages_per_seq

    cdef int64_t _new_seq(self):
        self._version += 1
        self._num_free_seqs -= 1
        cdef seq_id_t s = self._free_seqs[self._num_free_seqs]
        self._active[s] = 1
        self._seq_lens[s] = 0
        self._num_seqs += 1
        return s

    def fork(self, seq_id):
        """Start a sequence that shares every page of ``seq_id`` (copy-on-write).

        Returns
        -------
        int
            The child's seq id; it has the parent's length and pages (each incref'd).

        Raises
        ------
        UnknownSequenceError
            ``seq_id`` is not active.
        CapacityError
            ``max_seqs`` sequences are active.
        """
        cdef int64_t parent = self._seq_arg(seq_id)
        if self._num_free_seqs == 0:
            raise CapacityError(f"all {self._max_seqs} sequence slots are in use (by active "
                                    "sequences or removed ones whose transfer is in flight)")
        cdef int64_t i, lo, hi
        cdef int32_t g
        cdef page_id_t* src
        cdef PageAllocator alloc = self.allocator
        for g in range(self._num_groups):
            self._live_cols(g, parent, &lo, &hi)
            src = self._table + g * self._group_stride + parent * self._max_pages_per_seq
            for i in range(lo, hi):
                if alloc.refs(src[i]) == INT32_MAX:
                    raise RefcountError(f"refcount of page {src[i]} would overflow int32")
        self._version += 1
        self._num_free_seqs -= 1
        cdef seq_id_t child = self._free_seqs[self._num_free_seqs]
        cdef page_id_t* dst
        for g in range(self._num_groups):
            self._live_cols(g, parent, &lo, &hi)
            src = self._table + g * self._group_stride + parent * self._max_pages_per_seq
            dst = self._table + g * self._group_stride + <int64_t>child * self._max_pages_per_seq
            memcpy(dst + lo, src + lo, (hi - lo) * sizeof(page_id_t))
            for i in range(lo, hi):
                alloc.add_ref(src[i])
            self._first_live[<int64_t>g * self._max_seqs + child] = \
                self._first_live[<int64_t>g * self._max_seqs + parent]
        self._seq_lens[child] = self._seq_lens[parent]
        self._active[child] = 1
        self._num_seqs += 1
        self._prefix.seq_forked(child, parent)
        return child

    def remove(self, seq_id):
        """End ``seq_id``: drop its page references (last page first) and free the seq id.

        A swapped-out sequence releases its host pages. One whose transfer is in flight
        is gone at once for every caller (its seq id is no longer active), but its pages
        in both tiers and its seq id are released only when the transfer completes
        (:meth:`HostTier.finish`), since the copy still reads or writes them.

        Raises
        ------
        UnknownSequenceError
            ``seq_id`` is not active.
        """
        cdef int64_t s = self._live_arg(int_arg(seq_id, "seq_id"))
        cdef uint8_t state = self._active[s]
        self._version += 1
        self._num_seqs -= 1
        if state == SEQ_LEAVING or state == SEQ_ARRIVING:
            self._active[s] = SEQ_DOOMED
            self._num_doomed += 1
            return
        if state == SEQ_SWAPPED:
            self._release_row(self.host_allocator, self._host_table, s)
        else:
            self._release_row(self.allocator, self._table, s)
        self._free_seq_id(s)

    cdef void _release_row(self, PageAllocator alloc, page_id_t* base, int64_t s) noexcept nogil:
        """Drop ``alloc``'s references of ``s``'s rows in table ``base`` (the device table
        or the host one), last page first, and unmap them. Lengths stay."""
        cdef int64_t i, lo, hi
        cdef int32_t g
        cdef page_id_t* row
        # Tail first: the free stack is LIFO, so a sequence's first page is reused last.
        for g in range(self._num_groups):
            self._live_cols(g, s, &lo, &hi)
            row = base + g * self._group_stride + s * self._max_pages_per_seq
            for i in range(hi - 1, lo - 1, -1):
                if row[i] != NO_PAGE:   # a host row of a prefix load maps only its hits
                    alloc.drop_ref(row[i])
                    row[i] = NO_PAGE

    cdef void _free_seq_id(self, int64_t s) noexcept nogil:
        """Put ``s`` (its rows already released) back on the free seq-id stack."""
        cdef int32_t g
        for g in range(self._num_groups):
            self._first_live[<int64_t>g * self._max_seqs + s] = 0
        self._seq_lens[s] = 0
        self._active[s] = SEQ_FREE
        self._free_seqs[self._num_free_seqs] = <seq_id_t>s
        self._num_free_seqs += 1

    def truncate(self, seq_ids, num_tokens):
        """Shorten sequences to ``num_tokens`` tokens each (speculative-decoding rollback).

        Parameters
        ----------
        seq_ids : array_like of int, shape [B]
            Distinct active sequences.
        num_tokens : array_like of int, shape [B], or int
            New length of each (``0 <= num_tokens[i] <= num_tokens(seq_ids[i])``); an int
            applies to every sequence.

        Raises
        ------
        UnknownSequenceError
            A seq id is not active.
        ValueError
            Duplicate seq ids, unequal lengths, a negative length or one above the
            sequence's current length.
        RollbackError
            A shorter length for a table with a state group (a recurrent state cannot be
            rolled back), or one a window group can no longer serve: its released pages
            hold tokens the next token would attend to (``num_tokens - window + 1`` falls
            before :meth:`first_page`). Truncating back to at least the length before the
            last ``append`` is always allowed.

        Notes
        -----
        In every group, pages past the new length lose this sequence's reference, last
        first (pages shared with a fork or the prefix cache stay with their other
        owners). Every page that held a dropped token leaves the prefix index, so a
        rejected draft token is never served to a later lookup; the sequence's own
        chain continues from its last whole kept page. A kept, partially filled last
        page that is shared is copied by the next :meth:`append`, as after :meth:`fork`.
        On any error nothing is changed.

        Examples
        --------
        Speculative decoding: one verified token plus 4 drafts, 2 drafts accepted.

        >>> table = PageTable(PageAllocator(16), 4, 4, 8)
        >>> seq = table.add_sequence()
        >>> _ = table.append([seq], [6])
        >>> _ = table.append([seq], [1 + 4])
        >>> table.truncate([seq], [6 + 1 + 2])
        >>> table.num_tokens(seq), len(table.pages(seq))
        (9, 3)
        """
        sids_obj, lens_obj, _ = self._batch_args(seq_ids, num_tokens, "num_tokens", True)
        cdef cnp.ndarray sids = <cnp.ndarray>sids_obj
        cdef cnp.ndarray new_lens = <cnp.ndarray>lens_obj
        cdef Py_ssize_t i, batch = cnp.PyArray_DIM(sids, 0)
        if batch > self._max_seqs:   # some id repeats or is unknown: the checks say which
            sids = cnp.PyArray_NewCopy(sids, cnp.NPY_CORDER)
            new_lens = cnp.PyArray_NewCopy(new_lens, cnp.NPY_CORDER)
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef const int64_t* np_ = <const int64_t*>cnp.PyArray_DATA(new_lens)
        cdef int64_t s, cur, new, c, lo, hi, keep
        cdef int32_t g
        cdef page_id_t* row
        cdef bint prefix_on = self._prefix.enabled()
        # The critical part: checks, then the cut, C only. The arguments are copied into
        # the table's scratch first: the checks and the cut must read the same values,
        # and a caller's array could change in between under another thread's GIL-free
        # NumPy call.
        if batch <= self._max_seqs:
            memcpy(self._scratch, sp, batch * sizeof(int64_t))
            memcpy(self._scratch + self._max_seqs, np_, batch * sizeof(int64_t))
            sp = self._scratch
            np_ = self._scratch + self._max_seqs
        self._check_active(sp, batch, False)
        for i in range(batch):
            s, new, cur = sp[i], np_[i], self._seq_lens[sp[i]]
            if new < 0:       # checked before the copy too; the caller's array may change
                raise ValueError(f"num_tokens[{i}] is {new}, must be >= 0")
            if new > cur:
                raise ValueError(f"truncate cannot lengthen seq_id {s} from {cur} to {new} "
                                 "tokens")
            if new == cur:
                continue
            if self._has_state:
                raise RollbackError(f"seq_id {s}: a state group's recurrent state cannot be "
                                    "rolled back")
            for g in range(self._num_groups):
                if self._kind[g] == _WINDOW and self._first_live[
                        <int64_t>g * self._max_seqs + s] > _window_start(
                            new, self._window[g], self._page_size):
                    raise RollbackError(
                        f"seq_id {s} cannot go back to {new} tokens: window group {g} "
                        f"(window {self._window[g]}) already released the pages before "
                        f"token {self._first_live[<int64_t>g * self._max_seqs + s] * self._page_size}")
        self._version += 1
        cdef PageAllocator alloc = self.allocator
        for i in range(batch):
            s, new, cur = sp[i], np_[i], self._seq_lens[sp[i]]
            if new == cur:
                continue
            keep = _ceil_div(new, self._page_size)
            for g in range(self._num_groups):
                self._live_cols(g, s, &lo, &hi)
                row = self._table + g * self._group_stride + s * self._max_pages_per_seq
                # Pages that held a dropped token leave the index before anything else
                # (a page freed below must go to the clean stack, not the evictable list).
                if prefix_on:
                    c = new // self._page_size
                    if c < lo:
                        c = lo
                    while c < hi:
                        # Also a page others hold: they may release it before this
                        # sequence writes into it, in place then.
                        self._prefix.unregister(row[c])
                        c += 1
                for c in range(hi - 1, keep - 1, -1):
                    alloc.drop_ref(row[c])
                    row[c] = NO_PAGE
            self._seq_lens[s] = <int32_t>new
            if prefix_on:
                self._prefix.truncated(s, new, self._table + self._anchor * self._group_stride
                                       + s * self._max_pages_per_seq)

    def first_page(self, seq_id, *, group=0):
        """Return the first column of ``seq_id``'s row in ``group`` that maps a page: 0
        except in a window group, whose earlier pages were released (their entries are
        -1)."""
        cdef int32_t g = self._group_arg(group)
        cdef int64_t s = self._seq_arg(seq_id)
        return self._first_live[<int64_t>g * self._max_seqs + s]

    def is_active(self, seq_id):
        """Return whether ``seq_id`` is an active sequence, in either tier (never raises
        for an int)."""
        cdef int64_t s = int_arg(seq_id, "seq_id")
        return 0 <= s < self._max_seqs and SEQ_RESIDENT <= self._active[s] <= SEQ_ARRIVING

    @property
    def num_writebacks(self):
        """int: offloads waiting for :meth:`take_writebacks` (0 without a host tier)."""
        return self._prefix.num_writebacks()

    def take_writebacks(self):
        """Return and clear the offloads that still need their copy.

        With prefix caching and a host tier (one layer group), a cached device page that
        a call must reuse (``append``, ``add_sequence``, a swap-in) is *offloaded*: its
        block moves to a host page and stays findable once the copy has arrived. The
        caller must copy each pair device -> host before anything writes the device
        page again (:class:`kvcore.KVCache` does it inside the call that caused it, on
        the same stream, before its own copies) and then report the copies with
        :meth:`HostTier.finish_writebacks`.

        Returns
        -------
        device_pages, host_pages : numpy.ndarray of int32, shape [n]
        """
        cdef cnp.ndarray device = None, host = None
        cdef int64_t n
        while True:   # the allocation may let another thread in: retry if it changed
            n = self._prefix.num_writebacks()
            if device is not None and cnp.PyArray_DIM(device, 0) == n:
                self._prefix.take_writebacks(<page_id_t*>cnp.PyArray_DATA(device),
                                             <page_id_t*>cnp.PyArray_DATA(host))
                return device, host
            device = empty_int32(n)
            host = empty_int32(n)

    def seq_state(self, seq_id):
        """Return where ``seq_id``'s pages are.

        Returns
        -------
        str
            ``"resident"`` (on the device: every call may use it), ``"swapped"`` (in the
            host tier), ``"swapping_out"`` or ``"swapping_in"`` (a transfer is in flight;
            see :class:`HostTier`).

        Raises
        ------
        UnknownSequenceError
            ``seq_id`` is not active.
        """
        return _STATE_NAMES[self._active[self._live_arg(int_arg(seq_id, "seq_id"))]]

    def host_pages(self, seq_id, *, group=0):
        """Return the host pages of a swapped-out ``seq_id`` in ``group``, in column order
        (int32, a copy; the columns :meth:`pages` would list once it is back).

        Raises
        ------
        SequenceStateError
            ``seq_id`` is resident (its pages are on the device).
        TransferPendingError
            Its transfer is in flight.
        UnknownSequenceError
            ``seq_id`` is not active.
        """
        cdef int32_t g = self._group_arg(group)
        cdef int64_t s = int_arg(seq_id, "seq_id")
        cdef int64_t lo, hi
        cdef cnp.ndarray out = None
        while True:   # the allocation may let another thread in: retry if it changed the table
            if s < 0 or s >= self._max_seqs or self._active[s] != SEQ_SWAPPED:
                self._raise_state(s, "swapped")
            self._live_cols(g, s, &lo, &hi)
            if out is not None and cnp.PyArray_DIM(out, 0) == hi - lo:
                memcpy(cnp.PyArray_DATA(out), self._host_table + g * self._group_stride
                       + s * self._max_pages_per_seq + lo, (hi - lo) * sizeof(page_id_t))
                return out
            out = empty_int32(hi - lo)

    def active_seq_ids(self):
        """Return the active seq ids (in either tier) in increasing order, int32
        [num_seqs] (an owned copy)."""
        cdef cnp.ndarray out = None
        cdef int32_t* dst
        cdef int64_t s, k
        while True:   # the allocation may let another thread in: retry if it changed the table
            if out is not None and cnp.PyArray_DIM(out, 0) == self._num_seqs:
                dst = <int32_t*>cnp.PyArray_DATA(out)
                k = 0
                for s in range(self._max_seqs):
                    if SEQ_RESIDENT <= self._active[s] <= SEQ_ARRIVING:
                        dst[k] = <int32_t>s
                        k += 1
                return out
            out = empty_int32(self._num_seqs)

    # -- the scheduler step ----------------------------------------------------------------

    def pages_needed(self, seq_ids, num_new_tokens):
        """Return exactly how many pages :meth:`append` would allocate, copy-on-write included.

        Parameters are those of :meth:`append`; the same errors are raised for bad input.
        Nothing is changed.
        """
        sids, counts, total = self._batch_args(seq_ids, num_new_tokens)
        if self._recount(<const int64_t*>cnp.PyArray_DATA(counts), cnp.PyArray_DIM(counts, 0)) \
                != <int64_t>total:
            raise ValueError("num_new_tokens changed while pages_needed was converting "
                             "its arguments")
        self._check_batch(<const int64_t*>cnp.PyArray_DATA(sids),
                          <const int64_t*>cnp.PyArray_DATA(counts), cnp.PyArray_DIM(sids, 0))
        cdef int64_t copies, freed
        return self._count_new_pages(<const int64_t*>cnp.PyArray_DATA(sids),
                                     <const int64_t*>cnp.PyArray_DATA(counts),
                                     cnp.PyArray_DIM(sids, 0), &copies, &freed)

    def append(self, seq_ids, num_new_tokens, token_ids=None):
        """Extend a batch of sequences by some tokens each, allocating pages as needed.

        Parameters
        ----------
        seq_ids : array_like of int, shape [B]
            Distinct active sequences, in the order their tokens appear in the result.
        num_new_tokens : array_like of int, shape [B], or int
            Tokens to add to each sequence (``>= 0``); an int applies to every sequence.
        token_ids : array_like of int, shape [sum(num_new_tokens)], optional
            Ids of the new tokens in ``slot_mapping`` order. With prefix caching on,
            every page that becomes full with all its token ids known is registered in
            the cache; a sequence appended without ids is never registered again.

        Returns
        -------
        AppendResult
            ``slot_mapping`` int64 [sum(num_new_tokens)] and the copy-on-write pairs
            ``copy_src``, ``copy_dst`` int32 [num_copies]; owned NumPy arrays.

        Raises
        ------
        UnknownSequenceError
            A seq id is not active.
        ValueError
            Duplicate seq ids, unequal lengths or a negative count; ``token_ids`` of the
            wrong length or with an id outside ``[0, 2**31 - 1]``.
        CapacityError
            A sequence would exceed ``max_pages_per_seq`` pages.
        OutOfPagesError
            Fewer free pages than needed (``requested`` says how many).

        Notes
        -----
        Copy-on-write: a sequence that appends into a partially filled last page whose
        refcount is above 1 gets a fresh page for it; the old page loses one
        reference, and ``(old, new)`` is reported. Sequences are handled in call order,
        so when every sharer of a page appends in one call, all but the last copy and
        the last writes in place. Full pages are never written again, so they are
        never copied. On any error nothing is changed.
        """
        sids_obj, counts_obj, total_obj = self._batch_args(seq_ids, num_new_tokens)
        cdef cnp.ndarray sids = <cnp.ndarray>sids_obj
        cdef cnp.ndarray counts = <cnp.ndarray>counts_obj
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef const int64_t* cp = <const int64_t*>cnp.PyArray_DATA(counts)
        cdef Py_ssize_t batch = cnp.PyArray_DIM(sids, 0)
        cdef int64_t total_tokens = total_obj
        cdef cnp.ndarray tok = None
        if token_ids is not None:
            tok = token_array(token_ids, "token_ids")
            if tok is token_ids:   # the caller's own array: copy what must not change
                tok = cnp.PyArray_NewCopy(tok, cnp.NPY_CORDER)
            if cnp.PyArray_DIM(tok, 0) != total_tokens:
                raise ValueError(f"token_ids holds {cnp.PyArray_DIM(tok, 0)} ids but "
                                 f"num_new_tokens add up to {total_tokens}")
        # Every new token takes a slot of its own in the pool, so a total above the pool
        # cannot be met (and must not reach NumPy's MemoryError below).
        cdef int64_t pool_slots = <int64_t>self.allocator.page_count() * self._page_size
        if total_tokens > pool_slots and self._has_kv:   # (a state group takes no slots)
            raise OutOfPagesError(_ceil_div(total_tokens, self._page_size),
                                  self.allocator.free_count())
        # Every Python object is made before the state is read: an allocation can run the
        # garbage collector, whose finalizers may let another thread in. From the checks
        # below to the end of the mutation only C runs, so the call is atomic.
        cdef cnp.ndarray slot_mapping = (
            empty_int64(<Py_ssize_t>total_tokens) if self._num_groups == 1
            else np.empty((self._num_groups, <Py_ssize_t>total_tokens), dtype=np.int64))
        cdef int64_t copy_capacity = batch * self._max_copies_per_seq
        cdef cnp.ndarray copies = empty_int32(2 * copy_capacity)
        cdef page_id_t* copy_ptr = <page_id_t*>cnp.PyArray_DATA(copies)
        cdef slot_t* slots = <slot_t*>cnp.PyArray_DATA(slot_mapping)
        # seq_ids and the counts may be the caller's own arrays, changed by another
        # thread during those allocations: the counts are summed again here, inside the
        # critical part, and must still fit slot_mapping; seq ids are checked below.
        if self._recount(cp, batch) != total_tokens:
            raise ValueError("num_new_tokens changed while append was converting its "
                             "arguments")
        self._check_batch(sp, cp, batch)
        cdef int64_t num_copies, num_freed
        cdef int64_t needed = self._count_new_pages(sp, cp, batch, &num_copies, &num_freed)
        # Window releases happen first and their freed pages can be taken right away.
        cdef int64_t available = self.allocator.free_count() + num_freed
        if needed > available:
            raise OutOfPagesError(needed, available)
        # Validation is complete: from here on nothing can fail.
        self._version += 1
        if self._has_window:
            self._release_windows(sp, cp, batch)
        cdef int64_t made = self._append_unchecked(sp, cp, batch, slots, copy_ptr,
                                                   copy_ptr + copy_capacity)
        self._prefix.appended(sp, cp, batch, slots, total_tokens,
                              NULL if tok is None else <const int32_t*>cnp.PyArray_DATA(tok),
                              self._table, self._group_stride, self._max_pages_per_seq,
                              self._first_live, self._max_seqs, self._kind, self._num_groups,
                              self._anchor, self._seq_lens)
        # The critical part ends: what follows reads only this call's own buffers. The
        # copies made equal the ones counted (the replay mirrors the call); the arrays
        # are sized from what was made all the same, so they never hold unwritten ids.
        cdef cnp.ndarray copy_src = empty_int32(<Py_ssize_t>made)
        cdef cnp.ndarray copy_dst = empty_int32(<Py_ssize_t>made)
        if made:
            memcpy(cnp.PyArray_DATA(copy_src), copy_ptr, made * sizeof(page_id_t))
            memcpy(cnp.PyArray_DATA(copy_dst), copy_ptr + copy_capacity,
                   made * sizeof(page_id_t))
        return _new_tuple(AppendResult, (slot_mapping, copy_src, copy_dst))

    cdef int64_t _recount(self, const int64_t* counts, Py_ssize_t batch) noexcept nogil:
        """Sum of ``counts``, or -1 if one is negative or above a row's capacity."""
        cdef Py_ssize_t i
        cdef int64_t total = 0
        cdef int64_t max_tokens = <int64_t>self._max_pages_per_seq * self._page_size
        for i in range(batch):
            if counts[i] < 0 or counts[i] > max_tokens:
                return -1
            total += counts[i]
        return total

    cdef void _release_windows(self, const int64_t* seq_ids, const int64_t* counts,
                               Py_ssize_t batch) noexcept nogil:
        """Before an append allocates: each window group drops the pages of each appending
        sequence that lie wholly before ``length - window + 1`` (entries become -1)."""
        cdef Py_ssize_t i
        cdef int64_t s, c, lo, hi
        cdef int32_t g
        cdef int32_t* first
        cdef page_id_t* row
        for g in range(self._num_groups):
            if self._kind[g] != _WINDOW:
                continue
            for i in range(batch):
                if counts[i] == 0:
                    continue
                s = seq_ids[i]
                first = self._first_live + <int64_t>g * self._max_seqs + s
                lo = first[0]
                hi = self._seq_lens[s] - self._window[g] + 1     # first token still needed
                if hi <= 0:
                    continue
                hi = _div(<uint32_t>hi, <uint32_t>self._page_size, self._page_shift)
                if hi <= lo:
                    continue
                row = self._table + g * self._group_stride + s * self._max_pages_per_seq
                for c in range(hi - 1, lo - 1, -1):
                    self.allocator.drop_ref(row[c])
                    row[c] = NO_PAGE
                first[0] = <int32_t>hi

    cdef int64_t _append_unchecked(self, const int64_t* seq_ids, const int64_t* counts,
                                   Py_ssize_t batch, slot_t* slots, page_id_t* copy_src,
                                   page_id_t* copy_dst) noexcept nogil:
        """Allocate, copy-on-write and fill the slots of every group (group ``g``'s slots
        at ``slots + g * total``), then set the new lengths; return the copies made."""
        cdef Py_ssize_t i
        cdef int64_t s, k = 0, j, base, total = 0, c
        cdef int32_t g, kind
        cdef uint32_t cur, new_len, old_pages, new_pages, p, off, off_end
        cdef uint32_t ps = <uint32_t>self._page_size
        cdef int shift = self._page_shift
        cdef page_id_t old_page, fresh
        cdef page_id_t* row
        cdef slot_t* group_slots
        # Locals for everything read in the loop: the stores below go through int32 and
        # int64 pointers, and without strict aliasing (CPython builds with
        # -fno-strict-aliasing) each would force attributes of self to be reloaded.
        cdef int32_t* lens = self._seq_lens
        cdef page_id_t* table
        cdef int64_t width = self._max_pages_per_seq
        for i in range(batch):
            total += counts[i]
        for g in range(self._num_groups):
            kind = self._kind[g]
            table = self._table + g * self._group_stride
            group_slots = slots + g * total
            j = 0
            for i in range(batch):
                if counts[i] == 0:
                    continue
                s = seq_ids[i]
                cur = <uint32_t>lens[s]
                row = table + s * width
                if kind == _STATE:
                    for c in range(counts[i]):
                        group_slots[j + c] = NO_PAGE
                    j += counts[i]
                    if cur == 0:
                        self.allocator.take(row, self._state_pages[g])
                        continue
                    for c in range(self._state_pages[g]):   # shared after a fork: copy
                        old_page = row[c]
                        if self.allocator.refs(old_page) > 1:
                            self.allocator.take(&fresh, 1)
                            row[c] = fresh
                            self.allocator.drop_ref(old_page)
                            copy_src[k] = old_page
                            copy_dst[k] = fresh
                            k += 1
                    continue
                new_len = cur + <uint32_t>counts[i]
                old_pages = _num_pages_for(cur, ps, shift)
                new_pages = _num_pages_for(new_len, ps, shift)
                if _mod(cur, ps, shift) != 0:
                    old_page = row[old_pages - 1]
                    if self.allocator.refs(old_page) > 1:
                        self.allocator.take(&fresh, 1)
                        row[old_pages - 1] = fresh
                        self._prefix.page_copied(old_page, fresh)   # the host copy of its token ids
                        self.allocator.drop_ref(old_page)   # still >= 1: it stays shared
                        copy_src[k] = old_page
                        copy_dst[k] = fresh
                        k += 1
                if new_pages != old_pages:
                    self.allocator.take(row + old_pages, <int32_t>(new_pages - old_pages))
                # Page by page, so the per-token loop has no division.
                p = _div(cur, ps, shift)
                off = _mod(cur, ps, shift)
                while p < new_pages:
                    base = <int64_t>row[p] * ps
                    off_end = ps if p + 1 < new_pages else new_len - p * ps
                    while off < off_end:
                        group_slots[j] = base + off
                        j += 1
                        off += 1
                    off = 0
                    p += 1
        for i in range(batch):
            lens[seq_ids[i]] += <int32_t>counts[i]
        return k

    # -- queries -----------------------------------------------------------------------------

    def num_tokens(self, seq_id):
        """Return the length of ``seq_id`` in tokens."""
        return self._seq_lens[self._live_arg(int_arg(seq_id, "seq_id"))]

    def pages(self, seq_id, *, group=0):
        """Return the pages ``seq_id`` maps in ``group``, in column order: int32, a copy.

        ``ceil(num_tokens / page_size)`` pages in a full-attention group; in a window
        group only the live ones (columns ``first_page(seq_id, group=group)`` on); in a
        state group its ``state_pages`` pages (none before its first append).
        """
        cdef int32_t g = self._group_arg(group)
        cdef int64_t s = int_arg(seq_id, "seq_id")
        cdef int64_t lo, hi
        cdef cnp.ndarray out = None
        while True:   # the allocation may let another thread in: retry if it changed the table
            s = self._active_arg(s)
            self._live_cols(g, s, &lo, &hi)
            if out is not None and cnp.PyArray_DIM(out, 0) == hi - lo:
                memcpy(cnp.PyArray_DATA(out), self._table + g * self._group_stride
                       + s * self._max_pages_per_seq + lo, (hi - lo) * sizeof(page_id_t))
                return out
            out = empty_int32(hi - lo)

    def slot(self, seq_id, token_idx, *, group=0):
        """Return the slot of token ``token_idx`` of ``seq_id`` in ``group``.

        Raises
        ------
        UnknownSequenceError
            ``seq_id`` is not active.
        IndexError
            ``token_idx`` outside ``[0, num_tokens(seq_id))``, in a page a window group
            released, or ``group`` out of range.
        ValueError
            ``group`` holds a recurrent state (no per-token slots).
        """
        cdef int64_t t = int_arg(token_idx, "token_idx")   # user code before any state read
        cdef int32_t g = self._group_arg(group)
        cdef int64_t s = self._seq_arg(seq_id)
        if self._kind[g] == _STATE:
            raise ValueError(f"group {g} holds a recurrent state: it has no token slots")
        if t < 0 or t >= self._seq_lens[s]:
            raise IndexError(
                f"token_idx {t} out of range [0, {self._seq_lens[s]}) for seq_id {s}")
        cdef int64_t column = t // self._page_size
        if column < self._first_live[<int64_t>g * self._max_seqs + s]:
            raise IndexError(f"token {t} of seq_id {s} is outside window group {g}'s "
                             "window: its page was released")
        cdef page_id_t page = self._table[g * self._group_stride
                                          + s * self._max_pages_per_seq + column]
        return <int64_t>page * self._page_size + t % self._page_size

    def flashinfer_metadata(self, seq_ids, *, group=0):
        """Build FlashInfer's paged-KV index arrays for a batch.

        Parameters
        ----------
        seq_ids : array_like of int, shape [B]
            Active sequences (repeats allowed), in batch order.
        group : int
            The layer group (default 0). A window group lists only its live pages, so
            FlashInfer sees the window's ``num_tokens - first_page * page_size`` tokens.

        Returns
        -------
        page_indptr : numpy.ndarray of int32, shape [B + 1]
            ``page_indptr[0] = 0``; sequence ``b`` owns ``page_indices[page_indptr[b]:page_indptr[b+1]]``.
        page_indices : numpy.ndarray of int32, shape [page_indptr[B]]
            The pages of every sequence, in order.
        last_page_len : numpy.ndarray of int32, shape [B]
            Tokens in each sequence's last page: in ``[1, page_size]``, or 0 for an empty sequence.

        Raises
        ------
        ValueError
            ``group`` holds a recurrent state.

        Notes
        -----
        45 tokens with page size 16 use 3 pages, the last holding ``45 - 2 * 16 = 13``.
        """
        cdef int32_t g = self._group_arg(group)
        if self._kind[g] == _STATE:
            raise ValueError(f"group {g} holds a recurrent state, not K/V pages")
        cdef cnp.ndarray sids = int64_array(seq_ids, "seq_ids")
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef Py_ssize_t b, batch = cnp.PyArray_DIM(sids, 0)
        cdef cnp.ndarray indptr_arr = empty_int32(batch + 1)
        cdef cnp.ndarray last_arr = empty_int32(batch)
        cdef int32_t* indptr = <int32_t*>cnp.PyArray_DATA(indptr_arr)
        cdef int32_t* last = <int32_t*>cnp.PyArray_DATA(last_arr)
        cdef int64_t nnz = self._sum_pages(sp, batch, g), lo, hi
        cdef uint32_t n, ps = <uint32_t>self._page_size
        cdef int shift = self._page_shift
        cdef cnp.ndarray indices_arr
        cdef page_id_t* indices
        cdef const page_id_t* table = self._table + g * self._group_stride
        while True:
            if nnz > INT32_MAX:
                raise CapacityError(f"page_indices would hold {nnz} pages, more than int32 "
                                    f"indexing allows ({INT32_MAX})")
            indices_arr = empty_int32(<Py_ssize_t>nnz)
            # Critical part: that allocation may have let another thread change the table
            # (or seq_ids, when it is the caller's array); everything is read again here
            # and the pages copied only if they still fit.
            self._check_active(sp, batch, True)
            nnz = 0
            indptr[0] = 0
            for b in range(batch):
                n = <uint32_t>self._seq_lens[sp[b]]
                self._live_cols(g, sp[b], &lo, &hi)
                nnz += hi - lo
                indptr[b + 1] = <int32_t>nnz
                last[b] = 0 if n == 0 else <int32_t>(_mod(n - 1, ps, shift) + 1)
            if nnz == cnp.PyArray_DIM(indices_arr, 0):
                break
        indices = <page_id_t*>cnp.PyArray_DATA(indices_arr)
        for b in range(batch):
            self._live_cols(g, sp[b], &lo, &hi)
            memcpy(indices + indptr[b], table + sp[b] * self._max_pages_per_seq + lo,
                   (hi - lo) * sizeof(page_id_t))
        return indptr_arr, indices_arr, last_arr

    cdef int64_t _sum_pages(self, const int64_t* seq_ids, Py_ssize_t batch, int32_t g) noexcept:
        """Pages group ``g`` maps for the batch, counting nothing for an invalid id (a size
        hint only: the critical part checks the ids and counts again)."""
        cdef Py_ssize_t b
        cdef int64_t s, nnz = 0, max_seqs = self._max_seqs, lo, hi
        for b in range(batch):
            s = seq_ids[b]
            if 0 <= s < max_seqs:
                self._live_cols(g, s, &lo, &hi)
                nnz += hi - lo
        return nnz

    cdef int64_t _max_row_pages(self, const int64_t* seq_ids, Py_ssize_t batch,
                                int32_t g) noexcept:
        """Widest row (mapped columns end) of the batch in group ``g`` (a size hint, as
        _sum_pages)."""
        cdef Py_ssize_t b
        cdef int64_t s, width = 0, max_seqs = self._max_seqs, lo, hi
        for b in range(batch):
            s = seq_ids[b]
            if 0 <= s < max_seqs:
                self._live_cols(g, s, &lo, &hi)
                if hi > width:
                    width = hi
        return width

    def block_tables(self, seq_ids, *, group=0):
        """Return vLLM-style block tables for a batch: int32 [B, max pages among them], -1 padded.

        Parameters
        ----------
        seq_ids : array_like of int, shape [B]
            Active sequences (repeats allowed).
        group : int
            The layer group (default 0). Columns are absolute (token ``t`` in column
            ``t // page_size``): a window group's released columns are -1; a state
            group's rows are its state pages.
        """
        cdef int32_t g = self._group_arg(group)
        cdef cnp.ndarray sids = int64_array(seq_ids, "seq_ids")
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef Py_ssize_t b, batch = cnp.PyArray_DIM(sids, 0)
        cdef int64_t width = self._max_row_pages(sp, batch, g), lo, hi
        cdef page_id_t* dst
        while True:
            out = np.full((batch, width), NO_PAGE, dtype=np.int32)
            # Critical part: read everything again after the allocation (see
            # flashinfer_metadata) and copy only if the rows still fit.
            self._check_active(sp, batch, True)
            if self._max_row_pages(sp, batch, g) == width:
                break
            width = self._max_row_pages(sp, batch, g)
        dst = <page_id_t*>cnp.PyArray_DATA(out)
        for b in range(batch):
            self._live_cols(g, sp[b], &lo, &hi)
            memcpy(dst + b * width + lo, self._table + g * self._group_stride
                   + sp[b] * self._max_pages_per_seq + lo, (hi - lo) * sizeof(page_id_t))
        return out

    # -- prefix cache --------------------------------------------------------------------------

    @property
    def prefix_cache_enabled(self):
        """bool: whether this table caches prefixes."""
        return self._prefix.enabled()

    @property
    def num_cached_pages(self):
        """int: pages in the prefix index (in use or evictable); 0 when caching is off."""
        return self._prefix.num_cached()

    @property
    def prefix_stats(self):
        """dict or None: ``queries``, ``queried_tokens``, ``hit_tokens``, ``stored``,
        ``evictions``, ``events_dropped``, ``num_cached_pages`` (both tiers) and
        ``hit_rate`` (hit_tokens / queried_tokens); with prefix offload to a host tier
        also ``host_cached_pages``, ``offloaded`` and ``loaded`` (pages moved each way);
        None when caching is off."""
        return self._prefix.stats()

    def cached_hashes(self):
        """Return the hash of every page in the prefix index, both tiers.

        What a router that applied every event (stored minus removed) must hold; see
        ``kvcore.router``. Changes nothing.

        Returns
        -------
        numpy.ndarray of uint64, shape [num_indexed]
            Sorted; a block indexed twice (while a copy of it is in flight) twice.
            Empty when prefix caching is off.
        """
        if not self._prefix.enabled():
            return np.empty(0, np.uint64)
        owners = (<PrefixCache>self._prefix)._index._owners
        return np.sort(owners["page_hash"][owners["in_index"].astype(bool)])

    def take_events(self):
        """Return and clear the cache's events since the last call, oldest first.

        Returns
        -------
        kind : numpy.ndarray of uint8, shape [n]
            1 (``kvcore.EVENT_STORED``) or 2 (``kvcore.EVENT_EVICTED``); with prefix
            offload, 3 (``EVENT_HOST_STORED``) or 4 (``EVENT_HOST_EVICTED``) for a
            host-tier page (an offload is an EVICTED then a HOST_STORED of one hash, a
            load a HOST_EVICTED then a STORED).
        page_id : numpy.ndarray of int32, shape [n]
            A device page id, or a host page id for kinds 3 and 4.
        page_hash : numpy.ndarray of uint64, shape [n]
            The page's chained hash (prefix, namespace and tokens): what a KV-aware
            router compares across replicas.

        Notes
        -----
        At most ``prefix_event_capacity`` events are kept; older ones are dropped and
        counted in ``prefix_stats["events_dropped"]``. Empty arrays when caching is off.
        """
        return self._prefix.take_events()

    def clear_prefix_cache(self):
        """Forget every cached prefix, in both tiers: evictable pages become clean, pages
        in use stay mapped but are no longer found by lookups. Emits an evicted event
        per page (a host-evicted event per host-tier page)."""
        self._prefix.clear()

    # -- checking ----------------------------------------------------------------------------

    def check_invariants(self):
        """Raise :class:`KVCoreError` describing the first violated invariant.

        Checks the allocators' invariants (device and host tier), every row of both
        tables against its sequence's length and state, each tier's refcounts against
        its table's references, and the seq-id bookkeeping.
        """
        self.allocator.check_invariants()
        if self.host_allocator is not None:
            self.host_allocator.check_invariants()
        self._prefix.check()
        cdef int64_t s, live_count = 0, doomed_count = 0
        cdef uint8_t state
        cdef int32_t g
        cdef int64_t lo, hi
        cdef _RowCheck device = _RowCheck(self.allocator, "device")
        cdef _RowCheck host = (_RowCheck(self.host_allocator, "host")
                               if self.host_allocator is not None else None)
        for s in range(self._max_seqs):
            state = self._active[s]
            if state > SEQ_DOOMED:
                raise KVCoreError(f"seq_id {s} has unknown state {state}")
            if SEQ_RESIDENT <= state <= SEQ_ARRIVING:
                live_count += 1
            doomed_count += state == SEQ_DOOMED
            if state != SEQ_FREE:
                if self._seq_lens[s] < 0:
                    raise KVCoreError(f"seq_id {s} has negative length {self._seq_lens[s]}")
            elif self._seq_lens[s] != 0:
                raise KVCoreError(f"inactive seq_id {s} has length {self._seq_lens[s]}")
            if self._loading[s] and not (state == SEQ_ARRIVING or state == SEQ_DOOMED):
                raise KVCoreError(f"seq_id {s} is marked loading but is "
                                  f"{_STATE_NAMES[state]}")
            if state != SEQ_FREE and state != SEQ_RESIDENT and host is None:
                raise KVCoreError(f"seq_id {s} is {_STATE_NAMES[state]} without a host tier")
            for g in range(self._num_groups):
                if state != SEQ_FREE:
                    self._live_cols(g, s, &lo, &hi)
                else:
                    lo = hi = 0
                if (self._first_live[<int64_t>g * self._max_seqs + s] != 0
                        and (self._kind[g] != _WINDOW or state == SEQ_FREE or lo > hi
                             or lo > _window_start(self._seq_lens[s], self._window[g],
                                                   self._page_size))):
                    raise KVCoreError(
                        f"seq_id {s} of {self._seq_lens[s]} tokens has first live column "
                        f"{self._first_live[<int64_t>g * self._max_seqs + s]} in group {g}")
                # The device row is valid unless the pages are only in the host tier; the
                # host row while they are there or on their way (_core.pxd).
                device.row(self._table + g * self._group_stride
                           + s * self._max_pages_per_seq, self._max_pages_per_seq, s, g,
                           self._seq_lens[s], lo, hi if state != SEQ_SWAPPED else lo)
                if host is not None:
                    host.row(self._host_table + g * self._group_stride
                             + s * self._max_pages_per_seq, self._max_pages_per_seq, s, g,
                             self._seq_lens[s], lo,
                             hi if state >= SEQ_SWAPPED else lo, self._loading[s] != 0)
        device.refcounts()
        if host is not None:
            host.refcounts(self._prefix)
        if live_count != self._num_seqs:
            raise KVCoreError(f"{live_count} rows are active but num_seqs is {self._num_seqs}")
        if doomed_count != self._num_doomed:
            raise KVCoreError(f"{doomed_count} rows await their transfer's completion but "
                              f"num_doomed is {self._num_doomed}")
        if self._num_free_seqs + self._num_seqs + self._num_doomed != self._max_seqs:
            raise KVCoreError(f"{self._num_free_seqs} free seq ids + {self._num_seqs} active "
                              f"+ {self._num_doomed} removed in flight != max_seqs "
                              f"{self._max_seqs}")
        seen = set()
        cdef int64_t c
        for c in range(self._num_free_seqs):
            s = self._free_seqs[c]
            if s < 0 or s >= self._max_seqs or self._active[s] or s in seen:
                raise KVCoreError(f"free seq-id stack entry {c} ({s}) is invalid")
            seen.add(s)


def _slot_token_py(PageTable table not None, page_id, offset):
    """Test entry point: the token id ``table``'s prefix cache recorded for a slot.

    Parameters
    ----------
    table : PageTable
        A table with prefix caching on.
    page_id : int
        A page in ``[0, num_pages)``.
    offset : int
        A position in the page, ``[0, page_size)``.

    Raises
    ------
    ValueError
        Prefix caching is off for ``table`` (no token ids are recorded).
    InvalidPageError
        ``page_id`` outside the pool.
    IndexError
        ``offset`` outside ``[0, page_size)``.
    TypeError
        ``page_id`` or ``offset`` not an integer.
    """
    if not table._prefix.enabled():
        raise ValueError("prefix caching is off for this table: no token ids are recorded")
    cdef int32_t page = page_arg(page_id, "page_id", table.allocator.page_count())
    cdef int64_t off = int_arg(offset, "offset")
    if off < 0 or off >= table._page_size:
        raise IndexError(f"offset {off} out of range [0, {table._page_size})")
    return table._prefix.slot_token(<slot_t>page * table._page_size + off)


def _break_tree_py(PageTable table not None, page_id):
    """Test entry point: cut the tree link of the prefix-index entry at ``page_id`` (as a
    bug that leaves an unreachable entry would), so that ``check_invariants`` objects."""
    if not table._prefix.enabled():
        raise KVCoreError("prefix caching is off")
    cdef PrefixCache cache = <PrefixCache>table._prefix
    cdef page_id_t page = page_arg(page_id, "page_id", cache._index._num_pages)
    if not cache._index.in_index(page):
        raise KVCoreError(f"page {page} is not indexed")
    cache._index._unlink_child(page)
    cache._index._parent_gen[page] += 1
