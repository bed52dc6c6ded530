"""kvcore.distributed on CPU: page transfer and tensor parallelism over gloo.

Every scenario runs in spawned processes (one per rank, torch.distributed with gloo and
a file rendezvous), several scenarios per session so the file stays fast on two cores;
each session is bounded in time. Needs torch.distributed: without it these tests skip,
except under ``CI=true`` (CI installs the model extra), where that is a failure.
"""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing as mp
import os
import tempfile
import traceback

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

if os.environ.get("CI") != "true":
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import kvcore
from kvcore import KVCache, KVCacheConfig
from kvcore.distributed import (
    TensorParallelCache,
    TransferError,
    recv_pages,
    send_pages,
)
from kvcore.distributed._comm import chunk_plan
from kvcore.simulate import token_words

SESSION_TIMEOUT = 90


# -- the harness --------------------------------------------------------------------------------

def _entry(rank, world, init_file, scenarios, queue, timeout_s, backend):
    import torch.distributed as dist

    results = {}
    try:
        if backend != "gloo":
            import torch

            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        for name in scenarios:
            try:
                globals()[name](rank, world)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()
    except Exception:
        results["session"] = traceback.format_exc()
    queue.put((rank, results))


def run_session(scenarios, world=2, timeout_s=20, expect=None, backend="gloo"):
    """Run scenario functions on ``world`` spawned ranks; {rank: {name: "ok" | traceback}}
    from the ranks in ``expect`` (default: all)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world, init_file, scenarios, queue,
                                                  timeout_s, backend)) for r in range(world)]
        for p in procs:
            p.start()
        out = {}
        try:
            for _ in range(world if expect is None else len(expect)):
                rank, results = queue.get(timeout=SESSION_TIMEOUT)
                out[rank] = results
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return out


def _check(results, name):
    for rank, res in sorted(results.items()):
        assert "session" not in res, f"rank {rank}: {res['session']}"
        assert res.get(name) == "ok", f"rank {rank}, {name}: {res.get(name)}"


# -- content and state ----------------------------------------------------------------------------

def content(tokens, positions, layer, which, cfg):
    """K or V of tokens from (token id, position) alone: equal prefixes, equal bytes."""
    words = token_words(tokens, np.zeros(len(tokens)), positions, layer, which,
                        cfg.num_kv_heads, cfg.head_dim, cfg.itemsize)
    return words.view(np.float32) if cfg.itemsize == 4 else words


def on(cache, array):
    """A NumPy array as the cache's device array."""
    return array if cache.device == "cpu" else cache.from_host(array)


def host(cache, array) -> np.ndarray:
    return np.asarray(array) if cache.device == "cpu" else cache.to_host(array)


def fill(cache, seq, tokens, slots):
    """Write every layer's K and V of ``tokens`` (positions from 0) at ``slots``."""
    pos = np.arange(len(tokens))
    for layer in range(cache.config.num_layers):
        cache.write(layer, on(cache, content(tokens, pos, layer, 0, cache.config)),
                    on(cache, content(tokens, pos, layer, 1, cache.config)), slots)


def expect_seq(cache, seq, tokens):
    """Every layer's K and V of ``seq`` equals the content of ``tokens``, byte for byte."""
    assert cache.num_tokens(seq) == len(tokens)
    pos = np.arange(len(tokens))
    for layer in range(cache.config.num_layers):
        k, v, _ = cache.gather(layer, [seq])
        assert host(cache, k).tobytes() == content(tokens, pos, layer, 0, cache.config).tobytes()
        assert host(cache, v).tobytes() == content(tokens, pos, layer, 1, cache.config).tobytes()


def snapshot(cache, probes=()):
    t = cache.table
    return (cache.allocator.refcounts.copy().tobytes(), t.block_table.copy().tobytes(),
            t.seq_lens.copy().tobytes(), cache.num_free_pages, cache.num_cached_pages,
            cache.num_seqs, tuple(t.match_prefix(p) for p in probes),
            hashlib.sha256(np.ascontiguousarray(host(cache, cache.kv)).tobytes()).hexdigest())


