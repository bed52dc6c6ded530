"""The prefix-aware router (kvcore.router) and ``kvcore simulate --replicas N``.

Needs the ``events`` extra (msgspec, pyzmq); without it these tests skip, except under
``CI=true``, where a missing extra is a failure.
"""

import json
import os

import numpy as np
import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("msgspec")
    pytest.importorskip("zmq")

from kvcore import KVCache, KVCacheConfig, Retention, TokenRange
from kvcore.cli import main
from kvcore.cluster_sim import ClusterConfig, run_cluster
from kvcore.events import EventPublisher, to_batch
from kvcore.router import PrefixRouter


def _cache(num_pages=64, page_size=4, prefix_hash="fast"):
    return KVCache(KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8,
                                 page_size=page_size, num_pages=num_pages, max_seqs=8,
                                 enable_prefix_cache=True, prefix_hash=prefix_hash),
                   device="cpu")


def _feed(router, name, cache):
    kinds, pages, hashes = cache.take_events()
    if len(kinds):
        router.apply(name, to_batch(kinds, pages, hashes, block_size=cache.config.page_size))


def _run(cache, tokens, retention=None):
    s = cache.add_sequence(tokens, retention=retention)
    hit = cache.num_tokens(s)
    cache.append([s], [len(tokens) - hit], token_ids=np.asarray(tokens[hit:]))
    return s


@pytest.mark.parametrize("algorithm", ["fast", "sha256"])
def test_match_equals_each_caches_own_match_prefix(algorithm):
    rng = np.random.default_rng(3)
    caches = {"a": _cache(24, prefix_hash=algorithm), "b": _cache(24, prefix_hash=algorithm)}
    router = PrefixRouter(4, algorithm=algorithm)
    for name in caches:
        router.add_replica(name)
    stems = [rng.integers(0, 20, size=12).tolist() for _ in range(5)]
    for step in range(60):
        name = "ab"[step % 2]
        cache = caches[name]
        suffix = rng.integers(0, 20, size=int(rng.integers(1, 9))).tolist()
        tokens = stems[int(rng.integers(5))] + suffix
        if cache.num_free_pages < 6 or cache.num_seqs == 8:
            for s in cache.table.active_seq_ids().tolist():
                cache.remove(s)
        s = _run(cache, tokens, retention=int(rng.integers(0, 101)))
        if rng.random() < 0.5:
            cache.remove(s)
        for n, c in caches.items():
            _feed(router, n, c)
            assert router.cached_hashes(n) == {int(h) for h in c.cached_hashes()}
        probe = stems[int(rng.integers(5))] + [1, 2, 3]
        assert router.match(probe) == {n: c.match_prefix(probe) for n, c in caches.items()}


def test_route_prefers_the_longest_prefix_then_the_least_load():
    a, b = _cache(), _cache()
    router = PrefixRouter(4)
    router.add_replica("a")
    router.add_replica("b")
    _run(a, list(range(9)))
    _run(b, list(range(5)))
    _feed(router, "a", a)
    _feed(router, "b", b)
    assert router.route(list(range(12))) == "a"
    assert router.route([7, 7, 7, 7, 7]) == "a"                     # a tie: the first
    assert router.route([7, 7, 7, 7, 7], {"a": 3, "b": 1}) == "b"  # a tie: the least loaded


def test_router_rejects_bad_use():
    with pytest.raises(ValueError):
        PrefixRouter(0)
    with pytest.raises(TypeError):
        PrefixRouter(4.0)
    with pytest.raises(ValueError):
        PrefixRouter(4, algorithm="md5")
    router = PrefixRouter(4)
    with pytest.raises(RuntimeError):
        router.route([1, 2, 3])
    router.add_replica("a")
    with pytest.raises(ValueError):
        router.add_replica("a")
    with pytest.raises(KeyError):
        router.apply("nope", None)


def test_a_router_on_real_sockets_follows_evictions_and_priorities():
    """Over ZeroMQ: the router's view equals the index through stores, leaf-first
    evictions of low-priority pages and a clear."""
    cache = _cache(num_pages=12)
    with EventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as pub, \
            PrefixRouter(4) as router:
        router.add_replica("a", pub.endpoint, replay_endpoint=pub.replay_endpoint)
        system = list(range(100, 108))
        s = _run(cache, [*system, 1], Retention(ranges=[TokenRange(0, 8, 90)]))
        cache.remove(s)
        for k in range(8):
            s = _run(cache, [k * 10 + t for t in range(9)])
            cache.remove(s)
            seq = pub.publish(cache)
            if seq is not None:
                router.catch_up("a", seq)
            assert router.cached_hashes("a") == {int(h) for h in cache.cached_hashes()}
        assert router.match([*system, 5]) == {"a": 8}
        cache.clear_prefix_cache()
        seq = pub.publish(cache)
        router.catch_up("a", seq)
        assert router.cached_hashes("a") == frozenset()
        assert router.missed("a") == 0


def test_prefix_routing_beats_random_routing_and_verifies():
    cfg = ClusterConfig(requests=120, device="cpu")
    prefix = run_cluster(cfg, "prefix")
    random = run_cluster(cfg, "random")
    assert prefix["verified"] and random["verified"]
    assert prefix["hit_rate"] > random["hit_rate"]
    assert prefix["missed_batches"] == 0 and prefix["event_batches"] > 0
    assert sum(prefix["requests_per_replica"]) == 120


@pytest.mark.parametrize("bad", [dict(replicas=1), dict(requests=0), dict(page_size=True),
                                 dict(suffix_min=9, suffix_max=3)])
def test_cluster_config_rejects_bad_values(bad):
    with pytest.raises((ValueError, TypeError)):
        ClusterConfig(**bad)


def test_the_cli_runs_a_cluster(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["simulate", "--replicas", "2", "--requests", "60", "--device", "cpu",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prefix-aware" in text and "random" in text
    data = json.loads(out.read_text())
    assert data["ok"] and data["prefix"]["requests"] == 60


def test_the_cli_refuses_options_a_cluster_run_would_ignore(capsys):
    assert main(["simulate", "--replicas", "2", "--window", "32", "--host-pages", "8"]) == 2
    err = capsys.readouterr().err
    assert "--window" in err and "--host-pages" in err


def test_match_takes_a_request_namespace():
    cache = _cache()
    router = PrefixRouter(4)
    router.add_replica("a")
    s = cache.add_sequence(namespace=7)
    cache.append([s], [9], token_ids=list(range(9)))
    _feed(router, "a", cache)
    assert router.match(list(range(10))) == {"a": 0}
    assert router.match(list(range(10)), namespace=7) == {"a": 8}
    assert router.route(list(range(10)), namespace=7) == "a"
