"""Shared by the CUDA tests: a CPU cache and a GPU cache driven in lockstep, compared
byte for byte (the NumPy backend is the oracle)."""

import numpy as np
import pytest

from kvcore import KVCache, KVCacheConfig

cupy = pytest.importorskip("cupy")


def twin_caches(dtype, layout, page_size, head_dim, heads=2, layers=2, tokens=768, seed=0,
                framework="cupy", **config):
    """``config``: more KVCacheConfig fields (``model_dtype``, ``key_only``, ...)."""
    num_pages = max(8, tokens // page_size + 8)
    cfg = KVCacheConfig(num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
                        page_size=page_size, num_pages=num_pages, dtype=dtype, layout=layout,
                        max_seqs=16, **config)
    if framework == "torch":
        pytest.importorskip("torch")
    cpu, gpu = KVCache(cfg, device="cpu"), KVCache(cfg, device="cuda", framework=framework)
    # Poison both pools with the same random bits, so a stray or missing write shows.
    rng = np.random.default_rng(seed)
    bits = rng.integers(1, 255, size=cpu.kv.nbytes, dtype=np.uint8)
    cpu.kv.view(np.uint8).reshape(-1)[:] = bits
    gpu.backend.fill_bytes(gpu.kv, cpu.kv)
    if cpu.scale_pool is not None:     # per-(token, head) scales: poison those too
        cpu.scale_pool[...] = rng.uniform(0.5, 2.0, cpu.scale_pool.shape)
        gpu.backend.fill_bytes(gpu.scale_pool, cpu.scale_pool)
    return cpu, gpu


def twin_sequence(cpu, gpu, num_tokens):
    """Start the same sequence in both caches; return its seq id and (host) slots."""
    seq = cpu.add_sequence()
    assert gpu.add_sequence() == seq
    slots = cpu.append([seq], [num_tokens]).slot_mapping
    np.testing.assert_array_equal(gpu.append([seq], [num_tokens]).slot_mapping, slots)
    return seq, slots


def to_host(device_array):
    """NumPy copy of a CuPy array or torch tensor (bfloat16 as uint16 words)."""
    if isinstance(device_array, cupy.ndarray):
        return cupy.asnumpy(device_array)
    import torch

    if device_array.dtype == torch.bfloat16:
        return device_array.view(torch.int16).cpu().numpy().view(np.uint16)
    if device_array.dtype == torch.float8_e4m3fn:
        return device_array.view(torch.uint8).cpu().numpy()
    return device_array.cpu().numpy()


def assert_same_bytes(host_array, device_array):
    if host_array is None:      # a key-only cache's V
        assert device_array is None
        return
    got = to_host(device_array)
    assert got.shape == host_array.shape and got.dtype.itemsize == host_array.dtype.itemsize
    assert np.array_equal(got.view(np.uint8), host_array.view(np.uint8))


def random_kv(rng, cache, n):
    """Random finite ``[n, H, D]`` values of what ``write`` takes (the model dtype)."""
    cfg = cache.config
    shape = (n, cfg.num_kv_heads, cfg.head_dim)
    # random finite values, never zeros: build from normal floats, reinterpret as words
    values = rng.standard_normal(shape).astype(np.float32) + 3.0
    if cfg.model_dtype == "float16":
        arr = values.astype(np.float16)
    elif cfg.model_dtype == "bfloat16":
        arr = (values.view(np.uint32) >> 16).astype(np.uint16)
    else:
        arr = values
    return arr.view(cfg.model_storage_dtype)


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
            key_only = cpu.config.key_only
            for layer in range(cpu.config.num_layers):
                k = random_kv(rng, cpu, slots.size)
                v = None if key_only else random_kv(rng, cpu, slots.size)
                cpu.write(layer, k, v, slots)
                gpu.write(layer, gpu.from_host(k), None if key_only else gpu.from_host(v),
                          slots)
        if live and rng.random() < 0.3:
            layer = int(rng.integers(cpu.config.num_layers))
            for raw in (False, True) if cpu.config.quantized else (False,):
                k, v, indptr = cpu.gather(layer, live, raw=raw)
                kg, vg, indptr_g = gpu.gather(layer, live, raw=raw)
                np.testing.assert_array_equal(indptr, indptr_g)
                assert_same_bytes(k, kg)
                assert_same_bytes(v, vg)
    gpu.synchronize()
    assert_same_pools(cpu, gpu)


def assert_same_pools(cpu, gpu):
    """Every layer's K and V pages equal, byte for byte (adopted pools included), and
    the scale side pool where there is one."""
    if cpu.scale_pool is not None:
        assert_same_bytes(cpu.scale_pool, gpu.scale_pool)
    if not gpu.backend.adopted:
        assert_same_bytes(cpu.kv, gpu.kv)
        return
    for layer in range(cpu.config.num_layers):
        assert_same_bytes(cpu.k_cache(layer), gpu.k_cache(layer))
        if not cpu.config.key_only:
            assert_same_bytes(cpu.v_cache(layer), gpu.v_cache(layer))


def adopted_pools(cfg, kind):
    """Per-layer torch tensors laid out as an engine would allocate them, for ``pool=``:
    ``"kv_first"`` ``[2, P, *page]``, ``"page_first"`` ``[P, 2, *page]`` or ``"pair"``
    ``(k, v)`` of ``[P, *page]``."""
    torch = pytest.importorskip("torch")
    p, page = cfg.num_pages, cfg.page_shape
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
             "float32": torch.float32}[cfg.dtype]
    make = {"kv_first": lambda: torch.empty(2, p, *page, dtype=dtype, device="cuda"),
            "page_first": lambda: torch.empty(p, 2, *page, dtype=dtype, device="cuda"),
            "pair": lambda: (torch.empty(p, *page, dtype=dtype, device="cuda"),
                             torch.empty(p, *page, dtype=dtype, device="cuda"))}[kind]
    return [make() for _ in range(cfg.num_layers)]