CFG = KVCacheConfig(3, 2, 4, 4, 64, dtype="float32", max_seqs=16, enable_prefix_cache=True)
CFG_BF16 = KVCacheConfig(2, 2, 8, 4, 40, dtype="bfloat16", layout="HND", max_seqs=8,
                         enable_prefix_cache=True)
PROMPTS = [list(range(100, 109)), list(range(200, 204)), list(range(300, 317))]


def prefill(cfg, prompts, device="cpu"):
    """A sender cache holding one sequence per prompt, written."""
    cache = KVCache(cfg, device=device)
    seqs = []
    for tokens in prompts:
        seq = cache.add_sequence()
        step = cache.append([seq], [len(tokens)], tokens)
        fill(cache, seq, np.array(tokens), step.slot_mapping)
        seqs.append(seq)
    return cache, seqs


# -- transfer scenarios (rank 0 sends, rank 1 receives) ------------------------------------------

def _device(rank):
    return os.environ.get("KVCORE_TEST_DEVICE", "cpu").replace("RANK", str(rank))


def transfer_basic(rank, world):
    device = _device(rank)
    small = 3 * 2 * CFG_BF16.page_elems * 2
    for cfg, chunk, mode in ((CFG, 64 << 20, "auto"), (CFG_BF16, small, "staged"),
                             (CFG, 64 << 20, "direct"), (CFG_BF16, small, "direct")):
        if rank == 0:
            cache, seqs = prefill(cfg, PROMPTS, device)
            stats = send_pages(cache, seqs, 1, token_ids=PROMPTS, chunk_bytes=chunk,
                               mode=mode)
            assert stats.num_pages == 3 + 1 + 5 and stats.hit_pages.tolist() == [0, 0, 0]
            if mode == "direct":    # pages 0..8 here, 2..10 there: one run
                assert stats.mode == "direct" and stats.num_chunks == 1
            else:                   # tiny pages: auto stages
                expected = chunk_plan(cfg.num_layers, 9, cfg.page_elems * cfg.itemsize, chunk)
                assert stats.mode == "staged" and stats.num_chunks == len(expected)
            assert stats.nbytes == 9 * cfg.num_layers * 2 * cfg.page_elems * cfg.itemsize
            cache.check_invariants()
        else:
            cache = KVCache(cfg, device=device)
            other = cache.add_sequence()         # so that page ids differ from the sender's
            cache.append([other], [7])
            stats = recv_pages(cache, 0)
            assert len(stats.seq_ids) == 3 and stats.num_pages == 9
            assert stats.mode == ("direct" if mode == "direct" else "staged")
            for seq, tokens in zip(stats.seq_ids.tolist(), PROMPTS, strict=True):
                expect_seq(cache, seq, tokens)
                # the prefix cache learned every full page but the last token's
                assert cache.match_prefix([*tokens, 1]) == len(tokens) // 4 * 4
            assert cache.pages(int(stats.seq_ids[0]))[0] != 0
            cache.check_invariants()


def transfer_prefix_hit(rank, world):
    """The receiver already holds a prefix: those pages are not sent, bytes still exact."""
    shared = list(range(500, 508))                # two full pages
    first, second = [*shared, 1, 2, 3], [*shared, 7, 8, 9, 10, 11]
    if rank == 0:
        cache, seqs = prefill(CFG, [first, second], _device(rank))
        a = send_pages(cache, seqs[:1], 1, token_ids=[first])
        b = send_pages(cache, seqs[1:], 1, token_ids=[second], mode="direct")
        assert a.hit_pages.tolist() == [0] and a.num_pages == 3
        assert b.hit_pages.tolist() == [2] and b.num_pages == 2 and b.mode == "direct"
    else:
        cache = KVCache(CFG, device=_device(rank))
        a = recv_pages(cache, 0)
        cache.remove(int(a.seq_ids[0]))             # its full pages stay cached
        b = recv_pages(cache, 0)
        assert b.hit_pages.tolist() == [2]
        expect_seq(cache, int(b.seq_ids[0]), second)
        cache.check_invariants()


