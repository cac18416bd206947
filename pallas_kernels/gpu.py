"""Ragged paged attention -- Pallas on Triton (GPU).

Grid: (R rows, KV kv-heads).  Program (r, h):

* loads the row's ``Bq x G`` query heads that share kv head ``h`` as ONE ``[M, D]`` tile
  (M = Bq*G padded to a power of two >= 16 -- Triton needs power-of-2 tensor sizes and
  ``tl.dot`` needs M >= 16), plus the tile rows' positions;
* reads the per-row page range ``[page_lo, page_hi)`` and KV end (scalar loads);
* runs ``lax.fori_loop`` (-> ``scf.for``, pipelined by Triton's ``num_stages``) over blocks of
  ``block_kv_pages`` pages (T = bp*S key tokens).  Per block it gathers each key token's page id
  from ``page_table`` and loads K and V as ``[T, D]`` tiles straight from the pool with one pointer
  per element (integer-array indexing) and a load mask: slots at or past the KV end are not read
  and come back as 0.  Then one online-softmax update with running max / denominator /
  accumulator in float32 (QK^T and PV on tensor cores via ``tl.dot``, f32 accumulation; f32
  inputs use IEEE precision).

Pages outside the range are never touched, so garbage (even NaN) in pages a row does not own
cannot leak into its output.  A tile row with no valid key ends with denominator 0 and writes
exactly 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import prepare_rows, unprepare_output

# KV pages per inner-loop step, keyed by (head_dim, page_size): aim for 64-128 key tokens per
# step (the N dim of the QK^T tile); D=256 uses smaller blocks to bound register pressure.
GPU_BLOCK_KV_PAGES: dict[tuple[int, int], int] = {
    (64, 16): 8, (64, 32): 4, (64, 64): 2, (64, 128): 1, (64, 256): 1,
    (128, 16): 8, (128, 32): 4, (128, 64): 2, (128, 128): 1, (128, 256): 1,
    (256, 16): 4, (256, 32): 2, (256, 64): 1, (256, 128): 1, (256, 256): 1,
}

_MIN_DOT_M = 16  # tl.dot needs M, N, K >= 16


def gpu_block_kv_pages(head_dim: int, page_size: int) -> int:
    return GPU_BLOCK_KV_PAGES.get((head_dim, page_size), max(1, 128 // page_size))


def _gpu_kernel(
    # inputs
    pt_ref,  # [R, P_pad] int32 (whole array, scalar/vector loads)
    lo_ref, hi_ref, end_ref,  # [R] int32
    q_ref,  # [M, D]
    pos_ref,  # [M] int32
    k_ref, v_ref,  # [N, KV, S, D] (whole pool)
    # output
    o_ref,  # [M, D]
    *,
    bp: int,
    page_size: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    S = page_size
    T = bp * S
    r = pl.program_id(0)
    h = pl.program_id(1)
    lo = lo_ref[r]
    hi = hi_ref[r]
    kv_end = end_ref[r]
    q = q_ref[...]
    pos = pos_ref[...]
    M, D = q.shape
    nblk = (hi - lo + bp - 1) // bp

    def body(b, carry):
        m_prev, l_prev, acc = carry
        p0 = lo + b * bp  # first page index of this block
        # Token-level gather (all-integer-array indexing: one pointer per element in Triton).
        t_idx = lax.broadcasted_iota(jnp.int32, (T, 1), 0)
        tok = p0 * S + t_idx  # [T, 1] absolute key positions of this block
        pages = pt_ref[r, p0 + t_idx // S]  # [T, 1] page id of each key token
        slots = t_idx % S
        d_idx = lax.broadcasted_iota(jnp.int32, (1, D), 1)
        ld_mask = jnp.broadcast_to(tok < kv_end, (T, D))
        kv_idx = (pages, h, slots, d_idx)
        k = pltriton.load(k_ref.at[kv_idx], mask=ld_mask, other=0)  # [T, D]
        v = pltriton.load(v_ref.at[kv_idx], mask=ld_mask, other=0)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale  # [M, T]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        j = p0 * S + lax.broadcasted_iota(jnp.int32, (1, T), 1)  # same positions, as a row
        t = pos.reshape(M, 1)
        mask = (j < kv_end) & (j <= t)
        if sliding_window is not None:
            mask = mask & (j > t - sliding_window)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all-masked so far: avoid inf - inf
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return m_new, l_new, acc * alpha[:, None] + pv

    init = (jnp.full((M,), -jnp.inf, jnp.float32), jnp.zeros((M,), jnp.float32),
            jnp.zeros((M, D), jnp.float32))
    _, l, acc = lax.fori_loop(0, nblk, body, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)


def paged_attention_gpu(
    q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
    sliding_window: int | None = None, soft_cap: float | None = None, interpret: bool = False,
    block_kv_pages: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Triton paged attention; same contract as ``ragged_paged_attention`` (call that one)."""
    R, Bq, H, D = q.shape
    N, KV, S, _ = k_pages.shape
    bp = block_kv_pages or gpu_block_kv_pages(D, S)
    if bp & (bp - 1):
        raise ValueError(f"pallas_gpu block_kv_pages must be a power of 2; got {bp}")
    rows = prepare_rows(q, page_table, kv_lens, q_positions, num_kv_heads=KV, page_size=S,
                        sliding_window=sliding_window, m_multiple=1, m_pow2=True,
                        m_min=_MIN_DOT_M)
    m_pad = rows.q_tiles.shape[2]
    P = page_table.shape[1]
    # Pad the table so every block's [p0, p0 + bp) page-id load is in bounds (padding ids are
    # never dereferenced: their slots are beyond kv_end and masked off in the K/V loads).
    p_pad = -(-P // bp) * bp
    pt = jnp.pad(page_table, ((0, 0), (0, p_pad - P))) if p_pad != P else page_table

    kernel = lambda *refs: _gpu_kernel(*refs, bp=bp, page_size=S, sm_scale=float(sm_scale),
                                       sliding_window=sliding_window, soft_cap=soft_cap)
    full = lambda shape: pl.BlockSpec(shape, lambda r, h: (0,) * len(shape))
    out = pl.pallas_call(
        kernel,
        grid=(R, KV),
        in_specs=[
            full(pt.shape),
            full((R,)), full((R,)), full((R,)),
            pl.BlockSpec((None, None, m_pad, D), lambda r, h: (r, h, 0, 0)),
            pl.BlockSpec((None, m_pad), lambda r, h: (r, 0)),
            full(k_pages.shape),
            full(v_pages.shape),
        ],
        out_specs=pl.BlockSpec((None, None, m_pad, D), lambda r, h: (r, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((R, KV, m_pad, D), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps or (4 if D <= 128 else 8),
                                                num_stages=num_stages or 2),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(pt, rows.page_lo, rows.page_hi, rows.kv_end, rows.q_tiles, rows.pos, k_pages, v_pages)
    return unprepare_output(out, batch_q=Bq, num_heads=H, m=rows.m)
