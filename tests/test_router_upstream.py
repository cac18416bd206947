"""The router's worker connections (sgl_jax/router/upstream.py) against raw sockets: answers framed by
Content-Length, chunked (split at every byte boundary), or the connection's close; the request's bytes on the
wire; kept connections reused, a kept one the worker closed while idle; broken answers. And the HTTP router's
KV-event subscriber on its event loop (sgl_jax/router/server.py, subscribe_on_loop) against a ZMQ publisher."""

import asyncio
import random
import time

import pytest

from sgl_jax.router.upstream import Pool, UpstreamError, _Conn


class _Transport:
    """What `_Conn` asks of a transport, recorded."""

    def __init__(self):
        self.closed = self.paused = False
        self.written = b""

    def write(self, data):
        self.written += data

    def close(self):
        self.closed = True

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False


async def _nothing():
    pass


def _feed(pieces: list[bytes], live: bool = False) -> tuple[_Conn, list[bytes]]:
    """A connection fed `pieces` as separate reads; the body pieces it hands out: relayed after all arrived, or
    with `live` as each arrives (the relay started first)."""
    c = _Conn()
    c.connection_made(_Transport())
    out = []

    async def main():
        if not live:
            for p in pieces:
                c.data_received(p)
            return await c.relay(out.append, _nothing)
        relay = asyncio.ensure_future(c.relay(out.append, _nothing))
        await asyncio.sleep(0)
        for p in pieces:
            c.data_received(p)
            await asyncio.sleep(0)
        await relay

    asyncio.run(asyncio.wait_for(main(), 5))
    return c, out


async def _body(c: _Conn) -> bytes:
    """The whole answer's body, relayed."""
    parts = []
    await c.relay(parts.append, _nothing)
    return b"".join(parts)


def _chunked(payloads: list[bytes], ext: bool = False) -> bytes:
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";x=1" if ext else b"", p) for p in payloads)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + body +
            b"0\r\n\r\n")


@pytest.mark.timeout(60)
def test_chunked_answer_split_at_every_boundary():
    payloads = [b"data: {\"text\": \"a\"}\n\n", b"x" * 300, b"data: [DONE]\n\n"]
    wire = _chunked(payloads)
    for live in (False, True):
        for cut in range(1, len(wire)):
            c, out = _feed([wire[:cut], wire[cut:]], live)
            assert b"".join(out) == b"".join(payloads) and c.done and c.reusable and c.status == 200, cut
        rng = random.Random(0)
        for _ in range(200):  # many small reads
            cuts = sorted(rng.sample(range(1, len(wire)), 12))
            parts = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]
            c, out = _feed(parts, live)
            assert b"".join(out) == b"".join(payloads) and c.reusable
    c, out = _feed([_chunked(payloads, ext=True)])  # chunk extensions are ignored
    assert b"".join(out) == b"".join(payloads)
    trailer = _chunked(payloads)[:-2] + b"X-Trailer: 1\r\n\r\n"
    c, out = _feed([trailer])
    assert b"".join(out) == b"".join(payloads) and c.done


@pytest.mark.timeout(60)
def test_content_length_and_close_delimited_answers():
    body = b'{"text": "hello", "meta_info": {}}'
    wire = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    for cut in range(1, len(wire)):
        c, out = _feed([wire[:cut], wire[cut:]])
        assert b"".join(out) == body and c.status == 400 and c.reusable
    c = _Conn()
    c.connection_made(_Transport())
    c.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome ")
    c.data_received(b"bytes")
    c.connection_lost(None)
    assert asyncio.run(_body(c)) == b"some bytes" and not c.reusable


