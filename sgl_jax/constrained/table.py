"""Where compiled constraints live on the device: host bookkeeping for one shared table buffer.

The device holds three fixed-size arrays for all active constraints together (see sgl_jax/runner.py):
    mask  [num_rows, ceil(V/32)]   packed allowed-token bits, one row per FSM state
    next  [num_rows, num_classes]  next state (a global row id) per token class; -1 = not allowed
    cls   [num_slots, V]           token -> class map of the constraint in that slot
A constraint occupies one slot and a contiguous, block-aligned range of rows; its local state s is the
global row `base + s`. This class decides placements like the KV page allocator does for pages:
reference counts held by running requests, LRU reuse of loaded but unreferenced constraints (a second
request with the same schema uploads nothing), eviction of the least recently used unreferenced one
when space runs out. Because the arrays never change shape, a new constraint never recompiles the step.
Host code: no jax import.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Hashable


class ConstraintTableFullError(ValueError):
    """A constraint does not fit the device table even when empty; the message names the limits."""


@dataclasses.dataclass
class Placement:
    key: Hashable
    fsm: Any  # CompiledFSM
    slot: int
    base: int
    rows: int  # rows reserved (num_states rounded up to the block)
    refs: int = 0
    last_use: int = 0
    uploaded: bool = False


class ConstraintTable:
    """Slots and row ranges of the on-device constraint table. Single-threaded (the engine thread)."""

    def __init__(self, num_rows: int, num_classes: int, num_slots: int, block: int = 64):
        if num_rows % block:
            raise ValueError(f"num_rows ({num_rows}) must be a multiple of the upload block ({block})")
        self.num_rows, self.num_classes, self.num_slots, self.block = num_rows, num_classes, num_slots, block
        self.placed: dict[Hashable, Placement] = {}
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._free_ranges: list[tuple[int, int]] = [(0, num_rows)]  # (start, length), sorted, coalesced
        self._clock = itertools.count(1)

    def check_fits(self, fsm) -> None:
        rows = -(-fsm.num_states // self.block) * self.block
        if rows > self.num_rows or fsm.num_classes > self.num_classes:
            raise ConstraintTableFullError(
                f"the constraint needs {fsm.num_states} states and {fsm.num_classes} token classes; the device "
                f"table holds {self.num_rows} states and {self.num_classes} classes (config constraint_rows / "
                f"constraint_classes)")

    def acquire(self, key: Hashable, fsm) -> Placement | None:
        """Take a reference on `key`'s placement, placing it if needed (evicting unreferenced ones).

        Returns None when everything that could be evicted is in use; the caller retries later.
        A new placement has uploaded=False: the caller uploads its rows, then sets uploaded=True.
        """
        self.check_fits(fsm)
        p = self.placed.get(key)
        if p is None:
            rows = -(-fsm.num_states // self.block) * self.block
            while True:
                start = self._take_range(rows)
                if start is not None and self._free_slots:
                    break
                if start is not None:
                    self._give_range(start, rows)
                if not self._evict_one():
                    return None
            p = Placement(key, fsm, self._free_slots.pop(), start, rows)
            self.placed[key] = p
        p.refs += 1
        p.last_use = next(self._clock)
        return p

    def release(self, key: Hashable) -> None:
        p = self.placed[key]
        if p.refs <= 0:
            raise ValueError(f"release of constraint {key!r} that holds no reference")
        p.refs -= 1

    def _evict_one(self) -> bool:
        idle = [p for p in self.placed.values() if p.refs == 0]
        if not idle:
            return False
        victim = min(idle, key=lambda p: p.last_use)
        del self.placed[victim.key]
        self._free_slots.append(victim.slot)
        self._give_range(victim.base, victim.rows)
        return True

    def _take_range(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self._free_ranges):
            if length >= n:
                if length == n:
                    del self._free_ranges[i]
                else:
                    self._free_ranges[i] = (start + n, length - n)
                return start
        return None

    def _give_range(self, start: int, n: int) -> None:
        ranges = sorted(self._free_ranges + [(start, n)])
        merged: list[tuple[int, int]] = []
        for s, l in ranges:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + l)
            else:
                merged.append((s, l))
        self._free_ranges = merged

    def check_integrity(self) -> None:
        """Rows: placements + free ranges tile [0, num_rows) exactly; slots: used + free == all."""
        spans = sorted([(p.base, p.rows) for p in self.placed.values()] + self._free_ranges)
        pos = 0
        for s, l in spans:
            assert s == pos, f"constraint rows overlap or leak at row {pos} (next span starts at {s})"
            pos += l
        assert pos == self.num_rows, f"constraint rows cover {pos} of {self.num_rows}"
        slots = [p.slot for p in self.placed.values()] + self._free_slots
        assert sorted(slots) == list(range(self.num_slots)), f"constraint slots inconsistent: {sorted(slots)}"
        assert all(p.refs >= 0 for p in self.placed.values())
