"""The decoder: one Flax (linen) module family for Llama, Mistral, SmolLM, Qwen2 and Qwen3.

Used functionally: `params = loader.load(...)` gives a plain pytree, and
    logits, kv = CausalLM(cfg).apply({"params": params}, input_ids, meta, kv, logits_indices)
is a pure function, jit-able, with the KV pool passed in and returned (donate it).

Parameter names keep the Hugging Face checkpoint names, so loading verifies keys and shapes:
    HF  model.embed_tokens.weight              -> params["embed_tokens"]["embedding"]       [V, E]
    HF  model.layers.{i}.self_attn.q_proj.weight -> params["layers_{i}"]["self_attn"]["q_proj"]["kernel"] [E, H*D]
        (every Linear is stored transposed, [in, out]; biases as "bias")
    HF  model.layers.{i}.self_attn.{q,k}_norm.weight -> ...["self_attn"]["{q,k}_norm"]["weight"]   [D]  (Qwen3)
    HF  model.layers.{i}.{input,post_attention}_layernorm.weight -> params["layers_{i}"][...]["weight"]
    HF  model.layers.{i}.mlp.{gate,up,down}_proj.weight -> params["layers_{i}"]["mlp"][...]["kernel"]
    HF  model.norm.weight -> params["norm"]["weight"];  lm_head.weight -> params["lm_head"]["kernel"] [E, V]
        (absent when embeddings are tied)
With int8 weight-only quantization (sgl_jax.models.quant) every linear kernel, the LM head and a tied embedding
are int8 with a float32 "scale" beside them, one per output channel ([out]; [V] for the embedding); `Linear`,
`Embedding` and `LMHead` see the scale in the params and dequantize after the matmul. Nothing else changes.

Layers are unrolled with separate per-layer arrays rather than stacked under `lax.scan`: on XLA:CPU
the scanned variant copied the KV cache and weight slices every step (prefill 364 vs 479 tok/s, batch-32
decode 807 vs 516 ms in ../shared/reference/cpu-baselines.md; our own re-measurement is in
bench/notes.md). Compile time therefore grows with depth (seconds for 30 layers), paid once per shape
bucket and kept in the persistent compilation cache.

Dimension letters in comments: T tokens, E hidden, H query heads, K kv heads, D head dim, F ffn, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pallas_kernels import cpu_matmul

from sgl_jax.models.attention import AttnMetadata, KVCache, get_attention_backend, write_kv
from sgl_jax.models.config import ModelConfig, rope_inv_freq


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        w = _param(self, "weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * w.astype(jnp.float32)).astype(self.dtype)


def rope_tables(positions, inv_freq):
    """cos and sin of each position's angles, [T, 1, D/2] each: computed once a step and shared by every layer.
    XLA:CPU fuses elementwise producers into their consumers, so a sine computed once was evaluated again per
    element of q and k -- per head, in every layer (19 of a 304 ms 512-token prefill; bench/notes.md, session 15)
    -- and it drops an optimization barrier before fusion. A dot is never fused into its consumers: the product
    with an identity matrix (exact: one term x * 1, the rest x * 0) materializes the tables once."""
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    half = ang.shape[1]
    cs = jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=1)
    cs = jnp.dot(cs, jnp.eye(2 * half, dtype=jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return cs[:, None, :half], cs[:, None, half:]


def apply_rope(x, rope):
    """Rotate-half RoPE (the Hugging Face layout). x [T, heads, D], rope = rope_tables(positions [T], ...)."""
    cos, sin = rope
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : x.shape[-1] // 2], xf[..., x.shape[-1] // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _param(module: nn.Module, name: str, init, shape: tuple, dtype):
    """`module.param(name, init, shape, dtype)`, without flax's shape check on every trace: for a weight the params
    already hold, flax traces the initializer under `eval_shape` to compare shapes, once per weight per trace -- a
    third of tracing SmolLM2's forward (0.59-0.75 -> 0.40-0.42 s a shape, bench/notes.md). The shape is compared
    here directly, and a mismatch names the weight."""
    if not module.has_variable("params", name):
        return module.param(name, init, shape, dtype)
    w = module.get_variable("params", name)
    if tuple(w.shape) != tuple(shape):
        path = "/".join((*module.scope.path, name))
        raise ValueError(f"weight {path} has shape {tuple(w.shape)}; the model's config wants {tuple(shape)}")
    return w


def _packed(module: nn.Module, weight: str):
    """(packed weight [out / 16, in, 16] float32 or [out / 16, in / 4, 16, 4] int8, int8 scale [out] or None) when
    the params at `module` hold a panel-packed matrix (sgl_jax.models.packing: CPU, float32 compute), else None."""
    if module.has_variable("params", weight) and module.get_variable("params", weight).ndim in (3, 4):
        scale = module.get_variable("params", "scale") if module.has_variable("params", "scale") else None
        return module.get_variable("params", weight), scale
    return None


def _int8(module: nn.Module, weight: str):
    """(int8 weight, f32 per-output-channel scale) when the params at `module` are int8-quantized, else None.

    The params pytree decides (sgl_jax.models.quant): a quantized leaf comes with a `scale` beside it. `init`
    (and so param_shapes and the loader's shape check) always builds the float layout."""
    if module.has_variable("params", "scale"):
        return module.get_variable("params", weight), module.get_variable("params", "scale")
    return None


# XLA:CPU does not fuse an int8 -> float convert into the dot: the convert writes the float matrix, then the
# dot reads it. Two things keep that copy in cache (SmolLM2, batch-1 decode: 384 ms a step without them, vs
# 40 ms with float32 weights; bench/notes.md, "int8 weight-only quantization"):
#  * the convert depends on the matmul's input (`_after`): otherwise XLA:CPU's scheduler starts every convert
#    (they read parameters only) before the first matmul, and all the float copies exist at once;
#  * matrices over _CPU_CHUNK weights are converted and multiplied in pieces of output channels, each piece
#    after the previous one's product (the tied 49,152 x 576 head: 5.5 ms in pieces of 4,096 rows, 69 ms in
#    one, 8.6 ms for the float32 head, measured alone).
# On TPU/GPU XLA is expected to fuse the convert into the dot (not verified here): one piece, no dependency.
_CPU_CHUNK = 4096 * 576


def _after(w, x):
    """`w` unchanged, but computed from `x` too, so that XLA cannot schedule what reads it before `x` exists.

    isnan(v) & isfinite(v) is false for every v (NaN is not finite), and XLA does not fold it away (an
    optimization_barrier does not help: XLA:CPU removes barriers before it schedules)."""
    if x.size == 0:
        return w
    v = x.reshape(-1)[0]
    return w | (jnp.isnan(v) & jnp.isfinite(v)).astype(w.dtype)


def int8_matmul(x, w, scale, out_axis: int):
    """(x @ w.astype(x.dtype)) * scale in float32: x [T, in], w int8 [in, out] (out_axis 1) or [out, in]
    (out_axis 0, the tied embedding), scale f32 [out]. The scale multiplies after the dot, once per output
    channel. On CPU, few float32 rows (decode) take the native kernel (pallas_kernels/cpu_matmul.py) when it could
    be built; otherwise each piece's convert waits for the previous piece's product (see _CPU_CHUNK)."""
    spec = "TI,IO->TO" if out_axis == 1 else "TI,OI->TO"
    cpu = jax.default_backend() == "cpu" and not cpu_matmul.sharded()  # sharded: XLA's dot, one piece
    if cpu and x.shape[0] <= cpu_matmul.MAX_ROWS_INT8 and x.dtype == jnp.float32 and cpu_matmul.int8_available():
        return cpu_matmul.int8_matmul(x, w, scale, out_axis)  # decode rows: each weight read once, as a byte
    n_out = w.shape[out_axis]
    step = n_out
    if cpu and w.size > _CPU_CHUNK:
        step = max(128, _CPU_CHUNK // w.shape[1 - out_axis] // 128 * 128)
    outs, prev = [], x
    for a in range(0, n_out, step):
        part = jax.lax.slice_in_dim(w, a, min(a + step, n_out), axis=out_axis)
        part = _after(part, prev) if cpu else part
        prev = jnp.einsum(spec, x, part.astype(x.dtype), preferred_element_type=jnp.float32)  # [T, <=step]
        outs.append(prev)
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)) * scale  # [T, out]


