"""Retention priorities and leaf-first eviction (issue 15, parts 3 and 4).

The allocator's eviction order is checked against a plain model (a list per priority in
freeing order, a LIFO clean stack) by a hypothesis state machine; the prefix cache's
use of it (hits, ranges, forks, durations, the host tier) and the tree of entries
(every indexed page reachable from a root) by hand-written cases and a random
workload that checks every invariant after each step.
"""

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcore import (
    HostTier,
    KVCoreError,
    OutOfPagesError,
    PageAllocator,
    PageTable,
    Retention,
    TokenRange,
)
from kvcore._allocator import _forget_py, _retain_py, _set_retention_py
from kvcore.retention import DEFAULT_PRIORITY, MAX_RANGES

# -- the allocator against a plain model ---------------------------------------------------


class AllocatorModel(RuleBasedStateMachine):
    """Pages with refcounts, a cached flag, a priority and a duration (0 or 'forever'
    long, so nothing expires during the run); evictable pages kept in one list in
    freeing order. Eviction must take the first page of the lowest priority."""

    NUM_PAGES = 12

    def __init__(self):
        super().__init__()
        self.alloc = PageAllocator(self.NUM_PAGES)
        self.clean = list(range(self.NUM_PAGES - 1, -1, -1))   # top last
        self.refs = [0] * self.NUM_PAGES
        self.cached = [False] * self.NUM_PAGES
        self.prio = [DEFAULT_PRIORITY] * self.NUM_PAGES
        self.floor = [DEFAULT_PRIORITY] * self.NUM_PAGES
        self.dur = [0] * self.NUM_PAGES
        self.evictable = []          # freeing order
        self.evicted = {}

    def _release(self, page):
        if self.cached[page]:
            self.evictable.append(page)
        else:
            self.clean.append(page)

    def _order(self):
        return sorted(self.evictable, key=lambda p: (self.prio[p], self.evictable.index(p)))

    def _used(self):
        return [p for p in range(self.NUM_PAGES) if self.refs[p] > 0]

    @rule(n=st.integers(0, 5))
    def allocate(self, n):
        free = len(self.clean) + len(self.evictable)
        if n > free:
            with pytest.raises(OutOfPagesError):
                self.alloc.allocate(n)
            return
        expected = []
        for _ in range(n):
            if self.clean:
                page = self.clean.pop()
            else:
                page = self._order()[0]
                self.evictable.remove(page)
                self.evicted[self.prio[page]] = self.evicted.get(self.prio[page], 0) + 1
                self.cached[page] = False
                self.prio[page], self.dur[page] = DEFAULT_PRIORITY, 0
                self.floor[page] = DEFAULT_PRIORITY
            self.refs[page] = 1
            expected.append(page)
        assert self.alloc.allocate(n).tolist() == expected

    @precondition(lambda self: self._used())
    @rule(data=st.data())
    def decref(self, data):
        pages = data.draw(st.lists(st.sampled_from(self._used()), min_size=1, max_size=3,
                                   unique=True))
        freed = self.alloc.decref(pages).tolist()
        expect = []
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                expect.append(p)
                self._release(p)
        assert freed == expect

    @precondition(lambda self: self._used())
    @rule(data=st.data())
    def incref(self, data):
        page = data.draw(st.sampled_from(self._used()))
        self.alloc.incref([page])
        self.refs[page] += 1

    @precondition(lambda self: self._used())
    @rule(data=st.data())
    def retain(self, data):
        page = data.draw(st.sampled_from(self._used()))
        _retain_py(self.alloc, page)
        self.cached[page] = True

    @rule(page=st.integers(0, NUM_PAGES - 1))
    def forget(self, page):
        _forget_py(self.alloc, page)
        if not self.cached[page]:
            return
        self.cached[page] = False
        self.prio[page], self.dur[page] = DEFAULT_PRIORITY, 0
        self.floor[page] = DEFAULT_PRIORITY
        if self.refs[page] == 0:
            self.evictable.remove(page)
            self.clean.append(page)

    @rule(page=st.integers(0, NUM_PAGES - 1), prio=st.integers(0, 100),
          forever=st.booleans(), only_raise=st.booleans())
    def set_retention(self, page, prio, forever, only_raise):
        dur = 0 if forever else 3600 * 10**9   # an hour: never expires in the run
        _set_retention_py(self.alloc, page, prio, dur, only_raise)
        # What the request's retention drops to once its duration is over.
        floor = prio if dur == 0 else DEFAULT_PRIORITY
        if not only_raise:
            self._set(page, prio, dur, floor)
            return
        cur, fl = self.prio[page], self.floor[page]
        if prio > cur:
            self._set(page, prio, dur, max(floor, fl))
            return
        if floor > fl:
            if floor > cur:
                self._set(page, floor, 0, floor)
                return
            self.floor[page] = floor
        if dur and prio == cur and self.dur[page] and dur > self.dur[page]:
            self._set(page, prio, dur, self.floor[page])

    def _set(self, page, prio, dur, floor):
        if dur == 0:               # for good: at least the floor
            prio = floor = max(prio, floor)
        self._move(page, prio, dur, floor)

    def _move(self, page, prio, dur, floor):
        if page in self.evictable:   # moves to the tail of its new priority
            self.evictable.remove(page)
            self.evictable.append(page)
        self.prio[page], self.dur[page], self.floor[page] = prio, dur, floor

    @invariant()
    def agrees(self):
        self.alloc.check_invariants()
        assert self.alloc.evictable_order().tolist() == self._order()
        assert self.alloc.priorities.tolist() == self.prio
        assert self.alloc.evictions_by_priority == self.evicted
        assert self.alloc.num_free == len(self.clean) + len(self.evictable)


