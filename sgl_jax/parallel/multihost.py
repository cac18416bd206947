"""One model across hosts: `jax.distributed` for the devices, a step channel for the plan.

Every process (rank) calls `jax.distributed.initialize` (coordinator at `parallel.dist_init_addr`, `nnodes`
processes, this one `node_rank`; CPU collectives through gloo), so `jax.devices()` lists every host's devices and
the tensor-parallel mesh (sgl_jax/parallel/tp.py) spans them: `parallel.tp` must equal that global count. Each
rank loads the weights and keeps only its devices' shards.

Rank 0 alone owns the scheduler, the radix cache and HTTP. What reaches the other ranks, and how: the runner's
device operations (`ModelRunner` methods marked `@mirrored`: the compiled step with its packed host inputs, the
penalty marks, page copies, constraint-table uploads) are sent, pickled, over one TCP connection per rank from
rank 0 (`StepChannel`, port = the coordinator's + 1), in the order rank 0 runs them, before rank 0 runs them
itself; each other rank (`follow`) runs the same calls on its own runner, so every rank enters each SPMD program
in the same order. The scheduler's decisions are in those inputs; nothing else is shared.

Failure: every rank sends a heartbeat each `dist_timeout_s / 4` from a thread of its own (a rank busy in a long
step still beats). A connection that closes, or a rank silent for `dist_timeout_s`, makes rank 0 call
`on_failure(reason)`: the engine is declared dead (every in-flight request fails with the reason, `/health`
answers 503, new requests are refused). A step that rank 0 had already entered may stay blocked in its
collective (the engine thread is abandoned, a daemon); `jax_enable_recoverability` keeps the process itself
alive when the coordinator sees the rank gone. A rank that loses rank 0 exits with an error.
Off under multi-host: the host/disk KV tiers (each rank would hold its shard of every page; not built yet).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import socket
import struct
import threading
import time

log = logging.getLogger("sgl_jax.multihost")
_HDR = struct.Struct("!Q")
HEARTBEAT = b"\x00hb"


def mirrored(method):
    """A runner method that changes or reads the device state through an SPMD program: with a multi-host
    `channel` (rank 0's `StepChannel`, below) the call is sent to every other rank first, which runs it on its own
    runner (`follow`), so all ranks run the same programs in the same order. One call at a time (a lock)."""

    @functools.wraps(method)
    def call(self, *args):
        if getattr(self, "channel", None) is None:  # (a runner built piecemeal by a test has none)
            return method(self, *args)
        with self._mirror_lock:
            self.channel.send(method.__name__, args)
            return method(self, *args)

    return call


def initialize(p) -> None:
    """jax.distributed.initialize from ParallelConfig `p` (before any computation)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices' collectives (others: their own)
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(p.dist_init_addr, p.nnodes, p.node_rank,
                               heartbeat_timeout_seconds=max(5, int(4 * p.dist_timeout_s)),
                               shutdown_timeout_seconds=max(10, int(10 * p.dist_timeout_s)))
    if p.tp != jax.device_count():
        raise ValueError(f"multi-host: parallel.tp={p.tp} must equal the devices of all {p.nnodes} processes "
                         f"({jax.device_count()}: {jax.local_device_count()} here)")


def _channel_addr(dist_init_addr: str) -> tuple[str, int]:
    host, _, port = dist_init_addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"parallel.dist_init_addr must be host:port, got {dist_init_addr!r}")
    return host, int(port) + 1


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_HDR.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("connection closed")
        got += k
    return buf


class _Pickler(pickle.Pickler):
    """Sends an all-zero array of 4 KiB or more as its shape and dtype (a step's host-mask rows are zeros unless a
    grammar constrains a row: 393 KB of a 64-row SmolLM2 step)."""

    def reducer_override(self, obj):
        import numpy as np

        if type(obj) is np.ndarray and obj.nbytes >= 4096 and not obj.any():
            return np.zeros, (obj.shape, obj.dtype)
        return NotImplemented


def dumps(obj) -> bytes:
    """What the channel sends for `obj` (pickle, all-zero arrays by shape)."""
    out = io.BytesIO()
    _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return out.getvalue()


def _recv(sock: socket.socket) -> bytes:
    (n,) = _HDR.unpack(_recv_exact(sock, _HDR.size))
    return _recv_exact(sock, n)