def transfer_refusals(rank, world):
    """Each refusal: the receiver raises its typed error, the sender a TransferError, and
    neither cache changes."""
    cases = [("out_of_pages", dict(num_pages=8)), ("capacity", dict(max_seqs=2)),
             ("config", dict(head_dim=8))]
    for reason, change in cases:
        if rank == 0:
            cache, seqs = prefill(CFG, PROMPTS)
            before = snapshot(cache)
            with pytest.raises(TransferError) as info:
                send_pages(cache, seqs, 1, token_ids=PROMPTS)
            assert info.value.reason == reason, (reason, info.value.reason)
            assert snapshot(cache) == before
        else:
            fields = dict(num_layers=3, num_kv_heads=2, head_dim=4, page_size=4,
                          num_pages=64, dtype="float32", max_seqs=16,
                          enable_prefix_cache=True)
            cache = KVCache(KVCacheConfig(**{**fields, **change}), device="cpu")
            seq = cache.add_sequence(list(range(100, 105)))
            cache.append([seq], [5], list(range(100, 105)))
            cache.remove(seq)                           # a cached, evictable page
            before = snapshot(cache, [list(range(100, 109))])
            error = {"out_of_pages": kvcore.OutOfPagesError,
                     "capacity": kvcore.CapacityError, "config": ValueError}[reason]
            with pytest.raises(error):
                recv_pages(cache, 0)
            assert snapshot(cache, [list(range(100, 109))]) == before
            cache.check_invariants()


def transfer_sender_invalid(rank, world):
    if rank == 0:
        cache, seqs = prefill(CFG, PROMPTS[:1])
        before = snapshot(cache)
        with pytest.raises(kvcore.UnknownSequenceError):
            send_pages(cache, [seqs[0], 9], 1)
        with pytest.raises(ValueError, match="has 3 ids for its 9 tokens"):
            send_pages(cache, seqs, 1, token_ids=[[1, 2, 3]])
        assert snapshot(cache) == before
    else:
        cache = KVCache(CFG, device="cpu")
        before = snapshot(cache)
        for _ in range(2):
            with pytest.raises(TransferError) as info:
                recv_pages(cache, 0)
            assert info.value.reason == "sender"
        assert snapshot(cache) == before


def transfer_arguments(rank, world):
    """Local argument errors raise before anything is sent (on both ranks alike)."""
    cache = KVCache(CFG, device="cpu")
    with pytest.raises(ValueError, match="is not another rank"):
        send_pages(cache, [], rank)
    with pytest.raises(ValueError, match="is not another rank"):
        recv_pages(cache, 5)
    with pytest.raises(ValueError, match="below one page"):
        send_pages(cache, [], 1 - rank, chunk_bytes=8)
    with pytest.raises(ValueError, match="mode must be one of"):
        send_pages(cache, [], 1 - rank, mode="fast")


def transfer_dies_midway(rank, world):
    """The sender vanishes after the handshake: the receiver undoes its new sequences
    (un-indexing the pages they registered) and raises TransferError('failed')."""
    import kvcore.distributed.transfer as transfer

    if rank == 0:
        cache, seqs = prefill(CFG, PROMPTS)

        def vanish(*args, **kwargs):
            os._exit(0)

        transfer._send_data = vanish
        send_pages(cache, seqs, 1, token_ids=PROMPTS)
    else:
        cache = KVCache(CFG, device="cpu")
        seq = cache.add_sequence(PROMPTS[0][:5])
        cache.append([seq], [5], PROMPTS[0][:5])
        cache.remove(seq)                               # one cached page, evictable
        probes = [[*p, 1] for p in PROMPTS]
        before = snapshot(cache, probes)
        with pytest.raises(TransferError) as info:
            recv_pages(cache, 0)
        assert info.value.reason == "failed"
        after = snapshot(cache, probes)
        # the page table, allocator (free count) and prefix index are as before; the
        # cached page's place in the LRU may differ, which refcounts do not show
        assert after == before, (after, before)
        cache.check_invariants()


