"""The host tier on the CPU: swap bookkeeping, transfers in flight, failures, hostile input.

Every mutating call that raises must leave both tiers exactly as they were; a transfer
in flight must keep its pages out of everyone's reach; a failed transfer must never let
its destination pages be served.
"""

import pickle

import numpy as np
import pytest

from kvcore import (
    CapacityError,
    HostTier,
    KernelError,
    KVCache,
    KVCacheConfig,
    LayerGroup,
    OutOfPagesError,
    PageAllocator,
    PageTable,
    SequenceStateError,
    TransferPendingError,
    UnknownSequenceError,
)

LAYERS, HEADS, DIM, PS = 3, 2, 4, 4


def make_cache(num_pages=16, host_pages=16, dtype="float32", groups=None, prefix=False,
               max_seqs=8):
    cfg = KVCacheConfig(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, page_size=PS,
                        num_pages=num_pages, dtype=dtype, max_seqs=max_seqs,
                        num_host_pages=host_pages, layer_groups=groups,
                        enable_prefix_cache=prefix)
    return KVCache(cfg, device="cpu")


def fill(cache, seq, n, seed=0, tokens=None):
    """Append ``n`` tokens to ``seq`` and write random K/V into every K/V layer."""
    step = cache.append([seq], [n], token_ids=tokens)
    rng = np.random.default_rng(seed)
    dtype = cache.config.storage_dtype
    for layer in range(LAYERS):
        k = rng.integers(0, 2**15, (n, HEADS, DIM)).astype(dtype)
        cache.write(layer, k, k + 1, step)
    return step


def contents(cache, seqs):
    """Every layer's gathered K and V of ``seqs`` (host arrays)."""
    return [tuple(np.array(a) for a in cache.gather(layer, seqs)[:2])
            for layer in range(LAYERS)]


def snapshot(cache):
    """Everything a failed call must leave unchanged."""
    table = cache.table
    seqs = table.active_seq_ids().tolist()
    rows = {}
    for s in seqs:
        state = table.seq_state(s)
        for g in range(table.num_groups):
            rows[s, g] = (state, table.num_tokens(s),
                          table.pages(s, group=g).tolist() if state == "resident"
                          else table.host_pages(s, group=g).tolist() if state == "swapped"
                          else None)
    return (seqs, rows, cache.allocator.refcounts.copy(),
            table.host_allocator.refcounts.copy(), cache.allocator.num_free,
            cache.num_free_host_pages, len(cache.pending_transfers))


# -- the basics -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_byte_exact_and_frees_each_tier_in_turn(dtype):
    cache = make_cache(dtype=dtype)
    a, b = cache.add_sequence(), cache.add_sequence()
    fill(cache, a, 10, seed=1)
    fill(cache, b, 5, seed=2)
    before = contents(cache, [a, b])
    free_device, free_host = cache.num_free_pages, cache.num_free_host_pages

    transfer = cache.swap_out([a, b])
    assert transfer.direction == "out" and transfer.status == "pending"
    assert transfer.num_pages == 5 and transfer.nbytes == 5 * cache.config.page_bytes
    assert cache.seq_state(a) == "swapping_out"
    assert cache.num_free_pages == free_device          # freed only once it has completed
    assert cache.num_free_host_pages == free_host - 5
    cache.check_invariants()
    assert cache.poll() == [transfer] and transfer.done
    assert cache.seq_state(a) == "swapped" and cache.num_tokens(a) == 10
    assert cache.num_free_pages == free_device + 5
    cache.check_invariants()

    back = cache.swap_in([b, a])
    assert cache.seq_state(a) == "swapping_in"
    assert cache.wait() == [back] and back.done
    assert cache.num_free_host_pages == free_host
    assert cache.seq_state(a) == cache.seq_state(b) == "resident"
    for (k0, v0), (k1, v1) in zip(before, contents(cache, [a, b]), strict=True):
        assert np.array_equal(k0, k1) and np.array_equal(v0, v1)
    fill(cache, a, 3)                                   # usable again
    cache.check_invariants()


def test_host_pool_holds_the_pages_page_major():
    cache = make_cache()
    seq = cache.add_sequence()
    fill(cache, seq, 6)
    device_pages = cache.pages(seq).tolist()
    transfer = cache.swap_out([seq])
    cache.wait()
    kv = cache.kv
    for d, h in zip(transfer.device_pages.tolist(), transfer.host_pages.tolist(), strict=True):
        assert d in device_pages
        for slot in range(LAYERS):
            assert np.array_equal(cache.host_kv[h, slot, 0], kv[slot, 0, d])
            assert np.array_equal(cache.host_kv[h, slot, 1], kv[slot, 1, d])
    assert cache.table.host_pages(seq).tolist() == transfer.host_pages.tolist()


