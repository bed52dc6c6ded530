"""KVCacheConfig: the shape of a paged KV pool, validated once at construction."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from kvcore.groups import LayerGroup

__all__ = ["KVCacheConfig", "LAYOUTS", "DTYPES", "MODEL_DTYPES", "QUANTIZED_DTYPES",
           "SCALE_GRANULARITIES"]

#: Supported pool layouts (see DESIGN.md, "Memory layout").
LAYOUTS = ("NHD", "HND")

#: Supported element types and their sizes in bytes. bfloat16 is stored and moved as
#: 2-byte words, so it needs no bfloat16 dtype in NumPy or CuPy; float8_e4m3fn (fp8
#: e4m3, quantized with scales, see :mod:`kvcore.fp8`) as 1-byte codes.
DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1}

#: The pool dtypes that hold quantized codes, not the model's values.
QUANTIZED_DTYPES = ("float8_e4m3fn",)

#: What a quantized pool's K and V are quantized from and dequantized to.
MODEL_DTYPES = ("float16", "bfloat16")

#: How finely an fp8 pool's scales vary: one per (layer, K/V), or one per (token, head)
#: kept in a float32 side pool beside the pages.
SCALE_GRANULARITIES = ("tensor", "token_head")


def _positive_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}")
    return number


def _dtype_name(dtype) -> str:
    """Normalise 'float16', np.float16, torch.bfloat16 or 'bf16' to a DTYPES key."""
    name = str(dtype).removeprefix("torch.").lower()
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32", "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
            "float8_e4m3": "float8_e4m3fn"}.get(name, name)
    if name not in DTYPES:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


@dataclass(frozen=True)
class KVCacheConfig:
    """The shape of one paged KV pool holding every layer.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        Model shape (``>= 1``).
    page_size : int
        Tokens per page (``>= 1``).
    num_pages : int
        Pages in the pool; a page id addresses the same page in every layer.
    dtype : str
        ``"float16"``, ``"bfloat16"``, ``"float32"`` (NumPy / torch dtypes accepted) or
        ``"float8_e4m3fn"`` (alias ``"fp8"``; ``torch.float8_e4m3fn``): a pool of fp8
        e4m3 codes with scales, written from and read back as ``model_dtype`` (see
        :mod:`kvcore.fp8` and :meth:`KVCache.set_kv_scales`).
    layout : str
        ``"NHD"``: ``kv[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]``;
        ``"HND"``: ``kv[num_layers, 2, num_pages, num_kv_heads, page_size, head_dim]``
        (``1`` in place of ``2`` with ``key_only``).
    max_seqs : int
        Sequence slots of the page table.
    max_pages_per_seq : int or None
        Longest sequence in pages; ``None`` means ``num_pages``.
    enable_prefix_cache : bool
        Reuse full pages across sequences with equal token prefixes (see
        :meth:`PageTable.add_sequence`).
    layer_groups : sequence of LayerGroup, optional
        Groups of layers that attend differently (full attention, sliding window,
        recurrent state; see ``docs/groups.md``); their layers must partition
        ``range(num_layers)``. All groups draw pages from one allocator and one pool
        of ``num_slots = max(len(group.layers))`` layer slots: layer ``l`` lives in slot
        ``layer_slot(l)``. None: one full-attention group of every layer (slot ``l`` is
        layer ``l``).
    num_host_pages : int
        Pages of the host tier (``>= 0``; 0, the default, means none): a second pool of
        ``host_pool_shape`` in host memory (page-locked on CUDA) that :meth:`KVCache.swap_out`
        moves sequences into and :meth:`KVCache.swap_in` brings them back from (see
        ``docs/host_tier.md``). Host page ids are ``0 .. num_host_pages - 1``.
    model_dtype : str or None
        An fp8 pool's unquantized dtype: what :meth:`KVCache.write` takes and
        :meth:`KVCache.gather` dequantizes to, ``"float16"`` or ``"bfloat16"`` (None,
        the default, means ``"bfloat16"``). For the other dtypes it is ``dtype`` itself
        (None or equal to ``dtype``).
    key_only : bool
        One tensor per token instead of K and V: an MLA (DeepSeek) latent cache, e.g.
        ``num_kv_heads=1, head_dim=576`` (512 latent + 64 rope), or any key-only cache.
        The pool's K/V axis has length 1 and :meth:`KVCache.write` takes ``v=None``;
        a token costs half of what K and V cost.
    kv_scale_granularity : {"tensor", "token_head"}
        fp8 pools only. ``"tensor"`` (the default): one scale per (layer, K/V), static
        or calibrated (:meth:`KVCache.set_kv_scales`). ``"token_head"``: every (token,
        head) row of K and of V gets its own float32 scale, computed when it is written
        as ``fp8.scale_for_amax(max |row|)`` (:func:`kvcore.fp8.token_head_scales`) and
        kept in a side pool of ``scale_pool_shape`` indexed like the pages, which moves
        with them (copy-on-write, ``copy_pages``, the host tier); a page id then costs
        ``scale_page_bytes`` more.

    Notes
    -----
    With 32 layers, 8 KV heads, head_dim 128, page_size 16 and float16, one page id
    costs ``page_bytes = 32 * 2 * 16 * 8 * 128 * 2 = 2 MiB`` (every layer, K and V).

    Examples
    --------
    >>> cfg = KVCacheConfig(num_layers=2, num_kv_heads=8, head_dim=128, page_size=16,
    ...                     num_pages=1024)
    >>> cfg.page_bytes, cfg.total_bytes, cfg.pool_shape
    (131072, 134217728, (2, 2, 1024, 16, 8, 128))
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    dtype: str = "float16"
    layout: str = "NHD"
    max_seqs: int = 256
    max_pages_per_seq: int | None = None
    enable_prefix_cache: bool = False
    layer_groups: tuple[LayerGroup, ...] | None = None
    num_host_pages: int = 0
    model_dtype: str | None = None
    key_only: bool = False
    prefix_hash: str = "fast"
    kv_scale_granularity: str = "tensor"

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "num_pages",
                     "max_seqs"):
            object.__setattr__(self, name, _positive_int(getattr(self, name), name))
        if self.num_pages > 2**31 - 1:
            raise ValueError(f"num_pages must be < 2**31, got {self.num_pages}")
        max_pages = self.num_pages if self.max_pages_per_seq is None else self.max_pages_per_seq
        object.__setattr__(self, "max_pages_per_seq", _positive_int(max_pages,
                                                                     "max_pages_per_seq"))
        if (isinstance(self.num_host_pages, (bool, np.bool_))
                or not isinstance(self.num_host_pages, (int, np.integer))):
            raise TypeError(f"num_host_pages must be an int, got "
                            f"{type(self.num_host_pages).__name__}")
        if not 0 <= self.num_host_pages <= 2**31 - 1:
            raise ValueError(f"num_host_pages must be in [0, 2**31 - 1], got "
                             f"{self.num_host_pages}")
        object.__setattr__(self, "num_host_pages", int(self.num_host_pages))
        if self.max_pages_per_seq * self.page_size > 2**31 - 1:
            raise ValueError(
                f"max_pages_per_seq * page_size = {self.max_pages_per_seq * self.page_size} "
                f"tokens exceeds 2**31 - 1")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        self._check_model_dtype()
        if not isinstance(self.key_only, (bool, np.bool_)):
            raise TypeError(f"key_only must be a bool, got {type(self.key_only).__name__}")
        object.__setattr__(self, "key_only", bool(self.key_only))
        if self.kv_scale_granularity not in SCALE_GRANULARITIES:
            raise ValueError(f"kv_scale_granularity must be one of {list(SCALE_GRANULARITIES)}, "
                             f"got {self.kv_scale_granularity!r}")
        if self.kv_scale_granularity != "tensor" and not self.quantized:
            raise ValueError(f"kv_scale_granularity={self.kv_scale_granularity!r} needs an fp8 "
                             f"pool (dtype='float8_e4m3fn'); the pool holds {self.dtype}")
        layout = str(self.layout).upper()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        object.__setattr__(self, "layout", layout)
        if not isinstance(self.enable_prefix_cache, (bool, np.bool_)):
            raise TypeError(f"enable_prefix_cache must be a bool, got "
                            f"{type(self.enable_prefix_cache).__name__}")
        object.__setattr__(self, "enable_prefix_cache", bool(self.enable_prefix_cache))
        if self.prefix_hash not in ("fast", "sha256"):
            raise ValueError(f"prefix_hash must be 'fast' or 'sha256', got {self.prefix_hash!r}")
        self._check_groups()
        # Per layer: (group, slot), looked up on every write.
        places = {layer: (g, slot) for g, group in enumerate(self.groups)
                  for slot, layer in enumerate(group.layers)}
        object.__setattr__(self, "_places", tuple(places[layer]
                                                  for layer in range(self.num_layers)))

    def _check_model_dtype(self) -> None:
        if self.model_dtype is None:
            model = "bfloat16" if self.quantized else self.dtype
        else:
            try:
                model = _dtype_name(self.model_dtype)
            except ValueError:
                raise ValueError(f"model_dtype must be one of {list(MODEL_DTYPES)}, got "
                                 f"{self.model_dtype!r}") from None
            if self.quantized and model not in MODEL_DTYPES:
                raise ValueError(f"model_dtype of a {self.dtype} pool must be one of "
                                 f"{list(MODEL_DTYPES)}, got {self.model_dtype!r}")
            if not self.quantized and model != self.dtype:
                raise ValueError(f"model_dtype must be None or the pool's dtype "
                                 f"({self.dtype}) unless the pool is quantized, got "
                                 f"{self.model_dtype!r}")
        object.__setattr__(self, "model_dtype", model)

    def _check_groups(self) -> None:
        if self.layer_groups is None:
            return
        if isinstance(self.layer_groups, (str, bytes, LayerGroup)) or not hasattr(
                self.layer_groups, "__iter__"):
            raise TypeError(f"layer_groups must be a sequence of LayerGroup, got "
                            f"{type(self.layer_groups).__name__}")
        groups = tuple(self.layer_groups)
        if not groups:
            raise ValueError("layer_groups must hold at least one LayerGroup")
        for i, group in enumerate(groups):
            if not isinstance(group, LayerGroup):
                raise TypeError(f"layer_groups[{i}] must be a LayerGroup, got "
                                f"{type(group).__name__}")
            if not group.layers:
                raise ValueError(f"layer_groups[{i}] has no layers")
        layers = sorted(layer for group in groups for layer in group.layers)
        if layers != list(range(self.num_layers)):
            raise ValueError(f"the layer groups' layers must partition range({self.num_layers}) "
                             f"(each layer in exactly one group), got {layers}")
        for i, group in enumerate(groups):
            if group.state_pages > self.max_pages_per_seq:
                raise ValueError(f"layer_groups[{i}] has {group.state_pages} state pages, "
                                 f"more than max_pages_per_seq ({self.max_pages_per_seq})")
        if self.enable_prefix_cache and any(g.kind == "state" for g in groups):
            raise ValueError("prefix caching cannot serve a state group: a recurrent state "
                             "cannot be shared by a prefix hit without a snapshot")
        object.__setattr__(self, "layer_groups", groups)

    @property
    def groups(self) -> tuple[LayerGroup, ...]:
        """The layer groups: ``layer_groups``, or one full-attention group of every layer."""
        if self.layer_groups is None:
            return (LayerGroup(range(self.num_layers)),)
        return self.layer_groups

    @property
    def num_slots(self) -> int:
        """Layer slots of the pool: the largest group's layer count (``num_layers``
        without groups)."""
        return max(len(group.layers) for group in self.groups)

    def layer_group(self, layer: int) -> int:
        """Index of the group that holds ``layer`` (``IndexError`` outside the model)."""
        return self._place(layer)[0]

    def layer_slot(self, layer: int) -> int:
        """Pool slot of ``layer``: its position in its group."""
        return self._place(layer)[1]

    def layer_index(self, layer) -> int:
        """``layer`` as an index in ``[0, num_layers)``: ``TypeError`` unless an integer
        (bool refused), ``IndexError`` outside the model."""
        if isinstance(layer, (bool, np.bool_)):
            raise TypeError("layer must be an integer, got bool")
        try:
            index = operator.index(layer)
        except Exception as exc:   # TypeError, or whatever a caller's __index__ raised
            raise TypeError(f"layer must be an integer, got {type(layer).__name__}") from exc
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range [0, {self.num_layers})")
        return index

    def _place(self, layer) -> tuple[int, int]:
        return self._places[self.layer_index(layer)]

    @property
    def slot_waste(self) -> float:
        """Fraction of the pool's K/V bytes no group can use: a page id held by a group
        of ``n < num_slots`` layers leaves ``num_slots - n`` slots idle (0.0 when groups
        are equal or absent), averaged over the groups as if each held the same pages."""
        groups = self.groups
        used = sum(len(g.layers) for g in groups)
        return 1.0 - used / (len(groups) * self.num_slots)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPES[self.dtype]

    @property
    def quantized(self) -> bool:
        """Whether the pool holds fp8 codes with scales (``dtype="float8_e4m3fn"``)."""
        return self.dtype in QUANTIZED_DTYPES

    @property
    def tensors_per_token(self) -> int:
        """Tensors each token keeps per layer: 2 (K and V), 1 with ``key_only``; the
        length of the pool's K/V axis."""
        return 1 if self.key_only else 2

    @property
    def storage_dtype(self) -> np.dtype:
        """NumPy dtype a NumPy or CuPy pool stores (bfloat16 as its raw uint16 words,
        fp8 as its uint8 codes)."""
        return np.dtype({"float16": np.float16, "float32": np.float32,
                         "bfloat16": np.uint16, "float8_e4m3fn": np.uint8}[self.dtype])

    @property
    def model_storage_dtype(self) -> np.dtype:
        """NumPy dtype of ``model_dtype`` arrays (bfloat16 as uint16 words)."""
        return np.dtype({"float16": np.float16, "float32": np.float32,
                         "bfloat16": np.uint16}[self.model_dtype])

    @property
    def page_elems(self) -> int:
        """Elements of one page of one layer's K (or V) cache: ``page_size * H * D``."""
        return self.page_size * self.num_kv_heads * self.head_dim

    @property
    def token_head_scales(self) -> bool:
        """Whether scales are kept per (token, head) in a side pool
        (``kv_scale_granularity="token_head"``)."""
        return self.kv_scale_granularity == "token_head"

    @property
    def kv_page_bytes(self) -> int:
        """Bytes of one page id in the K/V pool: every layer slot, K and V (every layer
        without groups; K only with ``key_only``)."""
        return self.num_slots * self.tensors_per_token * self.page_elems * self.itemsize

    @property
    def scale_page_bytes(self) -> int:
        """Bytes of one page id in the scale side pool: ``num_slots * (2 or 1) *
        page_size * num_kv_heads * 4`` with ``kv_scale_granularity="token_head"``, else 0.
        Worked example: 32 layers, K and V, page 16, 8 heads: 32 * 2 * 16 * 8 * 4 =
        64 KiB beside the 2 MiB (head_dim 128) of fp8 codes, 3.1%."""
        if not self.token_head_scales:
            return 0
        return self.num_slots * self.tensors_per_token * self.page_size * self.num_kv_heads * 4

    @property
    def page_bytes(self) -> int:
        """Bytes one page id costs: ``kv_page_bytes + scale_page_bytes`` (every layer
        slot, K and V; K only with ``key_only``; the scale side pool's share with
        per-(token, head) scales)."""
        return self.kv_page_bytes + self.scale_page_bytes

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's K and V pools."""
        return self.tensors_per_token * self.num_pages * self.page_elems * self.itemsize

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole pool: ``num_pages * page_bytes``."""
        return self.num_pages * self.page_bytes

    @property
    def max_tokens_per_seq(self) -> int:
        """``max_pages_per_seq * page_size``."""
        return self.max_pages_per_seq * self.page_size

    @property
    def page_shape(self) -> tuple[int, int, int]:
        """Shape of one page of one layer's K (or V) cache for this layout."""
        if self.layout == "NHD":
            return (self.page_size, self.num_kv_heads, self.head_dim)
        return (self.num_kv_heads, self.page_size, self.head_dim)

    @property
    def pool_shape(self) -> tuple[int, ...]:
        """Shape of the pool ``kv``: ``(num_slots, 2, num_pages) + page_shape``
        (``num_slots == num_layers`` without groups; ``1`` in place of ``2`` with
        ``key_only``)."""
        return (self.num_slots, self.tensors_per_token, self.num_pages, *self.page_shape)

    @property
    def host_pool_shape(self) -> tuple[int, ...]:
        """Shape of the host tier's pool: ``(num_host_pages, num_slots, 2) + page_shape``
        (``1`` in place of ``2`` with ``key_only``).

        Page-major, unlike the device pool: one host page (every layer slot, K and V) is
        ``page_bytes`` contiguous bytes, so a page moves as one run over PCIe.
        """
        return (self.num_host_pages, self.num_slots, self.tensors_per_token,
                *self.page_shape)

    @property
    def scale_pool_shape(self) -> tuple[int, ...] | None:
        """Shape of the scale side pool, float32 ``(num_slots, 2, num_pages, page_size,
        num_kv_heads)`` (``1`` in place of ``2`` with ``key_only``) whatever the layout:
        ``[slot, kv, p, s, h]`` is the scale of head ``h`` of the token in slot ``p *
        page_size + s``. None unless ``kv_scale_granularity="token_head"``."""
        if not self.token_head_scales:
            return None
        return (self.num_slots, self.tensors_per_token, self.num_pages, self.page_size,
                self.num_kv_heads)

    @property
    def host_scale_pool_shape(self) -> tuple[int, ...] | None:
        """The host tier's scale pool, page-major like ``host_pool_shape``:
        ``(num_host_pages, num_slots, 2, page_size, num_kv_heads)`` float32 (``1`` in
        place of ``2`` with ``key_only``); None unless per-(token, head) scales."""
        if not self.token_head_scales:
            return None
        return (self.num_host_pages, self.num_slots, self.tensors_per_token, self.page_size,
                self.num_kv_heads)

    @property
    def host_bytes(self) -> int:
        """Bytes of the host tier: ``num_host_pages * page_bytes``."""
        return self.num_host_pages * self.page_bytes

    @classmethod
    def for_memory(cls, memory_bytes: int, **kwargs) -> KVCacheConfig:
        """Config with as many pages as fit in ``memory_bytes`` (other fields as given).

        Raises
        ------
        ValueError
            Not even one page fits.
        """
        probe = cls(num_pages=1, **kwargs)
        num_pages = int(memory_bytes) // probe.page_bytes
        if num_pages < 1:
            raise ValueError(f"{memory_bytes} bytes hold no page of {probe.page_bytes} bytes")
        return cls(num_pages=min(num_pages, 2**31 - 1), **kwargs)
