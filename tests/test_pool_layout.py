"""Adopting pools an engine owns: layout detection and validation (NumPy arrays stand in
for device tensors; the addresses and strides are what matter)."""

import numpy as np
import pytest

from kvcore import KVCacheConfig, ShapeError
from kvcore.backends.pool_layout import adopt_layers

CFG = KVCacheConfig(num_layers=3, num_kv_heads=2, head_dim=8, page_size=4, num_pages=5,
                    dtype="float16")
PAGE = (4, 2, 8)


def address(array):
    return array.__array_interface__["data"][0]


def test_kvcore_block_pool():
    kv = np.zeros(CFG.pool_shape, np.float16)
    layers = adopt_layers(CFG, kv)
    assert layers.page_stride == CFG.page_elems
    for layer in range(3):
        assert layers.k_ptrs[layer] == address(kv[layer, 0])
        assert layers.v_ptrs[layer] == address(kv[layer, 1])
        assert layers.k_views[layer].shape == (5, *PAGE)


def test_vllm_kv_first_and_page_first_layouts():
    kv_first = [np.zeros((2, 5, *PAGE), np.float16) for _ in range(3)]
    layers = adopt_layers(CFG, kv_first)
    assert layers.page_stride == CFG.page_elems
    assert layers.v_ptrs[1] == address(kv_first[1][1])
    page_first = [np.zeros((5, 2, *PAGE), np.float16) for _ in range(3)]
    layers = adopt_layers(CFG, page_first)
    assert layers.page_stride == 2 * CFG.page_elems
    assert layers.k_ptrs[2] == address(page_first[2])
    assert layers.v_ptrs[2] == address(page_first[2][:, 1])
    np.testing.assert_array_equal(layers.v_views[2], page_first[2][:, 1])


def test_k_v_pairs_and_hnd():
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, num_pages=5,
                        dtype="bfloat16", layout="HND")
    pairs = [(np.zeros((5, 2, 4, 8), np.uint16), np.zeros((5, 2, 4, 8), np.uint16))
             for _ in range(2)]
    layers = adopt_layers(cfg, pairs)
    assert layers.k_ptrs == tuple(address(k) for k, _ in pairs)
    with pytest.raises(ShapeError, match=r"\[5, 2, 4, 8\] \(HND\)"):
        adopt_layers(cfg, [(np.zeros((5, 4, 2, 8), np.uint16),) * 2] * 2)


def test_rejections():
    good = [np.zeros((2, 5, *PAGE), np.float16) for _ in range(3)]
    cases = [
        ("3 layers", good[:2]),
        ("dtype float32", [np.zeros((2, 5, *PAGE), np.float32) for _ in range(3)]),
        ("must have shape", [np.zeros((3, 5, *PAGE), np.float16) for _ in range(3)]),
        ("contiguous", [np.zeros((2, 5, 4, 2, 16), np.float16)[..., :8] for _ in range(3)]),
        ("same page stride", [*good[:2], np.zeros((5, 2, *PAGE), np.float16)]),
        ("overlap", [good[0], good[0], good[1]]),
        (r"\(k, v\) pair", [(good[0][0],)] * 3),
        ("ambiguous", None),
    ]
    for message, pool in cases:
        if pool is None:
            cfg = KVCacheConfig(num_layers=1, num_kv_heads=2, head_dim=8, page_size=4,
                                num_pages=2, dtype="float16")
            with pytest.raises(ShapeError, match=message):
                adopt_layers(cfg, [np.zeros((2, 2, *PAGE), np.float16)])
            continue
        with pytest.raises(ShapeError, match=message):
            adopt_layers(CFG, pool)


def test_pages_that_overlap_are_refused():
    block = np.zeros((5 * CFG.page_elems // 2 + CFG.page_elems,), np.float16)
    # a page stride of half a page (strides in bytes: page_elems bytes = half a page)
    k = np.lib.stride_tricks.as_strided(block, (5, *PAGE), (CFG.page_elems, 32, 16, 2))
    v = np.lib.stride_tricks.as_strided(block.copy(), (5, *PAGE), (CFG.page_elems, 32, 16, 2))
    with pytest.raises(ShapeError, match="smaller than a page"):
        adopt_layers(CFG, [(k, v)] * 3)


def test_overlapping_or_misaligned_pools_are_refused():
    pe = CFG.page_elems
    big = np.zeros((6 * pe,), np.float16)
    k = big[:5 * pe].reshape(5, *PAGE)
    v = big[pe:6 * pe].reshape(5, *PAGE)           # V page p is K page p + 1
    others = [(np.zeros((5, *PAGE), np.float16), np.zeros((5, *PAGE), np.float16))
              for _ in range(2)]
    with pytest.raises(ShapeError, match="layer 0's K and layer 0's V overlap"):
        adopt_layers(CFG, [(k, v), *others])
    # a [P, 2, ...] tensor whose K/V axis steps by one element: K and V overlap
    block = np.zeros((5 * 2 * pe + 1,), np.float16)
    t = np.lib.stride_tricks.as_strided(block, (5, 2, *PAGE),
                                        (2 * pe * 2, 2, 32, 16, 2))
    with pytest.raises(ShapeError, match="overlap"):
        adopt_layers(CFG, [t, *[np.zeros((5, 2, *PAGE), np.float16) for _ in range(2)]])
    # two layers sharing pages
    shared = np.zeros((2, 6, *PAGE), np.float16)
    with pytest.raises(ShapeError, match="layer 0's K and layer 1's K overlap"):
        adopt_layers(CFG, [(shared[0, :5], shared[1, :5]), (shared[0, 1:], shared[1, 1:]),
                           others[0]])
    # an odd address
    raw = np.zeros(5 * 2 * pe * 4 + 8, np.uint8)
    odd = [raw[1:1 + 5 * 2 * pe * 2].view(np.float16).reshape(2, 5, *PAGE)]
    cfg1 = KVCacheConfig(num_layers=1, num_kv_heads=2, head_dim=8, page_size=4, num_pages=5,
                         dtype="float16")
    with pytest.raises(ShapeError, match="not a multiple"):
        adopt_layers(cfg1, odd)


def test_layer_groups_share_slots_of_one_pool():
    """With layer groups the one-array pool has num_slots slots; layer l is slot
    layer_slot(l), and layers of different groups in one slot are one memory."""
    from kvcore import LayerGroup

    cfg = KVCacheConfig(num_layers=3, num_kv_heads=2, head_dim=8, page_size=4, num_pages=5,
                        dtype="float16",
                        layer_groups=[LayerGroup([0, 2]), LayerGroup([1], window=4)])
    kv = np.zeros(cfg.pool_shape, np.float16)
    assert kv.shape[0] == cfg.num_slots == 2
    layers = adopt_layers(cfg, kv)
    assert layers.k_ptrs[1] == layers.k_ptrs[0] == address(kv[0, 0])   # slot 0 shared
    assert layers.v_ptrs[2] == address(kv[1, 1])


def test_an_alias_is_allowed_across_groups_only():
    from kvcore import LayerGroup

    cfg = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, num_pages=5,
                        dtype="float16",
                        layer_groups=[LayerGroup([0]), LayerGroup([1], window=4)])
    shared = np.zeros((2, 5, *PAGE), np.float16)
    adopt_layers(cfg, [shared, shared])                     # two groups: one memory is fine
    one_group = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4,
                              num_pages=5, dtype="float16")
    with pytest.raises(ShapeError, match="overlap"):
        adopt_layers(one_group, [shared, shared])           # one group: pages would collide