def test_shared_pages_move_once_and_stay_shared():
    cache = make_cache()
    a = cache.add_sequence()
    fill(cache, a, 9)                 # 3 pages, the last partly full
    b = cache.fork(a)
    fill(cache, b, 4)                 # b copies the last page (copy-on-write), adds one
    shared = set(cache.pages(a).tolist()) & set(cache.pages(b).tolist())
    assert len(shared) == 2
    assert cache.swap_out_pages([a, b]) == 3 + 2
    out = cache.swap_out([a, b])
    assert out.num_pages == 5
    cache.wait()
    host_a, host_b = cache.table.host_pages(a).tolist(), cache.table.host_pages(b).tolist()
    assert host_a[:2] == host_b[:2]
    assert cache.table.host_allocator.refcounts[host_a[0]] == 2
    assert cache.swap_in_pages([a, b]) == 5
    cache.swap_in([a, b])
    cache.wait()
    assert cache.pages(a).tolist()[:2] == cache.pages(b).tolist()[:2]
    assert cache.allocator.refcounts[cache.pages(a)[0]] == 2
    cache.check_invariants()


def test_a_fork_swapped_alone_leaves_the_shared_page_to_its_sibling():
    cache = make_cache()
    a = cache.add_sequence()
    fill(cache, a, 8)
    b = cache.fork(a)
    before = contents(cache, [b])
    cache.swap_out([a])
    cache.wait()
    assert cache.allocator.refcounts[cache.pages(b)].tolist() == [1, 1]   # b's own now
    fill(cache, b, 2)
    cache.swap_in([a])
    cache.wait()
    got = contents(cache, [a])
    for (k0, v0), (k1, v1) in zip(before, got, strict=True):
        assert np.array_equal(k0, k1) and np.array_equal(v0, v1)
    cache.check_invariants()


def test_window_and_state_groups_move_only_the_pages_that_exist():
    groups = (LayerGroup([0]), LayerGroup([1], window=5), LayerGroup([2], state_pages=1))
    cache = make_cache(num_pages=32, host_pages=32, groups=groups)
    seq = cache.add_sequence()
    rng = np.random.default_rng(3)
    for n in (10, 1, 1, 1, 1):        # decode steps release pages the window left behind
        step = cache.append([seq], [n])
        for layer in (0, 1):
            k = rng.standard_normal((n, HEADS, DIM)).astype(np.float32)
            cache.write(layer, k, -k, step)
    first = cache.first_page(seq, group=1)
    assert first > 0
    live = {g: cache.pages(seq, group=g).tolist() for g in range(3)}
    before = [tuple(np.array(a) for a in cache.gather(layer, [seq])[:2]) for layer in (0, 1)]
    out = cache.swap_out([seq])
    assert out.num_pages == sum(len(p) for p in live.values())
    cache.wait()
    for g in range(3):
        assert len(cache.table.host_pages(seq, group=g)) == len(live[g])
    cache.swap_in([seq])
    cache.wait()
    assert cache.first_page(seq, group=1) == first
    for layer, (k0, v0) in zip((0, 1), before, strict=True):
        k1, v1, _ = cache.gather(layer, [seq])
        assert np.array_equal(k0, k1) and np.array_equal(v0, v1)
    cache.append([seq], [3])
    cache.check_invariants()


def test_state_group_contents_come_back():
    groups = (LayerGroup([0, 1]), LayerGroup([2], state_pages=2))
    cache = make_cache(groups=groups)
    seq = cache.add_sequence()
    cache.append([seq], [3])
    state_pages = cache.pages(seq, group=1)
    cache.kv[0, :, state_pages] = 7.5          # slot 0 of the state pages: its "state"
    cache.swap_out([seq])
    cache.wait()
    cache.kv[0, :, state_pages] = 0            # the freed pages are scribbled on
    cache.swap_in([seq])
    cache.wait()
    assert (cache.kv[0, :, cache.pages(seq, group=1)] == 7.5).all()


# -- prefix caching -----------------------------------------------------------------------------

