"""``kvcore simulate --replicas N``: replicas behind a prefix-aware router, over ZeroMQ.

Each replica is a :class:`~kvcore.KVCache` with prefix caching that publishes its KV
events on a real ZeroMQ socket on localhost (:class:`~kvcore.events.EventPublisher`,
vLLM's wire format). A :class:`~kvcore.router.PrefixRouter` subscribes to all of them
and sends each request to the replica holding its longest cached prefix. The same
workload is then run with random routing on fresh replicas, and the two hit rates are
compared.

The workload: ``prefixes`` shared prompts (system prompts, few-shot headers) of
``prefix_tokens`` tokens, each request one of them plus a private suffix, a few decode
steps, arrivals spread over steps. Each replica's pool holds its running requests and
only part of all the prefixes: random routing sends every prefix everywhere and the
replicas evict each other's useful pages; routing by prefix partitions them.

Every request is verified byte for byte after its prefill: its K/V, cached or written,
must be exactly the values its tokens and positions give (a wrong hit fails the run).
After every step the router's view of each replica (the hashes it rebuilt from the
events) must equal that replica's own index.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from kvcore.cache import KVCache
from kvcore.config import KVCacheConfig

__all__ = ["ClusterConfig", "run_cluster", "format_cluster"]


@dataclass(frozen=True)
class ClusterConfig:
    """Options of the cluster simulation (see the module doc)."""

    replicas: int = 2
    requests: int = 400
    prefixes: int = 16
    prefix_tokens: int = 256
    suffix_min: int = 16
    suffix_max: int = 96
    decode_tokens: int = 8
    arrivals_per_step: int = 2
    max_running: int = 4
    page_size: int = 16
    cached_prefixes_per_replica: int = 8   # the pool holds this many prefixes beside
    num_layers: int = 2                    # its running requests
    num_kv_heads: int = 2
    head_dim: int = 16
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name == "device":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            low = 0 if name == "seed" else 1
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.replicas < 2:
            raise ValueError("a cluster needs --replicas >= 2")
        if self.suffix_min > self.suffix_max:
            raise ValueError("suffix_min exceeds suffix_max")

    @property
    def num_pages(self) -> int:
        ps = self.page_size
        request = -(-(self.prefix_tokens + self.suffix_max + self.decode_tokens) // ps)
        return self.max_running * request + self.cached_prefixes_per_replica * (
            self.prefix_tokens // ps)


def _kv_values(tokens: np.ndarray, positions: np.ndarray, layer: int, which: int,
               heads: int, dim: int) -> np.ndarray:
    """The K (``which`` 0) or V of tokens at positions, as a model would make them: a
    function of the token and its position (and so of the prefix before it in this
    workload, where equal prefixes are equal token runs). float16 ``[T, heads, dim]``."""
    x = (tokens.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
         ^ positions.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
         ^ np.uint64(((layer * 2 + which + 1) * 0x94D049BB133111EB) & (2**64 - 1)))
    lanes = x[:, None] + np.arange(heads * dim, dtype=np.uint64)[None, :] * np.uint64(
        0xD6E8FEB86659FD93)
    lanes ^= lanes >> np.uint64(29)
    words = (lanes & np.uint64(0x3BFF)).astype(np.uint16)     # finite float16 values
    return words.view(np.float16).reshape(len(tokens), heads, dim)


class _Replica:
    def __init__(self, name: str, cfg: ClusterConfig, with_events: bool):
        self.name = name
        self.cfg = cfg
        kv = KVCacheConfig(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                           head_dim=cfg.head_dim, page_size=cfg.page_size,
                           num_pages=cfg.num_pages, max_seqs=cfg.max_running,
                           enable_prefix_cache=True)
        self.cache = KVCache(kv, device=cfg.device)
        self.publisher = None
        if with_events:   # only the prefix-aware run publishes
            from kvcore.events import EventPublisher
            self.publisher = EventPublisher("tcp://127.0.0.1:*",
                                            replay_endpoint="tcp://127.0.0.1:*")
        self.waiting: deque = deque()
        self.running: dict[int, list] = {}    # seq -> [tokens, decoded]
        self.requests = self.prompt_tokens = self.hit_tokens = 0

    def close(self):
        if self.publisher is not None:
            self.publisher.close()


def _write(cache: KVCache, cfg: ClusterConfig, slots: np.ndarray, tokens: np.ndarray,
           positions: np.ndarray) -> None:
    for layer in range(cfg.num_layers):
        k = _kv_values(tokens, positions, layer, 0, cfg.num_kv_heads, cfg.head_dim)
        v = _kv_values(tokens, positions, layer, 1, cfg.num_kv_heads, cfg.head_dim)
        cache.write(layer, cache.from_host(k), cache.from_host(v), slots)


def _verify(cache: KVCache, cfg: ClusterConfig, seq: int, tokens: np.ndarray) -> None:
    positions = np.arange(len(tokens))
    for layer in range(cfg.num_layers):
        k, v, _ = cache.gather(layer, [seq])
        for which, got in ((0, k), (1, v)):
            want = _kv_values(tokens, positions, layer, which, cfg.num_kv_heads, cfg.head_dim)
            if not np.array_equal(cache.to_host(got).view(np.uint16), want.view(np.uint16)):
                raise AssertionError(f"sequence {seq}: layer {layer} {'KV'[which]} differs "
                                     "from what its tokens give (a wrong prefix hit)")


def _index_hashes(cache: KVCache) -> frozenset:
    """The hashes in a replica's prefix index, from its own state."""
    return frozenset(int(h) for h in cache.cached_hashes())


