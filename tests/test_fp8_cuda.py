"""fp8 and key-only (MLA) pools on CUDA against the NumPy oracle, byte for byte: the
quantizing write over every float16 / bfloat16 input, the dequantizing and raw gathers,
copy-on-write, copy_pages, the host tier, torch tensors and streams, adopted tensors.

Every test here is marked `cuda` and skipped without CuPy and a GPU (conftest.py).
"""

import numpy as np
import pytest

from kvcore import InvalidPageError, KVCache, KVCacheConfig

pytestmark = pytest.mark.cuda

cupy = pytest.importorskip("cupy")

from ._twins import (  # noqa: E402
    assert_same_bytes,
    assert_same_pools,
    random_kv,
    run_random_ops,
    twin_caches,
    twin_sequence,
)

FP8 = "float8_e4m3fn"
ALL_WORDS = np.arange(2**16, dtype=np.uint32).astype(np.uint16)


def set_twin_scales(cpu, gpu, rng):
    for layer in range(cpu.config.num_layers):
        k_scale, v_scale = (float(s) for s in rng.uniform(0.001, 2.0, size=2))
        v_scale = None if cpu.config.key_only else v_scale
        cpu.set_kv_scales(layer, k_scale, v_scale)
        gpu.set_kv_scales(layer, k_scale, v_scale)
    assert_same_bytes(cpu.scale_table, gpu.scale_table)


