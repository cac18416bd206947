"""GGUF Q4_1 weights kept in their blocks (`quantization: gguf`): the native kernel (pallas_kernels/cpu_matmul.cc)
against a float64 reference built from the blocks by hand, the packing (sgl_jax.models.packing.pack_q4_1), the
in-graph dequantization (llama.q4_1_dequantize) against the loader's (gguf_quants), and a tiny Q4_1 model loaded
in gguf mode against the same file loaded in float32."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_matmul
from sgl_jax.models import gguf_quants
from sgl_jax.models.packing import pack_q4_1

from test_cpu_matmul import _quantized_activations, quantize_rows_ref

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def native():
    if not cpu_matmul.packed_available():  # a failure, not a skip: CI and the dev machines have a C++ compiler
        pytest.fail(f"the packed matmul kernels did not build: {cpu_matmul._PACKED_Q4.why_not()}")


def q4_1_blocks(rng, n, k):
    """Random Q4_1 blocks uint8 [n, k / 32, 20] as a file holds them, and the matrix they stand for, float64 [k, n]
    (d * q + m with the float16 d and m, nibbles: q[j] low and q[j + 16] high in byte j)."""
    nb = k // 32
    d = (rng.random((n, nb)) * 0.02 + 0.001).astype(np.float16)
    m = (-rng.random((n, nb)) * 0.1).astype(np.float16)
    qs = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    raw = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], axis=2)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.float64)  # [n, nb, 32]
    w = d.astype(np.float64)[..., None] * q + m.astype(np.float64)[..., None]
    return raw, w.reshape(n, k).T


@pytest.mark.parametrize("m,k,n", [
    (1, 576, 1536), (1, 64, 48), (1, 1536, 576),      # 1 row: groups of 4 panels, then the rest in pairs / one
    (2, 576, 192), (3, 64, 32), (4, 32, 16),          # row tiles in one pass over K, a single block
    (8, 1536, 576), (9, 576, 80), (17, 320, 48),      # blocked over K (8 blocks of 32), a ragged last K block
    (97, 256, 64), (200, 64, 48),                     # more rows than one 96-row block
])
def test_q4_1_kernel_matches_float64_reference(m, k, n):
    """The kernel's exact integer sums scaled by the block's d and m, against the float64 product of the kernel's
    quantized activations (restated in numpy) with the blocks' weights: float32 rounding only."""
    rng = np.random.default_rng(m * 131 + k + n)
    raw, w = q4_1_blocks(rng, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = np.asarray(jax.jit(cpu_matmul.packed_q4_1_matmul)(x, pack_q4_1(raw)))
    assert y.shape == (m, n) and y.dtype == np.float32
    q, d = quantize_rows_ref(x)
    ref = (q * d) @ w
    bound = np.abs(q * d) @ np.abs(w)
    assert np.all(np.abs(y - ref) <= 4 * np.sqrt(k) * np.finfo(np.float32).eps * bound + 1e-30)
    assert not np.allclose(y, x.astype(np.float64) @ w, rtol=0, atol=1e-6)  # the activations were quantized


def test_q4_1_activation_error_is_bounded_and_rows_do_not_depend_on_their_neighbours():
    """Against the unquantized activations the error is what 8 bits per block of 32 allow (d / 2 an input); a
    row's result is the same bits alone and among 40 others (every tiling accumulates a row's blocks in one
    order)."""
    rng = np.random.default_rng(3)
    raw, w = q4_1_blocks(rng, 96, 576)
    x = rng.standard_normal((40, 576)).astype(np.float32)
    x[5, :32] *= 100.0  # an outlier block
    wp = jnp.asarray(pack_q4_1(raw))
    y = np.asarray(cpu_matmul.packed_q4_1_matmul(jnp.asarray(x), wp))
    _, d = quantize_rows_ref(x)
    err = np.abs(y - x.astype(np.float64) @ w)
    assert np.all(err <= (d / 2) @ np.abs(w) * 1.0001 + 1e-6) and err.max() > 0
    for r in (0, 5, 39):
        alone = np.asarray(cpu_matmul.packed_q4_1_matmul(jnp.asarray(x[r:r + 1]), wp))
        np.testing.assert_array_equal(alone[0], y[r])


def test_q4_1_non_finite_rows_and_bad_operands():
    rng = np.random.default_rng(4)
    raw, _ = q4_1_blocks(rng, 32, 64)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[2, 40] = np.nan
    y = np.asarray(cpu_matmul.packed_q4_1_matmul(jnp.asarray(x), jnp.asarray(pack_q4_1(raw))))
    assert np.all(np.isfinite(y[[0, 1, 3]])) and np.all(np.isnan(y[2]))
    good = jnp.asarray(pack_q4_1(raw))
    for xs, w in (((4, 64), good[:, :1]),                                   # K disagrees
                  ((4, 60), good),                                          # K not a multiple of 32
                  ((4, 64), good.astype(jnp.int8)),                         # not uint8
                  ((4, 64), jnp.zeros((2, 2, 20), jnp.uint8))):             # not packed (the file's blocks)
        with pytest.raises(ValueError, match="packed Q4_1 matmul"):
            cpu_matmul.packed_q4_1_matmul(jnp.zeros(xs, jnp.float32), w)
    with pytest.raises(ValueError, match="pack_q4_1"):
        pack_q4_1(raw[:8])  # 8 columns do not fill a panel


def test_q4_1_in_graph_dequantization_equals_the_loaders():
    """llama.q4_1_dequantize (the path without the kernel) gives gguf_quants.dequantize's values, transposed."""
    from sgl_jax.models.llama import q4_1_dequantize

    raw, w = q4_1_blocks(np.random.default_rng(5), 48, 96)
    loader = gguf_quants.dequantize(raw.reshape(-1), gguf_quants.QT.Q4_1, (48, 96))
    np.testing.assert_array_equal(np.asarray(q4_1_dequantize(jnp.asarray(raw))), loader.T)
    np.testing.assert_allclose(loader.T, w, rtol=1e-6, atol=1e-7)
    back = gguf_quants.raw_blocks(raw.reshape(-1), gguf_quants.QT.Q4_1, (48, 96))
    np.testing.assert_array_equal(back, raw)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gguf_quants.raw_blocks(raw.reshape(-1)[:-1], gguf_quants.QT.Q4_1, (48, 96))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_q4_1_model_in_gguf_mode(family, tmp_path):
    """A tiny GGUF with Q4_1 linears loaded with quantization "gguf": the linears keep the file's blocks (rows
    unpermuted like the float load's), the rest is int8; packed, every linear runs the Q4_1 kernel and the logits
    equal those of the plain layout (blocks dequantized in the graph, activations quantized the kernel's way in
    front of each matmul) to float32 rounding on at least 90 % of the rows; and the model stays close to the
    same file loaded in float32."""
    from helpers import PagedRunner
    from sgl_jax.models import llama, packing
    from sgl_jax.models.loader import load_weights
    from sgl_jax.models.testing import write_tiny_gguf

    path = write_tiny_gguf(family, str(tmp_path / "m.gguf"), quant="Q4_1")
    cfg, pg = load_weights(path, progress=False, quantization="gguf")
    _, pf = load_weights(path, progress=False)
    attn = pg["layers_0"]["self_attn"]
    assert set(attn["q_proj"]) >= {"q4_1"} and "kernel" not in attn["q_proj"]
    assert attn["q_proj"]["q4_1"].dtype == jnp.uint8 and attn["q_proj"]["q4_1"].shape[2] == 20
    q_float = np.asarray(pf["layers_0"]["self_attn"]["q_proj"]["kernel"])  # [in, out], rows unpermuted
    np.testing.assert_array_equal(np.asarray(llama.q4_1_dequantize(attn["q_proj"]["q4_1"])), q_float)
    packed = packing.pack_params(pg, cfg.tie_word_embeddings)
    assert packed["layers_0"]["self_attn"]["qkv_proj"]["q4_1"].shape[2] == cpu_matmul.Q4_BYTES

    calls, kernel = [], cpu_matmul.packed_q4_1_matmul
    plain, plain_int8 = llama.q4_1_matmul, llama.int8_matmul
    prefill = [(i, list(range(3 + i, 20 + 2 * i)), 0, 0) for i in range(3)]
    decode = [(i, [7 + i], 17 + i, None) for i in range(3)]
    outs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_matmul, "packed_q4_1_matmul",
                   lambda x, w, keep=None: calls.append(x.shape[0]) or kernel(x, w, keep))
        # int8 leaves the packing leaves plain (a vocabulary of 300 fills no panels) quantize like the kernels
        mp.setattr(llama, "int8_matmul", lambda x, *a, **k: plain_int8(_quantized_activations(x), *a, **k))
        for name, p in (("packed", packed), ("float", pf), ("plain", pg)):
            if name == "plain":  # the kernel's activation quantization in front of the in-graph dequantization
                mp.setattr(llama, "q4_1_matmul", lambda x, w, keep=None: plain(_quantized_activations(x), w))
            r = PagedRunner(cfg, p, num_pages=32, page_size=16, block_q=8, attention_backend="cpu_native")
            calls.clear()
            outs[name] = [np.concatenate(r.step(prefill)), np.concatenate(r.step(decode))]
            if name == "packed":  # every layer's q/k/v, o, gate/up and down, in each of the two steps
                assert len(calls) == 2 * 4 * cfg.num_layers, calls
    for got, want, ref in zip(outs["packed"], outs["plain"], outs["float"]):
        scale = np.abs(want).max()
        # rows equal to float32 rounding; the few that are not saw an activation round the other way within an ulp
        # of a tie (jnp's restatement of the quantization is not the kernel's instruction sequence): seen 2 of 54
        same = np.all(np.abs(got - want) <= 2e-5 * scale, axis=1)
        assert same.mean() >= 0.9, np.flatnonzero(~same)
        err = np.abs(got - ref).max()  # int8 head and 8-bit activations against the float load
        assert 0 < err < 0.05 * scale, err
        assert np.abs(got - want).max() < 0.05 * scale


