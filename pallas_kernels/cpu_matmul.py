"""The CPU backend's matmuls, as XLA FFI custom calls (`cpu_matmul.cc`).

- packed (what the engine runs on CPU with float32 compute, `engine.pack_weights`): weights panel-packed
  (sgl_jax.models.packing), any number of rows. A tile of 16 output columns reads its weights as one contiguous
  stream. float32 [N / 16, K, 16]: rows register-tiled (1-8 rows: one pass over the weights; more: 96 x 256
  blocks through L1). Decode steps 1.0-1.6x faster than the plain layout's paths below (bench/notes.md,
  "Panel-packed weights"). int8 [N / 16, K / 4, 16, 4] + a scale per output column: the activations are
  quantized to int8 per block of 32 inputs and the products summed in integer arithmetic (bench/notes.md,
  "Integer dot products for int8 weights"; the error bound is in cpu_matmul.cc); where the CPU has AMX, calls of 4
  or more rows run on its tile unit with the same results (bench/notes.md, "AMX for the int8 matmuls"). GGUF Q4_1
  blocks kept as the file has them (`quantization: gguf`), uint8 [N / 16, K / 32, 320]: nibbles times the same
  int8 activations, the file's scale and min per block (bench/notes.md, "GGUF Q4_1 kept in its blocks").

The plain [K, N] layout's few-row kernels (used when the weights are not packed):

- int8 weight-only: XLA:CPU converts an int8 matrix to float in an op of its own before the dot (bench/notes.md,
  "int8 weight-only quantization"), so an int8 decode step would move more bytes than a float32 one; the kernel
  reads each weight once, as a byte.
- float32, for the LM head's 2-8 decode rows: XLA:CPU's [rows, 576] x [576, 49152] took 15-17 ms with its
  default fusions and 18-118 ms without them (the decode steps are compiled without: executables.py), against
  7-14 ms here (bench/notes.md, "Native paged attention on CPU"). The model's other matmuls stay with XLA's dot:
  there the kernel's column tiles, walking down a [576, 1536] matrix with a stride, were slower (a 4-row step
  90 vs 63 ms). One row and 9 or more rows stay with XLA everywhere.

Built on first use (`cpu_native.NativeKernel`); without a compiler the `*_available()` are False, one warning
names the cause, and callers keep XLA's dot. TPU and GPU never use these.

    int8_matmul(x, w, scale, out_axis)  x f32 [M <= MAX_ROWS_INT8, K]; w int8 [K, N] (out_axis 1) or [N, K]
                                        (out_axis 0); scale f32 [N] -> f32 [M, N] = (x @ w) * scale
    f32_matmul(x, w, out_axis)          x f32 [M <= MAX_ROWS_INT8, K]; w f32 likewise -> f32 [M, N] = x @ w
    packed_matmul(x, w, scale=None)     x f32 [M, K]; w f32 [N / 16, K, 16], or int8 [N / 16, K / 4, 16, 4] with
                                        scale f32 [N]
    packed_q4_1_matmul(x, w)            x f32 [M, K]; w uint8 [N / 16, K / 32, 320]: a GGUF Q4_1 matrix's blocks
                                        (sgl_jax.models.packing.pack_q4_1) -> f32 [M, N] = x @ W, x quantized per
                                        32 inputs as for int8 (`quantization: gguf`)
    thread_ranges(on=None), amx_int8(on=None)   switches for A/B runs and tests (the same bits either way)
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading

import jax
import jax.numpy as jnp

from pallas_kernels.cpu_native import NativeKernel

MAX_ROWS_INT8 = 16  # kMaxRows in the kernel (both weight types); more rows are compute-bound: XLA's dot
F32_ROWS = (2, 8)  # float32 rows of the LM head routed to the kernel (inclusive): where it beat XLA's dot
INT8_TARGET = "sgl_jax_int8_matmul"
F32_TARGET = "sgl_jax_f32_matmul"
_INT8 = NativeKernel("cpu_matmul.cc", "SglJaxInt8Matmul", INT8_TARGET, "SGL_JAX_NATIVE_INT8", "int8 matmul")
_F32 = NativeKernel("cpu_matmul.cc", "SglJaxF32Matmul", F32_TARGET, "SGL_JAX_NATIVE_F32", "float32 matmul")
PANEL = 16  # output columns per panel of a packed matrix
QUAD = 4  # inputs kept together per column in an int8 panel (kQuad)
PACKED_INT8_TARGET = "sgl_jax_packed_int8_matmul"
PACKED_F32_TARGET = "sgl_jax_packed_f32_matmul"
_PACKED_INT8 = NativeKernel("cpu_matmul.cc", "SglJaxPackedInt8Matmul", PACKED_INT8_TARGET, "SGL_JAX_PACKED",
                            "packed int8 matmul")
_PACKED_F32 = NativeKernel("cpu_matmul.cc", "SglJaxPackedF32Matmul", PACKED_F32_TARGET, "SGL_JAX_PACKED",
                           "packed float32 matmul")
Q4_BLOCK = 32  # inputs per GGUF Q4_1 block (and per activation scale)
Q4_BYTES = 320  # bytes of a packed (panel, block): 16 columns x 32 nibbles, then 16 d and 16 m in float16 (kQ4Bytes)
PACKED_Q4_TARGET = "sgl_jax_packed_q4_1_matmul"
_PACKED_Q4 = NativeKernel("cpu_matmul.cc", "SglJaxPackedQ4Matmul", PACKED_Q4_TARGET, "SGL_JAX_PACKED",
                          "packed Q4_1 matmul")


_TRACE = threading.local()


@contextlib.contextmanager
def sharded_trace():
    """While a model is traced for a device mesh (tensor parallel: sgl_jax/parallel/tp.py) the plain-layout kernels
    stay off (`f32_routes` False, `sharded()` True): XLA's SPMD partitioner cannot split a custom call and would
    gather each sharded matrix whole onto every device. Thread-local (the background compiler traces too)."""
    prev = getattr(_TRACE, "sharded", False)
    _TRACE.sharded = True
    try:
        yield
    finally:
        _TRACE.sharded = prev


def sharded() -> bool:
    return getattr(_TRACE, "sharded", False)


def int8_available() -> bool:
    return _INT8.available()


def f32_available() -> bool:
    return _F32.available()


def f32_routes(x) -> bool:
    """Whether the LM head's float32 matmul of x's rows goes to the kernel (CPU, F32_ROWS, the kernel built)."""
    return (jax.default_backend() == "cpu" and not sharded() and x.dtype == jnp.float32 and x.ndim == 2
            and F32_ROWS[0] <= x.shape[0] <= F32_ROWS[1] and f32_available())


def why_not() -> str | None:
    """Why a kernel is off (None when both are on or not decided yet)."""
    return _INT8.why_not() or _F32.why_not()


def _check(x, w, out_axis, wdtype, what):
    m, k = x.shape
    if m > MAX_ROWS_INT8 or x.dtype != jnp.float32 or w.dtype != wdtype or w.ndim != 2 or w.shape[1 - out_axis] != k:
        raise ValueError(f"native {what}: x {x.dtype}{x.shape}, w {w.dtype}{w.shape}, out_axis {out_axis} "
                         f"(expected float32 x of at most {MAX_ROWS_INT8} rows and {jnp.dtype(wdtype).name} w sharing "
                         f"its {k} inputs)")
    return jax.ShapeDtypeStruct((m, w.shape[out_axis]), jnp.float32)


def int8_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, out_axis: int) -> jax.Array:
    """(x @ w) * scale in float32 by the native kernel; the caller checks `int8_available()` and x's rows."""
    out = _check(x, w, out_axis, jnp.int8, "int8 matmul")
    if not int8_available():
        raise RuntimeError(f"the native int8 matmul is not available: {why_not()}")
    return jax.ffi.ffi_call(INT8_TARGET, out)(x, w, scale.astype(jnp.float32), layout=0 if out_axis == 1 else 1)


