"""Host bookkeeping benchmark: kvcore's Cython core against a pure-Python baseline.

Both run in the same process on the same workloads; the table reports each figure and
the ratio, and the JSON (``--out``) keeps every repeat.

    python benchmarks/bench_host.py                 # full run, writes benchmarks/results/cpu.json
    kvcore bench --quick                            # the same from an installed kvcore
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import kvcore
from kvcore.bench.pure_python import (
    PyPageAllocator,
    PyPageTable,
    PyPrefixPageTable,
    PySwapPageTable,
    PyWindowPageTable,
)


def timed(fn, repeats: int) -> list[float]:
    """Run ``fn`` (which returns how many units it did) ``repeats`` times; ns per unit."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        units = fn()
        out.append((time.perf_counter_ns() - start) / units)
    return out


# -- workloads: each returns a callable doing one timed repeat -------------------------

def _restart(table, seqs, prompt: int) -> None:
    """Replace ``seqs`` (in place) by fresh sequences of ``prompt`` tokens (untimed)."""
    for s in list(seqs):
        table.remove(int(s))
    seqs[:] = [table.add_sequence() for _ in range(len(seqs))]
    table.append(seqs, [prompt] * len(seqs))


def _per_step(run, steps: int):
    """A repeat that calls ``run`` (which times its own steps into ``run.elapsed``, after
    its untimed set-up) and returns ns per step."""
    def timed_run():
        run()
        return run.elapsed / steps
    return timed_run


def alloc_decref(lib: str, num_pages: int = 4096, rounds: int = 50):
    if lib == "kvcore":
        alloc = kvcore.PageAllocator(num_pages)

        def run():
            for _ in range(rounds):
                alloc.decref(alloc.allocate(num_pages))
            return rounds * num_pages
    else:
        alloc = PyPageAllocator(num_pages)

        def run():
            for _ in range(rounds):
                alloc.decref(alloc.allocate(num_pages))
            return rounds * num_pages
    return run


