"""The disk tier of the prefix cache (sgl_jax/cache/disk_store.py): addresses, integrity, budget, failure to write,
and the engine end to end across a restart (the tree's insert_host and its twin are in test_radix_cache.py)."""

from __future__ import annotations

import glob
import logging
import os
import random

import numpy as np
import pytest

from sgl_jax.cache.disk_store import DiskStore
from sgl_jax.engine import Engine
from sgl_jax.models.testing import write_tiny_gguf
from test_engine import SMALL, reference_greedy

pytestmark = pytest.mark.timeout(300)

PB, PS = 64, 4  # page bytes, page size


def _store(d, fp="model-a", budget=1 << 20):
    return DiskStore(str(d), budget, fp, PB, PS)


def _page(i):
    return np.full(PB, i % 251, np.uint8)


def test_pages_round_trip_and_survive_a_new_store(tmp_path):
    s = _store(tmp_path)
    hs = s.chain(list(range(10)))  # two whole pages; the 2 extra tokens are not a page
    assert len(hs) == 2 and hs[0] != hs[1]
    assert s.chain(list(range(8)), "ns")[0] != hs[0] and _store(tmp_path, "model-b").chain(list(range(8)))[0] != hs[0]
    assert s.chain([9, 9, 9, 9] + list(range(4, 8)))[1] != hs[1]  # a page's address depends on every earlier token
    for i, h in enumerate(hs):
        s.put(h, _page(i))
    s.put(hs[0], _page(99))  # already there: not rewritten
    assert s.written == 2 and s.num_pages == 2
    again = _store(tmp_path)
    assert again.has(hs[0]) and again.has(hs[1])
    np.testing.assert_array_equal(again.get(hs[1]), _page(1))
    assert again.read_pages == 1 and again.get(b"\0" * 32) is None
    h3 = s.chain(list(range(12)))[2]
    s.put(h3, _page(3))  # written by another store (process) after `again` indexed the directory
    np.testing.assert_array_equal(again.get(h3), _page(3))


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_a_damaged_or_foreign_file_is_deleted_and_never_served(tmp_path, damage):
    a = _store(tmp_path)
    h = a.chain(list(range(4)))[0]
    a.put(h, _page(7))
    path = a._path(h)
    blob = open(path, "rb").read()
    if damage == "truncate":
        open(path, "wb").write(blob[:-5])
    elif damage == "flip":
        open(path, "wb").write(blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])
    else:  # another model's page placed under this model's address for the same tokens
        b = _store(tmp_path / "b", "model-b")
        hb = b.chain(list(range(4)))[0]
        b.put(hb, _page(7))
        os.replace(b._path(hb), path)
    s = _store(tmp_path)
    assert s.has(h) and s.get(h) is None
    assert s.corrupt == 1 and not os.path.exists(path) and not s.has(h)


def test_the_budget_is_a_hard_cap_oldest_first(tmp_path):
    s = _store(tmp_path, budget=2 * (PB + 96))  # two files' worth
    hs = s.chain(list(range(12)))
    s.put(hs[0], _page(0))
    s.put(hs[1], _page(1))
    s.get(hs[0])  # read: the most recently used now
    s.put(hs[2], _page(2))
    assert s.num_pages == 2 and s.evicted == 1 and s.has(hs[0]) and not s.has(hs[1]) and s.has(hs[2])
    assert len(glob.glob(str(tmp_path / "*" / "*.kv"))) == 2 and s.nbytes <= s.budget


def test_an_unusable_directory_or_a_failed_write_turns_the_tier_off_with_one_warning(tmp_path, caplog, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="sgl_jax.cache"):
        s = _store(blocker / "sub")
        s.put(s.chain(list(range(4)))[0], _page(1))
    assert not s.enabled and s.written == 0
    assert len([r for r in caplog.records if "disk tier" in r.message]) == 1
    caplog.clear()
    s = _store(tmp_path / "ok")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", full)
    with caplog.at_level(logging.WARNING, logger="sgl_jax.cache"):
        for i in range(3):
            s.put(s.chain(list(range(4 * (i + 1))))[-1], _page(i))
    assert not s.enabled and [r.message for r in caplog.records if "disk tier" in r.message][0].count("No space") == 1
    assert len([r for r in caplog.records if "disk tier" in r.message]) == 1
    assert not glob.glob(str(tmp_path / "ok" / "*" / "*.tmp"))


