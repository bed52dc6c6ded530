"""Every public call against hostile arguments: a typed error, never a crash, and the
state (bookkeeping, prefix cache, pool bytes) exactly as it was."""

import numpy as np
import pytest

from kvcore import (
    CapacityError,
    InvalidPageError,
    KVCache,
    KVCacheConfig,
    OutOfPagesError,
    PageAllocator,
    PageTable,
    RefcountError,
    ShapeError,
    UnknownSequenceError,
)

from ._state import assert_same_state, table_state
from .hostile import (
    ALLOWED_ERRORS,
    BEYOND_INT64,
    BEYOND_INT64_ARRAYS,
    EDGE_ARRAYS,
    EDGE_INTS,
    HOSTILE_ARRAYS,
    HOSTILE_INTS,
    NOT_1D,
    NOT_INT_ARRAYS,
    NOT_INTS,
)


def world():
    table = PageTable(PageAllocator(16), 4, 4, 8, enable_prefix_cache=True)
    seq = table.add_sequence([1, 2, 3, 4, 5])
    table.append([seq], [5], token_ids=[1, 2, 3, 4, 5])
    return table, seq


def snapshot(table):
    return (table_state(table), table.num_cached_pages, table.prefix_stats,
            table.allocator.num_evictable)


TABLE_CALLS = {
    "allocate": lambda t, s, x: t.allocator.allocate(x),
    "refcount": lambda t, s, x: t.allocator.refcount(x),
    "fork": lambda t, s, x: t.fork(x),
    "remove": lambda t, s, x: t.remove(x),
    "num_tokens": lambda t, s, x: t.num_tokens(x),
    "pages": lambda t, s, x: t.pages(x),
    "slot(seq)": lambda t, s, x: t.slot(x, 0),
    "slot(token)": lambda t, s, x: t.slot(s, x),
    "add_sequence(namespace)": lambda t, s, x: t.add_sequence([1, 2], namespace=x),
    "match_prefix(namespace)": lambda t, s, x: t.match_prefix([1, 2], namespace=x),
    "is_active": lambda t, s, x: t.is_active(x),
    "append(count)": lambda t, s, x: t.append([s], x),
}
TABLE_ARRAY_CALLS = {
    "incref": lambda t, s, x: t.allocator.incref(x),
    "decref": lambda t, s, x: t.allocator.decref(x),
    "add_sequence(tokens)": lambda t, s, x: t.add_sequence(x),
    "match_prefix(tokens)": lambda t, s, x: t.match_prefix(x),
    "append(seq_ids)": lambda t, s, x: t.append(x, [1]),
    "append(counts)": lambda t, s, x: t.append([s], x),
    "append(token_ids)": lambda t, s, x: t.append([s], [1], token_ids=x),
    "pages_needed": lambda t, s, x: t.pages_needed(x, 1),
    "flashinfer_metadata": lambda t, s, x: t.flashinfer_metadata(x),
    "block_tables": lambda t, s, x: t.block_tables(x),
}
CASES = [(n, c, x) for n, c in TABLE_CALLS.items() for x in HOSTILE_INTS] + [
    (n, c, x) for n, c in TABLE_ARRAY_CALLS.items() for x in HOSTILE_ARRAYS]


def _is_in(value, values):
    return any(value is v for v in values)


#: The int64 values 2**31, -1 and -2**31 per call: (error for 2**31, error for negatives);
#: None means the value is accepted.
EDGE_INT_ERRORS = {
    "allocate": (OutOfPagesError, ValueError),
    "refcount": (InvalidPageError, InvalidPageError),
    "fork": (UnknownSequenceError, UnknownSequenceError),
    "remove": (UnknownSequenceError, UnknownSequenceError),
    "num_tokens": (UnknownSequenceError, UnknownSequenceError),
    "pages": (UnknownSequenceError, UnknownSequenceError),
    "slot(seq)": (UnknownSequenceError, UnknownSequenceError),
    "slot(token)": (IndexError, IndexError),
    "add_sequence(namespace)": (None, None),
    "match_prefix(namespace)": (None, None),
    "is_active": (None, None),
    "append(count)": (CapacityError, ValueError),
}
#: The array arguments per call: errors for [2**31], np.array([0], dtype=object) and
#: [0] * 9 (nine times page 0, seq 0 or token 0), and for something not 1-D.
EDGE_ARRAY_ERRORS = {
    "incref": (InvalidPageError, None, None, ValueError),
    "decref": (InvalidPageError, None, RefcountError, ValueError),
    "add_sequence(tokens)": (ValueError, None, None, ValueError),
    "match_prefix(tokens)": (ValueError, None, None, ValueError),
    "append(seq_ids)": (UnknownSequenceError, None, ValueError, ValueError),
    "append(counts)": (CapacityError, None, ValueError, ValueError),
    "append(token_ids)": (ValueError, None, ValueError, ValueError),
    "pages_needed": (UnknownSequenceError, None, ValueError, ValueError),
    "flashinfer_metadata": (UnknownSequenceError, None, None, ValueError),
    "block_tables": (UnknownSequenceError, None, None, ValueError),
}


