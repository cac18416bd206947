"""Our routing policy as Ray Serve's pluggable request router (`RequestRouterConfig.request_router_class`).

Ray Serve asks `choose_replicas` for each request it has to place, as often as it likes (it backs off and asks
again while the answer is empty). The decision is sgl_jax/router/policy.py's, the same as the standalone
router's: the first time a request is seen it is `submit`ted (bound at once to the replica with the fewest
estimated prefill steps, or queued when every replica holds `max_inflight` requests); a queued request is bound
by `bind` when a slot frees (late binding, bounded bypass). Until bound, the answer is empty: the request waits
in Ray's router, not in a replica's queue.

Each replica's cache is mirrored from its KV events: a replica reports its ZMQ endpoint in its routing stats
(`record_routing_stats`, sgl_jax/serve/ray_app.py) and the router subscribes once it sees it. Replicas that
leave (died, replaced) lose their mirror and their requests; the ones Ray starts in their place start empty.

Request arguments: the handle is called with one dict whose "route" entry holds the prompt's token ids and
max_new_tokens (sgl_jax/router/prompt.py computes them in the gateway). `registry.prefilled(route_rid)` -- called
by the gateway when a request's first byte arrives, in the same process -- takes its prompt off its replica's load.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from sgl_jax.router import registry
from sgl_jax.router.policy import Pending, Replica, Router


class CostRequestRouter(RequestRouter):
    """See the module docstring. Options (request_router_kwargs): policy ("cost" | "round_robin"), page_size,
    prefill_chunk, max_inflight, decode_weight, max_bypass, copy_weight."""

    def initialize_state(self, policy: str = "cost", page_size: int = 16, prefill_chunk: int = 256,
                         max_inflight: int = 8, decode_weight: float = 0.0, max_bypass: int = 4,
                         copy_weight: float = 0.0, **_: Any):
        self._lock = threading.Lock()
        self._page_size, self._prefill_chunk, self._max_inflight = int(page_size), int(prefill_chunk), int(max_inflight)
        # the replicas arrive with Ray's first update (update_replicas) or request (choose_replicas)
        self._router = Router([], policy, decode_weight, max_bypass, copy_weight=copy_weight)
        self._mirrors: dict[Any, Replica] = {}  # ReplicaID -> Replica
        self._subscribed: dict[Any, threading.Event] = {}  # ReplicaID -> stop event of its subscriber
        self._pending: dict[str, Pending] = {}  # internal request id -> Pending
        self._requests: dict[str, PendingRequest] = {}
        self._by_route: dict[str, Pending] = {}  # the gateway's route rid -> Pending
        self.retired = 0
        from sgl_jax.cache.events import HashMemo

        self._hashes = HashMemo()  # prompts continue prefixes hashed before
        registry.register(self)

    @property
    def max_num_routing_tasks(self) -> int:
        # one task per waiting request (up to Ray's cap) so the late-binding queue sees them all
        return self.max_num_routing_tasks_cap

    # -- replicas -----------------------------------------------------------------------------------

    def _sync(self, candidates: list[RunningReplica]) -> None:
        """Mirror the candidates Ray currently routes to; forget the ones that left (their requests are
        finished here; Ray fails or retries them)."""
        from sgl_jax.router.server import subscribe

        ids = {c.replica_id for c in candidates}
        for rid in [k for k in self._mirrors if k not in ids]:
            gone = self._mirrors.pop(rid)
            self._router.mark_down(gone)
            for p in list(gone.inflight.values()):
                self._router.finish(p)
            stop = self._subscribed.pop(rid, None)
            if stop is not None:
                stop.set()
            self.retired += 1
        for c in candidates:
            r = self._mirrors.get(c.replica_id)
            if r is None:
                r = self._mirrors[c.replica_id] = Replica(c.replica_id.unique_id, "", self._max_inflight,
                                                          self._page_size, self._prefill_chunk)
            stats = c.routing_stats or {}
            endpoint = stats.get("kv_events_endpoint")
            if endpoint and c.replica_id not in self._subscribed:
                stop = self._subscribed[c.replica_id] = threading.Event()
                subscribe(r, endpoint, stats.get("kv_events_topic", ""), stop)
            r.pid = stats.get("pid", r.pid)
        self._router.replicas = [self._mirrors[c.replica_id] for c in candidates]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray's new set of running replicas (and their routing stats): mirrored at once, not at the next request."""
        super().update_replicas(replicas)
        with self._lock:
            self._sync(list(replicas))

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        with self._lock:
            r = self._mirrors.get(replica_id)
            if r is not None:
                self._router.mark_down(r)

    # -- requests -----------------------------------------------------------------------------------

    def _new_pending(self, key: str, pr: PendingRequest) -> Pending:
        from sgl_jax.cache.events import sequence_hashes

        route = pr.args[0].get("route") if pr.args and isinstance(pr.args[0], dict) else None
        ids, max_new = (route.get("ids") or [], route.get("max_new", 128)) if isinstance(route, dict) else ([], 128)
        p = Pending(key, sequence_hashes(ids, self._page_size, memo=self._hashes), len(ids), int(max_new))
        if isinstance(route, dict) and route.get("rid"):
            p.route_rid = str(route["rid"])
            self._by_route[p.route_rid] = p
        return p

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None:  # Ray probing without a request: any replica will do
            return [candidate_replicas]
        route = pending_request.args[0].get("route") if pending_request.args and isinstance(
            pending_request.args[0], dict) else None
        pin = route.get("replica") if isinstance(route, dict) else None
        if pin:  # the client named the replica (x-sgl-jax-replica): no routing, no slot
            return [[c for c in candidate_replicas if c.replica_id.unique_id == pin]]
        key = pending_request.metadata.internal_request_id
        with self._lock:
            self._sync(candidate_replicas)
            self._drop_abandoned()
            p = self._pending.get(key)
            if p is None or (p.replica is not None and p.replica not in self._router.replicas):
                p = self._pending[key] = self._new_pending(key, pending_request)
                self._requests[key] = pending_request
                self._router.submit(p)
            self._router.bind()
            r = p.replica
        if r is None:
            return []  # it waits for a slot (Ray asks again after its backoff)
        by_name = {c.replica_id.unique_id: c for c in candidate_replicas}
        return [[by_name[r.name]]] if r.name in by_name else []

    def _drop_abandoned(self) -> None:
        for key, pr in list(self._requests.items()):
            if pr.future.cancelled():
                self._forget(key, cancel=True)

    def _forget(self, key: str, cancel: bool = False) -> None:
        p = self._pending.pop(key, None)
        self._requests.pop(key, None)
        if p is None:
            return
        self._by_route.pop(p.route_rid, None)
        if cancel:
            self._router.cancel(p)
        else:
            self._router.finish(p)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        with self._lock:
            self._forget(internal_request_id)
            self._router.bind()

    def prefilled(self, route_rid: str) -> None:
        with self._lock:
            p = self._by_route.get(route_rid)
            if p is not None:
                self._router.prefilled(p)

    def snapshot(self) -> dict:
        with self._lock:
            mx, mean = self._router.imbalance()
            return {"policy": self._router.policy, "queued": len(self._router.queue), "inflight_max": mx,
                    "inflight_mean": mean, "replicas_retired": self.retired, "at": time.time(),
                    "replicas": [{"id": r.name, "pid": r.pid, "healthy": r.healthy,
                                  "inflight": len(r.inflight), "routed": r.routed, "load": r.load,
                                  "blocks": len(r.blocks), "host_blocks": len(r.host_blocks),
                                  "disk_blocks": len(r.disk_blocks)}
                                 for r in self._router.replicas]}
