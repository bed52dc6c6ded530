"""Engine throughput: kvcore's continuous batching against ``model.generate`` static batching.

Both serve the same requests with the same model in the same process: the example
engine (:mod:`kvcore.examples.engine`; FlashInfer attention over kvcore's pool on CUDA,
the torch reference on the CPU) and transformers' ``generate`` over static batches of
the same samples (left-padded prompts, greedy, every row of a batch running to the
batch's longest output). Throughput counts the tokens the requests asked for, per
second of wall time, after a warm-up of each (FlashInfer compiles its kernels then).
Reported, not a target.

    python benchmarks/bench_engine.py                      # GPU: medium model, bf16
    python benchmarks/bench_engine.py --device cpu --shape tiny --requests 16
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import kvcore
from kvcore.examples.engine import make_engine, make_workload
from kvcore.examples.model import MEDIUM, TINY, versions

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def samples_of(requests):
    """(prompt, max_new_tokens) per sample: a two-sample request is two rows."""
    return [(list(r.prompt), r.max_new_tokens) for r in requests for _ in range(r.num_samples)]


def generate_static(model, requests, batch_size: int, device: str,
                    prefill_only: bool = False) -> dict:
    """Serve the samples with ``model.generate`` in static batches of ``batch_size``
    (``prefill_only``: one new token per row, to split prefill from decode time)."""
    rows = samples_of(requests)
    start = time.perf_counter()
    for first in range(0, len(rows), batch_size):
        batch = rows[first:first + batch_size]
        width = max(len(p) for p, _ in batch)
        new = 1 if prefill_only else max(n for _, n in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
    _sync(device)
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in rows)
    return {"name": f"transformers generate, static batches of {batch_size}",
            "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def engine_run(args, shape, requests) -> tuple[dict, object]:
    """Serve ``requests`` with the example engine (no logits kept beyond sampling)."""
    engine = make_engine(shape, device=args.device, attention=args.attention,
                         dtype=args.dtype, num_pages=args.pages, max_batch=args.batch,
                         max_tokens_per_step=args.step_tokens, keep_logits=False)
    engine.run(make_workload(shape, num_requests=4, seed=99, arrival_span=0))   # warm-up
    engine.stats = type(engine.stats)()
    engine.run(requests)
    stats = engine.stats
    return ({"name": f"kvcore engine ({args.attention}), continuous batching",
             "wall_s": stats.wall_s, "tokens": stats.tokens_generated,
             "tokens_per_s": stats.tokens_generated / stats.wall_s,
             "steps": stats.model_steps, "kvcore_host_ms_per_step":
                 1e3 * stats.kvcore_host_s / stats.model_steps,
             "prefix_hit_tokens": stats.prefix_hit_tokens, "forks": stats.forks,
             "admission_waits": stats.admission_waits}, engine.model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attention", default=None, choices=["torch", "flashinfer"])
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--shape", default=None, choices=["tiny", "medium"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="engine max batch and the "
                        "static batch size")
    parser.add_argument("--step-tokens", type=int, default=2048)
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu"
    args.attention = args.attention or ("torch" if on_cpu else "flashinfer")
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    shape = {"tiny": TINY, "medium": MEDIUM}[args.shape or ("tiny" if on_cpu else "medium")]
    requests = make_workload(shape, num_requests=args.requests, seed=1,
                             system_prompt_len=128, max_user_len=256, max_new_tokens=128,
                             arrival_span=0)

    engine_row, model = engine_run(args, shape, requests)
    generate_static(model, requests[:2], 2, args.device)                       # warm-up
    static_row = generate_static(model, requests, args.batch, args.device)
    static_row["prefill_s"] = generate_static(model, requests, args.batch, args.device,
                                              prefill_only=True)["wall_s"]
    rows = [engine_row, static_row]

    device_name = "cpu" if on_cpu else torch.cuda.get_device_name()
    print(f"{device_name}; {shape}; {args.dtype}; {len(requests)} requests "
          f"({len(samples_of(requests))} samples), all arriving at once")
    print(f"{'':<58}{'tokens':>8}{'wall s':>9}{'tokens/s':>11}")
    for row in rows:
        print(f"{row['name']:<58}{row['tokens']:>8,}{row['wall_s']:>9.2f}"
              f"{row['tokens_per_s']:>11,.0f}")
    ratio = engine_row["tokens_per_s"] / static_row["tokens_per_s"]
    print(f"static generate: {static_row['prefill_s']:.2f} s of its wall time is prefill "
          "(generate with one new token)")
    print(f"engine / static generate: {ratio:.2f}x; kvcore host time "
          f"{engine_row['kvcore_host_ms_per_step']:.3f} ms per step "
          f"({engine_row['steps']} steps)")
    out = args.out or RESULTS / ("engine_cpu.json" if on_cpu else "engine_h200.json")
    out.write_text(json.dumps({
        "machine": {"device": device_name, "python": platform.python_version(),
                    "kvcore": kvcore.__version__, **versions()},
        "workload": {"shape": str(shape), "dtype": args.dtype, "requests": len(requests),
                     "samples": len(samples_of(requests)), "batch": args.batch,
                     "step_tokens": args.step_tokens, "pages": args.pages},
        "rows": rows, "engine_over_static": ratio}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
