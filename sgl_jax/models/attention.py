"""Attention over a paged KV pool: the batch layout, the KV write, and the pure-jnp attention path.

The KV pool of one layer is a pair of arrays `[N, KV, S, D]` (N pages, KV heads, S = page_size token
slots, head dim D). Head-major inside a page was chosen by measurement (bench/bench_attention_layout.py):
the gathered `[R, P, KV, S, D]` block feeds the score einsum with heads as a batch dimension and no
transpose, which on XLA:CPU was several times faster than token-major pages.

A forward call sees a *ragged* batch, flattened to T tokens laid out as
    [ Sd decode tokens | NR run blocks of Br tokens each | NB prefill blocks of Bq tokens each ]
Each decode token is one "row" of attention with one query; each prefill block is a row of Bq
consecutive query tokens of one sequence's chunk (a chunk is padded up to a multiple of Bq, padded
slots have position -1). Run blocks are the same with a small Br: a few consecutive tokens of one
sequence (a jump-forward run) that would otherwise take one decode row, and one gather of its pages,
each. Every row carries its sequence's page table and KV length. Attention is one function over rows
`[R, Bq]`, called once per segment, so decode tokens pay for one query and blocks pay no per-token gather.

New keys/values are scattered into the pool *before* attention (`write_kv`) at `slot_mapping`
(page * S + offset; padded tokens write into page 0, the sink page the allocator never hands out),
so the attention reads one uniform paged layout for cached and new tokens alike.

The jnp attention (`paged_attention`) has three forms of the same function: blocks of Bq queries gather their
rows' pages (`paged_block_attention`); rows of one query do the same without the query axis
(`paged_decode_attention`); and a decode call whose page tables are about as large as the pool scores the pool
page-major, in place, without gathering K/V (`paged_decode_page_major`), unless a page is shared by two rows.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

KVPages = tuple[jax.Array, jax.Array]  # (k_pages, v_pages), each [N, KV, S, D]
KVCache = tuple[KVPages, ...]  # one entry per layer

_MASK_VALUE = -1e30


@struct.dataclass
class AttnMetadata:
    """Batch layout shared by every layer of one forward call (see the module docstring)."""

    positions: jax.Array  # [T] int32, absolute position of each token; -1 for padding
    slot_mapping: jax.Array  # [T] int32, flat KV slot (page * S + offset) each token writes; 0 for padding
    dec_page_table: jax.Array  # [Sd, P] int32
    dec_kv_lens: jax.Array  # [Sd] int32, KV length of the sequence after this step; 0 for padding
    pre_page_table: jax.Array  # [NB, P] int32
    pre_kv_lens: jax.Array  # [NB] int32
    block_q: int = struct.field(pytree_node=False, default=1)
    run_page_table: jax.Array | None = None  # [NR, P] int32 (None = no run blocks)
    run_kv_lens: jax.Array | None = None  # [NR] int32
    run_q: int = struct.field(pytree_node=False, default=1)  # Br, tokens per run block

    @property
    def num_decode(self) -> int:
        return self.dec_page_table.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.pre_page_table.shape[0]

    @property
    def num_runs(self) -> int:
        return 0 if self.run_page_table is None else self.run_page_table.shape[0]


def write_kv(pages: KVPages, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> KVPages:
    """Scatter this step's k, v `[T, KV, D]` into the pool at `slot_mapping` `[T]`."""
    k_pages, v_pages = pages
    page_size = k_pages.shape[2]
    page, off = slot_mapping // page_size, slot_mapping % page_size
    k_pages = k_pages.at[page, :, off, :].set(k.astype(k_pages.dtype), mode="promise_in_bounds")
    v_pages = v_pages.at[page, :, off, :].set(v.astype(v_pages.dtype), mode="promise_in_bounds")
    return k_pages, v_pages


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                    sliding_window: int | None = None, soft_cap: float | None = None):
    """Attention of query rows over their sequences' pages, gathering only the pages each row owns.

    q [R, Bq, H, D]; k_pages, v_pages [N, KV, S, D]; page_table [R, P]; kv_lens [R];
    q_positions [R, Bq] (-1 = padding). Query at position t sees keys j <= t, j < kv_len
    (and j > t - sliding_window). Returns [R, Bq, H, D] in q.dtype; rows with no visible key give 0.

    Rows of one query (Bq == 1: the decode segment, and run blocks of one token) take
    `paged_decode_attention`, or `paged_decode_page_major` when the rows' page tables are about as large as
    the pool (`page_major_pays`) and no page has two owner rows; the others `paged_block_attention`.
    All compute the same function.
    """
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    args = (q, k_pages, v_pages, page_table, kv_lens, q_positions)
    if q.shape[1] != 1:
        return paged_block_attention(*args, **kw)
    if not page_major_pays(q.shape[0], page_table.shape[1], k_pages.shape[0]):
        return paged_decode_attention(*args, **kw)
    # Page-major needs each page to have one owner row; a page shared by rows (a radix-cache prefix) sends the
    # whole call to the gather path. Decided per call on the device (lax.cond runs one branch).
    return jax.lax.cond(pages_shared(page_table, kv_lens, k_pages.shape[2], k_pages.shape[0]),
                        lambda *a: paged_decode_attention(*a, **kw),
                        lambda *a: paged_decode_page_major(*a, **kw), *args)