def test_prefix_pages_of_a_swapped_sequence_stay_findable_and_swap_in_does_not_index_stale_tokens():
    cache = make_cache(num_pages=16, prefix=True)
    prompt = list(range(100, 112))             # 3 full pages
    a = cache.add_sequence()
    fill(cache, a, len(prompt), tokens=prompt)
    cache.swap_out([a])
    cache.wait()
    assert cache.match_prefix([*prompt, 1]) == 12     # evictable now, still findable
    b = cache.add_sequence([*prompt, 1])
    assert cache.num_tokens(b) == 12
    cache.remove(b)
    cache.swap_in([a])
    cache.wait()
    # Its new pages' token records are not its tokens: it must stop registering, so a
    # prompt that continues differently cannot hit a page of a.
    more = [7, 7, 7, 7]
    fill(cache, a, 4, tokens=more)
    assert cache.match_prefix([*prompt, *more, 1]) == 12
    cache.check_invariants()


def test_swap_in_offloads_the_cached_pages_it_evicts():
    cache = make_cache(num_pages=6, prefix=True)
    a = cache.add_sequence()
    fill(cache, a, 16, tokens=list(range(16)))     # 4 full pages, indexed
    before = contents(cache, [a])
    cache.swap_out([a])
    cache.wait()
    assert cache.num_cached_pages == 4
    b = cache.add_sequence()
    fill(cache, b, 8, tokens=[9] * 8)              # 2 clean pages left: b takes them
    assert cache.swap_in_pages([a]) == 4 and cache.num_free_pages == 4
    cache.swap_in([a])                              # evicts all 4 cached pages ...
    kinds = [t.kind for t in cache.pending_transfers]
    assert kinds == ["offload", "swap_in"]          # ... offloaded first, then loaded
    assert cache.match_prefix([*range(16), 0]) == 0   # not findable before it arrived
    cache.wait()
    assert cache.match_prefix([*range(16), 0]) == 16  # findable in the host tier
    assert cache.prefix_stats["host_cached_pages"] == 4
    for (k0, v0), (k1, v1) in zip(before, contents(cache, [a]), strict=True):
        assert np.array_equal(k0, k1) and np.array_equal(v0, v1)
    cache.check_invariants()


# -- in flight -------------------------------------------------------------------------------

def hold(cache):
    """Make every transfer look in flight until ``release``."""
    cache.backend.transfer_done = lambda event: False


def release(cache):
    del cache.backend.transfer_done


