"""The CPU few-row matmul kernels (pallas_kernels/cpu_matmul.py), int8 and float32 weights, against a float64 numpy
reference, and their use in the model: a decode forward with them equals the forward on XLA's path to float32
rounding."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_matmul

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def native():
    if not (cpu_matmul.int8_available() and cpu_matmul.f32_available()):  # a failure, not a skip: CI and the dev
        pytest.fail(f"the native matmul kernels did not build: {cpu_matmul.why_not()}")  # machines have a C++ compiler


def _case(rng, m, k, n, out_axis):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.integers(-127, 128, (k, n) if out_axis == 1 else (n, k)).astype(np.int8)
    s = (rng.random(n) * 0.01).astype(np.float32)
    wk = w.astype(np.float64) if out_axis == 1 else w.T.astype(np.float64)
    return x, w, s, (x.astype(np.float64) @ wk) * s


@pytest.mark.parametrize("m,k,n,out_axis", [
    (1, 576, 1536, 1), (1, 1536, 576, 1), (3, 576, 192, 1), (16, 576, 1536, 1),  # blocks, both thread halves
    (2, 100, 300, 1), (1, 7, 5, 1), (4, 64, 257, 1),                             # ragged last block, small
    (1, 576, 4099, 0), (5, 577, 1001, 0), (16, 64, 96, 0), (1, 3, 2, 0),         # tied head layout, K % 8 != 0
])
def test_matches_float64_reference(m, k, n, out_axis):
    x, w, s, ref = _case(np.random.default_rng(m * 7 + k + n), m, k, n, out_axis)
    y = np.asarray(jax.jit(lambda x, w, s: cpu_matmul.int8_matmul(x, w, s, out_axis))(x, w, s))
    assert y.shape == (m, n) and y.dtype == np.float32
    # float32 accumulation of k products: error ~ sqrt(k) ulp of the partial sums
    tol = 4 * np.sqrt(k) * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w.astype(np.float64) if out_axis == 1
                                                                         else w.T.astype(np.float64)) * s)
    assert np.all(np.abs(y - ref) <= tol + 1e-30)


def test_non_finite_inputs_propagate_like_a_dot():
    x, w, s, _ = _case(np.random.default_rng(1), 2, 64, 300, 1)
    x[1, 5] = np.nan
    y = np.asarray(jax.jit(lambda x, w, s: cpu_matmul.int8_matmul(x, w, s, 1))(x, w, s))
    assert np.all(np.isfinite(y[0])) and np.all(np.isnan(y[1][w[5] != 0]))


def test_bad_shapes_raise_naming_the_operands():
    x = jnp.zeros((cpu_matmul.MAX_ROWS_INT8 + 1, 8), jnp.float32)
    with pytest.raises(ValueError, match="native int8 matmul"):
        cpu_matmul.int8_matmul(x, jnp.zeros((8, 4), jnp.int8), jnp.ones(4), 1)
    with pytest.raises(ValueError, match="native int8 matmul"):
        cpu_matmul.int8_matmul(jnp.zeros((1, 8)), jnp.zeros((9, 4), jnp.int8), jnp.ones(4), 1)


def test_concurrent_calls_in_one_step_do_not_deadlock():
    """Independent matmuls in one jit run side by side on XLA's pool; each hands half its work to that pool, and
    a call whose half never started runs it itself."""
    rng = np.random.default_rng(3)
    cases = [_case(rng, 1, 576, 1536, 1) for _ in range(12)]

    @jax.jit
    def many(xs, ws, ss):
        return [cpu_matmul.int8_matmul(x, w, s, 1) for x, w, s in zip(xs, ws, ss)]

    outs = many(*(list(c[i] for c in cases) for i in range(3)))
    for (_, _, _, ref), y in zip(cases, outs):
        np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=1e-4)


def test_int8_matmul_routes_decode_rows_to_the_kernel(monkeypatch):
    """llama.int8_matmul: float32 rows up to MAX_ROWS call the kernel, and give what XLA's convert + dot gives (the
    kernel switched off) to float32 rounding; more rows (prefill) never call it. The model-level check is
    tests/test_quant.py (the int8 forward, decode steps included, equals the float forward on the dequantized
    weights)."""
    from sgl_jax.models import llama

    for out_axis in (1, 0):
        x, w, s, _ = _case(np.random.default_rng(5), 3, 576, 1536, out_axis)

        def f():  # a new function each time: jit caches traces by function
            return jax.jit(lambda x: llama.int8_matmul(x, w, s, out_axis=out_axis))

        assert cpu_matmul.INT8_TARGET in f().lower(x).as_text()
        native = np.asarray(f()(x))
        big = np.zeros((cpu_matmul.MAX_ROWS_INT8 + 1, 576), np.float32)
        assert cpu_matmul.INT8_TARGET not in f().lower(big).as_text()
        monkeypatch.setitem(cpu_matmul._INT8._state, "ok", False)
        assert cpu_matmul.INT8_TARGET not in f().lower(x).as_text()
        xla = np.asarray(f()(x))
        monkeypatch.setitem(cpu_matmul._INT8._state, "ok", True)
        np.testing.assert_allclose(native, xla, rtol=1e-5, atol=1e-5 * np.abs(xla).max())


@pytest.mark.parametrize("m,k,n,out_axis", [
    (2, 576, 1536, 1), (8, 1536, 576, 1), (5, 100, 300, 1), (16, 64, 257, 1),  # blocks, both halves, ragged
    (4, 576, 4099, 0), (3, 577, 1001, 0), (2, 3, 2, 0),                         # the tied head's layout
])
def test_f32_matches_float64_reference(m, k, n, out_axis):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n) if out_axis == 1 else (n, k)).astype(np.float32)
    wk = (w if out_axis == 1 else w.T).astype(np.float64)
    ref = x.astype(np.float64) @ wk
    y = np.asarray(jax.jit(lambda x, w: cpu_matmul.f32_matmul(x, w, out_axis))(x, w))
    assert y.shape == (m, n) and y.dtype == np.float32
    tol = 4 * np.sqrt(k) * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(wk))
    assert np.all(np.abs(y - ref) <= tol + 1e-30)


def test_f32_routing_in_the_model(monkeypatch, tmp_path):
    """The LM head sends 2-8 float32 rows to the kernel, 1 row and 9+ rows to XLA's dot; a tiny model's decode
    logits (4 rows) with the kernel equal those without it (switched off) to float32 rounding, for an untied head
    (tiny llama: "io" layout) and a tied one (tiny qwen2: the embedding, "oi")."""
    from helpers import PagedRunner
    from sgl_jax.models.loader import load_weights
    from sgl_jax.models.testing import write_tiny_checkpoint

    lo, hi = cpu_matmul.F32_ROWS
    for rows, routed in ((1, False), (lo, True), (hi, True), (hi + 1, False)):
        assert cpu_matmul.f32_routes(jnp.ones((rows, 8), jnp.float32)) == routed, rows
    assert not cpu_matmul.f32_routes(jnp.ones((4, 8), jnp.bfloat16))
    for family in ("llama", "qwen2"):
        path = tmp_path / family
        write_tiny_checkpoint(family, str(path))
        cfg, params = load_weights(str(path), progress=False)
        outs = {}
        for on in (True, False):
            monkeypatch.setitem(cpu_matmul._F32._state, "ok", on)
            r = PagedRunner(cfg, params, num_pages=32, page_size=16, block_q=8)
            r.step([(i, list(range(3 + i, 20 + 2 * i)), 0, 0) for i in range(4)])
            work = [(i, [7 + i], 17 + i, None) for i in range(4)]  # 4 decode rows
            outs[on] = np.concatenate(r.step(work))
        np.testing.assert_allclose(outs[True], outs[False], atol=2e-5, rtol=2e-5)
