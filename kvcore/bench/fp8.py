"""fp8 and MLA pools on the GPU: the quantizing write's speed, and real clients reading them.

Measured in one process, bfloat16 baselines beside each fp8 row:

* ``write`` of 64 sequences x 1,024 tokens (8 KV heads x 128, bfloat16 in): kvcore's
  bfloat16 pool, kvcore's fp8 pool (quantizing in the kernel), and torch doing what an
  engine without a fused kernel does (divide, clamp, cast to ``float8_e4m3fn``,
  ``index_copy_``). Bytes count every byte read plus every byte written: 2 + 2 bytes in
  and 2 + 2 out per element pair for bfloat16, 2 + 2 in and 1 + 1 out for fp8.
* ``gather`` of the same tokens: dequantized to bfloat16, and raw codes.
* FlashInfer's batch decode over the fp8 pool with kvcore's scales, against a float32
  reference over the dequantized cache (and with a wrong scale, which must miss it);
  FlashInfer's MLA decode over a 576-wide key-only pool through strided views.
* Bytes per token and tokens per GiB of the pools (from the configs).

Every kvcore result is checked byte for byte against the NumPy backend before it is
timed. ``python benchmarks/bench_fp8.py --out benchmarks/results/fp8_h200.json``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import traceback

import numpy as np

import kvcore
from kvcore import KVCache, KVCacheConfig, fp8

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

FP8 = "float8_e4m3fn"
HEADS, HEAD_DIM, PAGE = 8, 128, 16


def _bench():
    from kvcore.bench import device as dev  # CUDA events, CUDA graphs, the row format

    return dev


def _words(rng, shape, spread=1.0) -> np.ndarray:
    """Random bfloat16 words of normal values times ``spread``."""
    values = (rng.standard_normal(shape) * spread).astype(np.float32).view(np.uint32)
    return (values >> 16).astype(np.uint16)


def _torch_bf16(words: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int16)).cuda().view(
        torch.bfloat16)


def _twin(config, seqs_tokens):
    """A torch CUDA cache and a CPU cache with the same sequences appended."""
    gpu = KVCache(config, device="cuda", framework="torch")
    cpu = KVCache(config, device="cpu")
    num_seqs, tokens = seqs_tokens
    seqs = np.array([gpu.add_sequence() for _ in range(num_seqs)], dtype=np.int32)
    for _ in seqs:
        cpu.add_sequence()
    step = gpu.append(seqs, tokens)
    assert np.array_equal(step.slot_mapping, cpu.append(seqs, tokens).slot_mapping)
    return gpu, cpu, seqs, step.slot_mapping


def _same(cache, host: np.ndarray, device) -> bool:
    """``device`` (an array of ``cache``) holds the bytes of ``host``."""
    got = cache.to_host(device)
    return bool(np.array_equal(np.ascontiguousarray(got).view(np.uint8).reshape(-1),
                               np.ascontiguousarray(host).view(np.uint8).reshape(-1)))


@contextlib.contextmanager
def _kernel_variant(define: str | None):
    """Caches built (and first launched) inside get kvcore's kernels compiled with
    ``-D<define>``: the memoized module of the current device is swapped for the
    variant's while the block runs (launchers keep the functions they resolved)."""
    if define is None:
        yield
        return
    import cupy

    from kvcore.backends import cuda_kernels as ck

    source_dir = ck.kernel_source_dir()
    module = cupy.RawModule(code=(source_dir / ck.KERNEL_FILE).read_text(),
                            options=("-std=c++17", f"-I{source_dir}", f"-D{define}"))
    module.compile()
    device = cupy.cuda.runtime.getDevice()
    ck.load_module(device)
    saved = ck._modules[device]
    ck._modules[device] = module
    try:
        yield
    finally:
        ck._modules[device] = saved


