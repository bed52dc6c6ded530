"""The host tier on the GPU: swaps, offloads and loads byte-equal to the NumPy backend,
ordered on the caller's (torch side) stream, and a transfer held in flight by a long
kernel queued before it keeps its pages out of reach until it completes.

Needs torch, CuPy and a CUDA GPU; skipped elsewhere.
"""

import numpy as np
import pytest

from kvcore import (
    KernelError,
    KVCache,
    KVCacheConfig,
    OutOfPagesError,
    TransferPendingError,
)

pytestmark = pytest.mark.cuda

torch = pytest.importorskip("torch")

L, H, D, S = 4, 2, 64, 16


def config(num_pages=32, host_pages=64, prefix=False, layout="NHD", dtype="bfloat16"):
    return KVCacheConfig(num_layers=L, num_kv_heads=H, head_dim=D, page_size=S,
                         num_pages=num_pages, dtype=dtype, layout=layout, max_seqs=8,
                         max_pages_per_seq=16, num_host_pages=host_pages,
                         enable_prefix_cache=prefix)


def random_step(gpu, cpu, seqs, counts, rng, tokens=None):
    """The same append + writes on both caches."""
    a = gpu.append(seqs, counts, tokens)
    b = cpu.append(seqs, counts, tokens)
    assert np.array_equal(a.slot_mapping, b.slot_mapping)
    n = int(sum(counts))
    for layer in range(L):
        k = torch.from_numpy(rng.standard_normal((n, H, D)).astype(np.float32)).to(
            gpu.kv.dtype)
        v = -k
        gpu.write(layer, k.cuda(), v.cuda(), a)
        cpu.write(layer, gpu.to_host(k.cuda()), gpu.to_host(v.cuda()), b)


def same_pool(gpu, cpu):
    torch.cuda.synchronize()
    return np.array_equal(gpu.to_host(gpu.kv), cpu.kv)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_swap_round_trip_equals_numpy_on_a_side_stream(layout):
    gpu = KVCache(config(layout=layout), device="cuda", framework="torch")
    cpu = KVCache(config(layout=layout), device="cpu")
    rng = np.random.default_rng(1)
    seqs = [gpu.add_sequence() for _ in range(3)]
    assert seqs == [cpu.add_sequence() for _ in range(3)]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):     # every call runs on the caller's current stream
        random_step(gpu, cpu, seqs, [40, 17, 5], rng)
        child = gpu.fork(seqs[0])
        assert child == cpu.fork(seqs[0])
        random_step(gpu, cpu, [child], [3], rng)
        out_g, out_c = gpu.swap_out([*seqs[:2], child]), cpu.swap_out([*seqs[:2], child])
        assert np.array_equal(out_g.host_pages, out_c.host_pages)
        assert gpu.wait() == [out_g] and cpu.wait() == [out_c]
        assert np.array_equal(gpu.host_kv, cpu.host_kv)
        random_step(gpu, cpu, [seqs[2]], [33], rng)   # reuses the freed pages
        in_g, in_c = gpu.swap_in([child, seqs[0], seqs[1]]), cpu.swap_in(
            [child, seqs[0], seqs[1]])
        assert np.array_equal(in_g.device_pages, in_c.device_pages)
        gpu.wait()
        cpu.wait()
        random_step(gpu, cpu, [*seqs, child], [1, 1, 1, 1], rng)
    assert same_pool(gpu, cpu)
    gpu.check_invariants()


