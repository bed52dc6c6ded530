"""CUDA backend against the NumPy oracle: byte-identical pools and outputs.

Every test here is marked `cuda` and skipped without CuPy and a GPU (conftest.py).
"""

import numpy as np
import pytest

from kvcore import InvalidPageError, KVCache, KVCacheConfig, ShapeError

pytestmark = pytest.mark.cuda

cupy = pytest.importorskip("cupy")


def twin_caches(dtype, layout, page_size, head_dim, heads=2, layers=2, tokens=768, seed=0):
    num_pages = max(8, tokens // page_size + 8)
    cfg = KVCacheConfig(num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
                        page_size=page_size, num_pages=num_pages, dtype=dtype, layout=layout,
                        max_seqs=16)
    cpu, gpu = KVCache(cfg, device="cpu"), KVCache(cfg, device="cuda")
    # Poison both pools with the same random bits, so a stray or missing write shows.
    rng = np.random.default_rng(seed)
    bits = rng.integers(1, 255, size=cpu.kv.nbytes, dtype=np.uint8)
    cpu.kv.view(np.uint8).reshape(-1)[:] = bits
    gpu.kv[...] = cupy.asarray(cpu.kv)
    return cpu, gpu


def twin_sequence(cpu, gpu, num_tokens):
    """Start the same sequence in both caches; return its seq id and (host) slots."""
    seq = cpu.add_sequence()
    assert gpu.add_sequence() == seq
    slots = cpu.append([seq], [num_tokens]).slot_mapping
    np.testing.assert_array_equal(gpu.append([seq], [num_tokens]).slot_mapping, slots)
    return seq, slots


def assert_same_bytes(host_array, device_array):
    got = cupy.asnumpy(device_array)
    assert got.dtype == host_array.dtype and got.shape == host_array.shape
    assert np.array_equal(got.view(np.uint8), host_array.view(np.uint8))


def random_kv(rng, cache, n):
    cfg = cache.config
    shape = (n, cfg.num_kv_heads, cfg.head_dim)
    words = {"float16": np.uint16, "bfloat16": np.uint16, "float32": np.uint32}[cfg.dtype]
    # random finite values, never zeros: build from normal floats, reinterpret as words
    values = rng.standard_normal(shape).astype(np.float32) + 3.0
    if cfg.dtype == "float16":
        arr = values.astype(np.float16)
    elif cfg.dtype == "bfloat16":
        arr = (values.view(np.uint32) >> 16).astype(np.uint16)
    else:
        arr = values
    return arr.view(words).view(cache.kv.dtype) if cfg.dtype != "float32" else arr


def run_random_ops(cpu, gpu, rng, steps=25):
    """Apply the same random operations to both caches; compare everything."""
    live = []
    for _ in range(steps):
        op = rng.random()
        if (op < 0.2 and cpu.num_seqs < 16) or not live:
            seq = cpu.add_sequence()
            assert gpu.add_sequence() == seq
            live.append(seq)
        elif op < 0.3 and cpu.num_seqs < 16:
            parent = live[rng.integers(len(live))]
            child = cpu.fork(parent)
            assert gpu.fork(parent) == child
            live.append(child)
        elif op < 0.4 and len(live) > 1:
            seq = live.pop(rng.integers(len(live)))
            cpu.remove(seq)
            gpu.remove(seq)
        elif op < 0.5:
            n = int(rng.integers(0, 4))
            pages = rng.choice(cpu.config.num_pages, size=2 * n, replace=False)
            cpu.copy_pages(pages[:n], pages[n:])
            gpu.copy_pages(pages[:n], pages[n:])
        else:
            batch = list(rng.permutation(live)[: rng.integers(1, len(live) + 1)])
            counts = rng.integers(0, 3 * cpu.config.page_size, size=len(batch))
            if cpu.pages_needed(batch, counts) > cpu.num_free_pages:
                continue
            step = cpu.append(batch, counts)
            step_gpu = gpu.append(batch, counts)
            np.testing.assert_array_equal(step.slot_mapping, step_gpu.slot_mapping)
            slots = step.slot_mapping.copy()
            slots[rng.random(slots.size) < 0.1] = -1      # padding is skipped
            for layer in range(cpu.config.num_layers):
                k = random_kv(rng, cpu, slots.size)
                v = random_kv(rng, cpu, slots.size)
                cpu.write(layer, k, v, slots)
                gpu.write(layer, cupy.asarray(k), cupy.asarray(v), slots)
        if live and rng.random() < 0.3:
            layer = int(rng.integers(cpu.config.num_layers))
            k, v, indptr = cpu.gather(layer, live)
            kg, vg, indptr_g = gpu.gather(layer, live)
            np.testing.assert_array_equal(indptr, indptr_g)
            assert_same_bytes(k, kg)
            assert_same_bytes(v, vg)
    gpu.synchronize()
    assert_same_bytes(cpu.kv, gpu.kv)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256, 7, 33])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_random_operations_match_numpy(dtype, layout, page_size, head_dim):
    cpu, gpu = twin_caches(dtype, layout, page_size, head_dim)
    rng = np.random.default_rng([page_size, head_dim, len(dtype), len(layout)])
    run_random_ops(cpu, gpu, rng)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_strided_and_misaligned_inputs(layout):
    cpu, gpu = twin_caches("float16", layout, 16, 128, heads=4)
    _, slots = twin_sequence(cpu, gpu, 40)
    rng = np.random.default_rng(3)
    fused = rng.standard_normal((40, 3 * 4 * 128 + 1)).astype(np.float16)  # odd row: misaligned
    k = fused[:, 1:1 + 4 * 128].reshape(40, 4, 128)
    v = fused[:, 1 + 4 * 128:1 + 8 * 128].reshape(40, 4, 128)
    cpu.write(0, k, v, slots)
    fused_gpu = cupy.asarray(fused)
    gpu.write(0, fused_gpu[:, 1:1 + 512].reshape(40, 4, 128),
              fused_gpu[:, 513:1025].reshape(40, 4, 128), slots)
    v_rev = v[:, ::-1]
    cpu.write(1, k, v_rev, slots)
    gpu.write(1, cupy.asarray(k), cupy.asarray(v)[:, ::-1], slots)
    assert_same_bytes(cpu.kv, gpu.kv)


