"""The device side of the engine: the KV pool, the penalty state, and the one jitted step.

`step(params, kv, pstate, inputs)` is a pure function: the model forward over the ragged batch
(KV pages written in place, the pool donated), penalties, logit bias (max_logit_bias entries a row), the
min_new_tokens stop-id suppression (slots of its own), the model's padding ids (embedding rows past the
tokenizer's vocabulary: always -inf) and constraint masks on the logits, on-device
sampling with per-request PRNG keys, logprobs (sampled tokens, prompt targets, top-k). It is compiled
for a small fixed set of shapes (`StepShape`: decode rows x prefill blocks x page-table width, plus
decode steps carrying run blocks and a full-logits variant for prompt logprobs), all at start-up; afterwards no request can trigger a
compilation. `ModelRunner.run(plan)` packs a scheduler plan (host numpy), picks the shape bucket, runs
the step and returns numpy results.

Constraint budget (`_constrain`). A table-constrained row also carries its token budget r: the new tokens
it may still produce, counting the one being sampled. A token stays allowed only if the state it leads to
can reach acceptance in the r - 1 tokens left after it (dist[next] <= r - 1, dist from the compiled FSM;
EOS keeps an accepting state, whose dist is 0), so an output cut by max_new_tokens is still a complete
match whenever the request's budget admits one (the engine rejects it up front otherwise). Effect on the
distribution: while every allowed token keeps a completion within reach, the rule removes nothing and the
row samples the model's distribution restricted to the constraint, as before. Once the budget binds, the
row samples the model's distribution renormalised over the tokens that keep a completion reachable, i.e.
conditioned on finishing in time one token at a time: a greedy-local conditioning, not the exact
conditional of the whole sequence (that would weigh each token by the model's probability of then
finishing in time, which the step does not have), so under a tight budget the output follows whichever
short completion the model prefers token by token. Rows masked on the host (llguidance grammars) are not covered.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm.auto import tqdm

from pallas_kernels import cpu_matmul

from sgl_jax import sampling
from sgl_jax.batch import PackedBatch, SeqChunk, pack
from sgl_jax.constrained.fsm import DIST_UNREACHABLE, NEVER_CLASS
from sgl_jax.executables import ExecutableStore, compile_fresh, fingerprint, step_compile_options
from sgl_jax.models.attention import AttnMetadata, get_attention_backend
from sgl_jax.models import packing
from sgl_jax.models.llama import CausalLM, init_kv_cache
from sgl_jax.scheduler import StepPlan
from sgl_jax.shapes import ShapeGrid, StepShape  # noqa: F401 - StepShape re-exported

def mirrored(method):
    """A runner method that changes or reads the device state through an SPMD program: with a multi-host
    `channel` (rank 0; sgl_jax/parallel/multihost.py) the call is sent to every other rank first, which runs it on
    its own runner, so all ranks run the same programs in the same order. One call at a time (a lock)."""

    @functools.wraps(method)
    def call(self, *args):
        if getattr(self, "channel", None) is None:  # (a runner built piecemeal by a test has none)
            return method(self, *args)
        with self._mirror_lock:
            self.channel.send(method.__name__, args)
            return method(self, *args)

    return call


def _to_host(out):
    """Step outputs on the host: one batched device_get; replicated arrays spanning processes (multi-host rank 0)
    are read from a local copy."""
    leaves = jax.tree_util.tree_leaves(out)
    if all(x.is_fully_addressable for x in leaves):
        return jax.device_get(out)
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), out)


NO_BUDGET = 1 << 30  # fsm_budget of a row without a token budget (never binds: dist of a live state is < S)


@struct.dataclass
class StepInputs:
    """Everything one step reads besides params, KV pool and penalty state. Shapes per StepShape."""

    input_ids: jax.Array  # [T]
    positions: jax.Array  # [T]
    slot_mapping: jax.Array  # [T]
    dec_page_table: jax.Array  # [Sd, P]
    dec_kv_lens: jax.Array  # [Sd]
    pre_page_table: jax.Array  # [NB, P]
    pre_kv_lens: jax.Array  # [NB]
    run_page_table: jax.Array  # [NR, P]
    run_kv_lens: jax.Array  # [NR]
    logits_indices: jax.Array  # [L]
    sampling: sampling.SamplingBatch  # rows [L]
    row_slot: jax.Array  # [L] penalty-state slot of a sampling row; -1 = not sampling
    target_ids: jax.Array  # [L] next prompt token whose logprob is wanted; -1 = none
    want_top: jax.Array  # [L] bool, top logprobs wanted for this row
    want_lp: jax.Array  # [L] bool, the row's sampled-token or target logprob is read (else not computed: NaN)
    # Structured generation: each constrained row's FSM state is a row of the on-device table.
    fsm_state: jax.Array  # [L] int32 global table row, -1 = unconstrained
    fsm_slot: jax.Array  # [L] int32 constraint slot (its token -> class map), -1 = unconstrained
    host_mask: jax.Array  # [L, W] int32 packed mask rows computed on the host (grammar backend)
    host_mask_on: jax.Array  # [L] bool, the row uses host_mask instead of the table
    fsm_budget: jax.Array  # [L] int32 new tokens the row may still produce, this one included; NO_BUDGET = none


@struct.dataclass
class StepOutputs:
    tokens: jax.Array  # [L]
    logprobs: jax.Array  # [L] of the sampled token
    target_logprobs: jax.Array  # [L] of target_ids
    top_ids: jax.Array  # [L, K]
    top_logprobs: jax.Array  # [L, K]
    next_state: jax.Array  # [L] FSM state (global row) after the sampled token; -1 = unconstrained


@struct.dataclass
class ConstraintBuffers:
    """The device side of sgl_jax.constrained.table: every active constraint's tables in one buffer."""

    mask: jax.Array  # [R, W] int32 packed allowed-token bits per state row
    next: jax.Array  # [R, C] int32 next state (global row) per token class; -1 = not allowed
    cls: jax.Array  # [num_slots, V] int32 token -> class per constraint slot (model vocabulary V)
    dist: jax.Array  # [R] int32 fewest tokens from the state row to acceptance (DIST_UNREACHABLE = never)