@pytest.mark.timeout(60)
def test_broken_answers_raise_naming_when_they_broke():
    c = _Conn()
    c.connection_made(_Transport())
    c.connection_lost(ConnectionResetError("reset"))
    with pytest.raises(UpstreamError) as e:
        asyncio.run(_body(c))
    assert e.value.before_response and "connection lost" in str(e.value)
    c = _Conn()
    c.connection_made(_Transport())
    c.data_received(_chunked([b"first"])[:-7])  # the head and the first chunk, then the worker dies
    c.connection_lost(None)
    got = []
    with pytest.raises(UpstreamError) as e:
        asyncio.run(c.relay(got.append, _nothing))
    assert not e.value.before_response and got == [b"first"]
    c = _Conn()
    t = _Transport()
    c.connection_made(t)
    c.data_received(b"SPDY/3 200 OK\r\n\r\n")
    with pytest.raises(UpstreamError, match="bad answer"):
        asyncio.run(_body(c))
    assert t.closed
    c = _Conn()
    c.connection_made(_Transport())
    c.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(UpstreamError, match="bad answer"):
        asyncio.run(_body(c))


@pytest.mark.timeout(60)
def test_answer_bytes_before_the_relay_over_the_high_water_mark_pause_the_connection():
    """Bytes that arrive before the relay starts are kept; over the high-water mark they stop the reading; the
    relay hands them out in order and resumes it."""
    c = _Conn()
    t = _Transport()
    c.connection_made(t)
    c.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    for i in range(40):
        c.data_received(bytes([i]) * 65536)  # 2.5 MB before the relay
    assert t.paused
    got = []

    async def main():
        relay = asyncio.ensure_future(c.relay(got.append, _nothing))
        await asyncio.sleep(0)
        assert not t.paused and len(got) == 40
        c.data_received(b"tail")
        c.connection_lost(None)
        await relay

    asyncio.run(main())
    assert got == [bytes([i]) * 65536 for i in range(40)] + [b"tail"]


@pytest.mark.timeout(60)
def test_a_full_sink_pauses_the_connection_until_it_drains():
    """A sink that says its receiver is full: reading stops until `drained` returns, then goes on; every piece
    arrives once, in order."""
    c = _Conn()
    t = _Transport()
    c.connection_made(t)
    got, full, drain = [], [False], None

    def sink(piece):
        got.append(piece)
        return full[0]

    async def drained():
        await drain.wait()

    async def main():
        nonlocal drain
        drain = asyncio.Event()
        relay = asyncio.ensure_future(c.relay(sink, drained))
        await asyncio.sleep(0)
        c.data_received(_chunked([b"a", b"b"])[:-5])
        assert not t.paused and got == [b"a", b"b"]
        full[0] = True
        c.data_received(b"1\r\nc\r\n")  # the receiver is full after this piece
        await asyncio.sleep(0)
        assert t.paused and got == [b"a", b"b", b"c"] and not relay.done()
        full[0] = False
        drain.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not t.paused
        c.data_received(b"0\r\n\r\n")
        await relay

    asyncio.run(asyncio.wait_for(main(), 5))
    assert got == [b"a", b"b", b"c"] and c.done and c.reusable


