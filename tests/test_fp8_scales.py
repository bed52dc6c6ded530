"""fp8 pools with per-(token, head) scales (``kv_scale_granularity="token_head"``) on the
CPU: the scale rule, the side pool's shape and views, and the side pool's pages moving
with their K/V pages (copy-on-write, ``copy_pages``, swap out / in, prefix offload /
load), checked against a plain model of what each token holds; bad input changes
nothing."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore import InvalidPageError, KVCache, KVCacheConfig, ShapeError, fp8

FP8 = "float8_e4m3fn"


def th_config(**kw):
    base = dict(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, num_pages=16,
                dtype=FP8, max_seqs=8, kv_scale_granularity="token_head")
    base.update(kw)
    return KVCacheConfig(**base)


def bf16_words(values):
    return (np.asarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def words_to_float(words):
    return (words.astype(np.uint32) << 16).view(np.float32)


def reference_scales(words):
    """The rule written out row by row, without kvcore.fp8's vector code."""
    values = words_to_float(words)
    out = np.empty(values.shape[:2], dtype=np.float32)
    for t in range(values.shape[0]):
        for h in range(values.shape[1]):
            row = values[t, h]
            if np.isnan(row).any():
                out[t, h] = 1.0
                continue
            scale = np.float32(np.abs(row).max()) / np.float32(448)
            out[t, h] = scale if np.isfinite(scale) and scale >= 2.0**-116 else 1.0
    return out


def snapshot(cache):
    parts = [cache.kv.copy(), cache.scale_pool.copy()]
    if cache.host_kv is not None:
        parts += [cache.host_kv.copy(), cache.host_scales.copy()]
    return parts


def assert_unchanged(cache, before):
    for a, b in zip(snapshot(cache), before, strict=True):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


# -- the rule -------------------------------------------------------------------------------

def test_token_head_scales_rule():
    rows = np.zeros((6, 2, 8), dtype=np.float32)
    rows[0, 0] = np.linspace(-3, 2, 8)          # amax 3 -> 3 / 448
    rows[0, 1, 3] = 448.0                       # amax 448 -> exactly 1
    rows[1, 0, 2] = np.nan                      # NaN -> 1.0
    rows[1, 1, 5] = -np.inf                     # inf -> 1.0
    # rows[2] all zero -> 1.0
    rows[3] = 1e-38                             # amax / 448 below MIN_SCALE -> 1.0
    rows[4, 0] = 3e38                           # amax / 448 finite
    rows[5] = np.float32(2.0**-133)             # the smallest bfloat16 values -> 1.0
    rows[3, 1, 0] = 448 * 2.0**-116             # exactly MIN_SCALE: kept
    words = bf16_words(rows)
    got = fp8.token_head_scales(words, "bfloat16")
    np.testing.assert_array_equal(got, reference_scales(words))
    assert got[0, 0] == np.float32(3) / np.float32(448) and got[0, 1] == 1.0
    assert got[1].tolist() == [1.0, 1.0] and got[2].tolist() == [1.0, 1.0]
    assert got[5].tolist() == [1.0, 1.0] and got[3, 0] == 1.0
    assert got[3, 1] == np.float32(2.0**-116) == fp8.MIN_SCALE
    # float16 rows: same rule
    half = np.float16([[[1, -2, 65504, 0]]])
    assert fp8.token_head_scales(half, "float16")[0, 0] == np.float32(65504) / np.float32(448)
    with pytest.raises(ValueError, match=r"x must be \[T, H, D\]"):
        fp8.token_head_scales(np.zeros((2, 8), np.uint16), "bfloat16")


def test_the_largest_element_of_each_row_lands_on_448():
    rng = np.random.default_rng(3)
    words = bf16_words(rng.standard_normal((20, 2, 8)) * rng.uniform(1e-3, 1e3, (20, 2, 1)))
    scales = fp8.token_head_scales(words, "bfloat16")
    codes = fp8.quantize(words, scales[:, :, None], "bfloat16")
    top = np.abs(words_to_float(words)).argmax(axis=2)
    picked = np.take_along_axis(codes, top[:, :, None], axis=2)[:, :, 0]
    assert np.all((picked & 0x7F) == 0x7E)     # +-448


