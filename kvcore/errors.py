"""The kvcore error hierarchy.

Every error a caller can trigger is a :class:`KVCoreError`, and each is also the
built-in type a Python programmer would expect (``except ValueError`` keeps
working). A call that raises any of these has changed nothing.
"""

from __future__ import annotations

__all__ = [
    "KVCoreError",
    "OutOfPagesError",
    "CapacityError",
    "InvalidPageError",
    "RefcountError",
    "RollbackError",
    "UnknownSequenceError",
    "SequenceStateError",
    "TransferError",
    "TransferPendingError",
    "ShapeError",
    "BackendUnavailableError",
    "KernelError",
]


class KVCoreError(Exception):
    """Base class of every error raised by kvcore."""


class OutOfPagesError(KVCoreError, MemoryError):
    """More pages were requested than are free; the state is unchanged.

    Attributes
    ----------
    requested : int
        Pages the call needed.
    available : int
        Pages that were free.
    """

    def __init__(self, requested: int, available: int, message: str | None = None):
        self.requested = int(requested)
        self.available = int(available)
        if message is None:
            message = f"requested {self.requested} pages but only {self.available} are free"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.requested, self.available, str(self)))


class CapacityError(KVCoreError, ValueError):
    """No free sequence slot, or a sequence would exceed ``max_pages_per_seq``."""


class InvalidPageError(KVCoreError, ValueError):
    """A page id (or a slot) is outside the pool."""


class RefcountError(KVCoreError, RuntimeError):
    """incref or decref of a page that is free (a double free)."""


class RollbackError(KVCoreError, ValueError):
    """``truncate`` cannot shorten a sequence that far: a state group cannot be rolled
    back, or a window group already released pages the shorter sequence would need."""


class UnknownSequenceError(KVCoreError, KeyError):
    """A sequence id that is not active."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SequenceStateError(KVCoreError, ValueError):
    """A sequence is not in the tier the call needs: appended, written, forked, truncated
    or read while swapped out to the host tier, or swapped in while already resident.

    Attributes
    ----------
    seq_id : int
    state : str
        What :meth:`PageTable.seq_state` says of it: ``"resident"``, ``"swapped"``,
        ``"swapping_out"`` or ``"swapping_in"``.
    """

    def __init__(self, seq_id: int, state: str, message: str):
        self.seq_id = int(seq_id)
        self.state = str(state)
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.seq_id, self.state, str(self)))


class TransferPendingError(SequenceStateError):
    """A sequence's swap-out or swap-in is still in flight: nothing but ``remove`` may
    touch it until :meth:`KVCache.poll` or :meth:`KVCache.wait` has seen the copy
    finish."""


class ShapeError(KVCoreError, ValueError):
    """An array argument has the wrong shape, dtype, device or layout."""


class BackendUnavailableError(KVCoreError, ImportError):
    """The requested backend (CuPy / a CUDA device) cannot be used here."""


class KernelError(KVCoreError, RuntimeError):
    """A CUDA kernel failed to compile or launch."""


class TransferError(KVCoreError, RuntimeError):
    """A page transfer between caches in different processes (``kvcore.distributed``)
    was refused by the other side or failed on the way; neither cache changed.

    Attributes
    ----------
    reason : str
        ``"sender"`` (the sender's input was invalid), ``"config"`` (the two pools
        differ in layout), ``"out_of_pages"``, ``"capacity"`` (seq slots or pages per
        sequence), ``"tokens"`` (token ids the receiver refused), ``"protocol"`` (a
        message that is not kvcore's) or ``"failed"`` (the data did not arrive).
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (str(self), self.reason))
