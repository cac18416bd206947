"""Whole SmolLM2 steps with a native kernel's switch off and on, alternating in one process: the A/B of a change
that a switch turns off (every variant sees the same drifting machine, and no second process or build).

    python bench/bench_step_switch.py [--switch thread_ranges|amx_int8] [--quant int8|gguf|none]
                                      [--batches 1,2,4,6,8,16,32,64] [--ctx 512] [--prefill 512,128] [--rounds 6]
                                      [--json OUT]

Each case is bench_model's jitted forward (packed weights where the engine packs them, a float16 KV pool, the
runner's compile options), called three times a round in each setting, the two settings' order swapped every
round; the table gives each setting's median, the speed-up, and the floor as bench_ab.py prices it: the weights and
the rows' keys and values over the copy bandwidth, or the FLOPs over numpy's float32 GEMM rate (for integer
weights the int8 kernel's large-product rate where it is faster), the larger, measured at the end of the same run.
Switches (pallas_kernels/cpu_matmul.py): `thread_ranges` (the packed matmuls' units as one contiguous range a
thread, or one at a time to whichever thread is free) and `amx_int8`. No peer: llama.cpp's step has no such
switch (its whole decode step is in bench_served_step.py).
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

SWITCHES = ("thread_ranges", "amx_int8")


def run(switch: str, quant: str, batches: list[int], ctx: int, prefills: list[int], rounds: int) -> dict:
    import bench_model as bm
    import floors
    from bench_ab import step_floor_ms
    from pallas_kernels import cpu_matmul

    flip = getattr(cpu_matmul, switch)
    cases = [("decode", b, ctx) for b in batches] + [("prefill", n, n) for n in prefills]
    pages = 1 + max([b * -(-ctx // bm.PAGE_SIZE) for b in batches] + [-(-n // bm.PAGE_SIZE) for n in prefills])
    mb = bm.ModelBench("float32", pages, "auto", quant, kv_dtype="float16")
    default = flip()
    runs = {c: mb._run_fn(mb.decode_batch(c[1], c[2]) if c[0] == "decode" else mb.prefill_batch(c[1])) for c in cases}
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
        floor = step_floor_ms(c, mb.weight_bytes, mb.cfg.kv_bytes_per_token(mb.itemsize), mb.cfg.flops_per_token(),
                              bw, gemm)
        rows.append({"kind": c[0], "rows": c[1], "ctx": c[2], "off_ms": off, "on_ms": on, "floor_ms": floor})
    mb.close()
    return {"switch": switch, "default": bool(default), "quant": quant, "copy_gbs": bw / 1e9,
            "gemm_gops": gemm / 1e9, "rounds": rounds, "steps": rows}


def report(res: dict) -> str:
    out = [f"switch {res['switch']} (default {'on' if res['default'] else 'off'}), weights {res['quant']}, KV float16; "
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
    ap.add_argument("--prefill", default="512,128", help="prefill lengths ('' for none)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    res = run(args.switch, args.quant, ints(args.batches), args.ctx, ints(args.prefill), args.rounds)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