def f32_matmul(x: jax.Array, w: jax.Array, out_axis: int) -> jax.Array:
    """x @ w (w [K, N], out_axis 1) or x @ w.T (w [N, K], out_axis 0) in float32 by the native kernel; the
    caller checks `f32_available()` and x's rows."""
    out = _check(x, w, out_axis, jnp.float32, "float32 matmul")
    if not f32_available():
        raise RuntimeError(f"the native float32 matmul is not available: {why_not()}")
    return jax.ffi.ffi_call(F32_TARGET, out)(x, w, layout=0 if out_axis == 1 else 1)


def packed_available() -> bool:
    return _PACKED_INT8.available() and _PACKED_F32.available() and _PACKED_Q4.available()


def amx_int8(on: bool | None = None) -> bool:
    """Whether the packed int8 matmul runs on AMX tiles (calls of 4 rows or more with K % 32 == 0; otherwise the
    VNNI tiles, with bit-identical results: cpu_matmul.cc). `on` switches it for this process (A/B runs, tests);
    AMX needs the CPU (Sapphire Rapids or later), a build for it and the kernel's permission. Builds the kernel."""
    if not _PACKED_INT8.available():
        return False
    return bool(_PACKED_INT8._state["lib"].SglJaxAmxInt8(-1 if on is None else int(on)))


def thread_ranges(on: bool | None = None) -> bool:
    """Whether the packed matmuls give each thread one contiguous range of their output panels (on: a thread's
    weight stream runs on from one unit to the next) rather than handing units to whichever thread is free; `on`
    switches it for this process (A/B runs, tests). Results are the same bit for bit either way. Builds the kernel."""
    if not _PACKED_INT8.available():
        return False
    return bool(_PACKED_INT8._state["lib"].SglJaxMatmulRanges(-1 if on is None else int(on)))


