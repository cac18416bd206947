"""The CPU paged-attention kernel alone at SmolLM2's head shapes, reading pools as large as a served model's.

    python bench/bench_attention_pool.py [--rows 64] [--ctx 512] [--dtypes float32,float16,bfloat16] [--layers 30]
                                         (dtypes: also float8_e4m3fn, float8_e5m2)
                                         [--rounds 10] [--paths default|online,two-pass] [--json OUT]

One jitted function calls the kernel once per layer over `--layers` separate K/V pools (9 query heads over 3 KV
heads, D = 64, pages of 16), so like a model step it reads every layer's pages from memory rather than from a
cache that a single pool of a microbenchmark would fit in. Each page dtype is timed with the rows' pages
consecutive in the pool and scattered (a random permutation, as pages end up after a served burst). Beside each
figure: its floor, the bytes the call must read (every visible key and value once) over the host's read bandwidth
measured in the same run (bench/floors.py read_bandwidth, 2 threads), and cycles per (query, key) at a nominal
3 GHz on the used cores. `--paths` times the kernel's two forms of a decode row side by side, alternating
(cpu_attention.decode_two_pass_max: online, a page at a time, or two passes where the build has AVX2). No peer:
llama.cpp's attention cannot be called on its own (its whole decode step is in bench_served_step.py).
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

H, KV, D, S = 9, 3, 64, 16  # SmolLM2-135M
# cpu_attention.decode_two_pass_max settings by name (None: the kernel's default where this process started)
DECODE_PATHS = {"default": None, "online": 0, "two-pass": 1 << 18}


def time_layers(rows: int, ctx: int, dtype: str, layers: int, rounds: int, scattered: bool, seed: int = 0) -> float:
    """Median seconds per layer of the kernel over `layers` pools of `dtype`."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import cpu_attention

    rng = np.random.default_rng(seed)
    pp = -(-ctx // S)
    order = rng.permutation(rows * pp) if scattered else np.arange(rows * pp)
    table = jnp.asarray((1 + order).reshape(rows, pp), jnp.int32)
    lens = jnp.full((rows,), ctx, jnp.int32)
    pos = jnp.full((rows, 1), ctx - 1, jnp.int32)
    q = jnp.asarray(rng.standard_normal((rows, 1, H, D)), jnp.float32)
    shape = (1 + rows * pp, KV, S, D)
    pools = [(jnp.asarray(rng.standard_normal(shape), dtype), jnp.asarray(rng.standard_normal(shape), dtype))
             for _ in range(layers)]

    @jax.jit
    def step(q, pools):
        out = q
        for k, v in pools:  # each layer's output is the next one's query: the calls run one after another
            out = cpu_attention.paged_attention(out, k, v, table, lens, pos, sm_scale=0.125)
        return out

    step(q, pools).block_until_ready()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step(q, pools).block_until_ready()
        ts.append(time.perf_counter() - t0)
    del pools
    return float(np.median(ts)) / layers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--paths", default="default",
                    help="decode loops to time side by side (alternating, two rounds each): a comma list of "
                         f"{', '.join(DECODE_PATHS)}")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import floors
    from pallas_kernels import cpu_attention

    if not cpu_attention.available():
        raise SystemExit(f"the native paged attention did not build: {cpu_attention.why_not()}")
    paths = args.paths.split(",")
    if any(p not in DECODE_PATHS for p in paths):
        raise SystemExit(f"--paths: each of {', '.join(DECODE_PATHS)}, got {args.paths}")
    before = cpu_attention.decode_two_pass_max()
    cores = min(2, len(os.sched_getaffinity(0)))
    rows = []
    bws = [floors.read_bandwidth(threads=cores)]
    for dtype in args.dtypes.split(","):
        for scattered in (False, True):
            ts = {p: [] for p in paths}
            for _ in range(2 if len(paths) > 1 else 1):
                for path in paths:
                    if before is not None:  # (without AVX2 every setting is the online form)
                        cpu_attention.decode_two_pass_max(before if DECODE_PATHS[path] is None else DECODE_PATHS[path])
                    ts[path].append(time_layers(args.rows, args.ctx, dtype, args.layers, args.rounds, scattered))
            import jax.numpy as jnp

            nbytes = 2 * args.rows * args.ctx * KV * D * jnp.dtype(dtype).itemsize
            for path in paths:
                rows.append({"dtype": dtype, "pages": "scattered" if scattered else "consecutive", "path": path,
                             "ms": 1e3 * float(np.median(ts[path])), "bytes": nbytes})
        bws.append(floors.read_bandwidth(threads=cores))
    if before is not None:
        cpu_attention.decode_two_pass_max(before)
    bw = max(bws)
    print(f"paged attention, {args.rows} rows x {args.ctx} keys, {H} query / {KV} KV heads, D {D}, pages of {S}, "
          f"{args.layers} layers' pools; read bandwidth {bw / 1e9:.1f} GB/s ({cores} threads, best of {len(bws)}); "
          f"peer: skipped (no llama.cpp attention call on its own)")
    print("| pages | order | decode loops | ms / layer | GB/s | floor ms | floor / ms | cycles / (q, key) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["floor_ms"] = 1e3 * r["bytes"] / bw
        cyc = r["ms"] * 1e-3 * cores * 3e9 / (args.rows * args.ctx * H)
        print(f"| {r['dtype']} | {r['pages']} | {r['path']} | {r['ms']:.3f} | {r['bytes'] / r['ms'] / 1e6:.1f} | "
              f"{r['floor_ms']:.3f} | {r['floor_ms'] / r['ms']:.0%} | {cyc:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "read_gbs": bw / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
