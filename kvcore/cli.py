"""The ``kvcore`` command: ``simulate`` (the main job), ``bench`` and ``info``.

``kvcore simulate --preempt both`` runs the workload twice (recompute, then swap) and
ends with a comparison of the two; both runs get the same host tier (``--host-pages``,
default as many pages as ``--pages``), so both offload evicted prefix pages there and
only preemption differs (see :func:`_both_configs`).

Bad input never gets a traceback: every invalid value or combination (including a pool
that would not fit in memory, a run that could never finish, and an output path that
cannot be written) is reported before the run as one line,
``kvcore COMMAND: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

from kvcore.simulate import MAX_SAMPLES

__all__ = ["main"]

#: Help of each ``kvcore simulate`` option (a SimConfig field), with units.
SIMULATE_HELP = {
    "requests": "requests to simulate",
    "layers": "model layers (each has its own K and V pool)",
    "heads": "KV heads per layer",
    "head_dim": "elements per head",
    "page_size": "tokens per page",
    "pages": "pages in the pool; a page holds --page-size tokens of every layer, K and V",
    "dtype": "element type of the pool",
    "layout": "pool layout: NHD = [page, token, head, dim], HND = [page, head, token, dim]",
    "arrival_rate": "mean request arrivals per step (Poisson; 0.5 = one every 2 steps on "
                    "average); stretches with nothing to run are skipped, not stepped "
                    "through",
    "seed": "random seed: the same seed gives the same workload and integrity figures",
    "device": "auto (CUDA when CuPy sees a GPU, else cpu), cpu, cuda or cuda:N",
    "max_running": "sequence slots: most sequences decoding at once; a request with N "
                   f"samples takes N, so this must be >= {MAX_SAMPLES} unless "
                   "--multi-sample-share is 0",
    "max_step_tokens": "token budget per step: prompt (prefill) tokens plus one per "
                       "decoding sequence; must be >= --system-prompt-len + --max-prompt-len",
    "prompt_median": "median prompt length in tokens (lognormal, clipped to "
                     "--max-prompt-len; a system prompt comes on top)",
    "output_median": "median output length per sample in tokens (lognormal, clipped to "
                     "--max-output-len)",
    "max_prompt_len": "longest prompt in tokens, system prompt not included",
    "max_output_len": "longest output per sample in tokens",
    "system_prompts": "distinct common system prompts that requests may start with",
    "system_prompt_len": "tokens of each system prompt",
    "system_prompt_share": "fraction of requests (0 to 1) that start with a system prompt",
    "multi_sample_share": f"fraction of requests (0 to 1) that ask for 2-{MAX_SAMPLES} "
                          "samples (the prompt is prefilled once, then forked with "
                          "copy-on-write)",
    "prefix_cache": "reuse cached prompt pages across requests",
    "verify_every": "steps between spot checks, which read back up to 4 live sequences; "
                    "0 = no spot checks (finished samples are verified either way)",
    "check_every": "steps between bookkeeping invariant checks; 0 = only at the end",
    "window": "sliding window in tokens: makes a hybrid model whose --window-layers share "
              "of the layers attends to the last W tokens only (their old pages are "
              "released as sequences grow), the rest to every token; off = every layer "
              "full attention",
    "window_layers": "with --window: share of the layers (between 0 and 1) that use the "
                     "window, interleaved with the full-attention ones as in Gemma and "
                     "GPT-OSS (0.5 = alternating)",
    "speculative": "speculative decoding: draft tokens per sequence and decode step; each "
                   "step appends the next token plus K drafts, keeps a random prefix of "
                   "the drafts (uniform 0 to K) and truncates the rest; 0 = off",
    "preempt": "what preemption does to the newest running request when decoding runs out "
               "of pages: recompute = its sequences are removed and it starts again from "
               "its prompt; swap = they move to a host tier (--host-pages) and come back "
               "byte for byte (verified) once device pages are free, a victim the host "
               "tier has no room for being recomputed; both = run the workload twice, "
               "recompute then swap, with the same host tier, and compare",
    "host_pages": "pages of the host tier (host memory: N x the pool's bytes / --pages; a "
                  "host page holds --page-size tokens of every layer, K and V). --preempt "
                  "swap moves victims there; with --prefix-cache (and no --window) kvcore "
                  "also offloads evicted prefix pages there, and a later prompt that hits "
                  "one loads it back (the only use with --preempt recompute, which needs "
                  "--prefix-cache and no --window for it); 0 = no host tier",
}

#: Defaults that argparse's ``%(default)s`` would not say right.
_DEFAULT_HELP = {"host_pages": " (default: 0 with --preempt recompute; as many as --pages "
                               "with --preempt swap, and with --preempt both, whose "
                               "recompute run gets the same host tier as its swap run "
                               "wherever it can use it)"}

# formats matplotlib writes (used when matplotlib is missing, for the extension check)
_PLOT_FORMATS = ("eps", "jpeg", "jpg", "pdf", "pgf", "png", "ps", "raw", "rgba", "svg",
                 "svgz", "tif", "tiff", "webp")


class _Parser(argparse.ArgumentParser):
    """argparse, with one-line errors that name the option (``PROG: error: ...``)."""

    def error(self, message: str):
        match = re.match(r"argument ([^:]+): (.*)$", message, re.DOTALL)
        if match:
            option, rest = match.group(1).split("/")[0], match.group(2)
            message = f"{option} {rest}" if rest.startswith("must ") else f"{option}: {rest}"
        if message.startswith(("unrecognized arguments", "the following arguments")):
            message += f" (see '{self.prog} --help')"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    return value


_INT_MAX = 2**63 - 1   # the workload is drawn with 64-bit NumPy integers


def _int_at_least(low: int, what: str):
    """An argparse type: an integer in ``[low, 2**63 - 1]``, described as ``what``."""
    def parse(text: str) -> int:
        value = _number(text, int, what)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if value > _INT_MAX:
            raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _seed(text: str) -> int:   # NumPy takes seeds of any size
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float, "a positive number")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _open_share(text: str) -> float:
    value = _number(text, float, "a number between 0 and 1 (exclusive)")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (exclusive), "
                                         f"got {text!r}")
    return value


def _window(text: str) -> int:
    value = _positive_int(text)
    if value > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"must be at most 2**31 - 1 tokens, got {text!r}")
    return value


def _share(text: str) -> float:
    value = _number(text, float, "a number from 0 to 1")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def _one_of(*choices: str):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got "
                                             f"{text!r}")
        return text
    return parse


def _host_pages(text: str) -> int:
    value = _non_negative_int(text)
    if value > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"must be at most 2**31 - 1 pages, got {text!r}")
    return value


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text.strip().lower()):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _add_simulate(sub) -> None:
    from kvcore.simulate import SimConfig

    defaults = SimConfig()
    p = sub.add_parser(
        "simulate", help="run a continuous-batching workload and verify it",
        description="Drive a KVCache the way a continuous-batching scheduler does and "
        "verify every byte it wrote. A step is one scheduler iteration: admit waiting "
        "requests (prefill), then decode one token for every running sequence (plus "
        "drafts with --speculative). --window makes a hybrid sliding-window model; "
        "--preempt swap preempts to a host tier instead of recomputing; --host-pages "
        "sizes that tier, which also holds evicted prefix-cache pages. Invalid "
        "options, and configs that could not be allocated or would never finish, are "
        "rejected before the run (exit status 2); the run exits 1 if verification finds "
        "a mismatch or an invariant failure.")
    types = {int: _positive_int, float: _positive_float, str: str}
    special = {"system_prompt_share": _share, "multi_sample_share": _share,
               "verify_every": _non_negative_int, "check_every": _non_negative_int,
               "seed": _seed, "system_prompts": _non_negative_int,
               "system_prompt_len": _non_negative_int,
               "dtype": _one_of("float16", "bfloat16", "float32", "float8_e4m3fn"),
               "layout": _one_of("NHD", "HND"), "device": _device,
               "window": _window, "window_layers": _open_share,
               "speculative": _non_negative_int,
               "preempt": _one_of("recompute", "swap", "both"), "host_pages": _host_pages}
    metavars = {"dtype": "{float16,bfloat16,float32,float8_e4m3fn}", "layout": "{NHD,HND}",
                "device": "DEVICE", "arrival_rate": "RATE", "system_prompt_share": "FRACTION",
                "multi_sample_share": "FRACTION", "verify_every": "STEPS",
                "check_every": "STEPS", "window": "W", "window_layers": "FRACTION",
                "speculative": "K", "preempt": "{recompute,swap,both}"}
    for f in fields(SimConfig):
        default = getattr(defaults, f.name)
        text = SIMULATE_HELP[f.name] + _DEFAULT_HELP.get(
            f.name, " (default: off)" if default is None else " (default: %(default)s)")
        if isinstance(default, bool):
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default,
                           action=argparse.BooleanOptionalAction, help=text)
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default,
                       type=special[f.name] if f.name in special else types[type(default)],
                       metavar=metavars.get(f.name, "N"), help=text)
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="write the summary (and the per-step timeline) as JSON to PATH "
                   "(parent folders are created); '-' writes it to stdout, and the human "
                   "summary then goes to stderr")
    p.add_argument("--plot", type=Path, metavar="PATH",
                   help="draw pages in use, running requests and the prefix hit rate over "
                   "time; the format follows PATH's extension (.png, .pdf, .svg, ...); needs "
                   "matplotlib: pip install 'kvcore[plot]'")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is drawn on stderr only when that is a terminal)")
    p.add_argument("--replicas", type=_positive_int, default=1, metavar="N",
                   help="N >= 2: a cluster run instead: N replicas publish their prefix-cache "
                   "events over ZeroMQ on localhost to a prefix-aware router (kvcore.router), "
                   "against random routing on the same workload; uses --requests, --seed, "
                   "--page-size, --device and --json; needs kvcore[events] "
                   "(default: %(default)s, the single-replica run)")
    p.add_argument("--disaggregated", action="store_true",
                   help="disaggregated prefill and decode: a prefill rank and a decode rank "
                   "(two processes, torch.distributed: gloo on the CPU, NCCL on two GPUs) "
                   "move every prompt's pages between their caches, verified byte for byte; "
                   "needs torch (see docs/distributed.md)")
    p.add_argument("--corrupt-at-step", type=int, default=None, help=argparse.SUPPRESS)


def _writable(path: Path, option: str) -> str | None:
    """Why ``path`` cannot be written (a one-line message), or None if it can."""
    try:
        if path.is_dir():
            return f"{option} {path}: is a directory"
        if path.exists():
            with open(path, "ab"):   # neither truncates nor changes it
                pass
            return None
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            return f"{option} {path}: {folder} is not a directory"
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{option} {path}: cannot write there ({exc.strerror or exc})"
    return None


def _plot_formats() -> tuple[list[str], bool]:
    """The formats --plot can write, and whether matplotlib imports."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return list(_PLOT_FORMATS), False
    return sorted(FigureCanvasBase.get_supported_filetypes()), True


