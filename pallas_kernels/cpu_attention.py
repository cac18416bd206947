"""Paged attention for the CPU backend, as an XLA FFI custom call (`cpu_paged_attention.cc`).

The jnp forms in sgl_jax.models.attention run on XLA:CPU as gathers that copy each row's pages; a batched decode
step spent most of its time there (bench/notes.md, "Native paged attention on CPU"). The kernel walks each
row's pages in place and reads only the keys its queries see. It computes `paged_attention`'s function
exactly (up to float32 rounding; `ref_paged_attention` below is the pure-jnp reference it is tested against),
for float32 queries and float32, float16, bfloat16, float8_e4m3fn or float8_e5m2 pages, or a float8 pool's uint8
codes with its `kv_format` (16- and 8-bit pages are widened exactly as they are read, the arithmetic stays float32:
an fp8 pool costs precision only where the model writes it, `sgl_jax.models.attention.to_pool`); other dtypes keep
the jnp path. Built on first use (`cpu_native.NativeKernel`); without a compiler `available()` is False, one warning
names the cause, and the model keeps the jnp path.

`bf16_math=True` (the engine's `attention_math: bfloat16`) computes a prefill chunk's dot products (q.k and p.v, its
block rows; decode rows stay float32) in bfloat16 pairs with float32 sums where the CPU has AVX512-BF16
(`bf16_math_available()`), ~1.7x faster there; softmax, sums and outputs stay float32. The error is a bfloat16
rounding of q, k, p and v each (tests/test_cpu_attention.py states it; SmolLM2's logits move by up to ~0.35,
less than its int8 matmuls' ~2.3: tests/test_quant.py). Elsewhere the flag changes nothing.

    paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale, sliding_window=None,
                    soft_cap=None, bf16_math=False)
        q [R, Bq, H, D] f32; k_pages, v_pages [N, KV, S, D] f32, f16, bf16 or f8 (both the same); page_table [R, P]
        int32; kv_lens [R] int32;
        q_positions [R, Bq] int32 (-1 = padding)  ->  [R, Bq, H, D] f32
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_native import NativeKernel

TARGET = "sgl_jax_paged_attention"
_KERNEL = NativeKernel("cpu_paged_attention.cc", "SglJaxPagedAttention", TARGET, "SGL_JAX_NATIVE_ATTENTION",
                       "paged attention")
available = _KERNEL.available
why_not = _KERNEL.why_not


PAGE_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float8_e5m2)


FP8_CODES = {"float8_e4m3fn": 1, "float8_e5m2": 2}  # the kernel's `fp8` attribute for uint8 pages of each format


def supports(q, k_pages, kv_format: str = "") -> bool:
    """Whether the kernel takes these operands (float32 queries; float32, float16, bfloat16 or float8 pages, or a
    float8 pool's uint8 codes with its `kv_format`)."""
    if kv_format:
        return q.dtype == jnp.float32 and k_pages.dtype == jnp.uint8 and kv_format in FP8_CODES
    return q.dtype == jnp.float32 and any(k_pages.dtype == d for d in PAGE_DTYPES)


def _check(q, k_pages, v_pages, page_table, kv_lens, q_positions, kv_format=""):
    R, Bq, H, D = q.shape
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape or k_pages.shape[3] != D:
        raise ValueError(f"native paged attention: q {q.shape} needs k/v pages [N, KV, S, {D}], got "
                         f"{k_pages.shape} and {v_pages.shape}")
    if H % k_pages.shape[1]:
        raise ValueError(f"native paged attention: {H} query heads are not a multiple of {k_pages.shape[1]} KV heads")
    if page_table.ndim != 2 or page_table.shape[0] != R or kv_lens.shape != (R,) or q_positions.shape != (R, Bq):
        raise ValueError(f"native paged attention: for q {q.shape} expected page_table [{R}, P], kv_lens [{R}], "
                         f"q_positions [{R}, {Bq}]; got {page_table.shape}, {kv_lens.shape}, {q_positions.shape}")
    if not supports(q, k_pages, kv_format) or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"native paged attention takes float32 q and float32, float16, bfloat16, float8_e4m3fn or "
                         f"float8_e5m2 k/v pages (both the same; or uint8 codes with a kv_format of "
                         f"{', '.join(FP8_CODES)}), got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}"
                         f"{f', kv_format {kv_format!r}' if kv_format else ''}")


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                    sliding_window: int | None = None, soft_cap: float | None = None, bf16_math: bool = False,
                    kv_format: str = ""):
    """`sgl_jax.models.attention.paged_attention` by the native kernel (built and registered here if it was not
    yet; raises naming the cause if it cannot be). `kv_format`: the pages are a float8 pool's uint8 codes of that
    format (the engine's storage: sgl_jax.models.llama.kv_storage_dtype)."""
    _check(q, k_pages, v_pages, page_table, kv_lens, q_positions, kv_format)
    if not available():
        raise RuntimeError(f"the native paged attention is not available: {why_not()}")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(
        q, k_pages, v_pages, page_table.astype(jnp.int32), kv_lens.astype(jnp.int32),
        q_positions.astype(jnp.int32), sm_scale=np.float32(sm_scale),
        window=np.int64(sliding_window or 0), soft_cap=np.float32(soft_cap or 0.0), bf16=np.int64(bool(bf16_math)),
        fp8=np.int64(FP8_CODES[kv_format] if kv_format else 0))


