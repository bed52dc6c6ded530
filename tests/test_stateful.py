"""Hypothesis state machine: PageTable against a plain-Python model of the contract.

The model keeps, for every sequence, its page list and the token values it holds,
and a dict ``slot -> value`` standing for the device pool. Each append writes fresh
values through the returned slot mapping after performing the reported
copy-on-write copies, so any sharing mistake shows up as a sequence reading another
sequence's tokens.
"""

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from kvcore import CapacityError, OutOfPagesError, PageAllocator, PageTable

from ._state import assert_same_state, table_state

NUM_PAGES = 24
MAX_SEQS = 6
MAX_PAGES_PER_SEQ = 6


class PageTableMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        self.page_size = None
        self.table = None
        self.model_pages = {}   # seq_id -> list of page ids
        self.model_tokens = {}  # seq_id -> list of token values
        self.pool = {}          # slot -> token value
        self.next_value = 1

    @rule(page_size=st.sampled_from([1, 2, 3, 4, 16]))
    @precondition(lambda self: self.table is None)
    def start(self, page_size):
        self.page_size = page_size
        self.table = PageTable(PageAllocator(NUM_PAGES), page_size, MAX_SEQS, MAX_PAGES_PER_SEQ)

    # -- model helpers -----------------------------------------------------------------

    def refcount(self, page):
        return sum(pages.count(page) for pages in self.model_pages.values())

    def used_pages(self):
        return {p for pages in self.model_pages.values() for p in pages}

    # -- rules -------------------------------------------------------------------------

    @precondition(lambda self: self.table is not None)
    @rule(target=seqs)
    def add(self):
        if len(self.model_pages) == MAX_SEQS:
            before = table_state(self.table)
            try:
                self.table.add_sequence()
            except CapacityError:
                assert_same_state(before, table_state(self.table))
                return None
            raise AssertionError("add_sequence beyond max_seqs did not raise")
        seq = self.table.add_sequence()
        assert seq not in self.model_pages and 0 <= seq < MAX_SEQS
        self.model_pages[seq] = []
        self.model_tokens[seq] = []
        return seq

    @precondition(lambda self: self.table is not None)
    @rule(target=seqs, parent=seqs)
    def fork(self, parent):
        if parent is None or parent not in self.model_pages:
            return None
        if len(self.model_pages) == MAX_SEQS:
            before = table_state(self.table)
            try:
                self.table.fork(parent)
            except CapacityError:
                assert_same_state(before, table_state(self.table))
                return None
            raise AssertionError("fork beyond max_seqs did not raise")
        child = self.table.fork(parent)
        self.model_pages[child] = list(self.model_pages[parent])
        self.model_tokens[child] = list(self.model_tokens[parent])
        return child

    @precondition(lambda self: self.table is not None)
    @rule(seq=consumes(seqs))
    def remove(self, seq):
        if seq is None or seq not in self.model_pages:
            return
        self.table.remove(seq)
        del self.model_pages[seq]
        del self.model_tokens[seq]

    @precondition(lambda self: self.table is not None and self.model_pages)
    @rule(data=st.data())
    def append(self, data):
        live = sorted(self.model_pages)
        seq_ids = data.draw(st.lists(st.sampled_from(live), unique=True, max_size=len(live)))
        counts = data.draw(st.lists(st.integers(0, 2 * self.page_size + 1),
                                    min_size=len(seq_ids), max_size=len(seq_ids)))
        ps = self.page_size
        # What the contract says should happen, computed from the model alone.
        refs = {p: self.refcount(p) for p in self.used_pages()}
        expected_src, new_pages, too_long = [], 0, False
        for seq, n in zip(seq_ids, counts, strict=True):
            cur = len(self.model_tokens[seq])
            if cur + n > MAX_PAGES_PER_SEQ * ps:
                too_long = True
            if n == 0:
                continue
            new_pages += -(-(cur + n) // ps) - (-(-cur // ps))
            if cur % ps:
                last = self.model_pages[seq][-1]
                if refs[last] > 1:
                    refs[last] -= 1
                    expected_src.append(last)
        needed = new_pages + len(expected_src)
        before = table_state(self.table)
        free_before = set(range(NUM_PAGES)) - self.used_pages()
        if too_long or needed > len(free_before):
            try:
                self.table.append(seq_ids, counts)
            except (CapacityError, OutOfPagesError) as exc:
                assert isinstance(exc, CapacityError) == too_long
                if isinstance(exc, OutOfPagesError):
                    assert exc.requested == needed and exc.available == len(free_before)
                assert_same_state(before, table_state(self.table))
                return
            raise AssertionError("append that cannot fit did not raise")
        assert self.table.pages_needed(seq_ids, counts) == needed
        result = self.table.append(seq_ids, counts)
        assert result.copy_src.tolist() == expected_src
        assert len(set(result.copy_dst.tolist())) == len(expected_src)
        assert set(result.copy_dst.tolist()) <= free_before
        assert self.table.allocator.num_free == len(free_before) - needed
        # the device's work: copies first, then the new tokens
        for src, dst in zip(result.copy_src, result.copy_dst, strict=True):
            for off in range(ps):
                if src * ps + off in self.pool:
                    self.pool[dst * ps + off] = self.pool[src * ps + off]
        offset = 0
        for seq, n in zip(seq_ids, counts, strict=True):
            pages = self.table.pages(seq).tolist()
            cur = len(self.model_tokens[seq])
            for t in range(cur, cur + n):
                slot = int(result.slot_mapping[offset])
                assert slot == pages[t // ps] * ps + t % ps
                self.pool[slot] = self.next_value
                self.model_tokens[seq].append(self.next_value)
                self.next_value += 1
                offset += 1
            old = self.model_pages[seq]
            keep = max(len(old) - 1, 0)
            assert pages[:keep] == old[:keep]  # only the last page may move (CoW)
            self.model_pages[seq] = pages
        assert offset == len(result.slot_mapping)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self):
        if self.table is None:
            return
        self.table.check_invariants()
        ps = self.page_size
        assert self.table.num_seqs == len(self.model_pages)
        assert self.table.allocator.num_free == NUM_PAGES - len(self.used_pages())
        for seq, pages in self.model_pages.items():
            assert self.table.pages(seq).tolist() == pages
            tokens = self.model_tokens[seq]
            assert self.table.num_tokens(seq) == len(tokens)
            assert len(pages) == -(-len(tokens) // ps)
            read = [self.pool.get(pages[t // ps] * ps + t % ps) for t in range(len(tokens))]
            assert read == tokens, f"seq {seq} reads {read}, wrote {tokens}"
        for page in range(NUM_PAGES):
            assert self.table.allocator.refcount(page) == self.refcount(page)
        if self.model_pages:
            seqs = sorted(self.model_pages)
            indptr, indices, last = self.table.flashinfer_metadata(seqs)
            assert indices.tolist() == [p for s in seqs for p in self.model_pages[s]]
            for b, s in enumerate(seqs):
                n = len(self.model_tokens[s])
                assert indptr[b + 1] - indptr[b] == len(self.model_pages[s])
                assert last[b] == (0 if n == 0 else (n - 1) % ps + 1)


TestPageTableStateMachine = PageTableMachine.TestCase


def test_random_batches_never_break_invariants():
    """A cheap long soak alongside the state machine: many steps, invariants each time."""
    rng = np.random.default_rng(1234)
    table = PageTable(PageAllocator(64), 5, 16, 16)
    live = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.2 and table.num_seqs < 16:
            live.append(table.add_sequence())
        elif op < 0.3 and live and table.num_seqs < 16:
            live.append(table.fork(live[rng.integers(len(live))]))
        elif op < 0.4 and live:
            table.remove(live.pop(rng.integers(len(live))))
        elif live:
            batch = rng.permutation(live)[: rng.integers(1, len(live) + 1)]
            counts = rng.integers(0, 7, size=len(batch))
            try:
                table.append(batch, counts)
            except (OutOfPagesError, CapacityError):
                pass
        table.check_invariants()
