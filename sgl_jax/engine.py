"""The Engine: SGLang's offline API in-process, and the loop that serves every front end.

A request's life:
 1. `generate()` / `async_generate()` / `generate_stream()` validate the input (SamplingParams, token
    ids, context length) in the caller's thread and raise `InvalidRequestError` naming the field.
 2. The request goes through the inbox (a thread-safe queue) to the engine thread, which owns the
    scheduler, the radix cache and the device state; nothing else touches them.
 3. The engine thread loops: drain the inbox (adds, aborts, flushes) -> `scheduler.schedule()` ->
    `runner.run(plan)` (one compiled step on the device) -> `scheduler.on_step_done(plan)` ->
    `_postprocess`: append sampled tokens, detokenize incrementally, check EOS / stop ids / stop strings /
    stop regexes / length, collect logprobs, finish requests (their prefixes stay in the radix cache).
 4. Each request has a sink; the engine thread pushes SGLang-shaped output dicts into it (every step
    for streams, the last one otherwise). Sync callers block on a queue, async ones on an asyncio queue
    fed with `call_soon_threadsafe`. Closing a stream early aborts the request and frees its pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import os
import queue
import random
import re
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterator

from sgl_jax.config import EngineConfig, build
from sgl_jax.errors import InvalidRequestError, UnsupportedFeatureError
from sgl_jax.sampling_params import SamplingParams, check_token_ids
from sgl_jax.scheduler import Chunk, OutOfPagesError, ReqState, Request, Scheduler, SchedulerConfig, StepPlan

log = logging.getLogger("sgl_jax.engine")


@dataclasses.dataclass(eq=False)
class _ReqData:
    """The engine's per-request state (Request.data)."""

    params: SamplingParams
    sink: Callable[[dict], None]
    stream: bool
    stop_ids: frozenset
    seed: int
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    detok: Any = None
    text: str = ""
    t_start: float = 0.0
    t_first: float | None = None
    finish_reason: dict | None = None
    input_logprobs: list = dataclasses.field(default_factory=list)
    input_top: list = dataclasses.field(default_factory=list)
    output_logprobs: list = dataclasses.field(default_factory=list)
    output_top: list = dataclasses.field(default_factory=list)
    next_input_pos: int = 0
    stop_regex: tuple = ()
    constraint: tuple | None = None  # (kind, spec) of regex / json / choices
    future: Any = None  # compile future
    place: Any = None  # constrained.table.Placement while on the device
    fsm_hist: list = dataclasses.field(default_factory=list)  # local FSM state after each output token
    matcher: Any = None  # llguidance matcher (ebnf grammars)
    mask_future: Any = None  # the matcher's next mask row, computed off the engine thread
    forced_tokens: int = 0  # tokens appended by jump-forward


