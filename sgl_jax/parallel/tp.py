"""Tensor parallelism on a JAX device mesh: which parameter is split how, and the attention under `shard_map`.

One mesh axis, "tp", over `parallel.tp` devices. The step stays one jitted function: parameters and the KV
pool carry `NamedSharding`s, the jit gets them as explicit in/out shardings, and XLA's SPMD partitioner
inserts the collectives the matmuls need. The standard (Megatron) split:

    q/k/v_proj  [E, heads*D]   columns over tp (heads)       o_proj    [H*D, E]  rows over tp -> all-reduce
    gate/up     [E, F]         columns over tp               down_proj [F, E]    rows over tp -> all-reduce
    embed_tokens [V, E]        rows over tp (vocabulary)     lm_head   [E, V]    columns over tp (vocabulary)
    KV pool     [N, K, S, D]   KV heads over tp              norms, biases of row-split matrices: replicated
int8 scales follow their matrix's output channels. The attention (KV write + paged attention, any backend:
the Pallas kernels, the CPU kernel, jnp) runs under `jax.shard_map` on each device's own heads: the kernels
see an ordinary single-device problem with H/tp query heads and their KV heads, and no collective.

When the KV heads are fewer than tp (K < tp, tp a multiple of K, H a multiple of tp), each KV head is stored
tp/K times (its k/v projection columns repeated at load time; `kv_copies`), so that every device holds the
one KV head its query heads read: the model then has tp KV heads, the pool per device is one head wide, and
the global pool is tp/K times the single-device one. When H is not a multiple of tp, or K and tp divide
neither way, the attention is replicated (every device computes every head; the MLP and the vocabulary
still split), and `describe()` says so. The MLP is replicated when F is not a multiple of tp, the
vocabulary when V is not.

Float32 results equal the single-device run's up to the order of the all-reduce's sums (tests/test_tp.py:
logits within 1e-5, greedy tokens identical). On CPU the plain-layout native matmuls are off under a mesh
(pallas_kernels/cpu_matmul.py `sharded_trace`), and weights are not panel-packed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "tp"


def _put(arr: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array onto `sharding`, each device given its slice; works when the mesh spans processes (every
    process holds the same host array and fills its own devices)."""
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def make_mesh(tp: int, devices=None) -> Mesh:
    """A 1-D mesh over the first `tp` devices (all processes' devices in a multi-host run), axis "tp"."""
    devices = jax.devices() if devices is None else devices
    if len(devices) < tp:
        hint = (" (CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices)"
                if jax.default_backend() == "cpu" else "")
        raise ValueError(f"parallel.tp={tp} needs {tp} devices; this process sees {len(devices)} "
                         f"({jax.default_backend()}){hint}")
    return Mesh(np.asarray(devices[:tp]), (AXIS,))


