import numpy as np
import pytest

from kvcore import InvalidPageError, KVCoreError, OutOfPagesError, PageAllocator, RefcountError


def test_fresh_allocator_hands_out_pages_in_order():
    alloc = PageAllocator(8)
    assert (alloc.num_pages, alloc.num_free, alloc.num_used) == (8, 8, 0)
    pages = alloc.allocate(3)
    assert pages.dtype == np.int32
    np.testing.assert_array_equal(pages, [0, 1, 2])
    assert (alloc.num_free, alloc.num_used) == (5, 3)
    np.testing.assert_array_equal(alloc.refcounts, [1, 1, 1, 0, 0, 0, 0, 0])
    alloc.check_invariants()


def test_single_page_allocate_and_free_like_the_rust_kvcache():
    alloc = PageAllocator(2)
    (page,) = alloc.allocate(1)
    assert alloc.refcount(page) == 1
    np.testing.assert_array_equal(alloc.decref([page]), [page])
    assert alloc.num_free == 2
    alloc.check_invariants()


def test_free_stack_is_lifo():
    alloc = PageAllocator(4)
    alloc.allocate(4)
    alloc.decref([2])
    alloc.decref([0])
    np.testing.assert_array_equal(alloc.allocate(2), [0, 2])


def test_allocate_zero_and_all():
    alloc = PageAllocator(5)
    assert alloc.allocate(0).shape == (0,)
    assert len(alloc.allocate(5)) == 5
    assert alloc.num_free == 0


def test_out_of_pages_reports_and_changes_nothing():
    alloc = PageAllocator(4)
    alloc.allocate(3)
    before = alloc.refcounts.copy()
    with pytest.raises(OutOfPagesError, match="requested 2 pages but only 1 are free") as info:
        alloc.allocate(2)
    assert (info.value.requested, info.value.available) == (2, 1)
    assert isinstance(info.value, MemoryError)
    np.testing.assert_array_equal(alloc.refcounts, before)
    assert alloc.num_free == 1
    np.testing.assert_array_equal(alloc.allocate(1), [3])


def test_incref_decref_counts_and_frees_at_zero():
    alloc = PageAllocator(4)
    alloc.allocate(2)
    alloc.incref([0, 0, 1])
    assert alloc.refcount(0) == 3 and alloc.refcount(1) == 2
    assert alloc.decref([0, 1]).tolist() == []
    assert alloc.decref([1, 0]).tolist() == [1]
    assert alloc.decref([0]).tolist() == [0]
    assert alloc.num_free == 4
    alloc.check_invariants()


def test_decref_duplicates_free_once():
    alloc = PageAllocator(4)
    alloc.allocate(1)
    alloc.incref([0])
    np.testing.assert_array_equal(alloc.decref([0, 0]), [0])
    assert alloc.num_free == 4
    alloc.check_invariants()


@pytest.mark.parametrize("pages", [[0, 0], [1, 2], [0, 3]])
def test_double_free_is_detected_and_changes_nothing(pages):
    alloc = PageAllocator(4)
    alloc.allocate(2)
    before = alloc.refcounts.copy()
    with pytest.raises(RefcountError, match="double free"):
        alloc.decref(pages)
    np.testing.assert_array_equal(alloc.refcounts, before)
    assert alloc.num_free == 2
    alloc.check_invariants()
    np.testing.assert_array_equal(alloc.allocate(2), [2, 3])


def test_incref_of_free_page_is_refused():
    alloc = PageAllocator(4)
    alloc.allocate(1)
    with pytest.raises(RefcountError, match="incref of free page 1"):
        alloc.incref([0, 1])
    assert alloc.refcount(0) == 1


@pytest.mark.parametrize("bad", [-1, 4, 2**31, 2**40])
def test_page_ids_out_of_range(bad):
    alloc = PageAllocator(4)
    alloc.allocate(4)
    for call in (alloc.incref, alloc.decref):
        with pytest.raises(InvalidPageError, match=rf"page {bad} out of range \[0, 4\)"):
            call([0, bad])
    with pytest.raises(InvalidPageError):
        alloc.refcount(bad)
    np.testing.assert_array_equal(alloc.refcounts, [1, 1, 1, 1])


def test_argument_types():
    alloc = PageAllocator(4)
    with pytest.raises(TypeError, match="n must be an integer"):
        alloc.allocate(1.0)
    with pytest.raises(TypeError, match="got bool"):
        alloc.allocate(True)
    with pytest.raises(ValueError, match="n must be >= 0"):
        alloc.allocate(-1)
    alloc.allocate(2)
    with pytest.raises(TypeError, match="pages must hold integers"):
        alloc.decref([0.0])
    with pytest.raises(TypeError, match="pages must hold integers"):
        alloc.decref(np.array([True]))
    with pytest.raises(ValueError, match="pages must be 1-D"):
        alloc.decref([[0]])
    # any integer dtype, lists and tuples
    alloc.incref(np.array([0], dtype=np.uint8))
    alloc.incref((1,))
    alloc.decref(np.array([0, 1], dtype=np.int16))
    assert alloc.refcounts.tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("bad", [0, -3])
def test_constructor_validates(bad):
    with pytest.raises(ValueError, match="num_pages must be in"):
        PageAllocator(bad)


def test_refcounts_view_is_read_only_and_live():
    alloc = PageAllocator(3)
    view = alloc.refcounts
    with pytest.raises(ValueError):
        view[0] = 5
    alloc.allocate(1)
    assert view[0] == 1
    del alloc
    assert view.tolist() == [1, 0, 0]  # the view keeps its memory alive


def test_check_invariants_passes_on_fresh_and_is_a_kvcore_error_type():
    PageAllocator(16).check_invariants()
    assert issubclass(RefcountError, KVCoreError)
