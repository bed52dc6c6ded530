"""Where each layer's K and V pages are: kvcore's own pool, or tensors an engine owns.

The kernels need, per layer, the address of page 0 of K and of V, and one distance
between consecutive pages (``page_stride``, the same for every layer, K and V); inside a
page the block ``[S, H, D]`` (NHD) or ``[H, S, D]`` (HND) must be contiguous. Layouts
that satisfy this, for ``P`` pages (worked example: NHD, S=16, H=8, D=128, bf16, so one
page block is 16 * 8 * 128 = 16,384 elements):

===============================  =======================  ==========================
layer tensor                     K / V split               page_stride (elements)
===============================  =======================  ==========================
kvcore ``kv[L, 2, P, S, H, D]``  ``kv[l, 0]``, ``kv[l, 1]``  16,384
vLLM ``[2, P, S, H, D]``          ``t[0]``, ``t[1]``         16,384
vLLM ``[P, 2, S, H, D]``          ``t[:, 0]``, ``t[:, 1]``   32,768 (K and V interleave)
a pair ``(k [P, S, H, D], v)``    as given                  16,384
===============================  =======================  ==========================

HND is the same with ``[H, S, D]`` in place of ``[S, H, D]``.

A key-only pool (``config.key_only``, MLA) has no V: each layer entry is one ``[P, S, H,
D]`` array (vLLM's MLA ``[P, S, 576]`` viewed with ``H = 1``), or kvcore's own ``kv[L,
1, P, ...]``; its ``v_ptrs`` are 0 and ``v_views`` None.
"""

from __future__ import annotations

from typing import NamedTuple

from kvcore._checks import kv_dtype_ok
from kvcore.backends.arrays import ArrayView, describe
from kvcore.config import KVCacheConfig
from kvcore.errors import ShapeError

__all__ = ["LayerPools", "adopt_layers"]


class LayerPools(NamedTuple):
    """Per-layer K and V page-0 addresses, and how to get each layer's K and V views.

    ``k_ptrs[l]`` / ``v_ptrs[l]``: byte addresses; ``page_stride``: in elements;
    ``k_views[l]`` / ``v_views[l]``: ``[P, S, H, D]`` (NHD) or ``[P, H, S, D]`` (HND)
    views of the caller's memory (never copies); ``owners``: what keeps it alive.
    """

    k_ptrs: tuple[int, ...]
    v_ptrs: tuple[int, ...]
    page_stride: int
    k_views: tuple
    v_views: tuple
    owners: tuple
    device: int


def adopt_layers(config: KVCacheConfig, pool) -> LayerPools:
    """Validate ``pool`` (one entry per layer, see the module docstring) once.

    ``pool`` is a sequence of ``num_layers`` entries, each a ``[2, P, ...]`` or
    ``[P, 2, ...]`` array or a ``(k, v)`` pair of ``[P, ...]`` arrays; or a single
    ``config.pool_shape`` array (kvcore's own layout).

    Raises
    ------
    ShapeError
        Wrong count, shape, dtype, strides (a page block not contiguous, page strides
        that differ between layers), devices that differ, or K and V at one address.
    """
    if not isinstance(pool, (list, tuple)):
        view = describe(pool, "pool")
        if view.shape != tuple(config.pool_shape):
            raise ShapeError(f"pool must be a list of {config.num_layers} per-layer entries "
                             f"or one array of shape {config.pool_shape}, got {view.shape}")
        # Layers of different groups share a slot (docs/groups.md): layer l is slot
        # layer_slot(l) of the one array.
        if config.key_only:
            pool = [pool[config.layer_slot(layer), 0] for layer in range(config.num_layers)]
        else:
            pool = [pool[config.layer_slot(layer)] for layer in range(config.num_layers)]
    if len(pool) != config.num_layers:
        raise ShapeError(f"pool has {len(pool)} layer entries, the config has "
                         f"{config.num_layers} layers")
    page_shape = tuple(config.page_shape)
    page_elems = config.page_elems
    k_ptrs, v_ptrs, k_views, v_views, owners = [], [], [], [], []
    strides, devices = set(), set()
    for layer, entry in enumerate(pool):
        name = f"pool[{layer}]"
        if config.key_only:
            view = describe(entry, name)
            kv_views = [view]
            _check_pages(view, config, page_shape, view.shape, view.strides, name)
            k_ptr, v_ptr = view.ptr, 0
            page_strides = (view.strides[0],)
            views = (entry, None)
        elif isinstance(entry, (list, tuple)):
            if len(entry) != 2:
                raise ShapeError(f"{name} must be a (k, v) pair, got {len(entry)} arrays")
            k, v = entry
            kv_views = [describe(k, f"{name}[0]"), describe(v, f"{name}[1]")]
            for view in kv_views:
                _check_pages(view, config, page_shape, view.shape, view.strides, name)
            k_ptr, v_ptr = kv_views[0].ptr, kv_views[1].ptr
            page_strides = (kv_views[0].strides[0], kv_views[1].strides[0])
            views = (k, v)
        else:
            view = describe(entry, name)
            kv_views = [view]
            shape, st = view.shape, view.strides
            if len(shape) != 5:
                raise ShapeError(f"{name} must be [2, P, ...], [P, 2, ...] or a (k, v) pair; "
                                 f"got shape {shape}")
            kv_first = shape[0] == 2 and shape[1] == config.num_pages
            page_first = shape[1] == 2 and shape[0] == config.num_pages
            if kv_first and page_first:
                raise ShapeError(f"{name} has shape {shape}: with num_pages == 2 the K/V axis "
                                 "is ambiguous; pass (k, v) pairs")
            if not (kv_first or page_first):
                raise ShapeError(f"{name} must have shape [2, {config.num_pages}, "
                                 f"{', '.join(map(str, page_shape))}] or [{config.num_pages}, "
                                 f"2, ...]; got {shape}")
            kv_axis, page_axis = (0, 1) if kv_first else (1, 0)
            page_view_shape = (shape[page_axis], *shape[2:])
            page_view_strides = (st[page_axis], *st[2:])
            _check_pages(view, config, page_shape, page_view_shape, page_view_strides, name)
            k_ptr = view.ptr
            v_ptr = view.ptr + st[kv_axis] * view.itemsize
            page_strides = (st[page_axis],)
            views = (entry[0], entry[1]) if kv_first else (entry[:, 0], entry[:, 1])
        strides.update(page_strides)
        devices.update(v.device for v in kv_views)
        k_ptrs.append(k_ptr)
        v_ptrs.append(v_ptr)
        k_views.append(views[0])
        v_views.append(views[1])
        owners.append(entry)
    if len(strides) != 1:
        raise ShapeError(f"every layer's K and V must have the same page stride, got "
                         f"{sorted(strides)} elements")
    page_stride = strides.pop()
    if page_stride < page_elems:
        raise ShapeError(f"page stride {page_stride} elements is smaller than a page "
                         f"({page_elems} elements): pages would overlap")
    if len(devices) != 1:
        raise ShapeError(f"pool arrays are on different devices: {sorted(devices)}")
    item = config.itemsize
    for name, ptr in zip(_pool_names(config.num_layers), _interleave(k_ptrs, v_ptrs),
                         strict=True):
        if ptr and ptr % item:
            raise ShapeError(f"{name} starts at address {ptr:#x}, not a multiple of its "
                             f"{item}-byte element")
    groups = [config.layer_group(layer) for layer in range(config.num_layers)]
    names = _pool_names(config.num_layers)
    pools = [(ptr, g, n) for ptr, g, n in zip(_interleave(k_ptrs, v_ptrs),
                                              [g for g in groups for _ in ("K", "V")], names,
                                              strict=True) if ptr]   # key-only: no V
    clash = _first_overlap([p for p, _, _ in pools], page_stride * item, page_elems * item,
                           config.num_pages, [g for _, g, _ in pools])
    if clash is not None:
        raise ShapeError(f"the pages of {pools[clash[0]][2]} and {pools[clash[1]][2]} "
                         "overlap in memory: every layer's K and V need pages of their own")
    return LayerPools(tuple(k_ptrs), tuple(v_ptrs), page_stride, tuple(k_views),
                      tuple(v_views), tuple(owners), devices.pop())


