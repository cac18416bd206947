"""The router's HTTP/1.1 server: requests parsed by httptools on the event loop, answers written to the socket.

A router is a proxy: per request it parses a head and a small body and relays a stream of small pieces. Under
aiohttp's server that framing was a large share of the router's CPU per streamed request (its request objects,
routing table, response writer and task per handler; bench/notes.md), and the router's one thread handles a
burst's requests one after another, so every request of a burst waited for that work on the ones before it. This
server keeps only what the router serves:

- `Server(handler)` is a protocol factory for `loop.create_server`; each complete request becomes a `Request`
  and is answered by `await handler(request, Responder)`. A connection's requests are answered in order
  (keep-alive; pipelined requests wait their turn; past `MAX_QUEUED` of them the connection stops reading).
- Request bodies with Content-Length or chunked (httptools de-chunks); `Expect: 100-continue` is answered when
  the connection has no answer in progress. Over `MAX_BODY` bytes of body: 413; over `MAX_HEAD` bytes of
  headers: 431; a malformed request: 400; each then closes the connection after the answers before it.
- `Responder.send` writes a whole answer with its Content-Length in one send; `Responder.write` streams one
  (chunked for HTTP/1.1 clients, close-delimited for HTTP/1.0), its head going out with the first piece;
  `Responder.feed` writes a piece at once from any callback (a proxy relays a stream without a task switch a
  piece) and says when the client's send buffer is over `HIGH_WATER`; `await drained()` then waits for it, and
  raises ClientGone once the client is gone.
- A client that goes away: the handler of its request in flight is cancelled at once (the router gives back the
  request's queue place or worker slot and closes the worker's connection, which aborts the request there).
"""

from __future__ import annotations

import asyncio
import collections
import http
import json
import logging

import httptools

log = logging.getLogger("sgl_jax.router")

MAX_BODY = 64 << 20  # bytes of request body (a prompt of a few million characters)
MAX_HEAD = 64 << 10  # bytes of request line and headers
MAX_QUEUED = 16  # pipelined requests parsed ahead of the one being answered
HIGH_WATER = 1 << 20  # buffered answer bytes above which a streamed write waits for the client
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


class ClientGone(Exception):
    """The client closed its connection before its answer was written (not an OSError: a proxy tells it apart from
    its upstream's failures)."""


class Request:
    """One parsed request: `method` (str), `path` (str, without the query), `query` (str), `headers` (lower-cased
    names -> values, bytes), `body` (bytes), `http10` (an HTTP/1.0 client), `keep_alive`."""

    __slots__ = ("method", "path", "query", "headers", "body", "http10", "keep_alive")

    def __init__(self, method: str, url: bytes, headers: dict[bytes, bytes], body: bytes, http10: bool,
                 keep_alive: bool):
        path, _, query = url.partition(b"?")
        self.method, self.path, self.query = method, path.decode("latin-1"), query.decode("latin-1")
        self.headers, self.body, self.http10, self.keep_alive = headers, body, http10, keep_alive

    def json(self):
        """The body parsed as JSON (ValueError if it is not)."""
        return json.loads(self.body)


