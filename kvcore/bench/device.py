"""Device benchmark: kvcore's scatter, gather and copy_pages on a CUDA GPU.

Measured in one process against the device-to-device copy ceiling and torch baselines
(``index_copy_``, ``index_put_``, fancy indexing) at the same shapes. Every kvcore
result is checked byte for byte against the NumPy backend before it is timed.

    python benchmarks/bench_device.py --out benchmarks/results/h200.json
    kvcore bench                         # the same from an installed kvcore, with a GPU

Bytes count every byte read plus every byte written, K and V. Device time: CUDA events
around each call, median over iterations. Host time: back-to-back calls from Python,
then one synchronize, divided by the number of calls (what a scheduler loop sees).
"""

from __future__ import annotations

import argparse
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
except ImportError:  # pragma: no cover
    sys.exit("the device benchmark needs CuPy and a CUDA GPU (pip install 'kvcore[cuda13]')")

try:
    import torch
except ImportError:  # the baselines are skipped without torch
    torch = None

HEADS, HEAD_DIM, PAGE = 8, 128, 16


# -- timing ------------------------------------------------------------------------------------

def device_us(fn, iters: int, warmup: int = 5) -> float:
    """Device time of one call, µs: CUDA events around ``iters`` back-to-back calls.

    Events around a single call would also count the host's launch overhead whenever
    the GPU sits idle waiting for it; back to back, the GPU stays busy once a call's
    kernel outlasts its launch, so this is kernel time for large calls and the launch
    rate for small ones (see :func:`graph_us` for those). Median of 3 repeats.
    """
    for _ in range(warmup):
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(3):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3 / iters)
    return statistics.median(times)


