"""CUDA backend against the NumPy oracle: byte-identical pools and outputs.

Every test here is marked `cuda` and skipped without CuPy and a GPU (conftest.py).
"""

import numpy as np
import pytest

from kvcore import InvalidPageError, ShapeError

pytestmark = pytest.mark.cuda

cupy = pytest.importorskip("cupy")

from ._twins import (  # noqa: E402
    assert_same_bytes,
    random_kv,
    run_random_ops,
    twin_caches,
    twin_sequence,
)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256, 7, 33])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_random_operations_match_numpy(dtype, layout, page_size, head_dim):
    cpu, gpu = twin_caches(dtype, layout, page_size, head_dim)
    rng = np.random.default_rng([page_size, head_dim, len(dtype), len(layout)])
    run_random_ops(cpu, gpu, rng)


@pytest.mark.parametrize("head_dim", [128, 7])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_random_operations_match_numpy_torch_pool(dtype, layout, page_size, head_dim):
    """The same with a torch-owned pool and torch tensors in."""
    cpu, gpu = twin_caches(dtype, layout, page_size, head_dim, framework="torch")
    rng = np.random.default_rng([page_size, head_dim, len(dtype), len(layout), 1])
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
    with pytest.raises(ShapeError, match="must be a CUDA array on cuda:0"):
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
    cpu, gpu = twin_caches("bfloat16", "NHD", 16, 128, heads=8, framework="cupy")
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
    from kvcore.backends.cuda_kernels import load_module

    assert load_module(0) is load_module(0)
