"""The packed GGUF Q4_1 matmul against the packed int8 one, one process, SmolLM2's linear shapes by row count.

    python bench/bench_q4.py [--rows 1,4,8,16,64,512] [--repeats 7] [--json OUT]

Each case is one jitted call of `cpu_matmul.packed_q4_1_matmul` (Q4_1 blocks packed [N / 16, K / 32, 320]) and of
`cpu_matmul.packed_matmul` (int8 packed [N / 16, K / 4, 16, 4] with a scale per column), both quantizing the
[rows, K] float32 activations per 32 inputs inside the call; the best of `--repeats` batches of 30 calls. Beside
each: its floor, the larger of its weight bytes (Q4_1 0.625 a weight, int8 1 plus 4 a column) over the read
bandwidth and the product's operations over the int8 kernel's large-product rate (floors.int8_gemm_rate), both
measured in this run. The tied head stays int8 in gguf mode (SmolLM2's file holds it as Q8_0): not timed here.
No peer: llama.cpp's matmuls cannot be called on their own (its whole decode step is in bench_served_step.py).
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

from bench_amx import best_ms  # noqa: E402

# (name, K, N): SmolLM2-135M's packed linears (q/k/v and gate/up fused)
SHAPES = [("qkv", 576, 960), ("gate/up", 576, 3072), ("down", 1536, 576), ("o", 576, 576)]


def q4_blocks(rng, n: int, k: int) -> np.ndarray:
    """Random Q4_1 blocks uint8 [n, k / 32, 20] (float16 d > 0 and m, random nibbles)."""
    nb = k // 32
    d = (rng.random((n, nb)) * 0.02 + 0.001).astype(np.float16)
    m = (-rng.random((n, nb)) * 0.1).astype(np.float16)
    qs = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    return np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], axis=2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,8,16,64,512")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    import floors
    from pallas_kernels import cpu_matmul
    from sgl_jax.models.packing import pack_io, pack_q4_1, to_quads

    bw, rate = floors.read_bandwidth(), floors.int8_gemm_rate()
    rng = np.random.default_rng(0)
    f8, f4 = jax.jit(cpu_matmul.packed_matmul), jax.jit(cpu_matmul.packed_q4_1_matmul)
    mats = {name: (jnp.asarray(to_quads(pack_io(rng.integers(-127, 128, (k, n)).astype(np.int8)))),
                   jnp.ones((n,), jnp.float32), jnp.asarray(pack_q4_1(q4_blocks(rng, n, k))), k, n)
            for name, k, n in SHAPES}
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (2 threads), int8 kernel on [512,1536]x[1536,1536] "
          f"{rate / 1e9:.0f} GOP/s; ms per call: Q4_1 / int8 (int8 / Q4_1), Q4_1's floor / int8's")
    print("| rows | " + " | ".join(f"{n} [{k}x{nn}]" for n, k, nn in SHAPES) + " |")
    print("|---" * (len(SHAPES) + 1) + "|")
    out = []
    for m in (int(r) for r in args.rows.split(",")):
        cells = []
        for name, (w8, s8, w4, k, n) in mats.items():
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            q4 = best_ms(f4, (x, w4), args.repeats)
            i8 = best_ms(f8, (x, w8, s8), args.repeats)
            ops = 2 * m * k * n / rate
            floor4, floor8 = 1e3 * max(0.625 * k * n / bw, ops), 1e3 * max((k * n + 4 * n) / bw, ops)
            out.append(dict(rows=m, matrix=name, K=k, N=n, q4_ms=q4, int8_ms=i8, q4_floor_ms=floor4,
                            int8_floor_ms=floor8))
            cells.append(f"{q4:.3f} / {i8:.3f} ({i8 / q4:.2f}x), {floor4:.3f} / {floor8:.3f}")
        print(f"| {m} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"read_gbs": bw / 1e9, "int8_gops": rate / 1e9, "cases": out}, fh, indent=1)


if __name__ == "__main__":
    main()