def _masked_softmax(s, visible, axes=(-2, -1)):
    """Softmax of scores `s` over `axes`, only where `visible` (broadcastable): invisible entries get exactly 0,
    and a row with nothing visible gets all zeros (no NaN)."""
    s = jnp.where(visible, s, _MASK_VALUE)
    m = jnp.max(s, axis=axes, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=axes, keepdims=True)
    return p / jnp.where(denom == 0.0, 1.0, denom)


def paged_block_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                          sliding_window: int | None = None, soft_cap: float | None = None):
    """`paged_attention` for rows of any Bq: scores [R, KV, G, Bq, P, S], softmax over (P, S)."""
    R, Bq, H, D = q.shape
    _, KV, S, _ = k_pages.shape
    P = page_table.shape[1]
    G = H // KV
    qg = q.reshape(R, Bq, KV, G, D)
    kpos = (jnp.arange(P)[:, None] * S + jnp.arange(S)[None, :])  # [P, S]
    k = k_pages[page_table]  # [R, P, KV, S, D]
    # Slots past kv_len (tail of the last page, table padding) hold stale data, maybe non-finite:
    # zero them in V so that masked probabilities (exact zeros) cannot turn into 0 * inf = NaN.
    in_seq = kpos[None] < kv_lens[:, None, None]  # [R, P, S]
    v = jnp.where(in_seq[:, :, None, :, None], v_pages[page_table], 0)  # [R, P, KV, S, D]
    s = jnp.einsum("RQKGD,RPKSD->RKGQPS", qg, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    qpos = q_positions[:, :, None, None]  # [R, Bq, 1, 1]
    visible = (kpos[None, None] <= qpos) & (kpos[None, None] < kv_lens[:, None, None, None])
    if sliding_window is not None:
        visible &= kpos[None, None] > qpos - sliding_window
    p = _masked_softmax(s, visible[:, None, None])  # visible as [R, 1, 1, Bq, P, S]
    out = jnp.einsum("RKGQPS,RPKSD->RQKGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(R, Bq, H, D).astype(q.dtype)


def _decode_visible(kpos, kv_lens, q_positions, sliding_window):
    """Which key positions `kpos` (any shape) the one query of each row sees: [R, *kpos.shape] bool."""
    qpos = q_positions[:, 0].reshape((-1,) + (1,) * kpos.ndim)
    lens = kv_lens.reshape((-1,) + (1,) * kpos.ndim)
    visible = (kpos[None] <= qpos) & (kpos[None] < lens)
    if sliding_window is not None:
        visible &= kpos[None] > qpos - sliding_window
    return visible


def paged_decode_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None):
    """`paged_attention` for rows of one query (Bq == 1), gathering the row's pages: no query axis, scores
    [R, KV, G, P, S] on the gathered [R, P, KV, S, D] blocks as they come. (Transposing them to [R, KV, P*S, D]
    for one-axis dots was 8-15 % faster on a Zen-5 host and ~15 % slower on this Zen-3 one: bench/notes.md,
    "Decode attention for batch decode".)

    V is zeroed wherever the query sees no key (past kv_len, after the query, before the window): a
    stale non-finite slot must not meet a zero probability (0 * inf = NaN)."""
    R, Bq, H, D = q.shape
    assert Bq == 1, q.shape
    _, KV, S, _ = k_pages.shape
    P = page_table.shape[1]
    qg = q.reshape(R, KV, H // KV, D)
    kpos = jnp.arange(P)[:, None] * S + jnp.arange(S)[None, :]  # [P, S]
    visible = _decode_visible(kpos, kv_lens, q_positions, sliding_window)  # [R, P, S]
    k = k_pages[page_table]  # [R, P, KV, S, D]
    v = jnp.where(visible[:, :, None, :, None], v_pages[page_table], 0)
    s = jnp.einsum("RKGD,RPKSD->RKGPS", qg, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    p = _masked_softmax(s, visible[:, None, None])  # visible as [R, 1, 1, P, S]
    out = jnp.einsum("RKGPS,RPKSD->RKGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(R, 1, H, D).astype(q.dtype)


# Page-major decode reads every pool page once, whatever the batch; the gather path reads and copies R * P pages
# (entries past a row's length read page 0, the sink, but are copied all the same). Page-major is taken when
# R * P >= PAGE_MAJOR_MIN_ENTRIES * N, a static decision (shapes are static). Set from whole decode steps on a
# 2-core Zen-3 host (bench/notes.md, "Decode attention for batch decode"): page-major was 11-22 % faster at
# R * P ~= N (the pool just holds the batch) and 30 % faster at R * P = 1.4 N (B=64, width 32, 1450-page pool,
# 35 % of it in use); at R * P = 0.71 N it was even (ctx 512) or 17 % slower (ctx 128, 18 % of the pool in use).
PAGE_MAJOR_MIN_ENTRIES = 0.8


def page_major_pays(rows: int, width: int, num_pages: int) -> bool:
    """Whether a decode call of `rows` rows x `width` pages should score the pool page-major."""
    return rows > 1 and rows * width >= PAGE_MAJOR_MIN_ENTRIES * num_pages


def _pages_in_use(page_table, kv_lens, page_size: int):
    """[R, P] bool: table entries a row really uses (entries past its length point at page 0, the sink)."""
    return jnp.arange(page_table.shape[1])[None, :] * page_size < kv_lens[:, None]


def pages_shared(page_table, kv_lens, page_size: int, num_pages: int):
    """Scalar bool: some pool page is used by two or more rows."""
    in_use = _pages_in_use(page_table, kv_lens, page_size)
    count = jnp.zeros((num_pages,), jnp.int32).at[jnp.where(in_use, page_table, num_pages)].add(1, mode="drop")
    return jnp.any(count > 1)


def _edge_columns(page_table, kv_lens, q_positions, page_size: int, sliding_window: int | None):
    """Per row, the table columns whose page the query sees only in part: the page holding its last visible
    key, and with a window the page where the window starts. [R, E] int32 columns and [R, E] bool (valid;
    a window starting in the last page is one edge, not two); E = 1, or 2 with a window."""
    last = jnp.maximum(jnp.minimum(q_positions[:, 0], kv_lens - 1), 0) // page_size  # [R]
    if sliding_window is None:
        return last[:, None], jnp.ones_like(last, bool)[:, None]
    first = jnp.maximum(q_positions[:, 0] - sliding_window + 1, 0) // page_size
    return jnp.stack([last, first], axis=1), jnp.stack([jnp.ones_like(last, bool), first != last], axis=1)


def _page_owners(page_table, use, num_pages: int):
    """For every pool page, the row whose entry `use` [R, P] marks it (R: none) and the entry's column: [N] each.
    Exact when no page is marked by two rows."""
    R, P = page_table.shape
    dest = jnp.where(use, page_table, num_pages)  # unmarked entries scatter nowhere
    owner = jnp.full((num_pages,), R, jnp.int32).at[dest].set(
        jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32)[:, None], (R, P)), mode="drop")
    col = jnp.zeros((num_pages,), jnp.int32).at[dest].set(
        jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None, :], (R, P)), mode="drop")
    return owner, col


