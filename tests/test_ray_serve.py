"""Replicas as a Ray Serve application (sgl_jax/serve/ray_app.py) routed by our request router
(sgl_jax/router/ray_router.py): the router's decisions against Ray's interface, then the whole application
started as a user would (`python -m sgl_jax.serve --replicas 2`) on the tiny model, and a replica process
killed mid-answer."""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types

import pytest
import requests

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from helpers import SUITE_CACHE
from sgl_jax.cache.events import sequence_hashes
from sgl_jax.models.testing import write_tiny_gguf
from sgl_jax.router import registry
from sgl_jax.router.ray_router import CostRequestRouter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEP = DeploymentID("EngineReplica", "sgl_jax")
PREFIX = list(range(10, 42))  # 8 pages of 4


# ------------------------------------------------------------------------------- the router, driven as Ray does
def _candidates(n):
    return [types.SimpleNamespace(replica_id=ReplicaID(f"r{i}", DEP), routing_stats={"pid": 100 + i})
            for i in range(n)]


def _pr(key, ids, max_new=8, rid=None):
    meta = RequestMetadata(request_id=key, internal_request_id=key)
    return PendingRequest(args=[{"route": {"rid": rid or key, "ids": ids, "max_new": max_new}}], kwargs={},
                          metadata=meta, future=asyncio.get_running_loop().create_future())


def _router(max_inflight=1, policy="cost"):
    r = CostRequestRouter(DEP, DeploymentHandleSource.UNKNOWN)
    r.initialize_state(policy=policy, page_size=4, prefill_chunk=64, max_inflight=max_inflight)
    return r


async def _choose(router, cands, pr):
    ranks = await router.choose_replicas(cands, pr)
    return [c.replica_id.unique_id for c in ranks[0]] if ranks else None


@pytest.mark.timeout(60)
def test_ray_router_binds_late_and_follows_the_cache():
    async def go():
        cands = _candidates(2)
        router = _router(max_inflight=1)
        a = _pr("a", PREFIX + [1])
        assert await _choose(router, cands, a) == ["r0"]
        # r0 is full (max_inflight 1) and the router's queue is empty: b goes to r1 at once
        b = _pr("b", [7] * 12)
        assert await _choose(router, cands, b) == ["r1"]
        # both full: c and d wait in the router (empty answers) -- not in a replica's queue
        c = _pr("c", PREFIX + [2])
        d = _pr("d", [9] * 12)
        assert await _choose(router, cands, c) is None and await _choose(router, cands, d) is None
        assert await _choose(router, cands, c) is None  # asked again after Ray's backoff: still waiting
        # b finishes on r1: the freed slot takes d (c is better off waiting for r0, which holds its prefix)
        router.on_request_completed(ReplicaID("r1", DEP), "b")
        assert await _choose(router, cands, d) == ["r1"]
        assert await _choose(router, cands, c) is None
        router.on_request_completed(ReplicaID("r0", DEP), "a")
        assert await _choose(router, cands, c) == ["r0"]
        snap = router.snapshot()
        assert [(s["id"], s["pid"], s["inflight"]) for s in snap["replicas"]] == [("r0", 100, 1), ("r1", 101, 1)]
        assert snap["queued"] == 0
        # the first byte of c arrives: its prompt leaves r0's load (the gateway calls this through the registry)
        assert snap["replicas"][0]["load"] > 0
        registry.prefilled("c")
        assert router.snapshot()["replicas"][0]["load"] == 0

    asyncio.run(go())


@pytest.mark.timeout(60)
def test_ray_router_forgets_cancelled_requests_and_replicas_that_leave():
    async def go():
        cands = _candidates(2)
        router = _router(max_inflight=1)
        a, b = _pr("a", [1] * 8), _pr("b", [2] * 8)
        assert await _choose(router, cands, a) == ["r0"] and await _choose(router, cands, b) == ["r1"]
        c, d = _pr("c", [3] * 8), _pr("d", [4] * 8)
        assert await _choose(router, cands, c) is None and await _choose(router, cands, d) is None
        c.future.cancel()  # its client left while it waited: it must not hold the queue's head
        router.on_request_completed(ReplicaID("r0", DEP), "a")
        assert await _choose(router, cands, d) == ["r0"]
        assert router.snapshot()["queued"] == 0
        # r1 dies (Ray drops it from the candidates): b's slot is gone with it, and a new replica r2 is mirrored
        # from empty; a request Ray retries after the failure is placed again
        cands2 = [cands[0], _candidates(3)[2]]
        e = _pr("e", [5] * 8)
        assert await _choose(router, cands2, e) == ["r2"]
        snap = router.snapshot()
        assert [s["id"] for s in snap["replicas"]] == ["r0", "r2"] and snap["replicas_retired"] == 1
        router.on_request_completed(ReplicaID("r2", DEP), "e")
        f = _pr("f", [6] * 8)
        assert await _choose(router, cands2, f) == ["r2"]  # r0 is still busy with d

    asyncio.run(go())


