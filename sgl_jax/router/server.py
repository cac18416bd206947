"""The router as an HTTP server in front of several sgl_jax workers (SGLang's native API).

    python -m sgl_jax.router --workers http://127.0.0.1:30001,http://127.0.0.1:30002 --model smollm2-135m \\
        [--policy cost|round_robin] [--max-inflight 8] [--port 30000]

Each worker is asked for its settings (`/get_server_info`: page size, `max_running_requests` as the default
`--max-inflight`, and its KV-event endpoint, `engine.cache.kv_events_endpoint`, whose host part is taken from the
worker's URL when it binds all interfaces); the router subscribes to those events (ZMQ) to mirror each worker's
cache, tokenizes prompts with the model's own tokenizer (`--model`, the same name or path as the workers'), and
routes by sgl_jax/router/policy.py. `POST /generate`, `/v1/completions` and `/v1/chat/completions` (a single prompt,
streamed or not) are routed; a batch is sent whole to the least loaded worker. `GET /v1/models`, `/get_model_info`
and `/get_server_info` are answered by a healthy worker (so OpenAI clients and SGLang's own frontend connect through
the router), `POST /flush_cache` goes to every healthy worker. `GET /health` is 200 while one worker is up;
`GET /router_stats` reports the routing, `GET /metrics` the same for Prometheus. Failures: a worker that cannot be
reached, or that drops a request before its first byte, is marked down and the request is retried once on another;
one that fails after bytes were sent ends the stream with an error event naming it (nothing is lost silently). Down
workers are probed every second and take traffic again once `/health` answers 200, with an empty mirror.
"""

import argparse
import asyncio
import itertools
import json
import logging
import threading
import time
import urllib.parse

from sgl_jax.router.policy import DEFAULT_COPY_WEIGHT, DEFAULT_INFLIGHT_FACTOR, Pending, Replica, Router
from sgl_jax.router.upstream import Pool, UpstreamError

log = logging.getLogger("sgl_jax.router")
INLINE_TOKENIZE_BYTES = 4096  # a body past this is tokenized in a thread


def public_endpoint(endpoint: str, host: str) -> str:
    """A ZMQ endpoint a subscriber can connect to: a bind-all address (``*``, ``0.0.0.0``) becomes ``host``."""
    proto, _, rest = endpoint.partition("://")
    h, _, port = rest.rpartition(":")
    return f"{proto}://{host if h in ('*', '0.0.0.0', '') else h}:{port}"


def _events_endpoint(worker_url: str, endpoint: str) -> str:
    return public_endpoint(endpoint, urllib.parse.urlparse(worker_url).hostname or "127.0.0.1")


def error_bytes(message: str, sse: bool, code: int = 502) -> bytes:
    """An error answer's body: one SSE error event then [DONE] when the answer was a stream, else the JSON."""
    err = json.dumps({"error": {"message": message, "code": code}})
    return (f"data: {err}\n\ndata: [DONE]\n\n" if sse else err).encode()


def _events_socket(replica: Replica, endpoint: str, topic: str):
    """A ZMQ SUB socket on `replica`'s KV-event stream, and a function applying one received message to its
    mirror."""
    import msgspec
    import zmq

    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.setsockopt_string(zmq.SUBSCRIBE, topic)
    decode = msgspec.msgpack.Decoder().decode

    def apply(frames) -> None:
        replica.apply(decode(frames[2])[1])  # (topic, sequence, payload)

    return sock, apply


def subscribe(replica: Replica, endpoint: str, topic: str, stop: threading.Event) -> threading.Thread:
    """A thread mirroring `replica`'s cache from its KV events until `stop` (for a front end whose event loop is
    not its own: the Ray request router; the HTTP router uses `subscribe_on_loop`)."""

    def run():
        sock, apply = _events_socket(replica, endpoint, topic)
        try:
            while not stop.is_set():
                if sock.poll(100):
                    apply(sock.recv_multipart())
        finally:
            sock.close(0)

    t = threading.Thread(target=run, name=f"sgl_jax-events-{replica.name}", daemon=True)
    t.start()
    return t


