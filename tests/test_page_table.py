import numpy as np
import pytest

from kvcore import (
    CapacityError,
    OutOfPagesError,
    PageAllocator,
    PageTable,
    UnknownSequenceError,
)

from ._state import assert_same_future, assert_same_state, table_state


def test_worked_example_45_tokens_page_16(make_table):
    table = make_table()
    seq = table.add_sequence()
    result = table.append([seq], [45])
    assert result.slot_mapping.dtype == np.int64
    np.testing.assert_array_equal(result.slot_mapping, np.arange(45))
    assert result.copy_src.shape == result.copy_dst.shape == (0,)
    indptr, indices, last = table.flashinfer_metadata([seq])
    assert indptr.tolist() == [0, 3] and indices.tolist() == [0, 1, 2]
    assert last.tolist() == [13]  # 45 - 2 * 16
    assert table.num_tokens(seq) == 45
    assert table.slot(seq, 40) == 2 * 16 + 40 % 16
    table.check_invariants()


def test_slots_follow_pages_across_sequences(make_table):
    table = make_table(page_size=4)
    a, b = table.add_sequence(), table.add_sequence()
    r = table.append([a, b], [3, 6])
    # a gets page 0, b gets pages 1 and 2
    assert r.slot_mapping.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    r = table.append([b, a], [1, 2])
    # b's page 2 has room for one more; a fills page 0 then opens page 3
    assert r.slot_mapping.tolist() == [10, 3, 12]
    assert table.pages(a).tolist() == [0, 3]
    assert table.block_table[a, :3].tolist() == [0, 3, -1]
    assert table.seq_lens[[a, b]].tolist() == [5, 7]
    table.check_invariants()


def test_scalar_count_applies_to_all(make_table):
    table = make_table(page_size=2)
    seqs = [table.add_sequence() for _ in range(3)]
    assert table.append(seqs, 1).slot_mapping.tolist() == [0, 2, 4]
    assert table.append(np.array(seqs, dtype=np.int32), np.int64(1)).slot_mapping.tolist() == [
        1, 3, 5]


def test_zero_tokens_and_empty_batch(make_table):
    table = make_table()
    seq = table.add_sequence()
    r = table.append([seq], [0])
    assert r.slot_mapping.shape == (0,)
    r = table.append([], [])
    assert r.slot_mapping.shape == (0,) and r.copy_src.shape == (0,)
    indptr, indices, last = table.flashinfer_metadata([seq])
    assert indptr.tolist() == [0, 0] and indices.size == 0 and last.tolist() == [0]
    assert table.block_tables([seq]).shape == (1, 0)
    assert table.pages(seq).size == 0


def test_last_page_len_full_page_is_page_size(make_table):
    table = make_table(page_size=16)
    seq = table.add_sequence()
    table.append([seq], [32])
    assert table.flashinfer_metadata([seq])[2].tolist() == [16]


def test_fork_shares_pages_and_copy_on_write(make_table):
    table = make_table(page_size=4)
    parent = table.add_sequence()
    table.append([parent], [6])  # pages [0, 1], page 1 half full
    child = table.fork(parent)
    assert table.num_tokens(child) == 6
    assert table.pages(child).tolist() == [0, 1]
    assert table.allocator.refcounts[:2].tolist() == [2, 2]
    r = table.append([child], [1])
    assert (r.copy_src.tolist(), r.copy_dst.tolist()) == ([1], [2])
    assert r.slot_mapping.tolist() == [2 * 4 + 2]
    assert table.pages(child).tolist() == [0, 2]
    assert table.allocator.refcounts[:3].tolist() == [2, 1, 1]
    # the parent is now the only owner of page 1: it writes in place
    r = table.append([parent], [1])
    assert r.copy_src.size == 0 and r.slot_mapping.tolist() == [1 * 4 + 2]
    table.check_invariants()


