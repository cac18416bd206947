"""Ragged paged attention: shared interface, pure-jnp reference, backend dispatch.

Interface (identical to the model's pure-jnp path ``sgl_jax.models.attention.paged_attention``)::

    paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *,
                    sm_scale, sliding_window=None, soft_cap=None) -> out

      q:           [R, Bq, H, D]  R rows; each row holds Bq query tokens of ONE sequence
                                  (decode rows: Bq=1, prefill rows: Bq consecutive tokens of a chunk)
      k_pages:     [N, KV, S, D]  one layer's KV pool: N pages, KV heads, S = page_size slots
      v_pages:     [N, KV, S, D]
      page_table:  [R, P] int32   pages owned by the row's sequence, in order; position p lives in
                                  page_table[r, p // S], slot p % S.  Entries past the sequence's
                                  length are arbitrary *valid* page ids (often 0).
      kv_lens:     [R] int32      valid KV positions of the row's sequence (includes this step's
                                  tokens, already written into the pages); 0 for padded rows
      q_positions: [R, Bq] int32  absolute position of each query token; -1 for padded slots

    Query (r, i) at position t attends to key positions j with j <= t, j < kv_lens[r] and, when
    ``sliding_window`` is set, j > t - sliding_window.  GQA: H = KV * G, query head h reads kv
    head h // G.  Scores are float32: s = (q . k) * sm_scale, optionally
    s = soft_cap * tanh(s / soft_cap); softmax in float32.  The output has q's dtype, and a query
    with no valid key (padded slot, kv_len 0) outputs exactly 0 -- never NaN.

Why the KV write is NOT fused into the kernel
---------------------------------------------
The model scatters this step's new K/V into the pool (``pool.at[page, :, slot].set(...)``) in a
separate op *before* calling attention, and the attention kernels here are strictly read-only:

* XLA performs that scatter in place on the donated pool buffer (the pool is donated to the jitted
  step and threaded through as loop state), so the separate update costs one small scatter of
  T x KV x D elements -- no copy of the pool.  Fusing the write into a Pallas kernel would need
  ``input_output_aliases`` on the whole pool for every backend, and an aliased kernel output
  forces XLA to materialize a copy whenever aliasing cannot be proven safe.
* A read-only kernel is identical for both backends (Triton and Mosaic differ a lot in how
  writes from inside a grid are ordered: per-program stores vs. DMA + semaphores), has no
  write-after-read hazards between grid programs that read the same page, and can run its grid
  axes in parallel.
* Verification is simpler: the kernel is a pure function of its inputs and can be compared with
  the jnp reference on identical pools; the scatter is tested once, on its own.

Backends
--------
``backend="pallas_gpu"`` -> :mod:`pallas_kernels.gpu` (Pallas on Triton),
``backend="pallas_tpu"`` -> :mod:`pallas_kernels.tpu` (Pallas on Mosaic TPU, scalar prefetch +
manual double-buffered DMA).  Both are verified on CPU in interpret mode (see
``tests/test_pallas_attention.py`` and ``bench/pallas_notes.md``); interpret mode is a correctness
tool only -- on CPU the runtime uses the jnp path.

The limits, validation, the jnp reference and :func:`prepare_rows` live in :mod:`pallas_kernels.common`
(re-exported here), which both kernels import, so kernel modules never import this dispatcher.
Both kernels share :func:`prepare_rows`: the row's Bq x G query heads that share one kv head are
laid out as one ``[M, D]`` tile (M = Bq*G, padded), and the per-row KV page range
``[page_lo, page_hi)`` plus the causal KV end are computed once in jnp, so each kernel program only
touches the pages that can contribute (pages past kv_len / past the last query position / before
the sliding window are never read).
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from pallas_kernels.common import (  # noqa: F401 - the shared interface, re-exported
    BACKENDS, MAX_PAGE_SIZE, MIN_PAGE_SIZE, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, RowLayout, _cdiv,
    _validate_kernel_support, prepare_rows, ref_ragged_paged_attention, unprepare_output, validate_inputs)


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "backend", "interpret",
                     "block_kv_pages", "num_warps", "num_stages"),
)
def ragged_paged_attention(
    q,
    k_pages,
    v_pages,
    page_table,
    kv_lens,
    q_positions,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    backend: str = "pallas_gpu",
    interpret: Any = False,
    block_kv_pages: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Drop-in replacement for the jnp ``paged_attention`` running a Pallas kernel.

    backend:        "pallas_gpu" (Triton) or "pallas_tpu" (Mosaic).
    interpret:      False on real hardware.  For CPU verification: ``True`` runs the GPU kernel in
                    Pallas' generic (HLO) interpreter and the TPU kernel in the TPU interpret mode
                    (``pltpu.InterpretParams()``, which simulates HBM/VMEM, DMAs and semaphores);
                    a ``pltpu.InterpretParams`` instance may be passed for the TPU backend.
    block_kv_pages: KV pages per inner-loop step; None -> per-backend table keyed by
                    (head_dim, page_size) (``gpu.GPU_BLOCK_KV_PAGES`` / ``tpu.TPU_BLOCK_KV_PAGES``).
    num_warps, num_stages: Triton compiler params (GPU only).
    """
    validate_inputs(q, k_pages, v_pages, page_table, kv_lens, q_positions,
                    sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    _validate_kernel_support(q, k_pages, backend)
    if backend == "pallas_gpu":
        from pallas_kernels import gpu

        return gpu.paged_attention_gpu(
            q, k_pages, v_pages, page_table, kv_lens, q_positions, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, interpret=bool(interpret),
            block_kv_pages=block_kv_pages, num_warps=num_warps, num_stages=num_stages)
    from pallas_kernels import tpu

    return tpu.paged_attention_tpu(
        q, k_pages, v_pages, page_table, kv_lens, q_positions, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
        block_kv_pages=block_kv_pages)
