from collections.abc import Callable
from typing import Any

class KernelLauncher:
    kinds: str
    def __init__(self, launch_kernel: int, function: int, kinds: str, bound: tuple[int, ...],
                 on_error: Callable[[int], None]) -> None: ...
    @property
    def num_leading(self) -> int: ...
    def __call__(self, grid: int, block: int, stream: int, *args: int) -> None: ...

class TorchScatter:
    def __init__(self, tensor_type: type, dtype: Any, int64_dtype: Any, device: int,
                 num_heads: int, head_dim: int, itemsize: int, pool_align: int,
                 k_pools: tuple[int, ...], v_pools: tuple[int, ...],
                 launchers: tuple[KernelLauncher | None, ...], max_grid: int) -> None: ...
    def write(self, layer: int, k: Any, v: Any, slot_mapping: Any, slots_ptr: int,
              max_rows: int, stream: int) -> bool: ...
