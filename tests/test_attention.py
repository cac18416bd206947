"""The jnp paged attention (sgl_jax.models.attention) against a dense float64 numpy reference.

Each case scatters the rows' pages over a pool and fills every (page, slot) that no query may see with NaN:
pages nobody owns, the tail of a row's last page, table padding (page 0), keys after the query, keys before
the sliding window. Padded query slots (position -1) carry NaN queries. A stray read of any of them shows up
as NaN in the output. Rows with no visible key must give exactly 0.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sgl_jax.models.attention import (
    CHUNK_PAGES,
    chunk_pages_for,
    page_major_pays,
    paged_attention,
    paged_block_attention,
    paged_chunked_attention,
    paged_decode_attention,
    paged_decode_page_major,
    pages_shared,
    shared_columns,
)

KV, G, D = 2, 3, 16
H = KV * G


def dense_reference(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale, sliding_window=None,
                    soft_cap=None):
    """Row by row, query by query, in float64: the keys the query sees, softmax, weighted V."""
    q, kp, vp = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    R, Bq = q.shape[:2]
    S = kp.shape[2]
    out = np.zeros(q.shape, np.float64)
    for r in range(R):
        for i in range(Bq):
            t = int(q_positions[r, i])
            js = [j for j in range(int(kv_lens[r])) if j <= t and (sliding_window is None or j > t - sliding_window)]
            if not js:
                continue
            pages = [int(page_table[r, j // S]) for j in js]
            k = np.stack([kp[p, :, j % S] for p, j in zip(pages, js)], axis=1)  # [KV, J, D]
            v = np.stack([vp[p, :, j % S] for p, j in zip(pages, js)], axis=1)
            qg = q[r, i].reshape(KV, G, D)
            s = np.einsum("kgd,kjd->kgj", qg, k) * sm_scale
            if soft_cap is not None:
                s = soft_cap * np.tanh(s / soft_cap)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            out[r, i] = np.einsum("kgj,kjd->kgd", p, v).reshape(H, D)
    return out


def make_case(seed, *, S, rows, sliding_window=None, poison_unseen=True, extra_pages=3, shared=0):
    """rows: list of (kv_len, query positions). Returns the attention's inputs as numpy arrays.

    shared > 0: the first `shared` pages of every row are the same pool pages (a radix-cache prefix).

    poison_unseen=False leaves every key below kv_len finite, also those a query does not see (before the
    window, after the query): the block path masks V only past kv_len, as the model only needs."""
    rng = np.random.default_rng(seed)
    R, Bq = len(rows), len(rows[0][1])
    need = [-(-n // S) for n, _ in rows]
    P = max(need) + 1  # a spare column: entries past the length point at page 0
    own = [max(0, n - shared) for n in need]  # pages of the row's own, after the shared prefix
    N = 1 + shared + sum(own) + extra_pages
    perm = rng.permutation(np.arange(1, N))
    prefix, owned = perm[:shared], perm[shared:]
    k = rng.standard_normal((N, KV, S, D)).astype(np.float32)
    v = rng.standard_normal((N, KV, S, D)).astype(np.float32)
    poison = np.ones((N, S), bool)
    page_table = np.zeros((R, P), np.int32)
    q_pos = np.asarray([qs for _, qs in rows], np.int32)
    kv_lens = np.asarray([n for n, _ in rows], np.int32)
    off = 0
    for r, (n, qs) in enumerate(rows):
        pages = np.concatenate([prefix[: need[r]], owned[off: off + own[r]]])
        off += own[r]
        page_table[r, : len(pages)] = pages
        valid = [t for t in qs if t >= 0]
        for j in range(n):
            seen = any(j <= t and (sliding_window is None or j > t - sliding_window) for t in valid)
            if seen or not poison_unseen:
                poison[pages[j // S], j % S] = False
    k[np.broadcast_to(poison[:, None, :], k.shape[:3])] = np.nan
    v[np.broadcast_to(poison[:, None, :], v.shape[:3])] = np.nan
    q = rng.standard_normal((R, Bq, H, D)).astype(np.float32)
    q[q_pos < 0] = np.nan
    return q, k, v, page_table, kv_lens, q_pos


def decode_rows(S):
    """One query per row: decode rows at the end of their sequence, a query in the middle of its sequence
    (keys after it exist but are masked), and padding rows (kv_len 0, position -1)."""
    lens = [1, 2, S - 1, S, S + 1, 2 * S, 3 * S + 2, 5 * S + 3]
    rows = [(n, [n - 1]) for n in lens]
    rows.append((4 * S + 1, [2 * S + 1]))
    rows += [(0, [-1]), (0, [-1])]
    return rows


_decode = jax.jit(paged_decode_attention, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
_block = jax.jit(paged_block_attention, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
_dispatch = jax.jit(paged_attention, static_argnames=("sm_scale", "sliding_window", "soft_cap"))


def _check(out, ref, q_pos, kv_lens, tol):
    out = np.asarray(out, np.float32)
    assert not np.isnan(out).any(), "NaN in the output: a poisoned slot leaked"
    no_key = (q_pos < 0) | (kv_lens[:, None] == 0)
    assert np.all(out[no_key] == 0.0)
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("S", [4, 16])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
def test_decode_path_matches_dense_reference(S, sliding_window, soft_cap):
    q, k, v, pt, lens, pos = make_case(S + (sliding_window or 0), S=S, rows=decode_rows(S),
                                       sliding_window=sliding_window)
    kw = dict(sm_scale=0.4, sliding_window=sliding_window, soft_cap=soft_cap)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    args = tuple(jnp.asarray(x) for x in (q, k, v, pt, lens, pos))
    _check(_decode(*args, **kw), ref, pos, lens, 2e-5)
    _check(_dispatch(*args, **kw), ref, pos, lens, 2e-5)  # Bq == 1, a small pool: the page-major branch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
def test_decode_path_matches_block_path(sliding_window, soft_cap):
    """Same inputs through both paths (keys below kv_len left finite: the block path masks V only past
    kv_len), and both against the reference."""
    S = 4
    q, k, v, pt, lens, pos = make_case(7, S=S, rows=decode_rows(S), sliding_window=sliding_window,
                                       poison_unseen=False)
    kw = dict(sm_scale=0.4, sliding_window=sliding_window, soft_cap=soft_cap)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    args = tuple(jnp.asarray(x) for x in (q, k, v, pt, lens, pos))
    dec, blk = _decode(*args, **kw), _block(*args, **kw)
    _check(dec, ref, pos, lens, 2e-5)
    _check(blk, ref, pos, lens, 2e-5)
    np.testing.assert_allclose(np.asarray(dec), np.asarray(blk), atol=2e-6, rtol=2e-6)


@pytest.mark.timeout(120)
def test_block_rows_match_dense_reference():
    """Rows of several queries keep the block path (padded slots, a block in the middle of a chunk)."""
    S, Bq = 4, 4
    rows = [(n, [t if t >= 0 else -1 for t in range(n - Bq, n)]) for n in (1, 3, S, 2 * S + 1, 5 * S + 3)]
    rows += [(3 * S + 1, [S, S + 1, S + 2, S + 3]), (0, [-1] * Bq)]
    q, k, v, pt, lens, pos = make_case(3, S=S, rows=rows, poison_unseen=False)
    kw = dict(sm_scale=0.4, soft_cap=3.0)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    args = tuple(jnp.asarray(x) for x in (q, k, v, pt, lens, pos))
    _check(_dispatch(*args, **kw), ref, pos, lens, 2e-5)


@pytest.mark.timeout(120)
def test_decode_paths_bfloat16():
    S = 8
    q, k, v, pt, lens, pos = make_case(11, S=S, rows=decode_rows(S))
    ref = dense_reference(q, k, v, pt, lens, pos, sm_scale=0.25)
    args = (jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16),
            jnp.asarray(pt), jnp.asarray(lens), jnp.asarray(pos))
    for fn in (_decode, jax.jit(paged_decode_page_major, static_argnames=("sm_scale",))):
        out = fn(*args, sm_scale=0.25)
        assert out.dtype == jnp.bfloat16
        _check(out.astype(jnp.float32), ref, pos, lens, 3e-2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("S", [4, 16])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
def test_page_major_matches_dense_reference(S, sliding_window, soft_cap):
    """No page shared: page-major scores every pool page (NaN-poisoned ones too) against its owner's query."""
    q, k, v, pt, lens, pos = make_case(S + 1, S=S, rows=decode_rows(S), sliding_window=sliding_window)
    kw = dict(sm_scale=0.4, sliding_window=sliding_window, soft_cap=soft_cap)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    args = tuple(jnp.asarray(x) for x in (q, k, v, pt, lens, pos))
    assert not bool(pages_shared(args[3], args[4], S, k.shape[0]))
    out = jax.jit(paged_decode_page_major, static_argnames=tuple(kw))(*args, **kw)
    _check(out, ref, pos, lens, 2e-5)
    # the pool here is the batch's pages + 4: paged_attention takes the page-major branch
    assert page_major_pays(pt.shape[0], pt.shape[1], k.shape[0])
    _check(_dispatch(*args, **kw), ref, pos, lens, 2e-5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shared", [1, 3])
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_shared_pages_take_the_gather_path(shared, sliding_window):
    """Rows sharing prefix pages (radix cache): paged_attention must still match the reference (the
    page-major form would score a shared page against one owner only)."""
    S = 4
    q, k, v, pt, lens, pos = make_case(5, S=S, rows=decode_rows(S), sliding_window=sliding_window, shared=shared)
    kw = dict(sm_scale=0.4, sliding_window=sliding_window)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    args = tuple(jnp.asarray(x) for x in (q, k, v, pt, lens, pos))
    assert bool(pages_shared(args[3], args[4], S, k.shape[0]))
    assert page_major_pays(pt.shape[0], pt.shape[1], k.shape[0])
    _check(_dispatch(*args, **kw), ref, pos, lens, 2e-5)
    if sliding_window is None:  # (with the window the shared prefix lies before it or in an edge page)
        # page-major alone is wrong on shared inner pages: the check above is what keeps them exact
        bad = np.asarray(jax.jit(paged_decode_page_major, static_argnames=tuple(kw))(*args, **kw))
        assert not np.allclose(bad, ref, atol=1e-3)


@pytest.mark.timeout(60)
def test_pages_shared_and_threshold():
    S = 4
    pt = jnp.asarray([[3, 5, 0], [7, 3, 0], [9, 0, 0]], jnp.int32)
    # page 3 is in rows 0 and 1, but row 1 uses only its first page (kv_len 4): nothing shared
    assert not bool(pages_shared(pt, jnp.asarray([8, 4, 2]), S, 10))
    assert bool(pages_shared(pt, jnp.asarray([8, 5, 2]), S, 10))
    # table padding (page 0 past the length) is not sharing
    assert not bool(pages_shared(pt, jnp.asarray([5, 0, 1]), S, 10))
    assert page_major_pays(32, 32, 1025) and page_major_pays(64, 32, 1450)
    assert not page_major_pays(32, 32, 1450) and not page_major_pays(1, 32, 10)


_chunked = jax.jit(paged_chunked_attention,
                   static_argnames=("sm_scale", "sliding_window", "soft_cap", "chunk_pages", "cascade"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunk_pages", [1, 2, 3])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
@pytest.mark.parametrize("shared", [0, 3])
def test_chunked_decode_matches_dense_reference(chunk_pages, sliding_window, soft_cap, shared):
    """The loops over page chunks with an online softmax: rows that need 0, 1 and all chunks, a table width
    that is not a multiple of the chunk, NaN in every slot no query may see; with shared prefix pages the
    cascade part reads them once (the shortest row keeps it to the pages every row has in full)."""
    S = 4
    rows = decode_rows(S)
    if shared:
        rows = [(n, qs) for n, qs in rows if n == 0 or n > shared * S]  # rows long enough to share 3 pages
    q, k, v, pt, lens, pos = make_case(20 + chunk_pages, S=S, rows=rows, sliding_window=sliding_window,
                                       shared=shared)
    kw = dict(sm_scale=0.4, sliding_window=sliding_window, soft_cap=soft_cap)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    args = tuple(jnp.asarray(x) for x in (q, k, v, pt, lens, pos))
    assert int(shared_columns(args[3], args[4], S)) == shared
    out = _chunked(*args, chunk_pages=chunk_pages, **kw)
    _check(out, ref, pos, lens, 2e-5)
    _check(_chunked(*args, chunk_pages=chunk_pages, cascade=False, **kw), ref, pos, lens, 2e-5)


@pytest.mark.timeout(60)
def test_shared_columns():
    S = 4
    pt = jnp.asarray([[3, 5, 8, 0], [3, 5, 9, 0], [3, 6, 0, 0], [7, 0, 0, 0]], jnp.int32)
    # the last row has no keys: it does not count; row 2 differs from column 1 on
    assert int(shared_columns(pt, jnp.asarray([12, 10, 8, 0]), S)) == 1
    assert int(shared_columns(pt[:2], jnp.asarray([12, 10]), S)) == 2
    # a shared page must be full below every row's length: row 1 ends inside page 5
    assert int(shared_columns(pt[:2], jnp.asarray([12, 7]), S)) == 1
    # one row with keys shares nothing
    assert int(shared_columns(pt, jnp.asarray([12, 0, 0, 0]), S)) == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunk_pages", [1, 2, 4])
@pytest.mark.parametrize("shared", [0, 2])
def test_chunked_blocks_match_dense_reference(chunk_pages, shared):
    """Rows of several queries (prefill blocks: padded slots, a block in the middle of its chunk), also over
    pages shared by every row."""
    S, Bq = 4, 4
    rows = [(n, [t if t >= 0 else -1 for t in range(n - Bq, n)]) for n in (1, 3, S, 2 * S + 1, 5 * S + 3)]
    rows += [(3 * S + 1, [S, S + 1, S + 2, S + 3]), (0, [-1] * Bq)]
    q, k, v, pt, lens, pos = make_case(30 + shared, S=S, rows=rows, shared=shared)
    kw = dict(sm_scale=0.4, soft_cap=3.0, sliding_window=6)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    args = tuple(jnp.asarray(x) for x in (q, k, v, pt, lens, pos))
    _check(_chunked(*args, chunk_pages=chunk_pages, **kw), ref, pos, lens, 2e-5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bq", [1, 4])
def test_wide_tables_take_the_chunked_path(bq):
    """A table wider than the chunk, the rows far shorter (the serving case: a bucketed width), through
    paged_attention: equal to the reference, and to the chunked function itself."""
    S = 4
    width = chunk_pages_for(5) + 3
    lens = [1, 2 * S + 1, 5 * S, CHUNK_PAGES * S + 1, 0]
    rows = [(n, [n - bq + i if n - bq + i >= 0 else -1 for i in range(bq)]) for n in lens]
    q, k, v, pt, kv_lens, pos = make_case(40 + bq, S=S, rows=rows, extra_pages=8 * width)
    pt = np.pad(pt, ((0, 0), (0, width - pt.shape[1])))
    kw = dict(sm_scale=0.4)
    ref = dense_reference(q, k, v, pt, kv_lens, pos, **kw)
    args = tuple(jnp.asarray(x) for x in (q, k, v, pt, kv_lens, pos))
    assert not page_major_pays(len(rows), width, k.shape[0])
    out = _dispatch(*args, **kw)
    _check(out, ref, pos, kv_lens, 2e-5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_chunked(*args, chunk_pages=chunk_pages_for(len(rows)),
                                                                      cascade=False, **kw)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bq", [1, 4])
def test_wide_tables_filled_or_shared(bq):
    """Wide tables on the other branches of paged_attention: blocks whose longest row fills the table, and
    decode rows sharing prefix pages in a pool small enough for page-major (the chunked fallback)."""
    S = 4
    width = chunk_pages_for(4) + 3
    lens = [width * S - 1, 2 * S + 1, 9 * S, 1]
    rows = [(n, [n - bq + i if n - bq + i >= 0 else -1 for i in range(bq)]) for n in lens]
    q, k, v, pt, kv_lens, pos = make_case(50 + bq, S=S, rows=rows, shared=2, extra_pages=1)
    assert pt.shape[1] > chunk_pages_for(4)  # (the longest row's pages and one spare column)
    kw = dict(sm_scale=0.4, soft_cap=2.0)
    ref = dense_reference(q, k, v, pt, kv_lens, pos, **kw)
    args = tuple(jnp.asarray(x) for x in (q, k, v, pt, kv_lens, pos))
    if bq == 1:
        assert page_major_pays(len(rows), pt.shape[1], k.shape[0])
        assert bool(pages_shared(args[3], args[4], S, k.shape[0]))
    _check(_dispatch(*args, **kw), ref, pos, kv_lens, 2e-5)
