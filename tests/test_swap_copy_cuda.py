"""The host tier on CUDA: ``CudaBackend.swap_copy`` moves exactly the bytes the NumPy
backend's ``swap_copy`` moves, in both directions, for every pool the CUDA backend
accepts (kvcore's own, grouped, adopted per-layer tensors; torch and CuPy).

Every test here is marked `cuda` and skipped without CuPy and a GPU (conftest.py).
"""

import numpy as np
import pytest

from kvcore import KVCache, KVCacheConfig, LayerGroup
from kvcore.backends.kernel_abi import ERR_PAGE_OUT_OF_RANGE
from kvcore.errors import KernelError, ShapeError

from ._twins import adopted_pools

pytestmark = pytest.mark.cuda

cupy = pytest.importorskip("cupy")


def make_config(dtype="bfloat16", layout="NHD", layers=3, heads=2, head_dim=64, page_size=16,
                num_pages=40, host_pages=32, groups=None):
    return KVCacheConfig(num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
                         page_size=page_size, num_pages=num_pages, dtype=dtype, layout=layout,
                         max_seqs=8, layer_groups=groups, num_host_pages=host_pages)


def slot_layers(cfg):
    """The first layer of each pool slot (the memory a host page's slot block mirrors)."""
    first = {}
    for layer in range(cfg.num_layers):
        first.setdefault(cfg.layer_slot(layer), layer)
    return [first[slot] for slot in range(cfg.num_slots)]


def device_pool(cache):
    """The GPU pool as NumPy ``[num_slots, 2, P, *page_shape]`` (storage dtype), read
    through each slot's first layer (works for adopted pools too)."""
    backend = cache.backend
    return np.stack([np.stack([backend.to_host(cache.k_cache(layer)),
                               backend.to_host(cache.v_cache(layer))])
                     for layer in slot_layers(cache.config)])


def load_device_pool(cache, values):
    """Overwrite the GPU pool with ``values`` (``[num_slots, 2, P, ...]``), slot by slot."""
    for slot, layer in enumerate(slot_layers(cache.config)):
        for kv, view in enumerate((cache.k_cache(layer), cache.v_cache(layer))):
            host = np.ascontiguousarray(values[slot, kv])
            if cache.framework == "torch":
                import torch

                words = host.view(np.int16) if host.dtype == np.uint16 else host
                view.copy_(torch.from_numpy(words).to(view.device).view(view.dtype))
            else:
                view[...] = cupy.asarray(host)
    cupy.cuda.runtime.deviceSynchronize()


def random_bits(rng, array):
    """Fill ``array`` with random non-zero bytes (a missing or stray copy shows)."""
    array.view(np.uint8).reshape(-1)[:] = rng.integers(1, 255, size=array.nbytes,
                                                       dtype=np.uint8)


def twins(cfg, framework="torch", pool=None, seed=0):
    """A CPU cache (the oracle) and a GPU cache with the same random pool and host tier."""
    if framework == "torch" or pool is not None:
        pytest.importorskip("torch")
    cpu = KVCache(cfg, device="cpu")
    kwargs = {"pool": pool} if pool is not None else {"framework": framework}
    gpu = KVCache(cfg, device="cuda", **kwargs)
    rng = np.random.default_rng(seed)
    random_bits(rng, cpu.kv)
    random_bits(rng, cpu.backend.host_kv)
    load_device_pool(gpu, cpu.kv)
    gpu.backend.host_kv[...] = cpu.backend.host_kv
    assert_twins(cpu, gpu)
    return cpu, gpu, rng


def assert_twins(cpu, gpu):
    host_c, host_g = cpu.backend.host_kv, gpu.backend.host_kv
    assert host_g.shape == host_c.shape == cpu.config.host_pool_shape
    assert host_g.dtype == host_c.dtype
    assert np.array_equal(host_g.view(np.uint8), host_c.view(np.uint8))
    pool = device_pool(gpu)
    assert np.array_equal(pool.view(np.uint8), cpu.kv.view(np.uint8))


