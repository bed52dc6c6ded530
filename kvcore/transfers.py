"""Transfers between the device tier and the host tier, and their completion.

Four kinds of :class:`Transfer`, each the page table's bookkeeping
(:class:`kvcore.HostTier`) plus one batched copy on the caller's stream followed by an
event: :meth:`KVCache.swap_out` and :meth:`KVCache.swap_in` move sequences; with prefix
caching, an *offload* copies cached pages that a call had to reuse into the host tier
(enqueued by that call before any copy or write of its own), and a *load* copies
host-tier prefix hits into the fresh device pages of a new sequence. The
:class:`Transfers` queue holds them until
:meth:`Transfers.poll` (non-blocking) or :meth:`Transfers.wait` sees that event
complete, and only then tells the bookkeeping, which makes the moved pages usable and
releases the ones left behind. A copy that fails (at launch, or reported by its event)
is finished as failed: the sequences go back to the tier they left, whose pages were
never released, and the copy's destination pages are freed without ever being mapped.
"""

from __future__ import annotations

import itertools

import numpy as np

from kvcore._args import int64_copy
from kvcore.errors import KernelError, KVCoreError

__all__ = ["Transfer", "Transfers"]


class Transfer:
    """One batched copy between the tiers (returned by ``swap_out`` / ``swap_in``).

    Attributes
    ----------
    id : int
        Increasing per cache, from 0.
    kind : {"swap_out", "swap_in", "offload", "load"}
        What it does (see the module doc).
    direction : {"out", "in"}
        ``"out"``: device to host (swap_out, offload); ``"in"``: host to device.
    seq_ids : numpy.ndarray of int64, shape [B]
        The sequences it moves or loads (none for an offload).
    device_pages, host_pages : numpy.ndarray of int32, shape [n]
        Pair ``i`` is copied between device page ``device_pages[i]`` and host page
        ``host_pages[i]`` (every layer slot, K and V).
    nbytes : int
        Bytes copied: ``n * config.page_bytes``.
    status : {"pending", "done", "failed"}
        ``"pending"`` until :meth:`KVCache.poll` or :meth:`KVCache.wait` completes it.
    error : BaseException or None
        Why it failed.
    """

    __slots__ = ("device_pages", "direction", "error", "event", "host_pages", "id", "kind",
                 "nbytes", "seq_ids", "status")

    def __init__(self, transfer_id: int, kind: str, seq_ids: np.ndarray,
                 device_pages: np.ndarray, host_pages: np.ndarray, nbytes: int):
        self.id = transfer_id
        self.kind = kind
        self.direction = "out" if kind in ("swap_out", "offload") else "in"
        self.seq_ids = seq_ids
        self.device_pages = device_pages
        self.host_pages = host_pages
        self.nbytes = nbytes
        self.status = "pending"
        self.error: BaseException | None = None
        self.event = None

    @property
    def done(self) -> bool:
        """Whether it completed successfully."""
        return self.status == "done"

    @property
    def num_pages(self) -> int:
        """Pages copied."""
        return int(self.device_pages.size)

    def __repr__(self) -> str:
        return (f"Transfer(id={self.id}, kind={self.kind!r}, "
                f"seqs={self.seq_ids.size}, pages={self.num_pages}, status={self.status!r})")


