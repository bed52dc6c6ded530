"""Creating and dropping caches in a loop leaks nothing (host: tracemalloc and RSS;
device: CuPy's pool gets every byte back)."""

import gc
import tracemalloc

import numpy as np
import pytest

from kvcore import KVCache, KVCacheConfig, PageAllocator, PageTable

CFG = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, page_size=8, num_pages=256,
                    dtype="float16", max_seqs=16, enable_prefix_cache=True)


def churn(device="cpu"):
    cache = KVCache(CFG, device=device)
    seqs = [cache.add_sequence([1, 2, 3, 4, 5, 6, 7, 8, 9]) for _ in range(4)]
    step = cache.append(seqs, [9 - cache.num_tokens(s) for s in seqs],
                        token_ids=np.tile(np.arange(1, 10), 4)[:sum(
                            9 - cache.num_tokens(s) for s in seqs)])
    kv = cache.from_host(np.ones((step.slot_mapping.size, 2, 16), dtype=np.float16))
    cache.write(0, kv, kv, step.slot_mapping)
    cache.gather(0, seqs)
    cache.fork(seqs[0])
    cache.take_events()
    cache.synchronize()
    for s in seqs:
        cache.remove(s)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_host_memory_is_returned():
    for _ in range(20):
        churn()
    gc.collect()
    tracemalloc.start()
    rss_before = rss_bytes()
    start, _ = tracemalloc.get_traced_memory()
    for _ in range(300):
        churn()
        table = PageTable(PageAllocator(1000), 16, 64, 64, enable_prefix_cache=True)
        del table
    gc.collect()
    end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert end - start < 256 * 1024, f"{end - start} bytes still allocated after 300 caches"
    assert rss_bytes() - rss_before < 16 * 2**20


@pytest.mark.cuda
def test_device_memory_is_returned():
    import cupy

    pool = cupy.get_default_memory_pool()
    churn("cuda")
    gc.collect()
    before = pool.used_bytes()
    for _ in range(50):
        churn("cuda")
    gc.collect()
    assert pool.used_bytes() == before
