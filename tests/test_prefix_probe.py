"""PageTable.match_prefix: a prefix-cache probe that changes nothing and agrees with
what add_sequence then maps (the same rule: whole cached pages, at least one token left)."""

import numpy as np
import pytest

from kvcore import CapacityError, KVCache, KVCacheConfig, PageAllocator, PageTable

from ._state import assert_same_future, assert_same_state, table_state


def observe(table):
    """Every observable of the table short of the events (drained separately)."""
    alloc = table.allocator
    return (table_state(table), alloc.num_evictable, alloc.num_used, table.num_cached_pages,
            table.prefix_stats, table.block_tables(table.active_seq_ids()).tolist())


def probe_changes_nothing(table, tokens, namespace=0):
    """Probe once and prove nothing moved; return the probe's answer."""
    table.take_events()   # drain, so any event the probe emitted would show
    before = observe(table)
    answer = table.match_prefix(tokens, namespace=namespace)
    after = observe(table)
    assert_same_state(before[0], after[0])
    assert before[1:] == after[1:]
    assert table.take_events()[0].size == 0
    table.check_invariants()
    return answer


def test_the_rule_whole_pages_and_one_token_left(make_prefix_table, prefill):
    table = make_prefix_table()
    prefill(table, [5, 6, 7, 8, 9, 10, 11, 12, 13])     # pages [5..8] and [9..12] cached
    assert probe_changes_nothing(table, [5, 6, 7, 8, 9, 10, 11, 12, 13]) == 8
    assert probe_changes_nothing(table, [5, 6, 7, 8, 9, 10, 11, 12, 99, 98]) == 8
    assert probe_changes_nothing(table, [5, 6, 7, 8, 9, 10, 11, 12]) == 4   # last token left
    assert probe_changes_nothing(table, [5, 6, 7, 8, 9]) == 4
    assert probe_changes_nothing(table, [5, 6, 7, 8]) == 0
    assert probe_changes_nothing(table, [5, 6, 7]) == 0
    assert probe_changes_nothing(table, []) == 0
    assert probe_changes_nothing(table, [5, 6, 7, 0, 9, 10, 11, 12, 13]) == 0   # first page differs
    assert probe_changes_nothing(table, [5, 6, 7, 8, 9, 10, 11, 0, 13]) == 4
    assert probe_changes_nothing(table, [5, 6, 7, 8, 9, 10, 11, 12, 13], namespace=1) == 0


def test_capped_by_max_pages_per_seq_like_add_sequence(make_prefix_table):
    table = make_prefix_table(max_pages=3)
    seq = table.add_sequence()
    table.append([seq], [12], token_ids=list(range(12)))     # 3 full pages cached
    prompt = [*range(12), 50]
    table.remove(seq)
    assert probe_changes_nothing(table, prompt) == 12
    table2 = make_prefix_table(max_pages=2)
    seq = table2.add_sequence()
    table2.append([seq], [8], token_ids=list(range(8)))
    assert probe_changes_nothing(table2, [*range(8), 1, 2, 3, 4, 5]) == 8   # 2 pages at most
    assert table2.num_tokens(table2.add_sequence([*range(8), 1, 2, 3, 4, 5])) == 8


def test_evictable_pages_count_and_stay_evictable(make_prefix_table, prefill):
    table = make_prefix_table()
    seq, _ = prefill(table, list(range(9)))
    table.remove(seq)
    assert table.allocator.num_evictable == 2
    assert probe_changes_nothing(table, list(range(9))) == 8
    assert table.allocator.num_evictable == 2


def test_needs_no_free_sequence_slot(make_prefix_table, prefill):
    table = make_prefix_table(max_seqs=2)
    prefill(table, list(range(9)))
    table.add_sequence()
    with pytest.raises(CapacityError):
        table.add_sequence(list(range(9)))
    assert probe_changes_nothing(table, list(range(9))) == 8


def test_after_clear_nothing_matches(make_prefix_table, prefill):
    table = make_prefix_table()
    prefill(table, list(range(9)))
    table.clear_prefix_cache()
    assert probe_changes_nothing(table, list(range(9))) == 0


def test_off_returns_zero_but_still_checks_arguments():
    table = PageTable(PageAllocator(8), 4, 2, 2)
    seq = table.add_sequence()
    table.append([seq], [5], token_ids=[1, 2, 3, 4, 5])
    before = table_state(table)
    assert table.match_prefix([1, 2, 3, 4, 5]) == 0
    with pytest.raises(ValueError, match=r"tokens\[0\] is -1, token ids must be in"):
        table.match_prefix([-1])
    with pytest.raises(TypeError, match="namespace must be an integer, got str"):
        table.match_prefix([1], namespace="a")
    assert_same_state(before, table_state(table))
    assert table.prefix_stats is None


