"""Hostile argument values shared by the hostile-input tests and the fuzzer."""

import numpy as np

from kvcore import KVCoreError

#: What kvcore may raise for bad input: its own typed errors or the matching built-ins.
ALLOWED_ERRORS = (KVCoreError, KeyError, TypeError, ValueError, IndexError)


class RaisingIndex:
    """An object whose ``__index__`` raises something unexpected."""

    def __index__(self):
        raise RuntimeError("__index__ exploded")

    def __repr__(self):
        return "RaisingIndex()"


class Index:
    """A valid integer-like object."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value

    def __repr__(self):
        return f"Index({self.value})"


#: Values that are not integers at all (TypeError wherever an integer is expected).
NOT_INTS = [1.5, True, np.bool_(True), "3", None, float("nan"), np.float64(1.0), object(),
            RaisingIndex()]
#: Integers outside int64 (ValueError wherever an integer is expected).
BEYOND_INT64 = [2**63, 2**64, -2**63 - 1, Index(2**70), np.uint64(2**64 - 1)]
#: int64 values that are wrong only for some arguments.
EDGE_INTS = [2**31, -1, -(2**31)]

#: Arrays holding a non-integer (TypeError).
NOT_INT_ARRAYS = [[1.5], [True], ["a"], [None], [float("nan")], np.array([1.0]),
                  [RaisingIndex()], np.array(["1"]), np.array([1 + 2j])]
#: Arrays holding an integer outside int64 (ValueError).
BEYOND_INT64_ARRAYS = [[2**63], [2**64], [-2**63 - 1], np.array([2**64 - 1], np.uint64),
                       [Index(2**70)]]
#: Not a 1-D sequence (ValueError: the shape is wrong).
NOT_1D = [np.zeros((2, 2), np.int64), "01", b"\x00", 5.5, None, {0: 1}, [[0]]]
#: Arrays valid or invalid depending on the argument (a page id, a seq id, a count, ...).
EDGE_ARRAYS = [[2**31], np.array([0], dtype=object), [0, 0, 0, 0, 0, 0, 0, 0, 0]]

HOSTILE_INTS = NOT_INTS + BEYOND_INT64 + EDGE_INTS
HOSTILE_ARRAYS = NOT_INT_ARRAYS + BEYOND_INT64_ARRAYS + NOT_1D + EDGE_ARRAYS