def test_a_swap_in_in_flight_is_not_visible_and_its_pages_are_not_reused():
    cache = make_cache(num_pages=8)
    a = cache.add_sequence()
    fill(cache, a, 12)
    cache.swap_out([a])
    cache.wait()
    hold(cache)
    back = cache.swap_in([a])
    assert cache.poll() == []
    for call in (lambda: cache.append([a], [1]), lambda: cache.pages(a),
                 lambda: cache.block_tables([a]), lambda: cache.flashinfer_metadata([a]),
                 lambda: cache.gather(0, [a]), lambda: cache.fork(a),
                 lambda: cache.truncate([a], [1]), lambda: cache.swap_out([a]),
                 lambda: cache.swap_in([a])):
        with pytest.raises(TransferPendingError):
            call()
    meta = cache.step_metadata(16)
    with pytest.raises(TransferPendingError):
        meta.update([a], [1])
    # Another sequence cannot get its pages.
    b = cache.add_sequence()
    with pytest.raises(OutOfPagesError):
        cache.append([b], [5 * PS + 1])
    step = cache.append([b], [5 * PS])
    assert not set(step.slot_mapping // PS) & set(back.device_pages.tolist())
    release(cache)
    assert cache.poll() == [back]
    assert cache.seq_state(a) == "resident"
    cache.check_invariants()


def test_a_swap_out_in_flight_keeps_its_device_pages_until_it_completes():
    cache = make_cache(num_pages=8)
    a = cache.add_sequence()
    fill(cache, a, 12)
    hold(cache)
    out = cache.swap_out([a])
    assert cache.num_free_pages == 5
    assert (cache.allocator.refcounts[out.device_pages] == 1).all()
    b = cache.add_sequence()
    with pytest.raises(OutOfPagesError):
        cache.append([b], [6 * PS])
    release(cache)
    cache.poll()
    assert cache.num_free_pages == 8
    cache.check_invariants()


def test_remove_in_flight_releases_both_tiers_when_the_transfer_completes():
    cache = make_cache(num_pages=8, max_seqs=2)
    a = cache.add_sequence()
    fill(cache, a, 12)
    hold(cache)
    out = cache.swap_out([a])
    cache.remove(a)
    assert not cache.table.is_active(a) and cache.num_seqs == 0
    with pytest.raises(UnknownSequenceError):
        cache.seq_state(a)
    with pytest.raises(UnknownSequenceError):
        cache.remove(a)
    cache.add_sequence()
    with pytest.raises(CapacityError):   # its seq id is not free before the copy completes
        cache.add_sequence()
    assert cache.num_free_pages == 5 and cache.num_free_host_pages == 16 - 3
    cache.check_invariants()
    release(cache)
    assert cache.poll() == [out]
    assert cache.num_free_pages == 8 and cache.num_free_host_pages == 16
    cache.add_sequence()
    cache.check_invariants()


def test_wait_on_one_transfer_and_on_unknown_ones():
    cache = make_cache()
    a, b = cache.add_sequence(), cache.add_sequence()
    fill(cache, a, 4)
    fill(cache, b, 4)
    first = cache.swap_out([a])
    second = cache.swap_out([b])
    assert cache.pending_transfers == (first, second)
    assert cache.wait(second) == [first, second]      # anything complete finishes too
    with pytest.raises(ValueError, match="not in flight"):
        cache.wait(second)
    assert cache.wait() == [] and cache.poll() == []


# -- failures -----------------------------------------------------------------------------------

def test_a_copy_that_cannot_be_enqueued_changes_nothing():
    cache = make_cache()
    a = cache.add_sequence()
    fill(cache, a, 9)
    before = snapshot(cache)

    def broken(*args):
        raise RuntimeError("launch failed")
    cache.backend.swap_copy = broken
    with pytest.raises(KernelError, match="launch failed"):
        cache.swap_out([a])
    assert _same(snapshot(cache), before)
    del cache.backend.swap_copy
    cache.swap_out([a])
    cache.wait()
    cache.backend.swap_copy = broken
    before = snapshot(cache)
    with pytest.raises(KernelError):
        cache.swap_in([a])
    assert _same(snapshot(cache), before)
    cache.check_invariants()


def _same(a, b):
    return (a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2])
            and np.array_equal(a[3], b[3]) and a[4:] == b[4:])


def test_a_failed_swap_out_leaves_the_sequence_resident_with_its_data():
    cache = make_cache()
    a = cache.add_sequence()
    fill(cache, a, 9)
    before = contents(cache, [a])
    out = cache.swap_out([a])

    def failed(event):
        raise KernelError("injected")
    cache.backend.transfer_done = failed
    assert cache.poll() == [out]
    assert out.status == "failed" and isinstance(out.error, KernelError)
    assert cache.seq_state(a) == "resident" and cache.num_free_host_pages == 16
    for (k0, v0), (k1, v1) in zip(before, contents(cache, [a]), strict=True):
        assert np.array_equal(k0, k1) and np.array_equal(v0, v1)
    cache.check_invariants()


def test_a_failed_swap_in_never_serves_its_pages():
    cache = make_cache(num_pages=8)
    a = cache.add_sequence()
    fill(cache, a, 12)
    cache.swap_out([a])
    cache.wait()
    host_pages = cache.table.host_pages(a).tolist()
    back = cache.swap_in([a])
    cache.kv[:, :, back.device_pages] = -1          # what a broken copy left there

    def failed(event):
        raise KernelError("injected")
    cache.backend.wait_transfer = failed
    assert cache.wait(back) == [back] and back.status == "failed"
    del cache.backend.wait_transfer
    assert cache.seq_state(a) == "swapped"
    assert cache.table.host_pages(a).tolist() == host_pages
    assert cache.num_free_pages == 8                 # the pages it wrote are free, unmapped
    with pytest.raises(SequenceStateError):
        cache.gather(0, [a])
    cache.swap_in([a])                               # a retry brings the right bytes
    cache.wait()
    assert (cache.gather(0, [a])[0] != -1).all()
    cache.check_invariants()