@pytest.mark.parametrize(("tokens", "namespace", "error", "message"), [
    ([1, -2], 0, ValueError, r"tokens\[1\] is -2, token ids must be in \[0, 2147483647\]"),
    ([2**31], 0, ValueError, r"tokens\[0\] is 2147483648, token ids must be in"),
    ([1.5], 0, TypeError, "tokens must hold integers, got dtype float64"),
    ([True], 0, TypeError, "tokens must hold integers, got dtype bool"),
    ([[1]], 0, ValueError, r"tokens must be 1-D, got shape \(1, 1\)"),
    (None, 0, ValueError, r"tokens must be 1-D, got shape \(\)"),
    ([1], 1.5, TypeError, "namespace must be an integer, got float"),
    ([1], True, TypeError, "namespace must be an integer, got bool"),
    ([1], 2**63, ValueError, "namespace 9223372036854775808 is outside the int64 range"),
])
def test_bad_arguments_raise_the_errors_of_add_sequence(make_prefix_table, prefill, tokens,
                                                         namespace, error, message):
    table = make_prefix_table()
    prefill(table, list(range(9)))
    before = observe(table)
    with pytest.raises(error, match=message):
        table.match_prefix(tokens, namespace=namespace)
    if tokens is not None:   # add_sequence ignores a missing prompt; the probe needs one
        with pytest.raises(error, match=message):
            table.add_sequence(tokens, namespace=namespace)
    after = observe(table)
    assert_same_state(before[0], after[0])
    assert before[1:] == after[1:]


def test_accepts_every_token_array_add_sequence_accepts(make_prefix_table, prefill):
    table = make_prefix_table()
    prefill(table, list(range(9)))
    for tokens in (list(range(9)), tuple(range(9)), np.arange(9, dtype=np.int32),
                   np.arange(9, dtype=np.int64), np.arange(9, dtype=np.uint8),
                   np.arange(18, dtype=np.int32)[::2] // 2):
        assert probe_changes_nothing(table, tokens) == 8


@pytest.mark.parametrize("hash_bits", [64, 2])
@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_add_sequence_and_changes_nothing(make_prefix_table, hash_bits, seed):
    """A random workload over a small pool (so pages are evicted and reused) on a table
    and an untouched twin: probing never changes the table, and what it reports is what
    add_sequence then maps. With 2 hash bits nearly every page collides in the index."""
    rng = np.random.default_rng(seed)
    table, twin = (make_prefix_table(num_pages=24, page_size=2, max_seqs=6, max_pages=12,
                        prefix_hash_bits=hash_bits) for _ in range(2))
    live = []
    num_evictions = 0
    for _ in range(150):
        prompt = rng.integers(0, 3, size=int(rng.integers(0, 14))).tolist()
        namespace = int(rng.integers(0, 2))
        for _probe in range(2):   # probing twice in a row gives the same answer
            answer = probe_changes_nothing(table, prompt, namespace)
            assert answer == twin.match_prefix(prompt, namespace=namespace)
        assert answer % 2 == 0 and answer <= max(len(prompt) - 1, 0)
        if len(live) == 6 or rng.random() < 0.3:
            victim = live.pop(int(rng.integers(0, len(live)))) if live else None
            if victim is not None:
                for t in (table, twin):
                    t.remove(victim)
            continue
        seqs = [t.add_sequence(prompt, namespace=namespace) for t in (table, twin)]
        assert seqs[0] == seqs[1]
        assert table.num_tokens(seqs[0]) == answer == twin.num_tokens(seqs[1])
        pages = table.pages(seqs[0])
        rest = prompt[answer:]
        need = table.pages_needed([seqs[0]], [len(rest)])
        if need > table.allocator.num_free:
            for t in (table, twin):
                t.remove(seqs[0])
            continue
        for t in (table, twin):
            t.append([seqs[0]], [len(rest)], token_ids=rest)
        assert table.pages(seqs[0])[:answer // 2].tolist() == pages[:answer // 2].tolist()
        live.append(seqs[0])
        num_evictions = table.prefix_stats["evictions"]
        assert table.prefix_stats == twin.prefix_stats
    assert num_evictions > 0   # the workload did reuse cached pages
    table.check_invariants()
    twin.check_invariants()
    assert_same_future(table, twin, live)


def test_kvcache_passthrough():
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=4, num_pages=16,
                        dtype="float32", enable_prefix_cache=True)
    cache = KVCache(cfg, device="cpu")
    seq = cache.add_sequence(list(range(9)))
    cache.append([seq], [9], token_ids=list(range(9)))
    assert cache.match_prefix(list(range(9))) == 8
    assert cache.match_prefix(list(range(9)), namespace=3) == 0
    assert cache.prefix_stats["queries"] == 1
    off = KVCache(KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=4,
                                num_pages=16, dtype="float32"), device="cpu")
    assert off.match_prefix(list(range(9))) == 0


def test_a_prefix_cache_cannot_be_made_outside_a_page_table():
    """It would attach to the allocator for good; only PageTable may make one."""
    from kvcore._prefix import PrefixCache

    allocator = PageAllocator(8)
    with pytest.raises(TypeError, match="made by PageTable"):
        PrefixCache(allocator, 4, 2, 4, 64, 10)
    table = PageTable(allocator, 4, 2, 4, enable_prefix_cache=True)   # still attachable
    table.check_invariants()