def run_swaps(cpu, gpu, rng, stream=None, rounds=4):
    """Alternate swap-outs and swap-ins of random disjoint page pairs on both caches."""
    cfg = cpu.config
    handle = gpu.backend.resolve_stream(stream)
    for round_ in range(rounds):
        direction = ("out", "in")[round_ % 2]
        n = int(rng.integers(1, min(cfg.num_pages, cfg.num_host_pages) + 1))
        device_pages = rng.permutation(cfg.num_pages)[:n].astype(np.int32)
        host_pages = rng.permutation(cfg.num_host_pages)[:n].astype(np.int32)
        cpu.backend.swap_copy(direction, device_pages, host_pages, None)
        event = gpu.backend.swap_copy(direction, device_pages, host_pages, handle)
        assert event is not None
        gpu.backend.wait_transfer(event)
        assert gpu.backend.transfer_done(event)
        gpu.backend.destroy_event(event)
        assert_twins(cpu, gpu)
    assert gpu.backend.synchronize(handle) == 0


@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_swap_copy_matches_numpy(dtype, layout, framework):
    cpu, gpu, rng = twins(make_config(dtype, layout), framework)
    run_swaps(cpu, gpu, rng)


@pytest.mark.parametrize("dtype, heads, head_dim, page_size", [
    ("float32", 1, 7, 3),      # 84-byte page blocks: 4-byte vectors
    ("bfloat16", 1, 7, 1),     # 14-byte page blocks: 2-byte vectors
    ("float16", 3, 5, 2),      # 60-byte page blocks: 4-byte vectors
    ("float16", 8, 128, 64),   # 128 KiB page blocks
])
def test_odd_page_blocks_match_numpy(dtype, heads, head_dim, page_size):
    cfg = make_config(dtype, "HND", layers=2, heads=heads, head_dim=head_dim,
                      page_size=page_size, num_pages=17, host_pages=13)
    cpu, gpu, rng = twins(cfg, "cupy", seed=1)
    run_swaps(cpu, gpu, rng, rounds=6)


def test_on_a_side_stream():
    torch = pytest.importorskip("torch")
    cpu, gpu, rng = twins(make_config(), "torch", seed=2)
    side = torch.cuda.Stream()
    run_swaps(cpu, gpu, rng, stream=side)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_grouped_pool_swaps_each_slot_once(layout):
    """Layers of different groups share slots: a host page holds num_slots slots."""
    groups = (LayerGroup([0, 2, 4]), LayerGroup([1, 3], window=32))
    cfg = make_config("bfloat16", layout, layers=5, groups=groups)
    assert cfg.num_slots == 3 and cfg.host_pool_shape[1] == 3
    cpu, gpu, rng = twins(cfg, "torch", seed=3)
    run_swaps(cpu, gpu, rng)


