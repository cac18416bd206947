"""Panel-packed weight matrices: the CPU layout of the native matmul (pallas_kernels/cpu_matmul.cc).

A matrix with K inputs and N outputs is stored as [N / 16, K, 16]: panel p holds output columns 16p .. 16p+15,
one row of 16 per input k. The kernel computes a tile of 16 output columns from one contiguous stream of weights;
in the [K, N] layout the same tile reads 16 of every N values (SmolLM2's [576, 1536]: 64 bytes of every 6 KB for
float32), which is what held XLA's dots and the earlier few-row kernel at 7-16 GB/s in a decode step
(bench/notes.md, "Panel-packed weights").

Which leaves (the rest keep their layout):
  * every Linear kernel [in, out] (q/k/v/o, gate/up/down, an untied lm_head) whose `out` is a multiple of 16;
  * a tied embedding [V, E] (the head's [out, in]) when V is a multiple of 16: the lookup of token t reads
    table[t // 16, :, t % 16].
int8 kernels (sgl_jax.models.quant) are packed the same way; their per-output-channel scales stay [out].

Only for float32 compute on CPU with the native kernel built (`engine.pack_weights`, on by default); the model
(`llama.Linear`, `Embedding`, `LMHead`) sees a 3-D kernel and calls the packed matmul for every number of rows.
TPU and GPU never see this layout. Packing runs once at load, one leaf at a time (numpy; a leaf is copied once).
"""

from __future__ import annotations

import numpy as np

from pallas_kernels.cpu_matmul import PANEL  # = kPanel in cpu_matmul.cc
from sgl_jax.models.quant import LINEARS


def pack_io(w: np.ndarray) -> np.ndarray:
    """[K, N] (a Linear kernel) -> [N / 16, K, 16]."""
    k, n = w.shape
    if n % PANEL:
        raise ValueError(f"pack_io: {n} output columns are not a multiple of {PANEL}")
    return np.ascontiguousarray(w.reshape(k, n // PANEL, PANEL).transpose(1, 0, 2))


def pack_oi(w: np.ndarray) -> np.ndarray:
    """[N, K] (a tied embedding used as the head) -> [N / 16, K, 16]."""
    n, k = w.shape
    if n % PANEL:
        raise ValueError(f"pack_oi: {n} output rows are not a multiple of {PANEL}")
    return np.ascontiguousarray(w.reshape(n // PANEL, PANEL, k).transpose(0, 2, 1))


def unpack_io(wp: np.ndarray) -> np.ndarray:
    """The inverse of pack_io: [N / 16, K, 16] -> [K, N]."""
    p, k, c = wp.shape
    return np.ascontiguousarray(np.asarray(wp).transpose(1, 0, 2).reshape(k, p * c))


def packed_axis(key: tuple[str, ...], shape: tuple[int, ...], tied: bool) -> str | None:
    """"io" or "oi" when the leaf at pytree path `key` is packed (module docstring), else None."""
    if len(shape) != 2:
        return None
    if len(key) >= 2 and key[-1] == "kernel" and key[-2] in LINEARS and shape[1] % PANEL == 0:
        return "io"
    if tied and key == ("embed_tokens", "embedding") and shape[0] % PANEL == 0:
        return "oi"
    return None


def packs_here(dtype) -> bool:
    """Whether this process can run packed weights: CPU, float32 compute, the native kernel built (else one
    warning names why). The engine packs when this holds and `engine.pack_weights` is on."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import cpu_matmul

    return jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32 and cpu_matmul.packed_available()


def pack_params(params: dict, tied: bool) -> dict:
    """A copy of the params pytree (a nested dict) with the packable leaves packed; other leaves are shared."""
    import jax.numpy as jnp

    def walk(node, path):
        out = {}
        for name, leaf in node.items():
            key = path + (name,)
            if isinstance(leaf, dict):
                out[name] = walk(leaf, key)
                continue
            how = packed_axis(key, tuple(leaf.shape), tied)
            if how is None:
                out[name] = leaf
            else:
                a = np.asarray(leaf)
                out[name] = jnp.asarray(pack_io(a) if how == "io" else pack_oi(a))
        return out

    return walk(params, ())


def is_packed(params: dict) -> bool:
    """Whether any leaf of the pytree is a packed (3-D) matrix."""
    import jax

    return any(getattr(x, "ndim", 0) == 3 for x in jax.tree_util.tree_leaves(params))
