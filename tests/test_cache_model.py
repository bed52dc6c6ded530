"""Model-based test of the whole KVCache: bookkeeping, prefix caching and the data.

A hypothesis state machine drives one KVCache (NumPy backend; the CUDA backend too
when a GPU is present) through add (with prefix hits), fork, append + write, gather,
copy_pages, remove, truncate (speculative decoding: append drafts, keep a prefix) and
eviction pressure, holding a plain model of every sequence's tokens. Half the runs
split the two layers into a full-attention group and a sliding-window group, which
releases pages as sequences move on and reads back only its live window. Sequences
also swap out to a small host tier and back (transfers finish when ``poll`` says so,
and some are made to fail), and whatever comes back must read back exactly. The K/V
content of a token is a function of its whole token prefix (as in a real model), so
whoever wrote a cached page, a sequence that hits it must read exactly its own
expected bytes. After every step the invariants hold and every live sequence
gathers exactly what the model says, in every layer.

Profiles: ``KVCORE_HYPOTHESIS_PROFILE=ci`` (default, thousands of steps) or ``long``.
"""

import functools
import hashlib
import json
import os

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcore import (
    EVENT_EVICTED,
    EVENT_STORED,
    CapacityError,
    KernelError,
    KVCache,
    KVCacheConfig,
    LayerGroup,
    OutOfPagesError,
    RollbackError,
    SequenceStateError,
)

LAYERS, HEADS, HEAD_DIM = 2, 1, 4
NUM_PAGES, MAX_SEQS = 24, 6
HOST_PAGES = 12


@functools.cache
def content(prefix_digest: bytes, layer: int, which: int) -> np.ndarray:
    """K (which=0) or V of one token: [HEADS, HEAD_DIM] float32 from its prefix digest."""
    seed = int.from_bytes(hashlib.blake2b(prefix_digest + bytes([layer, which]),
                                          digest_size=8).digest(), "little")
    out = (np.random.default_rng(seed).standard_normal((HEADS, HEAD_DIM)) + 5).astype(
        np.float32)
    out.flags.writeable = False   # shared through the cache
    return out


STEPS = {"steps": 0, "runs": 0, "swap_outs": 0, "swap_ins": 0, "failed": 0, "host_hits": 0}