class Engine:
    """In-process engine: `Engine(model="smollm2-135m", **config)` or `Engine(EngineConfig(...))`."""

    def __init__(self, config: EngineConfig | str | None = None, *, metrics=None, progress: bool = True,
                 **overrides):
        if isinstance(config, str):
            overrides.setdefault("model", config)
            config = None
        if config is None:
            config = build(EngineConfig, overrides, "engine")
        elif overrides:
            config = build(EngineConfig, {**dataclasses.asdict(config), **overrides}, "engine")
        self.config: EngineConfig = config
        self.metrics = metrics
        self._progress = progress
        self._init_device_side()
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._wakeup = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sgl_jax-engine", daemon=True)
        self.step_times: list[float] = []
        self.host_times: list[float] = []
        self.num_steps = 0
        self.stats_counters = {"prompt_tokens": 0, "cached_tokens": 0, "generation_tokens": 0, "requests": 0}
        self._thread.start()

    # --------------------------------------------------------------------------------- set-up
    def _init_device_side(self):
        import jax

        from sgl_jax.cache import PageAllocator, RadixCache
        from sgl_jax.models.loader import canonical_dtype, load_model
        from sgl_jax.runner import ModelRunner, enable_compilation_cache

        c = self.config
        enable_compilation_cache(c.compile_cache_dir)
        t0 = time.perf_counter()
        loaded = load_model(c.model, c.dtype, progress=self._progress)
        self.load_seconds = time.perf_counter() - t0
        self.model_path = loaded.path
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.vocab_size = loaded.vocab_size  # the tokenizer's ids; model rows past it are padding
        dtype = canonical_dtype(c.dtype)
        kv_dtype = canonical_dtype(c.kv_dtype or c.dtype)
        self.max_context_len = min(c.max_context_len, mc.max_position_embeddings)
        page_bytes = mc.kv_bytes_per_token(jax.numpy.dtype(kv_dtype).itemsize) * c.page_size
        num_pages = int(c.kv_memory_gb * (1 << 30)) // page_bytes + 1
        if c.max_num_pages > 0:
            num_pages = min(num_pages, c.max_num_pages)
        max_pages_per_seq = math.ceil(self.max_context_len / c.page_size)
        if num_pages - 1 < max_pages_per_seq:
            raise ValueError(f"the KV pool ({num_pages - 1} pages of {c.page_size} tokens, kv_memory_gb="
                             f"{c.kv_memory_gb}) cannot hold one request of max_context_len={self.max_context_len}")
        widths = list(c.page_width_buckets) or _default_widths(max_pages_per_seq, c.page_size)
        if max(widths) < max_pages_per_seq:
            raise ValueError(f"page_width_buckets {widths} cannot cover max_context_len={self.max_context_len} "
                             f"({max_pages_per_seq} pages)")
        max_blocks = max(c.prefill_block_buckets)
        # a mixed step's block count is rounded up to a bucket: the largest bucket within the limit
        mixed_blocks = max([b for b in c.prefill_block_buckets if b <= c.max_mixed_blocks], default=0)
        self.runner = ModelRunner(
            mc, loaded.params, dtype=dtype, kv_dtype=kv_dtype, num_pages=num_pages, page_size=c.page_size,
            block_q=c.prefill_block, num_slots=c.max_running_requests, decode_buckets=c.decode_buckets,
            block_buckets=c.prefill_block_buckets, max_mixed_blocks=c.max_mixed_blocks,
            page_width_buckets=widths, max_top_logprobs=c.max_top_logprobs,
            attention_backend=c.attention_backend, constraint_rows=c.constraint_rows,
            constraint_classes=c.constraint_classes, constraint_slots=c.constraint_slots,
            run_q=c.run_block, run_buckets=list(c.run_block_buckets), valid_vocab=self.vocab_size,
            max_logit_bias=c.max_logit_bias,
            max_suppress=c.max_stop_token_ids + len(self.tokenizer.stop_token_ids))
        from sgl_jax.constrained import ConstraintCache
        from sgl_jax.constrained.table import ConstraintTable

        self.constraint_cache = ConstraintCache(capacity=256, max_workers=1)
        self.constraint_table = ConstraintTable(c.constraint_rows, c.constraint_classes, c.constraint_slots)
        self._vocab = None  # TokenVocabulary, built on the first constrained request
        self._grammar = None  # constrained.grammar.GrammarBackend, built on the first ebnf request
        self._mask_pool = None  # worker thread computing grammar mask rows
        self._pending: list[Request] = []  # constrained requests waiting for their FSM / a table slot
        if max(c.decode_buckets) < c.max_running_requests:
            raise ValueError(f"decode_buckets {c.decode_buckets} must reach max_running_requests="
                             f"{c.max_running_requests}")
        if c.run_block_buckets and (c.run_block < 2 or min(c.run_block_buckets) < 1):
            raise ValueError(f"run_block {c.run_block} must be >= 2 and run_block_buckets {c.run_block_buckets} "
                             "positive (or run_block_buckets empty to turn run blocks off)")
        if c.decode_row_fill not in ("auto", "fit", "pad"):
            raise ValueError(f"decode_row_fill {c.decode_row_fill!r} is unknown; expected auto, fit or pad")
        self.allocator = PageAllocator(num_pages, reserved=1)
        self.cache = RadixCache(self.allocator, c.page_size, disabled=c.disable_radix_cache)
        self.scheduler = Scheduler(self.cache, SchedulerConfig(
            page_size=c.page_size, max_running=c.max_running_requests,
            max_prefill_tokens=min(c.max_prefill_tokens, max_blocks * c.prefill_block),
            prefill_block=c.prefill_block, max_prefill_blocks=max_blocks,
            max_mixed_blocks=mixed_blocks, max_context=self.max_context_len, policy=c.schedule_policy,
            starvation_limit=c.starvation_limit, new_token_ratio=c.new_token_ratio,
            max_decode_rows=max(c.decode_buckets), short_chunk=c.decode_row_chunk,
            decode_fill="pad" if c.decode_row_fill == "auto" else c.decode_row_fill,
            decode_buckets=tuple(sorted(c.decode_buckets)), page_width_buckets=tuple(sorted(widths)),
            run_q=c.run_block, run_buckets=tuple(sorted(c.run_block_buckets))))
        self.compile_seconds = 0.0
        if c.warmup:
            self.compile_seconds = self.runner.warmup(progress=self._progress)
            if c.decode_row_fill == "auto":  # size jump-forward steps by this machine's measured step costs
                self.scheduler.cfg = dataclasses.replace(self.scheduler.cfg, decode_fill="cost",
                                                         decode_costs=self._step_costs())
        self.warmup_compiles = self.runner.num_compiles

    def _step_costs(self) -> dict:
        """Decode step costs per shape (ModelRunner.measure_decode_costs), kept beside the compilation cache:
        timing every shape takes ~20 s for the CPU preset, so a restart on the same machine reuses them."""
        import hashlib
        import json

        import jax

        c, r = self.config, self.runner
        dev = jax.devices()[0]
        key = json.dumps([os.path.abspath(self.model_path), c.dtype, c.kv_dtype, c.attention_backend, r.platform,
                          getattr(dev, "device_kind", ""), jax.__version__, r.page_size, r.num_pages, r.run_q,
                          r.decode_buckets, r.run_buckets, r.page_width_buckets, os.cpu_count()])
        path = None
        if c.compile_cache_dir:
            path = os.path.join(os.path.expanduser(c.compile_cache_dir), "step_costs",
                                hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
            try:
                with open(path) as f:
                    return {tuple(k): v for k, v in json.load(f)}
            except (OSError, ValueError, TypeError):
                pass  # not measured yet (or unreadable): measure
        costs = r.measure_decode_costs()
        if path:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump([[list(k), v] for k, v in sorted(costs.items())], f)
                os.replace(tmp, path)
            except OSError as e:
                log.warning("could not save step costs to %s: %s", path, e)
        return costs

    # ------------------------------------------------------------------------------ validation
    def _prepare(self, *, text=None, input_ids=None, sampling_params=None, return_logprob=False,
                 logprob_start_len=-1, top_logprobs_num=0) -> tuple[list[int], SamplingParams]:
        if (text is None) == (input_ids is None):
            raise InvalidRequestError("exactly one of 'text' and 'input_ids' must be given")
        if text is not None:
            if not isinstance(text, str):
                raise InvalidRequestError(f"'text' must be a string, got {type(text).__name__}")
            ids = self.tokenizer.encode(text) if text else []
            if not ids and self.tokenizer.bos_token_id is not None:
                ids = [self.tokenizer.bos_token_id]  # as upstream: an empty text is just BOS
        else:
            if not isinstance(input_ids, list):
                raise InvalidRequestError("'input_ids' must be a list of integers")
            ids = check_token_ids(input_ids, self.vocab_size, "input_ids")
        if not ids:
            raise InvalidRequestError("the prompt is empty ('text' or 'input_ids' must have at least one token)")
        sp = SamplingParams.from_dict(sampling_params, vocab_size=self.vocab_size,
                                      max_context=self.max_context_len, prompt_len=len(ids),
                                      max_logit_bias=self.config.max_logit_bias,
                                      max_stop_token_ids=self.config.max_stop_token_ids)
        if len(ids) >= self.max_context_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; the context length is "
                                      f"{self.max_context_len}")
        self._check_constraint(sp)
        if not isinstance(return_logprob, bool):
            raise InvalidRequestError("'return_logprob' must be a bool")
        if not isinstance(logprob_start_len, int) or isinstance(logprob_start_len, bool) or logprob_start_len < -1:
            raise InvalidRequestError(f"'logprob_start_len' must be an int >= -1, got {logprob_start_len!r}")
        if logprob_start_len >= len(ids) and return_logprob:
            raise InvalidRequestError(f"'logprob_start_len' ({logprob_start_len}) must be smaller than the prompt "
                                      f"length ({len(ids)})")
        if not isinstance(top_logprobs_num, int) or not 0 <= top_logprobs_num <= self.config.max_top_logprobs:
            raise InvalidRequestError(f"'top_logprobs_num' must be an int in [0, {self.config.max_top_logprobs}], "
                                      f"got {top_logprobs_num!r}")
        for pattern in sp.stop_regex:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidRequestError(f"'stop_regex' {pattern!r} is not a valid regex: {e}") from None
        return ids, sp

    @staticmethod
    def _constraint_of(sp: SamplingParams):
        given = [(k, v) for k, v in (("regex", sp.regex), ("json", sp.json_schema), ("choices", sp.choices),
                                     ("ebnf", sp.ebnf)) if v]
        if len(given) > 1:
            raise InvalidRequestError(f"at most one of regex, json_schema, choices, ebnf may be set; got "
                                      f"{', '.join(k for k, _ in given)}")
        return given[0] if given else None

    def _check_constraint(self, sp: SamplingParams) -> None:
        """Cheap, synchronous checks (syntax, unsupported keywords); the FSM is built off-thread later."""
        from sgl_jax.constrained import ConstraintError, json_schema_to_regex
        from sgl_jax.constrained.regex import parse

        con = self._constraint_of(sp)
        if con is None:
            return
        kind, spec = con
        try:
            if kind == "regex":
                parse(spec)
            elif kind == "json":
                json_schema_to_regex(spec, whitespace_pattern=self.config.json_whitespace or None)
            elif kind == "choices":
                if not all(isinstance(c, str) and c for c in spec):
                    raise InvalidRequestError("'choices' must be a list of non-empty strings")
            else:
                from sgl_jax.constrained.grammar import GrammarError

                try:
                    self._grammar_backend().matcher(spec)
                except GrammarError as e:
                    raise InvalidRequestError(f"invalid ebnf: {e}") from None
        except ConstraintError as e:
            field = {"regex": "regex", "json": "json_schema"}[kind]
            raise InvalidRequestError(f"invalid {field}: {e}") from None

    def validate(self, **kw) -> None:
        """Raise InvalidRequestError if the request is bad; changes nothing."""
        self._prepare(**kw)

    def _make_request(self, sink, stream, *, text=None, input_ids=None, sampling_params=None,
                      return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
                      return_text_in_logprobs=False, rid=None) -> Request:
        ids, sp = self._prepare(text=text, input_ids=input_ids, sampling_params=sampling_params,
                                return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                                top_logprobs_num=top_logprobs_num)
        stop_ids = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            stop_ids |= set(self.tokenizer.stop_token_ids)
        seed = sp.sampling_seed if sp.sampling_seed is not None else self._rng.getrandbits(32)
        data = _ReqData(params=sp, sink=sink, stream=stream, stop_ids=frozenset(stop_ids), seed=seed,
                        return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                        top_logprobs_num=top_logprobs_num if return_logprob else 0,
                        return_text_in_logprobs=return_text_in_logprobs,
                        detok=self.tokenizer.detokenizer(skip_special_tokens=sp.skip_special_tokens),
                        t_start=time.perf_counter(), stop_regex=tuple(re.compile(p) for p in sp.stop_regex))
        data.constraint = self._constraint_of(sp)
        start = logprob_start_len if return_logprob and logprob_start_len >= 0 else -1
        data.next_input_pos = max(start, 0)
        uses_penalties = (sp.frequency_penalty != 0 or sp.presence_penalty != 0 or sp.repetition_penalty != 1)
        return Request(rid=rid or uuid.uuid4().hex, prompt_ids=ids, max_new_tokens=sp.max_new_tokens,
                       logprob_start=start, uses_penalties=uses_penalties, data=data)

    # ----------------------------------------------------------------------------- front ends
    def _normalize_batch(self, prompt, input_ids, sampling_params):
        """Expand SGLang's single/batch forms into a list of per-sequence kwargs."""
        if prompt is not None and input_ids is not None:
            raise InvalidRequestError("give either 'prompt'/'text' or 'input_ids', not both")
        if prompt is None and input_ids is None:
            raise InvalidRequestError("one of 'prompt'/'text' and 'input_ids' is required")
        batched = isinstance(prompt, list) or (isinstance(input_ids, list) and input_ids
                                               and isinstance(input_ids[0], list))
        items = (prompt if prompt is not None else input_ids) if batched else [prompt if prompt is not None
                                                                               else input_ids]
        if batched and not items:
            raise InvalidRequestError("the batch is empty")
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(items):
                raise InvalidRequestError(f"'sampling_params' has {len(sampling_params)} entries for "
                                          f"{len(items)} prompts")
            sps = sampling_params
        else:
            sps = [sampling_params] * len(items)
        out = []
        for item, sp in zip(items, sps):
            n = (sp or {}).get("n", 1) if isinstance(sp, dict) else 1
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise InvalidRequestError(f"sampling param 'n' must be an int >= 1, got {n!r}")
            for i in range(n):
                spi = dict(sp or {})
                spi.pop("n", None)
                if n > 1 and spi.get("sampling_seed") is not None:
                    spi["sampling_seed"] = spi["sampling_seed"] + i
                kw = {"text": item} if prompt is not None else {"input_ids": item}
                out.append((kw, spi))
        return batched or len(out) > 1, out

    def _expand(self, prompt, input_ids, sampling_params, stream, return_logprob, logprob_start_len,
                top_logprobs_num, return_text_in_logprobs):
        """Shared front of generate()/async_generate(): per-sequence items and the common request options."""
        batched, items = self._normalize_batch(prompt, input_ids, sampling_params)
        if stream and batched:
            raise InvalidRequestError("stream=True takes a single prompt")
        common = dict(return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                      top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs)
        return batched, items, common

    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                 logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False, stream=False,
                 rid=None):
        """SGLang's Engine.generate: a dict for one prompt, a list for a batch (or n > 1).

        With stream=True (single prompt), returns an iterator of cumulative output dicts.
        """
        batched, items, common = self._expand(prompt, input_ids, sampling_params, stream, return_logprob,
                                              logprob_start_len, top_logprobs_num, return_text_in_logprobs)
        if stream:
            (kw, sp), = items
            return self._sync_stream(dict(kw, sampling_params=sp, rid=rid, **common))
        qs, reqs = [], []
        for i, (kw, sp) in enumerate(items):
            q: queue.SimpleQueue = queue.SimpleQueue()
            req = self._make_request(q.put, False, sampling_params=sp,
                                     rid=(rid if not batched else None), **kw, **common)
            qs.append(q)
            reqs.append(req)
        for req in reqs:
            self._submit(req)
        outs = [q.get() for q in qs]
        return outs if batched else outs[0]

    def _sync_stream(self, kw) -> Iterator[dict]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        req = self._make_request(q.put, True, **kw)
        self._submit(req)
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
                self.abort(req.rid)

    async def generate_stream(self, *, text=None, input_ids=None, sampling_params=None, return_logprob=False,
                              logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False,
                              rid=None, stream=True) -> AsyncIterator[dict]:
        """One sequence; yields cumulative output dicts (only the final one if stream=False).

        Closing the generator before the final event aborts the request.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = self._make_request(lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev), stream,
                                 text=text, input_ids=input_ids, sampling_params=sampling_params,
                                 return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                                 top_logprobs_num=top_logprobs_num,
                                 return_text_in_logprobs=return_text_in_logprobs, rid=rid)
        self._submit(req)
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
        """Asyncio twin of generate(): awaits the result, or returns an async iterator when streaming."""
        batched, items, common = self._expand(prompt, input_ids, sampling_params, stream, return_logprob,
                                              logprob_start_len, top_logprobs_num, return_text_in_logprobs)
        if stream:
            (kw, sp), = items
            return self.generate_stream(sampling_params=sp, rid=rid, **kw, **common)

        async def one(kw, sp, r):
            last = None
            async for ev in self.generate_stream(sampling_params=sp, rid=r, stream=False, **kw, **common):
                last = ev
            return last

        outs = await asyncio.gather(*(one(kw, sp, rid if not batched else None) for kw, sp in items))
        return list(outs) if batched else outs[0]

    # ---------------------------------------------------------------------------- control
    def _submit(self, req: Request) -> None:
        if self._stop.is_set():
            raise RuntimeError("the engine is shut down")
        self._inbox.put(("add", req))
        self._wakeup.set()

    def _call(self, fn, timeout: float = 600.0):
        """Run fn() on the engine thread (which owns the scheduler) and return its result."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox.put(("call", fn, box))
        self._wakeup.set()
        ok, val = box.get(timeout=timeout)
        if not ok:
            raise val
        return val

    def abort(self, rid: str) -> bool:
        self._inbox.put(("abort", rid))
        self._wakeup.set()
        return True

    def flush_cache(self) -> bool:
        """Drop every cached prefix. Refused (False) while requests are running."""

        def flush():
            if self.scheduler.running or self.scheduler.waiting:
                return False
            self.cache.reset()
            return True

        return self._call(flush)

    def check_integrity(self) -> None:
        self._call(self.scheduler.check_integrity)

    def get_server_info(self) -> dict:
        info = {k: v for k, v in dataclasses.asdict(self.config).items()}
        info.update(model_path=self.model_path, max_context_len=self.max_context_len,
                    num_kv_pages=self.runner.num_pages, load_seconds=round(self.load_seconds, 3),
                    compile_seconds=round(self.compile_seconds, 3), num_compiled_shapes=self.runner.num_compiles)
        info.update(self.stats())
        return info

    def stats(self) -> dict:
        s = self.scheduler
        c = self.stats_counters
        return dict(num_running=len(s.running), num_waiting=len(s.waiting), num_steps=self.num_steps,
                    num_retractions=s.num_retractions, free_pages=self.allocator.num_free,
                    cached_pages=self.cache.cached_pages, prompt_tokens=c["prompt_tokens"],
                    cached_tokens=c["cached_tokens"], generation_tokens=c["generation_tokens"],
                    cache_hit_rate=c["cached_tokens"] / max(c["prompt_tokens"], 1))

    def shutdown(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout=60)
        self.constraint_cache.shutdown(wait=False)
        if self._mask_pool is not None:
            self._mask_pool.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ------------------------------------------------------------------------------ the loop
    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = msg[0]
            if kind == "add":
                req = msg[1]
                if req.data.constraint is not None:
                    self._submit_constraint(req)
                    continue
                try:
                    self.scheduler.add(req)
                except ValueError as e:
                    self._finish_now(req, {"type": "abort", "message": str(e)})
            elif kind == "abort":
                req = self.scheduler.abort(msg[1])
                pend = [r for r in self._pending if r.rid == msg[1]]
                if pend:
                    self._pending.remove(pend[0])
                    req = pend[0]
                if req is not None and req.data.finish_reason is None:
                    req.data.finish_reason = {"type": "abort", "message": "aborted by the client"}
                    self._emit(req, final=True)
            elif kind == "call":
                _, fn, box = msg
                try:
                    box.put((True, fn()))
                except BaseException as e:  # noqa: BLE001 - handed back to the caller
                    box.put((False, e))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if self._pending:
                self._poll_constraints()
            if not self.scheduler.has_work:
                if self.config.check_integrity_when_idle:
                    self.scheduler.check_integrity()
                self._wakeup.wait(0.05)
                self._wakeup.clear()
                continue
            try:
                self._one_step()
            except Exception as e:  # noqa: BLE001 - keep serving: fail what is in flight, keep the loop
                log.exception("engine step failed")
                for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self.scheduler.abort(req.rid)
                    req.data.finish_reason = {"type": "abort", "message": f"engine error: {e}"}
                    self._emit(req, final=True)
        # shutdown: whatever is left gets an abort reply
        self._drain_inbox()
        for req in list(self.scheduler.running) + list(self.scheduler.waiting) + list(self._pending):
            self.scheduler.abort(req.rid)
            req.data.finish_reason = {"type": "abort", "message": "the engine is shutting down"}
            self._emit(req, final=True)

    def _one_step(self) -> None:
        t0 = time.perf_counter()
        try:
            plan = self.scheduler.schedule()
        except OutOfPagesError as e:
            victim = max(self.scheduler.running, key=lambda r: r.num_tokens)
            self.scheduler.abort(victim.rid)
            victim.data.finish_reason = {"type": "abort", "message": str(e)}
            self._emit(victim, final=True)
            return
        if plan is None:
            self._wakeup.wait(0.01)
            self._wakeup.clear()
            return
        t1 = time.perf_counter()
        batch, out = self.runner.run(plan, self._row_params)
        t2 = time.perf_counter()
        self.scheduler.on_step_done(plan)
        self._postprocess(plan, batch, out)
        t3 = time.perf_counter()
        self.num_steps += 1
        self.step_times.append(t2 - t1)
        self.host_times.append((t1 - t0) + (t3 - t2))
        if len(self.step_times) > 4096:
            del self.step_times[:2048], self.host_times[:2048]
        if self.metrics is not None:
            self.metrics.observe_step(t2 - t1, len(plan.chunks))
            self.metrics.set_queue(len(self.scheduler.waiting), len(self.scheduler.running),
                                   1 - self.allocator.num_free / self.allocator.num_total)

    def _row_params(self, c: Chunk):
        from sgl_jax.runner import RowParams

        d: _ReqData = c.req.data
        p = d.params
        # min_new_tokens: the stop ids are masked in slots of their own (never a logit_bias slot)
        suppress = tuple(sorted(d.stop_ids)) if len(c.req.output_ids) < p.min_new_tokens else ()
        fsm_state = fsm_slot = -1
        host_mask = None
        if d.place is not None:
            fsm_state, fsm_slot = d.place.base + d.fsm_hist[-1], d.place.slot
        elif d.matcher is not None and c.samples:
            host_mask = d.mask_future.result()
        return RowParams(temperature=float(p.temperature), top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                         frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
                         repetition_penalty=p.repetition_penalty, bias=p.logit_bias, suppress=suppress, seed=d.seed,
                         step=len(c.req.output_ids), top=d.top_logprobs_num > 0, fsm_state=fsm_state,
                         fsm_slot=fsm_slot, host_mask=host_mask)

    # ------------------------------------------------------------------ structured generation
    def _vocabulary(self):
        if self._vocab is None:
            from sgl_jax.constrained import TokenVocabulary

            self._vocab = TokenVocabulary(self.tokenizer.token_bytes_list(), sorted(self.tokenizer.stop_token_ids))
        return self._vocab

    def _grammar_backend(self):
        if self._grammar is None:
            from sgl_jax.constrained import grammar

            if not grammar.available():
                raise UnsupportedFeatureError("sampling param 'ebnf' needs the optional grammar backend: "
                                              "pip install llguidance")
            self._grammar = grammar.GrammarBackend(self.tokenizer, self.model_config.vocab_size)
        return self._grammar

    def _prefetch_mask(self, req: Request) -> None:
        """Start computing the grammar's next mask row in the worker thread (overlaps host work)."""
        import concurrent.futures

        if self._mask_pool is None:
            self._mask_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sgl_jax-grammar")
        d: _ReqData = req.data
        d.mask_future = self._mask_pool.submit(self._grammar.fill_mask, d.matcher)

    def _submit_constraint(self, req: Request) -> None:
        """Compile off the engine thread (the LRU cache shares results); admit when it is ready."""
        d: _ReqData = req.data
        kind, spec = d.constraint
        if kind == "ebnf":  # no finite table: llguidance computes mask rows on the host
            d.matcher = self._grammar_backend().matcher(spec)
            self._prefetch_mask(req)
            try:
                self.scheduler.add(req)
            except ValueError as e:
                self._finish_now(req, {"type": "abort", "message": str(e)})
            return
        opts = dict(max_states=self.config.max_constraint_states, max_seconds=self.config.max_constraint_seconds)
        if kind == "json" and self.config.json_whitespace:
            opts["whitespace_pattern"] = self.config.json_whitespace
        d.future = self.constraint_cache.submit(kind, list(spec) if kind == "choices" else spec,
                                                self._vocabulary(), **opts)
        self._pending.append(req)

    def _poll_constraints(self) -> None:
        from sgl_jax.constrained.table import ConstraintTableFullError

        for req in list(self._pending):
            d: _ReqData = req.data
            if not d.future.done():
                continue
            try:
                fsm = d.future.result()
                place = self.constraint_table.acquire(id(fsm), fsm)
            except (ValueError, ConstraintTableFullError) as e:  # too large, unsatisfiable, table too small
                self._pending.remove(req)
                self._finish_now(req, {"type": "abort", "message": f"constraint rejected: {e}"})
                continue
            if place is None:
                continue  # every resident constraint is in use: retry when one finishes
            if not place.uploaded:
                self.runner.upload_constraint(place)
            self._pending.remove(req)
            d.place, d.fsm_hist = place, [fsm.initial_state]
            if not self.config.disable_jump_forward:
                self._jump_forward(req)  # a forced start ('{"name":"') joins the prompt's prefill
                if d.finish_reason is not None:
                    self._finish_now(req, d.finish_reason)
                    continue
            try:
                self.scheduler.add(req)
            except ValueError as e:
                self._finish_now(req, {"type": "abort", "message": str(e)})

    def _grammar_consume(self, req: Request, tok: int) -> None:
        """Advance the llguidance matcher by the sampled token; finish at the grammar's end."""
        d: _ReqData = req.data
        m = d.matcher
        m.consume_token(tok)
        if m.is_error():
            d.finish_reason = {"type": "abort", "message": f"grammar: {m.get_error()}"}
        elif m.is_stopped() or tok in self.tokenizer.stop_token_ids:
            if tok not in self.tokenizer.stop_token_ids:
                d.text += d.detok.feed(tok)
            d.text += d.detok.finish()
            d.finish_reason = {"type": "stop", "matched": tok}

    def _grammar_forward(self, req: Request) -> None:
        """Append the grammar's forced tokens (no sampling; prefilled next step), then prefetch the mask."""
        d: _ReqData = req.data
        if not self.config.disable_jump_forward:
            ff = list(d.matcher.compute_ff_tokens())[: req.max_new_tokens - len(req.output_ids)]
            if ff:
                d.matcher.consume_tokens(ff)
                req.output_ids.extend(ff)
                d.forced_tokens += len(ff)
                if d.return_logprob:
                    d.output_logprobs.extend([None, t, self._token_text(d, t)] for t in ff)
                    if d.top_logprobs_num:
                        d.output_top.extend(None for _ in ff)
                d.text += d.detok.feed(ff)
                if len(req.output_ids) >= req.max_new_tokens:
                    d.text += d.detok.finish()
                    d.finish_reason = {"type": "length", "length": req.max_new_tokens}
                    return
        self._prefetch_mask(req)

    def _jump_forward(self, req: Request) -> None:
        """Append the constraint's forced continuation without sampling it (the compressed FSM).

        The last few generated tokens and the forced bytes are re-tokenized together, so the text gets the
        tokenizer's own segmentation (not a byte-by-byte one the model never saw); the final token of that
        is held back only if some token allowed at its position is longer (it could merge with what
        follows: the model then re-samples it), otherwise the whole run is appended and the next sampled
        token starts exactly at the end of the run; the FSM state is replayed over the new tokens;
        the request then prefills only them, its earlier KV (and the radix cache) intact. Effect on the
        distribution: forced text is what the constraint allows anyway; only the tokenization of the
        boundary is the tokenizer's choice instead of the model's, and forced tokens carry no logprob.
        """
        from sgl_jax.constrained import advance, may_extend

        d: _ReqData = req.data
        fsm = d.place.fsm
        forced = fsm.forced[d.fsm_hist[-1]]
        if not forced:
            return
        ps = self.config.page_size
        out = req.output_ids
        # re-tokenize at most the last 2 tokens, never one whose KV sits in a shared (tree) page
        k = min(2, len(out), req.num_tokens - req.n_tree * ps)
        tb = self.tokenizer.token_bytes
        prev = b"".join(tb(t) for t in out[len(out) - k:]) if k > 0 else b""
        try:
            text = (prev + forced).decode("utf-8")
        except UnicodeDecodeError:
            return  # the boundary is inside a character: let the model emit the next token
        keep = self.tokenizer.encode(text, add_special_tokens=False)
        start = d.fsm_hist[len(d.fsm_hist) - 1 - k]
        states, state = [], start
        for t in keep:
            state = advance(fsm, state, t)
            if state < 0:
                return  # re-tokenization left the constraint's language: keep the sampled path
            states.append(state)
        if keep and may_extend(fsm, self._vocabulary(), states[-2] if len(keep) > 1 else start, keep[-1]):
            # a longer allowed token could span the end of the run: let the model choose it
            keep, states = keep[:-1], states[:-1]
        if sum(len(tb(t)) for t in keep) <= len(prev):
            return  # nothing gained beyond what is already there
        room = req.max_new_tokens - (len(out) - k)
        keep, states = keep[:room], states[:room]
        if not keep:
            return
        d.forced_tokens += len(keep) - k
        # tokens the re-tokenization left unchanged keep their KV, FSM state and logprobs
        j = 0
        while j < min(k, len(keep)) and keep[j] == out[len(out) - k + j]:
            j += 1
        keep, states, k = keep[j:], states[j:], k - j
        first_pos = req.num_tokens - k
        del out[len(out) - k:]
        del d.fsm_hist[len(d.fsm_hist) - k:]
        out.extend(keep)
        d.fsm_hist.extend(states)
        req.num_computed = min(req.num_computed, first_pos)
        if d.return_logprob:
            del d.output_logprobs[len(d.output_logprobs) - k:]
            d.output_logprobs.extend([None, t, self._token_text(d, t)] for t in keep)
            if d.top_logprobs_num:
                del d.output_top[len(d.output_top) - k:]
                d.output_top.extend(None for _ in keep)
        if k:  # tokens were replaced: detokenize the output afresh
            d.detok = self.tokenizer.detokenizer(skip_special_tokens=d.params.skip_special_tokens)
            d.text = d.detok.feed(out)
        else:  # only appended: continue the incremental detokenizer
            d.text += d.detok.feed(keep)
        if len(out) >= req.max_new_tokens:
            d.text += d.detok.finish()
            d.finish_reason = {"type": "length", "length": req.max_new_tokens}

    # ----------------------------------------------------------------------- postprocess
    def _token_text(self, d: _ReqData, tok: int):
        return self.tokenizer.decode([tok], skip_special_tokens=False) if d.return_text_in_logprobs else None

    def _postprocess(self, plan: StepPlan, batch, out) -> None:
        toks, lps, tlps = out["tokens"], out["logprobs"], out["target_logprobs"]
        top_ids, top_lps = out["top_ids"], out["top_logprobs"]
        for c, (a, e) in zip(plan.chunks, batch.logits_rows):
            req = c.req
            if req.state is not ReqState.RUNNING:
                continue
            d: _ReqData = req.data
            if d.return_logprob and c.logits_from is not None:
                self._collect_input_logprobs(req, c, a, e, tlps, top_ids, top_lps)
            if c.samples:
                tok = int(toks[e - 1])
                req.output_ids.append(tok)
                if d.t_first is None:
                    d.t_first = time.perf_counter()
                    if self.metrics is not None:
                        self.metrics.on_first_token(d.t_first - d.t_start)
                if d.return_logprob:
                    d.output_logprobs.append([float(lps[e - 1]), tok, self._token_text(d, tok)])
                    if d.top_logprobs_num:
                        d.output_top.append(self._top_entry(d, top_ids[e - 1], top_lps[e - 1]))
                if d.place is not None:
                    d.fsm_hist.append(int(out["next_state"][e - 1]) - d.place.base)
                    if tok in d.place.fsm.eos_token_ids:
                        # the constraint is complete: EOS ends it even with ignore_eos
                        d.finish_reason = {"type": "stop", "matched": tok}
                        d.text += d.detok.finish()
                if d.matcher is not None:
                    self._grammar_consume(req, tok)
                if d.finish_reason is None:
                    self._check_finish(req, tok)
                if d.finish_reason is None and d.place is not None and not self.config.disable_jump_forward:
                    self._jump_forward(req)
                if d.finish_reason is None and d.matcher is not None:
                    self._grammar_forward(req)
                if d.finish_reason is not None:
                    self.scheduler.finish(req)
                    self._emit(req, final=True)
                elif d.stream:
                    self._emit(req, final=False)
            elif not req.wants_sample and req.num_computed >= req.num_tokens:
                d.finish_reason = {"type": "length", "length": 0}
                self.scheduler.finish(req)
                self._emit(req, final=True)

    def _top_entry(self, d: _ReqData, ids, vals):
        k = d.top_logprobs_num
        return [[float(v), int(i), self._token_text(d, int(i))] for i, v in zip(ids[:k], vals[:k])]

    def _collect_input_logprobs(self, req, c, a, e, tlps, top_ids, top_lps) -> None:
        d: _ReqData = req.data
        n_prompt = len(req.prompt_ids)
        first_pos = c.end - (e - a)  # position of logits row a
        for j in range(a, e):
            target = first_pos + (j - a) + 1  # the prompt position this row predicts
            if d.next_input_pos == 0 and target == 1 and not d.input_logprobs:
                d.input_logprobs.append([None, req.prompt_ids[0], self._token_text(d, req.prompt_ids[0])])
                if d.top_logprobs_num:
                    d.input_top.append(None)
                d.next_input_pos = 1
            if target != d.next_input_pos or target >= n_prompt:
                continue
            tok = req.prompt_ids[target]
            d.input_logprobs.append([float(tlps[j]), tok, self._token_text(d, tok)])
            if d.top_logprobs_num:
                d.input_top.append(self._top_entry(d, top_ids[j], top_lps[j]))
            d.next_input_pos = target + 1
        if n_prompt == 1 and not d.input_logprobs:
            d.input_logprobs.append([None, req.prompt_ids[0], self._token_text(d, req.prompt_ids[0])])

    def _check_finish(self, req: Request, tok: int) -> None:
        d: _ReqData = req.data
        p = d.params
        if tok in d.stop_ids and len(req.output_ids) > p.min_new_tokens - 1:
            d.finish_reason = {"type": "stop", "matched": tok}
            d.text += d.detok.finish()
            return
        new = d.detok.feed(tok)
        d.text += new
        if new and (p.stop or d.stop_regex) and len(req.output_ids) >= p.min_new_tokens:
            window = d.text[-(len(new) + max((len(s) for s in p.stop), default=0)):]
            offset = len(d.text) - len(window)
            best = None
            for s in p.stop:
                i = window.find(s)
                if i >= 0 and (best is None or offset + i < best[0]):
                    best = (offset + i, s)
            for rx in d.stop_regex:
                m = rx.search(d.text)
                if m and (best is None or m.start() < best[0]):
                    best = (m.start(), m.group(0))
            if best is not None:
                pos, s = best
                d.text = d.text[:pos + len(s)] if p.no_stop_trim else d.text[:pos]
                d.finish_reason = {"type": "stop", "matched": s}
                return
        if len(req.output_ids) >= req.max_new_tokens:
            d.text += d.detok.finish()
            d.finish_reason = {"type": "length", "length": req.max_new_tokens}
        elif req.num_tokens >= self.max_context_len:
            d.text += d.detok.finish()
            d.finish_reason = {"type": "length", "length": len(req.output_ids)}

    def _visible_text(self, d: _ReqData) -> str:
        """While streaming, hold back a tail that could still become a stop string."""
        if d.finish_reason is not None or not d.params.stop:
            return d.text
        hold = 0
        for s in d.params.stop:
            for k in range(min(len(s) - 1, len(d.text)), 0, -1):
                if d.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return d.text[:len(d.text) - hold]

    def _emit(self, req: Request, final: bool) -> None:
        d: _ReqData = req.data
        if final and d.place is not None:
            self.constraint_table.release(d.place.key)
            d.place = None
        if final and d.finish_reason is not None and d.finish_reason.get("type") != "abort":
            self.stats_counters["requests"] += 1
            self.stats_counters["prompt_tokens"] += len(req.prompt_ids)
            self.stats_counters["cached_tokens"] += req.cached_tokens
            self.stats_counters["generation_tokens"] += len(req.output_ids)
        if final and self.metrics is not None:
            status = d.finish_reason.get("type", "stop") if d.finish_reason else "abort"
            self.metrics.on_finish(status, len(req.prompt_ids), len(req.output_ids), req.cached_tokens,
                                   time.perf_counter() - d.t_start)
        meta = {"id": req.rid, "finish_reason": d.finish_reason if final else None,
                "prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
                "cached_tokens": req.cached_tokens, "e2e_latency": time.perf_counter() - d.t_start}
        if d.return_logprob:
            meta["input_token_logprobs"] = list(d.input_logprobs)
            meta["output_token_logprobs"] = list(d.output_logprobs)
            if d.top_logprobs_num:
                meta["input_top_logprobs"] = list(d.input_top)
                meta["output_top_logprobs"] = list(d.output_top)
        ev = {"text": d.text if final else self._visible_text(d), "output_ids": list(req.output_ids),
              "meta_info": meta}
        try:
            d.sink(ev)
        except Exception:  # noqa: BLE001 - a consumer's closed loop must not stop the engine
            log.debug("sink of %s failed", req.rid, exc_info=True)

    def _finish_now(self, req: Request, reason: dict) -> None:
        req.data.finish_reason = reason
        self._emit(req, final=True)


def _default_widths(max_pages: int, page_size: int) -> list[int]:
    """Page-table widths to compile: 256 tokens, then x4, up to the context length."""
    w = max(1, math.ceil(256 / page_size))
    out = []
    while w < max_pages:
        out.append(w)
        w *= 4
    out.append(max_pages)
    return out