# -- hostile input ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad, error", [
    ([99], UnknownSequenceError), ([-1], UnknownSequenceError), ([0, 0], ValueError),
    ([[0]], ValueError), ([0.5], TypeError), ("0", ValueError), (None, ValueError),
    ([True], TypeError),
])
def test_bad_seq_ids_raise_and_change_nothing(bad, error):
    cache = make_cache()
    a = cache.add_sequence()
    fill(cache, a, 6)
    before = snapshot(cache)
    for call in (cache.swap_out, cache.swap_out_pages, cache.swap_in, cache.swap_in_pages):
        with pytest.raises(error):
            call(bad)
        assert _same(snapshot(cache), before)
    with pytest.raises((error, UnknownSequenceError)):
        cache.host_tier.finish(bad, True)
    assert _same(snapshot(cache), before)


def test_wrong_states_raise_typed_errors_and_change_nothing():
    cache = make_cache()
    a, b = cache.add_sequence(), cache.add_sequence()
    fill(cache, a, 6)
    fill(cache, b, 6)
    before = snapshot(cache)
    with pytest.raises(SequenceStateError) as info:
        cache.swap_in([a])
    assert info.value.state == "resident" and info.value.seq_id == a
    assert not isinstance(info.value, TransferPendingError)
    cache.swap_out([b])
    cache.wait()
    before = snapshot(cache)
    with pytest.raises(SequenceStateError):
        cache.swap_out([a, b])                        # b is swapped: nothing moves
    with pytest.raises(SequenceStateError):
        cache.append([a, b], [1, 1])
    with pytest.raises(SequenceStateError):
        cache.fork(b)
    with pytest.raises(SequenceStateError):
        cache.truncate([b], [1])
    assert _same(snapshot(cache), before)
    with pytest.raises(UnknownSequenceError):
        cache.host_tier.finish([a], True)             # no transfer in flight
    with pytest.raises(TypeError):
        cache.host_tier.finish([b], 1)
    assert _same(snapshot(cache), before)
    cache.check_invariants()


def test_out_of_pages_in_either_tier_changes_nothing():
    cache = make_cache(num_pages=8, host_pages=2)
    a = cache.add_sequence()
    fill(cache, a, 12)
    before = snapshot(cache)
    with pytest.raises(OutOfPagesError) as info:
        cache.swap_out([a])
    assert (info.value.requested, info.value.available) == (3, 2)
    assert _same(snapshot(cache), before)
    cache2 = make_cache(num_pages=4, host_pages=8)
    a = cache2.add_sequence()
    fill(cache2, a, 12)
    cache2.swap_out([a])
    cache2.wait()
    b = cache2.add_sequence()
    fill(cache2, b, 8)
    before = snapshot(cache2)
    with pytest.raises(OutOfPagesError):
        cache2.swap_in([a])
    assert _same(snapshot(cache2), before)
    cache2.check_invariants()


def test_without_a_host_tier():
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=4, num_pages=4)
    cache = KVCache(cfg, device="cpu")
    seq = cache.add_sequence()
    for call in (cache.swap_out, cache.swap_in, cache.swap_out_pages, cache.swap_in_pages):
        with pytest.raises(ValueError, match="no host tier"):
            call([seq])
    assert cache.host_kv is None and cache.host_tier is None
    assert cache.poll() == [] and cache.wait() == [] and cache.num_free_host_pages == 0
    with pytest.raises(ValueError, match="no host tier"):
        HostTier(cache.table)
    with pytest.raises(TypeError):
        HostTier(None)


def test_constructor_and_config_checks():
    alloc = PageAllocator(4)
    with pytest.raises(ValueError, match="second PageAllocator"):
        PageTable(alloc, 4, 2, 2, host_allocator=alloc)
    with pytest.raises(TypeError):
        PageTable(alloc, 4, 2, 2, host_allocator=4)
    for bad, error in ((-1, ValueError), (True, TypeError), (1.0, TypeError),
                       (2**31, ValueError), ("4", TypeError)):
        with pytest.raises(error):
            KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=4,
                          num_pages=4, num_host_pages=bad)
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=1, head_dim=4, page_size=4, num_pages=4,
                        num_host_pages=3)
    assert cfg.host_pool_shape == (3, 2, 2, 4, 1, 4)
    assert cfg.host_bytes == 3 * cfg.page_bytes


def test_errors_pickle():
    err = TransferPendingError(3, "swapping_in", "in flight")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is TransferPendingError and again.seq_id == 3
    assert again.state == "swapping_in" and str(again) == "in flight"
    assert isinstance(again, SequenceStateError) and isinstance(again, ValueError)


# -- review findings (issue 14): each once a bug -------------------------------------------------

