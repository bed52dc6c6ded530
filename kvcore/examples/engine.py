"""A small continuous-batching engine: a transformers Llama model with its KV in kvcore.

Every step the scheduler

1. moves arrived requests to the waiting queue and admits them first come, first
   served while their worst-case pages fit (so ``append`` never runs out of pages);
   admission maps a shared system prompt's cached pages (prefix cache);
2. packs a ragged batch: one decode token for every running sample, then prefill
   chunks of admitted prompts up to the step's token budget;
3. calls ``KVCache.append`` once for the batch (copy-on-write copies after forks are
   enqueued there) and ``StepMetadata.update`` once (one upload);
4. runs the model once over the packed tokens: transformers calls kvcore's attention
   per layer, which writes K and V through the step's slot mapping and attends over
   each request's pages (see :mod:`kvcore.examples.attention`);
5. samples greedily from each sample's last row; a request with two samples forks when
   its prompt is done, the second sample taking the runner-up token; finished samples
   leave the cache (their full prompt pages stay cached for later requests).

Run ``python -m kvcore.examples.engine --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from kvcore import KVCache, KVCacheConfig, LayerGroup, Transfer
from kvcore.examples.attention import FlashInferAttention, StepBatch, TorchPagedAttention
from kvcore.examples.model import (
    MEDIUM,
    TINY,
    TINY_HYBRID,
    ModelShape,
    build_model,
    use_attention,
    versions,
)


@dataclass(frozen=True)
class Request:
    """A generation request.

    Attributes
    ----------
    request_id : int
    prompt : tuple of int
        Prompt token ids (at least one).
    max_new_tokens : int
        Tokens to generate per sample (at least one); no end-of-sequence token.
    num_samples : int
        1, or 2: the request forks when its prompt is done; sample 0 continues greedily,
        sample 1 starts from the runner-up token and then continues greedily.
    arrival_step : int
        The engine step at which the request arrives.
    """

    request_id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    num_samples: int = 1
    arrival_step: int = 0


@dataclass
class FinishedSample:
    """One finished sample and the logits the engine computed for it.

    Attributes
    ----------
    request_id, sample_index : int
    tokens : list of int
        Prompt and generated tokens.
    first_position : int
        Positions before this came from the prefix cache (nothing computed for them).
    logits : torch.Tensor, float32 [len(tokens) - 1 - first_position, vocab]
        Row ``i``: the logits at position ``first_position + i`` (predicting token
        ``first_position + i + 1``); empty when the engine kept no logits. The last
        token was sampled, never fed, so it has no row.
    finish_step : int
        The engine step in which the sample finished.
    """

    request_id: int
    sample_index: int
    tokens: list[int]
    first_position: int
    logits: torch.Tensor
    finish_step: int


@dataclass
class _Sample:
    """A running sample: one kvcore sequence."""

    request: Request
    index: int
    seq_id: int
    tokens: list[int]
    num_computed: int               # tokens whose K/V are in the cache
    first_position: int             # prefix-cache hit length
    generated: int = 0
    logits: list = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.request.prompt)


@dataclass
class EngineStats:
    """What happened in a run (all counts)."""

    steps: int = 0
    model_steps: int = 0
    mixed_steps: int = 0            # prefill chunks and decode tokens in one step
    tokens_computed: int = 0
    tokens_generated: int = 0
    prefix_hit_tokens: int = 0
    forks: int = 0
    cow_copies: int = 0
    admission_waits: int = 0        # steps where the head of the queue waited for pages
    drafts_accepted: int = 0
    drafts_rejected: int = 0
    max_window_start: int = 0       # furthest first live page of a window group (released)
    swap_outs: int = 0              # preemptions by swap (preempt_every)
    swap_ins: int = 0
    pages_swapped: int = 0          # pages copied out (and as many back in)
    host_loads: int = 0             # prefix hits loaded from the host tier
    peak_pages_used: int = 0
    wall_s: float = 0.0
    kvcore_host_s: float = 0.0      # in append + metadata update (kvcore's host work)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Engine:
    """Continuous batching over a transformers Llama model with its KV in kvcore.

    Parameters
    ----------
    model : LlamaForCausalLM
        From :func:`kvcore.examples.model.build_model`; its config's sizes must match
        the cache's (layers, KV heads, head_dim).
    cache : KVCache
        Empty, with prefix caching on for prompt sharing; CPU (float32 for the check)
        or CUDA with ``framework="torch"``.
    attention : TorchPagedAttention or FlashInferAttention
        Reads the pool; planned once per step.
    max_tokens_per_step : int
        Token budget of a step (decode tokens first, then prefill chunks).
    max_batch : int
        Sequences per step at most (running samples are capped to it).
    keep_logits : bool
        Keep every computed position's logits (for the check); otherwise the head runs
        only on the rows that sample.
    speculative : int
        Draft tokens per decoding sample and step (0: none). The engine emulates a
        speculative decoder: drafts are random tokens, appended after the sample's token
        in the same ``append``; a random number of them (0..k) is accepted, the bonus
        token is the target's argmax after the last accepted one, and the rejected
        drafts are rolled back with one ``truncate`` for the step. (Which drafts are
        accepted does not matter to the check, which is teacher-forced over the final
        tokens; what matters is that rolled-back K/V never leaks into later steps.)
    draft_seed : int
        Seeds the drafts and the acceptance.
    preempt_every : int
        Every this many model steps (0: never), preempt the newest request: swap all its
        running samples out to the cache's host tier in one ``swap_out``, and bring them
        back with one ``swap_in`` when its pages fit again (one request away at a time).
        A swapped sample resumes only once ``poll`` has seen its copy arrive, and the
        check then proves the K/V came back exact. Needs ``num_host_pages``.
    """

    def __init__(self, model, cache: KVCache, attention, *, max_tokens_per_step: int = 64,
                 max_batch: int = 32, keep_logits: bool = True, speculative: int = 0,
                 draft_seed: int = 0, preempt_every: int = 0):
        cfg, mcfg = cache.config, model.config
        head_dim = getattr(mcfg, "head_dim", None) or mcfg.hidden_size // mcfg.num_attention_heads
        if (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) != (
                mcfg.num_hidden_layers, mcfg.num_key_value_heads, head_dim):
            raise ValueError("the cache's layers / KV heads / head_dim differ from the model's")
        if max_tokens_per_step < max_batch:
            raise ValueError("max_tokens_per_step must cover one decode token per sequence")
        self.model, self.cache, self.attention = model, cache, attention
        self.max_tokens, self.max_batch, self.keep_logits = (
            max_tokens_per_step, max_batch, keep_logits)
        if speculative < 0:
            raise ValueError(f"speculative must be >= 0, got {speculative}")
        self.speculative = speculative
        if preempt_every < 0:
            raise ValueError(f"preempt_every must be >= 0, got {preempt_every}")
        if preempt_every and cache.host_tier is None:
            raise ValueError("preempt_every needs a cache with a host tier (num_host_pages)")
        self.preempt_every = preempt_every
        self._away: list[_Sample] = []      # the preempted request's samples (swapped out)
        self._back: Transfer | None = None  # their swap-in, while in flight
        # Page entries count shared pages once per sequence that maps them (a system
        # prompt's pages appear in every request's row), so size them per sequence. One
        # metadata per layer group (a hybrid model's window group has its own pages).
        self.metadatas = [cache.step_metadata(max_tokens_per_step, max_batch=max_batch,
                                              max_pages=max_batch * cfg.max_pages_per_seq,
                                              group=g) for g in range(len(cfg.groups))]
        self._layer_group = [cfg.layer_group(layer) for layer in range(cfg.num_layers)]
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._running: list[_Sample] = []
        self._finished: list[FinishedSample] = []
        self._batch: StepBatch | None = None
        self._drafts = np.random.default_rng(draft_seed)

    # -- admission -------------------------------------------------------------------

    def _worst_pages(self, request: Request) -> int:
        """Pages a request could ever allocate: in every group, every sample's full length
        (drafts included) plus one copy-on-write page (a window group allocates each
        column at most once too)."""
        length = len(request.prompt) + request.max_new_tokens + self.speculative
        per_sample = -(-length // self.cache.config.page_size) + 1
        return request.num_samples * per_sample * self.cache.num_groups

    def _held(self, seq_id: int) -> int:
        return sum(len(self.cache.pages(seq_id, group=g)) for g in range(self.cache.num_groups))

    def _pages_still_needed(self) -> int:
        """Allocations the running samples may still make (worst case minus held)."""
        per_request: dict[int, tuple[Request, int]] = {}
        for sample in self._running:
            req, held = per_request.get(sample.request.request_id, (sample.request, 0))
            per_request[req.request_id] = (req, held + self._held(sample.seq_id))
        return sum(self._worst_pages(req) - held for req, held in per_request.values())

    def _admit(self) -> None:
        """Admit waiting requests first come, first served while their pages fit."""
        if not self._waiting or self._away:   # a preempted request goes first
            return
        budget = self.cache.num_free_pages - self._pages_still_needed()
        while self._waiting:
            request = self._waiting[0]
            need = self._worst_pages(request)
            seats = self.max_batch - len(self._running)
            if need > budget or seats < request.num_samples:
                self.stats.admission_waits += 1
                return
            self._waiting.popleft()
            seq_id = self.cache.add_sequence(list(request.prompt))
            if self.cache.seq_state(seq_id) == "swapping_in":
                # Its prefix hit includes blocks offloaded to the host tier: wait for them.
                load = self.cache.pending_transfers[-1]
                self._finished_transfers(self.cache.wait(load))
                self.stats.host_loads += 1
            cached = self.cache.num_tokens(seq_id)
            self.stats.prefix_hit_tokens += cached
            self._running.append(_Sample(request, 0, seq_id, list(request.prompt), cached,
                                         cached))
            budget -= need - self._held(seq_id)

    # -- one step --------------------------------------------------------------------

    def _schedule(self) -> list[tuple[_Sample, int, list[int]]]:
        """(sample, new tokens, drafts) for this step: decode tokens first (each with up
        to ``speculative`` draft tokens after it), then prefill chunks."""
        decoding = [s for s in self._running if not s.prefilling]
        prefilling = [s for s in self._running if s.prefilling]
        chosen, budget = [], self.max_tokens - len(decoding)    # one token each, guaranteed
        for sample in decoding + prefilling:
            if len(chosen) == self.max_batch:
                break
            known = len(sample.tokens) - sample.num_computed
            if not sample.prefilling:
                # Drafts beyond the sample's last token would be rejected anyway.
                k = min(self.speculative, budget,
                        sample.request.max_new_tokens - sample.generated - 1)
                drafts = self._drafts.integers(0, self.model.config.vocab_size, k).tolist()
                budget -= k
                chosen.append((sample, known, drafts))
                continue
            count = min(known, budget)
            if count <= 0:
                break
            chosen.append((sample, count, []))
            budget -= count
        return chosen

    def check_window(self, layer: int, window) -> None:
        """The model's sliding window of ``layer`` must be its kvcore group's."""
        group = self.cache.config.groups[self._layer_group[layer]]
        if window != group.window:
            raise ValueError(f"layer {layer}: the model's sliding window is {window}, its "
                             f"kvcore group's {group.window}")

    def attend(self, layer: int, q, k, v, scaling: float):
        """Called by transformers per layer: write the step's K/V into their slots, then
        attend over every sequence's pages. ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``."""
        self.cache.write(layer, k, v, self.metadatas[self._layer_group[layer]])
        return self.attention.run(layer, q, scaling)

    # -- preemption by swap ----------------------------------------------------------------

    def _finished_transfers(self, transfers) -> None:
        """Follow the transfers ``poll`` / ``wait`` finished: a preempted request whose
        swap-in arrived resumes."""
        for transfer in transfers:
            if transfer.status != "done":
                raise RuntimeError(f"a host-tier copy failed: {transfer!r}: {transfer.error}")
            if transfer is self._back:
                self._running.extend(self._away)
                self._away, self._back = [], None
                self.stats.swap_ins += 1

    def _preempt(self) -> None:
        """Swap the newest request's running samples out (one call, shared pages once)."""
        if self._away or not self._running:
            return
        request = self._running[-1].request
        samples = [s for s in self._running if s.request is request]
        transfer = self.cache.swap_out([s.seq_id for s in samples])
        for sample in samples:
            self._running.remove(sample)
        self._away = samples
        self.stats.swap_outs += 1
        self.stats.pages_swapped += transfer.num_pages

    def _resume(self) -> None:
        """Bring the preempted request back once its swap-out is done and its worst-case
        pages fit (its samples resume when the swap-in has arrived)."""
        if not self._away or self._back is not None:
            return
        ids = [s.seq_id for s in self._away]
        if any(self.cache.seq_state(i) != "swapped" for i in ids):
            return
        budget = self.cache.num_free_pages - self._pages_still_needed()
        if self._worst_pages(self._away[0].request) > budget:
            return
        self._back = self.cache.swap_in(ids)

    def step(self) -> bool:
        """Admit, run one model step, sample, roll back rejected drafts, retire. False
        when nothing could run."""
        if self.cache.host_tier is not None:
            self._finished_transfers(self.cache.poll())
            self._resume()
        self._admit()
        chosen = self._schedule()
        if not chosen:
            if self._away:                     # only the preempted request is left
                self._finished_transfers(self.cache.wait())
                self._resume()
                return True
            return False
        seq_ids = np.array([s.seq_id for s, _, _ in chosen], dtype=np.int32)
        counts = np.array([n + len(d) for _, n, d in chosen], dtype=np.int64)
        new_tokens = [t for s, n, d in chosen
                      for t in s.tokens[s.num_computed:s.num_computed + n] + d]
        positions = [p for s, n, d in chosen
                     for p in range(s.num_computed, s.num_computed + n + len(d))]
        start = time.perf_counter()
        appended = self.cache.append(seq_ids, counts, new_tokens)
        for metadata in self.metadatas:
            metadata.update(seq_ids, appended)
        self.stats.kvcore_host_s += time.perf_counter() - start
        # First live page per sequence: 0 in a full group, asked for in a window group.
        first_pages = [np.array([self.cache.first_page(s, group=g) for s in seq_ids])
                       if group.window else np.zeros(len(seq_ids), dtype=np.int64)
                       for g, group in enumerate(self.cache.config.groups)]
        self.stats.max_window_start = max(self.stats.max_window_start,
                                          *(int(f.max()) for f in first_pages))
        self.stats.cow_copies += len(appended.copy_src)
        indptr = np.zeros(len(chosen) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        seq_lens = np.array([s.num_computed for s, _, _ in chosen], dtype=np.int64) + counts
        self._batch = StepBatch(seq_ids, counts, seq_lens, indptr, self.metadatas, first_pages)
        self.attention.plan(self._batch)

        # Rows the head must produce: all with keep_logits; else each sampling sample's
        # last row, or all its rows when it carries drafts (the bonus token comes from
        # the row of its last accepted draft).
        row_sets = []
        for i, (sample, n, drafts) in enumerate(chosen):
            samples_now = sample.num_computed + n == len(sample.tokens)
            lo = int(indptr[i + 1]) - 1 - len(drafts) if samples_now else int(indptr[i + 1])
            row_sets.append(range(lo, int(indptr[i + 1])))
        kept = None if self.keep_logits else [r for rows in row_sets for r in rows]
        logits = self._forward(new_tokens, positions, kept)
        self._advance(chosen, indptr, logits, row_sets)
        self.stats.model_steps += 1
        self.stats.tokens_computed += len(new_tokens)
        self.stats.mixed_steps += bool(any(s.prefilling for s, _, _ in chosen)
                                       and not all(s.prefilling for s, _, _ in chosen))
        used = self.cache.config.num_pages - self.cache.num_free_pages
        self.stats.peak_pages_used = max(self.stats.peak_pages_used, used)
        if self.preempt_every and self.stats.model_steps % self.preempt_every == 0:
            self._preempt()
        return True

    def _forward(self, tokens, positions, rows):
        """The model over the packed tokens: logits ``[T, V]`` (or ``[len(rows), V]``)."""
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)
        keep = 0 if rows is None else torch.tensor(rows, dtype=torch.long, device=self.device)
        with use_attention(self.model, "kvcore"), torch.inference_mode():
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                             logits_to_keep=keep, kvcore_step=self)
        return out.logits[0]

    def _advance(self, chosen, indptr, logits, row_sets) -> None:
        """Record logits, accept drafts, sample next tokens (one device read for the
        step), fork, roll back rejected drafts (one ``truncate``), retire."""
        # Where each sample's sampling rows sit in ``logits``.
        if self.keep_logits:
            where = [list(rows) for rows in row_sets]
        else:
            where, at = [], 0
            for rows in row_sets:
                where.append(list(range(at, at + len(rows))))
                at += len(rows)
        flat = [r for rows in where for r in rows]
        top2 = logits[flat].topk(2, dim=-1).indices.cpu().tolist() if flat else []
        top2_of = dict(zip(flat, top2, strict=True))
        rollback_ids, rollback_lens, retiring = [], [], []
        for i, (sample, n, drafts) in enumerate(chosen):
            accepted = int(self._drafts.integers(0, len(drafts) + 1)) if drafts else 0
            if self.keep_logits:    # rows of rejected drafts are dropped
                sample.logits.append(logits[int(indptr[i]):int(indptr[i + 1]) - len(drafts)
                                            + accepted])
            sample.num_computed += n + accepted
            if drafts:
                self.stats.drafts_accepted += accepted
                self.stats.drafts_rejected += len(drafts) - accepted
                sample.tokens.extend(drafts[:accepted])
                sample.generated += accepted
                self.stats.tokens_generated += accepted
                rollback_ids.append(sample.seq_id)
                rollback_lens.append(sample.num_computed)
            if not where[i]:
                continue                          # a prefill chunk that samples nothing
            best, runner_up = top2_of[where[i][accepted]]
            if sample.generated == 0 and sample.request.num_samples == 2:
                self._fork(sample, runner_up)
            sample.tokens.append(best)
            sample.generated += 1
            self.stats.tokens_generated += 1
            if sample.generated == sample.request.max_new_tokens:
                retiring.append(sample)
        if rollback_ids:
            self.cache.truncate(rollback_ids, rollback_lens)
        for sample in retiring:
            self._retire(sample)

    def _fork(self, parent: _Sample, token: int) -> None:
        """Second sample of a request: shares the prompt's pages (copy-on-write later)."""
        child_id = self.cache.fork(parent.seq_id)
        child = _Sample(parent.request, 1, child_id, [*parent.tokens, token],
                        parent.num_computed, parent.first_position, generated=1,
                        logits=list(parent.logits))
        self.stats.forks += 1
        self.stats.tokens_generated += 1
        self._running.append(child)
        if child.generated == child.request.max_new_tokens:
            self._retire(child)

    def _retire(self, sample: _Sample) -> None:
        self._running.remove(sample)
        self.cache.remove(sample.seq_id)
        logits = (torch.cat(sample.logits).float() if sample.logits
                  else torch.empty(0, self.model.config.vocab_size))
        self._finished.append(FinishedSample(sample.request.request_id, sample.index,
                                             sample.tokens, sample.first_position, logits,
                                             self.stats.steps))

    # -- a whole workload --------------------------------------------------------------

    def run(self, requests) -> list[FinishedSample]:
        """Serve ``requests`` (arriving at their ``arrival_step``) until all finish.

        Returns the finished samples in the order they finished.
        """
        pending = deque(sorted(requests, key=lambda r: r.arrival_step))
        start = time.perf_counter()
        while pending or self._waiting or self._running or self._away:
            while pending and pending[0].arrival_step <= self.stats.steps:
                self._waiting.append(pending.popleft())
            if not self.step() and not pending:
                raise RuntimeError("engine stalled: a waiting request can never fit the pool "
                                   f"({self.cache.config.num_pages} pages)")
            self.stats.steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.wall_s += time.perf_counter() - start
        finished, self._finished = self._finished, []
        return finished


