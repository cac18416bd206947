"""Few decode rows split along their keys (pallas_kernels/cpu_paged_attention.cc, DecodeSplits) against unsplit.

    python bench/bench_decode_split.py [--ctxs 512,1024,2048] [--rounds 7] [--engine 256,1024,1900]

Kernel alone: SmolLM2's attention shapes (3 KV heads x 3, D = 64, pages of 16, float16 pool) over 30 layers, each
layer its own pool (so a step's KV does not sit in the caches), one decode query a row, rows with pages of their
own or all on the same pages; the split on (the default, 128 keys a range at least) and off
(`decode_split_min_keys(0)`) alternate in rounds in one process. Beside each: the read floor, the rows' distinct
KV bytes over the read bandwidth measured in the same run (bench/floors.py, two threads). With `--engine`: the
int8 preset's Engine, one request of each context, 48 greedy tokens, the median 1-row decode step, split on and off
alternating four times. No peer: llama.cpp's attention is not a separable call (bench_served_step.py has its step).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

L, KV, S, D, H = 30, 3, 16, 64, 9
CASES = [(1, False), (2, False), (3, False), (2, True), (3, True), (6, True)]  # (rows, on the same pages)


def kernel(ctxs: list[int], rounds: int, read_gbs: float) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import cpu_attention as ca

    @jax.jit
    def run(q, table, lens, pos, pools):
        acc = q
        for k, v in pools:
            acc = acc + ca.paged_attention(acc * 0.01, k, v, table, lens, pos, sm_scale=0.125)
        return acc

    default = ca.decode_split_min_keys()
    rng = np.random.default_rng(0)
    print(f"{'ctx':>5} {'rows':>4} {'pages':>8} {'unsplit ms':>10} {'split ms':>9} {'read floor ms':>13}")
    for ctx in ctxs:
        P = ctx // S
        N = 6 * P + 8
        pools = [tuple(jnp.asarray(rng.standard_normal((N, KV, S, D)).astype(np.float16)) for _ in range(2))
                 for _ in range(L)]
        inputs = {}
        for R, shared in CASES:
            rows = [rng.permutation(N)[:P]] * R if shared else [rng.permutation(N)[:P] for _ in range(R)]
            inputs[R, shared] = (jnp.asarray(rng.standard_normal((R, 1, H, D)).astype(np.float32)),
                                 jnp.asarray(np.stack(rows), jnp.int32), jnp.full((R,), ctx, jnp.int32),
                                 jnp.full((R, 1), ctx - 1, jnp.int32))
            run(*inputs[R, shared], pools).block_until_ready()
        res = {(c, m): [] for c in CASES for m in (0, default)}
        for _ in range(rounds):
            for c in CASES:
                for m in (0, default):
                    ca.decode_split_min_keys(m)
                    t0 = time.perf_counter()
                    for _ in range(10):
                        out = run(*inputs[c], pools)
                    out.block_until_ready()
                    res[c, m].append((time.perf_counter() - t0) / 10 * 1e3)
        ca.decode_split_min_keys(default)
        for (R, shared) in CASES:
            kv_bytes = (1 if shared else R) * ctx * L * KV * D * 2 * 2  # distinct K and V bytes, float16
            print(f"{ctx:>5} {R:>4} {'same' if shared else 'own':>8} {statistics.median(res[(R, shared), 0]):>10.3f} "
                  f"{statistics.median(res[(R, shared), default]):>9.3f} {kv_bytes / read_gbs / 1e6:>13.3f}",
                  flush=True)


def engine(ctxs: list[int]) -> None:
    from pallas_kernels import cpu_attention as ca
    from sgl_jax.config import load_config
    from sgl_jax.engine import Engine

    eng = Engine(load_config(os.path.join(os.path.dirname(HERE), "configs/smollm2-135m-int8.yaml")).engine)
    eng.wait_compiled()
    steps: list[tuple[int, float]] = []
    eng.add_step_listener(lambda info: None if info.plan.prefills else
                          steps.append((len(info.plan.decodes), info.step_seconds)))
    default, rng = ca.decode_split_min_keys(), random.Random(0)
    try:
        for ctx in ctxs:
            ids = [rng.randrange(1000, eng.vocab_size) for _ in range(ctx)]
            sp = {"temperature": 0, "ignore_eos": True}
            eng.generate(input_ids=ids, sampling_params=dict(sp, max_new_tokens=4))
            res = {0: [], default: []}
            for _ in range(4):
                for m in (0, default):
                    ca.decode_split_min_keys(m)
                    steps.clear()
                    eng.generate(input_ids=ids, sampling_params=dict(sp, max_new_tokens=48))
                    res[m].append(1e3 * statistics.median(s for r, s in steps if r == 1))
            print(f"engine, prompt {ctx}: 1-row decode step median ms, unsplit "
                  f"{' / '.join(f'{x:.2f}' for x in res[0])}; split {' / '.join(f'{x:.2f}' for x in res[default])}",
                  flush=True)
    finally:
        ca.decode_split_min_keys(default)
        eng.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctxs", default="512,1024,2048")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--engine", default="", help="prompt lengths for the Engine rows (empty: none)")
    a = ap.parse_args()
    import floors

    from pallas_kernels import cpu_attention as ca

    if ca.decode_split_min_keys() is None:
        sys.exit("this build has no two-pass decode loops (no AVX-512): nothing is split here")
    read = floors.read_bandwidth(threads=2) / 1e9
    print(f"read bandwidth (2 threads, measured now): {read:.1f} GB/s; kernel alone, 30 layers, medians of "
          f"{a.rounds} rounds")
    kernel([int(x) for x in a.ctxs.split(",")], a.rounds, read)
    if a.engine:
        engine([int(x) for x in a.engine.split(",")])


if __name__ == "__main__":
    main()