class Responder:
    """One request's answer on its connection: `send` (whole) or `write` ... `end` (streamed)."""

    __slots__ = ("_conn", "_http10", "keep_alive", "started", "done", "_chunked")

    def __init__(self, conn: "_Connection", req: Request):
        self._conn, self._http10, self.keep_alive = conn, req.http10, req.keep_alive
        self.started = self.done = False
        self._chunked = False

    def _conn_header(self) -> bytes:
        if not self.keep_alive:
            return b"Connection: close\r\n"
        return b"Connection: keep-alive\r\n" if self._http10 else b""

    def send(self, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        """The whole answer, in one send."""
        if self.started:
            raise RuntimeError("the answer has started")
        self.started = self.done = True
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            status, _REASONS.get(status, b"Unknown"), content_type, len(body), self._conn_header())
        self._conn.write(head + body)

    def send_json(self, status: int, obj) -> None:
        self.send(status, json.dumps(obj).encode())

    def _start(self, status: int, content_type: bytes) -> bytes:
        self.started = True
        if self._http10:  # no chunked encoding: the body ends when the connection does
            self.keep_alive = False
        self._chunked = not self._http10
        framing = b"Transfer-Encoding: chunked\r\n" if self._chunked else b""
        return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%s\r\n" % (
            status, _REASONS.get(status, b"Unknown"), content_type, framing, self._conn_header())

    def feed(self, piece: bytes, status: int = 200, content_type: bytes = b"text/event-stream") -> bool:
        """One piece of a streamed answer, written now (`status` and `content_type` are read at the first; a
        piece for a client already gone is dropped). Returns true while the client's send buffer is full: the
        caller should `await drained()` before more."""
        if self.done:
            raise RuntimeError("the answer has ended")
        conn = self._conn
        head = b"" if self.started else self._start(status, content_type)
        if piece:
            conn.write(head + (b"%x\r\n%s\r\n" % (len(piece), piece) if self._chunked else piece))
        elif head:
            conn.write(head)
        return conn.paused

    async def drained(self) -> None:
        """Returns once the client's send buffer is under its limit; raises ClientGone if the client is gone."""
        await self._conn.drained()

    async def write(self, piece: bytes, status: int = 200, content_type: bytes = b"text/event-stream") -> None:
        """`feed`, then wait for the client if it is full; raises ClientGone once the client is gone."""
        if self._conn.lost:
            raise ClientGone("the client went away")
        if self.feed(piece, status, content_type):
            await self.drained()

    def end(self, status: int = 200, content_type: bytes = b"text/event-stream") -> None:
        """The end of a streamed answer (its head too, if nothing was written)."""
        if self.done:
            return
        head = b"" if self.started else self._start(status, content_type)
        self.done = True
        if not self._conn.lost:
            self._conn.write(head + (b"0\r\n\r\n" if self._chunked else b""))


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Connection(asyncio.Protocol):
    """One client connection: httptools' callbacks build requests, one task at a time answers them in order."""

    def __init__(self, handler):
        self._handler = handler
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = self.paused = False
        self._drain: asyncio.Future | None = None
        self._queue: collections.deque = collections.deque()  # Request, or _Refused (answered, then closed)
        self._task: asyncio.Task | None = None
        self._refused = False  # the parser is done with this connection
        self._reading = True
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0

    # ---------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def connection_lost(self, exc) -> None:
        self.lost = True
        self._queue.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client is gone: its request gives back what it holds
        self._wake_drain()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        try:
            self._parser.feed_data(data)
        except _Refused as e:
            self._refuse(e)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._refuse(cause if isinstance(cause, _Refused) else _Refused(400, f"bad request: {e}"))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._refuse(_Refused(400, f"bad request: {e}"))

    # ---------------------------------------------------------------- httptools' callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._head_bytes, self._body, self._body_bytes = b"", {}, 0, [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD:
            raise _Refused(431, f"the request head is over {MAX_HEAD} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD:
            raise _Refused(431, f"the request head is over {MAX_HEAD} bytes")
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        length = self._headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise _Refused(413, f"the body is {int(length)} bytes, over the limit of {MAX_BODY}")
        if (self._headers.get(b"expect", b"").lower() == b"100-continue" and self._task is None
                and not self._queue):  # (with an answer in progress the client sends the body after its wait)
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY:
            raise _Refused(413, f"the body is over the limit of {MAX_BODY} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        p = self._parser
        self._queue.append(Request(p.get_method().decode("latin-1"), self._url, self._headers,
                                   b"".join(self._body), p.get_http_version() == "1.0", p.should_keep_alive()))
        self._body = []
        if self._task is None:
            self._next()
        elif len(self._queue) >= MAX_QUEUED and self._reading:
            self._reading = False
            self.transport.pause_reading()

    # ---------------------------------------------------------------- answering
    def _refuse(self, e: _Refused) -> None:
        self._refused = True
        self._queue.append(e)
        if self._task is None:
            self._next()

    def _next(self) -> None:
        self._task = None
        if self.lost:
            return
        if not self._queue:
            if not self._reading and not self._refused:
                self._reading = True
                self.transport.resume_reading()
            return
        item = self._queue.popleft()
        if isinstance(item, _Refused):
            body = json.dumps({"error": {"message": str(item), "code": item.status}}).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s" % (item.status, _REASONS[item.status], len(body), body))
            self.transport.close()
            return
        self._task = asyncio.get_running_loop().create_task(self._answer(item))

    async def _answer(self, req: Request) -> None:
        resp = Responder(self, req)
        try:
            await self._handler(req, resp)
            if not resp.done:
                resp.end() if resp.started else resp.send(204, b"")
        except (asyncio.CancelledError, ClientGone):
            return  # the connection was lost
        except Exception as e:  # noqa: BLE001 - a handler's bug answers 500 and closes; the server goes on
            log.exception("answering %s %s", req.method, req.path)
            if not resp.started and not self.lost:
                resp.keep_alive = False
                resp.send_json(500, {"error": {"message": f"internal error: {type(e).__name__}: {e}", "code": 500}})
            resp.keep_alive = False
        if not resp.keep_alive:
            self.lost = True  # nothing more is answered here
            self.transport.close()
            return
        self._next()

    # ---------------------------------------------------------------- writing
    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)

    async def drained(self) -> None:
        while self.paused and not self.lost:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain
        if self.lost:
            raise ClientGone("the client went away")

    def _wake_drain(self) -> None:
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)


class Server:
    """A protocol factory for `loop.create_server`: each connection's requests answered by `handler(request,
    responder)`, an `async` function."""

    def __init__(self, handler):
        self.handler = handler

    def __call__(self) -> _Connection:
        return _Connection(self.handler)
