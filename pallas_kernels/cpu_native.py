"""Native CPU kernels as XLA FFI custom calls: build on first use, register, or say why not.

Each kernel is one C++ file in this folder (with the shared `cpu_native.h`). It is compiled on first use with the
system's C++ compiler (`$CXX`, else `c++`) for this CPU (`-march=native`) into `<cache>/native/<key>/`, the key
covering the source and this folder's headers, the flags, jax's FFI headers and the CPU's feature flags; a file
lock keeps concurrent processes from building it twice.
Without a compiler (or if the build fails) `available()` is False, one warning names the cause, and the caller
keeps its XLA path. TPU and GPU never use these.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import threading

import jax

log = logging.getLogger(__name__)

_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
HERE = os.path.dirname(os.path.abspath(__file__))


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
    return shutil.which(os.environ.get("CXX") or "c++")


class NativeKernel:
    """One FFI handler `symbol` in `source` (a file of this folder), registered as `target` for the CPU.
    `env_off`: an environment variable that, set to 0, keeps the kernel off (for A/B runs)."""

    def __init__(self, source: str, symbol: str, target: str, env_off: str, what: str):
        self.source = os.path.join(HERE, source)
        self.symbol, self.target, self.env_off, self.what = symbol, target, env_off, what
        self._lock = threading.Lock()
        self._state: dict = {}  # "ok": bool once decided, "why": the reason it is off, "lib": the library

    def _key(self, cxx: str) -> str:
        h = hashlib.sha256()
        for path in [self.source] + sorted(glob.glob(os.path.join(HERE, "*.h"))):  # the source and our headers
            with open(path, "rb") as f:
                h.update(f.read())
        include = jax.ffi.include_dir()
        for name in ("ffi.h", "api.h", "c_api.h"):
            with open(os.path.join(include, "xla", "ffi", "api", name), "rb") as f:
                h.update(f.read())
        h.update(" ".join(_FLAGS + [cxx, _cpu_flags()]).encode())
        return h.hexdigest()[:24]

    def _build(self) -> ctypes.CDLL:
        """Compile (once per key, under a file lock) and load the library. Raises with the compiler's output."""
        from filelock import FileLock

        cxx = _compiler()
        if cxx is None:
            raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX') or 'c++'} not on PATH)")
        out_dir = os.path.join(_cache_root(), self._key(cxx))
        lib = os.path.join(out_dir, "lib" + os.path.splitext(os.path.basename(self.source))[0] + ".so")
        os.makedirs(out_dir, exist_ok=True)
        with FileLock(lib + ".lock"):
            if not os.path.exists(lib):
                tmp = f"{lib}.{os.getpid()}.tmp"
                cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), "-I", HERE, self.source, "-o", tmp]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{res.stderr[-2000:]}")
                os.replace(tmp, lib)
        return ctypes.CDLL(lib)

    def available(self) -> bool:
        """Whether the kernel is built, loaded and registered with XLA for the CPU platform (decided once)."""
        with self._lock:
            if "ok" not in self._state:
                if os.environ.get(self.env_off, "1") == "0":
                    self._state.update(ok=False, why=f"{self.env_off}=0")
                else:
                    try:
                        lib = self._build()
                        jax.ffi.register_ffi_target(self.target, jax.ffi.pycapsule(getattr(lib, self.symbol)),
                                                    platform="cpu")
                        self._state.update(ok=True, lib=lib)
                    except Exception as e:  # noqa: BLE001 - any failure means: keep XLA's path, say why once
                        self._state.update(ok=False, why=f"{type(e).__name__}: {e}")
                        log.warning("the native %s is off (XLA's path is used): %s", self.what, self._state["why"])
            return self._state["ok"]

    def why_not(self) -> str | None:
        """Why `available()` is False (None when it is True or not decided yet)."""
        return self._state.get("why")
