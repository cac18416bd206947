"""Experiment: whole-model decode step variants, compiled side by side and timed in interleaved rounds.

    python bench/exp_decode.py [--batch 32] [--ctx 512] [--rounds 4] [--steps 5] [--variants a,b,...]
    python bench/exp_decode.py --batches 1,32,64 --ctxs 128,512 --variants base,block,no_attn --floors

Every variant is the real CausalLM forward (jitted, KV pool donated) with one change, so the differences
are what the change would buy in the model. Rounds interleave the variants so that a busy neighbour on
the shared machine slows all of them alike; the report gives the median and the minimum step time.
With several batches / contexts, each (batch, ctx) is built, timed and freed in turn, in one process.
`--floors` measures this machine's copy bandwidth and GEMM rate first (bench/floors.py) and prints each
configuration's memory floor (weights + the batch's KV read once) and compute floor (as bench_model.py).

  base          the model as it is (jnp paged_attention: decode rows take paged_decode_attention)
  gather_dec    decode rows through paged_decode_attention (the gather decode path; never page-major)
  block         decode rows through paged_block_attention (the generic any-Bq path; the model before the
                decode-specialised path was adopted)
  no_attn       attention replaced by the identity (q passes through; KV write kept): the non-attention cost
  hm_dec        decode rows use bench_attention_layout.paged_decode_hm (no Bq axis)
  flat_dec      decode rows use paged_decode_flat (gather of [N*KV, S, D] rows, no transpose)
  kv_bf16       KV pool in bfloat16 (weights and compute f32; write_kv casts, attention upcasts)
  kv_bf16_dec   kv_bf16 + hm_dec
  lm_head_t     tied embedding copied to an untied [E, V] LM head (logits dot without a transposed operand)
  kv_bf16_qcast KV pool in bfloat16 and q cast to bf16 for the attention dots (bench_attention_layout.qcast_dec)
  page_major    decode attention batched over the pool's pages in place (bench_attention_layout.page_major_decode)
  page_major_noguard   the same without the non-finite-V guard pass (valid for a pool kept finite)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = ["base", "block", "no_attn", "hm_dec", "flat_dec", "kv_bf16", "kv_bf16_qcast", "lm_head_t", "page_major",
            "page_major_noguard"]


def _build(v, cfg, params, B, ctx, args):
    """One variant's compiled forward for a decode batch of B rows at context ctx, with its own KV pool."""
    import jax
    import jax.numpy as jnp

    import bench_model as bm
    from sgl_jax.batch import SeqChunk, pack
    from sgl_jax.models.attention import AttnMetadata
    from sgl_jax.models.llama import CausalLM, init_kv_cache

    S = bm.PAGE_SIZE
    pp = math.ceil(ctx / S)
    dt = getattr(jnp, args.dtype)
    chunks = [SeqChunk([1 + i], ctx - 1, list(range(1 + i * pp, 1 + (i + 1) * pp))) for i in range(B)]
    b = pack(chunks, page_size=S, block_q=1, page_width=args.page_width)
    meta = tuple(jnp.asarray(m) for m in (b.positions, b.slot_mapping, b.dec_page_table, b.dec_kv_lens,
                                          b.pre_page_table, b.pre_kv_lens))
    ids, li = jnp.asarray(b.input_ids), jnp.asarray(b.logits_indices)
    vbase = v[:-5] if v.endswith("_rand") else v
    attention = {"no_attn": "none", "hm_dec": "hm_dec", "flat_dec": "flat_dec", "kv_bf16_dec": "hm_dec",
                 "kv_bf16_qcast": "qcast_dec", "page_major": "page_major", "block": "block",
                 "gather_dec": "gather_dec",
                 "page_major_noguard": "page_major_noguard"}.get(vbase, "jnp")
    kv_dtype = jnp.bfloat16 if vbase.startswith("kv_bf16") else dt
    vcfg, vparams = cfg, params
    if vbase == "lm_head_t":
        vcfg = dataclasses.replace(cfg, tie_word_embeddings=False)
        vparams = dict(params, lm_head={"kernel": jnp.asarray(params["embed_tokens"]["embedding"].T)})
    undo = bm._attention_override(attention)
    model = CausalLM(vcfg, dt)

    def forward(params, ids, kv, logits_idx, meta_arrays, model=model):
        return model.apply({"params": params}, ids, AttnMetadata(*meta_arrays, block_q=1), kv, logits_idx)

    kv = init_kv_cache(vcfg, max(1 + B * pp, args.pool_pages or 0), S, kv_dtype)
    if args.fill == "random" or v.endswith("_rand"):  # realistic, non-zero pool contents
        keys = jax.random.split(jax.random.PRNGKey(7), 2 * len(kv))
        kv = tuple((jax.random.normal(keys[2 * i], k.shape, k.dtype), jax.random.normal(keys[2 * i + 1], vv.shape, vv.dtype))
                   for i, (k, vv) in enumerate(kv))
    t0 = time.perf_counter()
    fwd = jax.jit(forward, donate_argnums=(2,)).lower(vparams, ids, kv, li, meta).compile()
    undo()
    return {"fwd": fwd, "params": vparams, "kv": kv, "ids": ids, "li": li, "meta": meta,
            "compile_s": time.perf_counter() - t0, "times": [], "ref": None, "width": b.dec_page_table.shape[1]}


