"""Device benchmark: kvcore as a torch engine uses it, beside FlashInfer and torch.

Measured in one process: the device-to-device copy ceiling; ``write`` (large and
decode-size) with torch tensors in, against FlashInfer's ``append_paged_kv_cache`` and
torch ``index_copy_``; ``gather`` into given outputs against torch fancy indexing;
``copy_pages`` against ``index_select`` + ``index_copy_``; the host cost of a whole
32-layer decode step, eager and as one CUDA-graph replay; and a breakdown of the
decode ``write``'s host time. CuPy-array rows are kept for comparison with 0.1.0.
Every kvcore result is checked byte for byte against the NumPy backend (and the
peers' results against kvcore's) before it is timed.

    python benchmarks/bench_device.py --out benchmarks/results/h200.json
    kvcore bench                         # the same from an installed kvcore, with a GPU

Bytes count every byte read plus every byte written, K and V. Device time: CUDA events
around back-to-back calls, median of repeats. Host time: back-to-back calls from
Python, then one synchronize, divided by the number of calls (what a scheduler loop
sees). Every timed call gets fresh tensor views (``k_all[i % 2]``), as an engine's
per-layer outputs would be: nothing can be cached on a tensor's identity.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import kvcore

try:
    import cupy
    import torch
except ImportError:  # pragma: no cover
    sys.exit("the device benchmark needs torch, CuPy and a CUDA GPU")

HEADS, HEAD_DIM, PAGE = 8, 128, 16
BF16 = torch.bfloat16


# -- timing ------------------------------------------------------------------------------------

def device_us(fn, iters: int, warmup: int = 5) -> float:
    """Device time of one call, µs: events around ``iters`` back-to-back calls, median
    of 3. For calls whose kernel outlasts its launch this is kernel time; for small
    ones it is the launch rate (see :func:`graph_us`)."""
    for i in range(warmup):
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for i in range(iters):
            fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def graph_us(fn, calls: int = 20, iters: int = 20) -> float:
    """Device time of one call without host overhead: ``calls`` calls captured in a
    torch CUDA graph, replayed; median replay time / calls, µs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def issue_us(fn, steps: int) -> float:
    """Host time to issue one call with the device idle at its start: the device is
    synchronized (untimed) before each call, so no wait on the device is counted; median
    over ``steps`` calls, µs. For calls whose device work outlasts their host work, where
    :func:`host_us` measures the device."""
    fn(0)
    torch.cuda.synchronize()
    out = []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        fn(i)
        out.append((time.perf_counter_ns() - t0) / 1e3)
    torch.cuda.synchronize()
    return statistics.median(out)


def host_us(fn, calls: int, repeats: int = 5) -> float:
    """Median over repeats of (``calls`` back-to-back calls + one sync) / calls, µs."""
    fn(0)
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for i in range(calls):
            fn(i)
        torch.cuda.synchronize()
        out.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return statistics.median(out)


# -- helpers -------------------------------------------------------------------------------------

def make_config(num_pages: int, layers: int = 1, max_seqs: int = 512,
                max_pages_per_seq: int = 4096) -> kvcore.KVCacheConfig:
    return kvcore.KVCacheConfig(num_layers=layers, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                                page_size=PAGE, num_pages=num_pages, dtype="bfloat16",
                                layout="NHD", max_seqs=max_seqs,
                                max_pages_per_seq=max_pages_per_seq)


def random_words(rng, shape) -> np.ndarray:
    """Random bfloat16 words of finite, non-zero values."""
    values = (rng.standard_normal(shape).astype(np.float32) + 3.0).view(np.uint32)
    return (values >> 16).astype(np.uint16)


def to_torch(words: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int16)).cuda().view(BF16)


def host_bytes(device_array) -> np.ndarray:
    if isinstance(device_array, torch.Tensor):
        if device_array.dtype == BF16:
            device_array = device_array.view(torch.int16)
        return device_array.contiguous().cpu().numpy().view(np.uint8)
    return cupy.asnumpy(device_array).view(np.uint8)