def q4_1_dequantize(blocks) -> jax.Array:
    """A GGUF Q4_1 matrix's blocks uint8 [out, in / 32, 20] -> float32 [in, out]: w = d * q + m per block of 32
    inputs (float16 d and m, then 16 bytes: q[j] in the low nibble of byte j, q[j + 16] in the high one), the
    values sgl_jax.models.gguf_quants gives at load."""
    d = jax.lax.bitcast_convert_type(blocks[..., 0:2], jnp.float16).astype(jnp.float32)[..., None]
    m = jax.lax.bitcast_convert_type(blocks[..., 2:4], jnp.float16).astype(jnp.float32)[..., None]
    qs = blocks[..., 4:]
    q = jnp.concatenate([qs & 15, qs >> 4], axis=-1).astype(jnp.float32)  # [out, in / 32, 32]
    return (d * q + m).reshape(blocks.shape[0], -1).T


def q4_1_matmul(x, blocks, keep=None):
    """x @ W in float32 for a GGUF Q4_1 matrix kept in its blocks (`quantization: gguf`): packed [out / 16, in / 32,
    320] (CPU: the native kernel, x quantized per 32 inputs as for int8) or as read [out, in / 32, 20]
    (elsewhere: dequantized in the graph, then XLA's dot). `keep`: see Linear."""
    if blocks.shape[-1] == cpu_matmul.Q4_BYTES:
        return cpu_matmul.packed_q4_1_matmul(x.astype(jnp.float32), blocks, keep)
    return jnp.dot(x.astype(jnp.float32), q4_1_dequantize(blocks))