def make_workload(shape: ModelShape = TINY, *, num_requests: int = 24, seed: int = 0,
                  system_prompt_len: int = 40, max_user_len: int = 60,
                  max_new_tokens: int = 24, arrival_span: int = 30) -> list[Request]:
    """Requests sharing a system prompt; every fourth asks for two samples.

    User parts are 1..``max_user_len`` tokens, outputs 1..``max_new_tokens``, arrivals
    spread over the first ``arrival_span`` steps. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    system = rng.integers(0, shape.vocab_size, system_prompt_len).tolist()
    requests = []
    for rid in range(num_requests):
        user = rng.integers(0, shape.vocab_size, int(rng.integers(1, max_user_len + 1)))
        requests.append(Request(
            request_id=rid, prompt=tuple(system + user.tolist()),
            max_new_tokens=int(rng.integers(1, max_new_tokens + 1)),
            num_samples=2 if rid % 4 == 1 else 1,
            arrival_step=int(rng.integers(0, arrival_span + 1))))
    return requests


def make_engine(shape: ModelShape = TINY, *, device: str = "cpu", attention: str = "torch",
                dtype: str = "float32", num_pages: int = 64, page_size: int = 16,
                layout: str = "NHD",
                max_tokens_per_step: int = 64, max_batch: int = 16, keep_logits: bool = True,
                speculative: int = 0, seed: int = 0, preempt_every: int = 0) -> Engine:
    """A model, a kvcore cache sized ``num_pages`` x ``page_size`` and an engine over them.

    ``layout``: the pool's, ``"NHD"`` or ``"HND"`` (both attention backends read either).
    ``shape.window``: the cache gets two layer groups, the full-attention layers and the
    sliding-window ones (``LayerGroup(window=shape.window)``), over one pool.
    ``speculative``: draft tokens per decode step (see :class:`Engine`).
    ``preempt_every``: preempt by swap every this many steps (see :class:`Engine`); the
    cache then gets a host tier as large as its pool.

    ``attention``: ``"torch"`` (reference, CPU or CUDA) or ``"flashinfer"`` (CUDA).
    ``dtype``: the model's and the pool's (``"float32"``, ``"bfloat16"``, ``"float16"``).
    """
    torch_dtype = getattr(torch, dtype)
    model = build_model(shape, seed=seed, dtype=torch_dtype, device=device)
    config = KVCacheConfig(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
                           head_dim=shape.head_dim, page_size=page_size, num_pages=num_pages,
                           dtype=dtype, layout=layout, max_seqs=max(2 * max_batch, 8),
                           enable_prefix_cache=True, layer_groups=layer_groups(shape),
                           num_host_pages=num_pages if preempt_every else 0)
    if device == "cpu":
        cache = KVCache(config, device="cpu")
    else:
        cache = KVCache(config, device=device, framework="torch")
    if attention == "flashinfer":
        backend = FlashInferAttention(cache, shape.num_heads)
    elif attention == "torch":
        backend = TorchPagedAttention(cache)
    else:
        raise ValueError(f"attention must be 'torch' or 'flashinfer', not {attention!r}")
    return Engine(model, cache, backend, max_tokens_per_step=max_tokens_per_step,
                  max_batch=max_batch, keep_logits=keep_logits, speculative=speculative,
                  draft_seed=seed, preempt_every=preempt_every)


def layer_groups(shape: ModelShape):
    """kvcore's layer groups for ``shape``: None (one full group) without a window, else
    the full-attention layers and the window layers."""
    if not shape.window:
        return None
    full = [layer for layer in range(shape.num_layers) if layer not in shape.window_layers]
    return [LayerGroup(full), LayerGroup(shape.window_layers, window=shape.window)]


def main(argv=None) -> int:
    """``python -m kvcore.examples.engine``: serve a workload, check logits, report."""
    from kvcore.examples.check import check_against_transformers

    parser = argparse.ArgumentParser(prog="python -m kvcore.examples.engine",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--attention", default=None, choices=["torch", "flashinfer"],
                        help="default: torch on cpu, flashinfer on cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "hybrid", "medium"],
                        help="hybrid: 4 layers, the odd ones with a 24-token sliding window")
    parser.add_argument("--speculative", type=int, default=0, metavar="K",
                        help="draft tokens per decode step, rolled back with truncate")
    parser.add_argument("--preempt-every", type=int, default=0, metavar="N",
                        help="every N steps swap the newest request out to a host tier and "
                             "back when it fits (its logits must still match)")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--pages", type=int, default=64, help="pool pages (of 16 tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the logits check")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu"
    if on_cpu:
        # One thread: the tiny model gains nothing from more, and with several threads
        # torch's CPU forward is not bit-reproducible from run to run (a K computed in
        # one step can differ in its last bits from the reference's, and the 4x-scaled
        # weights amplify that towards the float32 tolerance).
        torch.set_num_threads(1)
    attention = args.attention or ("torch" if on_cpu else "flashinfer")
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    shape = {"tiny": TINY, "hybrid": TINY_HYBRID, "medium": MEDIUM}[args.shape]
    if args.speculative < 0:
        parser.error("--speculative must be >= 0")
    if args.preempt_every < 0:
        parser.error("--preempt-every must be >= 0")
    engine = make_engine(shape, device=args.device, attention=attention, dtype=dtype,
                         num_pages=args.pages, seed=args.seed, keep_logits=not args.no_check,
                         speculative=args.speculative, preempt_every=args.preempt_every)
    requests = make_workload(shape, num_requests=args.requests, seed=args.seed)
    finished = engine.run(requests)
    report = {"device": args.device, "attention": attention, "dtype": dtype,
              "shape": args.shape, **versions(), **engine.stats.as_dict(),
              "tokens_per_s": engine.stats.tokens_generated / engine.stats.wall_s}
    ok = True
    if not args.no_check:
        check = check_against_transformers(engine.model, finished, dtype=dtype)
        report["check"] = check.as_dict()
        ok = check.passed
    for key, value in report.items():
        if key != "check":
            print(f"{key:<22}{value:,.3f}" if isinstance(value, float) else f"{key:<22}{value}")
    if "check" in report:
        print(report["check"]["summary"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
