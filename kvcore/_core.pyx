# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Host bookkeeping of kvcore: the page allocator and the per-sequence page tables.

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

from kvcore._prefix cimport PrefixIndex
from kvcore._typedefs cimport NO_PAGE, page_id_t, refcount_t, seq_id_t, slot_t

from kvcore._prefix import PrefixIndex as _PrefixIndex
from kvcore.errors import (
    CapacityError,
    InvalidPageError,
    OutOfPagesError,
    RefcountError,
    UnknownSequenceError,
    KVCoreError,
)

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

AppendResult = namedtuple("AppendResult", ["slot_mapping", "copy_src", "copy_dst"])
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

# The copy_src / copy_dst of an append without copy-on-write: empty, so sharing one
# read-only array between results is indistinguishable from a fresh one.
_NO_PAGES = np.empty(0, dtype=np.int32)
_NO_PAGES.flags.writeable = False


# --------------------------------------------------------------------------------------
# Argument normalisation: one typed helper per kind of argument, naming the argument.
# --------------------------------------------------------------------------------------

cdef inline bint _is_fast_int64(object obj):
    return (type(obj) is cnp.ndarray
            and cnp.PyArray_TYPE(<cnp.ndarray>obj) == cnp.NPY_INT64
            and cnp.PyArray_NDIM(<cnp.ndarray>obj) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>obj))


cdef cnp.ndarray _int64_array(object obj, str name):
    """Return ``obj`` as a 1-D C-contiguous int64 array (``obj`` itself when it already is).

    Accepts lists, tuples and integer NumPy arrays of any width; rejects bools and
    floats with ``TypeError`` and values outside int64 with ``ValueError``.
    """
    if _is_fast_int64(obj):
        return <cnp.ndarray>obj
    cdef cnp.ndarray arr
    cdef Py_ssize_t i, n
    cdef int64_t* dst
    if type(obj) is list or type(obj) is tuple:
        # Schedulers often pass short Python lists; filling the array in C skips
        # NumPy's type discovery. Anything but exact ints takes the general path.
        n = len(obj)
        arr = _empty_int64(n)
        dst = <int64_t*>cnp.PyArray_DATA(arr)
        try:
            for i in range(n):
                item = obj[i]
                if type(item) is not int:
                    break
                dst[i] = item
            else:
                return arr
        except OverflowError:
            raise ValueError(f"{name} holds a value outside the int64 range") from None
    try:
        arr = np.asarray(obj)
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D sequence of integers ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {(<object>arr).shape}")
    kind = arr.dtype.kind
    if kind == "i":
        pass
    elif kind == "u":
        if arr.size and int(arr.max()) > 0x7FFFFFFFFFFFFFFF:
            raise ValueError(f"{name} holds a value above the int64 range")
    elif kind == "O" and arr.size:
        for value in arr:
            if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__index__"):
                raise TypeError(f"{name} must hold integers, got {type(value).__name__}")
        try:
            arr = np.array([operator.index(v) for v in arr], dtype=np.int64)
        except OverflowError:
            raise ValueError(f"{name} holds a value outside the int64 range") from None
        except Exception as exc:   # a user's __index__ may raise anything
            raise TypeError(f"{name} must hold integers ({exc!r})") from exc
    elif arr.size == 0:
        pass  # np.asarray([]) is float64; an empty batch is still a batch
    else:
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


cdef int64_t _int_arg(object value, str name) except? -1:
    """``operator.index(value)`` that refuses bools and names the argument."""
    cdef int64_t result
    if type(value) is int:   # the common case, without a trip through operator.index
        try:
            result = value
            return result
        except OverflowError:
            raise ValueError(f"{name} {value} is outside the int64 range") from None
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        index = operator.index(value)
    except Exception as exc:   # TypeError, or whatever a user's __index__ raised
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from exc
    try:
        result = index
    except OverflowError:
        raise ValueError(f"{name} {index} is outside the int64 range") from None
    return result


cdef int32_t _positive_int32(object value, str name) except -1:
    cdef int64_t v = _int_arg(value, name)
    if v < 1 or v > INT32_MAX:
        raise ValueError(f"{name} must be in [1, {INT32_MAX}], got {v}")
    return <int32_t>v


cdef cnp.ndarray _token_array(object tokens, str name):
    """``tokens`` as a contiguous int32 array of ids in ``[0, 2**31 - 1]``."""
    cdef Py_ssize_t i, n
    cdef const int32_t* p32
    if (type(tokens) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>tokens) == cnp.NPY_INT32
            and cnp.PyArray_NDIM(<cnp.ndarray>tokens) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>tokens)):
        p32 = <const int32_t*>cnp.PyArray_DATA(<cnp.ndarray>tokens)
        n = cnp.PyArray_DIM(<cnp.ndarray>tokens, 0)
        for i in range(n):
            if p32[i] < 0:
                raise ValueError(f"{name}[{i}] is {p32[i]}, token ids must be in "
                                 f"[0, {INT32_MAX}]")
        return <cnp.ndarray>tokens
    cdef cnp.ndarray arr = _int64_array(tokens, name)
    cdef const int64_t* p = <const int64_t*>cnp.PyArray_DATA(arr)
    n = cnp.PyArray_DIM(arr, 0)
    for i in range(n):
        if p[i] < 0 or p[i] > INT32_MAX:
            raise ValueError(f"{name}[{i}] is {p[i]}, token ids must be in [0, {INT32_MAX}]")
    return arr.astype(np.int32)


cdef inline cnp.ndarray _empty_int32(Py_ssize_t n):
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    return cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT32, 0)


cdef inline cnp.ndarray _empty_int64(Py_ssize_t n):
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    return cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT64, 0)


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


cdef int _log2_or_minus_one(int32_t n):
    cdef int shift = 0
    if n & (n - 1):
        return -1
    while (1 << shift) != n:
        shift += 1
    return shift


cdef object _readonly_view(cnp.ndarray owner):
    view = owner.view()
    view.flags.writeable = False
    return view