TestAllocatorModel = AllocatorModel.TestCase
TestAllocatorModel.settings = settings(max_examples=120, stateful_step_count=40, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


def test_an_expired_priority_drops_to_the_default():
    alloc = PageAllocator(4)
    pages = alloc.allocate(4).tolist()
    for p in pages:
        _retain_py(alloc, p)
    _set_retention_py(alloc, pages[0], 90, 20_000_000)    # 90 for 20 ms once freed
    _set_retention_py(alloc, pages[1], 90)                # 90 for good
    _set_retention_py(alloc, pages[2], 60, 3600 * 10**9)  # 60 for an hour
    alloc.decref(pages)
    assert alloc.evictable_order().tolist() == [pages[3], pages[2], pages[0], pages[1]]
    time.sleep(0.05)   # only ever later than the expiry: the direction that is certain
    alloc.check_invariants()
    # The next eviction first drops page 0 to 35, at the tail of that list.
    assert alloc.allocate(1).tolist() == [pages[3]]
    assert alloc.priorities[pages[0]] == DEFAULT_PRIORITY
    assert alloc.evictable_order().tolist() == [pages[0], pages[2], pages[1]]
    assert alloc.allocate(3).tolist() == [pages[0], pages[2], pages[1]]
    assert alloc.evictions_by_priority == {35: 2, 60: 1, 90: 1}
    alloc.check_invariants()


# -- Retention values ----------------------------------------------------------------------

@pytest.mark.parametrize("bad, error", [
    (dict(priority=101), ValueError), (dict(priority=-1), ValueError),
    (dict(priority=3.5), TypeError), (dict(priority="9"), TypeError),
    (dict(duration=0), ValueError), (dict(duration=-1.0), ValueError),
    (dict(duration=float("nan")), ValueError), (dict(duration=float("inf")), ValueError),
    (dict(duration="1"), TypeError), (dict(duration=True), TypeError),
    (dict(ranges=[TokenRange(0, 8, 50), TokenRange(4, 12, 60)]), ValueError),
    (dict(ranges=[TokenRange(0, None, 50), TokenRange(4, 12, 60)]), ValueError),
    (dict(ranges=[(0, 8, 50)]), TypeError), (dict(ranges="abc"), TypeError),
    (dict(ranges=5), TypeError),
    (dict(ranges=[TokenRange(8 * i, 8 * i + 8, 50) for i in range(MAX_RANGES + 1)]),
     ValueError),
])
def test_bad_retention_values(bad, error):
    with pytest.raises(error):
        Retention(**bad)


@pytest.mark.parametrize("bad, error", [
    (dict(start=-1, end=4, priority=1), ValueError),
    (dict(start=4, end=4, priority=1), ValueError),
    (dict(start=0, end=4, priority=200), ValueError),
    (dict(start=0.0, end=4, priority=1), TypeError),
    (dict(start=0, end="4", priority=1), TypeError),
    (dict(start=0, end=4, priority=1, duration=0.0), ValueError),
])
def test_bad_token_ranges(bad, error):
    with pytest.raises(error):
        TokenRange(**bad)


def _table(num_pages=16, page_size=4, **kwargs):
    alloc = PageAllocator(num_pages)
    return alloc, PageTable(alloc, page_size, 8, 8, enable_prefix_cache=True, **kwargs)


def _prompt(seq_table, tokens, **kwargs):
    """Add a sequence for ``tokens``, append the uncached rest, return its seq id."""
    s = seq_table.add_sequence(tokens, **kwargs)
    done = seq_table.num_tokens(s)
    seq_table.append([s], [len(tokens) - done], token_ids=np.asarray(tokens[done:]))
    return s


@pytest.mark.parametrize("bad, error", [
    (101, ValueError), (-5, ValueError), (2.0, TypeError), ("x", TypeError), (True, TypeError),
    ([1], TypeError),
])
def test_add_sequence_rejects_bad_retention_and_changes_nothing(bad, error):
    alloc, table = _table()
    s = _prompt(table, list(range(9)), retention=80)
    table.remove(s)
    before = (table.num_seqs, alloc.num_free, alloc.priorities.copy(), table.prefix_stats)
    with pytest.raises(error):
        table.add_sequence(list(range(9)), retention=bad)
    assert (table.num_seqs, alloc.num_free) == before[:2]
    assert np.array_equal(alloc.priorities, before[2]) and table.prefix_stats == before[3]
    table.check_invariants()


# -- the prefix cache: who is evicted first ------------------------------------------------

def test_a_system_prompt_outlives_one_off_documents():
    _alloc, table = _table(num_pages=12)
    system = list(range(1000, 1008))
    s = _prompt(table, [*system, 1], retention=Retention(ranges=[TokenRange(0, 8, 90)]))
    table.remove(s)
    # A flood of one-off prompts at the default priority: each one evicts the oldest
    # one-off, never the system prompt.
    for k in range(10):
        s = _prompt(table, [k * 100 + t for t in range(9)])
        table.remove(s)
        table.check_invariants()
    assert table.match_prefix([*system, 1]) == 8
    assert table.prefix_stats["evictions_by_priority"].keys() == {DEFAULT_PRIORITY}


def test_lru_within_a_priority_and_lowest_priority_first():
    _alloc, table = _table(num_pages=6)
    a = _prompt(table, list(range(5)), retention=50)       # pages: 1 cached
    b = _prompt(table, list(range(10, 15)), retention=20)
    c = _prompt(table, list(range(20, 25)), retention=50)
    for s in (a, b, c):
        table.remove(s)
    # 6 pages: 3 cached + 3 clean. Asking for 4 evicts one: b (priority 20), although a
    # was freed first.
    s = table.add_sequence()
    table.append([s], [16])
    assert table.match_prefix(list(range(10, 15))) == 0
    assert table.match_prefix(list(range(5))) == 4 and table.match_prefix(list(range(20, 25))) == 4
    table.append([s], [4])   # one more: a, the least recently freed at 50
    assert table.match_prefix(list(range(5))) == 0 and table.match_prefix(list(range(20, 25))) == 4
    assert table.prefix_stats["evictions_by_priority"] == {20: 1, 50: 1}
    table.check_invariants()


def test_ranges_give_blocks_their_own_priority():
    alloc, table = _table()
    s = _prompt(table, list(range(17)), retention=Retention(
        priority=10, ranges=[TokenRange(0, 4, 90), TokenRange(6, 7, 60)]))
    row = table.block_table[s]
    # block 0 in the 90 range; block 1 partly at 60, partly at 10: 60; blocks 2, 3: 10.
    assert alloc.priorities[row[:4]].tolist() == [90, 60, 10, 10]
    table.check_invariants()


def test_a_hit_raises_and_never_lowers_retention():
    alloc, table = _table()
    tokens = list(range(9))
    s = _prompt(table, tokens, retention=40)
    row = table.block_table[s, :2].copy()
    t = table.add_sequence(tokens, retention=70)
    assert alloc.priorities[row].tolist() == [70, 70]
    u = table.add_sequence(tokens, retention=5)
    assert alloc.priorities[row].tolist() == [70, 70]
    for x in (s, t, u):
        table.remove(x)
    assert alloc.priorities[row].tolist() == [70, 70]
    table.check_invariants()


def test_a_fork_inherits_retention():
    alloc, table = _table()
    s = table.add_sequence([1, 2], retention=77)
    table.append([s], [2], token_ids=np.array([1, 2]))
    child = table.fork(s)
    table.append([child], [2], token_ids=np.array([3, 4]))
    assert alloc.priorities[table.block_table[child, 0]] == 77
    table.check_invariants()


def test_a_timed_priority_expires_in_the_cache():
    _alloc, table = _table(num_pages=4)
    a = _prompt(table, list(range(5)), retention=Retention(90, duration=0.02))
    b = _prompt(table, list(range(10, 15)), retention=60)
    table.remove(a)
    table.remove(b)
    time.sleep(0.05)
    s = table.add_sequence()
    table.append([s], [12])   # 2 clean + 1 eviction: a's 90 has dropped to 35
    assert table.match_prefix(list(range(5))) == 0
    assert table.match_prefix(list(range(10, 15))) == 4
    table.check_invariants()


def test_offload_keeps_retention_on_the_host():
    alloc = PageAllocator(4)
    host = PageAllocator(4)
    table = PageTable(alloc, 4, 8, 8, enable_prefix_cache=True, host_allocator=host)
    a = _prompt(table, list(range(5)), retention=90)
    b = _prompt(table, list(range(10, 15)), retention=15)
    table.remove(a)
    table.remove(b)
    s = table.add_sequence()
    table.append([s], [16])    # evicts both cached pages: they move to the host
    _device, hostp = table.take_writebacks()
    assert sorted(host.priorities[hostp].tolist()) == [15, 90]
    table.check_invariants()


# -- leaf-first eviction -------------------------------------------------------------------

def test_a_freed_chain_is_evicted_from_its_leaf():
    _alloc, table = _table(num_pages=8)
    a = _prompt(table, list(range(13)))          # 3 cached pages chained
    table.remove(a)                              # freed leaf first: the leaf goes first
    b = table.add_sequence()
    table.append([b], [4 * 6])                   # 5 clean + 1 eviction
    assert table.match_prefix(list(range(13))) == 8
    table.check_invariants()


def test_evicting_a_page_takes_its_descendants_with_it():
    alloc, table = _table(num_pages=8)
    # The root at priority 10, its descendants at 50: the root is evicted first.
    a = _prompt(table, list(range(13)), retention=Retention(50, ranges=[TokenRange(0, 4, 10)]))
    table.remove(a)
    b = table.add_sequence()
    table.append([b], [4 * 6])                   # 5 clean + 1 eviction: the chain's root
    # The two descendants left with it (no lookup could reach them), and became clean.
    assert table.prefix_stats["num_cached_pages"] == 0
    assert table.prefix_stats["evictions"] == 3
    assert alloc.evictions_by_priority == {10: 1}
    assert alloc.num_free == 2 and alloc.num_evictable == 0
    table.check_invariants()


def test_a_chain_whose_twin_parent_left_stops_registering():
    """Sequence y continues the chain from x's equal page; x's page is evicted while y
    runs: y's later pages are not indexed (they could never be found)."""
    alloc, table = _table(num_pages=8)
    x = _prompt(table, [*list(range(4)), 99])     # x registers page P for tokens 0..3
    y = table.add_sequence()                      # y computes the same block itself
    table.append([y], [4], token_ids=np.arange(4))
    table.remove(x)
    filler = table.add_sequence()
    assert alloc.num_free == 7 and alloc.num_evictable == 1
    table.append([filler], [4 * 6])               # the 6 clean pages
    table.append([filler], [4])                   # now evicts P (x's page)
    assert table.match_prefix([*list(range(4)), 99]) == 0
    table.truncate([filler], [0])                 # room for y's next page
    table.append([y], [4], token_ids=np.arange(4, 8))
    assert table.prefix_stats["num_cached_pages"] == 0
    table.check_invariants()


def test_check_invariants_catches_an_unreachable_entry():
    from kvcore._core import _break_tree_py
    _alloc, table = _table()
    s = _prompt(table, list(range(9)))
    table.check_invariants()
    _break_tree_py(table, table.block_table[s, 1])
    with pytest.raises(KVCoreError, match="reach"):
        table.check_invariants()


def test_random_workload_with_priorities_keeps_every_invariant():
    """Shared prefixes, random priorities and ranges, a small pool and a host tier:
    evictions, offloads, host hits and cascades all happen; every invariant (the tree's
    reachability included) holds after every step."""
    rng = np.random.default_rng(15)
    alloc = PageAllocator(40)
    host = PageAllocator(16)
    table = PageTable(alloc, 4, 16, 16, enable_prefix_cache=True, host_allocator=host)
    tier = HostTier(table)
    prefixes = [rng.integers(0, 50, size=int(rng.integers(4, 20))).tolist() for _ in range(6)]
    live = []
    for _ in range(400):
        op = rng.random()
        if op < 0.45 and table.num_seqs < 12:
            tokens = prefixes[int(rng.integers(len(prefixes)))] + rng.integers(
                0, 50, size=int(rng.integers(1, 12))).tolist()
            ranges = ([TokenRange(0, int(rng.integers(1, 16)), int(rng.integers(0, 101)))]
                      if rng.random() < 0.5 else [])
            if alloc.num_free < -(-len(tokens) // 4) + 2:
                continue
            s = table.add_sequence(tokens, retention=Retention(int(rng.integers(0, 101)),
                                                               ranges=ranges))
            if table.seq_state(s) == "swapping_in":    # a host-tier hit: its load "arrives"
                tier.finish([s], True)
            done = table.num_tokens(s)
            table.append([s], [len(tokens) - done], token_ids=np.asarray(tokens[done:]))
            live.append(s)
        elif op < 0.75 and live:
            s = live[int(rng.integers(len(live)))]
            if alloc.num_free > 1 and table.num_tokens(s) < 60:
                table.append([s], [1], token_ids=rng.integers(0, 50, size=1))
        elif live:
            table.remove(live.pop(int(rng.integers(len(live)))))
        _, host_pages = table.take_writebacks()
        if len(host_pages):
            tier.finish_writebacks(np.unique(host_pages), True)
        table.check_invariants()
    stats = table.prefix_stats
    assert stats["evictions"] > 0 and stats["offloaded"] > 0 and stats["loaded"] > 0


# -- review findings -------------------------------------------------------------------

class _Sneaky(Retention):
    def __post_init__(self):   # skips validation
        pass


@pytest.mark.parametrize("make", [
    lambda: _Sneaky(priority=200),
    lambda: _Sneaky(priority=-1),
    lambda: _Sneaky(ranges=tuple(TokenRange(8 * i, 8 * i + 8, 50) for i in range(64))),
    lambda: _set(Retention(), "priority", 101),
    lambda: _set(Retention(), "duration", -3.0),
    lambda: _set(Retention(), "ranges", (TokenRange(0, 4, 1), TokenRange(2, 9, 2))),
    lambda: _set(Retention(ranges=[TokenRange(0, 4, 1)]), "ranges", ("x",)),
])
def test_a_retention_that_skipped_validation_is_refused_and_changes_nothing(make):
    alloc, table = _table()
    s = _prompt(table, list(range(9)), retention=80)
    table.remove(s)
    before = (table.num_seqs, alloc.num_free, alloc.priorities.copy())
    with pytest.raises((ValueError, TypeError)):
        table.add_sequence(list(range(9)), retention=make())
    assert (table.num_seqs, alloc.num_free) == before[:2]
    assert np.array_equal(alloc.priorities, before[2])
    table.check_invariants()


def _set(obj, name, value):
    object.__setattr__(obj, name, value)
    return obj


def test_values_are_checked_alike():
    with pytest.raises(TypeError):
        Retention(priority=True)
    with pytest.raises(TypeError):
        TokenRange(True, 5, 50)
    with pytest.raises(TypeError):
        TokenRange(0, 5, np.True_)
    assert Retention(duration=np.int64(5)).duration == 5.0
    assert Retention(duration=np.float32(0.5)).duration == 0.5
    assert Retention(priority=np.int32(7)).priority == 7
    huge = Retention(ranges=[TokenRange(0, 2**70, 50)])   # past any sequence: to the end
    alloc, table = _table()
    s = _prompt(table, list(range(9)), retention=huge)
    assert alloc.priorities[table.block_table[s, :2]].tolist() == [50, 50]


def test_a_hit_raises_the_companion_pages_too():
    from kvcore import LayerGroup
    alloc = PageAllocator(40)
    table = PageTable(alloc, 4, 8, 16, enable_prefix_cache=True,
                      groups=[LayerGroup([0]), LayerGroup([1], window=64)])
    tokens = list(range(13))
    s = _prompt(table, tokens, retention=5)
    companions = table.group_block_table(1)[s, :3].copy()
    assert alloc.priorities[companions].tolist() == [5, 5, 5]
    t = table.add_sequence(tokens, retention=90)
    assert table.num_tokens(t) == 12
    assert alloc.priorities[table.block_table[t, :3]].tolist() == [90, 90, 90]
    assert alloc.priorities[companions].tolist() == [90, 90, 90]
    table.check_invariants()


def test_a_timed_priority_over_a_permanent_one_drops_back_to_it():
    alloc, table = _table(num_pages=4)
    a = _prompt(table, list(range(5)), retention=50)                    # 50 for good
    hit = table.add_sequence(list(range(5)), retention=Retention(80, duration=0.02))
    page = table.block_table[a, 0]
    assert alloc.priorities[page] == 80
    b = _prompt(table, list(range(10, 15)), retention=40)
    for s in (a, hit, b):
        table.remove(s)
    time.sleep(0.05)
    s = table.add_sequence()
    table.append([s], [12])    # 2 clean + 1 eviction: 80 expired to 50, above b's 40
    assert alloc.priorities[page] == 50
    assert table.match_prefix(list(range(5))) == 4
    assert table.match_prefix(list(range(10, 15))) == 0
    table.check_invariants()


def test_truncating_into_a_cached_page_unindexes_it_and_its_descendants():
    """A rollback into a cached page (shared or not) takes it and what chains from it out
    of the index: the page may be written in place later (once its other holders let
    go), and nothing could reach its descendants."""
    _, table = _table(num_pages=16)
    tokens = list(range(13))
    a = _prompt(table, tokens)
    b = table.add_sequence(tokens)           # hits 3 pages
    table.append([b], [1], token_ids=[13])
    table.truncate([b], [6])                 # inside the second shared page
    assert table.match_prefix([*tokens, 99]) == 4     # the first page only
    assert table.prefix_stats["removed_with_ancestor"] == 1
    table.remove(a)
    table.append([b], [1], token_ids=[77])
    table.check_invariants()


def test_cascade_removals_are_counted():
    _alloc, table = _table(num_pages=8)
    a = _prompt(table, list(range(13)), retention=Retention(50, ranges=[TokenRange(0, 4, 10)]))
    table.remove(a)
    b = table.add_sequence()
    table.append([b], [4 * 6])
    stats = table.prefix_stats
    assert stats["evictions"] == 3 and stats["removed_with_ancestor"] == 2
    assert stats["evictions_by_priority"] == {10: 1}
