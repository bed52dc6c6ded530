# cython: language_level=3
"""The shared argument checkers of the host core (see _args.pyx).

One checker per kind of argument, so the same mistake raises the same error type with
the same message in every module: a non-integer is ``TypeError``, a value outside its
range or an array of the wrong shape is ``ValueError``, a page id outside the pool is
``InvalidPageError``.
"""

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t


cdef inline bint is_fast_array(object obj, int type_num) noexcept:
    """Whether ``obj`` is already a 1-D C-contiguous native-order ndarray of ``type_num``
    (used as is; anything else is converted)."""
    return (type(obj) is cnp.ndarray
            and cnp.PyArray_TYPE(<cnp.ndarray>obj) == type_num
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>obj)   # >i8 has the same type number
            and cnp.PyArray_NDIM(<cnp.ndarray>obj) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>obj))


cdef inline bint is_fast_int64(object obj) noexcept:
    return is_fast_array(obj, cnp.NPY_INT64)


cdef inline bint is_fast_int32(object obj) noexcept:
    return is_fast_array(obj, cnp.NPY_INT32)


cdef inline cnp.ndarray empty_int32(Py_ssize_t n):
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    return cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT32, 0)


cdef inline cnp.ndarray empty_int64(Py_ssize_t n):
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    return cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT64, 0)


cdef cnp.ndarray int64_array(object obj, str name)
cdef int64_t int_arg(object value, str name) except? -1
cdef int32_t positive_int32(object value, str name) except -1
cdef cnp.ndarray token_array(object tokens, str name)
cdef cnp.ndarray page_array(object pages, str name, int32_t num_pages)
cdef int32_t page_arg(object page_id, str name, int32_t num_pages) except -1
cdef object readonly_view(cnp.ndarray owner)
cdef int check_page_range(const int32_t* pages, Py_ssize_t n, int32_t num_pages) except -1
