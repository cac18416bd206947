"""What one device needs for a preset, from shapes alone: nothing is allocated and no device is needed.

    python -m sgl_jax.parallel.memory --config configs/llama3-70b-tpu-v6e-8.yaml --device-gb 32
    python -m sgl_jax.parallel.memory --config configs/llama3-8b-gpu-8.yaml --arch llama-3-8b --device-gb 80

The model's config comes from the preset's model directory (config.json), or `--arch` names one of
`KNOWN_ARCHS` (public architecture numbers, so a user can check a preset before downloading the weights).
The check builds the tensor-parallel layout on an *abstract* mesh of `parallel.tp` devices, takes the
parameter shapes from `jax.eval_shape` of the model's init, and traces the sharded forward with
`jax.eval_shape` (decode at the widest page table, and a full prefill chunk; its first two layers, as every
layer is the same module on the same shapes): a split that does not divide, or a forward that does not trace
on the mesh, fails here. Per device it prints the weights' shard, the KV pool's shard (the pool is sized per
device by `kv_memory_gb`, as the engine sizes it) and the tokens the pool holds. Activations and XLA's scratch
are not counted: `fits` asks the two to stay within `--usable` (default 0.9) of the device's memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

KNOWN_ARCHS = {  # Hugging Face config.json fields of public checkpoints (architecture numbers only)
    "llama-3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009),
    "llama-3-70b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=8192,
                        intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009),
}
GIB = 1 << 30


@dataclasses.dataclass
class MemoryPlan:
    tp: int
    layout: str  # TPLayout.describe()
    weights_gib: float  # per device
    kv_gib: float  # per device
    kv_tokens: int  # tokens the (global) pool holds
    num_pages: int
    device_gib: float | None
    usable: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_gib

    @property
    def fits(self) -> bool | None:
        return None if self.device_gib is None else self.total_gib <= self.usable * self.device_gib

    def report(self) -> str:
        lines = [self.layout,
                 f"  weights per device  {self.weights_gib:8.2f} GiB",
                 f"  KV pool per device  {self.kv_gib:8.2f} GiB  ({self.num_pages - 1} pages, {self.kv_tokens} tokens)",
                 f"  total per device    {self.total_gib:8.2f} GiB (activations and XLA scratch not counted)"]
        if self.device_gib is not None:
            lines.append(f"  device              {self.device_gib:8.2f} GiB -> "
                         f"{'fits' if self.fits else 'DOES NOT FIT'} within {self.usable:.0%} "
                         f"({self.usable * self.device_gib - self.total_gib:+.2f} GiB left)")
        return "\n".join(lines)


def _shard_bytes(shape, dtype, spec, tp: int) -> int:
    import numpy as np

    dims = list(shape)
    for i, ax in enumerate(tuple(spec) + (None,) * (len(dims) - len(tuple(spec)))):
        if ax is not None:
            if dims[i] % tp:
                raise ValueError(f"dimension {i} of a {tuple(shape)} array does not divide over tp={tp}")
            dims[i] //= tp
    return int(np.prod(dims)) * np.dtype(dtype).itemsize


def model_config_for(c, arch: str = ""):
    from sgl_jax.models.config import ModelConfig

    if arch:
        if arch not in KNOWN_ARCHS:
            raise ValueError(f"--arch {arch!r} is unknown; known: {', '.join(KNOWN_ARCHS)}")
        return ModelConfig.from_hf(KNOWN_ARCHS[arch], arch)
    path = os.path.join(os.path.expanduser(c.model), "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: give the model directory, or --arch ({', '.join(KNOWN_ARCHS)})")
    with open(path) as f:
        return ModelConfig.from_hf(json.load(f), c.model)


def plan_memory(c, mc, device_gib: float | None = None, usable: float = 0.9, trace: bool = True) -> MemoryPlan:
    """The per-device memory of engine config `c` serving model config `mc` (see the module docstring);
    `trace=False` skips the forward's shape check (its first two layers)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh, NamedSharding

    from sgl_jax.models import quant
    from sgl_jax.models.attention import AttnMetadata
    from sgl_jax.models.llama import CausalLM, kv_format_of, kv_storage_dtype, param_shapes
    from sgl_jax.models.loader import canonical_dtype
    from sgl_jax.parallel.tp import AXIS, TPLayout

    tp = c.parallel.tp
    mesh = AbstractMesh((tp,), (AXIS,))
    layout = TPLayout.plan(mc, mesh)
    run_cfg = layout.model_config(mc)
    dtype, kv_dtype = canonical_dtype(c.dtype), canonical_dtype(c.effective_kv_dtype, kv=True)
    avals = param_shapes(run_cfg, dtype)  # jax.eval_shape of the init: nothing allocated
    flat, treedef = jax.tree_util.tree_flatten_with_path(avals)
    leaves, weights = {}, 0
    for kp, leaf in flat:
        path = tuple(k.key for k in kp)
        axis = quant.int8_axis(path, mc.tie_word_embeddings) if c.quantization == "int8" else None
        shapes = [(path, leaf.shape, leaf.dtype)]
        if axis is not None:
            out = leaf.shape[1 - axis]
            shapes = [(path, leaf.shape, jnp.int8), (path[:-1] + ("scale",), (out,), jnp.float32)]
        for p, shape, dt in shapes:
            weights += _shard_bytes(shape, dt, layout.spec(p), tp)
            leaves[p] = jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, layout.spec(p)))
    params: dict = {}
    for p, sds in leaves.items():
        node = params
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = sds
    kv = c.cache
    page_bytes = max(1, int(run_cfg.kv_bytes_per_token(jnp.dtype(kv_dtype).itemsize) * kv.page_size
                            * layout.kv_fraction()))
    num_pages = int(kv.kv_memory_gb * GIB) // page_bytes + 1
    if kv.max_num_pages > 0:
        num_pages = min(num_pages, kv.max_num_pages)
    page_shape = (num_pages, run_cfg.num_kv_heads, kv.page_size, run_cfg.head_dim)
    kv_bytes = 2 * run_cfg.num_layers * _shard_bytes(page_shape, kv_dtype, layout.kv_spec, tp)
    store = kv_storage_dtype(kv_dtype)  # a float8 pool's uint8 codes
    pool = tuple((jax.ShapeDtypeStruct(page_shape, store, sharding=NamedSharding(mesh, layout.kv_spec)),) * 2
                 for _ in range(run_cfg.num_layers))
    if trace:  # two layers stand for all (each is DecoderLayer on the same config). A 70B plan in a fresh process:
        # 10.2 s tracing every layer, 4.1 s with two, 2.5 s since param_shapes traces one (bench/notes.md)
        n = min(2, run_cfg.num_layers)
        head = {k: v for k, v in params.items() if not k.startswith("layers_") or int(k[7:]) < n}
        _trace(CausalLM(dataclasses.replace(run_cfg, num_layers=n), dtype, "jnp", layout,
                        kv_format=kv_format_of(kv_dtype)), head, pool[:n], c, AttnMetadata)
    return MemoryPlan(tp, layout.describe(), weights / GIB, kv_bytes / GIB, (num_pages - 1) * kv.page_size,
                      num_pages, device_gib, usable)


