"""Paged attention over kvcore's pool, as a serving engine runs it.

Each backend is planned once per step (from the step's kvcore metadata) and then run
once per layer. Both read only what kvcore provides: the pool views
``KVCache.k_cache(layer)`` / ``v_cache(layer)`` and the step's metadata (block tables,
or FlashInfer's page indptr / indices / last-page lengths).

- :class:`TorchPagedAttention`: a reference in plain torch, on the CPU or a GPU. Each
  request's keys and values are read by indexing the pool with its row of the step's
  ``block_tables``; attention is computed in float32 with an explicit causal mask.
- :class:`FlashInferAttention`: FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper``
  for steps with prefill chunks, ``BatchDecodeWithPagedKVCacheWrapper`` for steps of
  decode tokens only, reading the pool in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcore import KVCache
from kvcore.metadata import StepMetadata


@dataclass
class StepBatch:
    """One engine step as attention needs it.

    Attributes
    ----------
    seq_ids : numpy.ndarray, int32 [B]
        The step's sequences, in the order their tokens are packed.
    num_new : numpy.ndarray, int64 [B]
        New tokens of each sequence this step (its queries).
    seq_lens : numpy.ndarray, int64 [B]
        Each sequence's length after this step's append (its keys).
    query_indptr : numpy.ndarray, int64 [B + 1]
        Where each sequence's queries start in the packed ``[T, ...]`` arrays.
    metadata : list of StepMetadata
        One per layer group, uploaded once each this step (slot mapping, page indices,
        block tables); a window group's covers its live window.
    first_pages : list of numpy.ndarray, int64 [B]
        Per group, each sequence's first mapped column (0 but in a window group): its
        metadata's page 0 holds tokens from ``first_pages[g][b] * page_size`` on.
    """

    seq_ids: np.ndarray
    num_new: np.ndarray
    seq_lens: np.ndarray
    query_indptr: np.ndarray
    metadata: list[StepMetadata]
    first_pages: list[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return int(self.query_indptr[-1])


def _as_torch(array, dtype: str | None = None):
    """A torch view of a kvcore array (NumPy on the CPU backend, torch on CUDA); a CPU
    bfloat16 pool, stored as 16-bit words, is viewed as ``torch.bfloat16``."""
    if not isinstance(array, np.ndarray):
        return array
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


class TorchPagedAttention:
    """Reference paged attention in torch, reading K/V through the step's block tables.

    Parameters
    ----------
    cache : KVCache
        A CPU cache or a CUDA cache with ``framework="torch"``; its step metadata must
        keep ``block_tables`` (the default).
    """

    name = "torch-reference"

    def __init__(self, cache: KVCache):
        cfg = cache.config
        self.cache = cache
        self.page_size, self.layout = cfg.page_size, cfg.layout
        self.k_pools = [_as_torch(cache.k_cache(layer), cfg.dtype)
                        for layer in range(cfg.num_layers)]
        self.v_pools = [_as_torch(cache.v_cache(layer), cfg.dtype)
                        for layer in range(cfg.num_layers)]
        self.group_of = [cfg.layer_group(layer) for layer in range(cfg.num_layers)]
        self.windows = [group.window for group in cfg.groups]
        # Per group, per request: (query start, count, length, first key position, pages).
        self._requests: list[list[tuple[int, int, int, int, torch.Tensor]]] = []

    def plan(self, batch: StepBatch) -> None:
        """Read each group's block tables once per step."""
        self._requests = []
        for group, metadata in enumerate(batch.metadata):
            tables = _as_torch(metadata.block_tables)
            requests = []
            for row in range(len(batch.seq_ids)):
                length = int(batch.seq_lens[row])
                first = int(batch.first_pages[group][row]) * self.page_size
                num_pages = -(-(length - first) // self.page_size)
                pages = tables[row, :num_pages].long()
                requests.append((int(batch.query_indptr[row]), int(batch.num_new[row]),
                                 length, first, pages))
            self._requests.append(requests)

    def _keys_values(self, layer: int, pages: torch.Tensor, count: int):
        """K and V of ``count`` tokens read through ``pages``, ``[count, H, D]`` each."""
        out = []
        for pool in (self.k_pools[layer], self.v_pools[layer]):
            block = pool[pages]                              # [n, S, H, D] or [n, H, S, D]
            if self.layout == "HND":
                block = block.transpose(1, 2)
            out.append(block.reshape(-1, *block.shape[2:])[:count])
        return out

    def run(self, layer: int, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the step's queries ``q [T, Hq, D]`` over their sequences' pages.

        Returns ``[T, Hq, D]`` in ``q``'s dtype; query ``i`` of a request with ``n`` new
        tokens and length ``L`` sits at position ``L - n + i`` and sees the keys at or
        before it (within the last ``window`` for a window layer).
        """
        group = self.group_of[layer]
        window = self.windows[group]
        out = torch.empty_like(q)
        for start, count, length, first, pages in self._requests[group]:
            keys, values = self._keys_values(layer, pages, length - first)
            heads = q.shape[1] // keys.shape[1]
            keys = keys.float().repeat_interleave(heads, dim=1).transpose(0, 1)     # [Hq, L, D]
            values = values.float().repeat_interleave(heads, dim=1).transpose(0, 1)
            queries = q[start:start + count].float().transpose(0, 1)               # [Hq, n, D]
            scores = queries @ keys.transpose(1, 2) * scaling                        # [Hq, n, L]
            query_pos = torch.arange(length - count, length, device=q.device)[:, None]
            key_pos = torch.arange(first, length, device=q.device)[None, :]
            hidden = key_pos > query_pos
            if window is not None:
                hidden |= query_pos - key_pos >= window
            scores.masked_fill_(hidden, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[start:start + count] = (probs @ values).transpose(0, 1).to(q.dtype)
        return out


class FlashInferAttention:
    """FlashInfer's paged attention reading kvcore's pool in place (CUDA, torch).

    Steps with any prefill chunk use ``BatchPrefillWithPagedKVCacheWrapper`` (ragged
    queries, causal); steps of decode tokens only use ``BatchDecodeWithPagedKVCacheWrapper``.
    Planned once per step from kvcore's FlashInfer metadata: page indptr and last-page
    lengths from the host table, page indices from the step's device metadata.

    Parameters
    ----------
    cache : KVCache
        A CUDA cache with ``framework="torch"`` (fp16 or bf16).
    num_qo_heads : int
        Query heads of the model (``num_kv_heads`` and sizes come from the cache).
    workspace_bytes : int
        FlashInfer's float workspace per wrapper.
    """

    name = "flashinfer"

    def __init__(self, cache: KVCache, num_qo_heads: int, workspace_bytes: int = 128 << 20):
        import flashinfer

        cfg = cache.config
        if cache.framework != "torch":
            raise ValueError("FlashInferAttention needs a CUDA cache with framework='torch'")
        self.cache, self.num_qo_heads = cache, num_qo_heads
        self.k_pools = [cache.k_cache(layer) for layer in range(cfg.num_layers)]
        self.v_pools = [cache.v_cache(layer) for layer in range(cfg.num_layers)]
        self.group_of = [cfg.layer_group(layer) for layer in range(cfg.num_layers)]
        self.windows = [group.window for group in cfg.groups]
        device = self.k_pools[0].device
        self.dtype = self.k_pools[0].dtype
        # One float workspace for every wrapper: their runs are ordered on one stream.
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self.prefill = [flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace,
                                                                       kv_layout=cfg.layout)
                        for _ in cfg.groups]
        self.decode = [flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace,
                                                                     kv_layout=cfg.layout)
                       for _ in cfg.groups]
        self._active = [None] * len(cfg.groups)

    def plan(self, batch: StepBatch) -> None:
        """Plan the step's attention for every group (host metadata; FlashInfer copies it
        to the device). A window group's pages are its live window; ``window_left`` keeps
        each query to the last ``window`` tokens."""
        cfg = self.cache.config
        sizes = (self.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, cfg.page_size)
        decode_only = int(batch.num_new.max()) == 1
        qo_indptr = torch.from_numpy(batch.query_indptr.astype(np.int32))
        for group, meta in enumerate(batch.metadata):
            indptr, _, last_page_len = self.cache.flashinfer_metadata(batch.seq_ids,
                                                                      group=group)
            indices = meta.page_indices[:meta.num_page_entries]    # uploaded once this step
            indptr, last_page_len = torch.from_numpy(indptr), torch.from_numpy(last_page_len)
            window_left = -1 if self.windows[group] is None else self.windows[group] - 1
            if decode_only:
                self.decode[group].plan(indptr, indices, last_page_len, *sizes,
                                        window_left=window_left, q_data_type=self.dtype,
                                        kv_data_type=self.dtype)
                self._active[group] = self.decode[group]
            else:
                self.prefill[group].plan(qo_indptr, indptr, indices, last_page_len, *sizes,
                                         causal=True, window_left=window_left,
                                         q_data_type=self.dtype, kv_data_type=self.dtype)
                self._active[group] = self.prefill[group]

    def run(self, layer: int, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """``[T, Hq, D]`` attention output (FlashInfer's default scale is ``D ** -0.5``,
        the model's)."""
        if abs(scaling - self.cache.config.head_dim ** -0.5) > 1e-12:
            raise ValueError(f"FlashInferAttention assumes scale head_dim**-0.5, got {scaling}")
        return self._active[self.group_of[layer]].run(
            q.contiguous(), (self.k_pools[layer], self.v_pools[layer]))
