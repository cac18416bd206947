"""The scheduler: which tokens of which requests the next step computes. Host code, no jax import.

A request's life, as the scheduler sees it:
 1. `add(req)` puts it in the waiting queue.
 2. `schedule()` orders the waiting queue by policy (longest cached prefix first by default; DFS
    over the radix tree; or FCFS), with a starvation guard, and admits requests while the step's token
    budget, the decode-slot count and the KV pool allow. Admission matches the prompt against the
    radix cache (stopping short of any position whose logits prompt logprobs need: the cache holds KV, not
    logits), locks the matched node, and reserves pages for part of the expected output. A
    request whose uncached prefix is being computed right now by another request waits one step, so a
    cold burst sharing a prefix computes it once, not once per request.
 3. Admitted requests are prefilled in chunks under the per-step token budget; decodes and prefill
    chunks share a step. After every chunk the computed, page-aligned prefix is committed to the radix
    cache, so other requests can match a prefix still being computed.
 4. Each step, every running request that has all its tokens computed decodes one token. If the pool
    runs out, the cache is evicted (LRU), then the most recently admitted request is retracted: its
    computed prefix goes to the cache, its pages are freed, and it is requeued at the front with its
    output so far, to resume later (greedy output is unchanged).
 5. The engine reports finished/aborted requests with `finish()`; their prefixes are committed to the
    cache, locks dropped and private pages freed.

`schedule()` returns one `StepPlan`: plain lists of chunks, nothing device-specific. The engine step is
`plan = scheduler.schedule(); out = runner.run(plan); engine.postprocess(plan, out)`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import math
from typing import Any

from sgl_jax.cache import PageAllocator, RadixCache, commit_running_prefix
from sgl_jax.cache.costs import TransferCosts
from sgl_jax.config import SchedulerConfig
from sgl_jax.shapes import ShapeGrid, StepShape


class ReqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """A generation request as the scheduler and engine track it."""

    rid: str
    prompt_ids: list[int]
    max_new_tokens: int
    namespace: str = ""
    logprob_start: int = -1  # >= 0: prompt logprobs wanted from this position on
    uses_penalties: bool = False  # frequency/presence/repetition penalties need device-side counts
    data: Any = None  # the engine's per-request state (sampling params, stream, detokenizer, ...)
    # a fork's sibling group (`arrive()`, `gathering()`): not admitted while its siblings are still arriving
    gather: Any = None

    output_ids: list[int] = dataclasses.field(default_factory=list)
    state: ReqState = ReqState.WAITING
    arrival: int = 0
    admitted_at: int = -1
    bypassed: int = 0
    # KV state while running: pages cover positions [0, num_computed); the first n_tree are the tree's.
    pages: list[int] = dataclasses.field(default_factory=list)
    n_tree: int = 0
    node: Any = None
    num_computed: int = 0
    cached_tokens: int = 0  # prefix reused at (first) admission, for meta_info.cached_tokens
    slot: int = -1
    retractions: int = 0
    # prompt logprobs: the logits rows of positions below logits_done are no longer needed (a chunk with
    # logits_from computed them and the engine took its entries); kept across retraction, so a resumed
    # request neither loses entries nor computes logits rows again for the ones it has
    logits_done: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    def tokens(self, start: int = 0, end: int | None = None) -> list[int]:
        end = self.num_tokens if end is None else end
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def wants_sample(self) -> bool:
        return len(self.output_ids) < self.max_new_tokens

    def logits_needed_from(self) -> int | None:
        """The first position whose logits prompt logprobs still need, or None when they need no more.

        The entry for prompt position p >= 1 is the logits row computed at position p - 1; position 0's
        entry has no logprob (nothing predicts it) but is still emitted from a chunk starting at 0. So
        a request with `logprob_start` s needs logits at positions max(s - 1, 0) .. prompt end, less the
        ones already computed. A prefix reused from the cache has no logits: it must stop at this position.
        """
        if self.logprob_start < 0 or self.logits_done >= len(self.prompt_ids):
            return None
        return max(self.logprob_start - 1, 0, self.logits_done)

    def reuse_limit(self) -> int:
        """The longest prefix that may be taken from the cache: never the last token (its logits sample
        the next one), nor any position whose logits prompt logprobs still need."""
        limit = self.num_tokens - 1
        need = self.logits_needed_from()
        return limit if need is None else min(limit, need)


@dataclasses.dataclass
class Chunk:
    """Compute tokens [start, start + len(token_ids)) of `req`; sample after the last one if `samples`."""

    req: Request
    start: int
    token_ids: list[int]
    samples: bool
    logits_from: int | None = None  # first position whose logits are wanted (prompt logprobs)
    as_decode: bool = False  # laid out as decode rows, one per token (decodes, short jump-forward runs)
    as_run: bool = False  # laid out as a run block: a few tokens of one sequence sharing one page gather
    # (leader, first): req's positions [first, start) are the leader's, computed by the leader's chunk in this
    # same step; their keys and values are written into req's pages too, and req's logits rows below `start`
    # are the leader's rows (`Scheduler._lender`, batch.SeqChunk.borrow)
    borrow: tuple[Request, int] | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclasses.dataclass
class StepPlan:
    decodes: list[Chunk]
    prefills: list[Chunk]
    reset_slots: list[int]  # penalty-state rows to clear before this step (newly admitted requests)
    marks: list[tuple[int, int, bool]]  # (slot, token, counts_as_output): penalty history of admitted requests
    full_logits: bool  # some chunk wants logits for many positions (prompt logprobs)
    shape: StepShape | None = None  # the grid shape the step runs as (set by the scheduler)
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # KV pages (src, dst) to copy first
    loads: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (host slot, page) to load
    # copies[i] runs after the first copy_after[i] loads: copies and loads run in the order the scheduler made them
    # (a copy may read a page promoted earlier in the round; a load may refill a page freed after a copy read it)
    copy_after: list[int] = dataclasses.field(default_factory=list)
    # prefixes committed to the cache before this step computes them (`Scheduler._share_in_step`): if the step
    # fails, `Scheduler.discard_early` takes them out again
    early: list["EarlyCommit"] = dataclasses.field(default_factory=list)

    @property
    def chunks(self) -> list[Chunk]:
        return self.decodes + self.prefills


@dataclasses.dataclass
class EarlyCommit:
    """A prefix a step computes, committed to the cache before that step runs so another request shares it in
    the same step: its tokens past `keep` have no keys and values until the step has run."""

    namespace: str
    tokens: tuple
    keep: int


class OutOfPagesError(RuntimeError):
    """The KV pool cannot hold even one request's next token."""