# -- config ---------------------------------------------------------------------------------

def test_config_shapes_and_bytes():
    cfg = th_config(num_host_pages=3)
    assert cfg.token_head_scales and cfg.kv_scale_granularity == "token_head"
    assert cfg.scale_pool_shape == (2, 2, 16, 4, 2)
    assert cfg.host_scale_pool_shape == (3, 2, 2, 4, 2)
    assert cfg.kv_page_bytes == 2 * 2 * 4 * 2 * 8
    assert cfg.scale_page_bytes == 2 * 2 * 4 * 2 * 4
    assert cfg.page_bytes == cfg.kv_page_bytes + cfg.scale_page_bytes
    assert cfg.host_bytes == 3 * cfg.page_bytes
    mla = th_config(num_kv_heads=1, head_dim=576, key_only=True)
    assert mla.scale_pool_shape == (2, 1, 16, 4, 1)
    plain = th_config(kv_scale_granularity="tensor")
    assert plain.scale_pool_shape is None and plain.scale_page_bytes == 0
    assert plain.page_bytes == plain.kv_page_bytes
    # Llama-3-8B-like: the side pool costs 1/32 of the codes at head_dim 128
    big = KVCacheConfig(num_layers=32, num_kv_heads=8, head_dim=128, page_size=16,
                        num_pages=1, dtype=FP8, kv_scale_granularity="token_head")
    assert big.scale_page_bytes * 32 == big.kv_page_bytes


@pytest.mark.parametrize(("kw", "message"), [
    (dict(kv_scale_granularity="token"), r"kv_scale_granularity must be one of \['tensor', "
                                         r"'token_head'\], got 'token'"),
    (dict(dtype="bfloat16"), r"kv_scale_granularity='token_head' needs an fp8 pool "
                             r"\(dtype='float8_e4m3fn'\); the pool holds bfloat16"),
])
def test_config_refuses(kw, message):
    with pytest.raises(ValueError, match=message):
        th_config(**kw)


# -- write, gather, views -------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("model_dtype", ["bfloat16", "float16"])
def test_write_computes_scales_and_gather_uses_them(layout, model_dtype):
    cache = KVCache(th_config(layout=layout, model_dtype=model_dtype), device="cpu")
    seq = cache.add_sequence()
    slots = cache.append([seq], [7]).slot_mapping
    rng = np.random.default_rng(1)
    spread = rng.uniform(1e-2, 1e2, (7, 2, 1))
    values = rng.standard_normal((7, 2, 8)) * spread
    if model_dtype == "bfloat16":
        k, v = bf16_words(values), bf16_words(-3 * values)
    else:
        k, v = values.astype(np.float16), (-3 * values).astype(np.float16)
    cache.write(1, k, v, slots)
    k_scales = fp8.token_head_scales(k, model_dtype)
    v_scales = fp8.token_head_scales(v, model_dtype)
    view = cache.scale_cache(1)
    assert view.shape == (2, 16, 4, 2) and view.dtype == np.float32
    pages, offsets = np.divmod(slots, 4)
    np.testing.assert_array_equal(view[0, pages, offsets], k_scales)
    np.testing.assert_array_equal(view[1, pages, offsets], v_scales)
    assert np.shares_memory(view, cache.scale_pool)
    k_raw, v_raw, _ = cache.gather(1, [seq], raw=True)
    np.testing.assert_array_equal(k_raw, fp8.quantize(k, k_scales[:, :, None], model_dtype))
    np.testing.assert_array_equal(v_raw, fp8.quantize(v, v_scales[:, :, None], model_dtype))
    k_out, v_out, _ = cache.gather(1, [seq])
    np.testing.assert_array_equal(k_out, fp8.dequantize(k_raw, k_scales[:, :, None],
                                                        model_dtype))
    np.testing.assert_array_equal(v_out, fp8.dequantize(v_raw, v_scales[:, :, None],
                                                        model_dtype))
    # layer 0 untouched: its scales are still 1.0
    assert np.all(cache.scale_cache(0) == 1.0)