def offloading_cache(num_pages=6, host_pages=8):
    """A cache whose prompt [0..15] (4 full pages) is cached and evictable."""
    cache = make_cache(num_pages=num_pages, host_pages=host_pages, prefix=True)
    a = cache.add_sequence()
    fill(cache, a, 16, tokens=list(range(16)))
    cache.remove(a)
    return cache


def test_admission_counts_survive_heap_churn():
    cache = make_cache(num_pages=64, host_pages=64)
    seqs = [cache.add_sequence() for _ in range(4)]
    cache.append(seqs, [60, 50, 40, 30])
    expected = sum(-(-n // PS) for n in (60, 50, 40, 30))
    for _ in range(300):      # a scratch array freed too early would be reused by these
        junk = [np.empty(k, np.int32) for k in range(1, 40)]
        assert cache.swap_out_pages(seqs) == expected
        del junk
    cache.check_invariants()


def test_an_offload_that_cannot_be_enqueued_does_not_fail_the_call():
    cache = offloading_cache()
    b = cache.add_sequence()
    swap_copy = cache.backend.swap_copy

    def offload_fails(direction, device_pages, host_pages, stream=None):
        if direction == "out" and cache.table.seq_state(b) == "resident":
            raise RuntimeError("injected launch failure")
        return swap_copy(direction, device_pages, host_pages, stream)
    cache.backend.swap_copy = offload_fails
    child_src = cache.add_sequence()
    fill(cache, child_src, 6, seed=3)
    child = cache.fork(child_src)
    before = contents(cache, [child])
    step = cache.append([b, child], [12, 1])   # evicts (offloads) cached pages; CoW for child
    assert step.copy_src.size == 1             # the copy-on-write copy still happened
    after = contents(cache, [child])
    for (k0, _), (k1, _) in zip(before, after, strict=True):
        assert np.array_equal(k0, k1[:6])
    failed = cache.poll()
    assert [t.kind for t in failed] == ["offload"] and failed[0].status == "failed"
    assert cache.match_prefix([*range(16), 0]) == 0    # never served
    cache.check_invariants()


def test_a_load_that_cannot_be_enqueued_keeps_the_device_part_of_the_hit():
    cache = offloading_cache()
    filler = cache.add_sequence()
    cache.append([filler], [cache.num_free_pages * PS])
    cache.remove(filler)
    cache.poll()
    assert cache.match_prefix([*range(16), 0]) == 16

    def broken(*args):
        raise RuntimeError("injected launch failure")
    cache.backend.swap_copy = broken
    seq = cache.add_sequence([*range(16), 0])
    assert cache.seq_state(seq) == "resident" and cache.num_tokens(seq) == 0
    assert [t.status for t in cache.poll()] == ["failed"]
    del cache.backend.swap_copy
    cache.remove(seq)
    cache.check_invariants()


def test_finish_writebacks_refuses_pages_not_taken_or_given_twice():
    cache = offloading_cache()
    table, tier = cache.table, cache.host_tier
    b = table.add_sequence()
    table.append([b], [24])                     # the KVCache is bypassed: nothing taken
    assert table.num_writebacks == 4
    refs = table.host_allocator.refcounts.copy()
    with pytest.raises(ValueError, match="no write-back in flight"):
        tier.finish_writebacks([0], True)       # not taken yet: nothing was copied
    _, host = table.take_writebacks()
    with pytest.raises(ValueError, match="is given twice"):
        tier.finish_writebacks([host[0], host[0]], True)
    assert np.array_equal(table.host_allocator.refcounts, refs)
    tier.finish_writebacks(host, True)
    table.check_invariants()


def test_add_sequence_checks_its_stream_before_anything_changes():
    cache = offloading_cache()
    before = snapshot(cache)
    with pytest.raises(TypeError):
        cache.add_sequence([*range(16), 0], stream="not a stream")
    assert _same(snapshot(cache), before)


def test_a_window_group_drops_evicted_pages_instead_of_offloading():
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=4, num_pages=6,
                        dtype="float32", num_host_pages=8, enable_prefix_cache=True,
                        layer_groups=(LayerGroup([0], window=4),))
    cache = KVCache(cfg, device="cpu")
    a = cache.add_sequence()
    cache.append([a], [16], token_ids=list(range(16)))
    cache.remove(a)
    b = cache.add_sequence()
    cache.append([b], [24])
    assert cache.table.num_writebacks == 0 and cache.pending_transfers == ()
    assert cache.prefix_stats.get("host_cached_pages", 0) == 0