TRANSFER_SCENARIOS = ["transfer_basic", "transfer_prefix_hit", "transfer_refusals",
                      "transfer_sender_invalid", "transfer_arguments"]


# -- tensor-parallel scenarios --------------------------------------------------------------------

TP_CFGS = [KVCacheConfig(2, 4, 8, 4, 48, dtype="float32", max_seqs=8,
                         enable_prefix_cache=True),
           KVCacheConfig(2, 4, 8, 4, 48, dtype="bfloat16", layout="HND", max_seqs=8)]


def step_content(cfg, step, t, layer, which):
    """The full model's K or V of the step's ``t`` tokens (all heads)."""
    return content(np.full(t, step), np.arange(t), layer, which, cfg)


def head_shard(cfg, kv, heads):
    return kv[..., heads, :] if cfg.layout == "NHD" else kv[..., heads, :, :]


def tp_matches_single(rank, world):
    """Every rank's pool and metadata equal the head shard of one NumPy cache that ran
    the same calls, step after step (prefix hits, forks with copy-on-write, removes,
    truncates, a refused step)."""
    import torch.distributed as dist

    channels = ["auto"]
    if _device(rank) != "cpu":     # both channels on GPUs, where the group allows
        gloo = "gloo" in str(dist.get_backend()).lower()
        channels = ["host", "device"] if gloo else ["device"]
        from kvcore.distributed.tp import _cupy_nccl

        if _cupy_nccl():
            channels.append("nccl")
    for cfg in TP_CFGS:
        for channel in channels:
            _tp_run(cfg, rank, world, channel)


