"""Hostile arguments to the layer-group calls (docs/groups.md): ``truncate``, every
``group=`` argument, and the validation of LayerGroup, KVCacheConfig(layer_groups=...)
and PageTable(groups=...). Each must raise one typed error and change nothing."""

import numpy as np
import pytest

from kvcore import (
    CapacityError,
    KVCacheConfig,
    LayerGroup,
    PageAllocator,
    PageTable,
    RollbackError,
    UnknownSequenceError,
)

from ._groups_model import assert_unchanged, group_state
from .hostile import (
    ALLOWED_ERRORS,
    BEYOND_INT64,
    BEYOND_INT64_ARRAYS,
    EDGE_ARRAYS,
    EDGE_INTS,
    NOT_1D,
    NOT_INT_ARRAYS,
    NOT_INTS,
    Index,
)

GROUPS = [LayerGroup(), LayerGroup(window=6), LayerGroup(window=3)]


def world():
    """A prefix-caching table of three groups; seq 0 holds 9 tokens (window columns all
    live, so truncating it to any length in [0, 9] is allowed), seq 1 holds 14 tokens
    with released window columns."""
    table = PageTable(PageAllocator(40), 4, 4, 8, groups=GROUPS, enable_prefix_cache=True)
    s = table.add_sequence(list(range(9)))
    table.append([s], [5], token_ids=list(range(5)))
    table.append([s], [4], token_ids=list(range(5, 9)))
    u = table.add_sequence()
    table.append([u], [10])
    table.append([u], [4])
    assert s == 0 and table.first_page(s, group=1) == 0 and table.first_page(s, group=2) == 0
    assert table.first_page(u, group=1) == 1 and table.first_page(u, group=2) == 2
    return table, s


def _is_in(value, values):
    return any(value is v for v in values)


def _check_refused(table, call, errors):
    before = group_state(table)
    with pytest.raises(ALLOWED_ERRORS) as info:
        call()
    assert type(info.value) in errors, f"raised {info.value!r}, expected {errors}"
    assert_unchanged(before, group_state(table))
    table.check_invariants()


# -- truncate -------------------------------------------------------------------------------

def truncate_seq_ids_error(value):
    """truncate(value, [1]) on world(): the allowed error types (empty: accepted)."""
    if _is_in(value, NOT_INT_ARRAYS):
        return {TypeError}
    if _is_in(value, BEYOND_INT64_ARRAYS) or _is_in(value, NOT_1D):
        return {ValueError}
    big, object_zero, nine_zeros = EDGE_ARRAYS
    if value is big:
        return {UnknownSequenceError}
    if value is object_zero:
        return set()        # seq 0 to 1 token
    assert value is nine_zeros
    return {ValueError}     # nine seq ids, one length (and duplicates)


def truncate_lengths_error(value):
    """truncate([0], value) on world(): the allowed error types (empty: accepted)."""
    if _is_in(value, NOT_INT_ARRAYS):
        return {TypeError}
    if _is_in(value, BEYOND_INT64_ARRAYS):
        return {ValueError}
    if _is_in(value, NOT_1D):
        # one length for every sequence may or may not be accepted; either way it is no
        # integer (TypeError) or not 1-D (ValueError)
        return {TypeError, ValueError} if np.ndim(value) == 0 else {ValueError}
    big, object_zero, nine_zeros = EDGE_ARRAYS
    if value is big:
        return {ValueError}  # longer than the sequence
    if value is object_zero:
        return set()        # truncate to 0
    assert value is nine_zeros
    return {ValueError}     # nine lengths, one seq id


TRUNCATE_CASES = (
    [("seq_ids", v, truncate_seq_ids_error(v)) for v in
     NOT_INT_ARRAYS + BEYOND_INT64_ARRAYS + NOT_1D + EDGE_ARRAYS]
    + [("num_tokens", v, truncate_lengths_error(v)) for v in
       NOT_INT_ARRAYS + BEYOND_INT64_ARRAYS + NOT_1D + EDGE_ARRAYS])


@pytest.mark.parametrize(("arg", "value", "errors"), TRUNCATE_CASES,
                         ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(TRUNCATE_CASES)])
def test_truncate_hostile_arrays(arg, value, errors):
    table, s = world()
    call = ((lambda: table.truncate(value, [1])) if arg == "seq_ids"
            else (lambda: table.truncate([s], value)))
    if not errors:
        call()
        table.check_invariants()
        return
    _check_refused(table, call, errors)


