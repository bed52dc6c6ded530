"""kvcore: a paged KV-cache manager for LLM serving.

Host bookkeeping (:class:`PageAllocator`, :class:`PageTable`) is a Cython core that
needs no GPU; :class:`KVCache` adds the pool and its data movement on a NumPy or CUDA
(CuPy) backend. Importing kvcore never imports CuPy.
"""

from kvcore._core import AppendResult, PageAllocator, PageTable
from kvcore._prefix import EVENT_EVICTED, EVENT_HOST_EVICTED, EVENT_HOST_STORED, EVENT_STORED
from kvcore._swap import HostTier
from kvcore.cache import KVCache
from kvcore.config import KVCacheConfig
from kvcore.errors import (
    BackendUnavailableError,
    CapacityError,
    InvalidPageError,
    KernelError,
    KVCoreError,
    OutOfPagesError,
    RefcountError,
    RollbackError,
    SequenceStateError,
    ShapeError,
    TransferError,
    TransferPendingError,
    UnknownSequenceError,
)
from kvcore.groups import LayerGroup
from kvcore.retention import Retention, TokenRange
from kvcore.transfers import Transfer

__version__ = "0.1.0"

__all__ = [
    "AppendResult",
    "BackendUnavailableError",
    "CapacityError",
    "EVENT_EVICTED",
    "EVENT_HOST_EVICTED",
    "EVENT_HOST_STORED",
    "EVENT_STORED",
    "HostTier",
    "InvalidPageError",
    "KVCache",
    "KVCacheConfig",
    "KVCoreError",
    "KernelError",
    "LayerGroup",
    "OutOfPagesError",
    "PageAllocator",
    "PageTable",
    "RefcountError",
    "Retention",
    "RollbackError",
    "SequenceStateError",
    "ShapeError",
    "TokenRange",
    "Transfer",
    "TransferError",
    "TransferPendingError",
    "UnknownSequenceError",
    "__version__",
]