def _check_pages(view: ArrayView, config, page_shape, shape, strides, name) -> None:
    """``shape`` / ``strides`` (of one K or V pool) must be ``[P, *page_shape]`` with a
    contiguous page block and a positive page stride."""
    if tuple(shape) != (config.num_pages, *page_shape):
        raise ShapeError(f"{name}: a K or V pool must have shape "
                         f"[{config.num_pages}, {', '.join(map(str, page_shape))}] "
                         f"({config.layout}), got {tuple(shape)}")
    if not kv_dtype_ok(config.dtype, view.dtype):
        raise ShapeError(f"{name} has dtype {view.dtype}, the cache holds {config.dtype}")
    inner = (page_shape[1] * page_shape[2], page_shape[2], 1)
    if tuple(strides[1:]) != inner or strides[0] <= 0:
        raise ShapeError(f"{name}: each page must be one contiguous [{config.layout}] block "
                         f"(strides {inner} inside a page, a positive page stride); got "
                         f"strides {tuple(strides)}")


def _interleave(k_ptrs, v_ptrs) -> list[int]:
    return [p for pair in zip(k_ptrs, v_ptrs, strict=True) for p in pair]


def _pool_names(num_layers: int) -> list[str]:
    return [f"layer {layer}'s {kv}" for layer in range(num_layers) for kv in ("K", "V")]


def _first_overlap(ptrs, stride: int, page_bytes: int, num_pages: int, groups):
    """Indexes of the first two pools with a shared byte, or None.

    Two pools of layers in different groups (``groups[i]``: the group of pool ``i``) may
    be the same memory (the same address): one page id belongs to one group at a time,
    so layers of different groups sharing a slot never use a page together.

    Pool ``a``'s page ``i`` spans ``[ptr_a + i * stride, + page_bytes)``. Two pools at
    distance ``d = ptr_b - ptr_a`` share a byte iff some ``k = j - i`` in
    ``[-(P - 1), P - 1]`` has ``|d + k * stride| < page_bytes``; the closest ``k`` is
    ``-d / stride`` rounded, so checking it and its neighbours suffices. Worked example:
    vLLM's ``[P, 2, S, H, D]`` has K and V at ``d = page_bytes`` with ``stride = 2 *
    page_bytes``: ``k = 0`` gives ``page_bytes``, ``k = -1`` gives ``page_bytes``; never
    less, so they interleave without overlap.
    """
    for a in range(len(ptrs)):
        for b in range(a + 1, len(ptrs)):
            d = ptrs[b] - ptrs[a]
            if d == 0 and groups[a] != groups[b]:
                continue
            nearest = -round(d / stride)
            for k in (nearest - 1, nearest, nearest + 1):
                if -(num_pages - 1) <= k <= num_pages - 1 and abs(d + k * stride) < page_bytes:
                    return a, b
    return None