def expected_error(name, value):
    """The one error type a table call must raise for ``value`` (None: accepted)."""
    if name in EDGE_INT_ERRORS:
        if _is_in(value, NOT_INTS):
            return TypeError
        if _is_in(value, BEYOND_INT64):
            return ValueError
        big, negative = EDGE_INT_ERRORS[name]
        return big if value == 2**31 else negative
    big, object_zero, nine_zeros, not_1d = EDGE_ARRAY_ERRORS[name]
    if _is_in(value, NOT_INT_ARRAYS):
        return TypeError
    if _is_in(value, BEYOND_INT64_ARRAYS):
        return ValueError
    if _is_in(value, NOT_1D):
        if value is None and name in ("add_sequence(tokens)", "append(token_ids)"):
            return None   # "no token ids" is a valid value there
        if name == "append(counts)" and np.ndim(value) == 0:
            return TypeError   # a single count for every sequence, and not an integer
        return not_1d
    if isinstance(value, np.ndarray):
        return object_zero
    return big if len(value) == 1 else nine_zeros


@pytest.mark.parametrize(("name", "call", "value"), CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_table_calls(name, call, value):
    table, seq = world()
    before = snapshot(table)
    error = expected_error(name, value)
    if error is None:
        call(table, seq, value)
        # accepted: the bookkeeping must still be consistent unless the call itself was
        # raw allocator use
        if name not in ("allocate", "incref", "decref"):
            table.check_invariants()
        return
    with pytest.raises(error) as info:
        call(table, seq, value)
    assert type(info.value) is error, f"{name}({value!r}) raised {info.value!r}"
    assert snapshot(table)[0][0].tobytes() == before[0][0].tobytes()
    assert_same_state(before[0], snapshot(table)[0])
    assert snapshot(table)[1:] == before[1:]
    table.check_invariants()


CFG = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, num_pages=16,
                    dtype="float16", enable_prefix_cache=True)
KV = np.ones((3, 2, 4), np.float16)
EXTRA_KV = [np.ones((3, 2, 4), np.float32), np.ones((3, 2, 4)), np.ones((3, 2, 5), np.float16),
            np.ones((2, 2, 4), np.float16), np.ones((3, 4), np.float16),
            [0, 1, 64], [0, 1, -2], [0, 1, 2**63 - 1], np.array([0, 1, 2], np.int32)]
CACHE_CALLS = {
    "write(layer)": lambda c, st, s, x: c.write(x, KV, KV, st.slot_mapping),
    "write(k)": lambda c, st, s, x: c.write(0, x, KV, st.slot_mapping),
    "write(v)": lambda c, st, s, x: c.write(0, KV, x, st.slot_mapping),
    "write(slot_mapping)": lambda c, st, s, x: c.write(0, KV, KV, x),
    "gather(layer)": lambda c, st, s, x: c.gather(x, [s]),
    "gather(seq_ids)": lambda c, st, s, x: c.gather(0, x),
    "copy_pages(src)": lambda c, st, s, x: c.copy_pages(x, [5]),
    "copy_pages(dst)": lambda c, st, s, x: c.copy_pages([0], x),
    "k_cache": lambda c, st, s, x: c.k_cache(x),
    "v_cache": lambda c, st, s, x: c.v_cache(x),
}
#: The exact error of each cache call for each group of hostile values (a list where
#: the values of a group differ; None: the value is valid there). Shapes first: a
#: scalar where an array is expected is a ShapeError (a ValueError) for the facade's
#: own array arguments and a ValueError from the bookkeeping (gather's seq_ids).