class Linear(nn.Module):
    """y = x @ kernel [+ bias], kernel [in, out]; the same names and numerics as flax's nn.Dense.

    int8 weight-only (kernel int8 [in, out] + scale f32 [out]): y = (x @ kernel.astype(x.dtype)) * scale,
    accumulated in float32. The scale is applied after the matmul, one per output channel, so the dot reads
    the int8 matrix and XLA (TPU/GPU) can fuse the convert into it; the result is cast back to `dtype`.
    A packed kernel ([out / 16, in, 16] float32, or int8 [out / 16, in / 4, 16, 4]; sgl_jax.models.packing) goes to
    the CPU's native packed matmul: float32 the same product in another layout; int8 with x quantized per 32 inputs
    as well (an error of at most half a step of each block's scale per input: pallas_kernels/cpu_matmul.cc).
    A `q4_1` leaf instead of the kernel: a GGUF Q4_1 matrix kept in its blocks (q4_1_matmul).
    `keep` (bool [T], traced: the step's real tokens): the native kernels compute those rows only and give zeros for
    the others -- a step's padding rows; other paths compute every row."""

    features: int
    use_bias: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, keep=None):
        p, q = _packed(self, "kernel"), _int8(self, "kernel")
        if self.has_variable("params", "q4_1"):  # quantization: gguf
            y = q4_1_matmul(x, self.get_variable("params", "q4_1"), keep).astype(self.dtype)  # [T, out]
        elif p is not None:  # CPU: the native packed matmul, any number of rows
            y = cpu_matmul.packed_matmul(x.astype(jnp.float32), *p, keep=keep).astype(self.dtype)  # [T, out]
        elif q is not None:
            y = int8_matmul(x, *q, out_axis=1).astype(self.dtype)  # [T, out]
        else:
            w = _param(self, "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.dtype)
            y = jnp.dot(x, w)  # [T, out]
        if self.use_bias:
            y = y + _param(self, "bias", nn.initializers.zeros, (self.features,), self.dtype)
        return y


def _dense(features, use_bias, dtype, name):
    return Linear(features, use_bias, dtype, name=name)


def _attend(attn, kw, q, k, v, pages, meta: AttnMetadata):
    """This step's k, v written into the pool, then attention per segment of the ragged batch (decode rows, run
    blocks, prefill blocks). q [T, H, D], k, v [T, K, D] (H, K: the heads this device holds) -> ([T, H*D], pages).
    `kw["kv_format"]`, where present, names a float8 pool's format (its pages are uint8 codes)."""
    pages = write_kv(pages, k, v, meta.slot_mapping, meta.dup_src, meta.dup_slots, kw.get("kv_format", ""))
    H, D = q.shape[1], q.shape[2]
    Sd, NR, Br, NB, Bq = meta.num_decode, meta.num_runs, meta.run_q, meta.num_blocks, meta.block_q
    outs = []
    if Sd:
        o = attn(q[:Sd].reshape(Sd, 1, H, D), *pages, meta.dec_page_table, meta.dec_kv_lens,
                 meta.positions[:Sd].reshape(Sd, 1), **kw)  # [Sd, 1, H, D]
        outs.append(o.reshape(Sd, H * D))
    if NR:
        a, e = Sd, Sd + NR * Br
        o = attn(q[a:e].reshape(NR, Br, H, D), *pages, meta.run_page_table, meta.run_kv_lens,
                 meta.positions[a:e].reshape(NR, Br), **kw)  # [NR, Br, H, D]
        outs.append(o.reshape(NR * Br, H * D))
    if NB:
        a = Sd + NR * Br
        o = attn(q[a:].reshape(NB, Bq, H, D), *pages, meta.pre_page_table, meta.pre_kv_lens,
                 meta.positions[a:].reshape(NB, Bq), **kw)  # [NB, Bq, H, D]
        outs.append(o.reshape(NB * Bq, H * D))
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)), pages  # [T, H*D]


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    attention_backend: str = "jnp"
    layout: object = None  # sgl_jax.parallel.tp.TPLayout: attention under shard_map on each device's heads
    attention_math: str = "float32"  # see get_attention_backend
    kv_format: str = ""  # a float8 pool's dtype name: its pages hold uint8 codes (init_kv_cache)

    @nn.compact
    def __call__(self, x, meta: AttnMetadata, pages, rope, keep=None):
        cfg = self.cfg
        T = x.shape[0]
        H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if self.has_variable("params", "qkv_proj"):  # CPU packed layout: q, k, v in one matmul (packing.FUSED)
            qkv = _dense((H + 2 * K) * D, cfg.qkv_bias, self.dtype, "qkv_proj")(x, keep)  # [T, (H + 2K) * D]
            q, k, v = jnp.split(qkv, [H * D, (H + K) * D], axis=1)
        else:
            q = _dense(H * D, cfg.qkv_bias, self.dtype, "q_proj")(x, keep)  # [T, H*D]
            k = _dense(K * D, cfg.qkv_bias, self.dtype, "k_proj")(x, keep)  # [T, K*D]
            v = _dense(K * D, cfg.qkv_bias, self.dtype, "v_proj")(x, keep)  # [T, K*D]
        q, k, v = q.reshape(T, H, D), k.reshape(T, K, D), v.reshape(T, K, D)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        kw = dict(sm_scale=D ** -0.5, sliding_window=cfg.sliding_window)
        if self.kv_format:
            kw["kv_format"] = self.kv_format
        attend = functools.partial(_attend, get_attention_backend(self.attention_backend, self.attention_math).fn, kw)
        if self.layout is None:
            o, pages = attend(q, k, v, pages, meta)  # [T, H*D]
        else:  # each device its own heads (sgl_jax/parallel/tp.py)
            o, pages = self.layout.attention_map(attend)(q, k, v, pages, meta)
        return _dense(cfg.hidden_size, False, self.dtype, "o_proj")(o, keep), pages


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, keep=None):
        f = self.cfg.intermediate_size
        if self.has_variable("params", "gate_up_proj"):  # CPU packed layout: one matmul (packing.FUSED)
            g, u = jnp.split(_dense(2 * f, False, self.dtype, "gate_up_proj")(x, keep), 2, axis=1)  # [T, F] each
        else:
            g = _dense(f, False, self.dtype, "gate_proj")(x, keep)  # [T, F]
            u = _dense(f, False, self.dtype, "up_proj")(x, keep)  # [T, F]
        return _dense(self.cfg.hidden_size, False, self.dtype, "down_proj")(nn.silu(g) * u, keep)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    attention_backend: str = "jnp"
    layout: object = None
    attention_math: str = "float32"
    kv_format: str = ""

    @nn.compact
    def __call__(self, x, meta, pages, rope, keep=None):
        eps = self.cfg.rms_norm_eps
        h = RMSNorm(eps, self.dtype, name="input_layernorm")(x)
        attn = Attention(self.cfg, self.dtype, self.attention_backend, self.layout, self.attention_math,
                         self.kv_format, name="self_attn")
        a, pages = attn(h, meta, pages, rope, keep)
        x = x + a
        h = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(self.cfg, self.dtype, name="mlp")(h, keep), pages


