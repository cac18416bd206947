"""Routing across replicas: round-robin, SGLang's gateway (`sglang-router`, cache_aware) and ours (cost by
mirrored cache match and load, late binding), on one multi-tenant workload over 2 and 4 replicas.

Workers: `python -m sgl_jax.serve` on the tiny random-weight model (2 layers, byte-level tokenizer: a character is
a token), so two CPU cores are not the bottleneck, each with a small pool (`--pages`, default 160 pages of 4
tokens = 640 tokens: about 3 of the 8 system prompts) and KV events on. Workload (seeded): 8 tenants, each a
system prompt of ~110 tokens; 64 users, spread over the tenants and drawn with Zipf(1.1) popularity, each with a
profile line of ~30 tokens; a request = system prompt + profile + a question (~20 tokens), 16 new tokens, sent in
bursts of `--burst` at once with pauses. Every policy gets the same requests in the same order, on flushed caches.

Figures per policy: aggregate hit rate (cached / prompt tokens, from each answer's meta_info), time to first
token p50 / p99 (streamed; client side), the queue imbalance (each worker's `sgl_jax_num_running` +
`num_waiting`, sampled every 50 ms while requests are in flight: the mean over samples of max / mean across
workers), wall time. Beside them: the optimal hit rate of the workload (every page-aligned prefix computed once,
an unbounded cache: the ceiling), and the TTFT of one request on an idle worker (the floor), measured in the same
run.

    python bench/bench_router.py [--replicas 2,4] [--requests 192] [--burst 24] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sgl_jax.models.testing import write_tiny_gguf  # noqa: E402
from sgl_jax.router.policy import DEFAULT_COPY_WEIGHT  # noqa: E402

WORKER = ("max_context_len=256 max_running_requests=8 max_prefill_tokens=256 prefill_block=16 decode_buckets=1,4,8 "
          "prefill_block_buckets=2,8,16 max_mixed_blocks=2 page_width_buckets=64 kv_memory_gb=0.05 "
          "host_memory_gb=0 page_size=4 warmup=true").split()
WORDS = ("alpha beta gamma delta river stone cloud paper metal garden window silver orange planet music forest "
         "engine market signal harbor winter summer copper violet").split()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def workload(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    systems = [f"[tenant {t}] You are assistant {t}. " + text(16) for t in range(8)]
    users = [(u % 8, f" User {u} profile: " + text(4)) for u in range(64)]
    weights = [1.0 / (i + 1) ** 1.1 for i in range(len(users))]
    rng.shuffle(weights)
    out = []
    for _ in range(n):
        t, prof = rng.choices(users, weights)[0]
        out.append(systems[t] + prof + " Q: " + text(3) + "?")
    return out


def optimal_hit_rate(prompts: list[list[int]], ps: int) -> float:
    seen, cached, total = set(), 0, 0
    for ids in prompts:
        total += len(ids)
        for i in range(len(ids) // ps):
            key = tuple(ids[:(i + 1) * ps])
            if key in seen:
                cached += ps
            seen.add(key)
    return cached / total


class Run:
    """One policy over the workload: streams each request, samples the workers' queues."""

    def __init__(self, url, workers, prompts, burst, max_new):
        self.url, self.workers, self.prompts, self.burst, self.max_new = url, workers, prompts, burst, max_new
        self.ttft, self.cached, self.prompt_tokens, self.errors = [], 0, 0, 0
        self.imb: list[float] = []
        self.lock = threading.Lock()

    def one(self, text):
        t0 = time.perf_counter()
        first, last = None, None
        try:
            with requests.post(self.url + "/generate", json={"text": text, "stream": True, "sampling_params": {
                    "max_new_tokens": self.max_new, "temperature": 0}}, stream=True, timeout=300,
                    headers={"Content-Type": "application/json"}) as r:
                buf = b""
                for data in r.iter_content(chunk_size=None):  # bytes as they arrive (iter_lines buffers 512)
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    for ln in lines:
                        if ln.startswith(b"data: {"):
                            if first is None:
                                first = time.perf_counter() - t0
                            last = json.loads(ln[6:])
        except requests.RequestException:
            pass
        with self.lock:
            if last is None or "meta_info" not in last:
                self.errors += 1
                return
            self.ttft.append(first)
            self.cached += last["meta_info"]["cached_tokens"]
            self.prompt_tokens += last["meta_info"]["prompt_tokens"]

    def sample(self, stop):
        pat = re.compile(rb"^sgl_jax_num_(running|waiting) (\S+)$", re.M)
        while not stop.is_set():
            q = []
            for w in self.workers:
                try:
                    q.append(sum(float(v) for _, v in pat.findall(requests.get(w + "/metrics", timeout=2).content)))
                except requests.RequestException:
                    q.append(0.0)
            if sum(q) > 0:
                self.imb.append(max(q) / (sum(q) / len(q)))
            stop.wait(0.05)

    def go(self):
        stop = threading.Event()
        sampler = threading.Thread(target=self.sample, args=(stop,), daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        for i in range(0, len(self.prompts), self.burst):
            ts = [threading.Thread(target=self.one, args=(p,)) for p in self.prompts[i:i + self.burst]]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        q = sorted(self.ttft)
        return dict(hit=self.cached / max(1, self.prompt_tokens), p50=_pct(q, 0.5), p99=_pct(q, 0.99),
                    imb=statistics.mean(self.imb) if self.imb else 1.0, wall=wall, errors=self.errors, n=len(q),
                    ttfts=q)


class RayRun(Run):
    """A run through the Ray Serve application: the imbalance is sampled from the router's view (/router_stats:
    requests in flight per replica), which Ray's default router does not expose (reported as 1.00 there)."""

    def sample(self, stop):
        while not stop.is_set():
            try:
                routers = requests.get(self.url + "/router_stats", timeout=2).json()["routers"]
                q = [r["inflight"] for r in routers[0]["replicas"]] if routers else []
            except (requests.RequestException, ValueError, KeyError):
                q = []
            if sum(q) > 0:
                self.imb.append(max(q) / (sum(q) / len(q)))
            stop.wait(0.05)


def ray_row(a, n, model, tmp, env, prompts, policy) -> dict:
    """`python -m sgl_jax.serve --replicas n` (a fresh local Ray per row), warmed with another seed's requests."""
    port = _port()
    log = os.path.join(tmp, f"ray-{policy}-{n}.log")
    opts = [f"{k}={v}" for k, v in (("max_inflight", a.max_inflight), ("decode_weight", a.decode_weight),
                                     ("max_bypass", a.max_bypass), ("copy_weight", a.copy_weight),
                                     ("prefill_chunk", a.prefill_chunk)) if v]
    cmd = [sys.executable, "-m", "sgl_jax.serve", "--model", model, "--port", str(port), "--replicas", str(n),
           "--routing-policy", policy, "--ray-actor-options", '{"num_cpus": 0}',
           *(x for o in opts for x in ("--router-option", o)),
           "--set", *WORKER, f"max_num_pages={a.pages}", f"compile_cache_dir={os.path.join(tmp, 'jax_cache')}"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=dict(env, RAY_AUTH_MODE="disabled"),
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while "serving on" not in open(log).read():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray application did not start: {open(log).read()[-2000:]}")
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        warm = workload(8 * n, seed=1)
        for _ in range(2):  # every replica compiles the workload's shapes
            RayRun(url, [], warm, len(warm), a.max_new).go()
        time.sleep(1.0)
        return RayRun(url, [], prompts, a.burst, a.max_new).go()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def proxy_row(a, name, urls, model, tmp, env, prompts) -> dict:
    """One run of the workload through a router process in front of `urls` (flushed first): ours
    (`python -m sgl_jax.router`, cost or round-robin) or SGLang's gateway."""
    for u in urls:
        requests.post(u + "/flush_cache", timeout=30)
    rport = _port()
    if name.startswith("sglang"):
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls, "--policy",
               a.gateway_policy, "--port", str(rport), "--prometheus-port", str(_port())]
    else:
        cmd = [sys.executable, "-m", "sgl_jax.router", "--workers", ",".join(urls), "--model", model,
               "--port", str(rport), "--policy", "cost" if name.startswith("ours") else "round_robin",
               "--decode-weight", str(a.decode_weight), "--max-inflight", str(a.max_inflight),
               "--prefill-chunk", str(a.prefill_chunk), "--max-bypass", str(a.max_bypass),
               "--copy-weight", str(a.copy_weight)]
    router = subprocess.Popen(cmd, stdout=open(os.path.join(tmp, "router.log"), "a"),
                              stderr=subprocess.STDOUT, env=env)
    try:
        rurl = f"http://127.0.0.1:{rport}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                requests.get(rurl + "/health", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.3)
        time.sleep(1.0)
        return Run(rurl, urls, prompts, a.burst, a.max_new).go()
    finally:
        router.kill()
        router.wait()


def pooled(rs: list[dict]) -> dict:
    """Several runs of one policy as one: TTFT percentiles over all their requests, the other figures averaged."""
    q = sorted(t for r in rs for t in r["ttfts"])
    return dict(hit=statistics.mean(r["hit"] for r in rs), p50=_pct(q, 0.5), p99=_pct(q, 0.99),
                imb=statistics.mean(r["imb"] for r in rs), wall=statistics.mean(r["wall"] for r in rs),
                errors=sum(r["errors"] for r in rs), n=len(q), ttfts=q)


def _pct(q: list[float], f: float) -> float:
    return q[min(len(q) - 1, int(len(q) * f))] * 1e3 if q else float("nan")


def _row(label: str, res: dict) -> str:
    return (f"{label:<22} {res['hit']:>9.1%} {res['p50']:>12.1f} {res['p99']:>12.1f} {res['imb']:>10.2f} "
            f"{res['wall']:>7.1f} {res['errors']:>7}")


def main() -> None:
    """The command line, then the rows (policy x replicas x repeats), the pooled rows and the table: long because
    it is the bench's whole script, one step after another."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", default="2,4")
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--burst", type=int, default=24)
    ap.add_argument("--json", default="", help="write the rows (and pooled rows) here")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each aiohttp-router row, alternating the policies; with 2+ a pooled row each")
    ap.add_argument("--pages", type=int, default=160)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--decode-weight", type=float, default=0.0, help="our router's --decode-weight")
    ap.add_argument("--max-inflight", type=int, default=0, help="our router's --max-inflight (0: its default)")
    ap.add_argument("--prefill-chunk", type=int, default=0, help="our router's --prefill-chunk (0: the workers')")
    ap.add_argument("--max-bypass", type=int, default=4, help="our router's --max-bypass")
    ap.add_argument("--copy-weight", type=float, default=DEFAULT_COPY_WEIGHT, help="our router's --copy-weight")
    ap.add_argument("--gateway-policy", default="cache_aware",
                    help="sglang-router's --policy (round_robin: the same placement as our round-robin row, which "
                         "isolates the two proxies' own latency)")
    ap.add_argument("--policies", default="round_robin,sglang,ours,ray_pow2,ray_ours",
                    help="which rows to run: round_robin, sglang, ours, and as a Ray Serve application (`--replicas`) "
                         "ray_pow2 (Ray's default router) and ray_ours (comma-separated)")

    a = ap.parse_args()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    tmp = tempfile.mkdtemp(prefix="bench_router_")
    model = write_tiny_gguf("llama", os.path.join(tmp, "tiny.gguf"))
    prompts = workload(a.requests)
    procs = []
    report: dict = {}
    try:
        for n in [int(x) for x in a.replicas.split(",")]:
            ports = [_port() for _ in range(n)]
            ws = []
            for i, p in enumerate(ports):
                ws.append(subprocess.Popen(
                    [sys.executable, "-m", "sgl_jax.serve", "--model", model, "--port", str(p), "--set", *WORKER,
                     f"max_num_pages={a.pages}", f"compile_cache_dir={os.path.join(tmp, 'jax_cache')}",
                     f"kv_events_endpoint=tcp://127.0.0.1:{_port()}"],
                    stdout=open(os.path.join(tmp, f"w{n}-{i}.log"), "w"), stderr=subprocess.STDOUT, env=env))
            procs += ws
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            for u, w in zip(urls, ws):
                _wait(u, w)
            ids = [requests.post(urls[0] + "/tokenize", json={"text": t}, timeout=30).json()["tokens"]
                   for t in prompts]
            for u in urls:  # compile every shape the workload uses, then measure the idle floor
                Run(u, [u], prompts[:8], 8, a.max_new).go()
            requests.post(urls[0] + "/flush_cache", timeout=30)
            floor = statistics.median(Run(urls[0], [urls[0]], [prompts[0]] * 1, 1, a.max_new).go()["p50"]
                                      for _ in range(5))
            print(f"\n{n} replicas: {len(prompts)} requests in bursts of {a.burst}, pool {a.pages} pages of 4 per "
                  f"replica; optimal hit rate (unbounded cache) {optimal_hit_rate(ids, 4):.1%}; TTFT floor (one "
                  f"request, idle worker, cached prefix) {floor:.1f} ms")
            print(f"{'policy':<22} {'hit rate':>9} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'imbalance':>10} "
                  f"{'wall s':>7} {'errors':>7}")
            runs: dict[str, list[dict]] = {}
            for rep in range(a.repeats):  # the policies alternate, so a drift of the host spreads over all of them
                for name in ("round_robin", "sglang cache_aware", "ours (cost)"):
                    if name.split()[0] in a.policies.split(","):
                        label = f"sglang {a.gateway_policy}" if name.startswith("sglang") else name
                        res = proxy_row(a, name, urls, model, tmp, env, prompts)
                        runs.setdefault(label, []).append(res)
                        print(_row(label if a.repeats == 1 else f"{label} #{rep + 1}", res), flush=True)
            bare = lambda r: {x: v for x, v in r.items() if x != "ttfts"}  # noqa: E731 -- a row without its TTFTs
            report[n] = {"floor_ms": floor, "optimal_hit": optimal_hit_rate(ids, 4),
                         "rows": {k: [bare(r) for r in rs] for k, rs in runs.items()}}
            if a.repeats > 1:
                report[n]["pooled"] = {k: bare(pooled(rs)) for k, rs in runs.items()}
                print(f"pooled over {a.repeats} runs each (TTFT percentiles of all their requests; hit rate, "
                      f"imbalance, wall: means)")
                for label, rs in runs.items():
                    print(_row(label, pooled(rs)), flush=True)
            for w in ws:
                w.kill()
                w.wait()
            for name in ("ray_pow2", "ray_ours"):
                if name in a.policies.split(","):
                    res = ray_row(a, n, model, tmp, env, prompts, "ray_pow2" if name == "ray_pow2" else "cost")
                    print(_row(name, res), flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if a.json and report:
            with open(a.json, "w") as f:
                json.dump({"args": vars(a), "replicas": report}, f, indent=1)


if __name__ == "__main__":
    main()
