"""The peer the benchmarks run beside our figures: llama.cpp's `llama-server` on the same GGUF, same machine, same
invocation -- found, started and stopped here, so every bench finds the same binary the same way.

Where the binary comes from, first found wins: the bench's `--llama-server PATH`; `llama-server` on PATH; the build
`bench/build_llama_server.sh` leaves in the user cache (`built_binary()`: llama.cpp as vendored in the
`llama-cpp-python==0.3.36` sdist, the version ../shared/reference/cpu-baselines.md measured; ~5-20 minutes on two
cores, from PyPI, no other download). Without one, a bench prints `SKIPPED` and never a quoted figure in its place.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp build_llama_server.sh builds
SKIPPED = ("peer skipped: llama-server not found (pass --llama-server PATH, put it on PATH, or build it once with "
           "bench/build_llama_server.sh)")


def cache_dir() -> str:
    """Where build_llama_server.sh builds ($SGL_JAX_PEERS, default ~/.cache/sgl_jax/peers)."""
    return os.path.expanduser(os.environ.get("SGL_JAX_PEERS", "~/.cache/sgl_jax/peers"))


def built_binary() -> str:
    """The path build_llama_server.sh leaves the binary at (it may not exist)."""
    return os.path.join(cache_dir(), f"llama.cpp-{LLAMA_CPP_PYTHON}", "build", "bin", "llama-server")


def find_llama_server(given: str | None = None) -> str | None:
    """The llama-server to run: `given` (which must be an executable file: ValueError naming it otherwise), else the
    one on PATH, else the cached build; None when there is none."""
    if given:
        if not (os.path.isfile(given) and os.access(given, os.X_OK)):
            raise ValueError(f"--llama-server {given!r} is not an executable file")
        return given
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    built = built_binary()
    return built if os.path.isfile(built) and os.access(built, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`binary -m gguf --port P *args` on a free loopback port: `start()` returns once its /health answers 200,
    `stop()` terminates it (started again on the same port and log by the next `start()`: a peer's cache flushed),
    `close()` stops it and removes its log. As a context manager: started when the block starts, closed when it
    ends. Its output goes to a temporary log, whose tail a start-up failure names."""

    def __init__(self, binary: str, gguf: str, args=(), timeout: float = 300.0):
        self.cmd = [binary, "-m", gguf, "--port", str(free_port()), *map(str, args)]
        self.url = f"http://127.0.0.1:{self.cmd[4]}"
        self.timeout = timeout
        self.log = tempfile.NamedTemporaryFile("w+", prefix="llama_server_", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LlamaServer":
        import requests

        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode} during start-up:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.time() > deadline:
                self.stop()
                raise TimeoutError(f"llama-server was not ready after {self.timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        self.log.close()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)

    def __enter__(self) -> "LlamaServer":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-n:]
