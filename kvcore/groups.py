"""LayerGroup: layers that attend the same way (full, sliding window, fixed-size state).

See ``docs/groups.md`` for the model: every group has its own page table, all groups
take pages from one allocator and one pool, and a sequence has one length.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

__all__ = ["GROUP_FULL", "GROUP_STATE", "GROUP_WINDOW", "LayerGroup", "group_codes"]

#: Kind codes the Cython page table uses (``LayerGroup.code``).
GROUP_FULL, GROUP_WINDOW, GROUP_STATE = 0, 1, 2


def _int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)
    except Exception:   # TypeError, or whatever a caller's __index__ raised
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


@dataclass(frozen=True)
class LayerGroup:
    """A group of layers with one way of attending.

    Parameters
    ----------
    layers : sequence of int
        The model layers in the group (distinct, ``>= 0``), in slot order: the ``i``-th
        lives in pool slot ``i``. A :class:`PageTable` ignores them (only the kind
        matters there); :class:`KVCacheConfig` requires the groups' layers to partition
        ``range(num_layers)``.
    window : int, optional
        Sliding-window attention over the last ``window`` tokens (the token itself and
        the ``window - 1`` before it); ``>= 1``. None: full attention.
    state_pages : int
        ``> 0``: a fixed-size recurrent state (Mamba, linear attention) of this many
        pages per sequence instead of K/V per token. Not with ``window``.

    Attributes
    ----------
    kind : str
        ``"full"``, ``"window"`` or ``"state"``.

    Examples
    --------
    >>> LayerGroup(range(0, 4, 2), window=1024).kind
    'window'
    >>> LayerGroup([1, 3]).layers
    (1, 3)
    """

    layers: tuple[int, ...] = ()
    window: int | None = None
    state_pages: int = 0

    def __post_init__(self):
        try:
            layers = tuple(_int(layer, "layers[i]") for layer in self.layers)
        except TypeError as exc:
            if "layers[i]" in str(exc):
                raise
            raise TypeError(f"layers must be a sequence of int, got "
                            f"{type(self.layers).__name__}") from None
        if any(layer < 0 for layer in layers):
            raise ValueError(f"layers must be >= 0, got {layers}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers holds a layer more than once: {layers}")
        object.__setattr__(self, "layers", layers)
        if self.window is not None:
            window = _int(self.window, "window")
            if window < 1:
                raise ValueError(f"window must be >= 1, got {window}")
            if window > 2**31 - 1:
                raise ValueError(f"window must be < 2**31, got {window}")
            object.__setattr__(self, "window", window)
        state_pages = _int(self.state_pages, "state_pages")
        if state_pages < 0:
            raise ValueError(f"state_pages must be >= 0, got {state_pages}")
        if state_pages and self.window is not None:
            raise ValueError("a group has either a window or state pages, not both")
        object.__setattr__(self, "state_pages", state_pages)

    @property
    def kind(self) -> str:
        if self.state_pages:
            return "state"
        return "full" if self.window is None else "window"

    @property
    def code(self) -> int:
        """:data:`GROUP_FULL`, :data:`GROUP_WINDOW` or :data:`GROUP_STATE`."""
        return {"full": GROUP_FULL, "window": GROUP_WINDOW, "state": GROUP_STATE}[self.kind]


def group_codes(groups) -> tuple[tuple[LayerGroup, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Validate ``groups`` for a page table: (groups, kinds, windows, state pages).

    Raises
    ------
    TypeError
        ``groups`` is not a sequence of :class:`LayerGroup`.
    ValueError
        No groups.
    """
    if isinstance(groups, (str, bytes, LayerGroup)) or not hasattr(groups, "__iter__"):
        raise TypeError(f"groups must be a sequence of LayerGroup, got {type(groups).__name__}")
    groups = tuple(groups)
    if not groups:
        raise ValueError("groups must hold at least one LayerGroup")
    for i, group in enumerate(groups):
        if not isinstance(group, LayerGroup):
            raise TypeError(f"groups[{i}] must be a LayerGroup, got {type(group).__name__}")
    kinds = np.array([g.code for g in groups], dtype=np.int32)
    windows = np.array([g.window or 0 for g in groups], dtype=np.int32)
    states = np.array([g.state_pages for g in groups], dtype=np.int32)
    return groups, kinds, windows, states
