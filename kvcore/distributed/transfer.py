"""Page transfer between two caches in different processes (disaggregated serving).

A prefill replica computes a prompt's K/V and a decode replica continues the sequence:
:func:`send_pages` on one side and :func:`recv_pages` on the other move whole
sequences, every layer's K and V of their pages, over a ``torch.distributed`` process
group (NCCL between GPUs, gloo between CPU caches). Page ids differ on the two sides:
the receiver allocates its own.

The protocol, each step a message on the group:

1. sender -> receiver, header: int64 ``[MAGIC, VERSION, status, num_seqs, total_tokens,
   has_tokens, chunk_bytes, *geometry]`` (``geometry``: layers, KV heads, head dim, page
   size, dtype, layout); ``status`` is 0, or a refusal code when the sender's own input
   was invalid (the sender then raises its error and the receiver a
   :class:`~kvcore.errors.TransferError`, and nothing else is sent). Then the lengths
   and namespaces int64 ``[2, num_seqs]``, and the token ids int64 ``[total_tokens]``
   when the sender has them.
2. The receiver validates everything, and admits the transfer only if it surely fits:
   a free sequence slot for each sequence and ``sum(ceil(n_i / page_size))`` free
   pages, every page of the transfer (a prefix hit on a page that sits on the
   evictable list costs a free page when mapped, and the receiver cannot tell which
   hits do before mapping them, so it counts them all). Then it makes the sequences:
   ``add_sequence(tokens, namespace=ns)`` (mapping the pages its prefix cache already
   holds) and ``append`` of the rest with their token ids, which registers the full
   pages in its prefix cache. Reply int64 ``[status, hit_pages_0, ..., hit_pages_B-1]``.
3. The data: for each sequence the pages after its hit pages, in order, every layer,
   K and V, in chunks of at most ``chunk_bytes`` (see :func:`~kvcore.distributed._comm.
   chunk_plan`): the sender gathers a chunk into a staging buffer and sends it while
   it gathers the next (two staging buffers), the receiver receives a chunk while it
   scatters the previous one into its pages. A 16 GiB transfer in 64 MiB chunks is 256
   sends. That is the staged mode; the direct mode sends each run of pages consecutive
   on both sides straight between the pools (both sides know both page lists: the
   sender sends its own with the header, the receiver its own after the reply).

Arrival and failure. :func:`recv_pages` returns the new seq ids only once the data
has arrived: on CPU (gloo) it has, on CUDA the scatters are enqueued on torch's current
stream after the receives (NCCL), so everything queued on that stream afterwards reads
the pages complete; a reader on another stream orders itself after it, as for every
kvcore device call. If the data phase fails (the peer vanished, a timeout), the
receiver undoes its sequences before raising: they are truncated to their prefix hits
(which un-indexes every page the transfer registered) and removed, so its page table,
allocator and prefix index are as before. The sender reads pages only and never
changes its cache; it may remove the sequences once :func:`send_pages` has returned
(on CUDA, work queued afterwards on the current stream runs after the sends).

The cache must not be used by another thread during either call.
"""

from __future__ import annotations

import operator

import numpy as np

from kvcore.distributed._comm import (
    PoolIO,
    check_data_path,
    check_group,
    chunk_plan,
    control_device,
    geometry,
    torch_dist,
)
from kvcore.errors import (
    CapacityError,
    OutOfPagesError,
    TransferError,
)

__all__ = ["TransferStats", "recv_pages", "send_pages"]

MAGIC = 0x6B76636F7265   # "kvcore"
VERSION = 1
_HEADER_LEN = 15
#: ``mode`` values on the wire
_MODES = {"auto": 0, "staged": 1, "direct": 2}
#: auto picks direct (one send per run of consecutive pages per layer and K/V, no
#: staging) when it needs at most this many sends of at least DIRECT_MIN_BYTES on
#: average: 4,096 grouped sends of 4 MiB measured on 2 x H200 ran at 44-92% of one
#: contiguous send (bimodal; docs/distributed.md), so only few, large sends are
#: trusted to keep the wire busy
DIRECT_MAX_OPS = 256
DIRECT_MIN_BYTES = 16 << 20
_DIRECT_GROUP = 128      # sends per NCCL group call
DEFAULT_CHUNK_BYTES = 64 << 20

