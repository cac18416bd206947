"""The router's connections to its workers: HTTP/1.1 keep-alive, a request written in the handler's own step.

aiohttp's client writes a request body from a task of its own; on Python < 3.12 that task starts only after every
callback already queued on the loop has run, so in a burst each request reached its worker after the router had
parsed, tokenized and routed the whole burst (a fake-worker burst of 24: arrivals at a median of 7.9 ms against
2.0 direct; bench/notes.md). Here `Pool.post` writes the request head and body in one `transport.write` before it
returns, and `_Conn.relay` hands the response's body (de-chunked) to the caller's sink from the connection's own
callback as each piece arrives: a streamed answer is many small pieces, and a task switch each (a future set, a
task step, a read) was a large share of the router's CPU per request. Only what the router forwards
is supported: a `POST` with a complete body, answered with a Content-Length, chunked, or close-delimited body; no
trailers are kept, no redirects followed.

Idle connections are kept per worker for `IDLE_S` (under the workers' 30 s keep-alive). A reused connection that
fails before any byte of its answer may have been closed by the worker while idle; the caller sends again on a
fresh one (`Pool.post(fresh=True)`) before it takes the worker for down.
"""

from __future__ import annotations

import asyncio
import collections
import time
import urllib.parse

IDLE_S = 20.0  # an idle connection is closed after this (the workers keep theirs 30 s)
HIGH_WATER = 1 << 20  # buffered answer bytes above which the connection stops reading until the caller catches up


class UpstreamError(ConnectionError):
    """The worker's connection failed; `before_response`: no byte of the answer had arrived."""

    def __init__(self, message: str, before_response: bool):
        super().__init__(message)
        self.before_response = before_response


