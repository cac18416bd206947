"""The native paged attention alone with its shared-pages path off and on, alternating in one process.

    python bench/bench_shared_pages.py [--rounds 2] [--json OUT]

SmolLM2-135M's heads (3 KV heads x 3 queries, D = 64), a float16 pool, pages of 16, `bf16_math` (the int8 and GGUF
presets' `attention_math: bfloat16`). Two kinds of calls:
  decode   rows of one query that share the pages of a prompt (a fork's branches), then tokens of their own;
  prefill  64-query blocks of chunks after a cached prefix (a prompt whose prefix is in the radix cache), each on a
           prefix of its own, or all on one (a fork's branch prompts, a select's choices: "one prefix").
Each call is timed off (`cpu_attention.decode_shared_min_pages(0)`: every row reads its pages alone) and on (the
default), the order swapped every round, the median of `--calls` calls each, best of `--rounds`. Beside each: its
attention FLOPs (4 x queries x keys x D a head) over the time, and the floor of reading its distinct keys and values
once over the copy bandwidth measured at the end of the run (bench/floors.py). glibc keeps freed memory, as the
engine sets it (sgl_jax.engine.host_memory). Whole steps with the same switch:
bench_step_switch.py --switch shared_pages. No peer: llama.cpp's attention has no such switch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

KV, G, D, S, BQ = 3, 3, 64, 16, 64
DECODE = [(2, 448, 40), (3, 448, 40), (6, 192, 60), (6, 448, 20), (6, 640, 60), (16, 144, 100), (16, 400, 64),
          (32, 400, 100), (64, 400, 100), (64, 0, 512)]  # rows, shared prompt tokens, own tokens a row
PREFILL = [(1, 128, 64, 0), (1, 150, 21, 0), (1, 448, 64, 0), (6, 440, 20, 0), (6, 440, 20, 1), (16, 600, 8, 0),
           (4, 200, 12, 1), (16, 200, 12, 1), (32, 150, 8, 0), (32, 300, 16, 0), (1, 256, 512, 0), (1, 1700, 64, 0),
           (1, 1700, 256, 0), (2, 1800, 200, 0)]  # chunks, cached tokens, chunk tokens, on one prefix


def decode_case(rows: int, shared: int, own: int, rng):
    """(operands, FLOPs, distinct KV tokens): `rows` decode rows over one `shared`-token prompt's pages, then `own`
    tokens of their own pages each."""
    import jax.numpy as jnp

    n_pages = shared // S + rows * -(-own // S) + 1
    perm = iter(rng.permutation(np.arange(1, n_pages + 1)))
    prompt = [int(next(perm)) for _ in range(shared // S)]
    table = np.zeros((rows, -(-(shared + own) // S) + 1), np.int32)
    for r in range(rows):
        pages = prompt + [int(next(perm)) for _ in range(-(-own // S))]
        table[r, :len(pages)] = pages
    lens = np.full((rows,), shared + own, np.int32)
    ops = (jnp.asarray(rng.standard_normal((rows, 1, KV * G, D)), jnp.float32),
           *[jnp.asarray(rng.standard_normal((n_pages + 1, KV, S, D)), jnp.float16)] * 2,
           jnp.asarray(table), jnp.asarray(lens), jnp.asarray((lens - 1)[:, None]))
    return ops, 4 * rows * (shared + own) * D * KV * G, shared + rows * own


def prefill_case(chunks: int, cached: int, n: int, one_prefix: int, rng):
    """(operands, FLOPs, distinct KV tokens): `chunks` prompts, each `n` new tokens after `cached` tokens -- of its
    own pages, or with `one_prefix` all the chunks' whole cached pages the same -- laid out as the engine lays a
    prefill out (one row per 64-query block)."""
    import jax.numpy as jnp

    total, nb, common = cached + n, -(-n // BQ), cached // S if one_prefix else 0
    n_pages = common + chunks * (-(-total // S) - common) + 1
    perm = iter(rng.permutation(np.arange(1, n_pages + 1)))
    prefix = [int(next(perm)) for _ in range(common)]
    tables = [prefix + [int(next(perm)) for _ in range(-(-total // S) - common)] for _ in range(chunks)]
    R = chunks * nb
    table = np.zeros((R, -(-total // S) + 1), np.int32)
    pos = np.full((R, BQ), -1, np.int32)
    for c in range(chunks):
        for blk in range(nb):
            table[c * nb + blk, :len(tables[c])] = tables[c]
            for b in range(BQ):
                if blk * BQ + b < n:
                    pos[c * nb + blk, b] = cached + blk * BQ + b
    keys = sum(t + 1 for t in range(cached, total)) * chunks  # causal: query t sees t + 1 keys
    ops = (jnp.asarray(rng.standard_normal((R, BQ, KV * G, D)), jnp.float32),
           *[jnp.asarray(rng.standard_normal((n_pages + 1, KV, S, D)), jnp.float16)] * 2,
           jnp.asarray(table), jnp.asarray(np.full((R,), total, np.int32)), jnp.asarray(pos))
    return ops, 4 * keys * D * KV * G, common * S + chunks * (total - common * S)


def run(rounds: int, calls: int) -> dict:
    import jax

    import floors
    from pallas_kernels import cpu_attention as ca

    if not ca.bf16_math_available() or ca.decode_shared_min_pages() is None:
        sys.exit("the shared-pages path needs the native kernel built with AVX-512 and AVX512-BF16 here")
    from sgl_jax.engine.host_memory import retain_freed_memory

    retain_freed_memory()  # as the engine does on CPU: freed buffers stay in the process, not faulted in afresh
    fn = jax.jit(ca.paged_attention, static_argnames=("sm_scale", "sliding_window", "soft_cap", "bf16_math"))
    default = ca.decode_shared_min_pages()
    rng = np.random.default_rng(0)
    cases = [("decode", c, decode_case(*c, rng)) for c in DECODE] + \
            [("prefill", c, prefill_case(*c, rng)) for c in PREFILL]
    rows = []
    try:
        for kind, shape, (ops, flops, kv_tokens) in cases:
            call = lambda: fn(*ops, sm_scale=0.125, bf16_math=True).block_until_ready()  # noqa: E731
            best = {}
            for r in range(rounds):
                for on in ((False, True) if r % 2 == 0 else (True, False)):
                    ca.decode_shared_min_pages(default if on else 0)
                    call()
                    ts = []
                    for _ in range(calls if kind == "decode" else max(calls // 6, 5)):
                        t0 = time.perf_counter()
                        call()
                        ts.append(time.perf_counter() - t0)
                    best[on] = min(best.get(on, 1e9), statistics.median(ts))
            rows.append({"kind": kind, "shape": list(shape), "off_us": 1e6 * best[False], "on_us": 1e6 * best[True],
                         "flops": flops, "kv_bytes": kv_tokens * KV * D * 2 * 2})
    finally:
        ca.decode_shared_min_pages(default)
    bw = floors.copy_bandwidth(threads=2)
    for r in rows:
        r["floor_us"] = 1e6 * r["kv_bytes"] / bw
    return {"copy_gbs": bw / 1e9, "rounds": rounds, "calls": calls, "rows": rows}


def report(res: dict) -> str:
    out = [f"one layer's attention, SmolLM2 heads, float16 pool, bf16 math; copy bandwidth {res['copy_gbs']:.1f} "
           f"GB/s (measured after); peer: skipped (llama.cpp has no such switch)",
           "| call | shape | off us | on us | off / on | on GFLOP/s | KV read floor us |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        what = ("{} rows x ({} shared + {} own)" if r["kind"] == "decode" else "{} chunks x ({} cached + {}){}")
        shape = r["shape"] if r["kind"] == "decode" else r["shape"][:3] + [", one prefix" if r["shape"][3] else ""]
        out.append(f"| {r['kind']} | {what.format(*shape)} | {r['off_us']:.1f} | {r['on_us']:.1f} | "
                   f"{r['off_us'] / r['on_us']:.2f}x | {r['flops'] / r['on_us'] / 1e3:.0f} | {r['floor_us']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    res = run(args.rounds, args.calls)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
