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
        cdef int64_t leading[MAX_ARGS]
        cdef int i
        cdef int n = self._num_leading
        if len(args) != n:
            raise TypeError(f"kernel takes {n} leading arguments, got {len(args)}")
        for i in range(n):
            _pack(&leading[i], self._kinds[i], args[i])
        self.launch_packed(grid, block, stream, leading)

    cdef int launch_packed(self, unsigned int grid, unsigned int block, uintptr_t stream,
                           const int64_t* leading) except -1:
        """Launch with the leading arguments already packed into 8-byte cells."""
        cdef int64_t values[MAX_ARGS]
        cdef void* params[MAX_ARGS]
        cdef int i, status
        for i in range(self._num_leading):
            values[i] = leading[i]
            params[i] = &values[i]
        for i in range(self._num_leading, self._num_args):
            values[i] = self._bound[i]
            params[i] = &values[i]
        with nogil:
            status = self._launch(self._function, grid, 1, 1, block, 1, 1, 0,
                                  <void*>stream, params, NULL)
        if status != 0:
            self._on_error(status)
        return 0


cdef class TorchScatter:
    """The ``write`` hot path for torch tensors, in C: read ``k``, ``v`` (and a device
    ``slot_mapping``), check them, pick the vector width and launch the scatter kernel.

    :meth:`write` returns False, having done nothing, whenever its inputs are not the
    plain case (torch tensors of the pool's dtype on the cache's device, shape
    ``[T, H, D]`` with a contiguous last axis, a contiguous int64 ``slot_mapping`` of
    ``T`` entries); the caller then takes the general path, which converts what it can
    and raises the typed error otherwise. The plain case costs a dozen attribute reads
    and one ``cuLaunchKernel``; the only Python objects made are the shape and stride
    tuples torch returns.

    Parameters
    ----------
    tensor_type, dtype, int64_dtype : torch objects
        ``torch.Tensor``, the pool's torch dtype, ``torch.int64``.
    device : int
    num_heads, head_dim, itemsize : int
    pool_align : int
        Every pool address and the page stride OR-ed (alignment they share).
    k_pools, v_pools : tuple of int
        Each layer's K and V page-0 addresses.
    launchers : tuple of KernelLauncher
        The scatter kernel at vector widths 16, 8, 4, 2 bytes (None where unusable).
    max_grid : int
    """

    cdef object _tensor_type, _dtype, _int64
    cdef int64_t _device, _heads, _dim, _item, _row_bytes, _pool_align, _max_grid
    cdef tuple _k_pools, _v_pools, _launchers

    def __init__(self, tensor_type, dtype, int64_dtype, int64_t device, int64_t num_heads,
                 int64_t head_dim, int64_t itemsize, int64_t pool_align, tuple k_pools,
                 tuple v_pools, tuple launchers, int64_t max_grid):
        if len(launchers) != 4 or not all(l is None or isinstance(l, KernelLauncher)
                                          for l in launchers):
            raise TypeError("launchers must be 4 KernelLauncher or None (widths 16, 8, 4, 2)")
        if any(l is not None and (<KernelLauncher>l)._num_leading != 10 for l in launchers):
            raise ValueError("launchers must be scatter kernels (10 leading arguments)")
        if len(v_pools) != len(k_pools) or not all(isinstance(p, int)
                                                   for p in k_pools + v_pools):
            raise ValueError("k_pools and v_pools must be equally long tuples of addresses")
        if itemsize not in (1, 2, 4, 8, 16) or max_grid < 1:
            raise ValueError("bad itemsize or max_grid")
        self._tensor_type = tensor_type
        self._dtype = dtype
        self._int64 = int64_dtype
        self._device = device
        self._heads = num_heads
        self._dim = head_dim
        self._item = itemsize
        self._row_bytes = head_dim * itemsize
        self._pool_align = pool_align
        self._k_pools = k_pools
        self._v_pools = v_pools
        self._launchers = launchers
        self._max_grid = max_grid

    def write(self, Py_ssize_t layer, k, v, slot_mapping, uintptr_t slots_ptr,
              int64_t max_rows, uintptr_t stream):
        """Scatter ``k``, ``v`` through ``slot_mapping`` (a torch tensor) or, when it is
        None, through the device slots at ``slots_ptr`` (at most ``max_rows`` of them).
        Returns True when launched, False when the inputs need the general path."""
        cdef object tensor_type = self._tensor_type
        if type(k) is not tensor_type or type(v) is not tensor_type:
            return False
        if layer < 0 or layer >= len(self._k_pools):
            return False
        if k.dtype is not self._dtype or v.dtype is not self._dtype:
            return False
        cdef tuple ks = tuple(k.shape)
        if ks != tuple(v.shape) or len(ks) != 3 or ks[1] != self._heads or ks[2] != self._dim:
            return False
        if k.get_device() != self._device or v.get_device() != self._device:
            return False
        cdef tuple kst = k.stride()
        cdef tuple vst = v.stride()
        cdef int64_t rows = ks[0]
        if (kst[2] != 1 and self._dim > 1) or (vst[2] != 1 and self._dim > 1):
            return False
        if slot_mapping is not None:
            if (type(slot_mapping) is not tensor_type or slot_mapping.dtype is not self._int64
                    or slot_mapping.dim() != 1 or slot_mapping.shape[0] != rows
                    or slot_mapping.get_device() != self._device
                    or (rows > 1 and slot_mapping.stride(0) != 1)):
                return False
            slots_ptr = slot_mapping.data_ptr()
        elif rows > max_rows:
            return False
        if rows == 0:
            return True
        cdef int64_t leading[10]
        leading[0] = <int64_t>(<uintptr_t>k.data_ptr())
        leading[1] = <int64_t>(<uintptr_t>v.data_ptr())
        cdef int64_t item = self._item
        if ((leading[0] | leading[1] | <int64_t>slots_ptr) & (item - 1)) != 0 or \
                (<int64_t>slots_ptr & 7) != 0:
            return False     # misaligned: the general path says why
        cdef int64_t k_st = kst[0] * item, k_sh = kst[1] * item
        cdef int64_t v_st = vst[0] * item, v_sh = vst[1] * item
        cdef int64_t combined = (self._row_bytes | self._pool_align | leading[0] | leading[1]
                                 | k_st | k_sh | v_st | v_sh)
        cdef int64_t width = 16
        cdef int w_index = 0
        while width > item and (combined & (width - 1)) != 0:
            width >>= 1
            w_index += 1
        launcher = self._launchers[w_index]
        if launcher is None:
            return False
        leading[2] = k_st // width
        leading[3] = k_sh // width
        leading[4] = v_st // width
        leading[5] = v_sh // width
        leading[6] = <int64_t>slots_ptr
        leading[7] = self._k_pools[layer]
        leading[8] = self._v_pools[layer]
        leading[9] = rows
        cdef int64_t vecs = self._heads * (self._row_bytes // width)
        cdef int64_t block = ((vecs + 31) // 32) * 32
        if block > 256:
            block = 256
        cdef int64_t grid = (rows + 3) // 4
        if grid > self._max_grid:
            grid = self._max_grid
        (<KernelLauncher>launcher).launch_packed(<unsigned int>grid, <unsigned int>block,
                                                 stream, leading)
        return True


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