def test_key_only_side_pool():
    cache = KVCache(th_config(num_kv_heads=1, head_dim=576, key_only=True), device="cpu")
    seq = cache.add_sequence()
    slots = cache.append([seq], [5]).slot_mapping
    k = bf16_words(np.random.default_rng(2).standard_normal((5, 1, 576)) * 7)
    cache.write(0, k, None, slots)
    assert cache.scale_cache(0).shape == (1, 16, 4, 1)
    k_out, v_out, _ = cache.gather(0, [seq])
    assert v_out is None
    s = fp8.token_head_scales(k, "bfloat16")[:, :, None]
    np.testing.assert_array_equal(k_out, fp8.dequantize(fp8.quantize(k, s, "bfloat16"), s,
                                                        "bfloat16"))


def test_per_layer_scale_calls_are_refused():
    cache = KVCache(th_config(), device="cpu")
    for call in (lambda: cache.set_kv_scales(0, 1.0, 1.0), lambda: cache.kv_scales(0),
                 lambda: cache.calibrate_kv_scales(0, np.zeros((1, 2, 8), np.uint16),
                                                   np.zeros((1, 2, 8), np.uint16)),
                 lambda: cache.scale_table):
        with pytest.raises(ValueError, match="computes a scale per token and head"):
            call()
    plain = KVCache(th_config(kv_scale_granularity="tensor"), device="cpu")
    assert plain.scale_pool is None and plain.host_scales is None
    with pytest.raises(ValueError, match=r"scale_cache: the pool has no per-\(token, head\)"):
        plain.scale_cache(0)
    with pytest.raises(IndexError, match="layer 2 out of range"):
        cache.scale_cache(2)


def test_bad_writes_change_nothing():
    cache = KVCache(th_config(num_host_pages=4), device="cpu")
    seq = cache.add_sequence()
    slots = cache.append([seq], [6]).slot_mapping
    rng = np.random.default_rng(4)
    k = bf16_words(rng.standard_normal((6, 2, 8)))
    cache.write(0, k, k, slots)
    before = snapshot(cache)
    bad = slots.copy()
    bad[3] = 16 * 4
    with pytest.raises(InvalidPageError):
        cache.write(0, k, k, bad)
    with pytest.raises(ShapeError):
        cache.write(0, k.astype(np.float32), k, slots)        # the pool's dtype is not fp32
    with pytest.raises(ShapeError):
        cache.write(0, k[:, :1], k[:, :1], slots)
    with pytest.raises(ShapeError, match="v is None"):
        cache.write(0, k, None, slots)
    assert_unchanged(cache, before)


# -- the side pool moves with the pages -----------------------------------------------------

def filled_cache(**kw):
    cache = KVCache(th_config(**kw), device="cpu")
    rng = np.random.default_rng(7)
    cache.scale_pool[...] = rng.uniform(0.5, 2.0, cache.scale_pool.shape)   # poison
    return cache, rng


def write_all(cache, rng, seqs_tokens):
    """Append and write ``n`` new tokens to each seq (every layer); return the written
    rows per layer."""
    seqs = [s for s, _ in seqs_tokens]
    counts = [n for _, n in seqs_tokens]
    step = cache.append(seqs, counts)
    rows = []
    for layer in range(cache.config.num_layers):
        scale = rng.uniform(1e-2, 1e2, (len(step.slot_mapping), 2, 1))
        k = bf16_words(rng.standard_normal((len(step.slot_mapping), 2, 8)) * scale)
        v = bf16_words(rng.standard_normal((len(step.slot_mapping), 2, 8)) / scale)
        cache.write(layer, k, v, step.slot_mapping)
        rows.append((k, v))
    return step, rows


def expected(rows_k):
    s = fp8.token_head_scales(rows_k, "bfloat16")[:, :, None]
    return fp8.dequantize(fp8.quantize(rows_k, s, "bfloat16"), s, "bfloat16")