def _check_outputs(args) -> str | None:
    """Why --json / --plot cannot be written, checked before the run; or None."""
    if args.json is not None and str(args.json) != "-":
        problem = _writable(args.json, "--json")
        if problem:
            return problem
    if args.plot is not None:
        if str(args.plot) == "-":
            return "--plot needs a file name (it cannot write to stdout)"
        formats, have_matplotlib = _plot_formats()
        suffix = args.plot.suffix.lower().lstrip(".")
        if suffix not in formats:
            what = f"unsupported format '.{suffix}'" if suffix else "no file extension"
            return (f"--plot {args.plot}: {what}; use one of "
                    f"{', '.join('.' + f for f in formats)}")
        if not have_matplotlib:
            return "--plot needs matplotlib: pip install 'kvcore[plot]'"
        if args.json is not None and args.plot.resolve() == args.json.resolve():
            return f"--json and --plot both name {args.plot}"
        problem = _writable(args.plot, "--plot")
        if problem:
            return problem
    return None


def _progress_printer(stream):
    def show(done: int, total: int, step: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests, "
                     f"step {step}")
        stream.flush()
    return show


def _summary_rows(result) -> list[tuple[str, str]]:
    # with prefix offload, an evicted page left both tiers (an offload is not counted)
    evicted = ("pages evicted" if result.prefix_offload is None else
               "pages evicted from both tiers")
    hit = ("off" if result.prefix_hit_rate is None else
           f"{100 * result.prefix_hit_rate:.1f}% ({result.prefix_hit_tokens:,} tokens, "
           f"{result.prefix_evictions:,} {evicted})")
    steps = f"{result.steps:,}"
    if result.idle_steps:
        steps += f" ({result.idle_steps:,} idle, skipped)"
    return [
        ("device", result.device),
        ("requests", f"{result.requests_done:,} ({result.samples_done:,} samples)"),
        ("tokens written", f"{result.tokens_written:,}"),
        ("steps", steps),
        ("steps/s", f"{result.steps_per_s:,.1f}"),
        ("host bookkeeping us/step p50 / p99",
         f"{result.host_us_p50:,.1f} / {result.host_us_p99:,.1f}"),
        ("data movement us/step p50 / p99",
         f"{result.device_us_p50:,.1f} / {result.device_us_p99:,.1f}"),
        ("peak pages used / pool",
         f"{result.peak_pages_used:,} / {result.pool_pages:,} "
         f"({100 * result.peak_pages_used / result.pool_pages:.0f}%)"),
        ("tokens per GiB of pool (bfloat16)",
         f"{result.tokens_per_gib:,} ({result.tokens_per_gib_bf16:,})"),
        ("prefix-cache hit rate", hit),
        ("copy-on-write copies", f"{result.cow_copies:,}"),
        ("preemptions", _preemptions(result)),
        *_swap_rows(result),
        *_offload_rows(result),
        *_extra_rows(result),
        ("wall time", f"{result.wall_s:.1f} s"),
    ]


