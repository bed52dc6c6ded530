"""The pure-Python page hash (kvcore.page_hash) equals the C one bit for bit."""

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcore
import kvcore.page_hash
from kvcore import EVENT_STORED, PageAllocator, PageTable
from kvcore.page_hash import page_hash, prompt_hashes


def stored_hashes(tokens, page_size, namespace=0, algorithm="fast"):
    """The hashes kvcore's index gives the full pages of one prompt (from its events)."""
    pages = len(tokens) // page_size + 2
    table = PageTable(PageAllocator(pages), page_size, 2, pages, enable_prefix_cache=True,
                      prefix_hash=algorithm)
    seq = table.add_sequence(namespace=namespace)
    table.append([seq], [len(tokens)], token_ids=tokens)
    kinds, _, hashes = table.take_events()
    return [int(h) for k, h in zip(kinds, hashes, strict=True) if k == EVENT_STORED]


@settings(max_examples=200, deadline=None)
@given(page_size=st.integers(1, 33), pages=st.integers(0, 5),
       namespace=st.integers(-2**63, 2**63 - 1), algorithm=st.sampled_from(["fast", "sha256"]),
       data=st.data())
def test_python_reference_equals_the_c_hash(page_size, pages, namespace, algorithm, data):
    tokens = data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=pages * page_size + 1,
                                max_size=pages * page_size + page_size))
    assert prompt_hashes(tokens, page_size, namespace, algorithm=algorithm) == stored_hashes(
        tokens, page_size, namespace, algorithm)


def test_the_sha256_identity_is_sha256_as_documented():
    """One page by hand with hashlib: parent digest, namespace, tokens, little-endian."""
    import hashlib
    import struct
    tokens = list(range(7, 23))
    digest = hashlib.sha256(bytes(32) + struct.pack("<q", -5)
                            + struct.pack("<16I", *tokens)).digest()
    second = hashlib.sha256(digest + struct.pack("<q", -5) + struct.pack("<16I", *tokens)).digest()
    want = [int.from_bytes(d[:8], "little") for d in (digest, second)]
    assert stored_hashes(tokens * 2 + [1], 16, -5, "sha256") == want
    assert prompt_hashes(tokens * 2, 16, -5, algorithm="sha256") == want
    # SHA-256's padding needs a second block when the message ends 56 to 63 bytes into
    # one: 4 and 5 tokens (plus the 40-byte header), and 20 and 21.
    for page_size in range(1, 24):
        toks = [*range(page_size), 0]
        assert prompt_hashes(toks, page_size, algorithm="sha256") == stored_hashes(
            toks, page_size, 0, "sha256")


def test_sha256_hits_survive_offload_and_collisions():
    """sha256 identities through the host tier (digests move with entries) and with 4-bit
    hashes (every lookup collides, and is verified exactly)."""
    alloc, host = PageAllocator(6), PageAllocator(8)
    table = PageTable(alloc, 4, 4, 8, enable_prefix_cache=True, host_allocator=host,
                      prefix_hash="sha256", prefix_hash_bits=4)
    tier = kvcore.HostTier(table)
    prompt = list(range(100, 117))
    s = table.add_sequence(prompt)
    table.append([s], [17], token_ids=prompt)
    table.remove(s)
    filler = table.add_sequence()
    table.append([filler], [24])          # evicts the 4 cached pages: offloaded
    _, host_pages = table.take_writebacks()
    tier.finish_writebacks(host_pages, True)
    table.remove(filler)
    assert table.match_prefix(prompt) == 16
    assert table.match_prefix([*prompt[:15], 0, 0]) == 12
    table.check_invariants()


def test_bad_prefix_hash():
    with pytest.raises(ValueError):
        PageTable(PageAllocator(4), 4, 2, 2, enable_prefix_cache=True, prefix_hash="md5")
    with pytest.raises(ValueError):
        prompt_hashes([1, 2], 1, algorithm="md5")
    with pytest.raises(ValueError):
        kvcore.page_hash.page_digest(b"short", [1])
    with pytest.raises(ValueError):
        kvcore.KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4,
                             num_pages=4, prefix_hash="sha1")


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
