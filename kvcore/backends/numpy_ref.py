"""The NumPy backend: clear, obviously correct data movement; the oracle for the GPU.

A backend only moves bytes. Everything it is given has been validated by
:class:`kvcore.KVCache` (shapes, dtypes, layer, slot and page ranges).
bfloat16 is stored and moved as uint16 words, so NumPy needs no bfloat16 dtype.
"""

from __future__ import annotations

import numpy as np

from kvcore._interop import bfloat16_as_int16
from kvcore.config import KVCacheConfig

__all__ = ["NumpyBackend", "storage_dtype"]


def storage_dtype(dtype_name: str) -> np.dtype:
    """NumPy dtype that stores ``dtype_name`` (bfloat16 as its raw uint16 words)."""
    return np.dtype({"float16": np.float16, "float32": np.float32,
                     "bfloat16": np.uint16}[dtype_name])


class NumpyBackend:
    """Pool in host memory, operations as NumPy indexing.

    Parameters
    ----------
    config : KVCacheConfig
        Shape of the pool.
    """

    name = "numpy"
    device = "cpu"
    xp = np
    array_type = np.ndarray

    def __init__(self, config: KVCacheConfig):
        self.config = config
        self.kv = np.zeros(config.pool_shape, dtype=storage_dtype(config.dtype))

    # -- arrays in and out ----------------------------------------------------------------

    def is_foreign_device_array(self, array) -> bool:
        """True for arrays that live on a GPU (which this backend cannot read)."""
        if hasattr(array, "__cuda_array_interface__"):
            return True
        device = getattr(array, "device", None)
        return getattr(device, "type", None) == "cuda"

    def asarray(self, array):
        return np.asarray(bfloat16_as_int16(array))

    def to_host(self, array) -> np.ndarray:
        return np.asarray(array)

    def synchronize(self) -> None:
        """Nothing to wait for."""

    def take_error_word(self) -> int:
        return 0  # host inputs are validated before they get here

    # -- data movement ----------------------------------------------------------------------

    def write(self, layer: int, k: np.ndarray, v: np.ndarray, slot_mapping: np.ndarray) -> None:
        """Scatter ``k``, ``v`` ``[T, H, D]`` to the slots in ``slot_mapping`` (-1 skipped)."""
        ps = self.config.page_size
        slots = np.asarray(slot_mapping, dtype=np.int64)
        keep = slots >= 0
        pages, offsets = np.divmod(slots[keep], ps)
        for which, src in ((0, k), (1, v)):
            pool = self.kv[layer, which]
            if self.config.layout == "NHD":
                pool[pages, offsets] = src[keep]          # pool [P, S, H, D]
            else:
                pool[pages, :, offsets] = src[keep]       # pool [P, H, S, D] -> [n, H, D]

    def gather(self, layer: int, page_indptr, page_indices, last_page_len, token_indptr,
               total_tokens: int, nnz: int):
        """Return K and V of every token of a batch, contiguous ``[total_tokens, H, D]``."""
        cfg = self.config
        total = total_tokens
        k_out = np.empty((total, cfg.num_kv_heads, cfg.head_dim), dtype=self.kv.dtype)
        v_out = np.empty_like(k_out)
        for b in range(len(last_page_len)):
            pages = page_indices[page_indptr[b]:page_indptr[b + 1]]
            start, stop = int(token_indptr[b]), int(token_indptr[b + 1])
            for which, out in ((0, k_out), (1, v_out)):
                chunk = self.kv[layer, which][pages]              # [n, S, H, D] or [n, H, S, D]
                if cfg.layout == "HND":
                    chunk = chunk.transpose(0, 2, 1, 3)           # -> [n, S, H, D]
                out[start:stop] = chunk.reshape(-1, cfg.num_kv_heads, cfg.head_dim)[
                    : stop - start]
        return k_out, v_out

    def copy_pages(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy page ``src[i]`` to ``dst[i]`` in every layer, K and V."""
        self.kv[:, :, dst] = self.kv[:, :, src]
