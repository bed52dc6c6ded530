"""Prefix-cache events on the wire, in vLLM's format, for KV-aware routers.

A router that spreads requests over replicas (NVIDIA Dynamo, llm-d, SGLang's router,
Mooncake's indexer) learns which replica holds which prefix from the events vLLM
publishes over ZeroMQ. This module publishes kvcore's events
(:meth:`kvcore.PageTable.take_events`) in exactly that format, so those routers read a
kvcore replica as they read a vLLM one:

- :func:`to_batch` turns one ``take_events()`` result into one :class:`KVEventBatch`;
- :class:`EventPublisher` sends batches on a ZeroMQ PUB socket, framed as vLLM frames
  them (topic, 8-byte big-endian sequence number, msgpack payload), from a background
  thread, and answers replay requests for missed sequence numbers on a ROUTER socket;
- :class:`EventSubscriber` is the other end, for tests and routers written in Python.

The wire format is vLLM 0.33.0's ``vllm/distributed/kv_events.py`` (release wheel
``vllm-0.33.0``, ``vllm/_version.py``: ``__commit_id__ = 'g4ba787ec9'``): struct names,
tags, field order, defaults and the ``array_like`` / ``omit_defaults`` / ``tag``
options below are that file's, so :func:`encode` gives the bytes vLLM's own encoder
gives for the same values. The format changed between vLLM releases (the first ones
encoded events as arrays and had no ``medium``; 0.33.0 encodes events as maps, the
batch still as an array), which is why it is pinned.

What kvcore fills, and what it cannot
-------------------------------------
``BlockStored``: ``block_hashes`` (kvcore's chained page hashes, see
:mod:`kvcore.page_hash`), ``block_size`` (the page size), ``medium`` (``"GPU"`` for the
device tier, ``"CPU"`` for the host tier, whatever the backend) and ``group_idx`` (0 for
a single-group cache, else left out). Left empty, because kvcore's event ring does not
hold them:

- ``parent_block_hash`` is None: the ring records a page's own hash only. kvcore's
  hashes are chained (a page's hash covers its whole prefix), so a router that keys on
  the hash alone needs no parent; one that builds a tree from the parent link sees
  every run as a root.
- ``token_ids`` is ``[]``: a page's tokens are in the index only while it is cached and
  are not readable in bulk from Python, and a page stored and evicted between two
  publishes no longer has them. A consumer that pairs each hash with its
  ``block_size`` chunk of ``token_ids`` (some routers re-hash the tokens so) sees no
  blocks; it should compute kvcore's hash (:func:`kvcore.page_hash.prompt_hashes`).
- ``lora_id`` / ``lora_name`` are None and ``extra_keys`` is left out: kvcore folds an
  adapter, tenant or salt into the sequence's ``namespace``, which is part of the hash
  but not in the ring.

The hashes of one ``BlockStored`` are consecutive ``STORED`` events of one
``take_events()`` call, in order; they are *not* promised to form one chain (a batched
append stores the pages of many sequences in one run). The events of each (medium,
hash) keep their order (a run of moves between the tiers is published as one removal
and one store), so a consumer that applies the batches in order ends with the index's
state.

kvcore's additions
------------------
``BlockRemoved.reason`` (optional, the last field, left out when None): ``"moved"`` for a
block that left one tier for the other (an offload or a load: the removal is followed,
in the same batch, by a store of the same hash in the other medium), else what the
caller says (``"evicted"``, ``"cleared"``, ``"truncated"``) or None when it does not
know: the ring does not tell an eviction from a rollback. Events are map-encoded, and a
msgspec decoder ignores map keys it does not know unless its struct sets
``forbid_unknown_fields`` (vLLM's do not), so vLLM's own decoder reads every batch.

One more difference of meaning: kvcore's index may hold two pages with one hash (a
chain recomputed after its parent was evicted, while an unreachable child of the old
parent is still indexed), as vLLM's block pool may (it does not de-duplicate cached
blocks either). A consumer should count stores and removals
per (medium, hash), not keep a set, to end with exactly the index's contents.

Imports
-------
``import kvcore`` imports neither msgspec nor pyzmq (this module is not imported by the
package). ``import kvcore.events`` imports msgspec, since the structs are defined at
import; pyzmq is imported only when an :class:`EventPublisher` or
:class:`EventSubscriber` is made, so :func:`to_batch` and :func:`encode` work without
it. Both come with the ``events`` extra: ``pip install kvcore[events]``.

Examples
--------
>>> import numpy as np
>>> kinds = np.array([1, 1, 2], np.uint8)          # two pages stored, one evicted
>>> pages = np.array([0, 1, 0], np.int32)
>>> hashes = np.array([11, 12, 11], np.uint64)
>>> batch = to_batch(kinds, pages, hashes, block_size=16, ts=0.0, reason="evicted")
>>> [type(e).__name__ for e in batch.events]
['BlockStored', 'BlockRemoved']
>>> batch.events[0].block_hashes, batch.events[1].reason
([11, 12], 'evicted')
>>> decode(encode(batch)) == batch
True
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import queue
import threading
import time
from typing import Any

import numpy as np

try:
    import msgspec
except ImportError as exc:   # a clear message instead of a bare "No module named msgspec"
    raise ImportError("kvcore.events needs msgspec and pyzmq: pip install 'kvcore[events]'"
                      ) from exc

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "EventPublisher",
    "EventSubscriber",
    "KVCacheEvent",
    "KVEventBatch",
    "MEDIUM_CPU",
    "MEDIUM_GPU",
    "VLLM_VERSION",
    "decode",
    "encode",
    "to_batch",
]

_log = logging.getLogger("kvcore.events")

#: The vLLM release whose wire format this module speaks.
VLLM_VERSION = "0.33.0"

#: ``medium`` of a device-tier block and of a host-tier block (vLLM's names).
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"

# Event kinds of take_events (kvcore._prefix's EVENT_*). Not imported from there so that
# this module's import stays light; tests/test_events.py checks that they agree.
_STORED, _EVICTED, _HOST_STORED, _HOST_EVICTED = 1, 2, 3, 4
# to_batch's labels of a run of moves (device -> host, host -> device).
_OFFLOADS, _LOADS = 10, 11

# -- the wire structs: vLLM 0.33.0's, field for field ------------------------------------------
# ``ExternalBlockHash`` is ``bytes | int`` in vLLM 0.33.0 (bytes: a sha256 digest; int:
# the digest's low 64 bits as an *unsigned* int, vLLM's default since
# VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1). kvcore publishes ints in [0, 2**64): msgpack
# writes those >= 2**63 as uint64, exactly as vLLM does.
_BlockHash = bytes | int


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A batch of events: encoded as the array ``[ts, events, data_parallel_rank]``
    (the rank left out when None), as vLLM's ``EventBatch``.

    Attributes
    ----------
    ts : float
        Seconds since the epoch when the batch was made.
    events : list
        The events, oldest first.
    data_parallel_rank : int or None
        The publishing replica's data-parallel rank; :class:`EventPublisher` fills it.
    """

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the events: each is a map tagged ``"type": "<class name>"``, and fields
    left at their default are not written (vLLM's ``KVCacheEvent``)."""


class BlockStored(KVCacheEvent):
    """Blocks entered the cache of one medium (vLLM's ``BlockStored``).

    Attributes
    ----------
    block_hashes : list of int or bytes
        The blocks' hashes, in the order they were stored.
    parent_block_hash : int, bytes or None
        The hash of the block before the first one; kvcore: None (not in its ring).
    token_ids : list of int
        The blocks' tokens, ``block_size`` per block; kvcore: empty (not in its ring).
    block_size : int
        Tokens per block (kvcore's page size).
    lora_id, lora_name : int, str or None
        The adapter; kvcore: None (adapters are part of a sequence's namespace).
    medium : str or None
        ``"GPU"`` (kvcore's device tier) or ``"CPU"`` (its host tier).
    extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window, locality,
    ownership, session_id, lookahead_token_ids
        vLLM's optional fields, left out when None; kvcore sets ``group_idx`` only.
    """

    block_hashes: list[_BlockHash]
    parent_block_hash: _BlockHash | None
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


class BlockRemoved(KVCacheEvent):
    """Blocks left the cache of one medium (vLLM's ``BlockRemoved``, plus ``reason``).

    Attributes
    ----------
    block_hashes : list of int or bytes
        The blocks' hashes, in the order they were removed.
    medium : str or None
        ``"GPU"`` or ``"CPU"``, as in :class:`BlockStored`.
    group_idx, locality, ownership
        vLLM's optional fields, left out when None.
    reason : str or None
        kvcore's addition, last so that vLLM's decoder (which ignores unknown map
        keys) still reads the event: ``"moved"`` (to the other tier), ``"evicted"``,
        ``"cleared"``, ``"truncated"``, or None (not known; left out on the wire).
    """

    block_hashes: list[_BlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None
    reason: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """Every block of the publisher left its cache (vLLM's ``AllBlocksCleared``)."""


class KVEventBatch(EventBatch):
    """An :class:`EventBatch` of KV-cache events (vLLM's ``KVEventBatch``)."""

    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode(batch: KVEventBatch) -> bytes:
    """msgpack bytes of ``batch``: what :class:`EventPublisher` sends as the payload.

    Parameters
    ----------
    batch : KVEventBatch

    Returns
    -------
    bytes
    """
    return _encoder.encode(batch)


def decode(payload: bytes) -> KVEventBatch:
    """A :class:`KVEventBatch` from a payload published by kvcore or by vLLM 0.33.0.

    Parameters
    ----------
    payload : bytes

    Returns
    -------
    KVEventBatch

    Raises
    ------
    msgspec.DecodeError
        ``payload`` is not a valid batch (``msgspec.ValidationError``, a subclass, when
        it is msgpack of the wrong shape).
    """
    return _decoder.decode(payload)


# -- take_events() -> one batch ------------------------------------------------------------------

def to_batch(kinds, page_ids, hashes, *, block_size: int, ts: float | None = None,
             data_parallel_rank: int | None = None, device_medium: str = MEDIUM_GPU,
             host_medium: str = MEDIUM_CPU, group_idx: int | None = None,
             reason: str | None = None, cleared: bool = False) -> KVEventBatch:
    """Turn one ``take_events()`` result into one batch, keeping the events' order.

    Each run of consecutive events of one kind becomes one event: ``EVENT_STORED`` a
    :class:`BlockStored` in ``device_medium``, ``EVENT_HOST_STORED`` one in
    ``host_medium``, ``EVENT_EVICTED`` / ``EVENT_HOST_EVICTED`` a :class:`BlockRemoved`
    in the same media. A removal followed by the store of the same hash in the other
    tier is a move (an offload or a load); a run of moves of one direction becomes a
    ``BlockRemoved`` with ``reason="moved"`` and then a ``BlockStored`` of the same
    hashes in the other medium. Order is kept, except inside such a run, where it is
    kept per (medium, hash): a consumer applying the batch ends in the same state.

    Parameters
    ----------
    kinds : array_like of uint8, shape [n]
        Event kinds, 1 to 4 (``kvcore.EVENT_*``).
    page_ids : array_like of int32, shape [n]
        The events' page ids: only their count is checked (routers know blocks by hash).
    hashes : array_like of uint64, shape [n]
        The pages' hashes; published as Python ints in ``[0, 2**64)``.
    block_size : int
        The cache's page size.
    ts : float, optional
        The batch's time stamp; ``time.time()`` when None.
    data_parallel_rank : int, optional
        Left None, :class:`EventPublisher` fills in its own.
    device_medium, host_medium : str
        ``medium`` of device-tier and host-tier events.
    group_idx : int, optional
        Written on every store and removal when given (kvcore's ring does not say which
        layer group a page belongs to, so give it only for a single-group cache).
    reason : str, optional
        ``BlockRemoved.reason`` of the removals that are not moves.
    cleared : bool
        Append :class:`AllBlocksCleared` (after ``clear_prefix_cache()``).

    Returns
    -------
    KVEventBatch

    Raises
    ------
    ValueError
        The arrays differ in length or are not 1-D, a kind is not in 1..4, a hash is
        negative or not an integer, or ``block_size < 1``.
    """
    k, p, h = np.asarray(kinds), np.asarray(page_ids), np.asarray(hashes)
    n = k.shape[0] if k.ndim == 1 else -1
    if k.ndim != 1 or p.ndim != 1 or h.ndim != 1 or p.shape[0] != n or h.shape[0] != n:
        raise ValueError(f"kinds, page_ids and hashes must be 1-D arrays of one length, got "
                         f"shapes {k.shape}, {p.shape}, {h.shape}")
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    block_size = int(block_size)
    if h.dtype != np.uint64:
        if n and (h.dtype.kind not in "iu" or h.min() < 0):
            raise ValueError(f"hashes must be unsigned 64-bit ints, got dtype {h.dtype}")
        h = h.astype(np.uint64)
    events: list[Any] = []
    if n:
        if k.dtype.kind not in "iu":
            raise ValueError("event kinds must be in 1..4 (kvcore.EVENT_*)")
        kmin, kmax = int(k.min()), int(k.max())
        if kmin < _STORED or kmax > _HOST_EVICTED:
            raise ValueError("event kinds must be in 1..4 (kvcore.EVENT_*)")
        # One tolist() for every hash: a Python int per hash is the only per-page cost,
        # and numpy's bulk conversion is far cheaper than int() per element.
        hl = h.tolist()
        if kmin == kmax:
            # One kind (a prefill's or a decode step's stores, an eviction burst): one
            # run and no move, so none of the run finding below (a fixed cost that
            # dominates small batches).
            bounds, labels = [0, n], [kmin]
        else:
            k = k.astype(np.int64)
            group = k
            if kmax >= _HOST_STORED:
                # Moves: relocate() emits a removal and the other tier's store of the
                # same hash back to back (an offload EVICTED + HOST_STORED, a load
                # HOST_EVICTED + STORED). Consecutive moves of one direction form one
                # group, published as one removal ("moved") then one store: otherwise an
                # offload of n pages would be 2n events of one hash each. Within such a
                # group every device event is of one kind and every host event of the
                # other, so the events of each (medium, hash) keep their order, and any
                # consumer that applies the batch ends where it would have with the
                # events one by one. Pairs cannot overlap (a pair ends in kind 3 or 1,
                # and starts with 2 or 4).
                group = k.copy()
                same = h[:-1] == h[1:]
                for first, second, label in ((_EVICTED, _HOST_STORED, _OFFLOADS),
                                             (_HOST_EVICTED, _STORED, _LOADS)):
                    at = np.flatnonzero((k[:-1] == first) & (k[1:] == second) & same)
                    group[at] = label
                    group[at + 1] = label
            # Runs of one group: their starts, from where the group changes.
            bounds = [0, *(np.flatnonzero(group[1:] != group[:-1]) + 1).tolist(), n]
            labels = group[bounds[:-1]].tolist()
        for r, label in enumerate(labels):
            s, e = bounds[r], bounds[r + 1]
            if label == _OFFLOADS or label == _LOADS:
                src, dst = ((device_medium, host_medium) if label == _OFFLOADS
                            else (host_medium, device_medium))
                events.append(BlockRemoved(hl[s:e:2], src, group_idx=group_idx,
                                           reason="moved"))
                events.append(BlockStored(hl[s + 1:e:2], None, [], block_size, None, dst,
                                          None, group_idx=group_idx))
                continue
            medium = device_medium if label <= _EVICTED else host_medium
            if label == _STORED or label == _HOST_STORED:
                events.append(BlockStored(hl[s:e], None, [], block_size, None, medium, None,
                                          group_idx=group_idx))
            else:
                events.append(BlockRemoved(hl[s:e], medium, group_idx=group_idx,
                                           reason=reason))
    if cleared:
        events.append(AllBlocksCleared())
    return KVEventBatch(time.time() if ts is None else float(ts), events, data_parallel_rank)


# -- ZeroMQ ----------------------------------------------------------------------------------------

#: End-of-replay marker in the sequence-number frame: -1 as 8 signed big-endian bytes.
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def _zmq():
    """pyzmq, imported on first use so that to_batch / encode work without it."""
    try:
        import zmq
    except ImportError as exc:
        raise ImportError("kvcore.events' sockets need pyzmq: pip install 'kvcore[events]'"
                          ) from exc
    return zmq


def _topic_bytes(topic) -> bytes:
    if isinstance(topic, str):
        return topic.encode("utf-8")
    if isinstance(topic, bytes):
        return topic
    raise TypeError(f"topic must be str or bytes, got {type(topic).__name__}")


def _check_endpoint(endpoint, name: str) -> str:
    if not isinstance(endpoint, str):
        raise TypeError(f"{name} must be a str such as 'tcp://*:5557', got "
                        f"{type(endpoint).__name__}")
    return endpoint


def _attach(zmq, sock, endpoint: str, bind: bool) -> str:
    """Bind or connect ``sock``; return the endpoint as bound (a wildcard port resolved).

    Raises ValueError for a malformed endpoint, OSError for one that cannot be used
    (an address in use, say), so that callers need not know pyzmq's errors."""
    try:
        if bind:
            sock.bind(endpoint)
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        sock.connect(endpoint)
        return endpoint
    except zmq.ZMQError as err:
        verb = "bind" if bind else "connect"
        if err.errno in (errno.EINVAL, errno.EPROTONOSUPPORT, errno.ENODEV):
            raise ValueError(f"cannot {verb} {endpoint!r}: {err}") from err
        raise OSError(err.errno, f"cannot {verb} {endpoint!r}: {err}") from err


def _vllm_binds(endpoint: str) -> bool:
    """vLLM's rule: bind a wildcard, IPv6 or ipc / inproc endpoint, connect the rest."""
    return ("*" in endpoint or "::" in endpoint
            or endpoint.startswith(("ipc://", "inproc://")))


class EventPublisher:
    """Publish a cache's events on ZeroMQ as vLLM 0.33.0 does, with replay.

    Parameters
    ----------
    endpoint : str
        The PUB socket's address. Bound or connected by vLLM's rule (``bind=None``):
        bound when it has a ``*`` (``"tcp://*:5557"``, or ``"tcp://127.0.0.1:*"`` for
        a free port), ``::`` or is ``ipc://`` / ``inproc://``; connected otherwise.
    replay_endpoint : str, optional
        A ROUTER socket's address (always bound) that answers replay requests: a
        request ``[b"", start]`` (``start`` an 8-byte big-endian sequence number, from a
        DEALER) is answered with ``[b"", topic, seq, payload]`` for every buffered batch
        whose ``seq >= start``, then ``[b"", b"", END_SEQ, b""]``.
    topic : str or bytes
        The first frame of every message (subscribers filter on its prefix).
    buffer : int
        Batches kept for replay (vLLM's ``buffer_steps``).
    hwm : int
        The PUB socket's send high-water mark: past it, ZeroMQ drops messages for a
        slow subscriber (who sees the gap in sequence numbers and asks for a replay).
    max_queue : int
        Batches waiting for the sending thread; :meth:`publish` blocks when it is full
        rather than drop a batch (a dropped batch would leave no gap to detect).
    data_parallel_rank : int
        Written into every batch whose rank is None, as vLLM's publisher does.
    bind : bool, optional
        Force binding (True) or connecting (False) the PUB socket.
    linger : float
        Seconds :meth:`close` lets ZeroMQ go on sending what is queued.

    Attributes
    ----------
    endpoint, replay_endpoint : str or None
        As bound (a wildcard port resolved to the chosen one).

    Raises
    ------
    TypeError
        An endpoint or the topic of the wrong type.
    ValueError
        A malformed endpoint, or a non-positive ``buffer`` / ``hwm`` / ``max_queue``.
    OSError
        An endpoint that cannot be bound (in use) or connected.
    ImportError
        pyzmq is missing.

    Notes
    -----
    Every message is three frames: the topic, the batch's sequence number (8 bytes,
    big-endian, from 0, one per batch) and the msgpack payload (:func:`encode`).
    :meth:`publish` builds the batch in the caller's thread (the events must be taken
    there); encoding, sending and replay run on one background thread, which owns
    the sockets. A subscriber that sees a sequence number jump asks the replay socket
    for the batches in between.

    Examples
    --------
    >>> from kvcore import PageAllocator, PageTable
    >>> table = PageTable(PageAllocator(8), 4, 2, 4, enable_prefix_cache=True)
    >>> with EventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as pub:
    ...     sub = EventSubscriber(pub.endpoint, replay_endpoint=pub.replay_endpoint)
    ...     seq = table.add_sequence()
    ...     _ = table.append([seq], [9], token_ids=list(range(9)))
    ...     last = pub.publish(table)
    ...     [(s, type(e).__name__, len(e.block_hashes)) for s, b in sub.catch_up(last)
    ...      for e in b.events]
    [(0, 'BlockStored', 2)]
    >>> sub.close()
    """

    def __init__(self, endpoint: str, *, replay_endpoint: str | None = None,
                 topic: str | bytes = b"", buffer: int = 10_000, hwm: int = 100_000,
                 max_queue: int = 100_000, data_parallel_rank: int = 0,
                 bind: bool | None = None, linger: float = 1.0):
        _check_endpoint(endpoint, "endpoint")
        if replay_endpoint is not None:
            _check_endpoint(replay_endpoint, "replay_endpoint")
        self._topic = _topic_bytes(topic)
        for name, value in (("buffer", buffer), ("hwm", hwm), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        zmq = _zmq()
        self._zmq = zmq
        self._rank = int(data_parallel_rank)
        self._linger_ms = max(0, int(linger * 1000))
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()     # sequence numbers and queue order agree
        self._seq = itertools.count()
        self._last_seq = -1
        self._closed = False
        self._thread_done = False     # both under _lock: who closes the sockets
        self._orphaned = False
        self._dropped_seen: int | None = None
        self._stats = {"batches": 0, "events": 0, "hashes": 0, "bytes": 0,
                       "thread_seconds": 0.0, "errors": 0, "replays": 0,
                       "ring_overflows": 0}
        # The process-wide context, as vLLM: a context per publisher would start IO
        # threads of its own and must be terminated, which blocks on unsent messages.
        ctx = zmq.Context.instance()
        self._pub = ctx.socket(zmq.PUB)
        self._replay = None
        try:
            self._pub.setsockopt(zmq.SNDHWM, hwm)
            self._pub.setsockopt(zmq.LINGER, self._linger_ms)
            self.endpoint = _attach(zmq, self._pub, endpoint,
                                    _vllm_binds(endpoint) if bind is None else bool(bind))
            self.replay_endpoint = None
            if replay_endpoint is not None:
                self._replay = ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, self._linger_ms)
                # A whole replay plus its end marker must fit the client's queue even
                # when ZeroMQ's credit lags by half the HWM (vLLM sets the same).
                self._replay.setsockopt(zmq.SNDHWM, 2 * (buffer + 1))
                self.replay_endpoint = _attach(zmq, self._replay, replay_endpoint, True)
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, daemon=True, name="kvcore-events")
        self._thread.start()

    # -- producer side (any thread) ------------------------------------------------------------

    def publish(self, source, *, reason: str | None = None, ts: float | None = None):
        """Take ``source``'s events and enqueue them as one batch.

        Parameters
        ----------
        source : PageTable or KVCache
            Anything with ``take_events()``, ``page_size`` (or ``table.page_size``)
            and ``num_groups``.
        reason : str, optional
            ``BlockRemoved.reason`` of its removals that are not moves.
        ts : float, optional
            The batch's time stamp (``time.time()`` when None).

        Returns
        -------
        int or None
            The batch's sequence number; None when there were no events (nothing is
            sent then).

        Raises
        ------
        RuntimeError
            The publisher is closed (the events are not taken).
        """
        self._check_open()
        table = getattr(source, "table", source)
        kinds, pages, hashes = source.take_events()
        if kinds.shape[0] == 0:
            # No event was dropped either (a drop needs a full ring): only the first
            # publish reads the ring's counter, as the baseline.
            if self._dropped_seen is None:
                self._check_ring(table)
            return None
        self._check_ring(table)
        return self.publish_batch(to_batch(
            kinds, pages, hashes, block_size=table.page_size, ts=ts, reason=reason,
            group_idx=0 if table.num_groups == 1 else None))

    def clear(self, source, *, ts: float | None = None) -> int:
        """Clear ``source``'s prefix cache and publish it: its pending events, then
        every page's removal (``reason="cleared"``) and :class:`AllBlocksCleared`.

        Parameters
        ----------
        source : PageTable or KVCache
        ts : float, optional

        Returns
        -------
        int
            The sequence number of the batch of the clear.
        """
        self.publish(source, ts=ts)
        source.clear_prefix_cache()
        table = getattr(source, "table", source)
        kinds, pages, hashes = source.take_events()
        self._check_ring(table)
        return self.publish_batch(to_batch(
            kinds, pages, hashes, block_size=table.page_size, ts=ts, reason="cleared",
            cleared=True, group_idx=0 if table.num_groups == 1 else None))

    def publish_batch(self, batch: KVEventBatch) -> int:
        """Enqueue a batch (a rank of None becomes the publisher's); return its
        sequence number.

        Raises
        ------
        TypeError
            ``batch`` is not a :class:`KVEventBatch`.
        RuntimeError
            The publisher is closed.
        """
        if not isinstance(batch, KVEventBatch):
            raise TypeError(f"batch must be a KVEventBatch, got {type(batch).__name__}")
        self._check_open()
        if batch.data_parallel_rank is None:
            batch.data_parallel_rank = self._rank
        with self._lock:
            # Checked again under the lock: close() enqueues its sentinel under it, so
            # nothing lands behind the sentinel, unsent.
            self._check_open()
            seq = next(self._seq)
            self._queue.put((seq, batch))
            self._last_seq = seq
        return seq

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the thread has sent (or failed to send) every batch enqueued.

        Parameters
        ----------
        timeout : float
            Seconds to wait at most.

        Returns
        -------
        bool
            Whether everything enqueued before the call was handled in time.
        """
        target = self._last_seq + 1
        deadline = time.monotonic() + timeout
        while self._stats["batches"] + self._stats["errors"] < target:
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            time.sleep(0.001)
        return True

    @property
    def last_seq(self) -> int:
        """int: sequence number of the last batch enqueued (-1 before the first)."""
        return self._last_seq

    def stats(self) -> dict:
        """Counters: ``batches`` / ``events`` / ``hashes`` / ``bytes`` sent,
        ``thread_seconds`` (CPU time the thread spent encoding and sending), ``errors``
        (batches that could not be sent: a gap for subscribers), ``replays`` answered
        and ``ring_overflows`` (publishes that found events dropped by the cache's ring:
        subscribers then miss changes that no replay can give back).

        Returns
        -------
        dict
        """
        return dict(self._stats)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, stop the thread and close the sockets (idempotent).

        Parameters
        ----------
        timeout : float
            Seconds to wait for the thread to send what is queued.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
        with self._lock:
            if not self._thread_done:
                # The thread owns the sockets until it ends: it closes them itself.
                self._orphaned = True
                _log.warning("kvcore.events: publisher thread still sending after %.1f s; "
                             "it closes the sockets when done", timeout)
                return
        self._close_sockets()

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the event publisher is closed")

    def _check_ring(self, table) -> None:
        """Count publishes that found events dropped by the ring since the last one (the
        first publish only sets the baseline: this publisher may join a running cache).
        One publisher per cache: the counter is the cache's."""
        stats = table.prefix_stats
        if stats is None:
            return
        dropped = stats["events_dropped"]
        if self._dropped_seen is not None and dropped > self._dropped_seen:
            self._stats["ring_overflows"] += 1
            _log.warning("kvcore.events: the cache's event ring dropped %d events since the "
                         "last publish: subscribers' view of it is incomplete (publish more "
                         "often or raise prefix_event_capacity)", dropped - self._dropped_seen)
        self._dropped_seen = dropped

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None and not sock.closed:
                sock.close(self._linger_ms)

    def _run(self) -> None:
        """The sending thread: replay requests first (cheap when none), then the queue."""
        zmq = self._zmq
        stats = self._stats
        pub, replay = self._pub, self._replay
        encoder = msgspec.msgpack.Encoder()     # one per thread: encoders are not shared
        # CPU time of this thread: what it costs the process (it holds the GIL while
        # encoding); wall time would also count its waits for the GIL.
        clock = time.thread_time
        try:
            while True:
                if replay is not None and replay.poll(0):
                    try:
                        self._serve_replay(replay)
                    except Exception:
                        _log.exception("kvcore.events: replay request failed")
                try:
                    # A short wait, so that replay requests are answered within 50 ms
                    # while no batch comes.
                    item = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is None:
                    break
                seq, batch = item
                t0 = clock()
                try:
                    payload = encoder.encode(batch)
                    pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload),
                                       copy=len(payload) < 65536)
                except Exception:
                    # Not retried: the sequence number stays unsent, a gap subscribers
                    # see (a replay cannot fill it), rather than an out-of-order batch.
                    stats["errors"] += 1
                    _log.exception("kvcore.events: batch %d not sent", seq)
                    continue
                self._buffer.append((seq, payload))
                stats["thread_seconds"] += clock() - t0
                stats["batches"] += 1
                stats["events"] += len(batch.events)
                stats["hashes"] += sum(len(getattr(e, "block_hashes", ())) for e in batch.events)
                stats["bytes"] += len(payload)
        except zmq.ZMQError:       # the sockets were closed under us (interpreter exit)
            return
        finally:
            with self._lock:
                self._thread_done = True
                orphaned = self._orphaned
            if orphaned:
                self._close_sockets()

    def _serve_replay(self, replay) -> None:
        """Answer one replay request as vLLM 0.33.0's ``_service_replay`` does."""
        frames = replay.recv_multipart()
        if len(frames) != 3:            # vLLM ignores such a request, answering nothing
            _log.warning("kvcore.events: ignoring a replay request of %d frames",
                         len(frames))
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for seq, payload in self._buffer:
            if seq >= start_seq:
                replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"),
                                       payload))
        replay.send_multipart((client, b"", b"", END_SEQ, b""))
        self._stats["replays"] += 1


