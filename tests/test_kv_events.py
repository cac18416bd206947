"""KV-cache events over ZMQ (sgl_jax/cache/events.py, sgl_jax/serve/kv_events.py), read by a subscriber that
decodes them with its own copy of the public schema (msgspec array-like tagged structs, as vLLM's example
subscriber declares them), not with our code. The radix cache's event stream is checked exhaustively against its
naive twin in tests/test_radix_cache.py (TwinMachine); here: the wire, an engine, the replay socket."""

import time

import msgspec
import pytest
import zmq

from sgl_jax.cache.events import sequence_hashes
from sgl_jax.engine import Engine
from sgl_jax.models.testing import write_tiny_gguf


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


SMALL = dict(page_size=4, max_context_len=128, max_running_requests=8, max_prefill_tokens=64, prefill_block=8,
             decode_buckets=[1, 4, 8], prefill_block_buckets=[2, 8], max_mixed_blocks=2, page_width_buckets=[32],
             compile_cache_dir="", kv_memory_gb=0.01, warmup=False, host_memory_gb=0)


class Subscriber:
    def __init__(self, endpoint: str, topic: str = "kv-events"):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.connect(endpoint)
        self.sock.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self.seqs: list[int] = []
        self.blocks: set[int] = set()

    def drain(self, until, timeout: float = 20.0) -> list:
        got, deadline = [], time.time() + timeout
        while time.time() < deadline and not until(got):
            if self.sock.poll(100):
                topic, seq, payload = self.sock.recv_multipart()
                self.seqs.append(int.from_bytes(seq, "big"))
                for ev in self.decoder.decode(payload).events:
                    got.append(ev)
                    if isinstance(ev, BlockStored):
                        self.blocks.update(ev.block_hashes)
                    elif isinstance(ev, BlockRemoved):
                        self.blocks.difference_update(ev.block_hashes)
                    else:
                        self.blocks.clear()
        return got

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_tiny_gguf("llama", str(tmp_path_factory.mktemp("ev") / "tiny.gguf"))
    with Engine(model=path, progress=False, kv_events_endpoint="tcp://127.0.0.1:*",
                kv_events_replay_endpoint="tcp://127.0.0.1:*", **SMALL) as e:
        yield e


@pytest.mark.timeout(300)
def test_subscriber_sees_the_prompt_blocks_then_the_flush(engine):
    sub = Subscriber(engine.kv_events.endpoint)
    time.sleep(0.3)  # a SUB socket misses what is published before it has joined
    try:
        prompt = "The quick brown fox jumps over the lazy dog, twice over."
        out = engine.generate(prompt, {"max_new_tokens": 4, "temperature": 0})
        ids = engine.tokenizer.encode(prompt)
        want = sequence_hashes(ids, 4)  # the prompt's full pages, as a router computes them from token ids
        sub.drain(lambda got: set(want) <= sub.blocks)
        assert set(want) <= sub.blocks, (len(want), len(sub.blocks))
        assert out["meta_info"]["completion_tokens"] == 4
        assert engine.flush_cache()
        got = sub.drain(lambda got: any(isinstance(ev, AllBlocksCleared) for ev in got))
        assert any(isinstance(ev, AllBlocksCleared) for ev in got) and not sub.blocks
        assert sub.seqs == list(range(sub.seqs[0], sub.seqs[0] + len(sub.seqs)))  # no gap
    finally:
        sub.close()


@pytest.mark.timeout(300)
def test_replay_returns_missed_batches(engine):
    engine.generate("Some other words to cache here, one more time.", {"max_new_tokens": 2, "temperature": 0})
    time.sleep(0.2)
    last = engine.kv_events.seq - 1
    assert last >= 0
    ctx = zmq.Context()
    req = ctx.socket(zmq.DEALER)  # several replies to one request
    req.connect(engine.kv_events.replay_endpoint)
    try:
        req.send_multipart([b"", (0).to_bytes(8, "big")])
        batches = []
        while req.poll(5000):
            _, seq, payload = req.recv_multipart()
            if not payload:
                break
            batches.append((int.from_bytes(seq, "big"), msgspec.msgpack.Decoder(KVEventBatch).decode(payload)))
        assert [s for s, _ in batches] == list(range(0, last + 1))
        assert any(isinstance(ev, BlockStored) for _, b in batches for ev in b.events)
    finally:
        req.close(0)
        ctx.term()


@pytest.mark.timeout(60)
def test_sequence_hashes_are_the_documented_chain():
    """The block hashes a router computes from token ids, against the chain written out here from its definition:
    blake2b-64 of the parent hash (big-endian) and the page's tokens as little-endian int32, from a root of
    blake2b-64("sgl_jax-kv:" + namespace); a partial last page has no hash."""
    import hashlib
    import random
    import struct

    def blake64(data: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")

    rng = random.Random(7)
    for ps in (1, 4, 16):
        for n in (0, ps - 1, ps, 5 * ps + ps // 2, 40 * ps):
            ids = [rng.randrange(0, 1 << 31) for _ in range(n)]
            for ns in ("", "tenant-a"):
                h, want = blake64(b"sgl_jax-kv:" + ns.encode()), []
                for i in range(n // ps):
                    h = blake64(h.to_bytes(8, "big") + b"".join(struct.pack("<i", t) for t in ids[i * ps:(i + 1) * ps]))
                    want.append(h)
                assert sequence_hashes(ids, ps, ns) == want, (ps, n, ns)


@pytest.mark.timeout(60)
def test_a_hash_memo_gives_the_chain_and_is_bounded():
    """sequence_hashes with a HashMemo: the same hashes as without, for prompts that share prefixes, diverge
    mid-page and repeat, across namespaces and page sizes; the memo holds what it hashed and starts over past its
    size."""
    import random

    from sgl_jax.cache.events import HashMemo

    rng = random.Random(3)
    memo = HashMemo(size=10_000)
    systems = [[rng.randrange(0, 50) for _ in range(rng.randrange(0, 90))] for _ in range(4)]
    for k in range(300):
        ids = rng.choice(systems) + [rng.randrange(0, 50) for _ in range(rng.randrange(0, 30))]
        ps, ns = rng.choice((1, 4, 16)), rng.choice(("", "b"))
        assert sequence_hashes(ids, ps, ns, memo) == sequence_hashes(ids, ps, ns), k
    assert 0 < len(memo.known) <= 10_000
    small = HashMemo(size=8)
    ids = list(range(64))
    assert sequence_hashes(ids, 4, memo=small) == sequence_hashes(ids, 4)  # 16 pages: over the bound
    assert len(small.known) == 0
    assert sequence_hashes(ids[:8], 4, memo=small) == sequence_hashes(ids[:8], 4) and len(small.known) == 2