def decode_step(lib: str, batch: int = 256, steps: int = 64, prompt: int = 100,
                page_size: int = 16):
    """``steps`` decode steps of ``batch`` sequences: append 1 token each + metadata.

    Each repeat starts from fresh sequences with ``prompt`` tokens, so across the
    steps every sequence fills pages and allocates new ones (100 + 64 crosses 4 page
    boundaries at page size 16).
    """
    num_pages = batch * ((prompt + steps) // page_size + 2)
    if lib == "kvcore":
        table = kvcore.PageTable(kvcore.PageAllocator(num_pages), page_size, batch, 64)
        seqs = np.array([table.add_sequence() for _ in range(batch)], dtype=np.int64)
        ones = np.ones(batch, dtype=np.int64)
    else:
        table = PyPageTable(PyPageAllocator(num_pages), page_size, batch)
        seqs = [table.add_sequence() for _ in range(batch)]
        ones = [1] * batch

    def run():
        _restart(table, seqs, prompt)
        start = time.perf_counter_ns()
        for _ in range(steps):
            table.append(seqs, ones)
            table.flashinfer_metadata(seqs)
        run.elapsed = time.perf_counter_ns() - start
        return 1

    return _per_step(run, steps)


def two_group_decode_step(lib: str, batch: int = 256, steps: int = 64, prompt: int = 100,
                          page_size: int = 16, window: int = 32):
    """The decode step of :func:`decode_step` for a hybrid model: a full-attention group
    and a sliding-window group (window 32) in one table, metadata for both.

    In Python, two tables (one per group) over one allocator.
    """
    num_pages = batch * ((prompt + steps) // page_size + 2) * 2
    if lib == "kvcore":
        groups = [kvcore.LayerGroup(), kvcore.LayerGroup(window=window)]
        table = kvcore.PageTable(kvcore.PageAllocator(num_pages), page_size, batch, 64,
                                 groups=groups)
        tables = [table]
        seqs = np.array([table.add_sequence() for _ in range(batch)], dtype=np.int64)
        ones = np.ones(batch, dtype=np.int64)

        def metadata():
            table.flashinfer_metadata(seqs)
            table.flashinfer_metadata(seqs, group=1)
    else:
        alloc = PyPageAllocator(num_pages)
        tables = [PyPageTable(alloc, page_size, batch),
                  PyWindowPageTable(alloc, page_size, batch, window)]
        seqs = [tables[0].add_sequence() for _ in range(batch)]
        for _ in range(batch):
            tables[1].add_sequence()      # the same seq ids in the window group's table
        ones = [1] * batch

        def metadata():
            for t in tables:
                t.flashinfer_metadata(seqs)

    def run():
        for s in list(seqs):
            for t in tables:
                t.remove(int(s))
        for t in tables:
            fresh = [t.add_sequence() for _ in range(batch)]
        seqs[:] = fresh
        for t in tables:
            t.append(seqs, [prompt] * batch)
        start = time.perf_counter_ns()
        for _ in range(steps):
            for t in tables:
                t.append(seqs, ones)
            metadata()
        run.elapsed = time.perf_counter_ns() - start
        return 1

    return _per_step(run, steps)


def speculative_verify_step(lib: str, batch: int = 256, steps: int = 32, prompt: int = 100,
                            page_size: int = 16, drafts: int = 5, seed: int = 0):
    """A speculative-decoding verify step for ``batch`` sequences: append ``drafts``
    draft tokens each, truncate each to a random accepted length (0..drafts), metadata."""
    num_pages = batch * ((prompt + steps * drafts) // page_size + 2)
    rng = np.random.default_rng(seed)
    accepted = rng.integers(0, drafts + 1, size=(steps, batch))
    if lib == "kvcore":
        table = kvcore.PageTable(kvcore.PageAllocator(num_pages), page_size, batch, 64)
        seqs = np.array([table.add_sequence() for _ in range(batch)], dtype=np.int64)
        counts = np.full(batch, drafts, dtype=np.int64)
        # New lengths per step, computed up front (not timed): prompt + accepted so far.
        new_lens = prompt + np.cumsum(accepted, axis=0)
    else:
        table = PyPageTable(PyPageAllocator(num_pages), page_size, batch)
        seqs = [table.add_sequence() for _ in range(batch)]
        counts = [drafts] * batch
        new_lens = (prompt + np.cumsum(accepted, axis=0)).tolist()

    def run():
        _restart(table, seqs, prompt)
        start = time.perf_counter_ns()
        for step in range(steps):
            table.append(seqs, counts)
            table.truncate(seqs, new_lens[step])
            table.flashinfer_metadata(seqs)
        run.elapsed = time.perf_counter_ns() - start
        return 1

    return _per_step(run, steps)


def prefill(lib: str, batch: int = 64, tokens: int = 2048, page_size: int = 16):
    num_pages = batch * tokens // page_size
    if lib == "kvcore":
        table = kvcore.PageTable(kvcore.PageAllocator(num_pages), page_size, batch,
                                 tokens // page_size)
    else:
        table = PyPageTable(PyPageAllocator(num_pages), page_size, batch)

    def run():
        seqs = [table.add_sequence() for _ in range(batch)]
        start = time.perf_counter_ns()
        table.append(seqs, [tokens] * batch)
        table.flashinfer_metadata(seqs)
        elapsed = time.perf_counter_ns() - start
        for s in seqs:
            table.remove(s)
        return elapsed

    return run


def beam_search(lib: str, beams: int = 8, steps: int = 64, prompt: int = 500,
                page_size: int = 16):
    """Beam search: every step each beam appends a token, then half the beams are
    dropped and the survivors forked (copy-on-write on the next append)."""
    num_pages = beams * ((prompt + steps) // page_size + 4) * 2
    if lib == "kvcore":
        table = kvcore.PageTable(kvcore.PageAllocator(num_pages), page_size, 2 * beams, 64)
    else:
        table = PyPageTable(PyPageAllocator(num_pages), page_size, 2 * beams)
    rng = np.random.default_rng(0)
    drops = [rng.permutation(beams)[: beams // 2].tolist() for _ in range(steps)]

    def run():
        root = table.add_sequence()
        table.append([root], [prompt])
        live = [root] + [table.fork(root) for _ in range(beams - 1)]
        start = time.perf_counter_ns()
        for step in range(steps):
            table.append(live, [1] * beams)
            table.flashinfer_metadata(live)
            dropped = set(drops[step])
            survivors = [s for i, s in enumerate(live) if i not in dropped]
            for i in drops[step]:
                table.remove(live[i])
            live = survivors + [table.fork(s) for s in survivors]
        elapsed = time.perf_counter_ns() - start
        for s in live:
            table.remove(s)
        return elapsed / steps

    def timed_run():
        return run()

    return timed_run


def prefix_lookup(lib: str, tokens: int = 4096, page_size: int = 16, rounds: int = 20):
    """Look up a cached 4,096-token prompt (256 full pages, all hits); only
    ``add_sequence`` is timed (the ``remove`` that frees the hit is not)."""
    num_pages = tokens // page_size + 16
    prompt = np.random.default_rng(7).integers(0, 32000, size=tokens + 1).astype(np.int32)
    if lib == "kvcore":
        table = kvcore.PageTable(kvcore.PageAllocator(num_pages), page_size, 4, num_pages,
                                 enable_prefix_cache=True)
        seq = table.add_sequence()
        table.append([seq], [tokens + 1], token_ids=prompt)
    else:
        table = PyPrefixPageTable(PyPageAllocator(num_pages), page_size, 4)
        prompt = prompt.tolist()
        seq = table.add_sequence()
        table.append([seq], [tokens + 1], prompt)

    def run():
        elapsed = 0
        for _ in range(rounds):
            start = time.perf_counter_ns()
            hit = table.add_sequence(prompt)
            elapsed += time.perf_counter_ns() - start
            assert (table.num_tokens(hit) if lib == "kvcore" else table.lens[hit]) == tokens
            table.remove(hit)
        return elapsed / rounds

    return run


def host_prefix_hit(lib: str, tokens: int = 4096, page_size: int = 16, rounds: int = 20):
    """A 4,096-token prompt whose 256 full pages were all offloaded to the host tier:
    ``add_sequence`` maps the hit into fresh device pages (the bookkeeping; the copy is
    not included). Timed: ``add_sequence`` and taking its load pairs; the completion and
    the ``remove`` that offloads the pages again are not. The baseline is the
    pure-Python device-tier lookup of the same prompt (it has no host tier)."""
    if lib != "kvcore":
        return prefix_lookup(lib, tokens, page_size, rounds)
    num_pages = tokens // page_size + 16
    prompt = np.random.default_rng(7).integers(0, 32000, size=tokens + 1).astype(np.int32)
    table = kvcore.PageTable(kvcore.PageAllocator(num_pages), page_size, 4, num_pages,
                             enable_prefix_cache=True,
                             host_allocator=kvcore.PageAllocator(2 * num_pages))
    tier = kvcore.HostTier(table)

    def offload_everything():
        """Fill the device with other pages: every cached page moves to the host."""
        filler = table.add_sequence()
        table.append([filler], [table.allocator.num_free * page_size])
        table.remove(filler)
        tier.finish_writebacks(table.take_writebacks()[1], True)

    seq = table.add_sequence()
    table.append([seq], [tokens + 1], token_ids=prompt)
    table.remove(seq)
    offload_everything()

    def run():
        elapsed = 0
        for _ in range(rounds):
            start = time.perf_counter_ns()
            hit = table.add_sequence(prompt)
            pairs = tier.load_pairs(hit)
            elapsed += time.perf_counter_ns() - start
            assert table.num_tokens(hit) == tokens and pairs[0].size == tokens // page_size
            tier.finish_writebacks(table.take_writebacks()[1], True)
            tier.finish([hit], True)
            table.remove(hit)
            offload_everything()
        return elapsed / rounds

    return run


def swap_round_trip(lib: str, batch: int = 256, tokens: int = 1024, page_size: int = 16,
                    rounds: int = 5):
    """Bookkeeping of swapping 256 sequences x 1,024 tokens (16,384 pages) out and back
    in: the two calls that start the moves, timed, per call (kvcore's ``finish`` after
    each, which releases the other tier's pages once the copy is done, is not timed: it
    runs in ``poll``). The copy is not included (see benchmarks/bench_swap.py)."""
    per_seq = tokens // page_size
    num_pages = batch * per_seq + 16
    if lib == "kvcore":
        table = kvcore.PageTable(kvcore.PageAllocator(num_pages), page_size, batch, per_seq,
                                 host_allocator=kvcore.PageAllocator(num_pages))
        tier = kvcore.HostTier(table)
        seqs = np.array([table.add_sequence() for _ in range(batch)], dtype=np.int64)
        table.append(seqs, tokens)
    else:
        table = PySwapPageTable(PyPageAllocator(num_pages), PyPageAllocator(num_pages),
                                page_size, batch)
        seqs = [table.add_sequence() for _ in range(batch)]
        table.append(seqs, [tokens] * batch)

    def run():
        elapsed = 0
        for _ in range(rounds):
            start = time.perf_counter_ns()
            pairs = tier.swap_out(seqs) if lib == "kvcore" else table.swap_out(seqs)
            elapsed += time.perf_counter_ns() - start
            if lib == "kvcore":
                tier.finish(seqs, True)
            start = time.perf_counter_ns()
            back = tier.swap_in(seqs) if lib == "kvcore" else table.swap_in(seqs)
            elapsed += time.perf_counter_ns() - start
            if lib == "kvcore":
                tier.finish(seqs, True)
            assert len(pairs[0] if lib == "kvcore" else pairs) == batch * per_seq
            assert len(back[0] if lib == "kvcore" else back) == batch * per_seq
        return elapsed / (2 * rounds)

    return run


def shared_prompt_workload(lib: str, requests: int = 256, system_len: int = 1024,
                           user_len: int = 200, decode: int = 32, page_size: int = 16,
                           batch: int = 32):
    """Requests that share one of 4 system prompts: lookup + prefill + 32 decode steps in
    batches of 32, then free. Reports µs per request; hit rate in ``run.hit_rate``."""
    rng = np.random.default_rng(11)
    systems = [rng.integers(0, 32000, size=system_len) for _ in range(4)]
    prompts = [np.concatenate([systems[i % 4], rng.integers(0, 32000, size=user_len)]
                              ).astype(np.int32) for i in range(requests)]
    decode_ids = rng.integers(0, 32000, size=(requests, decode)).astype(np.int32)
    per_seq = -(-(system_len + user_len + decode) // page_size)
    num_pages = batch * per_seq + 4 * system_len // page_size + 64

    def run():
        if lib == "kvcore":
            table = kvcore.PageTable(kvcore.PageAllocator(num_pages), page_size, batch,
                                     per_seq, enable_prefix_cache=True)
            reqs = prompts
        else:
            table = PyPrefixPageTable(PyPageAllocator(num_pages), page_size, batch)
            reqs = [p.tolist() for p in prompts]
        start = time.perf_counter_ns()
        for first in range(0, requests, batch):
            seqs = []
            for r in range(first, first + batch):
                seq = table.add_sequence(reqs[r])
                cached = table.lens[seq] if lib != "kvcore" else table.num_tokens(seq)
                rest = reqs[r][cached:]
                table.append([seq], [len(rest)], rest)
                seqs.append(seq)
            for step in range(decode):
                ids = decode_ids[first:first + batch, step]
                table.append(seqs, [1] * batch, ids if lib == "kvcore" else ids.tolist())
            for seq in seqs:
                table.remove(seq)
        elapsed = time.perf_counter_ns() - start
        if lib == "kvcore":
            run.hit_rate = table.prefix_stats["hit_rate"]
        else:
            run.hit_rate = table.hit / table.queried
        return elapsed / requests

    return run


WORKLOADS = [
    # name, factory, unit, timing kind, target (kvcore, in unit)
    ("allocate+decref 4096 pages", alloc_decref, "ns/page", "per_unit", 5.0),
    ("decode step, 256 seqs (append 1 + metadata)", decode_step, "us/step", "self", 10.0),
    ("decode step, 256 seqs, two groups: full + window 32 (append 1 + both metadata)",
     two_group_decode_step, "us/step", "self", None),
    ("speculative verify step, 256 seqs (append 5, truncate to accepted, metadata)",
     speculative_verify_step, "us/step", "self", 15.0),
    ("prefill 64 x 2048 tokens (append + metadata)", prefill, "us/call", "self", None),
    ("beam search step, 8 beams (append, metadata, remove, fork)", beam_search, "us/step",
     "self", None),
    ("prefix lookup, 4,096-token prompt, 256 pages all hit", prefix_lookup,
     "us/call", "self", 20.0),
    ("host-tier prefix hit, 4,096-token prompt, 256 pages offloaded (python: device hit)",
     host_prefix_hit, "us/call", "self", 30.0),
    ("swap 256 seqs x 1,024 tokens (16,384 pages) out or in: bookkeeping per call",
     swap_round_trip, "us/call", "self", 50.0),
    ("shared system prompts: 256 requests, lookup + prefill + 32 decode", shared_prompt_workload,
     "us/req", "self", None),
]


def measure(factory, kind: str, repeats: int) -> tuple[list[float], dict]:
    run = factory()
    run()  # warm up
    if kind == "per_unit":
        return timed(run, repeats), {}
    values = [float(run()) for _ in range(repeats)]
    extra = {"hit_rate": run.hit_rate} if hasattr(run, "hit_rate") else {}
    return values, extra


def main(argv=None, default_out: Path | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    parser.add_argument("--out", type=Path, default=default_out,
                        help="write the figures as JSON here")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 15
    rows, records = [], []
    for name, factory, unit, kind, target in WORKLOADS:
        scale = 1e-3 if unit.startswith("us") else 1.0
        fast, extra = measure(lambda f=factory: f("kvcore"), kind, repeats)
        slow, extra_py = measure(lambda f=factory: f("python"), kind, max(3, repeats // 3))
        fast = [x * scale for x in fast]
        slow = [x * scale for x in slow]
        if extra:
            name = f"{name} [hit rate {100 * extra['hit_rate']:.1f}%]"
            if extra_py and abs(extra_py["hit_rate"] - extra["hit_rate"]) > 1e-9:
                raise AssertionError(f"hit rates differ: {extra} vs python {extra_py}")
        k_med, p_med = statistics.median(fast), statistics.median(slow)
        ratio = p_med / k_med
        met = None if target is None else k_med <= target
        rows.append((name, unit, k_med, p_med, ratio, target, met))
        records.append({"workload": name, "unit": unit, "kvcore_median": k_med,
                        "python_median": p_med, "speedup": ratio, "target": target,
                        "target_met": met, "kvcore_repeats": fast, "python_repeats": slow,
                        **extra})
    cpu = platform.processor() or platform.machine()
    print(f"\nkvcore {kvcore.__version__} host bookkeeping, {cpu}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}, median of repeats")
    print(f"{'workload':<78} {'unit':>8} {'kvcore':>10} {'python':>10} {'speedup':>8} "
          f"{'target':>8}")
    for name, unit, k_med, p_med, ratio, target, met in rows:
        tgt = "-" if target is None else f"<={target:g} {'ok' if met else 'MISS'}"
        print(f"{name:<78} {unit:>8} {k_med:>10.3f} {p_med:>10.1f} {ratio:>7.0f}x {tgt:>8}")
    if args.out is not None and not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "python": platform.python_version(),
                               "numpy": np.__version__},
                   "kvcore": kvcore.__version__, "quick": args.quick,
                   "date": time.strftime("%Y-%m-%d"), "results": records}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
