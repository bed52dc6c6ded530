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


HOSTILE_INTS = [1.5, True, np.bool_(True), "3", None, 2**31, 2**63, 2**64, -2**63 - 1,
                float("nan"), np.float64(1.0), object(), RaisingIndex(), Index(2**70),
                np.uint64(2**64 - 1), -1, -(2**31)]

HOSTILE_ARRAYS = [[1.5], [True], ["a"], [None], [2**31], [2**63], [2**64], [-2**63 - 1],
                  [float("nan")], np.array([1.0]), np.zeros((2, 2), np.int64),
                  np.array([2**64 - 1], np.uint64), [RaisingIndex()], [Index(2**70)],
                  "01", b"\x00", np.array(["1"]), np.array([1 + 2j]), 5.5, None, {0: 1},
                  np.array([0], dtype=object), [[0]], [0, 0, 0, 0, 0, 0, 0, 0, 0]]
