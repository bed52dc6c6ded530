# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Argument normalisation for the host core: one typed checker per kind of argument.

Every public method of ``PageAllocator``, ``PageTable`` and the prefix cache turns its
arguments into C values through these functions, declared in ``_args.pxd``, so one kind
of mistake gets one error type and one message everywhere:

========================================  ======================  =========================
mistake                                   error                   message names
========================================  ======================  =========================
not an integer (float, bool, str, ...)    ``TypeError``           the argument
integer outside int64 / its range         ``ValueError``          the argument and value
array not 1-D                             ``ValueError``          the argument and shape
array of a non-integer dtype              ``TypeError``           the argument and dtype
token id outside ``[0, 2**31 - 1]``       ``ValueError``          ``name[i]`` and value
page id outside ``[0, num_pages)``        ``InvalidPageError``    the page and the range
========================================  ======================  =========================
"""

import operator

import numpy as np

cimport cython
cimport numpy as cnp
from libc.stdint cimport INT32_MAX, int32_t, int64_t, uint32_t

from kvcore.errors import InvalidPageError

cnp.import_array()


cdef cnp.ndarray int64_array(object obj, str name):
    """Return ``obj`` as a 1-D C-contiguous int64 array (``obj`` itself when it already is).

    Accepts lists, tuples and integer NumPy arrays of any width; rejects bools and
    floats with ``TypeError`` and values outside int64 with ``ValueError``.
    """
    if is_fast_int64(obj):
        return <cnp.ndarray>obj
    cdef cnp.ndarray arr
    cdef Py_ssize_t i, n
    cdef int64_t* dst
    if type(obj) is list or type(obj) is tuple:
        # Schedulers often pass short Python lists; filling the array in C skips
        # NumPy's type discovery. Anything but exact ints takes the general path.
        n = len(obj)
        arr = empty_int64(n)
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
    except Exception as exc:   # a caller's __array__ / __len__ may raise anything
        raise TypeError(f"{name} could not be read as an array ({exc!r})") from exc
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


cdef int64_t int_arg(object value, str name) except? -1:
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


cdef int32_t positive_int32(object value, str name) except -1:
    """An integer in ``[1, 2**31 - 1]`` (a size or a count of slots)."""
    cdef int64_t v = int_arg(value, name)
    if v < 1 or v > INT32_MAX:
        raise ValueError(f"{name} must be in [1, {INT32_MAX}], got {v}")
    return <int32_t>v


cdef cnp.ndarray token_array(object tokens, str name):
    """``tokens`` as a contiguous int32 array of ids in ``[0, 2**31 - 1]``."""
    cdef Py_ssize_t i, n
    cdef const int32_t* p32
    if is_fast_int32(tokens):
        p32 = <const int32_t*>cnp.PyArray_DATA(<cnp.ndarray>tokens)
        n = cnp.PyArray_DIM(<cnp.ndarray>tokens, 0)
        for i in range(n):
            if p32[i] < 0:
                raise ValueError(f"{name}[{i}] is {p32[i]}, token ids must be in "
                                 f"[0, {INT32_MAX}]")
        return <cnp.ndarray>tokens
    cdef cnp.ndarray arr = int64_array(tokens, name)
    cdef const int64_t* p = <const int64_t*>cnp.PyArray_DATA(arr)
    n = cnp.PyArray_DIM(arr, 0)
    for i in range(n):
        if p[i] < 0 or p[i] > INT32_MAX:
            raise ValueError(f"{name}[{i}] is {p[i]}, token ids must be in [0, {INT32_MAX}]")
    return arr.astype(np.int32)


cdef cnp.ndarray page_array(object pages, str name, int32_t num_pages):
    """``pages`` as a contiguous int32 array; InvalidPageError for an id outside the pool."""
    cdef cnp.ndarray arr
    cdef const int32_t* p32
    cdef const int64_t* p64
    cdef Py_ssize_t i, n
    if is_fast_int32(pages):
        arr = <cnp.ndarray>pages   # the common case: pages that kvcore handed out
        p32 = <const int32_t*>cnp.PyArray_DATA(arr)
        n = cnp.PyArray_DIM(arr, 0)
        for i in range(n):
            if <uint32_t>p32[i] >= <uint32_t>num_pages:
                raise InvalidPageError(f"page {p32[i]} out of range [0, {num_pages})")
        return arr
    arr = int64_array(pages, name)
    p64 = <const int64_t*>cnp.PyArray_DATA(arr)
    n = cnp.PyArray_DIM(arr, 0)
    for i in range(n):
        if p64[i] < 0 or p64[i] >= num_pages:
            raise InvalidPageError(f"page {p64[i]} out of range [0, {num_pages})")
    return arr.astype(np.int32)


cdef int32_t page_arg(object page_id, str name, int32_t num_pages) except -1:
    """One page id in ``[0, num_pages)``; InvalidPageError otherwise."""
    cdef int64_t page = int_arg(page_id, name)
    if page < 0 or page >= num_pages:
        raise InvalidPageError(f"page {page} out of range [0, {num_pages})")
    return <int32_t>page


cdef int check_page_range(const int32_t* pages, Py_ssize_t n, int32_t num_pages) except -1:
    """InvalidPageError for the first of ``pages[0:n]`` outside ``[0, num_pages)``."""
    cdef Py_ssize_t i
    for i in range(n):
        if <uint32_t>pages[i] >= <uint32_t>num_pages:
            raise InvalidPageError(f"page {pages[i]} out of range [0, {num_pages})")
    return 0


@cython.final
cdef class _Keepalive:
    """The ``.base`` of a read-only view: keeps the owner alive without exposing it.

    It has no attributes and no buffer interface, so neither ``view.base`` leads back to
    the writable owner nor can NumPy switch the view's write flag back on (NumPy only
    allows that when the base chain ends in a writable buffer).
    """
    cdef object _owner


cdef object readonly_view(cnp.ndarray owner):
    """A read-only view of ``owner`` (the owner itself stays writable for the core)."""
    cdef _Keepalive keep = _Keepalive()
    keep._owner = owner
    cdef cnp.ndarray view = cnp.PyArray_New(
        cnp.ndarray, cnp.PyArray_NDIM(owner), cnp.PyArray_DIMS(owner),
        cnp.PyArray_TYPE(owner), cnp.PyArray_STRIDES(owner), cnp.PyArray_DATA(owner),
        0, cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED, None)
    cnp.set_array_base(view, keep)
    return view


def first_slot_out_of_range(cnp.ndarray slots not None, int64_t num_slots):
    """Return the first entry of int64 ``slots`` outside ``[-1, num_slots)``, or None.

    One C pass; NumPy's ``min()`` and ``max()`` cost a few µs each on decode-size arrays.
    """
    # Any native 8-byte signed integer (int64, and longlong, whose type number differs);
    # a byte-swapped >i8 has the same type number as int64 and must not pass.
    if ((<cnp.dtype>cnp.PyArray_DESCR(slots)).kind != b"i" or cnp.PyArray_ITEMSIZE(slots) != 8
            or not cnp.PyArray_ISNOTSWAPPED(slots) or cnp.PyArray_NDIM(slots) != 1):
        raise TypeError("slots must be a 1-D native int64 array")
    slots = np.ascontiguousarray(slots)
    cdef const int64_t* p = <const int64_t*>cnp.PyArray_DATA(slots)
    cdef Py_ssize_t i, n = cnp.PyArray_DIM(slots, 0)
    for i in range(n):
        if p[i] < -1 or p[i] >= num_slots:
            return p[i]
    return None


def int64_copy(obj, name="seq_ids"):
    """A 1-D int64 NumPy array owned by the caller, converted and checked exactly as
    every batch argument of the core is (for Python code that must keep what a core
    call was given: the core converts once, and so must its caller)."""
    cdef cnp.ndarray arr = int64_array(obj, name)
    return arr.copy() if arr is obj else arr
