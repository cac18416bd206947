"""RadixAttention prefix cache: a radix tree from token ids to KV pages.

Host-side bookkeeping only (plain Python ints/lists/tuples; no jax).  The
device KV pool is addressed by page index; this tree remembers which pages
hold the K/V of which token prefixes so that later requests sharing a prefix
skip recomputing it.

Page granularity
----------------
Every edge of the tree carries a whole number of pages: ``len(edge tokens) ==
len(edge pages) * page_size``, and nodes are only ever split at page
boundaries.  A sequence of ``n`` tokens is cached as its first
``(n // page_size) * page_size`` tokens; the partially filled last page is
*not* inserted (callers free it themselves).  Every page in the tree is
immutable once inserted, so any number of requests read it without
coordination.  A request whose prompt continues a cached prefix into the
middle of a tree page is served by copy-on-write instead of sharing:
``match_partial`` names the tree page and how many of its leading tokens
match, and the scheduler copies that page into one the request owns (a device
copy before its first step) and computes from the first differing token.

Tails
-----
A finished request's partly filled last page need not be lost: ``insert_tail``
keeps it as a *tail* of the node ending where the page starts (1 to
``page_size - 1`` tokens; never matched by ``match_prefix``, only offered by
``match_partial`` for copying).  A fork's branches and a chat's next turn
continue exactly there.  Tails are never locked (a reader copies the page
before the next step writes anything), count as evictable, and are evicted
before any node page, oldest first: each holds less than a page of tokens.
Because of that order, no node is ever trimmed or removed while it has tails.

Namespaces
----------
Every operation takes ``namespace`` (e.g. a LoRA adapter id).  Each namespace
has its own root; different namespaces never share nodes or pages.

Ownership
---------
A page is at any time exactly one of: on the allocator's free list; owned by
a running request only; owned by the tree.  Tree pages are *evictable* when
their node is unlocked and *protected* when locked.  ``insert`` transfers
ownership of all pages it is given to the tree (pages duplicating an
already-cached prefix are freed immediately).  A running request that reads
tree pages must hold a lock on the deepest node it uses.

Handles
-------
``MatchResult.node`` is an opaque handle.  It stays valid for as long as it is
locked.  An *unlocked* handle is only valid until the next ``evict`` /
``reset`` (eviction may trim or remove its node), so lock it right after the
match.  Splits never invalidate a handle: the handle node keeps the deeper half
and still ends exactly at the matched prefix.

Tiers
-----
With a host tier (``RadixCache(..., host=HostPool)``) a node's pages live on the device (``tier`` 0, device
page ids) or in host memory (``tier`` 1, host slot ids); one tree, each node says where its pages are.
Residency only deepens downwards: a host node's children are host nodes. Eviction *demotes* instead of
dropping: the least recently used *device leaf* (a device node with no device child) gives up its trailing
pages, which are copied into host slots (``HostPool.save``) before the device pages are freed; when the host
tier is full its least recently used host leaf (a host node without children) loses its trailing page first.
Demotion is defined page by page (host eviction and demotion interleave: a page demoted a moment ago may be the
next host page dropped); a whole node moves at once when the host has room for it, which is the same result.
``match_prefix``, ``peek_*``, ``match_partial``, ``insert_tail`` and locks see device nodes only; a host node is
never locked and has no tails. ``host_match_len`` reports how far a prefix continues on the host, and
``promote`` moves such a continuation back into device pages (``HostPool.queue_load``). ``insert`` through a
host node (the request recomputed it) turns that node back into a device node with the new pages and frees its
slots. A promoted node keeps its slots as *host copies* of its pages (``_Node.copy``; the slots hold the same
bytes the load wrote, and tree pages never change): demoting such a page again moves it into its copy without
copying anything. Copies are opportunistic: when the host tier needs a slot, the oldest copy that no queued load
still reads is given up before any host page is dropped, so they never cost the tier capacity.

Threading
---------
The scheduler is single-threaded; no method is thread-safe, and callers must
not interleave calls from several threads.

LRU
---
A logical clock ticks once per ``match_prefix`` / ``insert``; every node on the
touched root-to-node path is stamped with the tick.  Eviction removes pages
from the unlocked leaf with the smallest stamp, trailing pages first, so
``evict(n)`` frees exactly ``min(n, evictable_pages)`` pages (a leaf may be
trimmed rather than removed).  Because stamps are assigned along a single
path per tick, no two leaves ever share a stamp, so the order is fully
deterministic.  Evictable leaves live in a heap with lazy invalidation (each
node remembers the id of its one live heap entry), so each eviction step is
O(log n).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .allocator import PageAllocator
from .host_pool import HostPool
from .tiers import TierMixin

__all__ = ["MatchResult", "RadixCache", "commit_running_prefix"]


@dataclass(frozen=True)
class MatchResult:
    """Result of ``match_prefix``.

    pages:      tree pages of the matched prefix, one per cached page.
    num_tokens: ``len(pages) * page_size``.
    node:       opaque handle; pass it to ``lock`` / ``unlock``.
    """

    pages: list[int]
    num_tokens: int
    node: Any


def _as_tokens(tokens: Sequence[int]) -> tuple:
    if isinstance(tokens, tuple):
        return tokens
    tolist = getattr(tokens, "tolist", None)
    if tolist is not None:  # numpy arrays: convert to python ints once
        return tuple(tolist())
    return tuple(tokens)


class _Node:
    __slots__ = ("key", "pages", "children", "parent", "ref", "last_access", "namespace", "is_root", "heap_id",
                 "tails", "tier", "copy")

    def __init__(self, key: tuple, pages: list[int], parent: "_Node | None", namespace: str, last_access: int):
        self.key = key  # tokens on the edge from parent; len == len(pages) * page_size
        self.pages = pages
        self.children: dict[tuple, _Node] = {}  # first page of child's key -> child
        self.parent = parent
        self.ref = 0  # locks held on this node or any descendant
        self.last_access = last_access
        self.namespace = namespace
        self.is_root = False
        self.heap_id = -1  # id of this node's one live heap entry (-1: none)
        self.tails: dict[tuple, int] = {}  # partly filled pages continuing this node: tokens -> page
        self.tier = 0  # 0: pages are device pages; 1: host slots (see Tiers)
        self.copy: list[int] | None = None  # device node: each page's host copy slot, or -1 (see Tiers)

    def __repr__(self) -> str:
        return (f"_Node(ns={self.namespace!r}, tokens={len(self.key)}, pages={self.pages}, ref={self.ref}, "
                f"t={self.last_access}, tier={self.tier})")


class RadixCache(TierMixin):
    """Radix tree of token prefixes -> KV pages, at page granularity.

    ``disabled=True`` (config ``disable_radix_cache``) is the no-reuse
    baseline: ``match_prefix`` always returns an empty match and ``insert``
    frees every page it is given.

    ``host``: a host tier (see Tiers); None keeps every page on the device and drops what is evicted.

    One class of ~600 lines (and TierMixin's host-tier half, cache/tiers.py) because match, partial match,
    insert, tails, lock, split, evict, demote, promote and the integrity check all maintain the same node
    invariants (refcounts, page ownership per tier, LRU and eviction order); the naive twin implements the same
    interface for tests.
    """

    def __init__(self, allocator: PageAllocator, page_size: int, disabled: bool = False,
                 host: HostPool | None = None):
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        self.allocator = allocator
        self.page_size = int(page_size)
        self.disabled = bool(disabled)
        self._roots: dict[str, _Node] = {}
        self._clock = 0
        self._heap: list[tuple[int, int, _Node]] = []
        self._heap_ids = itertools.count()
        self._evictable = 0
        self._protected = 0
        self._num_nodes = 0  # non-root nodes
        self._tree_pages: set[int] = set()
        self._tails: dict[tuple[_Node, tuple], int] = {}  # every tail, oldest first (eviction order)
        self._init_tiers(host)

    # ------------------------------------------------------------- counters
    @property
    def evictable_pages(self) -> int:
        """Tree pages in unlocked nodes (can be freed by ``evict``)."""
        return self._evictable

    @property
    def protected_pages(self) -> int:
        """Tree pages in locked nodes."""
        return self._protected

    @property
    def cached_pages(self) -> int:
        """All pages owned by the tree."""
        return self._evictable + self._protected

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    # -------------------------------------------------------------- helpers
    def _root(self, namespace: str) -> _Node:
        root = self._roots.get(namespace)
        if root is None:
            root = _Node((), [], None, namespace, 0)
            root.is_root = True
            self._roots[namespace] = root
        return root

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _push(self, node: _Node) -> None:
        """(Re)register ``node`` as an evictable leaf; supersedes its older entry."""
        hid = next(self._heap_ids)
        node.heap_id = hid
        heapq.heappush(self._heap, (node.last_access, hid, node))
        # Bound garbage from lazy invalidation: amortised O(1) per push.
        if len(self._heap) > 2 * self._num_nodes + 64:
            # In place: evict() iterates over this very list object.
            self._heap[:] = [e for e in self._heap if self._entry_valid(e)]
            heapq.heapify(self._heap)

    @staticmethod
    def _device_leaf(node: _Node) -> bool:
        """A device node none of whose children is on the device (demoted or dropped next by ``evict``)."""
        return node.tier == 0 and all(c.tier for c in node.children.values())

    @classmethod
    def _entry_valid(cls, entry: tuple[int, int, _Node]) -> bool:
        stamp, hid, node = entry
        return (
            node.heap_id == hid
            and node.last_access == stamp
            and node.parent is not None
            and node.ref == 0
            and cls._device_leaf(node)
        )

    def _maybe_push(self, node: _Node) -> None:
        if not node.is_root and node.parent is not None and node.ref == 0 and self._device_leaf(node):
            self._push(node)

    def _edge_match(self, key: tuple, toks: tuple, pos: int) -> int:
        """Matched tokens of ``key`` against ``toks[pos:]``, floored to whole pages."""
        n = len(key)
        if toks[pos : pos + n] == key:
            return n
        ps = self.page_size
        k = ps  # first page matched by construction (children are keyed by it)
        while k < n and toks[pos + k : pos + k + ps] == key[k : k + ps]:
            k += ps
        return k

    def _split(self, child: _Node, k: int) -> _Node:
        """Split ``child``'s edge after ``k`` tokens (page multiple, 0 < k < len).

        The new upper node takes the first ``k`` tokens; ``child`` keeps the
        rest, its identity (so handles stay valid), children and heap entry.
        The upper node inherits ``child``'s ref count and stamp, so counters
        and the ref invariant are unchanged.
        """
        ps = self.page_size
        parent = child.parent
        upper = _Node(child.key[:k], child.pages[: k // ps], parent, child.namespace, child.last_access)
        upper.ref = child.ref
        upper.tier = child.tier
        if child.copy is not None:
            upper.copy, child.copy = child.copy[: k // ps], child.copy[k // ps :]
            self._copies_moved(upper)
            self._tidy_copy(child)
        parent.children[child.key[:ps]] = upper
        child.key = child.key[k:]
        child.pages = child.pages[k // ps :]
        child.parent = upper
        upper.children[child.key[:ps]] = child
        self._num_nodes += 1
        return upper

    def _walk_pages(self, toks: tuple, namespace: str) -> list[int]:
        """Read-only: tree pages of the longest cached page-aligned prefix of ``toks``."""
        root = self._roots.get(namespace)
        pages: list[int] = []
        if root is None:
            return pages
        ps = self.page_size
        node, pos, n = root, 0, len(toks)
        while pos < n:
            child = node.children.get(toks[pos : pos + ps])
            if child is None or child.tier:
                break
            k = self._edge_match(child.key, toks, pos)
            pages.extend(child.pages[: k // ps])
            if k < len(child.key):
                break
            node, pos = child, pos + k
        return pages

    # ---------------------------------------------------------------- match
    def match_prefix(self, tokens: Sequence[int], namespace: str = "") -> MatchResult:
        """Longest cached page-aligned prefix of ``tokens`` in ``namespace``.

        Changes: stamps every node on the matched path with a new clock tick
        (LRU); splits the last node if the match ends inside its edge, so the
        returned node ends exactly at the matched prefix.  Allocates and frees
        nothing.  Caller holds nothing; to keep using the returned pages it
        must ``lock(result.node)`` before the next ``evict``/``reset``.
        """
        root = self._root(namespace)
        if self.disabled:
            return MatchResult([], 0, root)
        ps = self.page_size
        toks = _as_tokens(tokens)
        n = (len(toks) // ps) * ps
        toks = toks[:n]
        t = self._tick()
        root.last_access = t
        node, pos, pages = root, 0, []
        while pos < n:
            child = node.children.get(toks[pos : pos + ps])
            if child is None or child.tier:  # host nodes: see host_match_len / promote
                break
            k = self._edge_match(child.key, toks, pos)
            if k < len(child.key):
                # The match ends inside this edge: split so the handle ends
                # exactly at the match.  The next lookup then fails (or pos == n).
                child = self._split(child, k)
            child.last_access = t
            pages.extend(child.pages)
            node, pos = child, pos + k
        if node is not root:
            self._maybe_push(node)  # stamp changed
        return MatchResult(pages, len(pages) * ps, node)

    def match_partial(self, node: Any, tokens: Sequence[int]) -> tuple[int, int] | None:
        """A tree page that continues ``node``'s prefix and starts with some of ``tokens``; read-only.

        ``node`` is a handle from ``match_prefix`` (it ends exactly at the matched prefix) and ``tokens``
        the tokens after that prefix.  Returns ``(page, j)`` for the child page sharing the longest
        common prefix ``j`` with ``tokens`` (1 <= j < page_size; ties: the first child found), or None.
        The tree stays page-granular: the caller copies the page's K/V into a page it owns and computes
        from position ``j`` of it on (copy-on-write of the partial page), so the tree page is never
        written.  Costs O(children of ``node``) comparisons of one token, then up to a page's tokens for
        each child whose first token matches.
        """
        if self.disabled or self.page_size == 1 or not len(tokens):
            return None
        n = self._check_handle(node)
        toks = _as_tokens(tokens)[: self.page_size - 1]
        first, best = toks[0], None
        for key, child in n.children.items():
            if key[0] != first or child.tier:
                continue
            j = 1
            while j < len(toks) and key[j] == toks[j]:
                j += 1
            if best is None or j > best[1]:
                best = (child.pages[0], j)
        for key, page in n.tails.items():
            j = 0
            while j < min(len(key), len(toks)) and key[j] == toks[j]:
                j += 1
            if j and (best is None or j > best[1]):
                best = (page, j)
        return best

    @property
    def num_tails(self) -> int:
        return len(self._tails)

    def insert_tail(self, node: Any, tokens: Sequence[int], page: int) -> bool:
        """Keep ``page``, holding the K/V of ``tokens`` (1 to page_size - 1 of them) right after ``node``'s
        prefix, as a tail (see the module docstring).  Ownership of ``page`` passes to the cache either way:
        it is freed now when disabled, or when a child page or another tail already starts with ``tokens``.
        Tails of ``node`` that ``tokens`` extends are superseded (freed).  True if it was kept.
        """
        toks = _as_tokens(tokens)
        if not 0 < len(toks) < self.page_size:
            raise ValueError(f"a tail holds 1 to {self.page_size - 1} tokens, got {len(toks)}")
        page = int(page)
        if not self.allocator.is_valid_page(page) or self.allocator.is_free(page) or page in self._tree_pages:
            raise ValueError(f"page {page} is free, reserved, out of range or already in the cache")
        if self.disabled:
            self.allocator.free([page])
            return False
        n = self._check_handle(node)
        covered = any(k[: len(toks)] == toks and not c.tier for k, c in n.children.items()) or any(
            len(k) >= len(toks) and k[: len(toks)] == toks for k in n.tails)
        if covered:
            self.allocator.free([page])
            return False
        for k in [k for k in n.tails if toks[: len(k)] == k]:
            self._drop_tail(n, k)
        n.tails[toks] = page
        self._tails[(n, toks)] = page
        self._tree_pages.add(page)
        self._evictable += 1
        return True

    def _drop_tail(self, node: _Node, toks: tuple) -> int:
        page = node.tails.pop(toks)
        del self._tails[(node, toks)]
        self._tree_pages.discard(page)
        self._evictable -= 1
        self.allocator.free([page])
        return page

    def peek_prefix_len(self, tokens: Sequence[int], namespace: str = "") -> int:
        """Length of the longest cached page-aligned prefix, read-only (no LRU stamp, no split).

        For scheduling decisions over many waiting requests; call ``match_prefix`` to use the pages.
        """
        if self.disabled:
            return 0
        toks = _as_tokens(tokens)
        return len(self._walk_pages(toks[: (len(toks) // self.page_size) * self.page_size], namespace)) * self.page_size

    def device_pages(self, tokens: Sequence[int], namespace: str = "") -> list[int]:
        """The tree's device pages along the longest cached page-aligned prefix of ``tokens``; read-only."""
        toks = _as_tokens(tokens)
        return self._walk_pages(toks[: (len(toks) // self.page_size) * self.page_size], namespace)

    def peek_node(self, tokens: Sequence[int], namespace: str = "") -> Any:
        """Deepest node whose whole edge matches a prefix of ``tokens`` (the root if none); read-only.

        Nodes expose ``parent`` (None for a root), for cache-aware ordering (DFS over the tree).
        """
        root = self._root(namespace)
        if self.disabled:
            return root
        ps = self.page_size
        toks = _as_tokens(tokens)
        node, pos, n = root, 0, (len(toks) // ps) * ps
        while pos < n:
            child = node.children.get(toks[pos : pos + ps])
            if child is None or child.tier or self._edge_match(child.key, toks, pos) < len(child.key):
                break
            node, pos = child, pos + len(child.key)
        return node

    # --------------------------------------------------------------- insert
    def insert(self, tokens: Sequence[int], pages: Sequence[int], namespace: str = "") -> int:
        """Cache ``tokens`` -> ``pages`` and return how many leading tokens were already cached.

        ``tokens`` must be page-aligned: ``len(tokens) == len(pages) * page_size``
        (else ``ValueError``).  Ownership of *all* ``pages`` passes to the
        cache: pages for the part that was already cached are duplicates and
        are freed back to the allocator now, except a page that *is* the tree's
        page at that position (e.g. obtained from ``match_prefix``), which is
        kept.  The new part becomes a (unlocked, hence evictable) leaf.  Every
        node on the path is stamped (LRU); an edge is split if ``tokens`` ends
        inside it.

        Re-inserting a running request's growing prefix is fine (pages it got
        from the tree are recognised); afterwards the request must use the
        tree's pages for the inserted part (``match_prefix`` again) and hold a
        lock on the new node -- ``commit_running_prefix`` does exactly that.

        Raises ``ValueError`` (before changing anything) if a page is reserved,
        out of range, free, repeated in ``pages``, or already in the tree at a
        different position.  Disabled mode: frees all ``pages``, returns 0.
        """
        ps = self.page_size
        toks = _as_tokens(tokens)
        pages = [int(p) for p in pages]
        if len(toks) != len(pages) * ps:
            raise ValueError(
                f"insert needs page-aligned tokens: got {len(toks)} tokens for {len(pages)} pages of {ps}"
            )
        if self.disabled:
            self.allocator.free(pages)
            return 0
        if not pages:
            return 0
        # --- validate before mutating
        seen: set[int] = set()
        for p in pages:
            if not self.allocator.is_valid_page(p):
                raise ValueError(f"page {p} is reserved or out of range")
            if p in seen:
                raise ValueError(f"page {p} appears twice in insert()")
            if self.allocator.is_free(p):
                raise ValueError(f"page {p} is on the free list (not allocated)")
            seen.add(p)
        existing = self._walk_pages(toks, namespace)
        m = len(existing)
        for i, p in enumerate(pages):
            if p in self._tree_pages and (i >= m or existing[i] != p):
                raise ValueError(f"page {p} is already in the cache at another position")
        # --- mutate
        root = self._root(namespace)
        t = self._tick()
        root.last_access = t
        node, pos, n = root, 0, len(toks)
        while pos < n:
            child = node.children.get(toks[pos : pos + ps])
            if child is None:
                leaf = _Node(toks[pos:], pages[pos // ps :], node, namespace, t)
                node.children[toks[pos : pos + ps]] = leaf
                self._num_nodes += 1
                self._evictable += len(leaf.pages)
                self._tree_pages.update(leaf.pages)
                if self.fresh is not None:
                    self.fresh.append((namespace, toks, pos // ps, list(leaf.pages)))
                if self.events is not None:
                    self.events.stored(namespace, toks, pos // ps, len(leaf.pages))
                node = leaf
                break
            k = self._edge_match(child.key, toks, pos)
            if k < len(child.key):
                child = self._split(child, k)
            if child.tier:  # recomputed: the request's pages replace the host copy
                self._to_device(child, pages[pos // ps : (pos + k) // ps])
            child.last_access = t
            node, pos = child, pos + k
        if node is not root:
            self._maybe_push(node)
        dups = [pages[i] for i in range(m) if pages[i] != existing[i]]
        if dups:
            self.allocator.free(dups)
        return m * ps

    # ----------------------------------------------------------------- lock
    def _check_handle(self, node: Any) -> _Node:
        if not isinstance(node, _Node):
            raise TypeError(f"not a RadixCache node handle: {node!r}")
        if node.is_root:
            if self._roots.get(node.namespace) is not node:
                raise ValueError("stale handle: namespace root was reset")
        elif node.parent is None:
            raise ValueError("stale handle: node was evicted or reset")
        return node

    def lock(self, node: Any) -> None:
        """Take one reference on ``node`` and all its ancestors (a running request uses its prefix).

        Locked nodes are never evicted.  Changes ref counts and moves pages
        from ``evictable_pages`` to ``protected_pages``.  ``node`` must be a
        valid handle (see module docstring).  O(depth).
        """
        n = self._check_handle(node)
        while n is not None:
            if n.ref == 0:
                k = len(n.pages)
                self._evictable -= k
                self._protected += k
            n.ref += 1
            n = n.parent

    def unlock(self, node: Any) -> None:
        """Drop one reference taken by ``lock(node)``; raises ``ValueError`` if ``node`` is not locked.

        Nodes whose count reaches 0 become evictable again.
        """
        n = self._check_handle(node)
        if n.ref <= 0:
            raise ValueError(f"unlock of a node that is not locked: {n!r}")
        while n is not None:
            n.ref -= 1
            if n.ref == 0:
                k = len(n.pages)
                self._evictable += k
                self._protected -= k
                self._maybe_push(n)
            n = n.parent

    # ---------------------------------------------------------------- evict
    def evict(self, num_pages: int) -> int:
        """Free up to ``num_pages`` tree pages, least recently used unlocked leaves first.

        Trailing pages of a leaf go first; a leaf emptied is removed and its
        parent, if now an unlocked leaf, becomes eligible.  With a host tier
        the pages are demoted to it rather than dropped (see Tiers).  Returns the number
        of pages freed: exactly ``min(num_pages, evictable_pages)``.
        Invalidates unlocked handles.  O(log n) per node touched.
        """
        if num_pages <= 0 or self.disabled:
            return 0
        heap = self._heap
        tails = 0
        while tails < num_pages and self._tails:  # tails first, oldest first (freed one by one)
            self._drop_tail(*next(iter(self._tails)))
            tails += 1
        num_pages -= tails
        freed: list[int] = []
        while len(freed) < num_pages and heap:
            entry = heap[0]
            if not self._entry_valid(entry):
                heapq.heappop(heap)
                continue
            node = entry[2]
            need = num_pages - len(freed)
            npg = len(node.pages)
            if self.host is not None:  # demote (see Tiers); the entry goes stale as the node changes tier
                freed.extend(self._demote_some(node, need))
                continue
            if npg <= need:
                heapq.heappop(heap)
            parent = node.parent
            pages = self._cut_leaf(node, need)
            freed.extend(pages)
            self._evictable -= len(pages)
            if npg <= need:
                self._maybe_push(parent)
        if freed:
            self._tree_pages.difference_update(freed)
            self.allocator.free(freed)
        return tails + len(freed)

    def _cut_leaf(self, node: _Node, need: int) -> list[int]:
        """Take the trailing ``min(need, pages)`` pages off leaf ``node``: the whole node, unlinked from its
        parent, when that is all of them (else it keeps its first page, so its key in the parent is unchanged).
        Returns the pages; counters are the caller's."""
        ps, npg = self.page_size, len(node.pages)
        if self.events is not None:
            self._emit(node, min(need, npg), ("removed", node.tier == 1))
        if node.copy is not None:  # the pages leave the tree: so do their host copies
            self._drop_node_copies(node, max(npg - need, 0))
        if npg <= need:
            del node.parent.children[node.key[:ps]]
            node.parent, node.heap_id = None, -1
            self._num_nodes -= 1
            return node.pages
        pages = node.pages[npg - need :]
        node.pages, node.key = node.pages[: npg - need], node.key[: (npg - need) * ps]
        return pages

    def discard(self, tokens: Sequence[int], namespace: str = "", keep: int = 0) -> bool:
        """Remove the pages of ``tokens`` past its first ``keep`` tokens (a page multiple), and every page below
        them, from the tree: pages whose keys and values were never computed (the scheduler committed a prefix
        ahead of a step that then failed). True when nothing of it is left; False, changing nothing, when one of
        those nodes is locked or not on the device."""
        ps = self.page_size
        if keep % ps:
            raise ValueError(f"keep={keep} is not a multiple of the page size {ps}")
        toks = _as_tokens(tokens)
        node, pos = self._roots.get(namespace), 0
        while node is not None:
            child = node.children.get(toks[pos : pos + ps])
            if child is None:
                return True
            k = self._edge_match(child.key, toks, pos)
            if pos + k <= keep:
                if k < len(child.key):
                    return True  # it leaves the tree before `keep`
                node, pos = child, pos + k
                continue
            doomed = [child] + self._subtree(child)  # parents before children
            if child.ref or any(n.tier for n in doomed):
                return False
            if pos < keep:
                self._split(child, keep - pos)
            parent = child.parent
            for n in reversed(doomed):  # leaves first
                for t in list(n.tails):
                    self._drop_tail(n, t)
                pages = self._cut_leaf(n, len(n.pages))
                self._evictable -= len(pages)
                self._tree_pages.difference_update(pages)
                self.allocator.free(pages)
            self._maybe_push(parent)
            return True
        return True

    # ---------------------------------------------------------------- reset
    def reset(self) -> None:
        """Flush the cache: free every tree page.  Invalidates all handles.

        Raises ``RuntimeError`` (and changes nothing) if any node -- or a
        namespace root, via a lock on an empty match -- is locked (other than
        by queued host loads, which the flush drops).
        """
        self._release_load_locks()
        for ns, root in self._roots.items():
            if root.ref:
                raise RuntimeError(f"reset() with {root.ref} lock(s) held in namespace {ns!r}")
        pages = list(self._tree_pages)
        for root in self._roots.values():
            stack = list(root.children.values())
            while stack:
                n = stack.pop()
                stack.extend(n.children.values())
                n.parent = None
                n.heap_id = -1
        self._roots.clear()
        self._tails.clear()
        self._heap = []
        self._reset_host()
        if self.fresh is not None:
            self.fresh = []
        if self.events is not None:
            self.events.cleared()
        self._tree_pages = set()
        self._evictable = self._protected = self._num_nodes = 0
        if pages:
            self.allocator.free(pages)

    # ------------------------------------------------------------ integrity
    def check_integrity(self, held_pages: Iterable[int] | None = None) -> None:
        """Raise ``AssertionError`` describing the first broken invariant.

        Checks: tree pages unique, valid and not free; edges page multiples
        and consistent with their child keys and parents; ``ref(parent) >=
        sum(ref(children))`` (so every ancestor of a locked node has at least
        its count); stamps non-increasing downwards; counters equal a recount;
        every evictable leaf has a live heap entry; and page conservation
        ``num_free + evictable + in_use == num_total`` with ``0 <= protected
        <= in_use``.  If ``held_pages`` (all pages referenced by running
        requests) is given, conservation is checked exactly: no held page is
        free or in an unlocked node, and ``num_free + cached + |held - tree|
        == num_total``.  Tiers: residency deepens downwards, host nodes are
        unlocked and tail-free, host slots unique and allocated, ``host free +
        host cached + slots awaiting queued loads == host total``, every host
        leaf has a live entry in the host heap.  O(tree size).  Long because it is one
        walk that checks every invariant with a message naming the broken one.
        """
        ps = self.page_size
        alloc = self.allocator
        seen: dict[int, _Node] = {}
        evictable = protected = nodes = tails = 0
        evictable_leaves: list[_Node] = []
        host_leaves: list[_Node] = []
        seen_slots: dict[int, _Node] = {}
        unlocked_pages: set[int] = set()
        for ns, root in self._roots.items():
            assert root.is_root and root.parent is None and not root.key and not root.pages, f"bad root for {ns!r}"
            assert root.namespace == ns, f"root of {ns!r} says namespace {root.namespace!r}"
            stack = [root]
            while stack:
                node = stack.pop()
                child_refs = 0
                for first, child in node.children.items():
                    assert child.parent is node, f"{child!r} has wrong parent"
                    assert child.namespace == ns, f"{child!r} in namespace {ns!r}"
                    assert first == child.key[:ps], f"{child!r} stored under key {first!r}"
                    assert child.last_access <= node.last_access, (
                        f"child stamp {child.last_access} > parent stamp {node.last_access}: {child!r}"
                    )
                    child_refs += child.ref
                    stack.append(child)
                assert node.ref >= child_refs, f"ref {node.ref} < sum of children refs {child_refs}: {node!r}"
                for toks, p in node.tails.items():
                    assert 0 < len(toks) < ps, f"a tail of {len(toks)} tokens under {node!r}"
                    assert self._tails.get((node, toks)) == p, f"tail {toks!r} -> {p} of {node!r} not in the index"
                    assert p not in seen, f"page {p} appears twice in the tree: {seen[p]!r} and a tail of {node!r}"
                    seen[p] = node
                    assert alloc.is_valid_page(p) and not alloc.is_free(p), f"tail page {p} is free or invalid"
                    evictable += 1
                    unlocked_pages.add(p)
                    tails += 1
                if node.is_root:
                    continue
                nodes += 1
                assert len(node.key) > 0 and len(node.key) % ps == 0, f"edge length {len(node.key)} not a positive multiple of {ps}: {node!r}"
                assert len(node.key) == len(node.pages) * ps, f"edge has {len(node.key)} tokens for {len(node.pages)} pages: {node!r}"
                assert node.ref >= 0, f"negative ref: {node!r}"
                self._check_host_node(node, node.parent, seen_slots)
                if node.tier:
                    if not node.children:
                        host_leaves.append(node)
                    continue
                for p in node.pages:
                    assert p not in seen, f"page {p} appears twice in the tree: {seen[p]!r} and {node!r}"
                    seen[p] = node
                    assert alloc.is_valid_page(p), f"tree page {p} is reserved or out of range"
                    assert not alloc.is_free(p), f"tree page {p} is on the free list: {node!r}"
                if node.ref == 0:
                    evictable += len(node.pages)
                    unlocked_pages.update(node.pages)
                    if self._device_leaf(node):
                        evictable_leaves.append(node)
                else:
                    protected += len(node.pages)
        assert evictable == self._evictable, f"evictable_pages counter {self._evictable} != recount {evictable}"
        assert protected == self._protected, f"protected_pages counter {self._protected} != recount {protected}"
        assert nodes == self._num_nodes, f"num_nodes counter {self._num_nodes} != recount {nodes}"
        assert tails == len(self._tails), f"{len(self._tails)} tails indexed, {tails} found under live nodes"
        assert set(seen) == self._tree_pages, (
            f"tree page set out of sync: extra {sorted(self._tree_pages - set(seen))}, missing {sorted(set(seen) - self._tree_pages)}"
        )
        live = {e[1] for e in self._heap if self._entry_valid(e)}
        for leaf in evictable_leaves:
            assert leaf.heap_id in live, f"evictable leaf has no live heap entry: {leaf!r}"
        self._check_host_totals(seen_slots, host_leaves)
        allocated = alloc.num_total - alloc.num_free
        in_use = allocated - evictable
        assert in_use >= 0, f"{evictable} evictable pages but only {allocated} allocated"
        assert alloc.num_free + evictable + in_use == alloc.num_total
        assert protected <= in_use, f"{protected} protected pages but only {in_use} in use"
        if held_pages is not None:
            held = set(int(p) for p in held_pages)
            for p in held:
                assert not alloc.is_free(p), f"page {p} held by a request is on the free list"
                assert p not in unlocked_pages, f"page {p} held by a request is in an unlocked (evictable) node"
            req_only = held - seen.keys()
            assert alloc.num_free + len(seen) + len(req_only) == alloc.num_total, (
                f"page leak: free {alloc.num_free} + tree {len(seen)} + request-only {len(req_only)} != total {alloc.num_total}"
            )

    def __repr__(self) -> str:
        return (
            f"RadixCache(page_size={self.page_size}, nodes={self._num_nodes}, evictable={self._evictable}, "
            f"protected={self._protected}, disabled={self.disabled})"
        )


def commit_running_prefix(cache, tokens: Sequence[int], pages: Sequence[int], locked_node: Any, namespace: str = "") -> MatchResult:
    """Cache the computed part of a *running* request and move its lock down.

    ``tokens``/``pages``: everything the request has computed so far and the
    pages it uses (tree pages from its match first, then its own pages);
    ``pages`` must cover ``tokens``.  ``locked_node``: the node the request
    currently holds locked.  Works with any cache implementing this interface.

    Inserts the page-aligned part, re-matches it, locks the new node and
    unlocks ``locked_node``.  Returns the new ``MatchResult``: the request
    must replace its first ``len(result.pages)`` pages with ``result.pages``
    (its own duplicates were freed) and keep ``result.node`` as its locked
    node.  Pages past the aligned part stay with the request.  In disabled
    mode nothing changes (the request keeps its own pages and lock).
    """
    ps = cache.page_size
    toks = _as_tokens(tokens)
    n_full = len(toks) // ps
    if len(pages) < n_full:
        raise ValueError(f"{len(pages)} pages cannot cover {len(toks)} tokens of page size {ps}")
    if cache.disabled:
        return MatchResult([], 0, locked_node)
    aligned = toks[: n_full * ps]
    cache.insert(aligned, list(pages[:n_full]), namespace)
    res = cache.match_prefix(aligned, namespace)
    assert res.num_tokens == len(aligned)
    cache.lock(res.node)
    cache.unlock(locked_node)
    return res
