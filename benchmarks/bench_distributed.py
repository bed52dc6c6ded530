"""kvcore.distributed on two GPUs: page transfer against one contiguous NCCL send, and the
tensor-parallel step's host cost against one GPU.

Two processes (one per GPU, spawned here with a file rendezvous), torch.distributed with
``backend="cpu:gloo,cuda:nccl"`` (control messages over gloo, pages over NCCL).
NVLink multicast stays as the machine sets it (``NCCL_NVLS_ENABLE=0`` on the lent
machines): this script never touches it.

1. Transfer. 64 sequences x 2,048 tokens of a 32-layer model with 8 KV heads x 128,
   bf16, NHD, page 16: 8,192 pages of 2 MiB, 16 GiB. Rank 0 fills its pool with random
   bytes and ``send_pages`` the 64 sequences; rank 1 ``recv_pages`` them into a pool
   whose page ids differ (a few pages taken first), then removes them. Cases: each
   sequence's pages consecutive, sent ``mode="direct"`` and ``"staged"`` at each
   ``--chunk-mib``; pages interleaved on the sender (allocated page by page round
   robin, no two consecutive), ``auto`` at 256 MiB (it stages) and staged at 64 MiB.
   Timed on the receiver from a barrier to the data in its pages
   (``torch.cuda.synchronize``), handshake included; median of ``--repeats`` after a
   warm-up. Baseline, in the same run: one ``dist.send`` of a contiguous buffer of the
   same bytes (and of 1 GiB), timed the same way. Integrity: after each case, every
   layer's K and V of the transferred pages is compared on both sides through an
   order-sensitive checksum.
2. TP step, for each channel (``nccl`` when CuPy's NCCL loads, ``device``, ``host``).
   64 sequences decoding (about 1,000 tokens each), page 16, the same model:
   rank 0's ``TensorParallelCache.step(seqs, 1)`` (append, metadata fill and upload,
   broadcast) against a single-GPU ``KVCache.append`` + ``StepMetadata.update`` of the
   same sequences on rank 0, and the latency until the other rank holds the step's
   metadata (its ``step()`` returned: copies enqueued, buffers filled and uploaded),
   read with ``time.perf_counter_ns`` (CLOCK_MONOTONIC, one clock for both processes).
   Each step is truncated back outside the timed part, so every step is the same
   decode step; rank 0 waits 300 us between steps so that rank 1 is already waiting.
   Medians skip the first tenth. Also a bare gloo broadcast of the same message size.

    python benchmarks/bench_distributed.py --out benchmarks/results/distributed_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

LAYERS, HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _sync_time(torch, dist, fn, repeats):
    times = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _checksums(torch, io, pages, layers):
    """int64 [layers, 2]: an order-sensitive checksum of each layer's K and V pages."""
    index = io.index(pages)
    out = torch.zeros(layers, 2, dtype=torch.int64, device=io.device)
    for layer in range(layers):
        for which, pool in enumerate((io.k, io.v)):
            words = pool[layer].index_select(0, index).view(-1).view(torch.int32).to(torch.int64)
            weight = torch.arange(words.numel(), device=io.device, dtype=torch.int64) % 65521 + 1
            out[layer, which] = (words * weight).sum()
    return out