def graph_us(fn, calls: int = 20, iters: int = 20) -> float:
    """Device time of one call without host overhead: ``calls`` calls captured in a CUDA
    graph, replayed; median replay time / calls, µs."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn()
        stream.synchronize()
        stream.begin_capture()
        for _ in range(calls):
            fn()
        graph = stream.end_capture()
        graph.launch()
        stream.synchronize()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(iters):
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3 / calls)
    return statistics.median(times)


def host_us(fn, calls: int, repeats: int = 5) -> float:
    """Median over repeats of (time for ``calls`` back-to-back calls + sync) / calls, µs."""
    fn()
    cupy.cuda.get_current_stream().synchronize()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        cupy.cuda.get_current_stream().synchronize()
        out.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return statistics.median(out)


# -- helpers -------------------------------------------------------------------------------------

def make_config(num_pages: int, layers: int = 1) -> kvcore.KVCacheConfig:
    return kvcore.KVCacheConfig(num_layers=layers, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                                page_size=PAGE, num_pages=num_pages, dtype="bfloat16",
                                layout="NHD", max_seqs=512, max_pages_per_seq=4096)


def random_words(rng, shape) -> np.ndarray:
    """Random bfloat16 words of finite, non-zero values."""
    values = (rng.standard_normal(shape).astype(np.float32) + 3.0).view(np.uint32)
    return (values >> 16).astype(np.uint16)


def same_bytes(host: np.ndarray, device) -> bool:
    return bool(np.array_equal(cupy.asnumpy(device).view(np.uint8), host.view(np.uint8)))


def shuffled_cache(config, device, seed):
    """A cache whose free stack is in random order, like one that has served for a while."""
    cache = kvcore.KVCache(config, device=device)
    pages = cache.allocator.allocate(config.num_pages)
    cache.allocator.decref(np.random.default_rng(seed).permutation(pages))
    return cache


def torch_view(array):
    """A torch bfloat16 view of a CuPy uint16 array (zero-copy)."""
    return torch.from_dlpack(array).view(torch.bfloat16)


def row(name, bytes_moved, dev_us, host_call_us, ceiling_tbs=None, note=""):
    tbs = bytes_moved / (dev_us * 1e-6) / 1e12 if bytes_moved else None
    return {"name": name, "bytes": bytes_moved, "device_us": dev_us, "host_us": host_call_us,
            "tb_per_s": tbs,
            "fraction_of_copy": (tbs / ceiling_tbs) if (tbs and ceiling_tbs) else None,
            "note": note}


# -- workloads -------------------------------------------------------------------------------------

def bench_copy_ceiling(iters):
    n = 1 << 30
    src = cupy.empty(n, dtype=cupy.uint8)
    src[...] = 7
    dst = cupy.empty_like(src)
    dev = device_us(lambda: dst.data.copy_from_device_async(src.data, n), iters)
    return row("device-to-device copy, 1 GiB (ceiling)", 2 * n, dev, None)


def bench_scatter(tokens, iters, ceiling, label):
    num_pages = 2 * max(tokens // PAGE, min(tokens, 256)) + 64
    config = make_config(num_pages)
    rng = np.random.default_rng(1)
    gpu = shuffled_cache(config, "cuda", 2)
    cpu = shuffled_cache(config, "cpu", 2)
    batch = min(tokens, 256)
    seqs = [gpu.add_sequence() for _ in range(batch)]
    for _ in seqs:
        cpu.add_sequence()
    counts = np.full(batch, tokens // batch)
    counts[: tokens % batch] += 1
    slots = gpu.append(seqs, counts).slot_mapping
    assert np.array_equal(slots, cpu.append(seqs, counts).slot_mapping)
    k_host = random_words(rng, (tokens, HEADS, HEAD_DIM))
    v_host = random_words(rng, (tokens, HEADS, HEAD_DIM))
    k, v, slots_dev = cupy.asarray(k_host), cupy.asarray(v_host), cupy.asarray(slots)
    cpu.write(0, k_host, v_host, slots)
    gpu.write(0, k, v, slots_dev)
    gpu.synchronize()
    assert same_bytes(cpu.kv, gpu.kv), "scatter differs from the NumPy backend"
    moved = 4 * k_host.nbytes
    rows = [row(f"kvcore write {label}", moved,
                device_us(lambda: gpu.write(0, k, v, slots_dev), iters),
                host_us(lambda: gpu.write(0, k, v, slots_dev), 200), ceiling,
                "device slot_mapping"),
            row(f"kvcore write {label}, CUDA graph replay", moved,
                graph_us(lambda: gpu.write(0, k, v, slots_dev)), None, ceiling,
                "device time without host overhead"),
            row(f"kvcore write {label}, NumPy slot_mapping", moved,
                device_us(lambda: gpu.write(0, k, v, slots), iters),
                host_us(lambda: gpu.write(0, k, v, slots), 200), ceiling,
                "host slots checked, then uploaded")]
    if torch is not None:
        k_flat = torch_view(gpu.k_cache(0)).reshape(-1, HEADS, HEAD_DIM)
        v_flat = torch_view(gpu.v_cache(0)).reshape(-1, HEADS, HEAD_DIM)
        k_t, v_t = torch_view(k), torch_view(v)
        idx = torch.from_dlpack(slots_dev)

        def index_copy():
            k_flat.index_copy_(0, idx, k_t)
            v_flat.index_copy_(0, idx, v_t)

        def index_put():
            k_flat[idx] = k_t
            v_flat[idx] = v_t

        gpu.kv.fill(0)
        index_copy()
        torch.cuda.synchronize()
        assert same_bytes(cpu.kv, gpu.kv), "torch index_copy_ baseline is wrong"
        for name, fn in (("torch index_copy_", index_copy), ("torch index_put_", index_put)):
            rows.append(row(f"{name} {label}", moved, device_us(fn, iters),
                            host_us(fn, 200), ceiling, "K and V: two calls"))
    return rows


def bench_gather(num_seqs, tokens_per_seq, iters, ceiling, label):
    num_pages = 2 * num_seqs * tokens_per_seq // PAGE + 64
    config = make_config(num_pages)
    rng = np.random.default_rng(3)
    gpu = shuffled_cache(config, "cuda", 4)
    cpu = shuffled_cache(config, "cpu", 4)
    seqs = [gpu.add_sequence() for _ in range(num_seqs)]
    for _ in seqs:
        cpu.add_sequence()
    slots = gpu.append(seqs, tokens_per_seq).slot_mapping
    cpu.append(seqs, tokens_per_seq)
    n = slots.size
    k_host = random_words(rng, (n, HEADS, HEAD_DIM))
    v_host = random_words(rng, (n, HEADS, HEAD_DIM))
    cpu.write(0, k_host, v_host, slots)
    gpu.write(0, cupy.asarray(k_host), cupy.asarray(v_host), slots)
    k_ref, v_ref, _ = cpu.gather(0, seqs)
    k_out, v_out, _ = gpu.gather(0, seqs)
    assert same_bytes(k_ref, k_out) and same_bytes(v_ref, v_out), "gather differs from NumPy"
    moved = 4 * k_host.nbytes
    # kernel alone, with the metadata already on the device (what an engine would keep)
    indptr, indices, last = gpu.flashinfer_metadata(seqs)
    lengths = np.where(np.diff(indptr) > 0, (np.diff(indptr) - 1) * PAGE + last, 0)
    token_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    dev_args = [cupy.asarray(a) for a in (indptr, indices, last, token_indptr)]
    total, nnz = int(token_indptr[-1]), int(indptr[-1])

    def kernel_only():
        return gpu.backend.gather(0, *dev_args, total, nnz)

    rows = [row(f"kvcore gather {label}", moved, device_us(kernel_only, iters),
                host_us(kernel_only, 100), ceiling, "device metadata"),
            row(f"kvcore gather {label}, from seq_ids", moved,
                device_us(lambda: gpu.gather(0, seqs), iters),
                host_us(lambda: gpu.gather(0, seqs), 100), ceiling,
                "includes host metadata and its upload")]
    if torch is not None:
        k_pool, v_pool = torch_view(gpu.k_cache(0)), torch_view(gpu.v_cache(0))
        pages_t = torch.from_dlpack(dev_args[1]).long()

        def fancy():
            return k_pool[pages_t].reshape(-1, HEADS, HEAD_DIM), \
                v_pool[pages_t].reshape(-1, HEADS, HEAD_DIM)

        kt, _ = fancy()
        assert bool((kt.view(torch.int16).cpu().numpy().view(np.uint16) == k_ref).all())
        rows.append(row(f"torch fancy index kpool[pages] {label}", moved, device_us(fancy, iters),
                        host_us(fancy, 100), ceiling, "full pages only"))
    return rows


def bench_copy_pages(num_pairs, layers, iters, ceiling, label):
    config = make_config(2 * num_pairs + 64, layers=layers)
    rng = np.random.default_rng(5)
    gpu = kvcore.KVCache(config, device="cuda")
    cpu = kvcore.KVCache(config, device="cpu")
    cpu.kv[...] = random_words(rng, cpu.kv.shape)
    gpu.kv[...] = cupy.asarray(cpu.kv)
    perm = rng.permutation(config.num_pages)
    src, dst = perm[:num_pairs].astype(np.int32), perm[num_pairs:2 * num_pairs].astype(np.int32)
    cpu.copy_pages(src, dst)
    gpu.copy_pages(src, dst)
    gpu.synchronize()
    assert same_bytes(cpu.kv, gpu.kv), "copy_pages differs from NumPy"
    src_dev, dst_dev = cupy.asarray(src), cupy.asarray(dst)
    moved = 2 * num_pairs * config.page_bytes
    rows = [row(f"kvcore copy_pages {label}", moved,
                device_us(lambda: gpu.copy_pages(src_dev, dst_dev), iters),
                host_us(lambda: gpu.copy_pages(src_dev, dst_dev), 100), ceiling, "device ids")]
    if torch is not None:
        kv_t = torch_view(gpu.kv)
        src_t, dst_t = torch.from_dlpack(src_dev).long(), torch.from_dlpack(dst_dev).long()

        def torch_copy():
            kv_t.index_copy_(2, dst_t, kv_t.index_select(2, src_t))

        rows.append(row(f"torch index_select + index_copy_ {label}", moved,
                        device_us(torch_copy, iters), host_us(torch_copy, 100), ceiling,
                        "two kernels"))
    return rows


def main(argv=None, default_out: Path | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out,
                        help="write the figures as JSON here")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args(argv)
    iters = 10 if args.quick else args.iters
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    gpu_name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    ceiling_row = bench_copy_ceiling(iters)
    ceiling = ceiling_row["tb_per_s"]
    rows = [ceiling_row]
    rows += bench_scatter(65536, iters, ceiling, "65,536 tok")
    rows += bench_scatter(256, iters * 4, ceiling, "256 tok (decode)")
    rows += bench_gather(64, 1024, iters, ceiling, "64 x 1,024 tok")
    rows += bench_copy_pages(4096, 1, iters, ceiling, "4,096 pages x 1 layer")
    rows += bench_copy_pages(64, 32, iters, ceiling, "64 pages x 32 layers")

    print(f"\nkvcore {kvcore.__version__} on {gpu_name}: bf16, NHD, page {PAGE}, {HEADS} heads x "
          f"{HEAD_DIM}; bytes = read + write, K and V")
    print(f"{'operation':<58} {'MB':>8} {'device us':>10} {'host us':>9} {'TB/s':>6} "
          f"{'of copy':>8}")
    for r in rows:
        mb = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        host = f"{r['host_us']:.1f}" if r["host_us"] is not None else "-"
        tbs = f"{r['tb_per_s']:.2f}" if r["tb_per_s"] else "-"
        frac = f"{100 * r['fraction_of_copy']:.0f}%" if r["fraction_of_copy"] else "-"
        print(f"{r['name']:<58} {mb:>8} {r['device_us']:>10.1f} {host:>9} {tbs:>6} {frac:>8}")
    payload = {"gpu": gpu_name, "cupy": cupy.__version__,
               "torch": torch.__version__ if torch is not None else None,
               "python": platform.python_version(), "kvcore": kvcore.__version__,
               "date": time.strftime("%Y-%m-%d"), "iters": iters, "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
