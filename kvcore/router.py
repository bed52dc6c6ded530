"""A prefix-aware router: which replica holds a prompt's longest cached prefix.

It rebuilds every replica's set of cached block hashes from the KV events the replica
publishes (:mod:`kvcore.events`, vLLM 0.33.0's wire format, so a vLLM replica works
too) and hashes a prompt's pages the way the cache does (:mod:`kvcore.page_hash`).
Routing a prompt is then a walk over its page hashes: no request to any replica.

Examples
--------
A replica publishes (``EventPublisher``); the router subscribes and routes::

    router = PrefixRouter(page_size=16)
    router.add_replica("a", pub_a.endpoint, replay_endpoint=pub_a.replay_endpoint)
    router.add_replica("b", pub_b.endpoint, replay_endpoint=pub_b.replay_endpoint)
    router.poll()                       # take what has arrived
    name = router.route(prompt_tokens)  # the replica with the longest cached prefix

README's "Events for KV-aware routers" runs this end to end.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping, Sequence

from kvcore.page_hash import prompt_hashes

__all__ = ["PrefixRouter"]


class PrefixRouter:
    """Route prompts to the replica whose prefix cache holds the longest prefix.

    Parameters
    ----------
    page_size : int
        The replicas' page size (``block_size`` in their events).
    namespace : int
        The namespace the replicas cache these prompts under (their
        ``add_sequence(namespace=...)``): it is part of every page hash.
    algorithm : {"fast", "sha256"}
        The replicas' ``prefix_hash``.

    Notes
    -----
    A replica's cached blocks are a multiset of hashes: a block stored twice (a device
    copy and a host copy, or two entries while one is in flight) counts until both are
    removed. Blocks in either tier count as cached: a host-tier hit costs a copy, not
    a prefill.

    Limits: the router sees full-attention pages only. A replica with sliding-window
    layer groups serves a hit only where the window group's companion pages are cached
    too, which the events do not say, so :meth:`match` can overestimate there. Replicas
    with ``prefix_hash_bits < 64`` (a test setting) publish truncated hashes that
    :meth:`match` does not reproduce.
    """

    def __init__(self, page_size: int, *, namespace: int = 0, algorithm: str = "fast"):
        try:
            page_size = operator.index(page_size)
        except TypeError:
            raise TypeError("page_size must be an integer") from None
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.namespace = operator.index(namespace)
        if algorithm not in ("fast", "sha256"):
            raise ValueError(f"algorithm must be 'fast' or 'sha256', got {algorithm!r}")
        self.algorithm = algorithm
        self._blocks: dict[str, Counter] = {}
        self._subscribers: dict = {}
        self.batches = 0
        self.events = 0

    # -- replicas -------------------------------------------------------------------

    def add_replica(self, name: str, endpoint: str | None = None, *,
                    replay_endpoint: str | None = None, topic: str | bytes = b"") -> None:
        """Track a replica; with ``endpoint``, subscribe to its events (needs pyzmq).

        Raises
        ------
        ValueError
            ``name`` is tracked already.
        """
        if name in self._blocks:
            raise ValueError(f"replica {name!r} is tracked already")
        if endpoint is not None:
            from kvcore.events import EventSubscriber
            self._subscribers[name] = EventSubscriber(endpoint, replay_endpoint=replay_endpoint,
                                                      topic=topic)
        self._blocks[name] = Counter()

    @property
    def replicas(self) -> tuple[str, ...]:
        return tuple(self._blocks)

    def apply(self, name: str, batch) -> None:
        """Update replica ``name``'s blocks from one :class:`~kvcore.events.KVEventBatch`.

        Raises
        ------
        KeyError
            ``name`` is not tracked.
        """
        from kvcore.events import AllBlocksCleared, BlockRemoved, BlockStored
        blocks = self._blocks[name]
        for event in batch.events:
            if isinstance(event, BlockStored):
                blocks.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    if blocks[h] <= 1:
                        blocks.pop(h, None)
                    else:
                        blocks[h] -= 1
            elif isinstance(event, AllBlocksCleared):
                blocks.clear()
            self.events += 1
        self.batches += 1

    def poll(self, timeout: float = 0.0) -> int:
        """Apply every batch that has arrived from the subscribed replicas.

        Returns
        -------
        int
            Batches applied.
        """
        n = 0
        for name, sub in self._subscribers.items():
            for _, batch in sub.receive(timeout):
                self.apply(name, batch)
                n += 1
        return n

    def catch_up(self, name: str, seq: int, timeout: float = 5.0) -> int:
        """Apply replica ``name``'s batches up to sequence number ``seq`` (its
        ``EventPublisher.publish`` return value), asking for a replay of any it missed.

        Raises
        ------
        TimeoutError
            Batch ``seq`` did not arrive within ``timeout`` seconds.
        """
        got = self._subscribers[name].catch_up(seq, timeout)
        for _, batch in got:
            self.apply(name, batch)
        return len(got)

    def missed(self, name: str) -> int:
        """Batches of ``name`` that neither arrived nor could be replayed."""
        return self._subscribers[name].missed if name in self._subscribers else 0

    def cached_hashes(self, name: str) -> frozenset:
        """The block hashes replica ``name`` holds, as its events tell."""
        return frozenset(self._blocks[name])

    # -- routing --------------------------------------------------------------------

    def match(self, tokens: Sequence[int], *, namespace: int | None = None) -> dict[str, int]:
        """Leading tokens of ``tokens`` each replica would serve from its cache.

        As ``KVCache.match_prefix`` counts them for a single-group cache: whole pages,
        leaving at least the last token to compute. ``namespace``: the request's (a
        tenant, an adapter), default the router's.
        """
        tokens = [int(t) for t in tokens]    # NumPy ints would overflow the 64-bit mixing
        usable = max(0, len(tokens) - 1) // self.page_size * self.page_size
        ns = self.namespace if namespace is None else operator.index(namespace)
        hashes = prompt_hashes(tokens[:usable], self.page_size, ns, algorithm=self.algorithm)
        out = {}
        for name, blocks in self._blocks.items():
            k = 0
            while k < len(hashes) and hashes[k] in blocks:
                k += 1
            out[name] = k * self.page_size
        return out

    def route(self, tokens: Sequence[int], load: Mapping[str, float] | None = None, *,
              namespace: int | None = None) -> str:
        """The replica holding the longest cached prefix of ``tokens``; among equals the
        least loaded (``load``: any number per replica, e.g. running requests), then the
        first added.

        Raises
        ------
        RuntimeError
            No replica is tracked.
        """
        if not self._blocks:
            raise RuntimeError("no replica to route to: add_replica first")
        matched = self.match(tokens, namespace=namespace)
        order = {name: i for i, name in enumerate(self._blocks)}
        load = load or {}
        return min(matched, key=lambda n: (-matched[n], load.get(n, 0), order[n]))

    def close(self) -> None:
        """Close the subscriptions."""
        for sub in self._subscribers.values():
            sub.close()
        self._subscribers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