class Embedding(nn.Module):
    """Token embedding [V, E]; `attend` is the tied LM head (float32 logits).

    int8 (only when tied, see sgl_jax.models.quant): embedding int8 [V, E] + scale f32 [V], one scale per
    row, which is a per-token scale for the lookup and the per-output-channel scale of the head.
    Packed (tied, CPU; sgl_jax.models.packing): [V / 16, E, 16] (int8 [V / 16, E / 4, 16, 4]), the head's layout
    for the native matmul."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype

    def setup(self):
        p, q = _packed(self, "embedding"), _int8(self, "embedding")
        self.packed = p is not None
        if p is not None:
            self.table, self.scale = p  # [V / 16, E, 16] float32 or int8, [V] f32 or None
        elif q is not None:
            self.table, self.scale = q  # [V, E] int8, [V] f32
        else:
            self.table = _param(self, "embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features),
                                self.dtype)
            self.scale = None

    def __call__(self, ids):
        if self.packed:
            # token t is column t % 16 of panel t // 16 (int8: [T, E / 4, 4], each 4 inputs adjacent)
            x = self.table[ids // cpu_matmul.PANEL, :, ids % cpu_matmul.PANEL].reshape(ids.shape[0], -1)  # [T, E]
        else:
            x = jnp.take(self.table, ids, axis=0)  # [T, E]
        if self.scale is None:
            return x.astype(self.dtype)
        return (x.astype(jnp.float32) * self.scale[ids][:, None]).astype(self.dtype)

    def attend(self, h, keep=None):
        if self.packed:
            return cpu_matmul.packed_matmul(h.astype(jnp.float32), self.table, self.scale, keep)  # [L, V]
        if self.scale is not None:
            return int8_matmul(h, self.table, self.scale, out_axis=0)  # [L, V]
        if cpu_matmul.f32_routes(h) and self.table.dtype == jnp.float32:  # CPU, 2-8 decode rows
            return cpu_matmul.f32_matmul(h, self.table, out_axis=0)  # [L, V]
        return jnp.einsum("LE,VE->LV", h, self.table, preferred_element_type=jnp.float32)  # [L, V]


class LMHead(nn.Module):
    """An untied output projection; float32 logits whatever the compute dtype (int8: kernel + scale [V])."""

    vocab_size: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, h, keep=None):
        p, q = _packed(self, "kernel"), _int8(self, "kernel")
        if p is not None:  # CPU: the native packed matmul
            return cpu_matmul.packed_matmul(h.astype(jnp.float32), *p, keep=keep)  # [L, V]
        if q is None:
            w = _param(self, "kernel", nn.initializers.normal(0.02), (h.shape[-1], self.vocab_size), self.dtype)
            if cpu_matmul.f32_routes(h) and w.dtype == jnp.float32:  # CPU, 2-8 decode rows
                return cpu_matmul.f32_matmul(h, w, out_axis=1)  # [L, V]
            return jnp.einsum("LE,EV->LV", h, w, preferred_element_type=jnp.float32)  # [L, V]
        return int8_matmul(h, *q, out_axis=1)  # [L, V]; kernel [E, V] int8, scale [V] f32


class CausalLM(nn.Module):
    """Token ids + batch layout + KV pool -> float32 logits at `logits_indices` + updated KV pool.

    `layout` (sgl_jax.parallel.tp.TPLayout): the model is traced for a device mesh; params and pool come sharded,
    the logits leave replicated."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "jnp"
    layout: object = None
    attention_math: str = "float32"  # float32 | bfloat16: see get_attention_backend
    kv_format: str = ""  # "" or a float8 pool's dtype name (kv_format_of): the pool holds its uint8 codes

    def __call__(self, input_ids, meta: AttnMetadata, kv: KVCache, logits_indices):
        if self.layout is None:
            return self._forward(input_ids, meta, kv, logits_indices)
        with cpu_matmul.sharded_trace():
            logits, kv = self._forward(input_ids, meta, kv, logits_indices)
        return jax.lax.with_sharding_constraint(logits, self.layout.replicated), kv

    @nn.compact
    def _forward(self, input_ids, meta: AttnMetadata, kv: KVCache, logits_indices):
        cfg = self.cfg
        embed = Embedding(cfg.vocab_size, cfg.hidden_size, self.dtype, name="embed_tokens")
        x = embed(input_ids)  # [T, E]
        inv_freq = jnp.asarray(np.array(rope_inv_freq(cfg), np.float32))
        rope = rope_tables(jnp.maximum(meta.positions, 0), inv_freq)
        keep = meta.positions >= 0  # padding tokens: the native matmuls skip their rows (bench/notes.md, session 15)
        new_kv = []
        for i in range(cfg.num_layers):
            x, pages = DecoderLayer(cfg, self.dtype, self.attention_backend, self.layout, self.attention_math,
                                    self.kv_format, name=f"layers_{i}")(
                x, meta, kv[i], rope, keep)
            new_kv.append(pages)
        # a logits row past the step's needs has index -1 (batch.pack): like a padding token's row, the native
        # LM head skips it and gives zeros (a prompt-logprob step's 128 rows held 44 a select needs, and its LM
        # head computed all 128 as copies of token 0's: 14.8 of a 73 ms step; bench/notes.md, session 29)
        idx = jnp.maximum(logits_indices, 0)
        h = x[idx]  # [L, E]
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(h)
        head_keep = (logits_indices >= 0) & (meta.positions[idx] >= 0)  # rows of padding: zeros
        if cfg.tie_word_embeddings:
            logits = embed.attend(h, head_keep)  # [L, V]
        else:
            logits = LMHead(cfg.vocab_size, self.dtype, name="lm_head")(h, head_keep)
        return logits, tuple(new_kv)