def run_config(cfg, params, B, ctx, args, floors=None):
    """Build every variant for (B, ctx), time them in interleaved rounds, print the table; returns rows."""
    import jax
    import jax.numpy as jnp

    built = {v: _build(v, cfg, params, B, ctx, args) for v in args.variants.split(",")}

    def step(v):
        st = built[v]
        logits, st["kv"] = st["fwd"](st["params"], st["ids"], st["kv"], st["li"], st["meta"])
        logits.block_until_ready()
        return logits

    for v in built:  # warm-up, and the logits every variant but no_attn should reproduce
        for _ in range(2):
            built[v]["ref"] = step(v)
    base = built.get("base", {}).get("ref")
    for _ in range(args.rounds):
        for v in built:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(v)
                built[v]["times"].append(time.perf_counter() - t0)
    width = next(iter(built.values()))["width"]
    pool = next(iter(built.values()))["kv"][0][0].shape[0]
    line = (f"decode B={B} ctx={ctx} (page width {width}, pool {pool} pages) {args.dtype}: {args.rounds} rounds x "
            f"{args.steps} steps, interleaved; load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if floors:
        w_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
        mem_ms = 1e3 * (w_bytes + B * ctx * cfg.kv_bytes_per_token(4)) / floors["copy_bw"]
        cmp_ms = 1e3 * cfg.flops_per_token() * B / floors["gemm"]
        line += f"; floors: memory {mem_ms:.1f} ms, compute {cmp_ms:.1f} ms"
    print(line)
    print(f"{'variant':<13} {'median ms':>9} {'min ms':>8} {'compile s':>9} {'max|dlogit| vs base':>20}")
    rows = []
    for v, st in built.items():
        ts = [1e3 * t for t in st["times"]]
        diff = "" if base is None or v == "no_attn" else f"{float(jnp.max(jnp.abs(st['ref'] - base))):.2e}"
        print(f"{v:<13} {statistics.median(ts):9.1f} {min(ts):8.1f} {st['compile_s']:9.1f} {diff:>20}")
        rows.append((B, ctx, v, statistics.median(ts), min(ts)))
    sys.stdout.flush()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batches", help="comma-separated batch sizes (overrides --batch)")
    ap.add_argument("--ctxs", help="comma-separated contexts (overrides --ctx)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--page-width", type=int, help="page-table width (default: the context's pages; the serving "
                    "preset's buckets are 32 and 128)")
    ap.add_argument("--pool-pages", type=int, help="KV pool pages (default: the batch's pages + the sink page; "
                    "the default serving preset has ~1450)")
    ap.add_argument("--floors", action="store_true", help="measure copy bandwidth / GEMM rate and print floors")
    ap.add_argument("--fill", choices=["zeros", "random"], default="random",
                    help="KV pool contents: random (default; a zero pool can read as cache-resident zero pages) "
                         "or zeros (as init_kv_cache); a variant name ending in _rand forces random")
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    from sgl_jax.models.hub import resolve_model
    from sgl_jax.models.loader import load_weights

    cfg, params = load_weights(resolve_model("smollm2-135m"), args.dtype, progress=False)
    floors = None
    if args.floors:
        import floors as floors_mod
        floors = floors_mod.measure_all(quick=False)
    batches = [int(x) for x in (args.batches or str(args.batch)).split(",")]
    ctxs = [int(x) for x in (args.ctxs or str(args.ctx)).split(",")]
    rows = []
    for ctx in ctxs:
        for B in batches:
            rows += run_config(cfg, params, B, ctx, args, floors)
    if len(rows) > len(args.variants.split(",")):
        print("summary (median / min ms):")
        for B, ctx, v, med, mn in rows:
            print(f"  B={B:<3} ctx={ctx:<4} {v:<13} {med:8.1f} {mn:8.1f}")


if __name__ == "__main__":
    main()
