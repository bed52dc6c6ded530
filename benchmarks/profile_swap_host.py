"""Where the host time of a 256-sequence swap goes on CUDA: bookkeeping, the copy's launch, the facade, completion (a diagnosis; output in benchmarks/results/h200_logs/profile_swap_host.txt)."""
import cProfile
import io
import pstats
import statistics
import time

import numpy as np
import torch

from kvcore import KVCache, KVCacheConfig

cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, page_size=16,
                    num_pages=256 * 64 + 64, dtype="bfloat16", max_seqs=256,
                    max_pages_per_seq=64, num_host_pages=256 * 64 + 64)
cache = KVCache(cfg, device="cuda", framework="torch")
ids = np.array([cache.add_sequence() for _ in range(256)], dtype=np.int64)
cache.append(ids, 1024)
stream = torch.cuda.current_stream()

def parts():
    tier = cache.host_tier
    out = {}
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter_ns(); d, h = tier.swap_out(ids); t1 = time.perf_counter_ns()
        ev = cache.backend.swap_copy("out", d, h, stream.cuda_stream); t2 = time.perf_counter_ns()
        cache.backend.wait_transfer(ev); cache.backend.destroy_event(ev); tier.finish(ids, True)
        d, h = tier.swap_in(ids); tier.finish(ids, True)
        out.setdefault("bookkeeping", []).append((t1 - t0) / 1e3)
        out.setdefault("swap_copy", []).append((t2 - t1) / 1e3)
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter_ns(); t = cache.swap_out(ids); t1 = time.perf_counter_ns()
        cache.wait(); t2 = time.perf_counter_ns()
        t = cache.swap_in(ids); t3 = time.perf_counter_ns(); cache.wait()
        out.setdefault("facade swap_out", []).append((t1 - t0) / 1e3)
        out.setdefault("poll/wait finish", []).append((t2 - t1) / 1e3)
        out.setdefault("facade swap_in", []).append((t3 - t2) / 1e3)
    for k, v in out.items():
        print(f"{k:20} median {statistics.median(v):8.1f} us  min {min(v):8.1f}")

parts()
pr = cProfile.Profile()
pr.enable()
for _ in range(20):
    torch.cuda.synchronize()
    cache.swap_out(ids); cache.wait(); cache.swap_in(ids); cache.wait()
pr.disable()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue())
