"""Attention over a paged KV pool: the batch layout, the KV write, and the pure-jnp attention path.

Which attention a model runs is `get_attention_backend`'s choice: the Pallas kernels on TPU/GPU, the native
kernel on CPU (pallas_kernels/cpu_attention.py, float32), and the jnp path here where neither applies.

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
    # second writes: the k, v of token row dup_src[i] also go to slot dup_slots[i] (a request computing
    # past a prefix another row computes in this step: sgl_jax.batch.SeqChunk.borrow); None = none
    dup_src: jax.Array | None = None  # [D] int32 (0 for padding)
    dup_slots: jax.Array | None = None  # [D] int32 (0 for padding: the sink page)

    @property
    def num_decode(self) -> int:
        return self.dec_page_table.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.pre_page_table.shape[0]

    @property
    def num_runs(self) -> int:
        return 0 if self.run_page_table is None else self.run_page_table.shape[0]


def write_kv(pages: KVPages, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             dup_src: jax.Array | None = None, dup_slots: jax.Array | None = None, kv_format: str = "") -> KVPages:
    """Scatter this step's k, v `[T, KV, D]` into the pool at `slot_mapping` `[T]`, and rows `dup_src` `[D]`
    a second time at `dup_slots` `[D]` (one scatter for both). `kv_format`: a float8 pool's format, whose pages
    are uint8 codes (sgl_jax.models.llama.kv_storage_dtype)."""
    if dup_src is not None and dup_src.shape[0]:
        k = jnp.concatenate([k, k[dup_src]])
        v = jnp.concatenate([v, v[dup_src]])
        slot_mapping = jnp.concatenate([slot_mapping, dup_slots])
    k_pages, v_pages = pages
    if k_pages.dtype == jnp.uint8 and not kv_format:
        raise ValueError("write_kv: a uint8 pool holds float8 codes; its kv_format (float8_e4m3fn or float8_e5m2) "
                         "must be given")
    page_size = k_pages.shape[2]
    page, off = slot_mapping // page_size, slot_mapping % page_size
    fmt = kv_format or k_pages.dtype
    k_pages = k_pages.at[page, :, off, :].set(to_pool(k, fmt), mode="promise_in_bounds")
    v_pages = v_pages.at[page, :, off, :].set(to_pool(v, fmt), mode="promise_in_bounds")
    return k_pages, v_pages


def to_pool(x: jax.Array, dtype) -> jax.Array:
    """`x` as a pool of `dtype` stores it. float8: clamped to the format's finite range (a cast would make e4m3fn's
    overflow NaN and e5m2's infinity, which every later query of the sequence would read), cast, and stored as the
    codes' uint8 bits."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1:
        big = float(jnp.finfo(dtype).max)
        return jax.lax.bitcast_convert_type(jnp.clip(x, -big, big).astype(dtype), jnp.uint8)
    return x.astype(dtype)


def from_pool(pages: jax.Array, kv_format: str) -> jax.Array:
    """A float8 pool's uint8 pages as their float8 dtype (`kv_format`), for the jnp paths; other pools as they are.
    A whole-pool conversion: the jnp paths are the fallback and the reference, the native kernel reads the codes."""
    if kv_format and pages.dtype == jnp.uint8:
        return jax.lax.bitcast_convert_type(pages, jnp.dtype(kv_format))
    return pages


def _wide(x: jax.Array) -> jax.Array:
    """Keys or values of a float8 pool widened to float32 for an einsum (jnp has no implicit promotion for 8-bit
    floats); other pools as they are."""
    return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize == 1 else x


