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
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallas_kernels import cpu_matmul

from sgl_jax import sampling
from sgl_jax.batch import PackedBatch, SeqChunk, pack
from sgl_jax.constrained.fsm import DIST_UNREACHABLE, NEVER_CLASS
from sgl_jax.executables import ExecutableStore, fingerprint
from sgl_jax.models.attention import AttnMetadata, check_kv_format, get_attention_backend
from sgl_jax.models import packing
from sgl_jax.models.llama import CausalLM, init_kv_cache, kv_format_of
from sgl_jax.parallel.multihost import mirrored
from sgl_jax.runner_compile import StepCompiler
from sgl_jax.runner_pages import PageTransfers, _copy_pages, _gather_pages, _scatter_pages
from sgl_jax.scheduler import StepPlan
from sgl_jax.shapes import ShapeGrid, StepShape  # noqa: F401 - StepShape re-exported

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
    dup_src: jax.Array  # [D] int32 token rows whose k, v are written a second time (borrowed rows)
    dup_slots: jax.Array  # [D] int32 their second slots (0 = padding)


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
                            run_page_table=inp.run_page_table, run_kv_lens=inp.run_kv_lens, run_q=run_q,
                            dup_src=inp.dup_src, dup_slots=inp.dup_slots)
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


class ModelRunner(StepCompiler, PageTransfers):
    """Owns the device state (params, KV pool, penalty rows) and runs compiled steps: packs a plan into the step's
    inputs, runs it, applies penalty marks and uploads constraint rows. Compiling the shapes is `StepCompiler`'s
    (sgl_jax/runner_compile.py), moving whole pages `PageTransfers`' (sgl_jax/runner_pages.py)."""

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
        `executable_dir` then (the persistent compilation cache still applies). Long because it builds every
        piece of the device state and every jitted function over it, once, in dependency order."""
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
        self.kv_format = kv_format_of(kv_dtype)  # a float8 pool: stored as uint8 codes (llama.kv_storage_dtype)
        self.model = CausalLM(model_config, dtype, attention_backend, layout, attention_math, self.kv_format)
        backend = get_attention_backend(attention_backend).name  # what the model resolves "auto" to, here
        check_kv_format(backend, self.kv_format)
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
        self.native_attention = backend == "cpu_native"  # same choice as the model
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
    def _dummy_inputs(self, shape: StepShape) -> StepInputs:
        return self._inputs(shape, None, [], [], [])

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
                                z((shape.num_runs, P), np.int32), z(shape.num_runs, np.int32), self.run_block,
                                z(self.grid.num_dups(shape), np.int32), z(self.grid.num_dups(shape), np.int32))
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
                          host_mask, host_on, fsm_budget, batch.dup_src, batch.dup_slots)

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
        index = {id(c.req): i for i, c in enumerate(chunks)} if any(c.borrow for c in chunks) else {}
        seqs = [SeqChunk(c.token_ids, c.start, c.req.pages, c.logits_from, c.as_decode, c.as_run,
                         None if c.borrow is None else (index[id(c.borrow[0])], c.borrow[1]))
                for c in chunks]
        L = shape.num_rows(self.prefill_block, self.grid.full_logit_rows)
        batch = pack(seqs, page_size=self.page_size, block_q=self.prefill_block, num_decode=shape.num_decode,
                     num_blocks=shape.num_blocks, page_width=shape.page_width, num_logits=L, run_q=self.run_block,
                     num_runs=shape.num_runs, num_dups=self.grid.num_dups(shape))
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
