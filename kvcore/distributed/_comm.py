"""What the distributed module needs of torch.distributed and of a cache's pool.

torch is imported lazily (``import kvcore`` never imports it). A process group carries
two kinds of traffic: small control messages (headers, replies, a step's metadata),
which go as CPU tensors when the group's backend can carry them (gloo, or a
``"cpu:gloo,cuda:nccl"`` group) and as device tensors otherwise (a pure NCCL group);
and page data, which goes as tensors of the pool's own device.
"""

from __future__ import annotations

import numpy as np

from kvcore.errors import BackendUnavailableError

#: int64 fields of a pool's geometry, in wire order (both sides must agree on each).
_LAYOUTS = {"NHD": 0, "HND": 1}
_DTYPES = {"float16": 0, "bfloat16": 1, "float32": 2}


def torch_dist():
    """``(torch, torch.distributed)``, or :class:`BackendUnavailableError`."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:   # pragma: no cover - torch is in the model extra
        raise BackendUnavailableError("kvcore.distributed needs torch (pip install "
                                      "'kvcore[model]', or any torch with "
                                      "torch.distributed)") from exc
    if not dist.is_available():   # pragma: no cover - builds without distributed
        raise BackendUnavailableError("this torch build has no torch.distributed")
    return torch, dist


def check_group(dist, group) -> None:
    """Raise ``ValueError`` unless torch.distributed is initialised and this process is
    a member of ``group`` (None: the default group)."""
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first")
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of the given process group")


def backend_name(dist, group) -> str:
    return str(dist.get_backend(group)).lower()


def cpu_capable(dist, group) -> bool:
    """Whether ``group`` moves CPU tensors (gloo, MPI, or a mixed backend with one)."""
    name = backend_name(dist, group)
    return "gloo" in name or "mpi" in name


def control_device(dist, group, cache) -> str:
    """Where control messages live: ``"cpu"`` when the group carries CPU tensors, else
    the cache's CUDA device (a pure NCCL group; reading a reply back then waits for it)."""
    if cpu_capable(dist, group):
        return "cpu"
    if cache.device == "cpu":
        raise ValueError(f"process group backend {backend_name(dist, group)!r} cannot "
                         "carry a CPU cache's messages; use gloo")
    return cache.device


def check_data_path(dist, group, cache) -> None:
    """``ValueError`` unless ``group`` can move this cache's pool tensors."""
    name = backend_name(dist, group)
    if cache.device == "cpu":
        if not cpu_capable(dist, group):
            raise ValueError(f"process group backend {name!r} cannot move a CPU cache's "
                             "pages; use gloo")
    elif "nccl" not in name:
        raise ValueError(f"process group backend {name!r} cannot move a CUDA cache's "
                         "pages; use NCCL (e.g. backend='cpu:gloo,cuda:nccl')")


def geometry(config) -> list[int]:
    """The pool geometry both sides of a transfer must share (int64 wire fields)."""
    return [config.num_layers, config.num_kv_heads, config.head_dim, config.page_size,
            _DTYPES[config.dtype], _LAYOUTS[config.layout]]


