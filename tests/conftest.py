import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "long", max_examples=5000, stateful_step_count=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("KVCORE_HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip `cuda`-marked tests unless CuPy sees a GPU."""
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    from kvcore.backends import cuda_available

    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


# -- factories shared by the test files (fixtures, not per-file helpers) ---------------------

@pytest.fixture
def make_table():
    """``make_table(num_pages=64, page_size=16, max_seqs=8, max_pages_per_seq=8)``: a
    PageTable over a fresh PageAllocator, prefix caching off."""
    from kvcore import PageAllocator, PageTable

    def make(num_pages=64, page_size=16, max_seqs=8, max_pages_per_seq=8):
        return PageTable(PageAllocator(num_pages), page_size, max_seqs, max_pages_per_seq)

    return make


@pytest.fixture
def make_prefix_table():
    """``make_prefix_table(num_pages=32, page_size=4, max_seqs=8, max_pages=16, **kw)``: a
    prefix-caching PageTable (``kw`` such as ``prefix_hash_bits`` pass through)."""
    from kvcore import PageAllocator, PageTable

    def make(num_pages=32, page_size=4, max_seqs=8, max_pages=16, **kw):
        return PageTable(PageAllocator(num_pages), page_size, max_seqs, max_pages,
                         enable_prefix_cache=True, **kw)

    return make


@pytest.fixture
def make_cache():
    """``make_cache(layout="NHD", dtype="float32", page_size=4, num_pages=16, heads=2,
    head_dim=3, layers=2)``: a CPU KVCache with 8 sequence slots."""
    from kvcore import KVCache, KVCacheConfig

    def make(layout="NHD", dtype="float32", page_size=4, num_pages=16, heads=2, head_dim=3,
             layers=2):
        cfg = KVCacheConfig(num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
                            page_size=page_size, num_pages=num_pages, dtype=dtype,
                            layout=layout, max_seqs=8)
        return KVCache(cfg, device="cpu")

    return make


@pytest.fixture
def prefill():
    """``prefill(table, tokens, namespace=0) -> (seq, cached)``: add a sequence the way a
    scheduler does (look its prompt up, then append the rest with its token ids)."""
    def run(table, tokens, namespace=0):
        seq = table.add_sequence(tokens, namespace=namespace)
        cached = table.num_tokens(seq)
        table.append([seq], [len(tokens) - cached], token_ids=tokens[cached:])
        return seq, cached

    return run
