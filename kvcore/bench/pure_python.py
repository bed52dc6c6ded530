"""A straightforward pure-Python page allocator and page table: the benchmark baseline.

It implements the same contract as kvcore's Cython core (LIFO free list, refcounts,
copy-on-write on append, FlashInfer metadata) the way a scheduler written in Python
would: lists, a dict of page lists, per-token loops. It validates its inputs as the
real core does, so the comparison is like for like.
"""

from __future__ import annotations

from collections import OrderedDict

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

    def truncate(self, seq_ids, lengths) -> None:
        """Shorten sequences: drop the pages past each new length (last first)."""
        ps = self.page_size
        for seq, n in zip(seq_ids, lengths, strict=True):
            if seq not in self.pages or not 0 <= n <= self.lens[seq]:
                raise ValueError(f"cannot truncate seq {seq} to {n}")
        for seq, n in zip(seq_ids, lengths, strict=True):
            pages = self.pages[seq]
            keep = -(-n // ps)
            self.allocator.decref(pages[keep:][::-1])
            del pages[keep:]
            self.lens[seq] = n

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


class PySwapPageTable(PyPageTable):
    """Swap as vLLM v0's block manager did it: a dict from each distinct device block to
    its host block, built per call, then new block lists (the copy itself not included)."""

    def __init__(self, allocator: PyPageAllocator, host: PyPageAllocator, page_size: int,
                 max_seqs: int):
        super().__init__(allocator, page_size, max_seqs)
        self.host = host
        self.host_pages: dict[int, list[int]] = {}

    def swap_out(self, seq_ids):
        mapping: dict[int, int] = {}
        for seq in seq_ids:
            new = []
            for page in self.pages[seq]:
                if page not in mapping:
                    mapping[page] = self.host.allocate(1)[0]
                else:
                    self.host.incref([mapping[page]])
                new.append(mapping[page])
            self.host_pages[seq] = new
        for seq in seq_ids:
            self.allocator.decref(self.pages.pop(seq))
        return list(mapping.items())

    def swap_in(self, seq_ids):
        mapping: dict[int, int] = {}
        for seq in seq_ids:
            new = []
            for page in self.host_pages[seq]:
                if page not in mapping:
                    mapping[page] = self.allocator.allocate(1)[0]
                else:
                    self.allocator.incref([mapping[page]])
                new.append(mapping[page])
            self.pages[seq] = new
        for seq in seq_ids:
            self.host.decref(self.host_pages.pop(seq))
        return list(mapping.items())


class PyWindowPageTable(PyPageTable):
    """A sliding-window group: before each append, pages wholly before
    ``len - window + 1`` are released; released entries stay as None so columns keep
    their token positions."""

    def __init__(self, allocator: PyPageAllocator, page_size: int, max_seqs: int,
                 window: int):
        super().__init__(allocator, page_size, max_seqs)
        self.window = window
        self.first: dict[int, int] = {}

    def add_sequence(self) -> int:
        seq = super().add_sequence()
        self.first[seq] = 0
        return seq

    def remove(self, seq: int) -> None:
        live = [p for p in self.pages.pop(seq) if p is not None]
        self.allocator.decref(live[::-1])
        del self.lens[seq], self.first[seq]
        self.free_ids.append(seq)

    def append(self, seq_ids, num_new_tokens):
        ps = self.page_size
        for seq, n in zip(seq_ids, num_new_tokens, strict=True):
            if not n:
                continue
            end = max(0, self.lens[seq] - self.window + 1) // ps
            pages = self.pages[seq]
            dead = [pages[c] for c in range(self.first[seq], end)]
            if dead:
                self.allocator.decref(dead[::-1])
                for c in range(self.first[seq], end):
                    pages[c] = None
                self.first[seq] = end
        return super().append(seq_ids, num_new_tokens)

    def flashinfer_metadata(self, seq_ids):
        indptr, indices, last = [0], [], []
        for seq in seq_ids:
            indices.extend(self.pages[seq][self.first[seq]:])
            indptr.append(len(indices))
            n = self.lens[seq]
            last.append(0 if n == 0 else (n - 1) % self.page_size + 1)
        return (np.array(indptr, dtype=np.int32), np.array(indices, dtype=np.int32),
                np.array(last, dtype=np.int32))


class PyPrefixPageTable(PyPageTable):
    """The baseline with prefix caching the way Python schedulers do it: a dict from
    (parent page, namespace, token tuple) to page, and an OrderedDict as the LRU of
    cached pages nobody uses. Keys hold the tokens themselves, so lookups are exact."""

    def __init__(self, allocator: PyPageAllocator, page_size: int, max_seqs: int):
        super().__init__(allocator, page_size, max_seqs)
        self.index: dict = {}            # key -> page
        self.key_of: dict = {}           # page -> key
        self.evictable: OrderedDict = OrderedDict()
        self.tokens: dict[int, list[int]] = {}
        self.ns: dict[int, int] = {}
        self.queried = self.hit = 0

    def _take_pages(self, n: int) -> list[int]:
        pages = []
        for _ in range(n):
            if self.allocator.free:
                page = self.allocator.free.pop()
            else:
                page, _ = self.evictable.popitem(last=False)
                del self.index[self.key_of.pop(page)]
            self.allocator.refcount[page] = 1
            pages.append(page)
        return pages

    def add_sequence(self, tokens=None, namespace: int = 0) -> int:
        seq = super().add_sequence()
        self.tokens[seq] = []
        self.ns[seq] = namespace
        if tokens is None:
            return seq
        ps, parent, pages = self.page_size, -1, []
        for i in range((len(tokens) - 1) // ps):
            key = (parent, namespace, tuple(tokens[i * ps:(i + 1) * ps]))
            page = self.index.get(key)
            if page is None:
                break
            pages.append(page)
            parent = page
        for page in pages:
            if self.allocator.refcount[page] == 0:
                del self.evictable[page]
            self.allocator.refcount[page] += 1
        self.pages[seq] = pages
        self.lens[seq] = len(pages) * ps
        self.tokens[seq] = list(tokens[:len(pages) * ps])
        self.queried += len(tokens)
        self.hit += len(pages) * ps
        return seq

    def append(self, seq_ids, num_new_tokens, token_ids=None):
        ps = self.page_size
        needed = sum(-(-(self.lens[s] + n) // ps) - len(self.pages[s])
                     for s, n in zip(seq_ids, num_new_tokens, strict=True))
        if needed > len(self.allocator.free) + len(self.evictable):
            raise MemoryError("out of pages")
        slot_mapping, j = [], 0
        for seq, n in zip(seq_ids, num_new_tokens, strict=True):
            pages, cur = self.pages[seq], self.lens[seq]
            pages.extend(self._take_pages(-(-(cur + n) // ps) - len(pages)))
            for t in range(cur, cur + n):
                slot_mapping.append(pages[t // ps] * ps + t % ps)
            self.lens[seq] = cur + n
            self.tokens[seq].extend(token_ids[j:j + n])
            j += n
            toks = self.tokens[seq]
            parent = -1 if cur // ps == 0 else pages[cur // ps - 1]
            for i in range(cur // ps, (cur + n) // ps):
                key = (parent, self.ns[seq], tuple(toks[i * ps:(i + 1) * ps]))
                found = self.index.get(key)
                if found is None:
                    self.index[key] = pages[i]
                    self.key_of[pages[i]] = key
                    found = pages[i]
                parent = found
        return np.array(slot_mapping, dtype=np.int64)

    def remove(self, seq: int) -> None:
        for page in reversed(self.pages.pop(seq)):
            self.allocator.refcount[page] -= 1
            if self.allocator.refcount[page] == 0:
                if page in self.key_of:
                    self.evictable[page] = None
                else:
                    self.allocator.free.append(page)
        del self.lens[seq], self.tokens[seq], self.ns[seq]
        self.free_ids.append(seq)
