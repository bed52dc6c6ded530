"""kvcore.events: vLLM 0.33.0's KV-event wire format, and its publisher on real sockets.

Needs the ``events`` extra (msgspec, pyzmq). Without it these tests skip, except under
``CI=true``, where a missing extra is a failure: CI must run them.

The reference for the format is a set of structs written here to mirror
``vllm/distributed/kv_events.py`` of vLLM 0.33.0 exactly (names, tags, field order,
defaults, struct options): kvcore's bytes must equal theirs, and a decoder built from
them (vLLM's own, in effect) must read every batch kvcore publishes.
"""

import collections
import doctest
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import pytest

if os.environ.get("CI") != "true":   # CI installs the events extra: there a gap fails
    pytest.importorskip("msgspec")
    pytest.importorskip("zmq")

import msgspec
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcore
from kvcore import (
    CapacityError,
    KVCache,
    KVCacheConfig,
    LayerGroup,
    OutOfPagesError,
    PageAllocator,
    PageTable,
    RollbackError,
    SequenceStateError,
)
from kvcore import events as ev
from kvcore.page_hash import prompt_hashes

# -- vLLM 0.33.0's structs, mirrored (the reference; kvcore's module must not be used) ---------


class VEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class VKVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(VKVCacheEvent):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class BlockRemoved(VKVCacheEvent):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(VKVCacheEvent):
    pass


