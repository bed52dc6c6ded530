# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Kernel launches through the CUDA driver's ``cuLaunchKernel``, called from C.

A launch from Python should cost what the driver costs and little more: CuPy's generic
``RawKernel.__call__`` inspects every argument on every call, and a ctypes argument
pack pays a Python attribute set per argument. Here a :class:`KernelLauncher` keeps the
kernel's fixed ("bound") arguments in a C array, a call converts only the leading ones
from Python ints into a C array on its own stack (so concurrent calls from several
threads never share a pack), and calls ``cuLaunchKernel`` through a function pointer
with the GIL released.

The driver library is not linked: the pointer to ``cuLaunchKernel`` is looked up at run
time (``kvcore.backends.cuda_kernels`` finds it in ``libcuda``), so this module builds on
any machine, with or without CUDA.

Argument packing, worked example: kinds ``"pqi"`` and values ``(0x7f0000, 5, 3)`` give
``values = [0x7f0000, 5, 3]`` in three 8-byte cells (the ``i`` stored as a 4-byte int at
the start of its cell) and ``params = [&values[0], &values[1], &values[2]]``, which is
what ``cuLaunchKernel(..., kernelParams=params, extra=NULL)`` reads.
"""

from libc.stdint cimport int32_t, int64_t, uint64_t, uintptr_t

ctypedef int (*launch_kernel_t)(void* f, unsigned int grid_x, unsigned int grid_y,
                                unsigned int grid_z, unsigned int block_x,
                                unsigned int block_y, unsigned int block_z,
                                unsigned int shared_bytes, void* stream, void** params,
                                void** extra) noexcept nogil

cdef enum:
    MAX_ARGS = 32


cdef class KernelLauncher:
    """One kernel, its bound arguments set once; calling it launches on a given stream.

    Parameters
    ----------
    launch_kernel : int
        Address of the driver's ``cuLaunchKernel``.
    function : int
        The ``CUfunction`` handle (for example ``cupy.RawKernel.kernel.ptr``).
    kinds : str
        One letter per kernel argument: ``p`` pointer, ``q`` int64, ``i`` int32.
    bound : tuple of int
        Values of the last ``len(bound)`` arguments.
    on_error : callable
        Called with the driver's status code when a launch fails; should raise.
    """

    cdef launch_kernel_t _launch
    cdef void* _function
    cdef int _num_args
    cdef int _num_leading
    cdef char _kinds[MAX_ARGS]
    cdef int64_t _bound[MAX_ARGS]
    cdef object _on_error
    cdef readonly str kinds

    def __init__(self, uintptr_t launch_kernel, uintptr_t function, str kinds, tuple bound,
                 on_error):
        cdef int i
        if launch_kernel == 0 or function == 0:
            raise ValueError("launch_kernel and function must be non-null addresses")
        if not 0 < len(kinds) <= MAX_ARGS:
            raise ValueError(f"a kernel takes 1..{MAX_ARGS} arguments, got {len(kinds)}")
        if len(bound) > len(kinds):
            raise ValueError("more bound values than arguments")
        self._launch = <launch_kernel_t>launch_kernel
        self._function = <void*>function
        self._num_args = len(kinds)
        self._num_leading = len(kinds) - len(bound)
        self._on_error = on_error
        self.kinds = kinds
        for i in range(self._num_args):
            if kinds[i] not in "pqi":
                raise ValueError(f"unknown argument kind {kinds[i]!r} (expected p, q or i)")
            self._kinds[i] = ord(kinds[i])
        for i in range(len(bound)):
            _pack(&self._bound[self._num_leading + i], self._kinds[self._num_leading + i],
                  bound[i])

    @property
    def num_leading(self) -> int:
        """How many arguments a call passes (the rest are bound)."""
        return self._num_leading

    def __call__(self, unsigned int grid, unsigned int block, uintptr_t stream, *args):
        """Launch ``grid`` blocks of ``block`` threads on ``stream`` (a ``cudaStream_t``).

        ``args`` are the leading arguments: Python ints (device pointers as addresses).
        """
        cdef int64_t values[MAX_ARGS]
        cdef void* params[MAX_ARGS]
        cdef int i, status
        cdef int n = self._num_leading
        if len(args) != n:
            raise TypeError(f"kernel takes {n} leading arguments, got {len(args)}")
        for i in range(n):
            _pack(&values[i], self._kinds[i], args[i])
            params[i] = &values[i]
        for i in range(n, self._num_args):
            values[i] = self._bound[i]
            params[i] = &values[i]
        with nogil:
            status = self._launch(self._function, grid, 1, 1, block, 1, 1, 0,
                                  <void*>stream, params, NULL)
        if status != 0:
            self._on_error(status)


cdef inline int _pack(int64_t* cell, char kind, object value) except -1:
    """Store ``value`` in ``cell`` as the C type of ``kind``."""
    if kind == b'p':
        (<uint64_t*>cell)[0] = <uint64_t>(<uintptr_t>value)
    elif kind == b'q':
        cell[0] = <int64_t>value
    else:
        cell[0] = 0
        (<int32_t*>cell)[0] = <int32_t>value
    return 0