class PoolIO:
    """Page-granular reads and writes of one cache's pool, as NumPy or torch.

    ``k[l]`` / ``v[l]`` are layer ``l``'s K and V pools ``[P, *page]`` (zero-copy
    views; a CuPy pool is viewed through ``__cuda_array_interface__``, bfloat16 words
    as int16). ``gather`` copies pages into a staging block ``[layers, 2, n, *page]``,
    ``scatter`` the other way; both run on torch's current stream on CUDA.
    """

    def __init__(self, cache, torch):
        self.torch = torch
        self.cuda = cache.device != "cpu"
        cfg = cache.config
        self.page_shape = cfg.page_shape
        if not self.cuda:
            self.dtype = cfg.storage_dtype
            self.k = [cache.k_cache(layer) for layer in range(cfg.num_layers)]
            self.v = [cache.v_cache(layer) for layer in range(cfg.num_layers)]
            return
        self.device = torch.device(cache.device)
        if cache.framework == "torch":
            self.k = [cache.k_cache(layer) for layer in range(cfg.num_layers)]
            self.v = [cache.v_cache(layer) for layer in range(cfg.num_layers)]
        else:   # CuPy: bfloat16 pools hold uint16 words, which torch indexes as int16
            def wrap(array):
                if array.dtype == np.uint16:
                    array = array.view(np.int16)
                return torch.as_tensor(array, device=self.device)
            self.k = [wrap(cache.k_cache(layer)) for layer in range(cfg.num_layers)]
            self.v = [wrap(cache.v_cache(layer)) for layer in range(cfg.num_layers)]
        self.dtype = self.k[0].dtype

    @property
    def contiguous(self) -> bool:
        """Whether every layer's K and V pool is one contiguous block (so a run of
        consecutive pages is one contiguous region: the direct mode)."""
        if self.cuda:
            return all(t.is_contiguous() for t in (*self.k, *self.v))
        return all(a.flags.c_contiguous for a in (*self.k, *self.v))

    def region(self, pool, layer: int, start: int, n: int):
        """Pages ``start .. start + n`` of layer ``layer``'s K or V pool as uint8 (a view)."""
        block = pool[layer][start:start + n]
        if self.cuda:
            return block.view(-1).view(self.torch.uint8)
        return self.torch.from_numpy(block.reshape(-1).view(np.uint8))

    def staging(self, elems: int):
        """A flat staging buffer of ``elems`` elements of the pool's dtype."""
        if self.cuda:
            return self.torch.empty(elems, dtype=self.dtype, device=self.device)
        return np.empty(elems, dtype=self.dtype)

    def index(self, pages: np.ndarray):
        """Page ids as the index type of ``gather`` / ``scatter`` (uploaded once)."""
        if self.cuda:
            return self.torch.from_numpy(pages.astype(np.int64)).to(self.device,
                                                                   non_blocking=False)
        return pages.astype(np.intp)

    def block(self, flat, layers: int, pages: int):
        """The first ``layers * 2 * pages`` pages of a staging buffer as a block."""
        n = layers * 2 * pages * int(np.prod(self.page_shape))
        return flat[:n].reshape((layers, 2, pages, *self.page_shape))

    def wire(self, block):
        """A staging block as the uint8 tensor a collective moves (zero-copy)."""
        if self.cuda:
            return block.view(-1).view(self.torch.uint8)
        return self.torch.from_numpy(block.reshape(-1).view(np.uint8))

    def gather(self, block, layer0: int, index) -> None:
        for j in range(block.shape[0]):
            for which, pool in enumerate((self.k, self.v)):
                if self.cuda:
                    self.torch.index_select(pool[layer0 + j], 0, index, out=block[j, which])
                else:
                    np.take(pool[layer0 + j], index, axis=0, out=block[j, which])

    def scatter(self, block, layer0: int, index) -> None:
        for j in range(block.shape[0]):
            for which, pool in enumerate((self.k, self.v)):
                if self.cuda:
                    pool[layer0 + j].index_copy_(0, index, block[j, which])
                else:
                    pool[layer0 + j][index] = block[j, which]


def chunk_plan(num_layers: int, num_pages: int, page_layer_bytes: int,
               chunk_bytes: int) -> list[tuple[int, int, int, int]]:
    """Split ``num_pages`` pages of every layer (K and V) into chunks of at most
    ``chunk_bytes`` (at least one page of one layer, K and V, each).

    Returns ``(layer_start, layer_end, page_start, page_end)`` tuples in wire order:
    whole layers (all pages) grouped while they fit, else one layer split by pages.
    Both sides compute the same plan from the same four numbers.

    Examples
    --------
    >>> chunk_plan(4, 10, 100, 4000)      # a layer's K and V of 10 pages: 2,000 bytes
    [(0, 2, 0, 10), (2, 4, 0, 10)]
    >>> chunk_plan(2, 10, 100, 800)       # 4 pages (K and V) fit in 800 bytes
    [(0, 1, 0, 4), (0, 1, 4, 8), (0, 1, 8, 10), (1, 2, 0, 4), (1, 2, 4, 8), (1, 2, 8, 10)]
    """
    if num_pages == 0:
        return []
    layer_bytes = 2 * num_pages * page_layer_bytes
    if layer_bytes <= chunk_bytes:
        per = max(1, chunk_bytes // layer_bytes)
        return [(a, min(a + per, num_layers), 0, num_pages)
                for a in range(0, num_layers, per)]
    per = max(1, chunk_bytes // (2 * page_layer_bytes))
    return [(layer, layer + 1, p, min(p + per, num_pages))
            for layer in range(num_layers) for p in range(0, num_pages, per)]
