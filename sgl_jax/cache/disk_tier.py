"""The scheduler's side of the disk tier: what is written when (the write policy), and reads that run in the
background while the request waits in a *loading* state.

Pure host code (no jax). ``DiskStore`` (disk_store.py) is the files; this is when they are written and read:

- **write_through** (the default): every page the tree takes in is written once, at the start of the next
  schedule (one device read for all of them). A page is on disk from the step after it was computed, so a crash or
  a ``kill -9`` keeps it; the cost is a device read and a file write per new page, also for pages that are never
  evicted (bench/notes.md: +2-6 % on a cold 2,000-token prefill here).
- **write_back**: a page is written only when it leaves the host tier (host-tier eviction), plus every page still in
  the device and host tiers at a clean shutdown. Nothing is written while the working set fits in memory; a crash
  loses what was only in memory.

A waiting request whose prompt continues past its device + host match into pages on disk is not admitted until
those pages are read: ``ready`` starts a read of the run on a worker thread (priced first: ``TransferCosts.
disk_pays``) and answers False while it runs, so the scheduler admits others meanwhile; once done, ``take`` puts
the pages into host slots (evicting the least recently used host pages off the request's path if none are free) and
the tree (``RadixCache.insert_host``), from where they are loaded like any host hit. The worker only reads and
verifies files (``DiskStore.read``); the index is changed on the scheduler's thread (``DiskStore.account``). The
pages being read at once never exceed the host tier's slots.

With KV events on (``cache.events``), every page file this process writes is announced as a BlockStored of medium
"DISK" with the block hash the device and host tiers use for the same page, and a BlockRemoved when the file leaves
the index (the budget, a damaged or vanished file, ``clear``): a router counts those prompt tokens as read, not
computed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable

from .disk_store import DiskStore
from .events import DISK_MEDIUM, sequence_hashes

__all__ = ["DiskTier", "WRITE_POLICIES"]


WRITE_POLICIES = ("write_through", "write_back")


@dataclasses.dataclass
class _Fetch:
    chain: list[bytes]  # the request's page addresses from its first page on
    first: int  # the first page being read
    future: concurrent.futures.Future  # -> list of (status, page) per address from `first` on


class DiskTier:
    def __init__(self, store: DiskStore, cache, policy: str = "write_through"):
        if policy not in WRITE_POLICIES:
            raise ValueError(f"unknown disk write policy {policy!r}; expected one of {WRITE_POLICIES}")
        if cache.host is None:
            raise ValueError("the disk tier needs the host tier (pages are read back through host slots)")
        self.store, self.cache, self.policy = store, cache, policy
        self.page_size = cache.page_size
        self.tokens_read = 0  # prompt tokens read back into host slots
        self.pages_spilled = 0  # pages written as the host tier dropped them (write_back)
        self.notify: Callable[[], None] | None = None  # called (on the worker) when a read finishes
        self._fetches: dict[str, _Fetch] = {}
        self._announced: dict[bytes, int] = {}  # disk address -> the block hash announced for it (KV events)
        store.on_forget = self._forgotten
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sgl-jax-disk")
        if policy == "write_through":
            cache.fresh = []
        else:
            cache.spill = self._spill

    # ------------------------------------------------------------------ reads
    @property
    def num_loading(self) -> int:
        """Requests waiting for a disk read."""
        return len(self._fetches)

    def _reading_pages(self) -> int:
        return sum(len(f.chain) - f.first for f in self._fetches.values())

    def ready(self, r: Any, upto: int, limit: int, pays: Callable[[int], bool], own_host_pages: int = 0) -> bool:
        """Whether waiting request ``r`` may be admitted now. False while a read of its pages past ``upto`` (its
        device + host match, of which ``own_host_pages`` on the host; page-aligned) runs: started here when the
        disk holds a run there that ``pays`` for its tokens. The run is capped by the host tier's slots, less its
        own host pages and the pages other reads bring (it may evict other host pages when it lands)."""
        f = self._fetches.get(r.rid)
        if f is not None:
            return f.future.done()
        store, ps = self.store, self.page_size
        if not store.enabled or limit - upto < ps:
            return True
        chain = store.chain(r.tokens(0, limit // ps * ps), r.namespace)
        room = self.cache.host.num_slots - own_host_pages - self._reading_pages()
        run, first = 0, upto // ps
        while run < min(len(chain) - first, room) and store.has(chain[first + run]):
            run += 1
        if not run or not pays(run * ps):
            return True
        hashes = chain[first:first + run]
        future = self._pool.submit(self._read, hashes)
        self._fetches[r.rid] = _Fetch(chain[:first + run], first, future)
        if self.notify is not None:
            future.add_done_callback(lambda _: self.notify())
        return False

    def _read(self, hashes: list[bytes]) -> list[tuple[str, Any]]:
        """On the worker: read and verify ``hashes`` in order, stopping after the first that fails."""
        out = []
        for h in hashes:
            out.append(self.store.read(h))
            if out[-1][0] != "ok":
                break
        return out

    def take(self, r: Any, upto: int) -> int:
        """At ``r``'s admission: the pages its finished read brought, from page ``upto // page_size`` on, into
        host slots (the least recently used host pages off ``r``'s path make room) and the tree as host nodes;
        returns their tokens (0 without a read)."""
        f = self._fetches.pop(r.rid, None)
        if f is None or not f.future.done():
            return 0
        got = {}
        for h, (status, page) in zip(f.chain[f.first:], f.future.result()):
            page = self.store.account(h, status, page)
            if page is not None:
                got[h] = page
        host, ps = self.cache.host, self.page_size
        data = []
        for h in f.chain[upto // ps:]:
            if h not in got:
                break
            data.append(got[h])
        data = data[: self.cache.free_host_slots(len(data), r.tokens(0, upto), r.namespace)]
        if not data:
            return 0
        slots = host.allocator.alloc(len(data))
        for slot, page in zip(slots, data):
            host.arena[slot] = page
        tokens = r.tokens(0, upto + len(data) * ps)
        self.cache.insert_host(tokens, slots, r.namespace)
        first = upto // ps
        self._announce(r.namespace, tokens, list(enumerate(f.chain[first:first + len(data)], first)))
        self.tokens_read += len(data) * ps
        return len(data) * ps

    def forget(self, rid: str) -> None:
        """``rid`` left the queue (aborted): its read, if any, is dropped."""
        self._fetches.pop(rid, None)

    # ------------------------------------------------------------------ events
    def _announce(self, namespace: str, tokens, pages: list[tuple[int, bytes]]) -> None:
        """KV events for pages of ``tokens`` (page index, disk address; increasing index) not yet announced: those
        the store holds, one BlockStored per run of consecutive pages. Off (nothing hashed) without events."""
        events, ps = self.cache.events, self.page_size
        if events is None:
            return
        # not announced yet, and still on disk (a later write's budget may have dropped one)
        pages = [(i, h) for i, h in pages if h not in self._announced and self.store.has(h)]
        if not pages:
            return
        hs = sequence_hashes(tokens[:(pages[-1][0] + 1) * ps], ps, namespace)
        start = 0
        for k in range(1, len(pages) + 1):
            if k == len(pages) or pages[k][0] != pages[k - 1][0] + 1:
                i0, i1 = pages[start][0], pages[k - 1][0] + 1
                events.add(["BlockStored", hs[i0:i1], hs[i0 - 1] if i0 else None, list(tokens[i0 * ps:i1 * ps]),
                            ps, None, DISK_MEDIUM, None])
                start = k
        for i, h in pages:
            self._announced[h] = hs[i]

    def _forgotten(self, h: bytes) -> None:
        """The store dropped address ``h`` from its index: a BlockRemoved if this process announced it."""
        block = self._announced.pop(h, None)
        if block is not None and self.cache.events is not None:
            self.cache.events.add(["BlockRemoved", [block], DISK_MEDIUM])

    # ----------------------------------------------------------------- writes
    def write_fresh(self) -> None:
        """write_through: every page the tree took in since the last call, if it is still the tree's device page
        for its prefix (one device read for all of them), under its chain address."""
        fresh, store, ps = self.cache.fresh, self.store, self.page_size
        if not fresh:
            return
        leaves = []
        if store.enabled:
            for ns, toks, i0, pages in fresh:
                end = (i0 + len(pages)) * ps
                now = self.cache.device_pages(toks[:end], ns)  # evicted or replaced since: not written
                hashes = store.chain(toks[:end], ns)
                mine = [(i0 + j, hashes[i0 + j], p) for j, p in enumerate(pages) if i0 + j < len(now)
                        and now[i0 + j] == p]
                leaves.append((ns, toks, mine))
        fresh.clear()
        self._write_device(leaves)

    def _write_device(self, leaves: list[tuple[str, Any, list[tuple[int, bytes, int]]]], batch: int = 256) -> None:
        """Per leaf (namespace, tokens, [(page index, address, device page)]): write the pages not on disk yet,
        then announce the leaf's pages on disk that this process has not announced (its own writes, and files an
        earlier run or another process wrote)."""
        items = [(h, p) for _, _, pages in leaves for _, h, p in pages if not self.store.has(h)]
        for i in range(0, len(items), batch):
            part = items[i:i + batch]
            data = self.cache.host.read_device([p for _, p in part])
            for (h, _), row in zip(part, data):
                self.store.put(h, row)
        for ns, toks, pages in leaves:
            self._announce(ns, toks, [(i, h) for i, h, _ in pages])

    def _spill(self, node, num_pages: int) -> None:
        """write_back (the cache calls it): the trailing ``num_pages`` host pages of ``node`` are about to be
        dropped from the host tier; write them first."""
        store, ps = self.store, self.page_size
        if not store.enabled:
            return
        tokens = self.cache.path_tokens(node)
        first = len(tokens) // ps - num_pages
        hashes = store.chain(tokens, node.namespace)[first:]
        self.cache.host.flush_saves()  # the pages may have been demoted this round, their copies still pending
        arena = self.cache.host.arena
        for h, slot in zip(hashes, node.pages[-num_pages:]):
            if not store.has(h) and store.put(h, arena[slot]):
                self.pages_spilled += 1
        self._announce(node.namespace, tokens, list(enumerate(hashes, first)))

    def flush(self) -> None:
        """At a clean shutdown: what the policy has not written yet. write_through: the last step's pages;
        write_back: every page in the device and host tiers."""
        if self.policy == "write_through":
            self.write_fresh()
            return
        if not self.store.enabled:
            return
        self.cache.host.flush_saves()  # host pages demoted this round are written below
        dev = []
        for ns, tokens, tier, pages in self.cache.resident_nodes():
            first = len(tokens) // self.page_size - len(pages)
            mine = [(first + i, h, p) for i, (h, p) in enumerate(zip(self.store.chain(tokens, ns)[first:], pages))]
            if tier:
                for _, h, p in mine:
                    if not self.store.has(h):
                        self.store.put(h, self.cache.host.arena[p])
                self._announce(ns, tokens, [(i, h) for i, h, _ in mine])
            else:
                dev.append((ns, tokens, mine))
        self._write_device(dev)

    def clear(self) -> int:
        """``/flush_cache``: every page file goes, and reads in flight are dropped."""
        self._fetches.clear()
        if self.cache.events is not None and self._announced:
            self.cache.events.add(["BlockRemoved", list(self._announced.values()), DISK_MEDIUM])
        self._announced.clear()
        return self.store.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict:
        return {**self.store.stats(), "disk_tokens_read": self.tokens_read, "disk_loading": self.num_loading,
                "disk_pages_spilled": self.pages_spilled, "disk_write_policy": self.policy}
