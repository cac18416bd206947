"""int8 weight-only quantization: one int8 matrix and one float32 scale per output channel.

With `EngineConfig.quantization: int8` the loader stores each weight matrix of the transformer as
    kernel  int8 [in, out]    q = round(w / scale), in [-127, 127] (symmetric, no zero point)
    scale   f32  [out]        scale = max |w| over the input dimension / 127
and the forward (`llama.Linear`) computes `(x @ kernel.astype(x.dtype)) * scale`: the scale is applied
after the matmul, once per output channel, so the matmul reads int8 weights and on TPU/GPU XLA can fuse the
int8 -> compute-dtype convert into the dot (1 byte a weight read from HBM instead of 2 or 4). Activations,
the KV pool, norms and biases stay in the compute dtype -- except inside the CPU's packed kernel (the engine's
default layout on CPU, sgl_jax.models.packing): it quantizes each matmul's input rows to int8 per block of 32
inputs (llama.cpp's Q8_0 activations) to sum in integer arithmetic, 1.1-1.75x faster decode steps for logit
errors against fp32 up to ~1.5x the weight-only ones (pallas_kernels/cpu_matmul.cc; tests/test_quant.py
states both). `pack_weights: false` keeps weight-only int8 on CPU.
The params pytree is the only thing that changes: a linear whose params hold a `scale` is an int8 one (see
`llama.Linear`), so the runner, the paged attention and the sampling are the same code for both.

Round-trip error: every weight comes back within scale / 2 of its value (`dequantize_int8`), i.e. within
max|w| / 254 of its channel's largest weight; an all-zero channel gets scale 0 and comes back as exact zeros
(no division by zero, no NaN).

Which matrices (`int8_axis`):
  * q/k/v/o projections and gate/up/down MLP: per output channel, as above.
  * the LM head, tied or not. It is the largest single matrix a decode step reads (SmolLM2: 49,152 x 576 =
    21 % of the parameters; Llama-3-8B: 525 M of 8 B), so leaving it in float would keep a fifth of
    SmolLM2's weight bytes per step. Its output channels are vocabulary entries, so per-channel scales are
    one per token.
  * the embedding only when it is tied to the LM head (SmolLM2, small Qwens): the [V, E] matrix then *is*
    the head, and its per-row scales serve both uses, as the head's per-output-channel scale and, in the
    lookup, as a per-token scale (`table[ids] * scale[ids]`). An untied embedding stays in the compute
    dtype: a step gathers only its tokens' rows, so int8 would save memory but no time, for a per-token
    error on every input.

GGUF quantized formats are dequantized at load (`gguf_quants`) and, in int8 mode, requantized per channel
here -- except with `quantization: gguf`: a GGUF's Q4_1 linears (q/k/v/o, gate/up/down) keep the file's blocks
(32 inputs each, w = d * q + m, q a nibble, float16 d and m: 0.625 bytes a weight), and everything else is as in
int8 mode (SmolLM2's Q8_0 tied embedding / LM head: int8 per channel). On CPU the blocks are packed for the native
kernel (sgl_jax.models.packing.pack_q4_1; pallas_kernels/cpu_matmul.cc), which sums nibble x int8-activation
products in integer arithmetic with the file's d and m per block -- the weights are exactly the file's, as
llama.cpp runs them, and a decode step reads fewer weight bytes than int8's. Elsewhere (`pack_weights: false`,
TPU/GPU) `llama.q4_1_matmul` dequantizes the blocks in the graph before XLA's dot (correct, not fast). Only on
one device: tensor parallelism needs int8 (the config refuses gguf with parallel.tp > 1). Other GGUF types
(Q4_0, Q8_0, K-quants) have no kernel and are requantized to int8 in gguf mode too. Before this kernel, int8
matrices converted in XLA's graph measured: on XLA:CPU even an int8 matrix converted in the graph is a separate
convert that writes the whole float matrix before a float dot (one [1,576] x [576,1536] matmul: float32
67-101 us, int8 converted in the graph 113-202 us on a 2-core AMD EPYC), which is why the CPU paths are kernels.

numpy only (no jax): the loader quantizes one tensor at a time on the host before handing it to jax.
"""

from __future__ import annotations

import numpy as np

QUANTIZATIONS = ("none", "int8", "gguf")
INT8_MAX = 127
_CHUNK_ELEMENTS = 1 << 22  # weights quantized at once: bounds the float64 temporaries (32 MiB) of a large matrix

# Leaves (last two pytree keys) quantized per output channel, stored [in, out] -> reduce over axis 0.
LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"})


def check_quantization(quantization: str) -> str:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is unknown; expected one of {', '.join(QUANTIZATIONS)}")
    return quantization


def int8_axis(key: tuple[str, ...], tied: bool) -> int | None:
    """The reduction (input) axis of the leaf at pytree path `key` in our layout, or None to keep it float.

    Linear kernels are [in, out] (axis 0); the tied embedding is [V, E] with V the head's output channels
    (axis 1). See the module docstring for why these and not the others."""
    if len(key) >= 2 and key[-1] == "kernel" and key[-2] in LINEARS:
        return 0
    if tied and key == ("embed_tokens", "embedding"):
        return 1
    return None


def quantize_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 of a 2-D float matrix, reducing over `axis` (the input dimension).

    Returns (q int8 of w's shape, scale float32 of the other dimension): scale = max|w| / 127 per channel,
    q = round(w / scale) (division in float64, so the nearest integer is exact and |w - q * scale| <=
    scale / 2 holds without slack), 0 where scale is 0 (an all-zero channel, or one whose largest |w| is
    below 127 x float32's smallest subnormal, which then comes back as zeros)."""
    w = np.asarray(w)
    if w.ndim != 2 or axis not in (0, 1):
        raise ValueError(f"quantize_int8 takes a 2-D matrix and axis 0 or 1; got shape {w.shape}, axis {axis}")
    if not (np.issubdtype(w.dtype, np.floating) or w.dtype.name == "bfloat16"):
        raise ValueError(f"quantize_int8 takes a float matrix; got dtype {w.dtype}")
    wt = w if axis == 1 else w.T  # [channels, reduced]
    amax = np.maximum(wt.max(axis=1), -wt.min(axis=1)).astype(np.float64)  # [C]
    if not np.all(np.isfinite(amax)):
        bad = int(np.flatnonzero(~np.isfinite(amax))[0])
        raise ValueError(f"quantize_int8: channel {bad} holds a non-finite weight (inf or NaN)")
    scale = (amax / INT8_MAX).astype(np.float32)  # [C]
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)  # an all-zero channel: 0 / 1 = 0, not 0 / 0
    q = np.empty(wt.shape, np.int8)
    rows = max(1, _CHUNK_ELEMENTS // max(1, wt.shape[1]))
    for a in range(0, wt.shape[0], rows):
        # dividing by the float32 scale in float64 leaves round() the exact nearest integer
        block = wt[a:a + rows].astype(np.float64) / safe[a:a + rows, None]
        q[a:a + rows] = np.clip(np.rint(block), -INT8_MAX, INT8_MAX)
    return (q if axis == 1 else q.T), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """float32 of `quantize_int8`'s output (q * scale per channel; `axis` as given to quantize_int8)."""
    s = np.asarray(scale, np.float32)
    return q.astype(np.float32) * (s[:, None] if axis == 1 else s[None, :])
