"""Layer groups, sliding windows and truncate (docs/groups.md) against a plain model.

The state machines drive a grouped PageTable through every call and compare it after
each step with ``tests/_groups_model.py``: lengths, each group's rows (``-1`` before a
window group's first live column), refcounts, free pages, window sizes, metadata,
``pages_needed``, copy-on-write, and what every sequence reads back. The hand-written
tests pin the spec's exact rules: the release boundary, speculative decoding, what
truncate does to the prefix index, forks, copy-on-write, state groups and companions.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvcore import (
    KVCache,
    KVCacheConfig,
    KVCoreError,
    LayerGroup,
    PageAllocator,
    PageTable,
    RollbackError,
)

from ._groups_model import (
    Driver,
    assert_unchanged,
    cdiv,
    group_state,
    window_bound,
    window_start,
)

NUM_PAGES, MAX_SEQS, MAX_PAGES = 40, 5, 8
TOKENS = st.integers(0, 2)

#: Group layouts the machines draw from: kinds, with windows and state sizes drawn later.
LAYOUTS = [
    ("full",),
    ("window",),
    ("full", "window"),
    ("full", "window", "window"),
    ("window", "full"),
    ("full", "full"),
    ("full", "state"),
    ("state", "window"),
]


def full():
    return LayerGroup()


def window(w):
    return LayerGroup(window=w)


def state(n):
    return LayerGroup(state_pages=n)


def make(groups, num_pages=32, page_size=4, max_seqs=6, max_pages=10, prefix=True, **kw):
    prefix = prefix and not any(g.kind == "state" for g in groups)
    return PageTable(PageAllocator(num_pages), page_size, max_seqs, max_pages,
                     groups=groups, enable_prefix_cache=prefix, **kw)


# -- the state machines -----------------------------------------------------------------------

class GroupsMachine(RuleBasedStateMachine):
    """Every call on a grouped table, with prefix caching on unless a state group forbids it."""

    layouts = LAYOUTS
    hash_bits = 64
    num_pages = NUM_PAGES

    def __init__(self):
        super().__init__()
        self.drv = None
        self.histories = []   # token lists seen (including rolled-back drafts): prompt material

    @property
    def model(self):
        return self.drv.model

    @initialize(data=st.data())
    def start(self, data):
        layout = data.draw(st.sampled_from(self.layouts))
        ps = data.draw(st.sampled_from([1, 2, 3, 4]))
        groups = []
        for kind in layout:
            if kind == "full":
                groups.append(full())
            elif kind == "window":
                groups.append(window(data.draw(st.integers(1, 3 * ps + 1))))
            else:
                groups.append(state(data.draw(st.integers(1, 2))))
        prefix = not any(g.kind == "state" for g in groups)
        table = PageTable(PageAllocator(self.num_pages), ps, MAX_SEQS, MAX_PAGES, groups=groups,
                          enable_prefix_cache=prefix, prefix_hash_bits=self.hash_bits)
        assert table.num_groups == len(groups)
        assert [g.kind for g in table.groups] == list(layout)
        self.drv = Driver(table)
        self.prefix = prefix
        # start from a few prefilled sequences, so that short examples do something too
        for _ in range(data.draw(st.integers(0, 3))):
            prompt = data.draw(st.lists(TOKENS, min_size=1, max_size=3 * ps))
            s = self.drv.add(prompt)
            rest = prompt[table.num_tokens(s):]
            if self.drv.append([s], [len(rest)], rest) is not None:
                self._remember([s])

    def live(self):
        return sorted(self.model.seqs)

    def _prompt(self, data):
        known = [h for h in self.histories if h]
        if known and data.draw(st.integers(0, 3)):
            base = data.draw(st.sampled_from(known))
            cut = data.draw(st.integers(0, len(base)))
            extra = data.draw(st.lists(TOKENS, min_size=1, max_size=4))
            return base[:cut] + extra
        return data.draw(st.lists(TOKENS, min_size=1, max_size=3 * self.drv.table.page_size))

    def _remember(self, seqs):
        for s in seqs:
            toks = [t for t in self.model.seqs[s].tokens if t >= 0]
            if len(toks) == self.model.seqs[s].length:
                self.histories.append(toks)
        del self.histories[:-30]

    # -- rules -----------------------------------------------------------------------------

    @rule(data=st.data())
    def add(self, data):
        if self.prefix and data.draw(st.integers(0, 3)):
            prompt = self._prompt(data)
            ns = data.draw(st.integers(0, 3)) // 3
        else:
            prompt, ns = None, 0
        s = self.drv.add(prompt, namespace=ns)
        if s is None or prompt is None:
            return
        event(f"add: hit {min(self.drv.table.num_tokens(s) // self.drv.table.page_size, 2)}")
        rest = prompt[self.drv.table.num_tokens(s):]
        if data.draw(st.integers(0, 3)) and self.drv.append([s], [len(rest)], rest) is not None:
            self._remember([s])

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def append(self, data):
        live = self.live()
        ps = self.drv.table.page_size
        seqs = data.draw(st.lists(st.sampled_from(live), unique=True, max_size=len(live)))
        counts = data.draw(st.lists(st.integers(0, 2 * ps + 1), min_size=len(seqs),
                                    max_size=len(seqs)))
        ids = None
        if data.draw(st.integers(0, 3)):
            ids = data.draw(st.lists(TOKENS, min_size=sum(counts), max_size=sum(counts)))
        result = self.drv.append(seqs, counts, ids)
        event(f"append: {'refused' if result is None else 'ran'}")
        if result is not None:
            event(f"append: copies {min(result.copy_src.size, 2)}")
            self._remember(seqs)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def decode(self, data):
        """Every sequence one token, with its id (the common step)."""
        live = self.live()
        ids = data.draw(st.lists(TOKENS, min_size=len(live), max_size=len(live)))
        if self.drv.append(live, [1] * len(live), ids) is not None:
            self._remember(live)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def speculate(self, data):
        """One speculative step: the verified token plus k drafts, then keep the accepted."""
        live = self.live()
        seqs = data.draw(st.lists(st.sampled_from(live), unique=True, min_size=1,
                                  max_size=len(live)))
        k = data.draw(st.integers(0, 3))
        ids = data.draw(st.lists(TOKENS, min_size=(1 + k) * len(seqs),
                                 max_size=(1 + k) * len(seqs)))
        before = [self.model.seqs[s].length for s in seqs]
        if self.drv.append(seqs, [1 + k] * len(seqs), ids) is None:
            return
        self._remember(seqs)
        accepted = data.draw(st.lists(st.integers(1, 1 + k), min_size=len(seqs),
                                      max_size=len(seqs)))
        lens = [b + a for b, a in zip(before, accepted, strict=True)]
        ran = self.drv.truncate(seqs, lens)
        assert ran or self.model.has_state, "truncating to at least the old length must work"

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def truncate(self, data):
        live = self.live()
        seqs = data.draw(st.lists(st.sampled_from(live), unique=True, min_size=1,
                                  max_size=len(live)))
        lens = []
        for s in seqs:
            n = self.model.seqs[s].length
            near = st.integers(max(0, n - 2 * self.drv.table.page_size - 2), n)
            lens.append(data.draw(st.one_of(near, st.integers(0, n + 1))))
        self._remember(seqs)
        event(f"truncate: {'ran' if self.drv.truncate(seqs, lens) else 'refused'}")

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def fork(self, data):
        self.drv.fork(data.draw(st.sampled_from(self.live())))

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def remove(self, data):
        self.drv.remove(data.draw(st.sampled_from(self.live())))

    @precondition(lambda self: self.prefix)
    @rule()
    def clear(self):
        table = self.drv.table
        table.clear_prefix_cache()
        assert table.num_cached_pages == 0
        for h in self.histories[-3:]:
            assert table.match_prefix([*h, 0]) == 0

    @precondition(lambda self: self.prefix)
    @rule(data=st.data())
    def probe(self, data):
        """match_prefix changes nothing and agrees with add_sequence (checked in add)."""
        prompt = self._prompt(data)
        before = group_state(self.drv.table)
        got = self.drv.table.match_prefix(prompt)
        assert got % self.drv.table.page_size == 0 and 0 <= got < len(prompt)
        assert_unchanged(before, group_state(self.drv.table))

    @invariant()
    def agrees_with_model(self):
        if self.drv is not None:
            self.drv.check()


class PrefixGroupsMachine(GroupsMachine):
    """Prefix caching with K/V groups only, a 2-bit hash (collisions everywhere): no hit
    may serve a token that was rolled back, overwritten, or never computed."""

    layouts = tuple(lay for lay in LAYOUTS if "state" not in lay)
    hash_bits = 2
    num_pages = 24   # evictions are common: reused pages must never be served


_fast = settings(max_examples=settings.default.max_examples,
                 stateful_step_count=settings.default.stateful_step_count)
TestGroupsMachine = GroupsMachine.TestCase
TestGroupsMachine.settings = _fast
TestPrefixGroupsMachine = PrefixGroupsMachine.TestCase
TestPrefixGroupsMachine.settings = _fast


# -- the basics -------------------------------------------------------------------------------

def test_layer_group_kinds_and_errors():
    assert LayerGroup((0, 1)).kind == "full"
    assert LayerGroup((0,), window=4).kind == "window"
    assert LayerGroup((0,), state_pages=2).kind == "state"
    group = LayerGroup((0, 1), window=4)
    assert group.window == 4 and group.state_pages == 0 and tuple(group.layers) == (0, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        group.window = 5
    assert issubclass(RollbackError, KVCoreError) and issubclass(RollbackError, ValueError)


def test_no_groups_is_one_full_group():
    table = PageTable(PageAllocator(16), 4, 4, 8)
    assert table.num_groups == 1 and table.groups[0].kind == "full"
    s = table.add_sequence()
    result = table.append([s], [6])
    assert result.slot_mapping.shape == (6,)
    assert table.first_page(s) == 0
    np.testing.assert_array_equal(table.group_block_table(0), table.block_table)
    np.testing.assert_array_equal(table.pages(s, group=0), table.pages(s))
    table.truncate([s], [2])
    assert table.num_tokens(s) == 2 and table.pages(s).size == 1
    assert table.allocator.num_free == 15
    table.check_invariants()


def test_one_full_group_behaves_exactly_as_no_groups():
    """groups=[LayerGroup()] and groups=None give the same results, call for call."""
    rng = np.random.default_rng(3)
    tables = [PageTable(PageAllocator(48), 3, 6, 12, enable_prefix_cache=True, groups=g)
              for g in (None, [LayerGroup()])]
    assert tables[0].groups == tables[1].groups == (LayerGroup(),)
    live = []
    for _ in range(600):
        op = rng.integers(0, 6)
        ids = rng.integers(0, 3, 40).tolist()
        if op == 0 and len(live) < 6:
            prompt = ids[:int(rng.integers(1, 12))]
            calls = [lambda t, prompt=prompt: t.add_sequence(prompt)] * 2
        elif op == 1 and live:
            seq = live[int(rng.integers(len(live)))]
            calls = [lambda t, seq=seq: t.fork(seq)] * 2
        elif op == 2 and live:
            seq = live.pop(int(rng.integers(len(live))))
            calls = [lambda t, seq=seq: t.remove(seq)] * 2
        elif op == 3 and live:
            seqs = live[:int(rng.integers(1, len(live) + 1))]
            lens = [int(rng.integers(0, tables[0].num_tokens(q) + 1)) for q in seqs]
            calls = [lambda t, seqs=seqs, lens=lens: t.truncate(seqs, lens)] * 2
        elif live:
            seqs = live[:int(rng.integers(1, len(live) + 1))]
            counts = rng.integers(0, 5, len(seqs)).tolist()
            tokens = ids[:sum(counts)]
            calls = [lambda t, seqs=seqs, counts=counts, tokens=tokens:
                     t.append(seqs, counts, token_ids=tokens)] * 2
        else:
            continue
        out = []
        for t, call in zip(tables, calls, strict=True):
            try:
                out.append(call(t))
            except KVCoreError as exc:
                out.append(type(exc))
        if op in (0, 1) and isinstance(out[0], int):
            live.append(out[0])
        if isinstance(out[0], tuple):
            for x, y in zip(*out, strict=True):
                np.testing.assert_array_equal(x, y)
        else:
            assert out[0] == out[1]
        assert_unchanged(group_state(tables[0]), group_state(tables[1]))
        if live:
            for x, y in zip(tables[0].flashinfer_metadata(live),
                            tables[1].flashinfer_metadata(live), strict=True):
                np.testing.assert_array_equal(x, y)
    for t in tables:
        t.check_invariants()


def test_one_group_slot_mapping_is_1d_and_several_are_2d():
    one = make([window(4)])
    s = one.add_sequence()
    assert one.append([s], [5]).slot_mapping.shape == (5,)
    three = make([full(), window(4), state(1)], prefix=False)
    a, b = three.add_sequence(), three.add_sequence()
    result = three.append([a, b], [3, 2])
    assert result.slot_mapping.shape == (3, 5) and result.slot_mapping.dtype == np.int64
    assert (result.slot_mapping[2] == -1).all()
    for g in (0, 1):
        want = [three.slot(a, t, group=g) for t in range(3)] + \
            [three.slot(b, t, group=g) for t in range(2)]
        assert result.slot_mapping[g].tolist() == want
    # the groups never share a page
    assert not set(three.pages(a, group=0).tolist()) & set(three.pages(a, group=1).tolist())


# -- sliding windows ------------------------------------------------------------------------

@pytest.mark.parametrize("ps", [1, 2, 3, 4, 5])
def test_window_release_rule_at_every_boundary(ps):
    """Page j of a window group goes in the append after len_before exactly when
    (j + 1) * page_size <= len_before - W + 1; one token at a time and in chunks."""
    for w in range(1, 2 * ps + 3):
        for chunk in (1, 2, ps, ps + 1, w + 1):
            table = PageTable(PageAllocator(64), ps, 1, 64, groups=[full(), window(w)])
            s = table.add_sequence()
            length = 0
            while length + chunk <= 4 * ps + w + 2:
                table.append([s], [chunk])
                first = table.first_page(s, group=1)
                row = table.group_block_table(1)[s]
                for j in range(cdiv(length + chunk, ps)):
                    gone = (j + 1) * ps <= length - w + 1
                    assert (row[j] == -1) == gone, (ps, w, chunk, length, j)
                assert first == window_start(length, w, ps)
                # the first new token's window is still mapped
                for t in range(max(0, length - w + 1), length + chunk):
                    assert row[t // ps] >= 0
                live = table.pages(s, group=1)
                assert live.tolist() == row[first:cdiv(length + chunk, ps)].tolist()
                assert live.size <= window_bound(w, chunk, ps)
                length += chunk
                used = cdiv(length, ps) + live.size
                assert table.allocator.num_free == 64 - used
                table.check_invariants()


def test_window_metadata_covers_the_live_window():
    table = make([full(), window(6)], prefix=False)
    s = table.add_sequence()
    table.append([s], [10])
    table.append([s], [3])          # len_before 10: pages with (j + 1) * 4 <= 5 go: page 0
    assert table.first_page(s, group=1) == 1
    full_pages, win_pages = table.pages(s, group=0), table.pages(s, group=1)
    assert full_pages.size == 4 and win_pages.size == 3
    indptr, indices, last = table.flashinfer_metadata([s], group=1)
    assert indptr.tolist() == [0, 3] and indices.tolist() == win_pages.tolist()
    assert last.tolist() == [1]      # 13 tokens: the last page holds 1
    assert table.block_tables([s], group=1).tolist() == [[-1, *win_pages.tolist()]]
    assert table.block_tables([s], group=0).tolist() == [full_pages.tolist()]
    assert table.slot(s, 12, group=1) == win_pages[-1] * 4
    assert table.group_block_table(1)[s, :5].tolist() == [-1, *win_pages.tolist(), -1]


def test_pages_needed_counts_only_allocations_and_releases_make_room():
    table = PageTable(PageAllocator(6), 4, 2, 8, groups=[window(4)])
    s = table.add_sequence()
    table.append([s], [16])          # 4 pages, nothing released yet
    hog = table.add_sequence()
    table.append([hog], [8])         # the last 2 pages
    assert table.allocator.num_free == 0
    # len_before 16: pages with (j + 1) * 4 <= 13 go (0, 1, 2); one new page is needed
    assert table.pages_needed([s], [1]) == 1
    result = table.append([s], [1])
    assert table.first_page(s) == 3 and table.pages(s).size == 2
    assert table.allocator.num_free == 2
    assert result.slot_mapping.tolist() == [table.pages(s)[-1] * 4]
    table.check_invariants()


@pytest.mark.parametrize("order", ["truncated first", "releaser first"])
def test_a_release_in_the_same_append_unshares_a_page(order):
    """b's window releases the page a shares with it (a truncated into it) in the very
    append where a writes into it: pages_needed, the allocations and the reported copies
    must agree, and every reported copy must be a real one into a fresh page."""
    table = PageTable(PageAllocator(8), 4, 4, 4, groups=[window(2)])
    a = table.add_sequence()
    table.append([a], [6])
    b = table.fork(a)
    table.truncate([a], [1])                 # a's page 0 is partial for a, shared with b
    shared = int(table.pages(a)[0])
    seqs = [a, b] if order == "truncated first" else [b, a]
    needed = table.pages_needed(seqs, [1, 1])
    free_pages = {p for p in range(8) if table.allocator.refcount(p) == 0}
    result = table.append(seqs, [1, 1])      # b: len_before 6, window 2: page 0 goes
    table.check_invariants()
    src, dst = result.copy_src.tolist(), result.copy_dst.tolist()
    assert len(src) == len(dst) == needed
    assert set(dst) <= free_pages and not set(src) & set(dst)
    assert src == ([shared] if needed else [])
    assert table.pages(a).tolist() == (dst if needed else [shared])
    assert table.first_page(b) == 1


def test_cache_append_with_a_release_that_unshares_a_page():
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, page_size=4, num_pages=8,
                        dtype="float32", max_seqs=4, layer_groups=[LayerGroup((0,), window=2)])
    cache = KVCache(cfg, device="cpu")
    a = cache.add_sequence()
    cache.append([a], [6])
    b = cache.fork(a)
    cache.truncate([a], [1])
    cache.append([a, b], [1, 1])
    assert cache.num_tokens(a) == 2 and cache.num_tokens(b) == 7
    cache.check_invariants()


# -- truncate ----------------------------------------------------------------------------------

def test_truncate_window_limit():
    table = make([full(), window(5)], prefix=False)
    s = table.add_sequence()
    table.append([s], [8])
    table.append([s], [4])           # len_before 8: page 0 goes (4 <= 4)
    assert table.first_page(s, group=1) == 1
    before = group_state(table)
    with pytest.raises(RollbackError):
        table.truncate([s], [7])     # 7 - 5 + 1 = 3 falls before column 1 (token 4)
    assert_unchanged(before, group_state(table))
    table.truncate([s], [8])         # the length before the last append: always allowed
    assert table.num_tokens(s) == 8 and table.first_page(s, group=1) == 1
    assert table.pages(s, group=0).size == 2 and table.pages(s, group=1).size == 1
    table.append([s], [1])           # len_before 8 again: nothing more to release
    assert table.first_page(s, group=1) == 1
    table.check_invariants()
    # a table of full groups truncates to anything
    plain = make([full(), full()], prefix=False)
    a = plain.add_sequence()
    plain.append([a], [30])
    plain.truncate([a], [0])
    assert plain.allocator.num_free == 32 and plain.pages(a, group=1).size == 0


@pytest.mark.parametrize("groups", [[full()], [full(), window(5)], [window(3)],
                                    [full(), window(2), window(9)]],
                         ids=["full", "full+w5", "w3", "full+w2+w9"])
def test_speculative_decoding_equals_appending_only_accepted(groups):
    """append(1 + k drafts) then truncate(accepted) leaves the table, allocator and prefix
    cache as appending only the accepted tokens would (page ids aside)."""
    rng = np.random.default_rng(7)
    spec = make(groups, num_pages=256, max_pages=64)
    plain = make(groups, num_pages=256, max_pages=64)
    prompt = rng.integers(0, 50, 9).tolist()
    sa = spec.add_sequence(prompt)
    spec.append([sa], [9], token_ids=prompt)
    sb = plain.add_sequence(prompt)
    plain.append([sb], [9], token_ids=prompt)
    tokens = list(prompt)
    for _ in range(25):
        k = int(rng.integers(0, 5))
        drafts = rng.integers(0, 50, 1 + k).tolist()
        accepted = int(rng.integers(1, 2 + k))
        n = len(tokens)
        spec.append([sa], [1 + k], token_ids=drafts)
        spec.truncate([sa], [n + accepted])
        plain.append([sb], [accepted], token_ids=drafts[:accepted])
        tokens += drafts[:accepted]
        for t in (spec, plain):
            t.check_invariants()
        assert spec.num_tokens(sa) == plain.num_tokens(sb) == len(tokens)
        for g in range(len(groups)):
            assert spec.first_page(sa, group=g) == plain.first_page(sb, group=g)
            assert spec.pages(sa, group=g).size == plain.pages(sb, group=g).size
        assert sorted(spec.allocator.refcounts) == sorted(plain.allocator.refcounts)
        assert spec.allocator.num_free == plain.allocator.num_free
        assert spec.allocator.num_evictable == plain.allocator.num_evictable
        assert spec.num_cached_pages == plain.num_cached_pages
        for cut in range(1, len(tokens) + 1, 3):
            probe = [*tokens[:cut], 99]
            assert spec.match_prefix(probe) == plain.match_prefix(probe)


@pytest.mark.parametrize("groups", [[full()], [full(), window(6)], [window(7)]],
                         ids=["full", "full+w6", "w7"])
def test_truncate_unregisters_pages_of_dropped_tokens(groups):
    table = make(groups)
    prompt = list(range(1, 11))
    s = table.add_sequence(prompt)
    table.append([s], [10], token_ids=prompt)
    table.append([s], [5], token_ids=[11, 12, 13, 14, 15])   # drafts: 11 kept, 12.. rejected
    draft = list(range(1, 16))
    assert table.match_prefix([*draft[:12], 99]) == 12
    table.truncate([s], [11])
    before = group_state(table)
    assert table.match_prefix([*draft[:12], 99]) == 8       # page [9, 10, 11, 12] is gone
    assert table.match_prefix(draft) == 8
    assert table.match_prefix([*draft[:8], 9]) == 8          # the kept prefix still hits
    assert_unchanged(before, group_state(table))
    other = table.add_sequence([*draft[:12], 99])
    assert table.num_tokens(other) == 8
    table.remove(other)
    # the chain continues from the last whole kept page
    table.append([s], [1], token_ids=[20])
    assert table.match_prefix([*range(1, 12), 20, 99]) == 12
    assert table.match_prefix([*draft[:12], 99]) == 8
    table.check_invariants()


@pytest.mark.parametrize("groups", [[full()], [full(), window(6)], [full(), window(3)]],
                         ids=["full", "full+w6", "full+w3"])
def test_truncate_of_a_fork_leaves_the_sibling_intact(groups):
    drv = Driver(make(groups))
    a = drv.add()
    drv.append([a], [4], list(range(4)))
    drv.append([a], [6], list(range(4, 10)))
    b = drv.fork(a)
    sibling = [drv.table.pages(b, group=g).tolist() for g in range(len(groups))]
    sibling_first = [drv.table.first_page(b, group=g) for g in range(len(groups))]
    assert drv.truncate([a], [7])
    drv.check()
    assert [drv.table.pages(b, group=g).tolist() for g in range(len(groups))] == sibling
    assert [drv.table.first_page(b, group=g) for g in range(len(groups))] == sibling_first
    assert drv.table.num_tokens(b) == 10
    # a writes into the page it still shares with b: copy-on-write, b keeps its tokens
    result = drv.append([a], [3], [50, 51, 52])
    assert result.copy_src.size == len(groups)   # column 1 of every group
    drv.append([b], [2], [60, 61])
    drv.check()
    assert drv.model.seqs[b].tokens == [*range(10), 60, 61]
    assert drv.model.seqs[a].tokens == [*range(7), 50, 51, 52]


def test_copy_on_write_after_truncate_into_a_shared_page():
    table = make([full(), window(3)], prefix=False)
    a = table.add_sequence()
    table.append([a], [8])
    b = table.fork(a)
    shared = [table.pages(a, group=g).tolist() for g in (0, 1)]
    table.truncate([a], [6])         # a's page 1 is now partial, and shared with b
    assert [table.pages(a, group=g).tolist() for g in (0, 1)] == shared
    assert table.pages_needed([a], [1]) == 2
    result = table.append([a], [1])
    assert sorted(result.copy_src.tolist()) == sorted([shared[0][1], shared[1][1]])
    assert table.pages(a, group=0).tolist()[1] not in shared[0]
    assert table.pages(b, group=0).tolist() == shared[0]
    assert table.pages(b, group=1).tolist() == shared[1]
    assert all(table.allocator.refcount(p) == 1 for p in (shared[0][1], shared[1][1]))
    assert table.slot(a, 6, group=0) == result.slot_mapping[0, 0]
    # b writes at 8: a new page, nothing copied
    assert table.append([b], [1]).copy_src.size == 0
    table.check_invariants()


def test_unshared_truncated_page_is_written_in_place():
    table = make([full(), window(4)])
    s = table.add_sequence(list(range(9)))
    table.append([s], [9], token_ids=list(range(9)))
    page = table.pages(s, group=0).tolist()[1]
    table.truncate([s], [6])
    result = table.append([s], [2], token_ids=[7, 7])
    assert result.copy_src.size == 0 and table.pages(s, group=0).tolist()[1] == page
    table.check_invariants()


# -- state groups ------------------------------------------------------------------------------

@pytest.mark.parametrize("first_writer", ["parent", "child"])
def test_state_group_pages_fork_and_copy(first_writer):
    table = make([full(), state(2)], prefix=False)
    alloc = table.allocator
    s = table.add_sequence()
    assert table.pages(s, group=1).size == 0
    assert table.pages_needed([s], [3]) == 1 + 2
    result = table.append([s], [3])
    assert result.slot_mapping.shape == (2, 3) and (result.slot_mapping[1] == -1).all()
    states = table.pages(s, group=1).tolist()
    assert len(states) == 2 and result.copy_src.size == 0
    assert table.pages_needed([s], [5]) == 1
    table.append([s], [5])
    assert table.pages(s, group=1).tolist() == states
    c = table.fork(s)
    assert table.pages(c, group=1).tolist() == states
    assert all(alloc.refcount(p) == 2 for p in states)
    writer, other = (s, c) if first_writer == "parent" else (c, s)
    assert table.pages_needed([writer], [1]) == 1 + 2
    free = alloc.num_free
    result = table.append([writer], [1])
    assert alloc.num_free == free - 3
    new_states = table.pages(writer, group=1).tolist()
    assert sorted(zip(result.copy_src.tolist(), result.copy_dst.tolist(), strict=True)) == \
        sorted(zip(states, new_states, strict=True))
    assert table.pages(other, group=1).tolist() == states
    assert all(alloc.refcount(p) == 1 for p in states + new_states)
    assert table.append([other], [1]).copy_src.size == 0
    assert table.pages(other, group=1).tolist() == states
    before = group_state(table)
    for lens in ([5], [8], [0]):
        with pytest.raises(RollbackError):
            table.truncate([s], lens)
        assert_unchanged(before, group_state(table))
    table.truncate([s], [9])         # to its own length: nothing to roll back
    assert_unchanged(before, group_state(table))
    table.remove(c)
    table.remove(s)
    assert alloc.num_free == alloc.num_pages
    table.check_invariants()


def test_state_group_in_a_batch_with_a_fork():
    drv = Driver(make([full(), state(3)], prefix=False))
    a = drv.add()
    drv.append([a], [2])
    b = drv.fork(a)
    result = drv.append([a, b], [1, 1])      # one of them copies, the other keeps
    assert result.copy_src.size == 3 + 1     # the states and the shared partial K/V page
    drv.check()


def test_prefix_caching_with_a_state_group_is_refused():
    alloc = PageAllocator(16)
    with pytest.raises(ValueError):
        PageTable(alloc, 4, 4, 4, groups=[full(), state(1)], enable_prefix_cache=True)
    # the failed constructor left the allocator free for another prefix-caching table
    PageTable(alloc, 4, 4, 4, enable_prefix_cache=True)
    with pytest.raises(ValueError):
        KVCache(KVCacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, page_size=4,
                              num_pages=8, enable_prefix_cache=True,
                              layer_groups=[LayerGroup((0,)), LayerGroup((1,), state_pages=1)]),
                device="cpu")


# -- prefix caching across groups --------------------------------------------------------------

def _decode_prompt(table, tokens, step=1):
    s = table.add_sequence(tokens)
    while table.num_tokens(s) < len(tokens):
        n = table.num_tokens(s)
        table.append([s], [min(step, len(tokens) - n)], token_ids=tokens[n:n + step])
    return s


def test_released_window_pages_stay_findable_until_reused():
    table = make([full(), window(4)], num_pages=32)
    tokens = list(range(100, 117))               # 17 tokens, decoded one at a time
    s = table.add_sequence(tokens)
    window_pages = {}
    while table.num_tokens(s) < len(tokens):
        n = table.num_tokens(s)
        table.append([s], [1], token_ids=tokens[n:n + 1])
        row = table.group_block_table(1)[s]
        window_pages.update({c: int(row[c]) for c in range(8) if row[c] >= 0})
    assert table.first_page(s, group=1) == 3      # len_before 16: (j + 1) * 4 <= 13
    released = [window_pages[c] for c in range(3)]
    assert all(table.allocator.refcount(p) == 0 for p in released)
    assert table.allocator.num_evictable >= 3
    # at 12 tokens the window needs tokens 9..11: block 2, released but cached
    assert table.match_prefix(tokens[:13]) == 12
    new = table.add_sequence(tokens[:13])
    assert table.num_tokens(new) == 12
    assert table.first_page(new, group=1) == window_start(12, 4, 4) == 2
    assert table.pages(new, group=1).tolist() == [released[2]]
    assert table.pages(new, group=0).tolist() == table.pages(s, group=0).tolist()[:3]
    assert table.allocator.refcount(released[2]) == 1
    table.remove(new)
    table.check_invariants()
    # reuse every free page (the released window pages among them): the anchor pages
    # are still held by s, but the window companions are gone, so no hit
    taken = table.allocator.allocate(table.allocator.num_free)
    assert table.match_prefix(tokens[:13]) == 0
    assert table.match_prefix(tokens[:9]) == 0
    # at 16 tokens the window needs block 3, which s still holds
    assert table.match_prefix([*tokens[:16], 5]) == 16
    table.allocator.decref(taken)
    table.check_invariants()


def test_hit_maps_only_the_window_a_window_group_needs():
    table = make([window(6), full()], num_pages=48)
    tokens = list(range(30, 47))
    s = _decode_prompt(table, tokens, step=17)   # one chunk: nothing released
    assert table.pages(s, group=0).size == 5
    for n in range(1, 18):
        got = table.match_prefix(tokens[:n])
        assert got == (n - 1) // 4 * 4
        new = table.add_sequence(tokens[:n])
        k = got // 4
        first = window_start(got, 6, 4)
        assert table.first_page(new, group=0) == first
        assert table.pages(new, group=0).tolist() == table.pages(s, group=0).tolist()[first:k]
        assert table.pages(new, group=1).tolist() == table.pages(s, group=1).tolist()[:k]
        assert table.block_tables([new], group=0).tolist() == \
            [[-1] * first + table.pages(s, group=0).tolist()[first:k]]
        table.remove(new)
    table.check_invariants()


def test_companions_of_another_namespace_or_tokens_never_hit():
    table = make([full(), window(5)])
    s = _decode_prompt(table, list(range(13)))
    assert table.match_prefix(list(range(13))) == 12
    assert table.match_prefix(list(range(13)), namespace=1) == 0
    assert table.match_prefix([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99, 12]) == 8
    table.remove(s)
    table.check_invariants()


def test_chain_continues_after_truncate_with_a_window_anchor():
    """With no full group the window group is the anchor; truncating back past a column it
    already released must not end the sequence's chain (docs/groups.md: the chain
    continues from the last whole kept page)."""
    for groups in ([full()], [window(3)], [window(3), full()], [full(), window(3)]):
        table = make(groups, num_pages=64)
        s = table.add_sequence()
        table.append([s], [14], token_ids=list(range(14)))
        table.append([s], [2], token_ids=[14, 15])   # window 3, len_before 14: columns 0..2 go
        table.truncate([s], [15])                     # block 2, the last kept, is released
        table.append([s], [1], token_ids=[15])        # block 3 is full again
        assert table.match_prefix([*range(16), 99]) == 16, [g.kind for g in groups]


def test_chain_continues_after_truncate_through_an_equal_page():
    """A sequence that computed the same blocks as another (its chain runs through the
    other's indexed pages) keeps registering after a truncate."""
    table = make([full()], num_pages=64)
    prompt = list(range(9))
    a = table.add_sequence()
    table.append([a], [9], token_ids=prompt)
    b = table.add_sequence()
    table.append([b], [9], token_ids=prompt)          # equal blocks: a's pages stay indexed
    table.append([b], [3], token_ids=[20, 21, 22])
    table.truncate([b], [11])
    table.append([b], [5], token_ids=[23, 24, 25, 26, 27])
    assert table.match_prefix([*prompt, 20, 21, 23, 24, 25, 26, 27, 99]) == 16


# -- KVCacheConfig -----------------------------------------------------------------------------

def test_config_layer_slots():
    groups = [LayerGroup((0, 2, 4)), LayerGroup((1, 3), window=8), LayerGroup((5,), window=4)]
    cfg = KVCacheConfig(num_layers=6, num_kv_heads=2, head_dim=4, page_size=4, num_pages=16,
                        max_seqs=4, layer_groups=groups)
    assert len(cfg.groups) == 3 and [g.kind for g in cfg.groups] == ["full", "window", "window"]
    assert cfg.num_slots == 3
    assert [cfg.layer_slot(layer) for layer in range(6)] == [0, 0, 1, 1, 2, 0]
    assert [cfg.layer_group(layer) for layer in range(6)] == [0, 1, 0, 1, 0, 2]
    assert cfg.pool_shape[0] == 3
    assert cfg.slot_waste > 0
    cache = KVCache(cfg, device="cpu")
    assert cache.kv.shape == cfg.pool_shape
    assert cache.table.num_groups == 3
    for layer in range(6):
        view = cache.k_cache(layer)
        assert np.shares_memory(view, cache.kv[cfg.layer_slot(layer), 0])
        assert view.shape == cache.kv[cfg.layer_slot(layer), 0].shape
        assert np.shares_memory(cache.v_cache(layer), cache.kv[cfg.layer_slot(layer), 1])


def test_config_without_groups_is_the_old_layout():
    cfg = KVCacheConfig(num_layers=3, num_kv_heads=2, head_dim=4, page_size=4, num_pages=16)
    assert len(cfg.groups) == 1 and cfg.groups[0].kind == "full"
    assert tuple(cfg.groups[0].layers) == (0, 1, 2)
    assert cfg.num_slots == 3
    assert [cfg.layer_slot(layer) for layer in range(3)] == [0, 1, 2]
    assert [cfg.layer_group(layer) for layer in range(3)] == [0, 0, 0]
    assert cfg.pool_shape[0] == 3 and cfg.slot_waste == 0
    equal = KVCacheConfig(num_layers=4, num_kv_heads=2, head_dim=4, page_size=4, num_pages=16,
                          layer_groups=[LayerGroup((0, 1)), LayerGroup((2, 3), window=4)])
    assert equal.num_slots == 2 and equal.slot_waste == 0


# -- the pool through KVCache ------------------------------------------------------------------

def test_cache_with_groups_reads_back_every_layer():
    """Writes through a [num_groups, T] slot mapping, fork, truncate, copy-on-write: each
    layer reads back its own values (a window layer: its live window)."""
    groups = [LayerGroup((0, 2)), LayerGroup((1, 3), window=5), LayerGroup((4,), state_pages=1)]
    cfg = KVCacheConfig(num_layers=5, num_kv_heads=2, head_dim=3, page_size=4, num_pages=32,
                        dtype="float32", max_seqs=4, layer_groups=groups)
    cache = KVCache(cfg, device="cpu")
    kv_layers = [0, 1, 2, 3]
    expect = {}   # (seq, layer) -> list of values, one per token

    def step(seq_ids, counts, tag):
        result = cache.append(seq_ids, counts)
        for layer in kv_layers:
            vals = []
            for s, n in zip(seq_ids, counts, strict=True):
                start = len(expect.setdefault((s, layer), []))
                new = [1000 * layer + 100 * tag + start + i for i in range(n)]
                expect[(s, layer)] += new
                vals += new
            k = np.repeat(np.array(vals, np.float32)[:, None, None], 2, 1).repeat(3, 2)
            cache.write(layer, k, -k, result)
        return result

    a = cache.add_sequence()
    step([a], [10], 1)
    b = cache.fork(a)
    for layer in kv_layers:
        expect[(b, layer)] = list(expect[(a, layer)])
    with pytest.raises(RollbackError):
        cache.truncate([a], [6])
    with pytest.raises(ValueError):     # a state layer holds no per-token K/V
        cache.write(4, np.zeros((1, 2, 3), np.float32), np.zeros((1, 2, 3), np.float32),
                    np.array([0]))
    step([b, a], [2, 3], 2)
    for layer in kv_layers:
        g = cfg.layer_group(layer)
        for s in (a, b):
            k, v, _ = cache.gather(layer, [s])
            first = cache.first_page(s, group=g) * 4
            want = expect[(s, layer)][first:]
            assert k[:, 0, 0].tolist() == want, (layer, s)
            assert v[:, 1, 2].tolist() == [-x for x in want]
    cache.check_invariants()


def test_cache_truncate_and_rewrite_keeps_the_fork():
    groups = [LayerGroup((0,)), LayerGroup((1,), window=6)]
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=1, head_dim=1, page_size=4, num_pages=32,
                        dtype="float32", max_seqs=4, layer_groups=groups)
    cache = KVCache(cfg, device="cpu")

    def write(result, values):
        arr = np.array(values, np.float32)[:, None, None]
        for layer in (0, 1):
            cache.write(layer, arr + 1000 * layer, arr, result)

    a = cache.add_sequence()
    write(cache.append([a], [10]), range(10))
    b = cache.fork(a)
    cache.truncate([a], [7])
    write(cache.append([a], [3]), [70, 80, 90])     # copy-on-write of the shared page
    for s, want in ((a, [*range(7), 70, 80, 90]), (b, list(range(10)))):
        for layer in (0, 1):
            k, _, _ = cache.gather(layer, [s])
            first = cache.first_page(s, group=layer) * 4
            assert k[:, 0, 0].tolist() == [x + 1000 * layer for x in want[first:]]
    cache.check_invariants()