class KVEventBatch(VEventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


VLLM_DECODER = msgspec.msgpack.Decoder(KVEventBatch)
VLLM = {"BlockStored": BlockStored, "BlockRemoved": BlockRemoved,
        "AllBlocksCleared": AllBlocksCleared}


def as_vllm(batch):
    """The same batch built from the vLLM structs (kvcore's extra fields dropped)."""
    events = []
    for e in batch.events:
        cls = VLLM[type(e).__name__]
        fields = {f: getattr(e, f) for f in cls.__struct_fields__}
        events.append(cls(**fields))
    return KVEventBatch(batch.ts, events, batch.data_parallel_rank)


def strip_reason(batch):
    """kvcore's batch without its ``reason`` fields: what vLLM's decoder should read."""
    return ev.KVEventBatch(batch.ts, [msgspec.structs.replace(e, reason=None)
                                      if isinstance(e, ev.BlockRemoved) else e
                                      for e in batch.events], batch.data_parallel_rank)


# -- the schema itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BlockStored", "BlockRemoved", "AllBlocksCleared"])
def test_struct_options_and_fields_are_vllms(name):
    ours, theirs = getattr(ev, name), VLLM[name]
    for option in ("array_like", "omit_defaults", "tag", "tag_field", "forbid_unknown_fields",
                   "gc"):
        assert getattr(ours.__struct_config__, option) == getattr(theirs.__struct_config__,
                                                                  option), option
    n = len(theirs.__struct_fields__)
    assert ours.__struct_fields__[:n] == theirs.__struct_fields__
    assert ours.__struct_encode_fields__[:n] == theirs.__struct_encode_fields__
    assert ours.__struct_defaults__[:len(theirs.__struct_defaults__)] == \
        theirs.__struct_defaults__
    # kvcore's own fields come last and are optional (None, so never written by default)
    assert all(d is None for d in ours.__struct_defaults__[len(theirs.__struct_defaults__):])
    assert ours.__struct_config__.tag == name and ours.__struct_config__.tag_field == "type"


def test_batch_options_are_vllms():
    for option in ("array_like", "omit_defaults", "tag", "forbid_unknown_fields"):
        assert getattr(ev.KVEventBatch.__struct_config__, option) == getattr(
            KVEventBatch.__struct_config__, option)
    assert ev.KVEventBatch.__struct_fields__ == KVEventBatch.__struct_fields__
    assert ev.VLLM_VERSION == "0.33.0"


def test_event_kinds_agree_with_the_core():
    assert (ev._STORED, ev._EVICTED, ev._HOST_STORED, ev._HOST_EVICTED) == (
        kvcore.EVENT_STORED, kvcore.EVENT_EVICTED, kvcore.EVENT_HOST_STORED,
        kvcore.EVENT_HOST_EVICTED)


def test_every_field_set_encodes_as_vllm():
    stored = dict(block_hashes=[1, b"\x01" * 32, 2**64 - 1], parent_block_hash=b"\x02" * 32,
                  token_ids=[1, 2, 3], block_size=1, lora_id=3, medium="CPU", lora_name="x",
                  extra_keys=[("a", 1), None, ("b",)], group_idx=2, kv_cache_spec_kind="full",
                  kv_cache_spec_sliding_window=4, locality="LOCAL", ownership="o",
                  session_id="s", lookahead_token_ids=[[1], [2], [3]])
    removed = dict(block_hashes=[1], medium=None, group_idx=1, locality="REMOTE",
                   ownership="z")
    ours = ev.KVEventBatch(3.5, [ev.BlockStored(**stored), ev.BlockRemoved(**removed),
                                 ev.AllBlocksCleared()], 7)
    theirs = KVEventBatch(3.5, [BlockStored(**stored), BlockRemoved(**removed),
                                AllBlocksCleared()], 7)
    assert ev.encode(ours) == msgspec.msgpack.encode(theirs)
    assert ev.decode(msgspec.msgpack.encode(theirs)) == ours


# Hashes from a small set too, so that one hash comes back (stored, moved, removed again).
events_strategy = st.lists(st.tuples(st.integers(1, 4), st.integers(0, 2**31 - 1),
                                     st.integers(0, 3) | st.integers(0, 2**64 - 1)),
                           max_size=40)


@settings(max_examples=300, deadline=None)
@given(raw=events_strategy, reason=st.sampled_from([None, "evicted", "truncated"]),
       rank=st.sampled_from([None, 0, 3]), group=st.sampled_from([None, 0]),
       cleared=st.booleans(), block_size=st.integers(1, 64), moves=st.booleans())
def test_to_batch_encodes_exactly_as_vllm(raw, reason, rank, group, cleared, block_size, moves):
    if moves:   # turn some removals into moves: the other tier stores the same hash next
        out = []
        for kind, page, h in raw:
            out.append((kind, page, h))
            if kind in (2, 4):
                out.append((3 if kind == 2 else 1, page, h))
        raw = out
    kinds = np.array([r[0] for r in raw], np.uint8)
    pages = np.array([r[1] for r in raw], np.int32)
    hashes = np.array([r[2] for r in raw], np.uint64)
    batch = ev.to_batch(kinds, pages, hashes, block_size=block_size, ts=12.5,
                        data_parallel_rank=rank, group_idx=group, reason=reason,
                        cleared=cleared)
    payload = ev.encode(batch)
    # Without kvcore's extra field: byte for byte what vLLM's structs encode.
    assert ev.encode(strip_reason(batch)) == msgspec.msgpack.encode(as_vllm(batch))
    # With it: vLLM's decoder still reads the batch, and sees every vLLM field.
    assert VLLM_DECODER.decode(payload) == as_vllm(batch)
    assert ev.decode(payload) == batch
    # The events of each (medium, hash) are the input's, in the input's order (only
    # runs of moves are regrouped), so every consumer ends in the same state.
    def per_key(ops):
        keys = collections.defaultdict(list)
        for medium, op, h in ops:
            keys[medium, h].append(op)
        return keys

    published = [(e.medium, type(e).__name__, h) for e in batch.events
                 if not isinstance(e, ev.AllBlocksCleared) for h in e.block_hashes]
    taken = [("GPU" if k <= 2 else "CPU", "BlockStored" if k in (1, 3) else "BlockRemoved",
              int(h)) for k, h in zip(kinds.tolist(), hashes.tolist(), strict=True)]
    assert len(published) == len(taken) and per_key(published) == per_key(taken)
    for e in batch.events:            # a move's removal is followed by its store
        if isinstance(e, ev.BlockRemoved) and e.reason == "moved":
            nxt = batch.events[batch.events.index(e) + 1]
            assert isinstance(nxt, ev.BlockStored) and nxt.block_hashes == e.block_hashes
            assert {nxt.medium, e.medium} == {"GPU", "CPU"}
    assert (bool(batch.events) and isinstance(batch.events[-1], ev.AllBlocksCleared)) == cleared
    for e in batch.events:
        if isinstance(e, ev.BlockStored):
            assert (e.parent_block_hash, e.token_ids, e.block_size, e.group_idx) == (
                None, [], block_size, group)
        if isinstance(e, ev.BlockRemoved):
            assert e.reason in (reason, "moved")


def test_runs_moves_and_unsigned_hashes():
    top = 2**64 - 1
    kinds = np.array([1, 1, 1, 2, 2, 3, 2, 3, 3, 4, 1, 4, 1, 4], np.uint8)
    hashes = np.array([10, 11, top, 10, 11, 11, 12, 12, 13, 12, 12, 14, 14, 99], np.uint64)
    batch = ev.to_batch(kinds, np.zeros(14, np.int32), hashes, block_size=16, ts=1.0,
                        reason="evicted")
    got = [(type(e).__name__, e.medium, e.block_hashes, getattr(e, "reason", None))
           for e in batch.events]
    assert got == [
        ("BlockStored", "GPU", [10, 11, top], None),
        ("BlockRemoved", "GPU", [10], "evicted"),
        ("BlockRemoved", "GPU", [11, 12], "moved"),   # two offloads: removal + host store
        ("BlockStored", "CPU", [11, 12], None),
        ("BlockStored", "CPU", [13], None),           # a host store that is not a move
        ("BlockRemoved", "CPU", [12, 14], "moved"),   # two loads: host removal + store
        ("BlockStored", "GPU", [12, 14], None),
        ("BlockRemoved", "CPU", [99], "evicted"),
    ]
    # 2**64 - 1 goes on the wire as msgpack uint64 (0xcf), as vLLM's unsigned int hashes.
    assert b"\xcf" + b"\xff" * 8 in ev.encode(batch)
    assert VLLM_DECODER.decode(ev.encode(batch)).events[0].block_hashes[2] == top


def test_unknown_fields_are_ignored_unless_forbidden():
    """Why ``reason`` is safe: events are maps and msgspec skips unknown keys, unless a
    struct sets ``forbid_unknown_fields`` (vLLM's do not); the batch is an array, whose
    extra trailing items are skipped under the same condition."""
    batch = ev.KVEventBatch(1.0, [ev.BlockRemoved([5], "GPU", reason="moved")], 0)

    class StrictRemoved(msgspec.Struct, tag="BlockRemoved", forbid_unknown_fields=True):
        block_hashes: list[int]
        medium: str | None

    class StrictBatch(VEventBatch):
        events: list[StrictRemoved]

    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(ev.encode(batch), type=StrictBatch)
    plain = ev.KVEventBatch(1.0, [ev.BlockRemoved([5], "GPU")], 0)   # reason None: omitted
    assert msgspec.msgpack.decode(ev.encode(plain), type=StrictBatch).events == [
        StrictRemoved([5], "GPU")]
    assert VLLM_DECODER.decode(ev.encode(batch)).events == [BlockRemoved([5], "GPU")]
    trailing = msgspec.msgpack.encode([1.0, [], 0, "a later field"])
    assert VLLM_DECODER.decode(trailing) == KVEventBatch(1.0, [], 0)


def test_a_real_caches_events():
    """Offloads from a real cache come out as moves to the CPU medium."""
    cfg = KVCacheConfig(1, 1, 4, 4, 8, dtype="float32", max_seqs=4, max_pages_per_seq=8,
                        enable_prefix_cache=True, num_host_pages=8)
    cache = KVCache(cfg, device="cpu")
    seq = cache.add_sequence()
    cache.append([seq], [17], token_ids=list(range(17)))
    cache.remove(seq)
    filler = cache.add_sequence()
    cache.append([filler], [32])          # every page: the four cached ones are offloaded
    cache.poll()
    batch = ev.to_batch(*cache.take_events(), block_size=4)
    stored = prompt_hashes(list(range(17)), 4)
    assert batch.events[0] == ev.BlockStored(stored, None, [], 4, None, "GPU", None)
    moved = [h for e in batch.events if isinstance(e, ev.BlockRemoved) and e.reason == "moved"
             for h in e.block_hashes]
    on_host = [h for e in batch.events if isinstance(e, ev.BlockStored) and e.medium == "CPU"
               for h in e.block_hashes]
    assert sorted(moved) == sorted(on_host) == sorted(stored)


@pytest.mark.parametrize("bad", [
    dict(kinds=[1, 2], pages=[0], hashes=[1, 2]),
    dict(kinds=[1], pages=[0], hashes=[1, 2]),
    dict(kinds=[[1]], pages=[[0]], hashes=[[1]]),
    dict(kinds=[0], pages=[0], hashes=[1]),
    dict(kinds=[5], pages=[0], hashes=[1]),
    dict(kinds=[1], pages=[0], hashes=[-1]),
    dict(kinds=[1], pages=[0], hashes=[1.5]),
    dict(kinds=[1.0], pages=[0], hashes=[1]),
])
def test_to_batch_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        ev.to_batch(np.asarray(bad["kinds"]), np.asarray(bad["pages"]),
                    np.asarray(bad["hashes"]), block_size=4)


@pytest.mark.parametrize("block_size", [0, -1, True, 2.5])
def test_to_batch_rejects_a_bad_block_size(block_size):
    with pytest.raises(ValueError):
        ev.to_batch(np.ones(1, np.uint8), np.zeros(1, np.int32), np.ones(1, np.uint64),
                    block_size=block_size)


def test_empty_events_and_doc_examples():
    batch = ev.to_batch(*PageTable(PageAllocator(4), 4, 2, 2).take_events(), block_size=4)
    assert batch.events == [] and batch.ts > 0
    assert ev.encode(ev.to_batch(np.zeros(0, np.uint8), np.zeros(0, np.int32),
                                 np.zeros(0, np.uint64), block_size=4, ts=0.0)) == \
        msgspec.msgpack.encode(KVEventBatch(0.0, []))
    result = doctest.testmod(ev, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_import_kvcore_imports_neither_msgspec_nor_zmq():
    code = ("import sys, kvcore; assert 'msgspec' not in sys.modules; "
            "assert 'zmq' not in sys.modules; import kvcore.events; "
            "assert 'zmq' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- sockets -------------------------------------------------------------------------------------

def publisher_threads():
    return sum(t.name == "kvcore-events" for t in threading.enumerate())


@pytest.fixture(params=["tcp", "ipc"])
def endpoints(request):
    """A PUB and a replay endpoint to bind: a free port on 127.0.0.1, or ipc files."""
    if request.param == "tcp":
        yield "tcp://127.0.0.1:*", "tcp://127.0.0.1:*"
        return
    with tempfile.TemporaryDirectory(prefix="kvev") as tmp:   # short: ipc paths are limited
        yield f"ipc://{tmp}/pub", f"ipc://{tmp}/replay"


@pytest.fixture
def pubsub(endpoints):
    pub = ev.EventPublisher(endpoints[0], replay_endpoint=endpoints[1], topic="kv@1")
    sub = ev.EventSubscriber(pub.endpoint, replay_endpoint=pub.replay_endpoint, topic="kv@1")
    yield pub, sub
    sub.close()
    pub.close()


class Tee:
    """What the publisher sees: the cache, whose raw events are also kept here."""

    def __init__(self, cache):
        self.cache, self.table = cache, cache.table
        self.taken = []

    def take_events(self):
        events = self.cache.take_events()
        self.taken.append(events)
        return events

    def clear_prefix_cache(self):
        self.cache.clear_prefix_cache()


class View:
    """A router's view of one replica, built from the wire alone: a count per
    (medium, hash), since the index may hold two pages of one hash."""

    def __init__(self):
        self.media = collections.defaultdict(collections.Counter)

    def apply(self, batch):
        for e in batch.events:
            if isinstance(e, ev.AllBlocksCleared):
                self.media.clear()
                continue
            counts = self.media[e.medium]
            for h in e.block_hashes:
                if isinstance(e, ev.BlockStored):
                    counts[h] += 1
                else:
                    assert counts[h] > 0, f"removal of {h} that was never stored"
                    counts[h] -= 1
                    if not counts[h]:
                        del counts[h]

    def hashes(self, medium):
        return self.media.get(medium, collections.Counter())


class Model:
    """The index from take_events, by tier and page id: every removal must match a store."""

    def __init__(self):
        self.tiers = {"GPU": {}, "CPU": {}}

    def apply(self, kinds, pages, hashes):
        for k, p, h in zip(kinds.tolist(), pages.tolist(), hashes.tolist(), strict=True):
            tier = self.tiers["GPU" if k <= 2 else "CPU"]
            if k in (1, 3):
                assert p not in tier
                tier[p] = h
            else:
                assert tier.pop(p) == h


def make_cache(kind):
    layers = 2 if kind == "window" else 1
    groups = (LayerGroup([0]), LayerGroup([1], window=5)) if kind == "window" else None
    cfg = KVCacheConfig(layers, 1, 4, 4, 40, dtype="float32", max_seqs=6,
                        max_pages_per_seq=40, enable_prefix_cache=True, layer_groups=groups,
                        num_host_pages=16 if kind == "host" else 0)
    return KVCache(cfg, device="cpu")


def random_step(cache, rng, live, prompts, bases):
    """One random operation of a serving loop; returns a removal reason it knows."""
    op = rng.choice(["add", "add", "add", "decode", "decode", "truncate", "fork", "remove",
                     "pressure", "swap"])
    try:
        if op == "add":
            if len(live) >= 4:                # keep room: a sequence id and pages
                cache.remove(live.pop(0))
            base = bases[rng.integers(len(bases))][:rng.integers(0, 30)]
            prompt = base + rng.integers(0, 3, rng.integers(1, 9)).tolist()
            ns = int(rng.integers(0, 2))
            # Random retention priorities: evictions take the lowest first.
            seq = cache.add_sequence(prompt, namespace=ns,
                                     retention=int(rng.integers(0, 101)))
            cache.wait()                  # a host-tier hit is loaded
            rest = prompt[cache.num_tokens(seq):]
            try:
                cache.append([seq], [len(rest)], token_ids=rest)
            except (OutOfPagesError, CapacityError):
                cache.remove(seq)
                return None
            live.append(seq)
            prompts.append((prompt, ns))
        elif op == "decode" and live:
            batch = sorted(set(rng.choice(live, rng.integers(1, len(live) + 1)).tolist()))
            counts = rng.integers(0, 6, len(batch)).tolist()
            cache.append(batch, counts, token_ids=rng.integers(0, 3, sum(counts)).tolist())
        elif op == "truncate" and live:
            seq = int(rng.choice(live))
            cache.truncate([seq], [int(rng.integers(0, cache.num_tokens(seq) + 1))])
            return "truncated"
        elif op == "fork" and live:
            live.append(cache.fork(int(rng.choice(live))))
        elif op == "remove" and live:
            cache.remove(live.pop(int(rng.integers(len(live)))))
        elif op == "pressure" and cache.num_free_pages:
            filler = cache.add_sequence()
            try:
                tokens = cache.num_free_pages * 4
                while tokens and cache.pages_needed([filler], [tokens]) > cache.num_free_pages:
                    tokens -= 4               # two groups: a token needs pages in both
                cache.append([filler], [tokens])
            finally:
                cache.remove(filler)
            cache.poll()
            return "evicted"
        elif op == "swap" and live and cache.host_tier is not None:
            seq = int(rng.choice(live))
            cache.wait(cache.swap_out([seq]))
            cache.wait(cache.swap_in([seq]))
    except (OutOfPagesError, CapacityError, SequenceStateError, RollbackError):
        pass
    return None


def check_view(view, model, cache, prompts):
    # 1. The wire's view is the index, page for page, as take_events reported it.
    for medium in ("GPU", "CPU"):
        assert view.hashes(medium) == collections.Counter(model.tiers[medium].values())
    # 2. ... and the index's own counts agree.
    stats = cache.prefix_stats
    assert len(model.tiers["CPU"]) == stats.get("host_cached_pages", 0)
    assert len(model.tiers["GPU"]) + len(model.tiers["CPU"]) == cache.num_cached_pages
    # 3. Every prefix a lookup finds is in the view, under the hash a router computes.
    held = view.hashes("GPU") + view.hashes("CPU")
    # 4. The view is the index's own set of hashes (both tiers).
    assert held == collections.Counter(int(h) for h in cache.cached_hashes())
    for prompt, ns in prompts[-12:]:
        hits = cache.match_prefix([*prompt, 0], namespace=ns) // 4
        assert all(h in held for h in prompt_hashes(prompt, 4, ns)[:hits])


@pytest.mark.parametrize("kind", ["plain", "host", "window"])
def test_subscriber_rebuilds_the_index_after_every_step(pubsub, kind):
    pub, sub = pubsub
    rng = np.random.default_rng(sum(map(ord, kind)))
    cache = make_cache(kind)
    tee, view, model = Tee(cache), View(), Model()
    live, prompts = [], []
    bases = [rng.integers(0, 3, 40).tolist() for _ in range(3)]
    sent = moves = 0
    for step in range(250):
        reason = random_step(cache, rng, live, prompts, bases)
        cache.check_invariants()
        if step % 97 == 96:
            seq = pub.clear(tee)
        else:
            seq = pub.publish(tee, reason=reason)
        for kinds, pages, hashes in tee.taken:
            model.apply(kinds, pages, hashes)
        tee.taken.clear()
        if seq is not None:
            for got, batch in sub.catch_up(seq):
                assert got == sent and batch.data_parallel_rank == 0
                sent += 1
                view.apply(batch)
                moves += sum(e.reason == "moved" for e in batch.events
                             if isinstance(e, ev.BlockRemoved))
        check_view(view, model, cache, prompts)
    assert sent > 100 and sub.missed == 0 and sub.malformed == 0
    assert (moves > 0) == (kind == "host")
    stats = pub.stats()
    assert stats["errors"] == 0 and stats["ring_overflows"] == 0


def test_wire_framing_and_replay_protocol(endpoints):
    """The exact frames, read with raw sockets: PUB (topic, 8-byte big-endian seq,
    payload); replay request [b"", start] from a DEALER, answers [b"", topic, seq,
    payload] per buffered batch from ``start``, then [b"", b"", -1, b""]."""
    ctx = zmq.Context.instance()
    with ev.EventPublisher(endpoints[0], replay_endpoint=endpoints[1], topic=b"t",
                           data_parallel_rank=2) as pub:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub.endpoint)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(pub.replay_endpoint)
        batches = [ev.KVEventBatch(float(i), [ev.BlockRemoved([i], "GPU")]) for i in range(5)]
        # A slow joiner may miss the first messages: publish until one arrives.
        deadline = time.monotonic() + 10
        first = None
        while first is None and time.monotonic() < deadline:
            pub.publish_batch(ev.KVEventBatch(0.0, []))
            if sub.poll(100):
                first = sub.recv_multipart()
        assert first is not None and first[0] == b"t" and len(first[1]) == 8
        base = pub.last_seq + 1
        for b in batches:
            pub.publish_batch(b)
        received = []
        while len(received) < len(batches):
            assert sub.poll(5000)
            topic, seq, payload = sub.recv_multipart()
            if int.from_bytes(seq, "big") >= base:     # not a late probe
                received.append((topic, seq, payload))
        for i, b in enumerate(batches):
            topic, seq, payload = received[i]
            assert (topic, seq) == (b"t", (base + i).to_bytes(8, "big"))
            assert payload == ev.encode(b) and ev.decode(payload).data_parallel_rank == 2
        dealer.send_multipart([b"", (base + 3).to_bytes(8, "big")])
        answer = []
        while True:
            assert dealer.poll(5000)
            frames = dealer.recv_multipart()
            if frames[2] == ev.END_SEQ:
                assert frames == [b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
                break
            answer.append(frames)
        assert answer == [[b"", b"t", (base + i).to_bytes(8, "big"), ev.encode(batches[i])]
                          for i in (3, 4)]
        # A request of the wrong shape is ignored, as vLLM ignores it; the next is served.
        dealer.send_multipart([b"", b"x", b"y"])
        assert not dealer.poll(300)
        dealer.send_multipart([b"", (base + 5).to_bytes(8, "big")])
        assert dealer.poll(5000) and dealer.recv_multipart()[2] == ev.END_SEQ
        sub.close(0)
        dealer.close(0)
    assert pub.stats()["replays"] == 2


def test_replay_of_a_missed_range(endpoints):
    with ev.EventPublisher(endpoints[0], replay_endpoint=endpoints[1], buffer=4) as pub:
        table = PageTable(PageAllocator(64), 4, 8, 16, enable_prefix_cache=True)
        last = None
        for i in range(10):                   # before anyone listens
            seq = table.add_sequence()
            table.append([seq], [8], token_ids=[i] * 8)
            table.remove(seq)                 # its pages stay cached
            last = pub.publish(table)
        assert last == 9 and pub.flush()
        # A late subscriber asks for everything: only the last 4 are still buffered.
        with ev.EventSubscriber(pub.endpoint, replay_endpoint=pub.replay_endpoint) as sub:
            got = sub.catch_up(last)
            assert [s for s, _ in got] == [6, 7, 8, 9]
            assert sub.missed == 6 and sub.next_seq == 10
            # Replay by hand: a range still buffered, then one that is gone.
            assert [s for s, _ in sub.replay(8)] == [8, 9]
            assert [s for s, _ in sub.replay(0)] == [6, 7, 8, 9]
            assert sub.replay(100) == []
            # A subscriber that starts later, at a given sequence number.
        with ev.EventSubscriber(pub.endpoint, replay_endpoint=pub.replay_endpoint,
                                start_seq=8) as sub:
            assert [s for s, _ in sub.catch_up(9)] == [8, 9] and sub.missed == 0


def test_a_gap_in_the_live_stream_is_filled_by_replay(pubsub):
    pub, sub = pubsub
    sub.catch_up(pub.publish_batch(ev.KVEventBatch(0.0, [])))
    # Drop the subscriber's next messages on the floor, as a full HWM would.
    pub.publish_batch(ev.KVEventBatch(1.0, [ev.BlockRemoved([1], "GPU")]))
    pub.publish_batch(ev.KVEventBatch(2.0, [ev.BlockRemoved([2], "GPU")]))
    assert sub._sub.poll(5000)
    while sub._sub.poll(300):
        sub._sub.recv_multipart()
    last = pub.publish_batch(ev.KVEventBatch(3.0, [ev.BlockRemoved([3], "GPU")]))
    got = sub.catch_up(last)
    assert [(s, b.ts) for s, b in got] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert sub.missed == 0


def test_topics_filter(endpoints):
    with ev.EventPublisher(endpoints[0], replay_endpoint=endpoints[1], topic="kv") as pub, \
            ev.EventSubscriber(pub.endpoint, topic="other") as other, \
            ev.EventSubscriber(pub.endpoint, replay_endpoint=pub.replay_endpoint,
                               topic="kv") as sub:
        for _ in range(20):
            last = pub.publish_batch(ev.KVEventBatch(0.0, []))
            time.sleep(0.01)
        assert [s for s, _ in sub.catch_up(last)] == list(range(20))
        assert other.receive(0.3) == []


def test_close_sends_what_is_queued(endpoints):
    pub = ev.EventPublisher(endpoints[0], replay_endpoint=endpoints[1])
    sub = ev.EventSubscriber(pub.endpoint, replay_endpoint=pub.replay_endpoint)
    sub.catch_up(pub.publish_batch(ev.KVEventBatch(0.0, [])))    # connected and subscribed
    for i in range(200):
        last = pub.publish_batch(ev.KVEventBatch(float(i), [ev.BlockRemoved([i], "CPU")]))
    pub.close()
    got = []
    while sub.next_seq <= last:
        batch = sub.receive(5.0)
        assert batch, f"stopped at {sub.next_seq}"
        got += batch
    assert [s for s, _ in got] == list(range(1, last + 1)) and sub.missed == 0
    sub.close()


# -- hostile inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint, error", [
    ("nonsense", ValueError),
    ("tcp://127.0.0.1:notaport", ValueError),
    ("bogus://x", ValueError),
    (5557, TypeError),
    (None, TypeError),
])
def test_bad_endpoints(endpoint, error):
    before = publisher_threads()
    with pytest.raises(error):
        ev.EventPublisher(endpoint, bind=True)
    if endpoint is not None:                  # None: no replay socket, which is fine
        with pytest.raises(error):
            ev.EventPublisher("tcp://127.0.0.1:*", replay_endpoint=endpoint)
        with pytest.raises(error):
            ev.EventSubscriber("tcp://127.0.0.1:1", replay_endpoint=endpoint)
    with pytest.raises(error):
        ev.EventSubscriber(endpoint)
    assert publisher_threads() == before


def test_an_address_in_use():
    with ev.EventPublisher("tcp://127.0.0.1:*") as pub:
        before = publisher_threads()
        with pytest.raises(OSError):
            ev.EventPublisher(pub.endpoint, bind=True)
        with pytest.raises(OSError):
            ev.EventPublisher("tcp://127.0.0.1:*", replay_endpoint=pub.endpoint)
        assert publisher_threads() == before


@pytest.mark.parametrize("kwargs", [dict(buffer=0), dict(hwm=-1), dict(max_queue=True),
                                    dict(buffer=1.5)])
def test_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        ev.EventPublisher("tcp://127.0.0.1:*", **kwargs)


def test_bad_topic():
    with pytest.raises(TypeError):
        ev.EventPublisher("tcp://127.0.0.1:*", topic=5)


def test_publish_after_close_and_bad_batches():
    table = PageTable(PageAllocator(8), 4, 2, 4, enable_prefix_cache=True)
    seq = table.add_sequence()
    table.append([seq], [9], token_ids=list(range(9)))
    before = publisher_threads()
    pub = ev.EventPublisher("tcp://127.0.0.1:*")
    with pytest.raises(TypeError):
        pub.publish_batch([1.0, []])
    with pytest.raises(TypeError):
        pub.publish_batch(KVEventBatch(1.0, []))      # vLLM's struct, not kvcore's
    assert pub.publish(PageTable(PageAllocator(4), 4, 2, 2)) is None     # no events
    pub.close()
    pub.close()                                        # idempotent
    assert publisher_threads() == before and not pub._thread.is_alive()
    with pytest.raises(RuntimeError):
        pub.publish(table)
    with pytest.raises(RuntimeError):
        pub.publish_batch(ev.KVEventBatch(1.0, []))
    with pytest.raises(RuntimeError):
        pub.clear(table)
    # The events were not taken by the refused publish.
    assert table.take_events()[0].tolist() == [1, 1]


def test_subscriber_survives_garbage():
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.bind("tcp://127.0.0.1:*")
    endpoint = raw.getsockopt_string(zmq.LAST_ENDPOINT)
    with ev.EventSubscriber(endpoint) as sub:
        deadline = time.monotonic() + 10
        while not sub.malformed and time.monotonic() < deadline:   # wrong frame count
            raw.send_multipart([b"", b"x"])
            assert sub.receive(0.05) == []
        assert sub.malformed
        count = sub.malformed
        raw.send_multipart([b"", b"short", b"\x90"])                # seq not 8 bytes
        raw.send_multipart([b"", (0).to_bytes(8, "big"), b"\xc1"])  # not msgpack
        raw.send_multipart([b"", (1).to_bytes(8, "big"), msgspec.msgpack.encode({"a": 1})])
        good = ev.KVEventBatch(2.0, [ev.AllBlocksCleared()])
        raw.send_multipart([b"", (2).to_bytes(8, "big"), ev.encode(good)])
        got = []
        while sub.next_seq < 3:
            got += sub.receive(5.0)
        assert got == [(2, good)] and sub.malformed >= count + 3
        with pytest.raises(RuntimeError):
            sub.replay(0)                                           # no replay endpoint
        with pytest.raises(ValueError):
            sub.replay(-1)
    raw.close(0)


def test_replay_timeout_replaces_the_socket():
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)                 # never answers
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    with ev.EventSubscriber("tcp://127.0.0.1:1", replay_endpoint=router.getsockopt_string(
            zmq.LAST_ENDPOINT)) as sub:
        with pytest.raises(TimeoutError):
            sub.replay(0, timeout=0.2)
        with pytest.raises(TimeoutError):
            sub.catch_up(0, timeout=0.5)
    router.close(0)


def test_bad_start_seq():
    with pytest.raises(ValueError):
        ev.EventSubscriber("tcp://127.0.0.1:1", start_seq=-1)


def test_ring_overflow_is_counted():
    table = PageTable(PageAllocator(16), 1, 2, 16, enable_prefix_cache=True,
                      prefix_event_capacity=4)
    with ev.EventPublisher("tcp://127.0.0.1:*") as pub:
        pub.publish(table)
        seq = table.add_sequence()
        table.append([seq], [10], token_ids=list(range(10)))     # 10 events, 4 kept
        pub.publish(table)
        assert pub.stats()["ring_overflows"] == 1