@pytest.mark.timeout(60)
def test_ray_router_mirrors_kv_events_and_prefers_the_holder():
    async def go():
        cands = _candidates(2)
        router = _router(max_inflight=4)
        await _choose(router, cands, _pr("warm", [0] * 4))  # the first call mirrors the candidates
        router._mirrors[cands[1].replica_id].apply(
            [["BlockStored", sequence_hashes(PREFIX, 4), None, PREFIX, 4, None, "GPU", None]])
        assert await _choose(router, cands, _pr("x", PREFIX + [3])) == ["r1"]
        pinned = _pr("p", PREFIX)
        pinned.args[0]["route"]["replica"] = "r0"  # x-sgl-jax-replica: r0, against the cache; takes no slot
        assert await _choose(router, cands, pinned) == ["r0"]
        assert router.snapshot()["replicas"][0]["inflight"] == 1  # only "warm"
        rr = _router(max_inflight=4, policy="round_robin")
        got = [await _choose(rr, cands, _pr(f"y{i}", PREFIX)) for i in range(4)]
        assert got == [["r0"], ["r1"], ["r0"], ["r1"]]

    asyncio.run(go())


# ------------------------------------------------------------------------------- the gateway's retry, driven alone
class _Handle:
    """Stands for `replicas.options(stream=True).handle`: each `remote` call answers with the next scripted
    outcome, an exception raised before the first item or the items of an answer."""

    def __init__(self, *outcomes):
        self.outcomes, self.calls = list(outcomes), 0

    def remote(self, req):
        outcome = self.outcomes[self.calls]
        self.calls += 1

        async def gen():
            if isinstance(outcome, BaseException):
                raise outcome
            for item in outcome:
                yield item

        return gen()


def _gateway(*outcomes):
    from sgl_jax.serve.ray_app import Gateway

    g = Gateway.__new__(Gateway)  # no tokenizer needed: _send is given a routed request
    g.replicas, g.retried, g.failed = types.SimpleNamespace(handle=_Handle(*outcomes)), 0, 0
    return g


async def _body(resp):
    return b"".join([c async for c in resp.body_iterator]) if hasattr(resp, "body_iterator") else resp.body


@pytest.mark.timeout(60)
def test_gateway_sends_a_request_once_more_when_its_replica_dies_before_the_first_byte():
    from ray import exceptions as rex

    answer = [{"status": 200, "headers": [(b"content-type", b"application/json")], "replica": "r1"}, b'{"ok"', b":1}"]

    async def go():
        g = _gateway(rex.ActorDiedError(), answer)
        resp = await g._send({}, "rid")
        assert (resp.status_code, resp.headers["x-sgl-jax-replica"], await _body(resp)) == (200, "r1", b'{"ok":1}')
        assert (g.retried, g.failed, g.replicas.handle.calls) == (1, 0, 2)
        # the second replica dies too: one retry only, then a 502 that names the failure
        g = _gateway(rex.ActorDiedError(), rex.ActorUnavailableError("replica unreachable", None))
        resp = await g._send({}, "rid")
        assert resp.status_code == 502 and b"no replica answered: ActorUnavailableError" in await _body(resp)
        assert (g.retried, g.failed) == (1, 1)
        # a failure that is not the replica's (a bug, a bad answer) is not sent again
        g = _gateway(ValueError("bad head"), answer)
        resp = await g._send({}, "rid")
        assert resp.status_code == 502 and b"ValueError: bad head" in await _body(resp)
        assert (g.retried, g.failed, g.replicas.handle.calls) == (0, 1, 1)

    asyncio.run(go())