def budget_cut(cb: ConstraintBuffers, fsm_state, budget, host_on):
    """[L, C] bool: token classes the table allows in the row's state but whose next state cannot reach
    acceptance within the budget (dist[next] > budget - 1). All False for unconstrained and host-mask rows."""
    table = (fsm_state >= 0) & ~host_on
    nxt = cb.next[jnp.maximum(fsm_state, 0)]  # [L, C]
    far = cb.dist[jnp.maximum(nxt, 0)] > (budget - 1)[:, None]
    return (nxt >= 0) & far & table[:, None]


def _constrain(logits, cb: ConstraintBuffers, fsm_state, host_mask, host_on, fsm_slot=None, budget=None):
    """Disallowed tokens of constrained rows -> -inf; unconstrained rows untouched.

    A row's packed mask comes from the device table (row fsm_state) or from the host (grammar backend).
    With `fsm_slot` and `budget` [L] given, table rows also drop the tokens that would leave no completion
    within the budget (see the module docstring); the [L, V] part of that runs only when some row binds.
    """
    rows = jnp.maximum(fsm_state, 0)
    packed = jnp.where(host_on[:, None], host_mask, cb.mask[rows])  # [L, W]
    allowed = sampling.unpack_vocab_mask(packed, logits.shape[-1])  # [L, V]
    allowed |= ((fsm_state < 0) & ~host_on)[:, None]
    if budget is not None:
        cut = budget_cut(cb, fsm_state, budget, host_on)

        def apply(a):
            tok_cls = cb.cls[jnp.maximum(fsm_slot, 0)]  # [L, V]
            return a & ~jnp.take_along_axis(cut, tok_cls, axis=1)

        allowed = jax.lax.cond(jnp.any(cut), apply, lambda a: a, allowed)
    return jnp.where(allowed, logits, -jnp.inf)


def make_step(model: CausalLM, block_q: int, num_top: int, run_q: int = 1, valid_vocab: int | None = None):
    """The pure step function for one model; jit it with the KV pool and penalty state donated.

    `valid_vocab` (static): the tokenizer's vocabulary size when the model's embedding has padding rows
    past it; those ids are -inf in every logits row (never sampled, never in top logprobs).
    """

    def step(params, kv, pstate: sampling.PenaltyState, cb: ConstraintBuffers, inp: StepInputs):
        meta = AttnMetadata(inp.positions, inp.slot_mapping, inp.dec_page_table, inp.dec_kv_lens,
                            inp.pre_page_table, inp.pre_kv_lens, block_q=block_q,
                            run_page_table=inp.run_page_table, run_kv_lens=inp.run_kv_lens, run_q=run_q)
        logits, kv = model.apply({"params": params}, inp.input_ids, meta, kv, inp.logits_indices)  # [L, V]
        logits = sampling.apply_penalties_and_bias(logits, inp.sampling, pstate, inp.row_slot,
                                                   valid_vocab=valid_vocab)
        constrained = inp.fsm_state >= 0
        logits = jax.lax.cond(jnp.any(constrained | inp.host_mask_on),
                              lambda lg: _constrain(lg, cb, inp.fsm_state, inp.host_mask, inp.host_mask_on,
                                                    inp.fsm_slot, inp.fsm_budget),
                              lambda lg: lg, logits)
        out = sampling.sample(logits, inp.sampling, num_top_logprobs=0, want_logprobs=inp.want_lp)
        cls = cb.cls[jnp.maximum(inp.fsm_slot, 0), out.tokens]  # [L]
        next_state = jnp.where(constrained, cb.next[jnp.maximum(inp.fsm_state, 0), cls], -1)
        L = logits.shape[0]
        # a target row is a row of a chunk whose request reads logprobs (want_lp), so the sampler's normalizer
        # serves it too: one full-vocabulary pass for both
        target_lp = jnp.where(inp.want_lp & (inp.target_ids >= 0),
                              sampling.token_logprobs(logits, inp.target_ids, out.log_normalizer), jnp.nan)

        def top(lg):
            lp = jax.nn.log_softmax(lg, axis=-1)
            vals, ids = jax.lax.top_k(lp, num_top)
            return ids.astype(jnp.int32), vals

        def no_top(lg):
            return jnp.zeros((L, num_top), jnp.int32), jnp.zeros((L, num_top), jnp.float32)

        top_ids, top_lps = (jax.lax.cond(jnp.any(inp.want_top), top, no_top, logits) if num_top
                            else no_top(logits))
        pstate = sampling.record_tokens(pstate, inp.row_slot, out.tokens)
        return kv, pstate, StepOutputs(out.tokens, out.logprobs, target_lp, top_ids, top_lps, next_state)

    return step


def _apply_marks(pstate: sampling.PenaltyState, reset_mask, mark_slot, mark_token, mark_is_output):
    """Clear penalty rows of newly admitted requests, then record their prompt/output history.

    reset_mask [num_slots] bool; mark_* [M] (slot -1 = padding). A separate fixed-shape call, so a long
    history never changes the step's shapes.
    """
    num_slots = pstate.output_counts.shape[0]
    keep = ~reset_mask[:, None]
    pstate = pstate.replace(output_counts=jnp.where(keep, pstate.output_counts, 0), seen=pstate.seen & keep)
    slot = jnp.where(mark_slot >= 0, mark_slot, num_slots)  # padding -> dropped
    return pstate.replace(
        output_counts=pstate.output_counts.at[slot, mark_token].add(mark_is_output.astype(jnp.int32), mode="drop"),
        seen=pstate.seen.at[slot, mark_token].set(True, mode="drop"))


