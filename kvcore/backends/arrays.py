"""Reading arrays from any framework, and speaking to the one a cache is built on.

kvcore's CUDA path never converts a caller's array: it reads the pointer, shape,
strides, dtype and device straight off the object (a torch tensor's ``data_ptr()`` /
``stride()``, a CuPy array's ``data.ptr`` / ``strides``, ``__cuda_array_interface__``
for anything else, DLPack last), and hands pointers to the kernels.

A *framework* (:class:`TorchFramework` or :class:`CupyFramework`) is what a CUDA cache
speaks: it allocates the pool, outputs and kvcore's own device buffers, and it says
which stream is current. Every device operation of a cache is enqueued on that
framework's current stream unless the call names a stream.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager

import numpy as np

from kvcore.errors import ShapeError

__all__ = ["ArrayView", "CupyFramework", "TorchFramework", "describe", "stream_handle",
           "torch_tensor_type"]

#: dtype names kvcore understands, with their sizes in bytes.
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "int64": 8, "int32": 4, "int16": 2,
            "uint16": 2, "uint8": 1, "uint64": 8, "float64": 8, "int8": 1, "float8_e4m3fn": 1}

_TYPESTR = {"f2": "float16", "f4": "float32", "f8": "float64", "i8": "int64", "i4": "int32",
            "i2": "int16", "i1": "int8", "u2": "uint16", "u1": "uint8", "u8": "uint64"}

_torch_dtype_names: dict = {}


class ArrayView:
    """What kvcore needs to know of an array: where it is and how it is laid out.

    Attributes
    ----------
    ptr : int
        Address of element 0 (device or host).
    shape : tuple of int
    strides : tuple of int
        In elements, not bytes (torch's convention).
    dtype : str
        A name from ``ITEMSIZE`` (``"bfloat16"`` included).
    itemsize : int
    device : int
        CUDA ordinal, or -1 for host memory.
    owner : object
        The object to keep alive while a kernel may read the memory.
    """

    __slots__ = ("device", "dtype", "itemsize", "owner", "ptr", "shape", "strides")

    def __init__(self, ptr, shape, strides, dtype, device, owner):
        self.ptr = ptr
        self.shape = shape
        self.strides = strides
        self.dtype = dtype
        self.itemsize = ITEMSIZE[dtype]
        self.device = device
        self.owner = owner

    def is_contiguous(self) -> bool:
        if 0 in self.shape:
            return True
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def torch_tensor_type():
    """``torch.Tensor`` when the caller has imported torch, else None (never imports it)."""
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None) if torch is not None else None


def _torch_dtype_name(dtype) -> str | None:
    name = _torch_dtype_names.get(dtype)
    if name is None:
        name = str(dtype).rpartition(".")[2]
        if name not in ITEMSIZE:
            return None
        _torch_dtype_names[dtype] = name
    return name


def describe(array, name: str = "array") -> ArrayView:
    """Read ``array``'s pointer, shape, strides, dtype and device, without copying.

    Accepts torch tensors (CPU or CUDA), CuPy arrays, NumPy arrays, objects with
    ``__cuda_array_interface__`` and DLPack CUDA tensors (JAX, ...).

    Raises
    ------
    ShapeError
        ``array`` is none of those, or has a dtype kvcore does not move.
    """
    torch_type = torch_tensor_type()
    if torch_type is not None and isinstance(array, torch_type):
        dtype = _torch_dtype_name(array.dtype)
        if dtype is None:
            raise ShapeError(f"{name} has dtype {array.dtype}, which kvcore does not move")
        return ArrayView(array.data_ptr(), tuple(array.shape), tuple(array.stride()), dtype,
                         array.get_device(), array)
    module = type(array).__module__
    if module.startswith("cupy"):
        return _describe_numpy_like(array, array.data.ptr, array.data.device_id, name)
    if isinstance(array, np.ndarray):
        return _describe_numpy_like(array, array.__array_interface__["data"][0], -1, name)
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None:
        return _describe_interface(array, interface, name)
    if hasattr(array, "__dlpack__"):
        device = getattr(array, "__dlpack_device__", None)
        if device is not None and device()[0] in (2, 3, 13):   # CUDA, pinned, managed
            import cupy

            return describe(cupy.from_dlpack(array), name)
    raise ShapeError(f"{name} must be an array (torch, CuPy, NumPy, JAX, ...), got "
                     f"{type(array).__name__}")


def _describe_numpy_like(array, ptr, device, name) -> ArrayView:
    dtype = array.dtype.name
    if dtype not in ITEMSIZE or array.dtype.byteorder == ">":
        raise ShapeError(f"{name} has dtype {array.dtype}, which kvcore does not move")
    item = array.dtype.itemsize
    strides = tuple(s // item for s in array.strides)
    if any(s % item for s in array.strides):
        raise ShapeError(f"{name} has strides {array.strides} that are not whole elements")
    return ArrayView(ptr, tuple(array.shape), strides, dtype, device, array)


def _describe_interface(array, interface, name) -> ArrayView:
    try:
        typestr = interface["typestr"]
        shape = tuple(int(n) for n in interface["shape"])
        ptr = int(interface["data"][0])
        byte_strides = interface.get("strides")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ShapeError(f"{name} has a malformed __cuda_array_interface__ ({exc!r})") from None
    dtype = _TYPESTR.get(typestr[1:]) if isinstance(typestr, str) else None
    if dtype is None or typestr[0] == ">":
        raise ShapeError(f"{name} has typestr {typestr}, which kvcore does not move")
    item = ITEMSIZE[dtype]
    if byte_strides is None:
        strides, acc = [], 1
        for size in reversed(shape):
            strides.append(acc)
            acc *= size
        strides = tuple(reversed(strides))
    else:
        if len(byte_strides) != len(shape) or any(int(s) % item for s in byte_strides):
            raise ShapeError(f"{name} has strides {tuple(byte_strides)} that are not whole "
                             "elements")
        strides = tuple(int(s) // item for s in byte_strides)
    device = -1
    if ptr:
        import cupy

        device = cupy.cuda.runtime.pointerGetAttributes(ptr).device
    return ArrayView(ptr, shape, strides, dtype, device, array)


def stream_handle(stream) -> int | None:
    """The raw ``cudaStream_t`` of ``stream``: an int, a torch or CuPy stream, or any
    object with ``__cuda_stream__``; None stays None (use the current stream).

    Raises
    ------
    TypeError
        ``stream`` is none of those.
    ValueError
        A handle outside ``[0, 2**64)``.
    """
    if stream is None:
        return None
    if type(stream) is int:
        handle = stream
    else:
        handle = getattr(stream, "cuda_stream", None)      # torch.cuda.Stream / ExternalStream
        if handle is None and type(stream).__module__.startswith("cupy"):
            handle = getattr(stream, "ptr", None)           # cupy.cuda.Stream
        if handle is None and hasattr(stream, "__cuda_stream__"):
            protocol = stream.__cuda_stream__()             # the CUDA stream protocol
            if not (isinstance(protocol, tuple) and len(protocol) == 2):
                raise TypeError(f"__cuda_stream__ must return (version, handle), got "
                                f"{protocol!r}")
            handle = protocol[1]
        if handle is None or isinstance(handle, bool) or not isinstance(handle, int):
            raise TypeError(f"stream must be a torch or CuPy stream, an object with "
                            f"__cuda_stream__, or a cudaStream_t int; got "
                            f"{type(stream).__name__}")
    if not 0 <= handle < 2**64:
        raise ValueError(f"stream handle must be in [0, 2**64), got {handle}")
    return handle


# -- frameworks --------------------------------------------------------------------------------

class TorchFramework:
    """A CUDA cache built on torch: torch tensors out, torch's current stream.

    The stream is read through ``torch._C._cuda_getCurrentRawStream`` (an int, no
    Python stream object per call) where torch has it.
    """

    name = "torch"

    def __init__(self, device_id: int):
        import torch

        self.torch = torch
        self.device_id = device_id
        self.device = torch.device("cuda", device_id)
        self.tensor_type = torch.Tensor
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw is not None:
            self.current_stream = functools.partial(raw, device_id)
        else:   # pragma: no cover - older torch
            self.current_stream = lambda: torch.cuda.current_stream(self.device).cuda_stream
        self._dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                        "float32": torch.float32, "int64": torch.int64, "int32": torch.int32,
                        "uint8": torch.uint8, "int16": torch.int16,
                        "float8_e4m3fn": torch.float8_e4m3fn}

    def empty(self, shape, dtype: str, stream: int | None = None):
        """A new tensor on the device; with ``stream``, allocated for use on it."""
        with self.on_stream(stream):
            return self.torch.empty(shape, dtype=self._dtypes[dtype], device=self.device)

    def zeros(self, shape, dtype: str):
        if dtype == "float8_e4m3fn":   # zero bytes, viewed: fills need no fp8 kernels
            return self.torch.zeros(shape, dtype=self.torch.uint8,
                                    device=self.device).view(self._dtypes[dtype])
        return self.torch.zeros(shape, dtype=self._dtypes[dtype], device=self.device)

    def view_as(self, byte_array, offset: int, dtype: str, shape):
        """A typed view of ``nbytes`` of a uint8 tensor starting at byte ``offset``."""
        count = int(np.prod(shape)) * ITEMSIZE[dtype]
        return byte_array[offset:offset + count].view(self._dtypes[dtype]).view(shape)

    @contextmanager
    def on_stream(self, stream: int | None):
        """Make ``stream`` torch's current stream (for allocations) if it is not already."""
        if stream is None or stream == self.current_stream():
            yield
            return
        with self.torch.cuda.stream(self.torch.cuda.ExternalStream(stream, device=self.device)):
            yield

    def contiguous(self, array, stream: int | None):
        with self.on_stream(stream):
            return array.contiguous()


class CupyFramework:
    """A CUDA cache built on CuPy: CuPy arrays out (bfloat16 as uint16 words), CuPy's
    current stream."""

    name = "cupy"

    def __init__(self, device_id: int):
        import cupy

        self.cupy = cupy
        self.device_id = device_id
        self.tensor_type = cupy.ndarray
        get_stream = cupy.cuda.get_current_stream
        self.current_stream = lambda: get_stream(device_id).ptr

    def _storage(self, dtype: str):
        return np.dtype({"bfloat16": "uint16", "float8_e4m3fn": "uint8"}.get(dtype, dtype))

    def empty(self, shape, dtype: str, stream: int | None = None):
        with self.cupy.cuda.Device(self.device_id), self.on_stream(stream):
            return self.cupy.empty(shape, dtype=self._storage(dtype))

    def zeros(self, shape, dtype: str):
        with self.cupy.cuda.Device(self.device_id):
            return self.cupy.zeros(shape, dtype=self._storage(dtype))

    def view_as(self, byte_array, offset: int, dtype: str, shape):
        count = int(np.prod(shape)) * ITEMSIZE[dtype]
        return byte_array[offset:offset + count].view(self._storage(dtype)).reshape(shape)

    @contextmanager
    def on_stream(self, stream: int | None):
        if stream is None or stream == self.current_stream():
            yield
            return
        with self._external(stream):
            yield

    def _external(self, handle: int):
        from_external = getattr(self.cupy.cuda.Stream, "from_external", None)
        if from_external is not None:    # CuPy >= 14: the CUDA stream protocol
            return from_external(_StreamProtocol(handle))
        return self.cupy.cuda.ExternalStream(handle, self.device_id)

    def contiguous(self, array, stream: int | None):
        with self.on_stream(stream):
            return self.cupy.ascontiguousarray(array)


class _StreamProtocol:
    """A raw ``cudaStream_t`` behind the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, handle: int):
        self._handle = handle

    def __cuda_stream__(self):
        return (0, self._handle)
