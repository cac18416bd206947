"""Whole SmolLM2 steps with a native kernel's switch off and on, alternating in one process: the A/B of a change
that a switch turns off (every variant sees the same drifting machine, and no second process or build).

    python bench/bench_step_switch.py [--switch thread_ranges|amx_int8|shared_pages] [--quant int8|gguf|none]
                                      [--batches 1,2,4,6,8,16,32,64] [--ctx 512] [--shared-prefix 0]
                                      [--prefill 512,128] [--prefill-at 0] [--attention-math bfloat16]
                                      [--rounds 6] [--json OUT]

Each case is bench_model's jitted forward (packed weights where the engine packs them, a float16 KV pool, the
runner's compile options), called three times a round in each setting, the two settings' order swapped every
round; the table gives each setting's median, the speed-up, and the floor as bench_ab.py prices it: the weights and
the rows' keys and values over the copy bandwidth, or the FLOPs over numpy's float32 GEMM rate (for integer
weights the int8 kernel's large-product rate where it is faster), the larger, measured at the end of the same run.
Switches: `thread_ranges` (pallas_kernels/cpu_matmul.py: the packed matmuls' units as one contiguous range a
thread, or one at a time to whichever thread is free), `amx_int8`, and `shared_pages` (pallas_kernels/
cpu_attention.py: under `bfloat16` attention math, pages many queries read -- decode rows' shared prompt, a
prefill's cached prefix -- computed once for all of them, or every row's pages alone). `--shared-prefix N`: the
decode rows share the pages of their first N tokens (a fork's branches over one prompt), and the floor counts
those keys and values once; `--prefill-at N`: the prefills start
after N cached tokens (a prompt whose prefix is in the cache). `--attention-math` is the engine's key
(bfloat16, the int8 and GGUF presets' setting, by default). No peer: llama.cpp's step has no such switch (its whole
decode step is in bench_served_step.py).
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

SWITCHES = ("thread_ranges", "amx_int8", "shared_pages")


def _switch(name: str):
    """flip(on=None) -> the setting before: None reads it, True / False sets it."""
    from pallas_kernels import cpu_attention, cpu_matmul

    if name != "shared_pages":
        return getattr(cpu_matmul, name)
    default = cpu_attention.decode_shared_min_pages()

    def flip(on=None):
        now = cpu_attention.decode_shared_min_pages()
        if on is not None:
            cpu_attention.decode_shared_min_pages(default if on else 0)
        return bool(now)
    return flip


def run(switch: str, quant: str, batches: list[int], ctx: int, prefills: list[int], rounds: int,
        shared: int = 0, attention_math: str = "bfloat16", prefill_at: int = 0) -> dict:
    import bench_model as bm
    import floors
    from bench_ab import step_floor_ms

    flip = _switch(switch)
    cases = [("decode", b, ctx) for b in batches] + [("prefill", n, prefill_at + n) for n in prefills]
    common = min(shared, ctx - 1) // bm.PAGE_SIZE * bm.PAGE_SIZE  # the tokens of the pages decode rows share
    pages = 1 + max([b * -(-ctx // bm.PAGE_SIZE) for b in batches] +
                    [-(-(prefill_at + n) // bm.PAGE_SIZE) for n in prefills])
    mb = bm.ModelBench("float32", pages, "auto", quant, kv_dtype="float16", attention_math=attention_math)
    default = flip()
    runs = {c: mb._run_fn(mb.decode_batch(c[1], c[2], common) if c[0] == "decode"
                          else mb.prefill_batch(c[1], at=c[2] - c[1])) for c in cases}
    times: dict = {}
    try:
        for f in runs.values():
            f()
            f()
        for r in range(rounds):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                flip(on)
                for c, f in runs.items():
                    f()  # the first call after a switch is not timed
                    for _ in range(3):
                        t = time.perf_counter()
                        f()
                        times.setdefault((on, c), []).append(time.perf_counter() - t)
    finally:
        flip(default)
    # the compute floor's rate: numpy's float32 GEMM, or for integer kernels the int8 one where it is faster
    bw, gemm = floors.copy_bandwidth(threads=2), floors.numpy_gemm_rate()
    if quant != "none":
        gemm = max(gemm, floors.int8_gemm_rate())
    rows = []
    for c in cases:
        off, on = (1e3 * statistics.median(times[(s, c)]) for s in (False, True))
        kv = common + c[1] * (c[2] - common) if c[0] == "decode" else None
        floor = step_floor_ms(c, mb.weight_bytes, mb.cfg.kv_bytes_per_token(mb.itemsize), mb.cfg.flops_per_token(),
                              bw, gemm, kv)
        rows.append({"kind": c[0], "rows": c[1], "ctx": c[2], "off_ms": off, "on_ms": on, "floor_ms": floor})
    mb.close()
    return {"switch": switch, "default": bool(default), "quant": quant, "shared_prefix": common,
            "attention_math": attention_math, "copy_gbs": bw / 1e9,
            "gemm_gops": gemm / 1e9, "rounds": rounds, "steps": rows}


def report(res: dict) -> str:
    out = [f"switch {res['switch']} (default {'on' if res['default'] else 'off'}), weights {res['quant']}, KV float16, "
           f"attention math {res.get('attention_math', 'float32')}, decode rows sharing their first "
           f"{res.get('shared_prefix', 0)} tokens; "
           f"copy bandwidth {res['copy_gbs']:.1f} GB/s, GEMM {res['gemm_gops']:.0f} GOP/s; {res['rounds']} "
           "rounds x 3 calls a setting; peer: skipped (llama.cpp's step has no such switch)",
           "| step | rows | ctx | off ms | on ms | off / on | floor ms | floor / on |",
           "|---|---|---|---|---|---|---|---|"]
    for r in res["steps"]:
        out.append(f"| {r['kind']} | {r['rows']} | {r['ctx']} | {r['off_ms']:.2f} | {r['on_ms']:.2f} | "
                   f"{r['off_ms'] / r['on_ms']:.2f}x | {r['floor_ms']:.1f} | {r['floor_ms'] / r['on_ms']:.0%} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--switch", default="thread_ranges", choices=SWITCHES)
    ap.add_argument("--quant", default="int8", choices=("int8", "gguf", "none"))
    ap.add_argument("--batches", default="1,2,4,6,8,16,32,64")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--shared-prefix", type=int, default=0, help="decode rows share their first N tokens' pages")
    ap.add_argument("--attention-math", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--prefill", default="512,128", help="prefill lengths ('' for none)")
    ap.add_argument("--prefill-at", type=int, default=0, help="the prefills start after this many cached tokens")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    res = run(args.switch, args.quant, ints(args.batches), args.ctx, ints(args.prefill), args.rounds,
              args.shared_prefix, args.attention_math, args.prefill_at)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