#: status codes of the header and the reply, and the TransferError reason of each
_OK = 0
_REASONS = {1: "sender", 2: "config", 3: "out_of_pages", 4: "capacity", 5: "tokens",
            6: "protocol"}
_CODES = {reason: code for code, reason in _REASONS.items()}


class TransferStats:
    """What one :func:`send_pages` / :func:`recv_pages` call moved.

    Attributes
    ----------
    seq_ids : numpy.ndarray of int64, shape [B]
        This side's seq ids, in the sender's order.
    hit_pages : numpy.ndarray of int64, shape [B]
        Leading pages of each sequence the receiver's prefix cache already held (not
        sent).
    num_pages, nbytes, num_chunks : int
        Pages moved (all layers, K and V), their bytes, and the data messages: staged
        chunks, or direct runs of consecutive pages (each one send per layer and K/V).
    mode : str
        ``"staged"`` or ``"direct"``.
    """

    __slots__ = ("hit_pages", "mode", "nbytes", "num_chunks", "num_pages", "seq_ids")

    def __init__(self, seq_ids, hit_pages, num_pages, nbytes, num_chunks, mode="staged"):
        self.mode = mode
        self.seq_ids = seq_ids
        self.hit_pages = hit_pages
        self.num_pages = num_pages
        self.nbytes = nbytes
        self.num_chunks = num_chunks

    def __repr__(self) -> str:
        return (f"TransferStats(seqs={len(self.seq_ids)}, pages={self.num_pages}, "
                f"hit_pages={int(self.hit_pages.sum())}, bytes={self.nbytes}, "
                f"{self.mode}={self.num_chunks})")


# -- the sender ---------------------------------------------------------------------------------

