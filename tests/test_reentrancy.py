"""Re-entrancy: arguments whose ``__index__`` / ``__array__`` / ``__len__`` call back into
the same table while the call converts them. Every public call converts all its
arguments before it reads any state, so the callback's change is simply seen by the
outer call (issue 11: ``add_sequence`` checked for a free slot, converted ``tokens``, and
handed out the same seq id twice)."""

import numpy as np
import pytest

from kvcore import CapacityError, PageAllocator, PageTable


def make(max_seqs=2):
    table = PageTable(PageAllocator(32), 4, max_seqs, 8, enable_prefix_cache=True)
    return table


class Fires:
    """Holds ``value`` and runs ``action`` (a callback into the table) the first time
    the argument is read."""

    def __init__(self, value, action):
        self.value, self.action = value, action

    def fire(self):   # once: NumPy may ask for the length more than once
        action, self.action = self.action, None
        if action is not None:
            action()


class Index(Fires):
    """An integer whose ``__index__`` runs ``action`` first."""

    def __index__(self):
        self.fire()
        return self.value


class Callback(Fires):
    """An array whose ``__array__`` and ``__len__`` run ``action`` first."""

    def __array__(self, dtype=None, copy=None):
        self.fire()
        return np.asarray(self.value, dtype=dtype)

    def __len__(self):
        self.fire()
        return len(self.value)

    def __getitem__(self, i):
        return self.value[i]


class Seq(Fires):
    """Only ``__len__`` and ``__getitem__``: NumPy converts it as a sequence."""

    def __len__(self):
        self.fire()
        return len(self.value)

    def __getitem__(self, i):
        return self.value[i]


def test_add_sequence_tokens_taking_the_last_slot():
    table = make(max_seqs=2)
    table.add_sequence()
    inner = []
    for wrap in (Callback, Seq):
        tokens = wrap([1, 2, 3, 4, 5], lambda: inner.append(table.add_sequence()))
        with pytest.raises(CapacityError):
            table.add_sequence(tokens)   # the callback took the last slot first
        table.check_invariants()
        table.remove(inner.pop())
    seqs = set(table.active_seq_ids().tolist())
    assert len(seqs) == table.num_seqs == 1


def test_add_sequence_tokens_remove_during_conversion():
    table = make(max_seqs=2)
    a = table.add_sequence()
    b = table.add_sequence()
    tokens = Callback([1, 2, 3, 4, 5], lambda: table.remove(b))
    c = table.add_sequence(tokens)
    assert c == b and table.num_seqs == 2 and a != c
    table.check_invariants()


@pytest.mark.parametrize("where", ["seq_ids", "counts", "token_ids", "count"])
def test_append_arguments_that_append(where):
    table = make(max_seqs=4)
    seq = table.add_sequence()
    other = table.add_sequence()
    bump = lambda: table.append([other], [3])   # noqa: E731
    args = {"seq_ids": [seq], "counts": [2], "token_ids": [7, 8]}
    if where == "count":
        table.append([seq], Index(2, bump), token_ids=[7, 8])
    else:
        args[where] = Callback(args[where], bump)
        table.append(args["seq_ids"], args["counts"], token_ids=args["token_ids"])
    assert table.num_tokens(seq) == 2 and table.num_tokens(other) == 3
    table.check_invariants()


@pytest.mark.parametrize("call", ["flashinfer_metadata", "block_tables", "pages_needed"])
def test_queries_whose_argument_removes_a_sequence(call):
    table = make(max_seqs=4)
    a = table.add_sequence()
    table.append([a], [9])
    b = table.add_sequence()
    table.append([b], [5])
    arg = Callback([a, b], lambda: table.remove(b))
    with pytest.raises(KeyError, match=f"seq_id {b} is not active"):
        if call == "pages_needed":
            table.pages_needed(arg, 1)
        else:
            getattr(table, call)(arg)
    table.check_invariants()


def test_scalar_arguments_that_call_back():
    table = make(max_seqs=4)
    a = table.add_sequence()
    table.append([a], [6])
    fork_during = Index(a, lambda: table.append([a], [1]))
    child = table.fork(fork_during)
    assert table.num_tokens(child) == table.num_tokens(a) == 7
    token = Index(6, lambda: table.remove(child))
    assert table.slot(a, token) >= 0
    assert not table.is_active(child)
    with pytest.raises(KeyError):
        table.pages(Index(a, lambda: table.remove(a)))
    table.check_invariants()


def test_decref_pages_that_free_themselves():
    alloc = PageAllocator(8)
    pages = alloc.allocate(2)
    arg = Callback(pages, lambda: alloc.decref(pages[:1]))
    with pytest.raises(RuntimeError, match="double free"):
        alloc.decref(arg)
    assert alloc.refcount(int(pages[0])) == 0 and alloc.refcount(int(pages[1])) == 1
    alloc.check_invariants()


class RaisingArray:
    """An argument whose ``__array__`` raises something unexpected."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("__array__ exploded")


def test_an_array_argument_that_raises_is_a_type_error_and_changes_nothing():
    import kvcore

    cfg = kvcore.KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=4,
                               num_pages=8)
    cache = kvcore.KVCache(cfg, device="cpu")
    seq = cache.add_sequence()
    cache.append([seq], [2])
    before = cache.table.block_table.copy(), cache.allocator.refcounts.copy()
    k = np.zeros((2, 1, 4), np.float16)
    calls = {
        "append(seq_ids)": lambda: cache.append(RaisingArray(), [1]),
        "append(counts)": lambda: cache.append([seq], RaisingArray()),
        "flashinfer_metadata": lambda: cache.flashinfer_metadata(RaisingArray()),
        "block_tables": lambda: cache.block_tables(RaisingArray()),
        "decref": lambda: cache.allocator.decref(RaisingArray()),
        "incref": lambda: cache.allocator.incref(RaisingArray()),
        "write(slot_mapping)": lambda: cache.write(0, k, k, RaisingArray()),
        "copy_pages": lambda: cache.copy_pages(RaisingArray(), [1]),
        "gather": lambda: cache.gather(0, RaisingArray()),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="__array__ exploded"):
            call()
        assert np.array_equal(cache.table.block_table, before[0]), name
        assert np.array_equal(cache.allocator.refcounts, before[1]), name
    with pytest.raises(kvcore.ShapeError, match="__array__ exploded"):
        cache.write(0, RaisingArray(), k, [0, 1])
    cache.check_invariants()
