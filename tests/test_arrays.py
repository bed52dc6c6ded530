"""Reading arrays of any framework without copying them, and naming streams."""

import numpy as np
import pytest

from kvcore import ShapeError
from kvcore.backends.arrays import describe, stream_handle


def test_numpy_arrays_are_described_in_elements():
    a = np.zeros((4, 3, 8), np.float16)[:, ::-1]
    view = describe(a)
    assert view.ptr == a.__array_interface__["data"][0]
    assert view.shape == (4, 3, 8) and view.strides == (24, -8, 1)
    assert view.dtype == "float16" and view.itemsize == 2 and view.device == -1
    assert view.owner is a and not view.is_contiguous()
    assert describe(np.zeros((2, 1, 3))).is_contiguous()


def test_big_endian_and_unknown_dtypes_are_refused():
    with pytest.raises(ShapeError, match="does not move"):
        describe(np.zeros(3, ">i8"), "slot_mapping")
    with pytest.raises(ShapeError, match="does not move"):
        describe(np.zeros(3, np.complex64), "k")
    with pytest.raises(ShapeError, match="must be an array"):
        describe([1, 2, 3], "k")


def test_cuda_array_interface_objects():
    class Fake:
        def __init__(self, typestr):
            self.__cuda_array_interface__ = {"shape": (2, 3), "typestr": typestr,
                                             "data": (0, False), "version": 3, "strides": None}

    view = describe(Fake("<i8"))
    assert view.shape == (2, 3) and view.strides == (3, 1) and view.dtype == "int64"
    with pytest.raises(ShapeError):
        describe(Fake(">i8"))


def test_torch_tensors_are_read_in_place():
    torch = pytest.importorskip("torch")
    t = torch.zeros(4, 2, 8, dtype=torch.bfloat16)[:, :, :]
    view = describe(t)
    assert view.ptr == t.data_ptr() and view.dtype == "bfloat16" and view.device == -1
    assert view.strides == (16, 8, 1)
    with pytest.raises(ShapeError, match="does not move"):
        describe(torch.zeros(2, dtype=torch.complex64))


def test_stream_handles():
    assert stream_handle(None) is None
    assert stream_handle(0) == 0 and stream_handle(1234) == 1234

    class TorchLike:
        cuda_stream = 77

    class Protocol:
        def __cuda_stream__(self):
            return (0, 99)

    assert stream_handle(TorchLike()) == 77
    assert stream_handle(Protocol()) == 99
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        stream_handle(-1)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        stream_handle(2**70)
    with pytest.raises(TypeError, match="cudaStream_t"):
        stream_handle("stream")

    class BadTorchLike:
        cuda_stream = "abc"

    class NegativeTorchLike:
        cuda_stream = -5

    class BadProtocol:
        def __cuda_stream__(self):
            return 5

    with pytest.raises(TypeError, match="cudaStream_t"):
        stream_handle(BadTorchLike())
    with pytest.raises(ValueError, match="2\\*\\*64"):
        stream_handle(NegativeTorchLike())
    with pytest.raises(TypeError, match="version, handle"):
        stream_handle(BadProtocol())


def test_malformed_cuda_array_interfaces_are_shape_errors():
    class Fake:
        def __init__(self, **interface):
            self.__cuda_array_interface__ = interface

    with pytest.raises(ShapeError, match="malformed"):
        describe(Fake(typestr="<i2", shape=(3,)))
    with pytest.raises(ShapeError, match="whole elements"):
        describe(Fake(typestr="<i2", shape=(3,), data=(0, False), strides=(3,)))
