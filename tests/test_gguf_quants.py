"""Tests for sgl_jax.models.gguf_quants against the gguf package's reference dequantizer."""

from __future__ import annotations

import tracemalloc

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_jax.models import gguf_quants as gq

QUANT_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
FLOAT_TYPES = [QT.F32, QT.F16, QT.BF16]

# Byte offsets of the f16 scale/min fields inside one block.  Test payloads get
# random bytes everywhere else, and sane finite values here.
F16_FIELD_OFFSETS = {
    QT.Q8_0: (0,),
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}


def random_payload(qtype: QT, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random valid payload for logical ``shape``, as uint8 [rows..., bytes_per_row]."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    *rows, ne0 = shape
    assert ne0 % block_size == 0
    blocks = rng.integers(0, 256, size=(*rows, ne0 // block_size, type_size), dtype=np.uint8)
    for off in F16_FIELD_OFFSETS[qtype]:
        vals = rng.uniform(-2.0, 2.0, size=(*rows, ne0 // block_size, 1)).astype("<f2")
        blocks[..., off : off + 2] = vals.view(np.uint8)
    return blocks.reshape(*rows, (ne0 // block_size) * type_size)


def reference(payload: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    ref = gguf.quants.dequantize(payload, qtype)
    assert ref.dtype == np.float32
    return ref.reshape(shape)


def block_shapes(qtype: QT) -> list[tuple[int, ...]]:
    bs = gguf.GGML_QUANT_SIZES[qtype][0]
    return [(bs,), (1, bs), (5, 3 * bs), (2, 3, 2 * bs)]


# ---------------------------------------------------------------------------
# Layout / API surface


def test_supported_types_and_layouts_match_gguf():
    assert gq.SUPPORTED_TYPES == frozenset(QUANT_TYPES + FLOAT_TYPES)
    for t in gq.SUPPORTED_TYPES:
        assert gq.BLOCK_LAYOUT[t] == tuple(gguf.GGML_QUANT_SIZES[t]), t.name
        assert gq.block_layout(t) == tuple(gguf.GGML_QUANT_SIZES[t])
        assert gq.block_layout(int(t)) == tuple(gguf.GGML_QUANT_SIZES[t])


# ---------------------------------------------------------------------------
# Quantized types vs reference


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_random_payload_matches_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    for shape in block_shapes(qtype):
        payload = random_payload(qtype, shape, rng)
        ref = reference(payload, qtype, shape)
        out = gq.dequantize(payload, qtype, shape, what="t")
        assert out.shape == shape
        assert out.dtype == np.float32
        assert np.isfinite(out).all()
        assert np.abs(out).max() > 0
        np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1], ids=lambda t: t.name)
def test_quantized_real_data_roundtrips(qtype):
    """Payloads made by gguf's own quantizer decode identically and approximate the input."""
    rng = np.random.default_rng(100 + int(qtype))
    x = rng.standard_normal((6, 128)).astype(np.float32)
    payload = gguf.quants.quantize(x, qtype)
    out = gq.dequantize(payload, qtype, x.shape)
    np.testing.assert_array_equal(out, reference(payload, qtype, x.shape))
    tol = 0.02 if qtype == QT.Q8_0 else 0.35
    assert np.abs(out - x).max() < tol * np.abs(x).max()


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_input_forms(qtype):
    """Flat bytes, reader-style 2-D bytes, and non-contiguous input all decode the same."""
    rng = np.random.default_rng(7 + int(qtype))
    shape = (3, 2 * gguf.GGML_QUANT_SIZES[qtype][0])
    payload = random_payload(qtype, shape, rng)
    ref = reference(payload, qtype, shape)
    np.testing.assert_array_equal(gq.dequantize(payload.reshape(-1), qtype, shape), ref)
    padded = np.zeros((payload.shape[0], payload.shape[1] + 5), dtype=np.uint8)
    padded[:, 3:-2] = payload
    view = padded[:, 3:-2]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(gq.dequantize(view, qtype, shape), ref)
    np.testing.assert_array_equal(gq.dequantize(payload, int(qtype), shape), ref)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("chunk", [1, 3, 257])
def test_chunk_boundaries(qtype, chunk, monkeypatch):
    """Tiny chunk sizes (including ones that do not divide the block count) give identical output."""
    rng = np.random.default_rng(11 + int(qtype))
    shape = (7, 3 * gguf.GGML_QUANT_SIZES[qtype][0])
    payload = random_payload(qtype, shape, rng)
    ref = reference(payload, qtype, shape)
    monkeypatch.setattr(gq, "CHUNK_ELEMENTS", chunk * gguf.GGML_QUANT_SIZES[qtype][0] + 1)
    np.testing.assert_array_equal(gq.dequantize(payload, qtype, shape), ref)


@pytest.mark.parametrize("out_dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_1, QT.Q5_0, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_out_dtype(qtype, out_dtype):
    rng = np.random.default_rng(21 + int(qtype))
    shape = (4, 2 * gguf.GGML_QUANT_SIZES[qtype][0])
    payload = random_payload(qtype, shape, rng)
    out = gq.dequantize(payload, qtype, shape, out_dtype=out_dtype)
    assert out.dtype == np.dtype(out_dtype)
    assert out.shape == shape
    np.testing.assert_array_equal(
        out.astype(np.float32), reference(payload, qtype, shape).astype(out_dtype).astype(np.float32)
    )


@settings(max_examples=30, deadline=None)
@given(
    qtype=st.sampled_from(QUANT_TYPES),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n_blocks=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_reference(qtype, lead, n_blocks, seed):
    shape = (*lead, n_blocks * gguf.GGML_QUANT_SIZES[qtype][0])
    payload = random_payload(qtype, shape, np.random.default_rng(seed))
    np.testing.assert_array_equal(gq.dequantize(payload, qtype, shape), reference(payload, qtype, shape))


# ---------------------------------------------------------------------------
# Float types


def test_f32_typed_and_raw():
    x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(gq.dequantize(x, QT.F32, x.shape), x)
    np.testing.assert_array_equal(gq.dequantize(x.view(np.uint8), QT.F32, x.shape), x)
    np.testing.assert_array_equal(gq.dequantize(x, QT.F32, x.shape), reference(x, QT.F32, x.shape))
    out = gq.dequantize(x, QT.F32, x.shape, out_dtype=ml_dtypes.bfloat16)
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out, x.astype(ml_dtypes.bfloat16))


def test_f16_typed_and_raw():
    x = np.random.default_rng(2).standard_normal((6, 10)).astype(np.float16)
    expect = x.astype(np.float32)
    np.testing.assert_array_equal(gq.dequantize(x, QT.F16, x.shape), expect)
    np.testing.assert_array_equal(gq.dequantize(x.view(np.uint8), QT.F16, x.shape), expect)
    np.testing.assert_array_equal(gq.dequantize(x, QT.F16, x.shape), reference(x, QT.F16, x.shape))
    out = gq.dequantize(x, QT.F16, x.shape, out_dtype=np.float16)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, x)


def test_bf16_raw_and_typed(monkeypatch):
    x = np.random.default_rng(3).standard_normal((2, 3, 8)).astype(np.float32)
    raw = gguf.quants.quantize(x, QT.BF16)  # uint8 [..., 2 * ne0], as the reader returns
    assert raw.dtype == np.uint8
    ref = reference(raw, QT.BF16, x.shape)
    np.testing.assert_array_equal(ref, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(gq.dequantize(raw, QT.BF16, x.shape), ref)
    typed = raw.reshape(-1).view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(gq.dequantize(typed, QT.BF16, x.shape), ref)
    np.testing.assert_array_equal(gq.dequantize(typed.view(np.uint16), QT.BF16, x.shape), ref)
    out = gq.dequantize(raw, QT.BF16, x.shape, out_dtype=ml_dtypes.bfloat16)
    np.testing.assert_array_equal(out.view(np.uint16), typed.reshape(x.shape).view(np.uint16))
    monkeypatch.setattr(gq, "CHUNK_ELEMENTS", 5)
    np.testing.assert_array_equal(gq.dequantize(raw, QT.BF16, x.shape), ref)


def test_gguf_file_roundtrip(tmp_path):
    """Tensors written by GGUFWriter and read back by GGUFReader decode like the reference."""
    rng = np.random.default_rng(5)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    expected = {}
    for qtype in QUANT_TYPES:
        shape = (3, 2 * gguf.GGML_QUANT_SIZES[qtype][0])
        payload = random_payload(qtype, shape, rng)
        writer.add_tensor(f"q.{qtype.name}", payload, raw_dtype=qtype)
        expected[f"q.{qtype.name}"] = reference(payload, qtype, shape)
    f32 = rng.standard_normal((4, 6)).astype(np.float32)
    writer.add_tensor("f.F32", f32)
    expected["f.F32"] = f32
    f16 = rng.standard_normal((2, 2, 3)).astype(np.float16)
    writer.add_tensor("f.F16", f16)
    expected["f.F16"] = f16.astype(np.float32)
    bf16 = gguf.quants.quantize(f32, QT.BF16)
    writer.add_tensor("f.BF16", bf16, raw_dtype=QT.BF16)
    expected["f.BF16"] = reference(bf16, QT.BF16, f32.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    seen = set()
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        out = gq.dequantize(t.data, t.tensor_type, shape, what=t.name)
        np.testing.assert_array_equal(out, expected[t.name], err_msg=t.name)
        seen.add(t.name)
    assert seen == set(expected)


# ---------------------------------------------------------------------------
# Memory bound


def test_peak_memory_is_bounded(monkeypatch):
    qtype = QT.Q4_K
    shape = (64, 4096)  # 1 MiB of float32 output
    payload = random_payload(qtype, shape, np.random.default_rng(9))
    monkeypatch.setattr(gq, "CHUNK_ELEMENTS", 16 * 1024)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = gq.dequantize(payload, qtype, shape)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # Output plus temporaries for a 64 KiB chunk; far below 2x the output.
    assert peak < out.nbytes + 16 * 16 * 1024 * 4, (peak, out.nbytes)


# ---------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K, QT.IQ4_XS, QT.Q8_1], ids=lambda t: t.name)
def test_unsupported_type(qtype):
    with pytest.raises(gq.UnsupportedQuantizationError) as exc:
        gq.dequantize(np.zeros(256, np.uint8), qtype, (256,), what="model.gguf:blk.0.ffn_up.weight")
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert qtype.name in msg
    assert "model.gguf:blk.0.ffn_up.weight" in msg
    for name in ("Q4_K", "Q8_0", "BF16"):
        assert name in msg


def test_unknown_type_id():
    with pytest.raises(gq.UnsupportedQuantizationError, match="9999"):
        gq.dequantize(np.zeros(4, np.uint8), 9999, (1,))


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_truncated_payload(qtype):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    shape = (2, 2 * block_size)
    n_bytes = 4 * type_size
    payload = np.zeros(n_bytes - 1, dtype=np.uint8)
    with pytest.raises(ValueError) as exc:
        gq.dequantize(payload, qtype, shape, what="blk.3.attn_q.weight")
    msg = str(exc.value)
    assert not isinstance(exc.value, gq.UnsupportedQuantizationError)
    assert "blk.3.attn_q.weight" in msg
    assert str(n_bytes) in msg and str(n_bytes - 1) in msg
    # Too long is equally wrong.
    with pytest.raises(ValueError, match=str(n_bytes + type_size)):
        gq.dequantize(np.zeros(n_bytes + type_size, np.uint8), qtype, shape)


def test_row_not_multiple_of_block():
    with pytest.raises(ValueError, match=r"row length 48 .* block size 32"):
        gq.dequantize(np.zeros(2 * 34, np.uint8), QT.Q8_0, (1, 48), what="x")


def test_bad_typed_inputs_and_out_dtype():
    with pytest.raises(ValueError, match="float64"):
        gq.dequantize(np.zeros(4, np.float64), QT.F32, (4,), what="w")
    with pytest.raises(ValueError, match="float32"):
        gq.dequantize(np.zeros(34, np.float32), QT.Q8_0, (32,), what="w")
    with pytest.raises(ValueError, match="out_dtype"):
        gq.dequantize(np.zeros(4, np.float32), QT.F32, (4,), out_dtype=np.int32)


def test_empty_tensor():
    out = gq.dequantize(np.zeros(0, np.uint8), QT.Q4_K, (0, 256))
    assert out.shape == (0, 256) and out.dtype == np.float32
