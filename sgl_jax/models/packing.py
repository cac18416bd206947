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
int8 kernels (sgl_jax.models.quant) go one step further, [N / 16, K / 4, 16, 4]: inside a panel, each column's 4
consecutive inputs are adjacent bytes (the operand of the kernel's 4-term integer dot products), so K must be a
multiple of 4 (else the leaf stays plain); the lookup of token t reads table[t // 16, :, t % 16, :]. Their
per-output-channel scales stay [out].

GGUF Q4_1 matrices kept in their blocks (`quantization: gguf`, leaf `q4_1`: the file's blocks [out, in / 32, 20])
are packed to [out / 16, in / 32, 320] (`pack_q4_1`): each (panel, block) the 16 columns' nibbles as the kernel
reads them, then their 16 d and 16 m in float16 -- the file's bytes rearranged, nothing requantized.

Linears sharing an input are fused (FUSED: q/k/v, gate/up), their packed kernels stacked along the panel axis.

Only for float32 compute on CPU with the native kernel built (`engine.pack_weights`, on by default); the model
(`llama.Linear`, `Embedding`, `LMHead`) sees a 3-D (int8: 4-D) kernel and calls the packed matmul for every number
of rows.
TPU and GPU never see this layout. Packing runs once at load, one leaf at a time (numpy; a leaf is copied once).
"""

from __future__ import annotations

import numpy as np

from pallas_kernels.cpu_matmul import PANEL, Q4_BYTES, QUAD  # = kPanel, kQ4Bytes, kQuad in cpu_matmul.cc
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


def to_quads(wp: np.ndarray) -> np.ndarray:
    """[N / 16, K, 16] -> the int8 layout [N / 16, K / 4, 16, 4] (each column's 4 consecutive inputs adjacent)."""
    p, k, c = wp.shape
    if k % QUAD:
        raise ValueError(f"to_quads: {k} inputs are not a multiple of {QUAD}")
    return np.ascontiguousarray(np.asarray(wp).reshape(p, k // QUAD, QUAD, c).transpose(0, 1, 3, 2))


Q4_1_RAW = 20  # bytes of a GGUF Q4_1 block: float16 d, float16 m, 16 bytes of nibbles (q[j] low, q[j + 16] high)


def pack_q4_1(blocks: np.ndarray) -> np.ndarray:
    """A GGUF Q4_1 matrix's blocks uint8 [N, K / 32, 20] (row n = output column n) -> [N / 16, K / 32, 320].

    The kernel wants byte 64 i + 4 c + j of a (panel, block) to hold column c's q[4i + j] (low nibble) and
    q[16 + 4i + j] (high): that is the file's nibble byte 4i + j of that column's block as it is."""
    n, nb, width = blocks.shape
    if width != Q4_1_RAW or n % PANEL:
        raise ValueError(f"pack_q4_1: blocks {blocks.shape} (expected [N, K / 32, {Q4_1_RAW}], N a multiple of "
                         f"{PANEL})")
    b = np.asarray(blocks, np.uint8).reshape(n // PANEL, PANEL, nb, Q4_1_RAW).transpose(0, 2, 1, 3)  # [P, B, c, 20]
    nibbles = b[..., 4:].reshape(n // PANEL, nb, PANEL, 4, 4).transpose(0, 1, 3, 2, 4)  # [P, B, i, c, j]
    out = np.concatenate([nibbles.reshape(n // PANEL, nb, 256), b[..., 0:2].reshape(n // PANEL, nb, 2 * PANEL),
                          b[..., 2:4].reshape(n // PANEL, nb, 2 * PANEL)], axis=2)
    assert out.shape[2] == Q4_BYTES
    return np.ascontiguousarray(out)


def unpack_io(wp: np.ndarray) -> np.ndarray:
    """The inverse of pack_io (and of to_quads after it): [N / 16, K, 16] or [N / 16, K / 4, 16, 4] -> [K, N]."""
    wp = np.asarray(wp)
    if wp.ndim == 4:
        wp = wp.transpose(0, 1, 3, 2).reshape(wp.shape[0], -1, wp.shape[2])
    p, k, c = wp.shape
    return np.ascontiguousarray(wp.transpose(1, 0, 2).reshape(k, p * c))


def packed_axis(key: tuple[str, ...], shape: tuple[int, ...], tied: bool, int8: bool = False) -> str | None:
    """"io" or "oi" when the leaf at pytree path `key` (int8 or not) is packed (module docstring), else None."""
    if len(shape) != 2:
        return None
    if len(key) >= 2 and key[-1] == "kernel" and key[-2] in LINEARS and shape[1] % PANEL == 0:
        how, inputs = "io", shape[0]
    elif tied and key == ("embed_tokens", "embedding") and shape[0] % PANEL == 0:
        how, inputs = "oi", shape[1]
    else:
        return None
    return None if int8 and inputs % QUAD else how


def packs_here(dtype) -> bool:
    """Whether this process can run packed weights: CPU, float32 compute, the native kernel built (else one
    warning names why). The engine packs when this holds and `engine.pack_weights` is on."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import cpu_matmul

    return jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32 and cpu_matmul.packed_available()


# Linears that read the same input, fused into one packed matrix (their outputs side by side, in this order): one
# kernel call instead of three (two) a layer. A decode step's small matmuls are dominated by the per-call cost:
# SmolLM2's k/v projections are 110 KB of int8 each (bench/notes.md, "Integer dot products for int8 weights").
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _fuse(node: dict) -> dict:
    """`node` (a module's params, leaves packed numpy) with each complete FUSED group replaced by its fused Linear:
    kernels stacked along the panel axis (outputs), scales and biases concatenated. A group whose members differ
    in layout or leaves (one int8 and one not, a bias on one only) stays apart."""
    for fused, parts in FUSED.items():
        subs = [node.get(p) for p in parts]
        weight = "q4_1" if all(isinstance(x, dict) and "q4_1" in x for x in subs) else "kernel"
        if any(not isinstance(x, dict) or not isinstance(x.get(weight), np.ndarray) for x in subs):
            continue
        kernels = [x[weight] for x in subs]
        if (len({(k.ndim, k.dtype, k.shape[1:]) for k in kernels}) != 1 or kernels[0].ndim not in (3, 4)
                or (weight == "q4_1" and kernels[0].shape[-1] != Q4_BYTES)
                or len({frozenset(x) for x in subs}) != 1 or not set(subs[0]) <= {weight, "scale", "bias"}):
            continue
        group = {name: np.concatenate([np.asarray(x[name]) for x in subs], axis=0) for name in subs[0]}
        node = {**{k: v for k, v in node.items() if k not in parts}, fused: group}
    return node


def pack_params(params: dict, tied: bool) -> dict:
    """A copy of the params pytree (a nested dict) with the packable leaves packed and the FUSED groups fused;
    other leaves are shared."""
    import jax.numpy as jnp

    def walk(node, path):
        out = {}
        for name, leaf in node.items():
            key = path + (name,)
            if isinstance(leaf, dict):
                out[name] = walk(leaf, key)
                continue
            if name == "q4_1":  # the file's Q4_1 blocks: packed when the columns fill panels, else kept as read
                out[name] = pack_q4_1(leaf) if leaf.shape[0] % PANEL == 0 else leaf
                continue
            int8 = leaf.dtype == np.int8
            how = packed_axis(key, tuple(leaf.shape), tied, int8)
            if how is None:
                out[name] = leaf
            else:
                a = np.asarray(leaf)
                a = pack_io(a) if how == "io" else pack_oi(a)
                out[name] = to_quads(a) if int8 else a  # numpy until fused
        out = _fuse(out)  # (a module's Linears, still numpy)
        return to_device(out) if len(path) <= 1 else out  # one layer's packed copies on the host at a time

    def to_device(node):
        return {k: to_device(v) if isinstance(v, dict) else (jnp.asarray(v) if isinstance(v, np.ndarray) else v)
                for k, v in node.items()}

    return walk(params, ())


def is_packed(params: dict) -> bool:
    """Whether any leaf of the pytree is a packed matrix (3-D float32, 4-D int8, or packed Q4_1 blocks)."""
    import jax

    return any(getattr(x, "ndim", 0) in (3, 4) and x.shape[-1] != Q4_1_RAW for x in jax.tree_util.tree_leaves(params))
