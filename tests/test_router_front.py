"""The router's HTTP/1.1 server (sgl_jax/router/front.py) against raw sockets: keep-alive and pipelined requests
answered in order, chunked request bodies, `Expect: 100-continue`, the limits and malformed requests, streamed
answers (chunked, or close-delimited for HTTP/1.0), a handler's failure, back-pressure from a client that does
not read, and a client that leaves (its request's handler cancelled). Then the router on it: a client that leaves
while its request waits in the router's queue gives its place back at once."""

import asyncio
import json

import pytest

from sgl_jax.router import front
from sgl_jax.router.front import Server


async def _echo(req, resp):
    """/echo: method, path, query, body; /stream: the body's lines as pieces; /fail: raises; /wait: holds."""
    if req.path == "/echo":
        return resp.send_json(200, {"method": req.method, "path": req.path, "query": req.query,
                                    "body": req.body.decode()})
    if req.path == "/stream":
        for line in req.body.split(b"\n"):
            await resp.write(line)
        return resp.end()
    if req.path == "/fail":
        raise RuntimeError("boom")
    return resp.send_json(404, {})


async def _serve(handler=_echo):
    srv = await asyncio.get_running_loop().create_server(Server(handler), "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _answer(reader) -> tuple[int, dict, bytes]:
    """One answer off the wire: status, headers (lower-cased), body (de-chunked; to the close if neither)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:] if ln)}
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            n = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            body += (await reader.readexactly(n + 2))[:-2]
            if n == 0:
                return status, headers, body
    return status, headers, await reader.read()


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (path, len(body), extra, body)


@pytest.mark.timeout(60)
def test_keep_alive_and_pipelined_requests_are_answered_in_order():
    async def main():
        srv, port = await _serve()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post(b"/echo?a=1", b"first"))
        st, h, body = await _answer(r)
        assert st == 200 and json.loads(body) == {"method": "POST", "path": "/echo", "query": "a=1", "body": "first"}
        assert "connection" not in h  # HTTP/1.1 keeps it open by default
        # three pipelined in one send (one streamed): answered in order on the same connection
        w.write(_post(b"/echo", b"two") + _post(b"/stream", b"x\ny") + _post(b"/echo", b"four"))
        got = [await _answer(r) for _ in range(3)]
        assert json.loads(got[0][2])["body"] == "two"
        assert got[1][1]["transfer-encoding"] == "chunked" and got[1][2] == b"xy"
        assert json.loads(got[2][2])["body"] == "four"
        w.write(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _answer(r))[0] == 404
        w.close()
        srv.close()

    _run(main())


@pytest.mark.timeout(60)
def test_chunked_request_bodies_and_expect_100_continue():
    async def main():
        srv, port = await _serve()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert json.loads((await _answer(r))[2])["body"] == "abcde"
        w.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert await r.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"  # before the body is sent
        w.write(b"hello")
        assert json.loads((await _answer(r))[2])["body"] == "hello"
        w.close()
        srv.close()

    _run(main())


@pytest.mark.timeout(60)
def test_limits_and_malformed_requests_answer_then_close(monkeypatch):
    monkeypatch.setattr(front, "MAX_BODY", 100)
    monkeypatch.setattr(front, "MAX_HEAD", 300)

    async def one(wire: bytes):
        srv, port = await _serve()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(wire)
        st, h, body = await _answer(r)
        rest = await r.read()  # the server closes after it
        w.close()
        srv.close()
        return st, h, json.loads(body), rest

    async def main():
        st, h, body, rest = await one(_post(b"/echo", b"ok") + _post(b"/echo", b"x" * 101))
        assert st == 200 and body["body"] == "ok"  # the answer before the refusal goes out first
        st, h, body, rest = await one(_post(b"/echo", b"x" * 101))
        assert st == 413 and h["connection"] == "close" and "101 bytes" in body["error"]["message"] and rest == b""
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        st, h, body, rest = await one(head + (b"32\r\n" + b"y" * 50 + b"\r\n") * 3)  # 150 bytes, no length ahead
        assert st == 413 and "over the limit" in body["error"]["message"]
        st, h, body, rest = await one(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"z" * 400 + b"\r\n\r\n")
        assert st == 431 and "head" in body["error"]["message"]
        st, h, body, rest = await one(b"NOT HTTP AT ALL\r\n\r\n")
        assert st == 400 and "bad request" in body["error"]["message"] and rest == b""

    _run(main())


@pytest.mark.timeout(60)
def test_http10_streams_close_delimited_and_a_failing_handler_answers_500():
    async def main():
        srv, port = await _serve()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /stream HTTP/1.0\r\nContent-Length: 5\r\n\r\nab\ncd")
        st, h, body = await _answer(r)  # no Content-Length, not chunked: to the close
        assert st == 200 and h["connection"] == "close" and body == b"abcd"
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\na")
        st, h, body = await _answer(r)
        assert h["connection"] == "keep-alive" and json.loads(body)["body"] == "a"
        w.write(_post(b"/fail", b""))
        st, h, body = await _answer(r)
        assert st == 500 and "boom" in json.loads(body)["error"]["message"] and await r.read() == b""
        r, w = await asyncio.open_connection("127.0.0.1", port)  # the server goes on
        w.write(_post(b"/echo", b"after"))
        assert json.loads((await _answer(r))[2])["body"] == "after"
        w.close()
        srv.close()

    _run(main())


@pytest.mark.timeout(60)
def test_a_client_that_does_not_read_holds_the_writer_and_one_that_leaves_cancels_its_handler():
    events = []

    async def handler(req, resp):
        try:
            if req.path == "/flood":
                n = 0
                while n < 64 << 20:
                    if resp.feed(b"z" * 65536):  # the client's buffer is full
                        events.append(("full", n))
                        await resp.drained()
                    n += 65536
                return resp.end()
            await asyncio.sleep(30)  # /hold
        except asyncio.CancelledError:
            events.append(("cancelled", req.path))
            raise
        except front.ClientGone:
            events.append(("gone", req.path))
            raise

    async def main():
        srv, port = await _serve(handler)
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        w.write(_post(b"/flood", b""))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if events:
                break
        assert events and events[0][0] == "full" and events[0][1] < 16 << 20  # it stopped, far short of 64 MB
        w.close()  # leaves without reading
        await asyncio.sleep(0.2)
        assert events[-1] in (("cancelled", "/flood"), ("gone", "/flood")), events
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post(b"/hold", b""))
        await asyncio.sleep(0.1)
        w.close()
        await asyncio.sleep(0.2)
        assert events[-1] == ("cancelled", "/hold")
        srv.close()

    _run(main())


@pytest.mark.timeout(60)
def test_a_client_leaving_while_queued_in_the_router_gives_its_place_back():
    """One worker, one slot: a request holds it; a second waits in the router's queue and its client leaves -- the
    queue is empty at once (not when the slot frees); the first finishes, and a third is served."""
    from sgl_jax.router.policy import Replica, Router
    from sgl_jax.router.server import RouterApp, build_handler
    from sgl_jax.router.upstream import Pool

    class Tok:
        def encode(self, text):
            return [ord(c) % 200 for c in text]

    release = None

    async def worker(req, resp):
        body = json.loads(req.body)
        if body["text"].startswith("hold"):
            await release.wait()
        resp.send_json(200, {"text": body["text"][::-1], "meta_info": {}})

    async def main():
        nonlocal release
        release = asyncio.Event()
        wsrv, wport = await _serve(worker)
        url = f"http://127.0.0.1:{wport}"
        rep = Replica("w0", url, max_inflight=1, page_size=4)
        app = RouterApp(Router([rep]), Tok(), http=None, pools={"w0": Pool(url)})
        rsrv, rport = await _serve(build_handler(app))
        body = lambda t: json.dumps({"text": t, "sampling_params": {"max_new_tokens": 2}}).encode()  # noqa: E731
        r1, w1 = await asyncio.open_connection("127.0.0.1", rport)
        w1.write(_post(b"/generate", body("hold the slot")))
        await asyncio.sleep(0.1)
        r2, w2 = await asyncio.open_connection("127.0.0.1", rport)
        w2.write(_post(b"/generate", body("queued then gone")))
        await asyncio.sleep(0.1)
        assert len(app.router.queue) == 1 and len(rep.inflight) == 1
        w2.close()
        await asyncio.sleep(0.1)
        assert len(app.router.queue) == 0 and len(rep.inflight) == 1  # its place given back, the slot held
        release.set()
        st, _, out = await _answer(r1)
        assert st == 200 and json.loads(out)["text"] == "tols eht dloh"
        r3, w3 = await asyncio.open_connection("127.0.0.1", rport)
        w3.write(_post(b"/generate", body("third")))
        st, _, out = await _answer(r3)
        assert st == 200 and json.loads(out)["text"] == "driht" and not rep.inflight and rep.load == 0
        for w in (w1, w3):
            w.close()
        rsrv.close()
        wsrv.close()

    _run(main())