async def _server(answers: list[bytes | None]):
    """A raw server: each request (head + Content-Length body) answered with the next of `answers` (None: the
    connection closed instead); what it got."""
    got = []

    async def handle(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            n = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
            got.append(head + await reader.readexactly(n))
            if answers[len(got) - 1] is None:
                break
            writer.write(answers[len(got) - 1])
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, got


@pytest.mark.timeout(60)
def test_pool_sends_one_request_and_keeps_the_connection():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main():
        srv, got = await _server([ok, ok, ok])
        pool = Pool(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
        conns = []
        for body in (b'{"a": 1}', b'{"b": 22}'):
            c = await pool.post("/generate", body)
            assert await _body(c) == b"ok"
            conns.append(c)
            pool.release(c)
        assert conns[0] is conns[1] and conns[1].reused  # kept and reused
        srv.close()
        pool.close()
        return got

    got = asyncio.run(main())
    assert got[0].startswith(b"POST /generate HTTP/1.1\r\n") and got[0].endswith(b'\r\n\r\n{"a": 1}')
    assert b"Content-Length: 8\r\n" in got[0] and b"Content-Type: application/json\r\n" in got[0]
    assert got[1].endswith(b'{"b": 22}')
    with pytest.raises(ValueError, match="http://host:port"):
        Pool("https://x:1")


@pytest.mark.timeout(60)
def test_a_kept_connection_the_worker_closed_fails_before_the_answer_then_fresh_works():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main():
        srv, got = await _server([ok, None, ok])  # the second request finds its kept connection closing
        pool = Pool(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
        c = await pool.post("/generate", b"{}")
        assert await _body(c) == b"ok"
        pool.release(c)
        c2 = await pool.post("/generate", b"{}")
        assert c2 is c and c2.reused
        with pytest.raises(UpstreamError) as e:
            await _body(c2)
        assert e.value.before_response
        pool.release(c2)
        c3 = await pool.post("/generate", b"{}", fresh=True)
        assert c3 is not c and not c3.reused and await _body(c3) == b"ok" and len(got) == 3
        srv.close()
        pool.close()

    asyncio.run(main())

    async def refused():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens there once closed
        with pytest.raises(UpstreamError, match="cannot connect") as e:
            await Pool(f"http://127.0.0.1:{port}").post("/generate", b"{}")
        assert e.value.before_response

    asyncio.run(refused())


@pytest.mark.timeout(60)
def test_kv_events_are_mirrored_on_the_event_loop():
    """The HTTP router's subscriber runs on its event loop: 300 event batches (more than one wake-up's share)
    published over ZMQ all reach the replica's mirror, in order (a removal after its store), with the loop free
    between wake-ups."""
    import msgspec
    import zmq

    from sgl_jax.router.policy import Replica
    from sgl_jax.router.server import subscribe_on_loop

    pub = zmq.Context.instance().socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    r = Replica("w0", "http://127.0.0.1:1", 4, 4)
    applied, ticks = [0], []
    apply = r.apply

    def counted(events):
        applied[0] += 1
        apply(events)

    r.apply = counted

    async def main():
        loop = asyncio.get_running_loop()
        sock = subscribe_on_loop(r, f"tcp://127.0.0.1:{port}", "", loop, batch=16)
        await asyncio.sleep(0.3)  # the subscription reaches the publisher
        for i in range(300):
            evs = [["BlockStored", [i], None, [1, 2, 3, 4], 4, None, "GPU"]]
            if i % 3 == 2:
                evs.append(["BlockRemoved", [i - 1], "GPU"])
            pub.send_multipart([b"", i.to_bytes(8, "big"), msgspec.msgpack.encode([0.0, evs])])
        time.sleep(0.3)  # the loop held: every batch is queued in the subscriber before the first wake-up
        deadline = loop.time() + 10
        while loop.time() < deadline and 299 not in r.blocks:
            ticks.append(applied[0])
            await asyncio.sleep(0)
        ticks.append(applied[0])
        sock.close()

    asyncio.run(main())
    assert r.blocks == {i for i in range(300) if i % 3 != 1}
    # between two turns of this task, one wake-up's batch (and at most one more from the FD) was applied
    assert applied[0] == 300 and max(b - a for a, b in zip(ticks, ticks[1:])) <= 2 * 16
    pub.close(0)


@pytest.mark.timeout(60)
def test_a_relay_is_not_woken_for_each_piece():
    """Pieces go to the sink from the connection's callback; the relaying task sleeps on one wait until the
    answer ends (a wake-up a piece was the cost the relay exists to avoid)."""
    c = _Conn()
    c.connection_made(_Transport())
    got = []

    async def main():
        relay = asyncio.ensure_future(c.relay(got.append, _nothing))
        await asyncio.sleep(0)
        c.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(0)
        waiting = c._waiter
        for i in range(20):
            c.data_received(b"1\r\n%c\r\n" % (65 + i))
            await asyncio.sleep(0)
            assert c._waiter is waiting and not waiting.done(), i
        c.data_received(b"0\r\n\r\n")
        await relay

    asyncio.run(asyncio.wait_for(main(), 5))
    assert b"".join(got) == bytes(range(65, 85)) and c.done