# ------------------------------------------------------------------------------- the application end to end
SMALL = ("page_size=4 max_context_len=256 max_running_requests=4 max_prefill_tokens=64 prefill_block=8 "
         "decode_buckets=1,4 prefill_block_buckets=2,8 max_mixed_blocks=2 page_width_buckets=64 kv_memory_gb=0.01 "
         "warmup=false host_memory_gb=0").split() + [f"compile_cache_dir={SUITE_CACHE}"]  # one argument: a path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, tmp):
        self.model = write_tiny_gguf("llama", os.path.join(tmp, "tiny.gguf"))
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled",
                   RAY_DEDUP_LOGS="0")
        env.pop("RAY_ADDRESS", None)
        self.log = os.path.join(tmp, "serve.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sgl_jax.serve", "--model", self.model, "--port", str(self.port),
             "--replicas", "2", "--ray-actor-options", '{"num_cpus": 0}', "--set", *SMALL],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline:
            assert self.proc.poll() is None, self.tail()
            if "serving on" in open(self.log).read():
                return
            time.sleep(0.5)
        raise TimeoutError(self.tail())

    def tail(self):
        return open(self.log).read()[-4000:]

    def stats(self):
        return requests.get(self.url + "/router_stats", timeout=10).json()

    def replicas(self):
        routers = self.stats()["routers"]
        return routers[0]["replicas"] if routers else []

    def wait_replicas(self, n, exclude=(), timeout=300):
        """The router's replicas once it sees `n` with their pids (a request creates the router)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            requests.get(self.url + "/health", timeout=60)
            now = {r["id"]: r["pid"] for r in self.replicas()}
            if len(now) == n and not set(exclude) & set(now) and all(now.values()):
                return now
            time.sleep(1.0)
        raise AssertionError(f"the router did not see {n} replicas (without {exclude}): {self.stats()}\n{self.tail()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def app():
    with tempfile.TemporaryDirectory() as tmp:
        a = App(tmp)
        try:
            yield a
        finally:
            a.stop()


def _gen(app, text, max_new=4, **extra):
    r = requests.post(app.url + "/generate", json=dict({"text": text, "sampling_params": {
        "max_new_tokens": max_new, "temperature": 0}}, **extra), timeout=180)
    assert r.status_code == 200, r.text
    return r.headers["x-sgl-jax-replica"], r.json()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_replicas_keep_each_tenant_on_the_replica_that_caches_it(app):
    """Two tenants' system prompts (12 pages each): after each tenant's first request, its later ones land on
    the same replica and reuse the prefix; the two tenants are spread over both replicas."""
    sys_a = "You are the assistant of tenant A. Answer briefly and politely, and cite the manual. " * 2
    sys_b = "Tenant B's helper: reply in one line, no greetings, numbers as digits only please. " * 2
    where = {}
    for i in range(3):
        for name, sp in (("a", sys_a), ("b", sys_b)):
            rep, out = _gen(app, sp + f"question {i}?")
            where.setdefault(name, set()).add(rep)
            if i > 0:
                assert out["meta_info"]["cached_tokens"] >= 40, (name, i, out["meta_info"])
    assert len(where["a"]) == 1 and len(where["b"]) == 1 and where["a"] != where["b"], where
    # every route of the API answers through the gateway as the single server does
    text_stream = requests.post(app.url + "/generate", json={"text": sys_a + "question 0?", "stream": True,
                                                               "sampling_params": {"max_new_tokens": 4,
                                                                                   "temperature": 0}},
                                timeout=120).text
    assert text_stream.rstrip().endswith("data: [DONE]")
    last = json.loads([x for x in text_stream.split("\n\n") if x.startswith("data: {")][-1][6:])
    assert last["text"] == _gen(app, sys_a + "question 0?")[1]["text"]
    chat = requests.post(app.url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=120)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    bad = requests.post(app.url + "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": -1}},
                        timeout=60)
    assert bad.status_code == 400 and "max_new_tokens" in bad.text
    assert requests.get(app.url + "/health", timeout=30).status_code == 200
    reps = app.replicas()
    assert len(reps) == 2 and all(r["healthy"] and r["pid"] for r in reps)
    assert sum(r["blocks"] for r in reps) > 0  # mirrored from the replicas' KV events


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_client_leaving_mid_stream_frees_its_slot(app):
    """The client closes a long stream after its first chunk: the replica's request is cancelled (Ray closes the
    handle's stream, the in-process ASGI call reports a disconnect, the engine aborts it) and the router's slot
    comes back; nothing is counted as a replica failure. The tiny model can finish the 200 tokens before the close
    reaches it on a loaded machine (then nothing is aborted, rightly): up to three tries, one must abort."""
    app.wait_replicas(2)
    failed = app.stats()["failed"]

    def aborted(replica):  # /metrics of one replica (the header pins a request to a replica)
        m = requests.get(app.url + "/metrics", headers={"x-sgl-jax-replica": replica}, timeout=30)
        assert m.headers["x-sgl-jax-replica"] == replica
        found = re.search(r'requests_total\{status="abort"\} (\S+)', m.text)
        return float(found.group(1)) if found else 0.0

    for _ in range(3):
        before = {x["id"]: aborted(x["id"]) for x in app.replicas()}
        r = requests.post(app.url + "/generate", json={"text": "a stream the client abandons", "stream": True,
                                                      "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}},
                          stream=True, timeout=120)
        served_by = r.headers["x-sgl-jax-replica"]
        next(r.iter_content(None))
        r.close()
        deadline = time.time() + 30
        while time.time() < deadline and any(x["inflight"] for x in app.replicas()):
            time.sleep(0.2)
        assert not any(x["inflight"] for x in app.replicas()), app.stats()
        assert app.stats()["failed"] == failed
        assert _gen(app, "still serving")[1]["meta_info"]["completion_tokens"] == 4
        if aborted(served_by) > before[served_by]:
            break
    else:
        raise AssertionError("in three tries the abandoned request was never aborted on its replica")
    bad = requests.get(app.url + "/metrics", headers={"x-sgl-jax-replica": "nope"}, timeout=30)
    assert bad.status_code == 404 and "no running replica 'nope'" in bad.text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_replica_killed_mid_answer_fails_clearly_and_ray_replaces_it(app):
    reps = app.wait_replicas(2)
    body = {"text": "count slowly: one two three", "stream": True,
            "sampling_params": {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}}
    with requests.post(app.url + "/generate", json=body, stream=True, timeout=180) as r:
        victim = r.headers["x-sgl-jax-replica"]
        it = r.iter_content(None)
        next(it)
        os.kill(reps[victim], signal.SIGKILL)
        rest = b"".join(it).decode()
    assert f"replica {victim} failed mid-stream" in rest and rest.rstrip().endswith("data: [DONE]"), rest[-500:]
    # nothing is lost while Ray restarts it: new requests are served by the survivor (or retried there)
    for i in range(3):
        rep, out = _gen(app, f"after the crash {i}")
        assert rep != victim and out["meta_info"]["completion_tokens"] == 4
    now = app.wait_replicas(2, exclude=[victim])  # Ray started a replacement and the router mirrors it
    (new,) = set(now) - set(reps)
    assert now[new] != reps[victim]
    seen = {_gen(app, f"tenant {i} " * 8)[0] for i in range(8)}
    assert new in seen, (seen, now)
    assert app.stats()["failed"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_replica_killed_before_the_first_byte_is_retried_on_another(app):
    """A non-streamed answer sends nothing until it is complete: its replica dies before answering, and the
    request is sent once more, to the surviving replica; the client sees one normal answer. Both replicas
    are stopped (SIGSTOP) while the request is routed, so the victim cannot finish before the kill lands however
    fast the machine (polling the router for the busy replica raced the tiny model's whole answer on a fast one)."""
    reps = app.wait_replicas(2)
    retried, failed = app.stats()["retried"], app.stats()["failed"]
    out = {}

    def call():
        out["r"] = requests.post(app.url + "/generate", json={
            "text": "a long non-streamed answer", "sampling_params": {
                "max_new_tokens": 180, "temperature": 0, "ignore_eos": True}}, timeout=300)

    for pid in reps.values():
        os.kill(pid, signal.SIGSTOP)
    t = threading.Thread(target=call)
    try:
        t.start()
        victim = None
        deadline = time.time() + 60
        while victim is None and time.time() < deadline:
            busy = [r for r in app.replicas() if r["inflight"]]
            victim = busy[0]["id"] if busy else None
            time.sleep(0.02)
        assert victim is not None, app.stats()
        os.kill(reps[victim], signal.SIGKILL)
    finally:
        for pid in reps.values():
            with contextlib.suppress(ProcessLookupError):  # the victim may be gone already
                os.kill(pid, signal.SIGCONT)
    t.join(timeout=300)
    r = out["r"]
    assert r.status_code == 200, r.text
    assert r.headers["x-sgl-jax-replica"] != victim
    assert r.json()["meta_info"]["completion_tokens"] == 180
    # sent again by Ray's handle (the victim died before accepting it) or by the gateway (after): either way once
    assert app.stats()["retried"] in (retried, retried + 1) and app.stats()["failed"] == failed


# ------------------------------------------------------------------------------- packaging
@pytest.mark.timeout(120)
def test_serve_run_builder_and_ray_stays_optional(tmp_path):
    """`serve run sgl_jax.serve.ray_app:build config=... replicas=N set=...` builds the application with our
    router and the overrides; the single-node server never imports Ray."""
    from sgl_jax.serve.ray_app import ROUTER_CLASS, build

    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine:\n  model: /nowhere/tiny.gguf\n  cache:\n    page_size: 8\n")
    app = build({"config": str(cfg), "replicas": "3", "set": "max_running_requests=5 server.port=31234"})
    gateway = app._bound_deployment
    (engines,) = [a for a in gateway.init_args if hasattr(a, "_bound_deployment")]
    dep = engines._bound_deployment
    assert dep.num_replicas == 3
    rc = dep._deployment_config.request_router_config
    assert rc.request_router_class == ROUTER_CLASS
    assert rc.request_router_kwargs["page_size"] == 8 and rc.request_router_kwargs["max_inflight"] == 10
    (config,) = engines._bound_deployment.init_args
    assert config.engine.scheduler.max_running_requests == 5 and config.server.port == 31234
    code = "import sys, sgl_jax.serve.server, sgl_jax.serve.__main__; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
