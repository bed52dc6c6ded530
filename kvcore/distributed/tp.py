"""Tensor parallelism: one page table (on the scheduler rank) driving N per-rank pools.

Each of the N ranks of a process group holds ``num_kv_heads / N`` KV heads of every
page: rank ``r`` heads ``[r * H / N, (r + 1) * H / N)``. The scheduler rank (``src``,
rank 0 by default) owns the only :class:`~kvcore.PageTable` that decides anything;
each step's bookkeeping result is broadcast to the other ranks once (not per layer),
and every rank applies it to its own pool: the copy-on-write copies, then its
:class:`~kvcore.StepMetadata` (slot mapping, FlashInfer / vLLM attention metadata),
filled with the same C pass and uploaded with one copy as on one GPU. Every rank's
pool has the same layout with a head count of ``H / N``, so page ids, slots and the
metadata mean the same on every rank, and each rank's bytes equal the head shard of a
single-device cache that ran the same steps.

The step message, int32 ``[8 + body]`` (one broadcast when it fits ``inline_ints``,
else the header in the inline buffer and the body in a second broadcast of its exact
size): header ``[MAGIC, kind, B, nnz, T, k, 0, 0]``, body ``page_indptr [B + 1],
last_page_len [B], page_indices [nnz], slot_mapping [T], copy_src [k], copy_dst [k]``.
A decode step of 64 sequences of 1,000 tokens (page 16) is 8 + 65 + 64 + 4,032 + 64 =
4,233 ints (17 KB).

Every rank gets the message on the host: it needs the step there anyway (kernel launch
sizes, an attention library's planning), and the pools exchange nothing. Three
channels carry it (``channel=``): ``"host"``, a CPU tensor over gloo; ``"device"``, a
device tensor over torch.distributed's NCCL on a side stream, copied back; ``"nccl"``,
the same through CuPy's NCCL bindings, which cost a few microseconds of host time a
call where a torch.distributed call costs tens (docs/distributed.md has the figures).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvcore._core import AppendResult
from kvcore.cache import KVCache
from kvcore.config import KVCacheConfig
from kvcore.distributed._comm import (
    backend_name,
    check_group,
    cpu_capable,
    geometry,
    torch_dist,
)
from kvcore.errors import CapacityError

__all__ = ["TensorParallelCache"]

_MAGIC = 0x6B76_7470     # "kvtp"
_STEP, _STOP, _FAILED = 1, 2, 3
_HEADER = 8
_RING = 4


class TensorParallelCache:
    """One rank's share of a tensor-parallel KV cache.

    Every rank of ``group`` constructs one with the same arguments (the full model's
    ``config``); the scheduler rank ``src`` then drives all of them.

    Parameters
    ----------
    config : KVCacheConfig
        The whole model's cache: ``num_kv_heads`` is the model's KV heads, which must
        divide evenly by the group's size. One full-attention layer group, no host tier.
    max_tokens : int
        Most new tokens in one step (the StepMetadata capacity).
    group : ProcessGroup, optional
        Carries CPU tensors (gloo, or ``"cpu:gloo,cuda:nccl"``); default: the default
        group.
    src : int
        The scheduler rank (owner of the page table), a rank of ``group``.
    device, framework, pool
        This rank's pool, as :class:`~kvcore.KVCache` takes them (``pool`` holds this
        rank's heads: ``num_kv_heads / N``).
    max_batch : int, optional
        Most sequences in one step's attention batch (default ``config.max_seqs``).
    block_tables : bool
        Keep vLLM-style block tables in the StepMetadata.
    inline_ints : int
        int32 words of the first broadcast of a step (default 8,192: 32 KB); a step
        whose message is longer takes a second broadcast.
    channel : {"auto", "host", "device", "nccl"}
        How each step's message travels (see the module docstring). ``"auto"``:
        ``"nccl"`` for CUDA caches on a group with NCCL where CuPy's NCCL loads, else
        ``"device"`` there, else ``"host"``. Checked equal on every rank.

    Attributes
    ----------
    cache : KVCache
        This rank's cache over its heads (``cache.config.num_kv_heads == H / N``). On
        the scheduler rank its table is the page table; on the others it is never used.
    metadata : StepMetadata
        This rank's step metadata, filled by every :meth:`step`; pass it to
        ``cache.write(layer, k, v, tp.metadata)`` and to attention kernels.
    rank, world_size, src : int
    channel : str
        The resolved channel.
    heads : slice
        This rank's heads of the model's ``num_kv_heads``.

    Raises
    ------
    ValueError
        Heads that do not divide evenly, a config or channel the ranks disagree on
        (raised on every rank), a channel the group or cache cannot carry, an
        unsupported config.

    Notes
    -----
    Invariants: after every :meth:`step` every rank's pool equals, byte for byte, the
    head shard ``[..., heads, ...]`` of a single cache that ran the same calls; every
    rank's metadata buffers hold the same bytes. Bookkeeping (``add_sequence``,
    ``fork``, ``remove``, ``truncate``, ``match_prefix``) runs on the scheduler rank
    only and moves no bytes, so the other ranks need not hear of it: the next step's
    message carries everything they must do (copy-on-write copies included).
    """

    def __init__(self, config: KVCacheConfig, max_tokens: int, *, group=None, src: int = 0,
                 device: str = "auto", framework: str | None = None, pool=None,
                 max_batch: int | None = None, block_tables: bool = True,
                 inline_ints: int = 8192, channel: str = "auto"):
        torch, dist = torch_dist()
        if not isinstance(config, KVCacheConfig):
            raise TypeError(f"config must be a KVCacheConfig, got {type(config).__name__}")
        check_group(dist, group)
        if channel not in ("auto", "host", "device", "nccl"):
            raise ValueError(f"channel must be 'auto', 'host', 'device' or 'nccl', got "
                             f"{channel!r}")
        name = backend_name(dist, group)
        if channel == "host" and not cpu_capable(dist, group):
            raise ValueError(f"process group backend {name!r} cannot broadcast the step's "
                             "metadata from the host; use gloo or "
                             "backend='cpu:gloo,cuda:nccl'")
        if channel == "device" and "nccl" not in name:
            raise ValueError(f"channel='device' needs NCCL in the group, not {name!r}")
        if channel == "auto" and "nccl" not in name and not cpu_capable(dist, group):
            raise ValueError(f"process group backend {name!r} carries neither CPU tensors "
                             "nor NCCL")
        self._torch, self._dist, self._group = torch, dist, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if isinstance(src, bool) or not isinstance(src, (int, np.integer)) \
                or not 0 <= src < self.world_size:
            raise ValueError(f"src {src!r} is not a rank of the group [0, "
                             f"{self.world_size})")
        self.src = int(src)
        self._src_global = src if group is None else dist.get_global_rank(group, self.src)
        if isinstance(inline_ints, bool) or not isinstance(inline_ints, (int, np.integer)) \
                or inline_ints < 64:
            raise ValueError(f"inline_ints must be an integer >= 64, got {inline_ints!r}")
        self._agree(config, max_tokens, max_batch, block_tables, inline_ints)
        heads = config.num_kv_heads
        if heads % self.world_size:
            raise ValueError(f"num_kv_heads {heads} does not split over {self.world_size} "
                             "ranks (each rank holds num_kv_heads / world_size heads)")
        if len(config.groups) != 1 or config.groups[0].kind != "full":
            raise ValueError("TensorParallelCache supports one full-attention layer group")
        if config.num_host_pages:
            raise ValueError("TensorParallelCache does not support a host tier "
                             "(num_host_pages)")
        if config.num_pages * config.page_size > 2**31 - 1:
            raise ValueError("num_pages * page_size must fit int32 (the step message's "
                             "slots)")
        per = heads // self.world_size
        self.heads = slice(self.rank * per, (self.rank + 1) * per)
        self.config = config
        self.cache = KVCache(dataclasses.replace(config, num_kv_heads=per), device,
                             framework=framework, pool=pool)
        self.metadata = self.cache.step_metadata(max_tokens, max_batch=max_batch,
                                                 block_tables=block_tables)
        if channel == "auto":
            channel = "host"
            if "nccl" in name and self.cache.device != "cpu":
                channel = "nccl" if _cupy_nccl() else "device"
        if channel in ("device", "nccl") and self.cache.device == "cpu":
            raise ValueError(f"channel={channel!r} needs a CUDA cache")
        if channel == "host" and not cpu_capable(dist, group):
            raise ValueError(f"process group backend {name!r} cannot broadcast a CPU "
                             "cache's step metadata; use gloo")
        codes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        mine = torch.tensor([("host", "device", "nccl").index(channel)], dtype=torch.int64)
        if cpu_capable(dist, group):
            dist.all_gather(codes, mine, group=group)
        else:   # a pure NCCL group: compare on the device
            dev = [c.to(self.cache.device) for c in codes]
            dist.all_gather(dev, mine.to(self.cache.device), group=group)
            codes = [c.cpu() for c in dev]
        if any(int(c) != int(mine) for c in codes):
            raise ValueError("the ranks resolved channel='auto' differently (some caches on "
                             "CUDA, some on the CPU?); pass the same channel everywhere")
        #: ``"host"`` (a CPU tensor over gloo) or ``"device"`` (over NCCL, read back on
        #: a side stream): how each step's message travels.
        self.channel = channel
        self._inline = int(inline_ints)
        kind = {"host": _HostChannel, "device": _DeviceChannel, "nccl": _CupyNcclChannel}
        self._chan = kind[channel](torch, dist, group, self.src, self._src_global,
                                   self._inline, self.cache.device)
        self._closed = False

    def _agree(self, config, max_tokens, max_batch, block_tables, inline_ints) -> None:
        """Every rank must pass the same arguments: compare them on every rank."""
        c = config
        mine = [*geometry(c), c.num_pages, c.max_seqs,
                c.max_pages_per_seq, int(c.enable_prefix_cache), int(max_tokens),
                -1 if max_batch is None else int(max_batch), int(bool(block_tables)),
                int(inline_ints), self.src]
        torch = self._torch
        where = ("cpu" if cpu_capable(self._dist, self._group)
                 else torch.device("cuda", torch.cuda.current_device()))
        local = torch.tensor(mine, dtype=torch.int64, device=where)
        every = [torch.zeros_like(local) for _ in range(self.world_size)]
        self._dist.all_gather(every, local, group=self._group)
        differ = [r for r, t in enumerate(every) if not self._torch.equal(t, local)]
        if differ:
            raise ValueError(f"ranks {differ} constructed TensorParallelCache with another "
                             f"config or capacities than rank {self.rank}")

    # -- who may call what ----------------------------------------------------------------

    @property
    def is_scheduler(self) -> bool:
        """Whether this rank owns the page table (``rank == src``)."""
        return self.rank == self.src

    def _scheduler(self, what: str):
        if not self.is_scheduler:
            raise ValueError(f"{what} runs on the scheduler rank {self.src} only (this is "
                             f"rank {self.rank})")
        if self._closed:
            raise ValueError("this TensorParallelCache is closed")
        return self.cache

    # -- bookkeeping, on the scheduler rank ---------------------------------------------------

    @property
    def table(self):
        """The page table (scheduler rank only)."""
        return self._scheduler("table").table

    def add_sequence(self, tokens=None, *, namespace: int = 0) -> int:
        """See :meth:`kvcore.KVCache.add_sequence` (scheduler rank only)."""
        return self._scheduler("add_sequence").add_sequence(tokens, namespace=namespace)

    def match_prefix(self, tokens, *, namespace: int = 0) -> int:
        """See :meth:`kvcore.KVCache.match_prefix` (scheduler rank only)."""
        return self._scheduler("match_prefix").match_prefix(tokens, namespace=namespace)

    def fork(self, seq_id: int) -> int:
        """See :meth:`kvcore.KVCache.fork` (scheduler rank only)."""
        return self._scheduler("fork").fork(seq_id)

    def remove(self, seq_id: int) -> None:
        """See :meth:`kvcore.KVCache.remove` (scheduler rank only)."""
        self._scheduler("remove").remove(seq_id)

    def truncate(self, seq_ids, num_tokens) -> None:
        """See :meth:`kvcore.KVCache.truncate` (scheduler rank only)."""
        self._scheduler("truncate").truncate(seq_ids, num_tokens)

    def num_tokens(self, seq_id: int) -> int:
        """See :meth:`kvcore.KVCache.num_tokens` (scheduler rank only)."""
        return self._scheduler("num_tokens").num_tokens(seq_id)

    def pages(self, seq_id: int):
        """See :meth:`kvcore.KVCache.pages` (scheduler rank only)."""
        return self._scheduler("pages").pages(seq_id)

    def pages_needed(self, seq_ids, num_new_tokens) -> int:
        """See :meth:`kvcore.KVCache.pages_needed` (scheduler rank only)."""
        return self._scheduler("pages_needed").pages_needed(seq_ids, num_new_tokens)

    @property
    def num_free_pages(self) -> int:
        """Free pages of the page table (scheduler rank only)."""
        return self._scheduler("num_free_pages").num_free_pages

    # -- the step -------------------------------------------------------------------------------

    def step(self, seq_ids=None, num_new_tokens=None, token_ids=None, *, batch=None):
        """One scheduler step on every rank: the scheduler appends and broadcasts, every
        rank applies.

        On the scheduler rank: ``append(seq_ids, num_new_tokens, token_ids)`` on the
        page table (copy-on-write copies enqueued on this rank's pool), the attention
        metadata of ``batch`` (default ``seq_ids``) filled into :attr:`metadata`, and the
        step's message broadcast. On every other rank: call ``step()`` with no
        arguments; it waits for the message, enqueues the copy-on-write copies on its
        pool and fills its :attr:`metadata` (one upload).

        Parameters
        ----------
        seq_ids, num_new_tokens, token_ids
            As :meth:`kvcore.PageTable.append` (scheduler rank only).
        batch : array_like of int, shape [B], optional
            The step's attention batch, as :meth:`kvcore.StepMetadata.update` takes it.

        Returns
        -------
        AppendResult or None
            The same ``slot_mapping`` (int64 [T]) and copy pairs on every rank; None on
            the other ranks once the scheduler called :meth:`close`.

        Raises
        ------
        ValueError
            Arguments on a non-scheduler rank; a closed cache.
        CapacityError
            More than ``max_batch`` sequences or ``max_tokens`` tokens (nothing changed,
            nothing sent); more page entries than the metadata holds, found after the
            append: the copies are still sent and applied everywhere, and every rank
            raises.
        UnknownSequenceError, OutOfPagesError, ValueError
            As :meth:`kvcore.PageTable.append`; nothing changed, nothing sent.
        """
        if not self.is_scheduler:
            if seq_ids is not None or num_new_tokens is not None or token_ids is not None \
                    or batch is not None:
                raise ValueError(f"rank {self.rank} is not the scheduler: call step() with "
                                 "no arguments")
            return self._receive()
        cache = self._scheduler("step")
        meta = self.metadata
        if seq_ids is None:
            seq_ids = ()
        if batch is None:
            batch = seq_ids
        num_batch = len(batch)
        if num_batch > meta.max_batch:
            raise CapacityError(f"batch of {num_batch} sequences exceeds max_batch "
                                f"{meta.max_batch}")
        if num_new_tokens is None:
            num_new_tokens = 0
        tokens = (int(num_new_tokens) * len(seq_ids) if isinstance(num_new_tokens, int)
                  else int(np.sum(num_new_tokens)))
        if tokens > meta.max_tokens:
            raise CapacityError(f"{tokens} tokens exceed max_tokens {meta.max_tokens}")
        result = cache.append(seq_ids, num_new_tokens, token_ids)
        indptr, indices, last = cache.table.flashinfer_metadata(batch)
        try:
            meta._fill(indptr, indices, last, result.slot_mapping, None)
        except Exception:
            self._broadcast(_FAILED, None, None, None, result)
            raise
        self._broadcast(_STEP, indptr, indices, last, result)
        return result

    def close(self) -> None:
        """Scheduler rank: tell the other ranks the steps are over (their :meth:`step`
        returns None). Other ranks: nothing. Idempotent."""
        if self.is_scheduler and not self._closed:
            self._broadcast(_STOP, None, None, None, None)
        self._closed = True

    def _broadcast(self, kind, indptr, indices, last, result) -> None:
        copies = 0 if result is None else len(result.copy_src)
        parts = [] if result is None else [result.copy_src, result.copy_dst]
        if kind == _STEP:
            parts = [indptr, last, indices, result.slot_mapping, *parts]
        b, nnz = (len(last), int(indptr[-1])) if kind == _STEP else (0, 0)
        t = len(result.slot_mapping) if kind == _STEP else 0
        head = np.array([_MAGIC, kind, b, nnz, t, copies, 0, 0], dtype=np.int32)
        body = (np.concatenate([p.astype(np.int32, copy=False) for p in parts])
                if parts else np.zeros(0, np.int32))
        self._chan.send(head, body)

    def _receive(self):
        if self._closed:
            return None
        head, body = self._chan.receive(_size)
        magic, kind, b, nnz, t, k = (int(x) for x in head[:6])
        if magic != _MAGIC or kind not in (_STEP, _STOP, _FAILED):
            raise RuntimeError(f"rank {self.rank} received a message that is not a "
                               f"TensorParallelCache step (magic {magic:#x}, kind {kind})")
        if kind == _STOP:
            self._closed = True
            return None
        pos = 0

        def take(n):
            nonlocal pos
            pos += n
            return body[pos - n:pos]

        if kind == _STEP:
            indptr, last, indices = take(b + 1), take(b), take(nnz)
            slots = take(t).astype(np.int64)
        copy_src, copy_dst = take(k), take(k)
        if k:
            self.cache.copy_pages(copy_src, copy_dst)
        if kind == _FAILED:
            raise CapacityError("the scheduler's step did not fit this StepMetadata after "
                                "its append; its copy-on-write copies were applied")
        self.metadata._fill(indptr, indices, last, slots, None)
        return AppendResult(slots, copy_src.copy(), copy_dst.copy())


def _cupy_nccl() -> bool:
    """Whether CuPy's NCCL bindings load here."""
    try:
        from cupy.cuda import nccl

        nccl.get_version()
    except Exception:
        return False
    return True


def _size(head) -> int:
    """Body length (int32 words) of a message with this header."""
    kind, b, nnz, t, k = (int(x) for x in head[1:6])
    return (b + 1 + b + nnz + t if kind == _STEP else 0) + 2 * k


class _Channel:
    """What every channel keeps: the group's ProcessGroup, whose own ``broadcast`` method
    is called (torch.distributed.broadcast's Python checks and logging cost tens of
    microseconds a call), and the root as a rank of the group."""

    def __init__(self, torch, dist, group, src, src_global, inline, device):
        self.torch, self.dist, self.inline = torch, dist, inline
        self.group, self.src_global = group, src_global
        self.pg = dist.group.WORLD if group is None else group
        self.opts = dist.BroadcastOptions()
        self.opts.rootRank = src

    def bcast(self, tensor):
        return self.pg.broadcast([tensor], self.opts)


class _HostChannel(_Channel):
    """Messages as CPU tensors (gloo): asynchronous on the scheduler, from a ring of
    ``_RING`` buffers each reused once its broadcast has left."""

    def __init__(self, torch, dist, group, src, src_global, inline, device):
        super().__init__(torch, dist, group, src, src_global, inline, device)
        self.ring = [(torch.zeros(inline, dtype=torch.int32), None) for _ in range(_RING)]
        self.next = 0

    def send(self, head, body) -> None:
        torch = self.torch
        slot = self.next
        self.next = (slot + 1) % _RING
        buf, works = self.ring[slot]
        for work in works or ():
            work.wait()            # that buffer's previous broadcast has left
        arr = buf.numpy()
        arr[:_HEADER] = head
        works = []
        extra = None
        if _HEADER + len(body) <= self.inline:
            arr[_HEADER:_HEADER + len(body)] = body
        else:
            extra = torch.from_numpy(body)
        works.append(self.bcast(buf))
        if extra is not None:
            works.append(self.bcast(extra))
            works.append(_Keep(extra))
        self.ring[slot] = (buf, works)

    def receive(self, size_of):
        buf = self.ring[0][0]
        self.bcast(buf).wait()
        arr = buf.numpy()
        size = size_of(arr[:_HEADER])
        if _HEADER + size <= self.inline:
            return arr[:_HEADER], arr[_HEADER:_HEADER + size].copy()
        extra = self.torch.empty(size, dtype=self.torch.int32)
        self.bcast(extra).wait()
        return arr[:_HEADER], extra.numpy()


class _DeviceChannel(_Channel):
    """Messages as device tensors (NCCL) on a side stream, so the broadcast waits for
    nothing the compute stream runs: the scheduler copies the message up (pinned ring,
    one copy) and broadcasts; the others receive it and copy it down, then wait for
    that side stream only."""

    def __init__(self, torch, dist, group, src, src_global, inline, device):
        super().__init__(torch, dist, group, src, src_global, inline, device)
        self.device = torch.device(device)
        self.side = torch.cuda.Stream(device=self.device)
        self.dev = torch.zeros(inline, dtype=torch.int32, device=self.device)
        self.ring = [torch.zeros(inline, dtype=torch.int32).pin_memory()
                     for _ in range(_RING)]
        self.events = [None] * _RING
        self.next = 0

    def send(self, head, body) -> None:
        torch = self.torch
        slot = self.next
        self.next = (slot + 1) % _RING
        if self.events[slot] is not None:
            self.events[slot].synchronize()     # its copy up ran long ago
        host = self.ring[slot]
        arr = host.numpy()
        arr[:_HEADER] = head
        inline = _HEADER + len(body) <= self.inline
        if inline:
            arr[_HEADER:_HEADER + len(body)] = body
        with torch.cuda.stream(self.side):
            self.dev.copy_(host, non_blocking=True)
            self.bcast(self.dev).wait()      # the side stream waits for NCCL's
            if not inline:
                extra = torch.from_numpy(body).to(self.device, non_blocking=False)
                self.bcast(extra).wait()
            event = torch.cuda.Event()
            event.record(self.side)
        self.events[slot] = event

    def receive(self, size_of):
        torch = self.torch
        host = self.ring[0]
        with torch.cuda.stream(self.side):
            self.bcast(self.dev).wait()
            host.copy_(self.dev, non_blocking=True)
        self.side.synchronize()
        arr = host.numpy()
        size = size_of(arr[:_HEADER])
        if _HEADER + size <= self.inline:
            return arr[:_HEADER].copy(), arr[_HEADER:_HEADER + size].copy()
        with torch.cuda.stream(self.side):
            extra = torch.empty(size, dtype=torch.int32, device=self.device)
            self.bcast(extra).wait()
            body = extra.cpu()
        return arr[:_HEADER].copy(), body.numpy()


class _CupyNcclChannel(_Channel):
    """Messages over NCCL called through CuPy's bindings (``cupy.cuda.nccl``): one
    ``cudaMemcpyAsync`` up and one ``ncclBroadcast`` on a side stream on the scheduler,
    a broadcast, one copy down and a wait for that stream on the others; a few
    microseconds of host time each, against tens for a torch.distributed call. Its own
    NCCL communicator (the unique id travels over ``group`` once, at construction)."""

    def __init__(self, torch, dist, group, src, src_global, inline, device):
        super().__init__(torch, dist, group, src, src_global, inline, device)
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as exc:
            raise ValueError(f"channel='nccl' needs CuPy with NCCL ({exc})") from exc
        self.cupy, self.nccl = cupy, nccl
        self.device_id = torch.device(device).index
        self.root = src
        box = [nccl.get_unique_id() if dist.get_rank(group) == src else None]
        dist.broadcast_object_list(box, src=src_global, group=group,
                                   device=None if "gloo" in str(dist.get_backend(group))
                                   else torch.device(device))
        with cupy.cuda.Device(self.device_id):
            self.comm = nccl.NcclCommunicator(dist.get_world_size(group), box[0],
                                              dist.get_rank(group))
            self.side = cupy.cuda.Stream(non_blocking=True)
            self.dev = cupy.zeros(inline, dtype=np.int32)
            self.pinned = [cupy.cuda.alloc_pinned_memory(inline * 4) for _ in range(_RING)]
            self.ring = [np.frombuffer(m, np.int32, inline) for m in self.pinned]
            self.events = [cupy.cuda.Event(block=False, disable_timing=True)
                           for _ in range(_RING)]
        self.used = [False] * _RING
        self.next = 0
        self.runtime = cupy.cuda.runtime

    def _up(self, host, dst, nbytes):
        self.runtime.memcpyAsync(dst, host.ctypes.data, nbytes,
                                 self.runtime.memcpyHostToDevice, self.side.ptr)

    def send(self, head, body) -> None:
        slot = self.next
        self.next = (slot + 1) % _RING
        if self.used[slot]:
            self.events[slot].synchronize()     # its copy up ran long ago
        arr = self.ring[slot]
        arr[:_HEADER] = head
        inline = _HEADER + len(body) <= self.inline
        if inline:
            arr[_HEADER:_HEADER + len(body)] = body
        with self.cupy.cuda.Device(self.device_id):
            self._up(arr, self.dev.data.ptr, self.inline * 4)
            self.comm.bcast(self.dev.data.ptr, self.inline, self.nccl.NCCL_INT32, self.root,
                            self.side.ptr)
            if not inline:
                extra = self.cupy.asarray(body)    # synchronous upload: rare
                self.comm.bcast(extra.data.ptr, len(body), self.nccl.NCCL_INT32,
                                self.root, self.side.ptr)
                self.side.synchronize()
            self.events[slot].record(self.side)
        self.used[slot] = True

    def receive(self, size_of):
        arr = self.ring[0]
        rt = self.runtime
        with self.cupy.cuda.Device(self.device_id):
            self.comm.bcast(self.dev.data.ptr, self.inline, self.nccl.NCCL_INT32, self.root,
                            self.side.ptr)
            rt.memcpyAsync(arr.ctypes.data, self.dev.data.ptr, self.inline * 4,
                           rt.memcpyDeviceToHost, self.side.ptr)
            self.side.synchronize()
            size = size_of(arr[:_HEADER])
            if _HEADER + size <= self.inline:
                return arr[:_HEADER].copy(), arr[_HEADER:_HEADER + size].copy()
            extra = self.cupy.empty(size, dtype=np.int32)
            self.comm.bcast(extra.data.ptr, size, self.nccl.NCCL_INT32, self.root,
                            self.side.ptr)
            self.side.synchronize()
            return arr[:_HEADER].copy(), self.cupy.asnumpy(extra)


class _Keep:
    """Holds a tensor until the ring slot is reused (``wait`` is a no-op)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def wait(self) -> None:
        pass