class CacheMachine(RuleBasedStateMachine):
    """Set KVCORE_MODEL_REPORT=path to append the number of steps checked (JSON lines)."""

    device = "cpu"

    def __init__(self):
        super().__init__()
        self.cache = None
        STEPS["runs"] += 1

    def teardown(self):
        report = os.environ.get("KVCORE_MODEL_REPORT")
        if report and STEPS["runs"] % 50 == 0:
            with open(report, "a") as f:
                f.write(json.dumps({"device": self.device, **STEPS}) + "\n")

    @precondition(lambda self: self.cache is None)
    @rule(page_size=st.sampled_from([1, 2, 4]), layout=st.sampled_from(["NHD", "HND"]),
          window=st.sampled_from([None, None, 1, 3, 6]))
    def start(self, page_size, layout, window):
        # window: layer 1 becomes a sliding-window group next to layer 0's full group.
        groups = None if window is None else (LayerGroup([0]), LayerGroup([1], window=window))
        cfg = KVCacheConfig(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                            page_size=page_size, num_pages=NUM_PAGES, dtype="float32",
                            layout=layout, max_seqs=MAX_SEQS, max_pages_per_seq=NUM_PAGES,
                            enable_prefix_cache=True, layer_groups=groups,
                            num_host_pages=HOST_PAGES)
        self.cache = KVCache(cfg, device=self.device)
        self.ps = page_size
        self.window = window
        self.tokens = {}      # seq -> token ids
        self.digests = {}     # seq -> prefix digest per position
        self.cached_pages = set()
        self.away = {}        # seq -> state, for sequences not resident: swapped, leaving,
                              # arriving (their tokens and digests stay in the model)
        self.prompts = []     # the latest prompts, most recent first

    @property
    def resident(self):
        return sorted(s for s in self.tokens if s not in self.away)

    # -- helpers ---------------------------------------------------------------------------

    def _extend(self, seq, new_tokens):
        digests = self.digests[seq]
        for token in new_tokens:
            prev = digests[-1] if digests else b"root"
            digests.append(hashlib.blake2b(prev + int(token).to_bytes(4, "little"),
                                           digest_size=16).digest())
            self.tokens[seq].append(int(token))

    def _write(self, seqs, counts, slots):
        from_host = self.cache.from_host
        rows = [(seq, pos) for seq, n in zip(seqs, counts, strict=True)
                for pos in range(len(self.tokens[seq]) - n, len(self.tokens[seq]))]
        for layer in range(LAYERS):
            k = np.stack([content(self.digests[s][p], layer, 0) for s, p in rows]) if rows \
                else np.zeros((0, HEADS, HEAD_DIM), np.float32)
            v = np.stack([content(self.digests[s][p], layer, 1) for s, p in rows]) if rows \
                else np.zeros((0, HEADS, HEAD_DIM), np.float32)
            self.cache.write(layer, from_host(k), from_host(v), slots)

    def _track_events(self):
        kinds, pages, _ = self.cache.take_events()
        for kind, page in zip(kinds.tolist(), pages.tolist(), strict=True):
            if kind == EVENT_STORED:
                self.cached_pages.add(page)
            elif kind == EVENT_EVICTED:
                self.cached_pages.discard(page)

    # -- rules ------------------------------------------------------------------------------

    @precondition(lambda self: self.cache is not None)
    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=12),
          namespace=st.integers(0, 1), fail_load=st.booleans(), again=st.integers(0, 3))
    def add(self, prompt, namespace, fail_load, again):
        if again and self.prompts:   # often a prompt seen before, so that it can hit
            prompt = self.prompts[again % len(self.prompts)] + prompt[:1]
        self.prompts = [list(prompt), *self.prompts[:2]]
        try:
            seq = self.cache.add_sequence(prompt, namespace=namespace)
        except CapacityError:
            return
        if self.cache.seq_state(seq) == "swapping_in":
            # A hit on blocks offloaded to the host tier: they are being copied back.
            load = self.cache.pending_transfers[-1]
            assert load.kind == "load" and load.seq_ids.tolist() == [seq]
            hit = self.cache.num_tokens(seq)
            STEPS["host_hits"] += 1
            if fail_load:
                def broken(event):
                    raise KernelError("injected load failure")
                self.cache.backend.wait_transfer = broken
            try:
                finished = self.cache.wait(load)     # finishes whatever else completed too
            finally:
                if fail_load:
                    del self.cache.backend.wait_transfer
            self._finished([t for t in finished if t is not load], False)
            assert load.status == ("failed" if fail_load else "done")
            assert self.cache.seq_state(seq) == "resident"
            # Failed: only the hit before the first offloaded block is kept.
            assert (self.cache.num_tokens(seq) < hit) == fail_load
            self._track_events()
        cached = self.cache.num_tokens(seq)
        self.tokens[seq], self.digests[seq] = [], []
        self._extend(seq, prompt[:cached])
        rest = prompt[cached:]
        try:
            step = self.cache.append([seq], [len(rest)], token_ids=rest)
        except (OutOfPagesError, CapacityError):
            self.cache.remove(seq)
            del self.tokens[seq], self.digests[seq]
            return
        self._extend(seq, rest)
        self._write([seq], [len(rest)], step.slot_mapping)
        self._track_events()

    @precondition(lambda self: self.cache is not None and self.resident)
    @rule(data=st.data())
    def decode(self, data):
        live = self.resident
        batch = data.draw(st.lists(st.sampled_from(live), unique=True, min_size=1))
        counts = data.draw(st.lists(st.integers(0, 3), min_size=len(batch),
                                    max_size=len(batch)))
        ids = data.draw(st.lists(st.integers(0, 3), min_size=sum(counts),
                                 max_size=sum(counts)))
        try:
            step = self.cache.append(batch, counts, token_ids=ids)
        except (OutOfPagesError, CapacityError):
            return
        offset = 0
        for seq, n in zip(batch, counts, strict=True):
            self._extend(seq, ids[offset:offset + n])
            offset += n
        self._write(batch, counts, step.slot_mapping)
        self._track_events()

    @precondition(lambda self: self.cache is not None and self.resident)
    @rule(data=st.data())
    def speculate(self, data):
        """Append a verified token plus drafts, write them all, keep a random prefix."""
        live = self.resident
        batch = data.draw(st.lists(st.sampled_from(live), unique=True, min_size=1))
        drafts = data.draw(st.integers(1, 4))
        ids = data.draw(st.lists(st.integers(0, 3), min_size=len(batch) * (1 + drafts),
                                 max_size=len(batch) * (1 + drafts)))
        try:
            step = self.cache.append(batch, 1 + drafts, token_ids=ids)
        except (OutOfPagesError, CapacityError):
            return
        for i, seq in enumerate(batch):
            self._extend(seq, ids[i * (1 + drafts):(i + 1) * (1 + drafts)])
        self._write(batch, [1 + drafts] * len(batch), step.slot_mapping)
        accepted = data.draw(st.lists(st.integers(0, drafts), min_size=len(batch),
                                      max_size=len(batch)))
        keep = [len(self.tokens[seq]) - drafts + a for seq, a in zip(batch, accepted,
                                                                       strict=True)]
        self.cache.truncate(batch, keep)      # back to at least the pre-append length
        for seq, n in zip(batch, keep, strict=True):
            del self.tokens[seq][n:], self.digests[seq][n:]
        self._track_events()

    @precondition(lambda self: self.cache is not None and self.resident)
    @rule(data=st.data())
    def truncate(self, data):
        """Roll a sequence back by any amount: allowed, or RollbackError and no change."""
        seq = data.draw(st.sampled_from(self.resident))
        length = len(self.tokens[seq])
        new = data.draw(st.integers(0, length))
        pages_before = [self.cache.pages(seq, group=g).tolist()
                        for g in range(self.cache.num_groups)]
        try:
            self.cache.truncate([seq], [new])
        except RollbackError:
            assert self.window is not None
            assert self.cache.num_tokens(seq) == length
            assert [self.cache.pages(seq, group=g).tolist()
                    for g in range(self.cache.num_groups)] == pages_before
            return
        del self.tokens[seq][new:], self.digests[seq][new:]
        self._track_events()

    @precondition(lambda self: self.cache is not None and self.resident)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.resident))
        try:
            child = self.cache.fork(parent)
        except CapacityError:
            return
        self.tokens[child] = list(self.tokens[parent])
        self.digests[child] = list(self.digests[parent])

    @precondition(lambda self: self.cache is not None and self.tokens)
    @rule(data=st.data())
    def remove(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.cache.remove(seq)
        del self.tokens[seq], self.digests[seq]
        self.away.pop(seq, None)

    @precondition(lambda self: self.cache is not None and self.cache.num_free_pages > 0)
    @rule()
    def pressure(self):
        """Take every free page and give them back: cached pages are evicted, which
        offloads them to the host tier (one group) where later prompts can hit them."""
        try:
            filler = self.cache.add_sequence()
        except CapacityError:
            return
        tokens = self.cache.num_free_pages * self.ps
        while tokens and self.cache.pages_needed([filler], [tokens]) > self.cache.num_free_pages:
            tokens -= self.ps          # two groups: each token needs pages in both
        self.cache.append([filler], [tokens])
        self.cache.remove(filler)
        self._finished(self.cache.poll(), False)   # offloaded blocks become findable
        self._track_events()

    @precondition(lambda self: self.cache is not None and self.resident)
    @rule(data=st.data())
    def swap_out(self, data):
        batch = data.draw(st.lists(st.sampled_from(self.resident), unique=True, min_size=1))
        free = self.cache.num_free_host_pages
        try:
            transfer = self.cache.swap_out(batch)
        except OutOfPagesError:
            assert self.cache.swap_out_pages(batch) > free
            assert self.cache.num_free_host_pages == free
            return
        assert transfer.host_pages.size == len(set(transfer.host_pages.tolist()))
        STEPS["swap_outs"] += 1
        for seq in batch:
            self.away[seq] = "swapping_out"
        self._track_events()

    @precondition(lambda self: self.cache is not None
                  and any(v == "swapped" for v in self.away.values()))
    @rule(data=st.data())
    def swap_in(self, data):
        swapped = sorted(s for s, v in self.away.items() if v == "swapped")
        batch = data.draw(st.lists(st.sampled_from(swapped), unique=True, min_size=1))
        free = self.cache.num_free_pages
        try:
            self.cache.swap_in(batch)
        except OutOfPagesError:
            assert self.cache.swap_in_pages(batch) > free
            assert self.cache.num_free_pages == free
            return
        STEPS["swap_ins"] += 1
        for seq in batch:
            self.away[seq] = "swapping_in"
            # Not usable before it has arrived.
            with pytest.raises(SequenceStateError):
                self.cache.append([seq], [1])
        self._track_events()

    @precondition(lambda self: self.cache is not None and self.cache.pending_transfers)
    @rule(fail=st.booleans())
    def poll(self, fail):
        """Finish the transfers in flight; some are made to fail (fault injection)."""
        if fail:
            def broken(event):
                raise KernelError("injected transfer failure")
            self.cache.backend.transfer_done = broken
        try:
            finished = self.cache.poll()
        finally:
            if fail:
                del self.cache.backend.transfer_done
        assert finished and not self.cache.pending_transfers
        STEPS["failed"] += len(finished) if fail else 0
        self._finished(finished, fail)

    def _finished(self, finished, fail):
        """Follow the transfers ``poll`` finished in the model."""
        for transfer in finished:
            assert transfer.status == ("failed" if fail else "done")
            for seq in transfer.seq_ids.tolist():
                if seq not in self.away:
                    continue                  # removed while in flight
                leaving = transfer.direction == "out"
                if leaving != fail:           # out and done, or in and failed
                    self.away[seq] = "swapped"
                else:                         # back on the device, data intact
                    del self.away[seq]
        self._track_events()

    @precondition(lambda self: self.cache is not None and self.tokens)
    @rule(data=st.data())
    def copy_pages(self, data):
        """Copy live pages into clean free pages (neither mapped nor cached)."""
        used = {int(p) for p in np.flatnonzero(self.cache.allocator.refcounts)}
        used_by_resident = {int(p) for s in self.resident for g in range(self.cache.num_groups)
                            for p in self.cache.pages(s, group=g)}
        assert used_by_resident <= used
        clean = sorted(set(range(NUM_PAGES)) - used - self.cached_pages)
        if not used or not clean:
            return
        n = data.draw(st.integers(1, min(3, len(clean), len(used))))
        src = data.draw(st.lists(st.sampled_from(sorted(used_by_resident or used)),
                                 min_size=n, max_size=n))
        dst = data.draw(st.lists(st.sampled_from(clean), min_size=n, max_size=n,
                                 unique=True))
        self.cache.copy_pages(src, dst)
        kv = self.cache.to_host(self.cache.kv)
        for s, d in zip(src, dst, strict=True):
            assert np.array_equal(kv[:, :, d], kv[:, :, s])

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def everything_reads_back(self):
        if self.cache is None:
            return
        STEPS["steps"] += 1
        self.cache.check_invariants()
        self.cache.synchronize()
        for seq, state in self.away.items():
            assert self.cache.seq_state(seq) == state
            assert self.cache.num_tokens(seq) == len(self.tokens[seq])
        live = self.resident
        if not live:
            return
        for layer in range(LAYERS):
            k, v, indptr = self.cache.gather(layer, live)
            k, v = self.cache.to_host(k), self.cache.to_host(v)
            group = self.cache.config.layer_group(layer)
            for b, seq in enumerate(live):
                # A window group reads back its live window: from its first mapped page.
                first = self.cache.first_page(seq, group=group) * self.ps
                if self.window is not None and group == 1:
                    assert first <= max(0, len(self.tokens[seq]) - self.window + 1)
                assert indptr[b + 1] - indptr[b] == len(self.tokens[seq]) - first
                for i, digest in enumerate(self.digests[seq][first:]):
                    row = indptr[b] + i
                    assert np.array_equal(k[row], content(digest, layer, 0)), (seq, i, layer)
                    assert np.array_equal(v[row], content(digest, layer, 1)), (seq, i, layer)


TestCacheMachine = CacheMachine.TestCase


class CudaCacheMachine(CacheMachine):
    device = "cuda"


TestCudaCacheMachine = pytest.mark.cuda(CudaCacheMachine.TestCase)