def bench_write(iters: int, num_seqs: int = 64, tokens_per_seq: int = 1024,
                rows: list | None = None) -> list[dict]:
    """The write and gather rows (see the module docstring), appended to ``rows`` as they
    are measured, so a failure further on keeps the rows before it."""
    dev = _bench()
    tokens = num_seqs * tokens_per_seq
    rng = np.random.default_rng(1)
    k_host = _words(rng, (2, tokens, HEADS, HEAD_DIM), 3.0)
    v_host = _words(rng, (2, tokens, HEADS, HEAD_DIM), 0.5)
    k_all, v_all = _torch_bf16(k_host), _torch_bf16(v_host)
    label = f"{num_seqs} x {tokens_per_seq:,} tokens"
    elems = tokens * HEADS * HEAD_DIM
    rows = [] if rows is None else rows
    ceiling = dev.bench_copy_ceiling(iters)
    rows.append(ceiling)
    num_pages = tokens // PAGE + 64
    # (pool dtype, scale granularity, kernel variant): None is the shipped kernel;
    # KVCORE_FP8_RECIPROCAL compiles the quantizer with the scale's reciprocal and one
    # correction step in place of the IEEE division (the shipped kernel's), all else the
    # same, so the two are measured in one process.
    shipped = {}    # the shipped fp8 kernel's codes, which the variant must reproduce
    variants = [("bfloat16", "tensor", None), (FP8, "tensor", None),
                (FP8, "tensor", "KVCORE_FP8_RECIPROCAL"), (FP8, "token_head", None)]
    for dtype, granularity, define in variants:
        config = KVCacheConfig(num_layers=1, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                               page_size=PAGE, num_pages=num_pages, dtype=dtype,
                               max_seqs=num_seqs, max_pages_per_seq=num_pages,
                               kv_scale_granularity=granularity)
        with _kernel_variant(define):
            gpu, cpu, seqs, slot_mapping = _twin(config, (num_seqs, tokens_per_seq))
            if dtype == FP8 and granularity == "tensor":
                k_scale, v_scale = gpu.calibrate_kv_scales(0, k_all[0], v_all[0])
                if define is None:
                    assert cpu.calibrate_kv_scales(0, k_host[0], v_host[0]) == (k_scale,
                                                                                 v_scale)
            slots = torch.as_tensor(slot_mapping, device="cuda")
            if define is None:
                cpu.write(0, k_host[0], v_host[0], slot_mapping)
            gpu.write(0, k_all[0], v_all[0], slots)     # builds the launcher: the variant's
            gpu.synchronize()
        if define is None:
            assert _same(gpu, cpu.kv, gpu.kv), f"kvcore {dtype} write differs from NumPy"
        else:   # the shipped kernel's codes were checked against NumPy just before
            assert torch.equal(gpu.kv.view(torch.uint8), shipped["codes"]), \
                f"the {define} kernel's codes differ from the shipped kernel's"
        if dtype == FP8 and granularity == "tensor" and define is None:
            shipped["codes"] = gpu.kv.view(torch.uint8).clone()
        if granularity == "token_head":
            assert _same(gpu, cpu.scale_pool, gpu.scale_pool), "scales differ from NumPy"
        # bytes: in and out per element, plus each (token, head) scale of K and V
        moved = elems * (2 + 2 + 2 * config.itemsize)
        if granularity == "token_head":
            moved += 2 * 4 * tokens * HEADS

        def write(i, gpu=gpu, slots=slots):
            gpu.write(0, k_all[i & 1], v_all[i & 1], slots)

        name = ("bfloat16 pool" if dtype == "bfloat16" else
                "fp8 pool, per-(token, head) scales" if granularity == "token_head" else
                "fp8 pool (quantizing, reciprocal kernel)" if define else
                "fp8 pool (quantizing)")
        note = "torch bfloat16 in, device slot_mapping"
        if define:
            note += f"; kernels compiled with -D{define} (reciprocal + correction step)"
        rows.append(dev.row(f"kvcore write {label}, {name}", moved, dev.device_us(write, iters),
                            dev.host_us(write, 20), ceiling["tb_per_s"], note))
        rows.append(dev.row(f"kvcore write {label}, {name}, CUDA graph", moved,
                            dev.graph_us(write), None, ceiling["tb_per_s"],
                            "device time without host overhead"))
        if granularity == "token_head":
            write(0)          # the timed calls alternated inputs: back to input 0
            gpu.synchronize()
            k_ref, v_ref, _ = cpu.gather(0, seqs)
            k_out, v_out, _ = gpu.gather(0, seqs)
            assert _same(gpu, k_ref, k_out) and _same(gpu, v_ref, v_out), \
                "per-(token, head) dequantizing gather differs from NumPy"

            def gather_th(i, gpu=gpu, seqs=seqs):
                gpu.gather(0, seqs)

            rows.append(dev.row(f"kvcore gather {label}, fp8 pool, per-(token, head) "
                                "scales, dequantized to bfloat16",
                                elems * (2 + 2 * 2) + 2 * 4 * tokens * HEADS,
                                dev.device_us(gather_th, iters), None, ceiling["tb_per_s"],
                                "from seq_ids: host metadata + upload + new outputs"))
        if dtype != FP8 or define or granularity != "tensor":
            del gpu, cpu
            torch.cuda.empty_cache()
            continue
        # torch doing the same without a fused kernel: divide, clamp, cast, index_copy_
        k_flat = torch.zeros(num_pages * PAGE, HEADS, HEAD_DIM, dtype=torch.float8_e4m3fn,
                             device="cuda")
        v_flat = torch.zeros_like(k_flat)

        def torch_quantize(i, pairs=((k_flat, k_scale), (v_flat, v_scale)), slots=slots):
            for src, (dst, scale) in zip((k_all[i & 1], v_all[i & 1]), pairs, strict=True):
                q = (src.float() / scale).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
                # index_copy_ has no float8 kernel: move the codes as bytes
                dst.view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))

        torch_quantize(0)
        write(0)              # the timed calls alternated inputs: back to input 0
        torch.cuda.synchronize()
        same = bool(torch.equal(k_flat.view(torch.uint8)[slots],
                                gpu.gather(0, seqs, raw=True)[0].view(torch.uint8)))
        rows.append(dev.row(f"torch quantize + index_copy_ {label}", moved,
                            dev.device_us(torch_quantize, iters), None, ceiling["tb_per_s"],
                            f"float32 divide, clamp, cast, index_copy_; same codes as "
                            f"kvcore: {same}"))
        # gathers of the same tokens
        k_ref, v_ref, _ = cpu.gather(0, seqs)
        k_out, v_out, _ = gpu.gather(0, seqs)
        assert _same(gpu, k_ref, k_out) and _same(gpu, v_ref, v_out), \
            "dequantizing gather differs from NumPy"
        for raw, what, out_bytes in ((False, "dequantized to bfloat16", 2), (True, "raw", 1)):
            def gather(i, raw=raw, gpu=gpu, seqs=seqs):
                gpu.gather(0, seqs, raw=raw)

            rows.append(dev.row(f"kvcore gather {label}, fp8 pool, {what}",
                                elems * (2 + 2 * out_bytes), dev.device_us(gather, iters),
                                None, ceiling["tb_per_s"],
                                "from seq_ids: host metadata + upload + new outputs"))
        del gpu, cpu
        torch.cuda.empty_cache()
    return rows