def test_device_slot_mapping_out_of_range_is_skipped_and_reported():
    cpu, gpu = twin_caches("float16", "NHD", 16, 64)
    _, slots = twin_sequence(cpu, gpu, 4)
    k = random_kv(np.random.default_rng(1), cpu, 4)
    bad = slots.copy()
    bad[2] = cpu.config.num_pages * 16 + 5
    gpu.write(0, cupy.asarray(k), cupy.asarray(k), cupy.asarray(bad))
    with pytest.raises(InvalidPageError, match="slots outside the pool"):
        gpu.synchronize()
    gpu.synchronize()  # the flag was cleared
    ok = bad.copy()
    ok[2] = -1
    cpu.write(0, k, k, ok)
    assert_same_bytes(cpu.kv, gpu.kv)


def test_host_slot_mapping_out_of_range_writes_nothing():
    _, gpu = twin_caches("bfloat16", "HND", 16, 128)
    before = gpu.kv.copy()
    k = cupy.ones((2, 2, 128), dtype=cupy.uint16)
    with pytest.raises(InvalidPageError):
        gpu.write(0, k, k, np.array([0, 10**9]))
    with pytest.raises(InvalidPageError):
        gpu.copy_pages([0], [gpu.config.num_pages])
    assert bool((gpu.kv == before).all())


def test_wrong_device_or_type_is_a_shape_error():
    _, gpu = twin_caches("float16", "NHD", 16, 64)
    seq = gpu.add_sequence()
    slots = gpu.append([seq], [2]).slot_mapping
    with pytest.raises(ShapeError, match="must be a CUDA array"):
        gpu.write(0, np.zeros((2, 2, 64), np.float16), cupy.zeros((2, 2, 64), cupy.float16),
                  slots)
    with pytest.raises(ShapeError, match="dtype float32"):
        gpu.write(0, cupy.zeros((2, 2, 64), cupy.float32), cupy.zeros((2, 2, 64), cupy.float16),
                  slots)
    with pytest.raises(ShapeError, match="device slot_mapping must be int64"):
        z = cupy.zeros((2, 2, 64), cupy.float16)
        gpu.write(0, z, z, cupy.asarray(slots, dtype=cupy.int32))


def test_write_and_copy_pages_capture_in_a_cuda_graph():
    cpu, gpu = twin_caches("float16", "NHD", 16, 128)
    _, slots = twin_sequence(cpu, gpu, 16)
    k = random_kv(np.random.default_rng(5), cpu, 16)
    k_dev, slots_dev = cupy.asarray(k), cupy.asarray(slots)
    src = cupy.asarray(np.array([0], np.int32))
    dst = cupy.asarray(np.array([5], np.int32))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        gpu.write(0, k_dev, k_dev, slots_dev)
        gpu.copy_pages(src, dst)
        graph = stream.end_capture()
        graph.launch()
    stream.synchronize()
    cpu.write(0, k, k, slots)
    cpu.copy_pages([0], [5])
    assert_same_bytes(cpu.kv, gpu.kv)


def test_torch_interop_zero_copy():
    torch = pytest.importorskip("torch")
    cpu, gpu = twin_caches("bfloat16", "NHD", 16, 128, heads=8)
    _, slots = twin_sequence(cpu, gpu, 20)
    k = torch.randn(20, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(20, 8, 128, device="cuda", dtype=torch.bfloat16)
    gpu.write(0, k, v, torch.as_tensor(slots, device="cuda"))
    cpu.write(0, k.view(torch.int16).cpu().numpy(), v.view(torch.int16).cpu().numpy(), slots)
    assert_same_bytes(cpu.kv, gpu.kv)
    # the pool goes out zero-copy: torch sees (and can write) the same memory
    k_pool = torch.from_dlpack(gpu.k_cache(0)).view(torch.bfloat16)
    assert k_pool.shape == (gpu.config.num_pages, 16, 8, 128)
    page = int(slots[0]) // 16
    assert torch.equal(k_pool[page, 0], k[0])
    k_pool[page, 0] = 0
    assert int(abs(gpu.k_cache(0)[page, 0].astype(cupy.int32)).sum()) == 0


def test_modules_are_memoized_per_device():
    from kvcore.backends.cupy_kernels import load_module

    assert load_module(0) is load_module(0)
