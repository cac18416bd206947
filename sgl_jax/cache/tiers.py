"""The host-tier half of ``RadixCache`` (see "Tiers" in radix_cache.py): demotion on eviction, the host tier's own
LRU eviction, promotion back to device pages, and the tier invariants. A mixin rather than a second class over the
same nodes: every method here changes the same node fields, counters and heaps as the device half, and the
integrity check covers both. Pure host code (no jax).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Sequence

from .host_pool import HostPool

__all__ = ["TierMixin"]


class TierMixin:
    """Host-tier operations of RadixCache; expects its fields (allocator, page_size, _roots, _heap, ...).

    Over ~300 lines: demotion, promotion, host eviction, matching across tiers and the disk tier's spill hook
    all change the same node residency and host-heap state, and are already the half split out of RadixCache."""

    def _init_tiers(self, host: HostPool | None) -> None:
        self.host = host
        self._host_heap: list[tuple[int, int, Any]] = []
        self._host_heap_ids = itertools.count()
        self._host_pages: set[int] = set()  # slots held by host nodes
        # host copies of promoted device pages (slot -> its device node), oldest first: a promoted page keeps the
        # slot it was loaded from, so demoting it again copies nothing; dropped first when the host needs a slot
        self._copies: dict[int, Any] = {}
        self.pages_demoted_by_copy = 0  # demotions that found the page's host copy (no copy made)
        self.pages_demoted = 0  # device pages moved to the host tier (not dropped)
        self.pages_promoted = 0  # host pages moved back to the device
        self.host_pages_dropped = 0  # host pages evicted from the host tier
        # promoted nodes stay locked until the step that loads their pages has run: evicting one before that would
        # save pages not yet loaded, or free pages a queued load would then overwrite
        self._load_locks_next: list[Any] = []
        self._load_locks_now: list[Any] = []
        # with a disk tier: (namespace, tokens, first page index, device pages) of every new leaf, for write-through
        self.fresh: list[tuple[str, tuple, int, list[int]]] | None = None
        # KV-cache events (cache/events.py): device and host pages gained and given up, for routers; None = off
        self.events = None
        # the disk tier's write-back (cache/disk_tier.py): called with (node, n) before the trailing n host pages
        # of node leave the host tier; None = off
        self.spill = None

    def path_tokens(self, node) -> tuple:
        """Every token from the root to the end of ``node``'s edge."""
        parts = []
        while node is not None and not node.is_root:
            parts.append(node.key)
            node = node.parent
        return tuple(t for key in reversed(parts) for t in key)

    def _emit(self, node, num_pages: int, *changes: tuple[str, bool]) -> None:
        """Tell `events` that the trailing ``num_pages`` pages of ``node`` were stored on / removed from the device
        or the host tier: each change a ("stored" | "removed", on the host?) pair, in order (a demotion or a
        promotion is two); the node's path is walked once."""
        from .events import HOST_MEDIUM, MEDIUM

        tokens = self.path_tokens(node)
        first = len(tokens) // self.page_size - num_pages
        for kind, host in changes:
            getattr(self.events, kind)(node.namespace, tokens, first, num_pages, HOST_MEDIUM if host else MEDIUM)

    # ------------------------------------------------------------- counters
    @property
    def host_cached_pages(self) -> int:
        """Pages held by host nodes."""
        return len(self._host_pages)

    @property
    def host_copy_pages(self) -> int:
        """Host slots held as copies of device pages (see ``_copies``)."""
        return len(self._copies)

    # --------------------------------------------------------- host copies
    @staticmethod
    def _tidy_copy(node) -> None:
        """A copy list left without copies becomes None (the integrity check holds every list to one)."""
        if node.copy is not None and all(s < 0 for s in node.copy):
            node.copy = None

    def _copies_moved(self, node) -> None:
        """After a split, the upper half ``node`` holds these host copies: the index points at it (the copies keep
        their place in the drop order)."""
        for s in node.copy:
            if s >= 0:
                self._copies[s] = node
        self._tidy_copy(node)

    def _drop_node_copies(self, node, start: int) -> None:
        """Give back the host copies of ``node``'s pages from index ``start`` on (those pages leave the tree)."""
        for s in node.copy[start:]:
            if s >= 0:
                del self._copies[s]
                self.host.drop_copy(s)
        node.copy = node.copy[:start]
        self._tidy_copy(node)

    def _drop_copies(self, n: int) -> int:
        """Free up to ``n`` host slots held as copies, the oldest copies first, skipping any a queued load still
        reads (their device pages stay; only a later demotion of them pays a copy again)."""
        victims = []
        for s in self._copies:
            if len(victims) == n:
                break
            if not self.host.reading(s):
                victims.append(s)
        for s in victims:
            node = self._copies.pop(s)
            node.copy[node.copy.index(s)] = -1
            self._tidy_copy(node)
        if victims:
            self.host.free(victims)
        return len(victims)

    # ---------------------------------------------------------------- heaps
    @staticmethod
    def _host_leaf_valid(entry) -> bool:
        stamp, hid, node = entry
        return (node.heap_id == hid and node.last_access == stamp and node.parent is not None and node.tier == 1
                and not node.children)

    def _push_host(self, node) -> None:
        hid = next(self._host_heap_ids)
        node.heap_id = hid
        heapq.heappush(self._host_heap, (node.last_access, hid, node))
        if len(self._host_heap) > 2 * self._num_nodes + 64:
            self._host_heap[:] = [e for e in self._host_heap if self._host_leaf_valid(e)]
            heapq.heapify(self._host_heap)

    def _maybe_push_host(self, node) -> None:
        if node.tier == 1 and node.parent is not None and not node.children:
            self._push_host(node)

    # -------------------------------------------------------------- demote
    def _demote_some(self, node, need: int) -> list[int]:
        """One step of ``evict`` with a host tier: ``node`` is the least recently used device leaf. Moves its
        trailing ``min(need, pages)`` pages to the host at once when the host has room for all of them, else one
        page (after dropping a host copy, else a host page, if no slot is free); returns the device pages given up
        (the caller frees them). A page with a host copy moves into it (no copy made, no slot needed). A page the
        host cannot take at all (every slot waits on a queued load) is dropped, and with it every host page below
        it."""
        host = self.host
        npg = len(node.pages)
        j = min(need, npg)
        want = j if node.copy is None else node.copy[npg - j:].count(-1)
        if host.allocator.num_free < want:
            j = 1
            if node.copy is None or node.copy[-1] < 0:
                if host.allocator.num_free == 0:
                    self._drop_copies(1)
                if host.allocator.num_free == 0:
                    self._evict_host(1)
                if host.allocator.num_free == 0:
                    return self._drop_with_host_below(node)
        if j == npg:
            low, upper = node, node.parent
        else:  # the new upper node keeps the leading pages on the device; `node` the trailing j
            upper, low = self._split(node, (npg - j) * self.page_size), node
        if self.events is not None:
            self._emit(low, j, ("removed", False), ("stored", True))
        dev = low.pages
        if low.copy is None:
            slots = host.allocator.alloc(j)
            host.save(dev, slots)
        else:  # pages with a copy move into it; the rest are copied into new slots
            new = iter(host.allocator.alloc(low.copy.count(-1)) or ())
            slots = [c if c >= 0 else next(new) for c in low.copy]
            host.save([p for p, c in zip(dev, low.copy) if c < 0], [s for s, c in zip(slots, low.copy) if c < 0])
            for c in low.copy:
                if c >= 0:
                    del self._copies[c]
                    self.pages_demoted_by_copy += 1
            low.copy = None
        low.pages = slots
        low.tier = 1
        self._evictable -= j
        self._tree_pages.difference_update(dev)
        self._host_pages.update(slots)
        self.pages_demoted += j
        self._maybe_push_host(low)
        if not upper.is_root:
            self._maybe_push(upper)
        return dev

    @staticmethod
    def _subtree(node) -> list:
        """Every node below ``node`` (not itself)."""
        out, stack = [], list(node.children.values())
        while stack:
            c = stack.pop()
            out.append(c)
            stack.extend(c.children.values())
        return out

    def _drop_with_host_below(self, node) -> list[int]:
        """Drop ``node``'s trailing page, and every host page below it (no host slot could be had)."""
        below = self._subtree(node)  # all host nodes (node is a device leaf)
        for c in below:  # written back and announced while the paths are still linked
            if self.spill is not None:
                self.spill(c, len(c.pages))
            if self.events is not None:
                self._emit(c, len(c.pages), ("removed", True))
        for c in below:
            self._host_pages.difference_update(c.pages)
            self.host.free(c.pages)
            self.host_pages_dropped += len(c.pages)
            c.parent, c.heap_id = None, -1
            self._num_nodes -= 1
        node.children = {}
        parent, removed = node.parent, len(node.pages) == 1
        pages = self._cut_leaf(node, 1)
        self._evictable -= 1
        self._tree_pages.difference_update(pages)
        if not removed:
            self._maybe_push(node)
        elif not parent.is_root:
            self._maybe_push(parent)
        return pages

    def _evict_host(self, num_pages: int) -> int:
        """Drop up to ``num_pages`` host pages, trailing pages of the least recently used host leaf first."""
        heap, freed = self._host_heap, []
        while len(freed) < num_pages and heap:
            entry = heap[0]
            if not self._host_leaf_valid(entry):
                heapq.heappop(heap)
                continue
            node = entry[2]
            need = num_pages - len(freed)
            parent, removed = node.parent, len(node.pages) <= need
            if removed:
                heapq.heappop(heap)
            if self.spill is not None:
                self.spill(node, min(need, len(node.pages)))
            freed.extend(self._cut_leaf(node, need))
            if removed and parent.tier == 1:
                self._maybe_push_host(parent)
            elif removed and not parent.is_root:
                self._maybe_push(parent)
        if freed:
            self._host_pages.difference_update(freed)
            self.host.free(freed)
            self.host_pages_dropped += len(freed)
        return len(freed)

    def resident_nodes(self):
        """(namespace, every token to the node's end, tier, pages) for each node holding pages, parents first."""
        for ns, root in self._roots.items():
            stack = [(c, ()) for c in root.children.values()]
            while stack:
                node, above = stack.pop()
                tokens = above + tuple(node.key)
                if node.pages:
                    yield ns, tokens, node.tier, list(node.pages)
                stack.extend((c, tokens) for c in node.children.values())

    # ------------------------------------------------------------- promote
    def _to_device(self, node, pages: list[int], deferred: bool = False) -> None:
        """Host node ``node`` (tier 1) takes device ``pages`` instead of its slots. ``deferred``: the slots are
        read by loads queued for the next step (promotion); else they are freed now (the pages were recomputed)."""
        slots = node.pages
        self._host_pages.difference_update(slots)
        if deferred:  # the slots stay as the pages' host copies
            self.host.queue_load(slots, pages, keep=True)
            node.copy = list(slots)
            for s in slots:
                self._copies[s] = node
        else:
            self.host.free(slots)
        node.pages, node.tier = list(pages), 0
        self._evictable += len(pages)
        self._tree_pages.update(pages)
        if self.events is not None:
            self._emit(node, len(pages), ("removed", True), ("stored", False))

    def host_match_len(self, tokens: Sequence[int], namespace: str = "") -> int:
        """Tokens past the device match of ``tokens`` that the host tier holds (page-aligned); read-only."""
        from .radix_cache import _as_tokens

        root = self._roots.get(namespace)
        if self.disabled or root is None or self.host is None:
            return 0
        ps = self.page_size
        toks = _as_tokens(tokens)
        node, pos, n, on_host = root, 0, (len(toks) // ps) * ps, 0
        while pos < n:
            child = node.children.get(toks[pos : pos + ps])
            if child is None:
                break
            k = self._edge_match(child.key, toks, pos)
            if child.tier:
                on_host += k
            if k < len(child.key):
                break
            node, pos = child, pos + k
        return on_host

    def promote(self, tokens: Sequence[int], namespace: str = "", max_pages: int | None = None) -> int:
        """Move the host-resident continuation of ``tokens``'s device match (up to ``max_pages`` pages) back into
        device pages; the data moves with the next step (``HostPool.take_loads``). The device pages come from the
        free list only (the caller evicts first if it wants more; evicting here could demote the very prefix being
        promoted). Stamps the path (an access). Returns the tokens promoted."""
        from .radix_cache import _as_tokens

        if self.disabled or self.host is None:
            return 0
        ps = self.page_size
        toks = _as_tokens(tokens)
        n = (len(toks) // ps) * ps
        budget = self.allocator.num_free if max_pages is None else min(max_pages, self.allocator.num_free)
        root = self._root(namespace)
        t = self._tick()
        root.last_access = t
        node, pos, moved = root, 0, 0
        while pos < n:
            child = node.children.get(toks[pos : pos + ps])
            if child is None or (child.tier and budget == 0):
                break
            k = self._edge_match(child.key, toks, pos)
            if child.tier:
                k = min(k, budget * ps)
            if k < len(child.key):
                child = self._split(child, k)
            if child.tier:
                pages = self.allocator.alloc(k // ps)
                self._to_device(child, pages, deferred=True)
                budget -= k // ps
                moved += k
                self.pages_promoted += k // ps
            child.last_access = t
            node, pos = child, pos + k
        if node is not root:
            self._maybe_push(node)
        if moved:
            self.lock(node)
            self._load_locks_next.append(node)
        return moved

    def _repush(self, node) -> None:
        """``node`` was stamped: a leaf of its tier gets a heap entry with the new stamp."""
        if node.tier:
            self._maybe_push_host(node)
        else:
            self._maybe_push(node)

    def free_host_slots(self, n: int, tokens: Sequence[int], namespace: str = "") -> int:
        """Make up to ``n`` host slots free for pages read back from disk that continue ``tokens`` (their device +
        host match, page-aligned): the least recently used host pages go, never one on that path (its host nodes
        are stamped as just used first). Returns the free slots."""
        from .radix_cache import _as_tokens

        alloc = self.host.allocator
        short = n - alloc.num_free
        if short <= 0 or self.disabled:
            return alloc.num_free
        toks, ps = _as_tokens(tokens), self.page_size
        node, pos, own, t = self._roots.get(namespace), 0, 0, self._tick()
        if node is not None:
            node.last_access = t
        while node is not None and pos + ps <= len(toks):
            child = node.children.get(toks[pos : pos + ps])
            if child is None:
                break
            k = self._edge_match(child.key, toks, pos)
            if k < len(child.key):  # only the part on the path is stamped
                child = self._split(child, k)
            child.last_access = t  # a child is never newer than its parent: the whole path is stamped
            if child.tier:
                own += k // ps
            self._repush(child)
            node, pos = child, pos + k
        self._drop_copies(short)
        short = n - alloc.num_free
        if short > 0:
            self._evict_host(min(short, len(self._host_pages) - own))
        return alloc.num_free

    def insert_host(self, tokens: Sequence[int], slots: Sequence[int], namespace: str = "") -> None:
        """Add host pages (``slots``, already filled) for the last ``len(slots)`` pages of page-aligned ``tokens``,
        whose leading part must be in the tree (device or host, whole pages) and whose new part must not be: a run
        read back from the disk tier. Stamps the path (an access)."""
        from .radix_cache import _Node, _as_tokens

        ps, toks, slots = self.page_size, _as_tokens(tokens), [int(x) for x in slots]
        start = len(toks) - len(slots) * ps
        if self.host is None or not slots or len(toks) % ps or start < 0:
            raise ValueError(f"insert_host: {len(toks)} tokens and {len(slots)} slots of {ps} do not fit")
        root = self._root(namespace)
        t = self._tick()
        root.last_access = t
        node, pos = root, 0
        while pos < start:
            child = node.children.get(toks[pos : pos + ps])
            k = 0 if child is None else self._edge_match(child.key, toks, pos)
            if child is None or pos + k > start or (k < len(child.key) and pos + k < start):
                raise ValueError("insert_host: the leading tokens are not in the tree, or the new ones are")
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access = t
            self._repush(child)  # a stamped leaf needs a heap entry with its new stamp
            node, pos = child, pos + k
        if toks[start : start + ps] in node.children:
            raise ValueError("insert_host: the new pages are already in the tree")
        leaf = _Node(toks[start:], slots, node, namespace, t)
        leaf.tier = 1
        node.children[toks[start : start + ps]] = leaf
        self._num_nodes += 1
        if self.events is not None:
            self._emit(leaf, len(slots), ("stored", True))
        self._host_pages.update(slots)
        self._push_host(leaf)
        if node is not root:
            self._maybe_push(node)

    def take_loads(self) -> list[tuple[int, int]]:
        """The (slot, device page) loads the step being planned must run before it computes; releases what the
        previous step's loads held (its promoted nodes' locks and slots). Call once per step."""
        if self.host is None:
            return []
        for node in self._load_locks_now:
            self.unlock(node)
        self._load_locks_now, self._load_locks_next = self._load_locks_next, []
        return self.host.take_loads()

    # ------------------------------------------------------------ integrity
    def _release_load_locks(self) -> None:
        """Before a flush: queued loads are dropped with the pages they would fill (``_reset_host``)."""
        for node in self._load_locks_now + self._load_locks_next:
            self.unlock(node)
        self._load_locks_now, self._load_locks_next = [], []

    def _reset_host(self) -> None:
        if self.host is not None:
            if self._host_pages:
                self.host.free(list(self._host_pages))
            self.host.drop_pending()
            if self._copies:
                self.host.free(list(self._copies))
        self._host_pages = set()
        self._copies = {}
        self._host_heap = []

    def _check_host_node(self, node, parent, seen_slots: dict) -> None:
        """Tier invariants of one non-root node (called by check_integrity)."""
        assert node.tier in (0, 1), f"bad tier {node.tier}: {node!r}"
        assert node.tier >= parent.tier, f"device node under a host node: {node!r} under {parent!r}"
        if node.tier == 0:
            if node.copy is not None:  # host copies of its pages
                assert len(node.copy) == len(node.pages) and max(node.copy) >= 0, f"bad copy list: {node.copy!r}"
                alloc = self.host.allocator
                for s in node.copy:
                    if s >= 0:
                        assert self._copies.get(s) is node, f"host copy {s} of {node!r} not indexed to it"
                        assert s not in seen_slots, f"host slot {s} appears twice: {seen_slots[s]!r} and {node!r}"
                        seen_slots[s] = node
                        assert alloc.is_valid_page(s) and not alloc.is_free(s), f"host copy {s} is free or invalid"
            return
        assert node.copy is None, f"host node with host copies: {node!r}"
        assert self.host is not None, f"host node without a host tier: {node!r}"
        assert node.ref == 0, f"locked host node: {node!r}"
        assert not node.tails, f"host node with tails: {node!r}"
        alloc = self.host.allocator
        for s in node.pages:
            assert s not in seen_slots, f"host slot {s} appears twice: {seen_slots[s]!r} and {node!r}"
            seen_slots[s] = node
            assert alloc.is_valid_page(s) and not alloc.is_free(s), f"host slot {s} is free or invalid: {node!r}"

    def _check_host_totals(self, seen_slots: dict, host_leaves: list) -> None:
        assert set(seen_slots) == self._host_pages | self._copies.keys(), "host slot set out of sync with the tree"
        assert not self._host_pages & self._copies.keys(), "a host slot is both a host page and a host copy"
        if self.host is None:
            return
        alloc = self.host.allocator
        assert alloc.num_free + len(seen_slots) + self.host.pending_release == alloc.num_total, (
            f"host slots leak: free {alloc.num_free} + cached and copies {len(seen_slots)} + pending "
            f"{self.host.pending_release} != {alloc.num_total}")
        live = {e[1] for e in self._host_heap if self._host_leaf_valid(e)}
        for leaf in host_leaves:
            assert leaf.heap_id in live, f"host leaf has no live heap entry: {leaf!r}"
