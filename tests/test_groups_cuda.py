"""Layer groups, windows and truncate on the GPU: byte-equal to the NumPy backend, and
read by FlashInfer's sliding-window decode.

Needs torch, CuPy and a CUDA GPU (FlashInfer for the last test); skipped elsewhere.
"""

import importlib.util

import numpy as np
import pytest

from kvcore import KVCache, KVCacheConfig, LayerGroup

pytestmark = pytest.mark.cuda

torch = pytest.importorskip("torch")

S, H, D, W = 16, 2, 64, 40
GROUPS = (LayerGroup([0, 2]), LayerGroup([1, 3], window=W))


def hybrid_config(layout="NHD", num_pages=96):
    return KVCacheConfig(num_layers=4, num_kv_heads=H, head_dim=D, page_size=S,
                         num_pages=num_pages, dtype="bfloat16", layout=layout, max_seqs=8,
                         max_pages_per_seq=32, enable_prefix_cache=True, layer_groups=GROUPS)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_hybrid_cache_on_cuda_equals_numpy(layout):
    """The same prefill, decode (StepMetadata per group on the GPU), speculative
    append + truncate, fork and prefix hits on both backends leave equal pools."""
    cfg = hybrid_config(layout)
    gpu = KVCache(cfg, device="cuda", framework="torch")
    cpu = KVCache(cfg, device="cpu")
    rng = np.random.default_rng(7)
    metas = [gpu.step_metadata(64, max_batch=8, group=g) for g in range(2)]

    def both(method, *args, **kwargs):
        a = getattr(gpu, method)(*args, **kwargs)
        b = getattr(cpu, method)(*args, **kwargs)
        if method == "append":
            assert np.array_equal(a.slot_mapping, b.slot_mapping)
            assert np.array_equal(a.copy_src, b.copy_src)
        return a

    def write_all(result, use_metadata):
        tokens = result.slot_mapping.shape[1]
        if use_metadata:
            for meta in metas:
                meta.update(seqs, result)
        for layer in range(4):
            k = rng.standard_normal((tokens, H, D)).astype(np.float32)
            v = rng.standard_normal((tokens, H, D)).astype(np.float32)
            kb = torch.from_numpy(k).to(torch.bfloat16)
            vb = torch.from_numpy(v).to(torch.bfloat16)
            target = metas[cfg.layer_group(layer)] if use_metadata else result.slot_mapping
            gpu.write(layer, kb.cuda(), vb.cuda(), target)
            cpu.write(layer, kb.view(torch.int16).numpy(), vb.view(torch.int16).numpy(),
                      result.slot_mapping)

    system = rng.integers(0, 100, 48).tolist()
    prompt = [*system, 1, 2, 3, 4, 5]
    seqs = [both("add_sequence", prompt)]
    write_all(both("append", seqs, [53], prompt), False)
    seqs.append(both("add_sequence", [*system, 9, 9]))          # a prefix hit in both groups
    assert gpu.num_tokens(seqs[1]) == 48 and len(gpu.pages(seqs[1], group=1)) > 0
    write_all(both("append", seqs[1:], [2], [9, 9]), False)
    seqs.append(both("fork", seqs[0]))
    for step in range(30):
        drafts = step % 3
        result = both("append", seqs, 1 + drafts, rng.integers(0, 100, 3 * (1 + drafts)))
        write_all(result, use_metadata=True)
        if drafts:
            keep = [gpu.num_tokens(s) - int(rng.integers(0, drafts + 1)) for s in seqs]
            both("truncate", seqs, keep)
    gpu.check_invariants()
    gpu.synchronize()
    assert np.array_equal(gpu.to_host(gpu.kv), cpu.kv)
    for layer in range(4):      # gather reads each group's live pages the same way
        for a, b in zip(gpu.gather(layer, seqs)[:2], cpu.gather(layer, seqs)[:2], strict=True):
            assert np.array_equal(gpu.to_host(a), np.asarray(b))


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                    reason="needs FlashInfer (wheels in shared/wheels)")
def test_flashinfer_sliding_window_decode_reads_the_window_group():
    """FlashInfer's decode with ``window_left = W - 1`` over the window group's pages
    equals float32 attention over each sequence's last W tokens."""
    import flashinfer

    cfg = hybrid_config()
    cache = KVCache(cfg, device="cuda", framework="torch")
    gen = torch.Generator(device="cuda").manual_seed(5)
    seqs = [cache.add_sequence() for _ in range(4)]
    layer, qo_heads = 1, 8
    history = {s: ([], []) for s in seqs}
    lengths = [70, 33, 100, 16]
    result = cache.append(seqs, lengths)
    k = torch.randn(sum(lengths), H, D, generator=gen, device="cuda").to(torch.bfloat16)
    v = torch.randn(sum(lengths), H, D, generator=gen, device="cuda").to(torch.bfloat16)
    cache.write(layer, k, v, result)
    start = 0
    for s, n in zip(seqs, lengths, strict=True):
        history[s][0].append(k[start:start + n])
        history[s][1].append(v[start:start + n])
        start += n
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.zeros(64 << 20, dtype=torch.uint8, device="cuda"), "NHD")
    for _ in range(24):
        result = cache.append(seqs, 1)
        k = torch.randn(4, H, D, generator=gen, device="cuda").to(torch.bfloat16)
        v = torch.randn(4, H, D, generator=gen, device="cuda").to(torch.bfloat16)
        cache.write(layer, k, v, result)
        for i, s in enumerate(seqs):
            history[s][0].append(k[i:i + 1])
            history[s][1].append(v[i:i + 1])
        indptr, indices, last = cache.flashinfer_metadata(seqs, group=1)
        wrapper.plan(torch.from_numpy(indptr), torch.from_numpy(indices),
                     torch.from_numpy(last), qo_heads, H, D, S, window_left=W - 1,
                     q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        q = torch.randn(4, qo_heads, D, generator=gen, device="cuda").to(torch.bfloat16)
        out = wrapper.run(q, (cache.k_cache(layer), cache.v_cache(layer)))
        for i, s in enumerate(seqs):
            keys = torch.cat(history[s][0])[-W:].float().repeat_interleave(qo_heads // H, 1)
            values = torch.cat(history[s][1])[-W:].float().repeat_interleave(qo_heads // H, 1)
            scores = torch.einsum("hd,nhd->hn", q[i].float(), keys) / D ** 0.5
            expected = torch.einsum("hn,nhd->hd", torch.softmax(scores, -1), values)
            torch.testing.assert_close(out[i].float(), expected, atol=2e-2, rtol=2e-2)
        # The group holds no more pages than the window needs.
        assert all(len(cache.pages(s, group=1)) <= -(-(W - 1 + 1) // S) + 1 for s in seqs)
