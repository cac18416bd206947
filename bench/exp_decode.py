"""Experiment: whole-model decode step variants, compiled side by side and timed in interleaved rounds.

    python bench/exp_decode.py [--batch 32] [--ctx 512] [--rounds 4] [--steps 5] [--variants a,b,...]

Every variant is the real CausalLM forward (jitted, KV pool donated) with one change, so the differences
are what the change would buy in the model. Rounds interleave the variants so that a busy neighbour on
the shared machine slows all of them alike; the report gives the median and the minimum step time.

  base          the model as it is (jnp paged_attention, f32 KV)
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

VARIANTS = ["base", "no_attn", "hm_dec", "flat_dec", "kv_bf16", "kv_bf16_qcast", "lm_head_t", "page_major",
            "page_major_noguard"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--fill", choices=["zeros", "random"], default="random",
                    help="KV pool contents: random (default; a zero pool can read as cache-resident zero pages) "
                         "or zeros (as init_kv_cache); a variant name ending in _rand forces random")
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    import jax
    import jax.numpy as jnp

    import bench_model as bm
    from sgl_jax.batch import SeqChunk, pack
    from sgl_jax.models.attention import AttnMetadata
    from sgl_jax.models.hub import resolve_model
    from sgl_jax.models.llama import CausalLM, init_kv_cache
    from sgl_jax.models.loader import load_weights

    S = bm.PAGE_SIZE
    pp = math.ceil(args.ctx / S)
    B = args.batch
    cfg, params = load_weights(resolve_model("smollm2-135m"), args.dtype, progress=False)
    dt = getattr(jnp, args.dtype)
    chunks = [SeqChunk([1 + i], args.ctx - 1, list(range(1 + i * pp, 1 + (i + 1) * pp))) for i in range(B)]
    b = pack(chunks, page_size=S, block_q=1)
    meta = tuple(jnp.asarray(m) for m in (b.positions, b.slot_mapping, b.dec_page_table, b.dec_kv_lens,
                                          b.pre_page_table, b.pre_kv_lens))
    ids, li = jnp.asarray(b.input_ids), jnp.asarray(b.logits_indices)

    built = {}
    for v in args.variants.split(","):
        vbase = v[:-5] if v.endswith("_rand") else v
        attention = {"no_attn": "none", "hm_dec": "hm_dec", "flat_dec": "flat_dec", "kv_bf16_dec": "hm_dec",
                     "kv_bf16_qcast": "qcast_dec", "page_major": "page_major",
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

        kv = init_kv_cache(vcfg, 1 + B * pp, S, kv_dtype)
        if args.fill == "random" or v.endswith("_rand"):  # realistic, non-zero pool contents
            keys = jax.random.split(jax.random.PRNGKey(7), 2 * len(kv))
            kv = tuple((jax.random.normal(keys[2 * i], k.shape, k.dtype), jax.random.normal(keys[2 * i + 1], vv.shape, vv.dtype))
                       for i, (k, vv) in enumerate(kv))
        t0 = time.perf_counter()
        fwd = jax.jit(forward, donate_argnums=(2,)).lower(vparams, ids, kv, li, meta).compile()
        undo()
        built[v] = {"fwd": fwd, "params": vparams, "kv": kv, "compile_s": time.perf_counter() - t0,
                    "times": [], "ref": None}

    def step(v):
        st = built[v]
        logits, st["kv"] = st["fwd"](st["params"], ids, st["kv"], li, meta)
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
    print(f"decode B={B} ctx={args.ctx} {args.dtype}: {args.rounds} rounds x {args.steps} steps, interleaved; "
          f"load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'variant':<13} {'median ms':>9} {'min ms':>8} {'compile s':>9} {'max|dlogit| vs base':>20}")
    for v, st in built.items():
        ts = [1e3 * t for t in st["times"]]
        diff = "" if base is None or v == "no_attn" else f"{float(jnp.max(jnp.abs(st['ref'] - base))):.2e}"
        print(f"{v:<13} {statistics.median(ts):9.1f} {min(ts):8.1f} {st['compile_s']:9.1f} {diff:>20}")


if __name__ == "__main__":
    main()
