"""The packed int8 matmul on AMX tiles against the VNNI tiles, one process, SmolLM2's matrix shapes by row count.

    python bench/bench_amx.py [--rows 2,4,6,8,12,16,32,64] [--repeats 7] [--json OUT]

Each case is one jitted `cpu_matmul.packed_matmul` call ([rows, K] float32 activations, quantized per 32 inputs
inside the call, times int8 weights packed [N / 16, K / 4, 16, 4]), timed with the AMX path on and then off
(`cpu_matmul.amx_int8`, switched in the same process: the outputs are bit-identical, tests/test_cpu_matmul.py);
the best of `--repeats` batches of 30 calls. Below 4 rows both take the VNNI tiles (cpu_matmul.cc, kAmxRows).
Beside each: its floor, the larger of the weight bytes over the read bandwidth and the product's operations over
the int8 kernel's own large-product rate (floors.int8_gemm_rate), both measured in this run. No peer: llama.cpp's
matmuls cannot be called on their own (its whole decode step is in bench_served_step.py).
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

# (name, K, N): SmolLM2-135M's packed matrices (q/k/v and gate/up fused; the tied head)
SHAPES = [("qkv", 576, 960), ("gate/up", 576, 3072), ("down", 1536, 576), ("o", 576, 576), ("head", 576, 49152)]


def best_ms(f, args, repeats: int) -> float:
    """ms per call of f(*args): the best of `repeats` batches of 30 calls (after one untimed call)."""
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(30):
            y = f(*args)
        y.block_until_ready()
        best = min(best, (time.perf_counter() - t) / 30)
    return 1e3 * best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="2,4,6,8,12,16,32,64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    import floors
    from pallas_kernels import cpu_matmul
    from sgl_jax.models.packing import pack_io, to_quads

    if not cpu_matmul.amx_int8():
        print("AMX is not in use here (no AMX on this CPU, no permission, or SGL_JAX_AMX=0): both columns are the "
              "VNNI tiles")
    bw, rate = floors.read_bandwidth(), floors.int8_gemm_rate()
    rng = np.random.default_rng(0)
    f = jax.jit(cpu_matmul.packed_matmul)
    mats = {name: (jnp.asarray(to_quads(pack_io(rng.integers(-127, 128, (k, n)).astype(np.int8)))),
                   jnp.ones((n,), jnp.float32), k, n) for name, k, n in SHAPES}
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (2 threads), int8 kernel on [512,1536]x[1536,1536] "
          f"{rate / 1e9:.0f} GOP/s; ms per call, AMX / VNNI (speed-up), floor")
    print("| rows | " + " | ".join(f"{n} [{k}x{nn}]" for n, k, nn in SHAPES) + " |")
    print("|---" * (len(SHAPES) + 1) + "|")
    out = []
    try:
        for m in (int(r) for r in args.rows.split(",")):
            cells = []
            for name, (w, s, k, n) in mats.items():
                x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
                cpu_matmul.amx_int8(True)
                amx = best_ms(f, (x, w, s), args.repeats)
                cpu_matmul.amx_int8(False)
                vnni = best_ms(f, (x, w, s), args.repeats)
                floor = 1e3 * max(k * n / bw, 2 * m * k * n / rate)
                out.append(dict(rows=m, matrix=name, K=k, N=n, amx_ms=amx, vnni_ms=vnni, floor_ms=floor))
                cells.append(f"{amx:.3f} / {vnni:.3f} ({vnni / amx:.2f}x), {floor:.3f}")
            print(f"| {m} | " + " | ".join(cells) + " |", flush=True)
    finally:
        cpu_matmul.amx_int8(True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"read_gbs": bw / 1e9, "int8_gops": rate / 1e9, "cases": out}, fh, indent=1)


if __name__ == "__main__":
    main()