def _pv(p: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The probability-value product's operands: the probabilities in the values' dtype (a 16-bit pool's product
    runs in 16 bits), except over a float8 pool, whose values are widened instead (probabilities in 3 or 2 mantissa
    bits would cost far more than the pool's own rounding)."""
    if jnp.dtype(v.dtype).itemsize == 1:
        return p, _wide(v)
    return p.astype(v.dtype), v


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                    sliding_window: int | None = None, soft_cap: float | None = None, kv_format: str = ""):
    """Attention of query rows over their sequences' pages, gathering only the pages each row owns.

    q [R, Bq, H, D]; k_pages, v_pages [N, KV, S, D]; page_table [R, P]; kv_lens [R];
    q_positions [R, Bq] (-1 = padding). Query at position t sees keys j <= t, j < kv_len
    (and j > t - sliding_window). Returns [R, Bq, H, D] in q.dtype; rows with no visible key give 0.

    Rows of one query (Bq == 1: the decode segment, and run blocks of one token) take
    `paged_decode_page_major` when the rows' pages, up to the longest row, are about as many as the pool's
    (`page_major_pays` statically for full tables, then on the device for this call's lengths) and no page
    has two owner rows. Otherwise a table wider than its chunk (`chunk_pages_for`) takes
    `paged_chunked_attention` (work in proportion to the longest row, not the table width), and a narrower
    one `paged_decode_attention` (Bq == 1) or `paged_block_attention`. All compute the same function.
    `kv_format`: a float8 pool's format, its pages uint8 codes (from_pool).
    """
    k_pages, v_pages = from_pool(k_pages, kv_format), from_pool(v_pages, kv_format)
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    args = (q, k_pages, v_pages, page_table, kv_lens, q_positions)
    R, Bq, P = q.shape[0], q.shape[1], page_table.shape[1]
    C = chunk_pages_for(R)
    if P <= C:
        one_pass = paged_block_attention if Bq != 1 else paged_decode_attention
        if Bq != 1 or not page_major_pays(R, P, k_pages.shape[0]):
            return one_pass(*args, **kw)
    # Cascade only for many decode rows: it paid 20-25 % at 32-64 rows and nothing at 8-16 in a CPU
    # microbenchmark, and was slower for prefill blocks (bench/notes.md); each loop adds compile time.
    cascade = Bq == 1 and R >= CASCADE_MIN_ROWS
    chunked = lambda *a, **k: paged_chunked_attention(*a, chunk_pages=C, cascade=cascade, **k)  # noqa: E731
    if Bq != 1 or not page_major_pays(R, P, k_pages.shape[0]):
        return chunked(*args, **kw)
    # Page-major reads the whole pool, the other paths the rows' pages up to the longest row: it is taken when
    # the rows' pages at that length come near the pool's size, and only when no page has two owner rows (a
    # radix-cache prefix shared by rows). Decided per call on the device (lax.cond runs one branch).
    other = paged_decode_attention if P <= C else chunked
    N, S = k_pages.shape[0], k_pages.shape[2]
    need = (jnp.max(kv_lens) + S - 1) // S
    use_pm = (R * need >= PAGE_MAJOR_MIN_ENTRIES * N) & ~pages_shared(page_table, kv_lens, S, N)
    return jax.lax.cond(use_pm, lambda *a: paged_decode_page_major(*a, **kw), lambda *a: other(*a, **kw), *args)


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
    s = jnp.einsum("RQKGD,RPKSD->RKGQPS", qg, _wide(k), preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    qpos = q_positions[:, :, None, None]  # [R, Bq, 1, 1]
    visible = (kpos[None, None] <= qpos) & (kpos[None, None] < kv_lens[:, None, None, None])
    if sliding_window is not None:
        visible &= kpos[None, None] > qpos - sliding_window
    p = _masked_softmax(s, visible[:, None, None])  # visible as [R, 1, 1, Bq, P, S]
    out = jnp.einsum("RKGQPS,RPKSD->RQKGD", *_pv(p, v), preferred_element_type=jnp.float32)
    return out.reshape(R, Bq, H, D).astype(q.dtype)


# Table columns per step of `paged_chunked_attention`'s loop (8 pages of 16 slots = 128 keys per row and step).
# Few rows take wider chunks (the loop's per-step cost matters more than the gathered block's size).
CHUNK_PAGES = 8
CASCADE_MIN_ROWS = 32


def chunk_pages_for(rows: int) -> int:
    """The chunk `paged_attention` uses for a call of `rows` rows."""
    return 4 * CHUNK_PAGES if rows <= 2 else 2 * CHUNK_PAGES if rows <= 8 else CHUNK_PAGES


def shared_columns(page_table, kv_lens, page_size: int):
    """Scalar int32: how many leading table columns hold the same page in every row that has keys, each page
    full below every such row's length (the radix-cache prefix of fork branches or a shared system prompt).
    0 unless two rows have keys."""
    R, P = page_table.shape
    live = kv_lens > 0
    first = jnp.argmax(live)
    same = jnp.all((page_table == page_table[first][None, :]) | ~live[:, None], axis=0)  # [P]
    min_len = jnp.min(jnp.where(live, kv_lens, jnp.iinfo(jnp.int32).max))
    full = (jnp.arange(P) + 1) * page_size <= min_len
    n = jnp.sum(jnp.cumprod((same & full).astype(jnp.int32)))
    return jnp.where(jnp.sum(live.astype(jnp.int32)) >= 2, n, 0).astype(jnp.int32)


def paged_chunked_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                            sliding_window: int | None = None, soft_cap: float | None = None,
                            chunk_pages: int = CHUNK_PAGES, cascade: bool = True):
    """`paged_attention` in loops over chunks of `chunk_pages` table columns, with an online softmax (running
    max and sum per query), for as many chunks as the rows of this call need: trip counts computed on the
    device from `kv_lens`. The page-table width is then a bound, not a cost: a batch at context 700 in a table
    of 128 pages (2,048 keys) reads 48 pages per row, not 128. The gather path reads (and copies) every table
    entry, padding included; this one reads entries past the longest row never.

    Cascade (`cascade=True`): the leading columns whose pages every row shares (`shared_columns`) are read
    once for all rows -- one gather of C pages per step and one [rows x queries x heads, D] x [D, keys] product
    per KV head -- and each row's own pages after them in the per-row loop. Fork branches decoding over their
    common prompt read it once instead of once per branch.

    Any Bq (decode rows, run blocks, prefill blocks). V is zeroed wherever no query sees the key (stale
    non-finite slots must not meet a zero probability); scores of invisible keys are masked to a finite
    minimum, so a row that sees nothing gets exact zeros, as in the one-pass forms."""
    R, Bq, H, D = q.shape
    _, KV, S, _ = k_pages.shape
    P = page_table.shape[1]
    G = H // KV
    C = chunk_pages
    n_chunks = -(-P // C)
    table = jnp.pad(page_table, ((0, 0), (0, (n_chunks + 1) * C - P)))  # sink page; past every row's length
    need = (jnp.max(kv_lens) + S - 1) // S  # columns the longest row uses
    n_shared = shared_columns(page_table, kv_lens, S) if cascade else jnp.int32(0)
    qg = q.reshape(R, Bq, KV, G, D)
    qpos = q_positions[:, :, None, None]  # [R, Bq, 1, 1]
    lens = kv_lens[:, None, None, None]

    def update(carry, s, v, visible):
        """Fold the raw scores s [R, KV, G, Bq, C, S] of one chunk (values v) into the running softmax."""
        m, l, acc = carry  # [R, KV, G, Bq], [R, KV, G, Bq], [R, KV, G, Bq, D]
        s = s * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        vis = visible[:, None, None]  # [R, 1, 1, Bq, C, S]
        s = jnp.where(vis, s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=(-2, -1)))
        p = jnp.where(vis, jnp.exp(s - m_new[..., None, None]), 0.0)
        scale = jnp.exp(m - m_new)
        l = l * scale + jnp.sum(p, axis=(-2, -1))
        eq = "RKGQCS,RCKSD->RKGQD" if v.ndim == 5 else "RKGQCS,CKSD->RKGQD"
        acc = acc * scale[..., None] + jnp.einsum(eq, *_pv(p, v), preferred_element_type=jnp.float32)
        return m_new, l, acc

    def visible_at(col0, lo, hi):
        """[R, Bq, C, S]: which keys of columns col0.. the queries see, within columns [lo, hi)."""
        col = col0 + jnp.arange(C)
        kpos = col[:, None] * S + jnp.arange(S)[None, :]  # [C, S]
        vis = (kpos[None, None] <= qpos) & (kpos[None, None] < lens)
        vis &= ((col >= lo) & (col < hi))[None, None, :, None]
        if sliding_window is not None:
            vis &= kpos[None, None] > qpos - sliding_window
        return vis

    def shared_body(i, carry):
        col0 = i * C
        cols = jax.lax.dynamic_slice_in_dim(shared_row, col0, C)  # [C]
        visible = visible_at(col0, 0, n_shared)
        seen = jnp.any(visible, axis=(0, 1))  # [C, S]
        v = jnp.where(seen[:, None, :, None], v_pages[cols], 0)  # [C, KV, S, D]
        s = jnp.einsum("RQKGD,CKSD->RKGQCS", qg, _wide(k_pages[cols]), preferred_element_type=jnp.float32)
        return update(carry, s, v, visible)

    def own_body(i, carry):
        col0 = n_shared + i * C
        cols = jax.lax.dynamic_slice_in_dim(table, col0, C, axis=1)  # [R, C]
        visible = visible_at(col0, n_shared, P)
        seen = jnp.any(visible, axis=1)  # [R, C, S]
        v = jnp.where(seen[:, :, None, :, None], v_pages[cols], 0)  # [R, C, KV, S, D]
        s = jnp.einsum("RQKGD,RCKSD->RKGQCS", qg, _wide(k_pages[cols]), preferred_element_type=jnp.float32)
        return update(carry, s, v, visible)

    carry = (jnp.full((R, KV, G, Bq), _MASK_VALUE, jnp.float32), jnp.zeros((R, KV, G, Bq), jnp.float32),
             jnp.zeros((R, KV, G, Bq, D), jnp.float32))
    if cascade:
        shared_row = table[jnp.argmax(kv_lens > 0)]  # [P + pad]: the first row with keys
        carry = jax.lax.fori_loop(0, (n_shared + C - 1) // C, shared_body, carry)
    own_trips = jnp.clip((need - n_shared + C - 1) // C, 0, n_chunks)
    _, l, acc = jax.lax.fori_loop(0, own_trips, own_body, carry)
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]  # [R, KV, G, Bq, D]
    return jnp.moveaxis(out, 3, 1).reshape(R, Bq, H, D).astype(q.dtype)


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
    s = jnp.einsum("RKGD,RPKSD->RKGPS", qg, _wide(k), preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    p = _masked_softmax(s, visible[:, None, None])  # visible as [R, 1, 1, P, S]
    out = jnp.einsum("RKGPS,RPKSD->RKGD", *_pv(p, v), preferred_element_type=jnp.float32)
    return out.reshape(R, 1, H, D).astype(q.dtype)


# Page-major decode reads every pool page once, whatever the batch; the gather path reads and copies R * P pages
# (entries past a row's length read page 0, the sink, but are copied all the same), the chunked path R pages per
# column up to the longest row. The threshold was set against the gather path at full tables (R * P = R * the
# longest row), from whole decode steps on a 2-core Zen-3 host (bench/notes.md, "Decode attention for batch
# decode"): page-major was 11-22 % faster at R * P ~= N (the pool just holds the batch) and 30 % faster at
# R * P = 1.4 N (B=64, width 32, 1450-page pool, 35 % of it in use); at R * P = 0.71 N it was even (ctx 512) or
# 17 % slower (ctx 128, 18 % of the pool in use). `paged_attention` applies it to R x the longest row's pages
# (on the device); `page_major_pays` is the static gate (a full table could reach it).
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
    s_pg = jnp.einsum("NKGD,NKSD->NKGS", q_pg, _wide(k_pages), preferred_element_type=jnp.float32)
    s_in = jnp.where(inner[:, :, None, None, None], s_pg[page_table], _MASK_VALUE)  # [R, P, KV, G, S]
    epages = jnp.take_along_axis(page_table, ecol, axis=1)  # [R, E]
    evis = jnp.take_along_axis(visible, ecol[:, :, None], axis=1) & evalid[:, :, None]  # [R, E, S]
    s_e = jnp.einsum("RKGD,REKSD->REKGS", qg.reshape(R, KV, G, D), _wide(k_pages[epages]),
                     preferred_element_type=jnp.float32)  # [R, E, KV, G, S]
    s_e = jnp.where(evis[:, :, None, None, :], s_e, _MASK_VALUE)
    s = jnp.concatenate([s_in, s_e], axis=1) * sm_scale  # [R, P + E, KV, G, S]
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    live = jnp.concatenate([jnp.broadcast_to(inner[:, :, None], (R, P, S)), evis], axis=1)[:, :, None, None, :]
    p = _masked_softmax(s, live, axes=(1, 4))  # [R, P + E, KV, G, S]
    p_in, p_e = p[:, :P], p[:, P:]
    p_pg = jnp.concatenate([p_in, jnp.zeros((1,) + p_in.shape[1:], p.dtype)])[owner, col]  # [N, KV, G, S]
    o_pg = jnp.einsum("NKGS,NKSD->NKGD", *_pv(p_pg, v_pages), preferred_element_type=jnp.float32)
    out = jnp.sum(jnp.where(inner[:, :, None, None, None], o_pg[page_table], 0), axis=1)  # [R, KV, G, D]
    v_e = jnp.where(evis[:, :, None, :, None], v_pages[epages], 0)  # [R, E, KV, S, D]
    out += jnp.einsum("REKGS,REKSD->RKGD", *_pv(p_e, v_e), preferred_element_type=jnp.float32)
    return out.reshape(R, 1, H, D).astype(q.dtype)


class AttentionFn(NamedTuple):
    """The attention backend a model calls; `fn` has `paged_attention`'s signature."""

    name: str
    fn: callable


ATTENTION_MATH = ("float32", "bfloat16")


def check_kv_format(backend: str, kv_format: str) -> None:
    """Refuses a float8 pool (`kv_format`, its pages uint8 codes) on an attention backend that cannot read it: the
    Pallas kernels take float32 or bfloat16 pages. The runner calls it at start-up, before anything compiles; the
    Pallas backends' functions call it when traced."""
    if kv_format and backend.startswith("pallas"):
        raise ValueError(f"kv_dtype {kv_format}: a float8 KV pool runs on the CPU (the native kernel or jnp "
                         f"attention); the {backend} kernel takes float32 or bfloat16 pages")


def get_attention_backend(name: str = "auto", math: str = "float32") -> AttentionFn:
    """`auto` picks the Pallas kernel for the platform (TPU/GPU), and on CPU the native kernel
    (pallas_kernels/cpu_attention.py) when it builds here, else the jnp path. `cpu_native` asks for the native
    kernel and fails, naming the cause, when it cannot be built; float32 operands take it, others the jnp path.
    `math="bfloat16"`: the native kernel's prefill-chunk dot products (and those over pages several decode rows
    share) in bfloat16 pairs where the CPU has them
    (`cpu_attention.bf16_math_available`); the other backends are unchanged by it."""
    if math not in ATTENTION_MATH:
        raise ValueError(f"attention math {math!r} is unknown; expected one of {ATTENTION_MATH}")
    if name == "auto":
        platform = jax.default_backend()
        name = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(platform, "cpu")
        if name == "cpu":
            from pallas_kernels import cpu_attention

            name = "cpu_native" if cpu_attention.available() else "jnp"
    if name == "jnp":
        return AttentionFn("jnp", paged_attention)
    if name == "cpu_native":
        from pallas_kernels import cpu_attention

        if not cpu_attention.available():
            raise ValueError(f"attention_backend 'cpu_native': the kernel did not build ({cpu_attention.why_not()})")

        def native(q, k_pages, v_pages, *args, kv_format: str = "", **kw):
            if cpu_attention.supports(q, k_pages, kv_format) and v_pages.dtype == k_pages.dtype:
                return cpu_attention.paged_attention(q, k_pages, v_pages, *args, bf16_math=math == "bfloat16",
                                                     kv_format=kv_format, **kw)
            return paged_attention(q, k_pages, v_pages, *args, kv_format=kv_format, **kw)

        return AttentionFn("cpu_native", native)
    if name in ("pallas_tpu", "pallas_gpu", "pallas_tpu_interpret", "pallas_gpu_interpret"):
        from pallas_kernels import ragged_paged_attention as rpa

        backend = name.replace("_interpret", "")
        interpret = name.endswith("_interpret")

        def fn(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale, sliding_window=None,
               soft_cap=None, kv_format=""):
            check_kv_format(name, kv_format)
            return rpa.ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions,
                                              sm_scale=sm_scale, sliding_window=sliding_window,
                                              soft_cap=soft_cap, backend=backend, interpret=interpret)

        return AttentionFn(name, fn)
    raise ValueError(f"attention_backend {name!r} is unknown; expected auto, jnp, cpu_native, pallas_tpu or pallas_gpu "
                     "(optionally with _interpret)")
