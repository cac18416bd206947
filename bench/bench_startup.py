"""Server start-up: seconds until /health answers 200, the first request's latency, and when every step
shape is compiled, with and without `shapes.background_compile`, in one invocation.

    python bench/bench_startup.py [--config configs/smollm2-135m.yaml] [--port 30123]

Each mode starts `python -m sgl_jax.serve` as a subprocess (the compilation cache as it is: run it twice
to see a warm start), polls /health every 0.2 s, sends one greedy 32-token request, then polls
/server_info until `background_compile_done`, sends the same kind of request again, and stops the server
with SIGTERM. The floor for a warm start is the model load plus the first shapes' cache hits; the peer
(llama-server) is skipped: it compiles nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def start_once(config: str, port: int, background: bool) -> dict:
    import requests

    t0 = time.time()
    cmd = [sys.executable, "-m", "sgl_jax.serve", "--config", config, "--port", str(port),
           "--set", f"shapes.background_compile={'true' if background else 'false'}"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() - t0 > 900 or p.poll() is not None:
                raise RuntimeError("the server did not become healthy")
            time.sleep(0.2)
        health = time.time() - t0
        body = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 32}}
        t1 = time.time()
        requests.post(url + "/generate", json=body, timeout=600).raise_for_status()
        first = time.time() - t1
        while not requests.get(url + "/server_info", timeout=30).json().get("background_compile_done"):
            time.sleep(0.5)
        all_compiled = time.time() - t0
        t2 = time.time()
        requests.post(url + "/generate", json=body, timeout=600).raise_for_status()
        again = time.time() - t2
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    return {"background_compile": background, "health_s": health, "first_request_s": first,
            "all_compiled_s": all_compiled, "request_when_compiled_s": again}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2-135m.yaml"))
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--modes", default="false,true",
                    help="background_compile settings to start with, in order (e.g. 'true' for the preset only)")
    args = ap.parse_args(argv)
    modes = [m.strip().lower() == "true" for m in args.modes.split(",") if m.strip()]
    rows = [start_once(args.config, args.port, bg) for bg in modes]
    print("| background_compile | /health s | first request (32 tok) s | all shapes compiled s | same request after s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['background_compile']} | {r['health_s']:.1f} | {r['first_request_s']:.2f} | "
              f"{r['all_compiled_s']:.1f} | {r['request_when_compiled_s']:.2f} |")
    print("peer: skipped (llama-server compiles nothing; its start is the model load)")


if __name__ == "__main__":
    main()
