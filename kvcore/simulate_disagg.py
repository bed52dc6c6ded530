"""Disaggregated prefill and decode, simulated on two ranks and verified byte for byte.

``kvcore simulate --disaggregated`` runs this: rank 0 is a prefill replica, rank 1 a
decode replica, each with its own :class:`~kvcore.KVCache` (page ids differ), joined by
torch.distributed (gloo between CPU caches, ``"cpu:gloo,cuda:nccl"`` between GPUs:
rank ``r`` uses ``cuda:r``).

Each round:

1. the decode rank offers a page budget: its free pages less what its running
   requests may still allocate (their outputs' worst case), so an admitted request
   never runs out of pages;
2. the prefill rank takes the oldest waiting requests whose worst-case pages (prompt
   plus output) fit the budget, up to ``batch``, prefills them (``add_sequence`` with
   the prompt, so its own prefix cache serves shared system prompts, then ``append``
   and a write of every layer's K and V of every computed token), sends them with
   :func:`~kvcore.distributed.send_pages` (with the token ids) and removes them;
3. the decode rank receives them (:func:`~kvcore.distributed.recv_pages`; its prefix
   cache maps the system-prompt pages it already holds, which are not sent), checks
   every layer's K and V of every received sequence against the recomputed content
   (the integrity check across the transfer), and runs one decode step for every
   running request (one token each, written to every layer); a request whose output
   is complete is checked whole, then removed.

Content is a function of (token id, position, layer, K/V) alone
(:func:`kvcore.simulate.token_words`), so either rank can recompute any token's bytes
and equal prefixes have equal bytes. A mismatch (or an invariant failure) makes the run
fail.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["DisaggConfig", "run_disaggregated"]


@dataclass(frozen=True)
class DisaggConfig:
    """Knobs of a disaggregated run (the ``kvcore simulate --disaggregated`` flags)."""

    requests: int = 64
    layers: int = 2
    heads: int = 4
    head_dim: int = 64
    page_size: int = 16
    pages: int = 1536             # per rank
    dtype: str = "float16"
    layout: str = "NHD"
    seed: int = 0
    device: str = "cpu"           # "cpu" (gloo) or "cuda" (NCCL, cuda:0 and cuda:1)
    prompt_median: int = 200
    output_median: int = 32
    max_prompt_len: int = 1024
    max_output_len: int = 128
    system_prompts: int = 4
    system_prompt_len: int = 256
    system_prompt_share: float = 0.4
    prefix_cache: bool = True
    batch: int = 8                # requests per transfer
    max_running: int = 64         # requests decoding at once
    corrupt: bool = False         # test hook: change one page before the first transfer

    def workload(self):
        """(prompt token ids, output length) per request, from ``seed``."""
        rng = np.random.default_rng(self.seed)
        systems = [rng.integers(0, 2**31 - 1, self.system_prompt_len).tolist()
                   for _ in range(self.system_prompts)]
        out = []
        for _ in range(self.requests):
            own = int(np.clip(rng.lognormal(math.log(self.prompt_median), 0.6), 1,
                              self.max_prompt_len))
            tokens = rng.integers(0, 2**31 - 1, own).tolist()
            if systems and rng.random() < self.system_prompt_share:
                tokens = systems[int(rng.integers(len(systems)))] + tokens
            length = int(np.clip(rng.lognormal(math.log(self.output_median), 0.6), 1,
                                 self.max_output_len))
            out.append((tokens, length))
        return out


def _content(cfg, tokens, positions, layer, which):
    from kvcore.simulate import token_words

    itemsize = 4 if cfg.dtype == "float32" else 2
    words = token_words(np.asarray(tokens, dtype=np.uint64), np.zeros(len(tokens)),
                        positions, layer, which, cfg.heads, cfg.head_dim, itemsize)
    # float16 as itself; bfloat16 stays uint16 words (what a NumPy or CuPy pool holds,
    # and what from_host turns into torch.bfloat16)
    return words.view({"float32": np.float32, "float16": np.float16}.get(cfg.dtype, np.uint16))


def _output_token(request: int, position: int) -> int:
    return (request * 1_000_003 + position * 7_919) % (2**31 - 1)


class _Side:
    """One rank's cache and the writes and checks of the run's content."""

    def __init__(self, cfg: DisaggConfig, rank: int):
        from kvcore import KVCache, KVCacheConfig

        self.cfg = cfg
        device = "cpu" if cfg.device == "cpu" else f"cuda:{rank}"
        longest = cfg.system_prompt_len + cfg.max_prompt_len + cfg.max_output_len
        kv = KVCacheConfig(cfg.layers, cfg.heads, cfg.head_dim, cfg.page_size, cfg.pages,
                           dtype=cfg.dtype, layout=cfg.layout, max_seqs=cfg.max_running
                           + cfg.batch, max_pages_per_seq=-(-longest // cfg.page_size),
                           enable_prefix_cache=cfg.prefix_cache)
        self.cache = KVCache(kv, device=device)

    def _on(self, array):
        return array if self.cache.device == "cpu" else self.cache.from_host(array)

    def write(self, tokens, positions, slots) -> None:
        for layer in range(self.cfg.layers):
            self.cache.write(layer, self._on(_content(self.cfg, tokens, positions, layer, 0)),
                             self._on(_content(self.cfg, tokens, positions, layer, 1)), slots)

    def mismatches(self, seq: int, tokens) -> int:
        """Layers (K and V counted apart) of ``seq`` whose bytes differ from ``tokens``'
        content."""
        bad = 0
        positions = np.arange(len(tokens))
        for layer in range(self.cfg.layers):
            k, v, _ = self.cache.gather(layer, [seq])
            for which, got in enumerate((k, v)):
                got = np.asarray(got) if self.cache.device == "cpu" else self.cache.to_host(got)
                want = _content(self.cfg, tokens, positions, layer, which)
                bad += got.tobytes() != want.tobytes()
        return bad


def _prefill_rank(cfg, dist, stats) -> None:
    from kvcore.distributed import send_pages

    side = _Side(cfg, 0)
    cache, ps = side.cache, cfg.page_size
    work = cfg.workload()
    waiting = list(range(len(work)))
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=1)      # the decode rank's budget, or None: done
        budget = box[0]
        if budget is None:
            break
        take = []
        for r in waiting[:cfg.batch]:
            tokens, out = work[r]
            need = -(-(len(tokens) + out) // ps)
            if need > budget:
                break
            take.append(r)
            budget -= need
        del waiting[:len(take)]
        box = [(take, not waiting)]
        dist.broadcast_object_list(box, src=0)
        if not take:
            continue
        seqs = []
        for r in take:
            tokens = work[r][0]
            seq = cache.add_sequence(tokens)
            hit = cache.num_tokens(seq)
            step = cache.append([seq], [len(tokens) - hit], tokens[hit:])
            side.write(tokens[hit:], np.arange(hit, len(tokens)), step.slot_mapping)
            stats["prefill_hit_tokens"] += hit
            seqs.append(seq)
        if cfg.corrupt and stats["transfers"] == 0:    # the check must see this
            page = int(cache.pages(seqs[0])[-1])
            cache.k_cache(0)[page] = cache.k_cache(0)[page] + 1
        sent = send_pages(cache, seqs, 1, token_ids=[work[r][0] for r in take])
        stats["transfers"] += 1
        stats["pages_sent"] += sent.num_pages
        stats["bytes_sent"] += sent.nbytes
        stats["decode_hit_pages"] += int(sent.hit_pages.sum())
        for seq in seqs:
            cache.remove(seq)
        cache.check_invariants()


def _decode_rank(cfg, dist, stats) -> None:
    from kvcore.distributed import recv_pages

    side = _Side(cfg, 1)
    cache, ps = side.cache, cfg.page_size
    work = cfg.workload()
    running = {}                 # seq id -> [request, tokens so far]
    finished = prefill_done = 0
    while True:
        done = prefill_done and not running
        reserved = sum(-(-(len(work[r][0]) + work[r][1]) // ps) - len(cache.pages(s))
                       for s, (r, _) in running.items())
        budget = 0 if len(running) + cfg.batch > cfg.max_running else \
            cache.num_free_pages - reserved
        dist.broadcast_object_list([None if done else budget], src=1)
        if done:
            break
        box = [None]
        dist.broadcast_object_list(box, src=0)
        take, prefill_done = box[0]
        if take:
            got = recv_pages(cache, 0)
            for r, seq in zip(take, got.seq_ids.tolist(), strict=True):
                tokens = list(work[r][0])
                stats["mismatches"] += side.mismatches(seq, tokens)   # across the transfer
                stats["verified_tokens"] += len(tokens)
                running[seq] = [r, tokens]
        if running:
            seqs = list(running)
            new = [_output_token(running[s][0], len(running[s][1])) for s in seqs]
            step = cache.append(seqs, 1, new)
            positions = np.array([len(running[s][1]) for s in seqs])
            side.write(new, positions, step.slot_mapping)
            stats["decode_steps"] += 1
            for s, token in zip(seqs, new, strict=True):
                r, tokens = running[s]
                tokens.append(token)
                if len(tokens) - len(work[r][0]) >= work[r][1]:
                    stats["mismatches"] += side.mismatches(s, tokens)
                    stats["verified_tokens"] += len(tokens)
                    cache.remove(s)
                    del running[s]
                    finished += 1
        elif not take and not prefill_done:
            raise RuntimeError("no request fits the decode rank's pool: raise --pages")
        cache.check_invariants()
    stats["finished"] = finished
    stats["decode_prefix_stats"] = cache.prefix_stats


def _entry(rank, cfg, init_file, queue) -> None:
    import torch.distributed as dist

    stats = {"transfers": 0, "pages_sent": 0, "bytes_sent": 0, "decode_hit_pages": 0,
             "prefill_hit_tokens": 0, "mismatches": 0, "verified_tokens": 0,
             "decode_steps": 0}
    try:
        backend = "gloo"
        if cfg.device != "cpu":
            import torch

            torch.cuda.set_device(rank)
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=2, timeout=datetime.timedelta(seconds=120))
        t0 = time.perf_counter()
        (_prefill_rank if rank == 0 else _decode_rank)(cfg, dist, stats)
        stats["seconds"] = time.perf_counter() - t0
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        stats["error"] = traceback.format_exc()
    queue.put((rank, stats))


def run_disaggregated(cfg: DisaggConfig, timeout: float = 1800.0) -> dict:
    """Run the two ranks in spawned processes; returns the merged summary.

    Returns
    -------
    dict
        ``requests``, ``finished``, ``transfers``, ``pages_sent``, ``bytes_sent``,
        ``decode_hit_pages`` (pages the decode rank's prefix cache already held, not
        sent), ``prefill_hit_tokens``, ``verified_tokens``, ``mismatches``,
        ``decode_steps``, ``seconds``, ``ok``, the config, and ``error`` when a rank
        failed.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, cfg, init, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in procs:
                rank, stats = queue.get(timeout=timeout)
                results[rank] = stats
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    prefill, decode = results[0], results[1]
    summary = {"requests": cfg.requests, "finished": decode.get("finished", 0),
               "transfers": prefill["transfers"], "pages_sent": prefill["pages_sent"],
               "bytes_sent": prefill["bytes_sent"],
               "decode_hit_pages": prefill["decode_hit_pages"],
               "prefill_hit_tokens": prefill["prefill_hit_tokens"],
               "verified_tokens": decode["verified_tokens"],
               "mismatches": decode["mismatches"], "decode_steps": decode["decode_steps"],
               "seconds": decode.get("seconds", 0.0), "config": asdict(cfg)}
    errors = [f"rank {r}: {s['error']}" for r, s in sorted(results.items()) if "error" in s]
    if errors:
        summary["error"] = "\n".join(errors)
    summary["ok"] = (not errors and summary["mismatches"] == 0
                     and summary["finished"] == cfg.requests)
    return summary