def paged_decode_page_major(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                            sliding_window: int | None = None, soft_cap: float | None = None):
    """`paged_decode_attention` without gathering K/V. Each row's *inner* pages (every slot visible to its
    query) are scored in place: every pool page against the query of the row that owns it, QK and PV as dots
    batched over the pool's pages, and only the small score / partial-output arrays move per row. Its *edge*
    pages (`_edge_columns`: the partly visible last page, and the window's first page) are gathered, R or 2R
    pages. One softmax spans both. Exact only when no page is used by two rows (the caller checks
    `pages_shared`); reads the whole pool (the caller checks `page_major_pays`).

    Stale non-finite data stays out without a pass over the pool: a masked slot (probability exactly 0) only
    meets V in an edge page, whose gathered V is zeroed there; outputs of pages that are not some row's inner
    page are never read; non-finite q (padding rows) is zeroed, as the one-hot pick would spread it to every
    page; non-finite scores are masked like every invisible key."""
    R, _, H, D = q.shape
    N, KV, S, _ = k_pages.shape
    P = page_table.shape[1]
    G = H // KV
    qg = q.reshape(R, KV * G * D)
    qg = jnp.where(jnp.isfinite(qg), qg, 0)
    kpos = jnp.arange(P)[:, None] * S + jnp.arange(S)[None, :]  # [P, S]
    visible = _decode_visible(kpos, kv_lens, q_positions, sliding_window)  # [R, P, S]
    ecol, evalid = _edge_columns(page_table, kv_lens, q_positions, S, sliding_window)  # [R, E]
    is_edge = jnp.any((jnp.arange(P)[None, :, None] == ecol[:, None, :]) & evalid[:, None, :], axis=2)  # [R, P]
    inner = jnp.all(visible, axis=2) & ~is_edge  # [R, P]
    owner, col = _page_owners(page_table, inner, N)
    # The owner's q by a one-hot matmul rather than a gather: XLA:CPU fuses q's producers (RoPE) into a gather
    # and recomputes them for every pool page (bench/notes.md, (c)).
    onehot = (owner[:, None] == jnp.arange(R, dtype=jnp.int32)[None, :]).astype(qg.dtype)  # [N, R]
    q_pg = jnp.einsum("NR,RX->NX", onehot, qg).reshape(N, KV, G, D)
    s_pg = jnp.einsum("NKGD,NKSD->NKGS", q_pg, k_pages, preferred_element_type=jnp.float32)
    s_in = jnp.where(inner[:, :, None, None, None], s_pg[page_table], _MASK_VALUE)  # [R, P, KV, G, S]
    epages = jnp.take_along_axis(page_table, ecol, axis=1)  # [R, E]
    evis = jnp.take_along_axis(visible, ecol[:, :, None], axis=1) & evalid[:, :, None]  # [R, E, S]
    s_e = jnp.einsum("RKGD,REKSD->REKGS", qg.reshape(R, KV, G, D), k_pages[epages],
                     preferred_element_type=jnp.float32)  # [R, E, KV, G, S]
    s_e = jnp.where(evis[:, :, None, None, :], s_e, _MASK_VALUE)
    s = jnp.concatenate([s_in, s_e], axis=1) * sm_scale  # [R, P + E, KV, G, S]
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    live = jnp.concatenate([jnp.broadcast_to(inner[:, :, None], (R, P, S)), evis], axis=1)[:, :, None, None, :]
    p = _masked_softmax(s, live, axes=(1, 4))  # [R, P + E, KV, G, S]
    p_in, p_e = p[:, :P], p[:, P:]
    p_pg = jnp.concatenate([p_in, jnp.zeros((1,) + p_in.shape[1:], p.dtype)])[owner, col]  # [N, KV, G, S]
    o_pg = jnp.einsum("NKGS,NKSD->NKGD", p_pg.astype(v_pages.dtype), v_pages, preferred_element_type=jnp.float32)
    out = jnp.sum(jnp.where(inner[:, :, None, None, None], o_pg[page_table], 0), axis=1)  # [R, KV, G, D]
    v_e = jnp.where(evis[:, :, None, :, None], v_pages[epages], 0)  # [R, E, KV, S, D]
    out += jnp.einsum("REKGS,REKSD->RKGD", p_e.astype(v_e.dtype), v_e, preferred_element_type=jnp.float32)
    return out.reshape(R, 1, H, D).astype(q.dtype)


class AttentionFn(NamedTuple):
    """The attention backend a model calls; `fn` has `paged_attention`'s signature."""

    name: str
    fn: callable


def get_attention_backend(name: str = "auto") -> AttentionFn:
    """`auto` picks the Pallas kernel for the platform (TPU/GPU) and the jnp path on CPU."""
    if name == "auto":
        platform = jax.default_backend()
        name = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(platform, "jnp")
    if name == "jnp":
        return AttentionFn("jnp", paged_attention)
    if name in ("pallas_tpu", "pallas_gpu", "pallas_tpu_interpret", "pallas_gpu_interpret"):
        from pallas_kernels import ragged_paged_attention as rpa

        backend = name.replace("_interpret", "")
        interpret = name.endswith("_interpret")

        def fn(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale, sliding_window=None,
               soft_cap=None):
            return rpa.ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions,
                                              sm_scale=sm_scale, sliding_window=sliding_window,
                                              soft_cap=soft_cap, backend=backend, interpret=interpret)

        return AttentionFn(name, fn)
    raise ValueError(f"attention_backend {name!r} is unknown; expected auto, jnp, pallas_tpu or pallas_gpu "
                     "(optionally with _interpret)")
