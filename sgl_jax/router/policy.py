"""Where a request goes: by estimated finish time on each replica, bound late when every replica is full.

Each replica's cache is mirrored from its KV events (sgl_jax/cache/events.py: the block hashes it holds on its
device and on its host tier), so the router knows, for a prompt's block hashes, exactly how many leading tokens
each replica would not compute (a host-tier page is loaded, not computed). A request's *work* on a replica is the
prompt tokens it would prefill there (plus `decode_weight` per output token, 0 by default: decode is batched, a
request's tokens do not delay another's first one); a replica's *load* is the work it was given that is not done
(a prompt's part ends with its first token). `cost`
estimates the finish time of the request's prefill as the prefill steps the replica needs for its load and this
request -- ceil((load + work + copy) / prefill_chunk), `prefill_chunk` being the tokens one step prefills (the
worker's max_prefill_tokens), `copy` = `copy_weight` x the tokens of the prompt another replica caches and this one
would recompute (a second copy of a prefix takes pool room that evicts other prefixes later) -- and picks the
fewest steps, then the least work, then the replica caching least (room for a new prefix), then the fewest requests
in flight: a cached prefix wins unless that replica's queue costs more steps than recomputing elsewhere
(`round_robin` ignores both).

Late binding: a replica takes at most `max_inflight` requests (the front ends default to twice its running
batch, DEFAULT_INFLIGHT_FACTOR); when none has room, the
request waits in the router's queue instead of being committed to a busy replica. When a slot frees, the
replica takes the waiting request that suits it best -- the longest cached match there, among the first
`window` waiting, of a request that no other replica caches more of -- but the oldest waiting request is passed
over at most `max_bypass` times (by another request, or by a slot that suits nobody and stays free for now),
then goes first: nobody waits forever. A new request never overtakes waiting ones (it joins the queue when the
queue is not empty).

After dispatch the chosen replica's mirror gets the prompt's blocks at once (the events confirm them a step
later; a request right behind with the same prefix goes to the same place). A replica marked down loses its
mirror (its cache is gone when it comes back). Plain Python, no I/O: the server drives it from one event loop;
the event subscribers update `blocks` under `lock`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading

from sgl_jax.cache.events import DISK_MEDIUM, HOST_MEDIUM

POLICIES = ("cost", "round_robin")
# the front ends' defaults, chosen on bench/bench_router.py (bench/notes.md): a worker takes twice its batch before
# requests wait in the router (its own scheduler then orders a short queue by prefix), and a second copy of a
# prefix another replica holds is charged 6x its tokens (the pool room it takes evicts other tenants' prefixes)
DEFAULT_INFLIGHT_FACTOR = 2
DEFAULT_COPY_WEIGHT = 6.0


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
    work: float = 0.0  # what it adds to its replica's load
    prefill: float = 0.0  # the part of `work` that is prompt tokens to compute (gone at the first token)
    route_rid: str = ""  # the front end's tag for it (the Ray gateway's), when it has one


class Replica:
    def __init__(self, name: str, url: str, max_inflight: int, page_size: int, prefill_chunk: int = 256):
        self.name, self.url = name, url
        self.max_inflight, self.page_size, self.prefill_chunk = int(max_inflight), int(page_size), int(prefill_chunk)
        self.blocks: set[int] = set()  # block hashes on its device
        self.host_blocks: set[int] = set()  # ... and on its host tier
        self.disk_blocks: set[int] = set()  # ... and in its disk tier's files
        self.lock = threading.Lock()
        self.inflight: dict[str, Pending] = {}
        self.load = 0.0
        self.healthy = True
        self.routed = 0
        self.pid: int | None = None  # the replica's process, when it reports one (Ray replicas do)

    @property
    def has_room(self) -> bool:
        return self.healthy and len(self.inflight) < self.max_inflight

    def matched_blocks(self, hashes: list[int]) -> int:
        """Leading blocks of `hashes` the replica holds: on its device, then on its host or disk tier (loaded,
        not computed)."""
        n = 0
        with self.lock:
            for h in hashes:
                if h not in self.blocks and h not in self.host_blocks and h not in self.disk_blocks:
                    break
                n += 1
        return n

    def _medium(self, name) -> set[int]:
        return self.host_blocks if name == HOST_MEDIUM else self.disk_blocks if name == DISK_MEDIUM else self.blocks

    def apply(self, events: list) -> None:
        """One batch of KV events (the wire layout of sgl_jax/cache/events.py; medium HOST_MEDIUM is the host tier,
        DISK_MEDIUM the disk tier, anything else the device)."""
        with self.lock:
            for ev in events:
                kind = ev[0]
                if kind == "BlockStored":
                    self._medium(ev[6] if len(ev) > 6 else None).update(ev[1])
                elif kind == "BlockRemoved":
                    self._medium(ev[2] if len(ev) > 2 else None).difference_update(ev[1])
                elif kind == "AllBlocksCleared":
                    self.blocks.clear()
                    self.host_blocks.clear()
                    self.disk_blocks.clear()


class Router:
    def __init__(self, replicas: list[Replica], policy: str = "cost", decode_weight: float = 0.0,
                 max_bypass: int = 4, window: int = 16, copy_weight: float = 0.0):
        if policy not in POLICIES:
            raise ValueError(f"routing policy {policy!r} is unknown; expected one of {', '.join(POLICIES)}")
        self.replicas, self.policy = replicas, policy
        self.decode_weight, self.max_bypass, self.window = float(decode_weight), int(max_bypass), int(window)
        self.copy_weight = float(copy_weight)
        self.queue: list[Pending] = []
        self._seq = itertools.count()
        self._rr = itertools.count()

    def prefill_tokens(self, r: Replica, p: Pending, matched: int | None = None) -> int:
        """The prompt tokens `p` would compute on `r` (`matched`: r.matched_blocks(p.hashes), when known)."""
        m = r.matched_blocks(p.hashes) if matched is None else matched
        return p.prompt_tokens - min(m * r.page_size, max(p.prompt_tokens - 1, 0))

    def work(self, r: Replica, p: Pending, matched: int | None = None) -> float:
        return self.prefill_tokens(r, p, matched) + self.decode_weight * p.max_new_tokens

    def _best(self, p: Pending, candidates: list[Replica]) -> tuple[Replica, int | None]:
        """The replica for `p` among `candidates`, and its matched blocks (None when not computed)."""
        if self.policy == "round_robin":
            return candidates[next(self._rr) % len(candidates)], None
        # each replica's match once per decision: the mirrors are walked under their locks, page hash by hash
        matched = {id(r): r.matched_blocks(p.hashes) for r in self.replicas if r.healthy}  # (candidates: healthy)
        top = max(matched.values(), default=0)  # the most leading blocks of `p` any healthy replica holds
        r = min(candidates, key=lambda r: self.cost(r, p, top, matched[id(r)]))
        return r, matched[id(r)]

    def cost(self, r: Replica, p: Pending, top: int, matched: int) -> tuple:
        """(prefill steps, work, blocks held, requests in flight, requests routed) of `p` on `r`, given `matched`
        (r.matched_blocks(p.hashes)) and `top` (the most any healthy replica matches)."""
        work = self.work(r, p, matched)
        copy = self.copy_weight * max(0, top - matched) * r.page_size if self.copy_weight else 0.0
        return math.ceil((r.load + work + copy) / r.prefill_chunk), work, len(r.blocks), len(r.inflight), r.routed

    def submit(self, p: Pending) -> Replica | None:
        """The replica `p` goes to now, or None: it waits (`bind` hands it out later)."""
        p.seq = next(self._seq)
        room = [r for r in self.replicas if r.has_room]
        if self.queue or not room:
            self.queue.append(p)
            return None
        return self._dispatch(p, *self._best(p, room))

    def _dispatch(self, p: Pending, r: Replica, matched: int | None = None) -> Replica:
        m = r.matched_blocks(p.hashes) if matched is None else matched
        p.replica, p.work, p.prefill = r, self.work(r, p, m), float(self.prefill_tokens(r, p, m))
        r.inflight[p.rid] = p
        r.load += p.work
        r.routed += 1
        with r.lock:  # optimistic: confirmed (or corrected) by the replica's events
            r.blocks.update(p.hashes)
        return r

    def prefilled(self, p: Pending) -> None:
        """`p`'s first token arrived: its prompt is no longer work waiting on its replica (its decode is)."""
        r = p.replica
        if r is not None and p.rid in r.inflight and p.prefill > 0:
            r.load = max(0.0, r.load - p.prefill)
            p.work -= p.prefill
            p.prefill = 0.0

    def cancel(self, p: Pending) -> None:
        """`p` is abandoned: out of the queue, or its slot given back if it was already bound."""
        if p in self.queue:
            self.queue.remove(p)
        else:
            self.finish(p)

    def finish(self, p: Pending) -> None:
        r = p.replica
        if r is not None and r.inflight.pop(p.rid, None) is not None:
            r.load = max(0.0, r.load - p.work)

    def bind(self) -> list[tuple[Pending, Replica]]:
        """Waiting requests bound to replicas with room, as the module docstring says."""
        out = []
        while self.queue:
            room = [r for r in self.replicas if r.has_room]
            if not room:
                break
            pair = self._round_robin_pair(room) if self.policy == "round_robin" else self._cost_pair(room)
            if pair is None:
                break
            p, r = pair
            self.queue.remove(p)
            out.append((p, self._dispatch(p, r)))
        return out

    def _round_robin_pair(self, room: list[Replica]):
        p = self.queue[0]
        return p, self._best(p, room)[0]

    def _cost_pair(self, room: list[Replica]):
        """A free slot takes the waiting request it caches most of, among the first `window`, when it caches as
        much of it as any replica does (else that request is better off waiting for its holder); ties go to the
        oldest. A slot that suits nobody goes to the oldest request once it has been passed over `max_bypass`
        times; until then it stays free and the oldest's count grows (so nobody waits forever)."""
        oldest = self.queue[0]
        healthy = [r for r in self.replicas if r.healthy]
        best = []
        for q in self.queue[:self.window]:
            top = max(h.matched_blocks(q.hashes) for h in healthy)
            for r in room:
                m = r.matched_blocks(q.hashes)
                if m >= top:
                    best.append((-m, q.seq, q, r))
        if best:
            _, _, p, r = min(best, key=lambda t: (t[0], t[1]))
            if p is oldest or oldest.bypassed < self.max_bypass:
                if p is not oldest:
                    oldest.bypassed += 1
                return p, r
        if oldest.bypassed >= self.max_bypass:
            return oldest, self._best(oldest, room)[0]
        oldest.bypassed += 1
        return None

    def mark_down(self, r: Replica) -> None:
        r.healthy = False
        with r.lock:
            r.blocks.clear()
            r.host_blocks.clear()
            r.disk_blocks.clear()

    def mark_up(self, r: Replica) -> None:
        r.healthy = True

    def imbalance(self) -> tuple[int, float]:
        """(max, mean) requests in flight over the healthy replicas."""
        n = [len(r.inflight) for r in self.replicas if r.healthy] or [0]
        return max(n), sum(n) / len(n)
