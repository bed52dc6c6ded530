"""A short run of the raw-operation fuzzer (tests/fuzz_raw_ops.py runs long ones)."""

import pytest

from .fuzz_raw_ops import fuzz


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuzz_finds_nothing(seed):
    result = fuzz(4000, seed)
    assert result.findings == []
    assert result.errors > 100 and result.tried - result.errors > 1000   # both paths ran
