"""The real server in a subprocess for the end-to-end tests (one per test session: see conftest.py's `server`).

`python -m sgl_jax.serve --config configs/smollm2-135m.yaml` on a free loopback port, its log in a temp file, with
`engine.warmup=false`: each step shape is compiled when a test first needs it, instead of all of them in a background
thread that competed with the suite for the two cores (start-up and background compilation have tests of their own
in tests/test_engine.py and tests/test_executables.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "smollm2-135m.yaml")
START_TIMEOUT_S = float(os.environ.get("SGL_JAX_E2E_START_TIMEOUT", "600"))  # cold compile cache: ~10 min on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sgl_jax_e2e_", suffix=".log", delete=False)
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sgl_jax.serve", "--config", CONFIG, "--port", str(self.port),
             "--log-level", "warning", "--set", "server.drain_timeout_s=3", "--set", "engine.warmup=false"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-n:]

    def wait_ready(self) -> None:
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"the server was not up after {START_TIMEOUT_S} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