def first_slot_out_of_range(cnp.ndarray slots not None, int64_t num_slots):
    """Return the first entry of int64 ``slots`` outside ``[-1, num_slots)``, or None.

    One C pass; NumPy's ``min()`` and ``max()`` cost a few µs each on decode-size arrays.
    """
    if cnp.PyArray_TYPE(slots) != cnp.NPY_INT64 or cnp.PyArray_NDIM(slots) != 1:
        raise TypeError("slots must be a 1-D int64 array")
    slots = np.ascontiguousarray(slots)
    cdef const int64_t* p = <const int64_t*>cnp.PyArray_DATA(slots)
    cdef Py_ssize_t i, n = cnp.PyArray_DIM(slots, 0)
    for i in range(n):
        if p[i] < -1 or p[i] >= num_slots:
            return p[i]
    return None


# --------------------------------------------------------------------------------------
# PageAllocator
# --------------------------------------------------------------------------------------

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
    that reaches refcount 0 while it is indexed goes on the *evictable* list instead: an
    intrusive doubly linked list (``lru_prev`` / ``lru_next`` int32 arrays) in freeing
    order. Allocation takes clean pages first, then evicts from the list's head (the
    least recently freed); a prefix hit takes a page off the list in O(1). Evictable
    pages count as free.

    Invariants (checked by :meth:`check_invariants`):

    - ``num_free + num_used == num_pages``, ``num_free = num_clean + num_evictable``;
    - a page has refcount 0 if and only if it is free, and a free page is on exactly one
      of the clean stack (not indexed) and the evictable list (indexed), once;
    - no refcount is negative.

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
        cdef int32_t n = _positive_int32(num_pages, "num_pages")
        self._num_pages = n
        free_stack = np.arange(n - 1, -1, -1, dtype=np.int32)
        refcount = np.zeros(n, dtype=np.int32)
        lru_prev = np.full(n, NO_PAGE, dtype=np.int32)
        lru_next = np.full(n, NO_PAGE, dtype=np.int32)
        self._owners = (free_stack, refcount, lru_prev, lru_next)
        self._free_stack = <page_id_t*>cnp.PyArray_DATA(free_stack)
        self._refcount = <refcount_t*>cnp.PyArray_DATA(refcount)
        self._lru_prev = <page_id_t*>cnp.PyArray_DATA(lru_prev)
        self._lru_next = <page_id_t*>cnp.PyArray_DATA(lru_next)
        self._lru_head = self._lru_tail = NO_PAGE
        self._num_evictable = 0
        self._refcount_view = _readonly_view(refcount)
        self._num_clean = n
        self._index = None

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
    def refcounts(self):
        """numpy.ndarray of int32, shape [num_pages]: read-only view of every page's refcount."""
        return self._refcount_view

    # -- C-level helpers used by PageTable; callers have validated everything ----------

    cdef void _pop(self, page_id_t* out, int32_t n) noexcept nogil:
        """Hand out ``n`` pages with refcount 1: clean ones first, then evicted ones.

        The caller has checked ``n <= num_free``.
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
        for i in range(from_clean, n):   # then evict the least recently freed cached pages
            page = self._lru_head
            self._lru_unlink(page)
            self._index.remove(page)
            rc[page] = 1
            out[i] = page

    cdef void _release(self, page_id_t page) noexcept nogil:
        """A page whose refcount just reached 0: evictable if indexed, else clean."""
        if self._index is not None and self._index._in_index[page]:
            self._lru_append(page)
        else:
            self._free_stack[self._num_clean] = page
            self._num_clean += 1

    cdef bint _decref_one(self, page_id_t page) noexcept nogil:
        """Drop one reference; release the page when it reaches 0."""
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            self._release(page)
            return True
        return False

    cdef void _lru_append(self, page_id_t page) noexcept nogil:
        self._lru_prev[page] = self._lru_tail
        self._lru_next[page] = NO_PAGE
        if self._lru_tail != NO_PAGE:
            self._lru_next[self._lru_tail] = page
        else:
            self._lru_head = page
        self._lru_tail = page
        self._num_evictable += 1

    cdef void _lru_unlink(self, page_id_t page) noexcept nogil:
        cdef page_id_t prev = self._lru_prev[page], nxt = self._lru_next[page]
        if prev != NO_PAGE:
            self._lru_next[prev] = nxt
        else:
            self._lru_head = nxt
        if nxt != NO_PAGE:
            self._lru_prev[nxt] = prev
        else:
            self._lru_tail = prev
        self._lru_prev[page] = self._lru_next[page] = NO_PAGE
        self._num_evictable -= 1

    cdef void _reclaim(self, page_id_t page) noexcept nogil:
        """Add a reference to a cached page found by a prefix hit (maybe evictable)."""
        if self._refcount[page] == 0:
            self._lru_unlink(page)
        self._refcount[page] += 1

    cdef object _page_array(self, object pages, str name):
        """``pages`` as a contiguous int32 array; InvalidPageError for an id outside the pool."""
        cdef cnp.ndarray arr
        cdef const int32_t* p32
        cdef const int64_t* p64
        cdef Py_ssize_t i, n
        if (type(pages) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>pages) == cnp.NPY_INT32
                and cnp.PyArray_NDIM(<cnp.ndarray>pages) == 1
                and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>pages)):
            arr = <cnp.ndarray>pages   # the common case: pages that kvcore handed out
            p32 = <const int32_t*>cnp.PyArray_DATA(arr)
            n = cnp.PyArray_DIM(arr, 0)
            for i in range(n):
                if <uint32_t>p32[i] >= <uint32_t>self._num_pages:
                    raise InvalidPageError(f"page {p32[i]} out of range [0, {self._num_pages})")
            return arr
        arr = _int64_array(pages, name)
        p64 = <const int64_t*>cnp.PyArray_DATA(arr)
        n = cnp.PyArray_DIM(arr, 0)
        for i in range(n):
            if p64[i] < 0 or p64[i] >= self._num_pages:
                raise InvalidPageError(f"page {p64[i]} out of range [0, {self._num_pages})")
        return arr.astype(np.int32)

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
        cdef int64_t count = _int_arg(n, "n")
        if count < 0:
            raise ValueError(f"n must be >= 0, got {count}")
        if count > self._num_clean + self._num_evictable:
            raise OutOfPagesError(count, self._num_clean + self._num_evictable)
        cdef cnp.ndarray out = _empty_int32(<Py_ssize_t>count)
        self._pop(<page_id_t*>cnp.PyArray_DATA(out), <int32_t>count)
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
        cdef cnp.ndarray arr = self._page_array(pages, "pages")
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
        cdef cnp.ndarray arr = self._page_array(pages, "pages")
        cdef const page_id_t* p = <const page_id_t*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t i, j, n = cnp.PyArray_DIM(arr, 0)
        cdef cnp.ndarray freed = _empty_int32(n)
        cdef page_id_t* f = <page_id_t*>cnp.PyArray_DATA(freed)
        cdef Py_ssize_t num_freed = 0
        cdef refcount_t* rc = self._refcount
        # Decrement, undoing everything on the first page that was already free, so a
        # page listed more often than it is referenced is caught before any change. A
        # page reaches 0 at most once in this loop (one more sighting would be the error).
        for i in range(n):
            if rc[p[i]] == 0:
                for j in range(i):
                    rc[p[j]] += 1
                raise RefcountError(f"decref of free page {p[i]} (double free)")
            rc[p[i]] -= 1
            if rc[p[i]] == 0:
                f[num_freed] = p[i]
                num_freed += 1
        cdef int32_t top
        if self._index is None:   # no prefix cache: every freed page is clean
            top = self._num_clean
            for i in range(num_freed):
                self._free_stack[top] = f[i]
                top += 1
            self._num_clean = top
        else:
            for i in range(num_freed):
                self._release(f[i])
        return freed if num_freed == n else freed[:num_freed].copy()

    def refcount(self, page_id):
        """Return the refcount of ``page_id`` (0 when free).

        Raises
        ------
        InvalidPageError
            ``page_id`` outside ``[0, num_pages)``.
        """
        cdef int64_t page = _int_arg(page_id, "page_id")
        if page < 0 or page >= self._num_pages:
            raise InvalidPageError(f"page {page} out of range [0, {self._num_pages})")
        return self._refcount[page]

    def check_invariants(self):
        """Raise :class:`KVCoreError` describing the first violated invariant."""
        cdef int32_t i, page, num_zero = 0, count = 0
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
            if self._index is not None and self._index._in_index[page]:
                raise KVCoreError(f"page {page} is on the clean stack but still indexed")
        page, prev = self._lru_head, NO_PAGE
        while page != NO_PAGE:
            if page < 0 or page >= self._num_pages or where[page]:
                raise KVCoreError(f"evictable list reaches page {page} twice or off the pool")
            where[page] = 2
            count += 1
            if self._lru_prev[page] != prev:
                raise KVCoreError(f"evictable list links of page {page} disagree")
            if self._refcount[page] != 0:
                raise KVCoreError(f"evictable page {page} has refcount {self._refcount[page]}")
            if self._index is None or not self._index._in_index[page]:
                raise KVCoreError(f"evictable page {page} is not in the prefix index")
            prev, page = page, self._lru_next[page]
        if prev != self._lru_tail or count != self._num_evictable:
            raise KVCoreError(f"evictable list has {count} pages, num_evictable says "
                              f"{self._num_evictable}")
        for page in range(self._num_pages):
            if self._refcount[page] < 0:
                raise KVCoreError(f"page {page} has negative refcount {self._refcount[page]}")
            if self._refcount[page] == 0:
                num_zero += 1
                if not where[page]:
                    raise KVCoreError(f"page {page} has refcount 0 but is not free")
        if num_zero != self.num_free:
            raise KVCoreError(f"{num_zero} pages have refcount 0 but num_free is {self.num_free}")


# --------------------------------------------------------------------------------------
# PageTable
# --------------------------------------------------------------------------------------

@cython.final
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

    Notes
    -----
    Memory representation: ``block_table`` is an int32 C array
    ``[max_seqs, max_pages_per_seq]``, ``-1`` where unmapped; ``seq_lens`` an int32
    C array ``[max_seqs]``. With ``page_size`` 16, a sequence of 45 tokens maps
    ``ceil(45 / 16) = 3`` pages, say ``[7, 2, 9, -1, ...]``; its token 40 lives at
    slot ``9 * 16 + 40 % 16 = 152`` and its ``last_page_len`` is ``45 - 2 * 16 = 13``.

    Invariants (checked by :meth:`check_invariants`, which also checks the allocator's):

    - an active sequence of ``n`` tokens maps exactly ``ceil(n / page_size)`` pages in
      columns ``0 ..``, each in use, and ``-1`` after; an inactive row is all ``-1``
      with length 0;
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
                  prefix_event_capacity=65536):
        cdef int32_t ps = _positive_int32(page_size, "page_size")
        cdef int32_t ms = _positive_int32(max_seqs, "max_seqs")
        cdef int32_t mp = _positive_int32(max_pages_per_seq, "max_pages_per_seq")
        if <int64_t>mp * ps > INT32_MAX:
            raise ValueError(
                f"max_pages_per_seq * page_size = {<int64_t>mp * ps} tokens exceeds {INT32_MAX}")
        self.allocator = allocator
        self._page_size = ps
        self._page_shift = _log2_or_minus_one(ps)
        self._max_seqs = ms
        self._max_pages_per_seq = mp
        self._num_seqs = 0
        table = np.full((ms, mp), NO_PAGE, dtype=np.int32)
        seq_lens = np.zeros(ms, dtype=np.int32)
        active = np.zeros(ms, dtype=np.uint8)
        free_seqs = np.arange(ms - 1, -1, -1, dtype=np.int32)
        seen = np.zeros(ms, dtype=np.int32)
        cow_pending = np.zeros(allocator._num_pages, dtype=np.int32)
        self._owners = (table, seq_lens, active, free_seqs, seen, cow_pending)
        self._table = <page_id_t*>cnp.PyArray_DATA(table)
        self._seq_lens = <int32_t*>cnp.PyArray_DATA(seq_lens)
        self._active = <uint8_t*>cnp.PyArray_DATA(active)
        self._free_seqs = <seq_id_t*>cnp.PyArray_DATA(free_seqs)
        self._num_free_seqs = ms
        self._seen = <int32_t*>cnp.PyArray_DATA(seen)
        self._stamp = 0
        self._cow_pending = <int32_t*>cnp.PyArray_DATA(cow_pending)
        self._block_table_view = _readonly_view(table)
        self._seq_lens_view = _readonly_view(seq_lens)
        self._prefix = None
        if enable_prefix_cache:
            if allocator._index is not None:
                raise ValueError("this allocator already serves a prefix-caching PageTable")
            self._prefix = _PrefixIndex(allocator._num_pages, ps,
                                        _int_arg(prefix_hash_bits, "prefix_hash_bits"),
                                        _int_arg(prefix_event_capacity, "prefix_event_capacity"))
            seq_ns = np.zeros(ms, dtype=np.int64)
            chain_ok = np.zeros(ms, dtype=np.uint8)
            num_chained = np.zeros(ms, dtype=np.int32)
            chain_page = np.full(ms, NO_PAGE, dtype=np.int32)
            chain_gen = np.zeros(ms, dtype=np.uint32)
            chain_hash = np.zeros(ms, dtype=np.uint64)
            self._prefix_owners = (seq_ns, chain_ok, num_chained, chain_page, chain_gen,
                                   chain_hash)
            self._seq_ns = <int64_t*>cnp.PyArray_DATA(seq_ns)
            self._chain_ok = <uint8_t*>cnp.PyArray_DATA(chain_ok)
            self._num_chained = <int32_t*>cnp.PyArray_DATA(num_chained)
            self._chain_page = <page_id_t*>cnp.PyArray_DATA(chain_page)
            self._chain_gen = <uint32_t*>cnp.PyArray_DATA(chain_gen)
            self._chain_hash = <uint64_t*>cnp.PyArray_DATA(chain_hash)
            allocator._index = self._prefix

    def __repr__(self):
        return (f"PageTable(page_size={self._page_size}, max_seqs={self._max_seqs}, "
                f"max_pages_per_seq={self._max_pages_per_seq}, num_seqs={self._num_seqs}, "
                f"allocator={self.allocator!r})")

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
        """numpy.ndarray of int32, shape [max_seqs, max_pages_per_seq]: read-only view, -1 unmapped."""
        return self._block_table_view

    @property
    def seq_lens(self):
        """numpy.ndarray of int32, shape [max_seqs]: read-only view of every row's length."""
        return self._seq_lens_view

    # -- validation helpers ----------------------------------------------------------------

    cdef int64_t _seq_arg(self, object seq_id) except -1:
        cdef int64_t s = _int_arg(seq_id, "seq_id")
        if s < 0 or s >= self._max_seqs or not self._active[s]:
            raise UnknownSequenceError(f"seq_id {s} is not active")
        return s

    cdef int _check_active(self, const int64_t* seq_ids, Py_ssize_t batch,
                           bint allow_duplicates) except -1:
        """Raise unless every seq id is active (and, unless allowed, distinct).

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
                if s < 0 or s >= max_seqs or not active[s]:
                    raise UnknownSequenceError(f"seq_id {s} is not active")
            return 0
        if self._stamp == INT32_MAX:
            (<cnp.ndarray>self._owners[4])[:] = 0
            self._stamp = 0
        self._stamp += 1
        stamp = self._stamp   # a local: stores into seen[] could otherwise alias it
        for i in range(batch):
            s = seq_ids[i]
            if s < 0 or s >= max_seqs or not active[s]:
                raise UnknownSequenceError(f"seq_id {s} is not active")
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
                                  Py_ssize_t batch, int64_t* num_copies) noexcept nogil:
        """Pages an (already validated) append would allocate, copy-on-write included.

        Replays the copy-on-write decisions in call order without touching refcounts:
        ``_cow_pending[p]`` counts the sharers of page ``p`` that have already copied
        away from it earlier in the batch. The scratch array is zeroed again before
        returning.
        """
        cdef Py_ssize_t i
        cdef int64_t s, total = 0, copies = 0
        cdef uint32_t cur, new_len
        cdef page_id_t page
        cdef uint32_t ps = <uint32_t>self._page_size
        cdef int shift = self._page_shift
        cdef refcount_t* rc = self.allocator._refcount
        cdef int32_t* pending = self._cow_pending
        cdef const int32_t* lens = self._seq_lens
        cdef const page_id_t* table = self._table
        cdef int64_t width = self._max_pages_per_seq
        for i in range(batch):
            if counts[i] == 0:
                continue
            s = seq_ids[i]
            cur = <uint32_t>lens[s]
            new_len = cur + <uint32_t>counts[i]
            total += _num_pages_for(new_len, ps, shift) - _num_pages_for(cur, ps, shift)
            if _mod(cur, ps, shift) != 0:
                page = table[s * width + _div(cur, ps, shift)]
                if rc[page] - pending[page] > 1:
                    pending[page] += 1
                    copies += 1
        if copies:
            for i in range(batch):
                s = seq_ids[i]
                cur = <uint32_t>lens[s]
                if counts[i] and _mod(cur, ps, shift) != 0:
                    pending[table[s * width + _div(cur, ps, shift)]] = 0
        num_copies[0] = copies
        return total + copies

    cdef tuple _batch_args(self, object seq_ids, object num_new_tokens):
        cdef cnp.ndarray sids = _int64_array(seq_ids, "seq_ids")
        cdef cnp.ndarray counts
        if _is_fast_int64(num_new_tokens):
            counts = <cnp.ndarray>num_new_tokens
        elif isinstance(num_new_tokens, (int, np.integer)) and not isinstance(
                num_new_tokens, (bool, np.bool_)):
            counts = np.full(cnp.PyArray_DIM(sids, 0),
                             _int_arg(num_new_tokens, "num_new_tokens"), dtype=np.int64)
        else:
            counts = _int64_array(num_new_tokens, "num_new_tokens")
        cdef Py_ssize_t i, batch = cnp.PyArray_DIM(sids, 0)
        if batch != cnp.PyArray_DIM(counts, 0):
            raise ValueError(f"seq_ids and num_new_tokens differ in length: "
                             f"{batch} != {cnp.PyArray_DIM(counts, 0)}")
        # Checks that need no state; each count <= max_tokens (< 2**31) keeps the sum exact.
        cdef const int64_t* cp = <const int64_t*>cnp.PyArray_DATA(counts)
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef int64_t total = 0
        cdef int64_t max_tokens = <int64_t>self._max_pages_per_seq * self._page_size
        for i in range(batch):
            if cp[i] < 0:
                raise ValueError(f"num_new_tokens[{i}] is {cp[i]}, must be >= 0")
            if cp[i] > max_tokens:
                raise CapacityError(
                    f"seq_id {sp[i]} would hold over {cp[i]} tokens, more than "
                    f"max_pages_per_seq * page_size = {self._max_pages_per_seq} * "
                    f"{self._page_size} = {max_tokens}")
            total += cp[i]
        return sids, counts, total

    # -- sequences -------------------------------------------------------------------------

    def add_sequence(self, tokens=None, *, namespace=0):
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
        cdef int64_t ns = _int_arg(namespace, "namespace")
        cdef cnp.ndarray tok
        if self._num_free_seqs == 0:
            raise CapacityError(f"all {self._max_seqs} sequence slots are in use")
        if tokens is None or self._prefix is None:
            return self._new_seq(ns)
        tok = _token_array(tokens, "tokens")
        cdef const int32_t* tp = <const int32_t*>cnp.PyArray_DATA(tok)
        cdef int64_t n = cnp.PyArray_DIM(tok, 0)
        cdef int64_t ps = self._page_size
        cdef int64_t max_hits = min((n - 1) // ps if n > 0 else 0, self._max_pages_per_seq)
        cdef PrefixIndex prefix = self._prefix
        # Look up first (nothing changes), then map what was found.
        cdef cnp.ndarray hits_arr = _empty_int32(max_hits)
        cdef page_id_t* hits = <page_id_t*>cnp.PyArray_DATA(hits_arr)
        cdef int64_t i, num_hits = 0
        cdef page_id_t parent = NO_PAGE, page
        cdef uint32_t parent_gen = 0
        cdef uint64_t h = 0, hh
        for i in range(max_hits):
            hh = prefix.chain_hash(h, ns, tp + i * ps)
            page = prefix.find(hh, parent, parent_gen, ns, tp + i * ps)
            if page == NO_PAGE:
                break
            if self.allocator._refcount[page] == INT32_MAX:
                raise RefcountError(f"refcount of page {page} would overflow int32")
            hits[num_hits] = page
            num_hits += 1
            parent, parent_gen, h = page, prefix._gen[page], hh
        cdef int64_t s = self._new_seq(ns)
        cdef page_id_t* row = self._table + s * self._max_pages_per_seq
        for i in range(num_hits):
            row[i] = hits[i]
            self.allocator._reclaim(hits[i])
        self._seq_lens[s] = <int32_t>(num_hits * ps)
        self._num_chained[s] = <int32_t>num_hits
        self._chain_page[s] = parent
        self._chain_gen[s] = parent_gen
        self._chain_hash[s] = h
        prefix._queries += 1
        prefix._queried_tokens += n
        prefix._hit_tokens += num_hits * ps
        return s

    cdef int64_t _new_seq(self, int64_t namespace):
        self._num_free_seqs -= 1
        cdef seq_id_t s = self._free_seqs[self._num_free_seqs]
        self._active[s] = 1
        self._seq_lens[s] = 0
        self._num_seqs += 1
        if self._prefix is not None:
            self._start_chain(s, namespace)
        return s

    cdef void _start_chain(self, int64_t s, int64_t namespace) noexcept nogil:
        self._seq_ns[s] = namespace
        self._chain_ok[s] = 1
        self._num_chained[s] = 0
        self._chain_page[s] = NO_PAGE
        self._chain_gen[s] = 0
        self._chain_hash[s] = 0

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
            raise CapacityError(f"all {self._max_seqs} sequence slots are in use")
        cdef int64_t i, npages = _ceil_div(self._seq_lens[parent], self._page_size)
        cdef page_id_t* src = self._table + parent * self._max_pages_per_seq
        for i in range(npages):
            if self.allocator._refcount[src[i]] == INT32_MAX:
                raise RefcountError(f"refcount of page {src[i]} would overflow int32")
        self._num_free_seqs -= 1
        cdef seq_id_t child = self._free_seqs[self._num_free_seqs]
        cdef page_id_t* dst = self._table + <int64_t>child * self._max_pages_per_seq
        memcpy(dst, src, npages * sizeof(page_id_t))
        for i in range(npages):
            self.allocator._refcount[src[i]] += 1
        self._seq_lens[child] = self._seq_lens[parent]
        self._active[child] = 1
        self._num_seqs += 1
        if self._prefix is not None:
            self._seq_ns[child] = self._seq_ns[parent]
            self._chain_ok[child] = self._chain_ok[parent]
            self._num_chained[child] = self._num_chained[parent]
            self._chain_page[child] = self._chain_page[parent]
            self._chain_gen[child] = self._chain_gen[parent]
            self._chain_hash[child] = self._chain_hash[parent]
        return child

    def remove(self, seq_id):
        """End ``seq_id``: drop its page references (last page first) and free the seq id.

        Raises
        ------
        UnknownSequenceError
            ``seq_id`` is not active.
        """
        cdef int64_t s = self._seq_arg(seq_id)
        cdef int64_t i, npages = _ceil_div(self._seq_lens[s], self._page_size)
        cdef page_id_t* row = self._table + s * self._max_pages_per_seq
        # Tail first: the free stack is LIFO, so a sequence's first page is reused last.
        for i in range(npages - 1, -1, -1):
            self.allocator._decref_one(row[i])
            row[i] = NO_PAGE
        self._seq_lens[s] = 0
        self._active[s] = 0
        self._free_seqs[self._num_free_seqs] = <seq_id_t>s
        self._num_free_seqs += 1
        self._num_seqs -= 1

    def is_active(self, seq_id):
        """Return whether ``seq_id`` is an active sequence (never raises for an int)."""
        cdef int64_t s = _int_arg(seq_id, "seq_id")
        return 0 <= s < self._max_seqs and self._active[s] != 0

    def active_seq_ids(self):
        """Return the active seq ids in increasing order, int32 [num_seqs] (an owned copy)."""
        return np.flatnonzero(self._owners[2]).astype(np.int32)

    # -- the scheduler step ----------------------------------------------------------------

    def pages_needed(self, seq_ids, num_new_tokens):
        """Return exactly how many pages :meth:`append` would allocate, copy-on-write included.

        Parameters are those of :meth:`append`; the same errors are raised for bad input.
        Nothing is changed.
        """
        sids, counts, _ = self._batch_args(seq_ids, num_new_tokens)
        self._check_batch(<const int64_t*>cnp.PyArray_DATA(sids),
                          <const int64_t*>cnp.PyArray_DATA(counts), cnp.PyArray_DIM(sids, 0))
        cdef int64_t copies
        return self._count_new_pages(<const int64_t*>cnp.PyArray_DATA(sids),
                                     <const int64_t*>cnp.PyArray_DATA(counts),
                                     cnp.PyArray_DIM(sids, 0), &copies)

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
            tok = _token_array(token_ids, "token_ids")
            if cnp.PyArray_DIM(tok, 0) != total_tokens:
                raise ValueError(f"token_ids holds {cnp.PyArray_DIM(tok, 0)} ids but "
                                 f"num_new_tokens add up to {total_tokens}")
        # Every Python object is made before the state is read: an allocation can run the
        # garbage collector, whose finalizers may let another thread in. From the checks
        # below to the end of the mutation only C runs, so the call is atomic.
        cdef cnp.ndarray slot_mapping = _empty_int64(<Py_ssize_t>total_tokens)
        cdef cnp.ndarray copies = _empty_int32(2 * batch)   # at most one copy per sequence
        cdef page_id_t* copy_ptr = <page_id_t*>cnp.PyArray_DATA(copies)
        cdef slot_t* slots = <slot_t*>cnp.PyArray_DATA(slot_mapping)
        self._check_batch(sp, cp, batch)
        cdef int64_t num_copies
        cdef int64_t needed = self._count_new_pages(sp, cp, batch, &num_copies)
        cdef int64_t available = self.allocator._num_clean + self.allocator._num_evictable
        if needed > available:
            raise OutOfPagesError(needed, available)
        # Validation is complete: from here on nothing can fail.
        self._append_unchecked(sp, cp, batch, slots, copy_ptr, copy_ptr + batch)
        if self._prefix is not None:
            self._register(sp, cp, batch, slots,
                           NULL if tok is None else <const int32_t*>cnp.PyArray_DATA(tok))
        if num_copies == 0:   # the common case: shared read-only empty arrays
            return _new_tuple(AppendResult, (slot_mapping, _NO_PAGES, _NO_PAGES))
        cdef cnp.ndarray copy_src = _empty_int32(<Py_ssize_t>num_copies)
        cdef cnp.ndarray copy_dst = _empty_int32(<Py_ssize_t>num_copies)
        memcpy(cnp.PyArray_DATA(copy_src), copy_ptr, num_copies * sizeof(page_id_t))
        memcpy(cnp.PyArray_DATA(copy_dst), copy_ptr + batch, num_copies * sizeof(page_id_t))
        return _new_tuple(AppendResult, (slot_mapping, copy_src, copy_dst))

    cdef void _register(self, const int64_t* seq_ids, const int64_t* counts, Py_ssize_t batch,
                        const slot_t* slots, const int32_t* tokens) noexcept:
        """Record the new token ids and index every page that just became full.

        A full page whose chain link and tokens are already indexed (another sequence
        computed the same prefix) is not indexed twice: the sequence's chain continues
        from the indexed page, so its later pages still link to what lookups will find.
        """
        cdef PrefixIndex prefix = self._prefix
        cdef int32_t* slot_tokens = prefix._slot_tokens
        cdef Py_ssize_t i
        cdef int64_t s, t, j = 0, page_idx, full, ps = self._page_size
        cdef page_id_t page, found
        cdef const int32_t* page_tokens
        cdef uint64_t h
        for i in range(batch):
            if counts[i] == 0:
                continue
            s = seq_ids[i]
            if tokens == NULL:
                self._chain_ok[s] = 0
                j += counts[i]
                continue
            for t in range(counts[i]):
                slot_tokens[slots[j + t]] = tokens[j + t]
            j += counts[i]
            if not self._chain_ok[s]:
                continue
            full = self._seq_lens[s] // ps
            for page_idx in range(self._num_chained[s], full):
                page = self._table[s * self._max_pages_per_seq + page_idx]
                page_tokens = slot_tokens + <int64_t>page * ps
                h = prefix.chain_hash(self._chain_hash[s], self._seq_ns[s], page_tokens)
                found = prefix.find(h, self._chain_page[s], self._chain_gen[s],
                                    self._seq_ns[s], page_tokens)
                if found == NO_PAGE:
                    prefix.insert(page, h, self._chain_page[s], self._chain_gen[s],
                                  self._seq_ns[s])
                    found = page
                self._chain_page[s] = found
                self._chain_gen[s] = prefix._gen[found]
                self._chain_hash[s] = h
            self._num_chained[s] = <int32_t>full

    cdef void _append_unchecked(self, const int64_t* seq_ids, const int64_t* counts,
                                Py_ssize_t batch, slot_t* slots, page_id_t* copy_src,
                                page_id_t* copy_dst) noexcept nogil:
        cdef Py_ssize_t i
        cdef int64_t s, k = 0, j = 0, base
        cdef uint32_t cur, new_len, old_pages, new_pages, p, off, off_end
        cdef uint32_t ps = <uint32_t>self._page_size
        cdef int shift = self._page_shift
        cdef page_id_t old_page, fresh
        cdef page_id_t* row
        cdef refcount_t* rc = self.allocator._refcount
        # Locals for everything read in the loop: the stores below go through int32 and
        # int64 pointers, and without strict aliasing (CPython builds with
        # -fno-strict-aliasing) each would force attributes of self to be reloaded.
        cdef int32_t* lens = self._seq_lens
        cdef page_id_t* table = self._table
        cdef int64_t width = self._max_pages_per_seq
        for i in range(batch):
            if counts[i] == 0:
                continue
            s = seq_ids[i]
            cur = <uint32_t>lens[s]
            new_len = cur + <uint32_t>counts[i]
            row = table + s * width
            old_pages = _num_pages_for(cur, ps, shift)
            new_pages = _num_pages_for(new_len, ps, shift)
            if _mod(cur, ps, shift) != 0:
                old_page = row[old_pages - 1]
                if rc[old_page] > 1:
                    self.allocator._pop(&fresh, 1)
                    row[old_pages - 1] = fresh
                    if self._prefix is not None:   # the host copy of the page's token ids
                        memcpy(self._prefix._slot_tokens + <int64_t>fresh * ps,
                               self._prefix._slot_tokens + <int64_t>old_page * ps,
                               ps * sizeof(int32_t))
                    rc[old_page] -= 1   # still >= 1: it stays shared
                    copy_src[k] = old_page
                    copy_dst[k] = fresh
                    k += 1
            if new_pages != old_pages:
                self.allocator._pop(row + old_pages, <int32_t>(new_pages - old_pages))
            # Page by page, so the per-token loop has no division.
            p = _div(cur, ps, shift)
            off = _mod(cur, ps, shift)
            while p < new_pages:
                base = <int64_t>row[p] * ps
                off_end = ps if p + 1 < new_pages else new_len - p * ps
                while off < off_end:
                    slots[j] = base + off
                    j += 1
                    off += 1
                off = 0
                p += 1
            lens[s] = <int32_t>new_len

    # -- queries -----------------------------------------------------------------------------

    def num_tokens(self, seq_id):
        """Return the length of ``seq_id`` in tokens."""
        return self._seq_lens[self._seq_arg(seq_id)]

    def pages(self, seq_id):
        """Return the pages of ``seq_id`` in order: int32 [ceil(num_tokens / page_size)], a copy."""
        cdef int64_t s = self._seq_arg(seq_id)
        cdef int64_t npages = _ceil_div(self._seq_lens[s], self._page_size)
        return self._block_table_view[s, :npages].copy()

    def slot(self, seq_id, token_idx):
        """Return the slot of token ``token_idx`` of ``seq_id``.

        Raises
        ------
        UnknownSequenceError
            ``seq_id`` is not active.
        IndexError
            ``token_idx`` outside ``[0, num_tokens(seq_id))``.
        """
        cdef int64_t s = self._seq_arg(seq_id)
        cdef int64_t t = _int_arg(token_idx, "token_idx")
        if t < 0 or t >= self._seq_lens[s]:
            raise IndexError(
                f"token_idx {t} out of range [0, {self._seq_lens[s]}) for seq_id {s}")
        cdef page_id_t page = self._table[s * self._max_pages_per_seq + t // self._page_size]
        return <int64_t>page * self._page_size + t % self._page_size

    def flashinfer_metadata(self, seq_ids):
        """Build FlashInfer's paged-KV index arrays for a batch.

        Parameters
        ----------
        seq_ids : array_like of int, shape [B]
            Active sequences (repeats allowed), in batch order.

        Returns
        -------
        page_indptr : numpy.ndarray of int32, shape [B + 1]
            ``page_indptr[0] = 0``; sequence ``b`` owns ``page_indices[page_indptr[b]:page_indptr[b+1]]``.
        page_indices : numpy.ndarray of int32, shape [page_indptr[B]]
            The pages of every sequence, in order.
        last_page_len : numpy.ndarray of int32, shape [B]
            Tokens in each sequence's last page: in ``[1, page_size]``, or 0 for an empty sequence.

        Notes
        -----
        45 tokens with page size 16 use 3 pages, the last holding ``45 - 2 * 16 = 13``.
        """
        cdef cnp.ndarray sids = _int64_array(seq_ids, "seq_ids")
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef Py_ssize_t b, batch = cnp.PyArray_DIM(sids, 0)
        self._check_active(sp, batch, True)
        cdef cnp.ndarray indptr_arr = _empty_int32(batch + 1)
        cdef cnp.ndarray last_arr = _empty_int32(batch)
        cdef int32_t* indptr = <int32_t*>cnp.PyArray_DATA(indptr_arr)
        cdef int32_t* last = <int32_t*>cnp.PyArray_DATA(last_arr)
        cdef int64_t nnz = 0
        cdef uint32_t n, ps = <uint32_t>self._page_size
        cdef int shift = self._page_shift
        indptr[0] = 0
        for b in range(batch):
            n = <uint32_t>self._seq_lens[sp[b]]
            nnz += _num_pages_for(n, ps, shift)
            indptr[b + 1] = <int32_t>nnz
            last[b] = 0 if n == 0 else <int32_t>(_mod(n - 1, ps, shift) + 1)
        if nnz > INT32_MAX:
            raise OverflowError("page_indices would exceed int32 indexing")
        cdef cnp.ndarray indices_arr = _empty_int32(<Py_ssize_t>nnz)
        cdef page_id_t* indices = <page_id_t*>cnp.PyArray_DATA(indices_arr)
        for b in range(batch):
            memcpy(indices + indptr[b], self._table + sp[b] * self._max_pages_per_seq,
                   (indptr[b + 1] - indptr[b]) * sizeof(page_id_t))
        return indptr_arr, indices_arr, last_arr

    def block_tables(self, seq_ids):
        """Return vLLM-style block tables for a batch: int32 [B, max pages among them], -1 padded.

        Parameters
        ----------
        seq_ids : array_like of int, shape [B]
            Active sequences (repeats allowed).
        """
        cdef cnp.ndarray sids = _int64_array(seq_ids, "seq_ids")
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(sids)
        cdef Py_ssize_t b, batch = cnp.PyArray_DIM(sids, 0)
        self._check_active(sp, batch, True)
        cdef int64_t width = 0, npages
        for b in range(batch):
            npages = _ceil_div(self._seq_lens[sp[b]], self._page_size)
            if npages > width:
                width = npages
        out = np.full((batch, width), NO_PAGE, dtype=np.int32)
        cdef page_id_t* dst = <page_id_t*>cnp.PyArray_DATA(out)
        for b in range(batch):
            npages = _ceil_div(self._seq_lens[sp[b]], self._page_size)
            memcpy(dst + b * width, self._table + sp[b] * self._max_pages_per_seq,
                   npages * sizeof(page_id_t))
        return out

    # -- prefix cache --------------------------------------------------------------------------

    @property
    def prefix_cache_enabled(self):
        """bool: whether this table caches prefixes."""
        return self._prefix is not None

    @property
    def num_cached_pages(self):
        """int: pages in the prefix index (in use or evictable); 0 when caching is off."""
        return 0 if self._prefix is None else self._prefix._num_indexed

    @property
    def prefix_stats(self):
        """dict or None: ``queries``, ``queried_tokens``, ``hit_tokens``, ``stored``,
        ``evictions``, ``events_dropped``, ``num_cached_pages`` and ``hit_rate``
        (hit_tokens / queried_tokens); None when caching is off."""
        if self._prefix is None:
            return None
        stats = self._prefix.stats()
        stats["num_cached_pages"] = self._prefix._num_indexed
        stats["hit_rate"] = (stats["hit_tokens"] / stats["queried_tokens"]
                             if stats["queried_tokens"] else 0.0)
        return stats

    def take_events(self):
        """Return and clear the cache's events since the last call, oldest first.

        Returns
        -------
        kind : numpy.ndarray of uint8, shape [n]
            1 (``kvcore.EVENT_STORED``) or 2 (``kvcore.EVENT_EVICTED``).
        page_id : numpy.ndarray of int32, shape [n]
        page_hash : numpy.ndarray of uint64, shape [n]
            The page's chained hash (prefix, namespace and tokens): what a KV-aware
            router compares across replicas.

        Notes
        -----
        At most ``prefix_event_capacity`` events are kept; older ones are dropped and
        counted in ``prefix_stats["events_dropped"]``. Empty arrays when caching is off.
        """
        if self._prefix is None:
            return (np.empty(0, np.uint8), np.empty(0, np.int32), np.empty(0, np.uint64))
        return self._prefix.take_events()

    def _slot_token(self, page_id, offset):
        """Token id recorded for slot (page_id, offset) (for tests)."""
        return self._prefix._slot_tokens[<int64_t>page_id * self._page_size + offset]

    def clear_prefix_cache(self):
        """Forget every cached prefix: evictable pages become clean, pages in use stay
        mapped but are no longer found by lookups. Emits an evicted event per page."""
        if self._prefix is None:
            return
        cdef page_id_t page
        cdef PageAllocator alloc = self.allocator
        for page in range(alloc._num_pages):
            if self._prefix._in_index[page]:
                self._prefix.remove(page)
                if alloc._refcount[page] == 0:
                    alloc._lru_unlink(page)
                    alloc._free_stack[alloc._num_clean] = page
                    alloc._num_clean += 1

    # -- checking ----------------------------------------------------------------------------

    def check_invariants(self):
        """Raise :class:`KVCoreError` describing the first violated invariant.

        Checks the allocator's invariants, every row of the block table against its
        length, refcounts against table references, and the seq-id bookkeeping.
        """
        self.allocator.check_invariants()
        if self._prefix is not None:
            self._prefix.check()
        cdef int32_t num_pages = self.allocator._num_pages
        refs_arr = np.zeros(num_pages, dtype=np.int64)
        cdef int64_t[::1] refs = refs_arr
        cdef int64_t s, c, npages, active_count = 0
        cdef page_id_t page
        cdef page_id_t* row
        for s in range(self._max_seqs):
            row = self._table + s * self._max_pages_per_seq
            if self._active[s]:
                active_count += 1
                if self._seq_lens[s] < 0:
                    raise KVCoreError(f"seq_id {s} has negative length {self._seq_lens[s]}")
                npages = _ceil_div(self._seq_lens[s], self._page_size)
            else:
                if self._seq_lens[s] != 0:
                    raise KVCoreError(f"inactive seq_id {s} has length {self._seq_lens[s]}")
                npages = 0
            for c in range(self._max_pages_per_seq):
                page = row[c]
                if c < npages:
                    if page < 0 or page >= num_pages:
                        raise KVCoreError(
                            f"seq_id {s} position {c} maps page {page}, outside the pool")
                    refs[page] += 1
                elif page != NO_PAGE:
                    raise KVCoreError(
                        f"seq_id {s} of {self._seq_lens[s]} tokens maps page {page} at "
                        f"position {c}, past its ceil(len / page_size) = {npages} pages")
        for page in range(num_pages):
            if refs[page] != self.allocator._refcount[page]:
                raise KVCoreError(f"page {page} has refcount {self.allocator._refcount[page]} "
                                  f"but {refs[page]} block-table references")
        if active_count != self._num_seqs:
            raise KVCoreError(f"{active_count} rows are active but num_seqs is {self._num_seqs}")
        if self._num_free_seqs + self._num_seqs != self._max_seqs:
            raise KVCoreError(f"{self._num_free_seqs} free seq ids + {self._num_seqs} active "
                              f"!= max_seqs {self._max_seqs}")
        seen = set()
        for c in range(self._num_free_seqs):
            s = self._free_seqs[c]
            if s < 0 or s >= self._max_seqs or self._active[s] or s in seen:
                raise KVCoreError(f"free seq-id stack entry {c} ({s}) is invalid")
            seen.add(s)
