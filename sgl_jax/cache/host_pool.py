"""The host-memory tier of the KV cache: page-sized slots in one numpy byte arena.

Pure host code (numpy; does not import jax). The radix tree (``RadixCache(host=...)``) decides what lives here: a
device page the tree evicts is *demoted* into a slot instead of being dropped, and a later request whose prefix
continues into host-resident nodes may have them *promoted* back into device pages (or recompute them; the
scheduler's cost model, ``TransferCosts``, decides). The arena holds each page as raw bytes, every layer's K and V
of one page in one row (``page_bytes``), so this module never needs the pool's dtype.

Data moves through callbacks the engine installs (``bind``), all on the scheduler's thread:

  save(device_pages) -> uint8 [n, page_bytes]   device pages read now (the disk tier's write-through)
  save_into(device_pages, arena, slots)         the same, written straight into those arena rows: every
                                                demotion of a scheduling round is read in one call
                                                (``flush_saves``) when the round's plan takes its loads, before
                                                the step that could reuse the freed pages runs
  loads                                          (slot, device page) pairs queued for the next step: the runner
                                                writes them after the step's page copies and before it runs

A demotion's copy waits in ``_pending`` (slot -> device page) until ``flush_saves``: one gather for the round
instead of one per evicted leaf. A slot freed before that (dropped from the host tier in the same round) loses its
pending copy, so a later write into the reused slot (a disk read) is never overwritten by stale data; whoever reads
the arena outside a step (the disk tier's write-back) flushes first.

A promoted slot is not reused until the step after the one whose loads read it (``take_loads`` releases the slots
of the previous batch), so a demotion in the same scheduling round cannot overwrite data a queued load still needs.
A slot the tree keeps as the promoted page's *host copy* (``queue_load(..., keep=True)``: the next demotion of that
page then copies nothing) is not released but marked as read until the same point; ``drop_copy`` on a slot still
read moves it to the release of its load's batch instead of freeing it.
Without callbacks (tests of the tree alone) ``save`` returns zeros.

The arena is allocated zeroed and untouched: a slot costs memory once a demotion is first written into it, and
that first write faults its memory in inside a scheduling round. On this project's 2-CPU VMs that cost up to ~5 s
a GiB when the memory had not been used for a few seconds (1.65 s of a 33 s chat run against 0.06 s with
the slots touched beforehand; bench/notes.md, session 22); `bench_hicache.py chat --touch-host` measures the
tier without it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .allocator import PageAllocator

__all__ = ["HostPool"]


class HostPool:
    """``num_slots`` host slots of ``page_bytes`` bytes, their allocator, and the transfers queued for the next
    step. ``page_bytes == 0`` keeps no arena (tests of the tree's bookkeeping alone)."""

    def __init__(self, num_slots: int, page_bytes: int = 0):
        if num_slots < 1:
            raise ValueError(f"a host tier needs at least one slot, got {num_slots}")
        self.allocator = PageAllocator(num_slots, reserved=0)
        self.page_bytes = int(page_bytes)
        self.arena = np.zeros((num_slots, self.page_bytes), np.uint8) if page_bytes else None
        self._save: Callable[[Sequence[int]], np.ndarray] | None = None
        self._save_into: Callable[[Sequence[int], np.ndarray, Sequence[int]], None] | None = None
        self.loads: list[tuple[int, int]] = []  # (slot, device page) for the next step
        self._release_next: list[int] = []  # slots promoted this round: free once their loads have run
        self._release_now: list[int] = []  # promoted last round: their loads ran with the last step
        self._reading_next: set[int] = set()  # kept slots (host copies) read by this round's loads
        self._reading_now: set[int] = set()  # ... by last round's
        self._pending: dict[int, int] = {}  # slot -> device page: demotions not copied yet (``flush_saves``)
        # counters (read by /metrics)
        self.pages_saved = 0
        self.pages_loaded = 0

    @property
    def num_slots(self) -> int:
        return self.allocator.num_total

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.page_bytes

    def bind(self, save: Callable[[Sequence[int]], np.ndarray],
             save_into: Callable[[Sequence[int], np.ndarray, Sequence[int]], None] | None = None) -> None:
        """Install the engine's device -> host readers (see the module docstring); without `save_into` the
        demotions go through `save` and a copy."""
        self._save, self._save_into = save, save_into

    def read_device(self, device_pages: Sequence[int]) -> np.ndarray:
        """Device pages as bytes [n, page_bytes], now (the disk tier's write-through reads them this way)."""
        if self._save is None:
            return np.zeros((len(device_pages), self.page_bytes), np.uint8)
        return self._save(list(device_pages))

    def save(self, device_pages: Sequence[int], slots: Sequence[int]) -> None:
        """Copy ``device_pages`` into ``slots`` at the next ``flush_saves`` (before the next step runs)."""
        if not device_pages:
            return
        self.pages_saved += len(device_pages)
        if self.arena is None:
            return
        for s, p in zip(slots, device_pages):
            self._pending[int(s)] = int(p)

    def flush_saves(self) -> None:
        """Copy every pending demotion into its slot now, in one read of the device."""
        if not self._pending:
            return
        slots, pages = list(self._pending), list(self._pending.values())
        self._pending = {}
        if self._save_into is not None:
            self._save_into(pages, self.arena, slots)
            return
        data = self.read_device(pages)
        if data.shape != (len(pages), self.page_bytes):
            raise ValueError(f"the device reader returned {data.shape} for {len(pages)} pages of "
                             f"{self.page_bytes} bytes")
        self.arena[np.asarray(slots, np.int64)] = data

    def pending_page(self, slot: int) -> int | None:
        """The device page whose copy into ``slot`` is still pending, or None."""
        return self._pending.get(int(slot))

    def free(self, slots: Sequence[int]) -> None:
        """Give ``slots`` back; a copy still pending into one of them is dropped (its page left the host tier)."""
        for s in slots:
            self._pending.pop(int(s), None)
        self.allocator.free(slots)

    def queue_load(self, slots: Sequence[int], device_pages: Sequence[int], keep: bool = False) -> None:
        """Queue ``slots`` -> ``device_pages`` for the next step; the slots are released after it, or with
        ``keep`` stay allocated (the tree keeps them as host copies) and count as read until then."""
        self.loads.extend(zip((int(s) for s in slots), (int(p) for p in device_pages)))
        if keep:
            self._reading_next.update(int(s) for s in slots)
        else:
            self._release_next.extend(int(s) for s in slots)
        self.pages_loaded += len(slots)

    def reading(self, slot: int) -> bool:
        """Whether a queued load (this round's or the last) still reads kept ``slot``."""
        return slot in self._reading_next or slot in self._reading_now

    def drop_copy(self, slot: int) -> None:
        """Give back a kept slot: now, or with its load's batch when a queued load still reads it."""
        slot = int(slot)
        if slot in self._reading_next:
            self._reading_next.discard(slot)
            self._release_next.append(slot)
        elif slot in self._reading_now:
            self._reading_now.discard(slot)
            self._release_now.append(slot)
        else:
            self.free([slot])

    def take_loads(self) -> list[tuple[int, int]]:
        """The loads for the step being planned (the caller runs them before that step), and release the slots
        whose loads ran with the previous step. The round's demotions are copied first: the step may reuse their
        device pages, and its loads may read their slots."""
        self.flush_saves()
        if self._release_now:
            self.free(self._release_now)
        self._release_now, self._release_next = self._release_next, []
        self._reading_now, self._reading_next = self._reading_next, set()
        loads, self.loads = self.loads, []
        return loads

    @property
    def pending_release(self) -> int:
        """Slots held only until queued loads have run (counted as neither free nor cached)."""
        return len(self._release_now) + len(self._release_next)

    def drop_pending(self) -> None:
        """Forget queued loads and release their slots now (a flush: the pages they would fill were freed)."""
        self.loads = []
        self._reading_now, self._reading_next = set(), set()  # kept slots: the tree frees them itself
        slots = self._release_now + self._release_next
        self._release_now, self._release_next = [], []
        if slots:
            self.free(slots)

    def __repr__(self) -> str:
        return (f"HostPool(slots={self.num_slots}, free={self.allocator.num_free}, page_bytes={self.page_bytes}, "
                f"pending={self.pending_release})")
