"""Whole SmolLM2 steps for two checkouts of this repository, in alternating processes: the A/B of a kernel change.

    python bench/bench_ab.py --a /path/to/other/checkout [--b .] [--quant int8] [--batches 1,4,8,16,64]
                             [--ctxs 64,512] [--prefill 512] [--rounds 2] [--json OUT]
    python bench/bench_ab.py --a . --kv-b float16      # one checkout, float32 KV pool (a) against float16 (b)
    python bench/bench_ab.py --a . --env-a SGL_JAX_AMX=0   # one checkout, a switch in a's environment
    python bench/bench_ab.py --a . --quant-a int8 --quant gguf   # int8 weights (a) against the GGUF's Q4_1 (b)

One process cannot load two builds of the same native kernel (both register the same FFI target), so each round
starts one child process per checkout, a then b, with that checkout first on the path. A child times every case as
bench_packed.py does (bench_model's jitted forward, packed weights when the engine would pack them, KV donated,
the runner's compile options) and prints its medians as JSON. The table gives per case the median over the rounds
for a and b, b's speed-up, and the floor (weights + KV over the copy bandwidth, or FLOPs over numpy's GEMM rate --
for int8 weights the int8 kernel's rate when it is faster, floors.int8_gemm_rate) measured between the rounds.
Make `other` with `git worktree add /tmp/other <rev>`; both checkouts use this interpreter's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def step_floor_ms(case: tuple[str, int, int], weight_bytes: int, kv_bytes_per_token: int, flops_per_token: int,
                  bw: float, gemm: float, kv_tokens: int | None = None) -> float:
    """A whole step's floor: the weights and the keys and values its rows read over the copy bandwidth `bw`, or its
    FLOPs over the GEMM rate `gemm`, the larger (case: ("decode", rows, ctx) or ("prefill", tokens, tokens));
    `kv_tokens`: the distinct tokens whose keys and values the step reads, where rows share some (default: every
    row's own)."""
    kind, rows, ctx = case
    tokens = kv_tokens if kv_tokens is not None else rows * ctx if kind == "decode" else ctx
    return 1e3 * max((weight_bytes + tokens * kv_bytes_per_token) / bw, flops_per_token * rows / gemm)


def child(quant: str, cases: list[tuple[str, int, int]], rounds: int, kv_dtype: str | None = None) -> dict:
    """In a child: {"kind rows ctx": median ms} for this checkout (the first one on sys.path)."""
    import numpy as np

    import bench_model as bm

    decode = [c for c in cases if c[0] == "decode"]
    pages = 1 + max([r * -(-ctx // bm.PAGE_SIZE) for _, r, ctx in decode] + [-(-n // bm.PAGE_SIZE) for k, n, _ in cases
                                                                           if k == "prefill"])
    mb = bm.ModelBench("float32", pages, "auto", quant, kv_dtype=kv_dtype or None)
    runs = {c: mb._run_fn(mb.decode_batch(c[1], c[2]) if c[0] == "decode" else mb.prefill_batch(c[1])) for c in cases}
    times = bm.interleaved_times(runs, rounds)
    out = {"packed": bool(getattr(mb, "packed", False)), "kv_dtype": mb.kv_dtype, "weight_bytes": mb.weight_bytes,
           "kv_bytes_per_token": mb.cfg.kv_bytes_per_token(mb.itemsize), "flops_per_token": mb.cfg.flops_per_token(),
           "ms": {" ".join(map(str, c)): 1e3 * float(np.median(times[c])) for c in cases}}
    mb.close()
    return out


def child_env(root: str, extra_env: list[str]) -> dict:
    """The environment of a child for `root` (first on the path) with `extra_env`'s KEY=VALUE settings."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "bench")]), JAX_PLATFORMS="cpu")
    env.update(kv.split("=", 1) for kv in extra_env)
    return env


def run_child(root: str, args, kv_dtype: str, extra_env: list[str], quant: str) -> dict:
    env = child_env(root, extra_env)
    cmd = [sys.executable, os.path.join(HERE, "bench_ab.py"), "--child", "--quant", quant, "--batches",
           args.batches, "--ctxs", args.ctxs, "--prefill", args.prefill, "--rounds", "2", "--kv", kv_dtype]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        raise SystemExit(f"child for {root} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def int8_rate_in_child(root: str, extra_env: list[str]) -> float:
    """floors.int8_gemm_rate in a child with `root` first on the path (this process loads no native kernel)."""
    code = "import floors; print(floors.int8_gemm_rate())"
    res = subprocess.run([sys.executable, "-c", code], env=child_env(root, extra_env), capture_output=True,
                         text=True, timeout=600)
    if res.returncode:
        raise SystemExit(f"int8 GEMM rate in {root} failed:\n{res.stderr[-2000:]}")
    return float(res.stdout.split()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", help="the other checkout (the baseline)")
    ap.add_argument("--b", default=os.path.dirname(HERE), help="this checkout (default)")
    ap.add_argument("--quant", default="int8", help="weight quantization: none | int8 | gguf (b's, and a's unless "
                    "--quant-a)")
    ap.add_argument("--quant-a", default="", help="a's weight quantization (default: --quant)")
    ap.add_argument("--batches", default="1,4,8,16,64")
    ap.add_argument("--ctxs", default="64,512")
    ap.add_argument("--prefill", default="512", help="prefill lengths ('' for none)")
    ap.add_argument("--rounds", type=int, default=2, help="process pairs")
    ap.add_argument("--kv-a", default="", help="a's KV pool dtype (default: the model's, float32)")
    ap.add_argument("--kv-b", default="", help="b's KV pool dtype")
    ap.add_argument("--env-a", action="append", default=[], metavar="KEY=VALUE", help="set in a's environment")
    ap.add_argument("--env-b", action="append", default=[], metavar="KEY=VALUE", help="set in b's environment")
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kv", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    cases = [("decode", b, c) for b in ints(args.batches) for c in ints(args.ctxs)]
    cases += [("prefill", n, n) for n in ints(args.prefill)]
    if args.child:
        print(json.dumps(child(args.quant, cases, 2, args.kv)), flush=True)
        return
    if not args.a:
        ap.error("--a (the other checkout) is required")
    import floors
    import numpy as np

    roots = {"a": os.path.abspath(args.a), "b": os.path.abspath(args.b)}
    results = {"a": [], "b": []}
    bws, gemms = [], []
    kvs = {"a": args.kv_a, "b": args.kv_b}
    envs = {"a": args.env_a, "b": args.env_b}
    quants = {"a": args.quant_a or args.quant, "b": args.quant}
    for r in range(args.rounds):
        for name, root in roots.items():
            results[name].append(run_child(root, args, kvs[name], envs[name], quants[name]))
            print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
        bws.append(floors.copy_bandwidth(threads=2))
        gemms.append(floors.numpy_gemm_rate())
        if args.quant != "none":  # integer kernels: the larger of numpy's float32 rate and the int8 kernel's
            gemms.append(int8_rate_in_child(roots["b"], envs["b"]))
    bw, gemm = max(bws), max(gemms)
    info = results["b"][0]
    print(f"a = {roots['a']} {' '.join(args.env_a)} (packed: {results['a'][0]['packed']}, KV "
          f"{results['a'][0].get('kv_dtype', '?')}), b = {roots['b']} {' '.join(args.env_b)} (packed: "
          f"{info['packed']}, KV {info['kv_dtype']}); floors priced by b's KV bytes; "
          f"weights a {quants['a']}, b {quants['b']}; copy bandwidth {bw / 1e9:.1f} GB/s, GEMM {gemm / 1e9:.0f} "
          f"GOP/s (numpy float32"
          f"{', or the int8 kernel on [512,1536]x[1536,1536]' if args.quant != 'none' else ''}: the faster)")
    print("| step | rows | ctx | a ms | b ms | a / b | floor ms | floor / b |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for c in cases:
        key = " ".join(map(str, c))
        a = float(np.median([x["ms"][key] for x in results["a"]]))
        b = float(np.median([x["ms"][key] for x in results["b"]]))
        floor = step_floor_ms(c, info["weight_bytes"], info["kv_bytes_per_token"], info["flops_per_token"], bw, gemm)
        rows.append({"kind": c[0], "rows": c[1], "ctx": c[2], "a_ms": a, "b_ms": b, "floor_ms": floor})
        print(f"| {c[0]} | {c[1]} | {c[2]} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {floor:.1f} | {floor / b:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"roots": roots, "quant": quants, "copy_gbs": bw / 1e9, "gemm_gflops": gemm / 1e9,
                       "steps": rows, "raw": results}, f, indent=1)


if __name__ == "__main__":
    main()
