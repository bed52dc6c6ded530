"""A continuous-batching serving workload driven through a KVCache, verified byte for byte.

The simulator plays the scheduler of an LLM server, step by step:

- requests arrive over time (Poisson), with long-tailed (lognormal) prompt and output
  lengths; a share starts with one of a few common system prompts, and a share asks for
  several samples (the prompt is prefilled once, then forked: copy-on-write); stretches
  with nothing to run are skipped to the next arrival;
- a request is admitted only when its prompt fits in the free pages (``pages_needed``
  logic) and the step's token budget; when decoding runs out of pages the newest
  request is preempted (its sequences removed, the request requeued to recompute);
- every step writes K and V of every new token for every layer through
  :meth:`KVCache.write`, with content derived from (request, sample, position, layer,
  K/V) alone, so that it can be recomputed later;
- finished samples, a rotating subset of live ones during the run, and everything
  still live at the end are gathered and compared with the recomputed content; the
  bookkeeping invariants are checked as it goes.

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

from kvcore.cache import KVCache
from kvcore.config import DTYPES, KVCacheConfig
from kvcore.errors import KVCoreError

__all__ = ["ConfigurationError", "SimConfig", "SimResult", "Simulator", "estimate_host_bytes",
           "token_words"]

#: Samples a multi-sample request asks for: 2 to MAX_SAMPLES (see ``multi_sample_share``).
MAX_SAMPLES = 4
_INT32_MAX = 2**31 - 1
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


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

    def max_request_tokens(self) -> int:
        return self.system_prompt_len + self.max_prompt_len + self.max_output_len

    def max_samples(self) -> int:
        """The most samples one request can ask for (each is a sequence of its own)."""
        return MAX_SAMPLES if self.multi_sample_share > 0 else 1


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
    step_tokens = max(prefill + config.max_running, config.max_request_tokens())
    per_page = 16 + (4 * ps + 48 if config.prefix_cache else 0)
    return {
        "KV pool": (2 * config.layers * config.pages * ps * lanes * itemsize
                    if pool_on_host else 0),
        "page table": 4 * config.max_running * need_pages + per_page * config.pages,
        "per-step buffers": step_tokens * lanes * (32 + 4 * itemsize),
        "requests": 1024 * config.requests,
    }


_LOWER = {"KV pool": "--pages, --page-size, --layers, --heads or --head-dim",
          "page table": "--max-running, --max-prompt-len or --max-output-len",
          "per-step buffers": "--max-step-tokens, --max-prompt-len, --heads or --head-dim",
          "requests": "--requests"}


def _check_config(cfg: SimConfig) -> None:
    """Reject, before anything is allocated, a config that cannot run or never ends."""
    ps = cfg.page_size
    need_pages = -(-cfg.max_request_tokens() // ps)
    if need_pages > cfg.pages:
        raise ConfigurationError(
            f"a request of up to {cfg.max_request_tokens()} tokens (system prompt "
            f"{cfg.system_prompt_len} + prompt {cfg.max_prompt_len} + output "
            f"{cfg.max_output_len}) needs {need_pages} pages of {ps} tokens, but the "
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
        try:
            self.requests = self._make_requests()
        except MemoryError as exc:
            raise ConfigurationError(f"out of memory generating {config.requests:,} "
                                     f"requests; lower --requests") from exc
        self._check_workload()
        kv_config = KVCacheConfig(
            num_layers=config.layers, num_kv_heads=config.heads, head_dim=config.head_dim,
            page_size=ps, num_pages=config.pages, dtype=config.dtype, layout=config.layout,
            max_seqs=config.max_running, max_pages_per_seq=need_pages,
            enable_prefix_cache=config.prefix_cache)
        try:
            self.cache = KVCache(kv_config, device=config.device)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            raise ConfigurationError(
                f"could not allocate the KV pool ({_fmt_bytes(kv_config.total_bytes)} for "
                f"{config.pages:,} pages) on {config.device}: out of memory; lower --pages, "
                f"--layers, --heads or --head-dim") from exc
        self._itemsize = kv_config.itemsize
        self._words = np.uint16 if self._itemsize == 2 else np.uint32
        self._storage = kv_config.storage_dtype   # words viewed as the pool's dtype
        self.result = SimResult(config=asdict(config), device=self.cache.device,
                                pool_pages=config.pages)

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
        for request in self.requests:
            prompt, samples = request.prompt_len, len(request.output_lens)
            prompt_pages = -(-prompt // ps)
            admit = prompt_pages + self._watermark + samples
            if admit > cfg.pages:
                raise ConfigurationError(
                    f"request {request.request_id} ({prompt:,}-token prompt, {samples} "
                    f"sample(s)) could never be admitted: its prompt takes {prompt_pages:,} "
                    f"pages of {ps} tokens and admission keeps {self._watermark:,} pages "
                    f"free plus one per sample ({admit:,} in all), but the pool has "
                    f"{cfg.pages:,}; raise --pages or lower --max-prompt-len")
            # pages once ``t`` tokens are generated: the prompt's full pages are shared,
            # each live sample has its own copy of the partial one plus its output
            peak = max(prompt // ps + sum(1 for o in request.output_lens if o >= t)
                       * (-(-(prompt % ps + t) // ps)) for t in set(request.output_lens))
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
        self.result.tokens_written += int(slot_mapping.size)

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
            # each new sample's first decode step; running sequences that outgrow the
            # rest are preempted by the decode step
            reserve = self._watermark + pending_forks + len(admitted) + num_samples
            if cache.num_seqs + pending_forks + num_samples > self.cfg.max_running:
                break
            tokens = self._token_ids(self._keys(request, 0, np.arange(request.prompt_len)))
            t0 = time.perf_counter_ns()
            seq = cache.add_sequence(tokens if self.cfg.prefix_cache else None)
            cached = cache.num_tokens(seq)
            pages = cache.pages_needed([seq], [request.prompt_len - cached])
            self._host_ns += time.perf_counter_ns() - t0
            if (used + request.prompt_len - cached > budget
                    or pending_pages + pages + reserve > cache.num_free_pages):
                cache.remove(seq)
                break
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
        step_result = cache.append(seqs, [r.prompt_len - c for r, c, _ in admitted],
                                   np.concatenate([t[c:] for _, c, t in admitted]))
        self._host_ns += time.perf_counter_ns() - t0
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
        if len(running) == 1:   # it cannot go on even alone: it would be recomputed forever
            raise ConfigurationError(
                f"request {victim.request_id} does not fit the pool of {self.cfg.pages:,} "
                f"pages even when running alone; raise --pages")
        running.remove(victim)
        for seq in victim.seq_ids:
            if seq >= 0:
                self.cache.remove(seq)
        victim.seq_ids = []
        victim.preemptions += 1
        self.result.preemptions += 1
        waiting.appendleft(victim)

    def _decode(self, running: list, waiting: deque) -> None:
        cache = self.cache
        while True:
            seqs = [s for r in running for s in r.seq_ids if s >= 0]
            if not seqs:
                return
            t0 = time.perf_counter_ns()
            needed = cache.pages_needed(seqs, 1)
            self._host_ns += time.perf_counter_ns() - t0
            if needed <= cache.num_free_pages:
                break
            self._preempt_newest(running, waiting)
        entries = []
        for request in running:
            for sample, seq in enumerate(request.seq_ids):
                if seq >= 0:
                    position = request.prompt_len + request.generated[sample]
                    entries.append((request, sample, np.array([position])))
        keys = self._join([self._keys(*entry) for entry in entries])
        token_ids = self._token_ids(keys)
        t0 = time.perf_counter_ns()
        step_result = cache.append(seqs, 1, token_ids)
        cache.flashinfer_metadata(seqs)   # what the attention kernels would be given
        self._host_ns += time.perf_counter_ns() - t0
        self.result.cow_copies += int(step_result.copy_src.size)
        for request, sample, _ in entries:
            request.generated[sample] += 1
        self._write(entries, step_result.slot_mapping, keys)

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

    def _verify(self, request: _Request, sample: int, spot: bool = False) -> None:
        seq = request.seq_ids[sample]
        length = self.cache.num_tokens(seq)
        expected_len = request.prompt_len + request.generated[sample]
        if length != expected_len:
            self.result.mismatches += max(length, expected_len)
            return
        keys = self._keys(request, sample, np.arange(length))
        for layer in range(self.cfg.layers):
            k, v, _ = self.cache.gather(layer, [seq])
            k, v = self.cache.to_host(k), self.cache.to_host(v)
            for which, got in ((0, k), (1, v)):
                want = self._content(keys, layer, which)
                bad = ~(got.view(self._words) == want).reshape(length, -1).all(axis=1)
                self.result.mismatches += int(bad.sum())
        self.result.sequences_verified += 1
        self.result.tokens_verified += length
        if spot:
            self.result.spot_checks += 1
            self.result.spot_check_tokens += length

    def _spot_check(self, running: list) -> None:
        live = [(r, s) for r in running for s, seq in enumerate(r.seq_ids) if seq >= 0]
        if not live:
            return
        picks = self.rng.choice(len(live), size=min(4, len(live)), replace=False)
        for i in picks:
            self._verify(*live[i], spot=True)

    def _check_invariants(self) -> None:
        try:
            self.cache.check_invariants()
        except KVCoreError:
            self.result.invariant_failures += 1

    # -- the run -----------------------------------------------------------------------------

    def run(self, progress=None) -> SimResult:
        """Run until every request has finished; returns the figures."""
        cfg, res = self.cfg, self.result
        waiting: deque = deque(sorted(self.requests, key=lambda r: r.arrival_step))
        running: list = []
        host_us, device_us = [], []
        timeline = {"step": [], "pages_used": [], "running": [], "waiting": [],
                    "hit_rate": []}
        start = time.perf_counter()
        step = 0
        total = len(self.requests)
        while waiting or running:
            if not running and waiting[0].arrival_step > step:
                # nothing to run until the next arrival: skip there, nothing would change
                res.idle_steps += waiting[0].arrival_step - step
                step = waiting[0].arrival_step
            self._host_ns = self._device_ns = 0
            budget = cfg.max_step_tokens - sum(
                len([s for s in r.seq_ids if s >= 0]) for r in running)
            self._admit(waiting, running, step, max(budget, 0))
            if not running and waiting and waiting[0].arrival_step <= step:
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
        return res
