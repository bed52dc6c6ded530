"""KVCache on the NumPy backend: known answers, both layouts, copy-on-write, errors."""

import numpy as np
import pytest

from kvcore import (
    BackendUnavailableError,
    InvalidPageError,
    KVCache,
    KVCacheConfig,
    OutOfPagesError,
    ShapeError,
    UnknownSequenceError,
)


def tokens(n, heads=2, head_dim=3, start=1.0, dtype=np.float32):
    return (start + np.arange(n * heads * head_dim)).reshape(n, heads, head_dim).astype(dtype)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_write_lands_where_the_layout_says(make_cache, layout):
    cache = make_cache(layout)
    seq = cache.add_sequence()
    step = cache.append([seq], [6])          # pages 0 and 1
    k, v = tokens(6), -tokens(6)
    cache.write(1, k, v, step.slot_mapping)
    k_pool, v_pool = cache.k_cache(1), cache.v_cache(1)
    for t in range(6):
        page, off = divmod(t, 4)
        if layout == "NHD":
            np.testing.assert_array_equal(k_pool[page, off], k[t])
            np.testing.assert_array_equal(v_pool[page, off], v[t])
        else:
            np.testing.assert_array_equal(k_pool[page, :, off], k[t])
            np.testing.assert_array_equal(v_pool[page, :, off], v[t])
    assert not cache.kv[0].any()             # other layers untouched


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gather_returns_what_was_written(make_cache, layout):
    cache = make_cache(layout)
    a, b = cache.add_sequence(), cache.add_sequence()
    step = cache.append([a, b], [5, 9])
    k = tokens(14)
    cache.write(0, k, 2 * k, step.slot_mapping)
    k_out, v_out, token_indptr = cache.gather(0, [b, a])
    assert token_indptr.tolist() == [0, 9, 14]
    np.testing.assert_array_equal(k_out, np.concatenate([k[5:], k[:5]]))
    np.testing.assert_array_equal(v_out, 2 * np.concatenate([k[5:], k[:5]]))


def test_padding_slots_are_skipped(make_cache):
    cache = make_cache()
    seq = cache.add_sequence()
    step = cache.append([seq], [2])
    slots = np.array([step.slot_mapping[0], -1, step.slot_mapping[1]])
    k = tokens(3)
    cache.write(0, k, k, slots)
    k_out, _, _ = cache.gather(0, [seq])
    np.testing.assert_array_equal(k_out, k[[0, 2]])


def test_copy_on_write_through_append_keeps_both_sequences_intact(make_cache):
    cache = make_cache(page_size=4)
    parent = cache.add_sequence()
    step = cache.append([parent], [6])
    k = tokens(6)
    for layer in range(2):
        cache.write(layer, k + layer, -k, step.slot_mapping)
    child = cache.fork(parent)
    step = cache.append([child, parent], [1, 1])
    assert step.copy_src.tolist() == [1]      # the child copied the shared half page
    new_child, new_parent = tokens(1, start=100), tokens(1, start=200)
    for layer in range(2):
        cache.write(layer, np.concatenate([new_child, new_parent]) + layer,
                    np.zeros((2, 2, 3), np.float32), step.slot_mapping)
    for layer in range(2):
        got_child = cache.gather(layer, [child])[0]
        got_parent = cache.gather(layer, [parent])[0]
        np.testing.assert_array_equal(got_child, np.concatenate([k, new_child]) + layer)
        np.testing.assert_array_equal(got_parent, np.concatenate([k, new_parent]) + layer)


def test_copy_pages_every_layer_k_and_v(make_cache):
    cache = make_cache()
    rng = np.random.default_rng(0)
    cache.kv[...] = rng.standard_normal(cache.kv.shape)
    before = cache.kv.copy()
    cache.copy_pages([3, 5], [7, 2])
    np.testing.assert_array_equal(cache.kv[:, :, [7, 2]], before[:, :, [3, 5]])
    untouched = [p for p in range(16) if p not in (7, 2)]
    np.testing.assert_array_equal(cache.kv[:, :, untouched], before[:, :, untouched])


