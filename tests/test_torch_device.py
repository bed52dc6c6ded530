"""The device path as a torch serving engine uses it, on a GPU: the caller's stream
(torch and CuPy, with negative controls that show the tests can fail), torch CUDA graphs
replayed at a padded batch, torch-owned and adopted (vLLM-layout) pools against the
NumPy oracle, zero-copy, released memory, and FlashInfer reading a kvcore pool."""

import gc
import importlib.util
import weakref

import numpy as np
import pytest

from kvcore import KernelError, KVCache, KVCacheConfig, ShapeError

from ._twins import (
    adopted_pools,
    assert_same_bytes,
    assert_same_pools,
    random_kv,
    run_random_ops,
    to_host,
)

pytestmark = pytest.mark.cuda

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

H, D, S = 8, 128, 16
#: Producer spin: long enough (about 10 ms) that a write not ordered after the producer
#: runs before it finishes, so the negative controls do see stale data.
SPIN_CYCLES = 20_000_000
TRIALS = 20


def config(num_pages=64, layers=2, layout="NHD", dtype="bfloat16", max_seqs=16):
    return KVCacheConfig(num_layers=layers, num_kv_heads=H, head_dim=D, page_size=S,
                         num_pages=num_pages, dtype=dtype, layout=layout, max_seqs=max_seqs)


def bf16(words: np.ndarray):
    """Host uint16 bfloat16 words -> a CUDA torch.bfloat16 tensor."""
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int16)).cuda().view(
        torch.bfloat16)


# -- the caller's stream ------------------------------------------------------------------------

def torch_ordering_trials(mode: str) -> int:
    """Producer (spin, then fill k and v with i) on side stream ``s`` -> ``write`` ->
    consumer reading the pool on ``s``; returns how many trials read stale data.

    mode: ``current`` (write inside ``torch.cuda.stream(s)``), ``explicit`` (write
    outside it with ``stream=s``), ``raw`` (``stream=`` the ``cudaStream_t`` int),
    ``other`` (negative control: ``stream=`` another stream, so nothing orders the write
    after the producer).
    """
    cache = KVCache(config(), device="cuda", framework="torch")
    seq = cache.add_sequence()
    slots = torch.as_tensor(cache.append([seq], [4]).slot_mapping, device="cuda")
    page = int(cache.pages(seq)[0])
    s, other = torch.cuda.Stream(), torch.cuda.Stream()
    k = torch.zeros(4, H, D, dtype=torch.bfloat16, device="cuda")
    v = torch.zeros_like(k)
    torch.cuda.synchronize()
    stale = 0
    for i in range(1, TRIALS + 1):
        with torch.cuda.stream(s):
            torch.cuda._sleep(SPIN_CYCLES)
            k.fill_(i)
            v.fill_(-i)
            if mode == "current":
                cache.write(0, k, v, slots)
        if mode == "explicit":
            cache.write(0, k, v, slots, stream=s)
        elif mode == "raw":
            cache.write(0, k, v, slots, stream=s.cuda_stream)
        elif mode == "other":
            cache.write(0, k, v, slots, stream=other)
        with torch.cuda.stream(s):
            seen_k = cache.k_cache(0)[page, :4].clone()
            seen_v = cache.v_cache(0)[page, :4].clone()
        torch.cuda.synchronize()
        if not (bool((seen_k == i).all()) and bool((seen_v == -i).all())):
            stale += 1
    return stale


@pytest.mark.parametrize("mode", ["current", "explicit", "raw"])
def test_torch_side_stream_write_is_ordered(mode):
    assert torch_ordering_trials(mode) == 0


def test_torch_side_stream_negative_control_sees_stale_data():
    assert torch_ordering_trials("other") > 0


SPIN = None


def cupy_spin(cycles: int) -> None:
    global SPIN
    if SPIN is None:
        SPIN = cupy.RawKernel(r'''
extern "C" __global__ void spin(long long cycles) {
  long long start = clock64();
  while (clock64() - start < cycles) { }
}''', "spin")
    SPIN((1,), (1,), (np.int64(cycles),))


def cupy_ordering_trials(mode: str) -> int:
    """:func:`torch_ordering_trials` with a CuPy cache and CuPy streams."""
    cache = KVCache(config(), device="cuda", framework="cupy")
    seq = cache.add_sequence()
    slots = cupy.asarray(cache.append([seq], [4]).slot_mapping)
    page = int(cache.pages(seq)[0])
    s = cupy.cuda.Stream(non_blocking=True)
    other = cupy.cuda.Stream(non_blocking=True)
    k = cupy.zeros((4, H, D), dtype=cupy.uint16)
    v = cupy.zeros_like(k)
    cupy.cuda.Device().synchronize()
    stale = 0
    for i in range(1, TRIALS + 1):
        with s:
            cupy_spin(SPIN_CYCLES)
            k.fill(i)
            v.fill(1000 + i)
            if mode == "current":
                cache.write(0, k, v, slots)
            elif mode == "other":
                cache.write(0, k, v, slots, stream=other)
            seen_k = cache.k_cache(0)[page, :4].copy()
            seen_v = cache.v_cache(0)[page, :4].copy()
        cupy.cuda.Device().synchronize()
        if not (bool((seen_k == i).all()) and bool((seen_v == 1000 + i).all())):
            stale += 1
    return stale


