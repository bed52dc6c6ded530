"""Prefix caching: hits, chaining, namespaces, collisions, eviction order, events."""

import numpy as np
import pytest

from kvcore import (
    EVENT_EVICTED,
    EVENT_STORED,
    InvalidPageError,
    KVCache,
    KVCacheConfig,
    OutOfPagesError,
    PageAllocator,
    PageTable,
)
from kvcore._core import _slot_token_py
from kvcore._prefix import PrefixIndex, _is_indexed_py

from ._state import assert_same_state, table_state


def test_hit_maps_the_same_pages_and_leaves_one_token(make_prefix_table, prefill):
    table = make_prefix_table()
    prompt = list(range(100, 110))                  # 10 tokens: 2 full pages + 2
    a, cached = prefill(table, prompt)
    assert cached == 0 and table.num_cached_pages == 2
    b, cached = prefill(table, prompt)
    assert cached == 8                               # two full pages
    assert table.pages(b)[:2].tolist() == table.pages(a)[:2].tolist()
    assert table.allocator.refcount(int(table.pages(a)[0])) == 2
    _c, cached = prefill(table, prompt[:8])           # exactly two pages: only one is hit
    assert cached == 4
    _d, cached = prefill(table, prompt[:9])           # 9 tokens: both pages, one left over
    assert cached == 8
    assert table.prefix_stats["hit_tokens"] == 20
    assert table.prefix_stats["queried_tokens"] == 10 + 10 + 8 + 9
    table.check_invariants()


def test_a_miss_in_the_middle_stops_the_match(make_prefix_table, prefill):
    table = make_prefix_table()
    prefill(table, [*list(range(12)), 99])
    other = [*list(range(4)), 50, 51, 52, 53, *list(range(8, 12)), 99]
    _seq, cached = prefill(table, other)
    assert cached == 4     # page 1 differs, so page 2 (same tokens, other parent) misses


def test_same_tokens_after_different_prefixes_are_different_pages(make_prefix_table, prefill):
    table = make_prefix_table()
    tail = [7, 7, 7, 7]
    a, _ = prefill(table, [1, 2, 3, 4, *tail, 0])
    b, cached = prefill(table, [5, 6, 7, 8, *tail, 0])
    assert cached == 0
    assert table.pages(a)[1] != table.pages(b)[1]
    assert table.num_cached_pages == 4


def test_namespaces_never_share(make_prefix_table, prefill):
    table = make_prefix_table()
    prompt = list(range(9))
    prefill(table, prompt, namespace=1)
    _, cached = prefill(table, prompt, namespace=2)
    assert cached == 0
    _, cached = prefill(table, prompt, namespace=1)
    assert cached == 8


def test_decode_filled_pages_become_cacheable(make_prefix_table, prefill):
    table = make_prefix_table()
    seq, _ = prefill(table, [1, 2])
    for token in [3, 4, 5, 6, 7]:
        table.append([seq], [1], token_ids=[token])
    assert table.num_cached_pages == 1
    _, cached = prefill(table, [1, 2, 3, 4, 5, 6, 7, 8])
    assert cached == 4


def test_append_without_token_ids_stops_registering(make_prefix_table):
    table = make_prefix_table()
    seq = table.add_sequence()
    table.append([seq], [4], token_ids=[1, 2, 3, 4])
    table.append([seq], [4])                          # ids unknown from here on
    table.append([seq], [4], token_ids=[9, 9, 9, 9])
    assert table.num_cached_pages == 1


def test_forked_samples_register_their_own_pages(make_prefix_table, prefill):
    table = make_prefix_table()
    parent, _ = prefill(table, [1, 2, 3, 4, 5, 6])
    child = table.fork(parent)
    table.append([parent, child], [2, 2], token_ids=[7, 8, 17, 18])
    assert table.num_cached_pages == 3               # shared page + two different second pages
    _, cached = prefill(table, [1, 2, 3, 4, 5, 6, 17, 18, 0])
    assert cached == 8
    table.check_invariants()


