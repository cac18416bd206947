"""Vectorized numpy dequantization of GGML tensor payloads (as stored in GGUF).

This module turns the raw bytes of a GGUF tensor into a dense float array.  It
is pure numpy (no jax) so the loader can run it on the host before handing
weights to devices.

Block formats
-------------
GGML stores each tensor row (``ne0`` values, the innermost / last numpy axis)
as a sequence of fixed-size *blocks*.  A block covers ``block_size`` values
and occupies ``type_size`` bytes.  All multi-byte fields are little-endian;
``f16`` means an IEEE half float scale.  Rows always hold a whole number of
blocks, so a tensor is simply ``prod(shape) / block_size`` blocks back to back.

Plain floats (block of 1 value)
    F32 (4 bytes), F16 (2 bytes), BF16 (2 bytes: the top half of an f32).

Legacy 32-value blocks, ``x = d * q`` or ``x = d * q + m``
    Q8_0 (34 B): f16 d, then 32 signed bytes q.
    Q4_0 (18 B): f16 d, then 16 bytes of nibbles.  Byte j holds value j in
        its low nibble and value j + 16 in its high nibble; q = nibble - 8.
    Q4_1 (20 B): f16 d, f16 m, 16 nibble bytes as Q4_0; q = nibble (unsigned).
    Q5_0 (22 B): f16 d, a 32-bit word of high bits (bit j is the 5th bit of
        value j), 16 nibble bytes as Q4_0; q = (nibble | high << 4) - 16.
    Q5_1 (24 B): f16 d, f16 m, high-bit word, nibbles; q unsigned 5-bit.

K-quants: 256-value super-blocks split into sub-blocks with their own scales
    Q4_K (144 B): f16 d, f16 dmin, 12 bytes of packed 6-bit (scale, min)
        pairs for eight 32-value sub-blocks, 128 nibble bytes.  The nibble
        bytes come in four 32-byte groups; group g gives sub-block 2g (low
        nibbles) and sub-block 2g + 1 (high nibbles).
        x = d * scale[s] * q - dmin * min[s].
        Packing of the 12 scale bytes ``b``: for s < 4, scale = b[s] & 63 and
        min = b[s + 4] & 63; for s >= 4 the low four bits come from b[s + 4]
        (scale: low nibble, min: high nibble) and the top two bits from the
        top two bits of b[s - 4] (scale) and b[s] (min).
    Q5_K (176 B): as Q4_K, plus 32 bytes ``qh`` inserted before the nibbles:
        bit s of qh[l] is the 5th bit of value l of sub-block s.
    Q6_K (210 B): 128 bytes ``ql`` of low nibbles, 64 bytes ``qh`` of 2-bit
        high parts, 16 signed 8-bit scales (one per 16 values), f16 d last.
        Each 128-value half h uses ql[64h:64h+64] and qh[32h:32h+32]; for
        l < 32 its values l, l+32, l+64, l+96 take the low nibble of ql[l],
        low nibble of ql[l+32], high nibble of ql[l], high nibble of
        ql[l+32], with the 2-bit high part from qh[l] bits 0-1, 2-3, 4-5, 6-7
        respectively.  x = d * scale[i // 16] * (q - 32).

Dequantization runs block-chunk by block-chunk into a preallocated output, so
temporary memory stays bounded (a small multiple of ``CHUNK_ELEMENTS`` * 4
bytes) no matter how large the tensor is.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT

__all__ = [
    "SUPPORTED_TYPES",
    "UnsupportedQuantizationError",
    "dequantize",
    "raw_blocks",
    "block_layout",
]

# Values produced per chunk: a 4 MiB float32 compute buffer, plus a few MiB of
# uint8 / float32 temporaries in the kernels.  Read at call time, so tests can
# shrink it to exercise chunk boundaries.
CHUNK_ELEMENTS = 1 << 20

QK = 32  # values per legacy block
QK_K = 256  # values per K-quant super-block
K_SCALE_BYTES = 12  # packed 6-bit scales/mins of Q4_K / Q5_K

# type -> (values per block, bytes per block)
BLOCK_LAYOUT: dict[QT, tuple[int, int]] = {
    QT.F32: (1, 4),
    QT.F16: (1, 2),
    QT.BF16: (1, 2),
    QT.Q8_0: (QK, 2 + QK),
    QT.Q4_0: (QK, 2 + QK // 2),
    QT.Q4_1: (QK, 2 + 2 + QK // 2),
    QT.Q5_0: (QK, 2 + 4 + QK // 2),
    QT.Q5_1: (QK, 2 + 2 + 4 + QK // 2),
    QT.Q4_K: (QK_K, 2 + 2 + K_SCALE_BYTES + QK_K // 2),
    QT.Q5_K: (QK_K, 2 + 2 + K_SCALE_BYTES + QK_K // 8 + QK_K // 2),
    QT.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}

SUPPORTED_TYPES: frozenset[QT] = frozenset(BLOCK_LAYOUT)

# Plain float types: typed input dtypes accepted besides raw uint8 bytes.
_TYPED_INPUTS: dict[QT, frozenset[str]] = {
    QT.F32: frozenset({"float32"}),
    QT.F16: frozenset({"float16"}),
    QT.BF16: frozenset({"bfloat16", "uint16", "int16"}),
}

_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")
_U16 = np.dtype("<u2")
_Q6K_HIGH_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


class UnsupportedQuantizationError(ValueError):
    """Raised for a GGML tensor type this module cannot dequantize."""


def _type_name(qtype) -> str:
    try:
        return QT(qtype).name
    except ValueError:
        return f"<unknown GGML type id {qtype!r}>"


def _supported_names() -> str:
    return ", ".join(t.name for t in sorted(SUPPORTED_TYPES, key=int))


def _prefix(what: str) -> str:
    return f"{what}: " if what else ""


def _resolve_type(qtype, what: str) -> QT:
    try:
        t = QT(qtype)
    except ValueError:
        t = None
    if t is None or t not in SUPPORTED_TYPES:
        raise UnsupportedQuantizationError(
            f"{_prefix(what)}unsupported GGML quantization type {_type_name(qtype)}; "
            f"supported types: {_supported_names()}"
        )
    return t


def block_layout(qtype) -> tuple[int, int]:
    """Return ``(values_per_block, bytes_per_block)`` for a supported type."""
    return BLOCK_LAYOUT[_resolve_type(qtype, "")]


# --------------------------------------------------------------------------
# Field helpers.  ``blocks`` is always a C-contiguous uint8 array [n, type_size].


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """f16 at byte ``offset`` of each block, as float32 [n, 1]."""
    raw = np.ascontiguousarray(blocks[:, offset : offset + 2])
    return raw.view(_F16).astype(np.float32)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] values: low nibbles first, then high nibbles."""
    n, m = qs.shape
    q = np.empty((n, 2 * m), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :m])
    np.right_shift(qs, 4, out=q[:, m:])
    return q


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a little-endian 32-bit word -> [n, 32] bits (bit j at j)."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte Q4_K/Q5_K scale field -> (scales, mins), uint8 [n, 8]."""
    n = packed.shape[0]
    lo, mid, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.empty((n, 8), dtype=np.uint8)
    mn = np.empty((n, 8), dtype=np.uint8)
    np.bitwise_and(lo, 63, out=sc[:, :4])
    np.bitwise_and(mid, 63, out=mn[:, :4])
    sc[:, 4:] = (hi & 0x0F) | ((lo >> 6) << 4)
    mn[:, 4:] = (hi >> 4) | ((mid >> 6) << 4)
    return sc, mn