def _tp_run(cfg, rank, world, channel):
    import torch.distributed as dist

    # inline_ints=64: the longer steps take the second broadcast
    tp = TensorParallelCache(cfg, 32, device=_device(rank), max_batch=8, inline_ints=64,
                             channel=channel)
    assert tp.channel == ("host" if _device(rank) == "cpu" else channel)
    per = cfg.num_kv_heads // world
    assert tp.heads == slice(rank * per, (rank + 1) * per)
    assert tp.cache.config.num_kv_heads == per
    digests = []

    def write_step(step, result, write_to):
        t = len(result.slot_mapping)
        for layer in range(cfg.num_layers):
            k = step_content(cfg, step, t, layer, 0)
            v = step_content(cfg, step, t, layer, 1)
            for cache, heads in write_to:
                cache.write(layer, on(cache, np.ascontiguousarray(k[:, heads])),
                            on(cache, np.ascontiguousarray(v[:, heads])), result.slot_mapping)

    def digest(cache, heads=None):
        """The pool (or a head shard of it) and this rank's TP metadata."""
        kv = host(cache, cache.kv)
        kv = kv if heads is None else head_shard(cfg, kv, heads)
        meta = tp.metadata
        arrays = [np.ascontiguousarray(kv)] + [host(tp.cache, getattr(meta, name)) for name in
                  ("page_indptr", "last_page_len", "seq_lens", "token_indptr",
                   "slot_mapping", "page_indices", "block_tables")]
        return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()

    if tp.is_scheduler:
        ref = KVCache(cfg, device="cpu")
        rng = np.random.default_rng(7)
        live, step = [], 0
        prompt = list(range(40, 50))
        for it in range(14):
            # bookkeeping on both tables, identically
            if it in (0, 3, 6):
                a, b = tp.add_sequence(prompt), ref.add_sequence(prompt)
                assert a == b
                live.append(a)
            if it == 5 and live:
                a, b = tp.fork(live[0]), ref.fork(live[0])
                assert a == b
                live.append(a)
            if it == 9 and len(live) > 2:
                tp.remove(live[1])
                ref.remove(live[1])
                live.pop(1)
            if it == 11:
                tp.truncate([live[0]], [tp.num_tokens(live[0]) - 2])
                ref.truncate([live[0]], [ref.num_tokens(live[0]) - 2])
            if it == 7:   # refused before anything changes or is sent
                before = snapshot(tp.cache)
                with pytest.raises(kvcore.CapacityError):
                    tp.step(live, 40)
                assert snapshot(tp.cache) == before
            counts = [int(rng.integers(1, 6)) for _ in live]
            ids = [int(x) for x in rng.integers(0, 1000, sum(counts))]
            if it == 0:
                counts, ids = [len(prompt)], prompt
            result = tp.step(live, counts, ids if cfg.enable_prefix_cache else None)
            expected = ref.append(live, counts, ids if cfg.enable_prefix_cache else None)
            assert result.slot_mapping.tolist() == expected.slot_mapping.tolist()
            assert result.copy_src.tolist() == expected.copy_src.tolist()
            write_step(step, result, [(tp.cache, tp.heads), (ref, slice(None))])
            digests.append([digest(ref, slice(r * per, (r + 1) * per))
                            for r in range(world)])
            assert digest(tp.cache) == digests[-1][0], f"rank 0 differs at step {step}"
            step += 1
        assert any(len(tp.cache.table.pages(s)) for s in live)
        tp.close()
    else:
        with pytest.raises(ValueError, match="scheduler rank 0 only"):
            tp.add_sequence()
        with pytest.raises(ValueError, match="no arguments"):
            tp.step([0], 1)
        step = 0
        while (result := tp.step()) is not None:
            write_step(step, result, [(tp.cache, tp.heads)])
            digests.append(digest(tp.cache))
            step += 1
        assert step == 14
    every = [None] * world
    dist.all_gather_object(every, digests)
    ref_digests = every[0]
    for r in range(1, world):
        mine = every[r]
        assert len(mine) == len(ref_digests)
        for i, d in enumerate(mine):
            assert d == ref_digests[i][r], f"rank {r} differs at step {i}"


def tp_validation(rank, world):
    with pytest.raises(ValueError, match="does not split over 2 ranks"):
        TensorParallelCache(KVCacheConfig(1, 3, 4, 4, 8, dtype="float32"), 8, device="cpu")
    # ranks that disagree all raise
    heads = 2 if rank == 0 else 4
    with pytest.raises(ValueError, match="another config"):
        TensorParallelCache(KVCacheConfig(1, heads, 4, 4, 8, dtype="float32"), 8,
                            device="cpu")
    with pytest.raises(ValueError, match="channel must be"):
        TensorParallelCache(KVCacheConfig(1, 2, 4, 4, 8, dtype="float32"), 8, device="cpu",
                            channel="shm")
    with pytest.raises(ValueError, match="channel='device' needs NCCL"):
        TensorParallelCache(KVCacheConfig(1, 2, 4, 4, 8, dtype="float32"), 8, device="cpu",
                            channel="device")
    with pytest.raises(ValueError, match="src 5"):
        TensorParallelCache(KVCacheConfig(1, 2, 4, 4, 8, dtype="float32"), 8, device="cpu",
                            src=5)


