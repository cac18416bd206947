"""Host-side allocator of KV-cache pages.

The device KV cache is a pool of ``num_pages`` fixed-size pages.  This module
only hands out page *indices*; it never touches device memory and does not
import jax.

Pages ``0 .. reserved-1`` are never handed out.  Page 0 is the *sink*: padded
token slots of a batch write their (garbage) K/V there, so it must never hold
live data.

Threading: the scheduler is single-threaded; nothing here is locked.
"""

from __future__ import annotations

import operator
from typing import Iterable

__all__ = ["PageAllocator", "pages_for_budget"]


def pages_for_budget(bytes_budget: int, bytes_per_page: int) -> int:
    """Number of whole pages of ``bytes_per_page`` bytes that fit in ``bytes_budget``.

    The result counts *all* pages of the pool (pass it as ``num_pages``; the
    reserved pages come out of it).
    """
    if bytes_per_page <= 0:
        raise ValueError(f"bytes_per_page must be > 0, got {bytes_per_page}")
    if bytes_budget < 0:
        raise ValueError(f"bytes_budget must be >= 0, got {bytes_budget}")
    return int(bytes_budget // bytes_per_page)


class PageAllocator:
    """Free list of page indices ``reserved .. num_pages-1``.

    ``alloc`` is all-or-nothing and hands out the most recently freed pages
    first (LIFO), lowest indices first on a fresh allocator.  Every operation
    is O(number of pages moved).
    """

    def __init__(self, num_pages: int, reserved: int = 1):
        num_pages = operator.index(num_pages)
        reserved = operator.index(reserved)
        if reserved < 0:
            raise ValueError(f"reserved must be >= 0, got {reserved}")
        if num_pages < reserved:
            raise ValueError(f"num_pages ({num_pages}) < reserved ({reserved})")
        self._num_pages = num_pages
        self._reserved = reserved
        # Stack: the end of the list is handed out first.
        self._free: list[int] = list(range(num_pages - 1, reserved - 1, -1))
        self._is_free = bytearray(num_pages)
        for p in self._free:
            self._is_free[p] = 1

    # ------------------------------------------------------------------ queries
    @property
    def num_pages(self) -> int:
        """Size of the pool, reserved pages included."""
        return self._num_pages

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def num_total(self) -> int:
        """Usable pages: ``num_pages - reserved``."""
        return self._num_pages - self._reserved

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    def is_free(self, page: int) -> bool:
        """True iff ``page`` is a usable page currently on the free list."""
        return 0 <= page < self._num_pages and bool(self._is_free[page])

    def is_valid_page(self, page: int) -> bool:
        """True iff ``page`` may ever be handed out (in range, not reserved)."""
        return self._reserved <= page < self._num_pages

    # ---------------------------------------------------------------- mutation
    def alloc(self, n: int) -> list[int] | None:
        """Take ``n`` pages off the free list; ``None`` (and no change) if fewer are free."""
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        out = self._free[-n:]
        del self._free[-n:]
        out.reverse()
        is_free = self._is_free
        for p in out:
            is_free[p] = 0
        return out

    def free(self, pages: Iterable[int]) -> None:
        """Return ``pages`` to the free list.

        Validates everything first: a reserved, out-of-range or already free
        page (or one repeated in ``pages``) raises ``ValueError`` naming it and
        nothing is freed.
        """
        pages = [operator.index(p) for p in pages]
        seen: set[int] = set()
        for p in pages:
            if not (0 <= p < self._num_pages):
                raise ValueError(f"page {p} is out of range [0, {self._num_pages})")
            if p < self._reserved:
                raise ValueError(f"page {p} is reserved (pages < {self._reserved}) and cannot be freed")
            if self._is_free[p] or p in seen:
                raise ValueError(f"double free of page {p}")
            seen.add(p)
        is_free = self._is_free
        for p in pages:
            is_free[p] = 1
        self._free.extend(pages)

    def __repr__(self) -> str:
        return f"PageAllocator(num_pages={self._num_pages}, reserved={self._reserved}, free={self.num_free})"
