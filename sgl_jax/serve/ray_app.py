"""Data-parallel replicas as a Ray Serve application: N engines behind one endpoint, routed by our policy.

    python -m sgl_jax.serve --config configs/smollm2-135m.yaml --replicas 2      # starts Ray on this machine
    RAY_ADDRESS=auto python -m sgl_jax.serve --config ... --replicas 8           # on a running Ray cluster
    serve run sgl_jax.serve.ray_app:build config=configs/smollm2-135m.yaml replicas=2

Two deployments:
- `EngineReplica` (N replicas; `--ray-actor-options` for its resources, e.g. '{"num_gpus": 1}' or
  '{"resources": {"TPU": 4}}'): one Engine each and the whole HTTP API of sgl_jax/serve/server.py, called
  in-process over ASGI (`handle`), so every route behaves exactly as on a single server. Each replica publishes its
  cache's KV events on a ZMQ port of its own and reports it in its routing stats; its health check is the engine's
  (a dead engine loop fails it, and Ray replaces the replica).
- `Gateway` (one, no resources): Ray's HTTP proxy hands it every request; it computes the prompt's token ids for
  the routing decision (sgl_jax/router/prompt.py), calls a replica through a handle whose request router is ours
  (sgl_jax/router/ray_router.py: estimated prefill steps from mirrored caches, late binding), and streams the
  answer back, with the replica's id in an `x-sgl-jax-replica` header. `GET /router_stats` shows the router's
  view of each replica (pid, requests in flight and routed, load, mirrored blocks) and the gateway's retries.
  Routes about one server (`/metrics`, `/get_server_info`, `/flush_cache`, `/health`) answer from whichever
  replica the request reached (the header says which); a request carrying `x-sgl-jax-replica: <id>` goes to that
  replica (ids in /router_stats; 404 for one that is not running).

Faults: a replica that dies before a request's first body byte -> the request is sent once more (to another
replica, the dead one being out of Ray's set); after bytes were sent -> the stream ends with an error event
naming the replica (`{"error": {"message": ..., "code": 502}}`, then `data: [DONE]` when it was SSE). Ray starts
a replacement; the router mirrors it from empty once it is running.

Ray is an optional extra (`pip install sgl_jax[ray]`); the single-node server does not import this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from typing import Any, AsyncIterator

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from sgl_jax.config import Config
from sgl_jax.router.policy import DEFAULT_COPY_WEIGHT, DEFAULT_INFLIGHT_FACTOR
from sgl_jax.router.server import error_bytes, public_endpoint

log = logging.getLogger("sgl_jax.serve.ray")

ROUTER_CLASS = "sgl_jax.router.ray_router.CostRequestRouter"
_HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


async def asgi_call(app, req: dict) -> AsyncIterator[Any]:
    """Run one HTTP request through the ASGI `app` in this process: yields {"status", "headers"} first, then the
    body's chunks (bytes). Closing the iterator early tells the app the client left (http.disconnect)."""
    q: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": req.get("body") or b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        await q.put(msg)

    query = req.get("query") or ""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req["method"],
             "scheme": "http", "path": req["path"], "raw_path": req["path"].encode(), "root_path": "",
             "query_string": query.encode() if isinstance(query, str) else query,
             "headers": [(bytes(k), bytes(v)) for k, v in req.get("headers") or []],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda t: q.put_nowait(None))
    try:
        while True:
            msg = await q.get()
            if msg is None:
                if task.exception() is not None:
                    raise task.exception()
                return
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"], "headers": [(k, v) for k, v in msg.get("headers", [])
                                                            if bytes(k).lower() not in _HOP_HEADERS]}
            elif msg["type"] == "http.response.body":
                body, more = msg.get("body") or b"", msg.get("more_body", False)
                while more and not q.empty():  # coalesce what is already there: one message per hop, not per token
                    nxt = q.get_nowait()
                    if nxt is None or nxt["type"] != "http.response.body":
                        q.put_nowait(nxt)
                        break
                    body, more = body + (nxt.get("body") or b""), nxt.get("more_body", False)
                if body:
                    yield body
                if not more:
                    return
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the app's own error handling ran already
                task.cancel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _with_events_endpoint(cfg: Config, endpoint: str) -> Config:
    cache = dataclasses.replace(cfg.engine.cache, kv_events_endpoint=endpoint)
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, cache=cache))


