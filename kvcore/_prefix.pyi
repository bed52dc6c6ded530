"""Type stubs for kvcore._prefix (kept in step with _prefix.pyx)."""

import numpy as np
import numpy.typing as npt

from kvcore._allocator import Evictor

EVENT_STORED: int
EVENT_EVICTED: int
EVENT_HOST_STORED: int
EVENT_HOST_EVICTED: int

class PrefixIndex(Evictor):
    def __init__(
        self, num_pages: int, page_size: int, hash_bits: int = 64, event_capacity: int = 65536
    ) -> None: ...
    @property
    def num_indexed(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def take_events(
        self,
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int32], npt.NDArray[np.uint64]]: ...
    def check(self) -> None: ...

class PrefixHooks: ...

class PrefixCache(PrefixHooks): ...

def _is_indexed_py(index: PrefixIndex, page_id: int) -> bool: ...