# --------------------------------------------------------------------------
# Per-type kernels: uint8 [n, type_size] -> float32 [n, block_size].


def _deq_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.reshape(-1).view(_F32).reshape(-1, 1)


def _deq_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.reshape(-1).view(_F16).reshape(-1, 1)


def _deq_bf16(blocks: np.ndarray) -> np.ndarray:
    bits = blocks.reshape(-1).view(_U16).astype(np.uint32)
    bits <<= 16
    return bits.view(np.float32).reshape(-1, 1)


def _deq_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16_field(blocks, 0)
    q = blocks[:, 2:].view(np.int8)
    return d * q


def _deq_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16_field(blocks, 0)
    q = _split_nibbles(blocks[:, 2:]).view(np.int8)
    q -= 8
    return d * q


def _deq_q4_1(blocks: np.ndarray) -> np.ndarray:
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    q = _split_nibbles(blocks[:, 4:])
    out = d * q
    out += m
    return out


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    q = _split_nibbles(qs)
    q |= _high_bits_32(qh) << 4
    return q


def _deq_q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16_field(blocks, 0)
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:]).view(np.int8)
    q -= 16
    return d * q


def _deq_q5_1(blocks: np.ndarray) -> np.ndarray:
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    q = _q5_values(blocks[:, 4:8], blocks[:, 8:])
    out = d * q
    out += m
    return out