class Scheduler:
    """Owns the waiting queue, the running set, and every page request hold. Single-threaded.

    One class of ~700 lines because admission, chunked prefill, retraction, decode-run sizing, sharing a prefix
    (and borrowing its rows) within the step that computes it and the fork siblings' gate all read and change the
    same queue, page and slot state within one step.
    """

    def __init__(self, cache: RadixCache, cfg: SchedulerConfig, grid: ShapeGrid, max_context: int):
        """`cfg` is the engine config's scheduler section; `grid` the runner's shape grid (read-only);
        `max_context` the longest prompt + output a request may have (the config's, capped by the model)."""
        if grid.page_size != cache.page_size:
            raise ValueError(f"the shape grid's page_size {grid.page_size} differs from the cache's {cache.page_size}")
        self.page_size = cache.page_size
        self.max_context = max_context
        self.cache = cache
        self.alloc: PageAllocator = cache.allocator
        self.cfg = cfg
        self.grid = grid  # the runner's; read-only here
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.by_rid: dict[str, Request] = {}
        self.free_slots = list(range(cfg.max_running_requests - 1, -1, -1))
        # penalty-row work for admitted requests, handed to the next plan (kept if no plan is made)
        self._resets: list[int] = []
        self._marks: list[tuple[int, int, bool]] = []
        self._copies: list[tuple[int, int]] = []  # partial-page reuse: (tree page, request page), next plan
        self._copy_after: list[int] = []  # loads queued before each copy (see StepPlan.copy_after)
        self._early: list[EarlyCommit] = []  # prefixes shared within the next plan's step (see StepPlan.early)
        self._early_pages: set[int] = set()  # their pages past `keep`: not to be copied from before that step
        # ... and those of the plan last made, until its step is done (`on_step_done`) or failed (`discard_early`):
        # a prefix hold taken while that step runs stops before them (`Engine.hold_prefix`)
        self.pending_early_pages: set[int] = set()
        self.shared_in_step = 0  # requests admitted onto a prefix another request computes in the same step
        self.borrowed_tokens = 0  # prompt tokens taken from another request's rows in the same step (not computed)
        self.partial_tokens = 0  # prompt tokens reused from partly matching pages (counted in cached_tokens)
        self.transfer_costs = TransferCosts.unmeasured()  # host tier: load or recompute (set by the engine)
        self.host_tokens_loaded = 0  # prompt tokens loaded from the host tier (counted in cached_tokens)
        self.host_tokens_recomputed = 0  # ... found there but recomputed (too short to be worth a load)
        self.disk = None  # the disk tier's reads and writes (cache/disk_tier.py), set by the engine
        self._arrivals = itertools.count()
        self._admissions = itertools.count()
        # decoding requests the last step left out (it was prefill-only): they decode in the next step. A
        # request whose prompt the last step finished got its token from that step, so it has not waited
        self._waited: set[str] = set()
        self.num_retractions = 0

    # ------------------------------------------------------------------------------------- queue
    def add(self, req: Request) -> None:
        if req.rid in self.by_rid:
            raise ValueError(f"request id {req.rid!r} is already in use")
        if req.num_tokens + max(req.max_new_tokens - len(req.output_ids), 0) > self.max_context:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens ({req.max_new_tokens}) "
                             f"exceeds the context length {self.max_context}")
        if req.num_tokens == 0:
            raise ValueError("empty prompt")
        req.arrival = next(self._arrivals)
        req.state = ReqState.WAITING
        if req.gather is not None and req.retractions == 0:
            req.gather.arrive()
        self.waiting.append(req)
        self.by_rid[req.rid] = req

    def abort(self, rid: str) -> Request | None:
        """Remove a request wherever it is; frees every page it holds. Returns it, or None if unknown."""
        req = self.by_rid.get(rid)
        if req is None:
            return None
        if req.state is ReqState.WAITING:
            self.waiting.remove(req)
            if self.disk is not None:
                self.disk.forget(rid)
            req.state = ReqState.FINISHED
            del self.by_rid[rid]
        elif req.state is ReqState.RUNNING:
            self.finish(req)
        return req

    def finish(self, req: Request) -> None:
        """A running request is done: commit its prefix to the cache and release everything it holds."""
        if req.state is not ReqState.RUNNING:
            return
        self._release(req, keep_cache=True)
        self.running.remove(req)
        req.state = ReqState.FINISHED
        self.by_rid.pop(req.rid, None)

    @property
    def decode_fill(self) -> str:
        """How multi-token decode runs (jump-forward) size a step (config decode_row_fill): "pad": they may
        grow it up to the largest decode bucket; "fit": they only fill rows left spare in the bucket the
        step needs anyway; "auto": by the grid's measured costs ("cost": the run-block count and decode
        bucket with the most real tokens per second), or "pad" while nothing is measured."""
        fill = self.cfg.decode_row_fill
        if fill == "auto":
            return "cost" if self.grid.costs else "pad"
        return fill

    def mark_output(self, req: Request, tokens: list[int], rebuild: bool = False) -> None:
        """Record output tokens that did not come from this request's sampling rows (jump-forward) in its
        penalty history, applied by the next plan. `rebuild`: tokens were also taken back, so the slot's
        history is cleared and rebuilt from the whole sequence."""
        if not req.uses_penalties or req.state is not ReqState.RUNNING or req.slot < 0:
            return
        if rebuild:
            self._resets.append(req.slot)
            self._marks = [m for m in self._marks if m[0] != req.slot]
            self._marks += [(req.slot, t, False) for t in req.prompt_ids]
            self._marks += [(req.slot, t, True) for t in req.output_ids]
        else:
            self._marks += [(req.slot, t, True) for t in tokens]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------- pages
    def _release(self, req: Request, keep_cache: bool) -> None:
        if req.node is not None:
            node = req.node
            ps = self.page_size
            # (nothing past the tree's pages to commit when it holds more than was computed: a prefix committed
            # ahead of a step that failed, see `_share_in_step`; its pages stay the tree's)
            if keep_cache and req.num_computed // ps > req.n_tree:
                res = commit_running_prefix(self.cache, req.tokens(0, req.num_computed), req.pages, node,
                                            req.namespace)
                req.pages[:len(res.pages)] = res.pages
                req.n_tree, node = len(res.pages), res.node
            own = req.pages[req.n_tree:]
            if self._copies:  # a copy into a page of this request that no step has run yet: drop it
                dropped = set(own)
                pending = len(self._copies)
                keep = [i for i, c in enumerate(self._copies) if c[1] not in dropped]
                self._copies = [self._copies[i] for i in keep]
                self._copy_after = [self._copy_after[i] for i in keep]
                keep_cache = keep_cache and len(self._copies) == pending  # (and keep no tail of that page)
            full = req.num_computed // ps
            if keep_cache and req.num_computed % ps and full == req.n_tree and len(req.pages) > full:
                # the partly filled last page: kept as a tail (a fork's branches continue right there)
                self.cache.insert_tail(node, req.tokens(full * ps, req.num_computed), own.pop(0))
            self.cache.unlock(node)
            self.alloc.free(own)
        if req.slot >= 0:
            self._marks = [m for m in self._marks if m[0] != req.slot]
            self.free_slots.append(req.slot)
        req.pages, req.n_tree, req.node, req.num_computed, req.slot = [], 0, None, 0, -1

    def _alloc(self, n: int) -> list[int] | None:
        if n <= 0:
            return []
        got = self.alloc.alloc(n)
        if got is None:
            short = n - self.alloc.num_free
            self.cache.evict(short)
            got = self.alloc.alloc(n)
        return got

    def _grow(self, req: Request, upto: int) -> bool:
        """Give `req` pages covering positions [0, upto). False if the pool cannot."""
        need = math.ceil(upto / self.page_size) - len(req.pages)
        got = self._alloc(need)
        if got is None:
            return False
        req.pages += got
        return True

    def _available(self) -> int:
        """Pages obtainable now (free + evictable) minus what running requests are expected to need."""
        reserved = 0
        ps = self.page_size
        for r in self.running:
            remaining = max(r.max_new_tokens - len(r.output_ids), 0)
            future = r.num_tokens + int(remaining * self.cfg.new_token_ratio)
            reserved += max(math.ceil(future / ps) - len(r.pages), 0)
        return self.alloc.num_free + self.cache.evictable_pages - reserved

    def _retract_one(self, exclude: Request | None = None) -> bool:
        victims = [r for r in self.running if r is not exclude]
        if not victims:
            return False
        victim = max(victims, key=lambda r: (r.admitted_at, r.num_tokens))
        self._release(victim, keep_cache=True)
        self.running.remove(victim)
        victim.state = ReqState.WAITING
        victim.retractions += 1
        victim.bypassed = self.cfg.starvation_limit  # resumes first
        self.waiting.insert(0, victim)
        self.num_retractions += 1
        return True

    # ---------------------------------------------------------------------------------- ordering
    def _peek(self, req: Request) -> int:
        peek = getattr(self.cache, "peek_prefix_len", None)
        limit = req.reuse_limit()
        if peek is None:
            return 0
        return min(peek(req.tokens(0, limit), req.namespace), limit)

    def _order(self) -> list[Request]:
        starving = [r for r in self.waiting if r.bypassed >= self.cfg.starvation_limit]
        rest = [r for r in self.waiting if r.bypassed < self.cfg.starvation_limit]
        if self.cfg.schedule_policy == "lpm":
            keyed = [(-self._peek(r), r.arrival, r) for r in rest]
            keyed.sort(key=lambda t: (t[0], t[1]))
            rest = [t[2] for t in keyed]
        elif self.cfg.schedule_policy == "dfs-weight":
            rest = self._dfs_order(rest)
        starving.sort(key=lambda r: r.arrival)
        return starving + rest

    def _dfs_order(self, reqs: list[Request]) -> list[Request]:
        """The paper's cache-aware order: DFS over the radix tree, heavier subtrees (more waiting
        requests under them) first, so requests sharing a prefix run back to back."""
        peek_node = getattr(self.cache, "peek_node", None)
        if peek_node is None:
            return sorted(reqs, key=lambda r: r.arrival)
        at: dict[Any, list[Request]] = collections.defaultdict(list)
        weight: collections.Counter = collections.Counter()
        children: dict[Any, set] = collections.defaultdict(set)
        roots = []
        for r in sorted(reqs, key=lambda r: r.arrival):
            node = peek_node(r.tokens(0, max(r.num_tokens - 1, 0)), r.namespace)
            at[node].append(r)
            n = node
            while n is not None:
                weight[n] += 1
                parent = getattr(n, "parent", None)
                if parent is None:
                    if n not in roots:
                        roots.append(n)
                else:
                    children[parent].add(n)
                n = parent
        def key(n):  # heavier first; among equals, the most recently used subtree (still cached)
            return weight[n], getattr(n, "last_access", 0)

        out: list[Request] = []
        stack = sorted(roots, key=key)
        while stack:
            n = stack.pop()
            out += at.get(n, [])
            stack += sorted(children.get(n, ()), key=key)  # the heaviest is popped first
        return out

    # ---------------------------------------------------------------------------------- schedule
    def schedule(self, defer: bool = True) -> StepPlan | None:
        """Plan the next step, or None when there is nothing to do. (`defer`: see `_rows_next`; off when
        re-planning, so that a step is planned after at most two re-plans.)

        Longer than ~80 lines because it builds one step's plan in the order the policy is applied (grow
        decodes, admit and chunk prefills, lay out decode runs).
        """
        if self.disk is not None:  # write_through: before any eviction of this round can free a page not yet written
            self.disk.write_fresh()
        if not self.has_work:
            return None
        cfg = self.cfg
        # decoding: 1 token left (or a few, after jump-forward), computed as decode rows; a request still
        # owed prompt logits is prefilled (decode rows carry no logits_from)
        grid = self.grid
        max_rows = grid.max_decode_rows
        decoding = [r for r in self.running
                    if 1 <= r.num_tokens - r.num_computed <= self._row_limit(r) and r.logits_needed_from() is None]
        prefilling = [r for r in self.running if r not in decoding]

        # 1. Every decoding request needs room for one more token; evict, then retract, if not.
        for r in sorted(decoding, key=lambda r: r.admitted_at):
            if r.state is not ReqState.RUNNING:
                continue
            while not self._grow(r, r.num_tokens):
                if not self._retract_one(exclude=r):
                    raise OutOfPagesError(f"the KV pool ({self.alloc.num_total} pages) cannot hold request "
                                          f"{r.rid} at {r.num_tokens} tokens")
        decoding = [r for r in decoding if r.state is ReqState.RUNNING]
        prefilling = [r for r in prefilling if r.state is ReqState.RUNNING]

        # 2. Prefill-only or mixed: prefill has priority, but no decoding request waits two steps in a row (one
        # whose prompt the last step finished has not waited: a fork's branches prefill in consecutive steps
        # before they decode together).
        has_prefill = bool(prefilling or self.waiting)
        waited = any(r.rid in self._waited for r in decoding)
        prefill_only = has_prefill and (not decoding or not waited)
        if prefill_only and decoding:
            pending = sum(r.num_tokens - 1 - r.num_computed for r in prefilling)
            pending += sum(r.num_tokens for r in self.waiting[:4])
            if pending <= grid.mixed_blocks * grid.prefill_block:
                prefill_only = False  # small enough to ride along with the decodes
        max_blocks = grid.max_blocks if prefill_only else grid.mixed_blocks
        budget_tokens = min(cfg.max_prefill_tokens, grid.max_blocks * grid.prefill_block)
        chunks: list[Chunk] = []
        blocks = 0
        rows_left = grid.full_logit_rows or math.inf  # logits rows a prompt-logprob step may still compute

        def take(r: Request, lend: tuple[Chunk, int] | None = None) -> bool:
            """Add r's next prefill chunk if budget, blocks, logits rows and pages allow. With `lend` (a chunk of
            this step and a position, `_lender`), r's positions up to that one are that chunk's rows."""
            nonlocal blocks, budget_tokens, rows_left
            if rows_left < 1:
                return False
            start = r.num_computed
            first = start
            if lend is not None:  # within the second writes the step may still carry
                dups_left = grid.dup_rows - sum(c.start - c.borrow[1] for c in chunks if c.borrow is not None)
                first = min(lend[1], start + dups_left)
                if first == start:
                    lend = None
            bq = grid.prefill_block
            n = min(r.num_tokens - first, budget_tokens, (max_blocks - blocks) * bq)
            end = first + n
            if end < r.num_tokens and n > bq:
                end -= n % bq  # block-aligned chunk boundaries: only the last block pads
            logits_from = None
            need = r.logits_needed_from()
            if need is not None and max(need, start) < end:
                logits_from = max(need, start)
                end = min(end, logits_from + rows_left)  # its prompt logprobs past the step's rows: next step
            n = end - first
            rows = end - logits_from if logits_from is not None else 1
            new_blocks = 1 if n == 1 and logits_from is None else math.ceil(max(n, 0) / bq)
            if lend is not None and rows + sum(c.end - c.logits_from if c.logits_from is not None else 1
                                               for c in chunks) > (blocks + new_blocks) * bq:
                return False  # a full-logits step computes at most as many logits rows as its blocks have tokens
            if n <= 0 or not self._grow(r, end):
                return False
            samples = end == r.num_tokens and r.wants_sample
            chunks.append(Chunk(r, first, r.tokens(first, end), samples, logits_from,
                                borrow=None if lend is None else (lend[0].req, start)))
            blocks += new_blocks
            budget_tokens -= n
            rows_left -= rows
            if lend is not None:
                self.borrowed_tokens += first - start
            return True

        if has_prefill:
            for r in sorted(prefilling, key=lambda r: r.admitted_at):
                if not take(r):
                    break
            if budget_tokens > 0 and blocks < max_blocks:
                admitted = self._admit(take, chunks, len(decoding), prefilling, defer)
                if not chunks and defer and any(self._rows_next(r) for r in admitted):
                    return self.schedule(defer=False)  # they decode as rows: plan that step now

        dec_chunks = []
        full = any(c.logits_from is not None and c.end - c.logits_from > 1 for c in chunks)
        if not prefill_only and not full:  # prompt-logprob steps are compiled without decode rows
            # every decoding request gets a row (beyond max_rows they wait); multi-token runs first, their
            # extra tokens take the spare rows, and a run that does not fit computes a prefix (no sample)
            order = sorted(decoding, key=lambda r: (r.num_computed + 1 == r.num_tokens, r.admitted_at))
            order = order[:max_rows]
            runs, rest, rows = self._plan_decodes(order, max_rows, allow_runs=not chunks)
            for r in runs:  # run blocks: one block of up to run_q tokens each
                need = r.num_tokens - r.num_computed
                n = min(need, grid.run_block)
                dec_chunks.append(Chunk(r, r.num_computed, r.tokens(r.num_computed, r.num_computed + n),
                                        n == need and r.wants_sample, as_run=True))
            spare = rows - len(rest)
            for r in rest:
                need = r.num_tokens - r.num_computed
                n = min(need, 1 + spare)
                spare -= n - 1
                dec_chunks.append(Chunk(r, r.num_computed, r.tokens(r.num_computed, r.num_computed + n),
                                        n == need and r.wants_sample, as_decode=True))
        pre_chunks = chunks
        if not dec_chunks and not pre_chunks:
            if decoding and prefill_only and not waited:
                self._waited = {r.rid for r in decoding}  # the waiting work does not fit: let decodes run
                return self.schedule(defer)
            return None
        self._waited = {r.rid for r in decoding} if pre_chunks and not dec_chunks else set()
        plan = StepPlan(dec_chunks, pre_chunks, self._resets, self._marks, full,
                        grid.shape_for(dec_chunks, pre_chunks, full), self._copies,
                        self.cache.take_loads() if getattr(self.cache, "host", None) is not None else [],
                        self._copy_after, self._early)
        self._resets, self._marks, self._copies, self._copy_after, self._early = [], [], [], [], []
        self.pending_early_pages, self._early_pages = self._early_pages, set()
        return plan

    def _plan_decodes(self, order: list[Request], max_rows: int,
                      allow_runs: bool) -> tuple[list[Request], list[Request], int]:
        """(run-block requests, the other requests, the decode rows those others may take).

        See `decode_fill`. With measured costs, every combination of run-block bucket and decode bucket is
        scored by real tokens per second of step and the best one wins.
        """
        grid = self.grid

        def need(r):
            return r.num_tokens - r.num_computed

        def split(runs, rows):
            ids = {id(r) for r in runs}
            return runs, [r for r in order if id(r) not in ids], rows

        cands = []
        if allow_runs and grid.run_block_buckets and self.decode_fill != "fit":
            cands = sorted((r for r in order if need(r) > 1), key=lambda r: (-need(r), r.admitted_at))
        run_opts = [0]
        if cands:
            fit_all = next((b for b in grid.run_block_buckets if b >= len(cands)), grid.run_block_buckets[-1])
            run_opts += [b for b in grid.run_block_buckets if b <= fit_all]
        buckets = [b for b in grid.decode_buckets if b <= max_rows]
        if self.decode_fill == "pad" or not buckets or not order:
            return split(cands[:run_opts[-1]], max_rows)
        if self.decode_fill == "fit":
            return split([], next(b for b in buckets if b >= len(order)))
        pages = max(math.ceil(r.num_tokens / self.page_size) for r in order)
        width = grid.width_for(pages)
        best, best_score = split([], max_rows), -1.0
        for nr in run_opts:
            plan = split(cands[:nr], 0)
            run_tokens = sum(min(need(r), grid.run_block) for r in plan[0])
            rest_tokens = sum(need(r) for r in plan[1])
            for b in buckets:
                if b < max(len(plan[1]), 1 if nr else 0):
                    continue
                cost = grid.costs.get((b, width, nr))
                if cost is None or cost <= 0:
                    return split(cands[:run_opts[-1]], max_rows)  # no measurement: behave as "pad"
                score = (run_tokens + min(rest_tokens, b)) / cost
                if score > best_score:
                    best, best_score = (plan[0], plan[1], b), score
        return best

    def _admit(self, take, chunks: list[Chunk], num_decoding, prefilling, defer: bool = True) -> list[Request]:
        cfg = self.cfg
        if len(self.running) >= cfg.max_running_requests or not self.free_slots:
            return []  # nothing can be admitted: skip ordering the whole queue
        ordered = self._order()
        admitted: list[Request] = []
        # requests still computing their prompt, also those doing it as decode rows (`_rows_next`)
        pre = {id(r) for r in prefilling}
        inflight = list(prefilling) + [r for r in self.running
                                       if id(r) not in pre and r.num_computed < len(r.prompt_ids) - 1]
        for r in ordered:
            if len(self.running) >= cfg.max_running_requests or not self.free_slots:
                break
            # Cold-burst sharing: share a prefix another request computes in this step, or wait for it.
            cached = self._peek(r)
            limit = r.reuse_limit()  # waiting for another request's prefix cannot help beyond this
            if not self.cache.disabled:
                shared = self._share_in_step(r, cached, limit, inflight, chunks)
                if shared < 0:
                    continue
                cached = max(cached, shared)
            if not self._disk_ready(r, cached):  # loading: its pages are being read from the disk tier
                continue
            if r.gather is not None and r.gather.gathering():  # a fork's branches start in one step
                continue
            ps = self.page_size
            need_now = math.ceil(r.num_tokens / ps) - cached // ps
            need_future = math.ceil(max(r.max_new_tokens - len(r.output_ids), 0) * cfg.new_token_ratio / ps)
            fits = need_now + need_future <= self._available()
            # with nothing else running, admit what fits now; retraction handles the rest
            alone = not self.running and need_now <= self.alloc.num_free + self.cache.evictable_pages
            if not (fits or alone):
                break
            m = self.cache.match_prefix(r.tokens(0, cached), r.namespace) if cached else None
            if m is not None and m.num_tokens == cached:
                r.pages, r.n_tree, r.node = list(m.pages), len(m.pages), m.node
            else:
                m = self.cache.match_prefix([], r.namespace)
                r.pages, r.n_tree, r.node, cached = [], 0, m.node, 0
            self.cache.lock(r.node)
            # on a prefix committed ahead of this step: computes the rest in it, and loads nothing below it (a
            # failed step must be able to take that prefix out again: discard_early)
            sharing = bool(self._early_pages) and r.n_tree > 0 and r.pages[r.n_tree - 1] in self._early_pages
            self.shared_in_step += sharing
            if not sharing:
                cached += self._promote(r, cached)
            cached += self._reuse_partial(r, cached)
            r.num_computed = cached
            if r.retractions == 0:
                r.cached_tokens = cached
            r.slot = self.free_slots.pop()
            self._resets.append(r.slot)
            r.state = ReqState.RUNNING
            r.admitted_at = next(self._admissions)
            self.waiting.remove(r)
            self.running.append(r)
            if r.uses_penalties:  # the device penalty rows get the prompt and any output so far
                self._marks += [(r.slot, t, False) for t in r.prompt_ids]
                self._marks += [(r.slot, t, True) for t in r.output_ids]
            lend = self._lender(r, chunks)
            if sharing or lend is not None or not (defer and self._rows_next(r)):  # (sharing, lend: in the step
                # that computes its prefix; if the step is full, it continues as a prefilling request next step)
                if lend is not None and take(r, lend):
                    if r.retractions == 0:
                        r.cached_tokens = chunks[-1].start  # the lent positions are not computed for it either
                else:
                    take(r)
            admitted.append(r)
            inflight.append(r)
            if len(admitted) + num_decoding >= cfg.max_running_requests:
                break
        for r in self.waiting:
            if any(a.arrival > r.arrival for a in admitted):
                r.bypassed += 1
        return admitted

    def _share_in_step(self, r: Request, cached: int, limit: int, inflight: list[Request],
                       chunks: list[Chunk]) -> int:
        """Where `r`'s prompt continues past its cached `cached` tokens into a prefix an in-flight request `o`
        is computing: -1 when `r` must wait for it; else the tokens `r` may take from the cache (`cached`, or
        more). When `o`'s chunk in this step computes the whole shared prefix (page-aligned), that prefix is
        committed to the cache now, before the step (`EarlyCommit`), and `r` computes only past it in the same
        step: a burst of requests on one new prefix (a `select`'s choices, a fork's branches, a cold burst)
        takes one step, not two. Each layer writes every row's keys and values before any row attends
        (models/llama.py `_attend`), so `r`'s rows read what `o`'s rows write in that step."""
        ps = self.page_size
        waits = [(w, o) for o in inflight if (w := min(self._lcp(r, o), limit)) - cached >= ps]
        if not waits:
            return cached
        w, o = max(waits, key=lambda t: t[0])
        end = w // ps * ps
        planned = next((c.end for c in chunks if c.req is o), -1)
        if planned < end or o.namespace != r.namespace:
            return -1  # o computes it in a later step: wait for it
        tokens = o.tokens(0, end)
        keep = o.n_tree * ps
        if self.cache.peek_prefix_len(tokens, o.namespace) != keep:
            return -1  # the cache holds more of it already (o's copies would be freed): wait as before
        res = commit_running_prefix(self.cache, tokens, o.pages, o.node, o.namespace)
        o.pages[:len(res.pages)] = res.pages
        o.n_tree, o.node = len(res.pages), res.node
        self._early_pages.update(res.pages[keep // ps:])
        self._early.append(EarlyCommit(o.namespace, tuple(tokens), keep))
        return end

    def _lender(self, r: Request, chunks: list[Chunk]) -> tuple[Chunk, int] | None:
        """A chunk planned for this step that computes `r`'s next positions with `r`'s own tokens (another request
        on the same new prefix: a select's choices past a new question, a cold burst), and how far into `r`'s
        prompt it does (exclusive; never `r`'s last token, whose row samples or scores `r`'s own next one); None
        if there is none. `r` then borrows those positions instead of computing them again: each layer writes its
        keys and values a second time into `r`'s own page (the first partial page, which `r` cannot share) and
        `r`'s logits rows there are the lender's (the rows predict the same distributions; `r`'s targets are
        its own). Not with the cache off (an ablation that shares nothing)."""
        if self.cache.disabled:
            return None
        start = r.num_computed
        best = None
        for c in chunks:
            o = c.req
            if o is r or c.borrow is not None or o.namespace != r.namespace or not c.start <= start < c.end:
                continue
            e = min(self._lcp(r, o), c.end, r.num_tokens - 1)
            if e > start and (best is None or e > best[1]):
                best = (c, e)
        return best

    def early_users(self) -> list[Request]:
        """The running requests on a prefix committed ahead of the step in flight (the ones computing it and the
        ones sharing it: their last tree page is one of its pages); if that step fails, they fail with it."""
        pending = self.pending_early_pages
        return [r for r in self.running if r.n_tree and r.pages[r.n_tree - 1] in pending] if pending else []

    def discard_early(self, plan: StepPlan) -> bool:
        """After `plan`'s step failed: take the prefixes committed ahead of it out of the cache (their keys and
        values were never computed). Their users (`early_users`) must have been released first. False when one of
        them is still held, which admission (no host-tier load below such a prefix) and `Engine.hold_prefix` (a
        hold stops before its pages) rule out: the cache could then not be trusted."""
        self.pending_early_pages = set()
        ok = True
        for e in reversed(plan.early):
            ok = self.cache.discard(e.tokens, e.namespace, e.keep) and ok
        return ok

    def _host_extra(self, r: Request, cached: int) -> int:
        """Tokens of `r`'s prompt past its device match `cached` that the host tier holds (up to its reuse limit)."""
        limit = r.reuse_limit()
        return min(self.cache.host_match_len(r.tokens(0, limit), r.namespace), (limit - cached) // self.page_size
                   * self.page_size)

    def _disk_ready(self, r: Request, cached: int) -> bool:
        """False while `r` waits for a disk read of its prompt's pages past its device + host match (started
        here if the disk holds some worth reading: see cache/disk_tier.py); others are admitted meanwhile."""
        if self.disk is None or self.cache.disabled:
            return True
        extra = self._host_extra(r, cached)
        return self.disk.ready(r, cached + extra, r.reuse_limit(), self.transfer_costs.disk_pays, extra // self.page_size)

    def _promote(self, r: Request, cached: int) -> int:
        """Where `r`'s prompt continues past its device match into host-tier pages, load them (queued for the next
        step) if the cost model says loading beats recomputing them (`TransferCosts`); returns the tokens gained.
        Free pages only, after evicting for the rest: `r`'s device prefix is locked, so eviction cannot demote
        it (it may drop host pages of the hit itself when the host tier is full: fewer are then loaded)."""
        if getattr(self.cache, "host", None) is None or self.cache.disabled:
            return 0
        ps = self.page_size
        extra = self._host_extra(r, cached)
        if self.disk is not None:
            extra += self.disk.take(r, cached + extra)
        if extra <= 0:
            return 0
        if not self.transfer_costs.load_pays(extra):
            self.host_tokens_recomputed += extra
            return 0
        short = extra // ps - self.alloc.num_free
        if short > 0:
            self.cache.evict(short)
        moved = self.cache.promote(r.tokens(0, cached + extra), r.namespace, max_pages=extra // ps)
        if not moved:
            return 0
        m = self.cache.match_prefix(r.tokens(0, cached + moved), r.namespace)
        self.cache.lock(m.node)
        self.cache.unlock(r.node)
        r.pages, r.n_tree, r.node = list(m.pages), len(m.pages), m.node
        moved = m.num_tokens - cached
        self.host_tokens_loaded += moved
        return moved

    def _reuse_partial(self, r: Request, cached: int) -> int:
        """Tokens past the page-aligned match `cached` taken from a tree page that shares its first few tokens
        with `r`: r gets a page of its own, which starts as a copy of that tree page (`StepPlan.copies`, run
        before the next step), and computes from the first differing token on. 0 when none matches or no page
        is free. The copy makes a fork's branches, and prompts differing mid-page, lose no cached tokens to
        page rounding; the tree itself stays page-granular."""
        partial = getattr(self.cache, "match_partial", None)
        limit = r.reuse_limit()
        if partial is None or self.cache.disabled or limit <= cached:
            return 0
        found = partial(r.node, r.tokens(cached, min(cached + self.page_size - 1, limit)))
        if found is None or found[0] in self._early_pages:  # (copies run before the step that writes that one)
            return 0
        got = self._alloc(1)
        if got is None:
            return 0
        r.pages.append(got[0])
        self._copies.append((found[0], got[0]))
        host = getattr(self.cache, "host", None)
        self._copy_after.append(len(host.loads) if host is not None else 0)
        self.partial_tokens += found[1]
        return found[1]

    def _row_limit(self, r: Request) -> int:
        """The most tokens left at which `r` computes them as decode rows, one per token: for prompt tokens (a
        suffix after a cached prefix, a chunked prompt's tail) `suffix_row_chunk` when set, else, and for output
        tokens (jump-forward runs), `decode_row_chunk`; never past the largest decode bucket."""
        cfg = self.cfg
        prompt_left = r.num_computed < len(r.prompt_ids)
        limit = cfg.suffix_row_chunk if prompt_left and cfg.suffix_row_chunk >= 0 else cfg.decode_row_chunk
        return min(limit, self.grid.max_decode_rows)

    def _rows_next(self, r: Request) -> bool:
        """A request admitted with a cached prefix and at most `_row_limit` tokens left (a fork branch's or a
        chat turn's short suffix) takes no prefill chunk: from the next plan on it decodes as rows, one per
        token, not as a prefill block padded to `prefill_block` tokens."""
        left = r.num_tokens - r.num_computed
        return r.num_computed > 0 and 1 <= left <= self._row_limit(r) and r.logits_needed_from() is None

    @staticmethod
    def _lcp(a: Request, b: Request) -> int:
        n = min(a.num_tokens, b.num_tokens)
        pa, pb = a.prompt_ids, b.prompt_ids
        i = 0
        m = min(n, len(pa), len(pb))
        # compare in strides for speed on long shared prefixes
        while i + 64 <= m and pa[i:i + 64] == pb[i:i + 64]:
            i += 64
        while i < m and pa[i] == pb[i]:
            i += 1
        return i

    # ----------------------------------------------------------------------------- after a step
    def on_step_done(self, plan: StepPlan) -> None:
        """Advance computed counts and share newly computed full pages through the cache.

        Called after the device step and BEFORE the engine appends sampled tokens / finishes requests.
        """
        self.pending_early_pages = set()
        ps = self.page_size
        for c in plan.chunks:
            r = c.req
            if r.state is not ReqState.RUNNING:
                continue
            before = r.num_computed
            r.num_computed = c.end
            if c.logits_from is not None:
                r.logits_done = max(r.logits_done, c.end)
            if r.num_computed // ps > before // ps and not self.cache.disabled:
                res = commit_running_prefix(self.cache, r.tokens(0, r.num_computed), r.pages, r.node, r.namespace)
                r.pages[:len(res.pages)] = res.pages
                r.n_tree, r.node = len(res.pages), res.node

    # ------------------------------------------------------------------------------- integrity
    def held_pages(self) -> list[int]:
        return [p for r in self.running for p in r.pages[r.n_tree:]]

    def check_integrity(self) -> None:
        """free + evictable + in use == total, and the cache's own invariants."""
        held = self.held_pages()
        assert len(held) == len(set(held)), "a page is held twice by running requests"
        self.cache.check_integrity(held_pages=held)
        in_use = len(held) + self.cache.protected_pages
        total = self.alloc.num_free + self.cache.evictable_pages + in_use
        assert total == self.alloc.num_total, (
            f"free {self.alloc.num_free} + evictable {self.cache.evictable_pages} + in use {in_use} "
            f"!= total {self.alloc.num_total}")
        for r in self.running:
            need = r.logits_needed_from()
            assert need is None or need >= r.num_computed, (
                f"{r.rid}: prompt logits are needed from position {need}, but {r.num_computed} are computed "
                f"(a reused or logit-less prefix went past it)")
        slots = [r.slot for r in self.running]
        assert len(set(slots)) == len(slots) and -1 not in slots, f"bad slots {slots}"
        assert len(slots) + len(self.free_slots) == self.cfg.max_running_requests, "slot leak"
