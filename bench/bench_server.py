"""Load and shared-prefix benchmarks against the HTTP server (loopback only, bounded in count and time).

    python bench/bench_server.py load    [--url URL | --config configs/smollm2-135m.yaml] [--num 256]
    python bench/bench_server.py prefix  [--url URL | --config ...] [--llama-server PATH --gguf PATH]

`load`: N concurrent streaming /generate requests of mixed lengths (greedy). Checks that every request
completes exactly once with its own id, and that each output equals the same request run alone on the
unloaded server; reports p50/p99 time to first token and throughput.

`prefix`: the 16-request shared-prefix workload of ../shared/reference/cpu-baselines.md (a ~400-token
shared prefix + an 18-22-token distinct suffix, 64 greedy output tokens, EOS ignored), all sent at once
to a fresh server (cold), then again with new suffixes (warm). Runs llama.cpp's `llama-server -cb -np 16`
on the same GGUF in the same invocation when one is found (bench/peers.py: --llama-server, PATH, or the build of
bench/build_llama_server.sh); otherwise the peer is skipped (the test is not).
Without --url the script starts `python -m sgl_jax.serve` itself on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the of and to in is was for on that with as by at from his her an which have are were be this "
         "river mountain city garden library music science history ocean forest winter summer market bridge "
         "teacher student engineer painter doctor farmer captain village harbor station museum").split()


class Server:
    """Our server in a subprocess on a free loopback port (or an existing --url)."""

    def __init__(self, url: str | None, config: str, extra: list[str]):
        self.proc = None
        if url:
            self.url = url.rstrip("/")
            return
        port = peers.free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "sgl_jax.serve", "--config", config, "--port", str(port)] + extra
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def wait(self, timeout=900):
        t0 = time.time()
        async with aiohttp.ClientSession() as s:
            while time.time() - t0 < timeout:
                try:
                    async with s.get(self.url + "/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError("the server exited during start-up")
                await asyncio.sleep(1)
        raise TimeoutError("server did not become healthy")

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def stream_generate(session, url, text, sp, timeout=900):
    """One streaming /generate; returns (final event, ttft seconds, e2e seconds, events)."""
    t0 = time.perf_counter()
    ttft, last, n = None, None, 0
    body = {"text": text, "sampling_params": sp, "stream": True}
    async with session.post(url + "/generate", json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            n += 1
            if ttft is None and ev.get("output_ids"):
                ttft = time.perf_counter() - t0
            last = ev
    return last, ttft, time.perf_counter() - t0, n


def make_text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def run_load(args):
    rng = random.Random(0)
    reqs = []
    for i in range(args.num):
        reqs.append((f"Request {i}: " + make_text(rng, rng.randrange(5, 120)),
                     {"temperature": 0, "max_new_tokens": rng.randrange(4, 33), "ignore_eos": True}))
    srv = Server(args.url, args.config, args.server_args)
    try:
        await srv.wait()
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            await s.post(srv.url + "/flush_cache")
            t0 = time.perf_counter()
            alone = []
            for text, sp in reqs:
                ev, _, _, _ = await stream_generate(s, srv.url, text, sp)
                alone.append(ev)
            t_alone = time.perf_counter() - t0
            await s.post(srv.url + "/flush_cache")
            t0 = time.perf_counter()
            res = await asyncio.gather(*(stream_generate(s, srv.url, t, sp) for t, sp in reqs))
            t_load = time.perf_counter() - t0
        ids = [r[0]["meta_info"]["id"] for r in res]
        finished = [r[0]["meta_info"]["finish_reason"] for r in res]
        same = sum(a["output_ids"] == r[0]["output_ids"] for a, r in zip(alone, res))
        ttfts = sorted(r[1] for r in res)
        toks = sum(len(r[0]["output_ids"]) for r in res)
        out = {
            "requests": len(reqs), "completed": sum(f is not None and f["type"] != "abort" for f in finished),
            "unique_ids": len(set(ids)), "identical_to_unloaded": same,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[int(0.99 * (len(ttfts) - 1))],
            "loaded_wall_s": t_load, "loaded_req_per_s": len(reqs) / t_load, "loaded_out_tok_per_s": toks / t_load,
            "unloaded_wall_s": t_alone,
        }
        print(json.dumps(out, indent=1))
        return out
    finally:
        srv.stop()


def prefix_workload(tokenizer_words_rng, n=16):
    rng = tokenizer_words_rng
    prefix = "You are a careful assistant. Here are some notes.\n" + make_text(rng, 330) + "\n"
    return prefix, [prefix + f"Question {i}: " + make_text(rng, rng.randrange(14, 18)) + "?" for i in range(n)]


async def burst(url, texts, sp):
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream_generate(s, url, t, sp) for t in texts))
        return time.perf_counter() - t0, res


def default_gguf() -> str:
    sys.path.insert(0, ROOT)
    from sgl_jax.models.hub import resolve_model

    return resolve_model("smollm2-135m")


def config_weights_kv(path: str) -> tuple[str, int]:
    """(weight quantization, bytes per KV pool element) of a preset, as the engine reads it."""
    import numpy as np

    from sgl_jax.config import load_config

    e = load_config(path).engine
    return e.quantization, np.dtype(e.effective_kv_dtype).itemsize


def weight_bytes(reader, quant: str) -> int:
    """The bytes of weights a decode step reads with this quantization: float32 4 a parameter; int8 1 (matrices;
    norms stay float32); gguf the file's Q4_1 blocks for the linears it keeps (loader._keeps_q4_1), int8 else."""
    import numpy as np

    from sgl_jax.models import gguf_quants
    from sgl_jax.models.loader import _keeps_q4_1, gguf_name_to_hf

    total = 0
    for t in reader.tensors:
        n = int(np.prod([int(x) for x in t.shape]))
        hf = gguf_name_to_hf(t.name) or ""
        if quant == "gguf" and int(t.tensor_type) == int(gguf_quants.QT.Q4_1) and _keeps_q4_1(hf):
            total += n // 32 * 20
        else:
            total += n * (4 if quant == "none" or len(t.shape) < 2 else 1)
    return total


