"""The CPU decode step before and after the native kernels (paged attention, few-row float32 matmuls), interleaved.

    python bench/bench_cpu_attention.py [--batches 1,8,16,32,64] [--ctxs 128,512] [--rounds 4] [--json OUT]

Two variants of SmolLM2-135M's jitted forward (as bench_model.py times it: KV pool donated, inputs on the device),
compiled side by side:
  before  the jnp paged attention and XLA's dots, compiled with XLA:CPU's default options (YNNPACK fusions on);
  after   what the engine runs now: the native attention (pallas_kernels/cpu_attention.py), the native float32
          matmul for 2-8 rows (pallas_kernels/cpu_matmul.py), compiled with the runner's options for the step's
          token count (sgl_jax.executables.step_compile_options).
Every (variant, batch, context) is timed in rounds that alternate between the variants, so both see the same
machine (this host is shared and moves 20-35 % within minutes). Also per layer: the attention call alone at
SmolLM2's head shapes, native against jnp. Floors from bench/floors.py in the same run: memory = weights + the
batch's KV over the copy bandwidth; compute = 2 x params x rows over the GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402


def whole_steps(batches, ctxs, rounds: int) -> list[dict]:
    import bench_model as bm

    from sgl_jax.executables import step_compile_options

    from pallas_kernels import cpu_matmul

    pages = 1 + max(batches) * -(-max(ctxs) // 16)
    variants = {"before": (bm.ModelBench("float32", pages, "jnp", "none", packed=False), lambda T: {}, False),
                "after": (bm.ModelBench("float32", pages, "cpu_native", "none", packed=False), step_compile_options,
                          True)}
    runs = {}
    native_f32 = cpu_matmul.f32_available()
    for B in batches:
        for ctx in ctxs:
            for name, (mb, opts, f32) in variants.items():
                b = mb.decode_batch(B, ctx)
                cpu_matmul._F32._state["ok"] = f32 and native_f32  # read when the step is traced
                runs[(name, B, ctx)] = mb._run_fn(b, opts(len(b.input_ids)))
    cpu_matmul._F32._state["ok"] = native_f32
    times = bm.interleaved_times(runs, rounds)
    mb = variants["after"][0]
    out = []
    for B in batches:
        for ctx in ctxs:
            mem_bytes = mb.weight_bytes + B * ctx * mb.cfg.kv_bytes_per_token(mb.itemsize)
            out.append({"batch": B, "ctx": ctx, "bytes": mem_bytes, "flops": mb.cfg.flops_per_token() * B,
                        **{f"{n}_ms": 1e3 * float(np.median(times[(n, B, ctx)])) for n in variants}})
    return out


def attention_layer(rounds: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import cpu_attention
    from sgl_jax.models.attention import paged_attention

    H, KV, D, S = 9, 3, 64, 16
    rng = np.random.default_rng(0)
    res = []
    for R, Bq, ctx, shared in ((1, 1, 704, 0), (8, 1, 704, 40), (16, 1, 448, 23), (32, 1, 512, 0), (64, 1, 704, 0),
                               (8, 64, 512, 0)):
        pp = -(-ctx // S)
        N = 1 + R * pp + 8
        q = jnp.asarray(rng.standard_normal((R, Bq, H, D)).astype(np.float32))
        k = jnp.asarray(rng.standard_normal((N, KV, S, D)).astype(np.float32))
        v = k + 1
        table = np.zeros((R, 128), np.int32)
        for r in range(R):
            table[r, :pp] = np.arange(1 + r * pp, 1 + (r + 1) * pp)
        table[:, :shared] = table[0, :shared]
        args = (q, k, v, jnp.asarray(table), jnp.full((R,), ctx, jnp.int32),
                jnp.asarray(np.tile(np.arange(ctx - Bq, ctx, dtype=np.int32), (R, 1))))
        row = {"rows": R, "queries": Bq, "ctx": ctx, "shared_pages": shared}
        for name, fn in (("native", cpu_attention.paged_attention), ("jnp", paged_attention)):
            f = jax.jit(lambda *a, fn=fn: fn(*a, sm_scale=0.125))
            f(*args).block_until_ready()
            ts = []
            for _ in range(10 * rounds):
                t0 = time.perf_counter()
                f(*args).block_until_ready()
                ts.append(time.perf_counter() - t0)
            row[f"{name}_ms"] = 1e3 * float(np.median(ts))
        res.append(row)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,16,32,64")
    ap.add_argument("--ctxs", default="128,512")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import floors

    bw = floors.copy_bandwidth(threads=2) / 1e9  # GB/s, read + write counted
    gemm = floors.numpy_gemm_rate() / 1e9  # GFLOP/s
    print(f"copy bandwidth {bw:.1f} GB/s (2 threads); numpy GEMM {gemm:.0f} GFLOP/s", flush=True)
    layer = attention_layer(args.rounds)
    print("attention per layer, median ms (native kernel vs jnp path, same inputs):")
    print("| rows | queries/row | ctx | shared pages | native | jnp | jnp / native |\n|---|---|---|---|---|---|---|")
    for r in layer:
        print(f"| {r['rows']} | {r['queries']} | {r['ctx']} | {r['shared_pages']} | {r['native_ms']:.3f} | "
              f"{r['jnp_ms']:.3f} | {r['jnp_ms'] / r['native_ms']:.1f}x |", flush=True)
    steps = whole_steps([int(x) for x in args.batches.split(",")], [int(x) for x in args.ctxs.split(",")],
                        args.rounds)
    print("whole decode steps, median ms (interleaved); floor = max(bytes / bandwidth, flops / GEMM rate):")
    print("| batch | ctx | before (jnp, XLA defaults) | after (native, runner options) | before / after | floor | "
          "floor / after |\n|---|---|---|---|---|---|---|")
    for s in steps:
        s["floor_ms"] = 1e3 * max(s["bytes"] / (bw * 1e9), s["flops"] / (gemm * 1e9))
        print(f"| {s['batch']} | {s['ctx']} | {s['before_ms']:.1f} | {s['after_ms']:.1f} | "
              f"{s['before_ms'] / s['after_ms']:.2f}x | {s['floor_ms']:.1f} | {s['floor_ms'] / s['after_ms']:.0%} |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbs": bw, "gemm_gflops": gemm, "attention_layer": layer, "steps": steps}, f, indent=1)


if __name__ == "__main__":
    main()
