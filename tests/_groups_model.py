"""A plain-Python reference model of a PageTable with layer groups (docs/groups.md).

The model does not guess which page ids the allocator hands out. It keeps, per sequence,
its length and token ids and, per group, one row of page ids (``None`` for a column a
window group released); per state group the state pages. Everything else it derives
from those lists: refcounts (table entries per page), used pages, ``num_free``. After each
call it reads the new page ids from the table and checks that they are what the spec
allows: pages that stay keep their ids, new columns get pages that were free, a
copy-on-write happens exactly where the page is still shared, released columns are
exactly those of the release rule.

It also stands for the device: ``pool`` holds the token written into every slot,
``ctx`` the (namespace, token prefix) each slot's KV was computed for, and ``state``
the token history a state page summarises. Reads through the table must give back
every sequence's own tokens; a prefix hit is correct only if every slot it maps holds
KV for exactly the queried prefix.
"""

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


def cdiv(a, b):
    return -(-a // b)


def window_start(length, window, page_size):
    """First column a window group keeps when ``length`` tokens precede the next one:
    page ``j`` goes iff ``(j + 1) * page_size <= length - window + 1``."""
    return max(0, length - window + 1) // page_size


def window_bound(window, chunk, page_size):
    """Most pages a window group holds per sequence after appending ``chunk`` tokens."""
    return cdiv(window - 1 + chunk, page_size) + 1


@dataclass(frozen=True)
class Kind:
    kind: str               # "full", "window" or "state"
    window: int | None = None
    state_pages: int = 0

    @classmethod
    def of(cls, group):
        return cls(group.kind, group.window, group.state_pages)

    @property
    def kv(self):
        return self.kind != "state"


@dataclass
class Seq:
    tokens: list                      # one entry per token; negative: id not given
    namespace: int
    rows: list                        # per group: K/V row (page or None per column) or state pages
    first: list                       # per group: first live column (0 unless a window group)
    chunk: int = 0                    # largest count appended in one call

    @property
    def length(self):
        return len(self.tokens)

    def copy(self):
        return Seq(list(self.tokens), self.namespace, [list(r) for r in self.rows],
                   list(self.first), self.chunk)


@dataclass
class AppendPlan:
    """What the spec says about an append before it runs."""
    too_long: bool
    needed_lo: int = 0        # allocations, fewest copy-on-writes the spec allows
    needed_hi: int = 0        # allocations, most copy-on-writes the spec allows
    freed_lo: int = 0         # pages certainly freed by window releases in the call
    freed_hi: int = 0         # pages possibly freed by window releases in the call
    old: dict = field(default_factory=dict)   # seq -> its Seq before the call


class GroupsModel:
    def __init__(self, groups, page_size, num_pages, max_pages_per_seq):
        self.kinds = [Kind.of(g) for g in groups]
        self.ps = page_size
        self.num_pages = num_pages
        self.max_tokens = max_pages_per_seq * page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.seqs = {}            # seq_id -> Seq
        self.finished = []        # (namespace, tokens) of removed sequences (their KV stays valid)
        self.pool = {}            # slot -> token written there
        self.ctx = {}             # slot -> (namespace, tokens through it) its KV was computed for
        self.state = {}           # state page -> (namespace, tokens) the state summarises
        self.next_unknown = -1    # stands for a token appended without its id

    # -- derived -------------------------------------------------------------------------

    @property
    def num_groups(self):
        return len(self.kinds)

    @property
    def has_state(self):
        return any(k.kind == "state" for k in self.kinds)

    def entries(self, seqs=None):
        """Every table entry: (group, seq, page)."""
        seqs = self.seqs if seqs is None else seqs
        for s, seq in seqs.items():
            for g, row in enumerate(seq.rows):
                for page in row:
                    if page is not None:
                        yield g, s, page

    def refcounts(self, seqs=None):
        return Counter(page for _, _, page in self.entries(seqs))

    def used(self):
        return set(self.refcounts())

    def num_free(self):
        return self.num_pages - len(self.used())

    def live(self, s, g):
        return [p for p in self.seqs[s].rows[g] if p is not None]

    def new_seq(self, namespace=0):
        return Seq([], namespace, [[] for _ in self.kinds], [0] * self.num_groups)

    # -- append --------------------------------------------------------------------------

    def plan_append(self, seq_ids, counts):
        ps = self.ps
        plan = AppendPlan(too_long=any(
            self.seqs[s].length + n > self.max_tokens for s, n in zip(seq_ids, counts,
                                                                      strict=True)))
        plan.old = {s: self.seqs[s].copy() for s in seq_ids}
        if plan.too_long:
            return plan
        refs = self.refcounts()
        # releases: certain ones (sequences that append tokens), possible ones (count 0)
        sure, maybe = Counter(), Counter()
        for s, n in zip(seq_ids, counts, strict=True):
            seq = self.seqs[s]
            for g, kind in enumerate(self.kinds):
                if kind.kind != "window":
                    continue
                stop = window_start(seq.length, kind.window, ps)
                for c in range(seq.first[g], stop):
                    (sure if n else maybe)[seq.rows[g][c]] += 1
        plan.freed_lo = sum(1 for p, k in sure.items() if refs[p] == k)
        plan.freed_hi = sum(1 for p, k in (sure + maybe).items() if refs[p] == k)
        new_pages = 0
        holders = {}   # (group, page) -> holders appending into it, in call order
        for s, n in zip(seq_ids, counts, strict=True):
            if n == 0:
                continue
            seq = self.seqs[s]
            cur = seq.length
            for g, kind in enumerate(self.kinds):
                if kind.kv:
                    new_pages += cdiv(cur + n, ps) - cdiv(cur, ps)
                    if cur % ps:
                        holders.setdefault((g, seq.rows[g][cur // ps]), []).append(s)
                elif cur == 0:
                    new_pages += kind.state_pages
                elif seq.rows[g]:
                    holders.setdefault((g, tuple(seq.rows[g])), []).append(s)
        lo = hi = 0
        for (_g, key), hold in holders.items():
            size = len(key) if isinstance(key, tuple) else 1
            page = key[0] if isinstance(key, tuple) else key
            before = refs[page] - len(hold)                         # other owners now
            after = before - (sure + maybe)[page]                   # fewest after releases
            # every holder copies unless nobody else keeps the page: then one writes in place
            lo += size * (len(hold) - (after <= 0))
            hi += size * (len(hold) - (before <= 0))
        plan.needed_lo = new_pages + lo
        plan.needed_hi = new_pages + hi
        return plan

    def check_append(self, table, plan, seq_ids, counts, result, needed, free_before):
        """Compare the table after a successful append with the spec; return the copies
        [(src, dst)] and the new state of every appending sequence."""
        ps = self.ps
        refs = self.refcounts()
        fresh, copies, updated = [], [], {}
        released = Counter()
        for s, n in zip(seq_ids, counts, strict=True):
            old = plan.old[s]
            cur, new_len = old.length, old.length + n
            seq = old.copy()
            for g, kind in enumerate(self.kinds):
                if not kind.kv:
                    got = table.pages(s, group=g).tolist()
                    if n == 0 or (cur > 0 and got == old.rows[g]):
                        assert got == old.rows[g], (s, g, got, old.rows[g])
                    elif cur == 0:
                        assert len(got) == kind.state_pages, (s, g, got)
                        fresh += got
                    else:   # a copy of every state page
                        assert len(got) == len(old.rows[g]), (s, g, got)
                        assert not set(got) & set(old.rows[g]), (s, g, got, old.rows[g])
                        fresh += got
                        copies += list(zip(old.rows[g], got, strict=True))
                    seq.rows[g] = got
                    continue
                first = table.first_page(s, group=g)
                if kind.kind == "window":
                    rule = max(old.first[g], window_start(cur, kind.window, ps))
                    allowed = {rule} if n else {old.first[g], rule}
                    assert first in allowed, \
                        f"seq {s} group {g}: first live column {first}, expected {allowed}"
                    for c in range(old.first[g], first):
                        released[old.rows[g][c]] += 1
                else:
                    assert first == 0
                row = table.group_block_table(g)[s].tolist()
                new_row = [None] * first + row[first:cdiv(new_len, ps)]
                assert -1 not in new_row[first:], (s, g, row, first)
                for c in range(first, cdiv(cur, ps)):
                    if n and cur % ps and c == cur // ps and new_row[c] != old.rows[g][c]:
                        fresh.append(new_row[c])
                        copies.append((old.rows[g][c], new_row[c]))
                    else:
                        assert new_row[c] == old.rows[g][c], \
                            f"seq {s} group {g} column {c}: {old.rows[g][c]} became {new_row[c]}"
                fresh += new_row[cdiv(cur, ps):]
                seq.rows[g] = new_row
                seq.first[g] = first
            updated[s] = seq
        # fresh pages: distinct, and free before the call or freed by its releases
        freed = {p for p, k in released.items() if refs[p] == k}
        assert len(set(fresh)) == len(fresh), f"a page was handed out twice: {fresh}"
        assert set(fresh) <= set(free_before) | freed, \
            f"pages {set(fresh) - set(free_before) - freed} were in use"
        assert len(fresh) == needed, f"pages_needed said {needed}, append allocated {len(fresh)}"
        assert plan.needed_lo <= needed <= plan.needed_hi, (plan.needed_lo, needed,
                                                            plan.needed_hi)
        got = sorted(zip(result.copy_src.tolist(), result.copy_dst.tolist(), strict=True))
        assert got == sorted(copies), f"copies reported {got}, table shows {sorted(copies)}"
        # a page still shared after the releases must have been copied away from
        holders = {}
        for s, n in zip(seq_ids, counts, strict=True):
            old = plan.old[s]
            if n == 0 or old.length == 0:
                continue
            for g, kind in enumerate(self.kinds):
                if kind.kv and old.length % ps == 0:
                    continue
                if kind.kv:
                    page = old.rows[g][old.length // ps]
                    kept = updated[s].rows[g][old.length // ps] == page
                else:   # a state changes with every token: all its pages are written
                    page = old.rows[g][0] if old.rows[g] else None
                    kept = page is not None and page in updated[s].rows[g]
                others = sum(1 for t in updated if t != s and page in updated[t].rows[g])
                others += sum(1 for t, q in self.seqs.items()
                              if t not in updated and page in q.rows[g])
                assert not (kept and others), \
                    f"seq {s} group {g} wrote into page {page} shared with {others} others"
                holders.setdefault((g, page), []).append(kept)
        # "the copy-on-write replay counts the releases first": of the sequences writing
        # into one page, exactly one keeps it when nobody else holds it after the
        # releases, none otherwise
        for (g, page), kept in holders.items():
            rest = refs[page] - len(kept) - released[page]
            assert sum(kept) == (0 if rest > 0 else 1), \
                f"group {g} page {page}: {sum(kept)} of {len(kept)} writers kept it, " \
                f"{rest} other owners after the releases"
        self._check_slots(table, seq_ids, counts, result, updated, plan)
        return copies, updated

    def _check_slots(self, table, seq_ids, counts, result, updated, plan):
        ps = self.ps
        slots = np.asarray(result.slot_mapping)
        total = sum(counts)
        assert slots.dtype == np.int64
        if self.num_groups == 1:
            assert slots.shape == (total,), slots.shape
            slots = slots[None, :]
        else:
            assert slots.shape == (self.num_groups, total), slots.shape
        for g, kind in enumerate(self.kinds):
            if not kind.kv:
                assert (slots[g] == -1).all(), slots[g]
                continue
            j = 0
            for s, n in zip(seq_ids, counts, strict=True):
                row = updated[s].rows[g]
                for t in range(plan.old[s].length, plan.old[s].length + n):
                    assert slots[g, j] == row[t // ps] * ps + t % ps, (g, s, t, slots[g, j])
                    j += 1

    def apply_append(self, seq_ids, counts, token_ids, result, copies, updated):
        """Do the device's work (copies, then the new K/V and states) and take the new rows."""
        ps = self.ps
        for src, dst in copies:
            for off in range(ps):
                for store in (self.pool, self.ctx):
                    if src * ps + off in store:
                        store[dst * ps + off] = store[src * ps + off]
                    else:
                        store.pop(dst * ps + off, None)
            if src in self.state:
                self.state[dst] = self.state[src]
        j = 0
        for s, n in zip(seq_ids, counts, strict=True):
            seq = updated[s]
            for _ in range(n):
                if token_ids is None:
                    tok = self.next_unknown
                    self.next_unknown -= 1
                else:
                    tok = int(token_ids[j])
                t = seq.length
                seq.tokens.append(tok)
                for g, kind in enumerate(self.kinds):
                    if kind.kv:
                        slot = seq.rows[g][t // ps] * ps + t % ps
                        self.pool[slot] = tok
                        self.ctx[slot] = (seq.namespace, tuple(seq.tokens))
                j += 1
            if n:
                seq.chunk = max(seq.chunk, n)
                for g, kind in enumerate(self.kinds):
                    if not kind.kv:
                        for page in seq.rows[g]:
                            self.state[page] = (seq.namespace, tuple(seq.tokens))
            self.seqs[s] = seq

    # -- truncate ------------------------------------------------------------------------

    def truncate_errors(self, seq_ids, new_lens):
        """The error types the spec allows for ``truncate`` (empty: it must succeed)."""
        errors = set()
        from kvcore import RollbackError

        for s, n in zip(seq_ids, new_lens, strict=True):
            seq = self.seqs[s]
            if n < 0 or n > seq.length:
                errors.add(ValueError)
                continue
            if self.has_state and n < seq.length:   # to the same length rolls nothing back
                errors.add(RollbackError)
            for g, kind in enumerate(self.kinds):
                if (kind.kind == "window" and seq.first[g] > 0
                        and n - kind.window + 1 < seq.first[g] * self.ps):
                    errors.add(RollbackError)
        return errors

    def apply_truncate(self, seq_ids, new_lens):
        ps = self.ps
        for s, n in zip(seq_ids, new_lens, strict=True):
            seq = self.seqs[s]
            del seq.tokens[n:]
            for g, kind in enumerate(self.kinds):
                if kind.kv:
                    del seq.rows[g][cdiv(n, ps):]

    # -- other calls ---------------------------------------------------------------------

    def fork(self, parent, child):
        self.seqs[child] = self.seqs[parent].copy()

    def remove(self, s):
        seq = self.seqs.pop(s)
        self.finished.append((seq.namespace, tuple(seq.tokens)))

    def add_hit(self, table, s, prompt, namespace):
        """Take a new sequence that ``add_sequence(prompt)`` gave ``table.num_tokens(s)``
        cached tokens; check every page it maps holds KV for exactly that prefix, that
        the prefix was computed and not rolled back, and that a window group maps just
        the columns its attention needs."""
        ps = self.ps
        cached = table.num_tokens(s)
        assert cached % ps == 0 and 0 <= cached <= max(len(prompt) - 1, 0), cached
        k = cached // ps
        seq = self.new_seq(namespace)
        seq.tokens = [int(t) for t in prompt[:cached]]
        for g, kind in enumerate(self.kinds):
            first = table.first_page(s, group=g)
            want = window_start(cached, kind.window, ps) if kind.kind == "window" else 0
            assert first == want, f"group {g}: hit of {k} pages maps from column {first}"
            pages = table.pages(s, group=g).tolist()
            if not kind.kv:
                assert pages == []
                continue
            assert len(pages) == k - first, (g, pages, k, first)
            seq.rows[g] = [None] * first + pages
            seq.first[g] = first
            for c in range(first, k):
                for off in range(ps):
                    t = c * ps + off
                    got = self.ctx.get(pages[c - first] * ps + off)
                    want_ctx = (namespace, tuple(seq.tokens[:t + 1]))
                    assert got == want_ctx, \
                        f"hit page {pages[c - first]} (group {g}, token {t}) holds {got}"
        if cached:
            prefix = tuple(seq.tokens)
            assert self.was_computed(namespace, prefix), \
                f"prefix {prefix} served from the cache was rolled back or never computed"
        self.seqs[s] = seq

    def was_computed(self, namespace, prefix):
        """Some sequence, live or removed, appended ``prefix`` and did not roll it back."""
        histories = [(q.namespace, tuple(q.tokens)) for q in self.seqs.values()]
        return any(ns == namespace and toks[:len(prefix)] == prefix
                   for ns, toks in histories + self.finished)

    # -- invariants ----------------------------------------------------------------------

    def check(self, table, content=True):
        ps = self.ps
        table.check_invariants()
        assert table.num_seqs == len(self.seqs)
        assert sorted(table.active_seq_ids().tolist()) == sorted(self.seqs)
        refs = self.refcounts()
        alloc = table.allocator
        np.testing.assert_array_equal(
            alloc.refcounts, [refs.get(p, 0) for p in range(self.num_pages)])
        assert alloc.num_free == self.num_pages - len(refs)
        owner = {}
        for g, _s, page in self.entries():
            assert owner.setdefault(page, g) == g, f"page {page} in groups {owner[page]}, {g}"
        seqs = sorted(self.seqs)
        for s in seqs:
            seq = self.seqs[s]
            assert table.num_tokens(s) == seq.length
            for g, kind in enumerate(self.kinds):
                pages = table.pages(s, group=g).tolist()
                assert pages == self.live(s, g), (s, g, pages, seq.rows[g])
                if not kind.kv:
                    assert len(pages) == (kind.state_pages if seq.length else 0)
                    continue
                assert table.first_page(s, group=g) == seq.first[g]
                row = [-1 if p is None else p for p in seq.rows[g]]
                want = row + [-1] * (self.max_pages_per_seq - len(row))
                assert table.group_block_table(g)[s].tolist() == want, (s, g)
                assert len(row) == cdiv(seq.length, ps)
                if kind.kind == "window":
                    assert len(pages) <= window_bound(kind.window, seq.chunk, ps), \
                        f"seq {s} group {g} holds {len(pages)} pages, chunk {seq.chunk}"
                if seq.length and pages:
                    t = seq.length - 1
                    assert table.slot(s, t, group=g) == seq.rows[g][t // ps] * ps + t % ps
        if seqs:
            for g, kind in enumerate(self.kinds):
                if kind.kv:
                    self._check_metadata(table, g, seqs)
        if content:
            self.check_content()

    def _check_metadata(self, table, g, seqs):
        ps = self.ps
        indptr, indices, last = table.flashinfer_metadata(seqs, group=g)
        assert indices.tolist() == [p for s in seqs for p in self.live(s, g)]
        bt = table.block_tables(seqs, group=g)
        width = max(cdiv(self.seqs[s].length, ps) for s in seqs)
        assert bt.shape == (len(seqs), width), (bt.shape, width)
        for b, s in enumerate(seqs):
            seq = self.seqs[s]
            live = self.live(s, g)
            assert indptr[b + 1] - indptr[b] == len(live)
            if live:
                assert last[b] == (seq.length - 1) % ps + 1
            elif seq.length == 0:
                assert last[b] == 0
            row = [-1 if p is None else p for p in seq.rows[g]]
            assert bt[b].tolist() == row + [-1] * (width - len(row))

    def check_content(self):
        ps = self.ps
        for s, seq in self.seqs.items():
            for g, kind in enumerate(self.kinds):
                if not kind.kv:
                    for page in seq.rows[g]:
                        assert self.state.get(page) == (seq.namespace, tuple(seq.tokens)), \
                            f"seq {s}: state page {page} summarises {self.state.get(page)}"
                    continue
                for t in range(seq.first[g] * ps, seq.length):
                    slot = seq.rows[g][t // ps] * ps + t % ps
                    assert self.pool.get(slot) == seq.tokens[t], \
                        f"seq {s} group {g} token {t} reads {self.pool.get(slot)}"


# -- the table and the model side by side -------------------------------------------------

def group_state(table):
    """Everything observable about a grouped PageTable, its allocator and prefix cache."""
    alloc = table.allocator
    seqs = tuple(table.active_seq_ids().tolist())
    groups = range(table.num_groups)
    return (
        tuple(np.array(table.group_block_table(g)) for g in groups),
        np.array(table.seq_lens),
        np.array(alloc.refcounts),
        alloc.num_free,
        alloc.num_evictable,
        table.num_seqs,
        seqs,
        tuple(table.first_page(s, group=g) for s in seqs for g in groups),
        tuple(tuple(table.pages(s, group=g).tolist()) for s in seqs for g in groups),
        table.num_cached_pages,
        table.prefix_stats,
    )


def assert_unchanged(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        if isinstance(a, tuple) and a and isinstance(a[0], np.ndarray):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y)
        elif isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b, (a, b)


class Driver:
    """Runs calls on a table and keeps a :class:`GroupsModel` in step, checking each call
    against the spec (a failed call must change nothing)."""

    def __init__(self, table):
        self.table = table
        alloc = table.allocator
        self.model = GroupsModel(table.groups, table.page_size, alloc.num_pages,
                                 table.max_pages_per_seq)

    def check(self, content=True):
        self.model.check(self.table, content=content)

    def add(self, prompt=None, namespace=0):
        """``add_sequence``; None when every seq slot is taken (after checking the error)."""
        from kvcore import CapacityError

        table = self.table
        expect = table.match_prefix(prompt, namespace=namespace) if prompt is not None else 0
        if table.num_seqs == table.max_seqs:
            before = group_state(table)
            try:
                table.add_sequence(prompt, namespace=namespace)
            except CapacityError:
                assert_unchanged(before, group_state(table))
                return None
            raise AssertionError("add_sequence beyond max_seqs did not raise")
        s = table.add_sequence(prompt, namespace=namespace)
        assert s not in self.model.seqs
        assert table.num_tokens(s) == expect, (table.num_tokens(s), expect)
        self.model.add_hit(table, s, [] if prompt is None else list(prompt), namespace)
        return s

    def append(self, seq_ids, counts, token_ids=None):
        """``append``; the result, or None if it raised (after checking that it had to)."""
        import pytest

        from kvcore import CapacityError, OutOfPagesError

        table, model = self.table, self.model
        alloc = table.allocator
        seq_ids, counts = list(seq_ids), list(counts)
        plan = model.plan_append(seq_ids, counts)
        before = group_state(table)
        if plan.too_long:
            with pytest.raises(CapacityError):
                table.pages_needed(seq_ids, counts)
            with pytest.raises(CapacityError):
                table.append(seq_ids, counts, token_ids=token_ids)
            assert_unchanged(before, group_state(table))
            return None
        needed = table.pages_needed(seq_ids, counts)
        assert_unchanged(before, group_state(table))
        free = alloc.num_free
        free_pages = [p for p in range(alloc.num_pages) if alloc.refcount(p) == 0]
        try:
            result = table.append(seq_ids, counts, token_ids=token_ids)
        except OutOfPagesError as exc:
            assert needed > free + plan.freed_lo, \
                f"append refused though it needs {needed} pages and {free} are free"
            assert exc.requested > exc.available
            assert_unchanged(before, group_state(table))
            return None
        assert needed <= free + plan.freed_hi, \
            f"append took {needed} pages with {free} free and at most {plan.freed_hi} released"
        copies, updated = model.check_append(table, plan, seq_ids, counts, result, needed,
                                             free_pages)
        model.apply_append(seq_ids, counts, token_ids, result, copies, updated)
        return result

    def truncate(self, seq_ids, new_lens):
        """``truncate``; True if it ran, False if it raised an error the spec demands."""
        import pytest

        table, model = self.table, self.model
        errors = model.truncate_errors(seq_ids, new_lens)
        before = group_state(table)
        if errors:
            with pytest.raises(ValueError) as info:
                table.truncate(seq_ids, new_lens)
            assert type(info.value) in errors, f"raised {info.value!r}, expected {errors}"
            assert_unchanged(before, group_state(table))
            return False
        table.truncate(seq_ids, new_lens)
        model.apply_truncate(seq_ids, new_lens)
        return True

    def fork(self, parent):
        from kvcore import CapacityError

        table = self.table
        if table.num_seqs == table.max_seqs:
            before = group_state(table)
            try:
                table.fork(parent)
            except CapacityError:
                assert_unchanged(before, group_state(table))
                return None
            raise AssertionError("fork beyond max_seqs did not raise")
        child = table.fork(parent)
        assert child not in self.model.seqs
        self.model.fork(parent, child)
        return child

    def remove(self, s):
        self.table.remove(s)
        self.model.remove(s)