class EngineReplica:
    """One engine and the server's API, in a Ray actor (see the module docstring)."""

    def __init__(self, config: Config):
        from sgl_jax.engine import Engine
        from sgl_jax.metrics import Metrics
        from sgl_jax.serve.server import create_app

        logging.basicConfig(level=config.server.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        stats: dict[str, Any] = {"pid": os.getpid()}
        if not config.engine.cache.disable_radix_cache:
            endpoint = config.engine.cache.kv_events_endpoint
            if not endpoint:
                endpoint = f"tcp://*:{_free_port()}"
                config = _with_events_endpoint(config, endpoint)
            stats.update(kv_events_endpoint=public_endpoint(endpoint, ray.util.get_node_ip_address()),
                         kv_events_topic=config.engine.cache.kv_events_topic)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests construct it directly)
            self.replica_id = f"local-{os.getpid()}"
        stats["replica"] = self.replica_id
        metrics = Metrics()
        self.engine = Engine(config.engine, metrics=metrics)
        self.app = create_app(self.engine, config.server, metrics)
        self.stats = stats

    def record_routing_stats(self) -> dict:
        return self.stats

    def check_health(self) -> None:
        ok, why = self.engine.health()
        if not ok:
            raise RuntimeError(f"replica {self.replica_id}: {why}")

    async def handle(self, req: dict) -> AsyncIterator[Any]:
        first = True
        async for part in asgi_call(self.app, req):
            if first:
                part = {**part, "replica": self.replica_id}
                first = False
            yield part

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _replica_failure(e: BaseException) -> bool:
    from ray import exceptions as rex

    return isinstance(e, (rex.RayActorError, rex.ActorUnavailableError))


class Gateway:
    """The HTTP entry: routes each request to a replica through our request router (module docstring)."""

    def __init__(self, replicas, config: Config):
        from sgl_jax.models.hub import resolve_model
        from sgl_jax.models.tokenizer import Tokenizer
        from sgl_jax.router.prompt import warm_up

        self.tokenizer = Tokenizer.from_path(resolve_model(config.engine.model))
        warm_up(self.tokenizer)  # the parsing's imports now, not inside the first requests
        self.replicas = replicas.options(stream=True)
        self.retried = self.failed = 0

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        from sgl_jax.router import registry
        from sgl_jax.router.prompt import ROUTED_PATHS, routing_prompt

        path = request.url.path
        if path == "/router_stats":
            return JSONResponse({"routers": registry.snapshot(), "retried": self.retried, "failed": self.failed})
        pin = request.headers.get("x-sgl-jax-replica")
        known = {r["id"] for snap in registry.snapshot() for r in snap["replicas"]} if pin else set()
        if known and pin not in known:
            return JSONResponse({"error": {"message": f"x-sgl-jax-replica: no running replica {pin!r}; running: "
                                                      f"{', '.join(sorted(known))}", "code": 404}}, status_code=404)
        body = await request.body()
        route: dict[str, Any] = {"rid": uuid.uuid4().hex, "ids": [], "max_new": 128,
                                 "replica": pin}
        if request.method == "POST" and path in ROUTED_PATHS:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            route["ids"], route["max_new"] = await asyncio.to_thread(routing_prompt, path, parsed, self.tokenizer)
        req = {"method": request.method, "path": path, "query": request.url.query,
               "headers": [(k, v) for k, v in request.headers.raw if k.lower() not in _HOP_HEADERS | {b"host"}]
               + [(b"content-length", str(len(body)).encode())], "body": body, "route": route}
        return await self._send(req, route["rid"])

    async def _send(self, req: dict, route_rid: str):
        from starlette.responses import StreamingResponse

        from sgl_jax.router import registry

        for attempt in (0, 1):
            gen = self.replicas.handle.remote(req)
            try:
                head = await gen.__anext__()
                first = await anext(gen, b"")
            except Exception as e:  # noqa: BLE001 - sorted below
                if _replica_failure(e) and attempt == 0:
                    log.warning("a replica failed before answering (%s); sending the request once more",
                                type(e).__name__)
                    self.retried += 1
                    continue
                self.failed += 1
                return _plain_error(f"no replica answered: {type(e).__name__}: {e}")
            registry.prefilled(route_rid)
            sse = any(k.lower() == b"content-type" and b"event-stream" in v for k, v in head["headers"])
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head["headers"]}
            headers["x-sgl-jax-replica"] = head["replica"]
            return StreamingResponse(self._rest(gen, first, head["replica"], sse), status_code=head["status"],
                                     headers=headers)

    async def _rest(self, gen, first: bytes, replica: str, sse: bool) -> AsyncIterator[bytes]:
        if first:
            yield first
        try:
            async for chunk in gen:
                yield chunk
        except Exception as e:  # noqa: BLE001 - the replica died mid-answer: say so instead of truncating silently
            self.failed += 1
            log.warning("replica %s failed mid-stream: %s", replica, e)
            yield error_bytes(f"replica {replica} failed mid-stream: {type(e).__name__}: {e}", sse)