def _preemptions(result) -> str:
    swap = result.swap
    how = ("" if swap is None else f"{swap['swap_outs']:,} swapped out, "
           f"{swap['recompute_fallbacks']:,} recomputed: ")
    return (f"{result.preemptions:,} ({how}{result.recompute_tokens:,} tokens to "
            f"recompute)")


def _swap_rows(result) -> list[tuple[str, str]]:
    """Rows of a --preempt swap run (none otherwise)."""
    swap = result.swap
    if swap is None:
        return []

    def moved(way: str, waited: str) -> str:
        return (f"{swap[f'pages_{way}']:,} pages, {_bytes(swap[f'bytes_{way}'])}; "
                f"{swap[f'{way}_gb_per_s']:.2f} GB/s from the call to the {waited} that "
                f"finished it, {swap[f'{way}_call_gb_per_s']:.2f} GB/s inside the calls")

    rows = [
        ("host tier",
         f"{swap['host_pages']:,} pages ({_bytes(swap['host_bytes'])}), peak "
         f"{swap['host_pages_peak']:,} in use"),
        ("swapped out",
         f"{swap['swap_outs']:,} requests ({swap['requests_swapped']:,} distinct), one "
         f"call each: " + moved("out", "wait")),
        ("swapped in",
         f"{swap['requests_swapped_in']:,} requests in {swap['swap_ins']:,} calls: "
         + moved("in", "next step's poll")),
        ("recompute avoided",
         f"{swap['recompute_tokens_avoided']:,} tokens (prompt + generated of the swapped "
         f"requests); {swap['recompute_fallbacks']:,} victims recomputed (no room in the "
         f"host tier)"),
        ("checks after swap-in",
         f"{swap['checks']:,} sequences, {swap['check_tokens']:,} tokens read back, "
         f"{swap['mismatches']:,} mismatches ({swap['verify_seconds']:.2f} s of the wall "
         f"time)"),
    ]
    return rows


