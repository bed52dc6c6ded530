"""The pure-Python page hash (kvcore.page_hash) equals the C one bit for bit."""

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcore.page_hash
from kvcore import EVENT_STORED, PageAllocator, PageTable
from kvcore.page_hash import page_hash, prompt_hashes


def stored_hashes(tokens, page_size, namespace=0):
    """The hashes kvcore's index gives the full pages of one prompt (from its events)."""
    pages = len(tokens) // page_size + 2
    table = PageTable(PageAllocator(pages), page_size, 2, pages, enable_prefix_cache=True)
    seq = table.add_sequence(namespace=namespace)
    table.append([seq], [len(tokens)], token_ids=tokens)
    kinds, _, hashes = table.take_events()
    return [int(h) for k, h in zip(kinds, hashes, strict=True) if k == EVENT_STORED]


@settings(max_examples=200, deadline=None)
@given(page_size=st.integers(1, 33), pages=st.integers(0, 5),
       namespace=st.integers(-2**63, 2**63 - 1),
       data=st.data())
def test_python_reference_equals_the_c_hash(page_size, pages, namespace, data):
    tokens = data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=pages * page_size + 1,
                                max_size=pages * page_size + page_size))
    assert prompt_hashes(tokens, page_size, namespace) == stored_hashes(tokens, page_size,
                                                                         namespace)


def test_a_router_predicts_the_hit_length():
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 32000, 100).tolist()
    table = PageTable(PageAllocator(32), 16, 4, 16, enable_prefix_cache=True)
    seq = table.add_sequence()
    table.append([seq], [len(prompt)], token_ids=prompt)
    published = {int(h) for h in table.take_events()[2]}
    query = [*prompt[:70], 1, 2, 3]
    predicted = 0
    for h in prompt_hashes(query, 16):
        if h not in published:
            break
        predicted += 16
    assert predicted == table.match_prefix(query) == 64


def test_namespaces_and_parents_change_the_hash():
    page = list(range(16))
    assert page_hash(0, page) != page_hash(0, page, namespace=1)
    assert page_hash(0, page) != page_hash(1, page)
    assert page_hash(0, page, namespace=-1) == page_hash(0, page, namespace=2**64 - 1)


def test_bad_page_size():
    with pytest.raises(ValueError):
        prompt_hashes([1, 2, 3], 0)


def test_doctests():
    assert doctest.testmod(kvcore.page_hash).failed == 0
