"""kvcore beyond one GPU, on torch.distributed (NCCL between GPUs, gloo between CPUs).

- :class:`TensorParallelCache`: one page table on the scheduler rank drives N per-rank
  pools, each holding ``num_kv_heads / N`` heads of every page; each step's bookkeeping
  result is broadcast once.
- :func:`send_pages` / :func:`recv_pages`: whole sequences (every layer's K and V of
  their pages) move between the caches of two processes, e.g. from a prefill replica
  to a decode replica; the receiver allocates its own pages and its prefix cache
  learns the prompt.

Needs torch (the ``model`` extra, or any torch with ``torch.distributed``); importing
this module does not import torch. See ``docs/distributed.md``.
"""

from kvcore.distributed.tp import TensorParallelCache
from kvcore.distributed.transfer import TransferStats, recv_pages, send_pages
from kvcore.errors import TransferError

__all__ = ["TensorParallelCache", "TransferError", "TransferStats", "recv_pages",
           "send_pages"]