def decode_check(fi, k_factor: float = 1.0, v_factor: float = 1.0,
                 layout: str = "NHD") -> dict:
    """FlashInfer's batch decode over a kvcore fp8 pool, scales passed as FlashInfer
    documents them (``run(..., k_scale=, v_scale=)``, floats), against a float32
    reference over the dequantized cache. ``k_factor`` / ``v_factor`` multiply the
    scales handed to FlashInfer (1.0: the right ones).

    Returns ``{"max_rel_err": ..., "k_scale": ..., "v_scale": ...}``; the error is the
    largest absolute difference over the largest reference magnitude.
    """
    num_qo, num_kv = 8, 4
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=num_kv, head_dim=HEAD_DIM,
                        page_size=PAGE, num_pages=64, dtype=FP8, model_dtype="bfloat16",
                        layout=layout, max_seqs=8)
    cache = KVCache(cfg, device="cuda", framework="torch")
    lens = [37, 100, 5, 64, 16]
    seqs = [cache.add_sequence() for _ in lens]
    step = cache.append(seqs, lens)
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = sum(lens)
    k = (torch.randn(total, num_kv, HEAD_DIM, device="cuda", generator=gen) * 2.5).bfloat16()
    v = (torch.randn(total, num_kv, HEAD_DIM, device="cuda", generator=gen) * 0.7).bfloat16()
    q = torch.randn(len(lens), num_qo, HEAD_DIM, device="cuda", generator=gen).bfloat16()
    k_scale, v_scale = cache.calibrate_kv_scales(0, k, v)
    cache.write(0, k, v, step.slot_mapping)
    indptr, indices, last = (torch.as_tensor(a, device="cuda")
                             for a in cache.flashinfer_metadata(seqs))
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout=layout)
    wrapper.plan(indptr, indices, last, num_qo, num_kv, HEAD_DIM, PAGE,
                 q_data_type=torch.bfloat16, kv_data_type=torch.float8_e4m3fn)
    out = wrapper.run(q, (cache.k_cache(0), cache.v_cache(0)), k_scale=k_scale * k_factor,
                      v_scale=v_scale * v_factor)
    # float32 reference over the dequantized cache: codes x scale, in float32
    k_raw, v_raw, token_indptr = cache.gather(0, seqs, raw=True)
    k_deq = torch.from_numpy(fp8.e4m3_to_float32(cache.to_host(k_raw)) * np.float32(k_scale))
    v_deq = torch.from_numpy(fp8.e4m3_to_float32(cache.to_host(v_raw)) * np.float32(v_scale))
    group = num_qo // num_kv
    ref = torch.empty(len(lens), num_qo, HEAD_DIM)
    qf = q.float().cpu()
    for b in range(len(lens)):
        s, e = int(token_indptr[b]), int(token_indptr[b + 1])
        kb = k_deq[s:e].repeat_interleave(group, dim=1)         # [n, num_qo, D]
        vb = v_deq[s:e].repeat_interleave(group, dim=1)
        logits = torch.einsum("hd,nhd->hn", qf[b], kb) / math.sqrt(HEAD_DIM)
        ref[b] = torch.einsum("hn,nhd->hd", torch.softmax(logits, dim=-1), vb)
    err = float((out.float().cpu() - ref).abs().max() / ref.abs().max())
    return {"max_rel_err": err, "k_scale": k_scale, "v_scale": v_scale,
            "k_factor": k_factor, "v_factor": v_factor, "layout": layout}