def transfer(rank, args, torch, dist, result):
    from kvcore import KVCache, KVCacheConfig
    from kvcore.distributed import recv_pages, send_pages
    from kvcore.distributed._comm import PoolIO

    seqs, tokens = args.seqs, args.tokens
    pages = seqs * tokens // PAGE
    cfg = KVCacheConfig(LAYERS, HEADS, HEAD_DIM, PAGE, pages + 64, dtype="bfloat16",
                        max_seqs=seqs + 8, max_pages_per_seq=tokens // PAGE + 1)
    cache = KVCache(cfg, device=f"cuda:{rank}", framework="torch")
    nbytes = pages * cfg.page_bytes
    if rank == 0:
        words = cache.kv.view(torch.int16)
        words.random_(-2**15, 2**15 - 1)
    else:
        other = cache.add_sequence()
        cache.append([other], [37 * PAGE])          # page ids differ from the sender's
    torch.cuda.synchronize()
    figures = {}
    ids = []
    cases = [("contiguous", "direct", 64), *[("contiguous", "staged", c) for c in args.chunk_mib],
             ("interleaved", "auto", 256), ("interleaved", "staged", 64)]
    for layout, mode, chunk_mib in cases:
        chunk = chunk_mib << 20
        last = {}
        if rank == 0:    # (re)allocate the sender's sequences in this page layout
            for seq in ids:
                cache.remove(seq)
            ids = [cache.add_sequence() for _ in range(seqs)]
            if layout == "contiguous":      # each sequence's pages consecutive
                for seq in ids:
                    cache.append([seq], [tokens])
            else:                           # page by page, round robin: no two consecutive
                for _ in range(tokens // PAGE):
                    cache.append(ids, PAGE)

        def once(chunk=chunk, last=last, mode=mode, ids=ids):
            if rank == 0:
                last["stats"] = send_pages(cache, ids, 1, chunk_bytes=chunk, mode=mode)
            else:
                stats = recv_pages(cache, 0)
                last["stats"] = stats

        def run(last=last, once=once):
            once()
            if rank == 1:
                for seq in last["stats"].seq_ids.tolist():
                    cache.remove(seq)

        run()                                       # warm-up (NCCL's p2p communicator)
        times = []
        for rep in range(args.repeats):
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            once()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if rank == 1 and rep < args.repeats - 1:
                for seq in last["stats"].seq_ids.tolist():
                    cache.remove(seq)
        # integrity of the last transfer: checksums of every layer's K and V, in order
        io = PoolIO(cache, torch)
        if rank == 0:
            order = np.concatenate([cache.pages(s) for s in ids])
        else:
            order = np.concatenate([cache.pages(s) for s in last["stats"].seq_ids.tolist()])
        sums = _checksums(torch, io, order, LAYERS)
        both = [torch.zeros_like(sums) for _ in range(2)]
        dist.all_gather(both, sums)
        exact = bool(torch.equal(both[0], both[1]))
        if rank == 1:
            for seq in last["stats"].seq_ids.tolist():
                cache.remove(seq)
            med = _median(times)
            stats = last["stats"]
            key = f"{layout}_{stats.mode}" + (f"_{chunk_mib}MiB" if stats.mode == "staged"
                                              else "")
            figures[key] = {
                "pages": layout, "mode_asked": mode, "mode": stats.mode,
                "seconds_median": med, "seconds_all": times, "bytes": nbytes,
                "gb_per_s": nbytes / med / 1e9, "messages": stats.num_chunks,
                "byte_exact": exact}
        del last
    # baseline: one contiguous send of the same bytes, and of 1 GiB
    for name, size in (("contiguous_same_bytes", nbytes), ("contiguous_1GiB", 1 << 30)):
        buf = torch.empty(size, dtype=torch.uint8, device=f"cuda:{rank}")

        def send(buf=buf):
            if rank == 0:
                dist.send(buf, 1)
            else:
                dist.recv(buf, 0)

        send()
        times = _sync_time(torch, dist, send, args.repeats)
        if rank == 1:
            med = _median(times)
            figures[name] = {"seconds_median": med, "seconds_all": times, "bytes": size,
                             "gb_per_s": size / med / 1e9}
        del buf
        torch.cuda.empty_cache()
    if rank == 1:
        base = figures["contiguous_same_bytes"]["gb_per_s"]
        for fig in figures.values():
            if "mode" in fig:
                fig["fraction_of_contiguous"] = fig["gb_per_s"] / base
        result["transfer"] = {"seqs": seqs, "tokens_per_seq": tokens, "pages": pages,
                              "page_bytes": cfg.page_bytes, **figures}


def tp_step(rank, args, torch, dist, result):
    from kvcore.distributed.tp import _cupy_nccl

    for channel in ("nccl", "device", "host"):
        if channel == "nccl" and not _cupy_nccl():
            result["tp_step_nccl"] = {"channel": "nccl", "unavailable": "no CuPy NCCL"}
            continue
        _tp_step(rank, args, torch, dist, result, channel)


def _tp_step(rank, args, torch, dist, result, channel):
    from kvcore import KVCache, KVCacheConfig
    from kvcore.distributed import TensorParallelCache

    seqs, length, steps = 64, 1000, args.tp_steps
    num_pages = seqs * (length // PAGE + 2) + 64
    cfg = KVCacheConfig(LAYERS, HEADS, HEAD_DIM, PAGE, num_pages, dtype="bfloat16",
                        max_seqs=seqs, max_pages_per_seq=length // PAGE + 4)
    tp = TensorParallelCache(cfg, max_tokens=seqs, device=f"cuda:{rank}",
                             framework="torch", max_batch=seqs, channel=channel)
    stamps = np.zeros(steps, dtype=np.int64)
    if rank == 0:
        single = KVCache(cfg, device=f"cuda:{rank}", framework="torch")
        meta = single.step_metadata(seqs, max_batch=seqs)
        ids = [tp.add_sequence() for _ in range(seqs)]
        single_ids = [single.add_sequence() for _ in range(seqs)]
        tp.table.append(ids, length)         # prefill: bookkeeping only, nothing to copy
        single.table.append(single_ids, length)
        ids_arr, single_arr = np.array(ids), np.array(single_ids)
        one_gpu = np.zeros(steps, dtype=np.int64)
        tp_host = np.zeros(steps, dtype=np.int64)
        for i in range(steps):
            t0 = time.perf_counter_ns()
            r = single.append(single_arr, 1)
            meta.update(single_arr, r)
            one_gpu[i] = time.perf_counter_ns() - t0
            single.truncate(single_arr, [length] * seqs)
        for i in range(steps):
            target = time.perf_counter_ns() + 300_000
            while time.perf_counter_ns() < target:
                pass
            t0 = time.perf_counter_ns()
            tp.step(ids_arr, 1)
            t1 = time.perf_counter_ns()
            stamps[i], tp_host[i] = t0, t1 - t0
            tp.truncate(ids_arr, [length] * seqs)
        tp.close()
    else:
        i = 0
        while tp.step() is not None:
            stamps[i] = time.perf_counter_ns()
            i += 1
        assert i == steps, i
    torch.cuda.synchronize()
    every = [None] * 2
    dist.all_gather_object(every, stamps.tolist())
    # a bare gloo broadcast of the same message (int32 8 + 65 + 64 + 64 * 64 + 64 + 0)
    words = 8 + (seqs + 1) + seqs + seqs * (length // PAGE + 1) + seqs
    msg = torch.zeros(words, dtype=torch.int32)
    bare = np.zeros(steps, dtype=np.int64)
    for i in range(steps):
        dist.barrier()
        if rank == 0:
            target = time.perf_counter_ns() + 300_000
            while time.perf_counter_ns() < target:
                pass
        t0 = time.perf_counter_ns()
        dist.broadcast(msg, 0)
        bare[i] = time.perf_counter_ns()
        if rank == 0:
            bare[i] = t0
    both_bare = [None] * 2
    dist.all_gather_object(both_bare, bare.tolist())
    if rank == 0:
        start, done = np.array(every[0]), np.array(every[1])
        latency = done - start
        bare_latency = np.array(both_bare[1]) - np.array(both_bare[0])
        warm = slice(steps // 10, None)
        one = float(np.median(one_gpu[warm])) / 1e3
        result[f"tp_step_{channel}"] = {
            "channel": channel, "ranks": 2, "seqs": seqs, "tokens_per_seq": length, "steps": steps,
            "message_int32": words,
            "one_gpu_append_update_us_median": one,
            "tp_step_host_us_median": float(np.median(tp_host[warm])) / 1e3,
            "tp_extra_host_us_on_scheduler": float(np.median(tp_host[warm])) / 1e3 - one,
            "until_every_rank_holds_us_median": float(np.median(latency[warm])) / 1e3,
            "until_every_rank_holds_us_p90": float(np.percentile(latency[warm], 90)) / 1e3,
            "extra_until_every_rank_holds_us": float(np.median(latency[warm])) / 1e3 - one,
            "bare_gloo_broadcast_us_median": float(np.median(bare_latency[warm])) / 1e3,
        }


def _worker(rank, init_file, args, queue):
    import torch
    import torch.distributed as dist

    result = {}
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"file://{init_file}",
                                rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=300))
        if "tp" in args.parts:
            tp_step(rank, args, torch, dist, result)
        if "transfer" in args.parts:
            transfer(rank, args, torch, dist, result)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
    queue.put((rank, result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-mib", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--tp-steps", type=int, default=2000)
    parser.add_argument("--parts", nargs="+", default=["tp", "transfer"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import multiprocessing as mp

    import torch

    if torch.cuda.device_count() < 2:
        print("needs 2 CUDA GPUs", file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, init, args, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    merged = {}
    for rank in (0, 1):
        if "error" in results[rank]:
            print(f"rank {rank} failed:\n{results[rank]['error']}", file=sys.stderr)
            return 1
        merged.update(results[rank])
    merged["machine"] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                         "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                         "python": platform.python_version(),
                         "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE")}
    if "transfer" in merged:
        t = merged["transfer"]
        print(f"transfer of {t['seqs']} x {t['tokens_per_seq']} tokens "
              f"({t['pages']} pages, {t['pages'] * t['page_bytes'] / 2**30:.1f} GiB):")
        print(f"  {'how':<28}{'ms':>10}{'GB/s':>10}{'vs contiguous':>16}  byte-exact")
        for key, fig in t.items():
            if isinstance(fig, dict):
                frac = fig.get("fraction_of_contiguous")
                print(f"  {key:<28}{fig['seconds_median'] * 1e3:>10.2f}"
                      f"{fig['gb_per_s']:>10.1f}"
                      f"{'' if frac is None else f'{frac:.1%}':>16}"
                      f"  {fig.get('byte_exact', '')}")
    for channel in ("nccl", "device", "host"):
        s = merged.get(f"tp_step_{channel}")
        if s is None or "unavailable" in s:
            continue
        print(f"TP decode step, 2 ranks, {s['seqs']} sequences of ~{s['tokens_per_seq']} "
              f"tokens (message {s['message_int32']} int32), {channel} channel:")
        for key, value in s.items():
            if key.endswith("_us") or "_us_" in key:
                print(f"  {key:<44}{value:>10.1f} us")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
