"""Model numerics against Hugging Face transformers (fp32) reference values in tests/reference/.

Tiny random checkpoints of each family are rebuilt here from the same seed as
tools/make_model_reference.py and loaded through our safetensors loader.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import PagedRunner
from sgl_jax.batch import SeqChunk, pack
from sgl_jax.models.attention import page_major_pays
from sgl_jax.models.config import PRESETS, ModelConfig
from sgl_jax.models.llama import param_shapes
from sgl_jax.models.loader import ModelLoadError, load_weights
from sgl_jax.models.testing import TINY_CONFIGS, write_tiny_checkpoint

REF = os.path.join(os.path.dirname(__file__), "reference")
FAMILIES = sorted(TINY_CONFIGS)
# One step shape for a runner's steps (as the engine's buckets pad them: padding rows, blocks and pages are masked):
# 4 decode rows, 12 prefill blocks of 8, 16 pages a row, 80 logits rows hold every step below, so each runner
# compiles one forward and the runners of one model and settings share it through the compilation cache.
ONE = dict(num_decode=4, num_blocks=12, page_width=16, num_logits=80)


def _ref(name):
    data = np.load(os.path.join(REF, f"tiny_{name}.npz"))
    n = len([k for k in data if k.startswith("ids_")])
    return [(data[f"ids_{i}"].tolist(), data[f"logits_{i}"]) for i in range(n)]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp(request.param))
    write_tiny_checkpoint(request.param, d, shards=2 if request.param == "qwen2" else 1)
    cfg, params = load_weights(d, progress=False)
    return request.param, cfg, params


def test_tiny_alone_all_positions(tiny):
    name, cfg, params = tiny
    runner = PagedRunner(cfg, params, shape=ONE)
    for sid, (ids, ref) in enumerate(_ref(name)):
        (logits,) = runner.step([(sid, ids, 0, 0)])
        np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4, err_msg=f"{name} prompt {sid}")


def test_tiny_packed_weights_match_reference(tiny):
    """The CPU engine's layout (sgl_jax.models.packing: every linear, and a tied embedding, panel-packed for the
    native matmul) against the same Hugging Face values, prefill and a decode continuation."""
    from pallas_kernels import cpu_matmul
    from sgl_jax.models.packing import is_packed, pack_params

    name, cfg, params = tiny
    assert cpu_matmul.packed_available(), cpu_matmul.why_not()
    packed = pack_params(params, cfg.tie_word_embeddings)
    assert is_packed(packed)
    runner = PagedRunner(cfg, packed, attention_backend="auto", shape=ONE)
    for sid, (ids, ref) in enumerate(_ref(name)):
        split = max(1, len(ids) - 1)
        parts = runner.step([(sid, ids[:split], 0, 0)])
        if split < len(ids):
            parts += runner.step([(sid, ids[split:], split, split)])
        np.testing.assert_allclose(np.concatenate(parts), ref, atol=1e-4, rtol=1e-4, err_msg=f"{name} prompt {sid}")


def test_tiny_packed_padding_rows_are_not_computed(tiny):
    """A step padded to a larger shape (ONE: decode rows, prefill blocks, page tables, logits rows) gives the exact
    fit's logits at the real rows: the native matmuls compute the real tokens' rows only (padding inside the step --
    each chunk's last block -- and after it; the kernels' zeros for the others: test_cpu_matmul.py), and skipping
    them changes no real row. (XLA's own ops may round differently for another token count: float32 rounding.)"""
    from sgl_jax.models.packing import pack_params

    name, cfg, params = tiny
    packed = pack_params(params, cfg.tie_word_embeddings)
    prompts = [list(range(3 + i, 14 + 2 * i)) for i in range(3)]
    runs = {}
    for pad in ({}, ONE):
        runner = PagedRunner(cfg, packed, attention_backend="auto")
        pre = runner.step([(i, ids, 0, len(ids) - 1) for i, ids in enumerate(prompts)], **pad)
        dec = runner.step([(i, [5 + i], len(ids), None) for i, ids in enumerate(prompts)], **pad)
        runs[bool(pad)] = pre + dec
    for a, b in zip(runs[False], runs[True]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_tiny_packed_logits_padding_rows_not_computed(tiny):
    """A step with more logits rows than its chunks ask for (a prompt-logprob shape's `full_logit_rows`): pack() marks
    the rows past them -1, and the native LM head skips those rows (zeros) -- they were computed as copies of token
    0's logits -- while the rows asked for are the exact fit's."""
    from sgl_jax.models.packing import pack_params

    name, cfg, params = tiny
    packed = pack_params(params, cfg.tie_word_embeddings)
    runner = PagedRunner(cfg, packed, attention_backend="auto")
    ids = list(range(3, 14))
    table = runner.ensure_pages(0, len(ids))
    got = {}
    for L in (None, 24):
        b = pack([SeqChunk(ids, 0, list(table), 6)], page_size=runner.page_size, block_q=runner.block_q, num_logits=L)
        if L:
            assert b.logits_indices[5:].tolist() == [-1] * (L - 5)
        meta = tuple(jnp.asarray(m) for m in (b.positions, b.slot_mapping, b.dec_page_table, b.dec_kv_lens,
                                              b.pre_page_table, b.pre_kv_lens))
        logits, runner.kv = runner._fwd(runner.params, b.input_ids, runner.kv, b.logits_indices, meta,
                                        block_q=b.block_q)
        got[L] = np.asarray(logits)
    assert got[24].shape[0] == 24 and not got[24][5:].any(), "padding logits rows were computed"
    np.testing.assert_allclose(got[24][:5], got[None], rtol=1e-5, atol=1e-5, err_msg=name)


def test_tiny_cached_prefix_and_decode(tiny):
    """Prefill a prefix, then the rest as a second chunk over the cached pages, then 1-token decodes."""
    name, cfg, params = tiny
    runner = PagedRunner(cfg, params, shape=ONE)
    for sid, (ids, ref) in enumerate(_ref(name)):
        if len(ids) < 5:
            continue
        k = len(ids) // 2  # not page aligned for page_size 4 on some prompts
        parts = [runner.step([(sid, ids[:k], 0, 0)])[0], runner.step([(sid, ids[k:-2], k, k)])[0]]
        parts += [runner.step([(sid, ids[p:p + 1], p, None)])[0] for p in (len(ids) - 2, len(ids) - 1)]
        got = np.concatenate(parts)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4, err_msg=f"{name} prompt {sid}")


def test_tiny_rope_tables_computed_once(tiny):
    """RoPE's sines and cosines are evaluated once a step, not again inside each layer's fusions (XLA:CPU fuses an
    elementwise producer into every consumer: 2 x layers copies, each per element of q and k)."""
    name, cfg, params = tiny
    runner = PagedRunner(cfg, params)
    ids = list(range(3, 19))
    b = pack([SeqChunk(ids, 0, runner.ensure_pages(0, len(ids)), 0)], page_size=runner.page_size,
             block_q=runner.block_q)
    meta = tuple(jnp.asarray(m) for m in (b.positions, b.slot_mapping, b.dec_page_table, b.dec_kv_lens,
                                          b.pre_page_table, b.pre_kv_lens))
    hlo = runner._fwd.lower(runner.params, b.input_ids, runner.kv, b.logits_indices, meta,
                            block_q=b.block_q).compile().as_text()
    assert cfg.num_layers > 1
    assert (hlo.count(" cosine("), hlo.count(" sine(")) == (1, 1), name


def test_tiny_batched_mixed_matches_alone(tiny):
    """All prompts in one ragged call (decodes + prefill blocks, padded rows), then a mixed step."""
    name, cfg, params = tiny
    refs = _ref(name)
    runner = PagedRunner(cfg, params, shape=ONE)
    work = [(sid, ids[:-1] if len(ids) > 1 else ids, 0, 0) for sid, (ids, _) in enumerate(refs)]
    outs = runner.step(work)
    # second step: the last token of each multi-token prompt as a decode, mixed with a fresh prefill
    work2 = [(sid, ids[-1:], len(ids) - 1, None) for sid, (ids, _) in enumerate(refs) if len(ids) > 1]
    fresh = refs[-1][0]
    work2.append((99, fresh[:20], 0, 0))
    outs2 = runner.step(work2)
    for sid, (ids, ref) in enumerate(refs):
        n = len(ids) - 1 if len(ids) > 1 else 1
        np.testing.assert_allclose(outs[sid], ref[:n], atol=1e-4, rtol=1e-4, err_msg=f"{name} {sid}")
    for j, (sid, ids, start, _) in enumerate(work2[:-1]):
        np.testing.assert_allclose(outs2[j], refs[sid][1][-1:], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outs2[-1], refs[-1][1][:20], atol=1e-4, rtol=1e-4)


def test_tiny_run_blocks_match_reference(tiny):
    """Prefill the start of each prompt, then the rest as run blocks (Br = 4, runs spanning two blocks, a
    padded block) beside a decode row of another sequence: every position's logits match HF."""
    name, cfg, params = tiny
    allrefs = _ref(name)
    refs = [(ids, ref) for ids, ref in allrefs if len(ids) >= 6]
    assert len(refs) >= 2 and max(len(ids) for ids, _ in refs) > 3 + 4  # some run spans two blocks
    dec_ids, dec_ref = min((r for r in allrefs if len(r[0]) >= 2), key=lambda x: len(x[0]))
    assert len(dec_ids) >= 2
    runner = PagedRunner(cfg, params, shape=ONE)
    for sid, (ids, _) in enumerate(refs):
        runner.step([(sid, ids[:3], 0, 0)])
    runner.step([(99, dec_ids[:-1], 0, 0)])
    work = [(sid, ids[3:], 3, 3, True) for sid, (ids, _) in enumerate(refs)]
    work.append((99, dec_ids[-1:], len(dec_ids) - 1, None))  # a plain decode row alongside
    nrun = sum(-(-len(w[1]) // 4) for w in work[:-1])
    outs = runner.step(work, run_q=4, num_runs=nrun + 2, num_decode=2, page_width=16)
    for j, (sid, ids, start, _, _) in enumerate(work[:-1]):
        np.testing.assert_allclose(outs[j], refs[sid][1][3:], atol=1e-4, rtol=1e-4, err_msg=f"{name} run {sid}")
    np.testing.assert_allclose(outs[-1], dec_ref[-1:], atol=1e-4, rtol=1e-4)


@pytest.mark.timeout(300)
def test_tiny_page_major_decode_and_shared_prefix(tiny):
    """Decode rows on a small NaN-filled pool, so that the decode call takes the page-major attention
    (page_major_pays), each row against HF; then two sequences sharing their first pages (a radix-cache prefix)
    decode side by side, which must take the gather path (pages_shared), each row against HF or against the
    same tokens run alone."""
    name, cfg, params = tiny
    refs = [(ids, ref) for ids, ref in _ref(name) if len(ids) >= 2]
    runner = PagedRunner(cfg, params, num_pages=24, shape=ONE)
    assert page_major_pays(4, 16, 24)
    for sid, (ids, _) in enumerate(refs):
        runner.step([(sid, ids[:-1], 0, 0)])
    assert len(refs) <= 4  # one decode call of 4 rows x 16 pages on a 24-page pool: page-major
    outs = runner.step([(sid, ids[-1:], len(ids) - 1, None) for sid, (ids, _) in enumerate(refs)])
    for sid, (ids, ref) in enumerate(refs):
        np.testing.assert_allclose(outs[sid], ref[-1:], atol=1e-4, rtol=1e-4, err_msg=f"{name} page-major {sid}")
    # sequence 100: the longest prompt's first full pages (shared with sequence 0), then other tokens, so that
    # its query differs from sequence 0's; its reference is the same tokens run alone (one row: gather path)
    ids, ref = refs[-1]
    k = (len(ids) - 1) // 4 - 1
    assert k >= 2
    start = 4 * k
    ids100 = ids[:start] + refs[1][0][:6]
    alone = PagedRunner(cfg, params, num_pages=24, shape=ONE)
    alone.step([(0, ids100[:-1], 0, 0)])
    (want,) = alone.step([(0, ids100[-1:], len(ids100) - 1, None)])
    runner = PagedRunner(cfg, params, num_pages=24, shape=ONE)
    runner.step([(0, ids[:-1], 0, 0)])
    runner.pages[100] = list(runner.pages[0][:k])
    runner.step([(100, ids100[start:-1], start, start)])
    outs = runner.step([(0, ids[-1:], len(ids) - 1, None), (100, ids100[-1:], len(ids100) - 1, None)])
    np.testing.assert_allclose(outs[0], ref[-1:], atol=1e-4, rtol=1e-4, err_msg=f"{name} shared prefix, row 0")
    np.testing.assert_allclose(outs[1], want, atol=1e-4, rtol=1e-4, err_msg=f"{name} shared prefix, row 100")


def test_tiny_bfloat16_close(tiny):
    name, cfg, params = tiny
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    runner = PagedRunner(cfg, p16, dtype=jnp.bfloat16)
    ids, ref = _ref(name)[2]
    (logits,) = runner.step([(0, ids, 0, 0)])
    assert logits.dtype == np.float32
    # bf16 weights and activations: ~3 significant digits per op through 2 layers
    np.testing.assert_allclose(logits, ref, atol=0.1, rtol=0.05)
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_full_size_shapes(preset):
    cfg = PRESETS[preset]
    shapes = param_shapes(cfg, jnp.bfloat16)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == cfg.num_params
    expected = {"llama-3-8b": 8.03e9, "qwen2.5-7b": 7.62e9, "qwen3-8b": 8.19e9, "smollm2-135m": 1.345e8}[preset]
    assert abs(n - expected) / expected < 0.01, n
    layer = shapes["layers_0"]["self_attn"]
    assert layer["q_proj"]["kernel"].shape == (cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    assert layer["k_proj"]["kernel"].shape == (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_param_shapes_of_one_layer_stand_for_every_layer(name):
    """param_shapes traces one layer and repeats its shapes: equal, path by path, to flax's init of all layers
    (each tiny family at 3 layers, float32 and bfloat16)."""
    from sgl_jax.models.attention import AttnMetadata
    from sgl_jax.models.llama import CausalLM, init_kv_cache

    cfg = ModelConfig.from_hf(dict(TINY_CONFIGS[name], num_hidden_layers=3))
    i32 = jnp.zeros((1,), jnp.int32)
    meta = AttnMetadata(positions=i32, slot_mapping=i32, dec_page_table=jnp.zeros((1, 1), jnp.int32),
                        dec_kv_lens=i32, pre_page_table=jnp.zeros((0, 1), jnp.int32),
                        pre_kv_lens=jnp.zeros((0,), jnp.int32), block_q=1)
    for dtype in (jnp.float32, jnp.bfloat16):
        kv = jax.eval_shape(lambda: init_kv_cache(cfg, 2, 16, dtype))
        full = jax.eval_shape(lambda kv: CausalLM(cfg, dtype).init(jax.random.PRNGKey(0), i32, meta, kv, i32),
                              kv)["params"]
        want = [(path, x.shape, x.dtype) for path, x in jax.tree_util.tree_flatten_with_path(full)[0]]
        got = [(path, x.shape, x.dtype) for path, x in jax.tree_util.tree_flatten_with_path(
            param_shapes(cfg, dtype))[0]]
        assert got == want
        assert any("layers_2" in jax.tree_util.keystr(path) for path, *_ in got)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", ["layers_1/input_layernorm/weight", "layers_0/mlp/down_proj/kernel",
                                  "layers_0/self_attn/q_proj/bias", "embed_tokens/embedding", "lm_head/kernel"])
def test_a_weight_of_the_wrong_shape_is_named(path):
    """The model reads given weights without flax's per-trace eval_shape check (models/llama.py `_param`), so it
    checks their shapes itself: a weight one row short fails the trace with its path and both shapes."""
    from sgl_jax.models.attention import AttnMetadata
    from sgl_jax.models.llama import CausalLM, init_kv_cache

    cfg = ModelConfig.from_hf(dict(TINY_CONFIGS["qwen2"], num_hidden_layers=2, tie_word_embeddings=False))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes(cfg, jnp.float32))
    i32 = jnp.zeros((1,), jnp.int32)
    meta = AttnMetadata(positions=i32, slot_mapping=i32, dec_page_table=jnp.zeros((1, 1), jnp.int32),
                        dec_kv_lens=i32, pre_page_table=jnp.zeros((0, 1), jnp.int32),
                        pre_kv_lens=jnp.zeros((0,), jnp.int32), block_q=1)
    kv = init_kv_cache(cfg, 2, 16, jnp.float32)
    apply = lambda p: CausalLM(cfg, jnp.float32).apply({"params": p}, i32, meta, kv, i32)  # noqa: E731
    jax.eval_shape(apply, params)  # the right shapes trace
    *parents, leaf = path.split("/")
    node = params
    for key in parents:
        node = node[key]
    want = node[leaf].shape
    node[leaf] = node[leaf][:-1]
    got = node[leaf].shape
    with pytest.raises(ValueError, match=f"weight {path} has shape {re.escape(str(got))}; the model's config wants "
                                         f"{re.escape(str(want))}"):
        jax.eval_shape(apply, params)


def test_from_hf_rope_scaling():
    cfg = ModelConfig.from_hf(TINY_CONFIGS["llama3-tied-mqa"])
    assert cfg.rope_scaling.kind == "llama3" and cfg.tie_word_embeddings and cfg.num_kv_heads == 1


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        from sgl_jax.models.hub import resolve_model
        resolve_model(str(tmp_path / "nope.gguf"))
    d = tmp_path / "bad"
    write_tiny_checkpoint("llama", str(d))
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_weights(str(d), progress=False)
    cfgp = d / "config.json"
    cfgp.write_text(cfgp.read_text().replace('"llama"', '"gpt_neox"', 1))
    with pytest.raises(ModelLoadError, match="gpt_neox"):
        load_weights(str(d), progress=False)
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelLoadError, match="x.gguf"):
        load_weights(str(g), progress=False)