def test_copy_on_write_copies_scale_pages():
    cache, rng = filled_cache()
    parent = cache.add_sequence()
    _, rows = write_all(cache, rng, [(parent, 6)])          # pages: 4 + 2 tokens
    child = cache.fork(parent)
    step, new_rows = write_all(cache, rng, [(child, 1)])    # the shared half page is copied
    assert step.copy_src.size == 1
    src, dst = int(step.copy_src[0]), int(step.copy_dst[0])
    np.testing.assert_array_equal(cache.scale_pool[:, :, dst, :2], cache.scale_pool[:, :, src, :2])
    for layer in range(2):
        k_out, v_out, _ = cache.gather(layer, [parent, child])
        k, v = rows[layer]
        k_new, v_new = new_rows[layer]
        np.testing.assert_array_equal(k_out, expected(np.concatenate([k, k, k_new])))
        np.testing.assert_array_equal(v_out, expected(np.concatenate([v, v, v_new])))


def test_copy_pages_moves_scales_and_refuses_bad_ids():
    cache, rng = filled_cache()
    seq = cache.add_sequence()
    write_all(cache, rng, [(seq, 8)])
    pages = cache.pages(seq)
    cache.copy_pages(pages, [10, 11])
    np.testing.assert_array_equal(cache.scale_pool[:, :, [10, 11]], cache.scale_pool[:, :, pages])
    np.testing.assert_array_equal(cache.kv[:, :, [10, 11]], cache.kv[:, :, pages])
    before = snapshot(cache)
    with pytest.raises(InvalidPageError):
        cache.copy_pages([0, 16], [12, 13])
    with pytest.raises(ValueError):
        cache.copy_pages([0, 1], [12, 12])
    with pytest.raises(ValueError):
        cache.copy_pages([0, 1], [1, 12])
    assert_unchanged(cache, before)


def test_swap_out_and_in_carry_the_scales():
    cache, rng = filled_cache(num_host_pages=8)
    a, b = cache.add_sequence(), cache.add_sequence()
    write_all(cache, rng, [(a, 7), (b, 3)])
    want = [cache.gather(layer, [a, b]) for layer in range(2)]
    device_pages = cache.pages(a)
    scales = cache.scale_pool[:, :, device_pages].copy()
    transfer = cache.swap_out([a])
    cache.wait()
    host = transfer.host_pages
    np.testing.assert_array_equal(cache.host_scales[host], scales.transpose(2, 0, 1, 3, 4))
    # the freed device pages get other data; then a comes back elsewhere
    c = cache.add_sequence()
    write_all(cache, rng, [(c, 8)])
    cache.swap_in([a])
    cache.wait()
    for layer in range(2):
        got = cache.gather(layer, [a, b])
        np.testing.assert_array_equal(got[0], want[layer][0])
        np.testing.assert_array_equal(got[1], want[layer][1])


def test_swap_refused_changes_nothing():
    cache, rng = filled_cache(num_host_pages=1)
    a = cache.add_sequence()
    write_all(cache, rng, [(a, 7)])
    before = snapshot(cache)
    with pytest.raises(Exception, match="host"):
        cache.swap_out([a])                      # two pages, one host page
    assert_unchanged(cache, before)
    assert cache.seq_state(a) == "resident"


def test_prefix_offload_and_load_carry_the_scales():
    """An evicted cached prefix goes to the host tier with its scales and comes back for
    a hit: the hit reads the same values."""
    cache, rng = filled_cache(num_pages=6, num_host_pages=8, enable_prefix_cache=True)
    tokens = list(range(100, 109))
    a = cache.add_sequence(tokens)
    step = cache.append([a], [9], token_ids=tokens)
    rows = []
    for layer in range(2):
        k = bf16_words(rng.standard_normal((9, 2, 8)) * rng.uniform(1e-2, 1e2, (9, 2, 1)))
        cache.write(layer, k, k[:, ::-1], step.slot_mapping)
        rows.append(k[:8])
    cache.remove(a)                              # two full pages cached, refcount 0
    # fill the device so the cached pages are evicted (offloaded to the host tier)
    filler = cache.add_sequence()
    write_all(cache, rng, [(filler, 24)])
    cache.wait()
    cache.remove(filler)
    cache.scale_pool[...] = 3.0                  # the device copy is gone: poison it
    b = cache.add_sequence(tokens)
    cache.wait()
    assert cache.num_tokens(b) == 8
    assert cache.prefix_stats is not None
    for layer in range(2):
        k_out, v_out, _ = cache.gather(layer, [b])
        np.testing.assert_array_equal(k_out, expected(rows[layer]))
        np.testing.assert_array_equal(v_out, expected(rows[layer][:, ::-1]))