def test_all_sharers_appending_in_one_call_last_writes_in_place(make_table):
    table = make_table(page_size=4)
    a = table.add_sequence()
    table.append([a], [2])
    b, c = table.fork(a), table.fork(a)
    assert table.pages_needed([a, b, c], [1, 1, 1]) == 2
    r = table.append([a, b, c], [1, 1, 1])
    assert r.copy_src.tolist() == [0, 0]
    assert r.copy_dst.tolist() == [1, 2]
    assert r.slot_mapping.tolist() == [1 * 4 + 2, 2 * 4 + 2, 0 * 4 + 2]
    assert [table.pages(s).tolist() for s in (a, b, c)] == [[1], [2], [0]]
    table.check_invariants()


def test_full_shared_pages_are_never_copied(make_table):
    table = make_table(page_size=4)
    a = table.add_sequence()
    table.append([a], [8])
    b = table.fork(a)
    r = table.append([a, b], [1, 1])
    assert r.copy_src.size == 0
    assert table.pages(a).tolist()[:2] == table.pages(b).tolist()[:2] == [0, 1]
    table.check_invariants()


def test_fork_of_empty_and_remove_returns_pages_tail_first(make_table):
    table = make_table(page_size=4, num_pages=8)
    a = table.add_sequence()
    b = table.fork(a)
    assert table.num_tokens(b) == 0
    table.append([a], [12])  # pages 0, 1, 2
    table.remove(a)
    assert table.allocator.num_free == 8
    # tail first onto a LIFO stack: the first page comes back out first
    np.testing.assert_array_equal(table.allocator.allocate(3), [0, 1, 2])
    assert not table.is_active(a) and table.is_active(b)


def test_pages_needed_matches_append(make_table):
    table = make_table(page_size=4)
    a = table.add_sequence()
    table.append([a], [5])
    b = table.fork(a)
    c = table.add_sequence()
    needed = table.pages_needed([a, b, c], [3, 4, 9])
    before = table.allocator.num_free
    table.append([a, b, c], [3, 4, 9])
    assert before - table.allocator.num_free == needed


def test_block_tables_padded(make_table):
    table = make_table(page_size=2)
    a, b = table.add_sequence(), table.add_sequence()
    table.append([a, b], [5, 2])
    bt = table.block_tables([b, a, b])
    assert bt.dtype == np.int32
    assert bt.tolist() == [[3, -1, -1], [0, 1, 2], [3, -1, -1]]


def test_block_table_and_seq_lens_are_read_only_views(make_table):
    table = make_table()
    bt, lens = table.block_table, table.seq_lens
    assert bt.shape == (8, 8) and lens.shape == (8,)
    with pytest.raises(ValueError):
        bt[0, 0] = 1
    with pytest.raises(ValueError):
        lens[0] = 1
    seq = table.add_sequence()
    table.append([seq], [1])
    assert bt[seq, 0] == 0 and lens[seq] == 1


def test_seq_ids_are_reused_and_capacity_enforced(make_table):
    table = make_table(max_seqs=2)
    a, b = table.add_sequence(), table.add_sequence()
    assert (a, b) == (0, 1)
    with pytest.raises(CapacityError, match="all 2 sequence slots are in use"):
        table.add_sequence()
    with pytest.raises(CapacityError, match="all 2 sequence slots are in use"):
        table.fork(a)
    table.remove(a)
    assert table.add_sequence() == a
    assert table.num_seqs == 2


# -- errors leave everything unchanged -----------------------------------------------------

def _scenario(make_table):
    table = make_table(num_pages=10, page_size=4, max_seqs=4, max_pages_per_seq=8)
    a = table.add_sequence()
    table.append([a], [6])
    b = table.fork(a)
    c = table.add_sequence()
    table.append([c], [3])
    return table, (a, b, c)


BAD_APPENDS = [
    (lambda s: ([s[0], 7], [1, 1]), UnknownSequenceError, "seq_id 7 is not active"),
    (lambda s: ([s[0], -1], [1, 1]), UnknownSequenceError, "seq_id -1 is not active"),
    (lambda s: ([s[0], s[0]], [1, 1]), ValueError, "more than once"),
    (lambda s: ([s[0], s[1]], [1]), ValueError, "differ in length: 2 != 1"),
    (lambda s: ([s[0], s[1]], [1, -2]), ValueError, r"num_new_tokens\[1\] is -2"),
    (lambda s: ([s[0], s[2]], [1, 30]), CapacityError, "seq_id 2 would hold 33 tokens"),
    (lambda s: ([s[0]], [2**62]), CapacityError, "more than max_pages_per_seq"),
    (lambda s: ([s[0], s[1], s[2]], [1, 20, 13]), OutOfPagesError, "requested 9 pages"),
    (lambda s: ([s[0]], [1.5]), TypeError, "num_new_tokens must hold integers"),
    (lambda s: ([s[0]], [True]), TypeError, "num_new_tokens must hold integers"),
    (lambda s: ([[s[0]]], [1]), ValueError, "seq_ids must be 1-D"),
]


