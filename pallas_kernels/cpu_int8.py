"""The CPU backend's int8 weight-only matmul for few rows (decode), as an XLA FFI custom call.

XLA:CPU converts an int8 matrix to float in an op of its own before the dot (bench/notes.md, "int8 weight-only
quantization"), so an int8 decode step moves more bytes than a float32 one. `cpu_int8_matmul.cc` reads each weight
once, as a byte. It is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) for this CPU
(`-march=native`) into `<cache>/native/<key>/`, the key covering the source, the flags, jax's FFI headers and the
CPU's feature flags; a file lock keeps concurrent processes from building it twice.

Without a compiler (or if the build fails) `available()` is False, one warning names the cause, and callers keep
XLA's convert + dot. TPU and GPU never use this: XLA fuses the convert there.

    matmul(x, w, scale, out_axis)   x f32 [M <= MAX_ROWS, K]; w int8 [K, N] (out_axis 1) or [N, K] (out_axis 0);
                                    scale f32 [N] -> f32 [M, N] = (x @ w) * scale
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

MAX_ROWS = 16  # kMaxRows in the kernel; more rows are compute-bound and go to XLA's dot
TARGET = "sgl_jax_int8_matmul"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_int8_matmul.cc")
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once decided, "why": the reason it is off, "lib": the loaded library


def _cache_root() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("SGL_JAX_CACHE", "~/.cache/sgl_jax")), "native")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx)


def _key(cxx: str) -> str:
    h = hashlib.sha256()
    with open(_SOURCE, "rb") as f:
        h.update(f.read())
    include = jax.ffi.include_dir()
    for name in ("ffi.h", "api.h", "c_api.h"):
        with open(os.path.join(include, "xla", "ffi", "api", name), "rb") as f:
            h.update(f.read())
    h.update(" ".join(_FLAGS + [cxx, _cpu_flags()]).encode())
    return h.hexdigest()[:24]


def _build() -> ctypes.CDLL:
    """Compile (once per key, under a file lock) and load the kernel library. Raises with the compiler's output."""
    from filelock import FileLock

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX') or 'c++'} not on PATH)")
    out_dir = os.path.join(_cache_root(), _key(cxx))
    lib = os.path.join(out_dir, "libsgl_jax_int8.so")
    os.makedirs(out_dir, exist_ok=True)
    with FileLock(lib + ".lock"):
        if not os.path.exists(lib):
            tmp = f"{lib}.{os.getpid()}.tmp"
            cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{res.stderr[-2000:]}")
            os.replace(tmp, lib)
    return ctypes.CDLL(lib)


def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA for the CPU platform (decided once)."""
    with _lock:
        if "ok" not in _state:
            if os.environ.get("SGL_JAX_NATIVE_INT8", "1") == "0":
                _state.update(ok=False, why="SGL_JAX_NATIVE_INT8=0")
            else:
                try:
                    lib = _build()
                    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SglJaxInt8Matmul), platform="cpu")
                    _state.update(ok=True, lib=lib)
                except Exception as e:  # noqa: BLE001 - any failure means: keep XLA's path, say why once
                    _state.update(ok=False, why=f"{type(e).__name__}: {e}")
                    log.warning("the native int8 matmul is off (XLA's convert + dot is used): %s", _state["why"])
        return _state["ok"]


def why_not() -> str | None:
    """Why `available()` is False (None when it is True or not decided yet)."""
    return _state.get("why")


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array, out_axis: int) -> jax.Array:
    """(x @ w) * scale in float32 by the native kernel; the caller checks `available()` and x's rows."""
    m, k = x.shape
    n = w.shape[out_axis]
    if m > MAX_ROWS or x.dtype != jnp.float32 or w.dtype != jnp.int8 or w.shape[1 - out_axis] != k:
        raise ValueError(f"native int8 matmul: x {x.dtype}{x.shape}, w {w.dtype}{w.shape}, out_axis {out_axis}")
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, w, scale.astype(jnp.float32), layout=0 if out_axis == 1 else 1)


if __name__ == "__main__":  # python -m pallas_kernels.cpu_int8: build now and say whether it works
    ok = available()
    print("native int8 matmul:", "available" if ok else f"off ({why_not()})")
    sys.exit(0 if ok else 1)
