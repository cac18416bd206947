"""Panel-packed weights and the native packed matmul against the plain layout, whole SmolLM2 steps, interleaved.

    python bench/bench_packed.py [--quant none,int8] [--batches 1,4,8,16,32,64] [--ctxs 512]
                                 [--prefill 128,512] [--rounds 3] [--json OUT]

Per quantization, two variants of SmolLM2-135M's jitted forward (as bench_model.py times it: KV pool donated,
inputs on the device, the runner's compile options for the step's token count, the native paged attention):
  plain   [in, out] matrices: XLA's dots, the few-row kernels of session 6 (int8 up to 16 rows, the float32 LM
          head at 2-8 rows), XLA's convert + dot for more int8 rows;
  packed  [out/16, in, 16] matrices (int8: [out/16, in/4, 16, 4], activations quantized in the kernel; q/k/v and
          gate/up fused; sgl_jax.models.packing), every linear and the LM head through the native packed matmul
          (pallas_kernels/cpu_matmul.cc), whatever the row count.
Decode steps (one token per row at KV length ctx) and prefill steps (one sequence, 64-token blocks), each timed
in rounds that alternate between the variants. Floors from bench/floors.py in the same run: memory = weights +
the batch's KV over the copy bandwidth; compute = 2 x params x tokens over numpy's GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402


def measure(quant: str, batches, ctxs, prefills, rounds: int) -> list[dict]:
    import bench_model as bm

    pages = 1 + max(max(batches) * -(-max(ctxs) // bm.PAGE_SIZE), -(-max(prefills, default=0) // bm.PAGE_SIZE))
    variants = {name: bm.ModelBench("float32", pages, "auto", quant, packed=name == "packed")
                for name in ("plain", "packed")}
    cases = [("decode", B, ctx) for B in batches for ctx in ctxs] + [("prefill", n, n) for n in prefills]
    runs = {}
    for kind, rows, ctx in cases:
        for name, mb in variants.items():
            b = mb.decode_batch(rows, ctx) if kind == "decode" else mb.prefill_batch(rows)
            runs[(name, kind, rows, ctx)] = mb._run_fn(b)
    times = bm.interleaved_times(runs, rounds)
    out = []
    for kind, rows, ctx in cases:
        mb = variants["plain"]
        kv = (rows * ctx if kind == "decode" else ctx) * mb.cfg.kv_bytes_per_token(mb.itemsize)
        out.append({"quant": quant, "kind": kind, "rows": rows, "ctx": ctx, "bytes": mb.weight_bytes + kv,
                    "flops": mb.cfg.flops_per_token() * rows,
                    **{f"{n}_ms": 1e3 * float(np.median(times[(n, kind, rows, ctx)])) for n in variants}})
    for mb in variants.values():
        mb.close()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quant", default="none,int8")
    ap.add_argument("--batches", default="1,4,8,16,32,64")
    ap.add_argument("--ctxs", default="512")
    ap.add_argument("--prefill", default="128,512", help="prefill lengths ('' for none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import floors

    from pallas_kernels import cpu_matmul

    if not cpu_matmul.packed_available():
        raise SystemExit(f"the packed matmul did not build: {cpu_matmul.why_not()}")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    bw = floors.copy_bandwidth(threads=2) / 1e9  # GB/s, read + write counted
    gemm = floors.numpy_gemm_rate() / 1e9  # GFLOP/s
    print(f"copy bandwidth {bw:.1f} GB/s (2 threads); numpy GEMM {gemm:.0f} GFLOP/s", flush=True)
    rows = []
    print("| weights | step | rows | ctx | plain ms | packed ms | plain / packed | floor ms | floor / packed |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for quant in args.quant.split(","):
        for r in measure(quant, ints(args.batches), ints(args.ctxs), ints(args.prefill), args.rounds):
            r["floor_ms"] = 1e3 * max(r["bytes"] / (bw * 1e9), r["flops"] / (gemm * 1e9))
            rows.append(r)
            print(f"| {'int8' if quant == 'int8' else 'fp32'} | {r['kind']} | {r['rows']} | {r['ctx']} | "
                  f"{r['plain_ms']:.1f} | {r['packed_ms']:.1f} | {r['plain_ms'] / r['packed_ms']:.2f}x | "
                  f"{r['floor_ms']:.1f} | {r['floor_ms'] / r['packed_ms']:.0%} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbs": bw, "gemm_gflops": gemm, "steps": rows}, f, indent=1)


if __name__ == "__main__":
    main()