def test_cupy_side_stream_write_is_ordered():
    assert cupy_ordering_trials("current") == 0


def test_cupy_side_stream_negative_control_sees_stale_data():
    assert cupy_ordering_trials("other") > 0


def test_copy_on_write_copies_run_on_the_callers_stream():
    """The page copy inside append is ordered after a producer on the caller's stream."""
    cache = KVCache(config(), device="cuda", framework="torch")
    parent = cache.add_sequence()
    slots = torch.as_tensor(cache.append([parent], [3]).slot_mapping, device="cuda")
    child = cache.fork(parent)
    s = torch.cuda.Stream()
    k = torch.full((3, H, D), 7, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(SPIN_CYCLES)
        cache.write(0, k, k, slots)
        step = cache.append([child], [1])           # copy-on-write of the shared page
        assert step.copy_src.size == 1
        copied = cache.k_cache(0)[int(step.copy_dst[0]), :3].clone()
    torch.cuda.synchronize()
    assert bool((copied == 7).all())


# -- torch CUDA graphs ----------------------------------------------------------------------------

def test_torch_graph_replays_a_padded_multi_layer_step():
    layers, max_batch, max_tokens = 3, 8, 8
    cfg = config(num_pages=256, layers=layers, max_seqs=max_batch)
    cpu = KVCache(cfg, device="cpu")
    gpu = KVCache(cfg, device="cuda", framework="torch")
    rng = np.random.default_rng(7)
    seqs = [cpu.add_sequence() for _ in range(max_batch)]
    assert [gpu.add_sequence() for _ in range(max_batch)] == seqs
    prompt = rng.integers(1, 40, size=max_batch)
    step = cpu.append(seqs, prompt)
    gpu.append(seqs, prompt)
    for layer in range(layers):
        k, v = random_kv(rng, cpu, step.slot_mapping.size), random_kv(rng, cpu,
                                                                      step.slot_mapping.size)
        cpu.write(layer, k, v, step.slot_mapping)
        gpu.write(layer, bf16(k), bf16(v), step.slot_mapping)

    meta = gpu.step_metadata(max_tokens=max_tokens, max_batch=max_batch)
    k_in = torch.zeros(layers, max_tokens, H, D, dtype=torch.bfloat16, device="cuda")
    v_in = torch.zeros_like(k_in)
    rows = max_batch * 128
    k_out = torch.zeros(rows, H, D, dtype=torch.bfloat16, device="cuda")
    v_out = torch.zeros_like(k_out)

    def step_body():
        for layer in range(layers):
            gpu.write(layer, k_in[layer], v_in[layer], meta)
        gpu.gather(layers - 1, meta, out=(k_out, v_out))

    side = torch.cuda.Stream()                   # warm up off the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step_body()                              # empty metadata: writes nothing
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with pytest.raises(KernelError, match="cannot be captured"):
            meta.update(seqs, None)
        with pytest.raises(KernelError, match="cannot be captured"):
            gpu.write(0, k_in[0], v_in[0], np.full(max_tokens, -1))
        step_body()

    for _ in range(40):                          # sequences grow across page boundaries
        live = sorted(rng.choice(seqs, size=int(rng.integers(1, max_batch + 1)),
                                 replace=False).tolist())
        step = cpu.append(live, 1)
        assert np.array_equal(gpu.append(live, 1).slot_mapping, step.slot_mapping)
        meta.update(live, step)
        n = len(live)
        k_new = np.stack([random_kv(rng, cpu, max_tokens) for _ in range(layers)])
        v_new = np.stack([random_kv(rng, cpu, max_tokens) for _ in range(layers)])
        k_in.copy_(bf16(k_new))                  # rows past n are padding: never written
        v_in.copy_(bf16(v_new))
        graph.replay()
        for layer in range(layers):
            cpu.write(layer, k_new[layer, :n], v_new[layer, :n], step.slot_mapping)
        k_ref, v_ref, indptr = cpu.gather(layers - 1, live)
        torch.cuda.synchronize()
        total = int(indptr[-1])
        assert_same_bytes(k_ref, k_out[:total])
        assert_same_bytes(v_ref, v_out[:total])
    gpu.synchronize()
    assert_same_pools(cpu, gpu)


# -- torch-owned and adopted pools ----------------------------------------------------------------

def test_torch_owned_pool_is_torch_and_zero_copy():
    cache = KVCache(config(), device="cuda", framework="torch")
    assert cache.framework == "torch"
    assert isinstance(cache.kv, torch.Tensor) and cache.kv.dtype == torch.bfloat16
    assert tuple(cache.kv.shape) == cache.config.pool_shape
    k0 = cache.k_cache(1)
    assert k0.data_ptr() == cache.kv[1, 0].data_ptr() and k0.dtype == torch.bfloat16
    seq = cache.add_sequence()
    slots = cache.append([seq], [20]).slot_mapping
    k = torch.randn(20, H, D, dtype=torch.bfloat16, device="cuda")
    ptr = k.data_ptr()
    cache.write(1, k, -k, slots)
    assert k.data_ptr() == ptr
    k_out, v_out, _ = cache.gather(1, [seq])
    assert isinstance(k_out, torch.Tensor) and k_out.dtype == torch.bfloat16
    assert torch.equal(k_out, k) and torch.equal(v_out, -k)
    page = int(slots[0]) // S
    assert torch.equal(cache.k_cache(1)[page, 0], k[0])
    meta = cache.step_metadata(max_tokens=4, max_batch=2)
    meta.update([seq])
    k_meta, v_meta, token_indptr = cache.gather(1, meta)     # outputs sized by the step
    assert torch.equal(k_meta, k) and torch.equal(v_meta, -k)
    assert token_indptr.tolist() == [0, 20, 20]


@pytest.mark.parametrize("kind", ["kv_first", "page_first", "pair"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_adopted_pools_match_numpy(kind, layout, dtype):
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16,
                        num_pages=56, dtype=dtype, layout=layout, max_seqs=16)
    cpu = KVCache(cfg, device="cpu")
    pool = adopted_pools(cfg, kind)
    gpu = KVCache(cfg, device="cuda", pool=pool)
    assert gpu.framework == "torch"
    rng = np.random.default_rng(11)
    # poison both with the same bits, layer by layer
    cpu.kv.view(np.uint8)[...] = rng.integers(1, 255, size=cpu.kv.nbytes, dtype=np.uint8
                                              ).reshape(cpu.kv.view(np.uint8).shape)
    for layer in range(cfg.num_layers):
        for view, host in ((gpu.k_cache(layer), cpu.k_cache(layer)),
                           (gpu.v_cache(layer), cpu.v_cache(layer))):
            view.copy_(torch.from_numpy(host.view(np.int16 if host.itemsize == 2 else np.int32)
                                        .copy()).cuda().view(view.dtype))
    entry = pool[0][0] if kind == "pair" else pool[0]
    k_view = gpu.k_cache(0)
    assert k_view.data_ptr() == entry.data_ptr()     # views of the engine's memory
    with pytest.raises(AttributeError, match="adopted"):
        gpu.kv  # noqa: B018
    run_random_ops(cpu, gpu, rng)


def test_adopting_a_bad_pool_is_a_shape_error():
    cfg = config()
    pool = adopted_pools(cfg, "kv_first")
    with pytest.raises(ShapeError, match="has 1 layer entries"):
        KVCache(cfg, device="cuda", pool=pool[:1])
    wrong = [t.to(torch.float16) for t in pool]
    with pytest.raises(ShapeError, match="dtype float16"):
        KVCache(cfg, device="cuda", pool=wrong)


# -- memory is given back ------------------------------------------------------------------------

@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_a_dropped_cache_releases_its_pool(framework):
    def churn():
        cache = KVCache(config(num_pages=512, layers=4), device="cuda", framework=framework)
        seq = cache.add_sequence()
        step = cache.append([seq], [40])
        k = cache.from_host(random_kv(np.random.default_rng(0), cache, 40))
        cache.write(0, k, k, step.slot_mapping)
        meta = cache.step_metadata(max_tokens=64)
        meta.update([seq], step)
        cache.write(1, k, k, meta)
        cache.gather(0, [seq])
        cache.fork(seq)
        cache.synchronize()
        return weakref.ref(cache), weakref.ref(cache.backend)

    def used():
        torch.cuda.synchronize()
        return (torch.cuda.memory_allocated() if framework == "torch"
                else cupy.get_default_memory_pool().used_bytes())

    refs = churn()
    gc.collect()
    assert all(r() is None for r in refs), "a dropped KVCache is still referenced"
    before = used()
    for _ in range(20):
        churn()
    gc.collect()
    assert used() == before


# -- FlashInfer reads a kvcore pool --------------------------------------------------------------

needs_flashinfer = pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                                      reason="needs FlashInfer (wheels in shared/wheels)")


def reference_decode(q, keys, values, num_kv_heads):
    """float32 attention of one query row per head over one sequence's K and V."""
    group = q.shape[0] // num_kv_heads
    k = keys.float().repeat_interleave(group, dim=1)       # [n, Hq, D]
    v = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,nhd->hn", q.float(), k) / q.shape[-1] ** 0.5
    return torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)


