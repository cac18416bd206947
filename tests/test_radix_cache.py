"""Tests for the host-side KV cache manager (sgl_jax.cache)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import hashlib

from sgl_jax.cache import events as events_mod
from sgl_jax.cache.events import KVEventLog, chain, sequence_hashes
from sgl_jax.cache import (
    HostPool,
    NaivePrefixCache,
    PageAllocator,
    RadixCache,
    commit_running_prefix,
    pages_for_budget,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(cls=RadixCache, num_pages=32, page_size=4, **kw):
    alloc = PageAllocator(num_pages)
    return alloc, cls(alloc, page_size, **kw)


def put(cache, tokens, namespace=""):
    """Allocate pages for the aligned part of ``tokens`` and insert them."""
    n = len(tokens) // cache.page_size
    pages = cache.allocator.alloc(n)
    assert pages is not None
    return cache.insert(list(tokens[: n * cache.page_size]), pages, namespace), pages


BOTH = pytest.mark.parametrize("cls", [RadixCache, NaivePrefixCache])


# --------------------------------------------------------------------- allocator
def test_allocator_basics():
    a = PageAllocator(8, reserved=1)
    assert a.num_total == 7 and a.num_free == 7
    p = a.alloc(3)
    assert p == [1, 2, 3] and 0 not in p and a.num_free == 4
    assert a.alloc(5) is None and a.num_free == 4  # all-or-nothing
    assert a.alloc(0) == []
    q = a.alloc(4)
    assert sorted(p + q) == list(range(1, 8)) and a.num_free == 0
    a.free(p)
    assert a.num_free == 3 and a.is_free(2) and not a.is_free(4)


def test_allocator_errors_name_the_page():
    a = PageAllocator(8, reserved=2)
    p = a.alloc(2)
    a.free([p[0]])
    with pytest.raises(ValueError, match=f"double free of page {p[0]}"):
        a.free([p[0]])
    with pytest.raises(ValueError, match="page 1 is reserved"):
        a.free([1])
    with pytest.raises(ValueError, match="page 9 is out of range"):
        a.free([9])
    with pytest.raises(ValueError, match=f"double free of page {p[1]}"):
        a.free([p[1], p[1]])
    assert not a.is_free(p[1])  # failed free changed nothing
    with pytest.raises(ValueError):
        a.alloc(-1)


def test_pages_for_budget():
    assert pages_for_budget(1000, 100) == 10
    assert pages_for_budget(1099, 100) == 10
    assert pages_for_budget(0, 100) == 0
    with pytest.raises(ValueError):
        pages_for_budget(100, 0)
    with pytest.raises(ValueError):
        pages_for_budget(-1, 10)


# ------------------------------------------------------------------ radix basics
@BOTH
def test_discard_removes_a_path_past_keep_and_everything_below(cls):
    """discard(tokens, keep): the pages of tokens past `keep` (split mid-edge when needed) and every page and
    tail below them leave the tree and return to the allocator; what is before `keep`, and other branches,
    stay. Locked below `keep`: refused, nothing changes."""
    alloc, c = make(cls, num_pages=40, page_size=4)
    base = list(range(100, 124))  # 6 pages
    put(c, base)
    put(c, base[:16] + [7, 7, 7, 7, 8, 8, 8, 8])  # a branch at page 4
    put(c, list(range(500, 508)))  # another prefix
    m = c.match_prefix(base[:8])
    assert c.insert_tail(m.node, [1, 1], alloc.alloc(1)[0])  # a tail where `keep` ends: it stays
    deep = c.match_prefix(base)
    assert c.insert_tail(deep.node, [1, 2], alloc.alloc(1)[0])  # a tail below the discarded part: it goes
    free_before = alloc.num_free
    c.lock(deep.node)
    assert not c.discard(base, "", keep=8)
    assert c.peek_prefix_len(base) == 24 and alloc.num_free == free_before
    c.check_integrity()
    c.unlock(deep.node)
    assert c.discard(base, "", keep=8)
    assert c.peek_prefix_len(base) == 8
    assert c.peek_prefix_len(base[:16] + [7, 7, 7, 7]) == 8  # the branch below page 2 went with it
    assert c.peek_prefix_len(list(range(500, 508))) == 8
    assert alloc.num_free == free_before + 4 + 2 + 1  # base's pages 2-5, the branch's 2, the deep tail
    assert c.num_tails == 1
    c.check_integrity()
    assert c.discard(base, "", keep=8)  # nothing left past it: a no-op
    assert c.discard(list(range(900, 912)), "", keep=0)
    with pytest.raises(ValueError, match="multiple of the page size"):
        c.discard(base, "", keep=6)


@BOTH
def test_partial_page_not_cached(cls):
    a, c = make(cls, page_size=4)
    pages = a.alloc(2)
    with pytest.raises(ValueError, match="page-aligned"):
        c.insert(list(range(9)), pages)
    assert c.insert(list(range(8)), pages) == 0
    m = c.match_prefix(list(range(11)))  # 2.75 pages: the partial page never matches
    assert m.num_tokens == 8 and m.pages == pages
    assert c.match_prefix(list(range(7))).num_tokens == 4
    assert c.match_prefix([0, 1, 2, 9]).num_tokens == 0  # mismatch inside first page
    c.check_integrity()


@BOTH
def test_tails_keep_a_partly_filled_page_and_go_first(cls):
    a, c = make(cls, num_pages=8, page_size=4)
    _, pages = put(c, [0, 1, 2, 3])
    node = c.match_prefix([0, 1, 2, 3]).node
    tail = a.alloc(1)[0]
    assert c.insert_tail(node, [4, 5], tail)
    assert c.match_prefix([0, 1, 2, 3, 4, 5, 6, 7]).num_tokens == 4  # a tail is never matched whole
    assert c.match_partial(node, [4, 5, 9]) == (tail, 2) and c.match_partial(node, [4, 9]) == (tail, 1)
    assert (c.cached_pages, c.evictable_pages, c.num_tails) == (2, 2, 1)
    longer = a.alloc(1)[0]
    assert c.insert_tail(node, [4, 5, 6], longer)  # supersedes [4, 5]: that page is freed
    assert a.is_free(tail) and c.match_partial(node, [4, 5, 6]) == (longer, 3)
    dup = a.alloc(1)[0]
    assert not c.insert_tail(node, [4], dup) and a.is_free(dup)  # covered by the longer tail
    with pytest.raises(ValueError, match="1 to 3"):
        c.insert_tail(node, [4, 5, 6, 7], a.alloc(1)[0])
    c.check_integrity()
    assert c.evict(1) == 1 and a.is_free(longer) and c.num_tails == 0  # tails go before node pages
    assert c.match_prefix([0, 1, 2, 3]).pages == pages
    c.check_integrity()


@BOTH
def test_match_partial_finds_the_longest_partial_page(cls):
    a, c = make(cls, page_size=4)
    _, pages = put(c, [0, 1, 2, 3, 4, 5, 6, 7])
    _, more = put(c, [0, 1, 2, 3, 4, 5, 9, 9])  # a second child of the first page, sharing 2 tokens
    m = c.match_prefix([0, 1, 2, 3, 4, 5, 6, 9, 9])
    assert m.num_tokens == 4
    assert c.match_partial(m.node, [4, 5, 6, 9, 9]) == (pages[1], 3)  # never a whole page: at most 3
    assert c.match_partial(m.node, [4, 5, 9]) == (more[1], 3)
    assert c.match_partial(m.node, [4, 9]) in [(pages[1], 1), (more[1], 1)]
    assert c.match_partial(m.node, [7]) is None and c.match_partial(m.node, []) is None
    root = c.match_prefix([]).node
    assert c.match_partial(root, [0, 1, 5]) == (pages[0], 2)
    before = (c.cached_pages, c.evictable_pages, a.num_free)
    c.check_integrity()
    assert (c.cached_pages, c.evictable_pages, a.num_free) == before  # read-only


def test_split_at_page_boundary():
    a, c = make(page_size=4)
    _, pages = put(c, list(range(12)))
    assert c.num_nodes == 1
    m = c.match_prefix([0, 1, 2, 3, 4, 5, 99, 7])  # diverges inside page 2
    assert m.num_tokens == 4 and m.pages == pages[:1]
    assert c.num_nodes == 2  # split after exactly one page
    c.check_integrity()
    m2 = c.match_prefix(list(range(10)))
    assert m2.num_tokens == 8 and m2.pages == pages[:2] and c.num_nodes == 3
    c.check_integrity()
    # a diverging insert hangs off the split point
    assert put(c, [0, 1, 2, 3, 4, 5, 6, 7, 50, 51, 52, 53])[0] == 8
    assert c.num_nodes == 4 and c.cached_pages == 4
    assert c.match_prefix(list(range(12))).pages == pages
    c.check_integrity()


@BOTH
def test_namespaces_isolated(cls):
    a, c = make(cls, page_size=2)
    _, pa = put(c, [1, 2, 3, 4], namespace="lora_a")
    assert c.match_prefix([1, 2, 3, 4]).num_tokens == 0
    assert c.match_prefix([1, 2, 3, 4], namespace="lora_b").num_tokens == 0
    assert c.match_prefix([1, 2, 3, 4], namespace="lora_a").pages == pa
    already, pb = put(c, [1, 2, 3, 4], namespace="")
    assert already == 0 and set(pa).isdisjoint(pb) and c.cached_pages == 4
    c.check_integrity()


@BOTH
def test_lock_prevents_eviction(cls):
    a, c = make(cls, page_size=2)
    put(c, [1, 1, 2, 2])
    put(c, [3, 3, 4, 4])
    m = c.match_prefix([1, 1, 2, 2])
    c.lock(m.node)
    assert c.protected_pages == 2 and c.evictable_pages == 2
    c.check_integrity()
    assert c.evict(10) == 2
    assert c.match_prefix([1, 1, 2, 2]).num_tokens == 4
    assert c.match_prefix([3, 3, 4, 4]).num_tokens == 0
    assert c.evict(10) == 0
    c.unlock(m.node)
    assert c.protected_pages == 0 and c.evictable_pages == 2
    with pytest.raises(ValueError, match="not locked"):
        c.unlock(m.node)
    assert c.evict(10) == 2 and c.cached_pages == 0 and a.num_free == a.num_total
    c.check_integrity()


def test_lock_ancestor_refs():
    a, c = make(page_size=2)
    put(c, [1, 1, 2, 2, 3, 3])
    put(c, [1, 1, 2, 2, 4, 4])  # splits after 2 pages
    m1 = c.match_prefix([1, 1, 2, 2, 3, 3])
    m2 = c.match_prefix([1, 1, 2, 2, 4, 4])
    c.lock(m1.node)
    c.lock(m2.node)
    assert m1.node.parent.ref == 2 and m1.node.parent is m2.node.parent
    assert c.protected_pages == 4
    c.check_integrity()
    c.unlock(m1.node)
    assert c.evict(10) == 1  # only the unlocked leaf [3,3]
    c.check_integrity()
    c.unlock(m2.node)
    c.check_integrity()


@BOTH
def test_lru_order(cls):
    a, c = make(cls, page_size=2)
    put(c, [1, 1])
    put(c, [2, 2])
    put(c, [3, 3])
    c.match_prefix([1, 1])  # now 2 is the least recently used
    assert c.evict(1) == 1
    assert c.match_prefix([2, 2]).num_tokens == 0
    assert c.evict(1) == 1  # then 3 ([1,1] was touched later)
    assert c.match_prefix([3, 3]).num_tokens == 0
    assert c.match_prefix([1, 1]).num_tokens == 2
    c.check_integrity()


@BOTH
def test_evict_trims_and_parent_becomes_leaf(cls):
    a, c = make(cls, page_size=2)
    put(c, [1, 1, 2, 2, 3, 3, 4, 4])
    put(c, [1, 1, 2, 2, 5, 5])
    put(c, [9, 9])
    c.match_prefix([9, 9])
    free0 = a.num_free
    # stamps: [3,3,4,4] t1 < [1,1,2,2] = [5,5] t2 < [9,9] t4
    assert c.evict(1) == 1  # trailing page [4,4] of the LRU leaf
    assert c.cached_pages == 5
    c.check_integrity()
    assert c.evict(3) == 3  # [3,3], then [5,5]; then [1,1,2,2] is a leaf (t2 < t4): its page [2,2]
    assert a.num_free == free0 + 4
    assert c.match_prefix([1, 1, 2, 2]).num_tokens == 2
    assert c.match_prefix([9, 9]).num_tokens == 2
    c.check_integrity()


@BOTH
def test_duplicate_insert_frees_pages(cls):
    a, c = make(cls, page_size=2)
    already, p1 = put(c, [1, 1, 2, 2])
    assert already == 0
    free_before = a.num_free
    already, p2 = put(c, [1, 1, 2, 2, 3, 3])
    assert already == 4
    # the two duplicate pages went back; the new page is owned by the tree
    assert a.num_free == free_before - 3 + 2 and c.cached_pages == 3
    assert a.is_free(p2[0]) and a.is_free(p2[1]) and not a.is_free(p2[2])
    # inserting the tree's own pages (from a match) frees nothing
    m = c.match_prefix([1, 1, 2, 2, 3, 3])
    free_before = a.num_free
    assert c.insert([1, 1, 2, 2, 3, 3], m.pages) == 6
    assert a.num_free == free_before
    c.check_integrity()


def test_insert_errors_change_nothing():
    a, c = make(page_size=2)
    _, p = put(c, [1, 1, 2, 2])
    q = a.alloc(2)
    with pytest.raises(ValueError, match="twice"):
        c.insert([5, 5, 6, 6], [q[0], q[0]])
    with pytest.raises(ValueError, match="another position"):
        c.insert([5, 5, 6, 6], [q[0], p[0]])
    with pytest.raises(ValueError, match="reserved"):
        c.insert([5, 5], [0])
    a.free([q[1]])
    with pytest.raises(ValueError, match="free list"):
        c.insert([5, 5], [q[1]])
    assert c.cached_pages == 2
    c.check_integrity(held_pages=[q[0]])


@BOTH
def test_running_request_commit_repeatedly(cls):
    a, c = make(cls, page_size=2)
    put(c, [7, 7, 8, 8])
    toks = [7, 7, 8, 8, 1]
    m = c.match_prefix(toks)
    c.lock(m.node)
    pages = m.pages + a.alloc(1)  # own page for the partial tail
    for step in range(2, 9):
        toks.append(step)
        if len(pages) * 2 < len(toks):
            pages += a.alloc(1)
        res = commit_running_prefix(c, toks, pages, m.node)
        assert res.num_tokens == (len(toks) // 2) * 2
        pages[: len(res.pages)] = res.pages
        m = res
        c.check_integrity(held_pages=pages)
    # a second request with the same text shares everything committed so far
    other = c.match_prefix(toks + [0])
    assert other.pages == pages[: len(toks) // 2]
    # finish: insert aligned part, free the tail page, unlock
    n = len(toks) // 2
    assert c.insert(toks[: 2 * n], pages[:n]) == 2 * n
    a.free(pages[n:])
    c.unlock(m.node)
    c.check_integrity(held_pages=[])
    assert c.protected_pages == 0 and a.num_free + c.cached_pages == a.num_total


@BOTH
def test_disabled_mode(cls):
    a, c = make(cls, page_size=2, disabled=True)
    p = a.alloc(2)
    assert c.insert([1, 1, 2, 2], p) == 0
    assert a.num_free == a.num_total and c.cached_pages == 0
    m = c.match_prefix([1, 1, 2, 2])
    assert m.num_tokens == 0 and m.pages == []
    c.lock(m.node)
    c.unlock(m.node)
    assert c.evict(5) == 0
    q = a.alloc(1)
    res = commit_running_prefix(c, [1, 1, 2], [q[0], 0], m.node)  # no-op, request keeps its pages
    assert res.num_tokens == 0 and not a.is_free(q[0])
    c.check_integrity(held_pages=q)


@BOTH
def test_reset(cls):
    a, c = make(cls, page_size=2)
    put(c, [1, 1, 2, 2])
    put(c, [3, 3], namespace="x")
    m = c.match_prefix([1, 1])
    c.lock(m.node)
    with pytest.raises(RuntimeError):
        c.reset()
    c.unlock(m.node)
    c.reset()
    assert c.cached_pages == 0 and a.num_free == a.num_total
    assert c.match_prefix([1, 1, 2, 2]).num_tokens == 0
    c.check_integrity()
    # a lock on an empty match (namespace root) also blocks reset
    e = c.match_prefix([5, 5])
    c.lock(e.node)
    with pytest.raises(RuntimeError):
        c.reset()
    c.unlock(e.node)


@BOTH
def test_peek_is_read_only(cls):
    a, c = make(cls, page_size=2)
    put(c, [1, 1, 2, 2])
    put(c, [3, 3])
    assert c.peek_prefix_len([1, 1, 2, 9, 9]) == 2
    assert c.peek_prefix_len([1, 1, 2, 2, 5]) == 4
    assert c.peek_prefix_len([1, 1], namespace="x") == 0
    if cls is RadixCache:
        assert c.num_nodes == 2  # no split
    assert c.evict(1) == 1  # peek did not stamp [1,1,2,2]: it is still the LRU leaf
    assert c.peek_prefix_len([1, 1, 2, 2]) == 2 and c.peek_prefix_len([3, 3]) == 2
    c.check_integrity()


def test_stale_handle_rejected():
    a, c = make(page_size=2)
    put(c, [1, 1])
    m = c.match_prefix([1, 1])
    c.evict(1)
    with pytest.raises(ValueError, match="stale"):
        c.lock(m.node)
    with pytest.raises(TypeError):
        c.lock("nope")


def test_numpy_tokens():
    a, c = make(page_size=2)
    p = a.alloc(2)
    c.insert(np.array([1, 2, 3, 4], dtype=np.int32), p)
    assert c.match_prefix(np.array([1, 2, 3, 4, 5])).pages == p
    assert c.match_prefix([1, 2, 3, 4]).pages == p


def test_integrity_checker_catches_corruption():
    a, c = make(page_size=2)
    put(c, [1, 1, 2, 2])
    c.check_integrity()
    c._evictable += 1
    with pytest.raises(AssertionError, match="evictable_pages counter"):
        c.check_integrity()
    c._evictable -= 1
    node = c.match_prefix([1, 1]).node
    a.free([node.pages[0]])  # tree page on free list
    with pytest.raises(AssertionError, match="on the free list"):
        c.check_integrity()
    a.alloc(1)
    c.check_integrity()
    node.ref = 1  # ref without the ancestor (root) carrying it
    with pytest.raises(AssertionError, match="sum of children refs"):
        c.check_integrity()
    node.ref = 0
    leaked = a.alloc(1)
    with pytest.raises(AssertionError, match="page leak"):
        c.check_integrity(held_pages=[])
    c.check_integrity(held_pages=leaked)


def test_heap_stays_bounded():
    a, c = make(page_size=2)
    put(c, [1, 1])
    for _ in range(1000):
        m = c.match_prefix([1, 1])
        c.lock(m.node)
        c.unlock(m.node)
    assert len(c._heap) <= 2 * c.num_nodes + 65
    c.check_integrity()
    assert c.evict(1) == 1


def test_no_jax_import():
    code = (
        "import sys; sys.modules['jax'] = None\n"
        "import sgl_jax.cache as m\n"
        "a = m.PageAllocator(4); c = m.RadixCache(a, 2); c.check_integrity()\n"
        "assert 'jax' not in [k for k in sys.modules if sys.modules[k] is not None]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------- twin property test
TOKENS = st.lists(st.integers(0, 1), max_size=12)
NS = st.sampled_from(["", "a"])


def _radix_walk(c):
    """(namespace, page-aligned prefix up to page i, node, i) for every page of every node of a RadixCache."""
    for ns, root in c._roots.items():
        stack = [(root, ())]
        while stack:
            node, prefix = stack.pop()
            for i in range(len(node.pages)):
                yield (ns, prefix + node.key[: (i + 1) * c.page_size]), node, i
            prefix = prefix + node.key
            stack.extend((ch, prefix) for ch in node.children.values())


def radix_pages(c):
    """{(namespace, page-aligned prefix): (locked?, tier, page or slot)} for every page in a RadixCache."""
    return {key: (node.ref > 0, node.tier, node.pages[i]) for key, node, i in _radix_walk(c)}


def apply_events(mirror: dict, events: list, ps: int) -> None:
    """What a subscriber does with a batch, per medium ("GPU": the device, "CPU": the host tier): BlockStored adds
    its hashes (checked against its tokens and parent), BlockRemoved drops them (they must have been announced on
    that medium), AllBlocksCleared empties every medium."""
    for ev in events:
        if ev[0] == "BlockStored":
            hashes, parent, tokens, size, medium = ev[1], ev[2], ev[3], ev[4], ev[6]
            assert size == ps and len(tokens) == len(hashes) * ps and medium in ("GPU", "CPU")
            h = parent
            for i, want in enumerate(hashes):
                assert h is None or i > 0 or any(h in m for m in mirror.values()), "a stored block's parent is unknown"
                h = chain(h if h is not None else _root_of(want, tokens[:ps], ps), tokens[i * ps:(i + 1) * ps])
                assert h == want
            assert not set(hashes) & mirror[medium], "a block stored twice on one medium"
            mirror[medium].update(hashes)
        elif ev[0] == "BlockRemoved":
            assert ev[2] in mirror and set(ev[1]) <= mirror[ev[2]], "removed blocks were not announced"
            mirror[ev[2]].difference_update(ev[1])
        else:
            assert ev == ["AllBlocksCleared"]
            for m in mirror.values():
                m.clear()


def _root_of(first_hash, tokens, ps):
    """The root hash (of some namespace) under which `tokens` hash to `first_hash`."""
    for ns in ("", "a", "b", "lora1", "lora2"):
        root = events_mod._root_hash(ns)
        if chain(root, tokens) == first_hash:
            return root
    raise AssertionError("a first block's hash matches no namespace root")


def radix_copies(c):
    """{(namespace, page-aligned prefix): host slot} for every device page of a RadixCache with a host copy."""
    return {key: node.copy[i] for key, node, i in _radix_walk(c) if node.copy is not None and node.copy[i] >= 0}


def naive_pages(c):
    out = {k: (e.ref > 0, 0, e.page) for k, e in c._entries.items()}
    out.update({k: (False, 1, h.page) for k, h in c._host.items()})
    return out


def radix_contents(c):
    """{(namespace, page-aligned prefix): (locked?, tier)}."""
    return {k: v[:2] for k, v in radix_pages(c).items()}


def naive_contents(c):
    return {k: v[:2] for k, v in naive_pages(c).items()}


def fingerprint(key) -> np.ndarray:
    """8 bytes standing for the K/V a page holds: a hash of its (namespace, prefix)."""
    return np.frombuffer(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), np.uint8)


class FakeDevice:
    """A KV pool of 8-byte pages for one cache, with its host tier reading and writing it as the engine would."""

    def __init__(self, num_pages: int, host: HostPool | None):
        self.data = np.zeros((num_pages, 8), np.uint8)
        self.host = host
        if host is not None:
            host.bind(lambda pages: self.data[pages].copy())

    def write(self, tokens, pages, ns, ps):
        """The step that computed ``tokens`` wrote their K/V into ``pages`` (a step runs after its plan took the
        loads, which copies the round's pending demotions first)."""
        if self.host is not None:
            self.host.flush_saves()
        for i, p in enumerate(pages[: len(tokens) // ps]):
            self.data[p] = fingerprint((ns, tuple(tokens[: (i + 1) * ps])))

    def run_loads(self, cache):
        """What the scheduler and runner do for a step: take the queued host -> device loads, run them."""
        for slot, page in cache.take_loads():
            self.data[page] = self.host.arena[slot]

    def check(self, pages: dict):
        """Every cached page (device or host) holds the K/V of its own prefix; a host page whose copy is still
        pending, through the device page it will be copied from."""
        for key, (_, tier, p) in pages.items():
            src = self.host.pending_page(p) if tier else None
            got = self.data[p] if tier == 0 else self.host.arena[p] if src is None else self.data[src]
            assert (got == fingerprint(key)).all(), f"{key} on tier {tier} ({p}) holds another prefix's data"

    def check_copies(self, copies: dict):
        """Every host copy holds the K/V of its device page's prefix (a slot whose demotion copy is still pending,
        through the device page it will be copied from: the copy is made before any step or load runs)."""
        for key, s in copies.items():
            src = self.host.pending_page(s)
            got = self.host.arena[s] if src is None else self.data[src]
            assert (got == fingerprint(key)).all(), f"the host copy of {key} ({s}) holds other data"


class _Req:
    def __init__(self, tokens, ns, rm, nm, rp, np_):
        self.tokens, self.ns = list(tokens), ns
        self.rnode, self.nnode = rm.node, nm.node
        self.n_tree = len(rm.pages)  # leading pages that belong to the tree
        self.rpages = rm.pages + rp
        self.npages = nm.pages + np_


class TwinMachine(RuleBasedStateMachine):
    """Drive RadixCache and NaivePrefixCache identically and compare them."""

    NUM_PAGES = 20

    @initialize(ps=st.sampled_from([1, 2, 3]), host_slots=st.sampled_from([0, 0, 1, 3, 8]))
    def setup(self, ps, host_slots):
        self.ps = ps
        hosts = [HostPool(host_slots, 8) if host_slots else None for _ in range(2)]
        self.r = RadixCache(PageAllocator(self.NUM_PAGES), ps, host=hosts[0])
        self.n = NaivePrefixCache(PageAllocator(self.NUM_PAGES), ps, host=hosts[1])
        self.rdev, self.ndev = FakeDevice(self.NUM_PAGES, hosts[0]), FakeDevice(self.NUM_PAGES, hosts[1])
        self.r.events = KVEventLog(ps)  # a subscriber's mirror of the device and host pages, from the events alone
        self.mirror: dict[str, set[int]] = {"GPU": set(), "CPU": set()}
        self.reqs: list[_Req] = []
        self.pins: list[tuple] = []

    # helpers
    def _alloc(self, need):
        """Allocate ``need`` pages in both, evicting first if short."""
        ra, na = self.r.allocator, self.n.allocator
        assert ra.num_free == na.num_free
        if ra.num_free < need:
            short = need - ra.num_free
            assert self.r.evict(short) == self.n.evict(short)
        rp, np_ = ra.alloc(need), na.alloc(need)
        assert (rp is None) == (np_ is None)
        return None if rp is None else (rp, np_)

    def _match(self, tokens, ns):
        rm, nm = self.r.match_prefix(tokens, ns), self.n.match_prefix(tokens, ns)
        assert rm.num_tokens == nm.num_tokens == len(rm.pages) * self.ps
        assert len(nm.pages) == len(rm.pages)
        return rm, nm

    def _pick(self, i):
        return self.reqs[i % len(self.reqs)]

    # rules
    @rule(tokens=TOKENS, ns=NS)
    def match(self, tokens, ns):
        self._match(tokens, ns)

    @rule(tokens=TOKENS, ns=NS)
    def peek(self, tokens, ns):
        assert self.r.peek_prefix_len(tokens, ns) == self.n.peek_prefix_len(tokens, ns)

    @rule(tokens=TOKENS, ns=NS)
    def partial(self, tokens, ns):
        rm, nm = self._match(tokens, ns)
        rest = tokens[rm.num_tokens:]
        rp, np_ = self.r.match_partial(rm.node, rest), self.n.match_partial(nm.node, rest)
        assert (rp is None) == (np_ is None)
        if rp is not None:
            assert rp[1] == np_[1] and 1 <= rp[1] < self.ps
            (key,) = [k for (kns, k), e in self.n._entries.items() if kns == ns and e.page == np_[0]] + [
                k for (kns, k), p in self.n._tails.items() if kns == ns and p == np_[0]]
            base = tuple(tokens[:rm.num_tokens])
            assert key[:len(base)] == base and key[len(base):][:rp[1]] == tuple(rest[:rp[1]])

    @rule(tokens=TOKENS, ns=NS)
    def insert_fresh(self, tokens, ns):
        k = len(tokens) // self.ps
        got = self._alloc(k)
        if got is None:
            return
        t = tokens[: k * self.ps]
        self.rdev.write(t, got[0], ns, self.ps)
        self.ndev.write(t, got[1], ns, self.ps)
        assert self.r.insert(t, got[0], ns) == self.n.insert(t, got[1], ns)

    @rule(tokens=TOKENS, ns=NS)
    def host_len(self, tokens, ns):
        assert self.r.host_match_len(tokens, ns) == self.n.host_match_len(tokens, ns)

    @rule(tokens=TOKENS, ns=NS, max_pages=st.one_of(st.none(), st.integers(0, 3)), run=st.booleans())
    def promote(self, tokens, ns, max_pages, run):
        """Host continuation back to device pages; the loads run with the next step (now, or after later rules:
        a demotion in between must not overwrite a slot a queued load still reads)."""
        assert self.r.promote(tokens, ns, max_pages) == self.n.promote(tokens, ns, max_pages)
        if run:
            self.rdev.run_loads(self.r)
            self.ndev.run_loads(self.n)

    @precondition(lambda self: self.r.host is not None)
    @rule(tokens=TOKENS, ns=NS)
    def insert_host(self, tokens, ns):
        """Pages read back from a disk tier: a run past the tree's device + host match, into free host slots."""
        m = self.r.peek_prefix_len(tokens, ns) + self.r.host_match_len(tokens, ns)
        assert m == self.n.peek_prefix_len(tokens, ns) + self.n.host_match_len(tokens, ns)
        k = min(len(tokens) // self.ps - m // self.ps, self.r.host.allocator.num_free)
        if k <= 0:
            return
        t = tokens[: m + k * self.ps]
        for cache, dev in ((self.r, self.rdev), (self.n, self.ndev)):
            slots = cache.host.allocator.alloc(k)
            for i, slot in enumerate(slots):
                cache.host.arena[slot] = fingerprint((ns, tuple(t[: m + (i + 1) * self.ps])))
            cache.insert_host(t, slots, ns)

    @rule(n=st.integers(0, 8))
    def evict(self, n):
        assert self.r.evict(n) == self.n.evict(n)

    @precondition(lambda self: self.r.host is not None)
    @rule(tokens=TOKENS, ns=NS, n=st.integers(1, 8))
    def free_host_slots(self, tokens, ns, n):
        """Room for a disk read continuing `tokens`'s device + host match: other host pages go, never the path's."""
        m = self.r.peek_prefix_len(tokens, ns) + self.r.host_match_len(tokens, ns)
        path = tokens[:m]
        before = self.r.host_match_len(path, ns)
        assert self.r.free_host_slots(n, path, ns) == self.n.free_host_slots(n, path, ns)
        assert self.r.host_match_len(path, ns) == self.n.host_match_len(path, ns) == before

    @rule(tokens=TOKENS, ns=NS)
    def pin(self, tokens, ns):
        rm, nm = self._match(tokens, ns)
        self.r.lock(rm.node)
        self.n.lock(nm.node)
        self.pins.append((rm.node, nm.node))

    @precondition(lambda self: self.pins)
    @rule(i=st.integers(0, 100))
    def unpin(self, i):
        rn, nn = self.pins.pop(i % len(self.pins))
        self.r.unlock(rn)
        self.n.unlock(nn)

    @precondition(lambda self: len(self.reqs) < 4)
    @rule(tokens=TOKENS, ns=NS)
    def start_request(self, tokens, ns):
        rm, nm = self._match(tokens, ns)
        self.r.lock(rm.node)
        self.n.lock(nm.node)
        need = -(-len(tokens) // self.ps) - len(rm.pages)
        got = self._alloc(need)
        if got is None:
            self.r.unlock(rm.node)
            self.n.unlock(nm.node)
            return
        self.reqs.append(_Req(tokens, ns, rm, nm, *got))

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100), extra=st.lists(st.integers(0, 1), min_size=1, max_size=4))
    def extend_request(self, i, extra):
        q = self._pick(i)
        new_len = len(q.tokens) + len(extra)
        need = -(-new_len // self.ps) - len(q.rpages)
        got = self._alloc(max(need, 0))
        if got is None:
            return
        q.tokens += extra
        q.rpages += got[0]
        q.npages += got[1]

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def commit_request(self, i):
        q = self._pick(i)
        self.rdev.write(q.tokens, q.rpages, q.ns, self.ps)
        self.ndev.write(q.tokens, q.npages, q.ns, self.ps)
        rr = commit_running_prefix(self.r, q.tokens, q.rpages, q.rnode, q.ns)
        nr = commit_running_prefix(self.n, q.tokens, q.npages, q.nnode, q.ns)
        assert rr.num_tokens == nr.num_tokens == (len(q.tokens) // self.ps) * self.ps
        q.rpages[: len(rr.pages)] = rr.pages
        q.npages[: len(nr.pages)] = nr.pages
        q.rnode, q.nnode, q.n_tree = rr.node, nr.node, len(rr.pages)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100), keep_tail=st.booleans())
    def finish_request(self, i, keep_tail):
        q = self.reqs.pop(i % len(self.reqs))
        k = len(q.tokens) // self.ps
        t = q.tokens[: k * self.ps]
        self.rdev.write(t, q.rpages, q.ns, self.ps)
        self.ndev.write(t, q.npages, q.ns, self.ps)
        assert self.r.insert(t, q.rpages[:k], q.ns) == self.n.insert(t, q.npages[:k], q.ns)
        rest = q.tokens[k * self.ps:]
        if rest and keep_tail:  # the partly filled last page becomes a tail
            rm, nm = self._match(t, q.ns)
            assert self.r.insert_tail(rm.node, rest, q.rpages[k]) == self.n.insert_tail(nm.node, rest, q.npages[k])
            k += 1
        self.r.allocator.free(q.rpages[k:])
        self.n.allocator.free(q.npages[k:])
        self.r.unlock(q.rnode)
        self.n.unlock(q.nnode)
        assert self.r.num_tails == self.n.num_tails

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def abort_request(self, i):
        q = self.reqs.pop(i % len(self.reqs))
        self.r.allocator.free(q.rpages[q.n_tree :])
        self.n.allocator.free(q.npages[q.n_tree :])
        self.r.unlock(q.rnode)
        self.n.unlock(q.nnode)

    @precondition(lambda self: not self.reqs and not self.pins)
    @rule()
    def reset(self):
        self.r.reset()
        self.n.reset()

    @invariant()
    def consistent(self):
        if not hasattr(self, "r"):
            return
        self.r.check_integrity(held_pages=[p for q in self.reqs for p in q.rpages])
        self.n.check_integrity(held_pages=[p for q in self.reqs for p in q.npages])
        assert self.r.allocator.num_free == self.n.allocator.num_free
        assert self.r.evictable_pages == self.n.evictable_pages
        assert self.r.protected_pages == self.n.protected_pages
        assert self.r.cached_pages == self.n.cached_pages
        # same prefixes cached, locked and on the same tier: catches any divergence in eviction order at once
        assert radix_contents(self.r) == naive_contents(self.n)
        assert self.r.host_cached_pages == self.n.host_cached_pages
        assert self.r.host_copy_pages == self.n.host_copy_pages
        assert radix_copies(self.r).keys() == self.n._copies.keys()
        apply_events(self.mirror, self.r.events.take(), self.ps)
        assert self.mirror["GPU"] == {sequence_hashes(key, self.ps, ns)[-1] for ns, key in self.n._entries}
        assert self.mirror["CPU"] == {sequence_hashes(key, self.ps, ns)[-1] for ns, key in self.n._host}
        if self.r.host is not None:
            assert self.r.host.allocator.num_free == self.n.host.allocator.num_free
            assert self.r.host.pending_release == self.n.host.pending_release
            # the data each page holds is its own prefix's (loads still queued: not yet, so run them first)
            if not self.r.host.loads:
                self.rdev.check(radix_pages(self.r))
            self.rdev.check_copies(radix_copies(self.r))
            self.ndev.check_copies(self.n._copies)
            if not self.n.host.loads:
                self.ndev.check(naive_pages(self.n))


TwinMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_twin_radix_vs_naive = TwinMachine.TestCase