def send_pages(cache, seq_ids, dst: int, *, token_ids=None, namespaces=0, group=None,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, mode: str = "auto") -> TransferStats:
    """Send whole sequences (every layer's K and V of their pages) to ``dst``, whose
    :func:`recv_pages` makes them there.

    Parameters
    ----------
    cache : KVCache
        The sender's cache (CPU with gloo, CUDA with NCCL). Read, never changed.
    seq_ids : array_like of int, shape [B]
        Distinct resident sequences, in the order the receiver returns them.
    dst : int
        The receiver's rank in ``group``.
    token_ids : sequence of B array_like of int, optional
        Each sequence's token ids (``num_tokens(seq)`` of them, ``[0, 2**31 - 1]``):
        the receiver's prefix cache maps what it already holds (those pages are not
        sent) and registers the rest, so its later prompts with the same prefix hit.
        Without them the receiver caches nothing.
    namespaces : int or array_like of int, shape [B]
        The receiver's prefix-cache namespace of each sequence.
    group : ProcessGroup, optional
        Default: the default group.
    chunk_bytes : int
        Largest data message of the staged mode (default 64 MiB); at least one page of
        one layer, K and V.
    mode : {"auto", "staged", "direct"}
        How the data moves. ``"staged"``: gathered into staging buffers and sent in
        chunks (any page order). ``"direct"``: each run of pages consecutive on both
        sides is sent straight from one pool into the other, one send per run, layer
        and K/V, grouped (no staging; needs both pools' per-layer views contiguous,
        else staged). ``"auto"`` (default): direct when that takes at most
        ``DIRECT_MAX_OPS`` (256) sends averaging ``DIRECT_MIN_BYTES`` (16 MiB) or
        more, else staged.

    Returns
    -------
    TransferStats

    Raises
    ------
    UnknownSequenceError, SequenceStateError, ValueError, TypeError
        Invalid ``seq_ids``, ``token_ids`` or ``namespaces``: the receiver is told (it
        raises :class:`TransferError`) and nothing moves.
    TransferError
        The receiver refused (``reason`` says why: ``"config"``, ``"out_of_pages"``,
        ``"capacity"``, ``"tokens"``) or the data could not be sent (``"failed"``).
        Nothing changed on either side.

    Notes
    -----
    The handshake waits for the receiver's reply (on a pure NCCL group that reads a
    device tensor back, so it waits for the current stream). On CUDA the gathers and
    sends are queued on torch's current stream and NCCL's; when this returns the
    current stream is ordered after the last send, so pages may be reused (the
    sequences removed) right away.
    """
    torch, dist = torch_dist()
    check_group(dist, group)
    check_data_path(dist, group, cache)
    dst = _rank(dist, group, dst, "dst")
    ctrl = control_device(dist, group, cache)
    chunk_bytes = _chunk_bytes(chunk_bytes, cache.config)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    io = PoolIO(cache, torch)
    try:
        seqs, lens, ns, tokens = _sender_input(cache, seq_ids, token_ids, namespaces)
    except Exception:
        header = _header(cache.config, _CODES["sender"], 0, 0, False, chunk_bytes)
        _send(torch, dist, header, dst, group, ctrl)
        raise
    header = _header(cache.config, _OK, len(seqs), int(lens.sum()), tokens is not None,
                     chunk_bytes, _MODES[mode], io.contiguous)
    _send(torch, dist, header, dst, group, ctrl)
    _send(torch, dist, np.stack([lens, ns]), dst, group, ctrl)
    if tokens is not None:
        _send(torch, dist, tokens, dst, group, ctrl)
    _send(torch, dist, _pages_after(cache, seqs, np.zeros(len(seqs), np.int64)), dst, group,
          ctrl)
    reply = _recv(torch, dist, 2 + len(seqs), dst, group, ctrl)
    if reply[0] != _OK:
        reason = _REASONS.get(int(reply[0]), "protocol")
        raise TransferError(f"rank {dst} refused the transfer of {len(seqs)} sequences "
                            f"({reason})", reason)
    hits = reply[2:].astype(np.int64)
    pages = _pages_after(cache, seqs, hits)
    theirs = _recv(torch, dist, len(pages), dst, group, ctrl).astype(np.int32)
    cfg = cache.config
    plan = _data_plan(cfg, _MODES[mode], io.contiguous and bool(reply[1]), pages, theirs,
                      chunk_bytes)
    try:
        if plan[0] == "direct":
            _direct(torch, dist, io, plan[1], dst, group, send=True)
        else:
            _send_data(torch, dist, io, pages, plan[1], dst, group)
    except Exception as exc:
        raise TransferError(f"sending pages to rank {dst} failed: {exc}", "failed") from exc
    return TransferStats(seqs, hits, len(pages), _nbytes(cfg, len(pages)), len(plan[1]),
                         plan[0])


def _send_data(torch, dist, io: PoolIO, pages, plan, dst, group) -> None:
    """Gather chunk i + 1 while chunk i is on the wire (two staging buffers)."""
    if not plan:
        return
    index = io.index(pages)
    elems = max((b - a) * 2 * (q - p) for a, b, p, q in plan) * int(np.prod(io.page_shape))
    buffers = [io.staging(elems) for _ in range(min(2, len(plan)))]
    works = []
    for i, (a, b, p, q) in enumerate(plan):
        if i >= 2:
            works[i - 2].wait()     # that buffer's send is done (on CUDA: stream-ordered)
        block = io.block(buffers[i % 2], b - a, q - p)
        io.gather(block, a, index[p:q])
        works.append(dist.isend(io.wire(block), dst, group=group))
    for work in works[-2:]:
        work.wait()


# -- the receiver -------------------------------------------------------------------------------

