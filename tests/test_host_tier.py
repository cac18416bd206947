"""The host tier of the prefix cache (sgl_jax/cache/host_pool.py, tiers.py, costs.py): the pool's bookkeeping, the
runner's device <-> host copies, the load-or-recompute rule, and the engine end to end on a tiny model whose device
pool is too small to keep a conversation's prefix (the tree's own invariants and its naive twin with a host tier
are in test_radix_cache.py)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from sgl_jax.cache import HostPool, PageAllocator, RadixCache
from sgl_jax.cache.costs import TransferCosts
from sgl_jax.engine import Engine
from sgl_jax.models.testing import write_tiny_gguf
from test_engine import SMALL, reference_greedy
from test_radix_cache import radix_copies

pytestmark = pytest.mark.timeout(300)

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
# 24 pages of 4 tokens: one 40-token prompt and its output take 12; three more push it out of the device pool
TIGHT = dict(SMALL, max_num_pages=25, max_context_len=64, max_running_requests=4, new_token_ratio=0.0,
             warmup=False)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf("llama", str(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


def _prompts(k, n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 297) for _ in range(n)] for _ in range(k)]


# ------------------------------------------------------------------------------------- pool and costs
def test_host_pool_releases_promoted_slots_only_after_their_loads_ran():
    host = HostPool(4, 8)
    slots = host.allocator.alloc(2)
    host.queue_load(slots, [7, 9])
    assert host.allocator.num_free == 2 and host.pending_release == 2
    assert host.take_loads() == [(slots[0], 7), (slots[1], 9)]  # these run with the step being planned
    assert host.allocator.num_free == 2  # ... so the slots stay taken until the next step is planned
    assert host.take_loads() == [] and host.allocator.num_free == 4 and host.pending_release == 0
    with pytest.raises(ValueError, match="at least one slot"):
        HostPool(0)


def test_host_pool_save_checks_what_the_device_reader_returns():
    host = HostPool(2, 8)
    host.bind(lambda pages: np.zeros((len(pages), 4), np.uint8))
    host.save([3], [0])  # copied at the next flush
    with pytest.raises(ValueError, match=r"returned \(1, 4\) for 1 pages of 8 bytes"):
        host.flush_saves()


def test_host_pool_copies_a_rounds_demotions_in_one_read_and_drops_those_freed():
    device = np.arange(10 * 8, dtype=np.uint8).reshape(10, 8)
    reads = []
    host = HostPool(4, 8)
    host.bind(lambda pages: (reads.append(list(pages)), device[pages].copy())[1])
    a, b, c = host.allocator.alloc(3)
    host.save([5], [a])
    host.save([6, 7], [b, c])
    assert reads == [] and not host.arena.any()  # nothing read yet
    host.free([b])  # dropped from the host tier in the same round: its copy is not made
    (b2,) = host.allocator.alloc(1)
    assert b2 == b
    host.arena[b2] = 99  # e.g. a page read back from disk into the reused slot
    assert host.take_loads() == []  # a step's plan: the pending copies are made first
    assert reads == [[5, 7]]
    assert (host.arena[a] == device[5]).all() and (host.arena[c] == device[7]).all() and (host.arena[b2] == 99).all()
    host.flush_saves()
    assert reads == [[5, 7]]  # nothing pending: no read


def test_host_pool_saves_a_rounds_demotions_straight_into_their_slots():
    """With a `save_into` reader a round's demotions are written into their slots by that reader, in one call,
    and no other slot changes."""
    page_bytes = 64 << 10
    host = HostPool(40, page_bytes)
    assert host.arena.shape == (40, page_bytes) and host.arena.flags.writeable and not host.arena.any()
    device = np.random.default_rng(0).integers(0, 255, (12, page_bytes), dtype=np.uint8)
    calls = []

    def save_into(pages, arena, rows):
        calls.append((list(pages), list(rows)))
        arena[np.asarray(list(rows))] = device[list(pages)]

    host.bind(lambda pages: device[list(pages)].copy(), save_into)
    slots = host.allocator.alloc(3)
    host.save([4, 9, 2], slots)
    host.flush_saves()
    assert calls == [([4, 9, 2], slots)]
    for s, p in zip(slots, [4, 9, 2]):
        assert (host.arena[s] == device[p]).all()
    others = [i for i in range(40) if i not in slots]
    assert not host.arena[others].any()


def test_transfer_costs_load_when_cheaper_and_break_even():
    c = TransferCosts(prefill_s_per_token=1e-3, load_s_fixed=5e-3, load_s_per_token=1e-5)
    assert c.min_load_tokens == 6  # 5 ms fixed / (1 ms - 10 us) per token -> 5.05 -> 6 tokens
    assert not c.load_pays(5) and c.load_pays(6) and not c.load_pays(0)
    never = TransferCosts(prefill_s_per_token=1e-6, load_s_fixed=0.0, load_s_per_token=1e-5)
    assert not never.load_pays(1000)
    free = TransferCosts.unmeasured()
    assert free.load_pays(1) and free.min_load_tokens == 1 and not free.as_dict()["measured"]


def test_flush_frees_every_tier():
    host = HostPool(8)
    c = RadixCache(PageAllocator(6), 2, host=host)
    c.insert([1, 2, 3, 4, 5, 6], c.allocator.alloc(3))
    assert c.evict(3) == 3 and c.host_cached_pages == 3 and c.cached_pages == 0
    assert c.promote([1, 2, 3, 4], max_pages=1) == 2  # one page back; its load is queued
    c.check_integrity()
    c.reset()
    c.check_integrity()
    assert c.host_cached_pages == 0 and host.allocator.num_free == 8 and c.allocator.num_free == 5
    assert host.take_loads() == []


def test_a_promoted_page_keeps_its_slot_and_is_demoted_again_without_a_copy():
    host = HostPool(4, 8)
    c = RadixCache(PageAllocator(6), 2, host=host)  # 5 device pages
    c.insert([1, 2, 3, 4, 5, 6], c.allocator.alloc(3))
    assert c.evict(3) == 3 and host.pages_saved == 3
    assert c.promote([1, 2, 3, 4, 5, 6]) == 6
    assert c.host_copy_pages == 3 and host.allocator.num_free == 1 and host.pending_release == 0
    c.take_loads()
    c.take_loads()  # the loads ran: the promoted nodes are unlocked
    m = c.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])
    c.insert([1, 2, 3, 4, 5, 6, 7, 8], m.pages + c.allocator.alloc(1))  # a new page past the promoted ones
    c.check_integrity()
    assert c.evict(4) == 4  # the three promoted pages move into their copies; only the new one is copied
    assert host.pages_saved == 4 and c.pages_demoted_by_copy == 3 and c.host_copy_pages == 0
    assert c.host_cached_pages == 4 and host.allocator.num_free == 0
    c.check_integrity()


def test_host_copies_go_before_host_pages_and_never_while_a_load_reads_them():
    host = HostPool(3, 8)
    c = RadixCache(PageAllocator(6), 1, host=host)
    c.insert([1, 2], c.allocator.alloc(2))
    c.insert([9], c.allocator.alloc(1))
    assert c.evict(3) == 3 and c.host_cached_pages == 3 and host.allocator.num_free == 0
    assert c.promote([1, 2]) == 2  # two copies, read by the loads of the next step
    c.insert([5], c.allocator.alloc(1))
    c.insert([6], c.allocator.alloc(1))
    c.insert([7], c.allocator.alloc(1))
    assert c.allocator.num_free == 0
    c.evict(1)  # [5]'s page needs a slot: the copies are still read, so host page [9] goes
    assert c.host_copy_pages == 2 and c.host_match_len([9]) == 0 and c.host_match_len([5]) == 1
    c.take_loads()
    c.take_loads()  # the loads ran
    assert c.match_prefix([1, 2]).num_tokens == 2  # used again: [6] is now the least recently used device leaf
    c.evict(1)  # [6] needs a slot: the oldest copy ([1]'s) goes, not a host page
    assert c.host_copy_pages == 1 and c.host_match_len([5]) == 1 and c.host_match_len([6]) == 1
    assert list(radix_copies(c)) == [("", (1, 2))]  # [2]'s copy is the one left
    assert host.pages_saved == 5 and c.peek_prefix_len([1, 2]) == 2
    assert c.evict(2) == 2  # [7] (older) takes [2]'s copy's slot; then [2], without a copy, host page [5]'s
    assert c.host_copy_pages == 0 and c.host_match_len([7]) == 1 and c.host_match_len([5]) == 0
    assert c.peek_prefix_len([1, 2]) == 1 and c.host_match_len([1, 2]) == 1 and host.pages_saved == 7
    c.check_integrity()


# ------------------------------------------------------------------------------------- runner copies
def test_transfer_chunks_cover_every_page_once_without_padding():
    from sgl_jax.runner_pages import TRANSFER_WIDTHS, transfer_chunks

    assert transfer_chunks(0) == [] and transfer_chunks(13) == [(0, 8), (8, 4), (12, 1)]
    for n in range(1, 70):
        chunks = transfer_chunks(n)
        assert [start for start, _ in chunks] == list(itertools.accumulate([0] + [w for _, w in chunks[:-1]]))
        assert sum(w for _, w in chunks) == n and all(w in TRANSFER_WIDTHS for _, w in chunks)
        assert len(chunks) == n // 16 + bin(n % 16).count("1")  # the fewest calls these widths allow


@pytest.mark.parametrize("kv_dtype,n", [("float32", 12), ("float16", 12), ("float16", 1), ("float16", 35),
                                        ("float8_e4m3fn", 12), ("fp8_e5m2", 1)])
def test_runner_save_then_load_restores_pages_bit_for_bit(tiny_path, kv_dtype, n):
    """Pages saved to the host arena (as one array, and straight into slots: consecutive and scattered) and loaded
    back into a clobbered pool come back bit for bit, in calls of every transfer width (12 = 8 + 4, 35 = 16 + 16
    + 2 + 1) with a page repeated."""
    with Engine(model=tiny_path, progress=False, **dict(TIGHT, kv_dtype=kv_dtype)) as e:
        r = e.runner
        e.generate(input_ids=_prompts(1, 40, 3)[0], sampling_params=GREEDY)  # something in the pool
        pages = [3] if n == 1 else [1 + i % 23 for i in range(n - 1)] + [3]  # the pool has 24 pages past the sink
        before = [np.asarray(k[np.asarray(pages)]).copy() for k, _ in r.kv]
        data = r.save_pages(pages)
        assert data.shape == (len(pages), r.page_bytes) and data.dtype == np.uint8
        for rows in (range(5, 5 + len(pages)), [3 * i + 1 for i in range(len(pages))][::-1]):  # a slice, scattered
            arena = np.zeros((max(rows) + 2, r.page_bytes), np.uint8)
            r.save_pages_into(pages, arena, rows)
            np.testing.assert_array_equal(arena[list(rows)], data)
            assert not np.delete(arena, list(rows), axis=0).any()
        r.host_arena = np.zeros((len(pages), r.page_bytes), np.uint8)
        r.host_arena[:] = data
        r.kv = tuple((k * 0 + 7, v * 0 + 7) for k, v in r.kv)  # clobber the pool
        r.load_pages([(i, p) for i, p in enumerate(pages)])
        for layer, (k, v) in enumerate(r.kv):
            np.testing.assert_array_equal(np.asarray(k[np.asarray(pages)]), before[layer])


# ------------------------------------------------------------------------------------- engine
def test_evicted_prefix_comes_back_from_the_host_tier(tiny_path):
    """A 40-token prompt is pushed out of the 24-page device pool by three others; asked again, its 40 tokens are
    matched on the host tier and loaded (no prefill of them), and the output is the independent forward's. With the
    hierarchical cache off the same run recomputes it."""
    a, *others = _prompts(4, 40, seed=21)
    want = reference_greedy(tiny_path, a, GREEDY["max_new_tokens"])
    with Engine(model=tiny_path, progress=False, **TIGHT) as e:
        assert e.generate(input_ids=a, sampling_params=GREEDY)["output_ids"] == want
        for p in others:
            e.generate(input_ids=p, sampling_params=GREEDY)
        s, cache = e.scheduler, e.scheduler.cache
        assert cache.pages_demoted > 0 and cache.host_cached_pages > 0
        assert e.scheduler.cache.peek_prefix_len(a) < 40 <= cache.peek_prefix_len(a) + cache.host_match_len(a)
        again = e.generate(input_ids=a, sampling_params=GREEDY)
        assert again["output_ids"] == want
        assert again["meta_info"]["cached_tokens"] >= 36 and s.host_tokens_loaded >= 36 - cache.peek_prefix_len(a)
        tiers = e.stats()["cache_tiers"]
        assert tiers["pages_promoted"] > 0 and tiers["host_tokens_loaded"] == s.host_tokens_loaded
        e.check_integrity()
        assert e.flush_cache() and cache.host_cached_pages == 0
        e.check_integrity()
    with Engine(model=tiny_path, progress=False, **dict(TIGHT, disable_hierarchical_cache=True)) as e:
        e.generate(input_ids=a, sampling_params=GREEDY)
        for p in others:
            e.generate(input_ids=p, sampling_params=GREEDY)
        again = e.generate(input_ids=a, sampling_params=GREEDY)
        assert again["output_ids"] == want and again["meta_info"]["cached_tokens"] < 36
        assert e.scheduler.cache.host is None


def test_a_hit_the_cost_model_prices_above_recompute_is_recomputed(tiny_path):
    a, *others = _prompts(4, 40, seed=22)
    want = reference_greedy(tiny_path, a, GREEDY["max_new_tokens"])
    with Engine(model=tiny_path, progress=False, **TIGHT) as e:
        e.scheduler.transfer_costs = TransferCosts(prefill_s_per_token=1e-6, load_s_fixed=1.0, load_s_per_token=0.0)
        for p in [a] + others:
            e.generate(input_ids=p, sampling_params=GREEDY)
        host_len = e.scheduler.cache.host_match_len(a)
        assert host_len > 0
        again = e.generate(input_ids=a, sampling_params=GREEDY)
        assert again["output_ids"] == want
        # (the prompt's last page is computed anyway: a request samples from its last prompt token)
        assert e.scheduler.host_tokens_loaded == 0
        assert e.scheduler.host_tokens_recomputed >= host_len - TIGHT["page_size"]
        e.check_integrity()


def test_many_conversations_through_a_small_pool_keep_outputs_and_invariants(tiny_path):
    """Multi-turn: 6 conversations of 3 turns, each turn the previous prompt + output + a new question, batched
    per turn through the 24-page pool (host tier on): every answer equals the same engine's without a host tier,
    and the host tier served part of the prefixes."""
    rng = random.Random(5)
    convs = [[rng.randrange(3, 297) for _ in range(12)] for _ in range(6)]
    outs = {}
    for hier in (True, False):
        with Engine(model=tiny_path, progress=False, **dict(TIGHT, disable_hierarchical_cache=not hier)) as e:
            hist = [list(c) for c in convs]
            answers = []
            for turn in range(3):
                res = e.generate(input_ids=hist, sampling_params=GREEDY)
                for h, r in zip(hist, res):
                    h += r["output_ids"] + [rng.randrange(3, 297) for _ in range(4)]
                answers.append([r["output_ids"] for r in res])
                e.check_integrity()
            outs[hier] = answers
            if hier:
                assert e.scheduler.host_tokens_loaded > 0
        rng = random.Random(5)
        convs = [[rng.randrange(3, 297) for _ in range(12)] for _ in range(6)]
    assert outs[True] == outs[False]


def test_transfer_costs_measured_at_warmup(tiny_path, tmp_path):
    # warmup on, with one bucket of each kind (the prefill's largest, which the prices are measured on): the rest
    # of SMALL's 13 shapes would compile in the background only to be waited for at shutdown
    grid = dict(decode_buckets=[4], prefill_block_buckets=SMALL["prefill_block_buckets"][-1:], max_mixed_blocks=0)
    with Engine(model=tiny_path, progress=False, **dict(TIGHT, warmup=True, disk_dir=str(tmp_path), **grid)) as e:
        c = e.scheduler.transfer_costs
        assert c.measured and c.prefill_s_per_token > 0 and c.load_s_per_token >= 0 and c.disk_s_per_token > 0
        # a page's K/V copy costs far less than recomputing its tokens (~40x on this tiny model): a hit loads.
        # Whether a disk read pays is left to the machine here: the tiny model's prefill (~8 us a token) is about
        # the cost of reading its page file back (bench/notes.md has the real model's table)
        assert c.load_pays(TIGHT["page_size"] * 4)
        assert e.stats()["cache_tiers"]["transfer_costs"]["disk_us_per_token"] > 0
