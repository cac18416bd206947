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
    `paged_decode_attention`, the others `paged_block_attention`; both compute the same function.
    """
    fn = paged_decode_attention if q.shape[1] == 1 else paged_block_attention
    return fn(q, k_pages, v_pages, page_table, kv_lens, q_positions, sm_scale=sm_scale,
              sliding_window=sliding_window, soft_cap=soft_cap)


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
    visible = visible[:, None, None]  # [R, 1, 1, Bq, P, S]
    s = jnp.where(visible, s, _MASK_VALUE)
    m = jnp.max(s, axis=(-2, -1), keepdims=True)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=(-2, -1), keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("RKGQPS,RPKSD->RQKGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(R, Bq, H, D).astype(q.dtype)


def paged_decode_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None):
    """`paged_attention` for rows of one query (Bq == 1): no query axis, scores [R, KV, G, C] over the
    row's C = P * S key slots, one-axis softmax. Measured 8-15 % faster than `paged_block_attention` on
    a whole batch-32 decode step (bench/notes.md, "Decode attention for batch decode").

    V is zeroed wherever the query sees no key (past kv_len, after the query, before the window): a
    stale non-finite slot must not meet a zero probability (0 * inf = NaN)."""
    R, Bq, H, D = q.shape
    assert Bq == 1, q.shape
    _, KV, S, _ = k_pages.shape
    C = page_table.shape[1] * S
    qg = q.reshape(R, KV, H // KV, D)
    k = k_pages[page_table].transpose(0, 2, 1, 3, 4).reshape(R, KV, C, D)  # [R, KV, C, D]
    v = v_pages[page_table].transpose(0, 2, 1, 3, 4).reshape(R, KV, C, D)  # [R, KV, C, D]
    kpos = jnp.arange(C)[None]  # [1, C]
    qpos = q_positions  # [R, 1]
    visible = (kpos <= qpos) & (kpos < kv_lens[:, None])  # [R, C]
    if sliding_window is not None:
        visible &= kpos > qpos - sliding_window
    v = jnp.where(visible[:, None, :, None], v, 0)
    s = jnp.einsum("RKGD,RKCD->RKGC", qg, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    vis = visible[:, None, None, :]  # [R, 1, 1, C]
    s = jnp.where(vis, s, _MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("RKGC,RKCD->RKGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
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
