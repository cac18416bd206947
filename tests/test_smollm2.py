"""SmolLM2-135M-Instruct (GGUF Q4_1, the default model) against Hugging Face transformers' own GGUF load."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import SHIPPED_LEVEL, PagedRunner
from sgl_jax.models.loader import load_weights

REF = os.path.join(os.path.dirname(__file__), "reference", "smollm2_gguf.npz")


def _refs():
    data = np.load(REF)
    n = len([k for k in data if k.startswith("ids_")])
    return [(data[f"ids_{i}"].tolist(), data[f"last_logits_{i}"], data[f"greedy_{i}"].tolist()) for i in range(n)]


@pytest.fixture(scope="module")
def smollm_f32(smollm2_gguf):
    return load_weights(smollm2_gguf, "float32", progress=False)


def _greedy(runner, sid, ids, n):
    (logits,) = runner.step([(sid, ids, 0, None)])
    last = logits[-1]
    out = [int(last.argmax())]
    for i in range(n - 1):
        (logits,) = runner.step([(sid, [out[-1]], len(ids) + i, None)])
        out.append(int(logits[-1].argmax()))
    return last, out


@pytest.mark.slow
def test_smollm2_f32_logits_and_greedy(smollm_f32):
    """What the engine runs on CPU: weights panel-packed for the native matmul, the native paged attention (the
    plain layout is checked against the tiny models' references in test_model.py, and packed against plain in
    test_cpu_matmul.py), compiled at XLA's default optimisation level as a user's compile is (the suite's own
    level is the lowest, tests/conftest.py)."""
    from pallas_kernels import cpu_matmul
    from sgl_jax.models.packing import pack_params

    cfg, params = smollm_f32
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings
    assert cpu_matmul.packed_available(), cpu_matmul.why_not()
    params = pack_params(params, cfg.tie_word_embeddings)
    refs = _refs()
    width = max(-(-(len(ids) + len(g)) // 16) for ids, _, g in refs)  # one decode shape, one prompt shape
    runner = PagedRunner(cfg, params, num_pages=64, page_size=16, block_q=16, nan_fill=False,
                         attention_backend="auto", page_width=width, compiler_options=SHIPPED_LEVEL,
                         prefill_blocks=max(-(-len(ids) // 16) for ids, _, _ in refs))
    for sid, (ids, ref_logits, ref_greedy) in enumerate(refs):
        last, greedy = _greedy(runner, sid, ids, len(ref_greedy))
        np.testing.assert_allclose(last, ref_logits, atol=1e-3, rtol=0, err_msg=f"prompt {sid}")
        assert greedy == ref_greedy, f"prompt {sid}"


@pytest.mark.slow
def test_smollm2_bf16_within_tolerance(smollm2_gguf):
    """bfloat16 weights and activations (the jnp attention), at XLA's default optimisation level as in the test
    above."""
    cfg, params = load_weights(smollm2_gguf, "bfloat16", progress=False)
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    refs = _refs()
    blocks = max(-(-len(ids) // 16) for ids, _, _ in refs)  # one compiled shape for the four prompts
    runner = PagedRunner(cfg, params, num_pages=32, page_size=16, block_q=16, dtype=jnp.bfloat16, nan_fill=False,
                         page_width=blocks, prefill_blocks=blocks, compiler_options=SHIPPED_LEVEL)
    for sid, (ids, ref_logits, _) in enumerate(refs):
        (logits,) = runner.step([(sid, ids, 0, None)])
        err = np.abs(logits[-1] - ref_logits)
        # Stated tolerance for bf16 weights+activations over 30 layers: mean |err| < 0.15, max < 1.5,
        # and the reference's top token among our top 3.
        assert err.mean() < 0.15 and err.max() < 1.5, (sid, err.mean(), err.max())
        assert int(ref_logits.argmax()) in np.argsort(logits[-1])[-3:]


@pytest.mark.slow
def test_load_peak_memory(smollm2_gguf):
    """Peak RSS growth while loading stays <= 2x the final parameter bytes."""
    # VmHWM is the peak RSS of this process image (ru_maxrss would carry the forking parent's peak over exec)
    code = f"""
import jax, jax.numpy as jnp, psutil
jnp.zeros(1).block_until_ready()
from sgl_jax.models.loader import load_weights
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
before = psutil.Process().memory_info().rss
assert hwm() - before < 50 << 20
cfg, params = load_weights({smollm2_gguf!r}, "float32", progress=False)
nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(nbytes, hwm() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    nbytes, growth = map(int, out.split())
    assert nbytes == 134515008 * 4
    assert growth <= 2 * nbytes, (growth, nbytes)