def _k4_low_values(qs: np.ndarray) -> np.ndarray:
    """[n, 128] nibble bytes -> [n, 8, 32] values in sub-block order."""
    n = qs.shape[0]
    groups = qs.reshape(n, 4, 1, 32)
    q = np.empty((n, 4, 2, 32), dtype=np.uint8)
    np.bitwise_and(groups, 0x0F, out=q[:, :, :1])
    np.right_shift(groups, 4, out=q[:, :, 1:])
    return q.reshape(n, 8, 32)


def _k_apply(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x = (d * scale) * q - (dmin * min) for Q4_K / Q5_K; q is [n, 8, 32]."""
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    dmin = _f16_field(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4 : 4 + K_SCALE_BYTES])
    scale = (d * sc).reshape(n, 8, 1)
    offset = (dmin * mn).reshape(n, 8, 1)
    out = scale * q
    out -= offset
    return out.reshape(n, QK_K)


def _deq_q4_k(blocks: np.ndarray) -> np.ndarray:
    q = _k4_low_values(blocks[:, 4 + K_SCALE_BYTES :])
    return _k_apply(blocks, q)


def _deq_q5_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    qh_start = 4 + K_SCALE_BYTES
    qs_start = qh_start + QK_K // 8
    q = _k4_low_values(blocks[:, qs_start:])
    # bits[n, l, s] = bit s of qh[l]  ->  5th bit of value l in sub-block s.
    bits = np.unpackbits(blocks[:, qh_start:qs_start].reshape(n, 32, 1), axis=2, bitorder="little")
    q |= bits.transpose(0, 2, 1) << 4
    return _k_apply(blocks, q)


def _deq_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 1, 2, 32)  # [half, -, ql[l] / ql[l+32], l]
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)  # [half, -, l]
    scales = blocks[:, 192:208].view(np.int8)
    d = _f16_field(blocks, 208)
    # Value slots within a half, in order: lowA, lowB, highA, highB.
    q = np.empty((n, 2, 2, 2, 32), dtype=np.uint8)
    np.bitwise_and(ql, 0x0F, out=q[:, :, :1])
    np.right_shift(ql, 4, out=q[:, :, 1:])
    q = q.reshape(n, 2, 4, 32)
    q |= ((qh >> _Q6K_HIGH_SHIFTS) & 3) << 4
    qs = q.view(np.int8)
    qs -= 32
    scale = (d * scales).reshape(n, 16, 1)
    return (scale * qs.reshape(n, 16, 16)).reshape(n, QK_K)


_KERNELS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.F32: _deq_f32,
    QT.F16: _deq_f16,
    QT.BF16: _deq_bf16,
    QT.Q8_0: _deq_q8_0,
    QT.Q4_0: _deq_q4_0,
    QT.Q4_1: _deq_q4_1,
    QT.Q5_0: _deq_q5_0,
    QT.Q5_1: _deq_q5_1,
    QT.Q4_K: _deq_q4_k,
    QT.Q5_K: _deq_q5_k,
    QT.Q6_K: _deq_q6_k,
}
assert set(_KERNELS) == SUPPORTED_TYPES


# --------------------------------------------------------------------------


def _as_bytes(data: np.ndarray, qtype: QT, what: str) -> np.ndarray:
    """Flat uint8 view (or, for non-contiguous input, copy) of the payload."""
    data = np.asarray(data)
    if data.dtype != np.uint8:
        accepted = _TYPED_INPUTS.get(qtype, frozenset())
        if data.dtype.name not in accepted:
            expected = " or ".join(["uint8"] + sorted(accepted))
            raise ValueError(f"{_prefix(what)}{qtype.name} payload must have dtype {expected}, got {data.dtype}")
        if data.dtype.byteorder == ">":
            raise ValueError(f"{_prefix(what)}big-endian payloads are not supported (dtype {data.dtype})")
    flat = data.reshape(-1)  # view when contiguous (e.g. a memmap), copy otherwise
    return flat.view(np.uint8)


def raw_blocks(data: np.ndarray, qtype, shape: tuple[int, ...], *, what: str = "") -> np.ndarray:
    """A quantized payload's blocks as they lie, uint8 [rows, ne0 / block, bytes per block] (rows: the product of
    `shape`'s leading dims), with dequantize's checks of the type, the row length and the payload's size."""
    t = _resolve_type(qtype, what)
    shape = tuple(int(s) for s in shape)
    block_size, type_size = BLOCK_LAYOUT[t]
    ne0 = shape[-1] if shape else 1
    if ne0 % block_size:
        raise ValueError(f"{_prefix(what)}row length {ne0} is not a multiple of the {t.name} block size {block_size}")
    raw = _as_bytes(data, t, what)
    expected = math.prod(shape) // block_size * type_size
    if raw.size != expected:
        raise ValueError(f"{_prefix(what)}{t.name} payload has {raw.size} bytes but shape {shape} needs {expected} "
                         f"bytes (truncated or corrupt tensor?)")
    return raw.reshape(math.prod(shape[:-1]), ne0 // block_size, type_size)


def dequantize(
    data: np.ndarray,
    qtype,
    shape: tuple[int, ...],
    *,
    out_dtype=np.float32,
    what: str = "",
) -> np.ndarray:
    """Dequantize a raw GGML tensor payload to a dense array.

    Args:
      data: payload as returned by ``gguf.GGUFReader`` (``tensor.data``):
        uint8 bytes of any shape, or for F32/F16/BF16 a typed array whose
        elements have the type's width.
      qtype: a ``gguf.GGMLQuantizationType`` (or its integer value).
      shape: logical numpy shape ``(..., ne0)`` (reversed ggml dimension order).
      out_dtype: dtype of the result (float32, float16, bfloat16, ...).
      what: name of the tensor / file, used in error messages.

    Returns:
      Array of ``shape`` and ``out_dtype``.

    Raises:
      UnsupportedQuantizationError: ``qtype`` is not in ``SUPPORTED_TYPES``.
      ValueError: payload size or row length does not fit ``shape``.
    """
    t = _resolve_type(qtype, what)
    shape = tuple(int(s) for s in shape)
    out_dtype = np.dtype(out_dtype)
    if out_dtype.kind != "f" and out_dtype.name != "bfloat16":
        raise ValueError(f"{_prefix(what)}out_dtype must be a real floating dtype, got {out_dtype}")
    if any(s < 0 for s in shape):
        raise ValueError(f"{_prefix(what)}invalid shape {shape}")

    block_size, type_size = BLOCK_LAYOUT[t]
    n_values = math.prod(shape)
    ne0 = shape[-1] if shape else 1
    if ne0 % block_size:
        raise ValueError(
            f"{_prefix(what)}row length {ne0} (last dim of shape {shape}) is not a "
            f"multiple of the {t.name} block size {block_size}"
        )
    n_blocks = n_values // block_size
    expected = n_blocks * type_size

    raw = _as_bytes(data, t, what)
    if raw.size != expected:
        raise ValueError(
            f"{_prefix(what)}{t.name} payload has {raw.size} bytes but shape {shape} "
            f"needs {expected} bytes (truncated or corrupt tensor?)"
        )

    out = np.empty(n_values, dtype=out_dtype)
    if n_blocks == 0:
        return out.reshape(shape)
    blocks = raw.reshape(n_blocks, type_size)
    kernel = _KERNELS[t]
    step = max(1, int(CHUNK_ELEMENTS) // block_size)
    for b0 in range(0, n_blocks, step):
        b1 = min(b0 + step, n_blocks)
        out[b0 * block_size : b1 * block_size] = kernel(blocks[b0:b1]).reshape(-1)
    return out.reshape(shape)
