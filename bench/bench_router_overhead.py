"""The router's own cost per request, with the engines out of the picture: fake streaming workers, bursts.

    python bench/bench_router_overhead.py [--rounds 3] [--root DIR ...] [--gateway]

Four fake workers in this process (aiohttp; each answers `/generate` with `max_new_tokens` SSE events 5 ms apart,
and `/get_server_info`, `/health`) take bursts of 24 streamed requests (8 bursts a round, ~230-character prompts),
sent by this process straight to the workers round-robin (the floor: no router) and through `python -m
sgl_jax.router` started from each `--root` checkout (default: this one; give two to compare builds in one
invocation). Per round: the router process's CPU time per request (all its threads, /proc schedstat), TTFT p50 /
p99 at the client, and when the requests reached the workers after their burst was sent (first / median / max):
a router that handles a burst one request after another shows it as a spread of arrivals.
`--gateway` adds SGLang's gateway (`sglang_router`, cache_aware) in front of the same fake workers; its TTFT here is
not comparable (it first tries HTTP/2 on each connection, which the fake workers refuse), its CPU per request is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARRIVALS: list[float] = []
PROMPT = "[tenant 1] You are assistant 1. alpha beta gamma delta river stone cloud paper metal garden window " * 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    tot = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                tot += int(f.read().split()[0])
        except OSError:
            pass
    return tot / 1e9


async def _fake_workers(n: int) -> list[str]:
    from aiohttp import web

    async def gen(request):
        ARRIVALS.append(time.perf_counter())
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(body.get("sampling_params", {}).get("max_new_tokens", 16)):
            await asyncio.sleep(0.005)
            d = {"text": "x" * (i + 1), "meta_info": {"prompt_tokens": 150, "cached_tokens": 100,
                                                      "completion_tokens": i + 1, "finish_reason": None}}
            await resp.write(f"data: {json.dumps(d)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def info(request):
        return web.json_response({"cache": {"page_size": 4}, "scheduler": {"max_running_requests": 8,
                                                                           "max_prefill_tokens": 256}})

    async def health(request):
        return web.json_response({})

    app = web.Application()
    app.add_routes([web.post("/generate", gen), web.get("/get_server_info", info), web.get("/health", health)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = [_port() for _ in range(n)]
    for p in ports:
        await web.TCPSite(runner, "127.0.0.1", p).start()
    return [f"http://127.0.0.1:{p}" for p in ports]


async def _rounds(session, urls: list[str], rounds: int, pid: int | None, label: str) -> None:
    async def one(i, ttfts):
        t0 = time.perf_counter()
        first = None
        async with session.post(urls[i % len(urls)] + "/generate", json={
                "text": PROMPT + f" user {i} Q?", "stream": True, "sampling_params": {"max_new_tokens": 16}}) as r:
            async for _ in r.content.iter_any():
                if first is None:
                    first = time.perf_counter() - t0
        ttfts.append(first)

    for rnd in range(rounds + 1):  # round 0 warms up
        c0 = _cpu_seconds(pid) if pid else 0.0
        ttfts, arr = [], []
        for b in range(8):
            ARRIVALS.clear()
            tb = time.perf_counter()
            await asyncio.gather(*(one(b * 24 + i, ttfts) for i in range(24)))
            arr += [1e3 * (x - tb) for x in ARRIVALS]
        cpu = 1e3 * ((_cpu_seconds(pid) if pid else 0.0) - c0) / len(ttfts)
        ttfts.sort()
        arr.sort()
        if rnd:
            print(f"{label:<34} {cpu:>8.2f} {1e3 * ttfts[len(ttfts) // 2]:>9.1f} {1e3 * ttfts[-2]:>9.1f} "
                  f"{arr[0]:>7.1f} {arr[len(arr) // 2]:>7.1f} {arr[-1]:>7.1f}", flush=True)


async def main_async(a) -> None:
    import aiohttp

    from sgl_jax.models.testing import write_tiny_gguf

    model = write_tiny_gguf("llama", os.path.join(tempfile.mkdtemp(prefix="bench_router_overhead_"), "tiny.gguf"))
    workers = await _fake_workers(4)
    print(f"{'router':<34} {'CPU ms/r':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'arr 1st':>7} {'arr med':>7} "
          f"{'arr max':>7}   (ms; arrivals at the workers after the burst)")
    async with aiohttp.ClientSession() as s:
        await _rounds(s, workers, a.rounds, None, "none (client -> workers): floor")
        targets = [(f"ours {r}" if r != ROOT else "ours (this checkout)", r) for r in a.root]
        if a.gateway:
            targets.append(("sglang gateway cache_aware", None))
        for label, root in targets:
            port = _port()
            if root is None:
                cmd = ["-m", "sglang_router.launch_router", "--worker-urls", *workers, "--policy", "cache_aware",
                       "--port", str(port), "--prometheus-port", str(_port())]
            else:
                cmd = ["-m", "sgl_jax.router", "--workers", ",".join(workers), "--model", model, "--port", str(port)]
            env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root or ROOT)
            proc = await asyncio.create_subprocess_exec(sys.executable, *cmd, cwd=root or ROOT, env=env,
                                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            try:
                for _ in range(300):
                    try:
                        async with s.get(url + "/health") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)
                await _rounds(s, [url], a.rounds, proc.pid, label)
            finally:
                proc.kill()
                await proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of 8 bursts of 24 per router")
    ap.add_argument("--root", action="append", default=[],
                    help="a checkout whose sgl_jax.router to run (repeatable; default: this one)")
    ap.add_argument("--gateway", action="store_true", help="also SGLang's gateway (CPU per request only)")
    a = ap.parse_args()
    a.root = [os.path.abspath(r) for r in a.root] or [ROOT]
    import logging

    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # the gateway's HTTP/2 tries, refused
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_async(a))


if __name__ == "__main__":
    main()