class _Conn(asyncio.Protocol):
    """One connection; one request at a time. Parses the answer's head, then hands out its body's pieces."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # the current request went out on a connection kept from an earlier one
        self.idle_since = 0.0
        self._paused = False
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._head_done = False
        self._chunked = False
        self._remaining = -1  # body bytes still due (-1: until the connection closes)
        self._chunk_left = 0  # bytes of the current chunk still due
        self._keep_alive = True
        self.status = 0
        self.done = False  # the whole answer has arrived
        self.got_bytes = False
        self._pieces: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self._error: str | None = None
        self._sink = None  # relay(): pieces go straight to it from data_received
        self._sink_full = False  # ... and it said it is full: reading paused until it drains

    # -------------------------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.done:
            if self._head_done and self._remaining < 0 and not self._chunked:
                self._finish()  # a close-delimited body ends here
            else:
                self._error = f"connection lost{f': {exc}' if exc else ''}"
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._buf += data
        try:
            self._parse()
        except ValueError as e:
            self._error = f"bad answer from worker: {e}"
            self.transport.close()
        if self._buffered > HIGH_WATER:
            self._pause()
        if self._sink is None or self._error is not None:  # (a relay wakes only for the end or a full sink)
            self._wake()

    # -------------------------------------------------------------------------------- parsing
    def _parse(self) -> None:
        buf = self._buf
        if not self._head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[:end + 4]
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise ValueError(f"status line {lines[0]!r}")
            self.status = int(parts[1])
            headers = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(":")
                headers[k.strip().lower()] = v.strip()
            self._keep_alive = headers.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
            self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            if not self._chunked and "content-length" in headers:
                self._remaining = int(headers["content-length"])
            self._head_done = True
        if self._chunked:
            self._parse_chunks(buf)
        elif buf:
            take = len(buf) if self._remaining < 0 else min(len(buf), self._remaining)
            self._emit(bytes(buf[:take]))
            del buf[:take]
            if self._remaining >= 0:
                self._remaining -= take
        if not self._chunked and self._remaining == 0:
            self._finish()

    def _parse_chunks(self, buf: bytearray) -> None:
        while not self.done:
            if self._chunk_left > 0:
                if not buf:
                    return
                take = min(len(buf), self._chunk_left)
                self._emit(bytes(buf[:take]))
                del buf[:take]
                self._chunk_left -= take
                if self._chunk_left:
                    return
                self._chunk_left = -2  # the chunk's CRLF is due
            if self._chunk_left == -2:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise ValueError("a chunk not ended by CRLF")
                del buf[:2]
                self._chunk_left = 0
            end = buf.find(b"\r\n")
            if end < 0:
                return
            size = int(bytes(buf[:end]).split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:  # the last chunk, then trailer lines (none expected) and a blank line
                start = end + 2
                if buf[start:start + 2] == b"\r\n":
                    stop = start + 2
                else:
                    tail = buf.find(b"\r\n\r\n", start)
                    if tail < 0:
                        return
                    stop = tail + 4
                del buf[:stop]
                self._finish()
                return
            del buf[:end + 2]
            self._chunk_left = size

    def _emit(self, piece: bytes) -> None:
        if not piece:
            return
        if self._sink is not None:
            if self._sink(piece) and not self._sink_full:
                self._sink_full = True
                self._pause()
                self._wake()
            return
        self._pieces.append(piece)
        self._buffered += len(piece)

    def _pause(self) -> None:
        if not self._paused and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def _finish(self) -> None:
        self.done = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -------------------------------------------------------------------------------- the caller's side
    async def relay(self, sink, drained) -> None:
        """Hand the answer's body to `sink(piece)` as it arrives, from the connection's own callback (no task
        switch a piece: a streamed answer is many small pieces), until it is complete; raises UpstreamError if it
        broke. `sink` returns true when its receiver is full: reading stops until `await drained()` returns."""
        self._sink = sink
        try:
            while self._pieces:  # what arrived before the relay started
                piece = self._pieces.popleft()
                self._buffered -= len(piece)
                self._sink_full = bool(sink(piece)) or self._sink_full
            if not self._sink_full:
                self._resume()  # (paused if over HIGH_WATER had arrived)
            while True:
                if self._sink_full:
                    self._pause()
                    await drained()
                    self._sink_full = False
                    self._resume()
                    continue
                if self.done:
                    return
                if self._error is not None:
                    raise UpstreamError(self._error, before_response=not self._head_done)
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            self._sink = None

    @property
    def reusable(self) -> bool:
        return self.done and self._keep_alive and not self.closed and not self._buf

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections to one worker (`url`: http://host:port)."""

    def __init__(self, url: str):
        u = urllib.parse.urlparse(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"a worker URL must be http://host:port, got {url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self._host_header = f"{self.host}:{self.port}".encode()
        self._idle: list[_Conn] = []

    async def _open(self) -> _Conn:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(_Conn, self.host, self.port)
        except OSError as e:
            raise UpstreamError(f"cannot connect: {e}", before_response=True) from e
        return conn

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            c = self._idle.pop()
            if not c.closed and now - c.idle_since < IDLE_S:
                return c
            c.close()
        return None

    async def open_idle(self, n: int) -> None:
        """Open `n` connections ahead of traffic (a burst right after start then waits for no TCP connect)."""
        conns = await asyncio.gather(*(self._open() for _ in range(n)), return_exceptions=True)
        now = time.monotonic()
        for c in conns:
            if isinstance(c, _Conn):
                c.idle_since = now
                self._idle.append(c)

    async def post(self, path: str, body: bytes, content_type: bytes = b"application/json",
                   fresh: bool = False) -> _Conn:
        """Send `POST path` with `body` (on a kept connection unless `fresh`) and return the connection, whose
        answer the caller reads (`read`) and then hands back (`release`). A reused connection that fails
        before its answer's first byte (`UpstreamError.before_response` and `conn.reused`) may have been closed by
        the worker while idle: send again with `fresh=True` before taking the worker for down."""
        head = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + self._host_header + b"\r\nContent-Type: " +
                content_type + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        conn = None if fresh else self._take_idle()
        reused = conn is not None
        if conn is None:
            conn = await self._open()
        conn._reset()
        conn.reused = reused
        conn.transport.write(head + body)  # one send, before anything else runs on the loop
        return conn

    def release(self, conn: _Conn) -> None:
        """Hand `conn` back: kept for the next request if its answer was read to the end, else closed (closing it
        also tells the worker that the client left: it aborts the request)."""
        if conn.reusable:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