def test_identical_prefix_computed_twice_is_indexed_once_and_chains_on(make_prefix_table, prefill):
    table = make_prefix_table()
    a = table.add_sequence()
    b = table.add_sequence()
    table.append([a, b], [4, 4], token_ids=[1, 2, 3, 4] * 2)     # both compute page 0
    assert table.num_cached_pages == 1
    table.append([b], [4], token_ids=[5, 6, 7, 8])                # b's page 1 links to a's page 0
    _, cached = prefill(table, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert cached == 8


def test_hash_collisions_never_hand_out_other_tokens(make_prefix_table, prefill):
    """With 2 hash bits nearly every page collides; lookups must still be exact."""
    weak = make_prefix_table(num_pages=256, max_seqs=64, prefix_hash_bits=2)
    strong = make_prefix_table(num_pages=256, max_seqs=64)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 3, size=int(rng.integers(1, 20))).tolist() for _ in range(60)]
    live = []
    for prompt in prompts:
        results = []
        for table in (weak, strong):
            seq, cached = prefill(table, prompt)
            results.append(cached)
            pages = table.pages(seq)
            for i in range(cached // 4):   # a hit page holds exactly the prompt's tokens
                tokens = [_slot_token_py(table, int(pages[i]), j) for j in range(4)]
                assert tokens == prompt[4 * i:4 * i + 4]
        assert results[0] == results[1]
        live.append(seq)
        if len(live) > 40:
            for table in (weak, strong):
                table.remove(live[0])
            live.pop(0)
        weak.check_invariants()
        strong.check_invariants()


def test_eviction_takes_clean_pages_first_then_least_recently_freed(make_prefix_table, prefill):
    table = make_prefix_table(num_pages=8, page_size=2)
    a, _ = prefill(table, [1, 2, 3, 4, 5])     # pages 0, 1 cached, 2 partial
    b, _ = prefill(table, [6, 7, 8, 9, 10])    # pages 3, 4 cached, 5 partial
    table.remove(a)   # tail first: 2 clean; 1 then 0 evictable
    table.remove(b)   # 5 clean; 4 then 3 evictable
    alloc = table.allocator
    assert (alloc.num_free, alloc.num_evictable) == (8, 4)
    # clean pages first (LIFO: 5, 2, then the never-used 7, 6) ...
    assert sorted(alloc.allocate(4).tolist()) == [2, 5, 6, 7]
    assert table.num_cached_pages == 4
    # ... then cached ones, least recently freed first: 1, 0, 4, 3
    assert table.allocator.allocate(1).tolist() == [1]
    assert table.num_cached_pages == 3
    kinds, pages, _ = table.take_events()
    assert kinds.tolist()[-1] == EVENT_EVICTED and pages.tolist()[-1] == 1


def test_prefix_outlives_its_tail(make_prefix_table, prefill):
    table = make_prefix_table(num_pages=6, page_size=2)
    a, _ = prefill(table, [1, 2, 3, 4, 5, 6, 7])   # pages 0, 1, 2 cached, 3 partial
    table.remove(a)
    b = table.add_sequence()
    table.append([b], [6])                          # takes 3 (clean), 5, 4 (clean), then evicts 2
    _, cached = prefill(table, [1, 2, 3, 4, 5])
    assert cached == 4                              # pages 0 and 1 survived


def test_hit_on_an_evictable_page_takes_it_back(make_prefix_table, prefill):
    table = make_prefix_table()
    a, _ = prefill(table, list(range(9)))
    table.remove(a)
    alloc = table.allocator
    assert alloc.num_evictable == 2
    b, cached = prefill(table, list(range(9)))
    assert cached == 8 and alloc.num_evictable == 0
    assert alloc.refcount(int(table.pages(b)[0])) == 1
    table.check_invariants()


def test_out_of_pages_with_evictable_pages_changes_nothing(make_prefix_table, prefill):
    table = make_prefix_table(num_pages=6, page_size=2)
    a, _ = prefill(table, [1, 2, 3, 4, 5])
    table.remove(a)
    b = table.add_sequence()
    before = table_state(table)
    cached_before = table.num_cached_pages
    with pytest.raises(OutOfPagesError):
        table.append([b], [13])
    assert_same_state(before, table_state(table))
    assert table.num_cached_pages == cached_before
    table.append([b], [12])                         # all 6 pages: evicts both cached ones
    assert table.num_cached_pages == 0
    table.check_invariants()


def test_events_report_stores_and_evictions_and_drop_when_full(make_prefix_table, prefill):
    table = make_prefix_table(num_pages=4, page_size=2, prefix_event_capacity=3)
    a, _ = prefill(table, [1, 2, 3, 4, 5])
    kinds, pages, hashes = table.take_events()
    assert kinds.tolist() == [EVENT_STORED] * 2 and pages.tolist() == [0, 1]
    assert hashes.dtype == np.uint64 and len(set(hashes.tolist())) == 2
    assert table.take_events()[0].size == 0
    table.remove(a)
    prefill(table, [9, 9, 9, 9, 9, 9, 9])            # evicts 2 stored pages, stores 3
    kinds, _, _ = table.take_events()
    assert len(kinds) == 3 and table.prefix_stats["events_dropped"] == 2


def test_clear_prefix_cache(make_prefix_table, prefill):
    table = make_prefix_table()
    a, _ = prefill(table, list(range(9)))
    _b, _ = prefill(table, list(range(100, 109)))
    table.remove(a)
    table.clear_prefix_cache()
    assert table.num_cached_pages == 0 and table.allocator.num_evictable == 0
    table.check_invariants()
    _, cached = prefill(table, list(range(100, 109)))
    assert cached == 0


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda t, s: t.add_sequence([1, -2]), ValueError, r"tokens\[1\] is -2"),
    (lambda t, s: t.add_sequence([1.5]), TypeError, "tokens must hold integers"),
    (lambda t, s: t.add_sequence([1], namespace="x"), TypeError, "namespace must be"),
    (lambda t, s: t.append([s], [2], token_ids=[1]), ValueError,
     "token_ids holds 1 ids but num_new_tokens add up to 2"),
    (lambda t, s: t.append([s], [1], token_ids=[2**31]), ValueError, "token ids must be in"),
])
def test_bad_prefix_arguments_change_nothing(make_prefix_table, prefill, call, error, message):
    table = make_prefix_table()
    seq, _ = prefill(table, list(range(9)))
    before = table_state(table)
    cached, events = table.num_cached_pages, table.prefix_stats
    with pytest.raises(error, match=message):
        call(table, seq)
    assert_same_state(before, table_state(table))
    assert table.num_cached_pages == cached and table.prefix_stats == events