# ------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf("llama", str(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


CFG = dict(SMALL, max_context_len=64, warmup=False)
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def test_a_restarted_engine_reads_its_prefixes_back_from_disk(tiny_path, tmp_path):
    """Engine A serves a 40-token prompt and shuts down; engine B, new process state, same disk_dir, gets the
    prompt's pages from the disk tier (into host slots, then loaded) and answers with the independent forward's
    tokens. With every file damaged, engine C recomputes and answers the same, the damage counted."""
    p = [random.Random(4).randrange(3, 297) for _ in range(40)]
    want = reference_greedy(tiny_path, p, GREEDY["max_new_tokens"])
    disk = str(tmp_path / "kv")
    with Engine(model=tiny_path, progress=False, disk_dir=disk, **CFG) as a:
        assert a.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] == want
    files = glob.glob(os.path.join(disk, "*", "*.kv"))
    assert len(files) >= 10  # the prompt's 10 pages (and pages of its output)
    with Engine(model=tiny_path, progress=False, disk_dir=disk, **CFG) as b:
        out = b.generate(input_ids=p, sampling_params=GREEDY)
        assert out["output_ids"] == want and out["meta_info"]["cached_tokens"] >= 36
        t = b.stats()["cache_tiers"]
        assert t["disk_read"] >= 9 and t["disk_tokens_read"] >= 36 and t["disk_corrupt"] == 0
        b.check_integrity()
    for f in glob.glob(os.path.join(disk, "*", "*.kv")):
        blob = open(f, "rb").read()
        open(f, "wb").write(blob[:90] + bytes([blob[90] ^ 0xFF]) + blob[91:])
    with Engine(model=tiny_path, progress=False, disk_dir=disk, **CFG) as c:
        out = c.generate(input_ids=p, sampling_params=GREEDY)
        assert out["output_ids"] == want and out["meta_info"]["cached_tokens"] == 0
        assert c.stats()["cache_tiers"]["disk_corrupt"] >= 1
        c.check_integrity()


def test_the_read_probe_prices_a_page_and_leaves_nothing(tmp_path):
    from sgl_jax.cache.costs import TransferCosts

    s = _store(tmp_path)
    assert s.measure_read_s() > 0
    assert not glob.glob(str(tmp_path / "probe" / "*" / "*.kv")) and s.num_pages == 0
    c = TransferCosts(prefill_s_per_token=1e-3, load_s_fixed=0.0, load_s_per_token=1e-5, disk_s_per_token=2e-3)
    assert c.load_pays(16) and not c.disk_pays(16)  # reading it back costs more than recomputing it
    assert TransferCosts.unmeasured().disk_pays(16)


def test_a_disk_hit_priced_above_recompute_is_recomputed(tiny_path, tmp_path):
    from sgl_jax.cache.costs import TransferCosts

    p = [random.Random(6).randrange(3, 297) for _ in range(40)]
    want = reference_greedy(tiny_path, p, GREEDY["max_new_tokens"])
    disk = str(tmp_path / "kv")
    with Engine(model=tiny_path, progress=False, disk_dir=disk, **CFG) as a:
        a.generate(input_ids=p, sampling_params=GREEDY)
    with Engine(model=tiny_path, progress=False, disk_dir=disk, **CFG) as b:
        b.scheduler.transfer_costs = TransferCosts(1e-3, 0.0, 1e-5, disk_s_per_token=1.0)
        out = b.generate(input_ids=p, sampling_params=GREEDY)
        assert out["output_ids"] == want and out["meta_info"]["cached_tokens"] == 0
        assert b.scheduler.disk.tokens_read == 0 and b.scheduler.disk.store.read_pages == 0


# ------------------------------------------------------------------ scheduler (mock model, no jax)
def _disk_scheduler(path, policy, num_pages=41, host_slots=64):
    from sgl_jax.cache.disk_tier import DiskTier
    from test_scheduler import MockRunner, make

    s = make(num_pages=num_pages, page_size=4, host_slots=host_slots, max_running=4)
    s.disk = DiskTier(DiskStore(str(path), 1 << 30, "mock", 4 * 8, 4), s.cache, policy)
    return s, MockRunner(4).attach(s)