@pytest.mark.parametrize(("seq_ids", "lens", "error"), [
    ([3], [0], UnknownSequenceError),            # never started
    ([-1], [0], UnknownSequenceError),
    ([4], [0], UnknownSequenceError),            # = max_seqs
    ([0, 7], [1, 0], UnknownSequenceError),
    ([0, 0], [3, 3], ValueError),                # duplicate
    ([0, 1, 0], [3, 12, 2], ValueError),
    ([0], [-1], ValueError),
    ([0], [10], ValueError),                     # one more than it holds
    ([0, 1], [9, 15], ValueError),
    ([0], [2**31], ValueError),
    ([0], [], ValueError),                       # lengths differ
    ([0, 1], [3], ValueError),
    ([], [3], ValueError),
    ([0], [1, 2], ValueError),
    ([1], [8], RollbackError),                   # 8 - 3 + 1 = 6 < 2 * 4: window 3 needs it
    ([0, 1], [0, 0], RollbackError),             # the first is fine, the second is not
    ([1, 0], [9, 4], RollbackError),             # window 3 needs 9 - 3 + 1 >= 2 * 4
])
def test_truncate_refusals(seq_ids, lens, error):
    table, _ = world()
    _check_refused(table, lambda: table.truncate(seq_ids, lens), {error})


def test_truncate_removed_sequence_is_unknown():
    table, s = world()
    table.remove(s)
    _check_refused(table, lambda: table.truncate([s], [0]), {UnknownSequenceError})


def test_truncate_edge_values_that_work():
    table, s = world()
    table.truncate([], [])                       # nothing to do
    table.truncate(np.array([], np.int64), np.array([], np.int32))
    table.truncate([s], [9])                     # to its own length: nothing changes
    assert table.num_tokens(s) == 9
    table.truncate([Index(s)], [Index(7)])
    table.truncate((np.int64(s),), (np.int32(6),))
    assert table.num_tokens(s) == 6
    table.check_invariants()


@pytest.mark.parametrize("dt", [">i4", ">i8", "<i2", ">i2", "u1", "u4", ">u8", np.intc])
def test_truncate_any_integer_dtype_means_the_same(dt):
    ref, s = world()
    table, _ = world()
    table.truncate(np.array([1, s], dtype=dt), np.array([12, 5], dtype=dt))
    ref.truncate([1, s], [12, 5])
    assert_unchanged(group_state(ref), group_state(table))
    table.check_invariants()


def test_truncate_read_only_and_strided_arrays():
    ref, s = world()
    table, _ = world()
    seqs = np.array([s, 9, 1, 9], np.int64)[::2]
    lens = np.array([4, 99, 11, 99], np.int32)[::2]
    seqs.flags.writeable = False
    table.truncate(seqs, lens)
    ref.truncate([s, 1], [4, 11])
    assert_unchanged(group_state(ref), group_state(table))


# -- group= ---------------------------------------------------------------------------------

GROUP_CALLS = {
    "first_page": lambda t, s, g: t.first_page(s, group=g),
    "pages": lambda t, s, g: t.pages(s, group=g),
    "slot": lambda t, s, g: t.slot(s, 8, group=g),
    "flashinfer_metadata": lambda t, s, g: t.flashinfer_metadata([s], group=g),
    "block_tables": lambda t, s, g: t.block_tables([s], group=g),
    "group_block_table": lambda t, s, g: t.group_block_table(g),
}


def group_error(value):
    if _is_in(value, NOT_INTS):
        return {TypeError}
    if _is_in(value, BEYOND_INT64):
        return {IndexError, ValueError}   # out of range either way; int64 conversion may say so
    return {IndexError}


GROUP_CASES = [(n, c, v) for n, c in GROUP_CALLS.items()
               for v in [*NOT_INTS, *BEYOND_INT64, *EDGE_INTS, 3, 4, -3, np.int64(3)]]


@pytest.mark.parametrize(("name", "call", "value"), GROUP_CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(GROUP_CASES)])
def test_group_argument_hostile(name, call, value):
    table, s = world()
    _check_refused(table, lambda: call(table, s, value), group_error(value))


