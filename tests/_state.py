"""Helpers that prove a failed call changed nothing."""

import numpy as np


def table_state(table):
    """Everything observable about a PageTable and its allocator."""
    alloc = table.allocator
    return (
        table.block_table.copy(),
        table.seq_lens.copy(),
        alloc.refcounts.copy(),
        alloc.num_free,
        table.num_seqs,
        tuple(table.active_seq_ids()),
    )


def assert_same_state(before, after):
    for a, b in zip(before, after, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b


def assert_same_future(table, twin, seq_ids):
    """The next allocations of ``table`` and an untouched ``twin`` agree (same free stack)."""
    assert_same_state(table_state(table), table_state(twin))
    n = table.allocator.num_free
    if n and seq_ids:
        ps = table.page_size
        a = table.append(seq_ids, [ps] * len(seq_ids)) if n >= len(seq_ids) + 1 else None
        b = twin.append(seq_ids, [ps] * len(seq_ids)) if a is not None else None
        if a is not None:
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(table.allocator.allocate(table.allocator.num_free),
                                  twin.allocator.allocate(twin.allocator.num_free))