def prefix_floor(gguf: str, n: int, out_tokens: int, ours: dict, quant: str = "none", kv_bytes: int = 4) -> dict:
    """The burst's physical floor on this machine, measured now: the prompt tokens our server computed
    (cold: the shared prefix once plus the suffixes) at the large-GEMM rate, plus `out_tokens` decode steps of
    `n` rows, each the larger of reading the weights and the rows' KV once (`kv_bytes` per element, at the mean
    context) and its FLOPs at the [n, hidden] GEMM rate. float32 weights: 4 bytes each, numpy's / XLA's float32
    GEMM rates; int8 weights: 1 byte each, and the faster of those and the int8 kernel's rates
    (floors.int8_gemm_rate: there is no other int8 GEMM here); gguf: the Q4_1 blocks' bytes (weight_bytes) and
    the int8 rates (its kernel is an integer one too)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    sys.path.insert(0, ROOT)
    from floors import copy_bandwidth, int8_gemm_rate, jnp_gemm_rate, numpy_gemm_rate
    from sgl_jax.models.config import ModelConfig
    from sgl_jax.models.loader import read_gguf

    reader, meta = read_gguf(gguf)
    cfg = ModelConfig.from_gguf(meta, any(t.name == "output.weight" for t in reader.tensors))
    fpt = cfg.flops_per_token()
    bw, big = copy_bandwidth(1 << 30, threads=2), numpy_gemm_rate(2048)
    small = jnp_gemm_rate(n, cfg.hidden_size, cfg.intermediate_size)
    if quant != "none":
        big = max(big, int8_gemm_rate())
        small = max(small, int8_gemm_rate(n, cfg.hidden_size, cfg.intermediate_size))
    ctx = ours["cold_prompt_tokens"] / n + out_tokens / 2
    step = max((weight_bytes(reader, quant) + n * ctx * cfg.kv_bytes_per_token(kv_bytes)) / bw, n * fpt / small)
    out = {"weights": quant, "kv_bytes": kv_bytes, "copy_gbs": bw / 1e9,
           "gemm_gflops": big / 1e9,
           f"gemm_{n}_rows_gflops": small / 1e9, "decode_step_ms": 1e3 * step}
    for phase in ("cold", "warm"):
        computed = ours[f"{phase}_prompt_tokens"] - ours[f"{phase}_cached_tokens"]
        secs = computed * fpt / big + out_tokens * step
        out[f"{phase}_req_per_s"] = n / secs
    return out


async def run_prefix(args):
    rng = random.Random(1)
    _, cold = prefix_workload(rng)
    rng2 = random.Random(2)
    warm = [t.rsplit("Question", 1)[0] + f"Question {i}: " + make_text(rng2, rng2.randrange(14, 18)) + "?"
            for i, t in enumerate(cold)]
    sp = {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}
    results = {}
    srv = Server(args.url, args.config, args.server_args)
    try:
        await srv.wait()
        async with aiohttp.ClientSession() as s:
            t0 = time.time()  # the background compiler would share the cores with the timed bursts
            while time.time() - t0 < 1800:
                async with s.get(srv.url + "/get_server_info") as r:
                    if (await r.json()).get("background_compile_done", True):
                        break
                await asyncio.sleep(2)
            await s.post(srv.url + "/flush_cache")
            async with s.post(srv.url + "/tokenize", json={"text": cold[0]}) as r:
                prompt_tokens = (await r.json()).get("count")
        t_cold, res_c = await burst(srv.url, cold, sp)
        t_warm, res_w = await burst(srv.url, warm, sp)
        results["sgl_jax"] = {"prompt_tokens": prompt_tokens, "cold_req_per_s": 16 / t_cold,
                              "warm_req_per_s": 16 / t_warm,
                              "cold_cached_tokens": sum(r[0]["meta_info"]["cached_tokens"] for r in res_c),
                              "warm_cached_tokens": sum(r[0]["meta_info"]["cached_tokens"] for r in res_w),
                              "cold_prompt_tokens": sum(r[0]["meta_info"]["prompt_tokens"] for r in res_c),
                              "warm_prompt_tokens": sum(r[0]["meta_info"]["prompt_tokens"] for r in res_w)}
    finally:
        srv.stop()
    results["floor"] = prefix_floor(args.gguf or default_gguf(), len(cold), 64,
                                    results["sgl_jax"], *config_weights_kv(args.config))
    llama = peers.find_llama_server(args.llama_server)
    if llama:
        with peers.LlamaServer(llama, args.gguf or default_gguf(), ["-cb", "-np", 16, "-t", 2, "-c", 16 * 512]) as peer:

            async def one(session, text):
                body = {"prompt": text, "n_predict": 64, "temperature": 0, "ignore_eos": True, "cache_prompt": True}
                async with session.post(peer.url + "/completion", json=body) as r:
                    return await r.json()

            async def peer_burst(texts):
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                    t0 = time.perf_counter()
                    await asyncio.gather(*(one(s, t) for t in texts))
                    return time.perf_counter() - t0

            results["llama-server -np 16"] = {"cold_req_per_s": 16 / await peer_burst(cold),
                                              "warm_req_per_s": 16 / await peer_burst(warm)}
    else:
        results["llama-server -np 16"] = peers.SKIPPED
    print(json.dumps(results, indent=1))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["load", "prefix"])
    ap.add_argument("--url")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2-135m.yaml"))
    ap.add_argument("--server-args", nargs="*", default=[])
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--llama-server", help="the peer's binary (default: bench/peers.py finds one)")
    ap.add_argument("--gguf")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = asyncio.run(run_load(args) if args.what == "load" else run_prefix(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