def test_engine_in_gguf_mode_matches_the_forward(tmp_path):
    """`Engine(quantization="gguf")` on a Q4_1 file runs the blocks through the unchanged runner (paged attention,
    sampling, step): its greedy tokens equal PagedRunner's on the same params, packed as the engine packs them."""
    from helpers import PagedRunner
    from sgl_jax.engine import Engine
    from sgl_jax.models import packing
    from sgl_jax.models.loader import load_weights
    from sgl_jax.models.testing import write_tiny_gguf
    from test_quant import _greedy

    path = write_tiny_gguf("qwen2", str(tmp_path / "tiny.gguf"), quant="Q4_1")
    small = dict(page_size=4, max_context_len=64, max_running_requests=1, max_prefill_tokens=16, prefill_block=8,
                 decode_buckets=[1], prefill_block_buckets=[2], max_mixed_blocks=0, page_width_buckets=[16],
                 max_top_logprobs=0, compile_cache_dir="", kv_memory_gb=0.01, decode_row_fill="fit")
    cfg, pg = load_weights(path, progress=False, quantization="gguf")
    pg = packing.pack_params(pg, cfg.tie_word_embeddings)
    ids = [5, 77, 123, 9, 250, 31]
    _, expected, _ = _greedy(PagedRunner(cfg, pg, num_pages=64, page_size=4, block_q=8, nan_fill=False), 0, ids, 10)
    with Engine(model=path, progress=False, quantization="gguf", **small) as e:
        w = e.runner.params["layers_0"]["mlp"]["down_proj"]["q4_1"]
        assert w.dtype == jnp.uint8 and w.shape[-1] == cpu_matmul.Q4_BYTES
        out = e.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 10, "ignore_eos": True})
    assert out["output_ids"] == expected