def tp_failed_step(rank, world):
    """A step whose metadata does not fit after its append: its copies still reach every
    rank, and every rank raises."""
    cfg = KVCacheConfig(1, 2, 4, 4, 48, dtype="float32", max_seqs=8)
    tp = TensorParallelCache(cfg, 64, device="cpu", max_batch=8)
    if tp.is_scheduler:
        a = tp.add_sequence()
        tp.step([a], [38])                       # 10 pages, the last one half full
        b = tp.fork(a)                           # shares them: b's append copies the last
        assert tp.step([b], [1]).copy_src.size == 1
        tp.fork(a)                               # a's append must copy its last page
        with pytest.raises(kvcore.CapacityError, match="above max_pages"):
            tp.step([a], [1], batch=[a] * 8)     # 80 page entries > max_pages 48
        assert tp.num_tokens(a) == 39            # the append stands
        tp.close()
    else:
        assert tp.step() is not None
        assert tp.step().copy_src.size == 1
        with pytest.raises(kvcore.CapacityError, match="copy-on-write copies were applied"):
            tp.step()
        assert tp.step() is None


TP_SCENARIOS = ["tp_matches_single", "tp_validation", "tp_failed_step"]


# -- the tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gloo_results():
    return run_session(TRANSFER_SCENARIOS + TP_SCENARIOS)


@pytest.mark.parametrize("name", TRANSFER_SCENARIOS + TP_SCENARIOS)
def test_gloo(gloo_results, name):
    _check(gloo_results, name)


def test_transfer_failure_midway_undoes_receiver():
    results = run_session(["transfer_dies_midway"], timeout_s=4, expect=[1])
    assert results[1].get("transfer_dies_midway") == "ok", results[1]


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=40))
def test_page_runs_model(steps):
    """page_runs against a model: walk both lists, cut wherever either does not go up
    by one; the runs rebuild both lists exactly."""
    from kvcore.distributed.transfer import page_runs

    src, dst = [5], [9]
    for ds, dd in steps:
        src.append(src[-1] + ds)
        dst.append(dst[-1] + dd)
    runs = page_runs(src, dst)
    cuts = sum(1 for i in range(1, len(src)) if src[i] != src[i - 1] + 1
               or dst[i] != dst[i - 1] + 1)
    assert len(runs) == cuts + 1
    assert [p for a, _, n in runs for p in range(a, a + n)] == src
    assert [p for _, b, n in runs for p in range(b, b + n)] == dst


@given(st.integers(1, 6), st.integers(0, 40), st.integers(1, 64), st.integers(1, 5000))
def test_chunk_plan_model(layers, pages, unit, chunk):
    """Every (layer, page) exactly once, in wire order, each chunk within its bound."""
    chunk = max(chunk, 2 * unit)
    plan = chunk_plan(layers, pages, unit, chunk)
    cells = [(layer, p) for a, b, p0, q in plan for layer in range(a, b)
             for p in range(p0, q)]
    assert sorted(cells) == [(layer, p) for layer in range(layers) for p in range(pages)]
    for a, b, p0, q in plan:
        assert (b - a) * 2 * (q - p0) * unit <= chunk


def test_page_runs():
    from kvcore.distributed.transfer import page_runs

    assert page_runs([], []) == []
    assert page_runs([3], [9]) == [(3, 9, 1)]
    assert page_runs([0, 1, 2, 3], [5, 6, 8, 9]) == [(0, 5, 2), (2, 8, 2)]
    rng = np.random.default_rng(1)
    src, dst = rng.permutation(50)[:30], rng.permutation(50)[:30]
    runs = page_runs(src, dst)
    assert [p for s, _, n in runs for p in range(s, s + n)] == src.tolist()
    assert [p for _, d, n in runs for p in range(d, d + n)] == dst.tolist()


def test_chunk_plan_covers_every_page_once():
    for layers, pages, unit, chunk in [(4, 10, 100, 4000), (2, 10, 100, 800),
                                       (3, 1, 7, 14), (32, 8192, 32768, 64 << 20)]:
        plan = chunk_plan(layers, pages, unit, chunk)
        seen = np.zeros((layers, pages), dtype=int)
        for a, b, p, q in plan:
            assert (b - a) * 2 * (q - p) * unit <= max(chunk, 2 * unit)
            seen[a:b, p:q] += 1
        assert (seen == 1).all()
    assert chunk_plan(3, 0, 10, 100) == []