def recv_pages(cache, src: int, *, group=None) -> TransferStats:
    """Receive the sequences :func:`send_pages` on rank ``src`` sends, as new sequences
    of ``cache``.

    Parameters
    ----------
    cache : KVCache
        The receiver's cache: the sender's geometry (layers, KV heads, head dim, page
        size, dtype, layout), one full-attention layer group, and no prefix offload to
        a host tier.
    src : int
        The sender's rank in ``group``.
    group : ProcessGroup, optional
        Default: the default group.

    Returns
    -------
    TransferStats
        ``seq_ids`` are the new sequences, in the sender's order; each holds the
        sender's length, with prefix hits mapped from this cache and every other page's
        bytes received.

    Raises
    ------
    OutOfPagesError, CapacityError, ValueError, TypeError
        The transfer does not fit, or its token ids or namespaces are invalid here (the
        sender gets a :class:`TransferError`); nothing changed.
    TransferError
        The pools differ (``"config"``), the sender's input was invalid (``"sender"``),
        a message was not kvcore's (``"protocol"``), or the data did not arrive
        (``"failed"``: the new sequences were undone first). Nothing changed.
    """
    torch, dist = torch_dist()
    check_group(dist, group)
    check_data_path(dist, group, cache)
    src = _rank(dist, group, src, "src")
    ctrl = control_device(dist, group, cache)
    header = _recv(torch, dist, _HEADER_LEN, src, group, ctrl)
    if header[0] != MAGIC or header[1] != VERSION:
        raise TransferError(f"rank {src} sent a message that is not a kvcore transfer "
                            f"header (magic {int(header[0]):#x}, version {int(header[1])})",
                            "protocol")
    if header[2] != _OK:
        raise TransferError(f"rank {src} aborted the transfer: its input was invalid",
                            "sender")
    num_seqs, total, has_tokens, chunk_bytes = (int(header[3]), int(header[4]),
                                                bool(header[5]), int(header[6]))
    mode, sender_direct = int(header[7]), bool(header[8])
    lens, ns = _recv(torch, dist, 2 * num_seqs, src, group, ctrl).reshape(2, num_seqs)
    tokens = _recv(torch, dist, total, src, group, ctrl) if has_tokens else None
    cfg = cache.config
    page_counts = -(-lens // max(int(header[12]), 1))       # the sender's page size
    theirs_all = _recv(torch, dist, int(page_counts.sum()), src, group, ctrl).astype(np.int32)
    io = PoolIO(cache, torch)
    try:
        if list(header[9:]) != geometry(cfg):
            raise ValueError(f"the sender's pool (layers, KV heads, head dim, page size, "
                             f"dtype, layout) = {_describe(header[9:])} differs from this "
                             f"cache's {_describe(geometry(cfg))}")
        _check_receiver(cache)
        _admit(cache, lens, ns, tokens)
    except Exception as exc:
        _send(torch, dist, np.array([_refusal(exc)] + [0] * (num_seqs + 1)), src, group,
              ctrl)
        raise
    seqs, hits = _make_sequences(cache, lens, ns, tokens)
    pages = _pages_after(cache, seqs, hits)
    starts = np.concatenate([[0], np.cumsum(page_counts)[:-1]]).astype(np.int64)
    theirs = (np.concatenate([theirs_all[a + h:a + c] for a, h, c in
                              zip(starts, hits, page_counts, strict=True)])
              if num_seqs else np.zeros(0, np.int32))
    plan = _data_plan(cfg, mode, sender_direct and io.contiguous, theirs, pages, chunk_bytes)
    try:
        _send(torch, dist, np.concatenate([[_OK, int(io.contiguous)], hits]), src, group,
              ctrl)
        _send(torch, dist, pages, src, group, ctrl)
        if plan[0] == "direct":
            _direct(torch, dist, io, plan[1], src, group, send=False)
        else:
            _recv_data(torch, dist, io, pages, plan[1], src, group)
    except Exception as exc:
        _undo(cache, seqs, hits)
        raise TransferError(f"receiving pages from rank {src} failed: {exc}; the "
                            f"{len(seqs)} new sequences were undone", "failed") from exc
    return TransferStats(seqs, hits, len(pages), _nbytes(cfg, len(pages)), len(plan[1]),
                         plan[0])


def _recv_data(torch, dist, io: PoolIO, pages, plan, src, group) -> None:
    """Receive chunk i + 1 while chunk i is scattered into the pages."""
    if not plan:
        return
    index = io.index(pages)
    elems = max((b - a) * 2 * (q - p) for a, b, p, q in plan) * int(np.prod(io.page_shape))
    buffers = [io.staging(elems) for _ in range(min(2, len(plan)))]
    blocks, works = {}, {}

    def post(i):
        a, b, p, q = plan[i]
        blocks[i] = io.block(buffers[i % 2], b - a, q - p)
        # On CUDA the receive waits for the current stream, where the scatter of the
        # chunk that last used this buffer was queued: no overwrite before it is read.
        works[i] = dist.irecv(io.wire(blocks[i]), src, group=group)

    for i in range(min(2, len(plan))):
        post(i)
    for i, (a, _, p, q) in enumerate(plan):
        works.pop(i).wait()
        io.scatter(blocks.pop(i), a, index[p:q])
        if i + 2 < len(plan):
            post(i + 2)


def _data_plan(cfg, mode: int, direct_ok: bool, src_pages, dst_pages, chunk_bytes):
    """``("direct", runs)`` or ``("staged", chunks)``; both sides compute the same from the
    same page lists (``src_pages`` the sender's, ``dst_pages`` the receiver's)."""
    page_layer = cfg.page_elems * cfg.itemsize
    if mode != _MODES["staged"] and direct_ok:
        runs = page_runs(src_pages, dst_pages)
        ops = len(runs) * 2 * cfg.num_layers
        if mode == _MODES["direct"] or (
                0 < ops <= DIRECT_MAX_OPS
                and len(src_pages) * 2 * cfg.num_layers * page_layer >= ops * DIRECT_MIN_BYTES):
            return "direct", runs
    return "staged", chunk_plan(cfg.num_layers, len(src_pages), page_layer, chunk_bytes)


def page_runs(src, dst) -> list[tuple[int, int, int]]:
    """Maximal runs where both page lists go up by one: ``(src_start, dst_start, length)``.

    Examples
    --------
    >>> page_runs(np.array([4, 5, 6, 9, 10]), np.array([0, 1, 7, 8, 9]))
    [(4, 0, 2), (6, 7, 1), (9, 8, 2)]
    """
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    if len(src) == 0:
        return []
    cut = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(src)]])
    return [(int(src[a]), int(dst[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def _direct(torch, dist, io: PoolIO, runs, peer, group, *, send: bool) -> None:
    """One send (or receive) per run, layer and K/V, straight between the pools; on NCCL
    all of them in one group (``batch_isend_irecv``)."""
    op = dist.isend if send else dist.irecv
    tensors = [io.region(pool, layer, (s if send else d), n)
               for s, d, n in runs for layer in range(len(io.k)) for pool in (io.k, io.v)]
    works = []
    for i in range(0, len(tensors), _DIRECT_GROUP):
        batch = tensors[i:i + _DIRECT_GROUP]
        if io.cuda:   # NCCL moves one group while the host builds the next
            works += dist.batch_isend_irecv([dist.P2POp(op, t, peer, group) for t in batch])
        else:
            works += [op(t, peer, group=group) for t in batch]
    for work in works:
        work.wait()


def _pages_after(cache, seqs, hits) -> np.ndarray:
    """Each sequence's pages after its hit pages, in order: what moves (int32 [n])."""
    parts = [cache.pages(int(s))[int(h):] for s, h in zip(seqs, hits, strict=True)]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def _check_receiver(cache) -> None:
    cfg = cache.config
    if len(cfg.groups) != 1 or cfg.groups[0].kind != "full":
        raise ValueError("kvcore.distributed moves caches of one full-attention layer group "
                         "(no layer_groups)")
    _refuse_side_pool(cfg)
    if cfg.num_host_pages and cfg.enable_prefix_cache:
        raise ValueError("a receiver with prefix caching and a host tier is not supported "
                         "(a prefix hit there may wait for a load from the host tier)")


def _admit(cache, lens, ns, tokens) -> None:
    """Raise unless the sequences surely fit; changes nothing."""
    cfg, table = cache.config, cache.table
    if len(lens) > cfg.max_seqs - table.num_seqs:
        raise CapacityError(f"{len(lens)} sequences do not fit: {table.num_seqs} of "
                            f"{cfg.max_seqs} sequence slots are in use")
    need = -(-lens // cfg.page_size)
    if len(lens) and int(need.max()) > cfg.max_pages_per_seq:
        raise CapacityError(f"a sequence of {int(lens.max())} tokens needs "
                            f"{int(need.max())} pages, above max_pages_per_seq "
                            f"{cfg.max_pages_per_seq}")
    if int(need.sum()) > cache.allocator.num_free:
        raise OutOfPagesError(int(need.sum()), cache.allocator.num_free)
    if tokens is not None:
        start = 0
        for n, space in zip(lens.tolist(), ns.tolist(), strict=True):
            table.match_prefix(tokens[start:start + n], namespace=space)   # validates
            start += n
    else:
        for space in ns.tolist():
            table.match_prefix([], namespace=space)


def _make_sequences(cache, lens, ns, tokens):
    """Add and extend the sequences (admitted: nothing here raises)."""
    table, page_size = cache.table, cache.config.page_size
    seqs = np.zeros(len(lens), dtype=np.int64)
    hits = np.zeros(len(lens), dtype=np.int64)
    start = 0
    for i, (n, space) in enumerate(zip(lens.tolist(), ns.tolist(), strict=True)):
        own = None if tokens is None else tokens[start:start + n]
        seq = table.add_sequence(own, namespace=space)
        hit = table.num_tokens(seq)
        table.append([seq], [n - hit], None if own is None else own[hit:])
        seqs[i], hits[i] = seq, hit // page_size
        start += n
    return seqs, hits


def _undo(cache, seqs, hits) -> None:
    """Remove the sequences a failed transfer made, newest first; truncating to the
    prefix hits first un-indexes the pages the transfer registered."""
    table, page_size = cache.table, cache.config.page_size
    for seq, hit in zip(seqs[::-1].tolist(), hits[::-1].tolist(), strict=True):
        table.truncate([seq], [hit * page_size])
        table.remove(seq)


def _refusal(exc: BaseException) -> int:
    if isinstance(exc, OutOfPagesError):
        return _CODES["out_of_pages"]
    if isinstance(exc, CapacityError):
        return _CODES["capacity"]
    if isinstance(exc, ValueError) and "sender's pool" in str(exc):
        return _CODES["config"]
    if isinstance(exc, ValueError) and "not supported" in str(exc):
        return _CODES["config"]
    if isinstance(exc, ValueError) and "one full-attention" in str(exc):
        return _CODES["config"]
    return _CODES["tokens"]


# -- helpers ------------------------------------------------------------------------------------

def _refuse_side_pool(cfg) -> None:
    # The wire carries K/V pages only: a page sent without its per-(token, head) scales
    # would dequantize with the receiver's stale ones.
    if cfg.token_head_scales:
        raise ValueError("moving fp8 pages with per-(token, head) scales "
                         "(kv_scale_granularity='token_head') is not supported by "
                         "kvcore.distributed: the scale side pool does not travel")


def _sender_input(cache, seq_ids, token_ids, namespaces):
    cfg = cache.config
    if len(cfg.groups) != 1 or cfg.groups[0].kind != "full":
        raise ValueError("kvcore.distributed moves caches of one full-attention layer group "
                         "(no layer_groups)")
    _refuse_side_pool(cfg)
    from kvcore._checks import host_index_array

    seqs = host_index_array(seq_ids, "seq_ids").astype(np.int64)
    if len(np.unique(seqs)) != len(seqs):
        raise ValueError("seq_ids must be distinct")
    for seq in seqs.tolist():
        state = cache.seq_state(seq)      # UnknownSequenceError for an inactive one
        if state != "resident":
            from kvcore.errors import SequenceStateError
            raise SequenceStateError(seq, state, f"seq_id {seq} is {state}, not resident")
    lens = np.array([cache.num_tokens(s) for s in seqs.tolist()], dtype=np.int64)
    if isinstance(namespaces, (int, np.integer)) and not isinstance(namespaces, bool):
        ns = np.full(len(seqs), int(namespaces), dtype=np.int64)
    else:
        ns = host_index_array(namespaces, "namespaces").astype(np.int64)
        if len(ns) != len(seqs):
            raise ValueError(f"namespaces has {len(ns)} entries for {len(seqs)} sequences")
    tokens = None
    if token_ids is not None:
        if len(token_ids) != len(seqs):
            raise ValueError(f"token_ids has {len(token_ids)} entries for {len(seqs)} "
                             "sequences")
        parts = []
        for seq, n, ids in zip(seqs.tolist(), lens.tolist(), token_ids, strict=True):
            arr = host_index_array(ids, "token_ids").astype(np.int64)
            if len(arr) != n:
                raise ValueError(f"token_ids of seq_id {seq} has {len(arr)} ids for its "
                                 f"{n} tokens")
            if len(arr) and (arr.min() < 0 or arr.max() > 2**31 - 1):
                raise ValueError(f"token_ids of seq_id {seq} holds an id outside "
                                 "[0, 2**31 - 1]")
            parts.append(arr)
        tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return seqs, lens, ns, tokens


def _header(cfg, status, num_seqs, total, has_tokens, chunk_bytes, mode=0,
            direct_ok=False) -> np.ndarray:
    return np.array([MAGIC, VERSION, status, num_seqs, total, int(has_tokens), chunk_bytes,
                     mode, int(direct_ok), *geometry(cfg)], dtype=np.int64)


def _send(torch, dist, array, dst, group, device) -> None:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64).reshape(-1))
    if tensor.numel():      # the receiver knows the length and skips empty messages too
        dist.send(tensor.to(device), dst, group=group)


def _recv(torch, dist, n: int, src, group, device) -> np.ndarray:
    tensor = torch.empty(n, dtype=torch.int64, device=device)
    if n:
        dist.recv(tensor, src, group=group)
    return tensor.cpu().numpy()


def _rank(dist, group, rank, name: str) -> int:
    if isinstance(rank, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    rank = operator.index(rank)
    size, me = dist.get_world_size(group), dist.get_rank(group)
    if not 0 <= rank < size or rank == me:
        raise ValueError(f"{name} {rank} is not another rank of the group [0, {size}) "
                         f"(this is rank {me})")
    # torch.distributed's point-to-point calls take global ranks
    return rank if group is None else dist.get_global_rank(group, rank)


def _chunk_bytes(chunk_bytes, cfg) -> int:
    if isinstance(chunk_bytes, bool):
        raise TypeError("chunk_bytes must be an integer, got bool")
    chunk_bytes = operator.index(chunk_bytes)
    least = 2 * cfg.page_elems * cfg.itemsize
    if chunk_bytes < least:
        raise ValueError(f"chunk_bytes {chunk_bytes} is below one page of one layer, K and V "
                         f"({least} bytes)")
    return chunk_bytes


def _nbytes(cfg, num_pages: int) -> int:
    return num_pages * cfg.num_layers * 2 * cfg.page_elems * cfg.itemsize


def _describe(fields) -> str:
    names = {v: k for k, v in {"float16": 0, "bfloat16": 1, "float32": 2}.items()}
    layers, heads, dim, page, dtype, layout = (int(x) for x in fields)
    return (f"({layers}, {heads}, {dim}, {page}, {names.get(dtype, dtype)}, "
            f"{'NHD' if layout == 0 else 'HND'})")