def _run(s, runner, reqs, until=None):
    """Add `reqs` (rid, prompt, n) and step until all are done (or `until()` holds); a step may find nothing to
    do while a disk read runs. Returns the outputs; the mock checks every page it reads."""
    import time

    from test_scheduler import apply_outputs

    from sgl_jax.scheduler import Request

    for rid, prompt, n in reqs:
        s.add(Request(rid, prompt, n))
    done, t0 = {}, time.monotonic()
    while s.has_work and not (until and until()):
        plan = s.schedule()
        if plan is None:
            assert s.disk.num_loading, "work pending, nothing scheduled and no disk read running"
            time.sleep(0.001)
        else:
            out = runner.run(plan)
            s.on_step_done(plan)
            apply_outputs(s, plan, out, done)
        s.check_integrity()
        assert time.monotonic() - t0 < 60
    return done


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_a_disk_read_runs_while_other_requests_are_served(tmp_path, policy):
    """A's prompt is on disk (a first scheduler served it and flushed); in a second scheduler on the same
    directory A waits in the loading state while its read is held up, and B, arriving after it, is admitted and
    finishes meanwhile; once the read is let go A is admitted with the pages from disk, and the mock, reading
    every position back through the page table, gets A's exact output."""
    import threading

    from test_scheduler import expected_output

    a_prompt, b_prompt = list(range(100, 141)), list(range(500, 510))
    s1, r1 = _disk_scheduler(tmp_path, policy)
    _run(s1, r1, [("first", a_prompt, 2)])
    assert s1.disk.store.written == (0 if policy == "write_back" else 10)  # write-back: nothing while it fits
    s1.disk.flush()
    assert s1.disk.store.num_pages >= 10
    s2, r2 = _disk_scheduler(tmp_path, policy)
    gate, read = threading.Event(), s2.disk.store.read
    s2.disk.store.read = lambda h: (gate.wait(30), read(h))[1]
    done = _run(s2, r2, [("a", a_prompt + [7], 3), ("b", b_prompt, 4)], until=lambda: "b" not in s2.by_rid)
    assert done == {"b": expected_output(b_prompt, 4)}
    assert s2.by_rid["a"].state.value == "waiting" and s2.disk.num_loading == 1
    gate.set()
    done = _run(s2, r2, [])
    assert done == {"a": expected_output(a_prompt + [7], 3)}
    assert s2.disk.tokens_read == 40 and s2.disk.store.read_pages == 10 and s2.disk.num_loading == 0


def test_an_aborted_loading_request_leaves_nothing(tmp_path):
    import threading

    p = list(range(100, 141))
    s1, r1 = _disk_scheduler(tmp_path, "write_through")
    _run(s1, r1, [("first", p, 1)])
    s1.disk.flush()
    s2, r2 = _disk_scheduler(tmp_path, "write_through")
    gate, read = threading.Event(), s2.disk.store.read
    s2.disk.store.read = lambda h: (gate.wait(30), read(h))[1]
    from sgl_jax.scheduler import Request

    s2.add(Request("a", p + [1], 2))
    assert s2.schedule() is None and s2.disk.num_loading == 1
    s2.abort("a")
    gate.set()
    assert s2.disk.num_loading == 0 and not s2.has_work and s2.cache.host_cached_pages == 0
    s2.check_integrity()


def test_write_back_writes_what_the_host_tier_drops_and_a_restart_reads_it(tmp_path):
    """A 21-page pool and a 6-slot host tier under write_back: prompts push each other out of both tiers; every
    page the host drops is written first (and nothing else until shutdown); a new scheduler on the directory then
    serves the first prompt from disk with the mock's exact output."""
    import random

    from test_scheduler import expected_output

    rng = random.Random(3)
    prompts = [[rng.randrange(1, 999) for _ in range(40)] for _ in range(5)]
    s1, r1 = _disk_scheduler(tmp_path, "write_back", num_pages=21, host_slots=6)
    for i, p in enumerate(prompts):
        assert _run(s1, r1, [(f"p{i}", p, 2)]) == {f"p{i}": expected_output(p, 2)}
    dropped = s1.cache.host_pages_dropped
    assert dropped > 0 and s1.disk.pages_spilled == s1.disk.store.written > 0
    assert s1.disk.pages_spilled <= dropped  # a page already on disk is not written again
    s1.disk.flush()  # the clean shutdown: what is still in the device and host tiers
    s1.check_integrity()
    s2, r2 = _disk_scheduler(tmp_path, "write_back")
    assert _run(s2, r2, [("again", prompts[0] + [5], 2)]) == {"again": expected_output(prompts[0] + [5], 2)}
    assert s2.disk.tokens_read == 40