def _trace(model, params, pool, c, AttnMetadata) -> None:
    """jax.eval_shape of the sharded forward: a full decode batch at the widest page table, and a full prefill."""
    import jax
    import jax.numpy as jnp

    sh = c.shapes
    width = (max(sh.page_width_buckets) if sh.page_width_buckets
             else math.ceil(c.cache.max_context_len / c.cache.page_size))
    i32 = jnp.int32

    def sds(*shape):
        return jax.ShapeDtypeStruct(shape, i32)

    for rows, blocks in ((max(sh.decode_buckets), 0), (0, max(sh.prefill_block_buckets))):
        T = rows + blocks * sh.prefill_block
        L = rows + blocks
        meta = AttnMetadata(sds(T), sds(T), sds(rows, width), sds(rows), sds(blocks, width), sds(blocks),
                            block_q=sh.prefill_block)
        out = jax.eval_shape(lambda p, kv, ids, m, li: model.apply({"params": p}, ids, m, kv, li),
                             params, pool, sds(T), meta, sds(L))
        assert out[0].shape == (L, model.cfg.vocab_size), out[0].shape


def main(argv=None) -> int:
    from sgl_jax.config import load_config
    from sgl_jax.serve.__main__ import _parse_set

    ap = argparse.ArgumentParser(prog="python -m sgl_jax.parallel.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a preset (configs/*.yaml)")
    ap.add_argument("--arch", default="", help=f"model shapes by name instead of the preset's model directory: "
                                               f"{', '.join(KNOWN_ARCHS)}")
    ap.add_argument("--device-gb", type=float, default=None, help="memory of one device in GiB (e.g. 16 for TPU v5e)")
    ap.add_argument("--usable", type=float, default=0.9, help="fraction of the device weights + KV may take")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    a = ap.parse_args(argv)
    c = load_config(a.config, dict(_parse_set(item) for item in a.set)).engine
    plan = plan_memory(c, model_config_for(c, a.arch), a.device_gb, a.usable)
    print(plan.report())
    return 0 if plan.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
