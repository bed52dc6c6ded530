"""Type stubs for kvcore._swap (kept in step with _swap.pyx)."""

from typing import Any

import numpy as np
import numpy.typing as npt

from kvcore._core import PageTable

_IntArray = Any   # anything np.asarray makes a 1-D integer array of

class HostTier:
    def __init__(self, table: PageTable) -> None: ...
    @property
    def table(self) -> PageTable: ...
    def swap_out_pages(self, seq_ids: _IntArray) -> int: ...
    def swap_in_pages(self, seq_ids: _IntArray) -> int: ...
    def swap_out(
        self, seq_ids: _IntArray
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...
    def swap_in(
        self, seq_ids: _IntArray
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...
    def finish(self, seq_ids: _IntArray, ok: bool) -> None: ...
