"""Issue 15's figures: the cost of publishing events, of retention priorities and
leaf-first eviction against the build before them, and of routing.

Usage::

    python benchmarks/bench_cluster.py [--baseline CHECKOUT] [--quick] [--out PATH]

``--baseline`` is a checkout of the commit before priorities (b2551c5), built in place
(``python setup.py build_ext --inplace``). Its lookup, decode-step and eviction
workloads run in subprocesses alternating with this checkout's, so that both see the
same machine state; the table gives the median of each side and their ratio.
Writes ``benchmarks/results/cluster_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# The eviction workload, as source: run by the A/B subprocesses (either build: it uses
# only the old API unless ``prioritized``) and, with priorities, in this process.
_EVICTION_SRC = r"""
def eviction(pages=4096, page_size=16, rounds=5, prioritized=False):
    # Evict `pages` cached pages (each a one-page prompt, freed): ns per evicted page.
    import statistics, time
    import numpy as np
    import kvcore
    table = kvcore.PageTable(kvcore.PageAllocator(pages + 8), page_size, 8, pages + 8,
                             enable_prefix_cache=True)
    rng = np.random.default_rng(1)
    out = []
    for _ in range(rounds):
        for _ in range(pages):
            toks = rng.integers(0, 32000, size=page_size + 1).astype(np.int32)
            s = (table.add_sequence(retention=int(rng.integers(0, 101))) if prioritized
                 else table.add_sequence())
            table.append([s], [page_size + 1], token_ids=toks)
            table.remove(s)
        s = table.add_sequence()
        start = time.perf_counter_ns()
        table.append([s], [pages * page_size])
        out.append((time.perf_counter_ns() - start) / pages)
        table.remove(s)
    if prioritized:
        assert len(table.prefix_stats["evictions_by_priority"]) > 90
    return statistics.median(out)
"""

# Run in a subprocess with the checkout first on sys.path: median ns of each workload.
_AB_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np
import kvcore
from kvcore.bench.host import decode_step, prefix_lookup
""" + _EVICTION_SRC + r"""
repeats = int(sys.argv[1])
lookup = prefix_lookup("kvcore")
lookup()
decode = decode_step("kvcore")
decode()
def median_us(run):
    return statistics.median(run() for _ in range(repeats)) / 1e3

print(json.dumps({
    "prefix lookup, 4,096-token prompt (us)": median_us(lookup),
    "decode step, 256 seqs (us)": median_us(decode),
    "allocation evicting cached pages (ns/page)": eviction(),
}))
"""


def ab_compare(baseline: Path, rounds: int, repeats: int) -> dict:
    sides = {"this": ROOT, "baseline": baseline}
    got: dict[str, dict[str, list[float]]] = {k: {} for k in sides}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(rounds):
        for side, path in sides.items():
            env["PYTHONPATH"] = str(path)
            out = subprocess.run([sys.executable, "-c", _AB_SCRIPT, str(repeats)], cwd=path,
                                 env=env, capture_output=True, text=True, check=True)
            for name, value in json.loads(out.stdout.strip().splitlines()[-1]).items():
                got[side].setdefault(name, []).append(value)
    rows = {}
    for name in got["this"]:
        this, base = statistics.median(got["this"][name]), statistics.median(got["baseline"][name])
        rows[name] = {"this": this, "baseline": base, "ratio": this / base,
                      "this_runs": got["this"][name], "baseline_runs": got["baseline"][name]}
    return rows


def priority_eviction(pages: int = 4096, page_size: int = 16, rounds: int = 5) -> float:
    """Eviction with random priorities 0..100 (this build only): ns per evicted page."""
    scope: dict = {}
    exec(_EVICTION_SRC, scope)
    return scope["eviction"](pages, page_size, rounds, prioritized=True)


