"""Microbenchmark: one layer's paged gather + attention for a decode batch, KV pool layout variants.

Same math as `sgl_jax.models.attention.paged_attention` (used as-is for the head-major layout, `hm`),
on SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head dim 64), default batch 32 x context
512, page size 16, each row's pages scattered over the pool. Each jitted call runs `--layers` layers
(default 30, as the model), each with its own pool, so the KV comes from memory, not from the 32 MB L3;
each layer's query and page reads depend on the previous layer's output, as in the model (where the
reads follow the layer's KV write), so the layers run one after another: independent layers ran
concurrently and contended (2-3x slower per layer), and with 4 layers per call the per-call overhead
still showed; with 30 chained layers `hm` matches the model's own attention time (step time minus the
step with the attention removed, bench/exp_decode.py). Printed per layer: the median over rounds of
each round's median, the fastest call (on a shared machine the figure least disturbed by neighbours),
and K+V bytes / fastest call.

Variants (all checked against `hm` on the same data before timing; max|diff| column):
  hm          head-major pages [N, KV, S, D]: sgl_jax's paged_block_attention (the current layout; the model's
              attention for every row before the decode path was adopted)
  pages_dec   hm without its Q axis: scores [R, KV, G, P, S] on the gathered blocks as they come (no transpose)
  sgl_dec     sgl_jax's paged_decode_attention (the gather decode path the model uses for Bq == 1 rows)
  sgl_page_major  sgl_jax's paged_decode_page_major (guarded; what the model uses when page_major_pays)
  tm          token-major pages [N, S, KV, D]: the same code with the layout's einsum subscripts
  kt          K pages D-major [N, KV, D, S], V pages head-major [N, KV, S, D]; general (Bq) form
  flat        head-major pages gathered as rows of the [N*KV, S, D] view with the page table expanded
              to page*KV + head: [R, KV, C, D] straight from the gather, no transpose after it
  hm_nowhere  hm without zeroing V past kv_len (pool assumed finite; masking of p only)
  flat_nowhere  flat without the V mask
  hm_dec, tm_dec, kt_dec, flat_dec(_nowhere)   specialised to one query per row (decode): no Bq axis,
              scores [R, KV, G, P*S], one-axis softmax
  chunkN_dec  hm_dec over N groups of pages with an online softmax (N = 2, 4, 8)
  qcast_dec   hm_dec with q cast to the pool dtype (with --kv-dtype bfloat16: bf16 x bf16 -> f32 dots)
  page_major_dec  no K/V gather: QK and PV batched over the pool's pages in place, each page against
              its owner row's query; reads the whole pool (see page_major_decode for the limits)
  page_major_noguard  the same without the pass that zeroes non-finite V (needs a pool kept finite)
  hm_nogather lower bound: each row's KV already contiguous [R, KV, C, D] (no page gather at all)
  gather_only hm's page gathers of K and V alone, each summed over pages and slots (XLA fuses the sum
              into the gather: the cost of reading the pages through a gather, not of writing a copy)

    python bench/bench_attention_layout.py [--batch 32] [--ctx 512] [--page-size 16] [--layers 30]
        [--pool-pages N] [--dtype float32] [--kv-dtype bfloat16] [--variants hm,tm,...] [--rounds 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sgl_jax.models.attention import (  # noqa: E402
    _MASK_VALUE,
    paged_block_attention as paged_attention,
    paged_decode_attention,
    paged_decode_page_major,
)

H, KV, D = 9, 3, 64


# ----------------------------------------------------------------------------- layout variants
def paged_attention_tm(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float):
    """paged_attention for token-major pages [N, S, KV, D]; identical math otherwise."""
    R, Bq, H_, D_ = q.shape
    _, S, KV_, _ = k_pages.shape
    P = page_table.shape[1]
    qg = q.reshape(R, Bq, KV_, H_ // KV_, D_)
    kpos = jnp.arange(P)[:, None] * S + jnp.arange(S)[None, :]  # [P, S]
    k = k_pages[page_table]  # [R, P, S, KV, D]
    in_seq = kpos[None] < kv_lens[:, None, None]  # [R, P, S]
    v = jnp.where(in_seq[:, :, :, None, None], v_pages[page_table], 0)
    s = jnp.einsum("RQKGD,RPSKD->RKGQPS", qg, k, preferred_element_type=jnp.float32) * sm_scale
    qpos = q_positions[:, :, None, None]
    visible = (kpos[None, None] <= qpos) & (kpos[None, None] < kv_lens[:, None, None, None])
    visible = visible[:, None, None]
    s = jnp.where(visible, s, _MASK_VALUE)
    m = jnp.max(s, axis=(-2, -1), keepdims=True)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=(-2, -1), keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("RKGQPS,RPSKD->RQKGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(R, Bq, H_, D_).astype(q.dtype)


def paged_attention_hm_nowhere(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float):
    """hm without the jnp.where on the gathered V (valid only if the pool never holds inf/NaN)."""
    R, Bq, H_, D_ = q.shape
    _, KV_, S, _ = k_pages.shape
    P = page_table.shape[1]
    qg = q.reshape(R, Bq, KV_, H_ // KV_, D_)
    kpos = jnp.arange(P)[:, None] * S + jnp.arange(S)[None, :]
    k, v = k_pages[page_table], v_pages[page_table]  # [R, P, KV, S, D]
    s = jnp.einsum("RQKGD,RPKSD->RKGQPS", qg, k, preferred_element_type=jnp.float32) * sm_scale
    qpos = q_positions[:, :, None, None]
    visible = ((kpos[None, None] <= qpos) & (kpos[None, None] < kv_lens[:, None, None, None]))[:, None, None]
    s = jnp.where(visible, s, _MASK_VALUE)
    m = jnp.max(s, axis=(-2, -1), keepdims=True)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=(-2, -1), keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("RKGQPS,RPKSD->RQKGD", p, v, preferred_element_type=jnp.float32)
    return out.reshape(R, Bq, H_, D_).astype(q.dtype)


def _decode_softmax_pv(s, visible, v, vsub):
    s = jnp.where(visible, s, _MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    return jnp.einsum(vsub, p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def paged_decode_hm(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float):
    """Bq == 1 only: scores [R, KV, G, P*S]; head-major pages."""
    R, _, H_, D_ = q.shape
    _, KV_, S, _ = k_pages.shape
    P = page_table.shape[1]
    qg = q.reshape(R, KV_, H_ // KV_, D_)
    kpos = jnp.arange(P * S)
    k = k_pages[page_table].transpose(0, 2, 1, 3, 4).reshape(R, KV_, P * S, D_)  # [R, KV, C, D]
    v = v_pages[page_table].transpose(0, 2, 1, 3, 4).reshape(R, KV_, P * S, D_)
    visible = ((kpos[None] <= q_positions[:, :1]) & (kpos[None] < kv_lens[:, None]))[:, None, None]  # [R,1,1,C]
    v = jnp.where(visible[:, 0, 0, :, None][:, None], v, 0)
    s = jnp.einsum("RKGD,RKCD->RKGC", qg, k, preferred_element_type=jnp.float32) * sm_scale
    out = _decode_softmax_pv(s, visible, v, "RKGC,RKCD->RKGD")
    return out.reshape(R, 1, H_, D_).astype(q.dtype)


def paged_decode_pages(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float):
    """Bq == 1 only, on the gathered [R, P, KV, S, D] blocks as they come (no transpose to [R, KV, C, D]):
    scores [R, KV, G, P, S], softmax over (P, S). hm without its Q axis."""
    R, _, H_, D_ = q.shape
    _, KV_, S, _ = k_pages.shape
    P = page_table.shape[1]
    qg = q.reshape(R, KV_, H_ // KV_, D_)
    kpos = jnp.arange(P)[:, None] * S + jnp.arange(S)[None, :]  # [P, S]
    visible = (kpos[None] <= q_positions[:, :1, None]) & (kpos[None] < kv_lens[:, None, None])  # [R, P, S]
    k = k_pages[page_table]  # [R, P, KV, S, D]
    v = jnp.where(visible[:, :, None, :, None], v_pages[page_table], 0)
    s = jnp.einsum("RKGD,RPKSD->RKGPS", qg, k, preferred_element_type=jnp.float32) * sm_scale
    vis = visible[:, None, None]  # [R, 1, 1, P, S]
    s = jnp.where(vis, s, _MASK_VALUE)
    m = jnp.max(s, axis=(-2, -1), keepdims=True)
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=(-2, -1), keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("RKGPS,RPKSD->RKGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(R, 1, H_, D_).astype(q.dtype)


def paged_decode_tm(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float):
    """Bq == 1 only: scores [R, KV, G, P*S]; token-major pages."""
    R, _, H_, D_ = q.shape
    _, S, KV_, _ = k_pages.shape
    P = page_table.shape[1]
    qg = q.reshape(R, KV_, H_ // KV_, D_)
    kpos = jnp.arange(P * S)
    k = k_pages[page_table].reshape(R, P * S, KV_, D_)  # [R, C, KV, D]
    v = v_pages[page_table].reshape(R, P * S, KV_, D_)
    visible = ((kpos[None] <= q_positions[:, :1]) & (kpos[None] < kv_lens[:, None]))  # [R, C]
    v = jnp.where(visible[:, :, None, None], v, 0)
    s = jnp.einsum("RKGD,RCKD->RKGC", qg, k, preferred_element_type=jnp.float32) * sm_scale
    out = _decode_softmax_pv(s, visible[:, None, None], v, "RKGC,RCKD->RKGD")
    return out.reshape(R, 1, H_, D_).astype(q.dtype)


def paged_attention_kt(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float):
    """paged_attention with K pages stored D-major [N, KV, D, S] (V stays [N, KV, S, D])."""
    R, Bq, H_, D_ = q.shape
    _, KV_, _, S = k_pages.shape
    P = page_table.shape[1]
    qg = q.reshape(R, Bq, KV_, H_ // KV_, D_)
    kpos = jnp.arange(P)[:, None] * S + jnp.arange(S)[None, :]  # [P, S]
    k = k_pages[page_table]  # [R, P, KV, D, S]
    in_seq = kpos[None] < kv_lens[:, None, None]  # [R, P, S]
    v = jnp.where(in_seq[:, :, None, :, None], v_pages[page_table], 0)  # [R, P, KV, S, D]
    s = jnp.einsum("RQKGD,RPKDS->RKGQPS", qg, k, preferred_element_type=jnp.float32) * sm_scale
    qpos = q_positions[:, :, None, None]
    visible = ((kpos[None, None] <= qpos) & (kpos[None, None] < kv_lens[:, None, None, None]))[:, None, None]
    s = jnp.where(visible, s, _MASK_VALUE)
    m = jnp.max(s, axis=(-2, -1), keepdims=True)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=(-2, -1), keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("RKGQPS,RPKSD->RQKGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(R, Bq, H_, D_).astype(q.dtype)


def paged_decode_kt(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float):
    """Bq == 1 only, K pages D-major [N, KV, D, S], V pages [N, KV, S, D]: both dots get their
    right-hand side in the plain [contracted, free] layout, which XLA:CPU's (YNNPACK) dot runs fastest."""
    R, _, H_, D_ = q.shape
    _, KV_, _, S = k_pages.shape
    P = page_table.shape[1]
    qg = q.reshape(R, KV_, H_ // KV_, D_)
    kpos = jnp.arange(P * S)
    k = k_pages[page_table].transpose(0, 2, 3, 1, 4).reshape(R, KV_, D_, P * S)  # [R, KV, D, C]
    v = v_pages[page_table].transpose(0, 2, 1, 3, 4).reshape(R, KV_, P * S, D_)  # [R, KV, C, D]
    visible = ((kpos[None] <= q_positions[:, :1]) & (kpos[None] < kv_lens[:, None]))[:, None, None]  # [R,1,1,C]
    v = jnp.where(visible[:, 0, 0, :, None][:, None], v, 0)
    s = jnp.einsum("RKGD,RKDC->RKGC", qg, k, preferred_element_type=jnp.float32) * sm_scale
    out = _decode_softmax_pv(s, visible, v, "RKGC,RKCD->RKGD")
    return out.reshape(R, 1, H_, D_).astype(q.dtype)


def _flat_gather(pages, page_table):
    """[N, KV, S, D] pages -> [R, KV, P*S, D] by gathering (page, head) rows of the [N*KV, S, D] view.

    Indexing the pool as x[page_table] yields [R, P, KV, S, D], whose KV axis must then be moved in
    front of P for the dots; XLA:CPU fuses that transpose into the gather as an element-wise loop that
    runs several times slower than the plain row gather. Expanding the page table to
    (page * KV + head) indices instead gives [R, KV, P, S, D] straight from the gather: no transpose."""
    N, KV_, S, D_ = pages.shape
    R, P = page_table.shape
    idx = page_table[:, None, :] * KV_ + jnp.arange(KV_, dtype=page_table.dtype)[None, :, None]  # [R, KV, P]
    return pages.reshape(N * KV_, S, D_)[idx].reshape(R, KV_, P * S, D_)


def paged_attention_flat(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                         mask_v: bool = True):
    """paged_attention (head-major pages, any Bq) with `_flat_gather`: scores [R, KV, G, Bq, C]."""
    R, Bq, H_, D_ = q.shape
    _, KV_, S, _ = k_pages.shape
    P = page_table.shape[1]
    C = P * S
    qg = q.reshape(R, Bq, KV_, H_ // KV_, D_)
    kpos = jnp.arange(C)
    k = _flat_gather(k_pages, page_table)  # [R, KV, C, D]
    v = _flat_gather(v_pages, page_table)
    if mask_v:
        v = jnp.where((kpos[None] < kv_lens[:, None])[:, None, :, None], v, 0)
    s = jnp.einsum("RQKGD,RKCD->RKGQC", qg, k, preferred_element_type=jnp.float32) * sm_scale
    qpos = q_positions[:, :, None]  # [R, Bq, 1]
    visible = ((kpos[None, None] <= qpos) & (kpos[None, None] < kv_lens[:, None, None]))[:, None, None]
    s = jnp.where(visible, s, _MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("RKGQC,RKCD->RQKGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(R, Bq, H_, D_).astype(q.dtype)


def paged_decode_flat(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                      mask_v: bool = True):
    """Bq == 1 only, `_flat_gather`: scores [R, KV, G, C]."""
    R, _, H_, D_ = q.shape
    _, KV_, S, _ = k_pages.shape
    C = page_table.shape[1] * S
    qg = q.reshape(R, KV_, H_ // KV_, D_)
    kpos = jnp.arange(C)
    k = _flat_gather(k_pages, page_table)  # [R, KV, C, D]
    v = _flat_gather(v_pages, page_table)
    visible = ((kpos[None] <= q_positions[:, :1]) & (kpos[None] < kv_lens[:, None]))[:, None, None]  # [R,1,1,C]
    if mask_v:
        v = jnp.where(visible[:, 0, 0, :, None][:, None], v, 0)
    s = jnp.einsum("RKGD,RKCD->RKGC", qg, k, preferred_element_type=jnp.float32) * sm_scale
    out = _decode_softmax_pv(s, visible, v, "RKGC,RKCD->RKGD")
    return out.reshape(R, 1, H_, D_).astype(q.dtype)


def paged_decode_chunked(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                         chunks: int = 4):
    """hm_dec split into `chunks` groups of pages with an online softmax (flash-decoding style): each
    group's gathered K/V is small enough to stay in cache between the gather and its two dots."""
    R, _, H_, D_ = q.shape
    _, KV_, S, _ = k_pages.shape
    P = page_table.shape[1]
    G = H_ // KV_
    qg = q.reshape(R, KV_, G, D_)
    m = jnp.full((R, KV_, G, 1), _MASK_VALUE, jnp.float32)
    l = jnp.zeros((R, KV_, G, 1), jnp.float32)
    acc = jnp.zeros((R, KV_, G, D_), jnp.float32)
    bounds = [round(i * P / chunks) for i in range(chunks + 1)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        pt = page_table[:, a:b]
        C = (b - a) * S
        kpos = a * S + jnp.arange(C)
        k = k_pages[pt].transpose(0, 2, 1, 3, 4).reshape(R, KV_, C, D_)
        v = v_pages[pt].transpose(0, 2, 1, 3, 4).reshape(R, KV_, C, D_)
        visible = ((kpos[None] <= q_positions[:, :1]) & (kpos[None] < kv_lens[:, None]))[:, None, None]
        v = jnp.where(visible[:, 0, 0, :, None][:, None], v, 0)
        s = jnp.einsum("RKGD,RKCD->RKGC", qg, k, preferred_element_type=jnp.float32) * sm_scale
        s = jnp.where(visible, s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1, keepdims=True)
        acc = acc * corr + jnp.einsum("RKGC,RKCD->RKGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m = m_new
    out = acc / jnp.where(l == 0.0, 1.0, l)
    return out.reshape(R, 1, H_, D_).astype(q.dtype)


def paged_decode_qcast(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float):
    """hm_dec with q cast to the pool's dtype first, so that a bf16 pool feeds bf16 x bf16 -> f32 dots
    (XLA:CPU/YNNPACK has native bf16 dots on this CPU) instead of upcasting the gathered K to f32."""
    out = paged_decode_hm(q.astype(k_pages.dtype), k_pages, v_pages, page_table, kv_lens, q_positions,
                          sm_scale=sm_scale)
    return out.astype(q.dtype)


def page_major_decode(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                      guard: bool = True):
    """Decode attention without gathering K/V: every pool page is scored against the query of the row
    that owns it (QK and PV as dots batched over the pool's pages, reading K and V in place), and only
    the small score / partial-output arrays are gathered per row. Reads the WHOLE pool, so it only pays
    when the batch's pages fill most of the pool; assumes each page has at most one owner row in the
    batch (no prefix pages shared between rows), which this benchmark's page tables satisfy."""
    R, _, H_, D_ = q.shape
    N, KV_, S, _ = k_pages.shape
    P = page_table.shape[1]
    G = H_ // KV_
    qg = q.reshape(R, KV_, G, D_)
    # owner row and page index of every pool page (-> row R: a zero query; the scores are masked anyway)
    rows = jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32)[:, None], (R, P))
    slots = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None, :], (R, P))
    in_use = (slots * S) < kv_lens[:, None]  # pages a row really uses (table padding points at page 0)
    owner = jnp.full((N,), R, jnp.int32).at[jnp.where(in_use, page_table, N)].set(rows, mode="drop")
    pidx = jnp.zeros((N,), jnp.int32).at[jnp.where(in_use, page_table, N)].set(slots, mode="drop")
    # q of each page's owner as a one-hot matmul rather than a gather: XLA:CPU fuses q's producers (RoPE,
    # with its sin/cos) into a gather and recomputes them for every pool page (5 ms per layer measured
    # in the model; jax.lax.optimization_barrier does not stop it: XLA:CPU removes barriers early).
    onehot = (owner[:, None] == jnp.arange(R, dtype=jnp.int32)[None, :]).astype(q.dtype)  # [N, R]
    q_pg = jnp.einsum("NR,RX->NX", onehot, qg.reshape(R, KV_ * G * D_)).reshape(N, KV_, G, D_)
    s_pg = jnp.einsum("NKGD,NKSD->NKGS", q_pg, k_pages, preferred_element_type=jnp.float32) * sm_scale
    s = s_pg[page_table]  # [R, P, KV, G, S]
    kpos = jnp.arange(P)[:, None] * S + jnp.arange(S)[None, :]  # [P, S]
    visible = ((kpos[None] <= q_positions[:, :1, None]) & (kpos[None] < kv_lens[:, None, None])
               & in_use[:, :, None])[:, :, None, None, :]  # [R, P, 1, 1, S]
    s = jnp.where(visible, s, _MASK_VALUE)
    m = jnp.max(s, axis=(1, 4), keepdims=True)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=(1, 4), keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)  # [R, P, KV, G, S]
    p_ext = jnp.concatenate([p, jnp.zeros((1,) + p.shape[1:], p.dtype)])  # row R: zeros
    p_pg = p_ext[owner, pidx]  # [N, KV, G, S]
    # A stale non-finite V slot must not meet p == 0 (0 * inf = NaN). The guard is a pass over the whole
    # V pool (XLA does not fuse it into the dot); guard=False assumes the pool only ever holds finite
    # values (zero-initialised, written only with finite k/v), which would make it unnecessary.
    vv = jnp.where(jnp.isfinite(v_pages), v_pages, 0) if guard else v_pages
    o_pg = jnp.einsum("NKGS,NKSD->NKGD", p_pg.astype(v_pages.dtype), vv, preferred_element_type=jnp.float32)
    out = jnp.sum(o_pg[page_table] * in_use[:, :, None, None, None], axis=1)  # [R, KV, G, D]
    return out.reshape(R, 1, H_, D_).astype(q.dtype)


def dense_decode(q, k, v, kv_lens, q_positions, *, sm_scale: float):
    """No gather: k, v [R, KV, C, D] already per row (the bound a gather-free layout could reach)."""
    R, _, H_, D_ = q.shape
    KV_, C = k.shape[1], k.shape[2]
    qg = q.reshape(R, KV_, H_ // KV_, D_)
    kpos = jnp.arange(C)
    visible = ((kpos[None] <= q_positions[:, :1]) & (kpos[None] < kv_lens[:, None]))[:, None, None]
    s = jnp.einsum("RKGD,RKCD->RKGC", qg, k, preferred_element_type=jnp.float32) * sm_scale
    out = _decode_softmax_pv(s, visible, v, "RKGC,RKCD->RKGD")
    return out.reshape(R, 1, H_, D_).astype(q.dtype)


# ----------------------------------------------------------------------------------- harness
def _pools(layout: str, num_pages: int, S: int, layers: int, dtype, seed=0):
    shape = {"hm": (num_pages, KV, S, D), "tm": (num_pages, S, KV, D), "kt": (num_pages, KV, D, S)}[layout]
    vshape = shape if layout != "kt" else (num_pages, KV, S, D)
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * layers)
    return tuple((jax.random.normal(keys[2 * i], shape, dtype), jax.random.normal(keys[2 * i + 1], vshape, dtype))
                 for i in range(layers))


def _chain(layer, q, kvs, page_table=None):
    """Run the layers one after another as in the model: each layer's query is the previous layer's
    output plus q, and its page reads depend on that query too (in the model they follow the KV write of
    the layer's new tokens), so XLA cannot start a later layer's gathers early and run layers concurrently."""
    outs = []
    for k, v in kvs:
        dep = (q[0, 0, 0, 0] * 0).astype(jnp.int32)  # a real data dependency (x * 0 is not folded for floats)
        o = layer(q, k, v) if page_table is None else layer(q, k, v, page_table + dep)
        outs.append(o)
        q = q + o
    return outs


POOL_PAGES = None  # --pool-pages: pool size independent of the batch (default: exactly the batch's pages + 1)
CONTIGUOUS = False  # --page-order contiguous: row r owns pages 1 + r*P ... (as a fresh allocator hands out)


def build(variant: str, R: int, ctx: int, S: int, layers: int, dtype, kv_dtype=None):
    """(jitted fn, args) computing `layers` layers' attention for one decode batch."""
    P = -(-ctx // S)
    num_pages = max(1 + R * P, POOL_PAGES or 0)
    rng = np.random.default_rng(0)
    # Each row owns P pages, shuffled over the pool (a realistic fragmented allocation).
    order = np.arange(1, num_pages) if CONTIGUOUS else rng.permutation(np.arange(1, num_pages))
    perm = order[:R * P].reshape(R, P).astype(np.int32)
    page_table = jnp.asarray(perm)
    kv_lens = jnp.full((R,), ctx, jnp.int32)
    qpos = jnp.full((R, 1), ctx - 1, jnp.int32)
    q = jax.random.normal(jax.random.PRNGKey(1), (R, 1, H, D), dtype)
    sm = D ** -0.5
    if variant == "hm_nogather":
        kvs = tuple((jax.random.normal(jax.random.PRNGKey(2 + 2 * i), (R, KV, P * S, D), dtype),
                     jax.random.normal(jax.random.PRNGKey(3 + 2 * i), (R, KV, P * S, D), dtype))
                    for i in range(layers))

        def f(q, kvs, page_table, kv_lens, qpos):
            return _chain(lambda q, k, v, pt: dense_decode(q, k, v, kv_lens + pt[0, 0] * 0, qpos, sm_scale=sm),
                          q, kvs, page_table)
        return jax.jit(f), (q, kvs, page_table, kv_lens, qpos)
    layout = variant[:2] if variant[:2] in ("tm", "kt") else "hm"
    kvs = _pools(layout, num_pages, S, layers, kv_dtype or dtype)
    fn = {"hm": paged_attention, "tm": paged_attention_tm, "hm_nowhere": paged_attention_hm_nowhere,
          "hm_dec": paged_decode_hm, "tm_dec": paged_decode_tm,
          "kt": paged_attention_kt, "kt_dec": paged_decode_kt,
          "flat": paged_attention_flat, "flat_dec": paged_decode_flat,
          "flat_nowhere": functools.partial(paged_attention_flat, mask_v=False),
          "flat_dec_nowhere": functools.partial(paged_decode_flat, mask_v=False),
          "chunk2_dec": functools.partial(paged_decode_chunked, chunks=2),
          "chunk4_dec": functools.partial(paged_decode_chunked, chunks=4),
          "chunk8_dec": functools.partial(paged_decode_chunked, chunks=8),
          "qcast_dec": paged_decode_qcast, "page_major_dec": page_major_decode,
          "page_major_noguard": functools.partial(page_major_decode, guard=False),
          "sgl_dec": paged_decode_attention, "pages_dec": paged_decode_pages, "sgl_page_major": paged_decode_page_major}.get(variant)
    if variant == "gather_only":
        def f(q, kvs, page_table, kv_lens, qpos):  # the gathers alone (a cheap use keeps them alive)
            return _chain(lambda q, k, v, pt: jnp.tile((k[pt].sum(axis=(1, 3)) + v[pt].sum(axis=(1, 3)))
                                                       .reshape(R, 1, KV * D), (1, 1, H // KV)).reshape(q.shape)
                          .astype(q.dtype), q, kvs, page_table)
    else:
        def f(q, kvs, page_table, kv_lens, qpos):
            return _chain(lambda q, k, v, pt: fn(q, k, v, pt, kv_lens, qpos, sm_scale=sm), q, kvs, page_table)
    return jax.jit(f), (q, kvs, page_table, kv_lens, qpos)


def reference_outputs(R, ctx, S, layers, dtype, kv_dtype=None):
    """hm's outputs and inputs, for the equivalence check."""
    f, args = build("hm", R, ctx, S, layers, dtype, kv_dtype)
    return f(*args), args


def time_fn(f, args, reps: int) -> tuple[float, float, float]:
    out = f(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts)


def check(variant, f, ref_out, ref_args):
    """max |output - hm's output| of the variant's jitted f on hm's data (token-major / D-major pools are
    hm's pools transposed); same shapes as its own inputs, so no recompilation."""
    if variant in ("gather_only", "hm_nogather"):
        return None
    q, kvs, pt, lens, qpos = ref_args
    if variant.startswith("tm"):
        kvs = tuple((k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) for k, v in kvs)
    if variant.startswith("kt"):
        kvs = tuple((k.transpose(0, 1, 3, 2), v) for k, v in kvs)
    out = f(q, kvs, pt, lens, qpos)
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in zip(out, ref_out))


VARIANTS = ["hm", "tm", "kt", "flat", "hm_nowhere", "hm_dec", "tm_dec", "kt_dec", "flat_dec", "chunk4_dec",
            "page_major_dec", "page_major_noguard", "hm_nogather"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=30, help="layers (separate pools) per jitted call")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--pool-pages", type=int, help="KV pool pages (default: the batch's pages + the sink)")
    ap.add_argument("--page-order", choices=["shuffled", "contiguous"], default="shuffled",
                    help="rows' pages scattered over the pool (a long-running server) or consecutive (a fresh one)")
    ap.add_argument("--kv-dtype", choices=["float32", "bfloat16"], help="pool dtype (default: --dtype)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the variants (noise)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    global POOL_PAGES, CONTIGUOUS
    POOL_PAGES = args.pool_pages
    CONTIGUOUS = args.page_order == "contiguous"
    dtype = jnp.dtype(args.dtype)
    kv_dtype = jnp.dtype(args.kv_dtype or args.dtype)
    R, C, S, L = args.batch, args.ctx, args.page_size, args.layers
    variants = args.variants.split(",")
    kv_mb = R * C * KV * D * kv_dtype.itemsize * 2 / 1e6
    print(f"decode attention, batch {R} x context {C}, page size {S}, pool {max(1 + R * -(-C // S), args.pool_pages or 0)} pages ({args.page_order}), {args.dtype} (KV {kv_dtype.name}), {L} layers per call; "
          f"K+V read per layer {kv_mb:.1f} MB")
    ref_out, ref_args = reference_outputs(R, C, S, L, dtype, kv_dtype)
    built = {}
    for v in variants:
        t0 = time.perf_counter()
        f, a = build(v, R, C, S, L, dtype, kv_dtype)
        jax.block_until_ready(f(*a))
        compile_s = time.perf_counter() - t0
        err = check(v, f, ref_out, ref_args) if v != "hm" else 0.0
        built[v] = (f, a, err, compile_s)
    times = {v: [] for v in variants}
    samples = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleave so that machine noise hits every variant alike
        for v in variants:
            f, a, _, _ = built[v]
            med, mn, _ = time_fn(f, a, args.reps)
            times[v].append(med / L)
            samples[v].append(mn / L)
    res = {}
    print(f"{'variant':<16} {'median':>7} {'min':>7} {'(median per round)':>22} {'GB/s':>6} {'max|diff|':>9}  (ms per layer)")
    for v in variants:
        ms = [1e3 * t for t in times[v]]
        med = statistics.median(ms)
        mn = 1e3 * min(samples[v])
        err = built[v][2]
        res[v] = {"ms_per_layer_median": med, "ms_per_layer_min": mn, "rounds_ms": ms, "max_abs_diff_vs_hm": err,
                  "compile_s": built[v][3]}
        print(f"{v:<16} {med:7.2f} {mn:7.2f} {' / '.join(f'{m:.2f}' for m in ms):>22} {kv_mb / mn:6.1f} "
              f"{'' if err is None else f'{err:.1e}':>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": R, "ctx": C, "page_size": S, "dtype": args.dtype, "results": res}, f, indent=1)
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