def subscribe_on_loop(replica: Replica, endpoint: str, topic: str, loop: asyncio.AbstractEventLoop,
                      batch: int = 64):
    """Mirror `replica`'s cache from its KV events on the router's own event loop (no thread: a subscriber thread
    takes the GIL from the loop at every event batch, a hand-off that waits for the OS to run it when the workers
    hold the cores). The socket's FD wakes the loop; at most `batch` messages are applied per wake-up before the
    loop gets its turn again. Returns the socket (close it to stop)."""
    import zmq

    sock, apply = _events_socket(replica, endpoint, topic)

    def drain():
        for _ in range(batch):
            if sock.closed or not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return  # (reading EVENTS also re-arms the FD's signal)
            try:
                apply(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
        loop.call_soon(drain)  # more waiting: after the loop's other callbacks

    loop.add_reader(sock.getsockopt(zmq.FD), drain)
    loop.call_soon(drain)  # the FD signals edges: anything queued before the reader was added
    return sock


class _Collector:
    """The router's state as Prometheus families, read when /metrics is scraped (prometheus_client's custom
    collector): per worker its state, requests routed and in flight, load and mirrored blocks; the router's queue,
    retries and failures."""

    def __init__(self, app: "RouterApp"):
        self.app = app

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        app, reps, p = self.app, self.app.router.replicas, "sgl_jax_router_"

        def per_worker(cls, name, help_, value):
            fam = cls(p + name, help_, labels=["worker"])
            for r in reps:
                fam.add_metric([r.name], value(r))
            return fam

        yield per_worker(GaugeMetricFamily, "worker_up", "1 while the worker takes traffic", lambda r: int(r.healthy))
        yield per_worker(CounterMetricFamily, "requests_routed", "requests sent to the worker", lambda r: r.routed)
        yield per_worker(GaugeMetricFamily, "inflight", "requests on the worker now", lambda r: len(r.inflight))
        yield per_worker(GaugeMetricFamily, "load_tokens", "prompt tokens the worker has yet to compute, as estimated",
                         lambda r: r.load)
        blocks = GaugeMetricFamily(p + "mirrored_blocks", "the worker's cached pages in the router's mirror, by medium",
                                   labels=["worker", "medium"])
        for r in reps:
            for medium, b in (("GPU", r.blocks), ("CPU", r.host_blocks), ("DISK", r.disk_blocks)):
                blocks.add_metric([r.name, medium], len(b))
        yield blocks
        yield GaugeMetricFamily(p + "queued", "requests waiting in the router for a worker", len(app.router.queue))
        yield CounterMetricFamily(p + "retried", "requests retried on another worker", app.retried)
        yield CounterMetricFamily(p + "failed", "requests failed with an error naming their worker", app.failed)


class RouterApp:
    """The router's state and its request path (one asyncio loop)."""

    def __init__(self, router: Router, tokenizer, http, pools: dict[str, Pool] | None = None):
        self.router, self.tokenizer, self.http = router, tokenizer, http  # http: aiohttp, for the health checks
        self.pools = pools if pools is not None else {r.name: Pool(r.url) for r in router.replicas}
        self.waiting: dict[str, asyncio.Future] = {}
        self.retried = self.failed = 0
        self.health_rounds = 0  # health-check rounds completed (router_stats: when the workers were last probed)
        from prometheus_client import CollectorRegistry, Histogram

        from sgl_jax.metrics import TTFT_BUCKETS

        self.registry = CollectorRegistry()  # /metrics: this router's own (several may live in one process)
        self.ttft = Histogram("sgl_jax_router_time_to_first_byte_seconds", "from a request's arrival to its answer's "
                              "first byte", buckets=TTFT_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(self))
        self._ids = itertools.count()
        from sgl_jax.cache.events import HashMemo

        self.hashes = HashMemo()  # prompts continue prefixes hashed before (a tenant's system prompt)

    def _pending(self, path: str, body: dict) -> Pending:
        from sgl_jax.cache.events import sequence_hashes
        from sgl_jax.router.prompt import routing_prompt

        ids, max_new = routing_prompt(path, body, self.tokenizer)  # (the worker validates the body)
        ps = self.router.replicas[0].page_size
        # the router's own id: a client's rid need not be unique among requests in flight
        return Pending(f"r{next(self._ids)}", sequence_hashes(ids, ps, memo=self.hashes), len(ids), max_new)

    async def acquire(self, p: Pending) -> Replica:
        r = self.router.submit(p)
        if r is not None:
            return r
        fut = asyncio.get_running_loop().create_future()
        self.waiting[p.rid] = fut
        try:
            return await fut
        except asyncio.CancelledError:  # the client left while it waited: give back what it holds
            self.waiting.pop(p.rid, None)
            self.router.cancel(p)
            self.rebind()
            raise

    def release(self, p: Pending) -> None:
        self.router.finish(p)
        self.rebind()

    def rebind(self) -> None:
        for q, r in self.router.bind():
            fut = self.waiting.pop(q.rid, None)
            if fut is not None and not fut.done():
                fut.set_result(r)
            else:  # its client is gone
                self.router.finish(q)

    def down(self, r: Replica, why: str) -> None:
        if r.healthy:
            log.warning("worker %s (%s) is down: %s", r.name, r.url, why)
        self.router.mark_down(r)

    async def health_loop(self) -> None:
        import aiohttp

        while True:
            for r in self.router.replicas:
                try:
                    async with self.http.get(r.url + "/health", timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                        ok = resp.status == 200
                except Exception:  # noqa: BLE001 - any failure means not serving
                    ok = False
                if ok and not r.healthy:
                    log.info("worker %s is back", r.name)
                    self.router.mark_up(r)
                    self.rebind()
                elif not ok and r.healthy:
                    self.down(r, "health check failed")
            self.health_rounds += 1
            await asyncio.sleep(1.0)


class _Collect:
    """A non-streamed answer gathered whole (`_forward`'s `out`)."""

    def __init__(self):
        self.parts: list[bytes] = []

    def feed(self, piece: bytes) -> bool:
        self.parts.append(piece)
        return False

    async def drained(self) -> None:
        pass

    async def write(self, piece: bytes) -> None:
        self.parts.append(piece)


async def _forward(app: RouterApp, path: str, body: dict, stream: bool, out, raw: bytes | None = None) -> None:
    """Route one request to `path` and relay its answer to `out` (see the module docstring for failures):
    `out.feed(piece)` is called from the worker connection's own callback as each piece arrives and returns true
    when the client is full (the worker's connection stops reading until `await out.drained()`); `await
    out.write(bytes)` sends an error message. `out` raises front.ClientGone once the client is gone. `raw`: the body
    as the client sent it, forwarded as is (`body` is its parse)."""
    from sgl_jax.router.front import ClientGone

    t0 = time.perf_counter()
    data = raw if raw is not None else json.dumps(body).encode()
    if len(data) > INLINE_TOKENIZE_BYTES:
        p = await asyncio.to_thread(app._pending, path, body)  # a long prompt: tokenized off the event loop
    else:  # a thread hop costs more than a short prompt's tokenization (2.3 ms median under a burst, measured)
        p = app._pending(path, body)
    for attempt in (0, 1):
        r = await app.acquire(p)
        pool = app.pools[r.name]
        sent = False
        conn = None

        def sink(piece: bytes) -> bool:
            nonlocal sent
            if not sent:
                sent = True
                app.ttft.observe(time.perf_counter() - t0)
                app.router.prefilled(p)
            return out.feed(piece)

        try:
            conn = await pool.post(path, data)
            try:
                await conn.relay(sink, out.drained)
            except UpstreamError as e:
                if not (e.before_response and conn.reused):
                    raise
                pool.release(conn)  # a kept connection the worker had closed while idle: once more, fresh
                conn = await pool.post(path, data, fresh=True)
                await conn.relay(sink, out.drained)
            app.release(p)
            return
        except (asyncio.CancelledError, ClientGone):  # the client went away: closing the upstream aborts it
            app.release(p)
            raise
        except (UpstreamError, OSError, asyncio.TimeoutError) as e:
            app.release(p)
            app.down(r, f"{type(e).__name__}: {e}")
            if sent or attempt == 1:
                app.failed += 1
                msg = f"worker {r.name} ({r.url}) failed{' mid-stream' if sent else ''}: {type(e).__name__}: {e}"
                await out.write(error_bytes(msg, stream))
                return
            app.retried += 1
            p.replica = None
        finally:
            if conn is not None:
                pool.release(conn)  # kept when its answer was read to the end, else closed


async def open_connections(pools: dict[str, Pool], replicas: list[Replica], per_worker: int = 16) -> None:
    """Open up to `per_worker` kept connections to each worker before serving, so a burst right after start does
    not wait for its TCP connects one request at a time on the event loop."""
    await asyncio.gather(*(pools[r.name].open_idle(min(r.max_inflight, per_worker)) for r in replicas))


async def _generate(app: RouterApp, req, resp) -> None:
    """A routed POST (/generate or an OpenAI route): its prompt routed, the worker's answer relayed."""
    try:
        body = req.json()
    except ValueError as e:
        return resp.send_json(400, {"error": {"message": f"the body is not JSON: {e}", "code": 400}})
    if not isinstance(body, dict):
        return resp.send_json(400, {"error": {"message": "the body must be a JSON object", "code": 400}})
    if body.get("stream"):
        await _forward(app, req.path, body, True, resp, req.body)  # the head goes out with the first piece
        return resp.end()
    got = _Collect()
    await _forward(app, req.path, body, False, got, req.body)
    data = b"".join(got.parts)
    try:
        out = json.loads(data)
    except ValueError:
        return resp.send_json(502, {"error": {"message": "bad reply from worker", "code": 502}})
    status = 200
    if isinstance(out, dict) and isinstance(out.get("error"), dict):
        status = int(out["error"].get("code", 400))
    resp.send(status, data)  # the worker's own bytes


async def _from_worker(app: RouterApp, req, resp) -> None:
    """A GET any worker answers alike (the model, its settings): the first healthy one's answer, as it is."""
    import aiohttp

    for r in [r for r in app.router.replicas if r.healthy]:
        try:
            async with app.http.get(r.url + req.path, timeout=aiohttp.ClientTimeout(total=30)) as got:
                return resp.send(got.status, await got.read(),
                                 got.headers.get("Content-Type", "application/json").encode())
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            app.down(r, f"{type(e).__name__}: {e}")
    resp.send_json(503, {"error": {"message": "no worker is up", "code": 503}})


async def _flush_cache(app: RouterApp, req, resp) -> None:
    """Every healthy worker flushes its cache (the mirrors follow from their events); 200 when all did."""
    import aiohttp

    async def one(r):
        try:
            async with app.http.post(r.url + "/flush_cache", timeout=aiohttp.ClientTimeout(total=60)) as got:
                return r.name, got.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return r.name, f"{type(e).__name__}: {e}"

    done = await asyncio.gather(*(one(r) for r in app.router.replicas if r.healthy))
    ok = bool(done) and all(st == 200 for _, st in done)
    resp.send_json(200 if ok else 502, {"workers": {name: st for name, st in done}})


async def _health(app: RouterApp, req, resp) -> None:
    up = [r.name for r in app.router.replicas if r.healthy]
    resp.send_json(200 if up else 503, {"workers_up": up})


async def _stats(app: RouterApp, req, resp) -> None:
    mx, mean = app.router.imbalance()
    resp.send_json(200, {
        "policy": app.router.policy, "queued": len(app.router.queue), "retried": app.retried,
        "failed": app.failed, "inflight_max": mx, "inflight_mean": mean, "health_rounds": app.health_rounds,
        "workers": [{"name": r.name, "url": r.url, "healthy": r.healthy, "inflight": len(r.inflight),
                     "routed": r.routed, "load": r.load, "blocks": len(r.blocks), "host_blocks": len(r.host_blocks),
                     "disk_blocks": len(r.disk_blocks)} for r in app.router.replicas]})


async def _metrics(app: RouterApp, req, resp) -> None:
    """Prometheus' text format: the router's state (`_Collector`) and its time-to-first-byte histogram."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    resp.send(200, generate_latest(app.registry), CONTENT_TYPE_LATEST.encode())


ROUTES = {"/generate": (("POST",), _generate), "/v1/completions": (("POST",), _generate),
          "/v1/chat/completions": (("POST",), _generate), "/v1/models": (("GET",), _from_worker),
          "/get_model_info": (("GET",), _from_worker), "/get_server_info": (("GET",), _from_worker),
          "/flush_cache": (("GET", "POST"), _flush_cache), "/health": (("GET",), _health),
          "/router_stats": (("GET",), _stats), "/metrics": (("GET",), _metrics)}


def build_handler(app: RouterApp):
    """The router's answers for sgl_jax/router/front.py to serve: `ROUTES` (see the module docstring)."""

    async def handle(req, resp) -> None:
        route = ROUTES.get(req.path)
        if route is None:
            return resp.send_json(404, {"error": {"message": f"no route {req.path}", "code": 404}})
        methods, fn = route
        if req.method not in methods:
            return resp.send_json(405, {"error": {"message": f"{req.path} takes {' or '.join(methods)}, not "
                                                             f"{req.method}", "code": 405}})
        await fn(app, req, resp)

    return handle


def main(argv=None) -> None:
    import requests

    from sgl_jax.models.hub import resolve_model
    from sgl_jax.models.tokenizer import Tokenizer
    from sgl_jax.router.front import Server
    from sgl_jax.router.prompt import warm_up

    ap = argparse.ArgumentParser(prog="python -m sgl_jax.router", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", required=True, help="comma-separated worker URLs")
    ap.add_argument("--model", default="smollm2-135m", help="the workers' model (for its tokenizer)")
    ap.add_argument("--policy", default="cost", choices=("cost", "round_robin"))
    ap.add_argument("--max-inflight", type=int, default=0,
                    help="requests per worker at once before requests wait in the router (0: twice its batch size)")
    ap.add_argument("--decode-weight", type=float, default=0.0, help="load per output token (0: decode is batched)")
    ap.add_argument("--max-bypass", type=int, default=4)
    ap.add_argument("--copy-weight", type=float, default=DEFAULT_COPY_WEIGHT,
                    help="cost of recomputing, per token, a prefix another worker caches, on top of computing it "
                         "(the room its second copy takes)")
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="prompt tokens a worker prefills per step, for the cost estimate (0: its max_prefill_tokens)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    a = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = resolve_model(a.model)
    tok = Tokenizer.from_path(path)
    warm_up(tok)  # before /health answers: the first burst does not wait for imports
    replicas, events = [], []
    for i, url in enumerate(u.rstrip("/") for u in a.workers.split(",")):
        info = requests.get(url + "/get_server_info", timeout=30).json()
        cache = info["cache"]
        sched = info["scheduler"]
        r = Replica(f"w{i}", url, a.max_inflight or DEFAULT_INFLIGHT_FACTOR * sched["max_running_requests"],
                    cache["page_size"],
                    a.prefill_chunk or sched["max_prefill_tokens"])
        if cache.get("kv_events_endpoint"):
            events.append((r, _events_endpoint(url, cache["kv_events_endpoint"]), cache.get("kv_events_topic", "")))
        else:
            log.warning("worker %s publishes no KV events: the router mirrors only what it sent there", url)
        replicas.append(r)
    async def serve():
        import aiohttp

        loop = asyncio.get_running_loop()
        for r, endpoint, topic in events:
            subscribe_on_loop(r, endpoint, topic, loop)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))  # the health checks
        pools = {r.name: Pool(r.url) for r in replicas}  # the forwarded requests (sgl_jax/router/upstream.py)
        await open_connections(pools, replicas)
        app = RouterApp(Router(replicas, a.policy, a.decode_weight, a.max_bypass, copy_weight=a.copy_weight), tok, http,
                        pools)
        await loop.create_server(Server(build_handler(app)), a.host, a.port, reuse_address=True)
        log.info("routing %d workers on http://%s:%d (%s)", len(replicas), a.host, a.port, a.policy)
        await app.health_loop()

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve())