def _offload_rows(result) -> list[tuple[str, str]]:
    """Rows of a run whose host tier holds offloaded prefix pages (none otherwise)."""
    offload = result.prefix_offload
    if offload is None:
        return []
    rows = []
    if result.swap is None:   # a swap run says it in its own rows
        rows.append(("host tier",
                     f"{offload['host_pages']:,} pages ({_bytes(offload['host_bytes'])}): "
                     f"prefix offload only (victims are recomputed)"))
    admitted = result.admitted_hit_tokens + result.prefill_tokens
    rows += [
        ("prefix offload to the host tier",
         f"{offload['offloads']:,} offloads of evicted prefix pages "
         f"({offload['offload_pages']:,} pages, {_bytes(offload['offload_bytes'])}); "
         f"{offload['host_cached_pages']:,} pages cached there at the end"
         + ("; not in the swap figures" if result.swap is not None else "")),
        ("host-tier prefix hits",
         f"{offload['loads']:,} loaded ({offload['load_pages']:,} pages, "
         f"{_bytes(offload['load_bytes'])}), admission waited "
         f"{1e3 * offload['admission_wait_seconds']:.1f} ms for them; "
         f"{offload['admitted_host_hit_tokens']:,} prompt tokens of admitted requests, "
         f"{offload['loads_rolled_back']:,} loads ({offload['load_pages_rolled_back']:,} "
         f"pages) for admissions then rolled back"),
        ("admitted prompt tokens",
         f"{admitted:,}: {result.admitted_hit_tokens:,} from the prefix cache "
         f"({100 * result.admitted_hit_tokens / admitted if admitted else 0:.1f}%), "
         f"{result.prefill_tokens:,} prefilled"),
    ]
    return rows