def test_bfloat16_moves_as_words(make_cache):
    cache = make_cache(dtype="bfloat16")
    assert cache.kv.dtype == np.uint16
    seq = cache.add_sequence()
    step = cache.append([seq], [3])
    words = np.arange(18, dtype=np.uint16).reshape(3, 2, 3) + 0x3F80
    cache.write(0, words, words.view(np.int16), step.slot_mapping)
    k_out, v_out, _ = cache.gather(0, [seq])
    np.testing.assert_array_equal(k_out, words)
    np.testing.assert_array_equal(v_out, words)


def test_strided_input_is_accepted(make_cache):
    cache = make_cache()
    seq = cache.add_sequence()
    step = cache.append([seq], [4])
    wide = tokens(4, heads=4)                 # e.g. a fused QKV buffer
    k, v = wide[:, :2], wide[:, 2:]
    cache.write(0, k, v[:, :, ::-1], step.slot_mapping)
    k_out, v_out, _ = cache.gather(0, [seq])
    np.testing.assert_array_equal(k_out, k)
    np.testing.assert_array_equal(v_out, v[:, :, ::-1])


def test_views_are_views(make_cache):
    cache = make_cache()
    cache.k_cache(1)[0, 0, 0, 0] = 7.0
    assert cache.kv[1, 0, 0, 0, 0, 0] == 7.0
    assert cache.k_cache(0).shape == (16, 4, 2, 3)
    assert make_cache("HND").v_cache(0).shape == (16, 2, 4, 3)


# -- bad input: typed errors and nothing written ------------------------------------------

def _written_cache(make_cache):
    cache = make_cache()
    seq = cache.add_sequence()
    step = cache.append([seq], [3])
    cache.write(0, tokens(3), tokens(3), step.slot_mapping)
    return cache, seq, step


BAD_WRITES = [
    (lambda st: (2, tokens(3), tokens(3), st.slot_mapping), IndexError,
     r"layer 2 out of range \[0, 2\)"),
    (lambda st: (-1, tokens(3), tokens(3), st.slot_mapping), IndexError, "layer -1"),
    (lambda st: (1.0, tokens(3), tokens(3), st.slot_mapping), TypeError, "layer must be"),
    (lambda st: (0, tokens(3, heads=1), tokens(3), st.slot_mapping), ShapeError,
     r"k must have shape \[T, 2, 3\], got \(3, 1, 3\)"),
    (lambda st: (0, tokens(3), tokens(2), st.slot_mapping[:2]), ShapeError, "differ in shape"),
    (lambda st: (0, tokens(3, dtype=np.float16), tokens(3), st.slot_mapping), ShapeError,
     "k has dtype float16, the cache holds float32"),
    (lambda st: (0, tokens(3), tokens(3), st.slot_mapping[:2]), ShapeError,
     r"slot_mapping must have shape \[3\]"),
    (lambda st: (0, tokens(3), tokens(3), [0, 1, 64]), InvalidPageError,
     r"slot 64 out of range \[0, 64\)"),
    (lambda st: (0, tokens(3), tokens(3), [0, -2, 1]), InvalidPageError, "slot -2 out of range"),
    (lambda st: (0, tokens(3), tokens(3), [0.0, 1.0, 2.0]), TypeError,
     "slot_mapping must hold integers"),
]


@pytest.mark.parametrize(("args", "error", "message"), BAD_WRITES)
def test_bad_write_writes_nothing(make_cache, args, error, message):
    cache, _, step = _written_cache(make_cache)
    before = cache.kv.copy()
    with pytest.raises(error, match=message):
        cache.write(*args(step))
    np.testing.assert_array_equal(cache.kv, before)