@dataclasses.dataclass(frozen=True)
class TPLayout:
    """How one model is split over a mesh (see the module docstring). Hashable: a static attribute of the model."""

    mesh: object  # jax.sharding.Mesh, or AbstractMesh for shape-only planning
    tp: int
    shard_attention: bool  # heads over tp (else the attention is replicated)
    kv_copies: int  # each KV head stored this many times (K < tp); 1 otherwise
    shard_mlp: bool
    shard_vocab: bool
    head_dim: int

    @classmethod
    def plan(cls, cfg, mesh) -> "TPLayout":
        tp = int(mesh.shape[AXIS])
        H, K = cfg.num_heads, cfg.num_kv_heads
        copies = 1
        attn = H % tp == 0 and (K % tp == 0 or tp % K == 0)
        if attn and K < tp:
            copies = tp // K
        return cls(mesh, tp, attn, copies, cfg.intermediate_size % tp == 0, cfg.vocab_size % tp == 0, cfg.head_dim)

    def model_config(self, cfg):
        """The config the sharded model runs: num_kv_heads counts the stored copies."""
        if self.kv_copies == 1:
            return cfg
        return dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * self.kv_copies)

    def describe(self) -> str:
        if self.tp == 1:
            return "tp=1 (one device, nothing split)"
        parts = [f"tp={self.tp}"]
        if not self.shard_attention:
            parts.append("attention replicated (heads not divisible)")
        elif self.kv_copies > 1:
            parts.append(f"attention heads split, each KV head stored {self.kv_copies}x (fewer KV heads than tp)")
        else:
            parts.append("attention heads split")
        parts.append("MLP split" if self.shard_mlp else "MLP replicated (intermediate size not divisible)")
        parts.append("vocabulary split" if self.shard_vocab else "vocabulary replicated (not divisible)")
        return ", ".join(parts)

    # ---------------------------------------------------------------------------- parameters
    def spec(self, path: tuple[str, ...]) -> P:
        """The PartitionSpec of the parameter at `path` (our pytree names, e.g. ("layers_0", "mlp", "down_proj",
        "kernel")); replicated for anything the rules do not name."""
        module, leaf = (path[-2], path[-1]) if len(path) >= 2 else ("", path[-1])
        col, row = P(None, AXIS), P(AXIS, None)
        if module in ("q_proj", "k_proj", "v_proj") and self.shard_attention:
            return col if leaf == "kernel" else P(AXIS)  # bias, scale: per output column
        if module == "o_proj" and self.shard_attention:
            return row if leaf == "kernel" else P()
        if module in ("gate_proj", "up_proj") and self.shard_mlp:
            return col if leaf == "kernel" else P(AXIS)
        if module == "down_proj" and self.shard_mlp:
            return row if leaf == "kernel" else P()
        if module == "embed_tokens" and self.shard_vocab:
            return row if leaf == "embedding" else P(AXIS)  # scale [V]
        if module == "lm_head" and self.shard_vocab:
            return col if leaf == "kernel" else P(AXIS)
        return P()

    def sharding(self, path: tuple[str, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(path))

    def expand(self, path: tuple[str, ...], arr: np.ndarray) -> np.ndarray:
        """A host array in our layout ([in, out] kernels) with its KV heads repeated `kv_copies` times (k/v
        projections' kernel, bias and scale); anything else unchanged. Head j of the result is head j // copies."""
        if self.kv_copies == 1 or len(path) < 2 or path[-2] not in ("k_proj", "v_proj"):
            return arr
        lead, out = arr.shape[:-1], arr.shape[-1]
        per = arr.reshape(lead + (out // self.head_dim, self.head_dim))
        return np.repeat(per, self.kv_copies, axis=len(lead)).reshape(lead + (out * self.kv_copies,))

    def place(self, path: tuple[str, ...], arr: np.ndarray, dtype=None) -> jax.Array:
        """One loaded tensor (host, our layout) onto the mesh with its sharding, KV heads expanded; only each
        device's shard is copied to it."""
        arr = self.expand(path, np.asarray(arr))
        if dtype is not None:
            arr = arr.astype(jnp.dtype(dtype))
        return _put(arr, self.sharding(path))

    def shard_params(self, params):
        """An already-loaded params pytree (host or one device) placed on the mesh, KV heads expanded."""
        def put(kp, x):
            return self.place(tuple(k.key for k in kp), np.asarray(x))
        return jax.tree_util.tree_map_with_path(put, params)

    def param_shardings(self, params):
        return jax.tree_util.tree_map_with_path(lambda kp, _: self.sharding(tuple(k.key for k in kp)), params)

    # ------------------------------------------------------------------------------ KV pool
    @property
    def kv_spec(self) -> P:
        return P(None, AXIS, None, None) if self.shard_attention else P()

    def kv_shardings(self, num_layers: int):
        s = NamedSharding(self.mesh, self.kv_spec)
        return tuple((s, s) for _ in range(num_layers))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def put_replicated(self, tree):
        """Every leaf copied whole to every device of the mesh (any process's devices)."""
        return jax.tree_util.tree_map(lambda x: _put(np.asarray(x), self.replicated), tree)

    def kv_fraction(self) -> float:
        """Bytes of the pool one device holds, as a fraction of the (expanded) model's whole pool."""
        return 1.0 / self.tp if self.shard_attention else 1.0

    # ----------------------------------------------------------------------------- attention
    def attention_map(self, fn):
        """`fn(q [T, H, D], k, v [T, K, D], pages, meta) -> (o [T, H*D], pages)` run on each device's own heads
        (or, attention replicated, on all of them on every device)."""
        heads = P(None, AXIS, None) if self.shard_attention else P()
        out = P(None, AXIS) if self.shard_attention else P()
        kv = self.kv_spec
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(heads, heads, heads, (kv, kv), P()),
                             out_specs=(out, (kv, kv)), check_vma=False)

