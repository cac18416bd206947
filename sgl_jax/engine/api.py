"""The Engine: SGLang's offline API in-process, and the object every front end serves.

A request's life through the public API:
 1. `prepare(...)` (or `generate` / `async_generate` / `generate_stream`, which call it) validates and
    tokenizes in the caller's thread into a `PreparedRequest` (`prepare.py`); a bad request raises
    `InvalidRequestError` naming the field before anything is queued. A batch is prepared whole
    before any item is submitted.
 2. The prepared request becomes a scheduler `Request` whose `data` is its `OutputState`, and is
    submitted to the `EngineLoop` (`loop.py`), the one thread that owns the scheduler, the radix cache
    and the device state.
 3. Events come back through the request's sink: a queue for sync callers, an asyncio queue (fed with
    `call_soon_threadsafe`) for async ones. Closing a stream early aborts the request.

The parts and their owners: `build.py` makes the model, runner, pool, cache and scheduler;
`constraints.py` owns structured generation; `output.py` owns detokenization, stops, logprobs and
events; `loop.py` owns the thread and fault handling. This class is the thin API over them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import random
import threading
import time
import uuid
from typing import AsyncIterator, Iterator

from sgl_jax.config import EngineConfig, build
from sgl_jax.engine.constraints import ConstraintManager
from sgl_jax.engine.loop import EngineLoop, StepInfo
from sgl_jax.metrics import cache_tiers
from sgl_jax.engine.output import OutputProcessor
from sgl_jax.engine.prepare import PreparedRequest, RequestPreparer, expand_batch
from sgl_jax.errors import InvalidRequestError
from sgl_jax.scheduler import Request


# how long a fork's first branches wait for their siblings (their threads submit a few milliseconds apart; a branch
# whose first call comes later, or never, costs the others at most this)
GATHER_S = 0.02


@dataclasses.dataclass(eq=False)
class PrefixHold:
    """A locked radix-cache prefix (`Engine.hold_prefix`): `num_tokens` of it are cached and will stay.

    After `Engine.gather_siblings(hold, n)` it is also a fork's sibling group: requests submitted with
    `prefix_hold=` this hold are not admitted until n of them have arrived or `gather_until` (monotonic seconds) has
    passed, so a fork's branches, whose threads submit a few milliseconds apart, start in one step instead of the
    first alone."""

    node: object
    num_tokens: int
    siblings: int = 0
    gather_until: float = 0.0
    arrived: int = 0  # counted on the engine thread (Scheduler.add)
    released: bool = False

    def arrive(self) -> None:
        self.arrived += 1

    def gathering(self) -> bool:
        return self.arrived < self.siblings and not self.released and time.monotonic() < self.gather_until


class Engine:
    """In-process engine: `Engine(model="smollm2-135m", **config)` or `Engine(EngineConfig(...))`.

    One class of ~370 lines: it is the API SGLang's Engine has (generate, streams, holds, abort, flush, stats,
    server info) as one object, each method a few lines over the parts that do the work (prepare.py, loop.py,
    output.py, constraints.py, the scheduler and the runner)."""

    def __init__(self, config: EngineConfig | str | None = None, *, metrics=None, progress: bool = True,
                 **overrides):
        from sgl_jax.engine.build import build_runtime

        if isinstance(config, str):
            overrides.setdefault("model", config)
            config = None
        if config is None:
            config = build(EngineConfig, overrides, "engine")
        elif overrides:
            config = config.replace(**overrides)
        self.config: EngineConfig = config
        self.metrics = metrics
        rt = build_runtime(config, progress=progress)
        self.model_path, self.model_config, self.tokenizer = rt.model_path, rt.model_config, rt.tokenizer
        self.runner, self.allocator, self.cache, self.scheduler = rt.runner, rt.allocator, rt.cache, rt.scheduler
        self.max_context_len = rt.max_context_len
        self.load_seconds, self.compile_seconds, self.warmup_compiles = (rt.load_seconds, rt.compile_seconds,
                                                                         rt.warmup_compiles)
        self.vocab_size = rt.vocab_size  # the agreed size: request ids, logit_bias and stop ids are checked against it
        self.constraints = ConstraintManager(config, self.tokenizer, self.model_config.vocab_size,
                                             self.runner.upload_constraint)
        self.output = OutputProcessor(self.tokenizer, self.max_context_len, metrics)
        self.preparer = RequestPreparer(self.tokenizer, vocab_size=self.vocab_size,
                                        max_context_len=self.max_context_len,
                                        max_top_logprobs=config.sampling.max_top_logprobs,
                                        max_logit_bias=config.sampling.max_logit_bias,
                                        max_stop_token_ids=config.sampling.max_stop_token_ids,
                                        check_constraint=self.constraints.check)
        self._holds: set[PrefixHold] = set()  # touched on the engine thread only
        self._rng = random.Random(config.seed)
        self._seed_lock = threading.Lock()
        self.loop = EngineLoop(scheduler=self.scheduler, runner=self.runner, constraints=self.constraints,
                               output=self.output, row_params=self._row_params, metrics=metrics,
                               check_integrity_when_idle=config.scheduler.check_integrity_when_idle)
        self.kv_events = None  # the KV event publisher (serve/kv_events.py), when engine.cache.kv_events_endpoint
        if config.cache.kv_events_endpoint and not config.cache.disable_radix_cache:
            from sgl_jax.cache.events import KVEventLog
            from sgl_jax.serve.kv_events import KVEventPublisher

            self.cache.events = KVEventLog(config.cache.page_size)
            self.kv_events = KVEventPublisher(self.cache.events, config.cache.kv_events_endpoint,
                                              config.cache.kv_events_topic, config.cache.kv_events_replay_endpoint)
        self.channel = rt.channel if config.parallel.node_rank == 0 else None  # multi-host: rank 0's StepChannel
        if self.channel is not None:
            self.channel.on_failure = self.loop.die
        self.loop.start()
        if config.warmup and config.shapes.background_compile:
            self.runner.compile_in_background(then=self._after_background_compile, each=self._warm)

    def _warm(self, shape) -> None:
        """A shape the background compiler just compiled, run once on the engine thread between steps (see
        ModelRunner.warm); skipped once the engine is closing."""
        try:
            self.loop.call(lambda: self.runner.warm(shape), timeout=600)
        except RuntimeError:  # closed or dead: nothing left to warm for
            self.runner.stop_background()

    def _after_background_compile(self) -> None:
        """Every shape compiled: with decode_row_fill auto and no saved costs, time the decode shapes now,
        on the engine thread between steps (a one-time pause; the costs are saved for the next start)."""
        from sgl_jax.engine.build import step_costs

        if self.config.scheduler.decode_row_fill != "auto" or self.scheduler.grid.costs:
            return

        def measure():
            self.scheduler.grid = self.runner.time_decode_costs(step_costs(self.config, self.runner,
                                                                           self.model_path))

        self.loop.call(measure, timeout=3600)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until the background compilation (if any) has finished; False on timeout."""
        done = self.runner.background_done.wait(timeout)
        if self.runner.background_error is not None:
            raise RuntimeError(f"background compilation failed: {self.runner.background_error}")
        return done

    # ---------------------------------------------------------------------------- requests
    def prepare(self, **kw) -> PreparedRequest:
        """Validate and tokenize one sequence's request (raises InvalidRequestError naming the field)."""
        return self.preparer.prepare(**kw)

    def validate(self, **kw) -> None:
        """Raise InvalidRequestError if the request is bad; changes nothing."""
        self.preparer.prepare(**kw)

    def _request(self, prep: PreparedRequest, sink, stream: bool, gather: "PrefixHold | None" = None) -> Request:
        sp = prep.params
        if sp.sampling_seed is not None:
            seed = sp.sampling_seed
        else:
            with self._seed_lock:
                seed = self._rng.getrandbits(32)
        data = self.output.start(prep, sink, stream, seed)
        start = prep.logprob_start_len if prep.return_logprob and prep.logprob_start_len >= 0 else -1
        uses_penalties = sp.frequency_penalty != 0 or sp.presence_penalty != 0 or sp.repetition_penalty != 1
        return Request(rid=prep.rid or uuid.uuid4().hex, prompt_ids=list(prep.input_ids),
                       max_new_tokens=sp.max_new_tokens, logprob_start=start, uses_penalties=uses_penalties,
                       data=data, gather=gather)

    def _prepare_all(self, prompt, input_ids, sampling_params, stream, rid, common) -> tuple[bool, list]:
        batched, items = expand_batch(prompt, input_ids, sampling_params)
        if stream and batched:
            raise InvalidRequestError("stream=True takes a single prompt", field="stream")
        if batched and isinstance(rid, str):  # one rid for a batch or n samples: one per sequence from it
            rid = [f"{rid}-{i}" for i in range(len(items))]
        rids = rid if isinstance(rid, list) else [rid]
        if batched and rid is not None and len(rids) != len(items):
            raise InvalidRequestError(f"'rid' has {len(rids)} entries for {len(items)} sequences", field="rid")
        preps = [self.prepare(sampling_params=sp, rid=rids[i] if rid is not None else None, **kw, **common)
                 for i, (kw, sp) in enumerate(items)]
        return batched, preps

    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                 logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False, stream=False,
                 rid=None, prefix_hold=None):
        """SGLang's Engine.generate: a dict for one prompt, a list for a batch (or n > 1).

        With stream=True (single prompt), returns an iterator of cumulative output dicts. `prefix_hold` (a hold
        given to `gather_siblings`): this call is one of a fork's branches (see PrefixHold).
        """
        common = dict(return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                      top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs)
        batched, preps = self._prepare_all(prompt, input_ids, sampling_params, stream, rid, common)
        if stream:
            return self.stream_prepared(preps[0], prefix_hold)
        outs = self.run_prepared(preps, prefix_hold)
        return outs if batched else outs[0]

    def run_prepared(self, preps: list[PreparedRequest], gather: "PrefixHold | None" = None) -> list[dict]:
        """Run prepared requests together (submitted as one batch); their final outputs in order."""
        qs = [queue.SimpleQueue() for _ in preps]
        reqs = [self._request(p, q.put, False, gather) for p, q in zip(preps, qs)]
        self.loop.submit(reqs)
        return [q.get() for q in qs]

    def stream_prepared(self, prep: PreparedRequest, gather: "PrefixHold | None" = None) -> Iterator[dict]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        req = self._request(prep, q.put, True, gather)
        self.loop.submit([req])
        return self._iterate(q, req.rid)

    def _iterate(self, q, rid) -> Iterator[dict]:
        finished = False
        try:
            while True:
                ev = q.get()
                yield ev
                if ev["meta_info"]["finish_reason"] is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    async def generate_stream(self, *, prepared: PreparedRequest | None = None, stream=True,
                              **kw) -> AsyncIterator[dict]:
        """One sequence; yields cumulative output dicts (only the final one if stream=False).

        Takes a PreparedRequest (the server prepares off its event loop) or the fields of one.
        Closing the generator before the final event aborts the request.
        """
        if prepared is None:
            prepared = self.prepare(**kw)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = self._request(prepared, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev), stream)
        self.loop.submit([req])
        finished = False
        try:
            while True:
                ev = await q.get()
                if ev["meta_info"]["finish_reason"] is not None:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req.rid)

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                             logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False,
                             stream=False, rid=None):
        """Asyncio twin of generate(): awaits the result, or returns an async iterator when streaming.

        Every item of a batch is prepared before any is submitted: one bad item submits nothing.
        """
        common = dict(return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                      top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs)
        batched, preps = self._prepare_all(prompt, input_ids, sampling_params, stream, rid, common)
        if stream:
            return self.generate_stream(prepared=preps[0])
        loop = asyncio.get_running_loop()
        qs = [asyncio.Queue() for _ in preps]
        reqs = [self._request(p, (lambda q: lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))(q), False)
                for p, q in zip(preps, qs)]
        self.loop.submit(reqs)
        try:
            outs = [await q.get() for q in qs]
        except asyncio.CancelledError:
            for r in reqs:
                self.abort(r.rid)
            raise
        return outs if batched else outs[0]

    # ---------------------------------------------------------------------------- control
    def abort(self, rid: str) -> bool:
        """Abort a running or waiting request; False if no live request has this rid."""
        return self.loop.abort(rid)

    def idle_uncached(self, input_ids) -> int | None:
        """How many tokens of `input_ids` the radix cache lacks, when the engine has nothing else to do (no request
        running, waiting or compiling a constraint); None when it is busy. For the in-process frontend's choice of
        one submission or two (`EngineBackend.select`)."""

        def peek():
            s = self.scheduler
            if s.running or s.waiting or self.constraints.pending:
                return None
            return len(input_ids) - self.cache.peek_prefix_len(list(input_ids))

        return self.loop.call_now(peek)

    def hold_prefix(self, input_ids) -> "PrefixHold | None":
        """Lock the cached page-aligned prefix of `input_ids` in the radix cache (never evicted) until
        `release_prefix(hold)`; None when nothing of it is cached. The frontend holds a fork's shared prefix
        until every branch has been submitted. Each hold must be released exactly once."""

        def hold():
            ids = list(input_ids)
            m = self.cache.match_prefix(ids)
            pending = self.scheduler.pending_early_pages  # pages the step in flight writes: held only after it
            cut = next((i for i, p in enumerate(m.pages) if p in pending), None) if pending else None
            if cut is not None:
                m = self.cache.match_prefix(ids[:cut * self.cache.page_size])
            if m.num_tokens == 0:
                return None
            self.cache.lock(m.node)
            h = PrefixHold(m.node, m.num_tokens)
            self._holds.add(h)
            return h

        return self.loop.call_now(hold)  # not at the next step boundary: a fork's branches start in one step

    def gather_siblings(self, hold: "PrefixHold", siblings: int, gather_s: float = GATHER_S) -> None:
        """Make `hold` a fork's sibling group of `siblings` branches for the next `gather_s` seconds: requests sent
        with `prefix_hold=hold` are admitted once that many have arrived, or at the deadline (PrefixHold)."""

        def gather():
            if hold not in self._holds:
                raise ValueError(f"gather_siblings: {hold!r} is not held")
            hold.siblings, hold.gather_until = siblings, time.monotonic() + gather_s

        self.loop.call_now(gather)

    def release_prefix(self, hold: "PrefixHold | None") -> None:
        """Release a hold taken by `hold_prefix` (None is a no-op); a second release raises ValueError."""
        if hold is None:
            return

        def release():
            if hold not in self._holds:
                raise ValueError(f"release_prefix: {hold!r} is not held (released twice?)")
            self._holds.discard(hold)
            hold.released = True
            self.cache.unlock(hold.node)

        self.loop.call_now(release)

    @property
    def num_prefix_holds(self) -> int:
        return len(self._holds)

    def flush_cache(self) -> bool:
        """Drop every cached prefix, in every tier (the disk tier's files too). Refused (False) while requests are
        running or prefixes are held."""

        def flush():
            if self.scheduler.running or self.scheduler.waiting or self.constraints.pending or self._holds:
                return False
            self.cache.reset()
            if self.scheduler.disk is not None:
                self.scheduler.disk.clear()
            return True

        return self.loop.call(flush)

    def check_integrity(self) -> None:
        def check():
            self.scheduler.check_integrity()
            self.constraints.table.check_integrity()

        self.loop.call(check)

    def health(self) -> tuple[bool, str]:
        """(True, "ok") while the engine loop serves; (False, why) once it is dead or shut down."""
        return self.loop.health()

    def add_step_listener(self, fn) -> None:
        """fn(StepInfo) after every step, on the engine thread (keep it cheap)."""
        self.loop.stats.listeners.append(fn)

    @property
    def step_times(self) -> list[float]:
        return self.loop.stats.step_times

    @property
    def host_times(self) -> list[float]:
        return self.loop.stats.host_times

    @property
    def num_steps(self) -> int:
        return self.loop.stats.num_steps

    @property
    def constraint_table(self):
        return self.constraints.table

    def get_server_info(self) -> dict:
        info = dict(dataclasses.asdict(self.config))
        info.update(model_path=self.model_path, max_context_len=self.max_context_len, vocab_size=self.vocab_size,
                    num_kv_pages=self.runner.num_pages, load_seconds=round(self.load_seconds, 3),
                    compile_seconds=round(self.compile_seconds, 3), num_compiled_shapes=self.runner.num_compiles,
                    num_step_shapes=len(self.runner.shapes()),
                    executables_loaded=self.runner.store.loaded if self.runner.store else 0,
                    executables_saved=self.runner.store.saved if self.runner.store else 0,
                    background_compile_done=self.runner.background_done.is_set(),
                    tp_layout=self.runner.layout.describe() if self.runner.layout is not None else "tp=1 (one device)")
        info.update(self.stats())
        return info

    def stats(self) -> dict:
        s, c = self.scheduler, self.output.counters
        return dict(num_running=len(s.running), num_waiting=len(s.waiting), num_steps=self.loop.stats.num_steps,
                    num_decode_steps=self.loop.stats.num_decode_steps,
                    num_decode_rows=self.loop.stats.num_decode_rows, busy_seconds=self.loop.stats.busy_seconds,
                    num_requests=c["requests"], shared_in_step=s.shared_in_step, borrowed_tokens=s.borrowed_tokens,
                    num_retractions=s.num_retractions, partial_page_tokens=s.partial_tokens,
                    free_pages=self.allocator.num_free, cached_pages=self.cache.cached_pages,
                    prompt_tokens=c["prompt_tokens"], cached_tokens=c["cached_tokens"],
                    generation_tokens=c["generation_tokens"],
                    cache_hit_rate=c["cached_tokens"] / max(c["prompt_tokens"], 1),
                    cache_tiers={**cache_tiers(s), "transfer_costs": s.transfer_costs.as_dict()})

    def shutdown(self) -> None:
        if self.scheduler.disk is not None and self.loop.health()[0]:  # the last pages, before the loop stops
            self.loop.call(self.scheduler.disk.flush)
        self.runner.stop_background()
        # let the shape being compiled finish: a daemon thread killed inside XLA at interpreter exit aborts
        # the process ("terminate called ...") instead of exiting cleanly
        self.runner.background_done.wait(timeout=300)
        self.loop.shutdown()
        if self.loop.stopped:  # no step can run any more: free the executables and device state
            self.runner.release()
        if self.scheduler.disk is not None:
            self.scheduler.disk.close()
        self.constraints.shutdown()
        if self.channel is not None:  # the other ranks exit
            self.channel.close()
        if self.kv_events is not None:
            self.kv_events.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ----------------------------------------------------------------------------- rows
    def _row_params(self, c):
        """Host-side sampling parameters of a chunk's sampling row (called by the runner)."""
        from sgl_jax.runner import RowParams

        d = c.req.data
        p = d.params
        # min_new_tokens: the stop ids are masked in slots of their own (never a logit_bias slot)
        suppress = tuple(sorted(d.prep.stop_ids)) if len(c.req.output_ids) < p.min_new_tokens else ()
        fsm_state, fsm_slot, host_mask = self.constraints.row(c.req, c.samples)
        return RowParams(temperature=float(p.temperature), top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                         frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
                         repetition_penalty=p.repetition_penalty, bias=p.logit_bias, suppress=suppress, seed=d.seed,
                         step=len(c.req.output_ids), top=d.prep.top_logprobs_num > 0,
                         logprob=bool(d.prep.return_logprob), fsm_state=fsm_state,
                         fsm_slot=fsm_slot, fsm_budget=self.constraints.budget(c.req), host_mask=host_mask)


__all__ = ["Engine", "PrefixHold", "PreparedRequest", "StepInfo"]
