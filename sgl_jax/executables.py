"""Compiled step executables kept on disk, so that a warm start neither traces nor lowers the model.

JAX's persistent compilation cache skips XLA's compile, but it is consulted only after the step has been
traced (~0.7 s per shape for a 30-layer model) and lowered (~0.4 s): with 36 shapes that is most of a warm
start. This store saves each compiled step (`jax.experimental.serialize_executable`) under a fingerprint of
everything the executable depends on, and loads it back at start-up without touching the model code.

The fingerprint covers: the jax and jaxlib versions, the backend and its devices, `XLA_FLAGS`, the source of
every module that can take part in the step (a digest of `pallas_kernels` and of `sgl_jax` minus its
host-only packages -- the frontend, the server, the engine loop, the scheduler and the radix cache, which
never run on the device -- so a change to device code is a miss, never a stale executable), the runner's
own settings (given by the caller) and the shapes/dtypes of the device state.

An executable that XLA:CPU read back from jax's persistent compilation cache serializes incompletely (its
object code is missing: calling the copy fails with "Function ... not found"), so the shapes this store
saves are compiled by the backend directly, past jax's persistent and in-process caches (`compile_fresh`,
which hooks one jax-internal function; without it the store is off); the store is their
cache instead. The cost: a shape missing here but present in jax's cache (the first start after an
upgrade, or a device-code edit that leaves the HLO as it was) is compiled in full once. A file that cannot be read back
(truncated, bytes changed: each file carries a sha256 of its body, checked before anything is unpickled;
or written by another version) is deleted and the shape is compiled again; a store that cannot be written (read-only, disk full) is turned
off with one warning. Loading runs pickle: the directory must be as trusted as the compilation cache next
to it (both live under the user's cache directory).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import shutil
import threading

import jax

log = logging.getLogger("sgl_jax.executables")

_FORMAT = 1  # bump when the file layout changes
_MAGIC = b"sgl_jax-exe-%d\n" % _FORMAT  # a file: _MAGIC, sha256 of the body, the body (pickled executable)
_KEEP = 6  # fingerprint directories kept (older ones are removed when a new one is created)


# host-only parts of sgl_jax (relative to the package): they never build or run device code
_HOST_ONLY = {"program", "serve", "engine", "cache", "scheduler.py", "metrics.py", "errors.py"}


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the Python sources that can take part in the step (`pallas_kernels`, and `sgl_jax` but
    for its host-only parts)."""
    import pallas_kernels
    import sgl_jax

    h = hashlib.sha256()
    for pkg in (sgl_jax, pallas_kernels):
        root = os.path.dirname(os.path.abspath(pkg.__file__))
        for dirpath, dirnames, filenames in os.walk(root):
            top = dirpath == root and pkg is sgl_jax
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not (top and d in _HOST_ONLY))
            for name in sorted(filenames):
                if name.endswith((".py", ".cc", ".h")) and not (top and name in _HOST_ONLY):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def fingerprint(settings, state_avals) -> str:
    """Hex digest naming one family of executables: environment, code, `settings` (any JSON-able value
    the caller's step depends on) and the device state's tree of shapes/dtypes."""
    import jaxlib

    devices = jax.devices()
    parts = [_FORMAT, jax.__version__, jaxlib.__version__, jax.default_backend(),
             [(d.platform, getattr(d, "device_kind", ""), d.id) for d in devices],
             getattr(devices[0].client, "platform_version", ""), os.environ.get("XLA_FLAGS", ""),
             source_digest(), settings, str(jax.tree_util.tree_structure(state_avals)),
             [(tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(state_avals)]]
    return hashlib.sha256(json.dumps(parts, default=repr).encode()).hexdigest()[:32]


_fresh = threading.local()  # .on: compile in this thread without jax's caches (see compile_fresh)
_install_lock = threading.Lock()
_installed: bool | None = None  # None: not tried yet; False: this jax lacks the hook (saving stays off)


def _install_fresh_hook() -> bool:
    """Wrap jax's compile-or-read-the-persistent-cache function so that a thread with `_fresh.on` compiles
    with the backend directly. jax internals: if they are not there, the store is off."""
    global _installed
    with _install_lock:
        if _installed is None:
            try:
                from jax._src import compiler

                orig, direct = compiler.compile_or_get_cached, compiler.backend_compile_and_load

                def compile_or_get_cached(backend, computation, devices, compile_options, host_callbacks,
                                          executable_devices, *args, **kwargs):
                    if getattr(_fresh, "on", False):
                        return direct(backend, computation, executable_devices, compile_options, host_callbacks)
                    return orig(backend, computation, devices, compile_options, host_callbacks, executable_devices,
                                *args, **kwargs)

                compiler.compile_or_get_cached = compile_or_get_cached
                _installed = True
            except (ImportError, AttributeError) as e:
                log.warning("compiled steps will not be saved: this jax has no compile hook (%s)", e)
                _installed = False
        return _installed


# XLA:CPU hands dots and their neighbours to YNNPACK fusions by default. In whole SmolLM2 decode steps (native
# attention, ctx 512, 2-core Zen 3, interleaved) they cost 127 vs 164 ms at 16 rows, 235 vs 256 at 32 and were even
# at 64; a 512-token prefill was 5 % faster with them, 128 tokens even (bench/notes.md, "Native paged attention on
# CPU"). So a step of at most YNN_OFF_MAX_TOKENS tokens (the decode shapes) is compiled with them off, larger ones
# with the defaults. Per compile, so a user's other jax code keeps its defaults.
YNN_OFF_MAX_TOKENS = 64
_CPU_FEW_ROWS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_cpu_options_ok: bool | None = None


def step_compile_options(tokens: int) -> dict:
    """The compiler options the runner's step of `tokens` tokens is compiled with on this backend ({} off CPU,
    for more tokens, or where this jax does not know the option: then one warning and XLA's defaults)."""
    global _cpu_options_ok
    if jax.default_backend() != "cpu" or tokens > YNN_OFF_MAX_TOKENS:
        return {}
    if _cpu_options_ok is None:
        try:
            jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((1,), "float32")).compile(
                compiler_options=_CPU_FEW_ROWS)
            _cpu_options_ok = True
        except Exception as e:  # noqa: BLE001 - an unknown option: keep the defaults, say so once
            _cpu_options_ok = False
            log.warning("XLA:CPU option %s is not accepted (%s): the step keeps XLA's default fusions",
                        _CPU_FEW_ROWS, e)
    return dict(_CPU_FEW_ROWS) if _cpu_options_ok else {}


