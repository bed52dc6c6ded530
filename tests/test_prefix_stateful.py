"""Hypothesis state machine for prefix caching, against a plain model of what was written.

The model records the token id written into every slot (copy-on-write copies
included) and, for every page that became full, the namespace and the whole token
prefix of the sequence that filled it. A prefix hit is correct only if every page it
maps carries exactly the queried prefix in the queried namespace; every live
sequence must read back its own tokens. A weakened 2-bit hash makes collisions the
norm, so any lookup that trusted the hash would be caught.
"""

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcore import CapacityError, OutOfPagesError, PageAllocator, PageTable

NUM_PAGES, MAX_SEQS, MAX_PAGES = 20, 6, 8
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=14)


class PrefixMachine(RuleBasedStateMachine):
    hash_bits = 64

    def __init__(self):
        super().__init__()
        self.table = None

    @precondition(lambda self: self.table is None)
    @rule(page_size=st.sampled_from([1, 2, 3]))
    def start(self, page_size):
        self.ps = page_size
        self.table = PageTable(PageAllocator(NUM_PAGES), page_size, MAX_SEQS, MAX_PAGES,
                               enable_prefix_cache=True, prefix_hash_bits=self.hash_bits)
        self.tokens = {}       # seq -> token ids
        self.namespace = {}    # seq -> namespace
        self.slot = {}         # slot -> token id written there
        self.page_prefix = {}  # page -> (namespace, full token prefix through that page)

    def _record(self, result, seq_ids, counts, token_ids):
        ps = self.ps
        for src, dst in zip(result.copy_src, result.copy_dst, strict=True):
            for off in range(ps):
                if src * ps + off in self.slot:
                    self.slot[dst * ps + off] = self.slot[src * ps + off]
        j = 0
        for seq, n in zip(seq_ids, counts, strict=True):
            for _ in range(n):
                slot = int(result.slot_mapping[j])
                self.slot[slot] = token_ids[j]
                self.tokens[seq].append(token_ids[j])
                j += 1
                length = len(self.tokens[seq])
                if length % ps == 0:
                    page = slot // ps
                    self.page_prefix[page] = (self.namespace[seq], tuple(self.tokens[seq]))

    @precondition(lambda self: self.table is not None)
    @rule(prompt=tokens_st, namespace=st.integers(0, 1))
    def add(self, prompt, namespace):
        table, ps = self.table, self.ps
        try:
            seq = table.add_sequence(prompt, namespace=namespace)
        except CapacityError:
            assert table.num_seqs == MAX_SEQS
            return
        cached = table.num_tokens(seq)
        assert cached % ps == 0 and cached <= len(prompt) - 1
        pages = table.pages(seq).tolist()
        for i, page in enumerate(pages):
            assert self.page_prefix[page] == (namespace, tuple(prompt[:(i + 1) * ps])), \
                f"hit page {page} holds another prefix"
        self.tokens[seq] = list(prompt[:cached])
        self.namespace[seq] = namespace
        rest = prompt[cached:]
        try:
            result = table.append([seq], [len(rest)], token_ids=rest)
        except (OutOfPagesError, CapacityError):
            table.remove(seq)
            del self.tokens[seq], self.namespace[seq]
            return
        self._record(result, [seq], [len(rest)], rest)

    @precondition(lambda self: self.table is not None and self.tokens)
    @rule(data=st.data())
    def decode(self, data):
        live = sorted(self.tokens)
        batch = data.draw(st.lists(st.sampled_from(live), unique=True, min_size=1))
        ids = data.draw(st.lists(st.integers(0, 2), min_size=len(batch), max_size=len(batch)))
        try:
            result = self.table.append(batch, 1, token_ids=ids)
        except (OutOfPagesError, CapacityError):
            return
        self._record(result, batch, [1] * len(batch), ids)

    @precondition(lambda self: self.table is not None and self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        try:
            child = self.table.fork(parent)
        except CapacityError:
            return
        self.tokens[child] = list(self.tokens[parent])
        self.namespace[child] = self.namespace[parent]

    @precondition(lambda self: self.table is not None and self.tokens)
    @rule(data=st.data())
    def remove(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.table.remove(seq)
        del self.tokens[seq], self.namespace[seq]

    @precondition(lambda self: self.table is not None)
    @rule()
    def clear(self):
        self.table.clear_prefix_cache()

    @invariant()
    def consistent(self):
        if self.table is None:
            return
        self.table.check_invariants()
        ps = self.ps
        for seq, toks in self.tokens.items():
            pages = self.table.pages(seq).tolist()
            assert len(pages) == -(-len(toks) // ps)
            read = [self.slot.get(pages[t // ps] * ps + t % ps) for t in range(len(toks))]
            assert read == toks, f"seq {seq} reads {read}, holds {toks}"


class WeakHashPrefixMachine(PrefixMachine):
    hash_bits = 2


TestPrefixMachine = PrefixMachine.TestCase
TestWeakHashPrefixMachine = WeakHashPrefixMachine.TestCase