#: ``kvcore simulate`` options a disaggregated run cannot honour (they change the model
#: or the preemption, which this run does not simulate).
_REFUSED = ("window", "speculative", "host_pages")


def cli_run(args, error) -> int:
    """``kvcore simulate --disaggregated``: options that ``kvcore simulate`` shares with
    :class:`DisaggConfig` are taken when given (otherwise this run's smaller defaults);
    ``--device auto`` is two GPUs when there are two, else the CPU. Prints a summary,
    writes ``--json``; exit status 0 verified, 1 a mismatch or a failed rank, 2 bad
    options."""
    import json
    import sys
    from dataclasses import fields

    from kvcore.simulate import SimConfig

    sim_defaults = SimConfig()
    for name in _REFUSED:
        if getattr(args, name) != getattr(sim_defaults, name):
            return error("simulate", f"--{name.replace('_', '-')} does not apply to "
                         "--disaggregated")
    if args.preempt != "recompute":
        return error("simulate", "--preempt does not apply to --disaggregated")
    values = {}
    if getattr(args, "corrupt_at_step", None) is not None:
        values["corrupt"] = True
    for f in fields(DisaggConfig):
        if hasattr(args, f.name) and getattr(args, f.name) != getattr(sim_defaults, f.name):
            values[f.name] = getattr(args, f.name)
    device = values.pop("device", "auto")
    if device == "auto":
        try:
            import torch

            device = "cuda" if torch.cuda.device_count() >= 2 else "cpu"
        except ImportError:
            device = "cpu"
    elif device != "cpu":
        device = "cuda"
    if "prefix_cache" in values:
        values["prefix_cache"] = bool(values["prefix_cache"])
    try:
        import torch.distributed
    except ImportError:
        return error("simulate", "--disaggregated needs torch (pip install 'kvcore[model]')")
    cfg = DisaggConfig(**values, device=device)
    longest = cfg.system_prompt_len + cfg.max_prompt_len + cfg.max_output_len
    if -(-longest // cfg.page_size) > cfg.pages:
        return error("simulate", f"--pages {cfg.pages} cannot hold one request of up to "
                     f"{longest} tokens")
    summary = run_disaggregated(cfg)
    out = sys.stderr if args.json is not None and str(args.json) == "-" else sys.stdout
    rows = [("ranks", f"prefill rank 0, decode rank 1 ({cfg.device}, "
                      f"{'NCCL' if cfg.device != 'cpu' else 'gloo'})"),
            ("requests finished", f"{summary['finished']:,} of {cfg.requests:,}"),
            ("transfers", f"{summary['transfers']:,} ({summary['pages_sent']:,} pages, "
                          f"{summary['bytes_sent'] / 1e6:,.1f} MB)"),
            ("decode-side prefix hits", f"{summary['decode_hit_pages']:,} pages not sent"),
            ("prefill-side prefix hits", f"{summary['prefill_hit_tokens']:,} tokens"),
            ("decode steps", f"{summary['decode_steps']:,}"),
            ("wall time", f"{summary['seconds']:.2f} s")]
    for name, value in rows:
        print(f"{name:<38} {value}", file=out)
    print(f"integrity: {summary['verified_tokens']:,} tokens compared byte for byte (every "
          f"sequence after its transfer and when finished), {summary['mismatches']:,} "
          "mismatches", file=out)
    if "error" in summary:
        print(summary["error"], file=sys.stderr)
    if args.json is not None:
        text = json.dumps(summary, indent=1) + "\n"
        if str(args.json) == "-":
            sys.stdout.write(text)
        else:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text)
    return 0 if summary["ok"] else 1
