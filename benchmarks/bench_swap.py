"""Host-tier swap benchmark: moving whole sequences between the device pool and pinned
host memory, each way, with every mechanism measured in one process on the same bytes.

Workload: sequences of 1,024 tokens of a 32-layer model with 8 KV heads x 128, bf16,
NHD, page 16: 64 pages per sequence, 2 MiB per page (32 layers x K and V x 32 KiB).
The target is 256 sequences (32 GiB each way), the default: it needs 32 GiB of pinned
host memory (the host tier, allocated whole; about 19 s to pin and zero on the lent
H200 machine) and about 97 GiB of device memory (pool, a reference copy, a scratch
buffer); ``--seqs`` takes fewer where that does not fit.

Mechanisms, each way (``out`` = device to host, ``in`` = host to device):

(a) per-segment ``cudaMemcpyAsync`` from a Python loop, one call per page per layer
    slot per K/V (32 KiB each), as vLLM v0 swapped blocks; on ``--baseline-pages``
    pages (the full set takes minutes);
(b) the ceiling: one contiguous ``cudaMemcpyAsync`` of the same bytes between a device
    buffer and the pinned host tier;
(c) kvcore: ``CudaBackend.swap_copy``, one kernel launch that reads or writes the mapped
    host memory (through ``cache.backend``, as :meth:`KVCache.swap_out` calls it), plus
    a sweep of its grid size;
(d) ``cudaMemcpyBatchAsync`` (CUDA >= 12.8, called through ctypes on the process's own
    libcudart, with the signature of its version), one batch of the 32 KiB segments;
    and a page-contiguous device staging buffer (one torch gather kernel + one
    ``cudaMemcpyAsync``; the host pages must then be contiguous, so it uses host pages
    ``0 .. n-1``).
(e) the facade: host-side cost of ``cache.swap_out(all seq ids)`` (everything before it
    returns) when :meth:`KVCache.swap_out` exists.

Bytes: each byte crosses PCIe once, so GB/s = bytes moved one way / time (1 GB = 1e9
bytes), comparable with the pinned-copy figure of BENCH.md. Device time: CUDA events
on a side stream around one swap, median of ``--repeats``. Every mechanism is checked
before it is timed: with the host tier poisoned, a swap-out must leave each host page
equal to its device page (compared on the device after one bulk copy back), and with
the device pages poisoned, the swap-in must restore the original pool exactly.

    python benchmarks/bench_swap.py --out benchmarks/results/swap_h200.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import kvcore
from kvcore.backends.cuda_backend import _SWAP_BLOCKS_PER_SM
from kvcore.bench.device import HEAD_DIM, HEADS, PAGE

try:
    import cupy
    import torch
except ImportError:  # pragma: no cover
    sys.exit("the swap benchmark needs torch, CuPy and a CUDA GPU")

LAYERS, TOKENS_PER_SEQ = 32, 1024
PAGES_PER_SEQ = TOKENS_PER_SEQ // PAGE
_H2D, _D2H = 1, 2                    # cudaMemcpyKind
_POISON = 0x5A5A                     # an int16 pattern no random pool is made of
_CHECK_PAGES = 256                   # pages per comparison chunk (bounds temporaries)


# -- timing ------------------------------------------------------------------------------------

def event_ms(fn, stream, repeats: int) -> list[float]:
    """Device time of ``fn()`` (which enqueues on ``stream``), ms, once per repeat:
    events recorded on ``stream`` around it."""
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def host_call_us(fn, stream, repeats: int) -> float:
    """Host time of the call ``fn()`` alone (the device idle at its start), µs, median."""
    out = []
    for _ in range(repeats):
        stream.synchronize()
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e3)
    stream.synchronize()
    return statistics.median(out)


def row(name, direction, nbytes, times_ms, ceiling=None, host_us=None, note=""):
    device_ms = statistics.median(times_ms) if times_ms else None
    gbs = nbytes / (device_ms * 1e-3) / 1e9 if device_ms else None
    return {"name": name, "direction": direction, "bytes": nbytes,
            "device_us": device_ms * 1e3 if device_ms else None,
            "device_us_all": [t * 1e3 for t in times_ms] if times_ms else None,
            "gb_per_s": gbs, "fraction_of_ceiling": gbs / ceiling if gbs and ceiling else None,
            "host_us": host_us, "note": note}


# -- the workload ------------------------------------------------------------------------------

class Workload:
    """A 32-layer torch cache with a host tier of ``seqs * 64`` pages, random pool bytes,
    a reference copy of them, a scratch device buffer of the host tier's size, and the
    page pairs of one swap of every sequence (random device pages, random host pages)."""

    def __init__(self, seqs: int, seed: int = 0):
        self.pages = seqs * PAGES_PER_SEQ
        config = kvcore.KVCacheConfig(
            num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, page_size=PAGE,
            num_pages=self.pages + PAGES_PER_SEQ, dtype="bfloat16", layout="NHD",
            max_seqs=seqs, max_pages_per_seq=PAGES_PER_SEQ, num_host_pages=self.pages)
        self.config = config
        t0 = time.perf_counter()
        self.cache = kvcore.KVCache(config, device="cuda", framework="torch")
        self.build_s = time.perf_counter() - t0     # mostly pinning the host tier
        self.backend = self.cache.backend
        self.stream = torch.cuda.Stream()
        self.handle = self.stream.cuda_stream
        self.kv = self.cache.kv.view(torch.int16)    # compare bits, never bf16 values
        self.kv.random_()                             # [0, 2**15): never all zeros
        self.ref = self.kv.clone()
        self.host = self.backend.host_kv
        self.host_ptr = self.host.ctypes.data
        self.nbytes = self.pages * config.page_bytes
        self.scratch = torch.empty(self.nbytes // 2, dtype=torch.int16, device="cuda")
        self.scratch_pages = self.scratch.view(config.host_pool_shape)
        rng = np.random.default_rng(seed)
        self.device_pages = rng.permutation(config.num_pages)[:self.pages].astype(np.int32)
        self.host_pages = rng.permutation(self.pages).astype(np.int32)
        self.chunk = config.page_elems * config.itemsize      # 32 KiB: one slot's K or V
        torch.cuda.synchronize()

    # device and host addresses of the 32 KiB segments of page pairs (kvcore's own pool:
    # [slots, 2, P, page]; the host tier: [H, slots, 2, page])
    def segments(self, device_pages, host_pages):
        cfg = self.config
        pools = np.arange(2 * cfg.num_slots, dtype=np.uint64)          # slot * 2 + kv
        d = np.asarray(device_pages, dtype=np.uint64)[:, None]
        h = np.asarray(host_pages, dtype=np.uint64)[:, None]
        dev = np.uint64(self.kv.data_ptr()) + (pools[None, :] * np.uint64(cfg.num_pages) + d) \
            * np.uint64(self.chunk)
        host = np.uint64(self.host_ptr) + (h * np.uint64(2 * cfg.num_slots) + pools[None, :]) \
            * np.uint64(self.chunk)
        return dev.reshape(-1), host.reshape(-1)

    def bulk(self, direction: str, nbytes: int | None = None) -> None:
        """One contiguous copy between the scratch buffer and the host tier."""
        nbytes = self.nbytes if nbytes is None else nbytes
        if direction == "out":
            cupy.cuda.runtime.memcpyAsync(self.host_ptr, self.scratch.data_ptr(), nbytes,
                                          _D2H, self.handle)
        else:
            cupy.cuda.runtime.memcpyAsync(self.scratch.data_ptr(), self.host_ptr, nbytes,
                                          _H2D, self.handle)

    def check(self, swap, device_pages, host_pages, label: str) -> None:
        """``swap(direction)`` moves ``device_pages`` <-> ``host_pages`` exactly, both ways.

        Out: the host tier is poisoned first; every host page must then equal its device
        page (the tier is copied back in bulk and compared on the device). In: the
        device pages are poisoned first; the pool must then equal the original.
        """
        d_t = torch.as_tensor(device_pages, device="cuda").long()
        h_t = torch.as_tensor(host_pages, device="cuda").long()
        with torch.cuda.stream(self.stream):
            self.kv.copy_(self.ref)
            self.scratch.fill_(_POISON)
            self.bulk("out")
        swap("out")
        self.bulk("in")
        self.stream.synchronize()
        for s in range(0, d_t.numel(), _CHECK_PAGES):
            got = self.scratch_pages.index_select(0, h_t[s:s + _CHECK_PAGES])
            want = self.ref.index_select(2, d_t[s:s + _CHECK_PAGES]).permute(2, 0, 1, 3, 4, 5)
            if not torch.equal(got, want):
                raise AssertionError(f"{label}: swap-out left wrong bytes in the host tier")
        with torch.cuda.stream(self.stream):
            self.kv.index_fill_(2, d_t, _POISON)
        swap("in")
        self.stream.synchronize()
        for s in range(0, d_t.numel(), _CHECK_PAGES):
            idx = d_t[s:s + _CHECK_PAGES]
            if not torch.equal(self.kv.index_select(2, idx), self.ref.index_select(2, idx)):
                raise AssertionError(f"{label}: swap-in did not restore the pool")
        for slot in range(self.config.num_slots):     # slot by slot: bounded temporaries
            if not torch.equal(self.kv[slot], self.ref[slot]):
                raise AssertionError(f"{label}: the round trip changed pages it did not move")
        if self.backend.synchronize(self.handle):
            raise AssertionError(f"{label}: a kernel raised the error word")


# -- mechanisms ----------------------------------------------------------------------------------

def kvcore_swap(w: Workload, device_pages, host_pages):
    def swap(direction):
        event = w.backend.swap_copy(direction, device_pages, host_pages, w.handle)
        w.backend.destroy_event(event)      # released once it completes
    return swap


def kvcore_swap_grid(w: Workload, blocks: int):
    """The swap kernel with a given grid (tuning sweep; the backend's launch otherwise)."""
    backend = w.backend
    launch = backend._launcher("swap_pages", backend._swap_width)
    n = w.device_pages.size

    def swap(direction):
        (d_ptr, h_ptr), keep = backend.uploader.upload([w.device_pages, w.host_pages],
                                                       w.handle)
        launch(blocks, backend._swap_block, w.handle, d_ptr, h_ptr, n,
               1 if direction == "out" else 0)
        del keep
    return swap


def per_segment(w: Workload, device_pages, host_pages):
    """vLLM v0's swap: one cudaMemcpyAsync per page per layer slot per K/V, from Python."""
    dev, host = w.segments(device_pages, host_pages)
    dev, host = dev.tolist(), host.tolist()
    memcpy = cupy.cuda.runtime.memcpyAsync
    chunk, handle = w.chunk, w.handle

    def swap(direction):
        if direction == "out":
            for d, h in zip(dev, host, strict=True):
                memcpy(h, d, chunk, _D2H, handle)
        else:
            for d, h in zip(dev, host, strict=True):
                memcpy(d, h, chunk, _H2D, handle)
    return swap


def staging(w: Workload, device_pages, staging_buffer):
    """Gather the pages into a page-major device buffer, then one copy (host pages
    0 .. n-1); the reverse for swap-in."""
    idx = torch.as_tensor(device_pages, device="cuda").long()
    n = idx.numel()
    pages_major = w.kv.permute(2, 0, 1, 3, 4, 5)          # [P, slots, 2, page] view
    buffer = staging_buffer[:n]
    nbytes = n * w.config.page_bytes

    def swap(direction):
        with torch.cuda.stream(w.stream):
            if direction == "out":
                torch.index_select(pages_major, 0, idx, out=buffer)
                cupy.cuda.runtime.memcpyAsync(w.host_ptr, buffer.data_ptr(), nbytes, _D2H,
                                              w.handle)
            else:
                cupy.cuda.runtime.memcpyAsync(buffer.data_ptr(), w.host_ptr, nbytes, _H2D,
                                              w.handle)
                pages_major.index_copy_(0, idx, buffer)
    return swap


# -- cudaMemcpyBatchAsync through ctypes ---------------------------------------------------------

class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _MemLocation),
                ("dstLocHint", _MemLocation), ("flags", ctypes.c_uint)]


