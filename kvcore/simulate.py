"""A continuous-batching serving workload driven through a KVCache, verified byte for byte.

The simulator plays the scheduler of an LLM server, step by step:

- requests arrive over time (Poisson), with long-tailed (lognormal) prompt and output
  lengths; a share starts with one of a few common system prompts, and a share asks for
  several samples (the prompt is prefilled once, then forked: copy-on-write); stretches
  with nothing to run are skipped to the next arrival;
- a request is admitted only when its prompt fits in the free pages (``pages_needed``
  logic) and the step's token budget; when decoding runs out of pages the newest
  request is preempted: by default its sequences are removed and the request requeued
  to recompute (``preempt="recompute"``), or with ``preempt="swap"`` they move to a host
  tier and come back later, byte for byte (see below);
- every step writes K and V of every new token for every layer through
  :meth:`KVCache.write`, with content derived from (request, sample, position, layer,
  K/V) alone, so that it can be recomputed later;
- finished samples, a rotating subset of live ones during the run, and everything
  still live at the end are gathered and compared with the recomputed content; the
  bookkeeping invariants are checked as it goes.

Two options model newer serving setups (both off by default, and without them the run and
its figures are exactly those of a plain run):

- ``window``: a hybrid model. A share of the layers (``window_layers``, interleaved as in
  Gemma / GPT-OSS) is a sliding-window group of window ``W``, the rest a full-attention
  group, sharing one allocator and pool (see ``docs/groups.md``). Full layers are read
  back whole; window layers only where the window group still holds pages (from
  ``first_page`` on, which must cover the last ``W - 1`` tokens and the newest one).
  Every append checks the bound on the pages a window sequence holds, and the run
  reports the window group's pages against what the full-attention group held for the
  same sequences, and the memory saved against an all-full-attention model.
- ``speculative``: ``K`` drafts per decode step. Every running sequence appends its
  verified token plus up to ``K`` drafts in one batched append (K/V written for all),
  accepts a random prefix of its drafts (uniform, seeded on its own so the workload does
  not change) and one batched ``truncate`` rolls the rest back. Rejected drafts are
  written with content of their own, which the read-backs never expect, so a rejected
  token that survived would be a mismatch; with prefix caching, every read-back also
  looks the sequence up with its latest rejected drafts in place of the accepted tokens,
  which must not match past them (a page of rejected tokens left in the prefix index).

``preempt="swap"`` gives the cache a host tier of ``host_pages`` pages
(``KVCacheConfig.num_host_pages``; default as many as the device pool). A victim's live
sequences (all its samples) move out in one :meth:`KVCache.swap_out` call, so pages
they share move once; the step waits for that copy (the decode step needs the device
pages it frees), and the request waits on the host. A victim the host tier has no room
for is recomputed instead (a *fallback*, counted). At the start of every step
:meth:`KVCache.poll` finishes completed transfers, then the oldest swapped-out requests
(in admission order, stopping at the first that does not fit) whose pages fit the free
device pages, with the headroom admission keeps for their next decode step, are brought
back in one :meth:`KVCache.swap_in` call; nothing new is admitted while a request waits
on the host (it is older: as a recompute victim at the head of the queue). A swapped-in
request is decoded only once a later ``poll`` has finished its swap-in; every one of its
sequences is then read back whole and compared with what was written (every layer,
every position), so a page that came back different is a mismatch.

A host tier also serves *prefix offload* (kvcore's own, with prefix caching and one layer
group: docs/host_tier.md): a cached prompt page the device must reuse is copied to a host
page first and stays findable, and a later prompt that hits it loads it back. With
``preempt="recompute"`` and ``host_pages > 0`` that is all the host tier does (victims
are still recomputed); the default there is no host tier. Either way the simulator
handles those transfers alike: :meth:`KVCache.poll` at the start of every step, an
admission whose prefix hit is being loaded waits for the load (it must be resident to be
extended), and the end of the run waits for every transfer; the run reports them in
``SimResult.prefix_offload``.

With either option the run also reports KV memory utilization (token slots holding live
tokens over the slots of the pages in use, time-averaged over steps) against a
contiguous baseline that reserves ``prompt + max_output_len`` per sequence.

Any mismatch or invariant failure is counted and makes the CLI exit non-zero. A config
that could not be allocated or would never finish (a request that cannot be admitted, or
does not fit the pool even alone) raises :class:`ConfigurationError` before the pool is
allocated.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from kvcore import fp8
from kvcore.cache import KVCache
from kvcore.config import DTYPES, KVCacheConfig
from kvcore.errors import KVCoreError
from kvcore.groups import LayerGroup

__all__ = ["ConfigurationError", "SimConfig", "SimResult", "Simulator", "estimate_host_bytes",
           "hybrid_layers", "token_words", "window_page_bound"]

#: Samples a multi-sample request asks for: 2 to MAX_SAMPLES (see ``multi_sample_share``).
MAX_SAMPLES = 4
_INT32_MAX = 2**31 - 1
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)

#: Sample key of a rejected draft's content (plus the sample): no accepted token has it.
_REJECTED = 1 << 40

#: SimConfig fields that are left out of ``SimResult.config`` while they are off, so that
#: a run without them reports exactly what it did before they existed.
_OPTIONAL_FIELDS = {"window": None, "window_layers": 0.5, "speculative": 0,
                    "preempt": "recompute", "host_pages": None}

#: What ``SimConfig.preempt`` may be.
PREEMPT_MODES = ("recompute", "swap")

#: Transfer kinds kvcore starts on its own (prefix offload), not the simulator's swaps.
_PREFIX_KINDS = ("offload", "load")

#: Groups of a hybrid run's KVCacheConfig: full attention first (the prefix cache's anchor).
_FULL_GROUP, _WINDOW_GROUP = 0, 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def token_words(request_ids, sample_ids, positions, layer: int, which: int, num_heads: int,
                head_dim: int, itemsize: int) -> np.ndarray:
    """Deterministic content of tokens: words ``[T, num_heads, head_dim]``.

    Parameters
    ----------
    request_ids, sample_ids, positions : array_like of int, shape [T]
        Identify each token. Prompt tokens use sample 0 in every sample.
    layer : int
    which : int
        0 for K, 1 for V.
    itemsize : int
        2 (uint16 words, for float16 / bfloat16) or 4 (uint32, for float32).

    Returns
    -------
    numpy.ndarray of uint16 or uint32
        The top exponent bit is cleared, so every word is a finite float of the dtype.
    """
    with np.errstate(over="ignore"):
        key = (np.asarray(request_ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
               + np.asarray(sample_ids, dtype=np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
               + np.asarray(positions, dtype=np.uint64) * np.uint64(0x165667B19E3779F9)
               + np.uint64(layer * 2 + which + 1) * np.uint64(0x27D4EB2F165667C5))
        base = _mix64(key)
        lanes = np.arange(num_heads * head_dim, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        words = _mix64(base[:, None] + lanes[None, :])
    if itemsize == 2:
        out = (words >> np.uint64(48)).astype(np.uint16) & np.uint16(0xBFFF)
    else:
        out = (words >> np.uint64(32)).astype(np.uint32) & np.uint32(0xBFFFFFFF)
    return out.reshape(-1, num_heads, head_dim)


@dataclass(frozen=True)
class SimConfig:
    """Knobs of a simulated serving run (the CLI flags of ``kvcore simulate``)."""

    requests: int = 256
    layers: int = 2
    heads: int = 4
    head_dim: int = 64
    page_size: int = 16
    pages: int = 1536
    dtype: str = "float16"
    layout: str = "NHD"
    arrival_rate: float = 2.0         # requests per step (Poisson)
    seed: int = 0
    device: str = "auto"
    max_running: int = 64             # sequences decoding at once (sequence slots)
    max_step_tokens: int = 4096       # prefill + decode tokens per step
    prompt_median: int = 200
    output_median: int = 96
    max_prompt_len: int = 2048
    max_output_len: int = 1024
    system_prompts: int = 4           # distinct common system prompts
    system_prompt_len: int = 256
    system_prompt_share: float = 0.4
    multi_sample_share: float = 0.15  # requests asking for 2-4 samples
    prefix_cache: bool = True         # reuse cached prompt pages across requests
    verify_every: int = 25            # steps between spot checks of live sequences
    check_every: int = 10             # steps between invariant checks
    window: int | None = None         # sliding window of the hybrid model's window layers
    window_layers: float = 0.5        # share of the layers that use the window
    speculative: int = 0              # draft tokens per sequence and decode step
    # what a preempted request's sequences go through: "recompute" (removed, the request
    # requeued to start again) or "swap" (moved to a host tier, brought back later)
    preempt: str = "recompute"
    # pages of the host tier (each holds page_size tokens of every layer, K and V, as a
    # device page does); None: as many as ``pages`` with preempt="swap", 0 otherwise.
    # With preempt="recompute" it serves prefix offload only (needs prefix_cache and
    # no window)
    host_pages: int | None = None

    def num_host_pages(self) -> int:
        """Pages of the host tier: ``host_pages``, or by default ``pages`` with
        ``preempt="swap"`` and 0 (no host tier) otherwise."""
        if self.host_pages is not None:
            return self.host_pages
        return self.pages if self.preempt == "swap" else 0

    def prefix_offload(self) -> bool:
        """Whether kvcore offloads evicted prefix pages to the host tier in this run:
        a host tier, prefix caching and one layer group (no ``window``)."""
        return self.num_host_pages() > 0 and self.prefix_cache and self.window is None

    def max_request_tokens(self) -> int:
        return self.system_prompt_len + self.max_prompt_len + self.max_output_len

    def max_samples(self) -> int:
        """The most samples one request can ask for (each is a sequence of its own)."""
        return MAX_SAMPLES if self.multi_sample_share > 0 else 1

    def layer_split(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(full-attention layers, sliding-window layers); all layers are full without
        ``window``. See :func:`hybrid_layers`."""
        if self.window is None:
            return tuple(range(self.layers)), ()
        return hybrid_layers(self.layers, self.window_layers)

    def num_slots(self) -> int:
        """Layers one page id holds: the larger group's size (all layers without window)."""
        return max(len(group) for group in self.layer_split())

    def num_groups(self) -> int:
        return 1 if self.window is None else 2


