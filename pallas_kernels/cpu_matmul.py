"""The CPU backend's int8 weight-only matmul for few rows (decode), as an XLA FFI custom call (`cpu_matmul.cc`).

XLA:CPU converts an int8 matrix to float in an op of its own before the dot (bench/notes.md, "int8 weight-only
quantization"), so an int8 decode step would move more bytes than a float32 one; the kernel reads each weight
once, as a byte. Built on first use (`cpu_native.NativeKernel`); without a compiler `int8_available()` is False,
one warning names the cause, and callers keep XLA's convert + dot. TPU and GPU never use this: XLA fuses the
convert there. (A float32 twin for 2-64 rows was tried and not kept: bench/notes.md, "Few-row decode on
XLA:CPU".)

    int8_matmul(x, w, scale, out_axis)  x f32 [M <= MAX_ROWS_INT8, K]; w int8 [K, N] (out_axis 1) or [N, K]
                                        (out_axis 0); scale f32 [N] -> f32 [M, N] = (x @ w) * scale
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from pallas_kernels.cpu_native import NativeKernel

MAX_ROWS_INT8 = 16  # kMaxRows in the kernel; more rows are compute-bound and go to XLA's dot
INT8_TARGET = "sgl_jax_int8_matmul"
_INT8 = NativeKernel("cpu_matmul.cc", "SglJaxInt8Matmul", INT8_TARGET, "SGL_JAX_NATIVE_INT8", "int8 matmul")


def int8_available() -> bool:
    return _INT8.available()


def why_not() -> str | None:
    """Why the kernel is off (None when it is on or not decided yet)."""
    return _INT8.why_not()


def _check(x, w, out_axis, max_rows, wdtype, what):
    m, k = x.shape
    if m > max_rows or x.dtype != jnp.float32 or w.dtype != wdtype or w.ndim != 2 or w.shape[1 - out_axis] != k:
        raise ValueError(f"native {what}: x {x.dtype}{x.shape}, w {w.dtype}{w.shape}, out_axis {out_axis} "
                         f"(expected float32 x of at most {max_rows} rows and {jnp.dtype(wdtype).name} w sharing "
                         f"its {k} inputs)")
    return jax.ShapeDtypeStruct((m, w.shape[out_axis]), jnp.float32)


def int8_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, out_axis: int) -> jax.Array:
    """(x @ w) * scale in float32 by the native kernel; the caller checks `int8_available()` and x's rows."""
    out = _check(x, w, out_axis, MAX_ROWS_INT8, jnp.int8, "int8 matmul")
    return jax.ffi.ffi_call(INT8_TARGET, out)(x, w, scale.astype(jnp.float32), layout=0 if out_axis == 1 else 1)


if __name__ == "__main__":  # python -m pallas_kernels.cpu_matmul: build now and say whether it works
    ok = int8_available()
    print("native int8 matmul:", "available" if ok else f"off ({why_not()})")
    sys.exit(0 if ok else 1)
