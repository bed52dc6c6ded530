"""Where the host time of a 256-sequence swap goes on CUDA (a diagnosis, not a benchmark).

Times, per call, median of 20: the page table's bookkeeping (``HostTier.swap_out``), the
copy's launch (``CudaBackend.swap_copy``: id upload, kernel, event), the whole
``KVCache.swap_out`` / ``swap_in`` call, and the completion in ``wait`` (releasing the
16,384 pages left behind); then a cProfile of the facade. The pool is tiny (one layer,
head_dim 8): host cost does not depend on page bytes. Output of the H200 run:
``benchmarks/results/h200_logs/profile_swap_host.txt``.

    python benchmarks/profile_swap_host.py
"""

import cProfile
import io
import pstats
import statistics
import time

import numpy as np
import torch

from kvcore import KVCache, KVCacheConfig

SEQS, PAGES_PER_SEQ = 256, 64


def timed(fn) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e3


def main() -> None:
    pages = SEQS * PAGES_PER_SEQ + 64
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, page_size=16,
                        num_pages=pages, dtype="bfloat16", max_seqs=SEQS,
                        max_pages_per_seq=PAGES_PER_SEQ, num_host_pages=pages)
    cache = KVCache(cfg, device="cuda", framework="torch")
    ids = np.array([cache.add_sequence() for _ in range(SEQS)], dtype=np.int64)
    cache.append(ids, PAGES_PER_SEQ * 16)
    tier, backend = cache.host_tier, cache.backend
    stream = torch.cuda.current_stream().cuda_stream
    times: dict[str, list[float]] = {}
    for _ in range(20):
        torch.cuda.synchronize()
        start = time.perf_counter_ns()
        device_pages, host_pages = tier.swap_out(ids)
        middle = time.perf_counter_ns()
        event = backend.swap_copy("out", device_pages, host_pages, stream)
        end = time.perf_counter_ns()
        times.setdefault("bookkeeping", []).append((middle - start) / 1e3)
        times.setdefault("swap_copy", []).append((end - middle) / 1e3)
        backend.wait_transfer(event)
        backend.destroy_event(event)
        tier.finish(ids, True)
        tier.swap_in(ids)
        tier.finish(ids, True)
    for _ in range(20):
        torch.cuda.synchronize()
        times.setdefault("facade swap_out", []).append(timed(lambda: cache.swap_out(ids)))
        times.setdefault("wait (completion)", []).append(timed(cache.wait))
        times.setdefault("facade swap_in", []).append(timed(lambda: cache.swap_in(ids)))
        cache.wait()
    for name, values in times.items():
        print(f"{name:20} median {statistics.median(values):8.1f} us  min {min(values):8.1f}")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(20):
        torch.cuda.synchronize()
        cache.swap_out(ids)
        cache.wait()
        cache.swap_in(ids)
        cache.wait()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())


if __name__ == "__main__":
    main()