def _extra_rows(result) -> list[tuple[str, str]]:
    """Rows of --window and --speculative runs (none for a plain run)."""
    rows = []
    hybrid, spec, util = result.hybrid, result.speculative, result.utilization
    if hybrid is not None:
        def layers(group):
            return ", ".join(map(str, group))

        saved_pages = 100 * hybrid["window_pages_saved_peak"]
        rows += [
            ("layer groups",
             f"full attention: layers {layers(hybrid['full_layers'])}; window "
             f"{hybrid['window']:,}: layers {layers(hybrid['window_layers'])}"),
            ("window group pages peak / full group",
             f"{hybrid['window_pages_peak']:,} / {hybrid['full_pages_peak']:,} "
             f"({saved_pages:.0f}% fewer than full attention holds for the same "
             f"sequences)"),
            ("KV memory, hybrid / all full",
             f"peak {_bytes(hybrid['kv_bytes_peak'])} / "
             f"{_bytes(hybrid['all_full_kv_bytes_peak'])} "
             f"({100 * hybrid['memory_saved']:.0f}% saved), mean "
             f"{_bytes(hybrid['kv_bytes_mean'])} / {_bytes(hybrid['all_full_kv_bytes_mean'])}"
             f" ({100 * hybrid['memory_saved_mean']:.0f}% saved)"),
            ("window pages per sequence max / bound",
             f"{hybrid['max_window_pages_per_seq']:,} / {hybrid['window_page_bound']:,} "
             f"(chunk up to {hybrid['max_chunk']:,} tokens); decode "
             f"{hybrid['max_window_pages_per_seq_decode']:,} / "
             f"{hybrid['window_page_bound_decode']:,}; "
             f"{hybrid['window_bound_violations']:,} over"),
        ]
    if util is not None:
        rows.append(("KV utilization, paged / contiguous",
                     f"{100 * util['paged']:.1f}% / {100 * util['contiguous']:.1f}% of "
                     f"allocated token slots hold tokens (mean memory "
                     f"{_bytes(util['paged_bytes_mean'])} / "
                     f"{_bytes(util['contiguous_bytes_mean'])})"))
    if spec is not None:
        rows.append(("speculative decoding",
                     f"K={spec['k']}: {spec['accepted_per_step']:.2f} tokens accepted per "
                     f"sequence step, {spec['drafts_rejected']:,} of {spec['drafts']:,} "
                     f"drafts rejected"))
    return rows


def _bytes(n: float) -> str:
    from kvcore.simulate import _fmt_bytes

    return _fmt_bytes(n)


def _integrity_line(result) -> str:
    """What verification counted: a read-back compares a whole sequence with what was
    written (every finished sample, plus live ones at spot checks), so a token counts at
    every read-back that covers it: a prompt shared by samples or by a prefix hit is
    written once but read back in every sequence, and spot-checked sequences again."""
    swap_checks = result.swap["checks"] if result.swap is not None else 0
    at_finish = result.sequences_verified - result.spot_checks - swap_checks
    swapped = (f" + {swap_checks:,} checks after swap-in" if result.swap is not None
               else "")
    return (f"integrity: {result.sequences_verified:,} sequence read-backs ({at_finish:,} "
            f"finished samples + {result.spot_checks:,} spot checks of live ones{swapped}), "
            f"{result.tokens_verified:,} tokens compared (per read-back: shared prompts and "
            f"spot-checked tokens count again), {result.mismatches:,} mismatches, "
            f"{result.invariant_failures} invariant failures")


