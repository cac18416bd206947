"""On-device sampler against plain-loop numpy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgl_jax import sampling
from sgl_jax.sampling import (
    PenaltyState,
    SamplingBatch,
    apply_penalties_and_bias,
    init_penalty_state,
    record_tokens,
    reset_slots,
    sample,
    token_logprobs,
)

sample_jit = jax.jit(sample, static_argnames=("num_top_logprobs", "max_candidates"))
penalize_jit = jax.jit(apply_penalties_and_bias)

# Most tests share these shapes so that the suite compiles `sample` only a handful of times.
V = 700  # vocabulary
SMALL, BIG = 8, 512  # batch sizes
K_HEAD = 100  # a head smaller than V: the 64-head, this head, then the full-vocabulary path
K_ALL = V  # a head covering the vocabulary: every row decided and sampled on the head


def draw(logits, sb, K=K_HEAD, n=0):
    return sample_jit(jnp.asarray(logits), sb, max_candidates=K, num_top_logprobs=n)


# ----------------------------------------------------------------------------------------------
# numpy references (plain loops on purpose)


def ref_log_softmax(row):
    finite = [x for x in row if x != -math.inf]
    m = max(finite)
    z = sum(math.exp(x - m) for x in finite)
    return [x - m - math.log(z) if x != -math.inf else -math.inf for x in row]


def ref_probs(row, temperature, top_k, top_p, min_p):
    """The distribution `sample` draws from for one row (no ties in `row` assumed)."""
    V = len(row)
    if temperature == 0:
        best = max(range(V), key=lambda i: (row[i], -i))
        return [1.0 if i == best else 0.0 for i in range(V)]
    s = [x / temperature for x in row]
    order = sorted(range(V), key=lambda i: (-s[i], i))
    keep = [s[i] != -math.inf for i in range(V)]
    if 0 < top_k < V:
        for rank, i in enumerate(order):
            if rank >= top_k:
                keep[i] = False

    def normalised():
        m = max(s[i] for i in range(V) if keep[i])
        w = [math.exp(s[i] - m) if keep[i] else 0.0 for i in range(V)]
        z = sum(w)
        return [x / z for x in w]

    q = normalised()
    if top_p < 1.0:
        cum, first = 0.0, True
        for i in order:
            if not keep[i]:
                continue
            if first or cum < top_p:
                cum += q[i]
                first = False
            else:
                keep[i] = False
        q = normalised()
    if min_p > 0.0:
        top = max(q)
        for i in range(V):
            if q[i] < min_p * top:
                keep[i] = False
        q = normalised()
    return q


def ref_penalize(logits, counts, seen, slot_ids, freq, pres, rep, bias_ids, bias_vals, allowed):
    out = logits.astype(np.float64).copy()
    B, V = out.shape
    for b in range(B):
        s = slot_ids[b]
        if s >= 0:
            for v in range(V):
                x = out[b, v]
                if seen[s, v] and rep[b] != 1.0:
                    x = x / rep[b] if x > 0 else x * rep[b]
                x -= freq[b] * counts[s, v]
                if counts[s, v] > 0:
                    x -= pres[b]
                out[b, v] = x
        for j in range(bias_ids.shape[1]):
            if bias_ids[b, j] >= 0:
                out[b, bias_ids[b, j]] += bias_vals[b, j]
        if allowed is not None:
            for v in range(V):
                if not allowed[b, v]:
                    out[b, v] = -math.inf
    return out


def pack_mask(allowed):
    B, V = allowed.shape
    W = (V + 31) // 32
    words = np.zeros((B, W), np.uint32)
    for b in range(B):
        for v in range(V):
            if allowed[b, v]:
                words[b, v // 32] |= np.uint32(1 << (v % 32))
    return words.view(np.int32)


def chi2_bound(df, z=5.0):
    """Upper chi-square quantile at ~3e-7 tail (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def batch(B, **kw):
    return SamplingBatch.make(B, **kw)


# ----------------------------------------------------------------------------------------------
# greedy, padding, logprobs


def test_greedy_is_argmax_lowest_id_and_logprobs():
    rng = np.random.default_rng(0)
    B = SMALL
    logits = rng.normal(size=(B, V)).astype(np.float32) * 3
    logits[1, 7] = logits[1, 642] = logits[1].max() + 1  # tie -> lowest id
    logits[2] = 0.0  # padding-like row
    logits[3] = -np.inf  # fully masked row but one
    logits[3, 5] = 0.0
    sb = batch(B, seeds=np.arange(B))
    out = draw(logits, sb, n=4)
    tok = np.asarray(out.tokens)
    assert tok.dtype == np.int32 and tok.shape == (B,)
    np.testing.assert_array_equal(tok, np.argmax(logits, -1))
    assert tok[1] == 7 and tok[2] == 0 and tok[3] == 5
    for b in range(B):
        ref = ref_log_softmax(logits[b].tolist())
        assert out.logprobs[b] == pytest.approx(ref[tok[b]], abs=1e-5)
        top = sorted(range(V), key=lambda i: (-logits[b, i], i))[:4]
        if b not in (2, 3):  # ties make the order of the rest arbitrary
            np.testing.assert_array_equal(np.asarray(out.top_ids[b]), top)
        np.testing.assert_allclose(np.asarray(out.top_logprobs[b]), [ref[i] for i in top],
                                   atol=1e-5)
    np.testing.assert_allclose(np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tok))),
                               np.asarray(out.logprobs), atol=1e-6)
    np.testing.assert_allclose(np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tok), out.log_normalizer)),
                               np.asarray(out.logprobs), atol=1e-6)  # with the sampler's normalizer
    empty = draw(logits, sb)
    np.testing.assert_array_equal(np.asarray(empty.tokens), tok)
    assert empty.top_ids.shape == (B, 0) and empty.top_logprobs.shape == (B, 0)