def test_flush_cache_clears_the_disk_tier(tiny_path, tmp_path):
    disk = str(tmp_path / "kv")
    with Engine(model=tiny_path, progress=False, disk_dir=disk, **CFG) as e:
        e.generate(input_ids=list(range(3, 43)), sampling_params=GREEDY)
        e.generate(input_ids=[5, 6], sampling_params=GREEDY)  # the next schedule writes the first one's pages
        assert glob.glob(os.path.join(disk, "*", "*.kv"))
        assert e.flush_cache()
        assert not glob.glob(os.path.join(disk, "*", "*.kv")) and e.stats()["cache_tiers"]["disk_pages"] == 0


def test_a_disk_read_into_a_full_host_tier_makes_room(tmp_path):
    """Steady state: the host tier is full of other prompts' pages. A prompt pushed out of both memory tiers but on
    disk still comes back: the read lands in slots freed by evicting the least recently used host pages (capped by
    the host tier's 6 slots), and the output is exact."""
    import random

    from test_scheduler import expected_output

    rng = random.Random(5)
    prompts = [[rng.randrange(1, 999) for _ in range(40)] for _ in range(5)]
    s, r = _disk_scheduler(tmp_path, "write_through", num_pages=21, host_slots=6)
    for i, p in enumerate(prompts):
        _run(s, r, [(f"p{i}", p, 2)])
    assert s.cache.host.allocator.num_free == 0 and s.cache.host_match_len(prompts[0]) == 0
    assert s.cache.peek_prefix_len(prompts[0]) == 0
    assert _run(s, r, [("again", prompts[0] + [5], 2)]) == {"again": expected_output(prompts[0] + [5], 2)}
    assert s.disk.tokens_read == 24 and s.by_rid == {}  # 6 pages: the host tier's size


def test_disk_pages_are_announced_as_kv_events_and_their_removal_too(tmp_path):
    """With KV events on, every page file is announced as a BlockStored of medium DISK under the block hash the
    device tier uses for the same page, and a file leaving the index (the byte budget here, then a clear) as a
    BlockRemoved: a router's mirror fed the events holds exactly the block hashes of the files on disk. A second
    scheduler on the directory announces the files it finds for the prefixes it serves."""
    import random

    from sgl_jax.cache.events import KVEventLog, sequence_hashes
    from sgl_jax.router.policy import Replica

    rng = random.Random(7)
    prompts = [[rng.randrange(1, 999) for _ in range(40)] for _ in range(4)]
    s, r = _disk_scheduler(tmp_path, "write_through", num_pages=21, host_slots=6)
    s.disk.store.budget = 25 * s.disk.store.file_bytes  # fewer files than the 4 prompts' 40 pages
    s.cache.events = log = KVEventLog(4)
    mirror = Replica("a", "", 1, 4)

    def on_disk():  # the block hash of every file of a served prompt, from the store's own index
        return {sequence_hashes(p, 4)[i] for p in prompts for i, h in enumerate(s.disk.store.chain(p))
                if s.disk.store.has(h)}

    for i, p in enumerate(prompts):
        _run(s, r, [(f"p{i}", p, 2)])
    s.disk.flush()
    events = log.take()
    mirror.apply(events)
    assert any(e[0] == "BlockRemoved" and e[2] == "DISK" for e in events)  # the budget dropped files
    assert s.disk.store.evicted > 0 and len(on_disk()) == s.disk.store.num_pages == 25
    assert mirror.disk_blocks == on_disk()
    for e in events:
        if e[0] == "BlockStored" and e[6] == "DISK":
            assert len(e[3]) == 4 * len(e[1]) and e[4] == 4
    s2, r2 = _disk_scheduler(tmp_path, "write_through")
    s2.cache.events = log2 = KVEventLog(4)
    _run(s2, r2, [("again", prompts[-1] + [3], 2)])
    s2.disk.flush()
    fresh = Replica("b", "", 1, 4)
    fresh.apply(log2.take())
    assert fresh.disk_blocks == set(sequence_hashes(prompts[-1], 4))  # found on disk, not written again
    s.disk.clear()
    mirror.apply(log.take())
    assert not mirror.disk_blocks