def mla_check(fi, dtype: str = "bfloat16") -> dict:
    """A key-only pool of width 576 (512 latent + 64 rope) read by FlashInfer's MLA decode
    through strided views ``k_cache(0)[:, :, 0, :512]`` / ``[..., 512:]``, against a
    float32 torch reference over kvcore's gather; falls back to the torch reference
    alone (recording FlashInfer's error) where FlashInfer refuses the views."""
    num_heads, ckv, kpe = 16, 512, 64
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=ckv + kpe, page_size=PAGE,
                        num_pages=64, dtype=dtype, key_only=True, max_seqs=8)
    cache = KVCache(cfg, device="cuda", framework="torch")
    lens = [37, 100, 5, 64]
    seqs = [cache.add_sequence() for _ in lens]
    step = cache.append(seqs, lens)
    gen = torch.Generator(device="cuda").manual_seed(1)
    latent = torch.randn(sum(lens), 1, ckv + kpe, device="cuda", generator=gen).bfloat16()
    scale = 1.0
    if cfg.quantized:
        scale, _ = cache.calibrate_kv_scales(0, latent)
    cache.write(0, latent, None, step.slot_mapping)
    q_nope = torch.randn(len(lens), num_heads, ckv, device="cuda", generator=gen).bfloat16()
    q_pe = torch.randn(len(lens), num_heads, kpe, device="cuda", generator=gen).bfloat16()
    sm_scale = 1 / math.sqrt(128 + kpe)
    # the reference reads what kvcore's gather returns (dequantized exactly in float32)
    if cfg.quantized:
        raw, _, token_indptr = cache.gather(0, seqs, raw=True)
        rows = torch.from_numpy(fp8.e4m3_to_float32(cache.to_host(raw)) * np.float32(scale))
    else:
        rows, _, token_indptr = cache.gather(0, seqs)
        rows = rows.float().cpu()
    ref = torch.empty(len(lens), num_heads, ckv)
    for b in range(len(lens)):
        c = rows[int(token_indptr[b]):int(token_indptr[b + 1]), 0]     # [n, 576]
        logits = (q_nope[b].float().cpu() @ c[:, :ckv].T
                  + q_pe[b].float().cpu() @ c[:, ckv:].T) * sm_scale
        ref[b] = torch.softmax(logits, dim=-1) @ c[:, :ckv]
    result = {"dtype": dtype, "strided_views": True}
    pool = cache.k_cache(0)                                      # [P, S, 1, 576]
    ckv_view, kpe_view = pool[:, :, 0, :ckv], pool[:, :, 0, ckv:]
    result["view_strides"] = [list(ckv_view.stride()), list(kpe_view.stride())]
    try:
        indptr, indices, _ = cache.flashinfer_metadata(seqs)
        workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
        wrapper = fi.mla.BatchMLAPagedAttentionWrapper(workspace)
        wrapper.plan(torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda"),
                     torch.as_tensor(indptr, device="cuda"),
                     torch.as_tensor(indices, device="cuda"),
                     torch.as_tensor(lens, dtype=torch.int32, device="cuda"), num_heads, ckv,
                     kpe, PAGE, False, sm_scale, torch.bfloat16, pool.dtype)
        kwargs = {"ckv_scale": scale, "kpe_scale": scale} if cfg.quantized else {}
        out = wrapper.run(q_nope, q_pe, ckv_view, kpe_view, **kwargs)
        result["reader"] = "flashinfer BatchMLAPagedAttentionWrapper"
        result["max_rel_err"] = float((out.float().cpu() - ref).abs().max() / ref.abs().max())
    except Exception as exc:   # a FlashInfer without MLA, or refusing strided views
        result["flashinfer_error"] = f"{type(exc).__name__}: {exc}"[:400]
        result["reader"] = "torch reference"
        pages = torch.as_tensor(cache.flashinfer_metadata(seqs)[1], device="cuda").long()
        direct = pool[pages].reshape(-1, ckv + kpe)               # straight from the pool
        if cfg.quantized:
            direct = direct.view(torch.uint8).cpu().numpy()
            direct = torch.from_numpy(fp8.e4m3_to_float32(direct) * np.float32(scale))
        else:
            direct = direct.float().cpu()
        # the pool read page by page holds the gathered rows, sequence after sequence
        ends = np.cumsum([0] + [-(-n // PAGE) * PAGE for n in lens])
        same = all(torch.equal(direct[ends[b]:ends[b] + n],
                               rows[int(token_indptr[b]):int(token_indptr[b + 1]), 0])
                   for b, n in enumerate(lens))
        result["torch_reader_matches_gather"] = bool(same)
    return result


def memory_rows() -> list[dict]:
    """Bytes per token (every layer) and tokens per GiB, from the configs."""
    shapes = {
        "Llama-3-8B (32 layers, 8 KV heads x 128)": dict(num_layers=32, num_kv_heads=8,
                                                         head_dim=128),
        "DeepSeek-V3 MLA (61 layers, one 576-wide latent)": dict(num_layers=61,
                                                                 num_kv_heads=1,
                                                                 head_dim=576),
    }
    rows = []
    for name, shape in shapes.items():
        for dtype, granularity in (("bfloat16", "tensor"), (FP8, "tensor"),
                                   (FP8, "token_head")):
            for key_only in ((False, True) if shape["num_kv_heads"] == 1 else (False,)):
                cfg = KVCacheConfig(page_size=PAGE, num_pages=1, dtype=dtype,
                                    key_only=key_only, kv_scale_granularity=granularity,
                                    **shape)
                per_token = cfg.page_bytes // PAGE
                rows.append({"model": name, "dtype": dtype, "key_only": key_only,
                             "scales": granularity, "bytes_per_token": per_token,
                             "tokens_per_gib": 2**30 // per_token})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-flashinfer", action="store_true",
                        help="skip the FlashInfer checks (the write and gather rows only)")
    args = parser.parse_args(argv)
    if torch is None or not torch.cuda.is_available():
        print("the fp8 benchmark needs torch, CuPy and a CUDA GPU", file=sys.stderr)
        return 1
    results = {"kvcore": kvcore.__version__, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(), "python": platform.python_version(),
               "memory": memory_rows()}
    write_rows: list[dict] = []
    sections = [("write", lambda: bench_write(args.iters, rows=write_rows))]
    try:
        if args.no_flashinfer:
            raise ImportError("--no-flashinfer")
        import flashinfer as fi

        results["flashinfer"] = fi.__version__
        sections += [
            ("flashinfer_decode", lambda: [decode_check(fi), decode_check(fi, layout="HND"),
                                           decode_check(fi, k_factor=4.0),
                                           decode_check(fi, v_factor=1.5)]),
            ("flashinfer_mla", lambda: [mla_check(fi), mla_check(fi, FP8)])]
    except ImportError:
        results["flashinfer"] = None
    for name, run in sections:
        try:
            results[name] = run()
        except Exception:
            results[name] = {"error": traceback.format_exc()[-2000:]}
            if name == "write":
                results[name]["rows_before_error"] = write_rows
    write = results.get("write")
    if isinstance(write, dict):
        print("write:", write["error"])
        write = write["rows_before_error"]
    for r in write if isinstance(write, list) else []:
        tbs = f"{r['tb_per_s']:.2f} TB/s" if r["tb_per_s"] else ""
        print(f"{r['name']:<62} {r['device_us'] or 0:>9.1f} us {tbs:>11}  {r['note']}")
    for name in ("flashinfer_decode", "flashinfer_mla"):
        print(name, json.dumps(results.get(name), indent=1))
    for r in results["memory"]:
        print(f"{r['model']:<50} {r['dtype']:<14} {r['scales']:<10} "
              f"key_only={r['key_only']!s:<5} "
              f"{r['bytes_per_token']:>7,} B/token {r['tokens_per_gib']:>9,} tokens/GiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0