@pytest.mark.parametrize("head_dim", [128, 64, 7, 576])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("model_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("framework", ["cupy", "torch"])
def test_random_operations_match_numpy(framework, model_dtype, layout, page_size, head_dim):
    cpu, gpu = twin_caches(FP8, layout, page_size, head_dim, framework=framework,
                           model_dtype=model_dtype)
    rng = np.random.default_rng([page_size, head_dim, len(model_dtype), len(layout)])
    set_twin_scales(cpu, gpu, rng)
    run_random_ops(cpu, gpu, rng)


@pytest.mark.parametrize("scale", [1.0, 0.0173, 3.7, 2.0**-10, 1e-30, 6.02e30])
@pytest.mark.parametrize("model_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("framework", ["cupy", "torch"])
def test_every_input_quantizes_as_numpy(framework, model_dtype, scale):
    """All 65,536 words (NaN, inf, subnormals included) through the quantizing write,
    then back through the dequantizing gather (the kernel divides by the scale; its
    reciprocal variant is checked by bench_fp8.py against these codes)."""
    cpu, gpu = twin_caches(FP8, "NHD", 16, 64, heads=1, layers=1, tokens=1024,
                           framework=framework, model_dtype=model_dtype)
    cpu.set_kv_scales(0, scale, 1 / scale)
    gpu.set_kv_scales(0, scale, 1 / scale)
    seq, slots = twin_sequence(cpu, gpu, 1024)
    words = ALL_WORDS.reshape(1024, 1, 64).view(cpu.config.model_storage_dtype)
    reverse = np.ascontiguousarray(words[::-1])
    cpu.write(0, words, reverse, slots)
    gpu.write(0, gpu.from_host(words), gpu.from_host(reverse), slots)
    assert_same_bytes(cpu.kv, gpu.kv)
    for raw in (False, True):
        k, v, _ = cpu.gather(0, [seq], raw=raw)
        kg, vg, _ = gpu.gather(0, [seq], raw=raw)
        assert_same_bytes(k, kg)
        assert_same_bytes(v, vg)
    gpu.synchronize()


@pytest.mark.parametrize("dtype", ["bfloat16", FP8])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("framework", ["cupy", "torch"])
def test_key_only_random_operations_match_numpy(framework, layout, dtype):
    cpu, gpu = twin_caches(dtype, layout, 16, 576, heads=1, framework=framework,
                           key_only=True)
    rng = np.random.default_rng([len(dtype), len(layout), len(framework)])
    if cpu.config.quantized:
        set_twin_scales(cpu, gpu, rng)
    run_random_ops(cpu, gpu, rng)


@pytest.mark.parametrize(("dtype", "key_only"), [(FP8, False), (FP8, True),
                                                 ("bfloat16", True)])
def test_host_tier_moves_fp8_and_key_only_pages(dtype, key_only):
    """Swap out and back in, and copy-on-write, with every byte compared."""
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=1 if key_only else 2,
                        head_dim=576 if key_only else 128, page_size=16, num_pages=32,
                        dtype=dtype, key_only=key_only, num_host_pages=16, max_seqs=8)
    cpu, gpu = KVCache(cfg, device="cpu"), KVCache(cfg, device="cuda", framework="cupy")
    rng = np.random.default_rng(5)
    if cfg.quantized:
        set_twin_scales(cpu, gpu, rng)
    seqs = []
    for n in (40, 17):
        seq, slots = twin_sequence(cpu, gpu, n)
        seqs.append(seq)
        for layer in range(2):
            k = random_kv(rng, cpu, n)
            v = None if key_only else random_kv(rng, cpu, n)
            cpu.write(layer, k, v, slots)
            gpu.write(layer, gpu.from_host(k), None if key_only else gpu.from_host(v), slots)
    child = cpu.fork(seqs[1])
    assert gpu.fork(seqs[1]) == child
    assert cpu.append([child], [1]).copy_src.size == 1
    gpu.append([child], [1])
    for cache in (cpu, gpu):
        cache.swap_out(seqs)
        cache.wait()
    assert np.array_equal(gpu.host_kv, cpu.host_kv)
    for cache in (cpu, gpu):
        cache.swap_in(seqs)
        cache.wait()
    gpu.synchronize()
    assert_same_pools(cpu, gpu)
    for layer in range(2):
        k, v, _ = cpu.gather(layer, [*seqs, child])
        kg, vg, _ = gpu.gather(layer, [*seqs, child])
        assert_same_bytes(k, kg)
        assert_same_bytes(v, vg)


@pytest.mark.parametrize("framework", ["cupy", "torch"])
def test_calibrated_scales_agree(framework):
    cpu, gpu = twin_caches(FP8, "NHD", 16, 128, framework=framework)
    rng = np.random.default_rng(9)
    k = random_kv(rng, cpu, 50)
    v = random_kv(rng, cpu, 50)
    assert cpu.calibrate_kv_scales(1, k, v) == gpu.calibrate_kv_scales(
        1, gpu.from_host(k), gpu.from_host(v))
    assert_same_bytes(cpu.scale_table, gpu.scale_table)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_strided_and_misaligned_inputs(layout):
    """Rows at odd addresses take the one-code-per-vector kernel; same bytes."""
    cpu, gpu = twin_caches(FP8, layout, 16, 128, heads=4, model_dtype="float16")
    _, slots = twin_sequence(cpu, gpu, 40)
    rng = np.random.default_rng(3)
    fused = rng.standard_normal((40, 3 * 4 * 128 + 1)).astype(np.float16)
    k = fused[:, 1:1 + 512].reshape(40, 4, 128)
    v = fused[:, 513:1025].reshape(40, 4, 128)
    cpu.write(0, k, v, slots)
    fused_gpu = cupy.asarray(fused)
    gpu.write(0, fused_gpu[:, 1:513].reshape(40, 4, 128),
              fused_gpu[:, 513:1025].reshape(40, 4, 128), slots)
    cpu.write(1, k, v[:, ::-1], slots)
    gpu.write(1, cupy.asarray(k), cupy.asarray(v)[:, ::-1], slots)
    assert_same_bytes(cpu.kv, gpu.kv)


def test_device_slot_out_of_range_is_skipped_and_reported():
    cpu, gpu = twin_caches(FP8, "NHD", 16, 64)
    _, slots = twin_sequence(cpu, gpu, 4)
    k = random_kv(np.random.default_rng(1), cpu, 4)
    bad = slots.copy()
    bad[2] = cpu.config.num_pages * 16 + 5
    gpu.write(0, cupy.asarray(k), cupy.asarray(k), cupy.asarray(bad))
    with pytest.raises(InvalidPageError, match="slots outside the pool"):
        gpu.synchronize()
    ok = bad.copy()
    ok[2] = -1
    cpu.write(0, k, k, ok)
    assert_same_bytes(cpu.kv, gpu.kv)


def test_torch_stream_and_step_metadata():
    """Writes and gathers through a StepMetadata on a side stream (the capturable
    path), dequantizing into given outputs."""
    torch = pytest.importorskip("torch")
    cpu, gpu = twin_caches(FP8, "HND", 16, 128, framework="torch")
    rng = np.random.default_rng(4)
    set_twin_scales(cpu, gpu, rng)
    seq, slots = twin_sequence(cpu, gpu, 37)
    meta = gpu.step_metadata(64)
    stream = torch.cuda.Stream()
    k, v = random_kv(rng, cpu, 37), random_kv(rng, cpu, 37)
    cpu.write(0, k, v, slots)
    with torch.cuda.stream(stream):
        meta.update([seq], slots)
        gpu.write(0, gpu.from_host(k), gpu.from_host(v), meta)
        out = (torch.empty(37, 2, 128, dtype=torch.bfloat16, device="cuda"),
               torch.empty(37, 2, 128, dtype=torch.bfloat16, device="cuda"))
        gpu.gather(0, meta, out=out)
    stream.synchronize()
    k_cpu, v_cpu, _ = cpu.gather(0, [seq])
    assert_same_bytes(k_cpu, out[0])
    assert_same_bytes(v_cpu, out[1])
    assert_same_bytes(cpu.kv, gpu.kv)
    assert gpu.kv.dtype == torch.float8_e4m3fn
    raw, _, _ = gpu.gather(0, [seq], raw=True)
    assert raw.dtype == torch.float8_e4m3fn


def test_adopted_mla_pool_in_vllm_layout():
    """vLLM's MLA cache is one [P, S, 576] tensor per layer; viewed [P, S, 1, 576] it is
    adopted as a key-only pool, and kvcore writes it as the oracle does."""
    torch = pytest.importorskip("torch")
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=1, head_dim=576, page_size=16,
                        num_pages=24, dtype=FP8, key_only=True, max_seqs=4)
    tensors = [torch.zeros(24, 16, 576, dtype=torch.float8_e4m3fn, device="cuda")
               for _ in range(2)]
    gpu = KVCache(cfg, device="cuda", pool=[t.unsqueeze(2) for t in tensors])
    cpu = KVCache(cfg, device="cpu")
    rng = np.random.default_rng(8)
    set_twin_scales(cpu, gpu, rng)
    _, slots = twin_sequence(cpu, gpu, 50)
    for layer in range(2):
        k = random_kv(rng, cpu, 50)
        cpu.write(layer, k, None, slots)
        gpu.write(layer, gpu.from_host(k), None, slots)
    gpu.synchronize()
    for layer in range(2):
        assert_same_bytes(cpu.k_cache(layer), tensors[layer].unsqueeze(2))
    gpu.copy_pages([0, 1], [10, 11])
    cpu.copy_pages([0, 1], [10, 11])
    gpu.synchronize()
    assert_same_pools(cpu, gpu)


