"""Prefill 512 tokens of SmolLM2 in one call, per prefill block size (tok/s). Usage: python bench/bench_prefill.py"""
import time, jax, jax.numpy as jnp, numpy as np
from sgl_jax.models.hub import resolve_model
from sgl_jax.models.loader import load_weights
from sgl_jax.models.llama import CausalLM, init_kv_cache
from sgl_jax.models.attention import AttnMetadata
cfg, params = load_weights(resolve_model("smollm2-135m"), progress=False)
model = CausalLM(cfg)
f = jax.jit(lambda p, ids, kv, li, meta: model.apply({"params": p}, ids, meta, kv, li), donate_argnums=(2,))
kv = init_kv_cache(cfg, 40, 16)
for Bq in (512, 128, 64):
    NB = 512 // Bq
    pos = np.arange(512, dtype=np.int32)
    pt = np.arange(1, 33, dtype=np.int32)
    meta = AttnMetadata(jnp.asarray(pos), jnp.asarray(pt[pos // 16] * 16 + pos % 16), jnp.zeros((0, 32), jnp.int32), jnp.zeros((0,), jnp.int32),
                        jnp.asarray(np.tile(pt, (NB, 1))), jnp.full(NB, 512, jnp.int32), block_q=Bq)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 49152, 512).astype(np.int32)); li = jnp.array([511], jnp.int32)
    out, kv = f(params, ids, kv, li, meta); out.block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter(); out, kv = f(params, ids, kv, li, meta); out.block_until_ready(); ts.append(time.perf_counter() - t)
    print(f"prefill 512 block_q={Bq}: median {512/np.median(ts):.0f} tok/s, best {512/min(ts):.0f} tok/s", flush=True)
