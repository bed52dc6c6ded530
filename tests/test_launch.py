"""KernelLauncher packs arguments exactly as cuLaunchKernel reads them (checked against a
fake launch function, so no GPU is needed)."""

import ctypes

import pytest

from kvcore._launch import KernelLauncher

LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint,
                          ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                          ctypes.c_uint, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                          ctypes.c_void_p)
READ = {"p": ctypes.c_uint64, "q": ctypes.c_int64, "i": ctypes.c_int32}


class FakeDriver:
    """Records what each launch passed; returns ``status``."""

    def __init__(self, kinds, status=0):
        self.kinds, self.status, self.calls = kinds, status, []
        self.fn = LAUNCH(self._launch)
        self.address = ctypes.cast(self.fn, ctypes.c_void_p).value

    def _launch(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        values = [ctypes.cast(params[i], ctypes.POINTER(READ[k])).contents.value
                  for i, k in enumerate(self.kinds)]
        self.calls.append(dict(function=function, grid=(gx, gy, gz), block=(bx, by, bz),
                               shared=shared, stream=stream or 0, values=values, extra=extra))
        return self.status


def test_arguments_reach_the_driver_in_order_with_their_c_types():
    kinds = "pqipqi"
    driver = FakeDriver(kinds)
    launcher = KernelLauncher(driver.address, 0xABC0, kinds, (2**40 + 7, -5, -3), print)
    assert launcher.num_leading == 3
    launcher(12, 256, 0x1234, 0xDEAD0000, -(2**40), 2**31 - 1)
    (call,) = driver.calls
    assert call["function"] == 0xABC0
    assert call["grid"] == (12, 1, 1) and call["block"] == (256, 1, 1)
    assert call["stream"] == 0x1234 and call["shared"] == 0 and call["extra"] is None
    assert call["values"] == [0xDEAD0000, -(2**40), 2**31 - 1, 2**40 + 7, -5, -3]


def test_a_failed_launch_calls_on_error_with_the_status():
    driver = FakeDriver("p", status=400)
    seen = []

    def on_error(status):
        seen.append(status)
        raise RuntimeError(status)

    launcher = KernelLauncher(driver.address, 1, "p", (), on_error)
    with pytest.raises(RuntimeError):
        launcher(1, 32, 0, 0x10)
    assert seen == [400]


def test_bad_calls_are_refused():
    driver = FakeDriver("pq")
    launcher = KernelLauncher(driver.address, 1, "pq", (), print)
    with pytest.raises(TypeError, match="takes 2 leading arguments, got 1"):
        launcher(1, 32, 0, 5)
    with pytest.raises(OverflowError):
        launcher(1, 32, 0, -1, 0)           # a pointer cannot be negative
    with pytest.raises(OverflowError):
        launcher(1, 32, 0, 0, 2**63)        # beyond int64
    with pytest.raises(ValueError, match="unknown argument kind"):
        KernelLauncher(driver.address, 1, "px", (), print)
    with pytest.raises(ValueError, match="non-null"):
        KernelLauncher(0, 1, "p", (), print)
    assert driver.calls == []