def same_bytes(host: np.ndarray, device) -> bool:
    return bool(np.array_equal(host_bytes(device).reshape(-1), host.view(np.uint8).reshape(-1)))


def shuffled_cache(config, device, seed, framework=None):
    """A cache whose free stack is in random order, like one that has served a while."""
    kwargs = {} if device == "cpu" else {"framework": framework}
    cache = kvcore.KVCache(config, device=device, **kwargs)
    pages = cache.allocator.allocate(config.num_pages)
    cache.allocator.decref(np.random.default_rng(seed).permutation(pages))
    return cache


def row(name, bytes_moved, dev_us, host_call_us, ceiling_tbs=None, note=""):
    tbs = bytes_moved / (dev_us * 1e-6) / 1e12 if (bytes_moved and dev_us) else None
    return {"name": name, "bytes": bytes_moved, "device_us": dev_us, "host_us": host_call_us,
            "tb_per_s": tbs,
            "fraction_of_copy": (tbs / ceiling_tbs) if (tbs and ceiling_tbs) else None,
            "note": note}


def flashinfer_module():
    if importlib.util.find_spec("flashinfer") is None:
        return None
    import flashinfer

    return flashinfer


# -- workloads -------------------------------------------------------------------------------------

def bench_copy_ceiling(iters):
    n = 1 << 30
    src = torch.full((n,), 7, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dev = device_us(lambda i: dst.copy_(src), iters)
    return row("device-to-device copy, 1 GiB (ceiling)", 2 * n, dev, None)


def bench_write(num_seqs, tokens_per_seq, iters, ceiling, label, fi):
    """kvcore write (torch and CuPy in), FlashInfer append, torch index_copy_."""
    tokens = num_seqs * tokens_per_seq
    config = make_config(2 * tokens // PAGE + 2 * num_seqs + 64)
    rng = np.random.default_rng(1)
    gpu = shuffled_cache(config, "cuda", 2, "torch")
    cpu = shuffled_cache(config, "cpu", 2)
    seqs = np.array([gpu.add_sequence() for _ in range(num_seqs)], dtype=np.int32)
    for _ in seqs:
        cpu.add_sequence()
    prefix = 5                                       # sequences already hold a few tokens
    gpu.append(seqs, prefix)
    cpu.append(seqs, prefix)
    step = gpu.append(seqs, tokens_per_seq)
    assert np.array_equal(step.slot_mapping, cpu.append(seqs, tokens_per_seq).slot_mapping)
    k_host = random_words(rng, (2, tokens, HEADS, HEAD_DIM))
    v_host = random_words(rng, (2, tokens, HEADS, HEAD_DIM))
    k_all, v_all = to_torch(k_host), to_torch(v_host)
    slots = torch.as_tensor(step.slot_mapping, device="cuda")
    cpu.write(0, k_host[0], v_host[0], step.slot_mapping)
    gpu.write(0, k_all[0], v_all[0], slots)
    gpu.synchronize()
    assert same_bytes(cpu.kv, gpu.kv), "kvcore write differs from the NumPy backend"
    moved = 4 * k_host[0].nbytes
    calls = 200 if tokens <= 4096 else 20

    def kv_write(i):
        gpu.write(0, k_all[i & 1], v_all[i & 1], slots)

    rows = [row(f"kvcore write {label}, torch in", moved, device_us(kv_write, iters),
                host_us(kv_write, calls), ceiling, "device slot_mapping, fresh views"),
            row(f"kvcore write {label}, torch in, CUDA graph", moved, graph_us(kv_write),
                None, ceiling, "device time without host overhead")]
    meta = gpu.step_metadata(max_tokens=tokens, max_batch=num_seqs, block_tables=False)
    meta.update(seqs, step)

    def kv_write_meta(i):
        gpu.write(0, k_all[i & 1], v_all[i & 1], meta)

    rows.append(row(f"kvcore write {label}, torch in, StepMetadata", moved,
                    device_us(kv_write_meta, iters), host_us(kv_write_meta, calls), ceiling,
                    "slots uploaded once per step"))
    # CuPy arrays in, a CuPy cache: the 0.1.0 path, for comparison
    gpu_c = shuffled_cache(config, "cuda", 2, "cupy")
    for _ in seqs:
        gpu_c.add_sequence()
    gpu_c.append(seqs, prefix)
    gpu_c.append(seqs, tokens_per_seq)
    k_c, v_c = cupy.asarray(k_host), cupy.asarray(v_host)
    slots_c = cupy.asarray(step.slot_mapping)
    gpu_c.write(0, k_c[0], v_c[0], slots_c)
    gpu_c.synchronize()
    assert same_bytes(cpu.kv, gpu_c.kv), "kvcore write (CuPy) differs from the NumPy backend"
    k_views = [k_c[0], k_c[1]]
    v_views = [v_c[0], v_c[1]]

    def kv_write_cupy(i):
        gpu_c.write(0, k_views[i & 1], v_views[i & 1], slots_c)

    rows.append(row(f"kvcore write {label}, CuPy in", moved, device_us(kv_write_cupy, iters),
                    host_us(kv_write_cupy, calls), ceiling, "CuPy cache (0.1.0's path)"))
    # peers write into a second torch pool with the same page tables
    peer = shuffled_cache(config, "cuda", 2, "torch")
    for _ in seqs:
        peer.add_sequence()
    peer.append(seqs, prefix)
    peer.append(seqs, tokens_per_seq)
    k_flat = peer.k_cache(0).reshape(-1, HEADS, HEAD_DIM)
    v_flat = peer.v_cache(0).reshape(-1, HEADS, HEAD_DIM)

    def index_copy(i):
        k_flat.index_copy_(0, slots, k_all[i & 1])
        v_flat.index_copy_(0, slots, v_all[i & 1])

    index_copy(0)
    torch.cuda.synchronize()
    assert same_bytes(cpu.kv, peer.kv), "torch index_copy_ baseline is wrong"
    rows.append(row(f"torch index_copy_ {label}", moved, device_us(index_copy, iters),
                    host_us(index_copy, calls), ceiling, "K and V: two calls"))
    if fi is not None:
        peer.kv.zero_()
        indptr, indices, last = peer.flashinfer_metadata(seqs)
        kv_indptr = torch.as_tensor(indptr, device="cuda")
        kv_indices = torch.as_tensor(indices, device="cuda")
        kv_last = torch.as_tensor(last, device="cuda")
        append_indptr = torch.arange(0, tokens + 1, tokens_per_seq, dtype=torch.int32,
                                     device="cuda")
        seq_lens = torch.full((num_seqs,), prefix + tokens_per_seq, dtype=torch.int32,
                              device="cuda")
        batch_idx, positions = fi.get_batch_indices_positions(append_indptr, seq_lens, tokens)
        cache_pair = (peer.k_cache(0), peer.v_cache(0))

        def fi_append(i):
            fi.append_paged_kv_cache(k_all[i & 1], v_all[i & 1], batch_idx, positions,
                                     cache_pair, kv_indices, kv_indptr, kv_last,
                                     kv_layout="NHD")

        fi_append(0)
        torch.cuda.synchronize()
        assert same_bytes(cpu.kv, peer.kv), "FlashInfer's append differs from kvcore's"
        rows.append(row(f"FlashInfer append_paged_kv_cache {label}", moved,
                        device_us(fi_append, iters), host_us(fi_append, calls), ceiling,
                        "torch in, device metadata"))
    return rows


def bench_gather(num_seqs, tokens_per_seq, iters, ceiling, label):
    num_pages = 2 * num_seqs * tokens_per_seq // PAGE + 64
    config = make_config(num_pages)
    rng = np.random.default_rng(3)
    gpu = shuffled_cache(config, "cuda", 4, "torch")
    cpu = shuffled_cache(config, "cpu", 4)
    seqs = np.array([gpu.add_sequence() for _ in range(num_seqs)], dtype=np.int32)
    for _ in seqs:
        cpu.add_sequence()
    slots = gpu.append(seqs, tokens_per_seq).slot_mapping
    cpu.append(seqs, tokens_per_seq)
    n = slots.size
    k_host = random_words(rng, (n, HEADS, HEAD_DIM))
    v_host = random_words(rng, (n, HEADS, HEAD_DIM))
    cpu.write(0, k_host, v_host, slots)
    gpu.write(0, to_torch(k_host), to_torch(v_host), slots)
    k_ref, v_ref, _ = cpu.gather(0, seqs)
    meta = gpu.step_metadata(max_tokens=1, max_batch=num_seqs, max_pages=num_pages,
                             block_tables=False)
    meta.update(seqs)
    outs = [(torch.empty(n, HEADS, HEAD_DIM, dtype=BF16, device="cuda"),
             torch.empty(n, HEADS, HEAD_DIM, dtype=BF16, device="cuda")) for _ in range(2)]
    k_out, v_out, _ = gpu.gather(0, meta, out=outs[0])
    gpu.synchronize()
    assert same_bytes(k_ref, k_out) and same_bytes(v_ref, v_out), "gather differs from NumPy"
    moved = 4 * k_host.nbytes

    def gather_meta(i):
        gpu.gather(0, meta, out=outs[i & 1])

    def gather_ids(i):
        gpu.gather(0, seqs)

    rows = [row(f"kvcore gather {label}, into out", moved, device_us(gather_meta, iters),
                host_us(gather_meta, 100), ceiling, "StepMetadata, caller's outputs"),
            row(f"kvcore gather {label}, from seq_ids", moved, device_us(gather_ids, iters),
                host_us(gather_ids, 100), ceiling, "host metadata + upload + new outputs")]
    k_pool, v_pool = gpu.k_cache(0), gpu.v_cache(0)
    pages_t = torch.as_tensor(gpu.flashinfer_metadata(seqs)[1], device="cuda").long()

    def fancy(i):
        return (k_pool[pages_t].reshape(-1, HEADS, HEAD_DIM),
                v_pool[pages_t].reshape(-1, HEADS, HEAD_DIM))

    kt, _ = fancy(0)
    assert same_bytes(k_ref, kt), "torch fancy-index baseline is wrong"
    rows.append(row(f"torch fancy index kpool[pages] {label}", moved, device_us(fancy, iters),
                    host_us(fancy, 100), ceiling, "full pages only"))
    return rows


def bench_copy_pages(num_pairs, layers, iters, ceiling, label):
    config = make_config(2 * num_pairs + 64, layers=layers)
    rng = np.random.default_rng(5)
    gpu = kvcore.KVCache(config, device="cuda", framework="torch")
    cpu = kvcore.KVCache(config, device="cpu")
    cpu.kv[...] = random_words(rng, cpu.kv.shape)
    gpu.backend.fill_bytes(gpu.kv, cpu.kv)
    perm = rng.permutation(config.num_pages)
    src, dst = perm[:num_pairs].astype(np.int32), perm[num_pairs:2 * num_pairs].astype(np.int32)
    cpu.copy_pages(src, dst)
    gpu.copy_pages(src, dst)
    gpu.synchronize()
    assert same_bytes(cpu.kv, gpu.kv), "copy_pages differs from NumPy"
    src_t, dst_t = torch.as_tensor(src, device="cuda"), torch.as_tensor(dst, device="cuda")
    moved = 2 * num_pairs * config.page_bytes
    rows = [row(f"kvcore copy_pages {label}", moved,
                device_us(lambda i: gpu.copy_pages(src_t, dst_t), iters),
                host_us(lambda i: gpu.copy_pages(src_t, dst_t), 100), ceiling, "device ids")]
    kv_t = gpu.kv
    src_l, dst_l = src_t.long(), dst_t.long()

    def torch_copy(i):
        kv_t.index_copy_(2, dst_l, kv_t.index_select(2, src_l))

    rows.append(row(f"torch index_select + index_copy_ {label}", moved,
                    device_us(torch_copy, iters), host_us(torch_copy, 100), ceiling,
                    "two kernels"))
    return rows


def bench_decode_step(layers=32, batch=256, steps=50):
    """Host cost of one whole decode step: append 1 token to each of ``batch`` sequences,
    update the step metadata (one upload), write K and V of ``layers`` layers; eager,
    and with the writes captured in one torch CUDA graph."""
    config = make_config(16384, layers=layers, max_seqs=batch, max_pages_per_seq=256)
    cache = kvcore.KVCache(config, device="cuda", framework="torch")
    seqs = np.array([cache.add_sequence() for _ in range(batch)], dtype=np.int32)
    cache.append(seqs, 64)
    meta = cache.step_metadata(max_tokens=batch, max_batch=batch)
    k_in = torch.randn(layers, batch, HEADS, HEAD_DIM, device="cuda").to(BF16)
    v_in = torch.randn(layers, batch, HEADS, HEAD_DIM, device="cuda").to(BF16)

    def writes():
        for layer in range(layers):
            cache.write(layer, k_in[layer], v_in[layer], meta)

    def eager(i):
        meta.update(seqs, cache.append(seqs, 1))
        writes()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        writes()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        writes()

    def replay(i):
        meta.update(seqs, cache.append(seqs, 1))
        graph.replay()

    def bookkeeping(i):
        meta.update(seqs, cache.append(seqs, 1))

    # Host cost to issue a step (device idle at its start), and the wall time of steps
    # back to back (bounded by the device when its work outlasts the host's).
    return [row(f"{layers}-layer decode step, {batch} seqs, eager", None,
                host_us(eager, steps), issue_us(eager, steps), None,
                "append + metadata upload + 32 writes; device_us column = wall per step"),
            row(f"{layers}-layer decode step, {batch} seqs, graph replay", None,
                host_us(replay, steps), issue_us(replay, steps), None,
                "append + metadata upload + replay; device_us column = wall per step"),
            row(f"  of which append + metadata upload, {batch} seqs", None, None,
                issue_us(bookkeeping, steps), None, "")]


def bench_write_breakdown():
    """Where the host time of one decode-size write goes (torch in, StepMetadata)."""
    config = make_config(1024)
    cache = kvcore.KVCache(config, device="cuda", framework="torch")
    seqs = np.array([cache.add_sequence() for _ in range(256)], dtype=np.int32)
    step = cache.append(seqs, 1)
    meta = cache.step_metadata(max_tokens=256, max_batch=256)
    meta.update(seqs, step)
    k_all = torch.randn(2, 256, HEADS, HEAD_DIM, device="cuda").to(BF16)
    backend = cache.backend
    fast = backend.scatter_fast_path
    stream = backend.current_stream()
    scatter = backend._launcher("scatter", 16)
    k0 = k_all[0]
    args = (k0.data_ptr(), k0.data_ptr(), HEADS * HEAD_DIM * 2 // 16, HEAD_DIM * 2 // 16,
            HEADS * HEAD_DIM * 2 // 16, HEAD_DIM * 2 // 16, meta.slot_ptr,
            backend._k_ptrs[0], backend._v_ptrs[0], 256)
    noop = torch.empty(0, device="cuda")
    parts = [
        ("fresh view k_all[i % 2] (the benchmark's own cost)", lambda i: k_all[i & 1]),
        ("current-stream lookup", lambda i: backend.current_stream()),
        ("cuLaunchKernel through KernelLauncher, fixed args",
         lambda i: scatter(64, 256, stream, *args)),
        ("C hot path: read + check k, v + launch", lambda i: fast.write(
            0, k_all[i & 1], k_all[i & 1], None, meta.slot_ptr, 256, stream)),
        ("KVCache.write(layer, k, v, meta)",
         lambda i: cache.write(0, k_all[i & 1], k_all[i & 1], meta)),
        ("torch: an empty in-place op (launch overhead reference)", lambda i: noop.add_(1)),
    ]
    return [row(f"breakdown: {name}", None, None, host_us(fn, 2000), None, "")
            for name, fn in parts]


def main(argv=None, default_out: Path | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out,
                        help="write the figures as JSON here")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args(argv)
    iters = 10 if args.quick else args.iters
    gpu_name = torch.cuda.get_device_name()
    fi = flashinfer_module()
    ceiling_row = bench_copy_ceiling(iters)
    ceiling = ceiling_row["tb_per_s"]
    rows = [ceiling_row]
    rows += bench_write(64, 1024, iters, ceiling, "64 x 1,024 tok", fi)
    rows += bench_write(256, 1, iters * 4, ceiling, "256 tok (decode)", fi)
    rows += bench_gather(64, 1024, iters, ceiling, "64 x 1,024 tok")
    rows += bench_copy_pages(4096, 1, iters, ceiling, "4,096 pages x 1 layer")
    rows += bench_copy_pages(64, 32, iters, ceiling, "64 pages x 32 layers")
    rows += bench_decode_step()
    rows += bench_write_breakdown()

    by_name = {r["name"]: r for r in rows}

    def ratio(a, b, key):
        ra, rb = by_name.get(a), by_name.get(b)
        if not ra or not rb or not ra[key] or not rb[key]:
            return None
        return rb[key] / ra[key]

    ratios = {
        "large write: FlashInfer device time / kvcore": ratio(
            "kvcore write 64 x 1,024 tok, torch in",
            "FlashInfer append_paged_kv_cache 64 x 1,024 tok", "device_us"),
        "large write: torch index_copy_ device time / kvcore": ratio(
            "kvcore write 64 x 1,024 tok, torch in", "torch index_copy_ 64 x 1,024 tok",
            "device_us"),
        "decode write: FlashInfer host time / kvcore": ratio(
            "kvcore write 256 tok (decode), torch in",
            "FlashInfer append_paged_kv_cache 256 tok (decode)", "host_us"),
        "decode write: torch index_copy_ host time / kvcore": ratio(
            "kvcore write 256 tok (decode), torch in", "torch index_copy_ 256 tok (decode)",
            "host_us"),
        "gather: torch fancy index device time / kvcore": ratio(
            "kvcore gather 64 x 1,024 tok, into out",
            "torch fancy index kpool[pages] 64 x 1,024 tok", "device_us"),
    }
    print(f"\nkvcore {kvcore.__version__} on {gpu_name}: bf16, NHD, page {PAGE}, {HEADS} heads x "
          f"{HEAD_DIM}; bytes = read + write, K and V; torch {torch.__version__}, FlashInfer "
          f"{getattr(fi, '__version__', 'absent')}")
    print(f"{'operation':<64} {'MB':>8} {'device us':>10} {'host us':>9} {'TB/s':>6} "
          f"{'of copy':>8}")
    for r in rows:
        mb = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        dev = f"{r['device_us']:.1f}" if r["device_us"] is not None else "-"
        host = f"{r['host_us']:.1f}" if r["host_us"] is not None else "-"
        tbs = f"{r['tb_per_s']:.2f}" if r["tb_per_s"] else "-"
        frac = f"{100 * r['fraction_of_copy']:.0f}%" if r["fraction_of_copy"] else "-"
        print(f"{r['name']:<64} {mb:>8} {dev:>10} {host:>9} {tbs:>6} {frac:>8}")
    print()
    for name, value in ratios.items():
        print(f"{name:<58} {value:.2f}x" if value else f"{name:<58} -")
    payload = {"gpu": gpu_name, "cupy": cupy.__version__, "torch": torch.__version__,
               "flashinfer": getattr(fi, "__version__", None),
               "python": platform.python_version(), "kvcore": kvcore.__version__,
               "date": time.strftime("%Y-%m-%d"), "iters": iters, "rows": rows,
               "ratios": ratios}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
