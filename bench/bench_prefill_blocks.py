"""Prefill steps at several query-block sizes (`shapes.prefill_block`), compiled in one process and timed in
turn (bench_model.interleaved_times), beside each step's tokens at the fresh 512-token prompt's rate measured in
the same run.

    python bench/bench_prefill_blocks.py [--blocks 64,32,16] [--reps 7] [--quant int8] [--kv-dtype float16]
                                         [--attention-math bfloat16] [--cases 22@860,4x11@880,...]

A case `CxN@M` is C chunks of N tokens, each after the same M cached tokens (a fork's branches, a select's
choices): its pages shared up to M, each chunk's own after. Every chunk pads to whole blocks, and the padded rows
cost the step's elementwise work (norms, RoPE, the MLP's activation) and the attention kernel's per-query loops;
the matmuls skip them. The floor column prices the case's tokens at the 512-token prompt's rate with the same block
size; the peer (llama-server) is skipped: it has no query blocks to choose.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CASES = "512@0,22@860,4x11@880,6x19@650,300@650,128@0,3x40@400"


def parse_case(text: str) -> tuple[int, int, int]:
    """`CxN@M` or `N@M` -> (chunks, tokens, cached)."""
    head, _, at = text.partition("@")
    chunks, _, n = head.rpartition("x")
    return int(chunks or 1), int(n), int(at or 0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="64,32,16")
    ap.add_argument("--reps", type=int, default=7, help="rounds; each times 3 calls of every block size in turn")
    ap.add_argument("--quant", default="int8", choices=["none", "int8", "gguf"])
    ap.add_argument("--kv-dtype", default="float16")
    ap.add_argument("--attention-math", default="bfloat16")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma list of CxN@M (the first should be 512@0: the floor)")
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    import bench_model as bm

    blocks = [int(b) for b in args.blocks.split(",")]
    cases = [parse_case(c) for c in args.cases.split(",")]
    pages = max(bm.ModelBench.prefill_pages(n, at, c) for c, n, at in cases)
    mb = bm.ModelBench("float32", pages + 1, "auto", args.quant, kv_dtype=args.kv_dtype or None,
                       attention_math=args.attention_math)
    print(f"quant={args.quant} kv={args.kv_dtype} attention_math={args.attention_math}; ms a step, median of "
          f"{args.reps} rounds x 3 calls, the sizes in turn; floor = the tokens at the 512@0 case's rate (same block "
          "size)")
    print("| case | " + " | ".join(f"block {b}" for b in blocks) + " |")
    print("|---|" + "---|" * len(blocks))
    rate: dict[int, float] = {}
    for chunks, n, at in cases:
        runs = {bq: mb._run_fn(mb.prefill_batch(n, bq, at, chunks=chunks)) for bq in blocks}  # the same tokens
        med = {bq: statistics.median(ts) for bq, ts in bm.interleaved_times(runs, args.reps).items()}
        if not rate and chunks == 1 and n == 512 and at == 0:
            rate = {bq: 512 / med[bq] for bq in blocks}
        cells = [f"{1e3 * med[bq]:.1f}" + (f" ({med[bq] * rate[bq] / (chunks * n):.2f}x floor)" if rate else "")
                 for bq in blocks]
        name = (f"{chunks} x " if chunks > 1 else "") + f"{n}" + (f" after {at}" if at else "")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
