"""Naive twin of ``RadixCache``: same interface, simplest data structure.

Used only to cross-check ``RadixCache`` (property tests).  Every cached page
is one dict entry keyed by ``(namespace, token prefix up to and including that
page)``; everything else is a linear scan.  Semantics (page granularity, LRU
clock, eviction order, duplicate freeing, locks, disabled mode) are defined to
match ``RadixCache`` exactly -- see its module docstring.  Single-threaded.

LRU: a logical clock ticks once per ``match_prefix``/``insert``; every entry of
the touched prefix gets the tick.  ``evict`` repeatedly removes the unlocked
leaf entry (no cached extension) with the smallest ``(stamp, namespace,
key)``.  Because a tick stamps one root-to-node path, leaf stamps are unique,
so the tie-break never matters and the order equals RadixCache's.

Host tier (``host=HostPool``): host-resident pages are entries of a second dict, ``_host`` (page = slot), with
the semantics of RadixCache's "Tiers", page by page: ``evict`` takes the LRU device leaf entry (no device entry
extends it), frees a host slot first if none is free by dropping the LRU host leaf entry (nothing extends it),
and moves the page there; with no slot to be had it drops the page and every host entry extending it. A promoted
page keeps its slot as a host copy (``_copies``, oldest first): its demotion moves it there without a copy, and
when the host needs a slot the oldest copy no queued load reads goes before any host page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .allocator import PageAllocator
from .host_pool import HostPool
from .radix_cache import MatchResult, _as_tokens

__all__ = ["NaivePrefixCache"]


@dataclass
class _Entry:
    page: int
    last_access: int
    ref: int = 0


@dataclass(frozen=True)
class _Handle:
    namespace: str
    key: tuple


class NaivePrefixCache:
    """Dict-of-prefixes prefix cache with the same interface as ``RadixCache``.

    The naive twin the property tests check the radix tree against (tests/test_radix_cache.py). Over ~300 lines
    because it implements the whole interface, host tier included, in the plainest form each method allows:
    splitting it would make it less obviously right, which is its only job."""

    def __init__(self, allocator: PageAllocator, page_size: int, disabled: bool = False,
                 host: HostPool | None = None):
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        self.allocator = allocator
        self.host = host
        self._host: dict[tuple[str, tuple], _Entry] = {}  # host-resident pages: entry.page is the slot
        self._copies: dict[tuple[str, tuple], int] = {}  # device entries' host copies (slots), oldest first
        self._load_locks_next: list[_Handle] = []  # promoted prefixes, locked until their loads have run
        self._load_locks_now: list[_Handle] = []
        self.page_size = int(page_size)
        self.disabled = bool(disabled)
        self._entries: dict[tuple[str, tuple], _Entry] = {}
        self._root_refs: dict[str, int] = {}
        self._clock = 0
        self._tails: dict[tuple[str, tuple], int] = {}  # (namespace, prefix + tail tokens) -> page, oldest first

    # counters (recounted every time: this is the slow, obviously-correct twin)
    @property
    def evictable_pages(self) -> int:
        return sum(1 for e in self._entries.values() if e.ref == 0) + len(self._tails)

    @property
    def protected_pages(self) -> int:
        return sum(1 for e in self._entries.values() if e.ref > 0)

    @property
    def cached_pages(self) -> int:
        return len(self._entries) + len(self._tails)

    @property
    def num_tails(self) -> int:
        return len(self._tails)

    @property
    def host_cached_pages(self) -> int:
        return len(self._host)

    @property
    def host_copy_pages(self) -> int:
        return len(self._copies)

    def host_match_len(self, tokens: Sequence[int], namespace: str = "") -> int:
        if self.disabled or self.host is None:
            return 0
        toks = _as_tokens(tokens)
        k = 0
        for key in self._prefix_keys(toks, namespace, len(toks) // self.page_size):
            if key in self._entries:
                continue
            if key not in self._host:
                break
            k += 1
        return k * self.page_size

    def promote(self, tokens: Sequence[int], namespace: str = "", max_pages: int | None = None) -> int:
        """Host continuation of the device match -> device pages (loads queued). See ``RadixCache.promote``."""
        if self.disabled or self.host is None:
            return 0
        toks = _as_tokens(tokens)
        budget = self.allocator.num_free if max_pages is None else min(max_pages, self.allocator.num_free)
        self._clock += 1
        moved = end = 0
        for key in self._prefix_keys(toks, namespace, len(toks) // self.page_size):
            e = self._entries.get(key)
            if e is None:
                if key not in self._host or budget == 0:
                    break
                h = self._host.pop(key)
                (page,) = self.allocator.alloc(1)
                self.host.queue_load([h.page], [page], keep=True)
                self._copies[key] = h.page
                e = self._entries[key] = _Entry(page, self._clock)
                budget -= 1
                moved += 1
            e.last_access = self._clock
            end = len(key[1])
        if moved:
            handle = _Handle(namespace, toks[:end])
            self.lock(handle)
            self._load_locks_next.append(handle)
        return moved * self.page_size

    def free_host_slots(self, n: int, tokens: Sequence[int], namespace: str = "") -> int:
        """See ``RadixCache.free_host_slots``: stamp the host pages on the path, then drop LRU host leaves."""
        alloc = self.host.allocator
        short = n - alloc.num_free
        if short <= 0 or self.disabled:
            return alloc.num_free
        toks = _as_tokens(tokens)
        self._clock += 1
        own = 0
        for key in self._prefix_keys(toks, namespace, len(toks) // self.page_size):
            e = self._entries.get(key) or self._host.get(key)
            if e is None:
                break
            e.last_access = self._clock
            own += key in self._host
        self._drop_copies(short)
        short = n - alloc.num_free
        for _ in range(max(0, min(short, len(self._host) - own))):
            cands = [(h.last_access, k[0], k[1]) for k, h in self._host.items()
                     if not any(self._extends(k, o) for o in self._host)]
            _, ns, t = min(cands)
            self.host.free([self._host.pop((ns, t)).page])
        return alloc.num_free

    def insert_host(self, tokens: Sequence[int], slots: Sequence[int], namespace: str = "") -> None:
        toks, ps = _as_tokens(tokens), self.page_size
        start = len(toks) - len(slots) * ps
        keys = self._prefix_keys(toks, namespace, len(toks) // ps)
        if any(k not in self._entries and k not in self._host for k in keys[: start // ps]) or any(
                k in self._entries or k in self._host for k in keys[start // ps:]):
            raise ValueError("insert_host: the leading tokens are not in the tree, or the new ones are")
        self._clock += 1
        for k in keys[: start // ps]:
            (self._entries.get(k) or self._host[k]).last_access = self._clock
        for k, slot in zip(keys[start // ps:], slots):
            self._host[k] = _Entry(int(slot), self._clock)

    def take_loads(self) -> list[tuple[int, int]]:
        if self.host is None:
            return []
        for h in self._load_locks_now:
            self.unlock(h)
        self._load_locks_now, self._load_locks_next = self._load_locks_next, []
        return self.host.take_loads()

    def insert_tail(self, node: _Handle, tokens: Sequence[int], page: int) -> bool:
        """Keep a partly filled page after ``node``'s prefix.  See ``RadixCache.insert_tail``."""
        toks = _as_tokens(tokens)
        ps = self.page_size
        if not 0 < len(toks) < ps:
            raise ValueError(f"a tail holds 1 to {ps - 1} tokens, got {len(toks)}")
        if self.disabled:
            self.allocator.free([page])
            return False
        self._handle_keys(node)
        base, ns, full = len(node.key), node.namespace, node.key + toks
        covered = any(kns == ns and len(k) >= len(full) and k[:len(full)] == full and len(k) - base <= ps
                      for kns, k in list(self._entries) + list(self._tails))
        if covered:
            self.allocator.free([page])
            return False
        for key in [k for k in self._tails if k[0] == ns and len(k[1]) < len(full) and full[:len(k[1])] == k[1]
                    and len(k[1]) > base]:
            self.allocator.free([self._tails.pop(key)])
        self._tails[(ns, full)] = int(page)
        return True

    def _prefix_keys(self, toks: tuple, namespace: str, npages: int) -> list[tuple[str, tuple]]:
        ps = self.page_size
        return [(namespace, toks[: (i + 1) * ps]) for i in range(npages)]

    def match_prefix(self, tokens: Sequence[int], namespace: str = "") -> MatchResult:
        """Longest cached page-aligned prefix; stamps its entries.  See ``RadixCache.match_prefix``."""
        if self.disabled:
            return MatchResult([], 0, _Handle(namespace, ()))
        toks = _as_tokens(tokens)
        ps = self.page_size
        self._clock += 1
        pages: list[int] = []
        for key in self._prefix_keys(toks, namespace, len(toks) // ps):
            e = self._entries.get(key)
            if e is None:
                break
            e.last_access = self._clock
            pages.append(e.page)
        return MatchResult(pages, len(pages) * ps, _Handle(namespace, toks[: len(pages) * ps]))

    def match_partial(self, node: _Handle, tokens: Sequence[int]) -> tuple[int, int] | None:
        """Longest partial continuation page of ``node``; read-only.  See ``RadixCache.match_partial``."""
        if self.disabled or self.page_size == 1 or not len(tokens):
            return None
        self._handle_keys(node)
        toks = _as_tokens(tokens)[: self.page_size - 1]
        base, best = len(node.key), None
        for (ns, key), e in self._entries.items():
            if ns != node.namespace or len(key) != base + self.page_size or key[:base] != node.key:
                continue
            j = 0
            while j < len(toks) and key[base + j] == toks[j]:
                j += 1
            if j and (best is None or j > best[1]):
                best = (e.page, j)
        for (ns, key), page in self._tails.items():
            if ns != node.namespace or not base < len(key) < base + self.page_size or key[:base] != node.key:
                continue
            j = 0
            while j < min(len(key) - base, len(toks)) and key[base + j] == toks[j]:
                j += 1
            if j and (best is None or j > best[1]):
                best = (page, j)
        return best

    def peek_prefix_len(self, tokens: Sequence[int], namespace: str = "") -> int:
        """Cached page-aligned prefix length, read-only (no stamp).  See ``RadixCache.peek_prefix_len``."""
        if self.disabled:
            return 0
        toks = _as_tokens(tokens)
        k = 0
        for key in self._prefix_keys(toks, namespace, len(toks) // self.page_size):
            if key not in self._entries:
                break
            k += 1
        return k * self.page_size

    def insert(self, tokens: Sequence[int], pages: Sequence[int], namespace: str = "") -> int:
        """Cache tokens -> pages; frees duplicates; returns already-cached token count.  See ``RadixCache.insert``."""
        ps = self.page_size
        toks = _as_tokens(tokens)
        pages = [int(p) for p in pages]
        if len(toks) != len(pages) * ps:
            raise ValueError(f"insert needs page-aligned tokens: got {len(toks)} tokens for {len(pages)} pages of {ps}")
        if self.disabled:
            self.allocator.free(pages)
            return 0
        if not pages:
            return 0
        cached_pages = {e.page for e in self._entries.values()}
        if len(set(pages)) != len(pages):
            raise ValueError("a page appears twice in insert()")
        for p in pages:
            if not self.allocator.is_valid_page(p) or self.allocator.is_free(p):
                raise ValueError(f"page {p} is reserved, out of range or free")
        keys = self._prefix_keys(toks, namespace, len(pages))
        for key, p in zip(keys, pages):
            e = self._entries.get(key)
            if p in cached_pages and (e is None or e.page != p):
                raise ValueError(f"page {p} is already in the cache at another position")
        self._clock += 1
        already = 0
        dups: list[int] = []
        for key, p in zip(keys, pages):
            e = self._entries.get(key)
            if e is None:
                h = self._host.pop(key, None)
                if h is not None:  # recomputed: the host copy goes
                    self.host.free([h.page])
                self._entries[key] = _Entry(p, self._clock)
            else:
                already += 1
                e.last_access = self._clock
                if e.page != p:
                    dups.append(p)
        if dups:
            self.allocator.free(dups)
        return already * ps

    def _handle_keys(self, handle: _Handle) -> list[tuple[str, tuple]]:
        if not isinstance(handle, _Handle):
            raise TypeError(f"not a NaivePrefixCache handle: {handle!r}")
        keys = self._prefix_keys(handle.key, handle.namespace, len(handle.key) // self.page_size)
        for k in keys:
            if k not in self._entries:
                raise ValueError("stale handle: prefix was evicted or reset")
        return keys

    def lock(self, node: _Handle) -> None:
        keys = self._handle_keys(node)
        self._root_refs[node.namespace] = self._root_refs.get(node.namespace, 0) + 1
        for k in keys:
            self._entries[k].ref += 1

    def unlock(self, node: _Handle) -> None:
        keys = self._handle_keys(node)
        if self._root_refs.get(node.namespace, 0) <= 0 or (keys and self._entries[keys[-1]].ref <= 0):
            raise ValueError(f"unlock of a node that is not locked: {node!r}")
        self._root_refs[node.namespace] -= 1
        for k in keys:
            self._entries[k].ref -= 1

    def discard(self, tokens: Sequence[int], namespace: str = "", keep: int = 0) -> bool:
        """Drop every entry (and tail) extending ``tokens[:keep + page_size]``; False, changing nothing, if one of
        them is locked or on the host.  See ``RadixCache.discard``."""
        ps = self.page_size
        if keep % ps:
            raise ValueError(f"keep={keep} is not a multiple of the page size {ps}")
        head = _as_tokens(tokens)[: keep + ps]
        if len(head) < keep + ps:
            return True

        def below(key):
            return key[0] == namespace and key[1][: keep + ps] == head

        doomed = [k for k in self._entries if below(k)]
        if any(self._entries[k].ref for k in doomed) or any(below(k) for k in self._host):
            return False
        freed = [self._entries.pop(k).page for k in doomed]
        for k in doomed:
            if k in self._copies:
                self.host.drop_copy(self._copies.pop(k))
        freed += [self._tails.pop(k) for k in list(self._tails) if below(k) and len(k[1]) > keep + ps]
        if freed:
            self.allocator.free(freed)
        return True

    def _is_leaf(self, key: tuple[str, tuple]) -> bool:
        ns, toks = key
        n = len(toks) + self.page_size
        return not any(kns == ns and len(kt) == n and kt[: len(toks)] == toks for kns, kt in self._entries)

    def evict(self, num_pages: int) -> int:
        """Remove the LRU unlocked leaf entry, ``num_pages`` times or until none is left."""
        if self.disabled:
            return 0
        freed: list[int] = []
        while len(freed) < num_pages and self._tails:
            freed.append(self._tails.pop(next(iter(self._tails))))
        while len(freed) < num_pages:
            cands = [(e.last_access, k[0], k[1]) for k, e in self._entries.items() if e.ref == 0 and self._is_leaf(k)]
            if not cands:
                break
            _, ns, toks = min(cands)
            e = self._entries.pop((ns, toks))
            freed.append(e.page)
            if self.host is not None:
                self._demote((ns, toks), e)
        if freed:
            self.allocator.free(freed)
        return len(freed)

    def _extends(self, key, other) -> bool:
        return other[0] == key[0] and len(other[1]) > len(key[1]) and other[1][: len(key[1])] == key[1]

    def _drop_copies(self, n: int) -> None:
        for key in [k for k, s in self._copies.items() if not self.host.reading(s)][:n]:
            self.host.free([self._copies.pop(key)])

    def _demote(self, key, e: _Entry) -> None:
        alloc = self.host.allocator
        if key in self._copies:  # moves into its host copy
            self._host[key] = _Entry(self._copies.pop(key), e.last_access)
            return
        if alloc.num_free == 0:
            self._drop_copies(1)
        if alloc.num_free == 0:
            cands = [(h.last_access, k[0], k[1]) for k, h in self._host.items()
                     if not any(self._extends(k, o) for o in list(self._host) + list(self._entries))]
            if cands:
                _, ns, toks = min(cands)
                self.host.free([self._host.pop((ns, toks)).page])
        if alloc.num_free == 0:  # no slot to be had: the page goes, and every host page below it
            below = [k for k in self._host if self._extends(key, k)]
            self.host.free([self._host.pop(k).page for k in below])
            return
        (slot,) = alloc.alloc(1)
        self.host.save([e.page], [slot])
        self._host[key] = _Entry(slot, e.last_access)

    def reset(self) -> None:
        for h in self._load_locks_now + self._load_locks_next:
            self.unlock(h)
        self._load_locks_now, self._load_locks_next = [], []
        for ns, r in self._root_refs.items():
            if r:
                raise RuntimeError(f"reset() with {r} lock(s) held in namespace {ns!r}")
        pages = [e.page for e in self._entries.values()] + list(self._tails.values())
        self._entries.clear()
        self._tails.clear()
        self._root_refs.clear()
        if pages:
            self.allocator.free(pages)
        if self.host is not None:
            if self._host:
                self.host.free([h.page for h in self._host.values()])
            self.host.drop_pending()
            if self._copies:
                self.host.free(list(self._copies.values()))
        self._host.clear()
        self._copies.clear()

    def check_integrity(self, held_pages: Iterable[int] | None = None) -> None:
        ps = self.page_size
        alloc = self.allocator
        seen: dict[int, tuple] = {}
        child_refs: dict[tuple, int] = {}
        for (ns, toks), e in self._entries.items():
            assert len(toks) > 0 and len(toks) % ps == 0, f"key length {len(toks)} not a multiple of {ps}"
            parent = (ns, toks[:-ps])
            if toks[:-ps]:
                assert parent in self._entries, f"prefix of {toks!r} missing (not prefix-closed)"
            child_refs[parent] = child_refs.get(parent, 0) + e.ref
            assert e.page not in seen, f"page {e.page} appears twice in the cache"
            seen[e.page] = toks
            assert alloc.is_valid_page(e.page), f"cached page {e.page} is reserved or out of range"
            assert not alloc.is_free(e.page), f"cached page {e.page} is on the free list"
            assert e.ref >= 0, f"negative ref on {toks!r}"
        for (ns, toks), page in self._tails.items():
            base = len(toks) - len(toks) % ps
            assert len(toks) % ps, f"tail {toks!r} fills whole pages"
            assert not toks[:base] or (ns, toks[:base]) in self._entries, f"tail {toks!r} without its prefix"
            assert page not in seen, f"page {page} appears twice in the cache"
            seen[page] = toks
            assert alloc.is_valid_page(page) and not alloc.is_free(page), f"tail page {page} is free or invalid"
        slots: set[int] = set()
        for (ns, toks), h in self._host.items():
            assert self.host is not None and (ns, toks) not in self._entries, f"{toks!r} on both tiers"
            parent = (ns, toks[:-ps])
            assert not toks[:-ps] or parent in self._entries or parent in self._host, f"host {toks!r} without prefix"
            assert h.page not in slots, f"host slot {h.page} appears twice"
            slots.add(h.page)
            assert not self.host.allocator.is_free(h.page), f"host slot {h.page} is free"
        for (ns, toks) in self._entries:
            assert (ns, toks[:-ps]) not in self._host, f"device page {toks!r} below a host page"
        for key, s in self._copies.items():
            assert key in self._entries, f"host copy of {key!r}, which is not a device entry"
            assert s not in slots, f"host slot {s} appears twice"
            slots.add(s)
            assert not self.host.allocator.is_free(s), f"host slot {s} is free"
        if self.host is not None:
            a = self.host.allocator
            assert a.num_free + len(slots) + self.host.pending_release == a.num_total, "host slots leak"
        for parent, s in child_refs.items():
            ns, toks = parent
            r = self._entries[parent].ref if toks else self._root_refs.get(ns, 0)
            assert r >= s, f"ref {r} of {parent!r} < sum of children refs {s}"
        evictable = self.evictable_pages
        allocated = alloc.num_total - alloc.num_free
        assert evictable <= allocated, f"{evictable} evictable pages but only {allocated} allocated"
        assert self.protected_pages <= allocated - evictable
        if held_pages is not None:
            held = set(int(p) for p in held_pages)
            unlocked = {e.page for e in self._entries.values() if e.ref == 0} | set(self._tails.values())
            for p in held:
                assert not alloc.is_free(p), f"page {p} held by a request is on the free list"
                assert p not in unlocked, f"page {p} held by a request is in an unlocked entry"
            req_only = held - seen.keys()
            assert alloc.num_free + len(seen) + len(req_only) == alloc.num_total, (
                f"page leak: free {alloc.num_free} + cached {len(seen)} + request-only {len(req_only)} != total {alloc.num_total}"
            )