@pytest.mark.parametrize("kind", ["kv_first", "page_first", "pair"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_adopted_per_layer_pools(kind, dtype):
    pytest.importorskip("torch")
    cfg = make_config(dtype, "NHD")
    pool = adopted_pools(cfg, kind)
    cpu, gpu, rng = twins(cfg, pool=pool, seed=4)
    assert gpu.backend.adopted
    run_swaps(cpu, gpu, rng)


def test_adopted_grouped_pool_sharing_slots():
    """An engine's per-layer list where layers of one slot are the same tensor."""
    torch = pytest.importorskip("torch")
    groups = (LayerGroup([0, 2]), LayerGroup([1, 3]))
    cfg = make_config("bfloat16", "HND", layers=4, groups=groups)
    slots = [torch.empty(2, cfg.num_pages, *cfg.page_shape, dtype=torch.bfloat16,
                         device="cuda") for _ in range(cfg.num_slots)]
    pool = [slots[cfg.layer_slot(layer)] for layer in range(cfg.num_layers)]
    cpu, gpu, rng = twins(cfg, pool=pool, seed=5)
    run_swaps(cpu, gpu, rng)


def test_adopted_grouped_pool_with_slots_apart_is_refused():
    """Layers of one slot in different memory: a host page could hold only one of them."""
    pytest.importorskip("torch")
    groups = (LayerGroup([0, 2]), LayerGroup([1, 3]))
    cfg = make_config("bfloat16", "NHD", layers=4, groups=groups)
    with pytest.raises(ShapeError, match="share pool slot"):
        KVCache(cfg, device="cuda", pool=adopted_pools(cfg, "kv_first"))
    # without a host tier the same pool is fine
    no_tier = make_config("bfloat16", "NHD", layers=4, groups=groups, host_pages=0)
    KVCache(no_tier, device="cuda", pool=adopted_pools(no_tier, "kv_first"))


@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_host_tier_is_pinned_mapped_and_zeroed(framework):
    if framework == "torch":
        pytest.importorskip("torch")
    cfg = make_config("bfloat16", host_pages=5)
    gpu = KVCache(cfg, device="cuda", framework=framework)
    host = gpu.backend.host_kv
    assert isinstance(host, np.ndarray) and host.dtype == np.uint16
    assert host.shape == cfg.host_pool_shape and host.nbytes == cfg.host_bytes
    assert host.flags.c_contiguous and not host.any()
    attributes = cupy.cuda.runtime.pointerGetAttributes(host.ctypes.data)
    assert attributes.type == 1                            # cudaMemoryTypeHost: pinned
    assert attributes.devicePointer == host.ctypes.data     # the same address on the device


def test_no_host_tier():
    cfg = make_config(host_pages=0)
    gpu = KVCache(cfg, device="cuda", framework="cupy")
    assert gpu.backend.host_kv is None
    with pytest.raises(ValueError, match="no host tier"):
        gpu.backend.swap_copy("out", np.array([0], np.int32), np.array([0], np.int32),
                              gpu.backend.current_stream())


def test_nothing_to_copy_and_bad_arguments():
    cpu, gpu, _ = twins(make_config(), "cupy", seed=6)
    backend = gpu.backend
    stream = backend.current_stream()
    empty = np.zeros(0, np.int32)
    for direction in ("out", "in"):
        assert backend.swap_copy(direction, empty, empty, stream) is None
    assert backend.transfer_done(None)
    backend.wait_transfer(None)
    backend.destroy_event(None)
    with pytest.raises(ValueError, match="direction"):
        backend.swap_copy("sideways", np.array([0], np.int32), np.array([0], np.int32), stream)
    with pytest.raises(ValueError, match="differ in length"):
        backend.swap_copy("out", np.array([0, 1], np.int32), np.array([0], np.int32), stream)
    assert_twins(cpu, gpu)


def test_out_of_range_ids_are_skipped_and_flagged():
    """The page table never passes such ids; if one came anyway, the kernel touches
    nothing outside the two pools and raises the error word's page bit."""
    cpu, gpu, _ = twins(make_config(), "cupy", seed=7)
    backend = gpu.backend
    stream = backend.current_stream()
    cfg = gpu.config
    for direction, device_pages, host_pages in (
            ("in", [cfg.num_pages, 0], [0, 1]), ("out", [1, 2], [-1, cfg.num_host_pages])):
        event = backend.swap_copy(direction, np.array(device_pages, np.int32),
                                  np.array(host_pages, np.int32), stream)
        backend.wait_transfer(event)
        backend.destroy_event(event)
        assert backend.synchronize(stream) == ERR_PAGE_OUT_OF_RANGE
    # only the valid pair of the first call moved: host page 1 into device page 0
    cpu.backend.swap_copy("in", np.array([0], np.int32), np.array([1], np.int32))
    assert_twins(cpu, gpu)


def test_transfer_done_does_not_block():
    torch = pytest.importorskip("torch")
    _, gpu, _ = twins(make_config(), "torch", seed=8)
    backend = gpu.backend
    stream = backend.current_stream()
    torch.cuda._sleep(500_000_000)        # hold the stream for a while (~0.25 s)
    event = backend.swap_copy("out", np.arange(8, dtype=np.int32),
                              np.arange(8, dtype=np.int32), stream)
    assert backend.transfer_done(event) is False
    backend.wait_transfer(event)
    assert backend.transfer_done(event) is True
    backend.destroy_event(event)


@pytest.mark.parametrize("raises", [False, True])
def test_transfer_done_raises_on_a_cuda_error(monkeypatch, raises):
    """An error status from cudaEventQuery is a KernelError, not "not finished yet"."""
    _, gpu, _ = twins(make_config(), "cupy", seed=9)
    backend = gpu.backend
    event = backend.swap_copy("out", np.array([0], np.int32), np.array([0], np.int32),
                              backend.current_stream())
    backend.wait_transfer(event)
    runtime = cupy.cuda.runtime
    illegal_address = 700

    def query(_event):
        if raises:
            raise runtime.CUDARuntimeError(illegal_address)
        return illegal_address

    monkeypatch.setattr(runtime, "eventQuery", query)
    with pytest.raises(KernelError, match="host-tier transfer failed"):
        backend.transfer_done(event)
    monkeypatch.undo()
    assert backend.transfer_done(event)
    backend.destroy_event(event)
