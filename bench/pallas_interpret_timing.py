"""Time one decode batch: jnp reference vs the Pallas kernels in CPU interpret mode.

    .venv/bin/python bench/pallas_interpret_timing.py [--rows 16] [--kv-heads 8] ...

Interpret mode is a correctness tool; this shows why the CPU runtime uses the jnp path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.ragged_paged_attention import (  # noqa: E402
    ragged_paged_attention,
    ref_ragged_paged_attention,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--pool-pages", type=int, default=0, help="pool size N (default: just enough)")
    ap.add_argument("--skip-tpu", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    R, KV, G, D, S = a.rows, a.kv_heads, a.group, a.head_dim, a.page_size
    P = a.max_len // S
    N = max(R * P + 1, a.pool_pages)
    dt = jnp.dtype(a.dtype)
    q = jnp.asarray(rng.standard_normal((R, 1, KV * G, D)), dt)
    k = jnp.asarray(rng.standard_normal((N, KV, S, D)), dt)
    v = jnp.asarray(rng.standard_normal((N, KV, S, D)), dt)
    pt = jnp.asarray(1 + rng.permutation(R * P).reshape(R, P), jnp.int32)
    kv_lens = jnp.asarray(rng.integers(a.max_len // 4, a.max_len + 1, R), jnp.int32)
    pos = (kv_lens - 1)[:, None]
    args = (q, k, v, pt, kv_lens, pos)
    print(f"decode batch: R={R} rows, H={KV * G} q heads, KV={KV}, D={D}, S={S}, "
          f"pool N={N} pages, kv_len {int(kv_lens.min())}..{int(kv_lens.max())} (mean {float(kv_lens.mean()):.0f}), "
          f"{a.dtype}; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{os.cpu_count()} cpus")

    ref = jax.jit(ref_ragged_paged_attention, static_argnames=("sm_scale",))
    runs = {
        "jnp reference (jit)": lambda: ref(*args, sm_scale=D ** -0.5),
        "pallas_gpu, interpret=True (HLO interpreter)": lambda: ragged_paged_attention(
            *args, sm_scale=D ** -0.5, backend="pallas_gpu", interpret=True),
    }
    if not a.skip_tpu:
        runs["pallas_tpu, InterpretParams() (TPU interpreter)"] = lambda: ragged_paged_attention(
            *args, sm_scale=D ** -0.5, backend="pallas_tpu", interpret=True)
    base = None
    for name, fn in runs.items():
        t0 = time.perf_counter()
        out = fn().block_until_ready()
        first = time.perf_counter() - t0
        ts = []
        for _ in range(a.iters):
            t0 = time.perf_counter()
            fn().block_until_ready()
            ts.append(time.perf_counter() - t0)
        best = min(ts)
        if base is None:
            base, base_out = best, out
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - base_out.astype(jnp.float32))))
        print(f"{name:50s} first call {first * 1e3:9.1f} ms   steady {best * 1e3:9.1f} ms "
              f"({best / base:7.1f}x)   max|diff| vs ref {err:.2e}")


if __name__ == "__main__":
    main()