@needs_flashinfer
@pytest.mark.parametrize("captured", [False, True])
def test_flashinfer_decode_reads_a_kvcore_pool(captured):
    import flashinfer

    layers, batch, qo_heads = 2, 4, 32
    cfg = config(num_pages=128, layers=layers, max_seqs=batch)
    cache = KVCache(cfg, device="cuda", framework="torch")
    rng = np.random.default_rng(3)
    gen = torch.Generator(device="cuda").manual_seed(3)
    seqs = [cache.add_sequence() for _ in range(batch)]
    prompt = rng.integers(5, 40, size=batch)
    step = cache.append(seqs, prompt)
    history = {(layer, s): ([], []) for layer in range(layers) for s in seqs}

    def new_kv(n):
        return (torch.randn(layers, n, H, D, generator=gen, device="cuda").to(torch.bfloat16),
                torch.randn(layers, n, H, D, generator=gen, device="cuda").to(torch.bfloat16))

    def remember(k_all, v_all, counts):
        start = 0
        for s, c in zip(seqs, counts, strict=True):
            for layer in range(layers):
                history[layer, s][0].append(k_all[layer, start:start + c])
                history[layer, s][1].append(v_all[layer, start:start + c])
            start += c

    k_all, v_all = new_kv(int(prompt.sum()))
    for layer in range(layers):
        cache.write(layer, k_all[layer], v_all[layer], step.slot_mapping)
    remember(k_all, v_all, prompt)

    meta = cache.step_metadata(max_tokens=batch, max_batch=batch, max_pages=128)
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=captured,
        paged_kv_indptr_buffer=meta.page_indptr if captured else None,
        paged_kv_indices_buffer=meta.page_indices if captured else None,
        paged_kv_last_page_len_buffer=meta.last_page_len if captured else None)
    q_in = torch.zeros(layers, batch, qo_heads, D, dtype=torch.bfloat16, device="cuda")
    k_in = torch.zeros(layers, batch, H, D, dtype=torch.bfloat16, device="cuda")
    v_in = torch.zeros_like(k_in)
    out = torch.zeros(layers, batch, qo_heads, D, dtype=torch.bfloat16, device="cuda")

    def plan():
        indptr, indices, last = cache.flashinfer_metadata(seqs)
        wrapper.plan(torch.from_numpy(indptr), torch.from_numpy(indices),
                     torch.from_numpy(last), qo_heads, H, D, S,
                     q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)

    def decode_step():
        for layer in range(layers):
            cache.write(layer, k_in[layer], v_in[layer], meta)
            wrapper.run(q_in[layer], (cache.k_cache(layer), cache.v_cache(layer)),
                        out=out[layer])

    graph = None
    for _ in range(40):
        step = cache.append(seqs, 1)
        meta.update(seqs, step)
        plan()
        q = torch.randn(layers, batch, qo_heads, D, generator=gen, device="cuda")
        q_in.copy_(q.to(torch.bfloat16))
        k_new, v_new = new_kv(batch)
        k_in.copy_(k_new)
        v_in.copy_(v_new)
        remember(k_new, v_new, [1] * batch)
        if not captured:
            decode_step()
        else:
            if graph is None:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    decode_step()                 # warm-up (its writes are the real ones)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    decode_step()
            graph.replay()
        torch.cuda.synchronize()
        for layer in range(layers):
            for b, s in enumerate(seqs):
                keys = torch.cat(history[layer, s][0])
                values = torch.cat(history[layer, s][1])
                want = reference_decode(q_in[layer, b], keys, values, H)
                torch.testing.assert_close(out[layer, b].float(), want, atol=2e-2, rtol=2e-2)
    cache.synchronize()
    # the pool holds exactly what was written
    for layer in range(layers):
        k_pool, _, indptr = cache.gather(layer, seqs)
        for b, s in enumerate(seqs):
            want = torch.cat(history[layer, s][0])
            assert torch.equal(k_pool[int(indptr[b]):int(indptr[b + 1])], want)
    assert to_host(cache.k_cache(0)).dtype == np.uint16


# -- the README's torch example ------------------------------------------------------------------

def test_readme_torch_decode_loop_runs_as_written():
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parent.parent / "README.md"
    blocks = re.findall(r"^```python torch\n(.*?)^```", readme.read_text(), flags=re.S | re.M)
    assert blocks
    for block in blocks:
        exec(compile(block, str(readme), "exec"), {})