def event_cost(batch: int = 64, tokens: int = 2048, page_size: int = 16,
               rounds: int = 7) -> dict:
    """A prefill of ``batch`` x ``tokens`` with token ids (every full page stored), with
    and without publishing its events (encoding and the publisher thread's sending
    included: ``flush`` waits for it). µs per stored page of the difference."""
    import kvcore
    from kvcore.events import EventPublisher
    num_pages = batch * (tokens // page_size + 1)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 32000, size=batch * tokens).astype(np.int32)
    table = kvcore.PageTable(kvcore.PageAllocator(num_pages), page_size, batch,
                             tokens // page_size + 1, enable_prefix_cache=True,
                             prefix_event_capacity=num_pages * 4)
    plain, published = [], []
    stored = batch * tokens // page_size
    with EventPublisher("tcp://127.0.0.1:*") as pub:
        for r in range(2 * rounds + 2):
            table.clear_prefix_cache()
            table.take_events()
            seqs = [table.add_sequence() for _ in range(batch)]
            publish = r % 2 == 1
            start = time.perf_counter_ns()
            table.append(seqs, [tokens] * batch, token_ids=ids)
            if publish:
                pub.publish(table)
                pub.flush()
            elapsed = time.perf_counter_ns() - start
            if r >= 2:
                (published if publish else plain).append(elapsed)
            for s in seqs:
                table.remove(s)
    p, q = statistics.median(plain), statistics.median(published)
    return {"stored_pages": stored, "prefill_us": p / 1e3, "prefill_and_publish_us": q / 1e3,
            "publish_us_per_stored_page": (q - p) / stored / 1e3}


def lookup_by_algorithm(tokens: int = 4096, page_size: int = 16, rounds: int = 30) -> dict:
    """``add_sequence`` of a cached 4,096-token prompt (256 pages hit), per hash
    algorithm: µs per lookup and per page."""
    import kvcore
    out = {}
    prompt = np.random.default_rng(7).integers(0, 32000, size=tokens + 1).astype(np.int32)
    for algorithm in ("fast", "sha256"):
        pages = tokens // page_size + 16
        table = kvcore.PageTable(kvcore.PageAllocator(pages), page_size, 4, pages,
                                 enable_prefix_cache=True, prefix_hash=algorithm)
        seq = table.add_sequence()
        table.append([seq], [tokens + 1], token_ids=prompt)
        times = []
        for _ in range(rounds):
            start = time.perf_counter_ns()
            hit = table.add_sequence(prompt)
            times.append(time.perf_counter_ns() - start)
            assert table.num_tokens(hit) == tokens
            table.remove(hit)
        us = statistics.median(times) / 1e3
        out[algorithm] = {"lookup_us": us, "per_page_ns": us * 1e3 / (tokens // page_size)}
    return out


def route_cost(prompts: int = 200, page_size: int = 16) -> dict:
    """PrefixRouter.route of 312-token prompts against two replicas' views."""
    from kvcore.router import PrefixRouter
    rng = np.random.default_rng(3)
    router = PrefixRouter(page_size)
    router.add_replica("a")
    router.add_replica("b")
    batch = [rng.integers(0, 32000, size=312).tolist() for _ in range(prompts)]
    start = time.perf_counter_ns()
    for p in batch:
        router.route(p)
    return {"prompt_tokens": 312, "route_us": (time.perf_counter_ns() - start) / prompts / 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="built checkout of the earlier commit")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "cluster_cpu.json")
    args = parser.parse_args(argv)
    rounds, repeats = (2, 3) if args.quick else (6, 9)
    result: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "python": platform.python_version()},
                    "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    result["events"] = event_cost(rounds=3 if args.quick else 7)
    result["priority_eviction_ns_per_page"] = priority_eviction(rounds=2 if args.quick else 5)
    result["route"] = route_cost()
    result["lookup_by_algorithm"] = lookup_by_algorithm()
    if args.baseline is not None:
        result["against_baseline"] = ab_compare(args.baseline.resolve(), rounds, repeats)
    ev = result["events"]
    print(f"events: prefill of {ev['stored_pages']:,} stored pages {ev['prefill_us']:,.0f} us, "
          f"with publishing {ev['prefill_and_publish_us']:,.0f} us: "
          f"{ev['publish_us_per_stored_page']:.3f} us per stored page (target <= 2)")
    print(f"eviction with random priorities 0..100: "
          f"{result['priority_eviction_ns_per_page']:.1f} ns per evicted page")
    for algorithm, row in result["lookup_by_algorithm"].items():
        print(f"prefix lookup of 4,096 tokens, {algorithm:>6} hash: {row['lookup_us']:8.1f} us "
              f"({row['per_page_ns']:.0f} ns per page)")
    print(f"route a 312-token prompt (pure Python hashing): {result['route']['route_us']:.1f} us")
    if "against_baseline" in result:
        print(f"\n{'workload':<46} {'this':>10} {'baseline':>10} {'ratio':>7}  target")
        for name, row in result["against_baseline"].items():
            target = "-" if "evicting" in name else "<= 1.10"   # no target for evictions
            ok = "" if target == "-" else (" ok" if row["ratio"] <= 1.10 else " MISS")
            print(f"{name:<46} {row['this']:>10.2f} {row['baseline']:>10.2f} "
                  f"{row['ratio']:>7.3f}  {target}{ok}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