@dataclasses.dataclass
class RowParams:
    """Host-side sampling parameters of one logits row."""

    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    bias: tuple = ()  # ((token, value), ...) the request's logit_bias, at most max_logit_bias entries
    suppress: tuple = ()  # token ids set to -inf (stop tokens before min_new_tokens), at most max_suppress
    seed: int = 0
    step: int = 0
    top: bool = False
    logprob: bool = False  # the request reads its logprobs (sampled tokens, prompt targets)
    fsm_state: int = -1  # global constraint-table row
    fsm_slot: int = -1
    fsm_budget: int = NO_BUDGET  # new tokens left, this one included (table constraints only)
    host_mask: object = None  # np.ndarray [W] int32 from the grammar backend


@dataclasses.dataclass(frozen=True)
class RunTiming:
    """How the last `ModelRunner.run` spent its time, and the step inputs it ran (for replaying a step)."""

    pack_seconds: float  # host: packing the plan into the shape's arrays (and a first-use compile)
    device_seconds: float  # the compiled step and device_get of its outputs
    inputs: object  # the StepInputs it ran


class ModelRunner:
    """Owns the device state (params, KV pool, penalty rows) and runs compiled steps."""

    def __init__(self, model_config, params, *, dtype, kv_dtype, num_pages: int, grid: ShapeGrid,
                 max_running_requests: int, max_top_logprobs: int, attention_backend: str = "jnp",
                 attention_math: str = "float32", max_marks: int = 512,
                 constraint_rows: int = 1024, constraint_classes: int = 512, constraint_slots: int = 8,
                 valid_vocab: int | None = None, max_logit_bias: int = 64, max_suppress: int = 16,
                 executable_dir: str = "", layout=None):
        """`grid`: the step shapes to compile (the runner owns it; the scheduler plans within it).
        `valid_vocab`: the tokenizer's vocabulary size (default: the model's); ids from it up to the
        model's vocab_size are padding, masked out on the device. `max_logit_bias` / `max_suppress`: the
        device width of a row's logit_bias entries and of its suppressed (stop) ids; a row asking for more
        is an error (requests are validated against these limits before they get here).
        `executable_dir`: where compiled steps are saved and read back (sgl_jax/executables.py; '' = off).
        `attention_math`: float32 | bfloat16 (sgl_jax.models.attention.get_attention_backend).
        `layout` (sgl_jax.parallel.tp.TPLayout): tensor parallel over its mesh. `params` are already placed with its
        shardings (and `model_config` is the layout's, KV heads expanded); the pool is made sharded by KV heads,
        the rest replicated, and the step is jitted with these in/out shardings. Compiled steps are not saved to
        `executable_dir` then (the persistent compilation cache still applies)."""
        V = model_config.vocab_size
        if valid_vocab is not None and not 0 < valid_vocab <= V:
            raise ValueError(f"valid_vocab {valid_vocab} must be in [1, model vocab_size {V}]")
        if max_logit_bias < 1 or max_suppress < 0:
            raise ValueError(f"max_logit_bias ({max_logit_bias}) must be >= 1 and max_suppress ({max_suppress}) >= 0")
        self.valid_vocab = V if valid_vocab is None else int(valid_vocab)
        self.max_logit_bias, self.max_suppress = int(max_logit_bias), int(max_suppress)
        self.cfg = model_config
        self.params = params
        self.grid = grid
        page_size, block_q, run_q = grid.page_size, grid.prefill_block, grid.run_block
        self.page_size, self.prefill_block, self.run_block = page_size, block_q, run_q
        self.max_running_requests = max_running_requests  # penalty-state rows (one per running request)
        self.num_top = max_top_logprobs
        self.max_marks = max_marks
        self.num_pages = num_pages
        self.platform = jax.default_backend()  # "cpu", "gpu" or "tpu"
        self.layout = layout
        self.channel = None  # multi-host rank 0: sgl_jax.parallel.multihost.StepChannel (see `mirrored`)
        self._mirror_lock = threading.RLock()
        self.model = CausalLM(model_config, dtype, attention_backend, layout, attention_math)
        self.pstate = sampling.init_penalty_state(max_running_requests, V)
        self.cbuf = ConstraintBuffers(jnp.zeros((constraint_rows, -(-V // 32)), jnp.int32),
                                      jnp.full((constraint_rows, constraint_classes), -1, jnp.int32),
                                      jnp.zeros((constraint_slots, V), jnp.int32),
                                      jnp.full((constraint_rows,), DIST_UNREACHABLE, jnp.int32))
        step = make_step(self.model, block_q, self.num_top, run_q, self.valid_vocab if self.valid_vocab < V else None)
        if layout is None:
            self.kv = init_kv_cache(model_config, num_pages, page_size, kv_dtype)
            kv_out, step_sh = {}, {}
        else:  # every array lives on the mesh: the pool by KV heads, params as placed, the rest replicated
            kv_sh, rep = layout.kv_shardings(model_config.num_layers), layout.replicated
            self.kv = jax.jit(lambda: init_kv_cache(model_config, num_pages, page_size, kv_dtype),
                              out_shardings=kv_sh)()
            self.pstate, self.cbuf = layout.put_replicated((self.pstate, self.cbuf))
            kv_out = dict(out_shardings=kv_sh)
            step_sh = dict(in_shardings=(jax.tree_util.tree_map(lambda x: x.sharding, params), kv_sh, rep, rep, rep),
                           out_shardings=(kv_sh, rep, rep))
            executable_dir = ""
        self._put_rows = jax.jit(_put_rows, donate_argnums=(0, 1, 2))
        self._put_cls = jax.jit(_put_cls, donate_argnums=(0,))
        self._marks = jax.jit(_apply_marks, donate_argnums=(0,))
        self._copy = jax.jit(_copy_pages, donate_argnums=(0,), **kv_out)
        self._gather = jax.jit(_gather_pages)
        self._scatter = jax.jit(_scatter_pages, donate_argnums=(0,), **kv_out)
        self.host_arena: np.ndarray | None = None  # the host tier's (HostPool.arena), when there is one
        self._step = jax.jit(step, donate_argnums=(1, 2), **step_sh)
        self._compiled: dict[StepShape, object] = {}
        self._compiling: dict[StepShape, concurrent.futures.Future] = {}
        self._lock = threading.Lock()  # the engine thread and the background compiler share _compiled
        # shapes/dtypes of the device state: lowering never touches the (donated) buffers themselves
        self._state_avals = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                   (self.params, self.kv, self.pstate, self.cbuf))
        # CPU: the native kernels the step will call are built and registered now, before any executable that
        # calls them is loaded from the store (loading does not trace the model, which would register them)
        cpu = self.platform == "cpu"
        self.native_int8 = (cpu and any(x.dtype == jnp.int8 for x in jax.tree_util.tree_leaves(params))
                            and cpu_matmul.int8_available())
        self.native_attention = get_attention_backend(attention_backend).name == "cpu_native"  # same choice as the model
        self.native_f32 = cpu and jnp.dtype(dtype) == jnp.float32 and cpu_matmul.f32_available()
        self.native_packed = cpu and packing.is_packed(params) and cpu_matmul.packed_available()
        self.store = None
        if executable_dir:
            settings = [repr(model_config), str(jnp.dtype(dtype)), attention_backend, attention_math, block_q, run_q,
                        grid.full_logit_rows, self.num_top, self.valid_vocab, V, self.native_int8,
                        self.native_attention, self.native_f32, self.native_packed]
            self.store = ExecutableStore(executable_dir, fingerprint(settings, self._state_avals))
        self.num_compiles = 0
        self._released = False
        self.background_done = threading.Event()
        self.background_done.set()
        self.background_error: BaseException | None = None
        self.last_run: RunTiming | None = None

    # ------------------------------------------------------------------------------- shapes
    def shapes(self) -> list[StepShape]:
        return self.grid.shapes()

    def _dummy_inputs(self, shape: StepShape) -> StepInputs:
        return self._inputs(shape, None, [], [], [])

    def _compile(self, shape: StepShape):
        """The compiled step for `shape`, compiled once: thread-safe, and a shape that another thread is
        compiling right now is waited for rather than compiled again."""
        with self._lock:
            if self._released:
                raise RuntimeError("the runner was released (its engine is shut down): no step can be compiled")
            done = self._compiled.get(shape)
            if done is not None:
                return done
            fut = self._compiling.get(shape)
            owner = fut is None
            if owner:
                fut = self._compiling[shape] = concurrent.futures.Future()
        if not owner:
            return fut.result()
        try:
            name = "step-{}-{}-{}-{}-{}".format(shape.num_decode, shape.num_blocks, shape.page_width,
                                                int(shape.full_logits), shape.num_runs)
            compiled = self.store.load(name) if self.store is not None else None
            if compiled is None:
                params, kv, pstate, cbuf = self._state_avals
                lowered = self._step.lower(params, kv, pstate, cbuf, self._dummy_inputs(shape))
                options = step_compile_options(shape.num_tokens(self.prefill_block, self.run_block))
                if self.store is not None and self.store.enabled:
                    compiled = compile_fresh(lowered, options)
                    self.store.save(name, compiled)
                else:
                    compiled = lowered.compile(compiler_options=options)
        except BaseException as e:
            with self._lock:
                del self._compiling[shape]
            fut.set_exception(e)
            raise
        with self._lock:
            self._compiled[shape] = compiled
            del self._compiling[shape]
            self.num_compiles += 1
        fut.set_result(compiled)
        return compiled

    def release(self) -> None:
        """Drop the compiled steps and the device state (`Engine.shutdown`); the runner cannot step afterwards.

        Each compiled step holds a few hundred of the process's memory mappings (XLA:CPU maps every kernel's code
        and data sections separately: ~650 a SmolLM2 step) and Linux allows 65,530 by default, so ~100 steps: an
        engine at a long context (72 shapes, ~48,000 mappings) and a second one in the same process ended in
        "LLVM ERROR: Unable to allocate section memory" while the first engine object was still referenced.
        jax's in-process caches hold a freshly compiled step too, so they are cleared (`jax.clear_caches`): other
        jitted functions of the process compile again on their next call; other engines keep their own steps."""
        with self._lock:
            self._released = True
            self._compiled.clear()
        self.kv = self.pstate = self.params = None
        jax.clear_caches()

    def compiled_shapes(self) -> list[StepShape]:
        with self._lock:
            return sorted(self._compiled)

    def first_shapes(self) -> list[StepShape]:
        """The fewest shapes that can serve any request at once (with `stand_in`): the largest prefill and a
        single decode row at the widest page table, plus a one-block prefill and a single decode row at the
        narrowest (a short first request runs at full speed). Batches, other block counts, run blocks and
        prompt-logprob steps come from the background compiler; until then a plan runs on a larger
        compiled shape, or compiles its own."""
        g = self.grid
        lo, hi = g.page_width_buckets[0], g.page_width_buckets[-1]
        d = g.decode_buckets[0]
        want = {StepShape(0, g.prefill_block_buckets[-1], hi), StepShape(d, 0, hi),
                StepShape(0, g.prefill_block_buckets[0], lo), StepShape(d, 0, lo)}
        return sorted(want)

    def stand_in(self, shape: StepShape) -> StepShape:
        """`shape` if it is compiled; else the cheapest compiled shape that can run the same plan (the same
        kinds of segments and prompt-logprob mode, each at least as large: the rest is padding, whose rows
        compute nothing that is read), or `shape` itself when none can (it is then compiled, or waited for).
        Used while the background compiler is still running."""
        with self._lock:
            if shape in self._compiled:
                return shape
            fits = [s for s in self._compiled
                    if s.full_logits == shape.full_logits and s.page_width >= shape.page_width
                    and all((a > 0) == (b > 0) and a >= b for a, b in ((s.num_decode, shape.num_decode),
                                                                       (s.num_blocks, shape.num_blocks),
                                                                       (s.num_runs, shape.num_runs)))]
        if not fits:
            return shape
        return min(fits, key=lambda s: (s.num_tokens(self.prefill_block, self.run_block), s.page_width))

    def warmup(self, progress: bool = True, shapes: list[StepShape] | None = None) -> float:
        """Compile the step shapes (all of them unless `shapes` says which). Returns seconds spent."""
        t0 = time.perf_counter()
        self._warm_constraint_upload()
        self.copy_pages([(0, 0)])  # compiles the page copy (a page onto itself changes nothing)
        self.apply_marks([0], [(0, 0, False)])
        self.apply_marks([0], [])
        shapes = self.shapes() if shapes is None else shapes
        for s in tqdm(shapes, desc="compiling step shapes", unit="shape", disable=not progress, leave=False):
            self._compile(s)
            self.warm(s)
        return time.perf_counter() - t0

    @mirrored
    def warm(self, shape: StepShape) -> None:
        """Run `shape`'s step once on padding (every token writes the sink page, no row is read or sampled): an
        executable's first runs are slower -- ~20-30 ms more here, a prompt-logprob shape's first two ~85 and ~50
        ms more while its large buffers are first mapped (bench/notes.md, "First runs") -- and without this the
        first request of each shape paid it. On the thread that owns the device state (the engine thread once it
        runs: Engine warms background-compiled shapes through `EngineLoop.call`)."""
        inp = self._dummy_inputs(shape)
        run = type(self).execute.__wrapped__  # this call is mirrored already: its step must not be sent again
        for _ in range(2 if shape.full_logits else 1):
            jax.block_until_ready(run(self, shape, inp))

    def compile_in_background(self, then=None, each=None) -> threading.Thread:
        """Compile every shape not compiled yet in a daemon thread (the engine may serve meanwhile: a step
        that needs a shape still missing compiles it, or waits for it, on the engine thread), calling `each(shape)`
        after each one it compiled, then call `then()`. `background_done` is set when the thread ends;
        `background_error` holds a failure."""
        self.background_done.clear()
        self._stop_background = False

        def work():
            try:
                for s in self.shapes():
                    if self._stop_background:
                        return
                    if s in self._compiled:
                        continue
                    self._compile(s)
                    if each is not None:
                        each(s)
                if then is not None:
                    then()
            except BaseException as e:  # noqa: BLE001 - reported through background_error; steps compile lazily
                self.background_error = e
            finally:
                self.background_done.set()

        t = threading.Thread(target=work, name="sgl_jax-compile", daemon=True)
        t.start()
        return t

    def stop_background(self) -> None:
        """Ask the background compiler to stop after the shape it is compiling."""
        self._stop_background = True

    def measure_decode_costs(self, repeats: int = 2) -> dict[tuple[int, int, int], float]:
        """Median seconds of a decode-only step per (decode bucket, page width, run blocks), rows seeing
        full pages.

        The scheduler reads these to decide whether multi-token decode runs (jump-forward) should grow a
        step to a larger decode bucket: worth it where a step's cost is mostly fixed (memory-bound), not
        where every row costs its FLOPs (a CPU). Padding rows write to the reserved page 0 only.
        """
        costs = {}

        def table(rows, p, first=0):  # distinct pages per row, as in a real batch (one page stays in cache)
            return ((np.arange(rows * p).reshape(rows, p) + first) % (self.num_pages - 1) + 1).astype(np.int32)

        for shape in self.grid.decode_shapes():
            sd, p, nr = shape.num_decode, shape.page_width, shape.num_runs
            inp = self._dummy_inputs(shape)
            full = p * self.page_size
            inp = inp.replace(dec_kv_lens=np.full(sd, full, np.int32), dec_page_table=table(sd, p),
                              run_kv_lens=np.full(nr, full, np.int32), run_page_table=table(nr, p, sd * p))
            self._compile(shape)
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                jax.block_until_ready(self.execute(shape, inp))
                times.append(time.perf_counter() - t0)
            costs[(sd, p, nr)] = float(np.median(times[1:]))
        return costs

    def time_decode_costs(self, costs: dict | None = None) -> ShapeGrid:
        """The grid with decode step costs (given, e.g. read back from disk, or measured now)."""
        self.grid = dataclasses.replace(self.grid, costs=dict(costs if costs is not None
                                                              else self.measure_decode_costs()))
        return self.grid

    # ------------------------------------------------------------------------------ packing
    def _inputs(self, shape: StepShape, batch: PackedBatch | None, rows: list[RowParams],
                row_slot: list[int], target_ids: list[int]) -> StepInputs:
        T = shape.num_tokens(self.prefill_block, self.run_block)
        L = shape.num_rows(self.prefill_block, self.grid.full_logit_rows)
        P = shape.page_width
        if batch is None:
            z = np.zeros
            batch = PackedBatch(z(T, np.int32), np.full(T, -1, np.int32), z(T, np.int32),
                                z((shape.num_decode, P), np.int32), z(shape.num_decode, np.int32),
                                z((shape.num_blocks, P), np.int32), z(shape.num_blocks, np.int32),
                                z(L, np.int32), self.prefill_block, [], [],
                                z((shape.num_runs, P), np.int32), z(shape.num_runs, np.int32), self.run_block)
        temp = np.zeros(L, np.float32)
        top_k = np.full(L, -1, np.int32)
        top_p = np.ones(L, np.float32)
        min_p = np.zeros(L, np.float32)
        fp = np.zeros(L, np.float32)
        pp = np.zeros(L, np.float32)
        rp = np.ones(L, np.float32)
        K, S = self.max_logit_bias, self.max_suppress
        bias_ids = np.full((L, K), -1, np.int32)
        bias_vals = np.zeros((L, K), np.float32)
        suppress = np.full((L, S), -1, np.int32)
        seeds = np.zeros(L, np.uint32)
        steps = np.zeros(L, np.int32)
        want_top = np.zeros(L, bool)
        want_lp = np.zeros(L, bool)
        for i, r in enumerate(rows):
            if r is None:
                continue
            temp[i], top_k[i], top_p[i], min_p[i] = r.temperature, r.top_k, r.top_p, r.min_p
            fp[i], pp[i], rp[i] = r.frequency_penalty, r.presence_penalty, r.repetition_penalty
            if len(r.bias) > K or len(r.suppress) > S:  # never truncated: validation keeps requests within
                raise ValueError(f"a row has {len(r.bias)} logit_bias entries and {len(r.suppress)} suppressed "
                                 f"ids; the step holds {K} (max_logit_bias) and {S}")
            for j, (tok, val) in enumerate(r.bias):
                bias_ids[i, j], bias_vals[i, j] = tok, val
            suppress[i, :len(r.suppress)] = r.suppress
            seeds[i], steps[i], want_top[i], want_lp[i] = np.uint32(r.seed & 0xFFFFFFFF), r.step, r.top, r.logprob
        rs = np.full(L, -1, np.int32)
        rs[:len(row_slot)] = row_slot
        tg = np.full(L, -1, np.int32)
        tg[:len(target_ids)] = target_ids
        fsm_state = np.full(L, -1, np.int32)
        fsm_slot = np.full(L, -1, np.int32)
        fsm_budget = np.full(L, NO_BUDGET, np.int32)
        host_mask = np.zeros((L, self.cbuf.mask.shape[1]), np.int32)
        host_on = np.zeros(L, bool)
        for i, r in enumerate(rows):
            if r is not None and r.fsm_state >= 0:
                fsm_state[i], fsm_slot[i] = r.fsm_state, r.fsm_slot
                fsm_budget[i] = min(max(int(r.fsm_budget), 1), NO_BUDGET)
            if r is not None and r.host_mask is not None:
                host_mask[i], host_on[i] = r.host_mask, True
        sb = sampling.SamplingBatch(
            temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, frequency_penalty=fp,
            presence_penalty=pp, repetition_penalty=rp, bias_ids=bias_ids, bias_vals=bias_vals,
            seeds=seeds, steps=steps, vocab_mask=None, suppress_ids=suppress)
        return StepInputs(batch.input_ids, batch.positions, batch.slot_mapping, batch.dec_page_table,
                          batch.dec_kv_lens, batch.pre_page_table, batch.pre_kv_lens, batch.run_page_table,
                          batch.run_kv_lens, batch.logits_indices, sb, rs, tg, want_top, want_lp, fsm_state, fsm_slot,
                          host_mask, host_on, fsm_budget)

    # --------------------------------------------------------------------------------- run
    def run(self, plan: StepPlan, row_params_of) -> tuple[PackedBatch, dict]:
        """Run one planned step. `row_params_of(chunk)` gives RowParams for a sampling chunk.

        Returns the packed batch (where each chunk's logits rows are) and numpy outputs.
        """
        t_run = time.perf_counter()
        shape = plan.shape  # planned by the scheduler within this runner's grid
        if not self.background_done.is_set():  # not every shape compiled yet: maybe run it on a larger one
            shape = self.stand_in(shape)
        chunks = plan.chunks
        seqs = [SeqChunk(c.token_ids, c.start, c.req.pages, c.logits_from, c.as_decode, c.as_run)
                for c in chunks]
        L = shape.num_rows(self.prefill_block, self.grid.full_logit_rows)
        batch = pack(seqs, page_size=self.page_size, block_q=self.prefill_block, num_decode=shape.num_decode,
                     num_blocks=shape.num_blocks, page_width=shape.page_width, num_logits=L, run_q=self.run_block,
                     num_runs=shape.num_runs)
        rows: list[RowParams | None] = [None] * L
        row_slot = [-1] * L
        target = [-1] * L
        for c, (a, e) in zip(chunks, batch.logits_rows):
            # rows a..e-1 hold logits at positions (end - (e - a)) .. end-1; each predicts the next token
            for j in range(a, e - 1):
                pos = c.end - (e - a) + (j - a)
                target[j] = c.req.token_at(pos + 1)
            if c.logits_from is not None and c.end < c.req.num_tokens:
                target[e - 1] = c.req.token_at(c.end)  # mid-prompt chunk: its last row is a prompt target
            rp = row_params_of(c)
            if rp is not None and (c.samples or rp.top):
                rows[e - 1] = rp
                if c.samples:
                    row_slot[e - 1] = c.req.slot
            if rp is not None and (rp.top or rp.logprob):
                for j in range(a, e):
                    rows[j] = rows[j] or RowParams(top=rp.top, logprob=rp.logprob)
        if plan.reset_slots or plan.marks:
            self.apply_marks(plan.reset_slots, plan.marks)
        if plan.copies or plan.loads:
            self._transfers(plan)
        inp = self._inputs(shape, batch, rows, row_slot, target)
        if shape not in self._compiled:
            self._compile(shape)
        t_exec = time.perf_counter()
        out = _to_host(self.execute(shape, inp))
        # read by the engine loop for its step listeners: packing vs the compiled step + device_get
        self.last_run = RunTiming(t_exec - t_run, time.perf_counter() - t_exec, inp)
        return batch, {"tokens": out.tokens, "logprobs": out.logprobs, "target_logprobs": out.target_logprobs,
                       "top_ids": out.top_ids, "top_logprobs": out.top_logprobs, "next_state": out.next_state}

    @mirrored
    def execute(self, shape: StepShape, inp: StepInputs) -> StepOutputs:
        """The compiled step of `shape` on the device state (compiled now if it is not yet); device outputs."""
        compiled = self._compiled.get(shape)
        if compiled is None:
            compiled = self._compile(shape)
        self.kv, self.pstate, out = compiled(self.params, self.kv, self.pstate, self.cbuf, inp)
        return out

    def _transfers(self, plan: StepPlan) -> None:
        """The plan's page copies and host loads, in the order the scheduler made them (`StepPlan.copy_after`),
        consecutive ones of a kind in one call."""
        done = 0
        after = plan.copy_after or [0] * len(plan.copies)
        for k, group in itertools.groupby(zip(after, plan.copies), key=lambda t: t[0]):
            self.load_pages(plan.loads[done:k])  # (empty: nothing)
            done = max(done, k)
            self.copy_pages([pair for _, pair in group])
        self.load_pages(plan.loads[done:])

    @mirrored
    def copy_pages(self, pairs) -> None:
        """Copy whole KV pages src -> dst, all layers, before the step that reads them (partial-page reuse:
        a request's own page starts as a copy of a cached page it shares a few tokens with). Runs
        `COPY_WIDTH` pairs per call, padded by repeating the last pair (equal writes to one page)."""
        W = COPY_WIDTH
        for start in range(0, len(pairs), W):
            part = list(pairs[start:start + W])
            part += [part[-1]] * (W - len(part))
            arr = np.asarray(part, np.int32)
            self.kv = self._copy(self.kv, arr[:, 0], arr[:, 1])

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers' K and V (a host-tier slot)."""
        k = self.kv[0][0]
        return 2 * len(self.kv) * (k.size // k.shape[0]) * k.dtype.itemsize

    def save_pages(self, pages) -> np.ndarray:
        """Device -> host: pages' K/V for every layer as raw bytes, uint8 [len(pages), page_bytes] (the host tier's
        `save`); waits for the copy."""
        out = np.empty((len(pages), self.page_bytes), np.uint8)
        self.save_pages_into(pages, out, range(len(pages)))
        return out

    def save_pages_into(self, pages, arena: np.ndarray, rows) -> None:
        """`save_pages` written straight into `arena[rows]` (the host tier's `save_into`: one copy from the
        gathered pages into their slots). `TRANSFER_WIDTH` pages per call, padded with page 0."""
        rows = list(rows)
        for start in range(0, len(pages), TRANSFER_WIDTH):
            part = list(pages[start:start + TRANSFER_WIDTH])
            idx = np.zeros(TRANSFER_WIDTH, np.int32)
            idx[:len(part)] = part
            data = np.asarray(self._gather(self.kv, idx))[:len(part)]
            data = np.ascontiguousarray(data).reshape(len(part), -1).view(np.uint8)
            at = rows[start:start + len(part)]
            if at == list(range(at[0], at[0] + len(at))):  # consecutive rows: a slice, no index array
                arena[at[0]:at[0] + len(at)] = data
            else:
                arena[np.asarray(at, np.int64)] = data

    @mirrored
    def load_pages(self, loads) -> None:
        """Host -> device: (slot, page) pairs from the host arena into the pool (donated; padding writes page 0,
        the sink). The copy from host memory is dispatched asynchronously, ahead of the step that reads it."""
        k = self.kv[0][0]
        L, shape = len(self.kv), k.shape[1:]
        for start in range(0, len(loads), TRANSFER_WIDTH):
            part = loads[start:start + TRANSFER_WIDTH]
            idx = np.zeros(TRANSFER_WIDTH, np.int32)
            idx[:len(part)] = [p for _, p in part]
            rows = np.zeros((TRANSFER_WIDTH, self.page_bytes), np.uint8)
            rows[:len(part)] = self.host_arena[[s for s, _ in part]]
            data = rows.view(np.dtype(k.dtype)).reshape(TRANSFER_WIDTH, L, 2, *shape)
            self.kv = self._scatter(self.kv, idx, data)

    def measure_transfer_costs(self, pages: int = 2 * 16):
        """This machine's prices for the host tier's load-or-recompute choice (sgl_jax/cache/costs.py): a
        prefill step of the largest compiled block count on dummy inputs (its matmuls are the recompute cost;
        padding rows compute like real ones), and saves / loads of 1 and `pages` pages (fixed cost and per
        page). Runs steps on the device state: call before serving or on the engine thread. Returns
        `TransferCosts`."""
        from sgl_jax.cache.costs import TransferCosts

        g = self.grid
        shape = StepShape(0, g.prefill_block_buckets[-1], g.page_width_buckets[-1])  # one of first_shapes()
        self._compile(shape)
        inp = self._dummy_inputs(shape)

        def prefill():
            jax.block_until_ready(self.execute(shape, inp))

        def best(fn, n=3):
            fn()
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return min(ts)

        prefill_s = best(prefill) / (g.prefill_block_buckets[-1] * self.prefill_block)
        arena, self.host_arena = self.host_arena, np.zeros((pages, self.page_bytes), np.uint8)
        try:
            few = [1 + i % (self.num_pages - 1) for i in range(pages)]
            save1, saven = best(lambda: self.save_pages(few[:1])), best(lambda: self.save_pages(few))

            def load(n):
                def run():
                    self.load_pages([(i, p) for i, p in enumerate(few[:n])])
                    jax.block_until_ready(self.kv)
                return run
            load1, loadn = best(load(1)), best(load(pages))
        finally:
            self.host_arena = arena
        ps = self.page_size
        per_page = max(loadn - load1, 0.0) / (pages - 1)
        return TransferCosts(prefill_s, max(load1 - per_page, 0.0), per_page / ps,
                             max(saven - save1, 0.0) / (pages - 1) / ps)

    @mirrored
    def apply_marks(self, reset_slots, marks) -> None:
        """Reset penalty rows, then record (slot, token, is_output) history, max_marks at a time."""
        M = self.max_marks
        reset = np.zeros(self.max_running_requests, bool)
        reset[list(reset_slots)] = True
        for start in range(0, max(len(marks), 1), M):
            part = marks[start:start + M]
            mslot = np.full(M, -1, np.int32)
            mtok = np.zeros(M, np.int32)
            mout = np.zeros(M, bool)
            if part:
                arr = np.asarray(part, np.int64)
                mslot[:len(part)], mtok[:len(part)], mout[:len(part)] = arr[:, 0], arr[:, 1], arr[:, 2].astype(bool)
            self.pstate = self._marks(self.pstate, reset, mslot, mtok, mout)
            reset = np.zeros(self.max_running_requests, bool)

    # ----------------------------------------------------------------------- constraint table
    @mirrored
    def upload_constraint(self, placement) -> None:
        """Copy a placed constraint's tables into the device buffer (fixed-size blocks: no recompiles)."""
        fsm, base = placement.fsm, placement.base
        R, C = self.cbuf.next.shape
        num_slots, V = self.cbuf.cls.shape
        W = self.cbuf.mask.shape[1]
        S = fsm.num_states
        if fsm.vocab_size > V or fsm.mask.shape[1] > W:
            raise ValueError(f"the constraint is compiled for a vocabulary of {fsm.vocab_size} tokens; the model "
                             f"has {V}")
        for start in range(0, placement.rows, _ROW_BLOCK):
            n = max(min(_ROW_BLOCK, S - start), 0)
            mblock = np.zeros((_ROW_BLOCK, W), np.int32)
            nblock = np.full((_ROW_BLOCK, C), -1, np.int32)
            dblock = np.full(_ROW_BLOCK, DIST_UNREACHABLE, np.int32)
            if n:
                mblock[:n, :fsm.mask.shape[1]] = fsm.mask[start:start + n]  # padding ids: no bits
                nxt = fsm.next_state[start:start + n]
                nblock[:n, :nxt.shape[1]] = np.where(nxt >= 0, nxt + base, -1)
                dblock[:n] = fsm.dist[start:start + n]
            mask, nexts, dist = self._put_rows(self.cbuf.mask, self.cbuf.next, self.cbuf.dist, mblock, nblock,
                                               dblock, np.int32(base + start))
            self.cbuf = self.cbuf.replace(mask=mask, next=nexts, dist=dist)
        # the FSM covers the tokenizer's vocabulary; the model's padding ids are never allowed
        row = np.full(V, NEVER_CLASS, np.int32)
        row[:fsm.vocab_size] = fsm.token_class
        self.cbuf = self.cbuf.replace(cls=self._put_cls(self.cbuf.cls, row, np.int32(placement.slot)))
        placement.uploaded = True

    @mirrored
    def _warm_constraint_upload(self) -> None:
        R, C = self.cbuf.next.shape
        W = self.cbuf.mask.shape[1]
        mask, nexts, dist = self._put_rows(self.cbuf.mask, self.cbuf.next, self.cbuf.dist,
                                           np.zeros((_ROW_BLOCK, W), np.int32), np.full((_ROW_BLOCK, C), -1, np.int32),
                                           np.full(_ROW_BLOCK, DIST_UNREACHABLE, np.int32), np.int32(0))
        cls = self._put_cls(self.cbuf.cls, np.zeros(self.cbuf.cls.shape[1], np.int32), np.int32(0))
        self.cbuf = ConstraintBuffers(mask, nexts, cls, dist)


_ROW_BLOCK = 64  # rows per constraint upload (must equal ConstraintTable's block)
COPY_WIDTH = 8  # page copies per call
TRANSFER_WIDTH = 16  # pages per host-tier save / load call (one compiled width each)


def _copy_pages(kv, src, dst):
    """Every layer's K and V pages `src` written to pages `dst` (all gathered before any is written)."""
    return tuple((k.at[dst].set(k[src]), v.at[dst].set(v[src])) for k, v in kv)


def _gather_pages(kv, idx):
    """Pages `idx` of every layer's K and V: [len(idx), layers, 2, KV, S, D]."""
    return jnp.stack([jnp.stack([k[idx], v[idx]], axis=1) for k, v in kv], axis=1)


def _scatter_pages(kv, idx, data):
    """`data` [len(idx), layers, 2, KV, S, D] written to pages `idx` of every layer."""
    return tuple((k.at[idx].set(data[:, i, 0].astype(k.dtype)), v.at[idx].set(data[:, i, 1].astype(v.dtype)))
                 for i, (k, v) in enumerate(kv))


def _put_rows(cb_mask, cb_next, cb_dist, mblock, nblock, dblock, start):
    return (jax.lax.dynamic_update_slice(cb_mask, mblock, (start, 0)),
            jax.lax.dynamic_update_slice(cb_next, nblock, (start, 0)),
            jax.lax.dynamic_update_slice(cb_dist, dblock, (start,)))


def _put_cls(cls, row, slot):
    return jax.lax.dynamic_update_slice(cls, row[None, :], (slot, 0))


def enable_compilation_cache(path: str) -> None:
    """Persist compiled executables across processes (server restarts, test runs)."""
    if not path:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
