"""The scheduler driven by a mock model (no jax): next token = (last token * 7 + position) % V.

The mock's outputs can be worked out by hand, so every test knows the exact expected tokens.
"""

import random
import subprocess
import sys

import numpy as np
import pytest

from sgl_jax.cache import HostPool, PageAllocator, RadixCache
from sgl_jax.config import SchedulerConfig
from sgl_jax.scheduler import ReqState, Request, Scheduler
from sgl_jax.shapes import ShapeGrid

V = 1000


def mock_next(tokens_so_far: list[int]) -> int:
    return (tokens_so_far[-1] * 7 + len(tokens_so_far)) % V


def expected_output(prompt, n):
    toks = list(prompt)
    for _ in range(n):
        toks.append(mock_next(toks))
    return toks[len(prompt):]


def make(num_pages=200, page_size=4, policy="lpm", max_running=8, disabled=False, host_slots=0, **kw):
    alloc = PageAllocator(num_pages)
    host = HostPool(host_slots, page_size * 8) if host_slots else None  # a page: page_size int64 "K/V" tokens
    cache = RadixCache(alloc, page_size, disabled=disabled, host=host)
    grid = ShapeGrid(page_size=page_size, prefill_block=8,
                     prefill_block_buckets=kw.pop("block_buckets", (1, 2, 4, 8)),
                     max_mixed_blocks=kw.pop("mixed_blocks", 2),
                     decode_buckets=kw.pop("decode_buckets", (1, 2, 4, 8, 16, max_running)),
                     page_width_buckets=kw.pop("page_width_buckets", (8, 64, 4096 // page_size)),
                     run_block=kw.pop("run_q", 8), run_block_buckets=kw.pop("run_buckets", ()),
                     costs=kw.pop("decode_costs", {}), full_logit_rows=kw.pop("full_rows", 0))
    kw.pop("max_decode_rows", None)  # the grid's largest decode bucket
    if "decode_fill" in kw:  # "cost" = auto with measured costs
        kw["decode_row_fill"] = {"cost": "auto"}.get(kw["decode_fill"], kw["decode_fill"])
        del kw["decode_fill"]
    if "short_chunk" in kw:
        kw["decode_row_chunk"] = kw.pop("short_chunk")
    cfg = SchedulerConfig(max_running_requests=max_running, max_prefill_tokens=kw.pop("budget", 64),
                          schedule_policy=policy, **kw)
    return Scheduler(cache, cfg, grid, max_context=4096)


class MockRunner:
    """Computes 'KV' as the token itself in a page-addressed store, so stale or wrong pages are caught."""

    def __init__(self, page_size):
        self.ps = page_size
        self.store: dict[tuple[int, int], int] = {}
        self.computed_tokens = 0
        self.host = None

    def attach(self, s: "Scheduler") -> "MockRunner":
        """Serve the scheduler's host tier: demotions read pages from the store, loads write them back."""
        self.host = s.cache.host
        if self.host is not None:
            self.host.bind(lambda pages: np.asarray([[self.store.get((p, i), -1) for i in range(self.ps)]
                                                     for p in pages], np.int64).view(np.uint8))
        return self

    def _copy(self, pairs):
        # partial-page reuse: whole pages copied, every source read before any page is written
        moved = [{(d, i): self.store.get((src, i)) for i in range(self.ps)} for src, d in pairs]
        for m in moved:
            self.store.update({k: v for k, v in m.items() if v is not None})

    def _load(self, loads):
        for slot, page in loads:
            for i, t in enumerate(self.host.arena[slot].view(np.int64)):
                if t >= 0:
                    self.store[(page, i)] = int(t)
                else:
                    self.store.pop((page, i), None)

    def run(self, plan):
        out = {}
        after = plan.copy_after or [0] * len(plan.copies)
        done = 0
        for pair, k in zip(plan.copies, after):  # in the scheduler's order, as the runner does
            self._load(plan.loads[done:k])
            done = max(done, k)
            self._copy([pair])
        self._load(plan.loads[done:])
        self.copied_pages = getattr(self, "copied_pages", 0) + len(plan.copies)
        for c in plan.chunks:  # every chunk's "KV" written before any is read, as each layer of a step does
            r = c.req
            for i, t in enumerate(c.token_ids):
                pos = c.start + i
                self.store[(r.pages[pos // self.ps], pos % self.ps)] = t
            self.computed_tokens += len(c.token_ids)
            if c.borrow is not None:  # the lender's rows written a second time, into the borrower's pages
                lead, first = c.borrow
                (lc,) = [x for x in plan.chunks if x.req is lead and x.borrow is None]
                assert lc.start <= first <= c.start <= lc.end, "a borrow outside its lender's chunk"
                for pos in range(first, c.start):
                    self.store[(r.pages[pos // self.ps], pos % self.ps)] = lc.token_ids[pos - lc.start]
                self.borrowed = getattr(self, "borrowed", 0) + c.start - first
        for c in plan.chunks:
            r = c.req
            if c.samples:
                # read every earlier position back through the page table: a wrong page shows up here
                seq = [self.store[(r.pages[p // self.ps], p % self.ps)] for p in range(c.end)]
                assert seq == r.tokens(0, c.end), f"KV pages of {r.rid} hold the wrong tokens"
                out[r.rid] = mock_next(seq)
        return out


def apply_outputs(s: Scheduler, plan, out: dict, done: dict) -> None:
    """After on_step_done: append each sampling chunk's token, finish what is complete (into `done`)."""
    for c in plan.chunks:
        r = c.req
        if r.state is not ReqState.RUNNING:
            continue
        if c.samples:
            r.output_ids.append(out[r.rid])
            if len(r.output_ids) >= r.max_new_tokens:
                s.finish(r)
                done[r.rid] = list(r.output_ids)
        elif not r.wants_sample and r.num_computed >= r.num_tokens:
            s.finish(r)
            done[r.rid] = []


def drive(s: Scheduler, runner: MockRunner, max_steps=10000, abort_at=None, check=True):
    steps = 0
    done = {}
    while s.has_work:
        plan = s.schedule()
        assert plan is not None, "work pending but nothing scheduled"
        # the plan carries a shape of the (runner's) grid, the one the runner will run
        assert plan.shape in s.grid.shapes(), plan.shape
        assert plan.shape == s.grid.shape_for(plan.decodes, plan.prefills, plan.full_logits)
        out = runner.run(plan)
        s.on_step_done(plan)
        apply_outputs(s, plan, out, done)
        if check:
            s.check_integrity()
        steps += 1
        if abort_at and steps in abort_at:
            for rid in abort_at[steps]:
                s.abort(rid)
            s.check_integrity()
        assert steps < max_steps
    return done, steps


def completion_order(s: Scheduler, runner: MockRunner) -> list[str]:
    """Run one-token requests to completion; the order in which they finished (cache invariants checked)."""
    order = []
    while s.has_work:
        plan = s.schedule()
        runner.run(plan)
        s.on_step_done(plan)
        for c in plan.chunks:
            if c.samples:
                c.req.output_ids.append(0)
                order.append(c.req.rid)
                s.finish(c.req)
        s.check_integrity()
    return order


def test_outputs_match_mock_and_pages_hold_the_right_tokens():
    s = make()
    rng = random.Random(0)
    reqs = []
    for i in range(20):
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 50))]
        reqs.append(Request(f"r{i}", prompt, rng.randrange(0, 20)))
        s.add(reqs[-1])
    done, _ = drive(s, MockRunner(4))
    for r in reqs:
        assert done[r.rid] == expected_output(r.prompt_ids, r.max_new_tokens)
    assert not s.running and not s.waiting
    assert s.alloc.num_free + s.cache.evictable_pages == s.alloc.num_total


@pytest.mark.parametrize("disabled", [False, True])
def test_cold_burst_computes_shared_prefix_once(disabled):
    prefix = list(range(1, 401))
    s = make(num_pages=400, max_running=16, budget=512, disabled=disabled, block_buckets=(1, 2, 4, 8, 16, 32, 64))
    runner = MockRunner(4)
    for i in range(16):
        s.add(Request(f"r{i}", prefix + [500 + i, 600 + i, 700 + i], 4))
    done, _ = drive(s, runner)
    assert len(done) == 16
    if disabled:
        assert runner.computed_tokens >= 16 * 400
    else:
        # the prefix once, then each request recomputes at most a partial page plus its suffix
        assert runner.computed_tokens <= 400 + 16 * (4 + 3 + 4), runner.computed_tokens


def test_a_burst_on_a_new_prefix_shares_it_in_the_step_that_computes_it():
    """Requests sharing an uncached prefix that fits one step: the first computes it, the others are admitted
    in the same step onto its pages (committed ahead of the step) and compute only past the last whole page
    of it. The mock runner writes every chunk before reading any back through the page tables, as a layer
    does, so a sharer reading a page nobody wrote fails; outputs equal a cache-off run's."""
    prefix = list(range(1, 31))  # 7 whole pages + 2 tokens

    def run(disabled):
        s = make(num_pages=200, budget=128, disabled=disabled)
        runner = MockRunner(4)
        for i in range(4):
            s.add(Request(f"r{i}", prefix + [500 + i, 600 + i], 3))
        first = s.schedule()
        users = [r.rid for r in s.early_users()]
        out = runner.run(first)
        s.on_step_done(first)
        assert s.early_users() == []  # the step is done: nothing is pending
        done = {}
        apply_outputs(s, first, out, done)
        s.check_integrity()
        more, _ = drive(s, runner)
        done.update(more)
        return done, first, s, runner, users

    ref, plan0, _, off, _ = run(True)
    done, plan, s, runner, users = run(False)
    assert done == ref
    assert [c.req.rid for c in plan.prefills] == ["r0", "r1", "r2", "r3"]  # all four prompts in the first step
    # the prefix's whole pages shared; its last partial page's 2 tokens borrowed from r0's rows
    assert [c.start for c in plan.prefills] == [0, 30, 30, 30]
    assert [c.borrow and (c.borrow[0].rid, c.borrow[1]) for c in plan.prefills] == [None] + [("r0", 28)] * 3
    (e,) = plan.early
    assert e.keep == 0 and e.tokens == tuple(prefix[:28]) and users == ["r0", "r1", "r2", "r3"]
    assert s.shared_in_step == 3 and not plan0.early and s.borrowed_tokens == 3 * 2
    assert runner.computed_tokens == 32 + 3 * 2 + 4 * 2  # prompts (the prefix once), then 2 decodes each


def test_no_partial_page_copy_reads_a_page_its_step_has_yet_to_write():
    """A short prompt matching part of a page committed ahead of the step (shared within it): copies run
    before the step, so it must not copy that page (the mock store then lacks those positions and the
    read-back fails); outputs equal each prompt's alone."""
    s = make(num_pages=200, budget=16, mixed_blocks=0)
    runner = MockRunner(4)
    ps = [list(range(3, 3 + n)) for n in (9, 17, 3)]
    for i, p in enumerate(ps):
        s.add(Request(f"r{i}", p, 4))
    done, _ = drive(s, runner)
    assert s.shared_in_step == 1
    assert done == {f"r{i}": expected_output(p, 4) for i, p in enumerate(ps)}


def _burst_on_shared_prefixes(seed: int) -> tuple[int, int]:
    """One random run for the test below; returns how many requests shared a prefix within a step, and how many
    prompt tokens they borrowed from another's rows in it."""
    rng = random.Random(100 + seed)
    s = make(num_pages=rng.choice([30, 40, 60, 200]), budget=rng.choice([16, 32, 64]), max_running=8,
             mixed_blocks=rng.choice([0, 2]), host_slots=rng.choice([0, 0, 24]))
    runner = MockRunner(4).attach(s)
    prefixes = [[rng.randrange(V) for _ in range(rng.randrange(3, 40))] for _ in range(rng.choice([4, 6]))]
    k = 0
    for wave in range(2):  # the second on the same prefixes: found on the device, the host tier, or recomputed
        reqs = []
        for prefix in prefixes:
            for _ in range(rng.randrange(2, 6)):
                cut = rng.randrange(1, len(prefix) + 1) if rng.random() < 0.2 else len(prefix)
                prompt = prefix[:cut] + [rng.randrange(V) for _ in range(rng.randrange(0, 6))]
                start = rng.choice([-1, -1, max(len(prompt) - 3, 0)])
                reqs.append(Request(f"r{k}", prompt, rng.randrange(1, 12), logprob_start=start))
                k += 1
        for r in reqs:
            s.add(r)
        aborted = {rng.choice(reqs).rid for _ in range(2)}
        done, _ = drive(s, runner, abort_at={2: sorted(aborted)})
        for r in reqs:
            if r.rid in done:
                assert done[r.rid] == expected_output(r.prompt_ids, r.max_new_tokens), (seed, r.rid)
            else:
                assert r.rid in aborted, (seed, r.rid)
        assert s.alloc.num_free + s.cache.evictable_pages == s.alloc.num_total
    assert s.borrowed_tokens == getattr(runner, "borrowed", 0)
    return s.shared_in_step, s.borrowed_tokens


def test_bursts_on_shared_prefixes_against_the_mock():
    """Random bursts of prompts sharing new prefixes (lengths on and off page boundaries, short suffixes,
    prompts ending inside another's first pages), in a pool small enough to evict (to a host tier in a third of
    the runs), some asking for prompt logprobs, with aborts: outputs equal the mock's, every page read back holds
    its token, the invariants hold after every step; in most runs some requests shared a prefix within a step, and
    borrowed the rows of its last partial page from the request computing it."""
    shared = [_burst_on_shared_prefixes(seed) for seed in range(16)]
    assert sum(n > 0 for n, _ in shared) >= 8, shared
    assert sum(b > 0 for _, b in shared) >= 8, shared


def test_no_host_load_below_a_prefix_shared_in_its_step():
    """A follower admitted onto a prefix committed ahead of its step does not load its continuation from the host
    tier in that step (a load would lock pages below the prefix, and a failed step could then not take the
    prefix out again): it computes it; the next request loads it as usual. Outputs equal the mock's."""
    from sgl_jax.cache.costs import TransferCosts

    s = make(num_pages=60, host_slots=32, policy="fcfs", budget=64)
    runner = MockRunner(4).attach(s)
    s.transfer_costs = TransferCosts(prefill_s_per_token=1.0, load_s_fixed=10.0, load_s_per_token=0.1)  # > 11 tok
    prefix, cont = list(range(1, 9)), list(range(100, 116))  # 2 pages (a load does not pay), 4 pages (it does)
    s.add(Request("r0", prefix + cont + [7], 2))
    done, _ = drive(s, runner)
    s.cache.evict(s.cache.evictable_pages)  # all of it to the host tier
    assert s.cache.peek_prefix_len(prefix + cont) == 0 and s.cache.host_match_len(prefix + cont) == 24
    o = Request("o", prefix + list(range(200, 208)) + [9], 2)
    r = Request("r", prefix + cont + [8], 2)
    s.add(o)
    s.add(r)
    plan = s.schedule()
    assert [c.req.rid for c in plan.prefills] == ["o", "r"] and len(plan.early) == 1
    assert plan.prefills[1].start == 8 and plan.loads == []  # r computes its continuation
    s.check_integrity()
    runner.run(plan)
    s.on_step_done(plan)
    apply_outputs(s, plan, {c.req.rid: mock_next(c.req.tokens(0, c.end)) for c in plan.chunks if c.samples}, done)
    more, _ = drive(s, runner)
    done.update(more)
    s.add(Request("r2", prefix + cont + [8], 2))  # on the device now (r computed it)
    loaded = s.host_tokens_loaded
    more, _ = drive(s, runner)
    done.update(more)
    for rid, prompt in (("o", o.prompt_ids), ("r", r.prompt_ids), ("r2", r.prompt_ids)):
        assert done[rid] == expected_output(prompt, 2), rid
    assert s.host_tokens_loaded == loaded


def test_a_prefix_computed_over_several_steps_is_waited_for():
    """When the first request's chunk does not reach the shared prefix's end this step, the others wait for
    it (sharing in the step would need KV a later step writes); they join the step of its last chunk."""
    prefix = list(range(1, 101))
    s = make(num_pages=200, budget=64)
    runner = MockRunner(4)
    for i in range(3):
        s.add(Request(f"r{i}", prefix + [500 + i], 2))
    plan = s.schedule()
    assert [c.req.rid for c in plan.prefills] == ["r0"] and not plan.early
    runner.run(plan)
    s.on_step_done(plan)
    s.check_integrity()
    done, _ = drive(s, runner)
    assert done == {f"r{i}": expected_output(prefix + [500 + i], 2) for i in range(3)}
    assert s.shared_in_step == 2


def test_a_failed_step_takes_the_prefix_it_shared_out_of_the_cache():
    """The step that was to compute a prefix shared ahead of it fails: once its requests are released, the
    prefix's pages leave the cache (their KV was never written) and every page is accounted for; a hold on
    them taken meanwhile makes the discard refuse, changing nothing."""
    prefix = list(range(1, 31))
    s = make(num_pages=200, budget=128)
    for i in range(3):
        s.add(Request(f"r{i}", prefix + [500 + i], 2))
    plan = s.schedule()
    assert len(plan.early) == 1 and sorted(r.rid for r in s.early_users()) == ["r0", "r1", "r2"]
    hold = s.cache.match_prefix(prefix[:28]).node
    s.cache.lock(hold)  # a prefix hold taken while the step runs
    for r in list(s.running):
        s.abort(r.rid)
    assert not s.discard_early(plan)
    assert s.cache.peek_prefix_len(prefix) == 28
    s.cache.unlock(hold)
    assert s.discard_early(plan)
    assert s.cache.peek_prefix_len(prefix) == 0 and s.cache.cached_pages == 0
    s.check_integrity()
    assert s.alloc.num_free == s.alloc.num_total
    runner = MockRunner(4)  # and the same burst again computes everything afresh
    for i in range(3):
        s.add(Request(f"again{i}", prefix + [500 + i], 2))
    done, _ = drive(s, runner)
    assert done == {f"again{i}": expected_output(prefix + [500 + i], 2) for i in range(3)}


def test_cache_hit_reuses_pages_and_gives_same_output():
    s = make()
    prompt = list(range(10, 60))
    runner = MockRunner(4)
    s.add(Request("a", prompt, 5))
    done1, _ = drive(s, runner)
    computed = runner.computed_tokens
    s.add(Request("b", prompt, 5))
    b = s.waiting[0]
    done2, _ = drive(s, runner)  # the runner re-reads every cached page: wrong pages would fail here
    # 12 full pages of the 50-token prompt, and 1 token of a's 13th page (copied): all but the last token
    assert b.cached_tokens == 49 and runner.copied_pages == 1
    assert runner.computed_tokens - computed == 1 + 4  # the last prompt token + 4 decodes
    assert done2["b"] == done1["a"]


def test_branches_diverging_mid_page_compute_only_their_own_tokens():
    """Fork branches: a cached prefix ending mid-page, then each branch's few tokens. Each branch's own page
    starts as a copy of the prefix's partly matching page; the runner re-reads every position through the
    page tables, so a wrong or missing copy fails here, and the outputs equal a cache-off run's."""
    def run(disabled):
        s = make(page_size=4, max_running=8, disabled=disabled)
        runner = MockRunner(4)
        prefix = list(range(100, 118))  # 4 whole pages + 2 tokens
        s.add(Request("p", prefix, 3))
        drive(s, runner)
        before = runner.computed_tokens
        for i in range(3):
            s.add(Request(f"b{i}", prefix + [7 + i, 8, 9], 4))
        done, _ = drive(s, runner)
        return s, runner, runner.computed_tokens - before, done

    s, runner, computed, done = run(False)
    _, _, computed_off, done_off = run(True)
    assert done == done_off
    # prefix + the first 2 outputs are cached (20 tokens = 5 pages): each branch computes its 3 tokens, then
    # 3 decodes; the 5th page is partly reused (2 of its tokens) by a copy, one per branch
    assert computed == 3 * (3 + 3), computed
    assert s.partial_tokens == 3 * 2 and runner.copied_pages == 3
    assert computed_off == 3 * (21 + 3)


def test_the_next_turn_continues_from_the_last_turns_tail_page():
    """A finished request's partly filled last page stays as a tail: the next chat turn (its prompt + output +
    more) reuses every computed token, the tail's through a copy; outputs equal a cache-off run's."""
    def run(disabled):
        s = make(page_size=4, disabled=disabled)
        runner = MockRunner(4)
        first = list(range(100, 118))
        s.add(Request("t1", first, 2))  # computes 18 + 1 tokens: 4 pages and a 3-token tail
        done, _ = drive(s, runner)
        s.add(Request("t2", first + done["t1"] + [5, 6], 3))
        t2 = s.waiting[0]
        done2, _ = drive(s, runner)
        return s, t2, runner, done2

    s, t2, runner, done = run(False)
    assert run(True)[3] == done
    assert t2.cached_tokens == 19 and s.partial_tokens == 3 and runner.copied_pages == 1
    s.check_integrity()


def test_a_pending_page_copy_goes_with_its_request():
    """A request admitted with a partial-page copy, aborted before any step ran it: the copy is dropped
    with the page it was to write (the freed page may be handed to another request)."""
    s = make(page_size=4)
    runner = MockRunner(4)
    s.add(Request("a", list(range(10, 23)), 1))  # 3 whole pages cached
    drive(s, runner)
    s.add(Request("b", list(range(10, 19)) + [5], 2))  # 2 pages + 1 token of the third
    (b,) = s._admit(lambda r: True, [], 0, [])
    assert b.cached_tokens == 9 and s._copies == [(s.cache.match_prefix(list(range(10, 22))).pages[2], b.pages[2])]
    s.abort("b")
    assert s._copies == []
    s.check_integrity()


def test_retraction_under_small_pool_resumes_with_identical_output():
    s = make(num_pages=40, page_size=4, max_running=8, new_token_ratio=0.0)
    rng = random.Random(1)
    reqs = [Request(f"r{i}", [rng.randrange(V) for _ in range(20)], 30) for i in range(12)]
    for r in reqs:
        s.add(r)
    done, _ = drive(s, MockRunner(4))
    assert s.num_retractions > 0
    for r in reqs:
        assert done[r.rid] == expected_output(r.prompt_ids, 30)


def test_abort_anywhere_frees_everything():
    s = make(num_pages=60)
    rng = random.Random(2)
    for i in range(10):
        s.add(Request(f"r{i}", [rng.randrange(V) for _ in range(30)], 40))
    drive(s, MockRunner(4), abort_at={1: ["r0", "r9"], 3: ["r1", "r2"], 7: ["r3", "nope"]})
    s.check_integrity()
    assert s.alloc.num_free + s.cache.evictable_pages == s.alloc.num_total
    s.cache.reset()
    assert s.alloc.num_free == s.alloc.num_total


def test_lpm_prefers_cached_prefix_and_starvation_guard_bounds_bypass():
    s = make(policy="lpm", max_running=1, starvation_limit=3)
    shared = list(range(100, 164))
    runner = MockRunner(4)
    s.add(Request("warm", shared + [1], 1))
    drive(s, runner)
    s.add(Request("cold", list(range(900, 964)), 1))  # arrives first, nothing cached
    for i in range(6):
        s.add(Request(f"hot{i}", shared + [i + 2], 1))
    order = completion_order(s, runner)
    # cache-aware: hot requests first, but the cold one is bypassed at most starvation_limit times
    assert order.index("cold") <= 3, order
    assert order[0].startswith("hot")


def test_fcfs_order():
    s = make(policy="fcfs", max_running=1)
    for i in range(4):
        s.add(Request(f"r{i}", [i + 1] * 5, 1))
    order = completion_order(s, MockRunner(4))
    assert order == ["r0", "r1", "r2", "r3"]


def test_dfs_weight_groups_shared_prefixes():
    s = make(policy="dfs-weight", max_running=1)
    a, b = list(range(100, 132)), list(range(200, 232))
    runner = MockRunner(4)
    s.add(Request("seed_a", a + [1], 1))
    s.add(Request("seed_b", b + [1], 1))
    drive(s, runner)
    for i, base in enumerate([a, b, b, a, b]):
        s.add(Request(f"q{i}", base + [50 + i], 1))
    order = completion_order(s, runner)
    # weights are recomputed every step: b (3 waiting) first; after two b's ran, a (2) outweighs b (1)
    assert order == ["q1", "q2", "q0", "q3", "q4"], order


def test_prefill_only_request_caches_prompt():
    s = make()
    s.add(Request("p", list(range(1, 30)), 0))
    done, _ = drive(s, MockRunner(4))
    assert done["p"] == []
    assert s.cache.evictable_pages == 8 and s.cache.num_tails == 1  # 7 whole pages, the 29th token in a tail


def test_mixed_steps_and_chunked_prefill_budget():
    s = make(budget=16)
    s.add(Request("short", [5, 6], 20))
    saw_mixed = False
    runner = MockRunner(4)
    done = {}
    steps = 0
    while s.has_work:
        steps += 1
        if steps == 3:  # a long prompt arrives while "short" is decoding
            s.add(Request("long", list(range(1, 100)), 3))
        plan = s.schedule()
        assert sum(len(c.token_ids) for c in plan.prefills) <= 16
        saw_mixed |= bool(plan.decodes) and bool(plan.prefills)
        out = runner.run(plan)
        s.on_step_done(plan)
        for c in plan.chunks:
            if c.samples:
                c.req.output_ids.append(out[c.req.rid])
                if len(c.req.output_ids) >= c.req.max_new_tokens:
                    done[c.req.rid] = list(c.req.output_ids)
                    s.finish(c.req)
        s.check_integrity()
    assert saw_mixed
    assert done["long"] == expected_output(list(range(1, 100)), 3)


def test_scheduling_cost_with_1000_queued(capsys):
    """Cache-aware ordering stays on with 1,000+ queued; print the per-step cost (not asserted)."""
    import time

    s = make(num_pages=4000, max_running=16, budget=64)
    rng = random.Random(3)
    prefixes = [[rng.randrange(V) for _ in range(200)] for _ in range(20)]
    for i in range(1200):
        s.add(Request(f"r{i}", prefixes[i % 20] + [rng.randrange(V) for _ in range(20)], 2))
    t = time.perf_counter()
    plan = s.schedule()
    dt = time.perf_counter() - t
    assert plan is not None and s.cfg.schedule_policy == "lpm"
    print(f"\nschedule() with {len(s.waiting)} waiting: {dt * 1e3:.1f} ms")


def test_host_modules_do_not_import_jax():
    code = ("import sys; sys.modules['jax'] = None; sys.modules['jaxlib'] = None\n"
            "import sgl_jax.scheduler, sgl_jax.cache, sgl_jax.batch, sgl_jax.config, sgl_jax.models.config\n"
            "import sgl_jax.cache.disk_store, sgl_jax.cache.disk_tier, sgl_jax.cache.costs, sgl_jax.cache.tiers, sgl_jax.metrics\n"
            "import sgl_jax.parallel, sgl_jax.parallel.multihost, sgl_jax.cache.events, sgl_jax.router.policy\n"
            "import sgl_jax.router.server, sgl_jax.router.front, sgl_jax.router.upstream, sgl_jax.serve.kv_events\n"
            "import sgl_jax.shapes, sgl_jax.engine.prepare, sgl_jax.engine.loop, sgl_jax.engine.output\n"
            "import sgl_jax.engine.constraints, sgl_jax.engine.stops, sgl_jax.engine.protocol, sgl_jax.engine.host_memory\n"
            "import sgl_jax.constrained, sgl_jax.models.tokenizer\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def _forced_run(t):
    """The mock's 'jump-forward': after a sampled token divisible by 5, 6 more tokens are appended unsampled."""
    return [(t + i) % V for i in range(1, 7)] if t % 5 == 0 else []


def _expected_with_runs(prompt, n):
    toks = list(prompt)
    while len(toks) - len(prompt) < n:
        t = mock_next(toks)
        toks += [t] + _forced_run(t)
    return toks[len(prompt):len(prompt) + n]


def _drive_jump_forward(s: Scheduler, seed: int, on_plan) -> None:
    """Run 5 requests through `s` with the mock's forced runs; on_plan(plan) sees every step's plan.
    Outputs must equal the sequential reference and the cache must keep its invariants."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(3, 12))] for _ in range(5)]
    for i, p in enumerate(prompts):
        s.add(Request(f"r{i}", p, max_new_tokens=40))
    runner = MockRunner(4)
    done = {}
    while s.has_work:
        plan = s.schedule()
        on_plan(plan)
        runner.run(plan)
        s.on_step_done(plan)
        for c in plan.chunks:
            r = c.req
            if r.state is ReqState.RUNNING and c.samples:
                t = mock_next(r.tokens(0, c.end))
                r.output_ids += ([t] + _forced_run(t))[:r.max_new_tokens - len(r.output_ids)]
                if len(r.output_ids) >= r.max_new_tokens:
                    s.finish(r)
                    done[r.rid] = list(r.output_ids)
        s.check_integrity()
    for i, p in enumerate(prompts):
        assert done[f"r{i}"] == _expected_with_runs(p, 40)


@pytest.mark.parametrize("fill,costs,grows", [
    ("pad", {}, True),
    ("fit", {}, False),
    ("cost", {(b, w, 0): 1.0 + 0.01 * b for b in (1, 4, 16) for w in (8, 64)}, True),  # rows nearly free
    ("cost", {(b, w, 0): float(b) for b in (1, 4, 16) for w in (8, 64)}, False),  # every row costs its share
])
def test_multi_token_runs_size_the_step_by_decode_fill(fill, costs, grows):
    s = make(max_running=8, decode_fill=fill, decode_buckets=(1, 4, 16), page_width_buckets=(8, 64),
             decode_costs=costs, max_decode_rows=16, short_chunk=8)
    seen = {"grew": 0, "split": 0}

    def on_plan(plan):
        rows = sum(len(c.token_ids) for c in plan.decodes)
        n = len(plan.decodes)
        smallest = min(b for b in (1, 4, 16) if b >= n) if n else 0
        seen["grew"] += rows > smallest
        seen["split"] += any(not c.samples and c.req.wants_sample for c in plan.decodes)
        if not grows:
            assert rows <= smallest, (fill, rows, n)  # runs only fill the rows the decodes need anyway

    _drive_jump_forward(s, 3, on_plan)
    if grows:
        assert seen["grew"]  # runs take bigger buckets
    else:
        assert not seen["grew"] and seen["split"]  # runs are computed over several steps instead


@pytest.mark.parametrize("fill,costs,use_runs", [
    ("pad", {}, True),
    ("cost", {(b, w, r): 1.0 + 0.01 * b + 0.02 * r for b in (1, 4, 16) for w in (8, 64) for r in (0, 1, 2)}, True),
    ("cost", {(b, w, r): float(b) + 100.0 * r for b in (1, 4, 16) for w in (8, 64) for r in (0, 1, 2)}, False),
    ("fit", {}, False),
])
def test_run_blocks_chosen_by_cost_and_outputs_exact(fill, costs, use_runs):
    s = make(max_running=8, decode_fill=fill, decode_buckets=(1, 4, 16), page_width_buckets=(8, 64),
             decode_costs=costs, max_decode_rows=16, short_chunk=8, run_q=4, run_buckets=(1, 2))
    run_steps = []

    def on_plan(plan):
        runs = [c for c in plan.decodes if c.as_run]
        assert all(len(c.token_ids) <= 4 for c in runs) and len(runs) <= 2
        assert not (runs and plan.prefills)  # run blocks never share a step with prefill blocks
        run_steps.append(bool(runs))

    _drive_jump_forward(s, 5, on_plan)
    assert any(run_steps) == use_runs


# ------------------------------------------------------------------------------ prompt logprobs
def mock_logprob(seq: list[int]) -> float:
    """The mock's logprob of the token after `seq` (any deterministic function of the whole prefix)."""
    return -(sum((i + 1) * t for i, t in enumerate(seq)) % 997) / 100.0


def drive_logprobs(s: Scheduler, runner: MockRunner, on_schedule=None) -> tuple[dict, dict]:
    """Run to completion collecting prompt-logprob entries as the engine does: the logits row at position q
    gives the entry for prompt position q + 1 (a value computed from the tokens read back through the page
    table, so a stale page shows up as a wrong value); position 0's entry is None. Every entry must be
    produced exactly once, also across retraction. Returns (outputs, {rid: [(position, logprob), ...]})."""
    done, entries = {}, {}
    ps = runner.ps
    while s.has_work:
        before = {r.rid: (r.num_computed, r.retractions) for r in s.running}
        plan = s.schedule()
        assert plan is not None, "work pending but nothing scheduled"
        if on_schedule:
            on_schedule(s, plan, before)
        out = runner.run(plan)
        for c in plan.chunks:
            r = c.req
            if c.logits_from is None:
                continue
            lo = c.start if c.borrow is None else c.borrow[1]  # a borrower's rows below its start are its lender's
            assert r.logprob_start >= 0 and lo <= c.logits_from < c.end
            n = len(r.prompt_ids)
            assert c.logits_from < n, "logits of output positions requested for prompt logprobs"
            seq = [runner.store[(r.pages[p // ps], p % ps)] for p in range(c.end)]
            assert seq == r.tokens(0, c.end), f"KV pages of {r.rid} hold the wrong tokens"
            got = entries.setdefault(r.rid, [])
            for q in range(c.logits_from, c.end):
                if q == 0 and r.logprob_start == 0:
                    got.append((0, None))
                if r.logprob_start <= q + 1 < n:
                    got.append((q + 1, mock_logprob(seq[:q + 1])))
        s.on_step_done(plan)
        apply_outputs(s, plan, out, done)
        s.check_integrity()
    return done, entries


def expected_entries(prompt: list[int], start: int) -> list:
    return [(p, None if p == 0 else mock_logprob(prompt[:p])) for p in range(start, len(prompt))]


PS = 4
SWEEP_STARTS = sorted({0, 1, PS - 1, PS, PS + 1, 2 * PS - 1, 2 * PS, 2 * PS + 1, 3 * PS, 4 * PS - 1})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("budget", [64, 8])  # 8: the prompt is prefilled over several steps
@pytest.mark.parametrize("cached", [False, True])
def test_prompt_logprobs_across_page_boundaries_cached_or_not(cached, budget):
    """Issue 10 item 7: a prefix served from the radix cache has no logits, so reuse must stop short of
    logprob_start (the entry for position p is the logits row at p - 1): every entry, exactly once."""
    rng = random.Random(7)
    for n in (1, 2, PS, PS + 1, 2 * PS + 2, 4 * PS, 4 * PS + 2):
        prompt = [rng.randrange(V) for _ in range(n)]
        for start in [x for x in SWEEP_STARTS if x < n] + [n - 1]:
            s = make(page_size=PS, budget=budget)
            runner = MockRunner(PS)
            if cached:  # an earlier max_new_tokens=0 request caches the prompt's whole pages
                s.add(Request("warm", prompt, 0))
                drive_logprobs(s, runner)
            req = Request("lp", prompt, 2, logprob_start=start)
            s.add(req)
            done, entries = drive_logprobs(s, runner)
            assert entries.get("lp", []) == expected_entries(prompt, start), (n, start)
            assert len(entries["lp"]) == n - start
            assert done["lp"] == expected_output(prompt, 2)
            # up to the logprob start, within the warm request's whole pages (the last one partly, by a copy)
            reusable = min(max(start - 1, 0), n - 1, n // PS * PS)
            assert req.cached_tokens == (reusable if cached else 0), (n, start, req.cached_tokens)


@pytest.mark.timeout(60)
def test_prompt_logprobs_within_the_steps_logits_rows():
    """With the grid's full_logit_rows (8 here), a step's chunks ask for at most that many logits rows (a chunk's
    prompt logprobs from its logits_from on, one row for any other chunk): a request wanting more takes several
    steps, and every entry still arrives exactly once, in order, for requests alone and side by side."""
    rng = random.Random(11)
    s = make(page_size=PS, budget=64, full_rows=8)
    runner = MockRunner(PS)
    reqs = []
    for i, (n, start) in enumerate([(30, 0), (21, 5), (9, 8), (40, 39), (17, 1)]):
        prompt = [rng.randrange(V) for _ in range(n)]
        reqs.append((Request(f"r{i}", prompt, 2, logprob_start=start), prompt, start))
        s.add(reqs[-1][0])
    rows = []

    def on_schedule(s, plan, before):
        rows.append(sum(c.end - c.logits_from if c.logits_from is not None else 1 for c in plan.prefills))

    done, entries = drive_logprobs(s, runner, on_schedule)
    assert max(rows) <= 8 and len([x for x in rows if x == 8]) >= 3, rows  # the limit binds, and holds
    for r, prompt, start in reqs:
        assert entries[r.rid] == expected_entries(prompt, start), r.rid
        assert done[r.rid] == expected_output(prompt, 2)


@pytest.mark.timeout(60)
def test_prompt_logprobs_select_batch_shares_the_prefix_up_to_the_logprob_start():
    """The frontend's `select`: prefix cached by a max_new_tokens=0 call, then prefix + each choice with
    logprob_start = P - 2. Nothing waits for a prefix it may not reuse, and entries are exact."""
    s = make(page_size=PS, max_running=8)
    runner = MockRunner(PS)
    prefix = list(range(100, 100 + 4 * PS + 1))
    s.add(Request("prefix", prefix, 0))
    drive_logprobs(s, runner)
    P = len(prefix)
    choices = [[7, 8], [9], [10, 11, 12]]
    reqs = [Request(f"c{i}", prefix + c, 0, logprob_start=P - 2) for i, c in enumerate(choices)]
    for r in reqs:
        s.add(r)
    plans = []
    done, entries = drive_logprobs(s, runner, lambda s, plan, before: plans.append(plan))
    assert {c.req.rid for c in plans[0].prefills} == {"c0", "c1", "c2"}  # admitted together, none waits
    for r, c in zip(reqs, choices):
        # the first: whole pages, then part of the next one (copied); the others borrow the rest of the prefix
        # from its rows in the same step (their logits rows there are its rows, scored on their own tokens)
        assert r.cached_tokens == (P - 3 if r.rid == "c0" else P)
        assert entries[r.rid] == expected_entries(prefix + c, P - 2) and len(entries[r.rid]) == len(c) + 2


@pytest.mark.timeout(120)
def test_prompt_logprobs_survive_retraction_exactly_once():
    """A small pool retracts requests, some in the middle of a chunked prefill: a resumed request neither
    loses nor re-collects entries, and one whose prompt entries are all in reuses the cache freely."""
    s = make(num_pages=34, page_size=PS, max_running=8, new_token_ratio=0.0, budget=16)
    rng = random.Random(5)
    reqs = []
    for i in range(10):
        n = rng.randrange(18, 40)
        reqs.append(Request(f"r{i}", [rng.randrange(V) for _ in range(n)], 24,
                            logprob_start=rng.choice([0, 1, PS, PS + 1, n // 2, n - 1])))
        s.add(reqs[-1])
    seen = {"mid_prefill": 0, "after_prompt": 0}

    def on_schedule(s, plan, before):
        for r in reqs:
            if r.rid in before and r.retractions > before[r.rid][1]:
                seen["mid_prefill" if before[r.rid][0] < len(r.prompt_ids) else "after_prompt"] += 1
        for c in plan.prefills:
            r = c.req
            if r.logits_done >= len(r.prompt_ids):
                assert c.logits_from is None  # entries all in: no logits recomputed

    done, entries = drive_logprobs(s, MockRunner(PS), on_schedule)
    assert s.num_retractions > 0 and seen["mid_prefill"] > 0 and seen["after_prompt"] > 0, seen
    for r in reqs:
        assert done[r.rid] == expected_output(r.prompt_ids, 24)
        assert entries[r.rid] == expected_entries(r.prompt_ids, r.logprob_start), r.rid


def _drive_first_chunks(s: Scheduler, runner: MockRunner) -> tuple[dict, dict]:
    """Run to completion; (outputs, each request's first chunk), the invariants checked after every step."""
    done, firsts = {}, {}
    while s.has_work:
        plan = s.schedule()
        for c in plan.chunks:
            firsts.setdefault(c.req.rid, c)
        out = runner.run(plan)
        s.on_step_done(plan)
        apply_outputs(s, plan, out, done)
        s.check_integrity()
    return done, firsts


@pytest.mark.parametrize("logprobs", [False, True])
def test_short_suffix_after_a_cached_prefix_decodes_as_rows(logprobs):
    """Fork branches: a cached prompt, then requests that add a few tokens each. They take no prefill block
    (a 64-token block for 5 tokens): their first plan lays the suffixes out as decode rows, and the outputs
    are the mock's. A request that wants prompt logprobs, or a fresh short prompt, still prefills."""
    s = make(max_running=16, short_chunk=8)
    runner = MockRunner(4)
    prefix = list(range(1, 41))
    s.add(Request("parent", prefix, 0))
    drive(s, runner)
    kw = dict(logprob_start=41) if logprobs else {}
    reqs = [Request(f"b{i}", prefix + [100 + i] * (3 + i), 3, **kw) for i in range(4)]
    reqs.append(Request("fresh", [7, 8, 9], 3))
    for r in reqs:
        s.add(r)
    done, firsts = _drive_first_chunks(s, runner)
    assert not firsts["fresh"].as_decode  # a fresh prompt prefills
    for i in range(4):
        c = firsts[f"b{i}"]
        assert c.start == 40  # the cached prefix is not recomputed
        assert c.as_decode == (not logprobs), (i, c)
    for r in reqs:
        assert done[r.rid] == expected_output(r.prompt_ids, r.max_new_tokens), r.rid


@pytest.mark.parametrize("suffix_chunk", [2, 5])
def test_suffix_row_chunk_limits_prompt_suffixes_not_jump_forward_runs(suffix_chunk):
    """`suffix_row_chunk` bounds prompt tokens only: branch suffixes longer than it take a prefill block, shorter
    ones still decode as rows; jump-forward runs (7 tokens here) keep `decode_row_chunk` (8) and are laid out as
    decode rows. Outputs are the mock's either way, and the cache keeps its invariants."""
    s = make(max_running=16, short_chunk=8, suffix_row_chunk=suffix_chunk)
    runner = MockRunner(4)
    prefix = list(range(1, 41))
    s.add(Request("parent", prefix, 0))
    drive(s, runner)
    reqs = [Request(f"b{i}", prefix + [100 + i] * (1 + i), 3) for i in range(6)]  # suffixes of 1..6 tokens
    for r in reqs:
        s.add(r)
    done, firsts = _drive_first_chunks(s, runner)
    for i in range(6):
        c = firsts[f"b{i}"]
        assert c.start == 40 and c.as_decode == (1 + i <= suffix_chunk), (i, c)
    for r in reqs:
        assert done[r.rid] == expected_output(r.prompt_ids, r.max_new_tokens), r.rid

    s = make(max_running=8, decode_fill="pad", decode_buckets=(1, 4, 16), page_width_buckets=(8, 64),
             max_decode_rows=16, short_chunk=8, suffix_row_chunk=suffix_chunk)
    run_rows = []
    _drive_jump_forward(s, 3, lambda plan: run_rows.extend(len(c.token_ids) for c in plan.decodes if c.as_decode))
    assert max(run_rows) == 7  # a whole forced run (6 tokens after the sampled one) as decode rows


@pytest.mark.parametrize("host_slots", [3, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_tier_under_a_small_pool_keeps_every_page_right(host_slots, seed):
    """Shared prefixes, multi-turn follow-ups and partial-page branches through a 40-page pool with a host tier
    (tiny: pages dropped from it too; large: everything kept): the mock reads every position back through the
    page table at each sample, so a demoted, loaded or copied page holding the wrong tokens fails at once;
    outputs are the mock's; the invariants (both tiers) hold after every step."""
    rng = random.Random(seed)
    s = make(num_pages=41, page_size=4, host_slots=host_slots, max_running=4)
    runner = MockRunner(4).attach(s)
    prefixes = [[rng.randrange(1, V) for _ in range(rng.randrange(8, 30))] for _ in range(4)]
    done_all, history = {}, {}
    for wave in range(3):
        reqs = []
        for i in range(8):
            if wave and rng.random() < 0.6:  # a follow-up turn of an earlier request
                rid = rng.choice(sorted(history))
                prompt = history[rid] + [rng.randrange(1, V) for _ in range(rng.randrange(1, 6))]
            else:
                base = rng.choice(prefixes)
                prompt = base[:rng.randrange(len(base) // 2, len(base) + 1)] + [
                    rng.randrange(1, V) for _ in range(rng.randrange(1, 12))]
            rid = f"w{wave}-{i}"
            n = rng.randrange(2, 12)
            reqs.append((rid, prompt, n))
            s.add(Request(rid, prompt, n))
        done, _ = drive(s, runner)
        for rid, prompt, n in reqs:
            assert done[rid] == expected_output(prompt, n), rid
            history[rid] = prompt + done[rid]
        done_all.update(done)
    cache = s.cache
    assert cache.pages_demoted > 0, cache.pages_demoted
    if host_slots == 3:
        assert cache.host_pages_dropped > 0
    else:
        assert s.host_tokens_loaded > 0 and cache.pages_promoted > 0


def test_a_copy_from_a_page_promoted_in_the_same_step_reads_the_loaded_page():
    """P is pushed out to the host tier; then A (P + more) and B (P cut mid-page + other tokens) arrive together:
    A's admission loads P's pages back, and B's partial-page copy reads P's last page, loaded in the same step --
    so the copy must run after that load (StepPlan.copy_after), else B's page holds stale tokens."""
    s = make(num_pages=21, page_size=4, host_slots=32, max_running=2)
    runner = MockRunner(4).attach(s)
    p = list(range(100, 140))  # 10 pages
    s.add(Request("p", p, 1))
    drive(s, runner)
    for i in range(3):  # fillers: P goes to the host tier
        s.add(Request(f"f{i}", list(range(200 + 50 * i, 240 + 50 * i)), 1))
        drive(s, runner)
    assert s.cache.peek_prefix_len(p) < 36 and s.cache.host_match_len(p) > 0
    a, b = p + [7, 8, 9], p[:38] + [5, 6]
    s.add(Request("a", a, 3))
    s.add(Request("b", b, 3))
    plan = s.schedule()
    assert plan.loads and plan.copies and plan.copy_after[0] > 0, (plan.loads, plan.copies, plan.copy_after)
    out = runner.run(plan)
    s.on_step_done(plan)
    done = {}
    apply_outputs(s, plan, out, done)
    done.update(drive(s, runner)[0])
    assert done["a"] == expected_output(a, 3) and done["b"] == expected_output(b, 3)


@pytest.mark.timeout(60)
def test_no_decoding_request_waits_two_steps_and_fresh_prefills_go_first():
    """Prefill has priority, but no decoding request waits two steps in a row. A request whose prompt the last
    step finished got its token from that step: the next prefill-only step does not count as a second wait for it,
    so a fork's branches arriving a step apart prefill back to back and then decode together."""
    s = make(budget=64, mixed_blocks=0)
    runner = MockRunner(4).attach(s)
    done: dict = {}
    s.add(Request("a", list(range(1, 11)), 6))
    kinds, waits, last_token = [], {}, {}
    for step in range(40):
        if step == 1:  # a sibling arriving while the first branch's prefill step has just run
            s.add(Request("b", list(range(30, 44)), 6))
        if step in (4, 5, 6, 7):  # a burst of prompts while both decode
            s.add(Request(f"p{step}", [50 + step] * 12, 2))
        if not s.has_work:
            break
        plan = s.schedule()
        kinds.append("D" if plan.decodes else "P")
        out = runner.run(plan)
        s.on_step_done(plan)
        for c in plan.chunks:
            if c.samples:
                gap = step - last_token.get(c.req.rid, step)
                waits[c.req.rid] = max(waits.get(c.req.rid, 0), gap)
                last_token[c.req.rid] = step
        apply_outputs(s, plan, out, done)
        s.check_integrity()
    assert kinds[:3] == ["P", "P", "D"], kinds  # a's prompt, b's prompt, then both decode
    assert max(waits.values()) <= 2, waits  # a token at least every other step for every request
    assert done["a"] == expected_output(list(range(1, 11)), 6)
    assert done["b"] == expected_output(list(range(30, 44)), 6)