@pytest.mark.parametrize("name", list(GROUP_CALLS))
def test_group_argument_integer_likes(name):
    table, s = world()
    call = GROUP_CALLS[name]
    for g in range(3):
        want = call(table, s, g)
        for like in (np.int64(g), np.int32(g), np.uint8(g), Index(g)):
            got = call(table, s, like)
            for x, y in zip(np.atleast_1d(got) if not isinstance(got, tuple) else got,
                            np.atleast_1d(want) if not isinstance(want, tuple) else want,
                            strict=True):
                np.testing.assert_array_equal(x, y)


def test_group_default_is_group_zero():
    table, s = world()
    assert table.first_page(s) == table.first_page(s, group=0)
    np.testing.assert_array_equal(table.pages(s), table.pages(s, group=0))
    np.testing.assert_array_equal(table.block_table, table.group_block_table(0))
    assert table.slot(s, 3) == table.slot(s, 3, group=0)


def test_slot_of_a_released_token():
    table, _ = world()
    # seq 1 released window-3 columns 0 and 1: its tokens 0..7 are no longer mapped there
    before = group_state(table)
    try:
        got = table.slot(1, 0, group=2)
    except IndexError:
        pass
    else:
        assert got == -1, got     # padding, if not an IndexError
    assert_unchanged(before, group_state(table))
    assert table.slot(1, 0, group=0) >= 0
    assert table.slot(1, 8, group=2) == table.pages(1, group=2)[0] * 4


def test_unknown_sequences_in_group_calls():
    table, _ = world()
    for call in (lambda: table.first_page(3, group=1), lambda: table.pages(3, group=1),
                 lambda: table.slot(3, 0, group=1),
                 lambda: table.flashinfer_metadata([0, 3], group=1),
                 lambda: table.block_tables([3], group=2)):
        _check_refused(table, call, {UnknownSequenceError})


# -- LayerGroup, KVCacheConfig(layer_groups=...), PageTable(groups=...) ----------------------

def config(groups, num_layers=4, **kw):
    return KVCacheConfig(num_layers=num_layers, num_kv_heads=2, head_dim=4, page_size=4,
                         num_pages=16, layer_groups=groups, **kw)


@pytest.mark.parametrize(("make_groups", "error"), [
    (lambda: [LayerGroup((0, 1)), LayerGroup((2,), window=4)], ValueError),      # 3 missing
    (lambda: [LayerGroup((0, 1, 2)), LayerGroup((2, 3), window=4)], ValueError),  # 2 twice
    (lambda: [LayerGroup((0, 0, 1, 2, 3))], ValueError),
    (lambda: [LayerGroup((0, 1, 2, 3, 4))], ValueError),                        # no layer 4
    (lambda: [LayerGroup((-1, 0, 1, 2, 3))], ValueError),
    (lambda: [LayerGroup((0, 1, 2, 3)), LayerGroup((4,), window=2)], ValueError),
    (lambda: [], ValueError),
    (lambda: [LayerGroup((0, 1.0, 2, 3))], TypeError),
    (lambda: [LayerGroup((0, True, 2, 3))], TypeError),
    (lambda: [LayerGroup((0, "1", 2, 3))], TypeError),
    (lambda: [LayerGroup((0, 1, 2, 3), window=0)], ValueError),
    (lambda: [LayerGroup((0, 1, 2, 3), window=-4)], ValueError),
    (lambda: [LayerGroup((0, 1, 2, 3), window=2.5)], TypeError),
    (lambda: [LayerGroup((0, 1, 2, 3), window=True)], TypeError),
    (lambda: [LayerGroup((0, 1, 2, 3), window="4")], TypeError),
    (lambda: [LayerGroup((0, 1, 2, 3), state_pages=-1)], ValueError),
    (lambda: [LayerGroup((0, 1, 2, 3), state_pages=1.0)], TypeError),
    (lambda: [LayerGroup((0, 1, 2, 3), state_pages=True)], TypeError),
    (lambda: [LayerGroup((0, 1, 2, 3), window=4, state_pages=1)], ValueError),
    (lambda: [LayerGroup((0, 1)), (2, 3)], TypeError),                          # not a group
    (lambda: [LayerGroup((0, 1)), None], TypeError),
    (lambda: LayerGroup((0, 1, 2, 3)), TypeError),                              # not a list
])
def test_config_layer_groups_validation(make_groups, error):
    with pytest.raises(ALLOWED_ERRORS) as info:
        config(make_groups())
    assert type(info.value) is error, repr(info.value)