def test_a_transfer_held_in_flight_keeps_its_pages(capsys):
    """A long kernel queued before a swap-in keeps its copy in flight: the sequence is
    not usable, its pages are not reused, freed or served, until the copy completes."""
    gpu = KVCache(config(num_pages=8), device="cuda", framework="torch")
    rng = np.random.default_rng(2)
    a = gpu.add_sequence()
    step = gpu.append([a], [4 * S])
    for layer in range(L):
        k = torch.from_numpy(rng.standard_normal((4 * S, H, D)).astype(np.float32)).to(
            torch.bfloat16).cuda()
        gpu.write(layer, k, -k, step)
    before = [gpu.to_host(gpu.gather(layer, [a])[0]) for layer in range(L)]
    gpu.swap_out([a])
    gpu.wait()
    gpu.kv.zero_()                                  # the freed pages are scribbled over
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(2_000_000_000)                # about a second of GPU time, queued first
    back = gpu.swap_in([a])
    assert gpu.poll() == [] and gpu.seq_state(a) == "swapping_in"
    with pytest.raises(TransferPendingError):
        gpu.gather(0, [a])
    with pytest.raises(TransferPendingError):
        gpu.append([a], [1])
    held = set(back.device_pages.tolist())
    assert all(gpu.allocator.refcounts[p] == 1 for p in held)
    b = gpu.add_sequence()
    with pytest.raises(OutOfPagesError):            # its pages are not free for others
        gpu.append([b], [5 * S])
    other = gpu.append([b], [4 * S])
    assert not held & set((other.slot_mapping // S).tolist())
    gpu.remove(a)                                   # removal waits for the copy, too
    assert gpu.num_free_pages == 0
    assert not stream.query()                       # still sleeping: it really was in flight
    finished = gpu.wait()
    assert finished == [back] and back.done
    assert gpu.num_free_pages == 4
    gpu.check_invariants()
    # And a copy that completes brings back exactly what went out.
    c = gpu.add_sequence()
    gpu.remove(b)
    step = gpu.append([c], [4 * S])
    for layer in range(L):
        gpu.write(layer, gpu.from_host(before[layer]), gpu.from_host(before[layer]), step)
    gpu.swap_out([c])
    gpu.wait()
    gpu.kv.zero_()
    gpu.swap_in([c])
    gpu.wait()
    for layer in range(L):
        assert np.array_equal(gpu.to_host(gpu.gather(layer, [c])[0]), before[layer])


def test_a_failed_transfer_is_never_served():
    gpu = KVCache(config(num_pages=8), device="cuda", framework="torch")
    a = gpu.add_sequence()
    gpu.append([a], [3 * S])
    gpu.swap_out([a])
    gpu.wait()
    back = gpu.swap_in([a])

    def failed(event):
        raise KernelError("injected")
    gpu.backend.transfer_done = failed
    assert gpu.poll() == [back] and back.status == "failed"
    del gpu.backend.transfer_done
    assert gpu.seq_state(a) == "swapped" and gpu.num_free_pages == 8
    gpu.check_invariants()


def test_offload_and_host_hit_equal_numpy():
    """Prefix pages evicted on the GPU are offloaded to pinned host memory and loaded
    back by a later hit, byte for byte as on the CPU."""
    gpu = KVCache(config(num_pages=10, prefix=True), device="cuda", framework="torch")
    cpu = KVCache(config(num_pages=10, prefix=True), device="cpu")
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 1000, 4 * S + 1).tolist()
    a = gpu.add_sequence()
    assert a == cpu.add_sequence()
    random_step(gpu, cpu, [a], [len(prompt)], rng, prompt)
    gpu.remove(a)
    cpu.remove(a)
    b = gpu.add_sequence()
    cpu.add_sequence()
    random_step(gpu, cpu, [b], [10 * S], rng)       # evicts (offloads) the 4 cached pages
    assert [t.kind for t in gpu.pending_transfers] == ["offload"]
    gpu.wait()
    cpu.wait()
    assert np.array_equal(gpu.host_kv, cpu.host_kv)
    gpu.remove(b)
    cpu.remove(b)
    hit = gpu.add_sequence(prompt)
    assert hit == cpu.add_sequence(prompt)
    assert gpu.seq_state(hit) == "swapping_in" and gpu.num_tokens(hit) == 4 * S
    gpu.wait()
    cpu.wait()
    assert same_pool(gpu, cpu)
    for layer in range(L):
        assert np.array_equal(gpu.to_host(gpu.gather(layer, [hit])[0]),
                              cpu.gather(layer, [hit])[0])
    gpu.check_invariants()


def test_swaps_and_host_tier_hits_refuse_graph_capture_and_change_nothing():
    """Their page ids are host data a replay would not upload again: while the stream
    captures, swap_out, swap_in and an offloading add_sequence raise, changing nothing;
    the captured work beside them replays as usual."""
    gpu = KVCache(config(num_pages=16, prefix=True), device="cuda", framework="torch")
    a, b = gpu.add_sequence(), gpu.add_sequence()
    gpu.append([a, b], [2 * S, S])
    gpu.swap_out([b])
    gpu.wait()
    k = torch.ones(S, H, D, dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(S, dtype=torch.int64, device="cuda") + int(gpu.pages(a)[0]) * S
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gpu.write(0, k, k, slots)                 # warm up off the default stream
    torch.cuda.current_stream().wait_stream(side)
    free, host_free = gpu.num_free_pages, gpu.num_free_host_pages
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in (lambda: gpu.swap_out([a]), lambda: gpu.swap_in([b]),
                     lambda: gpu.add_sequence(list(range(3 * S)))):
            with pytest.raises(KernelError, match="cannot be captured"):
                call()
        gpu.write(0, 2 * k, 2 * k, slots)
    assert gpu.seq_state(a) == "resident" and gpu.seq_state(b) == "swapped"
    assert (gpu.num_free_pages, gpu.num_free_host_pages) == (free, host_free)
    assert gpu.pending_transfers == () and gpu.num_seqs == 2
    graph.replay()
    torch.cuda.synchronize()
    assert (gpu.k_cache(0)[int(gpu.pages(a)[0])].float() == 2).all()
    gpu.check_invariants()