def _plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result.timeline
    fig, (top, middle, bottom) = plt.subplots(3, 1, sharex=True, figsize=(9, 7))
    top.plot(t["step"], t["pages_used"], lw=1, label="all" if "window_pages" in t else None)
    if "window_pages" in t:   # --window: each group's share
        top.plot(t["step"], t["full_pages"], lw=1, label="full-attention group")
        top.plot(t["step"], t["window_pages"], lw=1, label="window group")
    top.axhline(result.pool_pages, color="gray", ls="--", lw=1, label="pool")
    top.set_ylabel("pages in use")
    top.legend(loc="lower right")
    middle.plot(t["step"], t["running"], lw=1, label="running sequences")
    middle.plot(t["step"], t["waiting"], lw=1, label="waiting requests")
    if "swapped" in t:   # --preempt swap
        middle.plot(t["step"], t["swapped"], lw=1, label="swapped-out requests")
    middle.legend(loc="upper right")
    bottom.plot(t["step"], [100 * x for x in t["hit_rate"]], lw=1)
    bottom.set_ylabel("prefix hit rate %")
    bottom.set_xlabel("step")
    fig.suptitle(f"kvcore simulate: {result.requests_done} requests on {result.device}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _error(command: str, message: str) -> int:
    print(f"kvcore {command}: error: {message}", file=sys.stderr)
    return 2


def _host_tier_line(recompute, swap) -> str:
    """``--preempt both``: which runs had a host tier, and what it served."""
    pages = swap.swap["host_pages"]
    if not pages:
        return "neither run (--host-pages 0): both recompute every victim"
    if recompute.prefix_offload is not None:
        return (f"both runs, {pages:,} pages each: both offload evicted prefix pages there "
                f"(recompute: {recompute.prefix_offload['loads']:,} host hits loaded, swap: "
                f"{swap.prefix_offload['loads']:,}); only the swap run moves victims there")
    return (f"swap run only ({pages:,} pages, for its victims): prefix offload needs "
            f"--prefix-cache and no --window, so neither run offloads prefix pages")


def _comparison_rows(recompute, swap) -> list[tuple[str, str]]:
    """``--preempt both``: the figures that preemption changes, recompute -> swap."""
    def change(a, b, fmt) -> str:
        pct = f" ({100 * (b - a) / a:+.1f}%)" if a else ""
        return f"{fmt(a)} -> {fmt(b)}{pct}"

    def count(x) -> str:
        return f"{x:,}"

    return [
        ("host tier", _host_tier_line(recompute, swap)),
        ("steps run (idle ones not counted)",
         change(recompute.steps - recompute.idle_steps, swap.steps - swap.idle_steps, count)),
        ("wall time",
         change(recompute.wall_s, swap.wall_s, lambda x: f"{x:.2f} s")
         + f" (swap: {swap.swap['verify_seconds']:.2f} s of checks after swap-in)"),
        ("tokens written", change(recompute.tokens_written, swap.tokens_written, count)),
        ("prompt tokens prefilled",
         change(recompute.prefill_tokens, swap.prefill_tokens, count)),
        ("prefix hits of admitted prompts",
         change(recompute.admitted_hit_tokens, swap.admitted_hit_tokens, count)
         + " tokens (recompute's include its victims' prompts, admitted again)"),
        ("preemptions", change(recompute.preemptions, swap.preemptions, count)),
        ("tokens to recompute",
         change(recompute.recompute_tokens, swap.recompute_tokens, count)
         + f" ({swap.swap['recompute_tokens_avoided']:,} avoided by swapping)"),
    ]


def _payload(result) -> dict:
    """What --json writes for one run."""
    payload = asdict(result)
    for name in ("hybrid", "speculative", "utilization", "swap",   # only with their options
                 "prefix_offload"):
        if payload[name] is None:
            del payload[name]
    payload["ok"] = result.ok
    return payload


def _both_configs(swap):
    """``--preempt both``: the recompute and swap configs of one workload, with the same
    host tier (``--host-pages``, default as many pages as ``--pages``, as for --preempt
    swap). kvcore offloads evicted prefix pages to a host tier on its own (with
    --prefix-cache and no --window), so a swap run without a recompute run that has the
    same tier would credit swapping with the prefix hits the host tier brings back. Where
    prefix offload is off, the recompute run gets no host tier: it could not use one."""
    from dataclasses import replace

    host_pages = swap.num_host_pages()
    recompute = replace(swap, preempt="recompute", host_pages=None)
    if host_pages and recompute.prefix_cache and recompute.window is None:
        recompute = replace(recompute, host_pages=host_pages)
    return [recompute, swap]


def _run_simulate(args) -> int:
    from kvcore.errors import BackendUnavailableError
    from kvcore.simulate import ConfigurationError, SimConfig, Simulator, _check_config

    if args.replicas > 1:
        return _run_cluster(args)
    if args.disaggregated:
        from kvcore.simulate_disagg import cli_run

        return cli_run(args, _error)
    both = args.preempt == "both"
    if both and args.plot is not None:
        return _error("simulate", "--plot draws one run; give it --preempt recompute or "
                      "--preempt swap")
    problem = _check_outputs(args)
    if problem:
        return _error("simulate", problem)
    values = {f.name: getattr(args, f.name) for f in fields(SimConfig)}
    configs = (_both_configs(SimConfig(**{**values, "preempt": "swap"})) if both else
               [SimConfig(**values)])
    on_step = None
    if args.corrupt_at_step is not None:   # test hook: flip a live page behind kvcore's back
        def on_step(sim, step):
            if step == args.corrupt_at_step:
                seqs = [s for s in sim.cache.table.active_seq_ids().tolist()
                        if sim.cache.seq_state(s) == "resident"]
                if seqs:
                    page = int(sim.cache.pages(seqs[0])[0])
                    sim.cache.k_cache(0)[page] = sim.cache.k_cache(0)[page] + 1
    json_to_stdout = args.json is not None and str(args.json) == "-"
    table = sys.stderr if json_to_stdout else sys.stdout
    show = None if args.quiet or not sys.stderr.isatty() else _progress_printer(sys.stderr)
    results = []
    for config in configs:
        try:
            if not results:   # every run's config is checked before the first runs
                for later in configs[1:]:
                    _check_config(later)
            sim = Simulator(config, on_step=on_step)
        except (ConfigurationError, BackendUnavailableError, ValueError,
                OverflowError) as exc:
            return _error("simulate", str(exc))
        except MemoryError:
            return _error("simulate", "out of memory allocating the simulation; lower "
                          "--pages, --layers, --heads, --head-dim or --requests")
        try:
            result = sim.run(progress=show)
        except ConfigurationError as exc:   # a run that would never finish (checked up front)
            return _error("simulate", str(exc))
        except MemoryError:
            return _error("simulate", "out of memory during the run; lower "
                          "--max-step-tokens, --heads, --head-dim or --requests")
        finally:
            if show is not None:
                sys.stderr.write("\n")
        del sim   # its pools, before the next run allocates its own
        if both:   # a header over each run's table, a blank line between them
            host = (f" (host tier of {config.num_host_pages():,} pages)"
                    if config.num_host_pages() else " (no host tier)")
            print(("\n" if results else "") + f"--preempt {config.preempt}{host}",
                  file=table)
        for name, value in _summary_rows(result):
            print(f"{name:<38} {value}", file=table)
        print(_integrity_line(result), file=table)
        results.append(result)
    if both:
        same = configs[0].num_host_pages() == configs[1].num_host_pages()
        print(f"\nswap against recompute (the same workload{' and host tier' if same else ''})"
              f", recompute -> swap", file=table)
        for name, value in _comparison_rows(*results):
            print(f"{name:<38} {value}", file=table)
    if args.json is not None:
        payload = (_payload(results[0]) if not both else
                   {"recompute": _payload(results[0]), "swap": _payload(results[1]),
                    "ok": all(r.ok for r in results)})
        text = json.dumps(payload, indent=1) + "\n"
        if json_to_stdout:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            try:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(text)
            except OSError as exc:
                return _error("simulate", f"--json {args.json}: cannot write there "
                              f"({exc.strerror or exc})")
    if args.plot is not None:
        try:
            _plot(results[0], args.plot)
        except (OSError, ValueError) as exc:
            return _error("simulate", f"--plot {args.plot}: could not draw the plot ({exc})")
    return 0 if all(r.ok for r in results) else 1


def _run_cluster(args) -> int:
    """``kvcore simulate --replicas N``: prefix-aware against random routing."""
    from kvcore.cluster_sim import ClusterConfig, format_cluster, run_cluster
    from kvcore.errors import BackendUnavailableError

    problem = _check_outputs(args)
    if problem:
        return _error("simulate", problem)
    from kvcore.simulate import SimConfig
    defaults = SimConfig()
    used = {"requests", "seed", "page_size", "device"}
    ignored = [f"--{f.name.replace('_', '-')}" for f in fields(SimConfig)
               if f.name not in used and getattr(args, f.name) != getattr(defaults, f.name)]
    if args.plot is not None:
        ignored.append("--plot")
    if args.disaggregated:
        ignored.append("--disaggregated")
    if ignored:
        return _error("simulate", f"--replicas runs its own cluster workload; it does not "
                      f"take {', '.join(ignored)}")
    try:
        import msgspec  # noqa: F401
        import zmq  # noqa: F401
    except ImportError:
        return _error("simulate", "--replicas needs msgspec and pyzmq: "
                      "pip install 'kvcore[events]'")
    try:
        cfg = ClusterConfig(replicas=args.replicas, requests=args.requests, seed=args.seed,
                            page_size=args.page_size, device=args.device)
        prefix = run_cluster(cfg, "prefix")
        random = run_cluster(cfg, "random")
    except (ValueError, TypeError, BackendUnavailableError) as exc:
        return _error("simulate", str(exc))
    except AssertionError as exc:     # a verification failed: the run's verdict
        print(f"kvcore simulate: verification FAILED: {exc}", file=sys.stderr)
        return 1
    json_to_stdout = args.json is not None and str(args.json) == "-"
    out = sys.stderr if json_to_stdout else sys.stdout
    print(f"{cfg.replicas} replicas of {cfg.num_pages:,} pages, {cfg.requests} requests over "
          f"{cfg.prefixes} shared prefixes of {cfg.prefix_tokens} tokens, on "
          f"{prefix['device']}", file=out)
    print(format_cluster(prefix, random), file=out)
    if args.json is not None:
        text = json.dumps({"config": asdict(cfg), "prefix": prefix,
                           "random": random, "ok": True}, indent=1) + "\n"
        if json_to_stdout:
            sys.stdout.write(text)
        else:
            try:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(text)
            except OSError as exc:
                return _error("simulate", f"--json {args.json}: cannot write there "
                              f"({exc.strerror or exc})")
    return 0


def _run_bench(args) -> int:
    from kvcore.backends import cuda_available
    from kvcore.bench import host

    out_dir = args.out_dir
    if out_dir is not None:
        for name in ("cpu.json", "gpu.json"):
            problem = _writable(out_dir / name, "--out-dir")
            if problem:
                return _error("bench", problem)
    argv = ["--quick"] if args.quick else []
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
    import kvcore

    parser = _Parser(prog="kvcore", description="kvcore: a paged KV-cache manager for LLM "
                     "serving.")
    parser.add_argument("--version", action="version", version=f"kvcore {kvcore.__version__}",
                        help="print 'kvcore VERSION' and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_simulate(sub)
    bench = sub.add_parser("bench", help="host benchmark, plus the device one with a GPU",
                           description="Run the host benchmark, and the device one when a "
                           "CUDA device is present.")
    bench.add_argument("--quick", action="store_true", help="fewer repeats")
    bench.add_argument("--out-dir", type=Path, metavar="DIR",
                       help="write cpu.json / gpu.json here (created if needed)")
    sub.add_parser("info", help="version, build, backend and device",
                   description="Print the version, how the extension was built, and the "
                   "backend and device kvcore finds.")
    args, extra = parser.parse_known_args(argv)
    if extra:   # name the subcommand whose options these are not
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    handler = {"simulate": _run_simulate, "bench": _run_bench, "info": _run_info}
    try:
        return handler[args.command](args)
    except KeyboardInterrupt:
        print(f"\nkvcore {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # e.g. `kvcore simulate --json - | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
