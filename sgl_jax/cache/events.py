"""KV-cache events: what the radix cache stores and drops, page by page, in the schema vLLM and SGLang publish.

A *block* is one page of the radix tree (``page_size`` tokens). It is named by a 64-bit hash chained over every
token from the start of the sequence to the page's end (`block_hashes`): the same prefix gives the same hashes
on every replica and in a router that only has the token ids (`sequence_hashes`), so a subscriber can tell how
many leading pages of a prompt a replica holds without ever seeing its tree.

`KVEventLog` is the radix cache's listener (`RadixCache.events`): the cache reports each page range it gains
on the device (insert of new pages, a host-tier node loaded back or recomputed) and each it gives up (dropped or
demoted to the host tier by eviction), plus a flush; the log turns them into events and keeps them until
`take()` (thread-safe: the engine thread adds, the publisher's thread takes; at most `max_events` wait). Only device residency is reported (medium "GPU", the name the schema uses for accelerator memory);
host-tier and disk pages are not announced. Partial last pages (tails) are not blocks.

The wire format, for `serve/kv_events.py`'s ZMQ publisher: each event a msgpack array tagged with its type,
    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]
    ["BlockRemoved", block_hashes, medium]
    ["AllBlocksCleared"]
in a batch ``[ts, [events...]]`` -- msgspec's array-like tagged structs, which is how vLLM's KVEventBatch and
SGLang's are decoded (a decoder that knows fewer trailing fields ignores the rest). Host code: no jax, no zmq.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from typing import Sequence

MEDIUM = "GPU"


def _root_hash(namespace: str) -> int:
    return int.from_bytes(hashlib.blake2b(b"sgl_jax-kv:" + namespace.encode(), digest_size=8).digest(), "big")


def chain(parent: int, tokens: Sequence[int]) -> int:
    """The hash of a page holding `tokens` whose preceding prefix hashes to `parent` (unsigned 64-bit)."""
    h = hashlib.blake2b(parent.to_bytes(8, "big"), digest_size=8)
    h.update(struct.pack(f"<{len(tokens)}i", *tokens))
    return int.from_bytes(h.digest(), "big")


def sequence_hashes(tokens: Sequence[int], page_size: int, namespace: str = "") -> list[int]:
    """Hashes of the full pages of `tokens` (page i covers tokens [i * page_size, (i + 1) * page_size))."""
    h, out = _root_hash(namespace), []
    for i in range(len(tokens) // page_size):
        h = chain(h, tokens[i * page_size:(i + 1) * page_size])
        out.append(h)
    return out


def prefix_hash(tokens: Sequence[int], page_size: int, namespace: str = "") -> int | None:
    """The hash of the last full page of `tokens` (None when there is none: the root)."""
    hs = sequence_hashes(tokens, page_size, namespace)
    return hs[-1] if hs else None


class KVEventLog:
    """Events of one radix cache, kept in order until taken (one batch per engine step)."""

    def __init__(self, page_size: int, max_events: int = 100_000):
        self.page_size = int(page_size)
        self.max_events = int(max_events)
        self._events: list[list] = []
        self._lock = threading.Lock()  # the engine thread adds, a publisher thread takes
        self.dropped = 0  # events lost because nobody took them (max_events)

    def _add(self, event: list) -> None:
        with self._lock:
            if len(self._events) >= self.max_events:
                self._events.pop(0)
                self.dropped += 1
            self._events.append(event)

    def stored(self, namespace: str, tokens: Sequence[int], first_page: int, num_pages: int) -> None:
        """Pages [first_page, first_page + num_pages) of the sequence `tokens` (which covers them) are now on the
        device."""
        if num_pages <= 0:
            return
        ps = self.page_size
        hs = sequence_hashes(tokens[:(first_page + num_pages) * ps], ps, namespace)
        parent = hs[first_page - 1] if first_page > 0 else None
        self._add(["BlockStored", hs[first_page:], parent,
                   list(tokens[first_page * ps:(first_page + num_pages) * ps]), ps, None, MEDIUM, None])

    def removed(self, namespace: str, tokens: Sequence[int], first_page: int, num_pages: int) -> None:
        """Pages [first_page, first_page + num_pages) of the sequence `tokens` left the device."""
        if num_pages <= 0:
            return
        hs = sequence_hashes(tokens[:(first_page + num_pages) * self.page_size], self.page_size, namespace)
        self._add(["BlockRemoved", hs[first_page:], MEDIUM])

    def cleared(self) -> None:
        with self._lock:
            self._events.clear()
        self._add(["AllBlocksCleared"])

    def take(self) -> list[list]:
        with self._lock:
            out, self._events = self._events, []
        return out

    @staticmethod
    def batch(events: list[list]) -> list:
        """One published batch: [ts, events]."""
        return [time.time(), events]
