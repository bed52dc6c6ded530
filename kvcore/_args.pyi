"""Type stubs for kvcore._args (kept in step with _args.pyx); the cdef checkers have no stub."""

import numpy as np
import numpy.typing as npt

def first_slot_out_of_range(slots: npt.NDArray[np.int64], num_slots: int) -> int | None: ...
def int64_copy(obj: object, name: str = ...) -> npt.NDArray[np.int64]: ...
