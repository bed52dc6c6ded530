"""A straightforward pure-Python page allocator and page table: the benchmark baseline.

It implements the same contract as kvcore's Cython core (LIFO free list, refcounts,
copy-on-write on append, FlashInfer metadata) the way a scheduler written in Python
would: lists, a dict of page lists, per-token loops. It validates its inputs as the
real core does, so the comparison is like for like.
"""

from __future__ import annotations

import numpy as np


class PyPageAllocator:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.free = list(range(num_pages - 1, -1, -1))
        self.refcount = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"requested {n} pages but only {len(self.free)} are free")
        pages = [self.free.pop() for _ in range(n)]
        for page in pages:
            self.refcount[page] = 1
        return pages

    def incref(self, pages) -> None:
        for page in pages:
            if self.refcount[page] == 0:
                raise RuntimeError(f"incref of free page {page}")
        for page in pages:
            self.refcount[page] += 1

    def decref(self, pages) -> list[int]:
        for page in pages:
            if not 0 <= page < self.num_pages or self.refcount[page] == 0:
                raise RuntimeError(f"decref of free page {page}")
        freed = []
        for page in pages:
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                self.free.append(page)
                freed.append(page)
        return freed


class PyPageTable:
    def __init__(self, allocator: PyPageAllocator, page_size: int, max_seqs: int):
        self.allocator = allocator
        self.page_size = page_size
        self.max_seqs = max_seqs
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.free_ids = list(range(max_seqs - 1, -1, -1))

    def add_sequence(self) -> int:
        seq = self.free_ids.pop()
        self.pages[seq] = []
        self.lens[seq] = 0
        return seq

    def fork(self, seq: int) -> int:
        child = self.free_ids.pop()
        self.pages[child] = list(self.pages[seq])
        self.lens[child] = self.lens[seq]
        self.allocator.incref(self.pages[child])
        return child

    def remove(self, seq: int) -> None:
        self.allocator.decref(self.pages.pop(seq)[::-1])
        del self.lens[seq]
        self.free_ids.append(seq)

    def append(self, seq_ids, num_new_tokens):
        ps = self.page_size
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("duplicate seq ids")
        needed = 0
        pending: dict[int, int] = {}
        for seq, n in zip(seq_ids, num_new_tokens, strict=True):
            if seq not in self.pages or n < 0:
                raise KeyError(seq)
            cur = self.lens[seq]
            needed += -(-(cur + n) // ps) - (-(-cur // ps))
            if n and cur % ps:
                last = self.pages[seq][-1]
                if self.allocator.refcount[last] - pending.get(last, 0) > 1:
                    pending[last] = pending.get(last, 0) + 1
                    needed += 1
        if needed > self.allocator.num_free:
            raise MemoryError("out of pages")
        slot_mapping, copy_src, copy_dst = [], [], []
        for seq, n in zip(seq_ids, num_new_tokens, strict=True):
            if n == 0:
                continue
            pages = self.pages[seq]
            cur = self.lens[seq]
            if cur % ps and self.allocator.refcount[pages[-1]] > 1:
                (fresh,) = self.allocator.allocate(1)
                self.allocator.refcount[pages[-1]] -= 1
                copy_src.append(pages[-1])
                copy_dst.append(fresh)
                pages[-1] = fresh
            new_len = cur + n
            pages.extend(self.allocator.allocate(-(-new_len // ps) - len(pages)))
            for t in range(cur, new_len):
                slot_mapping.append(pages[t // ps] * ps + t % ps)
            self.lens[seq] = new_len
        return (np.array(slot_mapping, dtype=np.int64), np.array(copy_src, dtype=np.int32),
                np.array(copy_dst, dtype=np.int32))

    def flashinfer_metadata(self, seq_ids):
        indptr, indices, last = [0], [], []
        for seq in seq_ids:
            pages = self.pages[seq]
            indices.extend(pages)
            indptr.append(len(indices))
            n = self.lens[seq]
            last.append(0 if n == 0 else (n - 1) % self.page_size + 1)
        return (np.array(indptr, dtype=np.int32), np.array(indices, dtype=np.int32),
                np.array(last, dtype=np.int32))
