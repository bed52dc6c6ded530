# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Filling one step's metadata buffers in a single C pass (see :mod:`kvcore.metadata`).

Everything is derived from the batch's FlashInfer triple (``page_indptr``,
``page_indices``, ``last_page_len``, as :meth:`PageTable.flashinfer_metadata` returns
it) and the step's ``slot_mapping``; the function never reads a page table, so it is
a pure function of its arguments.

Worked example, page size 16, two sequences of 45 and 16 tokens, capacity 4 sequences:
``page_indptr = [0, 3, 4]`` and ``last_page_len = [13, 16]`` give
``seq_lens = [45, 16, 0, 0]`` (``(3 - 1) * 16 + 13 = 45``),
``token_indptr = [0, 45, 61, 61, 61]`` and, in the buffer,
``page_indptr = [0, 3, 4, 4, 4]``.
"""

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t
from libc.string cimport memcpy

from kvcore.errors import CapacityError

cnp.import_array()


cdef inline void _fill32(int32_t* p, Py_ssize_t n, int32_t value) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = value


cdef inline void _fill64(int64_t* p, Py_ssize_t n, int64_t value) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = value


cdef inline void* _data(cnp.ndarray array, int type_num, int ndim, str name) except NULL:
    if (cnp.PyArray_TYPE(array) != type_num or cnp.PyArray_NDIM(array) != ndim
            or not cnp.PyArray_IS_C_CONTIGUOUS(array) or not cnp.PyArray_ISNOTSWAPPED(array)):
        raise TypeError(f"{name} must be a C-contiguous native array of the right dtype")
    return cnp.PyArray_DATA(array)


def fill_step(cnp.ndarray page_indptr not None, cnp.ndarray page_indices not None,
              cnp.ndarray last_page_len not None, cnp.ndarray slot_mapping not None,
              int64_t page_size, dict out not None, cnp.ndarray high not None):
    """Write a step's metadata into host staging buffers, padding included.

    Parameters
    ----------
    page_indptr, page_indices, last_page_len : numpy.ndarray of int32
        The batch's FlashInfer triple, shapes [B + 1], [page_indptr[B]], [B].
    slot_mapping : numpy.ndarray of int64, shape [T]
        Already range-checked.
    page_size : int
    out : dict of numpy.ndarray
        The staging regions (``page_indptr`` int32 [cap_B + 1], ``last_page_len`` and
        ``seq_lens`` int32 [cap_B], ``token_indptr`` int64 [cap_B + 1],
        ``slot_mapping`` int64 [cap_T], ``page_indices`` int32 [cap_N], optionally
        ``block_tables`` int32 [cap_B, W]); written in place.
    high : numpy.ndarray of int64, shape [4]
        This staging buffer's high-water marks (slots, page entries, block-table rows,
        block-table columns): past them the regions already hold padding. Updated.

    Returns
    -------
    int
        Tokens of the batch (``token_indptr[B]``).

    Raises
    ------
    CapacityError
        A sequence maps more pages than ``block_tables`` has columns; nothing is written.
    """
    cdef const int32_t* indptr = <const int32_t*>_data(page_indptr, cnp.NPY_INT32, 1,
                                                       "page_indptr")
    cdef const int32_t* indices = <const int32_t*>_data(page_indices, cnp.NPY_INT32, 1,
                                                        "page_indices")
    cdef const int32_t* last = <const int32_t*>_data(last_page_len, cnp.NPY_INT32, 1,
                                                     "last_page_len")
    cdef const int64_t* slots = <const int64_t*>_data(slot_mapping, cnp.NPY_INT64, 1,
                                                      "slot_mapping")
    cdef int64_t* hw = <int64_t*>_data(high, cnp.NPY_INT64, 1, "high")
    cdef cnp.ndarray o_indptr = out["page_indptr"], o_last = out["last_page_len"]
    cdef cnp.ndarray o_lens = out["seq_lens"], o_tok = out["token_indptr"]
    cdef cnp.ndarray o_slots = out["slot_mapping"], o_indices = out["page_indices"]
    cdef object o_tables = out.get("block_tables")
    cdef Py_ssize_t batch = cnp.PyArray_DIM(last_page_len, 0)
    cdef Py_ssize_t cap_b = cnp.PyArray_DIM(o_last, 0)
    cdef Py_ssize_t num_tokens = cnp.PyArray_DIM(slot_mapping, 0)
    cdef Py_ssize_t nnz = indptr[batch]
    cdef Py_ssize_t b, n, width = 0, cols = 0
    if (cnp.PyArray_DIM(page_indptr, 0) != batch + 1 or cnp.PyArray_DIM(page_indices, 0) != nnz
            or batch > cap_b or num_tokens > cnp.PyArray_DIM(o_slots, 0)
            or nnz > cnp.PyArray_DIM(o_indices, 0) or cnp.PyArray_DIM(high, 0) != 4):
        raise ValueError("fill_step: arrays do not fit their capacities")
    for b in range(batch):
        n = indptr[b + 1] - indptr[b]
        if n > width:
            width = n
    cdef int32_t* tables = NULL
    if o_tables is not None:
        cols = cnp.PyArray_DIM(<cnp.ndarray>o_tables, 1)
        if width > cols:
            raise CapacityError(f"a sequence maps {width} pages, above max_pages_per_seq "
                                f"{cols}")
        tables = <int32_t*>_data(<cnp.ndarray>o_tables, cnp.NPY_INT32, 2, "block_tables")
    cdef int32_t* p_indptr = <int32_t*>_data(o_indptr, cnp.NPY_INT32, 1, "out page_indptr")
    cdef int32_t* p_last = <int32_t*>_data(o_last, cnp.NPY_INT32, 1, "out last_page_len")
    cdef int32_t* p_lens = <int32_t*>_data(o_lens, cnp.NPY_INT32, 1, "out seq_lens")
    cdef int64_t* p_tok = <int64_t*>_data(o_tok, cnp.NPY_INT64, 1, "out token_indptr")
    cdef int64_t* p_slots = <int64_t*>_data(o_slots, cnp.NPY_INT64, 1, "out slot_mapping")
    cdef int32_t* p_indices = <int32_t*>_data(o_indices, cnp.NPY_INT32, 1, "out page_indices")
    # -- validated; write
    cdef int64_t length, total = 0
    p_tok[0] = 0
    for b in range(batch):
        n = indptr[b + 1] - indptr[b]
        length = 0 if n == 0 else (n - 1) * page_size + last[b]
        p_indptr[b] = indptr[b]
        p_last[b] = last[b]
        p_lens[b] = <int32_t>length
        total += length
        p_tok[b + 1] = total
    p_indptr[batch] = <int32_t>nnz
    _fill32(p_indptr + batch + 1, cap_b - batch, <int32_t>nnz)
    _fill32(p_last + batch, cap_b - batch, 0)
    _fill32(p_lens + batch, cap_b - batch, 0)
    _fill64(p_tok + batch + 1, cap_b - batch, total)
    memcpy(p_slots, slots, num_tokens * sizeof(int64_t))
    if hw[0] > num_tokens:
        _fill64(p_slots + num_tokens, hw[0] - num_tokens, -1)
    hw[0] = num_tokens
    memcpy(p_indices, indices, nnz * sizeof(int32_t))
    if hw[1] > nnz:
        _fill32(p_indices + nnz, hw[1] - nnz, -1)
    hw[1] = nnz
    if tables != NULL:
        for b in range(batch):
            n = indptr[b + 1] - indptr[b]
            memcpy(tables + b * cols, indices + indptr[b], n * sizeof(int32_t))
            if hw[3] > n:
                _fill32(tables + b * cols + n, hw[3] - n, -1)
        for b in range(batch, hw[2]):
            _fill32(tables + b * cols, hw[3], -1)
        hw[2] = batch
        hw[3] = width
    return total