def test_constructor_checks():
    alloc = PageAllocator(8)
    PageTable(alloc, 4, 2, 2, enable_prefix_cache=True)
    with pytest.raises(ValueError, match="already serves a prefix-caching PageTable"):
        PageTable(alloc, 4, 2, 2, enable_prefix_cache=True)
    with pytest.raises(ValueError, match="prefix_hash_bits must be in"):
        PageTable(PageAllocator(8), 4, 2, 2, enable_prefix_cache=True, prefix_hash_bits=0)


def test_off_by_default_and_tokens_ignored():
    table = PageTable(PageAllocator(8), 4, 2, 2)
    assert not table.prefix_cache_enabled and table.prefix_stats is None
    seq = table.add_sequence([1, 2, 3, 4, 5])
    assert table.num_tokens(seq) == 0
    table.append([seq], [4], token_ids=[1, 2, 3, 4])
    assert table.num_cached_pages == 0 and table.take_events()[0].size == 0


def test_kvcache_prefix_hit_reads_the_original_kv():
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, num_pages=32,
                        dtype="float32", enable_prefix_cache=True)
    cache = KVCache(cfg, device="cpu")
    prompt = list(range(11))
    a = cache.add_sequence(prompt)
    step = cache.append([a], [11], token_ids=prompt)
    kv = np.random.default_rng(0).standard_normal((11, 2, 8)).astype(np.float32)
    for layer in range(2):
        cache.write(layer, kv + layer, -kv, step.slot_mapping)
    b = cache.add_sequence(prompt)
    assert cache.num_tokens(b) == 8
    step = cache.append([b], [3], token_ids=prompt[8:])
    for layer in range(2):
        cache.write(layer, kv[8:] + layer, -kv[8:], step.slot_mapping)
        k_out, v_out, _ = cache.gather(layer, [b])
        np.testing.assert_array_equal(k_out, kv + layer)
        np.testing.assert_array_equal(v_out, -kv)
    assert cache.prefix_stats["hit_rate"] == pytest.approx(8 / 22)
    cache.check_invariants()


def test_test_entry_points_check_their_arguments(make_prefix_table, prefill):
    """The test-only entry points raise typed errors for bad input (they used to crash)."""
    index = PrefixIndex(4, 4)
    assert _is_indexed_py(index, 3) is False
    with pytest.raises(InvalidPageError, match=r"page 1000000000 out of range \[0, 4\)"):
        _is_indexed_py(index, 10**9)
    with pytest.raises(InvalidPageError, match=r"page -1 out of range \[0, 4\)"):
        _is_indexed_py(index, -1)
    with pytest.raises(TypeError, match="page_id must be an integer, got float"):
        _is_indexed_py(index, 1.5)
    plain = PageTable(PageAllocator(8), 4, 2, 2)
    with pytest.raises(ValueError, match="prefix caching is off for this table"):
        _slot_token_py(plain, 0, 0)
    table = make_prefix_table()
    seq, _ = prefill(table, [1, 2, 3, 4, 5])
    page = int(table.pages(seq)[0])
    assert [_slot_token_py(table, page, j) for j in range(4)] == [1, 2, 3, 4]
    with pytest.raises(InvalidPageError, match=r"page 32 out of range \[0, 32\)"):
        _slot_token_py(table, 32, 0)
    with pytest.raises(IndexError, match=r"offset 4 out of range \[0, 4\)"):
        _slot_token_py(table, page, 4)
    with pytest.raises(IndexError, match=r"offset -1 out of range \[0, 4\)"):
        _slot_token_py(table, page, -1)
    with pytest.raises(TypeError, match="offset must be an integer, got bool"):
        _slot_token_py(table, page, True)


@pytest.mark.parametrize(("args", "error", "message"), [
    ((0, 4), ValueError, r"num_pages must be in \[1, 2147483647\], got 0"),
    ((4, 2**31), ValueError, r"page_size must be in \[1, 2147483647\], got 2147483648"),
    ((4, 4.0), TypeError, "page_size must be an integer, got float"),
    ((4, 4, 65), ValueError, r"prefix_hash_bits must be in \[1, 64\], got 65"),
    ((4, 4, 2**40), ValueError, r"prefix_hash_bits must be in \[1, 64\], got 1099511627776"),
    ((4, 4, 64, 0), ValueError, "event_capacity must be >= 1, got 0"),
])
def test_prefix_index_constructor_uses_the_shared_checkers(args, error, message):
    with pytest.raises(error, match=message):
        PrefixIndex(*args)