# -- per-(token, head) scales (kv_scale_granularity="token_head") -----------------------------

TH = {"kv_scale_granularity": "token_head"}


@pytest.mark.parametrize("head_dim", [128, 64, 7, 576])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("model_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("framework", ["cupy", "torch"])
def test_token_head_random_operations_match_numpy(framework, model_dtype, layout, page_size,
                                                  head_dim):
    """Writes, gathers, forks with copy-on-write and copy_pages on poisoned pools (codes
    and scales): the side pool equals NumPy's byte for byte after every run."""
    cpu, gpu = twin_caches(FP8, layout, page_size, head_dim, framework=framework,
                           model_dtype=model_dtype, **TH)
    rng = np.random.default_rng([page_size, head_dim, len(model_dtype), len(layout), 16])
    run_random_ops(cpu, gpu, rng)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("framework", ["cupy", "torch"])
def test_token_head_key_only_random_operations_match_numpy(framework, layout):
    cpu, gpu = twin_caches(FP8, layout, 16, 576, heads=1, framework=framework, key_only=True,
                           **TH)
    run_random_ops(cpu, gpu, np.random.default_rng([len(layout), len(framework)]))


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
@pytest.mark.parametrize("model_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("framework", ["cupy", "torch"])
def test_token_head_every_input_matches_numpy(framework, model_dtype, order):
    """All 65,536 words in rows of 64 (rows with NaN / inf, and rows whose scale would
    be below fp8.MIN_SCALE, get 1.0; the others their own): codes, scales and both
    gathers."""
    cpu, gpu = twin_caches(FP8, "NHD", 16, 64, heads=2, layers=1, tokens=512,
                           framework=framework, model_dtype=model_dtype, **TH)
    seq, slots = twin_sequence(cpu, gpu, 512)
    words = ALL_WORDS.copy()
    if order == "shuffled":
        words = np.random.default_rng(7).permutation(words)
    words = words.reshape(512, 2, 64).view(cpu.config.model_storage_dtype)
    reverse = np.ascontiguousarray(words[::-1])
    cpu.write(0, words, reverse, slots)
    gpu.write(0, gpu.from_host(words), gpu.from_host(reverse), slots)
    gpu.synchronize()
    assert_same_pools(cpu, gpu)
    for raw in (False, True):
        k, v, _ = cpu.gather(0, [seq], raw=raw)
        kg, vg, _ = gpu.gather(0, [seq], raw=raw)
        assert_same_bytes(k, kg)
        assert_same_bytes(v, vg)


@pytest.mark.parametrize("key_only", [False, True])
def test_token_head_host_tier_and_copy_on_write(key_only):
    """Swap out and back in, copy-on-write and copy_pages: codes, scales and the host
    tier's scale pool compared byte for byte."""
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=1 if key_only else 4,
                        head_dim=576 if key_only else 128, page_size=16, num_pages=32,
                        dtype=FP8, key_only=key_only, num_host_pages=16, max_seqs=8, **TH)
    cpu, gpu = KVCache(cfg, device="cpu"), KVCache(cfg, device="cuda", framework="torch")
    rng = np.random.default_rng(6)
    seqs = []
    for n in (40, 17):
        seq, slots = twin_sequence(cpu, gpu, n)
        seqs.append(seq)
        for layer in range(2):
            k = random_kv(rng, cpu, n)
            v = None if key_only else random_kv(rng, cpu, n)
            cpu.write(layer, k, v, slots)
            gpu.write(layer, gpu.from_host(k), None if key_only else gpu.from_host(v), slots)
    child = cpu.fork(seqs[1])
    assert gpu.fork(seqs[1]) == child
    assert cpu.append([child], [1]).copy_src.size == 1
    gpu.append([child], [1])
    for cache in (cpu, gpu):
        cache.copy_pages([0, 1], [30, 31])
        cache.swap_out(seqs)
        cache.wait()
    assert np.array_equal(gpu.host_kv, cpu.host_kv)
    assert np.array_equal(gpu.host_scales.view(np.uint32), cpu.host_scales.view(np.uint32))
    for cache in (cpu, gpu):
        cache.swap_in(seqs)
        cache.wait()
    gpu.synchronize()
    assert_same_pools(cpu, gpu)
    for layer in range(2):
        k, v, _ = cpu.gather(layer, [*seqs, child])
        kg, vg, _ = gpu.gather(layer, [*seqs, child])
        assert_same_bytes(k, kg)
        assert_same_bytes(v, vg)


def test_token_head_strided_inputs_slots_out_of_range_and_metadata():
    """Odd-address rows (one code per vector), a device slot out of range (skipped,
    reported, its scale untouched) and a StepMetadata gather into given outputs."""
    torch = pytest.importorskip("torch")
    cpu, gpu = twin_caches(FP8, "HND", 16, 128, heads=4, model_dtype="float16",
                           framework="torch", **TH)
    seq, slots = twin_sequence(cpu, gpu, 40)
    rng = np.random.default_rng(3)
    fused = rng.standard_normal((40, 2 * 4 * 128 + 1)).astype(np.float16)
    k = fused[:, 1:513].reshape(40, 4, 128)
    v = fused[:, 513:1025].reshape(40, 4, 128)
    bad = slots.copy()
    bad[5] = cpu.config.num_pages * 16 + 3
    ok = bad.copy()
    ok[5] = -1
    cpu.write(0, k, v, ok)
    fused_gpu = torch.from_numpy(fused).cuda()
    gpu.write(0, fused_gpu[:, 1:513].view(40, 4, 128), fused_gpu[:, 513:1025].view(40, 4, 128),
              torch.from_numpy(bad).cuda())
    with pytest.raises(InvalidPageError, match="slots outside the pool"):
        gpu.synchronize()
    assert_same_pools(cpu, gpu)
    meta = gpu.step_metadata(64)
    meta.update([seq], slots)
    out = (torch.empty(40, 4, 128, dtype=torch.float16, device="cuda"),
           torch.empty(40, 4, 128, dtype=torch.float16, device="cuda"))
    gpu.gather(0, meta, out=out)
    k_cpu, v_cpu, _ = cpu.gather(0, [seq])
    assert_same_bytes(k_cpu, out[0])
    assert_same_bytes(v_cpu, out[1])
    assert gpu.scale_cache(0).dtype == torch.float32
    assert tuple(gpu.scale_cache(0).shape) == (2, cpu.config.num_pages, 16, 4)
