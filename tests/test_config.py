import dataclasses

import numpy as np
import pytest

from kvcore import KVCacheConfig


def cfg(**kw):
    args = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "page_size": 16,
            "num_pages": 1000}
    args.update(kw)
    return KVCacheConfig(**args)


def test_arithmetic_uses_every_dimension_including_num_layers():
    c = cfg()
    assert c.itemsize == 2
    assert c.page_elems == 16 * 8 * 128
    assert c.page_bytes == 32 * 2 * 16 * 8 * 128 * 2 == 2 * 1024 * 1024
    assert c.layer_bytes == 2 * 1000 * 16 * 8 * 128 * 2
    assert c.total_bytes == 1000 * c.page_bytes == c.num_layers * c.layer_bytes
    assert c.max_pages_per_seq == 1000 and c.max_tokens_per_seq == 16000
    assert cfg(num_layers=1).page_bytes * 32 == c.page_bytes


def test_layouts_and_shapes():
    assert cfg().pool_shape == (32, 2, 1000, 16, 8, 128)
    assert cfg(layout="hnd").pool_shape == (32, 2, 1000, 8, 16, 128)
    assert cfg(layout="HND").page_shape == (8, 16, 128)


@pytest.mark.parametrize(("given", "name", "size"), [
    ("float16", "float16", 2), (np.float16, "float16", 2), ("bf16", "bfloat16", 2),
    ("bfloat16", "bfloat16", 2), ("float32", "float32", 4), (np.dtype("float32"), "float32", 4),
])
def test_dtypes(given, name, size):
    c = cfg(dtype=given)
    assert (c.dtype, c.itemsize) == (name, size)


@pytest.mark.parametrize(("kw", "error", "message"), [
    ({"num_layers": 0}, ValueError, "num_layers must be >= 1, got 0"),
    ({"head_dim": -4}, ValueError, "head_dim must be >= 1"),
    ({"page_size": 1.5}, TypeError, "page_size must be an integer, got float"),
    ({"num_pages": True}, TypeError, "num_pages must be an integer, got bool"),
    ({"dtype": "int8"}, ValueError, "dtype must be one of"),
    ({"layout": "NDH"}, ValueError, "layout must be one of"),
    ({"max_pages_per_seq": 2**28}, ValueError, "exceeds 2\\*\\*31 - 1"),
    ({"max_seqs": 0}, ValueError, "max_seqs must be >= 1"),
])
def test_validation(kw, error, message):
    with pytest.raises(error, match=message):
        cfg(**kw)


def test_frozen():
    c = cfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_pages = 5


def test_for_memory():
    c = KVCacheConfig.for_memory(10 * 2**20, num_layers=32, num_kv_heads=8, head_dim=128,
                                 page_size=16)
    assert c.num_pages == 5
    with pytest.raises(ValueError, match="hold no page"):
        KVCacheConfig.for_memory(100, num_layers=1, num_kv_heads=1, head_dim=128, page_size=16)
