"""Fuzz kvcore with raw operation streams: random calls with random, often hostile,
arguments against one KVCache (CPU backend, prefix caching on).

Every call must either succeed, after which the invariants hold, or raise a typed
error (``ALLOWED_ERRORS``) and leave bookkeeping, prefix cache and pool exactly as they
were. Anything else is a finding.

    python tests/fuzz_raw_ops.py --ops 200000 --seed 1     # prints what was tried
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvcore import KVCache, KVCacheConfig
from tests.hostile import ALLOWED_ERRORS, HOSTILE_ARRAYS, HOSTILE_INTS

CFG = KVCacheConfig(num_layers=2, num_kv_heads=1, head_dim=4, page_size=4, num_pages=24,
                    dtype="float32", max_seqs=6, max_pages_per_seq=12,
                    enable_prefix_cache=True)


class Fuzzer:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.cache = KVCache(CFG, device="cpu")
        self.tried = self.errors = 0
        self.findings: list[str] = []

    # -- argument generators: mostly plausible, sometimes hostile -------------------------

    def an_int(self, low=-2, high=14):
        r = self.rng.random()
        if r < 0.85:
            return int(self.rng.integers(low, high))
        return HOSTILE_INTS[self.rng.integers(len(HOSTILE_INTS))]

    def an_array(self, length=None, low=-1, high=8):
        r = self.rng.random()
        if r < 0.85:
            n = int(self.rng.integers(0, 6)) if length is None else length
            values = self.rng.integers(low, high, size=n)
            kind = self.rng.integers(4)
            if kind == 0:
                return values.tolist()
            if kind == 1:
                return values.astype(np.int32)
            if kind == 2:
                return np.repeat(values, 2)[::2]          # non-contiguous
            return tuple(values.tolist())
        return HOSTILE_ARRAYS[self.rng.integers(len(HOSTILE_ARRAYS))]

    def live(self):
        return self.cache.table.active_seq_ids().tolist()

    def a_seq(self):
        live = self.live()
        if live and self.rng.random() < 0.8:
            return live[self.rng.integers(len(live))]
        return self.an_int(-1, 8)

    # -- operations ---------------------------------------------------------------------------

    def op(self):
        c, rng = self.cache, self.rng
        choice = rng.integers(12)
        if choice == 0:
            tokens = self.an_array(low=0, high=3) if rng.random() < 0.7 else None
            return lambda: c.add_sequence(tokens, namespace=self.an_int(0, 2))
        if choice == 1:
            seq = self.a_seq()
            return lambda: c.fork(seq)
        if choice == 2:
            seq = self.a_seq()
            return lambda: c.remove(seq)
        if choice in (3, 4):
            live = self.live()
            k = int(rng.integers(0, len(live) + 1))
            seqs = list(rng.permutation(live)[:k]) if rng.random() < 0.8 else self.an_array()
            counts = self.an_array(length=len(seqs) if hasattr(seqs, "__len__") else 1,
                                   low=0, high=6)
            ids = None
            if rng.random() < 0.7:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        total = int(np.sum(np.asarray(counts, dtype=np.int64)))
                except Exception:   # hostile counts: any length will do
                    total = 1
                ids = self.an_array(length=max(min(total, 64), 0), low=0, high=3)
            return lambda: c.append(seqs, counts, token_ids=ids)
        if choice == 5:
            seqs, counts = self.an_array(), self.an_array(low=0)
            return lambda: c.pages_needed(seqs, counts)
        if choice == 6:
            seqs = self.an_array() if rng.random() < 0.5 else self.live()
            return lambda: (c.flashinfer_metadata(seqs), c.block_tables(seqs))
        if choice == 7:
            seq, idx = self.a_seq(), self.an_int(-1, 30)
            return lambda: c.slot(seq, idx)
        if choice == 8:
            n = int(rng.integers(0, 5))
            kv = np.full((n, 1, 4), rng.random(), np.float32)
            slots = self.an_array(length=n, low=-2, high=100)
            return lambda: c.write(self.an_int(-1, 3), kv, kv, slots)
        if choice == 9:
            layer, seqs = self.an_int(-1, 3), self.live() if rng.random() < 0.7 else \
                self.an_array()
            return lambda: c.gather(layer, seqs)
        if choice == 10:
            n = int(rng.integers(0, 3))
            src, dst = self.an_array(length=n, high=26), self.an_array(length=n, high=26)
            return lambda: c.copy_pages(src, dst)
        return lambda: (c.take_events(), c.clear_prefix_cache() if rng.random() < 0.1 else None)

    def state(self):
        t = self.cache.table
        return (t.block_table.tobytes(), t.seq_lens.tobytes(), t.allocator.refcounts.tobytes(),
                t.allocator.num_free, t.allocator.num_evictable, t.num_seqs,
                t.num_cached_pages, self.cache.kv.tobytes())

    def run(self, ops: int) -> None:
        for _ in range(ops):
            call = self.op()
            before = self.state()
            self.tried += 1
            try:
                call()
            except ALLOWED_ERRORS:
                self.errors += 1
                if self.state() != before:
                    self.findings.append(f"op {self.tried}: a failed call changed the state")
            except Exception:   # anything else is a finding
                self.findings.append(f"op {self.tried}: {traceback.format_exc(limit=3)}")
            try:
                self.cache.check_invariants()
            except Exception as exc:
                self.findings.append(f"op {self.tried}: invariant broken: {exc}")
                self.cache = KVCache(CFG, device="cpu")


def fuzz(ops: int, seed: int) -> Fuzzer:
    fuzzer = Fuzzer(seed)
    fuzzer.run(ops)
    return fuzzer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    f = fuzz(args.ops, args.seed)
    print(f"{f.tried:,} operations tried in {time.perf_counter() - start:.1f} s, "
          f"{f.errors:,} rejected with typed errors, {len(f.findings)} findings")
    for finding in f.findings[:10]:
        print(finding)
    return 1 if f.findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