class StepChannel:
    """Rank 0's end: accepts the other ranks, sends each mirrored runner call to all of them, watches them."""

    def __init__(self, p, accept_timeout: float = 300.0):
        self.timeout = p.dist_timeout_s
        self.on_failure = None  # set by the engine: called once, from the watchdog, with the reason
        self.failed: str | None = None
        self._lock = threading.Lock()
        self._last: dict[int, float] = {}
        host, port = _channel_addr(p.dist_init_addr)
        srv = socket.create_server(("" if host in ("0.0.0.0", "") else host, port), reuse_port=False)
        srv.settimeout(accept_timeout)
        self.peers: dict[int, socket.socket] = {}
        try:
            while len(self.peers) < p.nnodes - 1:
                conn, _ = srv.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rank = int(_recv(conn).decode())
                self.peers[rank] = conn
                self._last[rank] = time.monotonic()
        except socket.timeout:
            raise TimeoutError(f"multi-host: ranks {sorted(set(range(1, p.nnodes)) - set(self.peers))} did not "
                               f"connect to {host}:{port} within {accept_timeout:.0f} s") from None
        finally:
            srv.close()
        self._closed = False
        for rank, conn in self.peers.items():
            threading.Thread(target=self._listen, args=(rank, conn), name=f"sgl_jax-rank{rank}", daemon=True).start()
        threading.Thread(target=self._watch, name="sgl_jax-watchdog", daemon=True).start()

    def send(self, op: str, args: tuple) -> None:
        """Every other rank runs `runner.op(*args)` next (before rank 0 runs it). Raises once a rank has failed."""
        if self.failed is not None:
            raise RuntimeError(f"multi-host: {self.failed}")
        payload = dumps((op, args))
        with self._lock:
            for rank, conn in self.peers.items():
                try:
                    _send(conn, payload)
                except OSError as e:
                    self._fail(f"rank {rank} is unreachable ({e})")
                    raise RuntimeError(f"multi-host: {self.failed}") from None

    def close(self) -> None:
        """Tell the other ranks to exit (after the last call sent), then leave jax.distributed with them (its
        shutdown is a barrier of all ranks; skipped when one is lost)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for conn in self.peers.values():
                try:
                    _send(conn, pickle.dumps(("stop", ())))
                except OSError:
                    pass
        for conn in self.peers.values():
            conn.close()

    def _listen(self, rank: int, conn: socket.socket) -> None:
        try:
            while True:
                if _recv(conn) == HEARTBEAT:
                    self._last[rank] = time.monotonic()
        except (OSError, ConnectionError, struct.error) as e:
            if not self._closed:
                self._fail(f"rank {rank} is gone ({e})")

    def _watch(self) -> None:
        while not self._closed and self.failed is None:
            now = time.monotonic()
            for rank, t in list(self._last.items()):
                if now - t > self.timeout:
                    self._fail(f"rank {rank} sent no heartbeat for {now - t:.1f} s")
            time.sleep(min(0.25, self.timeout / 8))

    def _fail(self, reason: str) -> None:
        if self.failed is not None or self._closed:
            return
        self.failed = reason
        log.error("multi-host: %s; failing in-flight requests", reason)
        if self.on_failure is not None:
            self.on_failure(f"multi-host: {reason}")


def connect(p, timeout: float = 300.0) -> socket.socket:
    """A non-zero rank's connection to rank 0's channel (retried until rank 0 listens), with its heartbeat."""
    addr = _channel_addr(p.dist_init_addr)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(addr, timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"multi-host: rank 0's step channel at {addr[0]}:{addr[1]} did not answer "
                                   f"within {timeout:.0f} s") from None
            time.sleep(0.2)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lock = threading.Lock()
    with lock:
        _send(sock, str(p.node_rank).encode())

    def beat():
        while True:
            time.sleep(p.dist_timeout_s / 4)
            try:
                with lock:
                    _send(sock, HEARTBEAT)
            except OSError:
                return

    threading.Thread(target=beat, name="sgl_jax-heartbeat", daemon=True).start()
    return sock


def follow(runner, sock: socket.socket) -> int:
    """A non-zero rank's loop: run each call rank 0 sends on this rank's runner until told to stop. Returns the
    number of calls run; raises ConnectionError when rank 0 is gone."""
    n = 0
    while True:
        op, args = pickle.loads(_recv(sock))
        if op == "stop":
            return n
        getattr(runner, op)(*args)
        n += 1


def serve_follower(c) -> None:
    """`python -m sgl_jax.serve ... --node-rank N` (N > 0): build this rank's runner, then follow rank 0."""
    from sgl_jax.engine.build import build_runtime

    rt = build_runtime(c)
    log.info("rank %d: following rank 0", c.parallel.node_rank)
    try:
        n = follow(rt.runner, rt.channel)
    except ConnectionError as e:
        raise SystemExit(f"multi-host rank {c.parallel.node_rank}: lost rank 0 ({e})") from None
    log.info("rank %d: rank 0 said stop after %d calls", c.parallel.node_rank, n)
    logging.shutdown()
    os._exit(0)  # not jax.distributed.shutdown: racing rank 0's coordinator going away, it aborts the process