# -- a model of every token ------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "fork", "append", "remove", "swap",
                                           "copy"]),
                          st.integers(0, 7), st.integers(0, 9)), min_size=1, max_size=25))
def test_against_a_model_of_each_token(ops):
    """Whatever moves pages (forks and copy-on-write, swaps, copy_pages to free pages),
    each sequence's gather equals its written rows quantized with their own scales."""
    cache = KVCache(th_config(num_pages=12, num_host_pages=12), device="cpu")
    rng = np.random.default_rng(len(ops))
    cache.scale_pool[...] = rng.uniform(0.5, 2.0, cache.scale_pool.shape)
    model: dict[int, list] = {}         # seq -> [(k rows [n, 2, 8] per layer)] per token
    for op, pick, n in ops:
        live = sorted(model)
        resident = [s for s in live if cache.seq_state(s) == "resident"]
        if op == "add" or not live:
            if cache.num_seqs < 8:
                model[cache.add_sequence()] = []
        elif op == "fork" and resident and cache.num_seqs < 8:
            parent = resident[pick % len(resident)]
            model[cache.fork(parent)] = list(model[parent])
        elif op == "append" and resident:
            seq = resident[pick % len(resident)]
            if cache.pages_needed([seq], [n]) > cache.num_free_pages:
                continue
            step = cache.append([seq], [n])
            rows = [bf16_words(rng.standard_normal((n, 2, 8))
                               * rng.uniform(1e-3, 1e3, (n, 2, 1))) for _ in range(2)]
            for layer in range(2):
                cache.write(layer, rows[layer], rows[layer][:, ::-1], step.slot_mapping)
            model[seq] += [tuple(r[t] for r in rows) for t in range(n)]
        elif op == "remove":
            seq = live[pick % len(live)]
            cache.remove(seq)
            del model[seq]
        elif op == "swap":
            seq = live[pick % len(live)]
            state = cache.seq_state(seq)
            try:
                if state == "resident":
                    cache.swap_out([seq])
                elif state == "swapped":
                    cache.swap_in([seq])
            except Exception:
                pass                         # no room: refused, nothing changed
            cache.wait()
        elif op == "copy":
            free = cache.num_free_pages
            if free >= 2 and resident:
                seq = resident[pick % len(resident)]
                pages = cache.pages(seq)[:1]
                if pages.size:
                    # copy into a page no one holds: the scales go with the codes
                    held = {int(p) for s in model if cache.seq_state(s) == "resident"
                            for p in cache.pages(s)}
                    dst = next(p for p in range(12) if p not in held)
                    cache.copy_pages(pages, [dst])
                    np.testing.assert_array_equal(cache.scale_pool[:, :, dst],
                                                  cache.scale_pool[:, :, int(pages[0])])
        for seq in [s for s in sorted(model) if cache.seq_state(s) == "resident"]:
            if not model[seq]:
                continue
            for layer in range(2):
                k_rows = np.stack([tok[layer] for tok in model[seq]])
                k_out, v_out, _ = cache.gather(layer, [seq])
                np.testing.assert_array_equal(k_out, expected(k_rows))
                np.testing.assert_array_equal(v_out, expected(k_rows[:, ::-1]))


def test_distributed_transfers_refuse_the_side_pool():
    """kvcore.distributed moves K/V pages only: a pool with per-(token, head) scales is
    refused on both sides before anything moves."""
    transfer = pytest.importorskip("kvcore.distributed.transfer")
    cache = KVCache(th_config(), device="cpu")
    seq = cache.add_sequence()
    cache.append([seq], [3])
    for call in (lambda: transfer._check_receiver(cache),
                 lambda: transfer._sender_input(cache, [seq], None, None)):
        with pytest.raises(ValueError, match=r"per-\(token, head\) scales .* is not "
                                             "supported by kvcore.distributed"):
            call()