_ACCESS_ORDER_STREAM = 1           # cudaMemcpySrcAccessOrderStream
_LOCATION_DEVICE, _LOCATION_HOST = 1, 2


def loaded_cudart():
    """``(library, path, version)`` of the CUDA runtime this process uses, or
    ``(None, reason, None)``. The library mapped into the process (torch's) comes
    first, so the signature chosen matches the runtime that runs it."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "libcudart.so" in os.path.basename(path) and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    paths += ["libcudart.so.13", "libcudart.so.12", ctypes.util.find_library("cudart")]
    for path in filter(None, paths):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        version = ctypes.c_int()
        if library.cudaRuntimeGetVersion(ctypes.byref(version)) != 0:
            continue
        return library, path, version.value
    return None, "no libcudart could be loaded", None


def batch_copy(w: Workload, device_pages, host_pages):
    """``(swap, note)``: ``cudaMemcpyBatchAsync`` of every 32 KiB segment, or
    ``(None, reason)`` when it cannot be reached cleanly."""
    library, path, version = loaded_cudart()
    if library is None:
        return None, path
    if version < 12080:
        return None, f"{path} is CUDA runtime {version}, older than 12.8"
    function = getattr(library, "cudaMemcpyBatchAsync", None)
    if function is None:
        return None, f"{path} (runtime {version}) has no cudaMemcpyBatchAsync"
    p, size = ctypes.c_void_p, ctypes.c_size_t
    # 12.8 / 12.9 return the index of a failing copy (failIdx); 13.0 dropped it.
    with_fail_index = version < 13000
    function.argtypes = ([p, p, p, size, p, p, size] + ([p] if with_fail_index else [])
                         + [p])
    function.restype = ctypes.c_int
    dev, host = w.segments(device_pages, host_pages)
    sizes = np.full(dev.size, w.chunk, dtype=np.uint64)
    device_id = torch.cuda.current_device()
    attributes = {}
    for direction, src, dst in (("out", _LOCATION_DEVICE, _LOCATION_HOST),
                                ("in", _LOCATION_HOST, _LOCATION_DEVICE)):
        attributes[direction] = _MemcpyAttributes(
            _ACCESS_ORDER_STREAM, _MemLocation(src, device_id if src == 1 else 0),
            _MemLocation(dst, device_id if dst == 1 else 0), 0)
    index = (ctypes.c_size_t * 1)(0)
    fail_index = ctypes.c_size_t(0)

    def swap(direction):
        dsts, srcs = (host, dev) if direction == "out" else (dev, host)
        args = [dsts.ctypes.data, srcs.ctypes.data, sizes.ctypes.data, dsts.size,
                ctypes.addressof(attributes[direction]), ctypes.addressof(index), 1]
        if with_fail_index:
            args.append(ctypes.addressof(fail_index))
        status = function(*args, w.handle)
        if status != 0:
            raise RuntimeError(f"cudaMemcpyBatchAsync returned {status}")

    note = (f"{os.path.basename(path)}, runtime {version // 1000}.{version % 1000 // 10}, "
            f"{dev.size} segments of {w.chunk // 1024} KiB in one call")
    return swap, note


# -- the facade ----------------------------------------------------------------------------------

def bench_facade_swap_out(w: Workload, seqs: int, repeats: int):
    """Host-side cost of ``cache.swap_out(all seq ids)`` (everything before it returns:
    the page table's bookkeeping, the id upload, the launch, the event), and the wall
    time of swap-out + wait and swap-in + wait, on a fresh cache state.

    Returns rows, or a reason string when the facade (``KVCache.swap_out``) is absent.
    """
    cache = w.cache
    if not all(hasattr(cache, name) for name in ("swap_out", "swap_in", "wait")):
        return "KVCache.swap_out / swap_in / wait not present in this build"
    ids = np.array([cache.add_sequence() for _ in range(seqs)], dtype=np.int64)
    cache.append(ids, TOKENS_PER_SEQ)
    nbytes = seqs * PAGES_PER_SEQ * w.config.page_bytes
    host_out, host_in, wall_out, wall_in = [], [], [], []
    for _ in range(repeats):
        for direction, host_times, wall_times in (("out", host_out, wall_out),
                                                  ("in", host_in, wall_in)):
            w.stream.synchronize()
            t0 = time.perf_counter_ns()
            call = cache.swap_out if direction == "out" else cache.swap_in
            transfer = call(ids, stream=w.stream)
            t1 = time.perf_counter_ns()
            finished = cache.wait()
            t2 = time.perf_counter_ns()
            if transfer.status != "done" or transfer not in finished:
                raise AssertionError(f"facade swap-{direction} did not finish: {transfer!r}")
            host_times.append((t1 - t0) / 1e3)
            wall_times.append((t2 - t0) / 1e6)
    rows = []
    for direction, host_times, wall_times in (("out", host_out, wall_out),
                                              ("in", host_in, wall_in)):
        rows.append(row(f"(e) KVCache.swap_{direction}({seqs} seqs) + wait, wall", direction,
                        nbytes, wall_times, host_us=statistics.median(host_times),
                        note="host_us: the call alone, until it returns"))
    return rows


# -- main ------------------------------------------------------------------------------------------

def save(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256,
                        help="sequences of 1,024 tokens swapped (256 = the 32 GiB target)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-pages", type=int, default=512,
                        help="pages timed for the per-segment cudaMemcpyAsync loop")
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                        help="blocks per SM tried for the swap kernel")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "swap_h200.json")
    args = parser.parse_args(argv)
    repeats = args.repeats
    w = Workload(args.seqs)
    gpu_name = torch.cuda.get_device_name()
    sms = w.backend.num_sms
    rows, sweep, skipped = [], [], {}
    subset = min(args.baseline_pages, w.pages)
    payload = {"gpu": gpu_name, "cupy": cupy.__version__, "torch": torch.__version__,
               "python": platform.python_version(), "kvcore": kvcore.__version__,
               "date": time.strftime("%Y-%m-%d"), "repeats": repeats,
               "workload": {"seqs": args.seqs, "tokens_per_seq": TOKENS_PER_SEQ,
                            "layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM,
                            "page_size": PAGE, "dtype": "bfloat16", "layout": "NHD",
                            "pages": w.pages, "page_bytes": w.config.page_bytes,
                            "bytes_each_way": w.nbytes, "baseline_pages": subset},
               "cache_build_s": w.build_s, "num_sms": sms, "rows": rows,
               "kernel_grid_sweep": sweep, "skipped": skipped}
    gib = w.nbytes / 2**30
    print(f"{args.seqs} seqs x {TOKENS_PER_SEQ} tokens = {w.pages} pages of "
          f"{w.config.page_bytes >> 20} MiB = {gib:.1f} GiB each way; cache with its "
          f"pinned host tier built in {w.build_s:.1f} s", flush=True)

    # (b) the ceiling: one contiguous copy of the same bytes
    ceiling = {}
    for direction in ("out", "in"):
        w.bulk(direction)
        times = event_ms(lambda d=direction: w.bulk(d), w.stream, repeats)
        r = row("(b) one cudaMemcpyAsync, contiguous (ceiling)", direction, w.nbytes, times,
                note="device buffer <-> the pinned host tier")
        ceiling[direction] = r["gb_per_s"]
        rows.append(r)

    # (c) kvcore's kernel through the backend
    kernel = kvcore_swap(w, w.device_pages, w.host_pages)
    w.check(kernel, w.device_pages, w.host_pages, "kvcore swap_copy")
    for direction in ("out", "in"):
        times = event_ms(lambda d=direction: kernel(d), w.stream, repeats)
        host = host_call_us(lambda d=direction: kernel(d), w.stream, 3)
        rows.append(row("(c) kvcore swap_copy, one kernel", direction, w.nbytes, times,
                        ceiling[direction], host,
                        f"{min(w.pages * 2 * w.config.num_slots, _SWAP_BLOCKS_PER_SM * sms)} "
                        f"blocks of "
                        f"{w.backend._swap_block} threads, {w.backend._swap_width}-byte "
                        "vectors; host_us: the call"))
    save(args.out, payload)
    for per_sm in args.sweep:
        swap = kvcore_swap_grid(w, per_sm * sms)
        for direction in ("out", "in"):
            swap(direction)
            times = event_ms(lambda d=direction, s=swap: s(d), w.stream, max(3, repeats // 2))
            sweep.append(row(f"    swap kernel, {per_sm} block(s) per SM", direction,
                             w.nbytes, times, ceiling[direction]))
    if w.backend.synchronize(w.handle):
        raise AssertionError("the swap kernel raised the error word during the sweep")

    # (a) per-segment copies from Python, on a subset
    base = per_segment(w, w.device_pages[:subset], w.host_pages[:subset])
    w.check(base, w.device_pages[:subset], w.host_pages[:subset], "per-segment memcpy")
    sub_bytes = subset * w.config.page_bytes
    for direction in ("out", "in"):
        times = event_ms(lambda d=direction: base(d), w.stream, max(3, repeats // 2))
        rows.append(row("(a) cudaMemcpyAsync per 32 KiB segment, Python loop", direction,
                        sub_bytes, times, ceiling[direction],
                        note=f"{subset} pages ({subset * 2 * w.config.num_slots} calls), "
                        "vLLM v0's swap"))

    # (d) page-contiguous staging: one gather kernel + one bulk copy (host pages 0..n-1)
    save(args.out, payload)
    contiguous_host = np.arange(w.pages, dtype=np.int32)
    stage = staging(w, w.device_pages, w.scratch_pages)
    try:
        w.check(stage, w.device_pages, contiguous_host, "staging buffer")
        for direction in ("out", "in"):
            times = event_ms(lambda d=direction: stage(d), w.stream, repeats)
            rows.append(row("(d) device staging buffer + one cudaMemcpyAsync", direction,
                            w.nbytes, times, ceiling[direction],
                            note="torch index_select / index_copy_ + bulk copy; "
                            "host pages contiguous"))
    except Exception as exc:   # out of device memory, say: report it as skipped
        skipped["staging buffer"] = f"it failed: {exc!r}"
        torch.cuda.synchronize()
        w.kv.copy_(w.ref)

    # (e) the facade
    try:
        facade = bench_facade_swap_out(w, args.seqs, repeats)
    except Exception as exc:   # the facade is being written alongside
        facade = f"it failed: {exc!r}"
    if isinstance(facade, str):
        skipped["KVCache.swap_out"] = facade
        print(f"(e) facade skipped: {facade}")
    else:
        for r in facade:
            r["fraction_of_ceiling"] = (r["gb_per_s"] / ceiling[r["direction"]]
                                        if r["gb_per_s"] else None)
        rows += facade

    save(args.out, payload)     # before the batch API, which is reached through ctypes

    # (d) cudaMemcpyBatchAsync, last
    try:
        batch, note = batch_copy(w, w.device_pages, w.host_pages)
    except Exception as exc:   # report, do not stop the benchmark
        batch, note = None, f"setting it up failed: {exc!r}"
    if batch is not None:
        try:
            w.check(batch, w.device_pages, w.host_pages, "cudaMemcpyBatchAsync")
            for direction in ("out", "in"):
                times = event_ms(lambda d=direction: batch(d), w.stream, repeats)
                host = host_call_us(lambda d=direction: batch(d), w.stream, 3)
                rows.append(row("(d) cudaMemcpyBatchAsync, 32 KiB segments", direction,
                                w.nbytes, times, ceiling[direction], host,
                                note + "; host_us: the call"))
        except Exception as exc:   # report it as skipped
            note = f"it failed: {exc!r}"
            batch = None
    if batch is None:
        skipped["cudaMemcpyBatchAsync"] = note
        print(f"(d) cudaMemcpyBatchAsync skipped: {note}")

    print(f"\nkvcore {kvcore.__version__} on {gpu_name}: host-tier swap, {args.seqs} seqs x "
          f"{TOKENS_PER_SEQ} tok, {LAYERS} layers, {HEADS} x {HEAD_DIM} bf16, page {PAGE} "
          f"({w.config.page_bytes >> 20} MiB pages); GB/s = bytes one way / device time")
    print(f"{'mechanism':<58} {'dir':>4} {'GiB':>6} {'ms':>9} {'GB/s':>7} {'of ceil':>8} "
          f"{'host us':>9}")
    for r in rows + sweep:
        ms = f"{r['device_us'] / 1e3:.2f}" if r["device_us"] else "-"
        gbs = f"{r['gb_per_s']:.1f}" if r["gb_per_s"] else "-"
        frac = f"{100 * r['fraction_of_ceiling']:.0f}%" if r["fraction_of_ceiling"] else "-"
        host = f"{r['host_us']:.0f}" if r["host_us"] is not None else "-"
        print(f"{r['name']:<58} {r['direction']:>4} {r['bytes'] / 2**30:>6.2f} {ms:>9} "
              f"{gbs:>7} {frac:>8} {host:>9}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    save(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
