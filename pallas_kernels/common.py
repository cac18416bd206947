"""What both Pallas kernels and the dispatcher share: limits, input validation, the pure-jnp reference,
and the row layout (`prepare_rows` / `unprepare_output`). Imported by `ragged_paged_attention` (the
dispatcher) and by the `gpu` / `tpu` kernels; it imports neither, so there is no import cycle.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("pallas_gpu", "pallas_tpu")
SUPPORTED_HEAD_DIMS = (64, 128, 256)
MIN_PAGE_SIZE = 16
MAX_PAGE_SIZE = 256
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Masked scores are -inf (no large-negative "mask value"); the online softmax guards the
# all-masked case explicitly, so a query without keys ends with denominator 0 and outputs 0.


def _cdiv(a, b):
    return (a + b - 1) // b


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def validate_inputs(
    q,
    k_pages,
    v_pages,
    page_table,
    kv_lens,
    q_positions,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> None:
    """Static shape/dtype checks (works on arrays or ShapeDtypeStructs, inside or outside jit).

    Raises ValueError naming the offending arguments with both shapes.
    """

    def shp(x):
        return tuple(x.shape)

    if len(shp(q)) != 4:
        raise ValueError(f"q must be [R, Bq, H, D]; got q.shape={shp(q)}")
    if len(shp(k_pages)) != 4:
        raise ValueError(f"k_pages must be [N, KV, S, D]; got k_pages.shape={shp(k_pages)}")
    if shp(k_pages) != shp(v_pages):
        raise ValueError(
            f"k_pages and v_pages shapes differ: k_pages.shape={shp(k_pages)} "
            f"v_pages.shape={shp(v_pages)}"
        )
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages.dtype={k_pages.dtype} != v_pages.dtype={v_pages.dtype}")
    R, Bq, H, D = shp(q)
    N, KV, S, Dk = shp(k_pages)
    if Dk != D:
        raise ValueError(
            f"head dim mismatch: q.shape={shp(q)} (D={D}) vs k_pages.shape={shp(k_pages)} (D={Dk})"
        )
    if KV < 1 or H % KV != 0:
        raise ValueError(
            f"query heads must be a multiple of kv heads: q.shape={shp(q)} (H={H}) vs "
            f"k_pages.shape={shp(k_pages)} (KV={KV})"
        )
    if len(shp(page_table)) != 2 or shp(page_table)[0] != R:
        raise ValueError(
            f"page_table must be [R, P] with R = q.shape[0]: page_table.shape={shp(page_table)} "
            f"q.shape={shp(q)}"
        )
    if shp(kv_lens) != (R,):
        raise ValueError(f"kv_lens must be [R]: kv_lens.shape={shp(kv_lens)} q.shape={shp(q)}")
    if shp(q_positions) != (R, Bq):
        raise ValueError(
            f"q_positions must be [R, Bq]: q_positions.shape={shp(q_positions)} q.shape={shp(q)}"
        )
    for name, x in (("page_table", page_table), ("kv_lens", kv_lens), ("q_positions", q_positions)):
        if x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32; got {name}.dtype={x.dtype} shape={shp(x)}")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite python float; got {sm_scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, (int, np.integer)) or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None; got {sliding_window!r}")
    if soft_cap is not None and not (isinstance(soft_cap, (int, float)) and soft_cap > 0):
        raise ValueError(f"soft_cap must be a positive float or None; got {soft_cap!r}")


def _validate_kernel_support(q, k_pages, backend: str) -> None:
    _, _, _, D = q.shape
    _, _, S, _ = k_pages.shape
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} not supported (q.shape={tuple(q.shape)}); supported: {SUPPORTED_HEAD_DIMS}")
    if not (MIN_PAGE_SIZE <= S <= MAX_PAGE_SIZE):
        raise ValueError(
            f"page size S={S} (k_pages.shape={tuple(k_pages.shape)}) outside [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]"
        )
    if backend == "pallas_gpu" and S & (S - 1):
        raise ValueError(f"pallas_gpu (Triton) needs a power-of-2 page size; got S={S}")
    if backend == "pallas_tpu" and S % 16:
        raise ValueError(f"pallas_tpu needs a page size that is a multiple of 16; got S={S}")
    for name, x in (("q", q), ("k_pages", k_pages)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype} not supported; use float32 or bfloat16")


# --------------------------------------------------------------------------------------
# Pure-jnp reference
# --------------------------------------------------------------------------------------


def ref_ragged_paged_attention(
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
):
    """Reference: gather each row's own pages, then ordinary masked attention (float32).

    Memory is O(R * P * S * KV * D) -- fine for tests and small CPU batches.
    """
    validate_inputs(q, k_pages, v_pages, page_table, kv_lens, q_positions,
                    sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    R, Bq, H, D = q.shape
    _, KV, S, _ = k_pages.shape
    G = H // KV
    P = page_table.shape[1]
    # [R, P, KV, S, D] -> [R, KV, P*S, D]
    k = jnp.swapaxes(k_pages[page_table], 1, 2).reshape(R, KV, P * S, D)
    v = jnp.swapaxes(v_pages[page_table], 1, 2).reshape(R, KV, P * S, D)
    qg = q.reshape(R, Bq, KV, G, D).astype(jnp.float32)
    s = jnp.einsum("rbkgd,rkjd->rkgbj", qg, k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    j = jnp.arange(P * S, dtype=jnp.int32)
    t = q_positions[:, :, None]  # [R, Bq, 1]
    valid_kv = j[None, :] < kv_lens[:, None]  # [R, J]
    mask = (j[None, None, :] <= t) & valid_kv[:, None, :]
    if sliding_window is not None:
        mask &= j[None, None, :] > t - sliding_window
    mask = mask[:, None, None, :, :]  # [R, 1, 1, Bq, J]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    # Zero V at keys no query of the row may see, so garbage (even NaN) in unowned / out-of-window
    # slots cannot leak through 0 * NaN.
    used = jnp.any(mask, axis=(1, 2, 3))  # [R, J]
    v = jnp.where(used[:, None, :, None], v.astype(jnp.float32), 0.0)
    o = jnp.einsum("rkgbj,rkjd->rbkgd", p, v, precision=jax.lax.Precision.HIGHEST)
    o = o / jnp.where(l == 0, 1.0, l).transpose(0, 3, 1, 2, 4)
    return o.reshape(R, Bq, H, D).astype(q.dtype)


# --------------------------------------------------------------------------------------
# Shared preprocessing for the kernels
# --------------------------------------------------------------------------------------


class RowLayout(NamedTuple):
    q_tiles: jax.Array  # [R, KV, M_pad, D]   row m = i*G + g  (query token i, group member g)
    pos: jax.Array  # [R, M_pad] int32        position of tile row m; -1 for padding
    page_lo: jax.Array  # [R] int32           first page index (into page_table[r]) to visit
    page_hi: jax.Array  # [R] int32           one past the last page index to visit
    kv_end: jax.Array  # [R] int32            min(kv_len, max query position + 1): keys j < kv_end
    m: int  # Bq * G (unpadded)


def prepare_rows(q, page_table, kv_lens, q_positions, *, num_kv_heads: int, page_size: int,
                 sliding_window: int | None, m_multiple: int, m_pow2: bool = False,
                 m_min: int = 1) -> RowLayout:
    """Tile layout + per-row KV page range shared by both kernels (runs as plain XLA ops)."""
    R, Bq, H, D = q.shape
    KV = num_kv_heads
    G = H // KV
    M = Bq * G
    m_pad = max(M, m_min)
    if m_pow2:
        m_pad = 1 << (m_pad - 1).bit_length()
    m_pad = _cdiv(m_pad, m_multiple) * m_multiple
    qt = q.reshape(R, Bq, KV, G, D).transpose(0, 2, 1, 3, 4).reshape(R, KV, M, D)
    pos = jnp.repeat(q_positions, G, axis=1)  # [R, M], m = i*G + g -> q_positions[:, i]
    if m_pad != M:
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, m_pad - M), (0, 0)))
        pos = jnp.pad(pos, ((0, 0), (0, m_pad - M)), constant_values=-1)
    valid_q = q_positions >= 0
    max_pos = jnp.max(jnp.where(valid_q, q_positions, -1), axis=1)
    kv_end = jnp.clip(jnp.minimum(kv_lens, max_pos + 1), 0, page_table.shape[1] * page_size)
    page_hi = _cdiv(kv_end, page_size).astype(jnp.int32)
    if sliding_window is not None:
        big = jnp.iinfo(jnp.int32).max
        min_pos = jnp.min(jnp.where(valid_q, q_positions, big), axis=1)
        first_key = jnp.maximum(min_pos - sliding_window + 1, 0)
        page_lo = jnp.minimum(first_key // page_size, page_hi).astype(jnp.int32)
    else:
        page_lo = jnp.zeros_like(page_hi)
    return RowLayout(qt, pos.astype(jnp.int32), page_lo, page_hi, kv_end.astype(jnp.int32), M)


def unprepare_output(o_tiles, *, batch_q: int, num_heads: int, m: int):
    """[R, KV, M_pad, D] -> [R, Bq, H, D]."""
    R, KV, _, D = o_tiles.shape
    G = num_heads // KV
    o = o_tiles[:, :, :m].reshape(R, KV, batch_q, G, D).transpose(0, 2, 1, 3, 4)
    return o.reshape(R, batch_q, num_heads, D)
