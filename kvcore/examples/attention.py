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
    metadata : StepMetadata
        The step's kvcore metadata, uploaded once (slot mapping, page indices, block
        tables); read by every layer's ``write`` and by attention.
    """

    seq_ids: np.ndarray
    num_new: np.ndarray
    seq_lens: np.ndarray
    query_indptr: np.ndarray
    metadata: StepMetadata

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
        self._requests: list[tuple[int, int, int, torch.Tensor]] = []

    def plan(self, batch: StepBatch) -> None:
        """Read the step's block tables once: per request (query start, count, length,
        page ids)."""
        tables = _as_torch(batch.metadata.block_tables)
        self._requests = []
        for row in range(len(batch.seq_ids)):
            length = int(batch.seq_lens[row])
            num_pages = -(-length // self.page_size)
            pages = tables[row, :num_pages].long()
            self._requests.append((int(batch.query_indptr[row]), int(batch.num_new[row]),
                                   length, pages))

    def _keys_values(self, layer: int, pages: torch.Tensor, length: int):
        """K and V of one sequence, ``[length, H, D]`` each, read through its pages."""
        out = []
        for pool in (self.k_pools[layer], self.v_pools[layer]):
            block = pool[pages]                              # [n, S, H, D] or [n, H, S, D]
            if self.layout == "HND":
                block = block.transpose(1, 2)
            out.append(block.reshape(-1, *block.shape[2:])[:length])
        return out

    def run(self, layer: int, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the step's queries ``q [T, Hq, D]`` over their sequences' pages.

        Returns ``[T, Hq, D]`` in ``q``'s dtype; query ``i`` of a request with ``n`` new
        tokens and length ``L`` sits at position ``L - n + i`` and sees keys ``0..`` that.
        """
        out = torch.empty_like(q)
        for start, count, length, pages in self._requests:
            keys, values = self._keys_values(layer, pages, length)
            group = q.shape[1] // keys.shape[1]
            keys = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)     # [Hq, L, D]
            values = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
            queries = q[start:start + count].float().transpose(0, 1)               # [Hq, n, D]
            scores = queries @ keys.transpose(1, 2) * scaling                        # [Hq, n, L]
            query_pos = torch.arange(length - count, length, device=q.device)
            key_pos = torch.arange(length, device=q.device)
            scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
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
        device = self.k_pools[0].device
        self.dtype = self.k_pools[0].dtype
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(workspace_bytes, dtype=torch.uint8, device=device), kv_layout=cfg.layout)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(workspace_bytes, dtype=torch.uint8, device=device), kv_layout=cfg.layout)
        self._active = None

    def plan(self, batch: StepBatch) -> None:
        """Plan the step's attention (host metadata; FlashInfer copies it to the device)."""
        cfg = self.cache.config
        indptr, _, last_page_len = self.cache.flashinfer_metadata(batch.seq_ids)
        meta = batch.metadata
        indices = meta.page_indices[:meta.num_page_entries]    # uploaded once this step
        indptr, last_page_len = torch.from_numpy(indptr), torch.from_numpy(last_page_len)
        sizes = (self.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, cfg.page_size)
        if int(batch.num_new.max()) == 1:
            self.decode.plan(indptr, indices, last_page_len, *sizes,
                             q_data_type=self.dtype, kv_data_type=self.dtype)
            self._active = self.decode
        else:
            qo_indptr = torch.from_numpy(batch.query_indptr.astype(np.int32))
            self.prefill.plan(qo_indptr, indptr, indices, last_page_len, *sizes, causal=True,
                              q_data_type=self.dtype, kv_data_type=self.dtype)
            self._active = self.prefill

    def run(self, layer: int, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """``[T, Hq, D]`` attention output (FlashInfer's default scale is ``D ** -0.5``,
        the model's)."""
        if abs(scaling - self.cache.config.head_dim ** -0.5) > 1e-12:
            raise ValueError(f"FlashInferAttention assumes scale head_dim**-0.5, got {scaling}")
        return self._active.run(q.contiguous(), (self.k_pools[layer], self.v_pools[layer]))
