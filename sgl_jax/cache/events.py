"""KV-cache events: what the radix cache stores and drops, page by page, in the schema vLLM and SGLang publish.

A *block* is one page of the radix tree (``page_size`` tokens). It is named by a 64-bit hash chained over every
token from the start of the sequence to the page's end (`block_hashes`): the same prefix gives the same hashes
on every replica and in a router that only has the token ids (`sequence_hashes`), so a subscriber can tell how
many leading pages of a prompt a replica holds without ever seeing its tree.

`KVEventLog` is the radix cache's listener (`RadixCache.events`): the cache reports each page range it gains
on the device (insert of new pages, a host-tier node loaded back or recomputed) and each it gives up (dropped or
demoted to the host tier by eviction), plus a flush; the log turns them into events and keeps them until
`take()` (thread-safe: the engine thread records, the publisher's thread takes and hashes). Device residency is
reported as medium "GPU" (the name the schema uses for accelerator memory), the host tier's pages as "CPU" (a
demotion is a GPU BlockRemoved and a CPU BlockStored of the same blocks; a promotion the reverse): a router that
mirrors both knows which prompt tokens a replica would load rather than compute. The disk tier's page files are
medium "DISK" (`DiskTier`): announced when this process writes one, removed when it leaves the disk's index
(budget, damage, a flush); files another process or an earlier run wrote are not announced by this one.
Partial last pages (tails) are not blocks.

The wire format, for `serve/kv_events.py`'s ZMQ publisher: each event a msgpack array tagged with its type,
    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]
    ["BlockRemoved", block_hashes, medium]
    ["AllBlocksCleared"]
in a batch ``[ts, [events...]]`` -- msgspec's array-like tagged structs, which is how vLLM's KVEventBatch and
SGLang's are decoded (a decoder that knows fewer trailing fields ignores the rest). Host code: no jax, no zmq.
"""

from __future__ import annotations

import collections
import hashlib
import struct
import threading
from typing import Sequence

MEDIUM = "GPU"
HOST_MEDIUM = "CPU"
DISK_MEDIUM = "DISK"


def _root_hash(namespace: str) -> int:
    return int.from_bytes(hashlib.blake2b(b"sgl_jax-kv:" + namespace.encode(), digest_size=8).digest(), "big")


def chain(parent: int, tokens: Sequence[int]) -> int:
    """The hash of a page holding `tokens` whose preceding prefix hashes to `parent` (unsigned 64-bit)."""
    return _chain_packed(parent, struct.pack(f"<{len(tokens)}i", *tokens))


def _chain_packed(parent: int, packed: bytes) -> int:
    """`chain` with the page's tokens already packed (little-endian int32)."""
    return int.from_bytes(hashlib.blake2b(parent.to_bytes(8, "big") + packed, digest_size=8).digest(), "big")


def sequence_hashes(tokens: Sequence[int], page_size: int, namespace: str = "",
                    memo: "HashMemo | None" = None) -> list[int]:
    """Hashes of the full pages of `tokens` (page i covers tokens [i * page_size, (i + 1) * page_size)): `chain`
    page after page, with the tokens packed once (a router hashes every prompt on its request path). With `memo`,
    a page already hashed after the same parent is looked up instead."""
    n = len(tokens) // page_size
    raw = struct.pack(f"<{n * page_size}i", *tokens[:n * page_size])
    width, h, out = 4 * page_size, _root_hash(namespace), []
    if memo is None:
        for off in range(0, n * width, width):
            h = _chain_packed(h, raw[off:off + width])
            out.append(h)
        return out
    known = memo.known
    for off in range(0, n * width, width):
        page = raw[off:off + width]
        key = (h, page)
        h = known.get(key)
        if h is None:
            h = known[key] = _chain_packed(key[0], page)
        out.append(h)
    if len(known) > memo.size:
        known.clear()  # (a bound, not an LRU: refilled by the next prompts at one hash a page)
    return out


class HashMemo:
    """Page hashes already computed, by (parent hash, the page's packed tokens), for `sequence_hashes`: most of
    the prompts a router hashes (and of the pages a worker's event log announces) continue a prefix hashed
    before -- a system prompt, a conversation -- and a dict lookup costs a fraction of a blake2b. Holds at most
    about `size` pages (~150 bytes each), then starts over. Threads may share one: its only operations are a
    dict's get, set and clear, each atomic in CPython."""

    def __init__(self, size: int = 1 << 16):
        self.size = int(size)
        self.known: dict[tuple[int, bytes], int] = {}


class KVEventLog:
    """Events of one radix cache, kept in order until taken. The cache's thread (the engine's) only records what
    changed -- the namespace, the token tuple and the page range, no hashing; `take()` (the publisher's thread)
    turns the records into wire events. At most `max_events` wait; the oldest go first (`dropped` counts them)."""

    def __init__(self, page_size: int, max_events: int = 100_000):
        self.page_size = int(page_size)
        self._records: collections.deque = collections.deque(maxlen=int(max_events))
        self._lock = threading.Lock()  # the engine thread adds, a publisher thread takes
        self.dropped = 0
        self._hashes = HashMemo()  # an insert's pages continue a prefix announced before: hashed once

    def _add(self, record: tuple) -> None:
        with self._lock:
            if len(self._records) == self._records.maxlen:
                self.dropped += 1
            self._records.append(record)

    def stored(self, namespace: str, tokens: Sequence[int], first_page: int, num_pages: int,
               medium: str = MEDIUM) -> None:
        """Pages [first_page, first_page + num_pages) of the sequence `tokens` (which covers them) are now held on
        `medium` (the device, or HOST_MEDIUM)."""
        if num_pages > 0:
            self._add(("BlockStored", namespace, tuple(tokens), first_page, num_pages, medium))

    def removed(self, namespace: str, tokens: Sequence[int], first_page: int, num_pages: int,
                medium: str = MEDIUM) -> None:
        """Pages [first_page, first_page + num_pages) of the sequence `tokens` left `medium`."""
        if num_pages > 0:
            self._add(("BlockRemoved", namespace, tuple(tokens), first_page, num_pages, medium))

    def add(self, event: list) -> None:
        """One event already in the wire layout (its hashes computed by the caller: the disk tier's)."""
        self._add(("wire", event))

    def cleared(self) -> None:
        with self._lock:
            self._records.clear()
        self._add(("AllBlocksCleared",))

    def take(self) -> list[list]:
        """The events recorded since the last call, in the wire layout (see the module docstring)."""
        with self._lock:
            records = list(self._records)
            self._records.clear()
        return [self._event(r) for r in records]

    def _event(self, record: tuple) -> list:
        if record[0] == "AllBlocksCleared":
            return ["AllBlocksCleared"]
        if record[0] == "wire":
            return record[1]
        kind, namespace, tokens, first, n, medium = record
        ps = self.page_size
        hs = sequence_hashes(tokens[:(first + n) * ps], ps, namespace, self._hashes)
        if kind == "BlockRemoved":
            return ["BlockRemoved", hs[first:], medium]
        return ["BlockStored", hs[first:], hs[first - 1] if first > 0 else None,
                list(tokens[first * ps:(first + n) * ps]), ps, None, medium, None]
