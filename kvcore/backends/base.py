"""The backend interface: what :class:`kvcore.KVCache` and :class:`kvcore.StepMetadata`
ask of a backend, and nothing else.

A backend owns the pool and moves bytes. It reads and checks its own array arguments
(with the shared checkers of :mod:`kvcore._checks`), so the facade never branches on
which backend it holds. Two implement it: :class:`~kvcore.backends.numpy_ref.NumpyBackend`
(host memory, the oracle) and ``kvcore.backends.cuda_backend.CudaBackend`` (device
memory; torch or CuPy). ``tests/test_backend_interface.py`` checks both against this
Protocol.

Streams: ``stream`` arguments are the value :meth:`Backend.resolve_stream` returned
(a ``cudaStream_t`` int on CUDA, None on the CPU).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """What a KVCache backend provides.

    Attributes
    ----------
    name : str
        ``"numpy"`` or ``"cuda"``.
    device : str
        ``"cpu"`` or ``"cuda:N"``.
    framework_name : str
        ``"numpy"``, ``"torch"`` or ``"cupy"``: the type of the pool and new outputs.
    adopted : bool
        The pool belongs to the caller (then ``kv`` is None).
    kv : array or None
        The whole pool, ``config.pool_shape``.
    k_views, v_views : tuple of arrays
        Each layer's K and V pool, ``[P, S, H, D]`` (NHD) or ``[P, H, S, D]`` (HND).
    scatter_fast_path : object or None
        A C hot path for ``write`` (``TorchScatter``), or None.
    host_kv : numpy.ndarray or None
        The host tier, ``config.host_pool_shape`` (page-major: host page ``h`` is
        ``host_kv[h]``, every layer slot, K and V) in the storage dtype (bfloat16 as
        uint16 words); page-locked and mapped for the device on CUDA. None when
        ``config.num_host_pages == 0``.
    scales : numpy.ndarray or None
        fp8 pools: the float32 ``[num_layers, 2]`` ``(k_scale, v_scale)`` of each layer,
        on the host (None for other pools).
    scale_table : array or None
        The same scales where the kernels read them (the device on CUDA; ``scales``
        itself on the CPU).
    scale_pool : array or None
        fp8 pools with ``kv_scale_granularity="token_head"``: the float32 side pool,
        ``config.scale_pool_shape`` ``[num_slots, 2, P, S, H]``, in the backend's
        framework (None otherwise). Its pages move with the K/V pages in
        ``copy_pages`` and ``swap_copy``.
    scale_views : tuple
        Each layer's ``scale_pool[slot]``, ``[2, P, S, H]`` (``[1, ...]`` key-only), or
        None per layer without a side pool.
    host_scales : numpy.ndarray or None
        The host tier's scale pool, ``config.host_scale_pool_shape`` (page-major),
        page-locked on CUDA; None without a side pool or a host tier.
    """

    name: str
    device: str
    framework_name: str
    adopted: bool
    kv: Any
    k_views: tuple
    v_views: tuple
    scatter_fast_path: Any
    host_kv: Any
    scales: Any
    scale_table: Any
    scale_pool: Any
    scale_views: tuple
    host_scales: Any

    # -- streams --------------------------------------------------------------------------
    def current_stream(self) -> int | None: ...
    def resolve_stream(self, stream) -> int | None: ...
    def refuse_capture(self, stream, what: str) -> None: ...

    # -- arrays ---------------------------------------------------------------------------
    def is_device_array(self, array) -> bool: ...
    def to_host(self, array) -> np.ndarray: ...
    def from_host(self, array: np.ndarray): ...

    # -- data movement ----------------------------------------------------------------------
    def write(self, layer: int, k, v, slot_mapping, stream, metadata=None) -> None: ...
    def gather(self, layer: int, index, out, stream, raw: bool = False): ...
    def copy_pages(self, src, dst, stream) -> None: ...
    def synchronize(self, stream) -> int: ...

    # -- fp8 scales ------------------------------------------------------------------------
    def set_scales(self, layer: int, k_scale, v_scale) -> None: ...
    def amax(self, array, name: str) -> float: ...

    # -- step metadata buffers -------------------------------------------------------------
    def metadata_storage(self, nbytes: int, count: int): ...
    def address(self, array) -> int: ...
    def typed_view(self, buffer, offset: int, dtype: str, shape): ...
    def record_event(self, stream, event=None): ...
    def wait_event(self, event) -> None: ...
    def destroy_event(self, event) -> None: ...
    def upload_bytes(self, dst_ptr: int, staging: np.ndarray, nbytes: int, stream) -> None: ...

    # -- the host tier ----------------------------------------------------------------------
    def swap_copy(self, direction: str, device_pages: np.ndarray, host_pages: np.ndarray,
                  stream):
        """Copy pages between the device pool and the host tier ``host_kv``.

        Parameters
        ----------
        direction : {"out", "in"}
            ``"out"``: device page ``device_pages[i]`` to host page ``host_pages[i]``;
            ``"in"``: the reverse. Every layer slot, K and V, of each page.
        device_pages, host_pages : numpy.ndarray
            int32 page ids of equal length, chosen by the page table: in range, and the
            destinations distinct (not checked again).
        stream
            What :meth:`resolve_stream` returned; the copy is enqueued there.

        Returns
        -------
        event
            Handle of the copy's completion for :meth:`transfer_done` and
            :meth:`wait_transfer` (a CUDA event, released with :meth:`destroy_event`),
            or None when the copy is already complete (the NumPy backend, and no pages).
        """
        ...

    def transfer_done(self, event) -> bool:
        """Whether the copy behind ``event`` (from :meth:`swap_copy`) has finished.

        Never blocks; None is finished.

        Raises
        ------
        KernelError
            The device reported an error (CUDA), which is not "not finished yet".
        """
        ...

    def wait_transfer(self, event) -> None:
        """Block until the copy behind ``event`` (from :meth:`swap_copy`) has finished.

        None returns at once.

        Raises
        ------
        KernelError
            The device reported an error while waiting (CUDA).
        """
        ...