def _plain_error(message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "code": 502}}, status_code=502)


def build_app(config: Config, replicas: int, *, policy: str = "cost", router_options: dict | None = None,
              actor_options: dict | None = None, health_check_period_s: float = 2.0):
    """The Serve application (Gateway over `replicas` EngineReplicas). `policy` "cost" or "round_robin" (ours,
    with `router_options` for sgl_jax/router/policy.py), or "ray_pow2": Ray Serve's default router, to compare."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    sched = config.engine.scheduler
    opts = {"policy": policy, "page_size": config.engine.cache.page_size, "prefill_chunk": sched.max_prefill_tokens,
            "max_inflight": DEFAULT_INFLIGHT_FACTOR * sched.max_running_requests, "copy_weight": DEFAULT_COPY_WEIGHT}
    opts.update({k: v for k, v in (router_options or {}).items() if v is not None})
    inflight = int(opts["max_inflight"])
    if policy == "ray_pow2":
        router = RequestRouterConfig(request_routing_stats_period_s=1.0)
    else:
        router = RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_router_kwargs=opts, request_routing_stats_period_s=1.0,
            initial_backoff_s=0.002, backoff_multiplier=1.5, max_backoff_s=0.05)
    engines = serve.deployment(EngineReplica, name="EngineReplica", num_replicas=replicas,
                               max_ongoing_requests=inflight + 4,  # our router binds at `inflight`; the rest is
                               health_check_period_s=health_check_period_s,  # for Ray's own calls
                               health_check_timeout_s=60.0, graceful_shutdown_timeout_s=10.0,
                               ray_actor_options=actor_options if actor_options is not None else {"num_cpus": 1},
                               request_router_config=router)
    gateway = serve.deployment(Gateway, name="Gateway", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0})
    return gateway.bind(engines.bind(config), config)


def build(args: dict):
    """`serve run sgl_jax.serve.ray_app:build config=PATH replicas=N [policy=cost] [set="a.b=1 c.d=2"]`."""
    import shlex

    from sgl_jax.config import load_config
    from sgl_jax.serve.__main__ import _parse_set

    overrides = dict(_parse_set(item) for item in shlex.split(args.get("set", "")))
    cfg = load_config(args.get("config"), overrides)
    return build_app(cfg, int(args.get("replicas", 1)), policy=args.get("policy", "cost"),
                     actor_options=json.loads(args["ray_actor_options"]) if "ray_actor_options" in args else None)


def run(config: Config, replicas: int, *, policy: str = "cost", actor_options: dict | None = None,
        router_options: dict | None = None) -> None:
    """`python -m sgl_jax.serve ... --replicas N`: Ray (a local one unless RAY_ADDRESS names a cluster), the
    application on server.host:server.port, until interrupted."""
    logging.basicConfig(level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, namespace="sgl_jax",
                 log_to_driver=True)
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    t0 = time.perf_counter()
    serve.run(build_app(config, replicas, policy=policy, actor_options=actor_options, router_options=router_options),
              name="sgl_jax",
              route_prefix="/", blocking=False)
    print(f"sgl_jax: {replicas} replicas ready in {time.perf_counter() - t0:.1f} s; serving on "
          f"http://{config.server.host}:{config.server.port} (Ray Serve, policy {policy})", flush=True)
    import signal

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