@pytest.mark.parametrize(("make_groups", "error"), [
    (lambda: [], ValueError),
    (lambda: [LayerGroup(window=0)], ValueError),
    (lambda: [LayerGroup(), LayerGroup(window=-1)], ValueError),
    (lambda: [LayerGroup(state_pages=-2)], ValueError),
    (lambda: [LayerGroup(window=3, state_pages=2)], ValueError),
    (lambda: [LayerGroup(window=1.5)], TypeError),
    (lambda: [LayerGroup(), "full"], TypeError),
    (lambda: [LayerGroup(), 3], TypeError),
    (lambda: LayerGroup(), TypeError),
    (lambda: 5, TypeError),
])
def test_page_table_groups_validation(make_groups, error):
    alloc = PageAllocator(16)
    with pytest.raises(ALLOWED_ERRORS) as info:
        PageTable(alloc, 4, 4, 4, groups=make_groups(), enable_prefix_cache=True)
    assert type(info.value) is error, repr(info.value)
    # nothing attached to the allocator: another prefix-caching table may use it
    PageTable(alloc, 4, 4, 4, enable_prefix_cache=True)
    assert alloc.num_free == 16


def test_page_table_ignores_group_layers():
    table = PageTable(PageAllocator(16), 4, 4, 4,
                      groups=[LayerGroup((5, 9)), LayerGroup((0,), window=2)])
    assert table.num_groups == 2 and [g.kind for g in table.groups] == ["full", "window"]


def test_groups_tuple_and_generator_are_accepted():
    for groups in ((LayerGroup(), LayerGroup(window=2)),
                   (g for g in [LayerGroup(), LayerGroup(window=2)])):
        try:
            table = PageTable(PageAllocator(16), 4, 4, 4, groups=groups)
        except TypeError:
            continue   # a generator may be refused, but then as a TypeError
        assert table.num_groups == 2


@pytest.mark.parametrize("value", [*NOT_INTS])
def test_config_layer_lookups_refuse_non_integers(value):
    cfg = config([LayerGroup((0, 2)), LayerGroup((1, 3), window=4)])
    for call in (cfg.layer_slot, cfg.layer_group):
        with pytest.raises(TypeError):
            call(value)


@pytest.mark.parametrize("value", [4, -1, 2**31, -(2**31)])
def test_config_layer_lookups_refuse_out_of_range(value):
    cfg = config([LayerGroup((0, 2)), LayerGroup((1, 3), window=4)])
    for call in (cfg.layer_slot, cfg.layer_group):
        with pytest.raises(IndexError):
            call(value)


def test_prefix_cache_with_a_state_group_config_is_refused():
    with pytest.raises(ValueError):
        config([LayerGroup((0, 1)), LayerGroup((2, 3), state_pages=1)],
               enable_prefix_cache=True)


def test_failed_append_with_groups_changes_nothing():
    table, s = world()
    before = group_state(table)
    with pytest.raises(CapacityError):
        table.append([s, 1], [1, 32], token_ids=[0] * 33)     # seq 1 past 8 pages
    assert_unchanged(before, group_state(table))
    with pytest.raises(ValueError):
        table.append([s, 1], [1, 1], token_ids=[0])           # token ids too short
    assert_unchanged(before, group_state(table))
    with pytest.raises(UnknownSequenceError):
        table.pages_needed([s, 3], [1, 1])
    assert_unchanged(before, group_state(table))


@pytest.mark.parametrize("value", NOT_INTS)
def test_layer_group_integers_refuse_non_integers(value):
    makers = [lambda: LayerGroup((0,), state_pages=value), lambda: LayerGroup((0, value))]
    if value is not None:            # window=None is full attention
        makers.append(lambda: LayerGroup((0,), window=value))
    for make in makers:
        with pytest.raises(TypeError):
            make()


def test_truncate_one_length_for_every_sequence():
    ref, s = world()
    table, _ = world()
    for t in (ref, table):
        assert t.fork(s) == 2
    table.truncate([s, 2], 5)
    ref.truncate([s, 2], [5, 5])
    assert_unchanged(group_state(ref), group_state(table))
    _check_refused(table, lambda: table.truncate([s, 2], 6), {ValueError})
    _check_refused(table, lambda: table.truncate([s, 2], -1), {ValueError})
    _check_refused(table, lambda: table.truncate([s, 2], 1.0), {TypeError})
    _check_refused(table, lambda: table.truncate([s, 1], 5), {RollbackError})
