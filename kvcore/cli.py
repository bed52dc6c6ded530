"""The ``kvcore`` command: ``simulate`` (the main job), ``bench`` and ``info``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _add_simulate(sub) -> None:
    from kvcore.simulate import SimConfig

    defaults = SimConfig()
    p = sub.add_parser("simulate", help="run a continuous-batching workload and verify it",
                       description="Drive a KVCache the way a continuous-batching scheduler "
                       "does and verify every byte it wrote.")
    types = {int: _positive_int, float: _positive_float, str: str}
    special = {"system_prompt_share": _share, "multi_sample_share": _share,
               "verify_every": _non_negative_int, "check_every": _non_negative_int,
               "seed": _non_negative_int, "system_prompts": _non_negative_int,
               "system_prompt_len": _non_negative_int}
    choices = {"dtype": ["float16", "bfloat16", "float32"], "layout": ["NHD", "HND"]}
    for f in fields(SimConfig):
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default,
                           action=argparse.BooleanOptionalAction, help=f"(default: {default})")
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default,
                       type=special.get(f.name, types[type(default)]),
                       choices=choices.get(f.name), help=f"(default: {default})")
    p.add_argument("--json", type=Path, help="write the summary (and timeline) as JSON")
    p.add_argument("--plot", type=Path, help="draw pages in use and running requests "
                   "over time (needs matplotlib: pip install 'kvcore[plot]')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--corrupt-at-step", type=int, default=None, help=argparse.SUPPRESS)


def _progress_printer(stream):
    def show(done: int, total: int, step: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests, "
                     f"step {step}")
        stream.flush()
    return show


def _summary_rows(result) -> list[tuple[str, str]]:
    hit = ("off" if result.prefix_hit_rate is None else
           f"{100 * result.prefix_hit_rate:.1f}% ({result.prefix_hit_tokens:,} tokens, "
           f"{result.prefix_evictions:,} pages evicted)")
    return [
        ("device", result.device),
        ("requests", f"{result.requests_done:,} ({result.samples_done:,} samples)"),
        ("tokens written", f"{result.tokens_written:,}"),
        ("steps", f"{result.steps:,}"),
        ("steps/s", f"{result.steps_per_s:,.1f}"),
        ("host bookkeeping us/step p50 / p99",
         f"{result.host_us_p50:,.1f} / {result.host_us_p99:,.1f}"),
        ("data movement us/step p50 / p99",
         f"{result.device_us_p50:,.1f} / {result.device_us_p99:,.1f}"),
        ("peak pages used / pool",
         f"{result.peak_pages_used:,} / {result.pool_pages:,} "
         f"({100 * result.peak_pages_used / result.pool_pages:.0f}%)"),
        ("prefix-cache hit rate", hit),
        ("copy-on-write copies", f"{result.cow_copies:,}"),
        ("preemptions", f"{result.preemptions:,}"),
        ("wall time", f"{result.wall_s:.1f} s"),
    ]


def _plot(result, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'kvcore[plot]'") from None
    t = result.timeline
    fig, (top, middle, bottom) = plt.subplots(3, 1, sharex=True, figsize=(9, 7))
    top.plot(t["step"], t["pages_used"], lw=1)
    top.axhline(result.pool_pages, color="gray", ls="--", lw=1, label="pool")
    top.set_ylabel("pages in use")
    top.legend(loc="lower right")
    middle.plot(t["step"], t["running"], lw=1, label="running sequences")
    middle.plot(t["step"], t["waiting"], lw=1, label="waiting requests")
    middle.legend(loc="upper right")
    bottom.plot(t["step"], [100 * x for x in t["hit_rate"]], lw=1)
    bottom.set_ylabel("prefix hit rate %")
    bottom.set_xlabel("step")
    fig.suptitle(f"kvcore simulate: {result.requests_done} requests on {result.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _run_simulate(args) -> int:
    from kvcore.errors import BackendUnavailableError
    from kvcore.simulate import ConfigurationError, SimConfig, Simulator

    config = SimConfig(**{f.name: getattr(args, f.name) for f in fields(SimConfig)})
    on_step = None
    if args.corrupt_at_step is not None:   # test hook: flip a live page behind kvcore's back
        def on_step(sim, step):
            if step == args.corrupt_at_step:
                seqs = sim.cache.table.active_seq_ids()
                if len(seqs):
                    page = int(sim.cache.pages(int(seqs[0]))[0])
                    sim.cache.k_cache(0)[page] = sim.cache.k_cache(0)[page] + 1
    try:
        sim = Simulator(config, on_step=on_step)
    except (ConfigurationError, BackendUnavailableError, ValueError) as exc:
        print(f"kvcore simulate: error: {exc}", file=sys.stderr)
        return 2
    show = None if args.quiet or not sys.stderr.isatty() else _progress_printer(sys.stderr)
    result = sim.run(progress=show)
    if show is not None:
        sys.stderr.write("\n")
    for name, value in _summary_rows(result):
        print(f"{name:<38} {value}")
    print(f"integrity: {result.sequences_verified:,} sequences, {result.tokens_verified:,} "
          f"tokens verified, {result.mismatches:,} mismatches, "
          f"{result.invariant_failures} invariant failures")
    if args.json:
        payload = asdict(result)
        payload["ok"] = result.ok
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    if args.plot:
        _plot(result, args.plot)
    return 0 if result.ok else 1


def _run_bench(args) -> int:
    from kvcore.backends import cuda_available
    from kvcore.bench import host

    argv = ["--quick"] if args.quick else []
    out_dir = args.out_dir
    code = host.main(argv + (["--out", str(out_dir / "cpu.json")] if out_dir else []))
    if cuda_available():
        from kvcore.bench import device

        code |= device.main((["--quick"] if args.quick else [])
                            + (["--out", str(out_dir / "gpu.json")] if out_dir else []))
    else:
        print("no CUDA device: device benchmark skipped")
    return code


def _run_info(args) -> int:
    import platform

    import numpy as np

    import kvcore
    from kvcore import _core
    from kvcore.backends import cuda_available
    from kvcore.backends._sources import kernel_source_dir

    compiled = Path(_core.__file__).suffix in (".so", ".pyd")
    rows = [
        ("kvcore", f"{kvcore.__version__} ({Path(kvcore.__file__).parent})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("numpy", np.__version__),
        ("extension", f"{'compiled' if compiled else 'NOT compiled'}: {_core.__file__}"),
        ("built with", f"Cython {_core.CYTHON_VERSION}, {_core.COMPILER}"),
        ("kernel sources", str(kernel_source_dir() or "not found")),
    ]
    if cuda_available():
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        rows += [("backend", "cupy (device='auto' picks CUDA)"), ("cupy", cupy.__version__),
                 ("device", f"cuda:{cupy.cuda.Device().id} {name}")]
    else:
        rows += [("backend", "numpy (no usable CUDA device; device='auto' picks cpu)")]
    for name, value in rows:
        print(f"{name:<16} {value}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvcore", description="kvcore: a paged KV-cache "
                                     "manager for LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    bench = sub.add_parser("bench", help="host benchmark, plus the device one with a GPU")
    bench.add_argument("--quick", action="store_true", help="fewer repeats")
    bench.add_argument("--out-dir", type=Path, help="write cpu.json / gpu.json here")
    sub.add_parser("info", help="version, build, backend and device")
    args = parser.parse_args(argv)
    handler = {"simulate": _run_simulate, "bench": _run_bench, "info": _run_info}
    return handler[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
