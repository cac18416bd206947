"""Ragged paged attention -- Pallas on Mosaic (TPU).

Grid: (R rows, KV kv-heads), both "parallel" (programs share no state).

* Scalar prefetch (SMEM): the flattened page table ``[R*P]`` and the per-row ``page_lo``,
  ``page_hi`` and ``kv_end`` (computed once in jnp by ``prepare_rows``).
* VMEM blocks (auto-pipelined by Pallas): the row's ``[M, D]`` query tile (the Bq x G query
  heads sharing kv head h; M padded to a multiple of 16) and its ``[M, 1]`` positions; the
  ``[M, D]`` output tile.
* K/V pools stay in HBM (``memory_space=pl.ANY``: left where XLA put them).  The kernel walks
  the row's page range in blocks of ``bp`` pages: each page is one ``[S, D]`` DMA (``pltpu.make_async_copy``) into a
  double-buffered VMEM scratch ``[2, bp*S, D]``; the copies for block b+1 are started before
  block b is waited on and computed, so the DMA engine streams the next pages while the MXU
  works.  K and V each have one DMA semaphore per buffer slot.  Pages past ``page_hi`` are not
  copied (start and wait use the same predicate, so semaphores balance); their stale slots are
  masked out of both the scores and V.
* Online softmax in float32 (running max, denominator, accumulator carried through
  ``lax.fori_loop``); a tile row with no valid key writes exactly 0.

On CPU this kernel runs in the TPU interpret mode (``interpret=pltpu.InterpretParams()``), which
simulates HBM/VMEM/SMEM, executes the DMAs (by default only when waited on) and tracks the DMA
semaphores, and fills uninitialized scratch with NaN -- so a missing wait, an unbalanced
semaphore or a read of a never-copied slot shows up in the tests.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import prepare_rows, unprepare_output

# KV pages per DMA block, keyed by (head_dim, page_size): ~512 key tokens per block (256 for
# D=256).  VMEM use = 2 (K,V) x 2 (double buffer) x bp*S*D*itemsize, e.g. D=128, 512 tokens,
# bf16: 512 KiB -- well inside every generation's scoped VMEM.
TPU_BLOCK_KV_PAGES: dict[tuple[int, int], int] = {
    (64, 16): 32, (64, 32): 16, (64, 64): 8, (64, 128): 4, (64, 256): 2,
    (128, 16): 32, (128, 32): 16, (128, 64): 8, (128, 128): 4, (128, 256): 2,
    (256, 16): 16, (256, 32): 8, (256, 64): 4, (256, 128): 2, (256, 256): 1,
}

_M_MULTIPLE = 16  # sublane tiling for bf16 (covers f32's 8)


def tpu_block_kv_pages(head_dim: int, page_size: int) -> int:
    return TPU_BLOCK_KV_PAGES.get((head_dim, page_size), max(1, 512 // page_size))


def _tpu_kernel(
    # scalar prefetch (SMEM)
    pt_ref,  # [R*P] int32
    lo_ref, hi_ref, end_ref,  # [R] int32
    # inputs
    q_ref,  # [M, D] VMEM
    pos_ref,  # [M, 1] int32 VMEM
    k_hbm, v_hbm,  # [N, KV, S, D] HBM
    # output
    o_ref,  # [M, D] VMEM
    # scratch
    k_buf, v_buf,  # [2, bp*S, D] VMEM
    sems,  # DMA semaphores [2 (k/v), 2 (slot)]
    *,
    bp: int,
    page_size: int,
    pages_per_row: int,
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
    nblk = (hi - lo + bp - 1) // bp
    row_base = r * pages_per_row

    def page_copies(blk, slot):
        """(predicate, k_copy, v_copy) for each page of block `blk` into buffer `slot`."""
        out = []
        for i in range(bp):
            p = lo + blk * bp + i
            valid = p < hi
            page = pt_ref[row_base + jnp.minimum(p, pages_per_row - 1)]  # clamp: SMEM in bounds
            dst = pl.ds(i * S, S)
            kc = pltpu.make_async_copy(k_hbm.at[page, h], k_buf.at[slot, dst], sems.at[0, slot])
            vc = pltpu.make_async_copy(v_hbm.at[page, h], v_buf.at[slot, dst], sems.at[1, slot])
            out.append((valid, kc, vc))
        return out

    def start_block(blk, slot):
        for valid, kc, vc in page_copies(blk, slot):
            @pl.when(valid)
            def _():
                kc.start()
                vc.start()

    def wait_block(blk, slot):
        for valid, kc, vc in page_copies(blk, slot):
            @pl.when(valid)
            def _():
                kc.wait()
                vc.wait()

    @pl.when(nblk > 0)
    def _():
        start_block(0, 0)

    q = q_ref[...]
    t = pos_ref[...]  # [M, 1]
    M, D = q.shape

    def body(b, carry):
        m_prev, l_prev, acc = carry
        slot = b % 2

        @pl.when(b + 1 < nblk)
        def _():
            start_block(b + 1, 1 - slot)  # prefetch next block while this one is computed

        wait_block(b, slot)
        k = k_buf[slot]  # [T, D]
        v = v_buf[slot]
        base = (lo + b * bp) * S
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale  # [M, T]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        j = base + lax.broadcasted_iota(jnp.int32, (M, T), 1)
        mask = (j < kv_end) & (j <= t)
        if sliding_window is not None:
            mask = mask & (j > t - sliding_window)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [M, 1]
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)
        l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        # Slots past kv_end hold stale data from an earlier block or were never written (NaN in
        # interpret mode); zero them so 0 * garbage cannot reach the accumulator.
        jv = base + lax.broadcasted_iota(jnp.int32, (T, D), 0)
        v = jnp.where(jv < kv_end, v, jnp.zeros_like(v))
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return m_new, l_new, acc * alpha + pv

    init = (jnp.full((M, 1), -jnp.inf, jnp.float32), jnp.zeros((M, 1), jnp.float32),
            jnp.zeros((M, D), jnp.float32))
    _, l, acc = lax.fori_loop(0, nblk, body, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)


def paged_attention_tpu(
    q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
    sliding_window: int | None = None, soft_cap: float | None = None, interpret: Any = False,
    block_kv_pages: int | None = None,
):
    """Mosaic paged attention; same contract as ``ragged_paged_attention`` (call that one).

    interpret: False (real TPU), True (-> ``pltpu.InterpretParams()``) or an InterpretParams.
    """
    R, Bq, H, D = q.shape
    N, KV, S, _ = k_pages.shape
    P = page_table.shape[1]
    bp = block_kv_pages or tpu_block_kv_pages(D, S)
    if interpret is True:
        interpret = pltpu.InterpretParams()
    rows = prepare_rows(q, page_table, kv_lens, q_positions, num_kv_heads=KV, page_size=S,
                        sliding_window=sliding_window, m_multiple=_M_MULTIPLE)
    m_pad = rows.q_tiles.shape[2]

    kernel = lambda *refs: _tpu_kernel(*refs, bp=bp, page_size=S, pages_per_row=P,
                                       sm_scale=float(sm_scale), sliding_window=sliding_window,
                                       soft_cap=soft_cap)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(R, KV),
        in_specs=[
            pl.BlockSpec((None, None, m_pad, D), lambda r, h, *_: (r, h, 0, 0)),
            pl.BlockSpec((None, m_pad, 1), lambda r, h, *_: (r, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((None, None, m_pad, D), lambda r, h, *_: (r, h, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((2, bp * S, D), k_pages.dtype),
            pltpu.VMEM((2, bp * S, D), v_pages.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
        ],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((R, KV, m_pad, D), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(page_table.reshape(R * P), rows.page_lo, rows.page_hi, rows.kv_end,
      rows.q_tiles, rows.pos[:, :, None], k_pages, v_pages)
    return unprepare_output(out, batch_q=Bq, num_heads=H, m=rows.m)