def _c_function(name: str, argtypes: list):
    """The built kernel library's C export `name` (returning int64), typed."""
    import ctypes

    fn = getattr(_KERNEL._state["lib"], name)
    fn.argtypes, fn.restype = [getattr(ctypes, a) for a in argtypes], ctypes.c_int64
    return fn


def bf16_math_available() -> bool:
    """Whether `bf16_math=True` takes effect here (the kernel was built with AVX512-BF16); False without the kernel."""
    return available() and bool(_c_function("SglJaxAttentionBF16", [])())


def decode_two_pass_max(floats: int | None = None) -> int | None:
    """The most scores a unit of decode work keeps for the two-pass softmax, for this process (tests and A/B
    benches; the default is the fast setting): `floats` sets it (0: every decode row online, a page at a time),
    None only reads it. Returns the value in effect, or None where the build has no two-pass loops (no AVX2:
    decode rows are always online; 8-lane loops with AVX2, 16-lane with AVX-512). Raises if the kernel is not
    available or `floats` is negative."""
    return _setting("SglJaxAttentionTwoPassMax", "decode_two_pass_max", "floats", floats)


def decode_split_min_keys(keys: int | None = None) -> int | None:
    """The fewest keys a decode row's key range may have when the kernel splits few decode rows along their keys (so
    that two threads share one row's KV heads evenly), for this process (tests and A/B benches): `keys` sets it (0:
    never split), None only reads it. Returns the value in effect, or None where the build has no two-pass loops (no
    AVX2: no split). Raises if the kernel is not available or `keys` is negative."""
    return _setting("SglJaxAttentionSplitMinKeys", "decode_split_min_keys", "keys", keys)


def decode_shared_min_pages(pages: int | None = None) -> int | None:
    """The fewest whole leading pages decode rows must share (a fork's branches, requests on one system prompt), or a
    prefill chunk must have before its first query (a cached prefix), for the kernel to compute those pages once for
    all those queries under `bf16_math` (bfloat16 pairs, float32 sums; without it nothing changes), for this process
    (tests and A/B benches): `pages` sets it (0: every row reads its pages alone), None only reads it. Returns the
    value in effect, or None where the build has no such path (no AVX-512: rows read their pages alone).
    Raises if the kernel is not available or `pages` is negative."""
    return _setting("SglJaxAttentionSharedMinPages", "decode_shared_min_pages", "pages", pages)


def _setting(export: str, fn: str, arg: str, value: int | None) -> int | None:
    """A process-wide kernel setting through its C export: `value` >= 0 sets it, None reads it; None back where the
    build has none (the export answers -1)."""
    if not available():
        raise RuntimeError(f"the native paged attention is not available: {why_not()}")
    if value is not None and value < 0:
        raise ValueError(f"{fn}: {arg} must be >= 0, got {value}")
    got = int(_c_function(export, ["c_int64"])(-1 if value is None else value))
    return None if got < 0 else got


def ref_paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale: float,
                        sliding_window: int | None = None, soft_cap: float | None = None, kv_format: str = ""):
    """Pure-jnp reference: gather each row's pages, then ordinary masked attention (float32; 16- and 8-bit pages
    are widened first; uint8 pages with a `kv_format` read as that float8 format's codes)."""
    if kv_format:
        k_pages, v_pages = (jax.lax.bitcast_convert_type(x, jnp.dtype(kv_format)) for x in (k_pages, v_pages))
    k_pages, v_pages = k_pages.astype(jnp.float32), v_pages.astype(jnp.float32)
    R, Bq, H, D = q.shape
    _, KV, S, _ = k_pages.shape
    P = page_table.shape[1]
    k = jnp.moveaxis(k_pages[page_table], 2, 1).reshape(R, KV, P * S, D)  # [R, KV, P*S, D]
    v = jnp.moveaxis(v_pages[page_table], 2, 1).reshape(R, KV, P * S, D)
    qg = q.reshape(R, Bq, KV, H // KV, D)
    s = jnp.einsum("RQKGD,RKJD->RKGQJ", qg, k, precision="highest") * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    j = jnp.arange(P * S)
    t = q_positions[:, None, None, :, None]  # [R, 1, 1, Bq, 1]
    vis = (j <= t) & (j < kv_lens[:, None, None, None, None]) & (t >= 0)
    if sliding_window is not None:
        vis &= j > t - sliding_window
    s = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0)), 0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den == 0, 1, den)
    v = jnp.where(vis.any(axis=(2, 3))[..., None], v, 0)  # stale slots nobody sees must not meet a 0 weight
    out = jnp.einsum("RKGQJ,RKJD->RQKGD", p, v, precision="highest")
    return out.reshape(R, Bq, H, D).astype(q.dtype)


if __name__ == "__main__":  # python -m pallas_kernels.cpu_attention: build now and say whether it works
    ok = available()
    print("native paged attention:", "available" if ok else f"off ({why_not()})")
    sys.exit(0 if ok else 1)