def test_logprobs_only_for_the_rows_that_want_them():
    """`want_logprobs`: the wanted rows' logprobs as without it, the others NaN (the normalizer is skipped when no
    row wants it); the tokens never change, greedy and sampled rows alike."""
    rng = np.random.default_rng(3)
    B = SMALL
    logits = jnp.asarray(rng.normal(size=(B, V)).astype(np.float32) * 3)
    temps = np.where(np.arange(B) % 2 == 0, 0.0, 0.8).astype(np.float32)
    sb = batch(B, seeds=np.arange(B), temperature=temps)
    full = sample_jit(logits, sb, max_candidates=K_HEAD)
    want = np.zeros(B, bool)
    want[[1, 2, 6]] = True
    for w in (want, np.zeros(B, bool), np.ones(B, bool)):
        out = sample_jit(logits, sb, max_candidates=K_HEAD, want_logprobs=jnp.asarray(w))
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(full.tokens))
        lp = np.asarray(out.logprobs)
        np.testing.assert_array_equal(lp[w], np.asarray(full.logprobs)[w])
        assert np.isnan(lp[~w]).all()
    for b in np.flatnonzero(want):
        ref = ref_log_softmax(np.asarray(logits[b]).tolist())
        assert float(full.logprobs[b]) == pytest.approx(ref[int(full.tokens[b])], abs=1e-5)
    # top logprobs need the normalizer in every row, wanted or not
    top = sample_jit(logits, sb, max_candidates=K_HEAD, num_top_logprobs=3)
    none = sample_jit(logits, sb, max_candidates=K_HEAD, num_top_logprobs=3, want_logprobs=jnp.zeros(B, bool))
    np.testing.assert_array_equal(np.asarray(none.top_logprobs), np.asarray(top.top_logprobs))


