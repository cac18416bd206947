"""Look at the optimized HLO of the model's jitted forward for work XLA:CPU does on the whole KV pool.

    python bench/inspect_hlo.py [--batch 32] [--ctx 512] [--prefill 0] [--dtype float32] [--dump FILE]

Compiles the forward exactly as bench_model.py runs it (KV pool donated) for one decode batch (or, with
--prefill N, one N-token prefill) and reports:
  * whether every pool buffer is aliased input -> output (donation honoured: `input_output_alias`),
  * every instruction whose result has a pool buffer's shape, by opcode (a `copy` or a non-in-place
    `scatter`/fusion producing a pool-shaped result means the pool is rewritten every step),
  * the gathers (page-table reads) and the fusions they sit in, with their output shapes,
  * the total bytes of the compiled module's temporary buffers (from the compiled memory analysis).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    """The command line, the traced steps and the printed breakdown (see the module docstring); long because it
    is the script's whole run, one step after another."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=0, help="instead of decode: one prefill of this many tokens")
    ap.add_argument("--block-q", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention", default="jnp", help="as bench_model.py --attention")
    ap.add_argument("--dump", help="write the optimized HLO text here")
    args = ap.parse_args(argv)

    sys.path.insert(0, HERE)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bench_model as bm
    from sgl_jax.batch import SeqChunk, pack

    S = bm.PAGE_SIZE
    if args.prefill:
        pp = math.ceil(args.prefill / S)
        num_pages = 1 + pp
    else:
        pp = math.ceil(args.ctx / S)
        num_pages = 1 + args.batch * pp
    mb = bm.ModelBench(args.dtype, num_pages, args.attention)
    if args.prefill:
        ids = np.random.default_rng(0).integers(0, mb.cfg.vocab_size, args.prefill).tolist()
        b = pack([SeqChunk(ids, 0, list(range(1, 1 + pp)))], page_size=S, block_q=args.block_q)
        what = f"prefill {args.prefill} block_q={args.block_q}"
    else:
        chunks = [SeqChunk([1], args.ctx - 1, list(range(1 + i * pp, 1 + (i + 1) * pp))) for i in range(args.batch)]
        b = pack(chunks, page_size=S, block_q=1)
        what = f"decode B={args.batch} ctx={args.ctx}"
    meta = tuple(jnp.asarray(m) for m in (b.positions, b.slot_mapping, b.dec_page_table, b.dec_kv_lens,
                                          b.pre_page_table, b.pre_kv_lens))
    lowered = mb.fwd.lower(mb.params, jnp.asarray(b.input_ids), mb.kv, jnp.asarray(b.logits_indices), meta,
                           block_q=b.block_q)
    compiled = lowered.compile()
    text = compiled.as_text()
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(text)
    pool_shape = mb.kv[0][0].shape
    dt = {"float32": "f32", "bfloat16": "bf16"}[args.dtype]
    shape_txt = f"{dt}[{','.join(map(str, pool_shape))}]"
    print(f"{what}, {args.dtype}; pool buffer {shape_txt} ({mb.kv[0][0].nbytes / 1e6:.1f} MB each, "
          f"{2 * len(mb.kv)} buffers)")

    header = text.split("\n", 1)[0]
    aliases = re.findall(r"\{(\d+(?:,\s*\d+)*)\}:\s*\((\d+),", header)
    n_alias = header.count("may-alias") + header.count("must-alias")
    print(f"input_output_alias entries in the module header: {n_alias} "
          f"(expected {2 * len(mb.kv)}: every K and V buffer donated and updated in place)")

    ops = collections.Counter()
    examples = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+\[[^\]]*\])(?:\{[^}]*\})? (\w[\w-]*)\(", line)
        if not m:
            continue
        name, shape, op = m.groups()
        if shape == shape_txt:
            ops[op] += 1
            examples.setdefault(op, line.strip()[:220])
    print("instructions producing a pool-shaped result (all computations, fused bodies included):")
    for op, n in ops.most_common():
        print(f"  {op:<22} x{n:<4}  e.g. {examples[op]}")
    entry = text[text.index("\nENTRY"):]
    entry_ops = collections.Counter()
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+\[[^\]]*\])(?:\{[^}]*\})? (\w[\w-]*)\(", line)
        if m and m.group(2) == shape_txt:
            entry_ops[m.group(3)] += 1
    print(f"  of which at the top level (ENTRY): {dict(entry_ops)}")
    copies = [l.strip()[:200] for l in entry.splitlines() if re.search(rf"= {re.escape(shape_txt)}\S* copy\(", l)]
    print(f"top-level copies of pool buffers: {len(copies)}" + "".join(f"\n    {c}" for c in copies[:4]))

    gathers = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (\S+\[[^\]]*\])\S* gather\(", line)
        if m:
            gathers[m.group(1)] += 1
    print("gathers by output shape:", dict(gathers))
    try:
        ma = compiled.memory_analysis()
        print(f"memory analysis: temp {ma.temp_size_in_bytes / 1e6:.1f} MB, argument "
              f"{ma.argument_size_in_bytes / 1e6:.1f} MB, output {ma.output_size_in_bytes / 1e6:.1f} MB, "
              f"alias {ma.alias_size_in_bytes / 1e6:.1f} MB")
    except Exception as e:  # noqa: BLE001
        print("memory analysis unavailable:", e)
    mb.close()


if __name__ == "__main__":
    main()
