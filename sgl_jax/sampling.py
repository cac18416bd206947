"""On-device sampling: penalties, logit bias, grammar masks, temperature / top-k / top-p / min-p.

Everything here is a pure function over pytrees, meant to be called inside the engine's jitted step.
Only shapes are static: per-request parameters are arrays, so changing them never recompiles.

Pipeline for one step (B logits rows, vocabulary V):

1. `apply_penalties_and_bias` - repetition penalty (HF/CTRL, over prompt + output tokens), then
   frequency and presence penalties (OpenAI, over output tokens), read from the per-slot
   `PenaltyState`; then `logit_bias`; then the per-row suppressed ids (the stop tokens while
   `min_new_tokens` is not reached) and the model's padding ids (embedding rows past the tokenizer's
   vocabulary) -> -inf; then the packed allowed-token bitmask (disallowed -> -inf).
2. `sample` - greedy rows take the argmax. Other rows divide by their temperature and keep the tokens
   whose scaled logit is >= a per-row cutoff value, the cutoff being the strictest of top-k (the k-th
   largest value), top-p (the smallest prefix of the sorted distribution, renormalised over the top-k
   set, whose mass reaches p) and min-p (max + log(min_p)). Tokens tied with the cutoff value are kept.
   The token is then drawn by the Gumbel-max trick.

Randomness. Row r draws with key `fold_in(key(seed_r), step_r)`; the Gumbel noise of token v is a keyed
hash of that key's two words and v, so each token's noise is addressable on its own. Sampling among a
few candidate ids therefore returns exactly the token that sampling over the whole vocabulary would:
the result depends on the row's own logits, parameters, seed and step only, never on the batch it runs
in, its row position, or which of the code paths below the batch took (up to float rounding exactly
at a top-p boundary, where two paths may sum the same probabilities in a different order).

Cost (CPU, V = 49152, B = 64, see tests/test_sampling.py::test_timing_report). Paths are picked at run
time by `lax.cond` over the whole batch, so a batch pays only for what its rows ask:
  * all rows greedy: a max and a chunked first-index-of-max, plus the log-sum-exp for logprobs;
  * no top-k / top-p row: one noise pass over the vocabulary (min-p's cutoff is max + log(min_p));
  * top-k / top-p rows: `lax.top_k` of a small head (64, then `max_candidates`), the cutoffs read off
    the sorted head, and noise for the head only when every row's kept set lies inside it;
  * otherwise the noise pass over the vocabulary, with an exact bisection over the float ordering
    (32 masked passes) for rows whose cutoff the head cannot decide (top_k above the bound, or a
    nucleus wider than it), instead of a full sort, which on CPU costs ~10x more.
Full-vocabulary passes run over row blocks of ~2 MB so that their working set stays in cache.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from jax import lax

_NEG_INF = float("-inf")


@flax.struct.dataclass
class SamplingBatch:
    """Per-row sampling parameters; every array padded to the batch bucket B."""

    temperature: jax.Array  # [B] f32; 0 = greedy (argmax)
    top_k: jax.Array  # [B] i32; <= 0 or >= V means off
    top_p: jax.Array  # [B] f32; 1.0 = off
    min_p: jax.Array  # [B] f32; 0.0 = off
    frequency_penalty: jax.Array  # [B] f32: logit -= f * count(token in output)
    presence_penalty: jax.Array  # [B] f32: logit -= p * [count > 0]
    repetition_penalty: jax.Array  # [B] f32 over prompt+output: positive /= r, negative *= r; 1 = off
    bias_ids: jax.Array  # [B, NB] i32 logit_bias token ids, -1 = unused slot
    bias_vals: jax.Array  # [B, NB] f32 added to those logits (may be -inf)
    seeds: jax.Array  # [B] u32 per-request seed
    steps: jax.Array  # [B] i32 number of tokens the request has sampled so far
    vocab_mask: jax.Array | None = None  # [B, ceil(V/32)] i32 packed allowed bits, or None
    # [B, NS] i32 ids set to -inf (stop tokens before min_new_tokens), -1 = unused slot; None = none.
    # Separate from bias_ids so that it never takes (or loses) a logit_bias slot.
    suppress_ids: jax.Array | None = None

    @classmethod
    def make(cls, batch_size: int, *, num_bias: int = 1, num_suppress: int = 0, vocab_size: int | None = None,
             temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0, frequency_penalty=0.0,
             presence_penalty=0.0, repetition_penalty=1.0, seeds=0, steps=0) -> "SamplingBatch":
        """A batch with every row set to the given values (scalars broadcast; arrays taken as is).

        `vocab_size` given: add an all-allowed vocab_mask; `num_suppress` > 0: add empty suppress_ids.
        Convenience for tests and warm-up.
        """
        B = batch_size

        def full(v, dt):
            return jnp.broadcast_to(jnp.asarray(v, dt), (B,))

        mask = None
        if vocab_size is not None:
            mask = jnp.full((B, (vocab_size + 31) // 32), -1, jnp.int32)
        return cls(
            temperature=full(temperature, jnp.float32), top_k=full(top_k, jnp.int32),
            top_p=full(top_p, jnp.float32), min_p=full(min_p, jnp.float32),
            frequency_penalty=full(frequency_penalty, jnp.float32),
            presence_penalty=full(presence_penalty, jnp.float32),
            repetition_penalty=full(repetition_penalty, jnp.float32),
            bias_ids=jnp.full((B, num_bias), -1, jnp.int32),
            bias_vals=jnp.zeros((B, num_bias), jnp.float32),
            seeds=full(seeds, jnp.uint32), steps=full(steps, jnp.int32), vocab_mask=mask,
            suppress_ids=jnp.full((B, num_suppress), -1, jnp.int32) if num_suppress > 0 else None)


@flax.struct.dataclass
class PenaltyState:
    """Device-resident token statistics, one row per request slot."""

    output_counts: jax.Array  # [num_slots, V] i32 occurrences among the slot's generated tokens
    seen: jax.Array  # [num_slots, V] bool token appeared in the prompt or the output


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [B] i32
    logprobs: jax.Array  # [B] f32 log-softmax of the (penalised, masked) logits at the chosen token
    top_ids: jax.Array  # [B, n] i32
    top_logprobs: jax.Array  # [B, n] f32
    log_normalizer: jax.Array  # [B] f32 logsumexp of the logits (0 where `want_logprobs` left it uncomputed)


# ----------------------------------------------------------------------------------------------
# Penalty state


def init_penalty_state(num_slots: int, vocab_size: int) -> PenaltyState:
    return PenaltyState(output_counts=jnp.zeros((num_slots, vocab_size), jnp.int32),
                        seen=jnp.zeros((num_slots, vocab_size), jnp.bool_))


def reset_slots(state: PenaltyState, slot_ids: jax.Array, prompt_ids: jax.Array) -> PenaltyState:
    """Clear the rows `slot_ids` [n] (-1 = ignore) and mark their prompt tokens [n, Lp] (-1 padded) seen."""
    S, V = state.output_counts.shape
    slot_ids = jnp.asarray(slot_ids, jnp.int32)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    s = jnp.where(slot_ids >= 0, slot_ids, S)  # out of range -> dropped
    counts = state.output_counts.at[s].set(0, mode="drop")
    seen = state.seen.at[s].set(False, mode="drop")
    ok = (slot_ids[:, None] >= 0) & (prompt_ids >= 0) & (prompt_ids < V)
    rows = jnp.where(ok, s[:, None], S)
    cols = jnp.where(ok, prompt_ids, 0)
    seen = seen.at[rows, cols].set(True, mode="drop")
    return PenaltyState(output_counts=counts, seen=seen)


def record_tokens(state: PenaltyState, slot_ids: jax.Array, tokens: jax.Array) -> PenaltyState:
    """Count one sampled token per row: output_counts[slot, token] += 1, seen = True (slot -1 = skip)."""
    S, V = state.output_counts.shape
    slot_ids = jnp.asarray(slot_ids, jnp.int32)
    tokens = jnp.asarray(tokens, jnp.int32)
    ok = (slot_ids >= 0) & (tokens >= 0) & (tokens < V)
    rows = jnp.where(ok, slot_ids, S)
    cols = jnp.where(ok, tokens, 0)
    return PenaltyState(output_counts=state.output_counts.at[rows, cols].add(1, mode="drop"),
                        seen=state.seen.at[rows, cols].set(True, mode="drop"))


# ----------------------------------------------------------------------------------------------
# Logit processing


def unpack_vocab_mask(mask: jax.Array, vocab_size: int) -> jax.Array:
    """[B, W] i32 packed bits -> [B, V] bool (bit j of word w <-> token 32*w + j)."""
    B, W = mask.shape
    shifts = lax.broadcasted_iota(jnp.int32, (B, W, 32), 2)
    words = jnp.broadcast_to(mask.astype(jnp.int32)[:, :, None], (B, W, 32))
    bits = lax.shift_right_logical(words, shifts) & 1
    return bits.reshape(B, W * 32)[:, :vocab_size].astype(jnp.bool_)


def _penalize(logits, sb: SamplingBatch, state: PenaltyState, slot_ids, active):
    S = state.output_counts.shape[0]
    rows = jnp.clip(slot_ids, 0, S - 1)
    counts = state.output_counts[rows]  # [B, V] gather
    seen = state.seen[rows]
    r = sb.repetition_penalty[:, None]
    rep = jnp.where(logits > 0, logits / r, logits * r)
    out = jnp.where(seen & (r != 1.0), rep, logits)
    out = (out - sb.frequency_penalty[:, None] * counts.astype(jnp.float32)
           - sb.presence_penalty[:, None] * (counts > 0).astype(jnp.float32))
    return jnp.where(active[:, None], out, logits)


def apply_penalties_and_bias(logits: jax.Array, sb: SamplingBatch, state: PenaltyState,
                             slot_ids: jax.Array, *, valid_vocab: int | None = None) -> jax.Array:
    """Penalties (rows with slot -1 untouched), then logit_bias, then suppress_ids and the padding ids
    (-> -inf), then vocab_mask (disallowed -> -inf).

    Penalty order: repetition penalty on the raw logit first, then frequency and presence subtracted.
    The gather of the penalty rows is skipped at run time when no row has a penalty set.
    `valid_vocab` (static): ids >= it are the model's padding rows (the embedding has more rows than the
    tokenizer has tokens); they become -inf in every row, so they are never sampled nor in top logprobs.
    """
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    slot_ids = jnp.asarray(slot_ids, jnp.int32)
    active = (slot_ids >= 0) & ((sb.frequency_penalty != 0) | (sb.presence_penalty != 0)
                                | (sb.repetition_penalty != 1))
    logits = lax.cond(jnp.any(active),
                      lambda x: _penalize(x, sb, state, slot_ids, active), lambda x: x, logits)
    if sb.bias_ids.shape[-1] > 0:
        ok = (sb.bias_ids >= 0) & (sb.bias_ids < V)
        cols = jnp.where(ok, sb.bias_ids, V)  # out of range -> dropped
        rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], cols.shape)
        logits = logits.at[rows, cols].add(sb.bias_vals.astype(jnp.float32), mode="drop")
    if sb.suppress_ids is not None and sb.suppress_ids.shape[-1] > 0:
        ok = (sb.suppress_ids >= 0) & (sb.suppress_ids < V)
        cols = jnp.where(ok, sb.suppress_ids, V)  # unused / out of range -> dropped
        rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], cols.shape)
        logits = logits.at[rows, cols].set(_NEG_INF, mode="drop")
    if valid_vocab is not None and valid_vocab < V:
        logits = jnp.where(lax.broadcasted_iota(jnp.int32, (1, V), 1) < valid_vocab, logits, _NEG_INF)
    if sb.vocab_mask is not None:
        logits = jnp.where(unpack_vocab_mask(sb.vocab_mask, V), logits, _NEG_INF)
    return logits


# ----------------------------------------------------------------------------------------------
# Helpers


def _first_argmax(x: jax.Array, row_max: jax.Array | None = None) -> jax.Array:
    """Index of the first maximum along the last axis of [B, N] (small N; see `_chunked_argmax`).

    XLA:CPU lowers `jnp.argmax` to a slow variadic reduce (~10x a max); two plain float max reductions
    are much faster. Indices are carried as f32, exact for N <= 2**24.
    """
    N = x.shape[-1]
    assert N <= 1 << 24
    if row_max is None:
        row_max = jnp.max(x, axis=-1)
    neg_iota = -lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 1)
    idx = -jnp.max(jnp.where(x == row_max[..., None], neg_iota, _NEG_INF), axis=-1)
    return jnp.clip(idx, 0, N - 1).astype(jnp.int32)  # a NaN row gives +inf -> N - 1


_CHUNK = 256
_SMALL_K = 64  # first lax.top_k tier (see _sample_stochastic)
_ROW_BLOCK_BYTES = 2 << 20  # full-vocabulary passes run over row blocks of about this size


def _pad_cols(x: jax.Array, C: int) -> jax.Array:
    V = x.shape[-1]
    Vp = -(-V // C) * C
    return x if Vp == V else jnp.pad(x, ((0, 0), (0, Vp - V)), constant_values=_NEG_INF)


def _chunked_argmax(values, xp: jax.Array, C: int, with_max: bool = False):
    """First argmax over [B, Vp] of `values(xp, ids)`, ids broadcastable token ids; Vp % C == 0 (with `with_max`,
    also the row maxima of `values`: (argmax, max)).

    One max reduction over [B, Vp/C, C] picks the first chunk holding the maximum, then `values` is
    evaluated again on that chunk's C ids only. Keeps the wide pass a single plain reduction (which
    XLA:CPU vectorises, transcendental producers included) instead of a max plus a masked index pass.
    """
    B, Vp = xp.shape
    n = Vp // C
    full = values(xp, lax.broadcasted_iota(jnp.int32, (1, Vp), 1))
    chunk_max = lax.optimization_barrier(jnp.max(full.reshape(B, n, C), axis=-1))
    row_max = jnp.max(chunk_max, axis=-1)
    c = _first_argmax(chunk_max, row_max)
    ids = c[:, None] * C + lax.broadcasted_iota(jnp.int32, (B, C), 1)
    j = _first_argmax(values(jnp.take_along_axis(xp, ids, axis=-1), ids))
    tok = jnp.take_along_axis(ids, j[:, None], axis=-1)[:, 0]
    return (tok, row_max) if with_max else tok


def _max_and_greedy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """([B] row max, [B] argmax with ties -> lowest id) from one wide pass: the chunk maxima of `_chunked_argmax`
    give the row max too (a second full-vocabulary max was ~0.56 ms of a 32-row CPU step, bench/notes.md)."""
    V = logits.shape[-1]
    C = min(_CHUNK, V)
    tok, row_max = _chunked_argmax(lambda x, ids: x, _pad_cols(logits, C), C, with_max=True)  # padding: -inf
    return row_max, jnp.minimum(tok, V - 1)  # an all -inf / NaN row may land on padding


def _log_sum_exp(x: jax.Array, row_max: jax.Array) -> jax.Array:
    m = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    return m + jnp.log(jnp.sum(jnp.exp(x - m[:, None]), axis=-1))


_LSE_ROWS = 16  # rows per block of `_log_sum_exp_wanted`


def _log_sum_exp_wanted(logits: jax.Array, row_max: jax.Array, want: jax.Array) -> jax.Array:
    """[B] logsumexp of the rows in blocks of `_LSE_ROWS` that hold a row `want`s (zeros in the other blocks). A
    step's rows are its chunks' logits rows first, padding after: a select's prompt-logprob step fills 44 of its 128
    rows, and the full-vocabulary exp over all 128 was 4.6 ms of it on a 2-core CPU (bench/notes.md, session 29)."""
    B = logits.shape[0]

    def block(a, b):
        return lax.cond(jnp.any(want[a:b]), lambda: _log_sum_exp(logits[a:b], row_max[a:b]),
                        lambda: jnp.zeros((b - a,), jnp.float32))

    if B <= _LSE_ROWS:
        return block(0, B)
    # a step where no row wants logprobs (most decode steps) takes one branch, not one per block
    return lax.cond(jnp.any(want),
                    lambda: jnp.concatenate([block(a, min(B, a + _LSE_ROWS)) for a in range(0, B, _LSE_ROWS)]),
                    lambda: jnp.zeros((B,), jnp.float32))


def _row_key_words(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """[B, 2] u32: the words of fold_in(key(seed), step) per row."""
    def one(seed, step):
        return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), step))
    return jax.vmap(one)(seeds.astype(jnp.uint32), steps.astype(jnp.uint32)).astype(jnp.uint32)


def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _gumbel(key_words: jax.Array, ids: jax.Array) -> jax.Array:
    """Standard Gumbel noise for token `ids` ([B, N] or [1, N]) under each row's key words [B, 2].

    A keyed integer hash (two murmur3 finalizer rounds) rather than threefry: several times cheaper
    over [B, V] on CPU, and evaluable at arbitrary token ids. u is uniform on (0, 1) at 2**-24 resolution; the
    exponential is -log1p(-u) so the upper Gumbel tail (the one that decides winners) stays fine.
    """
    h = ids.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) ^ key_words[:, 0:1]
    h = _fmix32(h)
    h = _fmix32(h ^ key_words[:, 1:2])
    # 24 random bits through a signed conversion (XLA:CPU does not vectorise u32 -> f32)
    u = (lax.bitcast_convert_type(h >> 8, jnp.int32).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
    return -jnp.log(-jnp.log1p(-u))


def _ordered_key(x: jax.Array) -> jax.Array:
    """f32 -> i32 with the same order (an involution on the negative half)."""
    i = lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(i >= 0, i, i ^ jnp.int32(0x7FFFFFFF))


def _key_to_float(k: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(jnp.where(k >= 0, k, k ^ jnp.int32(0x7FFFFFFF)), jnp.float32)


def _bisect(pred, shape):
    """Smallest int32 T with pred(T) true (pred monotone: false ... false true ... true) per row."""
    lo = jnp.full(shape, jnp.iinfo(jnp.int32).min, jnp.int32)
    hi = jnp.full(shape, jnp.iinfo(jnp.int32).max, jnp.int32)

    def body(_, c):
        lo, hi = c
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        ok = pred(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    return lax.fori_loop(0, 32, body, (lo, hi))[1]


def _sorted_cutoff(vals, mx, k_eff, p_eff, z_other, topk_on, topp_on, vocab_size):
    """Top-k / top-p cutoff from the N largest scaled logits `vals` [B, N] (descending).

    Returns (cutoff [B], valid [B]); cutoff -inf for rows without either filter. valid = the N candidates
    were enough to decide the cutoff exactly.
    """
    B, N = vals.shape
    j = lax.broadcasted_iota(jnp.int32, (B, N), 1)
    in_k = j < k_eff[:, None]
    e = jnp.where(in_k, jnp.exp(vals - mx[:, None]), 0.0)
    z = jnp.where(topk_on, jnp.sum(e, axis=-1), z_other)
    p = e / z[:, None]
    cum = jnp.cumsum(p, axis=-1)
    excl = jnp.concatenate([jnp.zeros((B, 1), p.dtype), cum[:, :-1]], axis=-1)
    keep = in_k & ((excl < p_eff[:, None]) | (j == 0))
    n_keep = jnp.sum(keep, axis=-1)
    cut = jnp.take_along_axis(vals, (n_keep - 1)[:, None], axis=-1)[:, 0]
    cut = jnp.where(topk_on | topp_on, cut, _NEG_INF)
    closed = (n_keep < N) | (N == vocab_size)
    valid = jnp.where(topk_on, k_eff <= N, jnp.where(topp_on, closed, True))
    return cut, valid


def _bisect_cutoff(scaled, mx, k_eff, p_eff, topk_on, topp_on, need):
    """Exact top-k then top-p cutoff over the full vocabulary without sorting ([B] f32, -inf = none)."""
    B, V = scaled.shape
    keys = _ordered_key(scaled)
    big_k = need & topk_on

    def kth_largest():  # smallest T with count(keys > T) < k  ->  the k-th largest key
        kk = jnp.where(big_k, k_eff, V)
        return _bisect(lambda t: jnp.sum(keys > t[:, None], axis=-1) < kk, (B,))

    ck = lax.cond(jnp.any(big_k), kth_largest,
                  lambda: jnp.full((B,), jnp.iinfo(jnp.int32).min, jnp.int32))
    nuc = need & topp_on

    def nucleus():  # smallest T with mass(keys > T, within the top-k set) < p * Z
        e = jnp.where(keys >= ck[:, None], jnp.exp(scaled - mx[:, None]), 0.0)
        target = jnp.where(nuc, p_eff, 2.0) * jnp.sum(e, axis=-1)
        return _bisect(lambda t: jnp.sum(jnp.where(keys > t[:, None], e, 0.0), axis=-1) < target,
                       (B,))

    cp = lax.cond(jnp.any(nuc), nucleus,
                  lambda: jnp.full((B,), jnp.iinfo(jnp.int32).min, jnp.int32))
    cut = jnp.minimum(jnp.maximum(ck, cp), jnp.max(keys, axis=-1))  # always keep the top token
    return jnp.where(need & (topk_on | topp_on), _key_to_float(cut), _NEG_INF)


def _row_block(B: int, V: int) -> int:
    """Rows per block for the full-vocabulary passes: ~_ROW_BLOCK_BYTES of f32 logits, dividing B."""
    target = max(1, _ROW_BLOCK_BYTES // (4 * V))
    return max(d for d in range(1, min(B, target) + 1) if B % d == 0)


def _map_row_blocks(fn, args, blk: int):
    """fn over row blocks of `args` (a tuple of arrays with leading dim B), results concatenated.

    Several passes over [B, V] run one after the other; doing them block by block keeps the working
    set in cache (~2.5x faster at B = 64, V = 49152 on CPU). Per-row results do not depend on the
    blocking: every row's token is a function of that row alone.
    """
    B = args[0].shape[0]
    if blk >= B:
        return fn(*args)
    n = B // blk
    blocked = tuple(a.reshape((n, blk) + a.shape[1:]) for a in args)
    out = lax.map(lambda xs: fn(*xs), blocked)
    return out.reshape((B,) + out.shape[2:])


def _full_vocab_block(logits, t, mx, k_eff, p_eff, topk_on, topp_on, minp_cut, cut_known,
                      need_bisect, kw):
    """Tokens for a block of rows by Gumbel-max over the whole vocabulary."""
    B, V = logits.shape
    scaled = logits / t[:, None]
    cut_b = lax.cond(jnp.any(need_bisect),
                     lambda: _bisect_cutoff(scaled, mx, k_eff, p_eff, topk_on, topp_on,
                                            need_bisect),
                     lambda: jnp.full((B,), _NEG_INF, jnp.float32))
    cut = jnp.where(need_bisect, jnp.maximum(cut_b, minp_cut), cut_known)
    C = min(_CHUNK, V)
    # the masked logits are materialised once; the noise is fused into the chunk-max pass
    kept = lax.optimization_barrier(
        _pad_cols(jnp.where(scaled >= cut[:, None], scaled, _NEG_INF), C))
    tok = _chunked_argmax(lambda x, ids: x + _gumbel(kw, ids), kept, C)
    return jnp.minimum(tok, V - 1)


def _sample_stochastic(logits, row_max, sb: SamplingBatch, K: int):
    B, V = logits.shape
    stoch = sb.temperature > 0
    t = jnp.where(stoch, sb.temperature, 1.0).astype(jnp.float32)
    mx = row_max / t  # == max(logits / t): correctly rounded division is monotone
    topk_on = stoch & (sb.top_k > 0) & (sb.top_k < V)
    topp_on = stoch & (sb.top_p < 1.0)
    minp_on = stoch & (sb.min_p > 0.0)
    k_eff = jnp.where(topk_on, sb.top_k, V)
    p_eff = jnp.where(topp_on, sb.top_p, 2.0)
    minp_cut = jnp.where(minp_on, mx + jnp.log(jnp.clip(sb.min_p, 0.0, 1.0)), _NEG_INF)
    kw = _row_key_words(sb.seeds, sb.steps)
    blk = _row_block(B, V)

    def full_vocab(cut_known, need_bisect):
        args = (logits, t, mx, k_eff, p_eff, topk_on, topp_on, minp_cut, cut_known, need_bisect, kw)
        return _map_row_blocks(_full_vocab_block, args, blk)

    need_z = jnp.any(topp_on & ~topk_on)  # top-p over the full vocabulary needs its normaliser
    z_full = lax.cond(need_z,
                      lambda: jnp.sum(jnp.exp(logits / t[:, None] - mx[:, None]), axis=-1),
                      lambda: jnp.ones((B,), jnp.float32))

    def head(Kt):
        """Cutoffs from the Kt largest logits: (tokens sampled among them, whether every row's kept set fits
        there, the cutoff, the rows whose cutoff the head could not decide)."""
        vals, ids = lax.top_k(logits, Kt)
        vals = vals / t[:, None]  # == top_k(logits / t) values (monotone)
        cut_s, valid = _sorted_cutoff(vals, mx, k_eff, p_eff, z_full, topk_on, topp_on, V)
        cut = jnp.maximum(cut_s, minp_cut)
        fits = jnp.all(~stoch | (valid & ((cut > vals[:, Kt - 1]) | (Kt == V))))

        def from_candidates():
            x = jnp.where(vals >= cut[:, None], vals + _gumbel(kw, ids), _NEG_INF)
            pos = _first_argmax(x)
            return jnp.take_along_axis(ids, pos[:, None], axis=-1)[:, 0]

        tok = lax.cond(fits, from_candidates, lambda: jnp.zeros((B,), jnp.int32))
        return tok, fits, cut, stoch & ~valid

    def skipped():
        return jnp.zeros((B,), jnp.int32), jnp.bool_(False), minp_cut, jnp.zeros((B,), jnp.bool_)

    # Top-k / top-p need the sorted head of the distribution (min-p alone has its cutoff already): a small head
    # first (lax.top_k costs ~linear in k on CPU) unless a top_k rules it out, then K candidates, then the full
    # vocabulary for the rows neither decided (with the K head's cutoff; min-p's alone without top-k / top-p).
    # Each stage is traced once: the step's compile time grows with every copy of a branch.
    sorted_on = jnp.any(topk_on | topp_on)

    def after_small_head():
        tok, done, cut, need = lax.cond(sorted_on, lambda: head(K), skipped)
        return lax.cond(done, lambda: tok, lambda: full_vocab(cut, need))

    if K <= _SMALL_K:
        return after_small_head()
    small_ok = sorted_on & jnp.all(~topk_on | (k_eff <= _SMALL_K))
    tok, done = lax.cond(small_ok, lambda: head(_SMALL_K)[:2], lambda: skipped()[:2])
    return lax.cond(done, lambda: tok, after_small_head)


# ----------------------------------------------------------------------------------------------
# Public sampling entry points


def sample(logits: jax.Array, sb: SamplingBatch, *, num_top_logprobs: int = 0,
           max_candidates: int = 256, want_logprobs: jax.Array | None = None) -> SampleOutput:
    """Draw one token per row. `num_top_logprobs` and `max_candidates` are static.

    `max_candidates` bounds the `lax.top_k` head used for top-k / top-p; it changes the speed only,
    not the tokens (barring float rounding exactly at a top-p boundary). Greedy rows: argmax, ties to
    the lowest id. `logprobs` / `top_logprobs` are log-softmax of `logits` as passed (after penalties,
    bias and mask, before temperature). `want_logprobs` ([B] bool, optional): the rows whose `logprobs`
    are read; the full-vocabulary normalizer is computed only when some row wants it (a CPU step's
    largest sampling pass), and the other rows' `logprobs` are NaN.
    """
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    K = max(1, min(int(max_candidates), V))
    row_max, greedy = _max_and_greedy(logits)
    stoch = sb.temperature > 0
    tokens = lax.cond(jnp.any(stoch), lambda: _sample_stochastic(logits, row_max, sb, K),
                      lambda: greedy)
    tokens = jnp.where(stoch, tokens, greedy).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    n = int(num_top_logprobs)
    if want_logprobs is None or n > 0:  # (top logprobs need the normalizer in every row)
        lse = _log_sum_exp(logits, row_max)
    else:
        lse = _log_sum_exp_wanted(logits, row_max, want_logprobs)
    logprobs = picked - lse if want_logprobs is None else jnp.where(want_logprobs, picked - lse, jnp.nan)
    if n > 0:
        top_vals, top_ids = lax.top_k(logits, min(n, V))
        top_lp = top_vals - lse[:, None]
        top_ids = top_ids.astype(jnp.int32)
    else:
        top_lp = jnp.zeros((B, 0), jnp.float32)
        top_ids = jnp.zeros((B, 0), jnp.int32)
    return SampleOutput(tokens=tokens, logprobs=logprobs, top_ids=top_ids, top_logprobs=top_lp, log_normalizer=lse)


def token_logprobs(logits: jax.Array, target_ids: jax.Array, log_normalizer: jax.Array | None = None) -> jax.Array:
    """[B] log-softmax of `logits` [B, V] at `target_ids` [B] (out-of-range ids are clipped). `log_normalizer`:
    the rows' logsumexp when it is known already (`SampleOutput.log_normalizer`), saving a full-vocabulary pass."""
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    ids = jnp.clip(jnp.asarray(target_ids, jnp.int32), 0, V - 1)
    if log_normalizer is None:
        log_normalizer = _log_sum_exp(logits, jnp.max(logits, axis=-1))
    return jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0] - log_normalizer