def compile_fresh(lowered, options: dict | None = None):
    """`lowered.compile(compiler_options=options)` compiled by the backend itself: neither jax's persistent
    cache nor its in-process cache may hand back an executable that was read from disk (see the module
    docstring). The extra option is a dump setting at its default value: it changes the in-process cache key,
    not the code."""
    _install_fresh_hook()
    _fresh.on = True
    try:
        return lowered.compile(compiler_options={"xla_dump_max_hlo_modules": -1, **(options or {})})
    finally:
        _fresh.on = False


class ExecutableStore:
    """Serialized compiled functions in `root/<fingerprint>/<name>.exe` (see the module docstring)."""

    def __init__(self, root: str, fp: str):
        self.root = os.path.expanduser(root)
        self.dir = os.path.join(self.root, fp)
        self.enabled = _install_fresh_hook()  # False: this jax lacks the hook, so the store stays off
        self.loaded = 0  # executables read back this process
        self.saved = 0
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name + ".exe")

    def load(self, name: str):
        """The compiled function saved as `name`, or None (missing, or unreadable: then deleted)."""
        if not self.enabled:
            return None
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError:
            return None
        from jax.experimental.serialize_executable import deserialize_and_load

        try:
            head, digest, body = blob[:len(_MAGIC)], blob[len(_MAGIC):len(_MAGIC) + 32], blob[len(_MAGIC) + 32:]
            if head != _MAGIC:
                raise ValueError("not an executable file of this format")
            if hashlib.sha256(body).digest() != digest:
                raise ValueError("checksum mismatch (truncated or corrupt)")
            payload, in_tree, out_tree = pickle.loads(body)
            compiled = deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # noqa: BLE001 - any unreadable entry is recompiled, never served
            log.warning("dropping unreadable executable %s (%s: %s); compiling it again", path,
                        type(e).__name__, e)
            try:
                os.remove(path)
            except OSError:
                pass
            return None
        with self._lock:
            self.loaded += 1
        return compiled

    def save(self, name: str, compiled) -> None:
        """Write `compiled` (from `compile_fresh`: see the module docstring) as `name`, atomically; on any
        failure turn the store off with one warning."""
        if not self.enabled:
            return
        from jax.experimental.serialize_executable import serialize

        try:
            payload, in_tree, out_tree = serialize(compiled)
            body = pickle.dumps((payload, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
            blob = _MAGIC + hashlib.sha256(body).digest() + body
            new_dir = not os.path.isdir(self.dir)
            os.makedirs(self.dir, exist_ok=True)
            if new_dir:
                self._prune()
            path = self._path(name)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except Exception as e:  # noqa: BLE001 - the store is an optimisation: serving goes on without it
            self.enabled = False
            log.warning("not saving compiled executables under %s any more (%s: %s)", self.dir,
                        type(e).__name__, e)
            return
        with self._lock:
            self.saved += 1

    def _prune(self) -> None:
        """Keep the newest _KEEP fingerprint directories (each code or config change makes a new one)."""
        try:
            dirs = [os.path.join(self.root, d) for d in os.listdir(self.root)]
            dirs = sorted((d for d in dirs if os.path.isdir(d) and d != self.dir), key=os.path.getmtime)
        except OSError:
            return
        for d in dirs[:max(0, len(dirs) - (_KEEP - 1))]:
            shutil.rmtree(d, ignore_errors=True)
