"""Publishing the radix cache's KV events over ZMQ, as vLLM and SGLang workers do (for llm-d, Dynamo, our router).

    engine.cache.kv_events_endpoint: "tcp://*:5557"        # PUB socket ('' = off)
    engine.cache.kv_events_topic: "kv-events"
    engine.cache.kv_events_replay_endpoint: "tcp://*:5558"  # ROUTER socket: missed batches on request ('' = off)

Each message is three frames: the topic, an 8-byte big-endian sequence number (one per batch, from 0), and the
msgpack batch ``[ts, [events...]]`` (sgl_jax/cache/events.py has the event layout). A thread takes what the cache
logged every `interval_s` and publishes it as one batch; nothing runs on the engine thread but the logging. The
last `buffer_batches` batches are kept for replay: a subscriber that sees a gap sends the first sequence number it
missed (8 bytes, big-endian; from a DEALER socket: an empty frame first) to the replay socket and receives one
``[seq, payload]`` message for every kept batch from there on, then ``[seq, b""]`` to end. Needs `pyzmq` and `msgspec` (`pip install sgl_jax[router]`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

log = logging.getLogger("sgl_jax.kv_events")


class KVEventPublisher:
    def __init__(self, events, endpoint: str, topic: str = "kv-events", replay_endpoint: str = "",
                 interval_s: float = 0.005, buffer_batches: int = 10_000):
        try:
            import msgspec
            import zmq
        except ImportError as e:
            raise RuntimeError(f"engine.cache.kv_events_endpoint needs pyzmq and msgspec ({e}); "
                               "pip install 'sgl_jax[router]'") from None
        self._encode = msgspec.msgpack.Encoder().encode
        self.events, self.topic, self.interval_s = events, topic.encode(), interval_s
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay = None
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._buffer: collections.deque = collections.deque(maxlen=buffer_batches)
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sgl_jax-kv-events", daemon=True)
        self._thread.start()

    def _publish(self) -> None:
        batch = self.events.take()
        if not batch:
            return
        payload = self._encode([time.time(), batch])
        seq = self.seq.to_bytes(8, "big")
        self._pub.send_multipart([self.topic, seq, payload])
        self._buffer.append((self.seq, payload))
        self.seq += 1

    def _serve_replay(self) -> None:
        zmq = self._zmq
        while self._replay.poll(0):
            ident, _, start = self._replay.recv_multipart()
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    self._replay.send_multipart([ident, b"", seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
            self._replay.send_multipart([ident, b"", (-1 & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big"), b""])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._publish()
                if self._replay is not None:
                    self._serve_replay()
            except Exception:  # noqa: BLE001 - events are best effort; the engine goes on
                log.exception("publishing KV events failed")
            self._stop.wait(self.interval_s)
        self._publish()  # the last ones

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in (self._pub, self._replay):
            if s is not None:
                s.close(0)
        self._ctx.term()