#: The exact error of each cache call for each group of hostile values (a list where
#: the values of a group differ; None: the value is valid there). Shapes first: a
#: scalar where an array is expected is a ShapeError (a ValueError) for the facade's
#: own array arguments and a ValueError from the bookkeeping (gather's seq_ids).
#: A layer index: integers out of range are IndexError, everything else TypeError.
LAYER_ERRORS = {
    "NOT_INTS": TypeError,
    "BEYOND_INT64": IndexError,
    "EDGE_INTS": IndexError,
    "NOT_INT_ARRAYS": TypeError,
    "BEYOND_INT64_ARRAYS": TypeError,
    "NOT_1D": TypeError,
    "EDGE_ARRAYS": TypeError,
    "EXTRA_KV": TypeError,
}
#: A K or V array: every hostile value is a ShapeError.
KV_ERRORS = dict.fromkeys(LAYER_ERRORS, ShapeError)
#: Host index arrays of the facade (slot_mapping, copy_pages ids): shape first.
HOST_INDEX_ERRORS = {
    "NOT_INTS": ShapeError,
    "BEYOND_INT64": ShapeError,
    "EDGE_INTS": ShapeError,
    "NOT_INT_ARRAYS": TypeError,
    "BEYOND_INT64_ARRAYS": ValueError,
    "NOT_1D": ShapeError,
}
EXPECTED_CACHE_ERRORS = {
    "write(layer)": LAYER_ERRORS,
    "write(k)": KV_ERRORS,
    "write(v)": KV_ERRORS,
    "write(slot_mapping)": {
        **HOST_INDEX_ERRORS,
        "EDGE_ARRAYS": ShapeError,
        "EXTRA_KV": [
            ShapeError, ShapeError, ShapeError, ShapeError, ShapeError, InvalidPageError,
            InvalidPageError, InvalidPageError, None
        ],
    },
    "gather(layer)": LAYER_ERRORS,
    "gather(seq_ids)": {
        "NOT_INTS": ValueError,
        "BEYOND_INT64": ValueError,
        "EDGE_INTS": ValueError,
        "NOT_INT_ARRAYS": TypeError,
        "BEYOND_INT64_ARRAYS": ValueError,
        "NOT_1D": ValueError,
        "EDGE_ARRAYS": [UnknownSequenceError, None, None],
        "EXTRA_KV": [
            ValueError, ValueError, ValueError, ValueError, ValueError, UnknownSequenceError,
            UnknownSequenceError, UnknownSequenceError, UnknownSequenceError
        ],
    },
    "copy_pages(src)": {
        **HOST_INDEX_ERRORS,
        "EDGE_ARRAYS": [InvalidPageError, None, ValueError],
        "EXTRA_KV": [
            ShapeError, ShapeError, ShapeError, ShapeError, ShapeError, ValueError, ValueError,
            ValueError, ValueError
        ],
    },
    "copy_pages(dst)": {
        **HOST_INDEX_ERRORS,
        "EDGE_ARRAYS": [InvalidPageError, ValueError, ValueError],
        "EXTRA_KV": [
            ShapeError, ShapeError, ShapeError, ShapeError, ShapeError, ValueError, ValueError,
            ValueError, ValueError
        ],
    },
    "k_cache": LAYER_ERRORS,
    "v_cache": LAYER_ERRORS,
}


CACHE_GROUPS = {"NOT_INTS": NOT_INTS, "BEYOND_INT64": BEYOND_INT64, "EDGE_INTS": EDGE_INTS,
                "NOT_INT_ARRAYS": NOT_INT_ARRAYS, "BEYOND_INT64_ARRAYS": BEYOND_INT64_ARRAYS,
                "NOT_1D": NOT_1D, "EDGE_ARRAYS": EDGE_ARRAYS, "EXTRA_KV": EXTRA_KV}
CACHE_CASES = []
for _name, _call in CACHE_CALLS.items():
    for _group, _values in CACHE_GROUPS.items():
        _want = EXPECTED_CACHE_ERRORS[_name][_group]
        for _i, _value in enumerate(_values):
            CACHE_CASES.append((_name, _call, _value,
                                _want[_i] if isinstance(_want, list) else _want))


@pytest.mark.parametrize(("name", "call", "value", "error"), CACHE_CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _, _) in enumerate(CACHE_CASES)])
def test_cache_calls(name, call, value, error):
    cache = KVCache(CFG, device="cpu")
    seq = cache.add_sequence()
    step = cache.append([seq], [3])
    cache.kv[...] = 2.0
    before_pool = cache.kv.copy()
    before = snapshot(cache.table)
    if error is None:
        call(cache, step, seq, value)
        cache.check_invariants()
        return
    with pytest.raises(ALLOWED_ERRORS) as info:
        call(cache, step, seq, value)
    assert type(info.value) is error, f"{name}({value!r}) raised {info.value!r}"
    assert np.array_equal(cache.kv.view(np.uint16), before_pool.view(np.uint16)), name
    assert_same_state(before[0], snapshot(cache.table)[0])
    cache.check_invariants()


def test_strided_and_read_only_inputs_are_used_correctly():
    table = PageTable(PageAllocator(16), 4, 4, 8)
    ids = [table.add_sequence() for _ in range(3)]
    seqs = np.array([ids[0], 7, ids[1], 7, ids[2], 7], dtype=np.int64)[::2]
    counts = np.array([1, 9, 2, 9, 3, 9], dtype=np.int32)[::2]
    counts.flags.writeable = False
    result = table.append(seqs, counts)
    assert table.seq_lens[:3].tolist() == [1, 2, 3]
    assert result.slot_mapping.size == 6