def ranges_self_test(units: int, lanes: int, trials: int) -> int:
    """The kernels' range scheduler (cpu_native.h RunRangesOn) run `trials` times on `lanes` threads with random
    delays: how many units ran other than exactly once or with the wrong range end (0: correct). For tests."""
    if not _PACKED_INT8.available():
        raise RuntimeError(f"the packed matmul is not available: {_PACKED_INT8.why_not()}")
    fn = _PACKED_INT8._state["lib"].SglJaxRangesSelfTest
    fn.restype, fn.argtypes = ctypes.c_int64, [ctypes.c_int64] * 3
    return int(fn(units, lanes, trials))


def _keep(keep, m: int) -> jax.Array:
    """The packed kernels' `keep` operand, int32 [m]: the rows of x to compute (y's others are zeros), default all."""
    if keep is None:
        return jnp.ones((m,), jnp.int32)
    if keep.shape != (m,):
        raise ValueError(f"packed matmul: keep {keep.shape} must have one entry per row of x ({m})")
    return keep.astype(jnp.int32)


def packed_matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, keep=None) -> jax.Array:
    """x @ unpack(w) [* scale] in float32: x f32 [M, K]; w float32 [N / 16, K, 16], or int8 [N / 16, K / 4, 16, 4]
    with scale f32 [N] (x then quantized per 32 inputs inside the kernel: cpu_matmul.cc). `keep` (bool or int32 [M],
    may be traced): compute only the rows of x it marks, y's other rows are zeros (a step's padding rows); each kept
    row's result is the product of the kept rows alone, bit for bit."""
    m, k = x.shape
    want = (k, PANEL) if w.dtype == jnp.float32 else (k // QUAD, PANEL, QUAD)
    if (x.dtype != jnp.float32 or w.dtype not in (jnp.int8, jnp.float32) or w.shape[1:] != want
            or (w.dtype == jnp.int8 and k % QUAD) or (w.dtype == jnp.int8) != (scale is not None)):
        raise ValueError(f"packed matmul: x {x.dtype}{x.shape}, w {w.dtype}{w.shape}, scale "
                         f"{None if scale is None else scale.shape} (expected float32 x [M, K], and w float32 "
                         f"[N/16, K, 16] or int8 [N/16, K/4, 16, 4] with a scale)")
    if not packed_available():
        raise RuntimeError(f"the packed matmul is not available: {_PACKED_INT8.why_not() or _PACKED_F32.why_not()}")
    out = jax.ShapeDtypeStruct((m, w.shape[0] * PANEL), jnp.float32)
    if scale is None:
        return jax.ffi.ffi_call(PACKED_F32_TARGET, out)(x, w, _keep(keep, m))
    return jax.ffi.ffi_call(PACKED_INT8_TARGET, out)(x, w, scale.astype(jnp.float32), _keep(keep, m))


def packed_q4_1_matmul(x: jax.Array, w: jax.Array, keep=None) -> jax.Array:
    """x @ W in float32 for a GGUF Q4_1 matrix kept in its blocks: x f32 [M, K]; w uint8 [N / 16, K / 32, 320]
    (sgl_jax.models.packing.pack_q4_1). x is quantized per 32 inputs inside the kernel, as for int8 weights; the
    weights are the file's exactly (cpu_matmul.cc). `keep`: as packed_matmul's."""
    m, k = x.shape
    if x.dtype != jnp.float32 or w.dtype != jnp.uint8 or w.ndim != 3 or w.shape[1:] != (k // Q4_BLOCK, Q4_BYTES) \
            or k % Q4_BLOCK:
        raise ValueError(f"packed Q4_1 matmul: x {x.dtype}{x.shape}, w {w.dtype}{w.shape} (expected float32 x [M, K] "
                         f"with K a multiple of {Q4_BLOCK}, and w uint8 [N/16, K/{Q4_BLOCK}, {Q4_BYTES}])")
    if not packed_available():
        raise RuntimeError(f"the packed matmul is not available: {_PACKED_Q4.why_not()}")
    out = jax.ShapeDtypeStruct((m, w.shape[0] * PANEL), jnp.float32)
    return jax.ffi.ffi_call(PACKED_Q4_TARGET, out)(x, w, _keep(keep, m))


if __name__ == "__main__":  # python -m pallas_kernels.cpu_matmul: build now and say whether it works
    ok = int8_available() and f32_available() and packed_available()
    why = why_not() or _PACKED_INT8.why_not() or _PACKED_F32.why_not() or _PACKED_Q4.why_not()
    print("native matmuls:", "available" if ok else f"off ({why})")
    sys.exit(0 if ok else 1)
