"""Host index arrays to the device without blocking the host, on the caller's stream.

A synchronous copy from pageable memory waits for the device and costs tens of µs;
instead arrays are packed into a pinned host ring and sent with one
``cudaMemcpyAsync`` into the matching region of a device ring, on the stream the
kernels that read them will run on.

Reuse is guarded per segment: the ring has ``NUM_SEGMENTS`` segments, and when uploads
leave a segment an event is recorded on every stream that used it; before the segment
is written again (a lap later) those events are waited for. So neither the pinned
bytes nor the device bytes are overwritten while a queued copy, or a kernel queued
after it on any of those streams, may still read them.
"""

from __future__ import annotations

import numpy as np

from kvcore.errors import KernelError

__all__ = ["PinnedRing", "refuse_capture"]

_ALIGN = 256
_H2D = 1   # cudaMemcpyHostToDevice
_EVENT_DISABLE_TIMING = 2


def refuse_capture(runtime, stream: int, what: str) -> None:
    """Raise if ``stream`` is capturing a CUDA graph: ``what`` reads host memory that a
    replay would not read again."""
    try:
        capturing = runtime.streamIsCapturing(stream)
    except Exception:   # querying the legacy stream during another capture can fail
        capturing = 1
    if capturing:
        raise KernelError(f"{what} uses host index arrays, which cannot be captured in a "
                          "CUDA graph (a replay would not upload them again); give device "
                          "arrays or a StepMetadata updated before the replay")


class PinnedRing:
    """A pinned host ring and a device ring of ``nbytes`` each, for small uploads.

    Parameters
    ----------
    framework : TorchFramework or CupyFramework
        Allocates the device ring (so a torch cache keeps its memory in torch's pool).
    nbytes : int
        Ring size; uploads above one segment get a device buffer of their own.
    """

    NUM_SEGMENTS = 8

    def __init__(self, framework, nbytes: int = 4 << 20):
        import cupy

        self._runtime = cupy.cuda.runtime
        self._framework = framework
        self._nbytes = nbytes
        self._segment = nbytes // self.NUM_SEGMENTS
        self._pinned = cupy.cuda.alloc_pinned_memory(nbytes)
        self._host = np.frombuffer(self._pinned, dtype=np.uint8, count=nbytes)
        self._device = framework.empty((nbytes,), "uint8")
        self._device_ptr = _address(self._device)
        self._offset = 0
        self._streams_here: set[int] = set()          # streams that used the current segment
        self._events: list[list[int]] = [[] for _ in range(self.NUM_SEGMENTS)]

    def upload(self, arrays, stream: int):
        """Copy C-contiguous NumPy ``arrays`` to the device in one ``cudaMemcpyAsync``.

        Returns
        -------
        pointers : list of int
            Device address of each array's copy, valid for work queued on ``stream``.
        keepalive : object
            Hold it until that work is queued (a device buffer of its own for large
            uploads; None for the ring).
        """
        refuse_capture(self._runtime, stream, "this call")
        offsets, total = [], 0
        for array in arrays:
            offsets.append(total)
            total += -(-array.nbytes // _ALIGN) * _ALIGN
        if total > self._segment:
            return self._upload_large(arrays, offsets, total, stream)
        start = -(-self._offset // _ALIGN) * _ALIGN
        segment = start // self._segment
        if start + total > (segment + 1) * self._segment:   # never straddle segments
            start = (segment + 1) * self._segment
        if start + total > self._nbytes:
            start = 0
        new_segment = start // self._segment
        old_segment = max(self._offset - 1, 0) // self._segment
        if new_segment != old_segment:
            self._leave(old_segment)
            for event in self._events[new_segment]:
                self._runtime.eventSynchronize(event)
                self._runtime.eventDestroy(event)
            self._events[new_segment] = []
        self._streams_here.add(stream)
        for array, offset in zip(arrays, offsets, strict=True):
            self._host[start + offset:start + offset + array.nbytes] = \
                array.reshape(-1).view(np.uint8)
        self._runtime.memcpyAsync(self._device_ptr + start, self._pinned.ptr + start, total,
                                  _H2D, stream)
        self._offset = start + total
        return [self._device_ptr + start + offset for offset in offsets], None

    def _leave(self, segment: int) -> None:
        events = []
        for stream in self._streams_here:
            event = self._runtime.eventCreateWithFlags(_EVENT_DISABLE_TIMING)
            self._runtime.eventRecord(event, stream)
            events.append(event)
        self._events[segment] = events
        self._streams_here = set()

    def _upload_large(self, arrays, offsets, total, stream):
        # A device buffer from the framework's stream-ordered allocator, used on `stream`
        # only, so its reuse after we drop it is ordered after our kernels. The copy is
        # from pageable memory: cudaMemcpyAsync returns once the host bytes are staged.
        device = self._framework.empty((total,), "uint8", stream)
        packed = np.empty(total, dtype=np.uint8)
        for array, offset in zip(arrays, offsets, strict=True):
            packed[offset:offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        base = _address(device)
        self._runtime.memcpyAsync(base, packed.ctypes.data, total, _H2D, stream)
        return [base + offset for offset in offsets], device

    def __del__(self):
        try:
            for events in self._events:
                for event in events:
                    self._runtime.eventDestroy(event)
        except Exception:   # interpreter shutdown
            pass


def _address(device_array) -> int:
    data_ptr = getattr(device_array, "data_ptr", None)
    return data_ptr() if data_ptr is not None else device_array.data.ptr
