"""Where a request goes: by estimated finish time on each replica, bound late when every replica is full.

Each replica's cache is mirrored from its KV events (sgl_jax/cache/events.py: the block hashes it holds on its
device), so the router knows, for a prompt's block hashes, exactly how many leading tokens each replica would
not compute (`matched_tokens`). A request's *work* on a replica is the prompt tokens it would prefill there plus
`decode_weight` per output token it may produce; a replica's *load* is the work of what it is running and has
not finished. `cost` picks the replica with the smallest load + work: a long cached prefix wins unless that
replica's queue outweighs it, and between equal matches the least loaded wins (`round_robin` ignores both).

Late binding: a replica takes at most `max_inflight` requests (its running batch); when none has room, the
request waits in the router's queue instead of being committed to a busy replica. When a slot frees, the
replica takes the waiting request that suits it best -- the longest cached match there among the first `window`
waiting -- but the oldest waiting request is passed over at most `max_bypass` times, then goes first: nobody
waits forever. A new request never overtakes waiting ones (it joins the queue when the queue is not empty).

After dispatch the chosen replica's mirror gets the prompt's blocks at once (the events confirm them a step
later; a request right behind with the same prefix goes to the same place). A replica marked down loses its
mirror (its cache is gone when it comes back). Plain Python, no I/O: the server drives it from one event loop;
the event subscribers update `blocks` under `lock`.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

POLICIES = ("cost", "round_robin")


@dataclasses.dataclass
class Pending:
    """A request as the router sees it."""

    rid: str
    hashes: list[int]  # the prompt's full-page block hashes
    prompt_tokens: int
    max_new_tokens: int
    seq: int = 0  # arrival order
    bypassed: int = 0
    replica: "Replica | None" = None
    work: float = 0.0


class Replica:
    def __init__(self, name: str, url: str, max_inflight: int, page_size: int):
        self.name, self.url = name, url
        self.max_inflight, self.page_size = int(max_inflight), int(page_size)
        self.blocks: set[int] = set()
        self.lock = threading.Lock()
        self.inflight: dict[str, Pending] = {}
        self.load = 0.0
        self.healthy = True
        self.routed = 0

    @property
    def has_room(self) -> bool:
        return self.healthy and len(self.inflight) < self.max_inflight

    def matched_blocks(self, hashes: list[int]) -> int:
        n = 0
        with self.lock:
            for h in hashes:
                if h not in self.blocks:
                    break
                n += 1
        return n

    def apply(self, events: list) -> None:
        """One batch of KV events (the wire layout of sgl_jax/cache/events.py)."""
        with self.lock:
            for ev in events:
                kind = ev[0]
                if kind == "BlockStored":
                    self.blocks.update(ev[1])
                elif kind == "BlockRemoved":
                    self.blocks.difference_update(ev[1])
                elif kind == "AllBlocksCleared":
                    self.blocks.clear()


class Router:
    def __init__(self, replicas: list[Replica], policy: str = "cost", decode_weight: float = 2.0,
                 max_bypass: int = 4, window: int = 16):
        if policy not in POLICIES:
            raise ValueError(f"routing policy {policy!r} is unknown; expected one of {', '.join(POLICIES)}")
        if not replicas:
            raise ValueError("the router needs at least one replica")
        self.replicas, self.policy = replicas, policy
        self.decode_weight, self.max_bypass, self.window = float(decode_weight), int(max_bypass), int(window)
        self.queue: list[Pending] = []
        self._seq = itertools.count()
        self._rr = itertools.count()

    def work(self, r: Replica, p: Pending) -> float:
        cached = min(r.matched_blocks(p.hashes) * r.page_size, max(p.prompt_tokens - 1, 0))
        return (p.prompt_tokens - cached) + self.decode_weight * p.max_new_tokens

    def _best(self, p: Pending, candidates: list[Replica]) -> Replica:
        if self.policy == "round_robin":
            return candidates[next(self._rr) % len(candidates)]
        return min(candidates, key=lambda r: (r.load + self.work(r, p), len(r.inflight), r.routed))

    def submit(self, p: Pending) -> Replica | None:
        """The replica `p` goes to now, or None: it waits (`bind` hands it out later)."""
        p.seq = next(self._seq)
        room = [r for r in self.replicas if r.has_room]
        if self.queue or not room:
            self.queue.append(p)
            return None
        return self._dispatch(p, self._best(p, room))

    def _dispatch(self, p: Pending, r: Replica) -> Replica:
        p.replica, p.work = r, self.work(r, p)
        r.inflight[p.rid] = p
        r.load += p.work
        r.routed += 1
        with r.lock:  # optimistic: confirmed (or corrected) by the replica's events
            r.blocks.update(p.hashes)
        return r

    def finish(self, p: Pending) -> None:
        r = p.replica
        if r is not None and r.inflight.pop(p.rid, None) is not None:
            r.load = max(0.0, r.load - p.work)

    def bind(self) -> list[tuple[Pending, Replica]]:
        """Waiting requests bound to replicas with room, in the order described in the module docstring."""
        out = []
        while self.queue:
            room = [r for r in self.replicas if r.has_room]
            if not room:
                break
            oldest = self.queue[0]
            if self.policy == "round_robin":
                p = oldest
                r = self._best(p, room)
            else:
                scored = [(self.work(r, q) - self.work_uncached(q), -q.seq, q, r) for q in self.queue[:self.window]
                          for r in room]
                _, _, p, r = min(scored, key=lambda t: (t[0], -t[1]))
                if p is not oldest and oldest.bypassed >= self.max_bypass:
                    p, r = oldest, self._best(oldest, room)
                elif p is not oldest:
                    oldest.bypassed += 1
            self.queue.remove(p)
            out.append((p, self._dispatch(p, r)))
        return out

    def work_uncached(self, p: Pending) -> float:
        return p.prompt_tokens + self.decode_weight * p.max_new_tokens

    def mark_down(self, r: Replica) -> None:
        r.healthy = False
        with r.lock:
            r.blocks.clear()

    def mark_up(self, r: Replica) -> None:
        r.healthy = True

    def imbalance(self) -> tuple[int, float]:
        """(max, mean) requests in flight over the healthy replicas."""
        n = [len(r.inflight) for r in self.replicas if r.healthy] or [0]
        return max(n), sum(n) / len(n)
