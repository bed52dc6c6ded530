"""Byte-order and dtype matrix: every integer argument of the host core, given as each
integer dtype (native and byte-swapped), means exactly what the same Python ints mean.

The fast paths take native int32 / int64 arrays as they are; ``>i4`` and ``>i8`` have
the same NumPy type number as their native twins, so they must be told apart by byte
order, not by type number (issue 11: a ``decref`` of page 1 as ``>i4`` freed page
16,777,216)."""

import pickle

import numpy as np
import pytest

from kvcore import InvalidPageError, PageAllocator, PageTable
from kvcore._args import first_slot_out_of_range
from kvcore._checks import check_host_slots

DTYPES = [">i4", ">i8", "<i2", ">i2", "u1", "u2", "u4", "u8", ">u4", np.longlong, np.intc,
          np.int32, np.int64]


def ids(dt):
    return np.dtype(dt).str


def make():
    table = PageTable(PageAllocator(64), 4, 8, 8, enable_prefix_cache=True)
    a = table.add_sequence([1, 2, 3, 4, 5, 6])
    table.append([a], [6], token_ids=[1, 2, 3, 4, 5, 6])
    b = table.add_sequence()
    table.append([b], [3])
    return table, a, b


@pytest.mark.parametrize("dt", DTYPES, ids=ids)
def test_table_arguments(dt):
    ref, a, b = make()
    table, _, _ = make()
    arr = lambda values: np.array(values, dtype=dt)   # noqa: E731
    assert table.match_prefix(arr([1, 2, 3, 4, 5, 6])) == ref.match_prefix([1, 2, 3, 4, 5, 6])
    for got, want in zip(table.flashinfer_metadata(arr([b, a])),
                         ref.flashinfer_metadata([b, a]), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(table.block_tables(arr([a, b])), ref.block_tables([a, b]))
    assert table.pages_needed(arr([a, b]), arr([5, 2])) == ref.pages_needed([a, b], [5, 2])
    got = table.append(arr([a, b]), arr([5, 2]), token_ids=arr([7, 8, 9, 10, 11, 12, 13]))
    want = ref.append([a, b], [5, 2], token_ids=[7, 8, 9, 10, 11, 12, 13])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    seq = table.add_sequence(arr([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    want_seq = ref.add_sequence([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert table.num_tokens(seq) == ref.num_tokens(want_seq) == 8
    table.check_invariants()


@pytest.mark.parametrize("dt", DTYPES, ids=ids)
def test_allocator_arguments(dt):
    alloc = PageAllocator(64)
    pages = alloc.allocate(3)
    alloc.incref(pages.astype(dt))
    freed = alloc.decref(pages.astype(dt))
    assert freed.size == 0
    np.testing.assert_array_equal(np.sort(alloc.decref(pages.astype(dt))), np.sort(pages))
    assert alloc.num_free == 64


def test_big_endian_page_one_is_page_one():
    alloc = PageAllocator(4)
    alloc.allocate(4)
    alloc.decref(np.array([1], dtype=">i4"))
    assert alloc.refcount(1) == 0 and alloc.refcount(0) == 1
    with pytest.raises(InvalidPageError, match="page 16777216 out of range"):
        alloc.decref(np.array([16777216], dtype=">i4"))


def test_big_endian_prompt_is_registered_under_its_own_ids():
    table = PageTable(PageAllocator(16), 4, 4, 8, enable_prefix_cache=True)
    prompt = np.array([1, 2, 3, 4, 5], dtype=">i4")
    seq = table.add_sequence(prompt)
    table.append([seq], [5], token_ids=prompt)
    assert table.match_prefix([1, 2, 3, 4, 5]) == 4


@pytest.mark.parametrize("dt", [">i8", np.longlong, np.int64, np.intc, "u2"], ids=ids)
def test_host_slots_any_native_integer(dt):
    slots = check_host_slots(np.array([3, -1, 0], dtype=dt) if np.dtype(dt).kind == "i"
                             else np.array([3, 0], dtype=dt), None, 8)
    assert slots.dtype == np.int64 and slots.dtype.isnative
    assert first_slot_out_of_range(np.array([1, 9], dtype=np.longlong), 8) == 9
    with pytest.raises(TypeError, match="native"):
        first_slot_out_of_range(np.array([1], dtype=">i8"), 8)


def test_append_result_pickles_and_results_are_fresh():
    table = PageTable(PageAllocator(16), 4, 4, 8)
    seq = table.add_sequence()
    r1 = table.append([seq], [1])
    r2 = table.append([seq], [1])
    assert r1.copy_src is not r2.copy_src and r1.copy_dst is not r1.copy_src
    r1.copy_src.resize(4, refcheck=False)   # a caller's own array: harms no later result
    assert table.append([seq], [1]).copy_src.size == 0
    back = pickle.loads(pickle.dumps(r2))
    assert type(back) is type(r2)
    np.testing.assert_array_equal(back.slot_mapping, r2.slot_mapping)


def test_views_are_read_only_for_good():
    table = PageTable(PageAllocator(16), 4, 4, 8)
    for view in (table.block_table, table.seq_lens, table.allocator.refcounts):
        assert not isinstance(view.base, np.ndarray)
        with pytest.raises(ValueError):
            view.flags.writeable = True


def test_scalar_counts_and_flag_types():
    table = PageTable(PageAllocator(16), 4, 4, 8)
    seq = table.add_sequence()
    table.append([seq], np.array(2))

    class Index:
        def __index__(self):
            return 3

    table.append([seq], Index())
    assert table.num_tokens(seq) == 5
    with pytest.raises(TypeError, match="enable_prefix_cache must be a bool"):
        PageTable(PageAllocator(16), 4, 4, 8, enable_prefix_cache="no")