def test_needs_an_initialised_group():
    cache = KVCache(CFG, device="cpu")
    with pytest.raises(ValueError, match="not initialised"):
        send_pages(cache, [], 1)
    with pytest.raises(ValueError, match="not initialised"):
        TensorParallelCache(CFG, 8, device="cpu")


# -- two GPUs (NCCL) ------------------------------------------------------------------------------

def _two_gpus() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return (torch.cuda.is_available() and torch.cuda.device_count() >= 2
            and torch.distributed.is_nccl_available())


GPU_SCENARIOS = ["transfer_basic", "transfer_prefix_hit", "transfer_refusals",
                 "tp_matches_single"]


@pytest.mark.multigpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs and NCCL")
@pytest.mark.parametrize("backend", ["cpu:gloo,cuda:nccl", "nccl"])
def test_two_gpus(backend, monkeypatch):
    """The same scenarios between two GPUs: pages over NCCL, byte-exact against the
    NumPy content; TP pools equal the NumPy oracle's head shards, with the step message
    over gloo (host channel) and over NCCL (device channel). With a pure NCCL group the
    transfer's control messages are device tensors and TP has the device channel only."""
    monkeypatch.setenv("KVCORE_TEST_DEVICE", "cuda:RANK")
    scenarios = list(GPU_SCENARIOS)
    if backend == "nccl":   # CPU caches cannot use a pure NCCL group
        scenarios.remove("transfer_refusals")
        scenarios.append("tp_refuses_host_channel")
    results = run_session(scenarios, timeout_s=60, backend=backend)
    for name in scenarios:
        _check(results, name)


def tp_refuses_host_channel(rank, world):
    with pytest.raises(ValueError, match="cannot broadcast the step's metadata"):
        TensorParallelCache(CFG, 8, device=_device(rank), channel="host")


# -- kvcore simulate --disaggregated --------------------------------------------------------

def test_simulate_disaggregated(tmp_path, capsys):
    from kvcore.cli import main

    out = tmp_path / "d.json"
    assert main(["simulate", "--disaggregated", "--requests", "12", "--device", "cpu",
                 "--json", str(out)]) == 0
    import json

    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["finished"] == 12 and summary["mismatches"] == 0
    assert summary["transfers"] >= 2 and summary["pages_sent"] > 0
    assert summary["decode_hit_pages"] > 0          # the decode rank's cache learned prompts
    assert summary["verified_tokens"] > 0
    assert "0 mismatches" in capsys.readouterr().out


def test_simulate_disaggregated_sees_a_corrupt_page(tmp_path):
    from kvcore.cli import main

    assert main(["simulate", "--disaggregated", "--requests", "8", "--device", "cpu",
                 "--corrupt-at-step", "0", "--json", str(tmp_path / "d.json")]) == 1
    import json

    summary = json.loads((tmp_path / "d.json").read_text())
    assert summary["mismatches"] >= 1 and not summary["ok"]


def test_simulate_disaggregated_refuses_options(capsys):
    from kvcore.cli import main

    assert main(["simulate", "--disaggregated", "--window", "8"]) == 2
    assert "--window does not apply to --disaggregated" in capsys.readouterr().err
    assert main(["simulate", "--disaggregated", "--pages", "4"]) == 2


def test_docs_example_runs(tmp_path):
    """docs/distributed.md's example, as a script (it spawns its two ranks)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "distributed.md").read_text()
    (block,) = re.findall(r"^```python\n(.*?)^```", doc, flags=re.S | re.M)
    script = tmp_path / "example.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env=env, cwd=root)
    assert run.returncode == 0, run.stderr
    assert "rank 1: TransferStats(seqs=1, pages=3" in run.stdout
    assert "rank 1: heads slice(2, 4, None), slots [0, 1, 2, 3, 4]" in run.stdout