class EventSubscriber:
    """The receiving end: decodes batches, in order, and fills gaps by replay.

    Parameters
    ----------
    endpoint : str
        The publisher's PUB address (``EventPublisher.endpoint``): connected.
    replay_endpoint : str, optional
        Its replay address: connected with a DEALER socket.
    topic : str or bytes
        Topic prefix to subscribe to.
    start_seq : int
        The first sequence number wanted (0: everything the publisher still buffers).

    Attributes
    ----------
    next_seq : int
        The next sequence number it will deliver.
    missed : int
        Batches it skipped because no replay could give them (gone from the
        publisher's buffer, not sent, or no replay socket).
    malformed : int
        Messages skipped because their framing or payload was not a batch.

    Notes
    -----
    It works with vLLM 0.33.0's publisher as well, since the format and the replay
    protocol are the same.
    """

    def __init__(self, endpoint: str, *, replay_endpoint: str | None = None,
                 topic: str | bytes = b"", start_seq: int = 0):
        _check_endpoint(endpoint, "endpoint")
        if replay_endpoint is not None:
            _check_endpoint(replay_endpoint, "replay_endpoint")
        zmq = _zmq()
        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        if int(start_seq) < 0:
            raise ValueError(f"start_seq must be >= 0, got {start_seq}")
        self._replay_endpoint = replay_endpoint
        self.next_seq = int(start_seq)
        self.missed = 0
        self.malformed = 0
        self._sub = self._ctx.socket(zmq.SUB)
        self._dealer = None
        try:
            self._sub.setsockopt(zmq.LINGER, 0)
            self._sub.setsockopt(zmq.SUBSCRIBE, _topic_bytes(topic))
            _attach(zmq, self._sub, endpoint, False)
            if replay_endpoint is not None:
                self._dealer = self._new_dealer()
        except BaseException:
            self.close()
            raise

    def _new_dealer(self):
        zmq = self._zmq
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            _attach(zmq, dealer, self._replay_endpoint, False)
        except BaseException:
            dealer.close(0)
            raise
        return dealer

    def replay(self, start_seq: int, timeout: float = 2.0) -> list[tuple[int, KVEventBatch]]:
        """Ask the publisher for every buffered batch from ``start_seq`` on.

        Parameters
        ----------
        start_seq : int
        timeout : float
            Seconds to wait for the whole answer.

        Returns
        -------
        list of (int, KVEventBatch)
            In sequence order, as buffered (it may begin after ``start_seq`` when the
            earlier ones left the buffer).

        Raises
        ------
        ValueError
            ``start_seq`` is negative or does not fit 8 bytes.
        RuntimeError
            No replay endpoint was given.
        TimeoutError
            The answer did not end in time (the socket is then replaced, so that a
            late answer cannot mix with the next one).
        """
        if not 0 <= int(start_seq) < 2**64:
            raise ValueError(f"start_seq must be in [0, 2**64), got {start_seq}")
        if self._dealer is None:
            raise RuntimeError("this subscriber has no replay endpoint")
        zmq = self._zmq
        self._dealer.send_multipart((b"", int(start_seq).to_bytes(8, "big")))
        out = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._dealer.poll(int(left * 1000) + 1, zmq.POLLIN):
                self._dealer.close(0)
                self._dealer = self._new_dealer()
                raise TimeoutError(f"no end of replay from {self._replay_endpoint!r} "
                                   f"within {timeout} s")
            frames = self._dealer.recv_multipart()
            # [b"", topic, seq, payload]: the DEALER keeps the empty delimiter.
            if len(frames) != 4 or len(frames[2]) != 8:
                self.malformed += 1
                continue
            if frames[2] == END_SEQ:
                return out
            try:
                out.append((int.from_bytes(frames[2], "big"), decode(frames[3])))
            except msgspec.DecodeError:
                self.malformed += 1

    def receive(self, timeout: float = 1.0) -> list[tuple[int, KVEventBatch]]:
        """Wait up to ``timeout`` seconds for a message, then take all that arrived;
        fill any gap before them by replay.

        Returns
        -------
        list of (int, KVEventBatch)
            New batches in sequence order, each once (an empty list on timeout).
        """
        zmq = self._zmq
        out: list[tuple[int, KVEventBatch]] = []
        if not self._sub.poll(max(0, int(timeout * 1000)), zmq.POLLIN):
            return out
        while True:
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            if len(frames) != 3 or len(frames[1]) != 8:
                self.malformed += 1
                continue
            seq = int.from_bytes(frames[1], "big")
            if seq < self.next_seq:
                continue                   # already delivered (by a replay)
            if seq > self.next_seq:
                self._fill(seq, out)
                # This message proves the batches before it were published: any that
                # no replay gave back are lost.
                self.missed += seq - self.next_seq
            self.next_seq = seq + 1
            try:
                out.append((seq, decode(frames[2])))
            except msgspec.DecodeError:
                self.malformed += 1

    def catch_up(self, seq: int, timeout: float = 5.0) -> list[tuple[int, KVEventBatch]]:
        """Receive until batch ``seq`` has been delivered, asking for a replay when
        nothing arrives for a while (a subscriber that joined late, or lost the tail).

        Returns
        -------
        list of (int, KVEventBatch)

        Raises
        ------
        TimeoutError
            ``seq`` was not delivered within ``timeout`` seconds.
        """
        out: list[tuple[int, KVEventBatch]] = []
        deadline = time.monotonic() + timeout
        while self.next_seq <= seq:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"batch {seq} not received within {timeout} s "
                                   f"(next expected: {self.next_seq})")
            got = self.receive(min(left, 0.2))
            out.extend(got)
            if not got and self._dealer is not None and self.next_seq <= seq:
                self._fill(seq + 1, out, max(0.05, min(2.0, deadline - time.monotonic())))
        return out

    def _fill(self, upto: int, out: list, timeout: float = 2.0) -> None:
        """Replay what it can of ``[next_seq, upto)`` into ``out``; a jump inside the
        replay (batches gone from the publisher's buffer) counts as missed."""
        if self._dealer is None:
            return
        try:
            replayed = self.replay(self.next_seq, timeout)
        except TimeoutError:
            _log.warning("kvcore.events: replay from %d timed out", self.next_seq)
            return
        for seq, batch in replayed:
            if self.next_seq <= seq < upto:
                self.missed += seq - self.next_seq
                out.append((seq, batch))
                self.next_seq = seq + 1

    def close(self) -> None:
        """Close the sockets (idempotent)."""
        for sock in (getattr(self, "_sub", None), getattr(self, "_dealer", None)):
            if sock is not None and not sock.closed:
                sock.close(0)

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