class Transfers:
    """The transfers of one cache that have not completed, oldest first.

    Parameters
    ----------
    tier : HostTier
        The bookkeeping that starts and finishes moves.
    backend : Backend
        Copies the pages (``swap_copy``) and reports completion (``transfer_done``,
        ``wait_transfer``, ``destroy_event``).
    page_bytes : int
        Bytes of one page, every layer slot, K and V.
    """

    def __init__(self, tier, backend, page_bytes: int):
        self._tier = tier
        self._backend = backend
        self._page_bytes = page_bytes
        self._pending: list[Transfer] = []
        self._unreported: list[Transfer] = []   # failed at launch, for the next poll
        self._ids = itertools.count()

    @property
    def pending(self) -> tuple[Transfer, ...]:
        """Transfers in flight, oldest first."""
        return tuple(self._pending)

    def start(self, direction: str, seq_ids, stream) -> Transfer:
        """Do the bookkeeping of a move and enqueue its copy on ``stream`` (after the
        offloads that the swap-in's page allocation caused).

        Raises what :meth:`HostTier.swap_out` / ``swap_in`` raise (nothing changed), or
        :class:`KernelError` when the copy cannot be enqueued (the move is undone).
        """
        seq_ids = int64_copy(seq_ids)      # converted once: the move and the record agree
        move = self._tier.swap_out if direction == "out" else self._tier.swap_in
        device_pages, host_pages = move(seq_ids)
        if direction == "in":
            self.offload(stream)
        return self._launch(f"swap_{direction}", seq_ids, device_pages, host_pages, stream)

    def offload(self, stream) -> Transfer | None:
        """Enqueue the copies of pages the last call offloaded (see
        :meth:`PageTable.take_writebacks`), if any. Call it right after any call that
        may take device pages, before anything writes them.

        Never raises for a copy that cannot be enqueued: the call that caused the
        offload has happened and must go on (its own copies follow). The offloaded
        blocks then leave the index unserved, and the failed transfer is returned by
        the next :meth:`poll`.
        """
        table = self._tier.table
        if not table.num_writebacks:
            return None
        device_pages, host_pages = table.take_writebacks()
        return self._launch("offload", np.empty(0, np.int64), device_pages, host_pages,
                            stream, raise_failure=False)

    def load(self, seq_id: int, stream) -> Transfer | None:
        """Enqueue the copy of new sequence ``seq_id``'s host-tier prefix hits (after
        the offloads its fresh pages caused); None when it had none.

        Never raises for a copy that cannot be enqueued: the load is finished as failed
        at once (the sequence keeps the hit before its first offloaded block) and the
        transfer is returned by the next :meth:`poll`.
        """
        self.offload(stream)
        device_pages, host_pages = self._tier.load_pairs(seq_id)
        if not device_pages.size:
            return None
        return self._launch("load", np.array([seq_id], np.int64), device_pages, host_pages,
                            stream, raise_failure=False)

    def _launch(self, kind: str, seq_ids, device_pages, host_pages, stream, *,
                raise_failure: bool = True) -> Transfer:
        transfer = Transfer(next(self._ids), kind, seq_ids, device_pages, host_pages,
                            int(device_pages.size) * self._page_bytes)
        try:
            transfer.event = self._backend.swap_copy(transfer.direction, device_pages,
                                                     host_pages, stream)
        except Exception as exc:   # any launch failure fails the transfer
            self._end(transfer, False)
            transfer.status, transfer.error = "failed", exc
            if not raise_failure:
                self._unreported.append(transfer)
                return transfer
            if isinstance(exc, KVCoreError):
                raise
            raise KernelError(f"the {kind} copy could not be enqueued: {exc}") from exc
        self._pending.append(transfer)
        return transfer

    def _end(self, transfer: Transfer, ok: bool) -> None:
        """Tell the bookkeeping that ``transfer``'s copy completed or failed."""
        if transfer.kind == "offload":
            self._tier.finish_writebacks(transfer.host_pages, ok)
        else:
            self._tier.finish(transfer.seq_ids, ok)

    def poll(self) -> list[Transfer]:
        """Finish every transfer whose copy has completed (or failed); never blocks.

        Returns
        -------
        list of Transfer
            The ones finished by this call, oldest first; check ``status``.
        """
        finished, self._unreported = self._unreported, []
        for transfer in list(self._pending):
            try:
                complete = self._backend.transfer_done(transfer.event)
            except Exception as exc:
                self._finish(transfer, exc)
                finished.append(transfer)
                continue
            if complete:
                self._finish(transfer, None)
                finished.append(transfer)
        return finished

    def wait(self, transfer: Transfer | None = None) -> list[Transfer]:
        """Block until ``transfer`` (default: every pending one) has completed, then
        finish it and anything else already complete (see :meth:`poll`).

        Raises
        ------
        ValueError
            ``transfer`` is not pending here (finished already, or another cache's).
        """
        if transfer is not None and not any(t is transfer for t in self._pending):
            raise ValueError(f"{transfer!r} is not in flight on this cache")
        targets = list(self._pending) if transfer is None else [transfer]
        finished = []
        for target in targets:
            try:
                self._backend.wait_transfer(target.event)
            except Exception as exc:
                self._finish(target, exc)
                finished.append(target)
        finished += self.poll()
        finished.sort(key=lambda t: t.id)
        return finished

    def _finish(self, transfer: Transfer, error: BaseException | None) -> None:
        self._end(transfer, error is None)
        self._pending.remove(transfer)
        transfer.status = "done" if error is None else "failed"
        transfer.error = error
        event, transfer.event = transfer.event, None
        try:
            self._backend.destroy_event(event)
        except Exception:
            pass