@pytest.mark.parametrize(("args", "error", "message"), BAD_APPENDS)
def test_bad_append_changes_nothing(make_table, args, error, message):
    table, seqs = _scenario(make_table)
    twin, _ = _scenario(make_table)
    before = table_state(table)
    with pytest.raises(error, match=message):
        table.append(*args(seqs))
    if error is OutOfPagesError:  # pages_needed answers the question instead
        assert table.pages_needed(*args(seqs)) > table.allocator.num_free
    else:
        with pytest.raises(error, match=message):
            table.pages_needed(*args(seqs))
    assert_same_state(before, table_state(table))
    table.check_invariants()
    assert_same_future(table, twin, [seqs[1]])


def test_out_of_pages_with_cow_counts_the_copy(make_table):
    table, (a, b, c) = _scenario(make_table)
    # 10 pages: a/b share 2, c has 1 -> 7 free. b appending 1 needs its CoW copy.
    assert table.pages_needed([b], [1]) == 1
    assert table.pages_needed([a, b], [1, 1]) == 1
    with pytest.raises(OutOfPagesError) as info:
        table.append([a, b, c], [1, 26, 2])
    # a copies its shared page (1), b then owns its page and grows 6 -> 32 tokens (+6),
    # c grows 3 -> 5 tokens (+1)
    assert info.value.requested == 8 and info.value.available == 7


@pytest.mark.parametrize("method", ["remove", "fork", "num_tokens", "pages"])
def test_unknown_sequence(make_table, method):
    table, _ = _scenario(make_table)
    before = table_state(table)
    with pytest.raises(UnknownSequenceError, match="seq_id 3 is not active") as info:
        getattr(table, method)(3)
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "seq_id 3 is not active"
    assert_same_state(before, table_state(table))


def test_slot_errors(make_table):
    table, (a, _, _) = _scenario(make_table)
    with pytest.raises(IndexError, match=r"token_idx 6 out of range \[0, 6\) for seq_id 0"):
        table.slot(a, 6)
    with pytest.raises(UnknownSequenceError):
        table.slot(9, 0)
    with pytest.raises(TypeError, match="seq_id must be an integer"):
        table.slot("0", 0)


def test_metadata_unknown_sequence(make_table):
    table, (a, _, _) = _scenario(make_table)
    with pytest.raises(UnknownSequenceError, match="seq_id 3 is not active"):
        table.flashinfer_metadata([a, 3])
    with pytest.raises(UnknownSequenceError):
        table.block_tables([3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"page_size": 0}, "page_size must be in"),
        ({"max_seqs": -1}, "max_seqs must be in"),
        ({"max_pages_per_seq": 0}, "max_pages_per_seq must be in"),
        ({"page_size": 2**16, "max_pages_per_seq": 2**16}, "exceeds"),
    ],
)
def test_constructor_validates(kwargs, message):
    args = {"page_size": 16, "max_seqs": 4, "max_pages_per_seq": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        PageTable(PageAllocator(4), **args)
    with pytest.raises(TypeError):
        PageTable(None, 16, 4, 4)


def test_state_survives_repeated_fill_and_drain(make_table):
    table = make_table(num_pages=32, page_size=3, max_seqs=8, max_pages_per_seq=32)
    rng = np.random.default_rng(0)
    for _ in range(50):
        seqs = [table.add_sequence() for _ in range(4)]
        for _ in range(5):
            counts = rng.integers(0, 4, size=len(seqs))
            if table.pages_needed(seqs, counts) <= table.allocator.num_free:
                table.append(seqs, counts)
        for s in seqs:
            table.remove(s)
        table.check_invariants()
    assert table.allocator.num_free == 32