@pytest.mark.parametrize(("src", "dst", "error", "message"), [
    ([0, 16], [1, 2], InvalidPageError, r"src page 16 out of range \[0, 16\)"),
    ([0], [-1], InvalidPageError, "dst page -1 out of range"),
    ([0, 1], [2], ValueError, "differ in length"),
    ([0, 1], [2, 2], ValueError, "dst repeats page 2"),
    ([0, 1], [1, 2], ValueError, "page 1 is both a src and a dst"),
    ([[0]], [[1]], ShapeError, "must be 1-D"),
])
def test_bad_copy_pages_copies_nothing(make_cache, src, dst, error, message):
    cache, _, _ = _written_cache(make_cache)
    before = cache.kv.copy()
    with pytest.raises(error, match=message):
        cache.copy_pages(src, dst)
    np.testing.assert_array_equal(cache.kv, before)


def test_failed_append_copies_nothing(make_cache):
    cache = make_cache(num_pages=3, page_size=4)
    a = cache.add_sequence()
    cache.append([a], [6])
    b = cache.fork(a)
    cache.kv[...] = 1.0
    before = cache.kv.copy()
    with pytest.raises(OutOfPagesError):
        cache.append([b, a], [1, 6])   # b's copy (1) + a grows to 3 pages (1) > 1 free
    np.testing.assert_array_equal(cache.kv, before)
    assert cache.num_tokens(b) == 6


def test_gather_errors(make_cache):
    cache, seq, _ = _written_cache(make_cache)
    with pytest.raises(UnknownSequenceError):
        cache.gather(0, [seq, 5])
    with pytest.raises(IndexError):
        cache.gather(3, [seq])
    k, _, indptr = cache.gather(0, [])
    assert k.shape == (0, 2, 3) and indptr.tolist() == [0]


def test_device_strings():
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=4)
    assert KVCache(cfg, device="cpu").device == "cpu"
    assert KVCache(cfg, device="auto").device in ("cpu", "cuda:0")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        KVCache(cfg, device="tpu")
    with pytest.raises(TypeError, match="device must be a string"):
        KVCache(cfg, device=0)
    with pytest.raises(TypeError, match="config must be a KVCacheConfig"):
        KVCache({"num_layers": 1})


def test_cuda_without_gpu_says_how_to_install():
    from kvcore.backends import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present")
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=4)
    with pytest.raises(BackendUnavailableError, match=r"kvcore\[cuda1[23]\]") as info:
        KVCache(cfg, device="cuda:0")
    assert isinstance(info.value, ImportError)


def test_importing_kvcore_does_not_import_cupy():
    import subprocess
    import sys

    code = ("import sys, kvcore; kvcore.KVCache(kvcore.KVCacheConfig(1, 1, 8, 4, 4), "
            "device='cpu'); assert 'cupy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_needs_neither_torch_nor_cupy():
    import subprocess
    import sys

    code = ("import sys, kvcore; c = kvcore.KVCache(kvcore.KVCacheConfig(1, 1, 4, 4, 8), "
            "device='cpu'); s = c.step_metadata(max_tokens=4); "
            "assert 'torch' not in sys.modules and 'cupy' not in sys.modules, "
            "[m for m in sys.modules if m.split('.')[0] in ('torch', 'cupy')]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_framework_and_pool_are_for_cuda_caches():
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=4, num_pages=8)
    with pytest.raises(ValueError, match="framework and pool are for CUDA caches"):
        KVCache(cfg, device="cpu", framework="torch")
    with pytest.raises(ValueError, match="framework and pool are for CUDA caches"):
        KVCache(cfg, device="cpu", pool=[np.zeros((2, 8, 4, 1, 4), np.float16)])
    assert KVCache(cfg, device="cpu").framework == "numpy"
    assert KVCache(cfg, device="cpu", framework="numpy").framework == "numpy"


def test_unknown_framework_is_refused():
    from kvcore.backends import resolve_framework

    with pytest.raises(ValueError, match="framework must be"):
        resolve_framework("jax")
    assert resolve_framework("cupy") == "cupy"
    assert resolve_framework(None, pool=[(np.zeros(1), np.zeros(1))]) == "cupy"
