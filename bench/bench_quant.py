"""int8 weight-only vs float32 weights, SmolLM2-135M decode forward on this CPU, interleaved for a fair A/B.

    python bench/bench_quant.py [--batches 1,8] [--ctxs 128,512] [--rounds 5] [--n 10] [--wait-quiet S]
                                [--json OUT]

Both models (bench_model.ModelBench: the jitted forward with the KV pool donated, on inputs already on the
device, timed to block_until_ready) are loaded and compiled for every shape first; then each shape is timed
in `--rounds` rounds of `--n` calls per model, the order of the two models alternating between rounds, so
that load from other processes on the shared machine hits both alike. Reported per shape: the median and the
fastest call of each model, their ratio, and each model's memory floor measured in the same run: weight
bytes (int8 + float32 scales for int8) + KV bytes of B x ctx tokens, over the copy bandwidth
(bench/floors.py, read + write counted). Also one [1,576] x [576,1536] matmul, float32 vs int8 converted in
the graph (bench/floors.py int8_matmul_times). Figures recorded in bench/notes.md ("int8 weight-only
quantization").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_model as bm  # noqa: E402
import floors  # noqa: E402

QUANTS = ("none", "int8")


def decode_batch(cfg, batch: int, ctx: int):
    """B sequences of one new token at position ctx - 1, pages assigned consecutively from page 1."""
    import numpy as np

    from sgl_jax.batch import SeqChunk, pack

    pp = math.ceil(ctx / bm.PAGE_SIZE)
    rng = np.random.default_rng(1)
    chunks = [SeqChunk([int(rng.integers(cfg.vocab_size))], ctx - 1, list(range(1 + i * pp, 1 + (i + 1) * pp)))
              for i in range(batch)]
    return pack(chunks, page_size=bm.PAGE_SIZE, block_q=1)


def time_calls(run, n: int) -> list[float]:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
    return ts


def bench_shape(models: dict, batch: int, ctx: int, rounds: int, n: int) -> dict:
    runs = {q: mb._run_fn(decode_batch(mb.cfg, batch, ctx)) for q, mb in models.items()}
    out = {}
    for q, run in runs.items():
        t0 = time.perf_counter()
        run()  # compile
        out[q] = {"compile_s": time.perf_counter() - t0, "times": []}
        for _ in range(2):
            run()
    busy = floors.cpu_busy_fraction(0.5)
    for r in range(rounds):
        for q in (QUANTS if r % 2 == 0 else QUANTS[::-1]):
            out[q]["times"] += time_calls(runs[q], n)
    for q in QUANTS:
        ts = out[q].pop("times")
        out[q].update(median_ms=1e3 * statistics.median(ts), min_ms=1e3 * min(ts), n=len(ts))
    out["busy_before"] = busy
    return out


def report(res: dict) -> str:
    bw = res["copy_bw"]
    w = {q: res["weight_bytes"][q] for q in QUANTS}
    lines = [f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write); weights float32 {w['none'] / 1e6:.0f} MB, int8 "
             f"{w['int8'] / 1e6:.0f} MB; KV {res['kv_bytes_per_token'] / 1e3:.0f} KB/token (float32)",
             "| decode | f32 median ms | f32 min | f32 mem floor | int8 median ms | int8 min | int8 mem floor "
             "| int8/f32 (median) | busy before |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in res["shapes"].items():
        B, ctx = map(int, key.split("x"))
        kv = B * ctx * res["kv_bytes_per_token"]
        fl = {q: 1e3 * (w[q] + kv) / bw for q in QUANTS}
        f, i = r["none"], r["int8"]
        lines.append(f"| B={B} ctx={ctx} | {f['median_ms']:.1f} | {f['min_ms']:.1f} | {fl['none']:.1f} | "
                     f"{i['median_ms']:.1f} | {i['min_ms']:.1f} | {fl['int8']:.1f} | "
                     f"{i['median_ms'] / f['median_ms']:.2f} | {r['busy_before']:.0%} |")
    mm = res["int8_matmul"]
    lines.append(f"one matmul {mm['shape']}, best of {mm['n']}: float32 {mm['float_us']:.1f} us, int8 converted "
                 f"{mm['int8_us']:.1f} us")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ctxs", default="128,512")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per shape")
    ap.add_argument("--n", type=int, default=10, help="timed calls per model per round")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each shape wait up to S seconds for the (shared) machine to go idle")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",")]
    ctxs = [int(x) for x in a.ctxs.split(",")]
    t_start = time.perf_counter()
    floors.wait_for_quiet(a.wait_quiet)
    res: dict = {"argv": sys.argv, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                 "copy_bw": max(floors.copy_bandwidth(1 << 30, 1), floors.copy_bandwidth(1 << 30, 2)),
                 "int8_matmul": floors.int8_matmul_times(1, 576, 1536, "float32")}
    num_pages = 1 + max(batches) * math.ceil(max(ctxs) / bm.PAGE_SIZE)
    models = {q: bm.ModelBench("float32", num_pages, "jnp", q) for q in QUANTS}
    res["weight_bytes"] = {q: mb.weight_bytes for q, mb in models.items()}
    res["kv_bytes_per_token"] = models["none"].cfg.kv_bytes_per_token(4)
    res["shapes"] = {}
    for ctx in ctxs:
        for B in batches:
            floors.wait_for_quiet(a.wait_quiet)
            r = res["shapes"][f"{B}x{ctx}"] = bench_shape(models, B, ctx, a.rounds, a.n)
            print(f"decode B={B} ctx={ctx}: f32 {r['none']['median_ms']:.1f} ms (min {r['none']['min_ms']:.1f}), "
                  f"int8 {r['int8']['median_ms']:.1f} ms (min {r['int8']['min_ms']:.1f}); "
                  f"{r['busy_before']:.0%} busy before", flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    print(report(res))
    print(f"total {res['wall_s']:.0f} s, load average after {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