def test_step_metadata_of_a_window_group_is_the_relative_view():
    groups = [LayerGroup((0,)), LayerGroup((1,), window=5)]
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=1, head_dim=1, page_size=4, num_pages=32,
                        dtype="float32", max_seqs=4, layer_groups=groups)
    cache = KVCache(cfg, device="cpu")
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append([a, b], [10, 3])
    cache.append([a], [3])                         # len_before 10: a's column 0 goes
    metas = [cache.step_metadata(8, max_batch=2, group=g) for g in (0, 1)]
    result = cache.append([a, b], [1, 2])          # a: len_before 13: column 1 goes too
    assert cache.first_page(a, group=1) == 2 and cache.first_page(b, group=1) == 0
    for g, md in enumerate(metas):
        md.update([a, b], result)
        for i, s in enumerate((a, b)):
            pages = cache.pages(s, group=g).tolist()
            first = cache.first_page(s, group=g)
            n = cache.num_tokens(s)
            assert int(md.seq_lens[i]) == n - first * 4
            assert md.block_tables[i, :len(pages)].tolist() == pages
            assert (md.block_tables[i, len(pages):] == -1).all()
            lo, hi = int(md.page_indptr[i]), int(md.page_indptr[i + 1])
            assert md.page_indices[lo:hi].tolist() == pages
            assert int(md.last_page_len[i]) == (n - 1) % 4 + 1
        assert md.slot_mapping[:3].tolist() == result.slot_mapping[g].tolist()
        layer = g
        k = np.arange(3, dtype=np.float32)[:, None, None] + 10 * g
        cache.write(layer, k, -k, md)
    for g in (0, 1):
        for i, s in enumerate((a, b)):
            got, _, _ = cache.gather(g, [s])
            assert got[-1, 0, 0] == (2 if i else 0) + 10 * g     # its last new token
    cache.check_invariants()