def run_cluster(cfg: ClusterConfig, routing: str) -> dict:
    """Run the workload with ``routing`` ``"prefix"`` (the router, over ZeroMQ) or
    ``"random"``; return its figures (hit rate, prefill tokens, events, checks)."""
    from kvcore.router import PrefixRouter
    rng = np.random.default_rng(cfg.seed)
    prefixes = rng.integers(0, 32000, size=(cfg.prefixes, cfg.prefix_tokens))
    which = rng.integers(0, cfg.prefixes, size=cfg.requests)
    suffix_len = rng.integers(cfg.suffix_min, cfg.suffix_max + 1, size=cfg.requests)
    prompts = [np.concatenate([prefixes[w], rng.integers(0, 32000, size=int(n))])
               for w, n in zip(which, suffix_len, strict=True)]
    route_rng = np.random.default_rng(cfg.seed + 1)
    events = routing == "prefix"
    replicas = [_Replica(f"r{i}", cfg, events) for i in range(cfg.replicas)]
    router = PrefixRouter(cfg.page_size)
    start = time.perf_counter()
    route_s = 0.0
    steps = 0
    try:
        for r in replicas:
            router.add_replica(r.name, r.publisher.endpoint if events else None,
                               replay_endpoint=r.publisher.replay_endpoint if events else None)
        pending = deque(range(cfg.requests))
        while pending or any(r.waiting or r.running for r in replicas):
            steps += 1
            for _ in range(min(cfg.arrivals_per_step, len(pending))):
                i = pending.popleft()
                t0 = time.perf_counter()
                if events:
                    name = router.route(prompts[i], {r.name: len(r.running) + len(r.waiting)
                                                     for r in replicas})
                    target = next(r for r in replicas if r.name == name)
                else:
                    target = replicas[int(route_rng.integers(cfg.replicas))]
                route_s += time.perf_counter() - t0
                target.waiting.append(i)
            for r in replicas:
                _step(r, cfg, prompts)
                if events:
                    seq = r.publisher.publish(r.cache)
                    if seq is not None:
                        router.catch_up(r.name, seq)
                    if router.cached_hashes(r.name) != _index_hashes(r.cache):
                        raise AssertionError(f"the router's view of {r.name} differs from "
                                             "its prefix index")
                r.cache.check_invariants()
        elapsed = time.perf_counter() - start
        prompt = sum(r.prompt_tokens for r in replicas)
        hit = sum(r.hit_tokens for r in replicas)
        return {
            "routing": routing, "requests": cfg.requests, "steps": steps,
            "prompt_tokens": prompt, "hit_tokens": hit,
            "hit_rate": hit / prompt if prompt else 0.0,
            "prefill_tokens": prompt - hit,
            "requests_per_replica": [r.requests for r in replicas],
            "evictions": sum(r.cache.prefix_stats["evictions"] for r in replicas),
            "event_batches": router.batches, "events": router.events,
            "missed_batches": sum(router.missed(r.name) for r in replicas),
            "route_us_per_request": route_s / cfg.requests * 1e6,
            "elapsed_s": elapsed, "device": replicas[0].cache.device, "verified": True,
        }
    finally:
        router.close()
        for r in replicas:
            r.close()


def _step(r: _Replica, cfg: ClusterConfig, prompts: list) -> None:
    """One scheduler step of a replica: admit what fits, then decode one token each."""
    cache = r.cache
    ps = cfg.page_size
    while r.waiting and len(r.running) < cfg.max_running:
        tokens = prompts[r.waiting[0]]
        worst = -(-(len(tokens) + cfg.decode_tokens) // ps)
        if cache.num_free_pages < worst:
            break
        r.waiting.popleft()
        seq = cache.add_sequence(tokens)
        hit = cache.num_tokens(seq)
        res = cache.append([seq], [len(tokens) - hit], token_ids=tokens[hit:])
        _write(cache, cfg, res.slot_mapping, tokens[hit:], np.arange(hit, len(tokens)))
        _verify(cache, cfg, seq, tokens)
        r.running[seq] = [tokens, 0]
        r.requests += 1
        r.prompt_tokens += len(tokens)
        r.hit_tokens += hit
    for seq in list(r.running):
        tokens, decoded = r.running[seq]
        if decoded == cfg.decode_tokens:
            cache.remove(seq)
            del r.running[seq]
            continue
        new = np.array([(int(tokens[-1]) * 31 + decoded) % 32000])
        res = cache.append([seq], [1], token_ids=new)
        _write(cache, cfg, res.slot_mapping, new, np.array([len(tokens)]))
        r.running[seq] = [np.concatenate([tokens, new]), decoded + 1]


def format_cluster(prefix: dict, random: dict) -> str:
    """The table ``kvcore simulate --replicas N`` prints."""
    rows = [("", "prefix-aware", "random"),
            ("prompt-token hit rate", f"{prefix['hit_rate']:.1%}", f"{random['hit_rate']:.1%}"),
            ("tokens prefilled", f"{prefix['prefill_tokens']:,}", f"{random['prefill_tokens']:,}"),
            ("prefix-cache evictions", f"{prefix['evictions']:,}", f"{random['evictions']:,}"),
            ("requests per replica", " / ".join(map(str, prefix["requests_per_replica"])),
             " / ".join(map(str, random["requests_per_replica"]))),
            ("event batches received (missed)",
             f"{prefix['event_batches']:,} ({prefix['missed_batches']})", "-"),
            ("routing time per request", f"{prefix['route_us_per_request']:.1f} us", "-")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>16}  {c:>16}" for a, b, c in rows]
    cut = 1 - prefix["prefill_tokens"] / random["prefill_tokens"] if random["prefill_tokens"] else 0
    lines.append(f"prefix-aware routing prefilled {cut:.1%} fewer tokens; every request's K/V "
                 "verified byte for byte; the router's view equalled each index after "
                 "every step")
    return "\n".join(lines)