def hybrid_layers(num_layers: int, window_share: float) -> tuple[tuple[int, ...],
                                                                 tuple[int, ...]]:
    """Split layers into (full-attention, sliding-window), interleaved.

    ``window_share * num_layers`` layers (rounded, halves up) use the window; the
    full-attention layers are spread evenly, each closing its stretch, as in Gemma 3 (5
    local then 1 global) and GPT-OSS (alternating, layer 0 local).

    Examples
    --------
    >>> hybrid_layers(4, 0.5)
    ((1, 3), (0, 2))
    >>> hybrid_layers(6, 5 / 6)
    ((5,), (0, 1, 2, 3, 4))
    """
    num_window = int(window_share * num_layers + 0.5)
    num_full = num_layers - num_window
    full = tuple(i for i in range(num_layers)
                 if (i + 1) * num_full // num_layers > i * num_full // num_layers)
    window = tuple(i for i in range(num_layers) if i not in set(full))
    return full, window


@dataclass
class _Request:
    request_id: int
    arrival_step: int
    prompt_len: int                   # system prompt included
    output_lens: list[int]            # one per sample
    system_prompt: int                # -1 for none
    seq_ids: list[int] = field(default_factory=list)   # per sample, -1 once finished
    generated: list[int] = field(default_factory=list)
    admitted_step: int = -1
    preemptions: int = 0


@dataclass
class SimResult:
    """Figures of one run (also what ``--json`` writes)."""

    config: dict
    device: str
    requests_done: int = 0
    samples_done: int = 0
    tokens_written: int = 0
    steps: int = 0
    wall_s: float = 0.0
    steps_per_s: float = 0.0
    # host bookkeeping per step: append, pages_needed, fork, remove, metadata
    host_us_p50: float = 0.0
    host_us_p99: float = 0.0
    # data movement per step: write (and copy-on-write inside append is host-timed) + sync
    device_us_p50: float = 0.0
    device_us_p99: float = 0.0
    peak_pages_used: int = 0
    pool_pages: int = 0
    # tokens (every layer, K and V) one GiB of the pool holds, and with bfloat16 instead
    tokens_per_gib: int = 0
    tokens_per_gib_bf16: int = 0
    prefix_hit_rate: float | None = None
    prefix_hit_tokens: int = 0
    prefix_evictions: int = 0
    cow_copies: int = 0
    preemptions: int = 0
    idle_steps: int = 0               # steps with nothing to run, skipped (in ``steps``)
    # read-backs: every finished sample, plus live sequences at spot checks (whose tokens
    # are read again when they finish); a token counts once per read-back that covers it
    sequences_verified: int = 0
    tokens_verified: int = 0
    spot_checks: int = 0              # the read-backs of live sequences among the above
    spot_check_tokens: int = 0
    mismatches: int = 0
    invariant_failures: int = 0
    # admissions' prompt tokens (a request recomputed after a preemption counts again):
    # those the prefix cache served (device hits, and host-tier hits loaded back) and
    # those prefilled (computed and written); unlike prefix_hit_tokens, lookups of
    # admissions rolled back for want of pages or budget are not counted
    admitted_hit_tokens: int = 0
    prefill_tokens: int = 0
    # tokens that preempted requests held (prompt plus every sample's generated tokens)
    # when they were removed to recompute: the work recompute does again (here the prompt
    # is prefilled again, partly from the prefix cache, and the outputs are decoded again)
    recompute_tokens: int = 0
    # with --preempt swap only (None, and left out of --json, otherwise); see
    # Simulator._finish_swap for its keys
    swap: dict | None = None
    # with a host tier and prefix caching (one layer group) only, in either --preempt
    # mode (None, and left out of --json, otherwise); see Simulator._finish_offload
    prefix_offload: dict | None = None
    # with --window / --speculative only (None, and left out of --json, otherwise); see
    # Simulator._finish_extras for their keys
    hybrid: dict | None = None
    speculative: dict | None = None
    utilization: dict | None = None
    timeline: dict = field(default_factory=dict)   # one entry per step run (not skipped)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.invariant_failures == 0


class ConfigurationError(ValueError):
    """A simulation that cannot run as configured (e.g. a request longer than the pool).

    Messages name the ``kvcore simulate`` options (``--pages``) to change.
    """


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError   # pragma: no cover


def _available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    for limit_path, usage_path in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
             "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            available = min(available, max(int(limit) - usage, 0))
        break
    return available


def _pool_on_host(device: str) -> bool:
    name = device.strip().lower()
    if name == "auto":
        from kvcore.backends import cuda_available

        return not cuda_available()
    return name == "cpu"


def estimate_host_bytes(config: SimConfig, pool_on_host: bool = True) -> dict[str, int]:
    """Rough host memory of a run, by part, from the config alone (nothing allocated).

    The KV pool (when it lives on the host), the page table and prefix index, the
    buffers of one step (content is generated as 64-bit words, then compared) and the
    request list.
    """
    itemsize = DTYPES.get(config.dtype, 4)
    lanes = config.heads * config.head_dim
    ps = config.page_size
    need_pages = -(-config.max_request_tokens() // ps)
    prefill = min(config.max_step_tokens,   # admission takes at most max_running prompts
                  config.max_running * (config.system_prompt_len + config.max_prompt_len))
    decode = config.max_running * (1 + min(config.speculative, config.max_output_len))
    step_tokens = max(prefill + decode, config.max_request_tokens())
    per_page = 16 + (4 * ps + 48 if config.prefix_cache else 0)
    groups = config.num_groups()
    page_bytes = 2 * config.num_slots() * ps * lanes * itemsize
    return {
        "KV pool": config.pages * page_bytes if pool_on_host else 0,
        "page table": (4 * groups * config.max_running * need_pages
                       + per_page * config.pages),
        "per-step buffers": step_tokens * lanes * (32 + 4 * itemsize),
        "requests": 1024 * config.requests,
        # NumPy on the CPU, page-locked memory with CUDA: host memory either way
        "host tier": config.num_host_pages() * page_bytes,
    }


_LOWER = {"KV pool": "--pages, --page-size, --layers, --heads or --head-dim",
          "page table": "--max-running, --max-prompt-len or --max-output-len",
          "per-step buffers": "--max-step-tokens, --max-prompt-len, --heads or --head-dim",
          "requests": "--requests",
          "host tier": "--host-pages"}


def _check_options(cfg: SimConfig) -> None:
    """--window, --window-layers, --speculative, --preempt and --host-pages (the CLI
    parser checks them too)."""
    def integer(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

    if cfg.preempt not in PREEMPT_MODES:
        raise ConfigurationError(f"--preempt must be one of {', '.join(PREEMPT_MODES)}, got "
                                 f"{cfg.preempt!r}")
    if cfg.host_pages is not None:
        if not integer(cfg.host_pages) or not 0 <= cfg.host_pages <= _INT32_MAX:
            raise ConfigurationError(f"--host-pages must be an integer from 0 to 2**31 - 1, "
                                     f"got {cfg.host_pages!r}")
        if cfg.host_pages and cfg.preempt != "swap":
            # without swapping, the host tier holds kvcore's offloaded prefix pages only
            if not cfg.prefix_cache:
                raise ConfigurationError(
                    "--host-pages with --preempt recompute needs --prefix-cache: without "
                    "swapping the host tier only holds evicted prefix-cache pages; use "
                    "--preempt swap, or drop --host-pages")
            if cfg.window is not None:
                raise ConfigurationError(
                    "--host-pages with --preempt recompute does not work with --window: "
                    "without swapping the host tier only holds evicted prefix-cache pages, "
                    "and prefix offload needs one layer group; use --preempt swap, or drop "
                    "--host-pages")
    if cfg.window is not None and not (integer(cfg.window) and 1 <= cfg.window < 2**31):
        raise ConfigurationError(f"--window must be a positive integer below 2**31, got "
                                 f"{cfg.window!r}")
    if not integer(cfg.speculative) or cfg.speculative < 0:
        raise ConfigurationError(f"--speculative must be an integer >= 0, got "
                                 f"{cfg.speculative!r}")
    share = cfg.window_layers
    if (isinstance(share, (bool, np.bool_)) or not isinstance(share, (int, float))
            or not 0 < share < 1):
        raise ConfigurationError(f"--window-layers must be a number between 0 and 1 "
                                 f"(exclusive), got {share!r}")
    if cfg.window is None:
        if share != _OPTIONAL_FIELDS["window_layers"]:
            raise ConfigurationError("--window-layers needs --window W (the sliding window "
                                     "of those layers)")
        return
    full, window = cfg.layer_split()
    if not window or not full:
        raise ConfigurationError(
            f"--window-layers {share:g} of --layers {cfg.layers} makes "
            f"{len(window)} sliding-window and {len(full)} full-attention layers; a hybrid "
            f"model needs at least one of each: "
            + ("raise --layers to 2 or more" if cfg.layers < 2 else
               "raise --window-layers or --layers" if not window else
               "lower --window-layers or raise --layers"))


def window_page_bound(window: int, chunk: int, page_size: int) -> int:
    """Most pages a window-``window`` group holds for a sequence that just appended
    ``chunk`` tokens: ``ceil((window - 1 + chunk) / page_size) + 1`` (docs/groups.md)."""
    return -(-(window - 1 + chunk) // page_size) + 1


def _peak_pages(cfg: SimConfig, prompt_len: int, full_peak: int, samples: int) -> int:
    """Pages a request holds at its peak, running alone, given its full-attention peak.

    Without --window that is ``full_peak``. A window group holds the whole prompt while
    it is prefilled (2 prompts' pages in all), then at most the window bound per sample
    (never more than a full group would), on top of the full group's pages.
    """
    if cfg.window is None:
        return full_peak
    prompt_pages = -(-prompt_len // cfg.page_size)
    decode = window_page_bound(cfg.window, 1 + cfg.speculative, cfg.page_size)
    return max(2 * prompt_pages, full_peak + min(full_peak, samples * decode))


def _check_config(cfg: SimConfig) -> None:
    """Reject, before anything is allocated, a config that cannot run or never ends."""
    _check_options(cfg)
    ps = cfg.page_size
    need_pages = -(-cfg.max_request_tokens() // ps)
    total = _peak_pages(cfg, cfg.system_prompt_len + cfg.max_prompt_len, need_pages, 1)
    if total > cfg.pages:
        both = (f" in the full-attention group, {total} with the sliding-window group's "
                f"(which holds a whole prompt while it is prefilled)"
                if total > need_pages else "")
        raise ConfigurationError(
            f"a request of up to {cfg.max_request_tokens()} tokens (system prompt "
            f"{cfg.system_prompt_len} + prompt {cfg.max_prompt_len} + output "
            f"{cfg.max_output_len}) needs {need_pages} pages of {ps} tokens{both}, but the "
            f"pool has {cfg.pages}; raise --pages or lower --max-prompt-len / "
            f"--max-output-len / --system-prompt-len")
    if cfg.max_step_tokens < cfg.system_prompt_len + cfg.max_prompt_len:
        raise ConfigurationError(
            f"--max-step-tokens {cfg.max_step_tokens} is below the longest prompt "
            f"({cfg.system_prompt_len + cfg.max_prompt_len} tokens), which could "
            f"then never be admitted")
    if cfg.pages > _INT32_MAX:
        raise ConfigurationError(f"--pages {cfg.pages:,} is too many: a pool holds fewer "
                                 f"than 2**31 pages")
    if cfg.max_running > _INT32_MAX:
        raise ConfigurationError(f"--max-running {cfg.max_running:,} is too many: at most "
                                 f"2**31 - 1 sequences")
    if need_pages * ps > _INT32_MAX:
        raise ConfigurationError(
            f"a request of up to {cfg.max_request_tokens():,} tokens is longer than a "
            f"sequence can be (2**31 - 1 tokens); lower --max-prompt-len / --max-output-len "
            f"/ --system-prompt-len")
    if cfg.max_running < cfg.max_samples():
        raise ConfigurationError(
            f"--max-running {cfg.max_running} is below the {cfg.max_samples()} samples a "
            f"request can ask for (with --multi-sample-share {cfg.multi_sample_share}, "
            f"requests ask for 2-{MAX_SAMPLES} samples, one sequence each), so such a "
            f"request could never be admitted; raise --max-running to at least "
            f"{cfg.max_samples()} or set --multi-sample-share 0")
    if cfg.system_prompt_share > 0 and cfg.system_prompts < 1:
        raise ConfigurationError(
            f"--system-prompt-share {cfg.system_prompt_share} needs at least one system "
            f"prompt; raise --system-prompts or set --system-prompt-share 0")
    if not isinstance(cfg.device, str) or not _DEVICE.match(cfg.device.strip().lower()):
        raise ConfigurationError(f"--device must be auto, cpu, cuda or cuda:N, got "
                                 f"{cfg.device!r}")
    parts = estimate_host_bytes(cfg, _pool_on_host(cfg.device))
    available = _available_memory()
    if available is not None and sum(parts.values()) > available:
        biggest = max(parts, key=parts.get)
        detail = ", ".join(f"{name} {_fmt_bytes(n)}" for name, n in parts.items() if n)
        raise ConfigurationError(
            f"this run needs about {_fmt_bytes(sum(parts.values()))} of host memory "
            f"({detail}), but only {_fmt_bytes(available)} is available; lower "
            f"{_LOWER[biggest]}")


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or a GPU framework's out-of-memory error (not all derive from it)."""
    return isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__


class Simulator:
    """Drive a :class:`KVCache` like a continuous-batching scheduler (see the module doc).

    Parameters
    ----------
    config : SimConfig
    on_step : callable, optional
        ``on_step(simulator, step)`` after each step; tests use it to tamper with the pool.

    Raises
    ------
    ConfigurationError
        A run that cannot be allocated, or could never finish (a request that does not
        fit the pool, even alone, or cannot be admitted); checked before the pool is
        allocated.
    """

    def __init__(self, config: SimConfig, on_step=None):
        self.cfg = config
        ps = config.page_size
        _check_config(config)
        need_pages = -(-config.max_request_tokens() // ps)
        self.on_step = on_step
        self.rng = np.random.default_rng(config.seed)
        self._watermark = max(1, config.pages // 100)
        # pages one sequence's decode step may take: a page per group, more for drafts
        self._step_pages = config.num_groups() * (1 + -(-config.speculative // ps))
        try:
            self.requests = self._make_requests()
        except MemoryError as exc:
            raise ConfigurationError(f"out of memory generating {config.requests:,} "
                                     f"requests; lower --requests") from exc
        self._check_workload()
        self._full_layers, self._window_layers = config.layer_split()
        groups = {}
        if config.window is not None:   # group 0 (the prefix cache's anchor): full attention
            groups["layer_groups"] = [LayerGroup(self._full_layers),
                                      LayerGroup(self._window_layers, window=config.window)]
        kv_config = KVCacheConfig(
            num_layers=config.layers, num_kv_heads=config.heads, head_dim=config.head_dim,
            page_size=ps, num_pages=config.pages, dtype=config.dtype, layout=config.layout,
            max_seqs=config.max_running, max_pages_per_seq=need_pages,
            enable_prefix_cache=config.prefix_cache,
            num_host_pages=config.num_host_pages(), **groups)
        try:
            self.cache = KVCache(kv_config, device=config.device)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            host = (f" and a host tier of {_fmt_bytes(kv_config.host_bytes)}"
                    if kv_config.num_host_pages else "")
            raise ConfigurationError(
                f"could not allocate the KV pool ({_fmt_bytes(kv_config.total_bytes)} for "
                f"{config.pages:,} pages) on {config.device}{host}: out of memory; lower "
                f"--pages, --layers, --heads or --head-dim"
                + (" or --host-pages" if host else "")) from exc
        # Content is generated as words of the model dtype (what write takes); an fp8
        # pool stores their codes (kvcore.fp8.quantize at scale 1.0), read back raw.
        self._itemsize = DTYPES[kv_config.model_dtype]
        self._words = np.uint16 if self._itemsize == 2 else np.uint32
        self._storage = kv_config.model_storage_dtype   # words viewed as the model dtype
        self._quantized = kv_config.quantized
        self._model_dtype = kv_config.model_dtype
        self._pool_words = np.uint8 if kv_config.quantized else self._words
        reported = asdict(config)
        for name, default in _OPTIONAL_FIELDS.items():
            if name != "window_layers" and reported[name] == default:
                del reported[name]
        if "window" not in reported:
            del reported["window_layers"]
        self._swap = config.preempt == "swap"
        if self._swap:
            reported["host_pages"] = kv_config.num_host_pages
        # a host tier: transfers to poll and wait for (swaps, and kvcore's prefix offloads
        # and loads); prefix offload: kvcore offloads evicted prefix pages there
        self._host = kv_config.num_host_pages > 0
        self._offload = config.prefix_offload()
        token_bytes = kv_config.page_bytes // ps
        self.result = SimResult(config=reported, device=self.cache.device,
                                pool_pages=config.pages,
                                tokens_per_gib=2**30 // token_bytes,
                                tokens_per_gib_bf16=2**30 // (
                                    token_bytes * 2 // kv_config.itemsize))
        self._hybrid = config.window is not None
        self._extras = self._hybrid or config.speculative > 0
        if self._extras:
            self._init_extras(kv_config)
        # --preempt swap: requests whose sequences wait on the host (oldest first when
        # swapping in), swap-ins in flight (transfer id -> (requests, start time, seconds
        # in the swap_in call)) with their sequence count, and requests whose swap-in
        # finished, checked and put back in the running set at the next step's start
        self._swapped: list = []
        self._in_flight: dict = {}
        self._arriving_seqs = 0
        self._ready: list = []
        if self._host:
            self._offload_stats = {
                "host_pages": kv_config.num_host_pages, "host_bytes": kv_config.host_bytes,
                "offloads": 0, "offload_pages": 0, "offload_bytes": 0, "loads": 0,
                "load_pages": 0, "load_bytes": 0, "failed_transfers": 0,
                "admission_waits": 0, "admission_wait_seconds": 0.0,
                "admitted_host_hit_tokens": 0, "loads_rolled_back": 0,
                "load_pages_rolled_back": 0}
        if self._swap:
            self._init_swap(kv_config)

    # -- workload ------------------------------------------------------------------------

    def _lognormal(self, median: int, sigma: float, size: int, cap: int) -> np.ndarray:
        values = self.rng.lognormal(np.log(median), sigma, size=size)
        return np.clip(np.round(values), 1, cap).astype(np.int64)

    def _make_requests(self) -> list[_Request]:
        cfg = self.cfg
        n = cfg.requests
        arrivals = np.cumsum(self.rng.exponential(1.0 / cfg.arrival_rate, size=n))
        if n and not arrivals[-1] < 2**53:   # also catches inf
            raise ConfigurationError(
                f"--arrival-rate {cfg.arrival_rate:g} requests per step is too low: the last "
                f"of {n:,} requests would arrive after about {arrivals[-1]:.3g} steps "
                f"(more than 2**53)")
        arrivals = arrivals.astype(int)
        prompts = self._lognormal(cfg.prompt_median, 0.9, n, cfg.max_prompt_len)
        system = np.where(self.rng.random(n) < cfg.system_prompt_share,
                          self.rng.integers(0, max(cfg.system_prompts, 1), size=n), -1)
        samples = np.where(self.rng.random(n) < cfg.multi_sample_share,
                           self.rng.integers(2, 5, size=n), 1)
        requests = []
        for i in range(n):
            sys_len = cfg.system_prompt_len if system[i] >= 0 else 0
            outputs = self._lognormal(cfg.output_median, 0.8, int(samples[i]),
                                      cfg.max_output_len).tolist()
            requests.append(_Request(i, int(arrivals[i]), int(prompts[i]) + sys_len, outputs,
                                     int(system[i])))
        return requests

    def _check_workload(self) -> None:
        """Every request must be admissible into an empty pool and finish there alone:
        otherwise the run would loop forever (admitting it, or preempting it, again)."""
        cfg, ps = self.cfg, self.cfg.page_size
        groups = cfg.num_groups()
        for request in self.requests:
            prompt, samples = request.prompt_len, len(request.output_lens)
            prompt_pages = -(-prompt // ps)
            admit = groups * prompt_pages + self._watermark + self._step_pages * samples
            if admit > cfg.pages:
                per_sample = ("one per sample" if self._step_pages == 1 else
                              f"{self._step_pages} per sample (a decode step's pages)")
                raise ConfigurationError(
                    f"request {request.request_id} ({prompt:,}-token prompt, {samples} "
                    f"sample(s)) could never be admitted: its prompt takes "
                    f"{groups * prompt_pages:,} pages of {ps} tokens and admission keeps "
                    f"{self._watermark:,} pages free plus {per_sample} ({admit:,} in all), "
                    f"but the pool has {cfg.pages:,}; raise --pages or lower "
                    f"--max-prompt-len")
            # pages once ``t`` tokens are generated: the prompt's full pages are shared,
            # each live sample has its own copy of the partial one plus its output
            if cfg.speculative:   # samples advance at their own pace: all may be at their end
                peak = prompt // ps + sum(-(-(prompt % ps + o) // ps)
                                          for o in request.output_lens)
            else:
                peak = max(prompt // ps + sum(1 for o in request.output_lens if o >= t)
                           * (-(-(prompt % ps + t) // ps)) for t in set(request.output_lens))
            peak = _peak_pages(cfg, prompt, peak, samples)
            if peak > cfg.pages:
                raise ConfigurationError(
                    f"request {request.request_id} ({prompt:,}-token prompt, {samples} "
                    f"sample(s) of up to {max(request.output_lens):,} output tokens) needs "
                    f"{peak:,} pages of {ps} tokens at its peak even when running alone, "
                    f"but the pool has {cfg.pages:,}, so it could never finish; raise "
                    f"--pages, or lower --max-output-len / --max-prompt-len / "
                    f"--multi-sample-share")

    def _keys(self, request: _Request, sample: int, positions: np.ndarray):
        """Content keys of ``positions`` of one sample.

        The prompt is shared by every sample (sample key 0), and a system prompt by every
        request that starts with it (request key ``-1 - system_prompt``). The fourth
        array is the request's marker token: its first token after the system prompt,
        whose id is unique to the request (see :meth:`_token_ids`).
        """
        positions = np.asarray(positions, dtype=np.int64)
        sys_len = self.cfg.system_prompt_len if request.system_prompt >= 0 else 0
        request_key = np.where(positions < sys_len, -1 - request.system_prompt,
                               request.request_id)
        sample_key = np.where(positions < request.prompt_len, 0, sample)
        marker = np.where(positions == sys_len, request.request_id, -1)
        return request_key, sample_key, positions, marker

    @staticmethod
    def _join(per_entry):
        """Concatenate the key arrays of several (request, sample, positions) entries."""
        return tuple(np.concatenate([k[i] for k in per_entry]) for i in range(4))

    def _token_ids(self, keys) -> np.ndarray:
        """Token ids for content keys. System-prompt tokens depend on the system prompt
        only, and the marker token makes every page that holds a request's own tokens
        unique to that request (its samples, or its recompute after a preemption)."""
        request_key, sample_key, positions, marker = keys
        with np.errstate(over="ignore"):
            mixed = _mix64(request_key.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                           + sample_key.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
                           + positions.astype(np.uint64))
        ids = (mixed % np.uint64(30000)).astype(np.int32) + 1
        return np.where(marker >= 0, 1_000_000 + marker, ids).astype(np.int32)

    def _content(self, keys, layer: int, which: int) -> np.ndarray:
        """Words ``[T, heads, head_dim]`` of the tokens named by ``keys``."""
        request_key, sample_key, positions, _ = keys
        return token_words(request_key.view(np.uint64), sample_key, positions, layer, which,
                           self.cfg.heads, self.cfg.head_dim, self._itemsize)

    def _stored(self, keys, layer: int, which: int) -> np.ndarray:
        """What the pool holds for those tokens: the words, or an fp8 pool's codes."""
        words = self._content(keys, layer, which)
        if self._quantized:
            return fp8.quantize(words.view(self._storage), 1.0, self._model_dtype)
        return words

    # -- one step --------------------------------------------------------------------------

    def _write(self, entries, slot_mapping, keys=None) -> None:
        """Write every layer's K and V for tokens listed as (request, sample, positions)
        (``keys``: their content keys, when the caller has them already)."""
        on_device = self.cache.device != "cpu"
        if keys is None:
            keys = self._join([self._keys(*entry) for entry in entries])
        for layer in range(self.cfg.layers):
            k = self._content(keys, layer, 0).view(self._storage)
            v = self._content(keys, layer, 1).view(self._storage)
            if on_device:   # stands in for the model producing K/V on the device
                k, v = self.cache.from_host(k), self.cache.from_host(v)
            t0 = time.perf_counter_ns()
            self.cache.write(layer, k, v, slot_mapping)
            self._device_ns += time.perf_counter_ns() - t0
        # with layer groups the mapping is [num_groups, T]: one row per group
        self.result.tokens_written += int(slot_mapping.shape[-1])

    def _admit(self, waiting: deque, running: list, step: int, budget: int) -> int:
        """Admit waiting requests in arrival order while they fit; returns tokens used.

        With prefix caching, the lookup comes first and only the uncached rest of the
        prompt counts against the token budget and the free pages.
        """
        cache = self.cache
        used = 0
        pending_forks = 0   # samples of admitted requests that are forked after the prefill
        pending_pages = 0   # pages the admitted prompts will take
        admitted = []       # (request, tokens already cached)
        while waiting and waiting[0].arrival_step <= step:
            request = waiting[0]
            num_samples = len(request.output_lens)
            # a watermark of free pages (1% of the pool, as vLLM keeps) plus a page for
            # each new sample's first decode step (a page per group, and more for
            # drafts), and for those of swap-ins in flight, which decode once they
            # arrive; running sequences that outgrow the rest are preempted by the
            # decode step
            reserve = self._watermark + self._step_pages * (pending_forks + len(admitted)
                                                            + num_samples
                                                            + self._arriving_seqs)
            if cache.num_seqs + pending_forks + num_samples > self.cfg.max_running:
                break
            tokens = self._token_ids(self._keys(request, 0, np.arange(request.prompt_len)))
            t0 = time.perf_counter_ns()
            seq = cache.add_sequence(tokens if self.cfg.prefix_cache else None)
            loaded = 0   # prompt tokens of the hit loaded back from the host tier
            if self._host and cache.seq_state(seq) != "resident":
                loaded = self._wait_for_load(seq)
            cached = cache.num_tokens(seq)
            pages = cache.pages_needed([seq], [request.prompt_len - cached])
            self._host_ns += time.perf_counter_ns() - t0
            if (used + request.prompt_len - cached > budget
                    or pending_pages + pages + reserve > cache.num_free_pages):
                cache.remove(seq)
                if loaded:   # the loaded blocks stay cached on the device
                    self._offload_stats["loads_rolled_back"] += 1
                    self._offload_stats["load_pages_rolled_back"] += loaded // self.cfg.page_size
                break
            if loaded:
                self._offload_stats["admitted_host_hit_tokens"] += loaded
            waiting.popleft()
            request.seq_ids = [seq]
            request.generated = [0] * num_samples
            request.admitted_step = step
            admitted.append((request, cached, tokens))
            pending_forks += num_samples - 1
            pending_pages += pages
            used += request.prompt_len - cached
        if not admitted:
            return 0
        seqs = [r.seq_ids[0] for r, _, _ in admitted]
        t0 = time.perf_counter_ns()
        chunks = [r.prompt_len - c for r, c, _ in admitted]
        self.result.admitted_hit_tokens += sum(c for _, c, _ in admitted)
        self.result.prefill_tokens += sum(chunks)
        step_result = cache.append(seqs, chunks,
                                   np.concatenate([t[c:] for _, c, t in admitted]))
        self._host_ns += time.perf_counter_ns() - t0
        if self._hybrid:
            self._check_window_bound(seqs, chunks, decode=False)
        self._write([(r, 0, np.arange(c, r.prompt_len)) for r, c, _ in admitted],
                    step_result.slot_mapping)
        t0 = time.perf_counter_ns()
        for request, _, _ in admitted:
            for _ in range(len(request.output_lens) - 1):
                request.seq_ids.append(cache.fork(request.seq_ids[0]))
            running.append(request)
        self._host_ns += time.perf_counter_ns() - t0
        return used

    def _preempt_newest(self, running: list, waiting: deque) -> None:
        victim = max(running, key=lambda r: (r.admitted_step, r.request_id))
        # it cannot go on even alone: it would be recomputed forever (with --preempt
        # swap, swap-ins in flight or just finished may hold the pages it needs instead)
        if len(running) == 1 and not (self._in_flight or self._ready):
            raise ConfigurationError(
                f"request {victim.request_id} does not fit the pool of {self.cfg.pages:,} "
                f"pages even when running alone; raise --pages")
        running.remove(victim)
        victim.preemptions += 1
        self.result.preemptions += 1
        if self._swap:
            if self._swap_out(victim):
                return
            self._swap_stats["recompute_fallbacks"] += 1
        for seq in victim.seq_ids:
            if seq >= 0:
                self.cache.remove(seq)
        self.result.recompute_tokens += victim.prompt_len + sum(victim.generated)
        victim.seq_ids = []
        waiting.appendleft(victim)

    def _decode(self, running: list, waiting: deque) -> None:
        """One decode step for every running sequence: its next token, plus up to
        ``speculative`` drafts of which a random prefix is kept (the rest truncated)."""
        cache = self.cache
        spec = self.cfg.speculative
        while True:
            live = [(r, sample, seq) for r in running for sample, seq in enumerate(r.seq_ids)
                    if seq >= 0]
            if not live:
                return
            seqs = [seq for _, _, seq in live]
            # drafts stop at the sample's last token: a step never outgrows the request
            counts = ([1 + min(spec, r.output_lens[i] - r.generated[i] - 1) for r, i, _ in live]
                      if spec else 1)
            t0 = time.perf_counter_ns()
            needed = cache.pages_needed(seqs, counts)
            self._host_ns += time.perf_counter_ns() - t0
            if needed <= cache.num_free_pages:
                break
            self._preempt_newest(running, waiting)
        entries = []
        for i, (request, sample, _) in enumerate(live):
            position = request.prompt_len + request.generated[sample]
            if spec:
                entries.append((request, sample, np.arange(position, position + counts[i])))
            else:
                entries.append((request, sample, np.array([position])))
        keys = self._join([self._keys(*entry) for entry in entries])
        if spec:
            drafts = np.asarray(counts, dtype=np.int64) - 1
            accepted = self._spec_rng.integers(0, drafts + 1)   # drafts kept, per sequence
            offset = np.arange(keys[0].size) - np.repeat(np.cumsum(counts) - counts, counts)
            rejected = offset > np.repeat(accepted, counts)
            # a rejected draft gets content of its own, which no read-back expects
            keys = (keys[0], np.where(rejected, _REJECTED + keys[1], keys[1]), keys[2],
                    keys[3])
        token_ids = self._token_ids(keys)
        if spec and self.cfg.prefix_cache:   # each sequence's latest rejected drafts
            starts = np.cumsum(counts) - counts
            for i in np.flatnonzero(accepted < drafts).tolist():
                request, sample, _ = live[i]
                first = starts[i] + 1 + accepted[i]
                self._rejected[request.request_id, sample] = (
                    int(keys[2][first]), token_ids[first:starts[i] + counts[i]].copy())
        t0 = time.perf_counter_ns()
        step_result = cache.append(seqs, counts, token_ids)
        if self._hybrid:   # what the attention kernels would be given, for each group
            for group in range(self.cfg.num_groups()):
                cache.flashinfer_metadata(seqs, group=group)
        else:
            cache.flashinfer_metadata(seqs)
        self._host_ns += time.perf_counter_ns() - t0
        self.result.cow_copies += int(step_result.copy_src.size)
        if self._hybrid:
            self._check_window_bound(seqs, counts if spec else [1] * len(seqs), decode=True)
        self._write(entries, step_result.slot_mapping, keys)
        if not spec:
            for request, sample, _ in entries:
                request.generated[sample] += 1
            return
        lengths = np.array([r.prompt_len + r.generated[i] for r, i, _ in live], dtype=np.int64)
        t0 = time.perf_counter_ns()
        cache.truncate(seqs, lengths + 1 + accepted)   # the target model's verdict
        self._host_ns += time.perf_counter_ns() - t0
        for (request, sample, _), kept in zip(live, accepted.tolist(), strict=True):
            request.generated[sample] += 1 + kept
        stats = self._spec
        stats["decode_steps"] += 1
        stats["sequence_steps"] += len(seqs)
        stats["drafts"] += int(drafts.sum())
        stats["drafts_accepted"] += int(accepted.sum())

    def _retire(self, running: list) -> None:
        cache = self.cache
        for request in list(running):
            for sample, seq in enumerate(request.seq_ids):
                if seq >= 0 and request.generated[sample] >= request.output_lens[sample]:
                    self._verify(request, sample)
                    t0 = time.perf_counter_ns()
                    cache.remove(seq)
                    self._host_ns += time.perf_counter_ns() - t0
                    request.seq_ids[sample] = -1
                    self.result.samples_done += 1
            if all(s < 0 for s in request.seq_ids):
                running.remove(request)
                self.result.requests_done += 1

    # -- verification ----------------------------------------------------------------------

    def _verify(self, request: _Request, sample: int, spot: bool = False,
                swapped_in: bool = False) -> None:
        """Read one sample's sequence back whole (every layer: full layers by
        ``gather``, window layers from the pool where the group still holds pages) and
        count every token that differs from what was written. ``spot``: a spot check of
        a live one; ``swapped_in``: the check after a swap-in."""
        seq = request.seq_ids[sample]
        length = self.cache.num_tokens(seq)
        expected_len = request.prompt_len + request.generated[sample]
        if length != expected_len:
            self.result.mismatches += max(length, expected_len)
            return
        keys = self._keys(request, sample, np.arange(length))
        for layer in self._full_layers:   # every layer without --window
            k, v, _ = self.cache.gather(layer, [seq], raw=True)   # fp8: the codes
            k, v = self.cache.to_host(k), self.cache.to_host(v)
            for which, got in ((0, k), (1, v)):
                want = self._stored(keys, layer, which)
                bad = ~(got.view(self._pool_words) == want).reshape(length, -1).all(axis=1)
                self.result.mismatches += int(bad.sum())
        if self._window_layers:
            self._verify_window(seq, length, keys)
        if self.cfg.speculative and self.cfg.prefix_cache:
            self._probe_rejected(request, sample)
        self.result.sequences_verified += 1
        self.result.tokens_verified += length
        if spot:
            self.result.spot_checks += 1
            self.result.spot_check_tokens += length
        if swapped_in:
            self._swap_stats["checks"] += 1
            self._swap_stats["check_tokens"] += length

    def _spot_check(self, running: list) -> None:
        live = [(r, s) for r in running for s, seq in enumerate(r.seq_ids) if seq >= 0]
        if not live:
            return
        picks = self.rng.choice(len(live), size=min(4, len(live)), replace=False)
        for i in picks:
            self._verify(*live[i], spot=True)

    def _verify_window(self, seq: int, length: int, keys) -> None:
        """Compare the window layers' tokens that the window group still holds (from
        its first live page on) with what was written; the tokens the next one attends
        to must be among them. Read from the pool directly, page by page."""
        cache, cfg, ps = self.cache, self.cfg, self.cfg.page_size
        first = cache.first_page(seq, group=_WINDOW_GROUP)
        pages = cache.pages(seq, group=_WINDOW_GROUP)
        columns = -(-length // ps)
        needed = max(0, length - cfg.window + 1)   # first token the next one attends to
        problem = None
        if len(pages) != columns - first or (len(pages) and (pages < 0).any()):
            problem = (f"pages(seq {seq}, window group) holds {pages.tolist()} for "
                       f"{length} tokens from first_page {first}")
        elif first * ps > needed:
            problem = (f"seq {seq} ({length} tokens): the window group released token "
                       f"{needed} (first_page {first}), which the next token attends to")
        if problem is not None:
            self._table_problem(problem)
            self.result.mismatches += length - needed   # the window cannot be read back
            return
        start = first * ps
        count = length - start
        sub = tuple(key[start:] for key in keys)
        index = pages.astype(np.int64)
        if cache.device != "cpu":
            index = cache.from_host(index)
        shape = (cfg.heads, cfg.head_dim)
        for layer in self._window_layers:
            for which, pool in ((0, cache.k_cache(layer)), (1, cache.v_cache(layer))):
                got = cache.to_host(pool[index])   # [pages, S, H, D] (NHD) / [pages, H, S, D]
                if cfg.layout == "HND":
                    got = got.transpose(0, 2, 1, 3)
                got = np.ascontiguousarray(got).reshape(-1, *shape)[:count]
                want = self._stored(sub, layer, which)
                bad = ~(got.view(self._pool_words) == want).reshape(count, -1).all(axis=1)
                self.result.mismatches += int(bad.sum())
        self._win["tokens_verified"] += count

    def _probe_rejected(self, request: _Request, sample: int) -> None:
        """A prefix lookup of the sample's tokens with its latest rejected drafts in place
        of the accepted ones must stop before the first rejected position: truncate
        takes every page that held a dropped token out of the prefix index."""
        rejected = self._rejected.get((request.request_id, sample))
        if rejected is None:
            return
        position, drafts = rejected
        accepted = self._token_ids(self._keys(request, sample, np.arange(position)))
        # one token more, so that a page ending with the drafts may be matched too
        probe = np.concatenate([accepted, drafts, np.ones(1, dtype=np.int32)])
        hit = self.cache.match_prefix(probe)
        limit = position // self.cfg.page_size * self.cfg.page_size
        stats = self._spec
        stats["rejected_lookups"] += 1
        if hit > limit:
            stats["rejected_hits"] += 1
            self.result.mismatches += hit - limit   # tokens a lookup would serve wrong
            if len(stats["problems"]) < 10:
                stats["problems"].append(
                    f"request {request.request_id} sample {sample}: a lookup with drafts "
                    f"rejected from position {position} on matched {hit} tokens")

    def _check_invariants(self) -> None:
        try:
            self.cache.check_invariants()
        except KVCoreError:
            self.result.invariant_failures += 1
        if self._hybrid:
            self._check_groups()

    # -- --window and --speculative ------------------------------------------------------------

    def _init_extras(self, kv_config: KVCacheConfig) -> None:
        cfg = self.cfg
        # acceptance draws have a generator of their own: the workload and the spot
        # checks stay those of the same seed without --speculative
        self._spec_rng = np.random.default_rng([cfg.seed, 1])
        self._spec = {"decode_steps": 0, "sequence_steps": 0, "drafts": 0,
                      "drafts_accepted": 0, "rejected_lookups": 0, "rejected_hits": 0,
                      "problems": []}
        # (request, sample) -> (first rejected position, the rejected drafts' token ids)
        self._rejected: dict = {}
        # K and V of one token of one layer, in bytes
        self._token_bytes = 2 * cfg.heads * cfg.head_dim * kv_config.itemsize
        self._util = {"steps": 0, "used": 0, "allocated": 0, "used_tokens": 0,
                      "allocated_tokens": 0, "contiguous_used": 0,
                      "contiguous_reserved": 0, "allocated_peak": 0,
                      "contiguous_reserved_peak": 0}
        self._win = {"max_pages": 0, "max_pages_chunk": 0, "max_chunk": 0,
                     "max_pages_decode": 0, "violations": 0, "tokens_verified": 0,
                     "window_pages_peak": 0, "full_pages_peak": 0,
                     "window_pages_sum": 0, "full_pages_sum": 0,
                     "hybrid_slots_peak": 0, "all_full_slots_peak": 0,
                     "all_full_slots_sum": 0,
                     "table_checks": 0, "problems": []}

    def _table_problem(self, message: str) -> None:
        """A window-group table that breaks docs/groups.md: an invariant failure."""
        self.result.invariant_failures += 1
        problems = self._win["problems"]
        if len(problems) < 10:
            problems.append(message)

    def _check_window_bound(self, seqs, chunks, decode: bool) -> None:
        """After an append of ``chunks[i]`` tokens to ``seqs[i]``: the window group holds
        at most ``window_page_bound(W, chunks[i])`` pages of each."""
        cfg, win = self.cfg, self._win
        table = self.cache.block_tables(seqs, group=_WINDOW_GROUP)
        held = (table >= 0).sum(axis=1)
        chunks = np.asarray(chunks, dtype=np.int64)
        bound = -(-(cfg.window - 1 + chunks) // cfg.page_size) + 1
        over = np.flatnonzero(held > bound)
        win["violations"] += int(over.size)
        for i in over[:3]:
            self._table_problem(f"seq {seqs[i]} holds {held[i]} window pages after "
                                f"appending {chunks[i]} tokens; the bound is {bound[i]}")
        if held.size:
            worst = int(np.argmax(held))
            if held[worst] > win["max_pages"]:
                win["max_pages"], win["max_pages_chunk"] = int(held[worst]), int(chunks[worst])
            win["max_chunk"] = max(win["max_chunk"], int(chunks.max()))
            if decode:
                win["max_pages_decode"] = max(win["max_pages_decode"], int(held.max()))

    def _check_groups(self) -> None:
        """Each group's block table, pages, first_page and FlashInfer metadata against
        docs/groups.md: columns are absolute, a full group maps every column, a window
        group its columns from first_page on (at least those the next token attends
        to), and no page belongs to two groups."""
        cache, cfg, ps = self.cache, self.cfg, self.cfg.page_size
        seqs = cache.table.active_seq_ids()
        if self._host:   # swapped-out sequences have no device pages to check
            seqs = np.array([s for s in seqs.tolist() if cache.seq_state(s) == "resident"],
                            dtype=np.int32)
        self._win["table_checks"] += 1
        if not len(seqs):
            return
        owned = []
        problems = []
        for group in range(cfg.num_groups()):
            table = cache.block_tables(seqs, group=group)
            indptr, indices, last = cache.flashinfer_metadata(seqs, group=group)
            for b, seq in enumerate(seqs.tolist()):
                length = cache.num_tokens(seq)
                columns = -(-length // ps)
                first = cache.first_page(seq, group=group)
                row = table[b]
                live = row[first:columns]
                where = f"seq {seq} ({length} tokens), group {group}, first_page {first}"
                if group == _WINDOW_GROUP:
                    if first * ps > max(0, length - cfg.window + 1):
                        problems.append(f"{where}: released a page the window needs")
                elif first != 0:
                    problems.append(f"{where}: a full-attention group released pages")
                if (row[:first] >= 0).any() or (row[columns:] >= 0).any() or (live < 0).any():
                    problems.append(f"{where}: block table row {row.tolist()}")
                elif not np.array_equal(indices[indptr[b]:indptr[b + 1]], live):
                    problems.append(f"{where}: flashinfer pages "
                                    f"{indices[indptr[b]:indptr[b + 1]].tolist()}, block "
                                    f"table {live.tolist()}")
                elif not np.array_equal(cache.pages(seq, group=group), live):
                    problems.append(f"{where}: pages() {cache.pages(seq, group=group)}, "
                                    f"block table {live.tolist()}")
                elif len(live) and last[b] != length - (columns - 1) * ps:
                    problems.append(f"{where}: last_page_len {last[b]}")
                owned.append(np.unique(live))
        if self._hybrid and len(owned) == 2 * len(seqs):
            full = np.unique(np.concatenate(owned[:len(seqs)]))
            window = np.unique(np.concatenate(owned[len(seqs):]))
            shared = np.intersect1d(full, window)
            if shared.size:
                problems.append(f"pages {shared[:8].tolist()} are in both groups")
        if problems:
            self._table_problem("; ".join(problems[:3]))

    def _account(self, running: list, used_pages: int) -> dict:
        """Memory figures at the end of a step: distinct pages of each group, token
        slots holding live tokens (a shared page counts once) against the slots of the
        pages in use, and the contiguous baseline's."""
        cfg, ps = self.cfg, self.cfg.page_size
        live = [(r, i, seq) for r in running for i, seq in enumerate(r.seq_ids) if seq >= 0]
        group_layers = [len(self._full_layers)] + ([len(self._window_layers)]
                                                   if self._hybrid else [])
        used = used_tokens = 0
        group_pages = [0] * len(group_layers)
        contiguous_used = contiguous_reserved = 0
        if live:
            seqs = np.array([seq for _, _, seq in live], dtype=np.int64)
            lengths = np.array([r.prompt_len + r.generated[i] for r, i, _ in live],
                               dtype=np.int64)
            contiguous_used = cfg.layers * int(lengths.sum())
            contiguous_reserved = cfg.layers * sum(r.prompt_len + cfg.max_output_len
                                                   for r, _, _ in live)
            for group, layers in enumerate(group_layers):
                table = (self.cache.block_tables(seqs, group=group) if self._hybrid
                         else self.cache.block_tables(seqs))
                fill = np.clip(lengths[:, None] - ps * np.arange(table.shape[1])[None, :],
                               0, ps)
                mapped = table >= 0
                pages, inverse = np.unique(table[mapped], return_inverse=True)
                filled = np.zeros(pages.size, dtype=np.int64)
                np.maximum.at(filled, inverse, fill[mapped])
                used += layers * int(filled.sum())
                used_tokens += int(filled.sum())
                group_pages[group] = int(pages.size)
        allocated = used_pages * ps * cfg.num_slots()
        util = self._util
        util["steps"] += 1
        util["used"] += used
        util["used_tokens"] += used_tokens
        util["allocated_tokens"] += used_pages * ps
        util["allocated"] += allocated
        util["contiguous_used"] += contiguous_used
        util["contiguous_reserved"] += contiguous_reserved
        util["allocated_peak"] = max(util["allocated_peak"], allocated)
        util["contiguous_reserved_peak"] = max(util["contiguous_reserved_peak"],
                                               contiguous_reserved)
        entry = {"utilization": used / allocated if allocated else 0.0,
                 "contiguous_utilization": (contiguous_used / contiguous_reserved
                                            if contiguous_reserved else 0.0)}
        if self._hybrid:
            win = self._win
            full_pages, window_pages = group_pages
            win["window_pages_peak"] = max(win["window_pages_peak"], window_pages)
            win["full_pages_peak"] = max(win["full_pages_peak"], full_pages)
            win["window_pages_sum"] += window_pages
            win["full_pages_sum"] += full_pages
            win["hybrid_slots_peak"] = max(win["hybrid_slots_peak"], allocated)
            all_full = full_pages * ps * cfg.layers   # every layer full attention
            win["all_full_slots_peak"] = max(win["all_full_slots_peak"], all_full)
            win["all_full_slots_sum"] += all_full
            entry.update(window_pages=window_pages, full_pages=full_pages)
        return entry

    def _finish_extras(self, res: SimResult) -> None:
        """The --window / --speculative figures of the run (also in ``--json``)."""
        cfg, util = self.cfg, self._util
        steps = max(util["steps"], 1)
        token_bytes = self._token_bytes
        res.utilization = {
            # time averages over the steps run: the sum over steps of the token slots
            # holding live tokens over the sum of those allocated, each slot weighted by
            # the layers it holds (a smaller group's pages leave slots unused)
            "paged": util["used"] / util["allocated"] if util["allocated"] else 0.0,
            # the same counting token slots only, whatever the layers
            "paged_token_slots": (util["used_tokens"] / util["allocated_tokens"]
                                  if util["allocated_tokens"] else 0.0),
            "contiguous": (util["contiguous_used"] / util["contiguous_reserved"]
                           if util["contiguous_reserved"] else 0.0),
            "paged_bytes_mean": util["allocated"] * token_bytes / steps,
            "paged_bytes_peak": util["allocated_peak"] * token_bytes,
            "contiguous_bytes_mean": util["contiguous_reserved"] * token_bytes / steps,
            "contiguous_bytes_peak": util["contiguous_reserved_peak"] * token_bytes,
            "live_bytes_mean": util["used"] * token_bytes / steps,
        }
        if cfg.speculative:
            spec = dict(self._spec)
            spec["k"] = cfg.speculative
            spec["drafts_rejected"] = spec["drafts"] - spec["drafts_accepted"]
            spec["tokens_accepted"] = spec["sequence_steps"] + spec["drafts_accepted"]
            spec["accepted_per_step"] = (spec["tokens_accepted"] / spec["sequence_steps"]
                                         if spec["sequence_steps"] else 0.0)
            spec["acceptance_rate"] = (spec["drafts_accepted"] / spec["drafts"]
                                       if spec["drafts"] else 0.0)
            res.speculative = spec
        if self._hybrid:
            win = self._win
            hybrid_peak = win["hybrid_slots_peak"] * token_bytes
            all_full_peak = win["all_full_slots_peak"] * token_bytes
            res.hybrid = {
                "window": cfg.window,
                "full_layers": list(self._full_layers),
                "window_layers": list(self._window_layers),
                "num_slots": cfg.num_slots(),
                "window_pages_peak": win["window_pages_peak"],
                "full_pages_peak": win["full_pages_peak"],
                "window_pages_mean": win["window_pages_sum"] / steps,
                "full_pages_mean": win["full_pages_sum"] / steps,
                "window_pages_saved_peak": 1 - (win["window_pages_peak"]
                                                / max(win["full_pages_peak"], 1)),
                "kv_bytes_peak": hybrid_peak,
                "all_full_kv_bytes_peak": all_full_peak,
                "memory_saved": 1 - hybrid_peak / all_full_peak if all_full_peak else 0.0,
                "kv_bytes_mean": util["allocated"] * token_bytes / steps,
                "all_full_kv_bytes_mean": win["all_full_slots_sum"] * token_bytes / steps,
                "memory_saved_mean": (1 - util["allocated"] / win["all_full_slots_sum"]
                                      if win["all_full_slots_sum"] else 0.0),
                "max_window_pages_per_seq": win["max_pages"],
                "max_chunk": win["max_chunk"],
                "window_page_bound": window_page_bound(cfg.window, win["max_chunk"],
                                                       cfg.page_size),
                "max_window_pages_per_seq_decode": win["max_pages_decode"],
                "window_page_bound_decode": window_page_bound(
                    cfg.window, 1 + cfg.speculative, cfg.page_size),
                "window_bound_violations": win["violations"],
                "window_tokens_verified": win["tokens_verified"],
                "group_table_checks": win["table_checks"],
                "problems": win["problems"],
            }

    # -- --preempt swap -------------------------------------------------------------------------

    def _init_swap(self, kv_config: KVCacheConfig) -> None:
        self._swap_stats = {
            "host_pages": kv_config.num_host_pages, "host_bytes": kv_config.host_bytes,
            "host_pages_peak": 0, "requests_swapped": set(), "swap_outs": 0,
            "swap_ins": 0, "requests_swapped_in": 0, "pages_out": 0, "bytes_out": 0,
            "pages_in": 0, "bytes_in": 0, "out_seconds": 0.0, "in_seconds": 0.0,
            "out_call_seconds": 0.0, "in_call_seconds": 0.0, "recompute_fallbacks": 0,
            "recompute_tokens_avoided": 0, "checks": 0, "check_tokens": 0,
            "mismatches": 0, "verify_seconds": 0.0, "failed_transfers": 0}

    def _swapping(self) -> bool:
        """Whether a request is out of the running set because of a swap."""
        return bool(self._swapped or self._in_flight or self._ready)

    def _swap_out(self, victim: _Request) -> bool:
        """Move a preempted request's live sequences to the host tier in one call and
        wait for the copy (the decode step needs the device pages it frees); False,
        with nothing changed, when the host tier has no room."""
        cache, stats = self.cache, self._swap_stats
        seqs = [seq for seq in victim.seq_ids if seq >= 0]
        if cache.host_tier is None:   # --host-pages 0
            return False
        t0 = time.perf_counter_ns()
        fits = cache.swap_out_pages(seqs) <= cache.num_free_host_pages
        self._host_ns += time.perf_counter_ns() - t0
        if not fits:
            return False
        start = time.perf_counter()
        transfer = cache.swap_out(seqs)
        called = time.perf_counter()
        finished = cache.wait(transfer)
        end = time.perf_counter()
        self._device_ns += int((end - start) * 1e9)
        # wait() also finishes any other transfer that is complete: swap-ins
        self._on_transfers([t for t in finished if t is not transfer], end)
        if not transfer.done:   # the sequences are resident again: recompute the victim
            stats["failed_transfers"] += 1
            self.result.invariant_failures += 1
            return False
        stats["swap_outs"] += 1
        stats["requests_swapped"].add(victim.request_id)
        stats["pages_out"] += transfer.num_pages
        stats["bytes_out"] += transfer.nbytes
        stats["out_seconds"] += end - start
        stats["out_call_seconds"] += called - start
        stats["recompute_tokens_avoided"] += victim.prompt_len + sum(victim.generated)
        stats["host_pages_peak"] = max(stats["host_pages_peak"],
                                       stats["host_pages"] - cache.num_free_host_pages)
        self._swapped.append(victim)
        return True

    def _start_swap_in(self, running: list) -> None:
        """Swap in the oldest swapped-out requests (admission order, stopping at the
        first that does not fit) whose pages fit the free device pages with admission's
        headroom (the watermark plus a decode step's pages per sequence), in one call.
        With nothing else holding device pages, the oldest comes in if its pages fit."""
        if not self._swapped:
            return
        cache = self.cache
        self._swapped.sort(key=lambda r: (r.admitted_step, r.request_id))
        alone = not (running or self._in_flight or self._ready)
        free = cache.num_free_pages
        chosen, seqs, pages = [], [], 0
        t0 = time.perf_counter_ns()
        for request in self._swapped:
            live = [seq for seq in request.seq_ids if seq >= 0]
            need = cache.swap_in_pages(live)
            reserve = self._watermark + self._step_pages * (len(seqs) + len(live))
            if not (pages + need + reserve <= free or (alone and not chosen and need <= free)):
                break
            chosen.append(request)
            seqs += live
            pages += need
        self._host_ns += time.perf_counter_ns() - t0
        if not chosen:
            if alone:   # it held these pages before: unreachable unless the pool shrank
                raise ConfigurationError(
                    f"request {self._swapped[0].request_id} cannot be swapped back in even "
                    f"into an empty pool; raise --pages")
            return
        start = time.perf_counter()
        transfer = cache.swap_in(seqs)
        called = time.perf_counter()
        self._device_ns += int((called - start) * 1e9)
        self._in_flight[transfer.id] = (chosen, start, called - start)
        self._arriving_seqs += len(seqs)
        del self._swapped[:len(chosen)]
        self._swap_stats["swap_ins"] += 1
        self._swap_stats["requests_swapped_in"] += len(chosen)

    def _on_transfers(self, finished, now: float) -> None:
        """Transfers that ``poll`` / ``wait`` finished at ``now``. kvcore's prefix
        offloads and loads are counted; a swap-in's requests are ready (checked, then
        run, at the next step's start), a failed one's go back to waiting on the host."""
        for transfer in finished:
            if transfer.id not in self._in_flight:   # kvcore's prefix offloads and loads
                kind = transfer.kind
                if kind in _PREFIX_KINDS:
                    offload = self._offload_stats
                    if not transfer.done:   # kvcore drops the entries: nothing is lost
                        offload["failed_transfers"] += 1
                        continue
                    offload[f"{kind}s"] += 1
                    offload[f"{kind}_pages"] += transfer.num_pages
                    offload[f"{kind}_bytes"] += transfer.nbytes
                continue
            stats = self._swap_stats
            requests, start, call_s = self._in_flight.pop(transfer.id)
            self._arriving_seqs -= len(transfer.seq_ids)
            if not transfer.done:
                stats["failed_transfers"] += 1
                self.result.invariant_failures += 1
                self._swapped.extend(requests)
                continue
            stats["pages_in"] += transfer.num_pages
            stats["bytes_in"] += transfer.nbytes
            stats["in_seconds"] += now - start
            stats["in_call_seconds"] += call_s
            self._ready.extend(requests)

    def _run_swapped_in(self, running: list) -> None:
        """Check every sequence of the requests whose swap-in finished byte for byte
        (every layer, every position: a page must come back with exactly what went
        out), then let them run again."""
        stats = self._swap_stats
        t0 = time.perf_counter()
        before = self.result.mismatches
        for request in self._ready:
            for sample, seq in enumerate(request.seq_ids):
                if seq >= 0:
                    self._verify(request, sample, swapped_in=True)
        stats["mismatches"] += self.result.mismatches - before
        stats["verify_seconds"] += time.perf_counter() - t0
        running.extend(self._ready)
        self._ready.clear()

    def _wait_for_load(self, seq: int) -> int:
        """A new sequence whose prefix hit kvcore is copying in from the host tier (a
        cache that offloads evicted prefix pages there): wait for that copy, as
        admission needs the sequence resident (host-timed with the admission). Returns
        the tokens loaded (0 if the copy failed: the hit then stops before its first
        host block)."""
        cache = self.cache
        start = time.perf_counter()
        load = next(t for t in cache.pending_transfers
                    if t.kind == "load" and seq in t.seq_ids.tolist())
        finished = cache.wait(load)
        now = time.perf_counter()
        self._on_transfers(finished, now)
        self._offload_stats["admission_waits"] += 1
        self._offload_stats["admission_wait_seconds"] += now - start
        return load.num_pages * self.cfg.page_size if load.done else 0

    def _host_step(self, running: list) -> None:
        """Start of a step with a host tier: finish completed transfers (once per step);
        with --preempt swap, let the swapped-in requests run again, then start the next
        swap-in."""
        t0 = time.perf_counter_ns()
        finished = self.cache.poll()
        self._host_ns += time.perf_counter_ns() - t0
        self._on_transfers(finished, time.perf_counter())
        if self._swap:
            self._run_swapped_in(running)
            self._start_swap_in(running)

    def _finish_swap(self, res: SimResult) -> None:
        """The --preempt swap figures of the run (also in ``--json``).

        ``out_seconds`` / ``in_seconds`` add up, per transfer, the time from the
        ``swap_out`` / ``swap_in`` call to the ``wait`` / ``poll`` that finished it, and
        ``*_gb_per_s`` divide the bytes by them (GB = 1e9 bytes). A swap-out is waited
        for at once, so that is its copy's latency (bookkeeping included); a swap-in is
        finished by the next step's ``poll``, so its time also holds the rest of its step
        (on the CPU, where the copy runs inside the call, mostly that).
        ``*_call_seconds`` / ``*_call_gb_per_s`` count the time inside the calls alone:
        on the CPU the NumPy copy itself, with CUDA the bookkeeping and the enqueue.
        ``requests_swapped_in`` counts requests, ``swap_ins`` calls (at most one per
        step). ``host_pages_peak`` is the host pages in
        use right after a swap-out, at most. ``checks`` / ``check_tokens`` /
        ``mismatches`` / ``verify_seconds``: the read-backs after swap-ins (included in
        the run's read-backs, mismatches and wall time). ``recompute_tokens_avoided``:
        the tokens (prompt plus generated) the swapped requests held, which recompute
        would have computed again; ``recompute_tokens``: those of the fallbacks.
        ``prefix_offloads`` / ``prefix_loads`` (with their pages and bytes): the copies
        kvcore made on its own, as the host tier also holds evicted prefix pages (with
        prefix caching and one layer group): cached pages offloaded there when a call
        reused their device pages (``append``, ``add_sequence``, and ``swap_in``, whose
        call time includes them), and host-tier prefix hits loaded back by
        ``add_sequence`` (admission waits for those). None of them is in the swap
        figures; they repeat figures of ``SimResult.prefix_offload`` (see
        :meth:`_finish_offload`), which has more.
        """
        stats = dict(self._swap_stats)
        offload = self._offload_stats if self._host else {}
        for kind in _PREFIX_KINDS:
            for suffix in ("s", "_pages", "_bytes"):
                stats[f"prefix_{kind}{suffix}"] = offload.get(f"{kind}{suffix}", 0)
        stats["requests_swapped"] = len(stats["requests_swapped"])
        for way in ("out", "in"):
            for kind in ("", "call_"):
                seconds = stats[f"{way}_{kind}seconds"]
                stats[f"{way}_{kind}gb_per_s"] = (stats[f"bytes_{way}"] / seconds / 1e9
                                                  if seconds else 0.0)
        stats["recompute_tokens"] = res.recompute_tokens
        stats["pending_at_end"] = len(self.cache.pending_transfers)
        res.swap = stats

    def _finish_offload(self, res: SimResult) -> None:
        """The prefix-offload figures of a run with a host tier and prefix caching (one
        layer group), in either --preempt mode (also in ``--json``).

        ``offloads`` / ``loads`` count kvcore's transfers that completed (one per call
        that caused them), with their pages and bytes: cached device pages offloaded to
        the host tier when a call reused them, and host-tier prefix hits loaded back by
        ``add_sequence``. ``admission_waits`` / ``admission_wait_seconds``: admissions
        whose hit was being loaded, and the time they waited for the load (host-timed
        with the admission). ``admitted_host_hit_tokens``: prompt tokens of admitted
        requests that came from the host tier (part of
        ``SimResult.admitted_hit_tokens``); ``loads_rolled_back`` /
        ``load_pages_rolled_back``: admissions that loaded a hit and were then rolled
        back (no room or budget this step), and the pages they loaded: those blocks stay
        cached on the device, where the retry usually finds them (a device hit then)
        unless they were evicted again first. ``kvcore_offloaded`` / ``kvcore_loaded`` /
        ``host_cached_pages``: ``prefix_stats["offloaded"]`` / ``["loaded"]`` /
        ``["host_cached_pages"]`` at the end of the run (kvcore's own counts of blocks,
        and the blocks left in the host tier). ``failed_transfers``: offloads and loads
        that failed (kvcore drops those entries; nothing is lost but the hit).
        ``pending_at_end``: transfers still in flight after the final wait (0).
        """
        offload = dict(self._offload_stats)
        stats = self.cache.prefix_stats
        offload["kvcore_offloaded"] = stats.get("offloaded", 0)
        offload["kvcore_loaded"] = stats.get("loaded", 0)
        offload["host_cached_pages"] = stats.get("host_cached_pages", 0)
        offload["pending_at_end"] = len(self.cache.pending_transfers)
        res.prefix_offload = offload

    # -- the run -----------------------------------------------------------------------------

    def run(self, progress=None) -> SimResult:
        """Run until every request has finished; returns the figures."""
        cfg, res = self.cfg, self.result
        waiting: deque = deque(sorted(self.requests, key=lambda r: r.arrival_step))
        running: list = []
        host_us, device_us = [], []
        timeline = {"step": [], "pages_used": [], "running": [], "waiting": [],
                    "hit_rate": []}
        if self._extras:
            timeline.update(utilization=[], contiguous_utilization=[])
        if self._hybrid:
            timeline.update(window_pages=[], full_pages=[])
        if self._swap:
            timeline.update(swapped=[])
        start = time.perf_counter()
        step = 0
        total = len(self.requests)
        while waiting or running or self._swapping():
            if not running and not self._swapping() and waiting[0].arrival_step > step:
                # nothing to run until the next arrival: skip there, nothing would change
                res.idle_steps += waiting[0].arrival_step - step
                step = waiting[0].arrival_step
            self._host_ns = self._device_ns = 0
            if self._host:
                self._host_step(running)
            budget = cfg.max_step_tokens - sum(
                len([s for s in r.seq_ids if s >= 0]) for r in running)
            if not self._swapped:   # requests waiting on the host come first
                self._admit(waiting, running, step, max(budget, 0))
            if (not running and not self._swapping() and waiting
                    and waiting[0].arrival_step <= step):
                raise ConfigurationError(   # the checks up front should make this unreachable
                    f"request {waiting[0].request_id} cannot be admitted even into an empty "
                    f"pool; raise --pages, --max-running or --max-step-tokens")
            self._decode(running, waiting)
            t0 = time.perf_counter_ns()
            self.cache.synchronize()
            self._device_ns += time.perf_counter_ns() - t0
            host_us.append(self._host_ns / 1e3)
            device_us.append(self._device_ns / 1e3)
            self._retire(running)
            used = cfg.pages - self.cache.num_free_pages
            res.peak_pages_used = max(res.peak_pages_used, used)
            timeline["step"].append(step)
            timeline["pages_used"].append(used)
            timeline["running"].append(sum(len([s for s in r.seq_ids if s >= 0])
                                           for r in running))
            timeline["waiting"].append(sum(1 for r in waiting if r.arrival_step <= step))
            stats = self.cache.prefix_stats
            timeline["hit_rate"].append(stats["hit_rate"] if stats else 0.0)
            if self._swap:   # requests out of the running set: on the host or arriving
                timeline["swapped"].append(
                    len(self._swapped) + len(self._ready)
                    + sum(len(requests) for requests, _, _ in self._in_flight.values()))
            if self._extras:
                for name, value in self._account(running, used).items():
                    timeline[name].append(value)
            if cfg.verify_every and step % cfg.verify_every == 0:
                self._spot_check(running)
            if cfg.check_every and step % cfg.check_every == 0:
                self._check_invariants()
            if self.on_step is not None:
                self.on_step(self, step)
            if progress is not None:
                progress(res.requests_done, total, step)
            step += 1
        for request in running:   # nothing is live here unless a run was cut short
            for sample, seq in enumerate(request.seq_ids):
                if seq >= 0:
                    self._verify(request, sample)
        if self._host:   # the last offloads kvcore started (and loads, swaps)
            self._on_transfers(self.cache.wait(), time.perf_counter())
        self._check_invariants()
        res.steps = step
        res.wall_s = time.perf_counter() - start
        res.steps_per_s = (step - res.idle_steps) / res.wall_s if res.wall_s else 0.0
        if host_us:
            res.host_us_p50, res.host_us_p99 = (float(x) for x in np.percentile(host_us, [50, 99]))
            res.device_us_p50, res.device_us_p99 = (float(x) for x in
                                                    np.percentile(device_us, [50, 99]))
        res.timeline = timeline
        stats = self.cache.prefix_stats
        if stats is not None:
            res.prefix_hit_rate = stats["hit_rate"]
            res.prefix_hit_tokens = stats["hit_tokens"]
            res.prefix_evictions = stats["evictions"]
        if self._extras:
            self._finish_extras(res)
        if self._swap:
            self._finish_swap(res)
        if self._offload:
            self._finish_offload(res)
        return res