def kv_format_of(dtype) -> str:
    """A KV dtype's format name for CausalLM's `kv_format`: the float8 dtypes' names, "" for the others."""
    dt = jnp.dtype(dtype)
    return dt.name if jnp.issubdtype(dt, jnp.floating) and dt.itemsize == 1 else ""


def kv_storage_dtype(dtype):
    """The dtype a KV pool of `dtype` is stored in: a float8 pool holds its codes as uint8 -- XLA:CPU runs every op on
    a float8 array but a convert by widening the whole array (a scatter into a 1 GiB float8 pool took 42 ms a layer
    where uint8 takes 0.05; bench/notes.md, session 35) -- the others as themselves."""
    return jnp.uint8 if kv_format_of(dtype) else jnp.dtype(dtype)


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> KVCache:
    """A zeroed KV pool: per layer (k, v), each [num_pages, K, page_size, D], stored as kv_storage_dtype(dtype)."""
    shape = (num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)
    dtype = kv_storage_dtype(dtype)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


def param_shapes(cfg: ModelConfig, dtype=jnp.float32):
    """Abstract parameter pytree (ShapeDtypeStructs) via jax.eval_shape: allocates nothing.

    The init is traced for one layer and its shapes stand for every layer's: `_forward` builds each as the same
    DecoderLayer on the same config. (The loader checks every checkpoint against this tree; tracing all layers
    took 3.7 s of an 80-layer memory plan, and grows with the depth.)"""
    one = dataclasses.replace(cfg, num_layers=min(1, cfg.num_layers))
    model = CausalLM(one, dtype)
    meta = AttnMetadata(
        positions=jnp.zeros((1,), jnp.int32), slot_mapping=jnp.zeros((1,), jnp.int32),
        dec_page_table=jnp.zeros((1, 1), jnp.int32), dec_kv_lens=jnp.zeros((1,), jnp.int32),
        pre_page_table=jnp.zeros((0, 1), jnp.int32), pre_kv_lens=jnp.zeros((0,), jnp.int32), block_q=1)
    kv = jax.eval_shape(lambda: init_kv_cache(one, 2, 16, dtype))
    params = dict(jax.eval_shape(lambda kv: model.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), meta, kv,
                                                       jnp.zeros((1,), jnp.int32)), kv)["params"])
    layer = params.pop("layers_0", None)
    params.update({f"layers_{i}": layer for i in range(cfg.num_layers)})
    return params