def test_normalizer_only_in_blocks_with_a_wanted_row():
    """The logsumexp behind `want_logprobs` runs over row blocks (`_LSE_ROWS`) that hold a wanted row: those rows'
    logprobs are the full pass's, bit for bit, in the first, a middle and a last partial block, for batches of one
    block and of several (a prompt-logprob step's 128 rows with 44 wanted)."""
    rng = np.random.default_rng(5)
    blk = sampling._LSE_ROWS
    for B, wanted in ((3, [2]), (blk, [0, blk - 1]), (2 * blk + 5, [blk, 2 * blk + 4]), (128, list(range(44)))):
        logits = jnp.asarray(rng.normal(size=(B, V)).astype(np.float32) * 3)
        sb = batch(B, seeds=np.arange(B), temperature=np.zeros(B, np.float32))
        w = np.zeros(B, bool)
        w[wanted] = True
        full = sample_jit(logits, sb, max_candidates=K_HEAD, want_logprobs=jnp.ones(B, bool))
        out = sample_jit(logits, sb, max_candidates=K_HEAD, want_logprobs=jnp.asarray(w))
        np.testing.assert_array_equal(np.asarray(out.logprobs)[w], np.asarray(full.logprobs)[w])
        lse = np.asarray(out.log_normalizer)
        np.testing.assert_array_equal(lse[w], np.asarray(full.log_normalizer)[w])
        blocks = {i // blk for i in wanted}
        skipped = [i for i in range(B) if i // blk not in blocks]
        assert not lse[skipped].any(), f"B={B}: a block with no wanted row computed its normalizer"


def test_padding_rows_do_not_crash_in_any_path():
    B = SMALL
    logits = np.zeros((B, V), np.float32)
    logits[0] = np.linspace(-3, 3, V)
    # row 0 samples; the rest are padding (zeros, default params), two of them with temperature > 0
    # and a top_k above the head / a tiny top_p, to force the bisection path
    sb = batch(B, temperature=[1.0, 0.0, 1.0, 0.0, 0.5, 0, 0, 0], top_k=[-1, -1, 300, -1, -1, 0, 0, 0],
               top_p=[0.5, 1.0, 1e-9, 1.0, 0.99, 1, 1, 1], seeds=[1, 0, 0, 0, 0, 0, 0, 0])
    for K in (K_HEAD, K_ALL):
        out = draw(logits, sb, K)
        tok = np.asarray(out.tokens)
        assert ((tok >= 0) & (tok < V)).all()
        assert tok[1] == 0 and tok[3] == 0
        assert np.isfinite(np.asarray(out.logprobs)).all()


# ----------------------------------------------------------------------------------------------
# penalties, bias, vocab mask


def _random_penalty_case(rng, B=6, V=40, S=5, NB=3, with_mask=True):
    logits = rng.normal(size=(B, V)).astype(np.float32) * 2
    counts = rng.integers(0, 3, size=(S, V)).astype(np.int32) * (rng.random((S, V)) < 0.3)
    seen = (counts > 0) | (rng.random((S, V)) < 0.2)
    slot_ids = np.array([3, 0, -1, 4, 1, 0][:B], np.int32)
    freq = rng.uniform(-0.5, 1.0, B).astype(np.float32)
    pres = rng.uniform(-0.5, 1.0, B).astype(np.float32)
    rep = rng.uniform(0.8, 1.6, B).astype(np.float32)
    freq[1], pres[1], rep[1] = 0.0, 0.0, 1.0  # a row with penalties off
    bias_ids = rng.integers(0, V, size=(B, NB)).astype(np.int32)
    bias_ids[:, -1] = -1
    bias_vals = rng.normal(size=(B, NB)).astype(np.float32)
    bias_vals[0, 0] = -np.inf  # ban a token
    allowed = rng.random((B, V)) < 0.8 if with_mask else None
    if allowed is not None:
        allowed[:, 0] = True
    return logits, counts, seen, slot_ids, freq, pres, rep, bias_ids, bias_vals, allowed


@pytest.mark.parametrize("with_mask", [True, False])
def test_penalties_and_bias_match_reference(with_mask):
    rng = np.random.default_rng(1)
    (logits, counts, seen, slot_ids, freq, pres, rep, bias_ids, bias_vals,
     allowed) = _random_penalty_case(rng, with_mask=with_mask)
    B, V = logits.shape
    sb = batch(B, frequency_penalty=freq, presence_penalty=pres, repetition_penalty=rep)
    sb = sb.replace(bias_ids=jnp.asarray(bias_ids), bias_vals=jnp.asarray(bias_vals),
                    vocab_mask=None if allowed is None else jnp.asarray(pack_mask(allowed)))
    state = PenaltyState(output_counts=jnp.asarray(counts), seen=jnp.asarray(seen))
    got = np.asarray(penalize_jit(jnp.asarray(logits), sb, state, jnp.asarray(slot_ids)))
    want = ref_penalize(logits, counts, seen, slot_ids, freq, pres, rep, bias_ids, bias_vals,
                        allowed)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    # the padding row (slot -1) gets bias and mask only: every other entry is bit-identical
    plain = np.ones(V, bool)
    plain[bias_ids[2][bias_ids[2] >= 0]] = False
    if allowed is not None:
        plain &= allowed[2]
    np.testing.assert_array_equal(got[2][plain], logits[2][plain])
    assert np.isneginf(got[0, bias_ids[0, 0]])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("valid_vocab", [33, None])
def test_suppress_ids_and_padding_ids_become_neg_inf(valid_vocab):
    rng = np.random.default_rng(9)
    (logits, counts, seen, slot_ids, freq, pres, rep, bias_ids, bias_vals,
     _) = _random_penalty_case(rng, with_mask=False)
    B, V = logits.shape
    suppress = np.full((B, 4), -1, np.int32)
    suppress[1, :2] = [5, 7]
    suppress[3] = [bias_ids[3, 0], 1, 1, 32]  # a biased id, a duplicate, the last id below the padding
    bias_vals[3, 0] = 50.0  # a large bias does not undo a suppression
    sb = batch(B, frequency_penalty=freq, presence_penalty=pres, repetition_penalty=rep)
    sb = sb.replace(bias_ids=jnp.asarray(bias_ids), bias_vals=jnp.asarray(bias_vals),
                    suppress_ids=jnp.asarray(suppress))
    state = PenaltyState(output_counts=jnp.asarray(counts), seen=jnp.asarray(seen))
    fn = jax.jit(apply_penalties_and_bias, static_argnames=("valid_vocab",))
    got = np.asarray(fn(jnp.asarray(logits), sb, state, jnp.asarray(slot_ids), valid_vocab=valid_vocab))
    want = ref_penalize(logits, counts, seen, slot_ids, freq, pres, rep, bias_ids, bias_vals, None)
    for b in range(B):
        for t in suppress[b]:
            if t >= 0:
                want[b, t] = -math.inf
        if valid_vocab is not None:
            want[b, valid_vocab:] = -math.inf
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    sb = sb.replace(temperature=jnp.asarray(np.tile([0.0, 1.0, 2.0], 2), jnp.float32))
    for seed in range(4):
        tok = np.asarray(draw(got, sb.replace(seeds=jnp.full((B,), seed, jnp.uint32))).tokens)
        assert np.isfinite(want[np.arange(B), tok]).all()


def test_penalties_off_skip_and_padding_rows_untouched():
    rng = np.random.default_rng(2)
    B, V = 3, 50
    logits = rng.normal(size=(B, V)).astype(np.float32)
    state = init_penalty_state(2, V)
    state = record_tokens(state, jnp.array([0, 1]), jnp.array([3, 4]))
    sb = batch(B)  # penalties neutral, no bias, no mask
    out = np.asarray(penalize_jit(jnp.asarray(logits), sb, state, jnp.array([0, 1, -1])))
    np.testing.assert_array_equal(out, logits)
    sb = batch(B, frequency_penalty=1.0, repetition_penalty=2.0)
    out = np.asarray(penalize_jit(jnp.asarray(logits), sb, state, jnp.array([0, -1, -1])))
    np.testing.assert_array_equal(out[1:], logits[1:])
    assert out[0, 3] != logits[0, 3] and out[0, 4] == logits[0, 4]


def test_vocab_mask_never_sampled_and_masked_logprobs():
    rng = np.random.default_rng(3)
    R = BIG
    base = rng.normal(size=V).astype(np.float32) * 2
    allowed_row = rng.random(V) < 0.3
    allowed_row[int(np.argmax(base))] = False  # the unmasked argmax is banned
    logits = np.broadcast_to(base, (R, V))
    kind = np.arange(R) % 4  # greedy, plain temperature, top-p, top-k rows
    sb = batch(R, temperature=np.where(kind == 0, 0.0, 1.5), top_p=np.where(kind == 2, 0.95, 1.0),
               top_k=np.where(kind == 3, 20, -1), seeds=np.arange(R))
    sb = sb.replace(vocab_mask=jnp.asarray(np.repeat(pack_mask(allowed_row[None]), R, 0)))
    masked = penalize_jit(jnp.asarray(logits), sb, init_penalty_state(1, V), jnp.full((R,), -1, jnp.int32))
    ref = ref_log_softmax(np.where(allowed_row, base, -np.inf).tolist())
    for K in (K_HEAD, K_ALL):
        tok = np.asarray(draw(masked, sb, K).tokens)
        assert allowed_row[tok].all()
        assert len(set(tok.tolist())) > 10
    out = draw(masked, sb)
    np.testing.assert_allclose(np.asarray(out.logprobs), [ref[t] for t in np.asarray(out.tokens)],
                               atol=1e-5)
    lp = np.asarray(token_logprobs(masked, jnp.asarray(np.arange(R) % V, jnp.int32)))
    for r in range(R):
        if allowed_row[r % V]:
            assert lp[r] == pytest.approx(ref[r % V], abs=1e-5)
        else:
            assert lp[r] == -np.inf
    top = draw(masked[:SMALL], jax.tree.map(lambda a: a[:SMALL], sb), n=4)
    assert allowed_row[np.asarray(top.top_ids)].all()
    np.testing.assert_allclose(np.asarray(top.top_logprobs[0]), sorted(ref, reverse=True)[:4], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# distributions


DIST_LOGITS = np.array([2.03, 1.51, 0.98, 0.62, 0.11, -0.47, -1.02, -1.96], np.float32)
DIST_N = 20000  # samples per configuration
DIST_CONFIGS = [  # temperature, top_k, top_p, min_p
    (1.0, -1, 1.0, 0.0),
    (0.7, 3, 1.0, 0.0),
    (1.3, -1, 0.8, 0.0),
    (1.0, 5, 0.7, 0.0),
    (1.0, -1, 1.0, 0.2),
    (0.5, 4, 0.9, 0.05),
    (2.0, 8, 1.0, 0.0),
    (1.7, 0, 0.97, 0.0),
]


def test_distributions_match_reference_in_every_path():
    N = DIST_N
    V = len(DIST_LOGITS)
    C = len(DIST_CONFIGS)
    cfg = np.repeat(np.array(DIST_CONFIGS, np.float64), N, axis=0)
    perm = np.random.default_rng(4).permutation(C * N)  # interleave configs in the batch
    cfg = cfg[perm]
    # shuffle the vocabulary order so that the preferred tokens are not the lowest ids
    vperm = np.random.default_rng(5).permutation(V)
    row = DIST_LOGITS[vperm]
    logits = jnp.asarray(np.broadcast_to(row, (C * N, V)))
    sb = batch(C * N, temperature=cfg[:, 0], top_k=cfg[:, 1].astype(np.int32), top_p=cfg[:, 2],
               min_p=cfg[:, 3], seeds=np.arange(C * N) * 7919 + 13, steps=np.arange(C * N) % 5)
    # the head path (K = V) and the full-vocabulary path with bisection (K = 2) draw the same tokens
    tok = np.asarray(sample_jit(logits, sb, max_candidates=V).tokens)
    np.testing.assert_array_equal(np.asarray(sample_jit(logits, sb, max_candidates=2).tokens), tok)
    for c, (t, k, p, mp) in enumerate(DIST_CONFIGS):
        sel = tok[np.flatnonzero(perm // N == c)]
        assert sel.size == N
        probs = np.array(ref_probs(row.tolist(), t, k, p, mp))
        counts = np.bincount(sel, minlength=V)
        assert counts[probs == 0].sum() == 0, (c, counts, probs)
        support = probs > 0
        exp = N * probs[support]
        chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
        df = int(support.sum()) - 1
        if df > 0:
            assert chi2 < chi2_bound(df), (c, chi2, counts, exp)


def test_noise_uniform_and_independent_across_steps():
    """Flat logits: tokens uniform over V, and (step s, step s+1) pairs uniform over V x V."""
    V = len(DIST_LOGITS)
    R = DIST_N * len(DIST_CONFIGS)  # the distribution test's shape: no new compilation
    flat = jnp.zeros((R, V), jnp.float32)
    seeds = np.arange(R) * 2654435761 % 2**32
    t0, t1 = (np.asarray(draw(flat, batch(R, temperature=1.0, seeds=seeds, steps=step), V).tokens)
              for step in (0, 1))
    for counts in (np.bincount(t0, minlength=V), np.bincount(t0 * V + t1, minlength=V * V)):
        exp = R / counts.size
        chi2 = float(((counts - exp) ** 2 / exp).sum())
        assert chi2 < chi2_bound(counts.size - 1), (chi2, counts)


def test_top_k_one_and_tiny_top_p_and_min_p_one_are_greedy():
    rng = np.random.default_rng(6)
    B = BIG
    logits = jnp.asarray(rng.normal(size=(B, V)).astype(np.float32))
    want = np.argmax(np.asarray(logits), -1)
    for kw in (dict(top_k=1), dict(top_p=1e-7), dict(min_p=1.0), dict(top_k=7, top_p=0.0)):
        sb = batch(B, temperature=2.0, seeds=np.arange(B), **kw)
        for K in (K_HEAD, K_ALL):
            np.testing.assert_array_equal(np.asarray(draw(logits, sb, K).tokens), want)


def _alone(logits_row, sb, r):
    """Row r of `sb` as the first row of a SMALL batch padded with greedy rows."""
    one = jax.tree.map(lambda a: jnp.concatenate([a[r:r + 1]] + [jnp.zeros_like(a[:1])] * (SMALL - 1)),
                       sb)
    lg = jnp.concatenate([jnp.asarray(logits_row)[None], jnp.zeros((SMALL - 1, V))])
    return int(draw(lg, one).tokens[0])


def test_paths_agree_on_random_parameters(monkeypatch):
    """Head (candidate), full-vocabulary and bisection cutoffs give identical tokens."""
    rng = np.random.default_rng(7)
    B = BIG
    logits = jnp.asarray((rng.normal(size=(B, V)) * rng.uniform(0.5, 4, (B, 1))).astype(np.float32))
    sb = batch(B, temperature=rng.choice([0.0, 0.3, 1.0, 1.8], B),
               top_k=rng.choice([-1, 1, 5, 40, 300, V], B), top_p=rng.choice([1.0, 0.95, 0.6, 0.2], B),
               min_p=rng.choice([0.0, 0.0, 0.05, 0.3], B), seeds=rng.integers(0, 2**32, B),
               steps=rng.integers(0, 1000, B))
    # the same rows with top_k <= 64, so that the 64-token head is tried first
    sb_small = sb.replace(top_k=jnp.where(sb.top_k > 64, -1, sb.top_k))
    monkeypatch.setattr(sampling, "_ROW_BLOCK_BYTES", 4 * V * 3)  # blocks of 2 rows, as for large V
    blocked = jax.jit(lambda lg, sb: sample(lg, sb, max_candidates=1).tokens)
    for params in (sb, sb_small):
        # K_ALL: every row decided and sampled on the head
        base = np.asarray(draw(logits, params, K_ALL).tokens)
        # K_HEAD: head(s), then the full vocabulary with bisection for rows the head cannot decide
        np.testing.assert_array_equal(np.asarray(draw(logits, params, K_HEAD).tokens), base)
        # K = 1: nearly every row on the full-vocabulary path, run in row blocks
        np.testing.assert_array_equal(np.asarray(blocked(logits, params)), base)
    # and each row alone gives the same token
    for r in (0, 5, 77, 300):
        assert _alone(logits[r], sb_small, r) == base[r]


# ----------------------------------------------------------------------------------------------
# reproducibility


def test_same_seed_and_step_same_token_anywhere_in_any_batch():
    rng = np.random.default_rng(8)
    R = 64
    req_logits = rng.normal(size=(R, V)).astype(np.float32)
    req = dict(temperature=rng.choice([0.8, 1.0], R), top_k=rng.choice([-1, 50], R),
               top_p=rng.choice([1.0, 0.9], R), min_p=np.zeros(R),
               seeds=rng.integers(0, 2**32, R), steps=rng.integers(0, 100, R))

    def embed(seed, other_top_k):
        """The R requests at random rows of a BIG batch whose other rows are random requests."""
        g = np.random.default_rng(seed)
        pos = g.permutation(BIG)[:R]
        lg = g.normal(size=(BIG, V)).astype(np.float32) * 3
        lg[pos] = req_logits
        other = dict(temperature=g.choice([0.0, 1.0], BIG), top_k=g.choice(other_top_k, BIG),
                     top_p=np.ones(BIG), min_p=np.zeros(BIG), seeds=g.integers(0, 2**32, BIG),
                     steps=g.integers(0, 100, BIG))
        for k in req:
            other[k] = other[k].astype(np.asarray(req[k]).dtype)
            other[k][pos] = req[k]
        return np.asarray(draw(lg, batch(BIG, **other)).tokens)[pos]

    # other rows with top_k 3: head path for the batch; with plain temperature rows: full path
    a = embed(1, [3])
    b = embed(2, [-1, 3])
    np.testing.assert_array_equal(a, b)
    sb_req = batch(R, **req)
    for r in range(6):
        assert _alone(req_logits[r], sb_req, r) == a[r]
    # a different step changes the draw (flat distribution: a repeat has probability ~1/V)
    flat = jnp.zeros((BIG, V), jnp.float32)
    seeds = rng.integers(0, 2**32, BIG)
    steps = rng.integers(0, 100, BIG)
    s0 = np.asarray(draw(flat, batch(BIG, temperature=1.0, seeds=seeds, steps=steps)).tokens)
    s0b = np.asarray(draw(flat, batch(BIG, temperature=1.0, seeds=seeds, steps=steps)).tokens)
    s1 = np.asarray(draw(flat, batch(BIG, temperature=1.0, seeds=seeds, steps=steps + 1)).tokens)
    np.testing.assert_array_equal(s0, s0b)
    assert (s0 == s1).sum() <= 5
    assert len(set(s0.tolist())) > BIG // 2


# ----------------------------------------------------------------------------------------------
# penalty state


def test_record_tokens_and_reset_slots():
    S, V = 4, 20
    state = init_penalty_state(S, V)
    counts = np.zeros((S, V), np.int64)
    seen = np.zeros((S, V), bool)
    rec = jax.jit(record_tokens)
    rst = jax.jit(reset_slots)

    def check():
        np.testing.assert_array_equal(np.asarray(state.output_counts), counts)
        np.testing.assert_array_equal(np.asarray(state.seen), seen)

    state = rst(state, jnp.array([1, 3, -1]), jnp.array([[2, 2, 5, -1], [7, -1, -1, -1], [9, 9, 9, 9]]))
    for s, ids in ((1, [2, 2, 5]), (3, [7])):
        for i in ids:
            seen[s, i] = True
    check()
    rng = np.random.default_rng(9)
    for _ in range(6):
        slots = rng.integers(-1, S, 5).astype(np.int32)
        toks = rng.integers(0, V, 5).astype(np.int32)
        state = rec(state, jnp.asarray(slots), jnp.asarray(toks))
        for s, t in zip(slots, toks):
            if s >= 0:
                counts[s, t] += 1
                seen[s, t] = True
        check()
    state = rst(state, jnp.array([3, 0]), jnp.array([[1, -1], [-1, -1]]))
    counts[3] = 0
    counts[0] = 0
    seen[3] = False
    seen[0] = False
    seen[3, 1] = True
    check()
    assert state.output_counts.dtype == jnp.int32 and state.seen.dtype == jnp.bool_


# ----------------------------------------------------------------------------------------------
# compilation


def test_one_compilation_across_parameter_values():
    traces = []
    B, V, S = 8, 300, 4

    def step(logits, sb, state, slots):
        traces.append(1)
        lg = apply_penalties_and_bias(logits, sb, state, slots)
        out = sample(lg, sb, num_top_logprobs=2)
        return out, record_tokens(state, slots, out.tokens)

    f = jax.jit(step)
    rng = np.random.default_rng(10)
    state = init_penalty_state(S, V)
    slots = jnp.array([0, 1, 2, 3, -1, -1, -1, -1], jnp.int32)
    settings = [
        dict(),
        dict(temperature=1.0),
        dict(temperature=0.5, top_k=20),
        dict(temperature=0.9, top_p=0.3),
        dict(temperature=0.9, top_p=0.99),  # nucleus wider than the candidates -> bisection
        dict(temperature=1.1, top_k=290, min_p=0.1),
        dict(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.2, repetition_penalty=1.3),
        dict(temperature=rng.choice([0.0, 1.0], B), top_k=rng.integers(-1, 50, B)),
    ]
    for i, kw in enumerate(settings):
        sb = batch(B, seeds=rng.integers(0, 2**32, B), steps=np.full(B, i), vocab_size=V, **kw)
        logits = jnp.asarray(rng.normal(size=(B, V)).astype(np.float32))
        out, state = f(logits, sb, state, slots)
        assert ((np.asarray(out.tokens) >= 0) & (np.asarray(out.tokens) < V)).all()
    assert len(traces) == 1
    assert f._cache_size() == 1
    assert int(np.asarray(state.output_counts).sum()) == 4 * len(settings)

